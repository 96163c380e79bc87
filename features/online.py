"""Fast reads and writes of Feast's online store, in Feast's own storage format.

Feast's ``FeatureStore.write_to_online_store`` builds one protobuf object per feature
value and one SQL statement (or Redis mapping) per value in Python: about 2,600 entity
rows/s for ``user_activity`` (34 features) here, far too slow for a stream engine that
updates tens of thousands of entities a second. Its ``get_online_features`` adds several
milliseconds of registry and response plumbing to every read.

:class:`OnlineFeatureWriter` stores exactly the bytes Feast would store, so Feast's SDK
(``store.get_online_features``) and any other Feast client read what it writes, but it
builds them column-wise: ValueProto and Timestamp bytes are hand-encoded with NumPy and
Arrow (no protobuf objects on the hot path), SQLite gets one ``executemany`` per call in
one transaction, and Redis gets its ``HSET`` commands as pre-packed RESP bytes, pipelined.
:class:`OnlineFeatureReader` reads them back with one SQL query or one pipelined batch of
``HMGET`` commands and decodes the values without protobuf.

What Feast stores (Feast 0.67, ``entity_key_serialization_version=3``):

* entity key: ``<u32 1><u32 STRING=2><u32 len(join key)><join key><u32 STRING=2><u32 len(v)><v>``
  (all little-endian, lengths in UTF-8 bytes);
* values: serialized ``feast.types.Value``: ``int64_val`` (field 4, varint), ``double_val``
  (field 5, fixed64), ``string_list_val`` (field 12, a ``StringList``), ``string_val``
  (field 2) and ``float_list_val`` (field 16, a ``FloatList`` of packed little-endian
  float32: the embedding vectors of batch tables). Feast stores null
  values *and NaN doubles* as an empty ``Value`` (zero bytes), which it reads back as null;
  a null element inside a list becomes ``""``;
* SQLite: table ``<project>_<view>`` with one row per (entity_key, feature_name): ``value``
  (the bytes above), ``value_text`` (``str()`` of an int64/double value, NULL otherwise),
  ``event_ts``/``created_ts`` as whole epoch seconds (Feast's sqlite adapter: ``int(naive
  UTC datetime.timestamp())``, which reads the naive value as *local* time, so the stored
  number is only the true epoch on a UTC machine; Feast's reader undoes it the same way);
* Redis: one hash per entity at ``<entity key><project>``, field ``_ts:<view>`` holding a
  serialized ``google.protobuf.Timestamp`` (microsecond precision) and one field per
  feature named by the 4-byte little-endian unsigned murmur3 of ``"<view>:<feature>"``.

Unlike Feast's Redis writer, which first reads ``_ts:<view>`` and skips a row whose event
time is not newer than the stored one (an extra round trip, and it drops a recomputed row
that keeps its tile's timestamp), this writer always overwrites: the stream engine is the
only writer and its latest row is the truth. Writes are idempotent upserts, so a write
that failed half-way can simply be repeated.

Rows may say which of their features changed (:data:`CHANGED_COLUMN`); only those are
written, so an entity's stored row is then only complete if it was written in full once
(the stream engine writes each entity in full the first time after it starts, and again
every ``stream.full_rewrite_interval_s``). After an online store lost its data, rows heal
within that interval; restart the stream workers to heal them at once, or set
``stream.online_writes`` to ``full_rows``.
"""

from __future__ import annotations

import functools
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import mmh3
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from features.definitions import FEATURE_GROUPS, FeatureGroup, FeatureType
from features.feast_objects import TIMESTAMP_FIELD, arrow_schema
from infra.settings import Settings

if TYPE_CHECKING:
    import redis

try:  # compiled where a C compiler was at hand at install (setup.py); same bytes either way
    from features import _resp
except ImportError:  # pragma: no cover - depends on the install
    _resp = None  # type: ignore[assignment]

COMPILED_RESP_AVAILABLE: Final = _resp is not None
"""Whether Redis writes are encoded by the compiled writer (``features/_resp.c``); without it the
vectorized Arrow path writes the same bytes (encoding 3 - 10x slower; the writer's CPU per row,
socket I/O included, 1.7 - 1.8x)."""

CREATED_COLUMN: Final = "created_timestamp"
"""Optional column of a written table: Feast's ``created_ts``; the write time when absent."""

CHANGED_COLUMN: Final = "_changed_features"
"""Optional column of a written table: per row, a fixed-size list of booleans, one per feature
in ``group.features()`` order and one more for the event timestamp, true where the value may
differ from the stored one. Only those features are written; a table without it writes every
feature. Redis keeps one timestamp per entity and view (always written); SQLite keeps one
per stored feature, so there a row whose timestamp changed also re-stamps its other
features (one ``UPDATE`` per entity). The stream
engine sets it (:mod:`streams.engine.state`): most events change a few of an entity's
features, and the stores' cost is per written feature."""

REDIS_BATCH_COMMANDS: Final = 2_000
"""HSET / HMGET commands sent per pipelined round trip: large enough to amortise the round
trip, small enough that neither side buffers more than a few MB."""

_INT64_TAG: Final = 0x20  # Value.int64_val: field 4, varint
_DOUBLE_TAG: Final = 0x29  # Value.double_val: field 5, fixed64
_LIST_TAG: Final = 0x62  # Value.string_list_val: field 12, length-delimited
_ELEMENT_TAG: Final = 0x0A  # StringList.val / FloatList.val (packed): field 1, length-delimited
_STRING_TAG: Final = 0x12  # Value.string_val: field 2, length-delimited
_FLOAT_LIST_TAG: Final = b"\x82\x01"  # Value.float_list_val: field 16, length-delimited (2-byte tag)
_STRING_TYPE: Final = struct.pack("<I", 2)  # feast.types.ValueType.STRING
_DOUBLE = struct.Struct("<d")
_SQLITE_MAX_PARAMS: Final = 30_000 if sqlite3.sqlite_version_info >= (3, 32) else 900
_SQLITE_COLUMNS = ("entity_key", "feature_name", "value", "value_text", "event_ts", "created_ts")
# Rows per upsert statement: binding and stepping one statement per row cost about a third
# of a bulk write (6.7 -> 4.6 µs per row at 50-150 rows per statement); 100 x 6 parameters
# stay under every SQLite build's limit (999 before 3.32).
_SQLITE_ROWS_PER_UPSERT: Final = 100

U8Array = npt.NDArray[np.uint8]
I64Array = npt.NDArray[np.int64]


# --------------------------------------------------------------------------- errors


class OnlineStoreError(RuntimeError):
    """The online store refused an operation for a reason retrying will not fix."""


class OnlineStoreUnavailableError(OnlineStoreError):
    """The online store cannot be reached right now (down, timed out, locked, read-only).

    Retryable: the stream engine backs off and repeats the same (idempotent) write.
    """


class OnlineStoreSchemaError(OnlineStoreError):
    """The online store has no table for a feature view: Feast's objects were never applied."""


# --------------------------------------------------------------------------- encoding
#
# Everything below works on whole columns. A column of byte strings is an Arrow
# LargeBinary array; rows are assembled with ``binary_join_element_wise`` (C++), and
# variable-length integers are built as a (rows x bytes) matrix whose first ``length[i]``
# bytes of row ``i`` are selected by one boolean mask.

_VARINT_SHIFTS = np.arange(0, 70, 7, dtype=np.uint64)  # 10 groups of 7 bits cover 64 bits
_VARINT_LIMITS = np.left_shift(np.uint64(1), np.arange(7, 70, 7, dtype=np.uint64))  # 2**7 .. 2**63
_EMPTY = pa.scalar(b"", pa.large_binary())


def _binary(data: U8Array | pa.Buffer, offsets: I64Array) -> pa.Array:
    """A LargeBinary array over ``data`` cut at ``offsets`` (``len(offsets) - 1`` values), zero-copy."""
    buffer = data if isinstance(data, pa.Buffer) else pa.py_buffer(np.ascontiguousarray(data))
    return pa.Array.from_buffers(
        pa.large_binary(), len(offsets) - 1, [None, pa.py_buffer(offsets.astype(np.int64)), buffer]
    )


def _offsets(lengths: npt.NDArray[Any]) -> I64Array:
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def _prefix_rows(matrix: U8Array, lengths: npt.NDArray[Any]) -> pa.Array:
    """Row ``i`` of the result is ``matrix[i, :lengths[i]]``."""
    mask = np.arange(matrix.shape[1]) < np.asarray(lengths)[:, None]
    return _binary(matrix[mask], _offsets(lengths))


def _varint_matrix(values: npt.NDArray[np.uint64]) -> tuple[U8Array, I64Array]:
    """Protobuf base-128 varints of ``values``: an (n, longest) byte matrix and each row's length.

    Only as many 7-bit groups as the longest varint needs are computed: feature values
    (counts, lengths) mostly fit one or two bytes of the ten an int64 may take.
    """
    sizes = 1 + np.searchsorted(_VARINT_LIMITS, values, side="right").astype(np.int64)
    width = int(sizes.max(initial=1))
    groups = ((values[:, None] >> _VARINT_SHIFTS[:width]) & np.uint64(0x7F)).astype(np.uint8)
    groups |= np.where(np.arange(width) < (sizes[:, None] - 1), np.uint8(0x80), np.uint8(0))
    return groups, sizes


def _headed_varints(head: bytes, values: npt.NDArray[Any]) -> tuple[U8Array, I64Array]:
    """Rows of ``head`` then the varint of each value (int64 as two's complement), and their lengths."""
    groups, sizes = _varint_matrix(np.asarray(values).astype(np.int64).view(np.uint64))
    matrix = np.empty((len(groups), len(head) + groups.shape[1]), np.uint8)
    matrix[:, : len(head)] = np.frombuffer(head, np.uint8)
    matrix[:, len(head) :] = groups
    return matrix, sizes + len(head)


def _tagged_varints(tag: int, values: npt.NDArray[Any], present: npt.NDArray[np.bool_]) -> pa.Array:
    """``tag`` + varint of each value (int64 as two's complement, like protobuf); ``b""`` where absent."""
    matrix, lengths = _headed_varints(bytes([tag]), values)
    return _prefix_rows(matrix, np.where(present, lengths, 0))


def _le32(values: npt.NDArray[Any]) -> pa.Array:
    data = np.ascontiguousarray(np.asarray(values, dtype="<u4")).view(np.uint8)
    return _binary(data, np.arange(len(values) + 1, dtype=np.int64) * 4)


def _join(*parts: pa.Array | pa.Scalar) -> pa.Array:
    """Row-wise concatenation of byte columns (scalars are repeated on every row)."""
    return pc.binary_join_element_wise(*parts, _EMPTY)


def _const(value: bytes) -> pa.Scalar:
    return pa.scalar(value, pa.large_binary())


def _valid(array: pa.Array) -> npt.NDArray[np.bool_]:
    if array.null_count == 0:
        return np.ones(len(array), np.bool_)
    return np.asarray(array.is_valid().to_numpy(zero_copy_only=False), np.bool_)


def _int64_matrix(array: pa.Array) -> tuple[U8Array, I64Array]:
    """``Value(int64_val=...)`` per row as a byte matrix and each row's length (0: null)."""
    present = _valid(array)
    numbers = np.asarray(array.fill_null(0).to_numpy(zero_copy_only=False), np.int64)
    matrix, lengths = _headed_varints(bytes([_INT64_TAG]), numbers)
    return matrix, np.where(present, lengths, 0)


def _double_matrix(array: pa.Array) -> tuple[U8Array, I64Array]:
    """``Value(double_val=...)`` per row as a byte matrix and each row's length (0: null or NaN)."""
    numbers = np.asarray(array.fill_null(0.0).to_numpy(zero_copy_only=False), np.float64)
    present = _valid(array) & ~np.isnan(numbers)  # Feast stores NaN as null (an empty Value)
    matrix = np.empty((len(numbers), 9), np.uint8)
    matrix[:, 0] = _DOUBLE_TAG
    matrix[:, 1:] = np.ascontiguousarray(numbers.astype("<f8")).view(np.uint8).reshape(-1, 8)
    return matrix, np.where(present, 9, 0)


def _int64_values(array: pa.Array) -> pa.Array:
    return _prefix_rows(*_int64_matrix(array))


def _double_values(array: pa.Array) -> pa.Array:
    return _prefix_rows(*_double_matrix(array))


def _string_list_values(array: pa.Array) -> pa.Array:
    """``Value(string_list_val=StringList(val=[...]))`` per row; a null element is ``""`` as in Feast."""
    present = _valid(array)
    strings = array.values  # the whole child array: ``array.offsets`` index into it
    element_lengths = np.asarray(
        pc.binary_length(strings).fill_null(0).to_numpy(zero_copy_only=False), np.int64
    )
    elements = _join(
        _const(bytes([_ELEMENT_TAG])),
        _varint_bytes(element_lengths),
        strings.cast(pa.large_binary()).fill_null(b""),
    )
    element_offsets = np.frombuffer(elements.buffers()[1], np.int64, len(elements) + 1, elements.offset * 8)
    list_offsets = np.asarray(array.offsets.to_numpy(zero_copy_only=False), np.int64)
    inner_offsets = element_offsets[list_offsets] - element_offsets[list_offsets[0]]
    start = int(element_offsets[list_offsets[0]])
    inner = _binary(elements.buffers()[2].slice(start), inner_offsets)
    header, header_lengths = _headed_varints(bytes([_LIST_TAG]), np.diff(inner_offsets))
    encoded = _join(_prefix_rows(header, header_lengths), inner)
    if present.all():
        return encoded
    return pc.if_else(pa.array(present), encoded, _EMPTY)


def _string_values(array: pa.Array) -> pa.Array:
    """``Value(string_val=...)`` per row (an empty string still sets the field); ``b""`` for null."""
    present = _valid(array)
    lengths = np.asarray(pc.binary_length(array).fill_null(0).to_numpy(zero_copy_only=False), np.int64)
    encoded = _join(
        _const(bytes([_STRING_TAG])), _varint_bytes(lengths), array.cast(pa.large_binary()).fill_null(b"")
    )
    if present.all():
        return encoded
    return pc.if_else(pa.array(present), encoded, _EMPTY)


def _float_list_values(array: pa.Array) -> pa.Array:
    """``Value(float_list_val=FloatList(val=[...]))`` per row, floats packed; ``b""`` for null.

    A null element inside a vector has no protobuf form; it is stored as NaN.
    """
    present = _valid(array)
    floats = array.values.cast(pa.float32()).fill_null(float("nan"))  # whole child: offsets index it
    data = np.ascontiguousarray(np.asarray(floats.to_numpy(zero_copy_only=False), "<f4")).view(np.uint8)
    offsets = np.asarray(array.offsets.to_numpy(zero_copy_only=False), np.int64)
    payload = _binary(data, offsets * 4)
    payload_bytes = np.diff(offsets) * 4
    # FloatList: packed field 1 (omitted entirely for an empty list, as protobuf does).
    inner, inner_lengths = _headed_varints(bytes([_ELEMENT_TAG]), payload_bytes)
    inner_lengths = np.where(payload_bytes > 0, inner_lengths, 0)
    outer, outer_lengths = _headed_varints(_FLOAT_LIST_TAG, inner_lengths + payload_bytes)
    encoded = _join(_prefix_rows(outer, outer_lengths), _prefix_rows(inner, inner_lengths), payload)
    if present.all():
        return encoded
    return pc.if_else(pa.array(present), encoded, _EMPTY)


def _varint_bytes(values: npt.NDArray[Any]) -> pa.Array:
    return _prefix_rows(*_headed_varints(b"", values))


def _column(rows: pa.Table, name: str, type_: pa.DataType) -> pa.Array:
    column = rows.column(name)
    if not column.type.equals(type_):
        column = column.cast(type_)
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


@dataclass(frozen=True)
class _EncodedBlock:
    """The encoded values of several features of one type: feature-major, ``rows`` per feature."""

    names: tuple[str, ...]
    values: pa.Array
    rows: int

    def columns(self) -> dict[str, pa.Array]:
        return {name: self.values.slice(i * self.rows, self.rows) for i, name in enumerate(self.names)}


def _encode_by_type(layout: _GroupLayout, rows: pa.Table) -> list[_EncodedBlock]:
    """Every feature's ``feast.types.Value`` bytes, encoded one feature *type* at a time.

    Why by type: a group has dozens of features and each encoding pass is a dozen Arrow
    and NumPy calls, so encoding the columns of a type concatenated costs a fixed few
    milliseconds per write instead of one pass per feature (most of a small write).
    """
    blocks = []
    for feature_type, names in layout.names_by_type.items():
        columns = [_column(rows, name, layout.arrow_types[name]) for name in names]
        encoded = _ENCODERS[feature_type](pa.concat_arrays(columns) if len(columns) > 1 else columns[0])
        blocks.append(_EncodedBlock(tuple(names), encoded, rows.num_rows))
    return blocks


# The types whose values fit a byte matrix (at most a few bytes each): their RESP pieces
# are laid out in one matrix and cut out by one mask (see _bulk_rows).
_MATRIX_ENCODERS: dict[FeatureType, Callable[[pa.Array], tuple[U8Array, I64Array]]] = {
    "int64": _int64_matrix,
    "float64": _double_matrix,
}
# How the compiled writer (features/_resp.c) takes each type: numbers from their Arrow
# buffers; the rest already encoded (kind 2).
_COMPILED_KINDS: dict[FeatureType, int] = {"int64": 0, "float64": 1}
_ENCODED_KIND: Final = 2
_ENCODERS = {
    "int64": _int64_values,
    "float64": _double_values,
    "string_list": _string_list_values,
    "string": _string_values,
    "float_list": _float_list_values,
}


def encode_values(feature_type: FeatureType, values: pa.Array | pa.ChunkedArray) -> list[bytes]:
    """Serialized ``feast.types.Value`` of each value, as Feast's SDK would store it.

    Exposed for tests and tools; the writers use the Arrow form directly.
    """
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    return _to_bytes_list(_ENCODERS[feature_type](values))


def _to_bytes_list(array: pa.Array) -> list[bytes]:
    """Python ``bytes`` objects of a LargeBinary array (one buffer copy, then slices)."""
    if len(array) == 0:
        return []
    offsets = np.frombuffer(array.buffers()[1], np.int64, len(array) + 1, array.offset * 8)
    data = array.buffers()[2]
    blob = data.to_pybytes() if data is not None else b""
    bounds = offsets.tolist()
    return [blob[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def _timestamp_protos(micros: I64Array) -> pa.Array:
    """Serialized ``google.protobuf.Timestamp`` (seconds, nanos), as ``Timestamp.FromDatetime``."""
    seconds = np.floor_divide(micros, 1_000_000)
    nanos = np.mod(micros, 1_000_000) * 1_000
    return _join(
        _tagged_varints(0x08, seconds, seconds != 0),  # fields equal to 0 are not serialized
        _tagged_varints(0x10, nanos, nanos != 0),
    )


def _bulk_timestamps(micros: I64Array) -> pa.Array:
    """RESP bulk strings of :func:`_timestamp_protos`, each distinct time encoded once.

    Rows carry the end of their entity's latest tile (whole minutes), so a write holds a
    handful of distinct times: encoding those and gathering is 3x faster at 10,000 rows.
    """
    distinct, inverse = np.unique(micros, return_inverse=True)
    return _bulk(_timestamp_protos(distinct)).take(pa.array(inverse))


def encode_timestamps(micros: Sequence[int]) -> list[bytes]:
    """Serialized ``google.protobuf.Timestamp`` of epoch microseconds (Feast's Redis ``_ts:`` field)."""
    return _to_bytes_list(_timestamp_protos(np.asarray(micros, np.int64)))


def _entity_key_prefix(group: FeatureGroup) -> bytes:
    join_key = group.key.encode()
    return struct.pack("<I", 1) + _STRING_TYPE + struct.pack("<I", len(join_key)) + join_key + _STRING_TYPE


def _entity_keys(group: FeatureGroup, keys: pa.Array) -> pa.Array:
    """Feast's v3 serialized entity key of each (string) key."""
    if keys.null_count:
        raise ValueError(f"{group.name}: {keys.null_count} rows have no {group.key}")
    lengths = np.asarray(pc.binary_length(keys).to_numpy(zero_copy_only=False), np.int64)
    return _join(_const(_entity_key_prefix(group)), _le32(lengths), keys.cast(pa.large_binary()))


def serialize_entity_key(group: FeatureGroup, key: str) -> bytes:
    """Feast's ``serialize_entity_key`` (version 3) of one key of ``group``."""
    encoded = key.encode()
    return _entity_key_prefix(group) + struct.pack("<I", len(encoded)) + encoded


def _local_epoch_seconds(micros: I64Array) -> I64Array:
    """What Feast's sqlite adapter stores for these UTC times: ``int(naive_utc.timestamp())``.

    ``naive.timestamp()`` reads the naive value as local time; on a UTC machine (the fast
    path) that is the epoch second, truncated toward zero.
    """
    seconds = np.where(micros >= 0, micros // 1_000_000, -(-micros // 1_000_000))
    if time.timezone == 0 and time.altzone == 0:
        return seconds.astype(np.int64)
    unique, inverse = np.unique(micros, return_inverse=True)
    local = [
        int((datetime(1970, 1, 1) + timedelta(microseconds=m)).timestamp())  # Feast's naive value
        for m in unique.tolist()
    ]
    return np.asarray(local, np.int64)[inverse]


# --------------------------------------------------------------------------- decoding


def _varint(data: bytes, position: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, position
        shift += 7


def decode_value(data: bytes | None) -> int | float | str | list[str] | list[float] | None:
    """A value written by Feast (or this module) back to Python; ``None`` for null/missing.

    Hand-decoded for the five types adreach stores; anything else means the store holds
    values of a type adreach never writes, which is an error rather than a silent null.
    """
    if not data:
        return None
    tag = data[0]
    if tag == _DOUBLE_TAG and len(data) == 9:
        value: float = _DOUBLE.unpack_from(data, 1)[0]
        return value
    if tag == _INT64_TAG:
        if len(data) == 2:
            return data[1]
        number, _ = _varint(data, 1)
        return number - (1 << 64) if number >= 1 << 63 else number
    if tag == _LIST_TAG:
        _, position = _varint(data, 1)
        out: list[str] = []
        end = len(data)
        while position < end:
            if data[position] != _ELEMENT_TAG:
                break
            length, position = _varint(data, position + 1)
            out.append(data[position : position + length].decode())
            position += length
        else:
            return out
    if tag == _STRING_TAG:
        length, position = _varint(data, 1)
        if position + length == len(data):
            return data[position:].decode()
    if data[:2] == _FLOAT_LIST_TAG:
        _, position = _varint(data, 2)
        floats: list[float] = []
        while position < len(data) and data[position] == _ELEMENT_TAG:
            length, position = _varint(data, position + 1)
            floats += np.frombuffer(data, "<f4", length // 4, position).tolist()
            position += length
        if position == len(data):
            return floats
    raise OnlineStoreError(
        f"online store value {data[:16]!r}... is not an int64, double, string, string list or float list"
    )


def _decode_timestamp(data: bytes | None) -> int | None:
    """Epoch microseconds of a serialized ``google.protobuf.Timestamp``."""
    if not data:
        return None
    seconds = nanos = 0
    position = 0
    while position < len(data):
        tag = data[position]
        number, position = _varint(data, position + 1)
        if tag == 0x08:
            seconds = number - (1 << 64) if number >= 1 << 63 else number
        elif tag == 0x10:
            nanos = number
    return seconds * 1_000_000 + nanos // 1_000


_TAGGED_DOUBLE = np.dtype([("tag", "u1"), ("value", "<f8")])


def _decode_column(feature_type: FeatureType, raw: list[bytes | None], arrow_type: pa.DataType) -> pa.Array:
    """Decode one feature's stored values at once.

    Fast paths for the common cases (every double present; every int64 below 128) decode
    the whole column with one ``np.frombuffer``; anything else goes value by value.
    """
    if raw and all(raw):
        if feature_type == "float64" and all(len(v) == 9 for v in raw):  # type: ignore[arg-type]
            doubles = np.frombuffer(b"".join(raw), _TAGGED_DOUBLE)  # type: ignore[arg-type]
            if (doubles["tag"] == _DOUBLE_TAG).all():
                return pa.array(doubles["value"], arrow_type)
        elif feature_type == "int64" and all(len(v) == 2 for v in raw):  # type: ignore[arg-type]
            pairs = np.frombuffer(b"".join(raw), np.uint8).reshape(-1, 2)  # type: ignore[arg-type]
            if (pairs[:, 0] == _INT64_TAG).all() and (pairs[:, 1] < 0x80).all():
                return pa.array(pairs[:, 1].astype(np.int64), arrow_type)
    return pa.array([decode_value(v) for v in raw], arrow_type)


# --------------------------------------------------------------------------- store plumbing


@dataclass(frozen=True)
class _GroupLayout:
    """Everything about a group that does not change between calls."""

    group: FeatureGroup
    table: str  # SQLite table (Feast's compute_table_id)
    features: tuple[str, ...]
    types: dict[str, FeatureType]
    arrow_types: dict[str, pa.DataType]
    hash_fields: dict[str, bytes]  # Redis hash field of each feature
    ts_field: bytes  # Redis field holding the event timestamp
    field_bulks: dict[str, U8Array]  # each hash field as a RESP bulk string (all of one length)
    names_by_type: dict[FeatureType, tuple[str, ...]]  # the features of each type, in order

    @classmethod
    def of(cls, project: str, group: FeatureGroup) -> _GroupLayout:
        schema = arrow_schema(group)
        features = tuple(f.name for f in group.features())
        hash_fields = {name: _feast_hash_field(group.name, name) for name in features}  # 4 bytes each
        return cls(
            group=group,
            table=f"{project}_{group.name}",
            features=features,
            types={f.name: f.type for f in group.features()},
            arrow_types={name: schema.field(name).type for name in features},
            hash_fields=hash_fields,
            ts_field=f"_ts:{group.name}".encode(),
            field_bulks={
                name: np.frombuffer(_bulk_const(field), np.uint8) for name, field in hash_fields.items()
            },
            names_by_type={
                kind: tuple(f.name for f in group.features() if f.type == kind)
                for kind in dict.fromkeys(f.type for f in group.features())
            },
        )


def _feast_hash_field(view: str, feature: str) -> bytes:
    """Feast's ``_mmh3("<view>:<feature>")``: unsigned murmur3, 4 bytes little-endian."""
    return struct.pack("<I", mmh3.hash(f"{view}:{feature}", signed=False))


def parse_redis_connection(connection: str) -> dict[str, Any]:
    """Feast's ``host:port[,key=value...]`` connection string as ``redis.Redis`` keyword arguments.

    Values are JSON-decoded when they parse (``db=1``, ``ssl=true``), like Feast does.
    """
    import json

    kwargs: dict[str, Any] = {}
    nodes = [part for part in connection.split(",") if "=" not in part]
    for part in connection.split(","):
        if "=" in part:
            name, raw = part.split("=", 1)
            try:
                kwargs[name] = json.loads(raw)
            except json.JSONDecodeError:
                kwargs[name] = raw
    if nodes:
        host, _, port = nodes[0].partition(":")
        kwargs["host"] = host or "localhost"
        kwargs["port"] = int(port or 6379)
    kwargs.setdefault("socket_connect_timeout", 5.0)
    kwargs.setdefault("socket_timeout", 10.0)
    return kwargs


_UNAVAILABLE_REPLIES = ("OOM", "LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "BUSY", "CLUSTERDOWN")
_SQLITE_SCHEMA_MESSAGES = ("no such table", "no such column", "has no column")


class _Store:
    """What reader and writer share: which store, its connection, and error translation."""

    def __init__(
        self,
        settings: Settings,
        groups: Sequence[FeatureGroup],
        *,
        sqlite_timeout_s: float,
        redis_batch_commands: int,
    ) -> None:
        self.kind = settings.features.online_store
        self.project = settings.features.project
        self.layouts = {group.name: _GroupLayout.of(self.project, group) for group in groups}
        self.sqlite_path = settings.feature_repo_dir / "online.db"
        self.redis_connection = settings.features.redis_connection
        self.sqlite_timeout_s = sqlite_timeout_s
        self.redis_batch_commands = max(1, redis_batch_commands)
        self._sqlite: sqlite3.Connection | None = None
        self._redis: redis.Redis | None = None
        self._lock = threading.Lock()

    @property
    def description(self) -> str:
        if self.kind == "redis":
            return f"Redis online store at {self.redis_connection.split(',')[0]}"
        return f"SQLite online store {self.sqlite_path}"

    def layout(self, group: FeatureGroup) -> _GroupLayout:
        layout = self.layouts.get(group.name)
        if layout is None or layout.group != group:
            raise ValueError(f"feature group {group.name!r} is not one of {sorted(self.layouts)}")
        return layout

    # -- SQLite

    def sqlite(self) -> sqlite3.Connection:
        if self._sqlite is None:
            if not self.sqlite_path.is_file():
                raise OnlineStoreSchemaError(
                    f"{self.description} does not exist: apply the feature definitions first "
                    "(features.store.open_store(settings), as `adreach stream run` does)"
                )
            # Autocommit mode: transactions are opened explicitly (BEGIN IMMEDIATE), so a
            # writer waits for the lock up front instead of failing half-way.
            self._sqlite = sqlite3.connect(
                self.sqlite_path, timeout=self.sqlite_timeout_s, isolation_level=None, check_same_thread=False
            )
        return self._sqlite

    @contextmanager
    def sqlite_errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as exc:
            message = str(exc)
            if any(part in message for part in _SQLITE_SCHEMA_MESSAGES):
                raise OnlineStoreSchemaError(
                    f"{self.description}: {action} failed ({message}); the feature views are not "
                    "applied to this store: run features.store.open_store(settings) first"
                ) from exc
            self.close_sqlite()
            raise OnlineStoreUnavailableError(
                f"{self.description}: {action} failed ({message}). The database is locked by another "
                "writer, or its file or directory is not writable (permissions, read-only or full disk); "
                "fix access to the file, or retry once the other writer has finished"
            ) from exc
        except sqlite3.DatabaseError as exc:
            self.close_sqlite()
            raise OnlineStoreError(
                f"{self.description}: {action} failed ({exc}); is it a Feast store?"
            ) from exc

    def close_sqlite(self) -> None:
        if self._sqlite is not None:
            try:
                self._sqlite.close()
            finally:
                self._sqlite = None

    # -- Redis

    def redis(self) -> redis.Redis:
        if self._redis is None:
            import redis

            self._redis = redis.Redis(**parse_redis_connection(self.redis_connection))
        return self._redis

    @contextmanager
    def redis_errors(self, action: str) -> Iterator[None]:
        import redis

        try:
            yield
        except redis.exceptions.AuthenticationError as exc:
            raise OnlineStoreError(
                f"{self.description}: {action} failed ({exc}); set the password in "
                "features.redis_connection (host:port,password=...)"
            ) from exc
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            raise OnlineStoreUnavailableError(
                f"{self.description}: {action} failed ({exc}). Is the Redis server running and "
                "reachable at features.redis_connection? Start it or fix the address; retry later"
            ) from exc
        except redis.exceptions.ResponseError as exc:
            if str(exc).startswith(_UNAVAILABLE_REPLIES):
                raise OnlineStoreUnavailableError(
                    f"{self.description}: {action} refused ({exc}); retry once the server recovers "
                    "(memory limit, loading, or a read-only replica)"
                ) from exc
            raise OnlineStoreError(f"{self.description}: {action} failed ({exc})") from exc

    def redis_roundtrip(self, packed: list[bytes | memoryview], replies: int) -> list[Any]:
        """Send pre-packed commands on one pooled connection and read ``replies`` replies."""
        return self.redis_pipeline([(packed, replies)])

    def redis_pipeline(self, chunks: Iterable[tuple[list[bytes | memoryview], int]]) -> list[Any]:
        """Send each chunk of pre-packed commands and read its replies after the *next* is sent.

        Why one chunk behind: Redis then executes a chunk while this process prepares (the
        iterator may encode lazily) and sends the next, so a large write costs about the
        larger of the two sides' times instead of their sum. Every reply is read even
        after an error reply, so the connection stays in step; the first error is raised
        afterwards.
        """
        import redis

        connection = self._pooled_connection()
        out: list[Any] = []
        errors: list[redis.exceptions.ResponseError] = []

        def read(replies: int) -> None:
            for _ in range(replies):
                try:
                    out.append(connection.read_response())
                except redis.exceptions.ResponseError as exc:
                    errors.append(exc)
                    out.append(None)

        def finish() -> None:
            if errors:
                raise errors[0]

        self._one_chunk_ahead(connection, chunks, read, finish)
        return out

    def redis_write_pipeline(self, chunks: Iterable[tuple[list[bytes | memoryview], int]]) -> None:
        """:meth:`redis_pipeline` for commands whose replies are one line each (``HSET``: ``:<n>``).

        Such replies need no parser: they are counted in the raw bytes, a chunk's worth of
        line ends at a time, instead of one parser call per reply (several microseconds
        each, a quarter of a large write). Error replies (``-<message>``) are collected and
        the first is raised once every reply is read, so the connection stays in step. A
        connection without a plain socket (not redis-py 5's) falls back to the parser.
        """
        import redis

        connection = self._pooled_connection()
        if getattr(connection, "_sock", None) is None:
            connection.connect()
        sock = getattr(connection, "_sock", None)
        if sock is None or not hasattr(sock, "recv"):
            self.redis().connection_pool.release(connection)
            self.redis_pipeline(chunks)
            return
        pending = b""  # bytes received past the replies counted so far
        errors: list[bytes] = []

        def read(replies: int) -> None:
            nonlocal pending
            while replies:
                data = np.frombuffer(pending, np.uint8)
                ends = np.flatnonzero((data[:-1] == 13) & (data[1:] == 10)) if len(data) > 1 else data[:0]
                if len(ends) >= replies:
                    cut = int(ends[replies - 1]) + 2
                    lines, pending = pending[:cut], pending[cut:]
                    if lines.startswith(b"-") or b"\r\n-" in lines:
                        errors.extend(line[1:] for line in lines.split(b"\r\n") if line.startswith(b"-"))
                    return
                received = sock.recv(65_536)
                if not received:
                    raise redis.exceptions.ConnectionError("Redis closed the connection while replying")
                pending += received

        def finish() -> None:
            if pending:
                raise redis.exceptions.ResponseError(f"unexpected bytes after the replies: {pending[:80]!r}")
            if errors:
                raise redis.exceptions.ResponseError(errors[0].decode(errors="replace"))

        self._one_chunk_ahead(connection, chunks, read, finish)

    def _pooled_connection(self) -> Any:
        pool = self.redis().connection_pool
        try:
            return pool.get_connection()
        except TypeError:  # redis-py before 5.3 wants a command name
            return pool.get_connection("PIPELINE")

    def _one_chunk_ahead(
        self,
        connection: Any,
        chunks: Iterable[tuple[list[bytes | memoryview], int]],
        read: Callable[[int], None],
        finish: Callable[[], None],
    ) -> None:
        """Send each chunk, then ``read`` the previous one's replies; ``finish`` raises what was refused.

        Any failure drops the connection (it may be out of step); it goes back to the pool.
        """
        try:
            unread = 0
            for packed, replies in chunks:
                connection.send_packed_command(packed)
                read(unread)
                unread = replies
            read(unread)
            finish()
        except BaseException:
            connection.disconnect()
            raise
        finally:
            self.redis().connection_pool.release(connection)

    def close(self) -> None:
        with self._lock:
            self.close_sqlite()
            if self._redis is not None:
                try:
                    self._redis.close()
                finally:
                    self._redis = None


def _decimal_digits(numbers: I64Array) -> I64Array:
    """How many decimal digits each non-negative number has."""
    digits = np.ones(len(numbers), np.int64)
    longest = int(numbers.max(initial=0))
    for power in range(1, 19):
        if 10**power > longest:
            break
        digits += numbers >= 10**power
    return digits


def _write_decimals(matrix: U8Array, start: int, numbers: I64Array, digits: I64Array) -> None:
    """Write each number's decimal digits into ``matrix[i, start : start + digits[i]]``."""
    for column in range(int(digits.max(initial=1))):
        place = digits - 1 - column  # decimal place written in this column (negative: past the end)
        matrix[:, start + column] = (numbers // 10 ** np.maximum(place, 0)) % 10 + ord("0")


def _bulk(values: pa.Array, prefixes: U8Array | None = None) -> pa.Array:
    """RESP bulk strings: ``$<len>\\r\\n<bytes>\\r\\n`` for each value, after ``prefixes[i]`` if given.

    ``prefixes`` is a (values, k) byte matrix: row ``i`` goes before value ``i`` (the
    writer puts each value's hash field there, itself a bulk string, in the same pass).
    """
    lengths = np.asarray(pc.binary_length(values).to_numpy(zero_copy_only=False), np.int64)
    digits = _decimal_digits(lengths)
    width = int(digits.max(initial=1))
    skip = 0 if prefixes is None else prefixes.shape[1]
    matrix = np.empty((len(lengths), skip + width + 3), np.uint8)
    if prefixes is not None:
        matrix[:, :skip] = prefixes
    matrix[:, skip] = ord("$")
    _write_decimals(matrix, skip + 1, lengths, digits)
    rows = np.arange(len(lengths))
    matrix[rows, skip + digits + 1] = ord("\r")
    matrix[rows, skip + digits + 2] = ord("\n")
    return _join(_prefix_rows(matrix, skip + digits + 3), values, _const(b"\r\n"))


def _bulk_rows(prefixes: U8Array, values: U8Array, lengths: I64Array) -> pa.Array:
    """:func:`_bulk` of ``values[i, :lengths[i]]`` after ``prefixes[i]``, from byte matrices.

    Why: for values of a few bytes (numbers), encoding them as an Arrow array and then
    joining header, value and line end row by row was the largest part of a live worker's
    Redis writes. Here every row's bytes are laid out in one matrix, prefix | ``$`` | length
    digits | CRLF | value | CRLF, and one boolean mask cuts out the bytes each row uses.
    """
    skip, value_width = prefixes.shape[1], values.shape[1]
    digits = _decimal_digits(lengths)
    width = int(digits.max(initial=1))
    crlf = skip + 1 + width  # where the first line end starts
    start = crlf + 2  # where the value starts
    matrix = np.empty((len(lengths), start + value_width + 2), np.uint8)
    matrix[:, :skip] = prefixes
    matrix[:, skip] = ord("$")
    _write_decimals(matrix, skip + 1, lengths, digits)
    matrix[:, crlf : crlf + 2] = (ord("\r"), ord("\n"))
    matrix[:, start : start + value_width] = values
    matrix[:, -2:] = (ord("\r"), ord("\n"))
    used = np.ones(matrix.shape, dtype=bool)
    used[:, skip + 1 : crlf] = np.arange(width) < digits[:, None]
    used[:, start : start + value_width] = np.arange(value_width) < lengths[:, None]
    return _binary(matrix[used], _offsets(skip + digits + lengths + 5))


def _hset_header(features: int) -> bytes:
    """The RESP array header and command of an ``HSET`` of ``features`` fields plus the timestamp."""
    return b"*%d\r\n$4\r\nHSET\r\n" % (2 + 2 * (features + 1))


def _bulk_const(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


# --------------------------------------------------------------------------- writer


class OnlineFeatureWriter:
    """Upserts feature rows into Feast's online store (SQLite or Redis, as ``settings`` say).

    One instance per process; not for concurrent use from several threads. The Feast
    feature views must have been applied (``features.store.open_store``), which creates
    the SQLite tables.
    """

    def __init__(
        self,
        settings: Settings,
        groups: Sequence[FeatureGroup] = FEATURE_GROUPS,
        *,
        sqlite_timeout_s: float = 5.0,
        sqlite_wal: bool = True,
        redis_batch_commands: int = REDIS_BATCH_COMMANDS,
    ) -> None:
        """``sqlite_wal`` switches the SQLite file to write-ahead logging (persistent, and
        transparent to Feast): readers then never wait for the writer's transactions, which
        otherwise lock them out for the whole commit of a large batch."""
        self._store = _Store(
            settings, groups, sqlite_timeout_s=sqlite_timeout_s, redis_batch_commands=redis_batch_commands
        )
        self._compiled_resp = settings.features.compiled_redis_writer and COMPILED_RESP_AVAILABLE
        self._sqlite_wal = sqlite_wal
        self._wal_checked = False
        self._lean_tables: set[str] = set()  # tables whose redundant index is known to be gone

    @property
    def store(self) -> str:
        """Which store this writes to, for logs and error messages."""
        return self._store.description

    def write(self, group: FeatureGroup, rows: pa.Table) -> int:
        """Upsert one row per entity of ``rows`` (columns of ``arrow_schema(group)``).

        When a key appears more than once the last row wins. Returns the number of entity
        rows written. Raises :class:`OnlineStoreUnavailableError` when the store cannot be
        reached (retry the same call later), ``ValueError`` for rows that do not fit the group.
        """
        layout = self._store.layout(group)
        if rows.num_rows == 0:
            return 0
        present = set(rows.column_names)  # (a new list on every access)
        missing = [name for name in (group.key, TIMESTAMP_FIELD, *layout.features) if name not in present]
        if missing:
            raise ValueError(f"{group.name}: rows lack columns {missing}")
        keys = _column(rows, group.key, pa.string())
        entity_keys = _entity_keys(group, keys)
        redis = self._store.kind == "redis"
        if redis and pc.count_distinct(entity_keys).as_py() == rows.num_rows:
            # Redis gains nothing from key order, and with every key once there is nothing to
            # de-duplicate: the rows go as they are (sorting and taking every column of a
            # cycle's rows was a tenth of a live worker's store time).
            changed = self._changed(layout, rows, None)
        else:
            rows, entity_keys, changed = self._last_row_per_key(layout, rows, entity_keys)
        event_us = self._micros(rows, TIMESTAMP_FIELD)
        if redis:  # Redis's timestamp field is written with every row anyway
            self._write_redis(
                layout, rows, entity_keys, event_us, None if changed is None else changed[:, :-1]
            )
            return int(rows.num_rows)
        if CREATED_COLUMN in rows.column_names:
            created_us = self._micros(rows, CREATED_COLUMN)
        else:
            created_us = np.full(rows.num_rows, time.time_ns() // 1_000, np.int64)
        blocks = _encode_by_type(layout, rows)
        values = {name: value for block in blocks for name, value in block.columns().items()}
        self._write_sqlite(layout, rows, entity_keys, event_us, created_us, values, changed)
        return int(rows.num_rows)

    def delete(self, group: FeatureGroup, keys: Sequence[str]) -> int:
        """Delete every stored feature of these entities of ``group`` (a user's privacy deletion).

        Only ``group``'s view: other views of the same entity keep theirs (in Redis the
        entity's hash loses just this view's fields and timestamp). Idempotent; returns the
        number of keys asked for. Raises :class:`OnlineStoreUnavailableError` as :meth:`write`.
        """
        layout = self._store.layout(group)
        unique = list(dict.fromkeys(keys))
        if not unique:
            return 0
        entity_keys = [serialize_entity_key(group, key) for key in unique]
        if self._store.kind == "redis":
            project = self._store.project.encode()
            fields = [layout.ts_field, *layout.hash_fields.values()]
            with self._store.redis_errors(f"deleting {len(unique)} {group.name} rows"):
                pipeline = self._store.redis().pipeline(transaction=False)
                for entity_key in entity_keys:
                    pipeline.hdel(entity_key + project, *fields)  # type: ignore[arg-type]
                pipeline.execute()
            return len(unique)
        statement = f'DELETE FROM "{layout.table}" WHERE entity_key = ?'
        with self._store.sqlite_errors(f"deleting {len(unique)} {group.name} rows"):
            connection = self._store.sqlite()
            connection.execute("BEGIN IMMEDIATE")
            try:
                connection.executemany(statement, [(entity_key,) for entity_key in entity_keys])
                connection.execute("COMMIT")
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise
        return len(unique)

    def _last_row_per_key(
        self, layout: _GroupLayout, rows: pa.Table, entity_keys: pa.Array
    ) -> tuple[pa.Table, pa.Array, npt.NDArray[np.bool_] | None]:
        """``rows``, their keys and changed-feature matrix sorted by stored key, each key's last row kept.

        Why sorted: SQLite's B-tree is filled in order, ~1.5x faster. A key's kept row carries
        every feature any of its rows changed.
        """
        order = pc.sort_indices(
            pa.table({"k": entity_keys, "i": pa.array(np.arange(rows.num_rows))}),
            sort_keys=[("k", "ascending"), ("i", "ascending")],
        )
        sorted_keys = entity_keys.take(order)
        changed = self._changed(layout, rows, order)
        if len(sorted_keys) > 1:
            is_last = np.append(
                np.asarray(pc.not_equal(sorted_keys[:-1], sorted_keys[1:]).to_numpy(zero_copy_only=False)),
                True,
            )
            if not is_last.all():
                if changed is not None:  # a key's rows together changed what any of them did
                    starts = np.flatnonzero(np.r_[True, is_last[:-1]])
                    changed = np.logical_or.reduceat(changed, starts, axis=0)
                order = order.filter(pa.array(is_last))
                sorted_keys = sorted_keys.filter(pa.array(is_last))
        return rows.take(order), sorted_keys, changed

    def _changed(
        self, layout: _GroupLayout, rows: pa.Table, order: pa.Array | None
    ) -> npt.NDArray[np.bool_] | None:
        """The rows' :data:`CHANGED_COLUMN` as a (rows, features + 1) matrix in ``order`` (None: as they
        are); None where the rows have no such column: write all."""
        if CHANGED_COLUMN not in rows.column_names:
            return None
        column = rows.column(CHANGED_COLUMN).combine_chunks()
        width = len(layout.features) + 1
        if not isinstance(column, pa.FixedSizeListArray) or column.type.list_size != width:
            raise ValueError(
                f"{layout.group.name}: {CHANGED_COLUMN} must be a fixed-size list of {width} booleans "
                "per row (one per feature, then the timestamp)"
            )
        flat = column.flatten().fill_null(True).to_numpy(zero_copy_only=False)
        matrix = np.asarray(flat, dtype=bool).reshape(len(column), width)
        if order is None:
            return matrix
        return np.asarray(matrix[np.asarray(order.to_numpy(), np.int64)], dtype=bool)

    @staticmethod
    def _micros(rows: pa.Table, name: str) -> I64Array:
        column = _column(rows, name, pa.timestamp("us", "UTC"))
        if column.null_count:
            raise ValueError(f"{column.null_count} rows have no {name}")
        return np.asarray(column.cast(pa.int64()).to_numpy(zero_copy_only=False), np.int64)

    # -- SQLite: one row per (entity, feature), in primary-key order, one transaction.

    def _write_sqlite(
        self,
        layout: _GroupLayout,
        rows: pa.Table,
        entity_keys: pa.Array,
        event_us: I64Array,
        created_us: I64Array,
        values: dict[str, pa.Array],
        changed: npt.NDArray[np.bool_] | None = None,
    ) -> None:
        names = sorted(layout.features)  # rows go in (entity_key, feature_name) order
        n, width = rows.num_rows, len(names)
        position = {name: i for i, name in enumerate(layout.features)}
        if changed is None:
            written, moved = np.ones((n, width), bool), np.zeros(n, bool)
        else:  # (in names order; a row whose timestamp moved re-stamps its other features below)
            written, moved = changed[:, [position[name] for name in names]], changed[:, -1]
            moved = moved & ~written.all(axis=1)
        entity, feature = np.nonzero(written)  # entity-major, as the primary key
        # Feature-major concatenation, then taken entity-major.
        flat = pa.concat_arrays([values[name] for name in names])
        value_bytes = _to_bytes_list(flat.take(pa.array(feature * n + entity)))
        texts = np.empty((n, width), dtype=object)
        for j, name in enumerate(names):
            picked = written[:, j]
            if picked.any():
                column = _column(rows, name, layout.arrow_types[name])
                texts[picked, j] = _value_texts(layout.types[name], column.filter(pa.array(picked)))
        key_bytes = np.asarray(_to_bytes_list(entity_keys), dtype=object)
        event = _local_epoch_seconds(event_us)
        created = _local_epoch_seconds(created_us)
        cells = np.empty((len(entity), len(_SQLITE_COLUMNS)), dtype=object)  # one statement row each
        cells[:, 0] = key_bytes[entity]
        cells[:, 1] = np.asarray(names, dtype=object)[feature]
        cells[:, 2] = value_bytes
        cells[:, 3] = texts[written]
        cells[:, 4] = event.astype(object)[entity]  # (as Python numbers: sqlite3 binds no NumPy scalars)
        cells[:, 5] = created.astype(object)[entity]
        restamp = zip(event[moved].tolist(), created[moved].tolist(), key_bytes[moved].tolist(), strict=True)
        whole = len(cells) - len(cells) % _SQLITE_ROWS_PER_UPSERT
        blocks = cells[:whole].reshape(-1, _SQLITE_ROWS_PER_UPSERT * len(_SQLITE_COLUMNS)).tolist()
        singles = cells[whole:].tolist()
        # SQLite keeps a timestamp per stored feature and Feast reports one of them: keep the
        # unchanged features' in step, one statement per entity.
        restamp_sql = f'UPDATE "{layout.table}" SET event_ts = ?, created_ts = ? WHERE entity_key = ?'
        with self._store.sqlite_errors(f"writing {n} {layout.group.name} rows"):
            connection = self._store.sqlite()
            if self._sqlite_wal and not self._wal_checked:
                connection.execute("PRAGMA journal_mode=WAL")
                self._wal_checked = True
            if layout.table not in self._lean_tables:
                self._drop_entity_key_index(connection, layout.table)
            connection.execute("BEGIN IMMEDIATE")
            try:
                connection.executemany(_sqlite_upsert(layout.table, _SQLITE_ROWS_PER_UPSERT), blocks)
                connection.executemany(_sqlite_upsert(layout.table, 1), singles)
                if moved.any():
                    connection.executemany(restamp_sql, restamp)
                connection.execute("COMMIT")
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise

    def _drop_entity_key_index(self, connection: sqlite3.Connection, table: str) -> None:
        """Drop the ``<table>_ek`` index Feast creates beside the table's primary key.

        Why: the primary key (entity_key, feature_name) already serves every lookup by
        entity key (Feast's reads, ``WHERE entity_key = ?``/``IN``), so the second index only
        costs writes: each new (entity, feature) row went into three B-trees instead of two
        (measured: the inserts 20% slower, a writer's new entity rows 13 - 15%; updates do
        not touch it). Feast recreates it when the views are applied again, as every worker
        start does; each writer drops it at its first write to the table.
        """
        connection.execute(f'DROP INDEX IF EXISTS "{table}_ek"')
        self._lean_tables.add(table)

    # -- Redis: one HSET per entity with every feature and the timestamp, pre-packed.

    def _write_redis(
        self,
        layout: _GroupLayout,
        rows: pa.Table,
        entity_keys: pa.Array,
        event_us: I64Array,
        changed: npt.NDArray[np.bool_] | None = None,
    ) -> None:
        """HSET each row, a chunk of :data:`REDIS_BATCH_COMMANDS` encoded while Redis runs the last."""
        n = rows.num_rows
        step = self._store.redis_batch_commands

        encode = self._compiled_hset_commands if self._compiled_resp else self._hset_command_span

        def chunks() -> Iterator[tuple[list[bytes | memoryview], int]]:
            for start in range(0, n, step):
                stop = min(start + step, n)
                payload = encode(
                    layout,
                    rows.slice(start, stop - start),
                    entity_keys[start:stop],
                    event_us[start:stop],
                    None if changed is None else changed[start:stop],
                )
                yield [payload], stop - start

        with self._store.redis_errors(f"writing {n} {layout.group.name} rows"):
            self._store.redis_write_pipeline(chunks())

    def _hset_command_span(
        self,
        layout: _GroupLayout,
        rows: pa.Table,
        entity_keys: pa.Array,
        event_us: I64Array,
        changed: npt.NDArray[np.bool_] | None,
    ) -> memoryview:
        """:meth:`_hset_commands` as one span of bytes: they are back to back in the array's data buffer."""
        commands = self._hset_commands(layout, rows, entity_keys, event_us, changed)
        buffers = commands.buffers()
        bounds = np.frombuffer(buffers[1], np.int64, len(commands) + 1, commands.offset * 8)
        return memoryview(buffers[2])[bounds[0] : bounds[-1]]

    def _hset_commands(
        self,
        layout: _GroupLayout,
        rows: pa.Table,
        entity_keys: pa.Array,
        event_us: I64Array,
        changed: npt.NDArray[np.bool_] | None,
    ) -> pa.Array:
        """One RESP ``HSET`` command per row: the timestamp and every (changed) feature.

        Built as pieces, then put in order by one ``take``: each row's head (command,
        key, timestamp), then the ``field value`` pairs of its changed features. Only those
        values are encoded (one pass per feature type over all rows, feature-major), and
        Redis does not care about the order of a command's fields, so each row's pieces
        just need to be contiguous, head first.
        """
        n, features = rows.num_rows, len(layout.features)
        if changed is None or changed.all():
            return self._full_hset_commands(layout, rows, entity_keys, event_us)
        counts = changed.sum(axis=1)
        headers = pa.array([_hset_header(k) for k in range(features + 1)], pa.large_binary())
        pieces = [
            _join(headers.take(pa.array(counts)), *self._key_and_timestamp(layout, entity_keys, event_us))
        ]
        # Where each piece goes: row r's pieces start at starts[r]; its changed feature j
        # comes ranks[r, j] places after the head.
        starts = np.r_[0, np.cumsum(counts + 1)[:-1]]
        ranks = np.cumsum(changed, axis=1)
        destinations = [starts]
        position = {name: j for j, name in enumerate(layout.features)}
        for feature_type, names in layout.names_by_type.items():
            columns = [position[name] for name in names]
            picked = changed[:, columns].T.ravel()  # feature-major, as the values are concatenated
            if not picked.any():
                continue
            values = pa.concat_arrays([_column(rows, name, layout.arrow_types[name]) for name in names])
            if not picked.all():
                values = values.filter(pa.array(picked))
            entry = np.flatnonzero(picked)
            fields = np.stack([layout.field_bulks[name] for name in names])[entry // n]
            to_matrix = _MATRIX_ENCODERS.get(feature_type)
            if to_matrix is not None:
                pieces.append(_bulk_rows(fields, *to_matrix(values)))
            else:
                pieces.append(_bulk(_ENCODERS[feature_type](values), fields))
            row, column = entry % n, np.asarray(columns)[entry // n]
            destinations.append(starts[row] + ranks[row, column])
        order = np.empty(int(counts.sum()) + n, np.int64)
        order[np.concatenate(destinations)] = np.arange(len(order))
        taken = pa.concat_arrays(pieces).take(pa.array(order))
        ends = np.frombuffer(taken.buffers()[1], np.int64, len(taken) + 1, taken.offset * 8)
        return _binary(taken.buffers()[2], ends[np.r_[starts, len(order)]])

    def _compiled_hset_commands(
        self,
        layout: _GroupLayout,
        rows: pa.Table,
        entity_keys: pa.Array,
        event_us: I64Array,
        changed: npt.NDArray[np.bool_] | None,
    ) -> bytes:
        """:meth:`_hset_commands` by the compiled writer, as one bytes object of all the commands.

        Numbers are read from their Arrow buffers as they are; text and list features are
        encoded here by the Arrow encoders (one pass per type over the changed values) and
        handed over encoded, with empty values where a row leaves the feature out.
        """
        n = rows.num_rows
        if changed is not None and changed.all():
            changed = None
        matrix = None if changed is None else np.ascontiguousarray(changed, dtype=np.uint8)
        position = {name: j for j, name in enumerate(layout.features)}
        specs: dict[str, tuple[bytes, int, Any, Any, Any, int]] = {}
        for feature_type, names in layout.names_by_type.items():
            kind = _COMPILED_KINDS.get(feature_type)
            if kind is not None:
                for name in names:
                    column = _column(rows, name, layout.arrow_types[name])
                    validity, data = column.buffers()
                    specs[name] = (layout.hash_fields[name], kind, validity, data, None, column.offset)
                continue
            values = pa.concat_arrays([_column(rows, name, layout.arrow_types[name]) for name in names])
            picked = None if changed is None else changed[:, [position[name] for name in names]].T.ravel()
            if picked is not None and not picked.all():
                values = values.filter(pa.array(picked))
            encoded = _ENCODERS[feature_type](values) if len(values) else pa.array([], pa.large_binary())
            _, value_offsets, data = encoded.buffers()
            ends = np.frombuffer(value_offsets, np.int64, len(encoded) + 1, encoded.offset * 8)
            lengths = np.diff(ends)
            if picked is not None and not picked.all():
                lengths = np.zeros(len(picked), np.int64)
                lengths[picked] = np.diff(ends)
            offsets = _offsets(lengths) + ends[0]
            data = data if data is not None else b""
            for i, name in enumerate(names):
                specs[name] = (layout.hash_fields[name], _ENCODED_KIND, None, data, offsets, i * n)
        key_buffers = entity_keys.buffers()
        return _resp.hset_commands(
            n,
            (key_buffers[1], key_buffers[2] if key_buffers[2] is not None else b"", entity_keys.offset),
            self._store.project.encode(),
            layout.ts_field,
            np.ascontiguousarray(event_us, np.int64),
            tuple(specs[name] for name in layout.features),
            matrix,
        )

    def _full_hset_commands(
        self, layout: _GroupLayout, rows: pa.Table, entity_keys: pa.Array, event_us: I64Array
    ) -> pa.Array:
        """:meth:`_hset_commands` of rows that write every feature: one row-wise join of all the
        pieces (about a third faster than placing them, when nothing is left out)."""
        parts: list[pa.Array | pa.Scalar] = [
            _const(_hset_header(len(layout.features))),
            *self._key_and_timestamp(layout, entity_keys, event_us),
        ]
        for block in _encode_by_type(layout, rows):
            bulk = _EncodedBlock(block.names, _bulk(block.values), rows.num_rows)  # one RESP pass per type
            for name, values in bulk.columns().items():
                parts += [_const(_bulk_const(layout.hash_fields[name])), values]
        return _join(*parts)

    def _key_and_timestamp(
        self, layout: _GroupLayout, entity_keys: pa.Array, event_us: I64Array
    ) -> list[pa.Array | pa.Scalar]:
        """What every row's ``HSET`` has after its header: the hash's key, then the timestamp field."""
        return [
            _bulk(_join(entity_keys, _const(self._store.project.encode()))),
            _const(_bulk_const(layout.ts_field)),
            _bulk_timestamps(event_us),
        ]

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> OnlineFeatureWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


def _value_texts(feature_type: FeatureType, column: pa.ChunkedArray | pa.Array) -> list[str | None]:
    """Feast's ``value_text``: the string, or ``str()`` of an int64/double; NULL for lists, nulls, NaN."""
    if feature_type in ("string_list", "float_list"):
        return [None] * len(column)
    if feature_type == "string":
        return list(column.to_pylist())
    values = column.to_pylist()
    if feature_type == "int64":
        return [None if v is None else str(v) for v in values]
    return [None if v is None or v != v else repr(v) for v in values]


# --------------------------------------------------------------------------- reader


class OnlineFeatureReader:
    """Reads feature values for a list of keys from Feast's online store, without Feast.

    Values and names are exactly what ``FeatureStore.get_online_features`` returns for the
    same keys. Safe to share between threads (queries are serialised on one connection).
    """

    def __init__(
        self,
        settings: Settings,
        groups: Sequence[FeatureGroup] = FEATURE_GROUPS,
        *,
        sqlite_timeout_s: float = 5.0,
        redis_batch_commands: int = REDIS_BATCH_COMMANDS,
    ) -> None:
        self._store = _Store(
            settings, groups, sqlite_timeout_s=sqlite_timeout_s, redis_batch_commands=redis_batch_commands
        )
        self._hmget_suffix: dict[tuple[str, tuple[str, ...]], bytes] = {}

    @property
    def store(self) -> str:
        return self._store.description

    def read(
        self,
        group: FeatureGroup,
        keys: Sequence[str],
        features: Sequence[str] | None = None,
        *,
        with_event_timestamp: bool = False,
    ) -> pa.Table:
        """One row per key, in order: the key column, then ``features`` (default: all).

        Entities the store does not hold get nulls. ``with_event_timestamp`` adds an
        ``event_timestamp`` column (whole seconds on SQLite, which is all Feast keeps there).
        """
        layout = self._store.layout(group)
        names = tuple(layout.features if features is None else features)
        unknown = [name for name in names if name not in layout.types]
        if unknown:
            raise ValueError(f"{group.name} has no features {unknown}")
        keys = list(keys)
        if self._store.kind == "redis":
            columns, stamps = self._read_redis(layout, keys, names)
        else:
            columns, stamps = self._read_sqlite(layout, keys, names)
        arrays = [pa.array(keys, pa.string())]
        fields = [pa.field(group.key, pa.string())]
        if with_event_timestamp:
            arrays.append(pa.array(stamps, pa.int64()).cast(pa.timestamp("us", "UTC")))
            fields.append(pa.field(TIMESTAMP_FIELD, pa.timestamp("us", "UTC")))
        for name, column in zip(names, columns, strict=True):
            arrays.append(_decode_column(layout.types[name], column, layout.arrow_types[name]))
            fields.append(pa.field(name, layout.arrow_types[name]))
        return pa.Table.from_arrays(arrays, schema=pa.schema(fields))

    def _read_sqlite(
        self, layout: _GroupLayout, keys: list[str], names: tuple[str, ...]
    ) -> tuple[list[list[Any]], list[int | None]]:
        serialized = [serialize_entity_key(layout.group, key) for key in keys]
        positions: dict[bytes, list[int]] = {}
        for i, key in enumerate(serialized):
            positions.setdefault(key, []).append(i)
        column_of = {name: j for j, name in enumerate(names)}
        columns: list[list[Any]] = [[None] * len(keys) for _ in names]
        stamps: list[int | None] = [None] * len(keys)
        distinct = list(positions)
        chunk = max(1, _SQLITE_MAX_PARAMS - len(names))
        subset = len(names) < len(layout.features)
        with self._store._lock, self._store.sqlite_errors(f"reading {layout.group.name}"):
            connection = self._store.sqlite()
            for start in range(0, len(distinct), chunk):
                batch = distinct[start : start + chunk]
                sql = (
                    f'SELECT entity_key, feature_name, value, event_ts FROM "{layout.table}" '
                    f"WHERE entity_key IN ({','.join('?' * len(batch))})"
                )
                params: list[Any] = list(batch)
                if subset:
                    sql += f" AND feature_name IN ({','.join('?' * len(names))})"
                    params += names
                for entity_key, name, value, event_ts in connection.execute(sql, params):
                    j = column_of.get(name)
                    if j is None:
                        continue
                    for i in positions[entity_key]:
                        columns[j][i] = value
                        stamps[i] = event_ts
        return columns, [None if s is None else _feast_sqlite_micros(int(s)) for s in stamps]

    def _read_redis(
        self, layout: _GroupLayout, keys: list[str], names: tuple[str, ...]
    ) -> tuple[list[list[Any]], list[int | None]]:
        suffix = self._hmget_suffix.get((layout.group.name, names))
        if suffix is None:
            fields = [layout.hash_fields[name] for name in names] + [layout.ts_field]
            suffix = b"".join(_bulk_const(f) for f in fields)
            self._hmget_suffix[(layout.group.name, names)] = suffix
        head = b"*%d\r\n$5\r\nHMGET\r\n" % (len(names) + 3)
        project = self._store.project.encode()
        commands = [
            head + _bulk_const(serialize_entity_key(layout.group, key) + project) + suffix for key in keys
        ]
        replies: list[Any] = []
        step = self._store.redis_batch_commands
        with self._store.redis_errors(f"reading {layout.group.name}"):
            for start in range(0, len(commands), step):
                batch = commands[start : start + step]
                replies += self._store.redis_roundtrip([b"".join(batch)], len(batch))
        columns: list[list[Any]] = [[None] * len(keys) for _ in names]
        stamps: list[int | None] = [None] * len(keys)
        for i, reply in enumerate(replies):
            for j, value in enumerate(reply[:-1]):
                columns[j][i] = value
            stamps[i] = _decode_timestamp(reply[-1])
        return columns, stamps

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> OnlineFeatureReader:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


def _feast_sqlite_micros(seconds: int) -> int:
    """Feast's reading of a stored ``event_ts``: ``datetime.fromtimestamp(s)`` (local), taken as UTC."""
    if time.timezone == 0 and time.altzone == 0:
        return seconds * 1_000_000
    local = datetime.fromtimestamp(seconds).replace(tzinfo=UTC)  # what Feast does
    return int(local.timestamp()) * 1_000_000


@functools.lru_cache(maxsize=64)
def _sqlite_upsert(table: str, rows: int) -> str:
    """An upsert of ``rows`` (entity, feature) rows into a Feast SQLite table; later values win."""
    columns = ", ".join(_SQLITE_COLUMNS)
    values = ", ".join(["(" + ", ".join("?" * len(_SQLITE_COLUMNS)) + ")"] * rows)
    updates = ", ".join(f"{name} = excluded.{name}" for name in _SQLITE_COLUMNS[2:])
    return (
        f'INSERT INTO "{table}" ({columns}) VALUES {values} '
        f"ON CONFLICT(entity_key, feature_name) DO UPDATE SET {updates}"
    )


__all__ = [
    "CREATED_COLUMN",
    "OnlineFeatureReader",
    "OnlineFeatureWriter",
    "OnlineStoreError",
    "OnlineStoreSchemaError",
    "OnlineStoreUnavailableError",
    "decode_value",
    "encode_timestamps",
    "encode_values",
    "serialize_entity_key",
]
