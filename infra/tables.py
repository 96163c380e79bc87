"""Tables from files as users export them: Parquet, CSV or JSON Lines, told by the name.

One reader for every command that takes a table (a reach population, a data provider's
labels, a panel, a vendor's campaign report), so each accepts the same formats with the
same type inference and the same errors. Column types are Arrow's: Parquet keeps its own;
CSV and JSON Lines infer integers, floats, booleans, and (JSON) lists; text columns that
hold only ISO 8601 dates, or only instants, become dates or timestamps
(:func:`times_from_text`).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from infra.compressed import open_binary, starts_like_json_array

CSV_SUFFIXES = (".csv", ".csv.gz")
JSON_LINES_SUFFIXES = tuple(suffix + gz for suffix in (".jsonl", ".ndjson", ".json") for gz in ("", ".gz"))
FORMATS = "Parquet, CSV (.csv, .csv.gz) or JSON Lines (.jsonl, .ndjson, .json, each optionally .gz)"


class TableFileError(ValueError):
    """A table file cannot be read in the format its name says; the message says what to fix."""


def read_table_file(path: Path) -> pa.Table:
    """The table in ``path``: CSV or JSON Lines by its suffix, else Parquet."""
    name = path.name.lower()
    if name.endswith(CSV_SUFFIXES):
        try:
            return times_from_text(pa_csv.read_csv(path))
        except (pa.ArrowInvalid, OSError) as exc:
            raise TableFileError(f"cannot read {path} as CSV (a header line, then rows): {exc}") from None
    if name.endswith(JSON_LINES_SUFFIXES):
        try:
            return times_from_text(pa_json.read_json(path))
        except (pa.ArrowInvalid, OSError) as exc:
            with open_binary(path) as handle:
                array = starts_like_json_array(handle)
            hint = f" It is one JSON array: convert it first, e.g. jq -c '.[]' {path}" if array else ""
            raise TableFileError(
                f"cannot read {path} as JSON Lines (one JSON object per line, each key with one type "
                f"throughout): {exc}.{hint}"
            ) from None
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise TableFileError(f"cannot read {path} as Parquet: {exc} (tables are {FORMATS})") from None


_ISO_DATE = r"^\d{4}-\d\d-\d\d$"
_ISO_TIME = r"^\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d(:\d\d(\.\d+)?)?([Zz]|[+-]\d\d:?\d\d)?$"


def times_from_text(table: pa.Table) -> pa.Table:
    """Text columns holding only ISO 8601 dates, or only instants, as date or timestamp columns.

    Why: Arrow's readers infer times only in the forms they know; JSON's leaves out
    fractional seconds, so every instant a JavaScript ``toISOString()`` wrote (``...:33.123Z``)
    stayed text (in a reach population, a categorical field with a value per user). A column converts when
    every value matches and Arrow's cast takes them all (zoned throughout, or naive
    throughout, as for CSV); otherwise it stays text.
    """
    for index, name in enumerate(table.column_names):
        column = table.column(name)
        if not pa.types.is_string(column.type) or column.null_count == len(column):
            continue
        for pattern, kinds in (
            (_ISO_DATE, (pa.date32(),)),
            (_ISO_TIME, (pa.timestamp("us", "UTC"), pa.timestamp("us"))),
        ):
            if not pc.all(pc.match_substring_regex(column, pattern)).as_py():
                continue
            for kind in kinds:
                try:
                    table = table.set_column(index, name, pc.cast(column, kind))
                    break
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    continue
            break
    return table
