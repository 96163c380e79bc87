"""Tables from files as users export them: Parquet, CSV or JSON Lines, told by the name.

One reader for every command that takes a table (a reach population, a data provider's
labels, a panel, a vendor's campaign report), so each accepts the same formats with the
same type inference and the same errors. Column types are Arrow's: Parquet keeps its own;
CSV and JSON Lines infer integers, floats, booleans, and (JSON) lists; text columns that
hold only ISO 8601 dates, or only instants, become dates or timestamps
(:func:`times_from_text`). An empty CSV cell is a missing value in every column.
"""

from __future__ import annotations

from gzip import GzipFile
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from infra.compressed import json_lines_command, open_binary, starts_like_json_array

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
            return times_from_text(_blank_text_as_null(pa_csv.read_csv(path)))
        except (pa.ArrowInvalid, OSError) as exc:
            raise TableFileError(f"cannot read {path} as CSV (a header line, then rows): {exc}") from None
    if name.endswith(JSON_LINES_SUFFIXES):
        try:
            return _read_json_lines(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise TableFileError(
                f"cannot read {path} as JSON Lines (one JSON object per line, each key with one type "
                f"throughout): {exc}.{_json_array_hint(path)}"
            ) from None
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise TableFileError(f"cannot read {path} as Parquet: {exc} (tables are {FORMATS})") from None


def _blank_text_as_null(table: pa.Table) -> pa.Table:
    """A CSV's empty cells in text columns as missing values, as they already are in number
    columns: Arrow keeps them as ``""`` (with its default null markers such as "NA", a
    country code, left as text), which would make "no value" a category of its own."""
    for index, field in enumerate(table.schema):
        if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
            column = table.column(index)
            blank = pc.equal(column, "")
            if pc.any(blank).as_py():
                table = table.set_column(index, field, pc.if_else(blank, pa.scalar(None, field.type), column))
    return table


def _read_json_lines(path: Path) -> pa.Table:
    """The JSON Lines table, its text times typed as :func:`times_from_text` types CSV's.

    Arrow's JSON reader takes an ISO date (``"2024-01-31"``) for a midnight timestamp, so a
    date column came out a timestamp where the same CSV gives a date. The columns it
    inferred as timestamps are therefore read again as text (a second read, only then) and
    typed like CSV's; one that mixes dates and instants keeps Arrow's timestamps.
    """
    table = pa_json.read_json(path)
    inferred = [field.name for field in table.schema if pa.types.is_timestamp(field.type)]
    if not inferred:
        return times_from_text(table)
    as_text = pa.schema([(name, pa.string()) for name in inferred])
    reread = pa_json.read_json(path, parse_options=pa_json.ParseOptions(explicit_schema=as_text))
    typed = times_from_text(reread.select(table.column_names))  # (explicit columns come first)
    for name in inferred:
        index = typed.column_names.index(name)
        if pa.types.is_string(typed.schema.field(index).type):
            typed = typed.set_column(index, name, table.column(name))
    return typed


def _json_array_hint(path: Path) -> str:
    """How to convert ``path`` if it is one JSON array (the usual reason a JSON file fails here)."""
    try:
        with open_binary(path) as handle:
            array, gzipped = starts_like_json_array(handle), isinstance(handle, GzipFile)
    except OSError:  # (unreadable: the reader's own error says so)
        return ""
    if not array:
        return ""
    convert = json_lines_command(str(path), gzipped)
    return f" It is one JSON array: convert it first, e.g. {convert} > {path.name.split('.')[0]}.jsonl"


_ISO_DATE = r"^\d{4}-\d\d-\d\d$"
_ISO_TIME = r"^\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d(:\d\d(\.\d+)?)?([Zz]|[+-]\d\d:?\d\d)?$"


def times_from_text(table: pa.Table) -> pa.Table:
    """Text columns holding only ISO 8601 dates, or only instants, as date or timestamp columns.

    Why: Arrow's readers infer times only in the forms they know; JSON's leaves out
    fractional seconds, so every instant a JavaScript ``toISOString()`` wrote
    (``...:33.123Z``) stayed text (in a reach population, a categorical field with a value
    per user). A column converts when every value matches and Arrow's cast takes them all
    (zoned throughout, or naive throughout, as for CSV); otherwise it stays text.
    """
    for index, name in enumerate(table.column_names):
        column = table.column(name)
        if pa.types.is_string(column.type) and column.null_count < len(column):
            converted = _as_time(column)
            if converted is not None:
                table = table.set_column(index, name, converted)
    return table


def _as_time(column: pa.ChunkedArray) -> pa.ChunkedArray | None:
    """``column`` as dates, zoned or naive timestamps: the first of those its text all matches
    and casts to; None if none."""
    kinds: tuple[pa.DataType, ...]
    if pc.all(pc.match_substring_regex(column, _ISO_DATE)).as_py():
        kinds = (pa.date32(),)
    elif pc.all(pc.match_substring_regex(column, _ISO_TIME)).as_py():
        kinds = (pa.timestamp("us", "UTC"), pa.timestamp("us"))
    else:
        return None
    for kind in kinds:
        try:
            return pc.cast(column, kind)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue
    return None
