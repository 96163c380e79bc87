"""One feature group's windowed state as NumPy columns, updated a micro-batch at a time.

Why columns and not a database: the previous engine kept this state in DuckDB tables and
paid about 1 µs per row per upsert statement, a dozen statements per event. Here a
micro-batch costs a few sorts, ``searchsorted`` merges and ``reduceat`` sums over the
batch and the changed entities, all in NumPy; no Python runs per event.

The state of a group (windows and ``end`` are whole :data:`TILE_MS` tiles, see
:mod:`features.definitions`):

* **entities**: a :class:`KeyIndex` from entity key to a dense id, and each entity's
  latest event time (its features are computed as of the end of that tile);
* **tiles**: rows keyed by ``id << TILE_BITS | tile`` kept sorted, with one column per
  count or sum, and one per distinct count holding *how many values were last seen in
  that tile*. A window's value is then the sum over the entity's tiles at or after
  ``end - W``, so distinct counts are as cheap and exact as counts;
* **running window sums**: per entity, each window's sum of those columns as of its
  ``end``, moved forward by each batch's deltas and the tiles that left the window
  (:meth:`GroupState._advance_windows`); a changed entity's features cost a few range
  sums instead of a pass over every tile of its longest window. They are derived state:
  a loaded checkpoint sums them afresh from the tiles;
* **seen** (per distinct count): the last tile each (entity, value) pair was seen in,
  sorted by ``id << 32 | value id``; when a pair is seen again in a later tile, its unit
  moves from the old tile to the new one;
* **last N** (per list feature): a matrix of the N most recent (time, event id, value)
  per entity that has any, ordered newest first (ties broken by event id, as the
  reference does).

The tiles and the seen pairs are sorted code arrays that grow with the state; they are
kept as :class:`SortedRuns` so that a micro-batch costs time in proportion to the batch,
not to the state.

Everything is exact: the features equal the reference SQL of :mod:`features.reference`.
:meth:`GroupState.split_arrays` / :meth:`GroupState.load_arrays` turn each shard's share
of the state into plain arrays for its checkpoint file and back; :meth:`GroupState.absorb`
and :meth:`GroupState.drop` add and remove a shard's entities when shards move.

A group keyed by user also acts on user deletions (:mod:`streams.engine.forget`): it
forgets the deleted users' state, keeps their tombstones, and lists them in
:attr:`GroupState.deleted` for the worker to delete their stored features.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray

from features.definitions import TILE_SECONDS, Aggregation, FeatureGroup
from features.online import CHANGED_COLUMN
from streams.engine import kernels
from streams.engine.forget import ForgottenUsers
from streams.engine.keys import KeyIndex
from streams.engine.router import (
    MASK_COLUMN,
    deletions,
    forgets_users,
    key_column,
    of_types,
)
from streams.engine.runs import SortedRuns, concatenated_ranges
from streams.engine.shipped import ShippedRows

TILE_MS = TILE_SECONDS * 1000
TILE_BITS = 27  # tile numbers (minutes since 1970) stay below 2**27 until the 2200s
_TILE_MASK = (1 << TILE_BITS) - 1
_VALUE_BITS = 32
_VALUE_MASK = (1 << _VALUE_BITS) - 1
_NO_TIME = np.iinfo(np.int64).min
# A seen pair's last tile once its entity was deleted (GroupState._reset): not seen. Such
# pairs are never saved (split_arrays) and go at the next compaction.
_UNSEEN = np.iinfo(np.int64).min
_I64 = NDArray[np.int64]
_F64 = NDArray[np.float64]


class StateError(ValueError):
    """The state cannot take these rows (e.g. more distinct values than it can number)."""


def _grow(array: NDArray[Any], size: int, fill: Any) -> NDArray[Any]:
    """``array`` with room for ``size`` rows along axis 0 (doubling, so growth is amortized)."""
    if len(array) >= size:
        return array
    grown = np.full((max(size, 2 * len(array), 64), *array.shape[1:]), fill, dtype=array.dtype)
    grown[: len(array)] = array
    return grown


def _segments(sorted_keys: _I64) -> _I64:
    """Start positions of the runs of equal values in ``sorted_keys``."""
    if len(sorted_keys) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])


@dataclass
class _Batch:
    """The rows of one micro-batch that a group counts: their positions in the shipped rows, and
    the columns every aggregation reads."""

    rows: ShippedRows
    positions: _I64  # of the counted rows in ``rows``, ascending
    ids: _I64  # entity id per row
    times: _I64
    changed_ids: _I64  # distinct entity ids, first-seen order
    changed_keys: pa.Array
    type_codes: NDArray[np.int8]  # per row, see event_type_codes
    type_masks: dict[tuple[str, ...], NDArray[np.bool_]] = field(default_factory=dict)

    def valid(self, column: str) -> NDArray[np.bool_]:
        """Per row, whether ``column`` is not null there."""
        return self.rows.valid(column)[self.positions]


@dataclass(frozen=True)
class _EmissionPlan:
    """Rows of a group's changed-feature matrix (``group.features()`` order, then the timestamp).

    ``window_rows[a, w]`` is the row of windowed aggregation ``a``'s feature over window
    ``w``, computed from tile column ``window_columns[a]`` (and, for a sum, its count
    ``window_supports[a]``; else the column itself); ``ratio_rows[r, w]`` likewise for
    ratio ``r`` = ``numerators[r] / denominators[r]``; ``list_rows`` per last-N feature.
    ``supported_sums`` pairs each sum's column with its count's.
    """

    width: int
    window_rows: _I64
    window_columns: _I64
    window_supports: _I64
    ratio_rows: _I64
    numerators: _I64
    denominators: _I64
    supported_sums: tuple[tuple[int, int], ...]
    list_rows: dict[str, int]


class _LastN:
    """The N most recent (time, event id, value) of each entity that has any."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.slot_of = np.full(0, -1, dtype=np.int64)  # entity id -> row of the matrices
        self.times = np.full((0, n), _NO_TIME, dtype=np.int64)
        self.event_ids = np.full((0, n), None, dtype=object)
        self.values = np.full((0, n), None, dtype=object)
        self.slots = 0

    def update(self, ids: _I64, times: _I64, event_ids: NDArray[Any], values: NDArray[Any]) -> None:
        if len(ids) == 0:
            return
        self.slot_of = _grow(self.slot_of, int(ids.max()) + 1, -1)
        distinct = np.unique(ids)
        new = distinct[self.slot_of[distinct] < 0]
        self.slot_of[new] = np.arange(self.slots, self.slots + len(new))
        self.slots += len(new)
        for name, fill in (("times", _NO_TIME), ("event_ids", None), ("values", None)):
            setattr(self, name, _grow(getattr(self, name), self.slots, fill))
        slots = self.slot_of[distinct]
        held = self.times[slots] != _NO_TIME
        rows = np.repeat(slots, self.n).reshape(len(slots), self.n)[held]
        candidates = pa.table(
            {
                "slot": np.concatenate([rows, self.slot_of[ids]]),
                "t": np.concatenate([self.times[slots][held], times]),
                "event_id": pa.array(np.concatenate([self.event_ids[slots][held], event_ids]), pa.string()),
            }
        )
        order = pc.sort_indices(
            candidates, sort_keys=[("slot", "ascending"), ("t", "descending"), ("event_id", "descending")]
        ).to_numpy()
        sorted_slots = candidates.column("slot").to_numpy()[order]
        starts = _segments(sorted_slots)
        rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
        keep = rank < self.n
        pick, rank, target = order[keep], rank[keep], sorted_slots[keep]
        all_values = np.concatenate([self.values[slots][held], values])
        all_event_ids = np.concatenate([self.event_ids[slots][held], event_ids])
        all_times = candidates.column("t").to_numpy()
        self.times[slots] = _NO_TIME
        self.event_ids[slots] = None
        self.values[slots] = None
        self.times[target, rank] = all_times[pick]
        self.event_ids[target, rank] = all_event_ids[pick]
        self.values[target, rank] = all_values[pick]

    def clear(self, ids: _I64) -> None:
        """Empty these entities' lists (their slots stay, empty, until a compaction frees them)."""
        self.slot_of = _grow(self.slot_of, int(ids.max()) + 1 if len(ids) else 0, -1)
        slots = self.slot_of[ids]
        slots = slots[slots >= 0]
        self.times[slots] = _NO_TIME
        self.event_ids[slots] = None
        self.values[slots] = None

    def lists(self, ids: _I64, since_ms: _I64) -> pa.ListArray:
        """Each entity's values at or after its ``since_ms``, newest first."""
        self.slot_of = _grow(self.slot_of, int(ids.max()) + 1 if len(ids) else 0, -1)
        slot = self.slot_of[ids]
        rows = np.flatnonzero(slot >= 0)  # entities holding any entry (often few: lists of clicks)
        times = self.times[slot[rows]]
        mask = (times != _NO_TIME) & (times >= since_ms[rows, None])
        counts = np.zeros(len(ids), dtype=np.int64)
        counts[rows] = mask.sum(axis=1)
        # Only the kept entries' values, gathered from the flat matrix (no row copies of objects).
        cells = (slot[rows, None] * self.n + np.arange(self.n))[mask]
        values = self.values.reshape(-1)[cells]
        offsets = np.r_[0, np.cumsum(counts)].astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.string()))

    def drop_before(self, horizon_ms: _I64, remap: _I64) -> None:
        """Forget entries older than their entity's ``horizon_ms`` (per entity id) and renumber
        entities by ``remap``."""
        old_ids = np.flatnonzero(self.slot_of >= 0)
        old_slots = self.slot_of[old_ids]
        slot_horizon = np.full(len(self.times), _NO_TIME, dtype=np.int64)
        slot_horizon[old_slots] = horizon_ms[old_ids]
        stale = self.times < slot_horizon[:, None]
        self.times[stale] = _NO_TIME
        self.event_ids[stale] = None
        self.values[stale] = None
        live_slots = (self.times[: self.slots] != _NO_TIME).any(axis=1)
        keep = live_slots[old_slots] & (remap[old_ids] >= 0)
        kept_ids, kept_slots = remap[old_ids[keep]], old_slots[keep]
        self.times = self.times[kept_slots].copy()
        self.event_ids = self.event_ids[kept_slots].copy()
        self.values = self.values[kept_slots].copy()
        self.slots = len(kept_slots)
        self.slot_of = np.full(int(remap.max()) + 1 if len(remap) else 0, -1, dtype=np.int64)
        self.slot_of[kept_ids] = np.arange(len(kept_ids))

    def absorb(self, other: _LastN, first_id: int, entities: int) -> None:
        """Take in ``other``'s lists of its ``entities`` entities, numbered from ``first_id`` here."""
        if other.slots == 0:
            return
        theirs = other.slot_of[:entities]
        held = np.flatnonzero(theirs >= 0)
        self.slot_of = _grow(self.slot_of, first_id + entities, -1)
        self.slot_of[first_id + held] = self.slots + theirs[held]
        size = self.slots + other.slots
        for name, fill in (("times", _NO_TIME), ("event_ids", None), ("values", None)):
            grown = _grow(getattr(self, name), size, fill)
            grown[self.slots : size] = getattr(other, name)[: other.slots]
            setattr(self, name, grown)
        self.slots = size

    def subset(self, kept: _I64) -> tuple[_I64, _I64]:
        """For entities ``kept`` (ids, ascending), numbered 0.. in a subset: their slot numbers there
        (-1: no list), and the rows of the matrices the subset holds, in that order."""
        slots = np.full(len(kept), -1, dtype=np.int64)
        inside = kept < len(self.slot_of)
        slots[inside] = self.slot_of[kept[inside]]
        held = slots >= 0
        rows = slots[held]
        slots[held] = np.arange(len(rows))
        return slots, rows


def _objects(strings: pa.Array) -> NDArray[Any]:
    """Strings as a NumPy object array (the last-N matrices hold Python strings)."""
    return np.asarray(strings.to_numpy(zero_copy_only=False), dtype=object)


def _end_tile(latest_ms: _I64) -> _I64:
    """The tile after each entity's latest event: where its windows end (features are as of then)."""
    return latest_ms // TILE_MS + 1


def _whole(sums: _F64) -> NDArray[np.int64]:
    """Sums as whole numbers, for the count features read from them. Sum features (an
    amount's total, which may overflow to infinity) share the array but read the floats, so
    their meaningless integers are made without NumPy's invalid-cast warning."""
    with np.errstate(invalid="ignore"):
        return np.rint(sums).astype(np.int64)


def _rate(numerator: _F64, denominator: _F64) -> _F64:
    """``numerator / denominator``, and 0 where the denominator is not positive (an empty window)."""
    return np.divide(numerator, denominator, out=np.zeros(np.shape(numerator)), where=denominator > 0)


def _summed_by_code(codes: _I64, deltas: _F64) -> tuple[_I64, _F64]:
    """The distinct ``codes``, sorted, and the ``deltas`` (columns, m) summed per code.

    Compiled (``_kernels.sum_by_code``: one hash pass, a radix sort of the distinct codes)
    where installed, else :func:`_summed_by_code_numpy`; the same bits either way.
    """
    if kernels.compiled is None:
        return _summed_by_code_numpy(codes, deltas)
    return _summed_by_code_compiled(kernels.compiled, codes, deltas)


def _summed_by_code_compiled(compiled: ModuleType, codes: _I64, deltas: _F64) -> tuple[_I64, _F64]:
    codes = np.ascontiguousarray(codes, dtype=np.int64)
    deltas = np.ascontiguousarray(deltas, dtype=np.float64)
    width = deltas.shape[0]
    out_codes = np.empty(len(codes), dtype=np.int64)
    out_sums = np.empty(width * len(codes), dtype=np.float64)
    distinct = compiled.sum_by_code(codes, deltas, width, out_codes, out_sums)
    return out_codes[:distinct], out_sums[: width * distinct].reshape(width, distinct)


def _summed_by_code_numpy(codes: _I64, deltas: _F64) -> tuple[_I64, _F64]:
    """:func:`_summed_by_code` in NumPy (the fallback, and the reference of the compiled kernel).

    Grouped by hashing (pandas' ``factorize``), then only the distinct codes sorted: a
    batch repeats its tile codes (about a third were distinct in the stream benchmark's
    traffic), and sorting every code took 1.6x as long. Each sum still adds its deltas in
    input order, so the sums are the same to the bit.
    """
    labels, distinct = pd.factorize(codes)  # distinct codes in first-seen order
    order = np.argsort(distinct)
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    group = rank[labels]  # each delta's distinct code, numbered in code order
    sums = np.stack([np.bincount(group, weights=row, minlength=len(order)) for row in deltas])
    return np.asarray(distinct[order], dtype=np.int64), sums.astype(np.float64, copy=False)


def _latest_by_pair(pairs: _I64, tiles: _I64) -> tuple[_I64, _I64]:
    """The distinct ``pairs``, sorted, and each one's latest (largest) tile.

    Compiled (``_kernels.max_by_code``) where installed, else :func:`_latest_by_pair_numpy`.
    """
    if kernels.compiled is None:
        return _latest_by_pair_numpy(pairs, tiles)
    return _latest_by_pair_compiled(kernels.compiled, pairs, tiles)


def _latest_by_pair_compiled(compiled: ModuleType, pairs: _I64, tiles: _I64) -> tuple[_I64, _I64]:
    pairs = np.ascontiguousarray(pairs, dtype=np.int64)
    out_pairs = np.empty(len(pairs), dtype=np.int64)
    out_tiles = np.empty(len(pairs), dtype=np.int64)
    distinct = compiled.max_by_code(pairs, np.ascontiguousarray(tiles, dtype=np.int64), out_pairs, out_tiles)
    return out_pairs[:distinct], out_tiles[:distinct]


def _latest_by_pair_numpy(pairs: _I64, tiles: _I64) -> tuple[_I64, _I64]:
    """:func:`_latest_by_pair` in NumPy (the fallback, and the reference of the compiled kernel)."""
    order = np.argsort(pairs)  # ties: any order (a max per pair)
    starts = _segments(pairs[order])
    return pairs[order][starts], np.maximum.reduceat(tiles[order], starts)


def _range_sums(codes: _I64, values: _F64, ids: _I64, low: _I64, high: _I64) -> _F64:
    """Per i, ``values`` (columns, n) summed over entity ``ids[i]``'s tiles in ``[low[i], high[i])``."""
    base = ids << TILE_BITS
    start = np.searchsorted(codes, base | np.maximum(low, 0))
    lengths = np.maximum(np.searchsorted(codes, base | np.maximum(high, 0)) - start, 0)
    sums = np.zeros((len(values), len(ids)))
    if not lengths.any():
        return sums
    gathered_start, rows = concatenated_ranges(start, lengths)
    filled = lengths > 0
    sums[:, filled] = np.add.reduceat(values[:, rows], gathered_start[filled], axis=1)
    return sums


def _seen_pairs(runs: SortedRuns) -> tuple[_I64, _I64]:
    """All of ``runs``' seen pairs and their tiles (1, n), less those marked :data:`_UNSEEN`."""
    codes, tiles = runs.consolidate()
    kept = tiles[0] != _UNSEEN
    return (codes, tiles) if kept.all() else (codes[kept], tiles[:, kept])


@dataclass(frozen=True)
class _PartRows:
    """Sorted codes (entity in the high bits) grouped by their entity's part, renumbered per part."""

    parts: NDArray[Any]  # per row, its part (ascending)
    codes: _I64  # entity ids replaced by their id within the part; sorted within each part
    payload: NDArray[Any]  # (width, rows)

    def part(self, part: int) -> tuple[_I64, NDArray[Any]]:
        first, end = np.searchsorted(self.parts, [part, part + 1])
        return self.codes[first:end], self.payload[:, first:end]


def _grouped_by_part(
    owners: NDArray[Any], codes: _I64, payload: NDArray[Any], local: _I64, shift: int
) -> _PartRows:
    """``codes`` (entity ``<< shift`` | low bits, sorted) grouped by their entity's part in ``owners``."""
    entities = codes >> shift
    row_parts = owners[entities]
    order = np.argsort(row_parts, kind="stable")
    renumbered = (local[entities] << shift) | (codes & ((1 << shift) - 1))
    return _PartRows(row_parts[order], renumbered[order], payload[:, order])


class GroupState:
    """The windowed state of one feature group over the shards a worker holds (see the module docstring)."""

    def __init__(self, group: FeatureGroup, bit: int) -> None:
        self.group = group
        self.bit = bit
        self.additive = tuple(a for a in group.aggregations if a.kind in ("count", "sum"))
        self.distinct = tuple(a for a in group.aggregations if a.kind == "distinct_count")
        self.last_n = tuple(a for a in group.aggregations if a.kind == "last_n")
        self.columns = [a.name for a in (*self.additive, *self.distinct)]  # of the tile matrix
        self.entities = KeyIndex()
        self.latest = np.full(0, _NO_TIME, dtype=np.int64)
        # Payload column-major, (columns, tiles): reduceat sums along rows fast.
        self.tiles = SortedRuns(len(self.columns), np.float64)
        self.window_tiles = np.array([w.seconds // TILE_SECONDS for w in group.windows], dtype=np.int64)
        self._windows_by_length = np.argsort(self.window_tiles, kind="stable")
        # Per entity id: each window's tile-column sums as of the end of its latest tile
        # (entity, window, column); see _advance_windows.
        self.running = np.zeros((0, len(group.windows), len(self.columns)))
        # Per entity id: whether this state has emitted its features since it was built or
        # loaded (until then every feature counts as changed; see _changed_features()).
        self.emitted = np.zeros(0, dtype=bool)
        # Per sum, a count of the same event types: where it is 0 the sum is exactly 0.
        counts = {a.event_types: self.columns.index(a.name) for a in self.additive if a.kind == "count"}
        self._support = {
            a.name: counts[a.event_types]
            for a in self.additive
            if a.kind == "sum" and a.event_types in counts
        }
        self._emission = self._plan_emission()
        self.values = {a.name: KeyIndex() for a in self.distinct}
        self.seen = {a.name: SortedRuns(1, np.int64) for a in self.distinct}  # pair code -> last tile
        self.lasts = {a.name: _LastN(a.n) for a in self.last_n}
        self.forgets_users = forgets_users(group)
        self.forgotten = ForgottenUsers()
        # Users deleted by the batches applied since the caller last emptied this list,
        # with each deletion's event time: their stored features are to be deleted.
        self.deleted: list[tuple[str, int]] = []

    # -- applying a batch ----------------------------------------------------------------

    def apply(self, rows: pa.Table | ShippedRows) -> pa.Table | None:
        """Fold the shipped ``rows`` this group counts into the state; return the changed features.

        A caller applying the same rows to several groups passes them as one
        :class:`ShippedRows`, so that the groups share its columns.
        """
        batch = self._select(rows if isinstance(rows, ShippedRows) else ShippedRows(rows))
        if batch is None:
            return None
        self.latest = _grow(self.latest, len(self.entities), _NO_TIME)
        self.running = _grow(self.running, len(self.entities), 0.0)
        previous_latest = self.latest[batch.changed_ids]
        previous_sums = self.running[batch.changed_ids]  # (a copy: fancy indexing)
        np.maximum.at(self.latest, batch.ids, batch.times)
        codes = [(batch.ids << TILE_BITS) | (batch.times // TILE_MS)]
        deltas = [self._additive_deltas(batch)]
        for column, aggregation in enumerate(self.distinct, start=len(self.additive)):
            distinct_codes, distinct_deltas = self._distinct_deltas(aggregation, column, batch)
            codes.append(distinct_codes)
            deltas.append(distinct_deltas)
        tile_codes, tile_deltas = _summed_by_code(np.concatenate(codes), np.concatenate(deltas, axis=1))
        self.tiles.add(tile_codes, tile_deltas)
        self._advance_windows(batch.changed_ids, previous_latest, tile_codes, tile_deltas)
        listed: dict[str, _I64] = {}  # per list feature: the entities given a new element
        for aggregation in self.last_n:
            listed_column = aggregation.column or ""
            mask = self._mask(aggregation, batch) & batch.valid(listed_column)
            picked = pa.array(batch.positions[mask])
            listed[aggregation.name] = batch.ids[mask]
            self.lasts[aggregation.name].update(
                batch.ids[mask],
                batch.times[mask],
                _objects(batch.rows.strings("event_id").take(picked)),
                _objects(batch.rows.strings(listed_column).take(picked)),
            )
        features, rates = self._features_and_rates(batch.changed_ids, batch.changed_keys)
        changed = self._changed_features(batch.changed_ids, previous_latest, previous_sums, listed, rates)
        return features.append_column(CHANGED_COLUMN, changed)

    def _forget_deleted_users(self, rows: ShippedRows, selected: NDArray[np.bool_]) -> NDArray[np.bool_]:
        """Apply the user deletions among this group's rows (``selected``); return which of them
        (per selected row) not to count (see :mod:`streams.engine.forget`).

        Equal to taking the rows one by one: a deletion drops its user's state, which holds
        the events read before it (in this batch: those rows are left out); the rows after
        it count unless their event time is at or before the deletion's (a tombstone).
        The deletions themselves count as no event. Only the key column is read here, and
        only where a deletion or a tombstone may apply; the caller leaves these rows out of
        the group's positions.
        """
        deleting = deletions(rows.table, rows.type_codes)[selected]
        if not deleting.any() and not len(self.forgotten):
            return deleting
        keys = rows.strings(key_column(self.group)).filter(pa.array(selected))
        times = rows.integers("event_time_ms")[selected]
        skipped = deleting.copy()
        if deleting.any():
            at = np.flatnonzero(deleting)
            deleted_keys = keys.take(pa.array(at)).to_pylist()
            last_deletion = dict(zip(deleted_keys, at.tolist(), strict=True))  # (a later row wins)
            index = pc.index_in(keys, value_set=pa.array(list(last_deletion), pa.string()))
            index = np.asarray(index.fill_null(-1).to_numpy(), np.int64)
            found = index >= 0
            before = np.zeros(len(index), dtype=bool)
            before[found] = (
                np.arange(len(index))[found] < np.asarray(list(last_deletion.values()))[index[found]]
            )
            skipped |= before
            self._drop_users(deleted_keys, times[at].tolist())
        skipped |= self.forgotten.blocked(keys, times)
        return skipped

    def _drop_users(self, keys: list[str], times_ms: list[int]) -> None:
        """Forget these users' state and remember their deletions (tombstones, :attr:`deleted`)."""
        ids = self.entities.lookup(pa.array(keys, pa.string()))
        ids = np.unique(ids[ids >= 0])
        if len(ids):
            self._reset(ids)
        self.forgotten.add(keys, times_ms)
        self.deleted.extend(zip(keys, times_ms, strict=True))

    def _reset(self, ids: _I64) -> None:
        """Empty these entities' state, keeping their ids (ascending): their next event starts anew.

        Their tiles are zeroed and their seen pairs marked :data:`_UNSEEN` in place, at a
        cost in proportion to what they hold: removing the rows took a pass over the whole
        state for every batch with a deletion (most batches, at realistic deletion rates
        and large states). A zero tile adds nothing to any window; the next compaction
        frees the ids and their rows.
        """
        self.tiles.set_ranges(ids << TILE_BITS, (ids + 1) << TILE_BITS, 0.0)
        for runs in self.seen.values():
            runs.set_ranges(ids << _VALUE_BITS, (ids + 1) << _VALUE_BITS, _UNSEEN)
        size = len(self.entities)
        self.latest = _grow(self.latest, size, _NO_TIME)
        self.latest[ids] = _NO_TIME
        self.running = _grow(self.running, size, 0.0)
        self.running[ids] = 0.0
        self.emitted = _grow(self.emitted, size, False)
        self.emitted[ids] = False  # (the store's row is deleted: a fresh one is written whole)
        for last in self.lasts.values():
            last.clear(ids)

    def rewrite_all(self) -> None:
        """Flag every feature of each entity's next emission, as after a start (see ``_changed_features``).

        Why: a store fed only changed features keeps a partial row for an entity whose row it
        lost (eviction, a restart without persistence) until that entity is written in full.
        """
        self.emitted[:] = False

    def _changed_features(
        self,
        ids: _I64,
        previous_latest: _I64,
        previous_sums: _F64,
        listed: Mapping[str, _I64],
        rates: _F64,
    ) -> pa.FixedSizeListArray:
        """Per entity of ``ids``: which features (``group.features()`` order), then whether the
        event timestamp, differ from those last emitted (the layout of ``CHANGED_COLUMN``).

        Why: an event changes a few of an entity's features (an impression moves its
        impression counts and spend, not its clicks or conversion rates), and the online
        store's cost is per stored feature, so the writer stores only these. A window sum
        changed where its running sums did (they are the features' only inputs); a rate
        where its value did; a list where an element arrived or the window's start moved
        past one. An entity not emitted since this state was built or loaded gets all of
        them: what is in the store then is unknown. ``rates`` are the new rates
        (ratio, window, entity), as :meth:`_features_and_rates` emitted them.

        Computed for all windowed features at once, as (feature, entity) rows placed by
        :meth:`_plan_emission`'s positions: a live cycle calls this once per group on a few
        thousand entities, where a few NumPy calls per feature cost more than the work.
        """
        plan = self._emission
        moved = previous_latest // TILE_MS != self.latest[ids] // TILE_MS  # the windows' end moved
        self.emitted = _grow(self.emitted, len(self.entities), False)
        fresh = ~self.emitted[ids]
        self.emitted[ids] = True
        differs = (self.running[ids] != previous_sums).transpose(2, 1, 0)  # (column, window, entity)
        flags = np.empty((plan.width, len(ids)), dtype=bool)
        if len(plan.window_rows):
            flags[plan.window_rows] = differs[plan.window_columns] | differs[plan.window_supports]
        if len(plan.ratio_rows):
            before = previous_sums.transpose(2, 1, 0)
            flags[plan.ratio_rows] = _rate(before[plan.numerators], before[plan.denominators]) != rates
        for name, row in plan.list_rows.items():
            flags[row] = moved | np.isin(ids, listed[name])
        flags[-1] = moved  # the timestamp last
        flags |= fresh
        return pa.FixedSizeListArray.from_arrays(pa.array(flags.T.ravel()), plan.width)

    def _select(self, rows: ShippedRows) -> _Batch | None:
        # The router sets this group's bit only on rows of the event types the group counts,
        # and on user deletions: a group of users applies those to its rows (the rows of
        # other groups' keys are never looked at) and leaves them out with the events they
        # forget. The rows are not copied: the group reads them at their positions.
        selected = (rows.integers(MASK_COLUMN) & (1 << self.bit)) != 0
        if self.forgets_users and selected.any():
            skipped = self._forget_deleted_users(rows, selected)
            selected[np.flatnonzero(selected)[skipped]] = False
        positions = np.flatnonzero(selected)
        if not len(positions):
            return None
        ids, changed_ids, changed_keys = self.entities.ids_at(rows.strings(key_column(self.group)), positions)
        if len(self.entities) >= 1 << (63 - TILE_BITS):
            raise StateError(f"group {self.group.name}: too many entities in one worker's state")
        return _Batch(
            rows=rows,
            positions=positions,
            ids=ids,
            times=rows.integers("event_time_ms")[positions],
            changed_ids=changed_ids,
            changed_keys=changed_keys,
            type_codes=rows.type_codes[positions],
        )

    @staticmethod
    def _mask(aggregation: Aggregation, batch: _Batch) -> NDArray[np.bool_]:
        found = batch.type_masks.get(aggregation.event_types)
        if found is None:
            found = of_types(batch.type_codes, aggregation.event_types)
            batch.type_masks[aggregation.event_types] = found
        return found

    def _additive_deltas(self, batch: _Batch) -> _F64:
        deltas = np.zeros((len(self.columns), len(batch.ids)), dtype=np.float64)
        for column, aggregation in enumerate(self.additive):
            mask = self._mask(aggregation, batch)
            if aggregation.kind == "count":
                deltas[column] = mask
            else:  # (sums are doubles, see ShippedRows.amounts)
                deltas[column] = np.where(
                    mask, batch.rows.amounts(aggregation.column or "")[batch.positions], 0.0
                )
        return deltas

    def _distinct_deltas(self, aggregation: Aggregation, column: int, batch: _Batch) -> tuple[_I64, _F64]:
        """Tile deltas moving each (entity, value) unit to the tile it was last seen in."""
        name = aggregation.column or ""
        mask = self._mask(aggregation, batch) & batch.valid(name)
        empty = (np.zeros(0, dtype=np.int64), np.zeros((len(self.columns), 0), dtype=np.float64))
        if not mask.any():
            return empty
        index = self.values[aggregation.name]
        value_ids, _, _ = index.ids_at(batch.rows.strings(name), batch.positions[mask])
        if len(index) >= 1 << _VALUE_BITS:
            raise StateError(f"group {self.group.name}: too many distinct {aggregation.column} values")
        pairs, tiles = _latest_by_pair(
            (batch.ids[mask] << _VALUE_BITS) | value_ids, batch.times[mask] // TILE_MS
        )

        seen = self.seen[aggregation.name]
        found, old = seen.get(pairs)
        old_tiles = old[0]
        found &= old_tiles != _UNSEEN  # (pairs of a deleted entity: seen anew)
        moved = found & (tiles > old_tiles)
        counted = moved | ~found  # pairs whose unit lands in a (new) tile
        entity = pairs >> _VALUE_BITS
        minus = (entity[moved] << TILE_BITS) | old_tiles[moved]
        plus = (entity[counted] << TILE_BITS) | tiles[counted]
        seen.put(pairs[counted], tiles[counted][None, :])

        deltas = np.zeros((len(self.columns), len(minus) + len(plus)), dtype=np.float64)
        deltas[column, : len(minus)] = -1.0
        deltas[column, len(minus) :] = 1.0
        return np.concatenate([minus, plus]), deltas

    def _advance_windows(self, ids: _I64, previous_latest: _I64, codes: _I64, deltas: _F64) -> None:
        """Bring the running window sums of entities ``ids`` to their new ends.

        Why running sums: re-summing every changed entity's tiles each batch cost in
        proportion to its tiles in the longest window (up to 10,080 minute tiles over 7 days
        for a busy ad), most of a small batch's time. A window sum at end ``b`` is
        instead the sum at the previous end ``a``, plus this batch's deltas inside
        ``[a - W, b)``, minus the (merged) tiles that left it, ``[a - W, b - W)``: each tile
        leaves each window once. Invariant: ``running[e, w]`` is the sum of the stored
        minute tiles of ``e`` in ``[end - W, end)``, ``end`` being the tile after its latest
        event. ``deltas`` are the batch's tile deltas at sorted unique ``codes``, already
        merged into the tiles.
        """
        if len(ids) == 0:
            return
        self.running = _grow(self.running, len(self.entities), 0.0)
        new_end = _end_tile(self.latest[ids])
        known = previous_latest != _NO_TIME
        old_end = np.where(known, _end_tile(previous_latest), new_end)  # new entities: nothing to expire
        by_id = np.argsort(ids)  # each code's entity is one of ids: look its old end up by search
        entity, tile = codes >> TILE_BITS, codes & _TILE_MASK
        self._add_inside_windows(entity, tile, old_end[by_id[np.searchsorted(ids[by_id], entity)]], deltas)
        moved = by_id[new_end[by_id] > old_end[by_id]]  # in id order: sorted needles search faster
        if len(moved):
            moved_ids = ids[moved]
            windows = len(self.window_tiles)
            lows = (old_end[moved][None, :] - self.window_tiles[:, None]).ravel()
            highs = (new_end[moved][None, :] - self.window_tiles[:, None]).ravel()
            expired = np.zeros((len(self.columns), len(lows)))
            for run_codes, run_values in self.tiles.runs():
                expired += _range_sums(run_codes, run_values, np.tile(moved_ids, windows), lows, highs)
            self.running[moved_ids] -= expired.reshape(len(self.columns), windows, -1).transpose(2, 1, 0)

    def _add_inside_windows(self, entity: _I64, tile: _I64, end: _I64, values: _F64) -> None:
        """Add ``values`` (columns, m) at (``entity``, ``tile``) to each running window that holds them.

        Each value's window ends at its ``end``. ``entity`` must be sorted (it comes from
        sorted tile codes), so each entity gets one sum.
        """
        if len(entity) == 0:
            return
        # The windows all end at ``end``, so they are nested: a value inside one is inside
        # every longer one. Each value is summed once, per entity, at the shortest window
        # that holds it; a cumulative sum over the windows by length then gives every
        # window's sum (one pass over the values instead of one per window).
        windows = len(self.window_tiles)
        by_length = self._windows_by_length
        shortest = np.searchsorted(self.window_tiles[by_length], end - tile)  # == windows: in none
        starts = _segments(entity)
        local = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(entity)]))
        cell = local * (windows + 1) + shortest
        size = len(starts) * (windows + 1)
        sums = np.stack([np.bincount(cell, weights=row, minlength=size) for row in values])
        cumulative = np.cumsum(sums.reshape(len(values), len(starts), windows + 1)[:, :, :windows], axis=2)
        added = np.empty((len(starts), windows, len(values)))
        added[:, by_length, :] = cumulative.transpose(1, 2, 0)
        self.running[entity[starts]] += added

    def _recompute_windows(self) -> None:
        """Every entity's running window sums, summed afresh from its tiles (after a load)."""
        ids = np.arange(len(self.entities), dtype=np.int64)
        self.running = np.zeros((len(ids), len(self.window_tiles), len(self.columns)))
        for codes, values in self.tiles.runs():
            self.running += self._minute_sums(codes, values, ids, _end_tile(self.latest[ids]))

    # -- reading features ----------------------------------------------------------------

    def _features_and_rates(self, ids: _I64, keys: pa.Array) -> tuple[pa.Table, _F64]:
        """Features of entities ``ids`` (named ``keys``) as of the end of each one's latest tile, and
        their rates as a (ratio, window, entity) array (for ``_changed_features``).

        The window sums are turned column-major once, so each feature column is one
        contiguous slice and each kind of arithmetic (rounding counts, zeroing empty sums,
        dividing rates) is one NumPy call for all of a group's features, not one per feature.
        """
        group = self.group
        plan = self._emission
        end_ms = _end_tile(self.latest[ids]) * TILE_MS
        sums = np.ascontiguousarray(self.running[ids].transpose(2, 1, 0))  # (column, window, entity)
        rates = _rate(sums[plan.numerators], sums[plan.denominators])
        for column, support in plan.supported_sums:  # an empty window sums to exactly zero (no residue)
            sums[column] = np.where(sums[support] > 0, sums[column], 0.0)
        # One Arrow array per kind, cut into a zero-copy slice per feature (an Arrow array
        # made from each NumPy slice costs ~13 µs: most of a small batch's feature rows).
        entities, windows = len(ids), len(group.windows)
        flat = {
            "sum": pa.array(sums.reshape(-1)),
            "count": pa.array(_whole(sums).reshape(-1)),
            "rate": pa.array(rates.reshape(-1)),
        }

        def feature(kind: str, index: int, window: int) -> pa.Array:
            return flat[kind].slice((index * windows + window) * entities, entities)

        columns: dict[str, pa.Array] = {
            group.key: keys,
            "event_timestamp": pa.array(end_ms * 1000, pa.timestamp("us")),
        }
        longest_ms = group.longest_window.seconds * 1000
        for aggregation in group.aggregations:
            if aggregation.kind == "last_n":
                columns[aggregation.name] = self.lasts[aggregation.name].lists(ids, end_ms - longest_ms)
                continue
            column = self.columns.index(aggregation.name)
            kind = "sum" if aggregation.kind == "sum" else "count"
            for w, window in enumerate(group.windows):
                columns[f"{aggregation.name}_{window.name}"] = feature(kind, column, w)
        for r, ratio in enumerate(group.ratios):
            for w, window in enumerate(group.windows):
                columns[f"{ratio.name}_{window.name}"] = feature("rate", r, w)
        return pa.table(columns), rates

    def _plan_emission(self) -> _EmissionPlan:
        """Where each feature of ``group.features()`` comes from, as index arrays (see ``_EmissionPlan``)."""
        group = self.group
        windows = len(group.windows)
        position = {feature.name: row for row, feature in enumerate(group.features())}
        rows: list[int] = []
        columns: list[int] = []
        supports: list[int] = []
        for aggregation in group.aggregations:
            if aggregation.kind == "last_n":
                continue
            column = self.columns.index(aggregation.name)
            for window in group.windows:
                rows.append(position[f"{aggregation.name}_{window.name}"])
            columns.append(column)
            supports.append(self._support.get(aggregation.name, column))
        ratio_rows = [position[f"{r.name}_{w.name}"] for r in group.ratios for w in group.windows]
        index = self.columns.index
        return _EmissionPlan(
            width=len(position) + 1,
            window_rows=np.asarray(rows, dtype=np.int64).reshape(-1, windows),
            window_columns=np.asarray(columns, dtype=np.int64),
            window_supports=np.asarray(supports, dtype=np.int64),
            ratio_rows=np.asarray(ratio_rows, dtype=np.int64).reshape(-1, windows),
            numerators=np.asarray([index(r.numerator) for r in group.ratios], dtype=np.int64),
            denominators=np.asarray([index(r.denominator) for r in group.ratios], dtype=np.int64),
            supported_sums=tuple((index(name), support) for name, support in self._support.items()),
            list_rows={a.name: position[a.name] for a in self.last_n},
        )

    def _minute_sums(self, codes: _I64, values: _F64, ids: _I64, end_tile: _I64) -> _F64:
        """Window sums (entity, window, column) from one run of tiles: one gather of the longest window."""
        base = ids << TILE_BITS
        starts = [end_tile - length for length in self.window_tiles]
        found = np.searchsorted(codes, np.concatenate([base | end_tile, *(base | s for s in starts)]))
        found = found.reshape(-1, len(ids))
        high = found[0]
        low = found[1:].min(axis=0)
        lengths = high - low
        gathered_start, rows = concatenated_ranges(low, lengths)
        gathered = np.zeros((len(self.columns), len(rows) + 1))  # a zero column for empty ranges
        np.take(values, rows, axis=1, out=gathered[:, :-1])
        out = np.zeros((len(ids), len(self.window_tiles), len(self.columns)))
        for w in range(len(self.window_tiles)):
            start = gathered_start + (found[1 + w] - low)
            end = gathered_start + lengths
            bounds = np.empty(2 * len(ids), dtype=np.int64)
            bounds[0::2], bounds[1::2] = start, end
            sums = np.add.reduceat(gathered, bounds, axis=1)[:, 0::2]
            sums[:, start >= end] = 0.0
            out[:, w] = sums.T
        return out

    # -- compaction and checkpoints ------------------------------------------------------

    def compact(self, horizon_ms: int | _I64) -> None:
        """Forget everything older than ``horizon_ms``: tiles, seen values, list entries, idle entities.

        ``horizon_ms`` is one instant, or one per entity id (a worker's state holds several
        shards, each compacted by its own newest event). An entity whose latest event is
        older than its horizon has nothing left in any window, so its id is freed too; ids
        are renumbered in order, which keeps every sorted code array sorted.
        """
        entities = len(self.entities)
        horizon = np.broadcast_to(np.asarray(horizon_ms, dtype=np.int64), (entities,))
        horizon_tile = -(-horizon // TILE_MS)
        live = self.latest[:entities] >= horizon
        self._forget_minute_tiles_before(horizon_tile, live)
        self.running = self.running[:entities][live].copy()
        self.emitted = _grow(self.emitted, entities, False)[:entities][live].copy()
        remap = self.entities.keep(live)
        self.latest = self.latest[:entities][live].copy()
        tile_codes, tile_values = self.tiles.consolidate()
        owners = tile_codes >> TILE_BITS
        keep = ((tile_codes & _TILE_MASK) >= horizon_tile[owners]) & (remap[owners] >= 0)
        codes = (remap[owners[keep]] << TILE_BITS) | (tile_codes[keep] & _TILE_MASK)
        self.tiles.replace(codes, tile_values[:, keep])
        for aggregation in self.distinct:
            name = aggregation.name
            seen_codes, seen_tiles = self.seen[name].consolidate()
            owners = seen_codes >> _VALUE_BITS
            keep = (seen_tiles[0] >= horizon_tile[owners]) & (remap[owners] >= 0)
            codes, tiles = seen_codes[keep], seen_tiles[:, keep]
            value_ids = codes & _VALUE_MASK
            used = np.zeros(len(self.values[name]), dtype=bool)
            used[value_ids] = True
            value_remap = self.values[name].keep(used)
            self.seen[name].replace(
                (remap[codes >> _VALUE_BITS] << _VALUE_BITS) | value_remap[value_ids], tiles
            )
        for last in self.lasts.values():
            last.drop_before(horizon, remap)

    def drop(self, entities: NDArray[np.bool_]) -> None:
        """Forget the flagged entities (per entity id) entirely: their shard moved to another worker."""
        far = np.int64(1) << 62  # beyond any event time, either way
        self.compact(np.where(entities[: len(self.entities)], far, -far))

    def _forget_minute_tiles_before(self, horizon_tile: _I64, live: NDArray[np.bool_]) -> None:
        """Take the minute tiles before ``horizon_tile`` (per entity id) out of the running sums of
        ``live`` entities.

        A live entity's longest window may still reach back past the horizon; its next
        event moves the window beyond it (later events are too late), but the running sums
        must keep matching the tiles that are kept (see :meth:`_advance_windows`).
        """
        for codes, values in self.tiles.runs():
            entity = codes >> TILE_BITS
            old = ((codes & _TILE_MASK) < horizon_tile[entity]) & live[entity]
            if not old.any():
                continue
            entity, tile = entity[old], codes[old] & _TILE_MASK
            self._add_inside_windows(entity, tile, _end_tile(self.latest[entity]), -values[:, old])
            # Their stored features still count these tiles: the next emission compares
            # against sums the store never saw, so it must write everything.
            self.emitted = _grow(self.emitted, len(self.entities), False)
            self.emitted[entity] = False

    def to_arrays(self) -> dict[str, Any]:
        """The state as named arrays: NumPy for numbers, Arrow for strings (for a checkpoint file)."""
        return self.split_arrays(np.zeros(len(self.entities), dtype=np.int64), [0])[0]

    def split_arrays(
        self, owners: _I64, parts: Collection[int], forgotten_owners: _I64 | None = None
    ) -> dict[int, dict[str, Any]]:
        """Each of ``parts``' share of the state as :meth:`to_arrays` gives it, in one pass over the state.

        ``owners`` gives the part (a shard) of each entity id, ``forgotten_owners`` that of
        each tombstone (in :meth:`ForgottenUsers.arrays` order; None: all in part 0). A part's entities are
        numbered densely in id order and it holds only the distinct values they use, so
        its arrays are what a state of just those entities would save. Everything is
        grouped by part with one stable sort per kind of row (entities, tiles, seen
        pairs), which keeps each part's codes in their sorted order.
        """
        count = len(self.entities)
        owners = np.asarray(owners[:count])
        if count and owners.min() >= 0 and owners.max() < 1 << 16:
            owners = owners.astype(np.uint16)  # (a stable sort of 16-bit keys is a radix sort)
        order = np.argsort(owners, kind="stable")  # entity ids by part, ascending within each
        by_part = owners[order]
        local = np.empty(count, dtype=np.int64)  # each entity's id within its part
        local[order] = np.arange(count) - np.searchsorted(by_part, by_part)
        keys = self.entities.keys.take(pa.array(order))
        latest = self.latest[order]
        tiles = _grouped_by_part(owners, *self.tiles.consolidate(), local, TILE_BITS)
        seen = {
            name: _grouped_by_part(owners, *_seen_pairs(runs), local, _VALUE_BITS)
            for name, runs in self.seen.items()
        }
        split: dict[int, dict[str, Any]] = {}
        for part in parts:
            first, end = (int(bound) for bound in np.searchsorted(by_part, [part, part + 1]))
            arrays: dict[str, Any] = {"entities": keys.slice(first, end - first), "latest": latest[first:end]}
            arrays["tile_codes"], arrays["tile_values"] = tiles.part(part)
            for name, pairs in seen.items():
                codes, tiles_seen = pairs.part(part)
                value_ids = codes & _VALUE_MASK
                used = np.zeros(len(self.values[name]), dtype=bool)
                used[value_ids] = True
                ranks = np.cumsum(used) - 1  # the part's value ids: the values it uses, in order
                arrays[f"{name}.values"] = self.values[name].keys.filter(pa.array(used))
                arrays[f"{name}.seen_codes"] = (codes >> _VALUE_BITS) << _VALUE_BITS | ranks[value_ids]
                arrays[f"{name}.seen_tiles"] = tiles_seen[0]
            for name, last in self.lasts.items():
                slots, rows = last.subset(order[first:end])
                arrays[f"{name}.slot_of"] = slots
                arrays[f"{name}.times"] = last.times[rows]
                arrays[f"{name}.event_ids"] = pa.array(last.event_ids[rows].ravel(), pa.string())
                arrays[f"{name}.list_values"] = pa.array(last.values[rows].ravel(), pa.string())
            if self.forgets_users:
                if forgotten_owners is None:
                    forgotten_owners = np.zeros(len(self.forgotten), dtype=np.int64)
                arrays.update(self.forgotten.to_arrays(np.flatnonzero(forgotten_owners == part)))
            split[part] = arrays
        return split

    def absorb(self, other: GroupState) -> None:
        """Take in ``other``'s entities, none of which this state holds (a shard joining a worker's state).

        The result equals having applied ``other``'s rows here too: an entity's state never
        depends on other entities'. Its entities are numbered after this state's, so its
        sorted codes stay sorted; its distinct values get this state's value ids.
        """
        self.forgotten.absorb(other.forgotten)
        count = len(other.entities)
        if count == 0:
            return
        first = len(self.entities)
        ids, _, _ = self.entities.ids(other.entities.keys)
        if len(self.entities) != first + count:
            raise StateError(
                f"group {self.group.name}: a shard's state holds entities this state already holds "
                "(shards must route each key to one shard)"
            )
        size = len(self.entities)
        self.latest = _grow(self.latest, size, _NO_TIME)
        self.latest[ids] = other.latest[:count]
        self.running = _grow(self.running, size, 0.0)
        self.running[ids] = other.running[:count]
        self.emitted = _grow(self.emitted, size, False)
        self.emitted[ids] = False  # as after a load: what the store holds for them is not known here
        codes, values = other.tiles.consolidate()
        self.tiles.add(((codes >> TILE_BITS) + first) << TILE_BITS | (codes & _TILE_MASK), values)
        for name, index in self.values.items():
            theirs = other.values[name]
            if len(theirs) == 0:
                continue
            value_ids, _, _ = index.ids(theirs.keys)
            if len(index) >= 1 << _VALUE_BITS:
                raise StateError(f"group {self.group.name}: too many distinct values for {name}")
            seen_codes, seen_tiles = other.seen[name].consolidate()
            pairs = ((seen_codes >> _VALUE_BITS) + first) << _VALUE_BITS | value_ids[seen_codes & _VALUE_MASK]
            order = np.argsort(pairs)
            self.seen[name].put(pairs[order], seen_tiles[:, order])
        for name, last in self.lasts.items():
            last.absorb(other.lasts[name], first, count)

    def load_arrays(self, arrays: Mapping[str, Any]) -> None:
        """Restore a state saved by :meth:`to_arrays` (or one part of :meth:`split_arrays`)."""
        self.entities = KeyIndex(arrays["entities"])
        self.latest = np.asarray(arrays["latest"], dtype=np.int64).copy()
        width = len(self.columns)
        # (Checkpoints of earlier versions also hold hour and day tiles, "tile_codes.60"
        # and so on; the minute tiles hold everything, so those are not read.)
        self.tiles.replace(
            np.asarray(arrays["tile_codes"], dtype=np.int64).copy(),
            np.asarray(arrays["tile_values"], dtype=np.float64).reshape(width, -1).copy(),
        )
        for name in self.values:
            self.values[name] = KeyIndex(arrays[f"{name}.values"])
            self.seen[name].replace(
                np.asarray(arrays[f"{name}.seen_codes"], dtype=np.int64).copy(),
                np.asarray(arrays[f"{name}.seen_tiles"], dtype=np.int64).reshape(1, -1).copy(),
            )
        for name, last in self.lasts.items():
            last.slot_of = np.asarray(arrays[f"{name}.slot_of"], dtype=np.int64).copy()
            last.times = np.asarray(arrays[f"{name}.times"], dtype=np.int64).reshape(-1, last.n).copy()
            last.slots = len(last.times)
            shape = last.times.shape
            # (an object array straight from Arrow: 3.5x faster than through a Python list)
            last.event_ids = arrays[f"{name}.event_ids"].to_numpy(zero_copy_only=False).reshape(shape)
            last.values = arrays[f"{name}.list_values"].to_numpy(zero_copy_only=False).reshape(shape)
        self.forgotten.load_arrays(arrays)
        self._recompute_windows()

    def sizes(self) -> dict[str, int]:
        """Rows held per part of the state (for status output and tests)."""
        sizes = {"entities": len(self.entities), "tiles": len(self.tiles)}
        sizes.update({f"{name}.seen": len(runs) for name, runs in self.seen.items()})
        sizes.update({f"{name}.lists": last.slots for name, last in self.lasts.items()})
        return sizes
