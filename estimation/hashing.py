"""Stable 64-bit user hashes, computed column-at-a-time over Arrow string buffers.

Every sampling decision in :mod:`estimation` is a function of ``hash(user_id, seed)``
alone: a user is in the sample when ``uniform(hash) < rate(stratum)`` and lives on shard
``shard_of(hash, K)``. Because the hash ignores where and when it is computed, a user
streamed in later lands in the same place on every shard and every rebuild, and lowering
a stratum's rate keeps a nested subset of the same users (threshold sampling).

The hash is FNV-1a over the UTF-8 bytes, salted with the seed and finished with the
SplitMix64 mixer, so that the low and high bits are both well spread. It is evaluated
one byte position at a time across the whole column (``O(max_len)`` NumPy passes), which
hashes ~2M short ids in well under a second without a per-user Python loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray

from infra.arrow_strings import string_buffers

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_SHARD_SALT = 0x5BD1E9955BD1E995
_UNIFORM_SCALE = 1.0 / float(1 << 53)


class UserIdError(ValueError):
    """The ``user_id`` column is missing, null or neither text nor an integer."""


def _splitmix64(values: NDArray[np.uint64]) -> NDArray[np.uint64]:
    z = values.copy()
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def _seed_word(seed: int) -> np.uint64:
    mixed = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    return np.uint64(mixed[0])


def hash_user_ids(user_ids: pa.Array | pa.ChunkedArray | Sequence[str], seed: int) -> NDArray[np.uint64]:
    """The salted 64-bit hash of each user id (same id and seed -> same value, everywhere)."""
    array = _as_string_array(user_ids)
    n = len(array)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    bounds, data = string_buffers(array)
    starts = bounds[:-1]
    lengths = bounds[1:] - bounds[:-1]
    hashes = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    # Process ids longest-first so that each byte position touches a shrinking prefix.
    order = np.argsort(-lengths, kind="stable")
    sorted_lengths = lengths[order]
    sorted_starts = starts[order]
    work = hashes[order]
    max_len = int(sorted_lengths[0]) if n else 0
    # active[pos] = how many ids are longer than pos (ids sorted by decreasing length)
    counts = np.searchsorted(-sorted_lengths, -np.arange(max_len), side="left")
    for pos in range(max_len):
        k = int(counts[pos])
        if k == 0:
            break
        byte = data[sorted_starts[:k] + pos].astype(np.uint64)
        work[:k] = (work[:k] ^ byte) * _FNV_PRIME
    hashes[order] = work
    hashes ^= _seed_word(seed)
    return _splitmix64(hashes)


def uniform(hashes: NDArray[np.uint64]) -> NDArray[np.float64]:
    """Map hashes to [0, 1) using their top 53 bits (the inclusion coin of each user)."""
    return (hashes >> np.uint64(11)).astype(np.float64) * _UNIFORM_SCALE


def shard_of(hashes: NDArray[np.uint64], shards: int) -> NDArray[np.int64]:
    """Shard number in ``[0, shards)``; re-mixed so it is independent of :func:`uniform`."""
    if shards <= 1:
        return np.zeros(len(hashes), dtype=np.int64)
    mixed = _splitmix64(hashes ^ np.uint64(_SHARD_SALT))
    return (mixed % np.uint64(shards)).astype(np.int64)


def _as_string_array(user_ids: pa.Array | pa.ChunkedArray | Sequence[str]) -> pa.Array:
    if isinstance(user_ids, pa.ChunkedArray):
        array = user_ids.combine_chunks() if user_ids.num_chunks != 1 else user_ids.chunk(0)
    elif isinstance(user_ids, pa.Array):
        array = user_ids
    else:
        array = pa.array(list(user_ids), pa.string())
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    if pa.types.is_integer(array.type):  # (a warehouse key: hashed as its decimal text)
        array = array.cast(pa.string())
    if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        raise UserIdError(f"user_id must be a string or integer column, not {array.type}")
    if array.null_count:
        first = int(np.flatnonzero(pc.is_null(array).to_numpy(zero_copy_only=False))[0])
        raise UserIdError(f"user_id is null in {array.null_count} rows (first at row {first})")
    return array
