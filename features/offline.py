"""Compaction of the offline store: one row per (entity, event timestamp), in few files.

The stream engine appends a Parquet part file per cycle, so an entity that changes in
several cycles within one tile leaves several rows with the same event timestamp; the
last one (largest ``created_timestamp``) holds the tile's value. Feast's file offline
store is meant to keep that row, but it sorts by created and then by event timestamp
with Dask's sort, which is not stable, so it picks among the tied rows at random (seen
in ``tests/test_historical_features.py``). Compaction removes the ties, and turns
thousands of small part files into one, which also makes Feast's reads faster.

Compaction only reads the part files present when it starts and replaces them with one
file (written under a dot-name, then renamed, then the inputs deleted), so a worker may
keep appending meanwhile; rows appended after it started are compacted next time.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from features.definitions import FeatureGroup
from features.feast_objects import CREATED_FIELD, TIMESTAMP_FIELD, offline_path, offline_schema

COMPACTED_SUFFIX = "-compacted.parquet"


@dataclass(frozen=True)
class CompactionResult:
    group: str
    files_before: int
    rows_before: int
    rows_after: int


def compact_offline(
    data_dir: Path, group: FeatureGroup, *, small_only: bool = False, writer: str = "", attempts: int = 5
) -> CompactionResult:
    """Merge ``group``'s offline part files into one, keeping the latest row per entity and timestamp.

    ``small_only`` merges just the parts not yet compacted (what the stream worker does
    every few minutes, at a cost that does not grow with the history); ties between two
    compacted files then remain possible where a tile spans two compactions, which a full
    compaction (as before every training set) removes. ``writer`` limits it to the parts
    that writer appended. A part that another compaction removes meanwhile makes it list
    the files again (up to ``attempts`` times).
    """
    for attempt in range(attempts):
        parts = _parts(offline_path(data_dir, group), small_only, writer)
        try:
            return _compact(group, parts)
        except (duckdb.IOException, FileNotFoundError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def _parts(directory: Path, small_only: bool, writer: str) -> list[Path]:
    parts = sorted(directory.glob("part-*.parquet"))
    if small_only:
        parts = [part for part in parts if not part.name.endswith(COMPACTED_SUFFIX)]
    if writer:
        parts = [part for part in parts if f"-{writer}-" in part.name]
    return parts


def _compact(group: FeatureGroup, parts: list[Path]) -> CompactionResult:
    if len(parts) <= 1:
        rows = pq.ParquetFile(parts[0]).metadata.num_rows if parts else 0
        return CompactionResult(group.name, len(parts), rows, rows)
    directory = parts[0].parent
    schema = offline_schema(group)
    connection = duckdb.connect(config={"threads": 1})
    try:
        files = ", ".join(f"'{str(p).replace(chr(39), chr(39) * 2)}'" for p in parts)
        key, ts = f'"{group.key}"', f'"{TIMESTAMP_FIELD}"'
        table = connection.sql(
            f"SELECT * FROM read_parquet([{files}]) QUALIFY row_number() OVER "
            f'(PARTITION BY {key}, {ts} ORDER BY "{CREATED_FIELD}" DESC) = 1 ORDER BY {ts}, {key}'
        ).to_arrow_table()
        rows_before = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
    finally:
        connection.close()
    name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}{COMPACTED_SUFFIX}"
    staging = directory / f".{name}"
    pq.write_table(_conform(table, schema), staging, use_compliant_nested_type=False)
    staging.rename(directory / name)
    for part in parts:
        part.unlink(missing_ok=True)
    return CompactionResult(group.name, len(parts), rows_before, table.num_rows)


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """DuckDB hands back timestamps with its own time zone and list field names; restore Feast's."""
    columns = []
    for field in schema:
        column = table.column(field.name)
        if pa.types.is_timestamp(field.type):
            column = column.cast(pa.timestamp("us", "UTC"))
        columns.append(column.cast(field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def last_row_per_key_and_time(rows: pa.Table, key: str) -> pa.Table:
    """The last row (in table order) of each (``key``, event timestamp) pair, in table order.

    Feature rows are emitted in order, so the last row of an entity and tile holds the
    tile's final value; earlier ones are intermediate states Feast must not pick.
    """
    indexed = rows.append_column("__row", pa.array(np.arange(rows.num_rows, dtype=np.int64)))
    last = indexed.group_by([key, TIMESTAMP_FIELD]).aggregate([("__row", "max")])
    keep = np.sort(last.column("__row_max").to_numpy())
    return rows.take(pa.array(keep))
