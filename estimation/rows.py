"""Sampled users as NumPy columns of codes: the unit segments are built from and saved as.

Categorical, boolean and list values are coded against a per-field :class:`Vocab` that
only grows (values first seen in the stream are appended), so a code never changes
meaning while a shard runs. Numbers are ``float64`` with NaN for null; list fields are
CSR (``offsets`` + ``codes``). Converting from and to Arrow is vectorized both ways.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray

from estimation.schema import FieldKind, Schema, normalize_column

NULL_CODE = -1


class Vocab:
    """Value <-> code for one categorical, boolean or list field (append-only)."""

    def __init__(self, values: list[Any] | tuple[Any, ...] = ()) -> None:
        self.values: list[Any] = []
        self.index: dict[Any, int] = {}
        self.extend(values)

    def __len__(self) -> int:
        return len(self.values)

    def extend(self, values: Any) -> None:
        for value in values:
            if value not in self.index:
                self.index[value] = len(self.values)
                self.values.append(value)

    def code(self, value: Any) -> int | None:
        """The code of ``value``; ``None`` when unseen (or of another type: ``True`` is not ``1``)."""
        found = self.index.get(value)
        if found is None or type(self.values[found]) is not type(value):
            return None
        return found

    def encode(self, array: pa.Array, arrow_type: pa.DataType) -> NDArray[np.int32]:
        """Codes of an array of values (nulls -> -1), adding unseen values first."""
        if len(array) == 0:
            return np.zeros(0, dtype=np.int32)
        distinct = pc.unique(array.drop_null()).to_pylist()
        self.extend(v for v in distinct if self.code(v) is None)
        value_set = pa.array(self.values, type=arrow_type)
        found = pc.index_in(array, value_set=value_set)
        codes: NDArray[np.int32] = found.fill_null(NULL_CODE).to_numpy(zero_copy_only=False).astype(np.int32)
        return codes

    def decode(self, codes: NDArray[np.int32], arrow_type: pa.DataType) -> pa.Array:
        values = pa.array(self.values, type=arrow_type)
        mask = codes < 0
        taken = values.take(pa.array(np.where(mask, 0, codes).astype(np.int32))) if len(values) else None
        if taken is None:
            return pa.nulls(len(codes), arrow_type)
        return pc.if_else(pa.array(~mask), taken, pa.scalar(None, arrow_type))


def arrow_type(kind: FieldKind) -> pa.DataType:
    return {
        FieldKind.CATEGORICAL: pa.string(),
        FieldKind.BOOLEAN: pa.bool_(),
        FieldKind.INTEGER: pa.int64(),
        FieldKind.NUMBER: pa.float64(),
        FieldKind.LIST: pa.string(),
        FieldKind.DATE: pa.int64(),  # days since the epoch
        FieldKind.TIMESTAMP: pa.int64(),  # microseconds since the epoch
    }[kind]


def vocabs_for(schema: Schema) -> dict[str, Vocab]:
    """Fresh vocabularies seeded with the build-time values (most frequent first)."""
    return {
        name: Vocab(spec.values)
        for name, spec in schema.fields.items()
        if spec.kind in (FieldKind.CATEGORICAL, FieldKind.BOOLEAN, FieldKind.LIST)
    }


@dataclass
class Rows:
    """A batch of sampled users, one NumPy array per column.

    ``act_shape``/``act_rate`` are each user's Gamma posterior over impressions per day
    (see :mod:`estimation.activity`); horizon forecasts read them.
    """

    hashes: NDArray[np.uint64]
    strata: NDArray[np.int64]
    updated_ms: NDArray[np.int64]
    act_shape: NDArray[np.float64]
    act_rate: NDArray[np.float64]
    cats: dict[str, NDArray[np.int32]] = field(default_factory=dict)
    nums: dict[str, NDArray[np.float64]] = field(default_factory=dict)
    lists: dict[str, tuple[NDArray[np.int64], NDArray[np.int32]]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.hashes)

    def take(self, idx: NDArray[np.int64]) -> Rows:
        lists = {}
        for name, (offsets, codes) in self.lists.items():
            starts, ends = offsets[idx], offsets[idx + 1]
            lengths = ends - starts
            new_offsets = np.zeros(len(idx) + 1, dtype=np.int64)
            np.cumsum(lengths, out=new_offsets[1:])
            gather = _ranges(starts, lengths)
            lists[name] = (new_offsets, codes[gather])
        return Rows(
            self.hashes[idx],
            self.strata[idx],
            self.updated_ms[idx],
            self.act_shape[idx],
            self.act_rate[idx],
            {k: v[idx] for k, v in self.cats.items()},
            {k: v[idx] for k, v in self.nums.items()},
            lists,
        )

    @staticmethod
    def concat(parts: list[Rows]) -> Rows:
        parts = [p for p in parts if len(p)] or parts[:1]
        first = parts[0]
        lists = {}
        for name in first.lists:
            offsets_parts = []
            base = 0
            for i, part in enumerate(parts):
                offsets = part.lists[name][0]
                offsets_parts.append((offsets if i == 0 else offsets[1:]) + base)
                base += int(offsets[-1])
            lists[name] = (
                np.concatenate(offsets_parts),
                np.concatenate([p.lists[name][1] for p in parts]),
            )
        return Rows(
            np.concatenate([p.hashes for p in parts]),
            np.concatenate([p.strata for p in parts]),
            np.concatenate([p.updated_ms for p in parts]),
            np.concatenate([p.act_shape for p in parts]),
            np.concatenate([p.act_rate for p in parts]),
            {k: np.concatenate([p.cats[k] for p in parts]) for k in first.cats},
            {k: np.concatenate([p.nums[k] for p in parts]) for k in first.nums},
            lists,
        )

    @staticmethod
    def empty(schema: Schema) -> Rows:
        rows = Rows(
            np.zeros(0, np.uint64),
            np.zeros(0, np.int64),
            np.zeros(0, np.int64),
            np.zeros(0, np.float64),
            np.zeros(0, np.float64),
        )
        for name, spec in schema.fields.items():
            if spec.kind in (FieldKind.CATEGORICAL, FieldKind.BOOLEAN):
                rows.cats[name] = np.zeros(0, np.int32)
            elif spec.kind is FieldKind.LIST:
                rows.lists[name] = (np.zeros(1, np.int64), np.zeros(0, np.int32))
            else:
                rows.nums[name] = np.zeros(0, np.float64)
        return rows


def _ranges(starts: NDArray[np.int64], lengths: NDArray[np.int64]) -> NDArray[np.int64]:
    """Concatenation of ``arange(s, s + l)`` for every (s, l), vectorized."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    nonempty = lengths > 0
    starts, lengths = starts[nonempty], lengths[nonempty]
    out = np.ones(total, dtype=np.int64)
    boundaries = np.cumsum(lengths)[:-1]
    out[0] = starts[0]
    out[boundaries] = starts[1:] - (starts[:-1] + lengths[:-1]) + 1
    return np.cumsum(out)


def rows_from_table(
    table: pa.Table,
    schema: Schema,
    vocabs: dict[str, Vocab],
    *,
    hashes: NDArray[np.uint64],
    strata: NDArray[np.int64],
    updated_ms: NDArray[np.int64],
    act_shape: NDArray[np.float64],
    act_rate: NDArray[np.float64],
) -> Rows:
    """Code the schema's columns of ``table`` (columns missing from it become null)."""
    n = table.num_rows
    rows = Rows(hashes, strata, updated_ms, act_shape, act_rate)
    for name, spec in schema.fields.items():
        kind = spec.kind
        if name in table.column_names:
            array = normalize_column(table.column(name), kind)
        elif kind is FieldKind.LIST:
            array = pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)), pa.array([], pa.string()))
        else:
            array = pa.nulls(n, arrow_type(kind))
        if kind in (FieldKind.CATEGORICAL, FieldKind.BOOLEAN):
            rows.cats[name] = vocabs[name].encode(array, arrow_type(kind))
        elif kind is FieldKind.LIST:
            offsets = array.offsets.to_numpy().astype(np.int64)
            values = array.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
            offsets = offsets - offsets[0]
            if array.null_count:  # a null list holds nothing
                lengths = np.diff(offsets)
                lengths[array.is_null().to_numpy(zero_copy_only=False)] = 0
                keep = np.repeat(lengths > 0, np.diff(offsets))
                values = values.filter(pa.array(keep))
                offsets = np.concatenate([[0], np.cumsum(lengths)])
            codes = vocabs[name].encode(values, pa.string())
            if (codes < 0).any():  # null items inside a list are dropped
                kept = np.concatenate([[0], np.cumsum(codes >= 0)])
                offsets = kept[offsets].astype(np.int64)
                codes = codes[codes >= 0]
            rows.lists[name] = (offsets, codes)
        else:
            rows.nums[name] = array.cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
    return rows
