"""Which population columns can be targeted, and how: the field schema of a reach sample.

Any Parquet population works: ``user_id`` plus columns whose Arrow type decides the
field kind. Strings (plain or dictionary-encoded) are categorical, booleans boolean,
integers integer, floats and decimals number, dates date and timestamps timestamp (held as
days or microseconds since the epoch, written as ISO 8601 text: :mod:`estimation.temporal`),
lists of strings list fields (``has_any``/``has_all``). Other types (structs, binary, ...)
are not targetable and are reported as skipped rather than silently dropped. The schema
records each field's build-time vocabulary with exact population counts (for ``GET
/v1/reach/fields`` and for warning about values that match nobody) and numeric ranges.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from estimation.temporal import as_number, is_temporal, iso_text, outside_iso_years, temporal_numbers

MAX_LISTED_VALUES = 10_000


class FieldKind(StrEnum):
    CATEGORICAL = "categorical"
    BOOLEAN = "boolean"
    INTEGER = "integer"
    NUMBER = "number"
    LIST = "list"
    DATE = "date"
    TIMESTAMP = "timestamp"

    @property
    def numeric(self) -> bool:
        """Held as numbers in a sample (compared by value, with ranges and binned strata)."""
        return self in (FieldKind.INTEGER, FieldKind.NUMBER, FieldKind.DATE, FieldKind.TIMESTAMP)

    @property
    def integral(self) -> bool:
        """Held as whole numbers (integers, days, microseconds)."""
        return self in (FieldKind.INTEGER, FieldKind.DATE, FieldKind.TIMESTAMP)

    @property
    def temporal(self) -> bool:
        return self in (FieldKind.DATE, FieldKind.TIMESTAMP)


OPERATORS: dict[FieldKind, tuple[str, ...]] = {
    FieldKind.CATEGORICAL: ("eq", "in"),
    FieldKind.BOOLEAN: ("eq", "in"),
    FieldKind.INTEGER: ("eq", "in", "between"),
    FieldKind.NUMBER: ("eq", "in", "between"),
    FieldKind.LIST: ("has_any", "has_all"),
    FieldKind.DATE: ("eq", "in", "between"),
    FieldKind.TIMESTAMP: ("eq", "in", "between"),
}


class PopulationError(ValueError):
    """The population table cannot be used (missing ``user_id``, bad column types, ...)."""


@dataclass(frozen=True)
class FieldSpec:
    """One targetable field. ``values``/``counts`` are most frequent first (population counts).

    ``minimum``/``maximum`` of a date or timestamp field are in the sample's units (days or
    microseconds since the epoch); its JSON form writes them as ISO 8601 text.
    """

    name: str
    kind: FieldKind
    values: tuple[Any, ...] = ()
    counts: tuple[int, ...] = ()
    complete: bool = True
    minimum: float | None = None
    maximum: float | None = None
    nulls: int = 0

    @property
    def operators(self) -> tuple[str, ...]:
        return OPERATORS[self.kind]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind.value, "nulls": self.nulls}
        if self.kind in (FieldKind.CATEGORICAL, FieldKind.BOOLEAN, FieldKind.LIST):
            out.update(values=list(self.values), counts=list(self.counts), complete=self.complete)
        elif self.kind.temporal:
            out.update(minimum=_iso(self.minimum, self.kind), maximum=_iso(self.maximum, self.kind))
        else:
            out.update(minimum=self.minimum, maximum=self.maximum)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FieldSpec:
        kind = FieldKind(data["kind"])
        minimum, maximum = data.get("minimum"), data.get("maximum")
        if kind.temporal:
            minimum, maximum = _from_iso(minimum, kind), _from_iso(maximum, kind)
        return cls(
            name=str(data["name"]),
            kind=kind,
            values=tuple(data.get("values", ())),
            counts=tuple(int(c) for c in data.get("counts", ())),
            complete=bool(data.get("complete", True)),
            minimum=minimum,
            maximum=maximum,
            nulls=int(data.get("nulls", 0)),
        )


@dataclass(frozen=True)
class Schema:
    """The targetable fields of a sample, in population column order."""

    fields: dict[str, FieldSpec]
    skipped: dict[str, str] = field(default_factory=dict)

    def __contains__(self, name: object) -> bool:
        return name in self.fields

    def __getitem__(self, name: str) -> FieldSpec:
        return self.fields[name]

    def names(self) -> list[str]:
        return list(self.fields)

    def to_json(self) -> dict[str, Any]:
        return {"fields": [f.to_json() for f in self.fields.values()], "skipped": dict(self.skipped)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Schema:
        specs = [FieldSpec.from_json(item) for item in data["fields"]]
        return cls({s.name: s for s in specs}, dict(data.get("skipped", {})))


def _iso(number: float | None, kind: FieldKind) -> str | None:
    return None if number is None else iso_text(number, kind is FieldKind.DATE)


def _from_iso(text: str | None, kind: FieldKind) -> float | None:
    return None if text is None else as_number(text, kind is FieldKind.DATE)


def field_kind(data_type: pa.DataType) -> FieldKind | None:
    """The kind a column of this Arrow type becomes, or ``None`` when it is not targetable."""
    if pa.types.is_dictionary(data_type):
        return field_kind(data_type.value_type)
    if pa.types.is_string(data_type) or pa.types.is_large_string(data_type):
        return FieldKind.CATEGORICAL
    if pa.types.is_boolean(data_type):
        return FieldKind.BOOLEAN
    if pa.types.is_integer(data_type):
        return FieldKind.INTEGER
    if pa.types.is_floating(data_type) or pa.types.is_decimal(data_type):
        return FieldKind.NUMBER  # decimals (money from a warehouse) as doubles: ranges, not cents
    if pa.types.is_date(data_type):
        return FieldKind.DATE
    if pa.types.is_timestamp(data_type):
        return FieldKind.TIMESTAMP
    if pa.types.is_list(data_type) or pa.types.is_large_list(data_type):
        item = data_type.value_type
        if pa.types.is_dictionary(item):
            item = item.value_type
        if pa.types.is_string(item) or pa.types.is_large_string(item):
            return FieldKind.LIST
    return None


def normalize_column(column: pa.Array | pa.ChunkedArray, kind: FieldKind) -> pa.Array:
    """One contiguous array in the canonical type of ``kind`` (string, bool, int64, float64,
    list<string>; dates and timestamps as int64 days or microseconds since the epoch, and
    integer columns taken as already in those units)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    if kind is FieldKind.CATEGORICAL:
        return array.cast(pa.string())
    if kind is FieldKind.BOOLEAN:
        return array.cast(pa.bool_())
    if kind is FieldKind.INTEGER:
        return array.cast(pa.int64())
    if kind is FieldKind.NUMBER:
        return array.cast(pa.float64())
    if kind.temporal:
        return temporal_numbers(array) if is_temporal(array.type) else array.cast(pa.int64())
    if pa.types.is_large_list(array.type):
        array = array.cast(pa.list_(array.type.value_type))
    values = array.values
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    offsets = array.offsets
    return pa.ListArray.from_arrays(offsets, values.cast(pa.string()), mask=array.is_null())


def infer_schema(table: pa.Table, *, exclude: set[str] | None = None) -> Schema:
    """Describe every targetable column of ``table`` (``user_id`` and ``exclude`` left out)."""
    if "user_id" not in table.column_names:
        raise PopulationError(
            f"the population has no user_id column (columns: {', '.join(table.column_names)})"
        )
    exclude = (exclude or set()) | {"user_id"}
    fields: dict[str, FieldSpec] = {}
    skipped: dict[str, str] = {}
    for name in table.column_names:
        if name in exclude:
            continue
        if name.startswith("_"):
            skipped[name] = "names starting with '_' are reserved for the sample's own columns"
            continue
        if not name.strip():  # (a CSV header's empty cell: a targeting leaf cannot name it)
            skipped[name] = "a column needs a name to be targeted"
            continue
        kind = field_kind(table.schema.field(name).type)
        if kind is None:
            skipped[name] = f"type {table.schema.field(name).type} is not targetable"
            continue
        try:
            normalized = normalize_column(table.column(name), kind)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:  # e.g. uint64 past int64
            skipped[name] = f"type {table.schema.field(name).type} is not targetable here: {exc}"
            continue
        if kind.temporal and (why := outside_iso_years(normalized, kind is FieldKind.DATE)):
            skipped[name] = f"type {table.schema.field(name).type} is not targetable here: {why}"
            continue
        fields[name] = describe_column(name, normalized, kind)
    return Schema(fields, skipped)


def describe_column(name: str, array: pa.Array, kind: FieldKind) -> FieldSpec:
    """Vocabulary and counts (categorical, boolean, list) or range (numeric) of one column."""
    nulls = int(array.null_count)
    if kind.numeric:
        finite = array
        if kind is FieldKind.NUMBER:
            as_np = array.to_numpy(zero_copy_only=False)
            if np.isinf(as_np).any():
                raise PopulationError(f"column {name!r} holds infinite values")
            finite = pa.array(as_np, pa.float64(), from_pandas=True)
            nulls = int(finite.null_count)
        bounds = pc.min_max(finite)
        low, high = bounds["min"].as_py(), bounds["max"].as_py()
        return FieldSpec(
            name,
            kind,
            minimum=None if low is None else float(low),
            maximum=None if high is None else float(high),
            nulls=nulls,
        )
    values = pc.list_flatten(array) if kind is FieldKind.LIST else array
    counted = pc.value_counts(values.drop_null())
    items = counted.field("values").to_pylist()
    counts = counted.field("counts").to_numpy().astype(np.int64)
    order = np.lexsort((np.arange(len(items)), -counts))
    if kind is FieldKind.BOOLEAN:
        order = np.argsort([bool(items[i]) for i in range(len(items))], kind="stable")
    complete = len(order) <= MAX_LISTED_VALUES
    order = order[:MAX_LISTED_VALUES]
    return FieldSpec(
        name,
        kind,
        values=tuple(items[i] for i in order),
        counts=tuple(int(counts[i]) for i in order),
        complete=complete,
        nulls=nulls,
    )
