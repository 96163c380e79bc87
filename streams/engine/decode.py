"""Kafka message values -> an Arrow table of the event fields features read, plus rejects.

The hot path is a small compiled reader (``_fastdecode.c``) that appends the fields the
feature definitions read straight into Arrow's column buffers (everything else, such as
a profile's nested attributes, is checked against the JSON grammar and skipped). It
accepts only messages it is certain of and hands every other one back (an escape in a
read text field, a repeated field, malformed JSON, ...); those are decoded by msgspec
into slim structs of the same fields, which is also the whole path where the extension
was not compiled (same results; the fast path is ~2.5x faster on simulated traffic). The
columns are then checked with vector kernels: the
event type is known, each type's required fields are present, ids have 1..128 characters
and a search's query up to 1,024, the event time is an RFC 3339 instant inside
2000..2100, amounts are non-negative (and integers fit int64), a profile's ``action`` is
``upsert`` or ``delete``; the schema version is absent or 1 (checked while decoding).
These are the producer SDK's rules (:mod:`streams.events`, read off its structs where
they can be) for the fields the engine uses; fields
no feature reads are not re-validated here (an unknown field, an over-long id nobody
reads, bytes that are not UTF-8 inside a skipped field), because the SDK already did and
re-decoding every event in full would halve the engine's throughput.

A message that is not one JSON object of the right field types (malformed or truncated
JSON, two objects, a number where a string belongs, a string that is not UTF-8) is
rejected with its reason by a second, per-message pass over that batch; a batch with an
unparseable event time is split in halves until each bad event is isolated (O(log n)
extra column builds per bad event). Nothing a message holds stops the worker.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, cast

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray

from features.definitions import FEATURE_GROUPS, FeatureGroup
from infra.arrow_times import EventTimeError, epoch_ms, rfc3339_epoch_ms
from streams.engine.collector import collector_paused
from streams.events import (
    EVENT_TYPE_NAMES,
    EVENT_TYPES,
    SCHEMA_VERSION,
    InvalidEventError,
    MalformedJSONError,
    SchemaViolationError,
    UnknownEventTypeError,
    classify_decode_error,
    not_utf8_reason,
)

try:  # built by `pip install` (setup.py); optional: without a C compiler msgspec decodes everything
    from streams.engine import _fastdecode
except ImportError:  # pragma: no cover - depends on the install
    _fastdecode = None  # type: ignore[assignment]

# Whether the compiled decode fast path is installed (the worker says so when it is not).
FAST_DECODE_AVAILABLE = _fastdecode is not None

# Arrow types of the event fields a feature definition may read.
_FIELD_TYPES: dict[str, pa.DataType] = {
    "type": pa.string(),
    "event_id": pa.string(),
    "event_time": pa.string(),
    "user_id": pa.string(),
    "ad_id": pa.string(),
    "campaign_id": pa.string(),
    "advertiser_id": pa.string(),
    "impression_id": pa.string(),
    "click_id": pa.string(),
    "query": pa.string(),
    "placement": pa.string(),
    "cost_micros": pa.int64(),
    "value": pa.float64(),
    "position": pa.int64(),
    "action": pa.string(),
}
# Messages decoded at a time (EventDecoder.decode).
DECODE_CHUNK = 16_384
# The same fields as msgspec decodes them (an integer must fit int64, as in Arrow).
_MSGSPEC_TYPES: dict[str, Any] = {
    "string": str,
    "int64": Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)],
    "double": float,
}
# The same fields as the compiled fast path reads them (_fastdecode.c's field kinds).
_FAST_KINDS = {"string": 0, "int64": 1, "double": 2}
_FAST_VERSION_KIND = 3
_FAST_INSTANT_KIND = 4  # text in RFC 3339's form (infra.arrow_times.RFC3339_PATTERN), else handed back
_ALWAYS = ("type", "event_id", "event_time", "user_id")
# Read whatever the feature definitions read: a user_profile's ``"action": "delete"`` makes
# the engines forget the user (see streams.engine.state: user deletions).
ACTION_COLUMN = "action"
DELETE_ACTION = "delete"
# Absent or this platform's SCHEMA_VERSION; checked, never read into a column.
VERSION_FIELD = "schema_version"
_EARLIEST_MS = 946_684_800_000  # 2000-01-01T00:00:00Z
_LATEST_MS = 4_102_444_800_000  # 2100-01-01T00:00:00Z
_NON_NEGATIVE = ("cost_micros", "value", "position")

# The rules above, named for engines that restate them in their own language (streams.flink).
FIELD_TYPES = _FIELD_TYPES
ALWAYS_PRESENT = _ALWAYS
EARLIEST_MS, LATEST_MS = _EARLIEST_MS, _LATEST_MS


def outside_event_time_range(millis: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Per epoch-ms time, whether it lies outside the SDK's 2000-01-01..2100-01-01 (null stays null).

    The one statement of the range for the engine and every reader that keeps its rules
    (training logs, query-feature files); Flink's SQL restates it from the constants.
    """
    return pc.or_(pc.less(millis, _EARLIEST_MS), pc.greater_equal(millis, _LATEST_MS))


NON_NEGATIVE = _NON_NEGATIVE


class DecodeError(ValueError):
    """A feature definition reads an event field the engine does not know how to type."""


def needed_columns(groups: Sequence[FeatureGroup] = FEATURE_GROUPS) -> tuple[str, ...]:
    """The event fields ``groups`` read (keys and aggregated columns), in a stable order."""
    wanted = {*_ALWAYS, ACTION_COLUMN}
    for group in groups:
        wanted.add(group.key)
        wanted.update(a.column for a in group.aggregations if a.column)
    unknown = wanted - set(_FIELD_TYPES)
    if unknown:
        raise DecodeError(f"feature definitions read event fields the engine cannot type: {sorted(unknown)}")
    return tuple(name for name in _FIELD_TYPES if name in wanted)


def _members(info: Any) -> tuple[Any, ...]:
    """A msgspec type as its alternatives (a union's members; metadata stripped)."""
    while isinstance(info, msgspec.inspect.Metadata):
        info = info.type
    if isinstance(info, msgspec.inspect.UnionType):
        return tuple(alternative for member in info.types for alternative in _members(member))
    return (info,)


def _read_fields(columns: Sequence[str]) -> Iterator[tuple[str, str, tuple[Any, ...]]]:
    """(event type, field, the field's alternative types) of each of ``columns`` in the SDK's structs."""
    for type_name, cls in zip(EVENT_TYPE_NAMES, EVENT_TYPES, strict=True):
        for struct_field in msgspec.inspect.type_info(cls).fields:  # type: ignore[attr-defined]
            if struct_field.name in columns:
                yield type_name, struct_field.name, _members(struct_field.type)


def nullable_fields(columns: Sequence[str]) -> frozenset[str]:
    """The ``columns`` some event type lets be JSON ``null`` (elsewhere null is refused, as by the SDK)."""
    return frozenset(
        name
        for _, name, alternatives in _read_fields(columns)
        if any(isinstance(kind, msgspec.inspect.NoneType) for kind in alternatives)
    )


def text_length_rules(columns: Sequence[str]) -> dict[tuple[str, int, int | None], tuple[str, ...]]:
    """The read text columns the SDK's structs bound in length: (name, min, max) -> the event types.

    Characters (code points) as msgspec counts them: ids 1..128, a search's query 1..1024.
    Why the engines restate them: an id a feature groups by ("" or 2,000 characters) would
    otherwise become an entity whose features no SDK-validated event could ever reach.
    """
    rules: dict[tuple[str, int, int | None], tuple[str, ...]] = {}
    for type_name, name, alternatives in _read_fields(columns):
        for kind in alternatives:
            if isinstance(kind, msgspec.inspect.StrType) and (kind.min_length or kind.max_length is not None):
                rule = (name, kind.min_length or 0, kind.max_length)
                rules[rule] = (*rules.get(rule, ()), type_name)
                break
    return rules


def literal_rules(columns: Sequence[str]) -> dict[tuple[str, tuple[str, ...]], tuple[str, ...]]:
    """The read text columns the SDK's structs limit to a few values: (name, values) -> the event types.

    E.g. a user_profile's ``action`` is ``upsert`` or ``delete``: a profile event with any
    other action is refused, as by the SDK (a misspelt "delete" must not pass as an upsert).
    """
    rules: dict[tuple[str, tuple[str, ...]], tuple[str, ...]] = {}
    for type_name, name, alternatives in _read_fields(columns):
        for kind in alternatives:
            if isinstance(kind, msgspec.inspect.LiteralType):
                rule = (name, tuple(sorted(str(value) for value in kind.values)))
                rules[rule] = (*rules.get(rule, ()), type_name)
    return rules


def required_by_type(columns: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """For each event type, the read columns the SDK's struct requires (no default)."""
    required: dict[str, tuple[str, ...]] = {}
    for name, cls in zip(EVENT_TYPE_NAMES, EVENT_TYPES, strict=True):
        fields = msgspec.structs.fields(cls)
        required[name] = tuple(f.name for f in fields if f.required and f.name in columns)
    return required


@dataclass
class DecodedBatch:
    """The valid events of a micro-batch and what was wrong with the others.

    ``events`` holds one row per valid message, in message order; ``positions`` gives
    each row's index in the input; ``rejected`` pairs input indexes with the error.
    ``events`` has an ``event_time_ms`` int64 column in place of the ``event_time`` text.
    """

    events: pa.Table
    positions: NDArray[Any]
    rejected: list[tuple[int, InvalidEventError]] = field(default_factory=list)


class EventDecoder:
    """Decodes micro-batches of JSON event messages into columns (see the module docstring)."""

    def __init__(self, groups: Sequence[FeatureGroup] = FEATURE_GROUPS, *, fast: bool = True) -> None:
        """``fast=False``: every message decoded by msgspec (the reference the fast path is tested on)."""
        self.columns = needed_columns(groups)
        self._schema = pa.schema([(name, _FIELD_TYPES[name]) for name in self.columns])
        # Absent fields decode as None; an explicit null only where an event type allows it
        # (msgspec does not check defaults against the type, which is what lets the two differ).
        nullable = nullable_fields(self.columns)
        fields: list[tuple[str, Any, Any]] = []
        for name in self.columns:
            kind = _MSGSPEC_TYPES[str(_FIELD_TYPES[name])]
            fields.append((name, kind | None if name in nullable else kind, None))
        # Checked while decoding and never made a column: an event of another schema version
        # may give these fields other meanings, so it is refused as the SDK refuses it.
        fields.append((VERSION_FIELD, Literal[SCHEMA_VERSION], None))  # (absent: None, not checked)
        # Only strings and numbers: the structs cannot form cycles, so the garbage collector
        # need not track the 20k of them a batch creates.
        read_fields: Any = msgspec.defstruct("ReadFields", fields, gc=False)
        self._json = msgspec.json.Decoder(read_fields)
        self._required = required_by_type(self.columns)
        self._text_lengths = text_length_rules(self.columns)
        self._literals = literal_rules(self.columns)
        self._known_types = pa.array(sorted(EVENT_TYPE_NAMES))
        self._fast_fields: tuple[tuple[str, int, bool], ...] | None = None
        if fast and _fastdecode is not None:
            self._fast_fields = (
                *(
                    (
                        name,
                        _FAST_INSTANT_KIND if name == "event_time" else _FAST_KINDS[str(_FIELD_TYPES[name])],
                        name in nullable,
                    )
                    for name in self.columns
                ),
                (VERSION_FIELD, _FAST_VERSION_KIND, False),
            )

    @property
    def output_schema(self) -> pa.Schema:
        fields = [f for f in self._schema if f.name != "event_time"]
        return pa.schema([*fields, pa.field("event_time_ms", pa.int64())])

    def decode(self, values: Sequence[bytes | None]) -> DecodedBatch:
        """The events of ``values`` (one JSON message each), in order, and the rejects with their reasons.

        Decoded :data:`DECODE_CHUNK` messages at a time: the per-message structs of a
        whole 100,000-message batch outgrow the CPU caches (1.71 µs per event against
        1.33 µs in 20,000-message pieces, measured).
        """
        if len(values) <= DECODE_CHUNK:
            return self._decode_chunk(values)
        parts = [
            (start, self._decode_chunk(values[start : start + DECODE_CHUNK]))
            for start in range(0, len(values), DECODE_CHUNK)
        ]
        return DecodedBatch(
            pa.concat_tables([part.events for _, part in parts]),
            np.concatenate([part.positions + start for start, part in parts]),
            [(start + index, error) for start, part in parts for index, error in part.rejected],
        )

    def _decode_chunk(self, values: Sequence[bytes | None]) -> DecodedBatch:
        rejected: list[tuple[int, InvalidEventError]] = []
        lines: list[bytes]
        if all(values):  # the usual case, checked in C: no per-message Python
            lines, positions = cast(list[bytes], list(values)), np.arange(len(values), dtype=np.int64)
        else:
            kept_at = [i for i, value in enumerate(values) if value]
            empty = [i for i, value in enumerate(values) if not value]
            rejected += [(i, MalformedJSONError("empty message")) for i in empty]
            lines = [values[i] or b"" for i in kept_at]
            positions = np.asarray(kept_at, dtype=np.int64)
        tables: list[pa.Table] = []
        kept: list[NDArray[Any]] = []
        fast = self._fast_decode(lines)
        if fast is not None:
            table, rows, handed_back = fast
            tables.append(table)
            kept.append(positions[rows])
            lines = [lines[i] for i in handed_back.tolist()]
            positions = positions[handed_back]
        events, positions = self._structs(lines, positions, rejected)
        self._columns_halves(events, positions, tables, kept, rejected)
        if tables:
            table = pa.concat_tables(tables)
            index = np.concatenate(kept)
            if len(tables) > 1 and fast is not None:  # back into message order
                order = np.argsort(index, kind="stable")
                table, index = table.take(order), index[order]
        else:
            table = self.output_schema.empty_table()
            index = np.empty(0, dtype=np.int64)
        valid, reasons = self._check(table)
        if reasons:
            for row, error in reasons:
                rejected.append((int(index[row]), error))
            table = table.filter(pa.array(valid))
            index = index[valid]
        rejected.sort(key=lambda pair: pair[0])
        return DecodedBatch(table, index, rejected)

    def _fast_decode(self, lines: list[bytes]) -> tuple[pa.Table, NDArray[Any], NDArray[Any]] | None:
        """The messages the compiled reader decodes, as columns; None where it is not installed.

        Returns the table (``event_time_ms`` parsed), the indexes of its rows in ``lines``
        and the indexes of the messages it handed back for msgspec. A batch with an event
        time that does not parse is handed back whole (the slow path isolates the bad one).
        """
        if self._fast_fields is None:
            return None
        columns, handed_back = _fastdecode.decode(lines, self._fast_fields)
        back = np.asarray(handed_back, dtype=np.int64)
        rows = np.arange(len(lines), dtype=np.int64)
        if len(back):
            rows = np.delete(rows, back)
        arrays: dict[str, pa.Array] = {}
        for name, (validity, values, text, nulls) in zip(self.columns, columns, strict=True):
            buffers = [None if validity is None else pa.py_buffer(validity), pa.py_buffer(values)]
            if text is not None:
                buffers.append(pa.py_buffer(text))
            arrays[name] = pa.Array.from_buffers(_FIELD_TYPES[name], len(rows), buffers, null_count=nulls)
        texts = arrays.pop("event_time")
        try:  # (the fast path checked the texts' form: what rfc3339_epoch_ms's pattern checks)
            arrays["event_time_ms"] = epoch_ms(texts)
        except EventTimeError:
            return self.output_schema.empty_table(), rows[:0], np.arange(len(lines), dtype=np.int64)
        return pa.table(arrays), rows, back

    def _structs(
        self,
        lines: list[bytes],
        positions: NDArray[Any],
        rejected: list[tuple[int, InvalidEventError]],
    ) -> tuple[list[Any], NDArray[Any]]:
        """Each message decoded on its own into a slim struct; the bad ones rejected with their reason.

        One C call per message is as fast here as one call over the batch joined into a JSON
        array, and only this way is a message always exactly one event: joined, a message
        ending mid-object and the next one completing it read as one valid event.
        """
        try:
            return list(map(self._json.decode, lines)), positions  # the usual case: no Python per message
        except (msgspec.DecodeError, UnicodeDecodeError):
            pass
        events: list[Any] = []
        kept: list[int] = []
        for line, position in zip(lines, positions.tolist(), strict=True):
            try:
                events.append(self._json.decode(line))
                kept.append(position)
            except msgspec.ValidationError as exc:
                rejected.append((position, classify_decode_error(exc)))
            except msgspec.DecodeError as exc:
                rejected.append((position, MalformedJSONError(_malformed(line, exc))))
            except UnicodeDecodeError as exc:
                rejected.append((position, MalformedJSONError(not_utf8_reason(exc))))
        return events, np.asarray(kept, dtype=np.int64)

    def _columns_halves(
        self,
        events: list[Any],
        positions: NDArray[Any],
        tables: list[pa.Table],
        kept: list[NDArray[Any]],
        rejected: list[tuple[int, InvalidEventError]],
    ) -> None:
        """Columns of ``events``; halves until a bad event time is isolated (one costs O(log n) passes)."""
        if not events:
            return
        try:
            tables.append(self._columns(events))
            kept.append(positions)
        except _BatchError as exc:
            if len(events) == 1:
                rejected.append((int(positions[0]), exc.error))
                return
            half = len(events) // 2
            self._columns_halves(events[:half], positions[:half], tables, kept, rejected)
            self._columns_halves(events[half:], positions[half:], tables, kept, rejected)

    def _columns(self, events: list[Any]) -> pa.Table:
        """The structs' fields as Arrow columns (``event_time`` parsed to epoch milliseconds).

        Each struct becomes a tuple and ``zip`` transposes them, all in C, with the garbage
        collector paused: the tuples are the only objects it tracks here, and the collections
        they would trigger walk all of them for nothing. 442 - 503 ns per event against 521 -
        636 ns for a getter mapped over the structs per field (300k simulated events, thread CPU).
        """
        if not events:
            return self.output_schema.empty_table()
        with collector_paused():
            fields = zip(*map(msgspec.structs.astuple, events), strict=True)
            columns = {  # (zip stops at the last column: the schema version is left out)
                name: pa.array(values, _FIELD_TYPES[name])
                for name, values in zip(self.columns, fields, strict=False)
            }
        texts = columns.pop("event_time")
        try:
            columns["event_time_ms"] = rfc3339_epoch_ms(texts)
        except EventTimeError as exc:
            raise _BatchError(SchemaViolationError(f"event_time is not an RFC 3339 instant: {exc}")) from exc
        return pa.table(columns)

    def _check(self, table: pa.Table) -> tuple[NDArray[Any], list[tuple[int, InvalidEventError]]]:
        """Vectorized SDK rules for the read fields; returns the valid mask and each bad row's error.

        Each column's null mask and each row's type are computed once, as NumPy arrays;
        the per-type rules are then boolean operations on those (no Arrow call per rule).
        """
        n = table.num_rows
        problems: list[tuple[NDArray[Any], InvalidEventError]] = []

        def flag(
            mask: pa.Array | pa.ChunkedArray | NDArray[Any],
            reason: str,
            kind: type[InvalidEventError] = SchemaViolationError,
        ) -> None:
            array = mask if isinstance(mask, np.ndarray) else pc.fill_null(mask, False).to_numpy()
            if array.any():
                problems.append((np.asarray(array, dtype=bool), kind(reason)))

        def missing(name: str) -> NDArray[np.bool_]:
            column = table.column(name)
            if column.null_count == 0:
                return np.zeros(n, dtype=bool)
            return np.asarray(column.is_null().to_numpy(zero_copy_only=False), dtype=bool)

        types = table.column("type")
        type_index = pc.index_in(types, value_set=self._known_types).fill_null(-1).to_numpy()
        flag(
            type_index < 0,
            f"unknown or missing event type; expected one of: {', '.join(EVENT_TYPE_NAMES)}",
            UnknownEventTypeError,  # the SDK's class for the same rule
        )
        for name in ("event_id", "user_id"):
            empty = pc.equal(pc.binary_length(table.column(name)), 0)
            flag(missing(name) | pc.fill_null(empty, False).to_numpy(), f"{name} is missing or empty")
        times = table.column("event_time_ms")
        out_of_range = outside_event_time_range(times)
        flag(
            pc.or_kleene(pc.is_null(times), out_of_range),
            "event_time is missing or outside 2000-01-01..2100-01-01; check the unit and the time zone",
        )
        known = self._known_types.to_pylist()
        checked = {name for fields in self._required.values() for name in fields if name not in _ALWAYS}
        nulls = {name: missing(name) for name in checked}
        for event_type, required in self._required.items():
            of_type = type_index == known.index(event_type)
            for name in required:
                if name in nulls:
                    flag(of_type & nulls[name], f"{event_type} needs {name}")
        of_types: dict[tuple[str, ...], NDArray[np.bool_]] = {}
        for (name, shortest, longest), event_types in self._text_lengths.items():
            column = table.column(name)
            # Bytes first (no pass over the text): a string has at most as many characters as
            # bytes, and none exactly when it has no byte; characters are counted only where
            # that cannot tell. -1: null (the rules for required fields judge those).
            length = pc.binary_length(column).fill_null(-1).to_numpy()
            if shortest > 1 or (longest is not None and length.max(initial=0) > longest):
                length = pc.utf8_length(column).fill_null(-1).to_numpy()
            bad = (length >= 0) & (length < shortest)
            if longest is not None:
                bad |= length > longest
            if not bad.any():
                continue
            if event_types not in of_types:
                of_types[event_types] = np.isin(type_index, [known.index(t) for t in event_types])
            limit = f"{shortest} to {longest}" if longest is not None else f"at least {shortest}"
            flag(of_types[event_types] & bad, f"{name} must have {limit} characters")
        for (name, values), event_types in self._literals.items():
            outside = pc.invert(pc.is_in(table.column(name), value_set=pa.array(values, pa.string())))
            of_type = np.isin(type_index, [known.index(t) for t in event_types])
            flag(of_type & pc.fill_null(outside, False).to_numpy(zero_copy_only=False),
                 f"{name} must be one of: {', '.join(values)}")  # fmt: skip
        for name in _NON_NEGATIVE:
            if name in table.column_names:
                column = table.column(name)
                bad = pc.less(column, 0)
                if pa.types.is_floating(column.type):
                    bad = pc.or_(bad, pc.invert(pc.is_finite(column)))
                flag(bad, f"{name} must be a non-negative, finite number")
        if "query" in table.column_names:
            blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(table.column("query"))), 0)
            search = type_index == known.index("search")
            flag(search & pc.fill_null(blank, True).to_numpy(),
                 "search needs a query with a non-whitespace character")  # fmt: skip
        valid = np.ones(n, dtype=bool)
        reasons: list[tuple[int, InvalidEventError]] = []
        if problems:
            error_of: dict[int, InvalidEventError] = {}
            for mask, error in problems:
                valid &= ~mask
                for row in np.flatnonzero(mask):
                    error_of.setdefault(int(row), error)
            reasons = sorted(error_of.items(), key=lambda pair: pair[0])
        return valid, reasons


def _malformed(line: bytes, error: msgspec.DecodeError) -> str:
    """The reason a message is not one JSON value, in the words the SDK's own check uses where it can."""
    if not line.strip():
        return "expected one JSON object per message, got none"
    if "trailing characters" in str(error):
        return f"expected one JSON object per message: {error}"
    reason = str(error)
    return reason if reason.startswith("JSON is malformed") else f"JSON is malformed: {reason}"


class _BatchError(Exception):
    """The batch cannot be decoded as a whole; ``error`` says why (for a single message, its reason)."""

    def __init__(self, error: InvalidEventError) -> None:
        super().__init__(str(error))
        self.error = error
