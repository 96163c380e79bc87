"""Parquet inputs that users hand to commands: one file, or a directory of parts.

Arrow takes a directory's schema from its first file, so a column that only later parts
have (an optional field a producer started sending) would be dropped from all of them,
and a part with a column of another type would fail late. Every reader of user-given
Parquet opens it here, with the parts' schemas unified.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq


def open_parquet(path: Path) -> ds.Dataset:
    """A dataset over ``path`` (a file or a directory of parts) whose schema has every part's columns.

    Raises what Arrow raises for unreadable files (``pa.ArrowInvalid``, ``OSError``) and for
    parts whose columns cannot be unified (``pa.ArrowTypeError`` / ``pa.ArrowInvalid``).
    """
    if path.is_file():
        return ds.dataset(path, format="parquet")
    discovered = ds.dataset(path, format="parquet")
    schema = pa.unify_schemas([pq.read_schema(file) for file in discovered.files])
    return ds.dataset(discovered.files, schema=schema, format="parquet")
