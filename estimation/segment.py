"""A bitmap index over a block of sampled users: where targeting expressions are evaluated.

Rows are laid out sorted by stratum, each stratum starting on a 64-bit word boundary, so
"how many matching sampled users per stratum" is a popcount and a prefix sum over the
result bitmap (:func:`estimation.bitmaps.block_counts`). Every categorical, boolean and
list value has a posting: a dense bitmap when the value is common, or its sorted bit
positions when it is rare (a dense bitmap for a value held by 0.01% of users would cost
more memory than the users themselves). Numeric fields keep their values in a padded
array and are compared directly. Evaluating ``{"and": [...]}`` is then a handful of word
operations per criterion: ~16k words for a 1M-row segment.

A segment is immutable except for its ``alive`` bitmap: a deleted or changed user is
cleared there (a tombstone) and disappears from every answer at once; the row itself is
purged when the shard compacts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from estimation import bitmaps
from estimation.activity import p_active
from estimation.bitmaps import Words
from estimation.rows import Rows, Vocab
from estimation.schema import FieldKind, Schema
from estimation.targeting import (
    And,
    Between,
    Eq,
    Expr,
    HasAll,
    HasAny,
    In,
    Not,
    Or,
    numeric_bounds,
    numeric_values,
)

# Horizons (days) whose P(active) a segment keeps for every row (8 bytes per row each).
_P_ACTIVE_HORIZONS = 4
# Bits summed at a time by Segment._masked_sums (two float64 buffers of 512 KB).
_CHUNK_BITS = 65_536


@dataclass(frozen=True)
class Posting:
    """The rows holding one value: dense words, or sorted bit positions when rare."""

    words: Words | None
    positions: NDArray[np.int64] | None

    def dense(self, n_words: int) -> Words:
        if self.words is not None:
            return self.words
        assert self.positions is not None
        return bitmaps.from_positions(self.positions, n_words)


@dataclass(frozen=True)
class SegmentCounts:
    """Per-stratum sums over one segment (``strata`` are dense stratum indexes)."""

    strata: NDArray[np.int64]
    sampled: NDArray[np.int64]
    matched: NDArray[np.int64]


class Segment:
    """Bitmap index over ``rows`` (reordered by stratum). See the module docstring."""

    def __init__(self, rows: Rows, schema: Schema, vocabs: dict[str, Vocab]) -> None:
        self.schema = schema
        self.vocabs = vocabs
        order = np.argsort(rows.strata, kind="stable")
        self.rows = rows.take(order)
        strata = self.rows.strata
        n = len(strata)
        if n:
            starts = np.flatnonzero(np.concatenate(([True], strata[1:] != strata[:-1])))
        else:
            starts = np.zeros(0, dtype=np.int64)
        group_sizes = np.diff(np.append(starts, n))
        group_words = (group_sizes + bitmaps.WORD_BITS - 1) // bitmaps.WORD_BITS
        self.block_strata: NDArray[np.int64] = strata[starts].astype(np.int64)
        self.block_starts = (np.cumsum(group_words) - group_words).astype(np.int64)
        self.block_ends = (self.block_starts + group_words).astype(np.int64)
        self.n_words = int(group_words.sum())
        n_bits = self.n_words * bitmaps.WORD_BITS
        # bit position of every row: its block's first bit + rank inside the block
        rank = np.arange(n, dtype=np.int64) - np.repeat(starts, group_sizes)
        self.row_pos: NDArray[np.int64] = np.repeat(self.block_starts * bitmaps.WORD_BITS, group_sizes) + rank
        self.pos_row = np.full(n_bits, -1, dtype=np.int64)
        self.pos_row[self.row_pos] = np.arange(n)
        self.alive = bitmaps.from_positions(self.row_pos, self.n_words)
        self.shape = self._padded(self.rows.act_shape, n_bits, 0.0)
        self.rate = self._padded(self.rows.act_rate, n_bits, 1.0)
        # expected impressions per day (the posterior mean); a horizon's are D times these
        self.daily_impressions = self.shape / self.rate
        self._p_active: dict[float, NDArray[np.float64]] = {}  # see horizon_sums
        self._chunks: list[tuple[int, int, int, int, NDArray[np.int64]]] | None = None
        self.nums = {name: self._padded(v, n_bits, np.nan) for name, v in self.rows.nums.items()}
        self.postings: dict[str, list[Posting | None]] = {}
        for name, codes in self.rows.cats.items():
            self.postings[name] = self._postings(codes, self.row_pos, len(vocabs[name]))
        for name, (offsets, codes) in self.rows.lists.items():
            parents = np.repeat(np.arange(n, dtype=np.int64), np.diff(offsets))
            self.postings[name] = self._postings(codes, self.row_pos[parents], len(vocabs[name]))
        hash_order = np.argsort(self.rows.hashes, kind="stable")
        self._sorted_hashes = self.rows.hashes[hash_order]
        self._sorted_rows = hash_order.astype(np.int64)
        self._sampled: NDArray[np.int64] | None = None

    def _padded(self, values: NDArray[np.float64], n_bits: int, fill: float) -> NDArray[np.float64]:
        """Values placed at their rows' bit positions (``fill`` in the padding)."""
        out = np.full(n_bits, fill, dtype=np.float64)
        out[self.row_pos] = values
        return out

    def _postings(
        self, codes: NDArray[np.int32], positions: NDArray[np.int64], n_values: int
    ) -> list[Posting | None]:
        valid = codes >= 0
        codes, positions = codes[valid].astype(np.int64), positions[valid]
        order = np.lexsort((positions, codes))
        codes, positions = codes[order], positions[order]
        bounds = np.searchsorted(codes, np.arange(n_values + 1))
        dense_from = max(self.n_words // 2, 1)  # 32 bits per position vs 1 bit per row
        out: list[Posting | None] = []
        for value in range(n_values):
            lo, hi = int(bounds[value]), int(bounds[value + 1])
            if lo == hi:
                out.append(None)
            elif hi - lo >= dense_from:
                out.append(Posting(bitmaps.from_positions(positions[lo:hi], self.n_words), None))
            else:
                out.append(Posting(None, positions[lo:hi].copy()))
        return out

    def __len__(self) -> int:
        return len(self.rows)

    def memory_bytes(self) -> int:
        """Bytes held by the index and the rows' arrays (what a query touches, roughly)."""
        arrays: list[NDArray[Any]] = [
            self.alive,
            self.row_pos,
            self.pos_row,
            self.shape,
            self.rate,
            self.daily_impressions,
            *self._p_active.values(),
            *self.nums.values(),
        ]
        rows = self.rows
        arrays += [rows.hashes, rows.strata, rows.updated_ms, rows.act_shape, rows.act_rate]
        arrays += list(rows.cats.values()) + list(rows.nums.values())
        arrays += [a for pair in rows.lists.values() for a in pair]
        total = sum(a.nbytes for a in arrays)
        for postings in self.postings.values():
            for posting in postings:
                if posting is not None:
                    total += (posting.words if posting.words is not None else posting.positions).nbytes  # type: ignore[union-attr]
        return int(total)

    # -- lookups and tombstones --------------------------------------------------------

    def find(self, hashes: NDArray[np.uint64]) -> NDArray[np.int64]:
        """Row index of each user hash present and alive in this segment, else -1."""
        if len(self._sorted_hashes) == 0 or len(hashes) == 0:
            return np.full(len(hashes), -1, dtype=np.int64)
        pos = np.clip(np.searchsorted(self._sorted_hashes, hashes), 0, len(self._sorted_hashes) - 1)
        rows = np.where(self._sorted_hashes[pos] == hashes, self._sorted_rows[pos], -1)
        alive = np.zeros(len(rows), dtype=bool)
        hit = rows >= 0
        bits = self.row_pos[rows[hit]]
        alive[hit] = (self.alive[bits >> 6] >> (bits & 63).astype(np.uint64)) & np.uint64(1) == 1
        return np.where(alive, rows, -1).astype(np.int64)

    def kill(self, rows: NDArray[np.int64]) -> None:
        """Tombstone rows: they stop counting immediately."""
        if len(rows) == 0:
            return
        bits = self.row_pos[rows]
        np.bitwise_and.at(self.alive, bits >> 6, ~(np.uint64(1) << (bits & 63).astype(np.uint64)))
        self._sampled = None

    def live_rows(self) -> Rows:
        """The rows not tombstoned (what compaction keeps)."""
        alive_pos = bitmaps.to_positions(self.alive)
        return self.rows.take(self.pos_row[alive_pos])

    @property
    def live_count(self) -> int:
        return bitmaps.count(self.alive)

    # -- queries -------------------------------------------------------------------------

    def evaluate(self, expr: Expr) -> Words:
        """Bitmap of the alive rows matching ``expr``."""
        result = self._eval(expr)
        return result & self.alive

    def _eval(self, node: Expr) -> Words:
        if isinstance(node, And):
            if not node.children:
                return self.alive.copy()
            out = self._eval(node.children[0]).copy()
            for child in node.children[1:]:
                out &= self._eval(child)
            return out
        if isinstance(node, Or):
            out = bitmaps.zeros(self.n_words)
            for child in node.children:
                out |= self._eval(child)
            return out
        if isinstance(node, Not):
            return self.alive & ~self._eval(node.child)
        spec = self.schema[node.field]
        if spec.kind.numeric:
            return self._numeric(node, spec.kind)
        vocab = self.vocabs[node.field]
        postings = self.postings[node.field]
        if isinstance(node, Eq):
            return self._union(vocab, postings, (node.value,))
        if isinstance(node, (In, HasAny)):
            return self._union(vocab, postings, node.values)
        if isinstance(node, HasAll):
            out = self.alive.copy()
            for value in node.values:
                code = vocab.code(value)
                posting = postings[code] if code is not None and code < len(postings) else None
                if posting is None:
                    return bitmaps.zeros(self.n_words)
                out &= posting.dense(self.n_words)
            return out
        raise TypeError(f"operator {type(node).__name__} does not apply to field {node.field!r}")

    def _union(self, vocab: Vocab, postings: list[Posting | None], values: tuple[object, ...]) -> Words:
        dense: list[Words] = []
        sparse: list[NDArray[np.int64]] = []
        for value in values:
            code = vocab.code(value)
            posting = postings[code] if code is not None and code < len(postings) else None
            if posting is None:
                continue
            if posting.words is not None:
                dense.append(posting.words)
            elif posting.positions is not None:
                sparse.append(posting.positions)
        if not dense and len(sparse) == 1:
            return bitmaps.from_positions(sparse[0], self.n_words)
        out = bitmaps.zeros(self.n_words)
        for words in dense:
            out |= words
        if sparse:
            out |= bitmaps.from_positions(np.unique(np.concatenate(sparse)), self.n_words)
        return out

    def _numeric(self, node: Eq | In | Between | HasAny | HasAll, kind: FieldKind) -> Words:
        values = self.nums[node.field]
        if isinstance(node, Between):
            low, high = numeric_bounds(node, kind)
            mask = (values >= low) & (values <= high)
        elif isinstance(node, (Eq, In)):
            mask = np.isin(values, np.array([float(v) for v in numeric_values(node, kind)]))
        else:
            raise TypeError(f"operator {type(node).__name__} does not apply to numeric field {node.field!r}")
        return bitmaps.from_bools(mask)

    def counts(self, words: Words) -> SegmentCounts:
        """Sampled (alive) and matched users per stratum."""
        if self._sampled is None:
            self._sampled = bitmaps.block_counts(self.alive, self.block_starts, self.block_ends)
        matched = bitmaps.block_counts(words, self.block_starts, self.block_ends)
        return SegmentCounts(self.block_strata, self._sampled, matched)

    def horizon_sums(self, words: Words, days: float) -> NDArray[np.float64]:
        """Per block (``block_strata``), over the rows of ``words``: the sums of P(active within
        ``days``), of its square, of the expected impressions per day and of their square.

        Why this shape: the rows are sorted by stratum, so each block's sum is one
        ``reduceat`` pass, where per-stratum ``bincount``s scattered over the strata.
        Impressions are linear in ``days``, so their per-day means are stored once; P(active)
        needs a logarithm and an exponential per row, so once a query at that horizon matches
        an eighth of the rows it is computed for every row and kept for the next queries
        (:data:`_P_ACTIVE_HORIZONS` horizons). Such a broad query then sums over the bitmap
        itself, masked (:meth:`_masked_sums`), instead of listing a position per matched row
        (1M positions took ~6 ms, more than the sums).
        """
        sums = np.zeros((len(self.block_strata), 4))
        matched = bitmaps.count(words)
        if matched == 0:
            return sums
        p_everywhere = self._p_active.get(days)
        if 8 * matched >= len(self.rows):
            if p_everywhere is None:
                if len(self._p_active) >= _P_ACTIVE_HORIZONS:
                    del self._p_active[next(iter(self._p_active))]  # the oldest
                p_everywhere = self._p_active[days] = p_active(self.shape, self.rate, days)
            self._masked_sums(words, (p_everywhere, self.daily_impressions), sums)
            return sums
        pos = bitmaps.to_positions(words)
        p = p_everywhere[pos] if p_everywhere is not None else p_active(self.shape[pos], self.rate[pos], days)
        daily = self.daily_impressions[pos]
        cuts = np.searchsorted(pos, self.block_starts * bitmaps.WORD_BITS)
        filled = cuts < np.append(cuts[1:], len(pos))  # (reduceat cannot sum an empty block)
        starts = cuts[filled]
        for column, values in enumerate((p, p * p, daily, daily * daily)):
            sums[filled, column] = np.add.reduceat(values, starts)
        return sums

    def _masked_sums(
        self, words: Words, values: tuple[NDArray[np.float64], ...], sums: NDArray[np.float64]
    ) -> None:
        """Per block, the sums of each of ``values`` and of its square over the set bits of ``words``
        (columns ``2i`` and ``2i + 1`` of ``sums``).

        Computed a run of whole blocks (~:data:`_CHUNK_BITS` bits) at a time, so the masked
        values stay in the CPU cache between their multiplication and their sums (whole-
        array temporaries made this 1.8 - 2.3x slower on a 1M-row segment). The mask is cast
        to floats once per run, not by each column's multiplication (horizon sums ~7% less).
        """
        if self._chunks is None:
            self._chunks = _block_chunks(self.block_starts * bitmaps.WORD_BITS, len(self.pos_row))
        mask = np.unpackbits(words.view(np.uint8), bitorder="little")
        widest = max(hi - lo for lo, hi, _, _, _ in self._chunks)
        factors, masked, squared = np.empty(widest), np.empty(widest), np.empty(widest)
        for lo, hi, first, last, local_starts in self._chunks:
            part_factors = factors[: hi - lo]
            part_masked, part_squared = masked[: hi - lo], squared[: hi - lo]
            np.copyto(part_factors, mask[lo:hi])  # 0.0 / 1.0, cast once for every column
            for column, array in enumerate(values):
                np.multiply(array[lo:hi], part_factors, out=part_masked)
                sums[first:last, 2 * column] = np.add.reduceat(part_masked, local_starts)
                np.multiply(part_masked, part_masked, out=part_squared)
                sums[first:last, 2 * column + 1] = np.add.reduceat(part_squared, local_starts)


def _block_chunks(
    starts: NDArray[np.int64], n_bits: int
) -> list[tuple[int, int, int, int, NDArray[np.int64]]]:
    """Runs of whole blocks of about :data:`_CHUNK_BITS` bits (a larger block alone):
    (first bit, end bit, first block, end block, the blocks' starts within the run)."""
    ends = np.append(starts[1:], n_bits)
    chunks = []
    first = 0
    while first < len(starts):
        lo = int(starts[first])
        last = max(int(np.searchsorted(ends, lo + _CHUNK_BITS, side="right")), first + 1)
        chunks.append((lo, int(ends[last - 1]), first, last, starts[first:last] - lo))
        first = last
    return chunks
