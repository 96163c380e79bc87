"""Dense ids for string keys (entity keys, distinct-count values), found column-at-a-time.

Why not a Python dict: probing a dict needs every distinct key of a micro-batch as a
Python string, and that (``to_pylist`` plus one probe per key) cost as much as all the
windowed state of a group. Here keys are hashed from the Arrow string buffers and
looked up in a hash table of their hashes; Python runs per batch, not per key. With the
compiled kernels (``_kernels.intern_strings``) the table is an open-addressing one in C,
and a group's keys are looked up where they stand in the batch's column, each in one
pass over its bytes: taking them out per group first, then finding the distinct ones
(Arrow's ``dictionary_encode``) cost 2 - 3x as much. Without them, a batch's distinct
keys are hashed in NumPy passes and looked up in a sorted table with ``searchsorted``.

Two keys are taken for one only if two independent 64-bit hashes both collide (the
hashes are random linear functions of the bytes, so about 2^-114 per pair). If the first
hash alone ever collides (about 2^-57 per pair), the index switches for good to exact
dictionary probes: slower, never wrong.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray

from infra.arrow_strings import string_buffers
from streams.engine import kernels
from streams.engine.runs import SortedRuns

_I64 = NDArray[np.int64]
_U64 = NDArray[np.uint64]

_HASH_SEED = 0x5EED_AD_2EAC4  # fixed: ids never depend on the process that computed them
_multipliers = np.zeros((2, 0), dtype=np.uint64)


def _position_multipliers(length: int) -> _U64:
    """Two rows of random odd 64-bit multipliers, one per byte position (grown on demand).

    Each row is the raw output of its own seeded generator, so a grown table starts with
    the same multipliers as before: a hash never changes while the index holds it.
    """
    global _multipliers
    if _multipliers.shape[1] < length:
        size = max(length, 2 * _multipliers.shape[1], 64)
        rows = [np.random.PCG64(_HASH_SEED + row).random_raw(size) for row in range(2)]
        _multipliers = np.stack(rows).astype(np.uint64) | np.uint64(1)
    return _multipliers


def string_hashes(strings: pa.Array) -> tuple[_I64, _I64]:
    """Two independent 64-bit hashes (as int64) of each string of a non-null string array.

    Each hash is ``sum((byte_i + 1) * M[i])`` modulo 2^64 over the string's UTF-8 bytes,
    with random odd multipliers ``M`` per byte position. The ``+ 1`` makes a trailing
    zero byte count, so ``"a"`` and ``"a\\0"`` differ. It is computed as
    ``sum(byte_i * M[i]) + (M[0] + ... + M[len - 1])``, a prefix sum looked up by length.
    """
    hashes = _hashes(strings, rows=2)
    return hashes[0], hashes[1]


def first_string_hashes(strings: pa.Array) -> _I64:
    """The first of :func:`string_hashes` alone (half the work where the second is not needed)."""
    first: _I64 = _hashes(strings, rows=1)[0]
    return first


def _hashes(strings: pa.Array, rows: int) -> _I64:
    """The first ``rows`` (1 or 2) hashes of :func:`string_hashes`, as a (rows, n) array.

    Compiled (``_kernels.hash_strings``: one pass over each string's bytes) where
    installed, else :func:`_hashes_numpy`; the same integers either way.
    """
    n = len(strings)
    if n == 0:
        return np.zeros((rows, 0), np.int64)
    bounds, data = string_buffers(strings)
    lengths = np.diff(bounds)
    longest = int(lengths.max())
    multipliers = _position_multipliers(longest)
    if kernels.compiled is None:
        return _hashes_numpy(bounds, data, lengths, multipliers)[:rows]
    hashes = np.empty((rows, n), np.int64)
    kernels.compiled.hash_strings(bounds, data, multipliers, multipliers.shape[1], rows, hashes)
    return hashes


def _hashes_numpy(bounds: _I64, data: NDArray[np.uint8], lengths: _I64, multipliers: _U64) -> _I64:
    """Both hashes of the strings ``data[bounds[i]:bounds[i + 1]]`` in NumPy passes (the fallback,
    and the reference of the compiled kernel)."""
    n = len(lengths)
    first = bounds[:-1]
    longest = int(lengths.max())
    prefix = np.zeros((2, longest + 1), dtype=np.uint64)
    np.cumsum(multipliers[:, :longest], axis=1, out=prefix[:, 1:])
    hashes = prefix[:, lengths]  # the "+ 1" part
    size = int(bounds[-1] - bounds[0])
    if longest * n <= 2 * size:
        # Keys of similar lengths (ids): one pass per byte position over all strings,
        # reading a zero past each string's end. About 5x faster than the general case.
        last = max(int(bounds[-1]) - 1, 0)
        for i in range(longest):
            byte = np.where(lengths > i, data[np.minimum(first + i, last)], 0).astype(np.uint64)
            hashes += multipliers[:, i : i + 1] * byte
    elif size:
        # Lengths vary widely (free text): one multiply per byte of the whole column,
        # summed per string with reduceat.
        positions = np.arange(size, dtype=np.int64) - np.repeat(first - bounds[0], lengths)
        weighted = multipliers[:, positions] * data[bounds[0] : bounds[-1]].astype(np.uint64)
        filled = lengths > 0
        hashes[:, filled] += np.add.reduceat(weighted, (first - bounds[0])[filled], axis=1)
    return hashes.view(np.int64)


def dictionary_encoded(values: pa.Array | pa.ChunkedArray) -> pa.DictionaryArray:
    """``values`` as one dictionary array: distinct values in first-seen order, nulls as null indices."""
    encoded = pc.dictionary_encode(values)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks() if encoded.num_chunks != 1 else encoded.chunk(0)
    return encoded


PRIMARY_MASK = (1 << 64) - 1
"""The bits of the first hash the index tells keys apart by (all of them; tests narrow it to
make first hashes collide)."""

_EMPTY = -1  # an empty cell's id
_FIRST_CELLS = 1024


def _empty_cells(entries: int) -> _I64:
    """An empty open-addressing table (capacity x 3) with room for ``entries`` keys at half load."""
    capacity = _FIRST_CELLS
    while capacity < 2 * entries:
        capacity *= 2
    return np.full((capacity, 3), _EMPTY, dtype=np.int64)


def _placed(compiled: ModuleType, cells: _I64, ids: _I64, entries: int) -> _I64:
    """A new table with room for ``entries`` keys, holding ``cells``' keys (rows) under ``ids``."""
    table = _empty_cells(max(entries, len(cells)))
    compiled.place_cells(table, cells[:, 0].copy(), cells[:, 1].copy(), np.ascontiguousarray(ids))
    return table


def _grown(stamps: _I64, size: int) -> _I64:
    """``stamps`` with room for ``size`` ids (doubling; new ids' stamps 0, which no call has)."""
    if len(stamps) >= size:
        return stamps
    grown = np.zeros(max(size, 2 * len(stamps)), dtype=np.int64)
    grown[: len(stamps)] = stamps
    return grown


def _masked(hashes: tuple[_I64, _I64]) -> tuple[_I64, _I64]:
    """The hashes with the first one cut to :data:`PRIMARY_MASK`'s bits."""
    primary, check = hashes
    if PRIMARY_MASK != (1 << 64) - 1:
        primary = (primary.view(np.uint64) & np.uint64(PRIMARY_MASK)).view(np.int64)
    return primary, check


def one_string_array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """``values`` as one ``string`` array: chunks combined, other types (large_string too) cast."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    return values if values.type == pa.string() else values.cast(pa.string())


class KeyIndex:
    """Dense ids for string keys, in order of first appearance (see the module docstring).

    Three forms, one at a time: with the compiled kernels (chosen when the index is made), a
    hash table in C (``_cells``: first hash, second hash, id per cell), probed for every
    key where it stands; without them, a sorted NumPy table of the batch's distinct keys'
    hashes (``_table``); after a first-hash collision, exact probes of a dict (``_exact``).
    """

    def __init__(self, keys: pa.Array | None = None) -> None:
        self._chunks: list[pa.Array] = []
        self._size = 0
        self._compiled = kernels.compiled
        self._cells: _I64 | None = _empty_cells(0) if self._compiled is not None else None
        self._stamps = np.zeros(0, dtype=np.int64)  # per id: the last ids_at call that saw it
        self._serial = 0
        self._table: SortedRuns | None = SortedRuns(2, np.int64) if self._cells is None else None
        self._exact: dict[str, int] | None = None
        if keys is not None and len(keys):
            self.ids(keys)

    def __len__(self) -> int:
        return self._size

    @property
    def keys(self) -> pa.Array:
        """Every key, by id."""
        if len(self._chunks) != 1:
            self._chunks = [pa.concat_arrays(self._chunks) if self._chunks else pa.array([], pa.string())]
        return self._chunks[0]

    def ids(self, values: pa.Array | pa.ChunkedArray) -> tuple[_I64, _I64, pa.Array]:
        """Per value its id (new keys get the next ids); also the distinct ids and keys (first-seen order).

        ``values`` must hold no nulls.
        """
        if self._cells is not None:
            strings = one_string_array(values)
            return self.ids_at(strings, np.arange(len(strings), dtype=np.int64))
        encoded = dictionary_encoded(values)
        codes, distinct = encoded.indices.to_numpy(), encoded.dictionary
        if distinct.type != pa.string():
            distinct = distinct.cast(pa.string())
        found = self._hashed_ids(distinct) if self._exact is None else None
        if found is None:
            found = self._exact_ids(distinct)
        return found[codes], found, distinct

    def ids_at(self, strings: pa.Array, positions: _I64) -> tuple[_I64, _I64, pa.Array]:
        """:meth:`ids` of ``strings.take(positions)``, without taking them where the compiled table runs.

        Why: a group's keys are a subset of a micro-batch's rows; taking them first copied
        every key string once per group, and finding the distinct ones cost a hash pass
        of its own. ``strings`` is one string array; the strings at ``positions`` (int64)
        must not be null.
        """
        if self._cells is None or self._compiled is None:
            return self.ids(strings.take(pa.array(positions)))
        return self._interned(self._compiled, strings, np.ascontiguousarray(positions, dtype=np.int64))

    def _interned(
        self, compiled: ModuleType, strings: pa.Array, positions: _I64
    ) -> tuple[_I64, _I64, pa.Array]:
        assert self._cells is not None
        m = len(positions)
        bounds, data = string_buffers(strings)
        self._stamps = _grown(self._stamps, self._size + m)
        self._serial += 1
        ids = np.empty(m, np.int64)
        distinct_ids = np.empty(m, np.int64)
        rows = np.empty(m, np.int64)
        done = added = distinct = 0
        while True:
            multipliers = _position_multipliers(0)
            result = compiled.intern_strings(
                self._cells, self._size + added, bounds, data, multipliers, multipliers.shape[1],
                positions[done:], PRIMARY_MASK, self._size + added, self._stamps, self._serial,
                ids[done:], distinct_ids[distinct:], rows[distinct:],
            )  # fmt: skip
            if result is None:  # two keys share a first hash: exact probes from now on
                self._switch_to_exact()
                return self.ids(strings.take(pa.array(positions)))
            if isinstance(result, int):  # a longer key than the multipliers reach
                _position_multipliers(result)
                continue
            new, seen, consumed = result
            added, distinct, done = added + new, distinct + seen, done + consumed
            if done == m:
                break
            held = self._cells[self._cells[:, 2] != _EMPTY]  # half full: twice the room
            self._cells = _placed(compiled, held, held[:, 2], max(self._size + added + 1, len(self._cells)))
        distinct_keys = strings.take(pa.array(rows[:distinct]))
        distinct_ids = distinct_ids[:distinct].copy()
        if added:  # (new ids are given in first-seen order, as the distinct keys come)
            self._append(distinct_keys.filter(pa.array(distinct_ids >= self._size)))
        return ids, distinct_ids, distinct_keys

    def lookup(self, keys: pa.Array) -> _I64:
        """Each of the non-null string ``keys``' id, or -1 where the index does not hold it (adds none).

        A key is found by its hashes, so this costs the keys asked for, not the keys held.
        A first hash shared by a held key and another key means the other is not held:
        two held keys sharing it would have switched the index to exact probes.
        """
        if self._exact is not None:
            return self._exact_lookup(keys.to_pylist())
        if self._cells is not None and self._compiled is not None:
            strings = one_string_array(keys)
            found = np.empty(len(strings), np.int64)
            if len(strings):
                bounds, data = string_buffers(strings)
                multipliers = _position_multipliers(int(np.diff(bounds).max()))
                self._compiled.find_strings(
                    self._cells, bounds, data, multipliers, multipliers.shape[1], PRIMARY_MASK, found
                )
            return found
        assert self._table is not None
        primary, check = _masked(string_hashes(keys))
        order = np.argsort(primary)
        found_sorted, payload = self._table.get(primary[order])
        held = found_sorted & (payload[1] == check[order])
        ids = np.full(len(keys), -1, dtype=np.int64)
        ids[order[held]] = payload[0][held]
        return ids

    def _hashed_ids(self, distinct: pa.Array) -> _I64 | None:
        """Ids of the ``distinct`` keys via the hash table, or None if a first hash collided."""
        assert self._table is not None
        primary, check = _masked(string_hashes(distinct))
        order = np.argsort(primary)
        sorted_primary = primary[order]
        found_sorted, payload = self._table.get(sorted_primary)
        collided = (sorted_primary[1:] == sorted_primary[:-1]).any() or (
            payload[1][found_sorted] != check[order][found_sorted]
        ).any()
        if collided:
            self._switch_to_exact()
            return None
        found = np.empty(len(distinct), dtype=np.int64)
        found[order] = np.where(found_sorted, payload[0], -1)
        new = np.flatnonzero(found < 0)  # first-seen order, as the dictionary is
        if len(new):
            found[new] = np.arange(self._size, self._size + len(new))
            new_sorted = order[~found_sorted]  # the same keys, in hash order
            self._table.put(primary[new_sorted], np.stack([found[new_sorted], check[new_sorted]]))
            self._append(distinct.take(pa.array(new)))
        return found

    def _exact_lookup(self, keys: list[str]) -> _I64:
        """Each key's id by exact probes, -1 where not held."""
        assert self._exact is not None
        lookup = self._exact
        return np.fromiter((lookup.get(key, -1) for key in keys), np.int64, len(keys))

    def _exact_ids(self, distinct: pa.Array) -> _I64:
        assert self._exact is not None
        keys = distinct.to_pylist()
        found = self._exact_lookup(keys)
        new = np.flatnonzero(found < 0)
        if len(new):
            found[new] = np.arange(self._size, self._size + len(new))
            self._exact.update(zip((keys[i] for i in new.tolist()), found[new].tolist(), strict=True))
            self._append(distinct.take(pa.array(new)))
        return found

    def _append(self, new_keys: pa.Array) -> None:
        self._chunks.append(new_keys)
        self._size += len(new_keys)

    def _switch_to_exact(self) -> None:
        self._exact = {key: index for index, key in enumerate(self.keys.to_pylist())}
        self._table = None
        self._cells = None

    def keep(self, live: NDArray[np.bool_]) -> _I64:
        """Forget the keys not ``live``; return old id -> new id (-1 for forgotten)."""
        remap = np.full(self._size, -1, dtype=np.int64)
        kept = np.flatnonzero(live[: self._size])
        remap[kept] = np.arange(len(kept))
        self._chunks = [self.keys.take(pa.array(kept))]
        self._size = len(kept)
        if self._cells is not None:
            cells = self._cells[self._cells[:, 2] != _EMPTY]
            new_ids = remap[cells[:, 2]]
            held = new_ids >= 0
            assert self._compiled is not None
            self._cells = _placed(self._compiled, cells[held], new_ids[held], len(kept))
        elif self._table is not None:
            hashes, payload = self._table.consolidate()
            new_ids = remap[payload[0]]
            held = new_ids >= 0
            self._table.replace(hashes[held], np.stack([new_ids[held], payload[1][held]]))
        else:
            self._switch_to_exact()
        return remap
