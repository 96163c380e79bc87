"""One shard of a reach sample: its users' exact stratum totals and its sampled users.

A shard owns the users whose hash maps to it (:func:`estimation.hashing.shard_of`). It
keeps three things:

* a **directory** of *every* one of its users (sampled or not): hash -> stratum and the
  time of the last profile applied. It is what keeps the per-stratum population totals
  exact under streaming: a deletion event carries no attributes, so without it the
  stratum to decrement would be unknown. Deleted users stay as ``stratum = -1`` with
  their deletion time, so a replayed older profile cannot bring them back;
* the per-stratum **population totals** ``N_h``;
* the **sampled users**, in an immutable main :class:`~estimation.segment.Segment` plus a
  small delta segment for users sampled since the last compaction (rebuilt per update
  batch, O(delta)). Changed and deleted users are tombstoned in the main segment; when
  tombstones or the delta grow past ``compact_fraction`` of the main segment, both are
  merged into a fresh main segment and tombstoned rows are physically dropped.

A shard answers a query with per-stratum sums (:class:`PartialSums`), never an estimate:
the aggregator adds the shards' sums and computes one estimate, so K shards give the same
answer as one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import pyarrow as pa
from numpy.typing import NDArray

from estimation.rows import Rows, Vocab, rows_from_table
from estimation.schema import Schema
from estimation.segment import Segment
from estimation.targeting import Expr

NO_STRATUM = -1


@dataclass
class PartialSums:
    """Per-stratum sums from one shard (or, once added, from all of them).

    ``population`` is ``N_h``, ``sampled`` ``n_h``, ``matched`` the sampled users matching
    the query. With a horizon, ``p_sum``/``p_sq`` are the sum and sum of squares of the
    matched users' probability of being active within the horizon, and ``imp_sum``/
    ``imp_sq`` the same for their expected impressions.
    """

    population: NDArray[np.int64]
    sampled: NDArray[np.int64]
    matched: NDArray[np.int64]
    p_sum: NDArray[np.float64] | None = None
    p_sq: NDArray[np.float64] | None = None
    imp_sum: NDArray[np.float64] | None = None
    imp_sq: NDArray[np.float64] | None = None

    def resized(self, n: int) -> PartialSums:
        """Zero-padded to ``n`` strata (shards learn about new strata at different times)."""
        out: dict[str, NDArray[np.int64] | NDArray[np.float64] | None] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                out[f.name] = None
            else:
                grown = np.zeros(n, dtype=value.dtype)
                grown[: len(value)] = value
                out[f.name] = grown
        return PartialSums(**out)  # type: ignore[arg-type]

    @staticmethod
    def add(parts: list[PartialSums]) -> PartialSums:
        size = max(len(p.population) for p in parts)
        grown = [p.resized(size) for p in parts]
        out: dict[str, NDArray[np.int64] | NDArray[np.float64] | None] = {}
        for f in fields(PartialSums):
            values = [getattr(p, f.name) for p in grown]
            out[f.name] = None if any(v is None for v in values) else np.sum(values, axis=0)
        return PartialSums(**out)  # type: ignore[arg-type]


@dataclass
class ShardUpdate:
    """Profile changes routed to one shard, already stratified by the aggregator.

    ``upserts`` holds the schema's columns for every upserted user (row ``i`` belongs to
    ``upsert_hashes[i]``); ``upsert_sampled`` says which of them belong in the sample.
    """

    n_strata: int
    upsert_hashes: NDArray[np.uint64]
    upsert_strata: NDArray[np.int64]
    upsert_sampled: NDArray[np.bool_]
    upsert_ms: NDArray[np.int64]
    upserts: pa.Table
    delete_hashes: NDArray[np.uint64]
    delete_ms: NDArray[np.int64]


@dataclass
class UpdateStats:
    """What an update batch did (added up over shards)."""

    new_users: int = 0
    changed_users: int = 0
    deleted_users: int = 0
    stale_ignored: int = 0
    unknown_deletes: int = 0
    sample_inserted: int = 0
    sample_removed: int = 0
    compactions: int = 0
    unreadable_values: int = 0
    """Profile attribute values that did not fit their field's kind (stored as null instead)."""

    def __iadd__(self, other: UpdateStats) -> UpdateStats:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def to_json(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class Directory:
    """Every user of a shard: hash -> (stratum, last update ms); ``stratum = -1``: deleted.

    A sorted main part plus a small sorted overlay for users first seen in the stream,
    folded into the main part when it grows, so lookups stay binary searches.
    """

    hashes: NDArray[np.uint64]
    strata: NDArray[np.int64]
    updated: NDArray[np.int64]
    overlay_hashes: NDArray[np.uint64] = field(default_factory=lambda: np.zeros(0, np.uint64))
    overlay_strata: NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    overlay_updated: NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))

    @staticmethod
    def build(hashes: NDArray[np.uint64], strata: NDArray[np.int64], updated: NDArray[np.int64]) -> Directory:
        order = np.argsort(hashes, kind="stable")
        return Directory(hashes[order], strata[order].astype(np.int64), updated[order].astype(np.int64))

    def __len__(self) -> int:
        return len(self.hashes) + len(self.overlay_hashes)

    def lookup(self, hashes: NDArray[np.uint64]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """``(where, index)``: where 0 = main, 1 = overlay, -1 = unknown user."""
        where = np.full(len(hashes), -1, dtype=np.int64)
        index = np.zeros(len(hashes), dtype=np.int64)
        for part, keys in ((0, self.hashes), (1, self.overlay_hashes)):
            if len(keys) == 0:
                continue
            pos = np.clip(np.searchsorted(keys, hashes), 0, len(keys) - 1)
            hit = (keys[pos] == hashes) & (where < 0)
            where[hit] = part
            index[hit] = pos[hit]
        return where, index

    def get(
        self, where: NDArray[np.int64], index: NDArray[np.int64]
    ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        strata = np.full(len(where), NO_STRATUM, dtype=np.int64)
        updated = np.full(len(where), np.iinfo(np.int64).min, dtype=np.int64)
        for part, (s, t) in enumerate(
            ((self.strata, self.updated), (self.overlay_strata, self.overlay_updated))
        ):
            sel = where == part
            strata[sel] = s[index[sel]]
            updated[sel] = t[index[sel]]
        return strata, updated

    def set(
        self,
        where: NDArray[np.int64],
        index: NDArray[np.int64],
        strata: NDArray[np.int64],
        ms: NDArray[np.int64],
    ) -> None:
        for part, (s, t) in enumerate(
            ((self.strata, self.updated), (self.overlay_strata, self.overlay_updated))
        ):
            sel = where == part
            s[index[sel]] = strata[sel]
            t[index[sel]] = ms[sel]

    def add(self, hashes: NDArray[np.uint64], strata: NDArray[np.int64], ms: NDArray[np.int64]) -> None:
        """Add users not in the directory yet (distinct hashes)."""
        if len(hashes) == 0:
            return
        h = np.concatenate([self.overlay_hashes, hashes])
        s = np.concatenate([self.overlay_strata, strata])
        t = np.concatenate([self.overlay_updated, ms])
        order = np.argsort(h, kind="stable")
        self.overlay_hashes, self.overlay_strata, self.overlay_updated = h[order], s[order], t[order]
        if len(self.overlay_hashes) > max(4096, len(self.hashes) // 20):
            merged = Directory.build(
                np.concatenate([self.hashes, self.overlay_hashes]),
                np.concatenate([self.strata, self.overlay_strata]),
                np.concatenate([self.updated, self.overlay_updated]),
            )
            self.hashes, self.strata, self.updated = merged.hashes, merged.strata, merged.updated
            self.overlay_hashes = np.zeros(0, np.uint64)
            self.overlay_strata = np.zeros(0, np.int64)
            self.overlay_updated = np.zeros(0, np.int64)


class Shard:
    """Totals, directory and sampled users of one shard; see the module docstring."""

    def __init__(
        self,
        schema: Schema,
        vocabs: dict[str, Vocab],
        population: NDArray[np.int64],
        directory: Directory,
        rows: Rows,
        *,
        prior: tuple[float, float],
        compact_fraction: float = 0.05,
    ) -> None:
        self.schema = schema
        self.vocabs = vocabs
        self.population = population.astype(np.int64).copy()
        self.directory = directory
        self.prior = prior
        self.compact_fraction = compact_fraction
        self.main = Segment(rows, schema, vocabs)
        self.delta_rows = Rows.empty(schema)
        self.delta: Segment | None = None

    @property
    def n_strata(self) -> int:
        return len(self.population)

    @property
    def sample_size(self) -> int:
        return self.main.live_count + len(self.delta_rows)

    def info(self) -> dict[str, int]:
        directory = self.directory
        directory_bytes = sum(
            a.nbytes
            for a in (
                directory.hashes,
                directory.strata,
                directory.updated,
                directory.overlay_hashes,
                directory.overlay_strata,
                directory.overlay_updated,
            )
        )
        index_bytes = self.main.memory_bytes() + (self.delta.memory_bytes() if self.delta is not None else 0)
        return {
            "index_bytes": index_bytes,
            "directory_bytes": int(directory_bytes),
            "population": int(self.population.sum()),
            "sample_users": self.sample_size,
            "strata": self.n_strata,
            "directory_entries": len(self.directory),
            "delta_rows": len(self.delta_rows),
            "tombstones": len(self.main) - self.main.live_count,
        }

    # -- queries -------------------------------------------------------------------------

    def query(self, expr: Expr, horizon_days: float | None = None) -> PartialSums:
        h = self.n_strata
        sampled = np.zeros(h, dtype=np.int64)
        matched = np.zeros(h, dtype=np.int64)
        horizon = horizon_days is not None
        p_sum = np.zeros(h) if horizon else None
        p_sq = np.zeros(h) if horizon else None
        imp_sum = np.zeros(h) if horizon else None
        imp_sq = np.zeros(h) if horizon else None
        for segment in (self.main, self.delta):
            if segment is None or len(segment) == 0:
                continue
            words = segment.evaluate(expr)
            counts = segment.counts(words)
            sampled[counts.strata] += counts.sampled
            matched[counts.strata] += counts.matched
            if horizon_days is not None:
                assert p_sum is not None and p_sq is not None and imp_sum is not None and imp_sq is not None
                sums = segment.horizon_sums(words, horizon_days)
                strata = segment.block_strata  # (one block per stratum in a segment)
                p_sum[strata] += sums[:, 0]
                p_sq[strata] += sums[:, 1]
                imp_sum[strata] += horizon_days * sums[:, 2]
                imp_sq[strata] += horizon_days * horizon_days * sums[:, 3]
        return PartialSums(self.population.copy(), sampled, matched, p_sum, p_sq, imp_sum, imp_sq)

    # -- updates -------------------------------------------------------------------------

    def apply(self, update: ShardUpdate) -> UpdateStats:
        """Apply upserts then deletions; the latest event time per user wins (snapshots)."""
        stats = UpdateStats()
        if update.n_strata > self.n_strata:
            self.population = np.concatenate(
                [self.population, np.zeros(update.n_strata - self.n_strata, dtype=np.int64)]
            )
        carried: tuple[NDArray[np.uint64], NDArray[np.float64], NDArray[np.float64]] | None = None
        new_rows: Rows | None = None
        gone = np.zeros(0, np.uint64)
        if len(update.upsert_hashes):
            new_rows, carried, gone = self._upserts(update, stats)
        if len(update.delete_hashes):
            deleted = self._deletes(update.delete_hashes, update.delete_ms, stats)
            gone = np.concatenate([gone, deleted])
            if new_rows is not None and len(deleted):  # upserted, then deleted in the same batch
                new_rows = new_rows.take(np.flatnonzero(~np.isin(new_rows.hashes, deleted)))
        stats.sample_removed += self._remove_sampled(gone)
        if new_rows is not None and len(new_rows):
            if carried is not None and len(carried[0]):
                self._carry_activity(new_rows, carried)
            self.delta_rows = Rows.concat([self.delta_rows, new_rows])
            stats.sample_inserted += len(new_rows)
        self._refresh(stats)
        return stats

    def _upserts(
        self, update: ShardUpdate, stats: UpdateStats
    ) -> tuple[Rows, tuple[NDArray[np.uint64], NDArray[np.float64], NDArray[np.float64]], NDArray[np.uint64]]:
        hashes, ms = update.upsert_hashes, update.upsert_ms
        # latest event per user within the batch
        order = np.lexsort((ms, hashes))
        last = np.ones(len(order), dtype=bool)
        last[:-1] = hashes[order][1:] != hashes[order][:-1]
        keep = order[last]
        stats.stale_ignored += len(hashes) - len(keep)
        where, index = self.directory.lookup(hashes[keep])
        old_strata, old_ms = self.directory.get(where, index)
        fresh = ms[keep] >= old_ms
        stats.stale_ignored += int((~fresh).sum())
        keep, where, index, old_strata = keep[fresh], where[fresh], index[fresh], old_strata[fresh]
        new_strata = update.upsert_strata[keep]
        known = where >= 0
        was_alive = known & (old_strata >= 0)
        np.subtract.at(self.population, old_strata[was_alive], 1)
        np.add.at(self.population, new_strata, 1)
        stats.changed_users += int(was_alive.sum())
        stats.new_users += int((~was_alive).sum())
        self.directory.set(where[known], index[known], new_strata[known], ms[keep][known])
        self.directory.add(hashes[keep][~known], new_strata[~known], ms[keep][~known])
        # Every user re-profiled leaves the sample; those sampled in their new stratum re-enter.
        gone = hashes[keep][was_alive]
        carried = self._activity_of(gone)
        sampled = keep[update.upsert_sampled[keep]]
        table = update.upserts.take(pa.array(sampled))
        prior_shape, prior_rate = self.prior
        rows = rows_from_table(
            table,
            self.schema,
            self.vocabs,
            hashes=hashes[sampled],
            strata=update.upsert_strata[sampled],
            updated_ms=ms[sampled],
            act_shape=np.full(len(sampled), prior_shape),
            act_rate=np.full(len(sampled), prior_rate),
        )
        return rows, carried, gone

    def _deletes(
        self, hashes: NDArray[np.uint64], ms: NDArray[np.int64], stats: UpdateStats
    ) -> NDArray[np.uint64]:
        hashes, first = np.unique(hashes, return_index=True)
        ms = ms[first]
        where, index = self.directory.lookup(hashes)
        old_strata, old_ms = self.directory.get(where, index)
        known = where >= 0
        stats.unknown_deletes += int((~known).sum())
        # An unknown user is recorded as deleted so that a late profile cannot resurrect it.
        self.directory.add(hashes[~known], np.full(int((~known).sum()), NO_STRATUM), ms[~known])
        applies = known & (ms >= old_ms)
        stats.stale_ignored += int((known & ~applies).sum())
        was_alive = applies & (old_strata >= 0)
        np.subtract.at(self.population, old_strata[was_alive], 1)
        stats.deleted_users += int(was_alive.sum())
        self.directory.set(
            where[applies], index[applies], np.full(int(applies.sum()), NO_STRATUM), ms[applies]
        )
        return hashes[was_alive]

    def _activity_of(
        self, hashes: NDArray[np.uint64]
    ) -> tuple[NDArray[np.uint64], NDArray[np.float64], NDArray[np.float64]]:
        """Learned activity of users currently sampled (kept when their profile changes)."""
        rows = self.main.find(hashes)
        hit = rows >= 0
        found_h = [hashes[hit]]
        shapes = [self.main.rows.act_shape[rows[hit]]]
        rates = [self.main.rows.act_rate[rows[hit]]]
        if len(self.delta_rows):
            pos = _positions_of(self.delta_rows.hashes, hashes[~hit])
            ok = pos >= 0
            found_h.append(hashes[~hit][ok])
            shapes.append(self.delta_rows.act_shape[pos[ok]])
            rates.append(self.delta_rows.act_rate[pos[ok]])
        return np.concatenate(found_h), np.concatenate(shapes), np.concatenate(rates)

    @staticmethod
    def _carry_activity(
        rows: Rows, carried: tuple[NDArray[np.uint64], NDArray[np.float64], NDArray[np.float64]]
    ) -> None:
        hashes, shapes, rates = carried
        pos = _positions_of(hashes, rows.hashes)
        ok = pos >= 0
        rows.act_shape[ok] = shapes[pos[ok]]
        rows.act_rate[ok] = rates[pos[ok]]

    def _remove_sampled(self, hashes: NDArray[np.uint64]) -> int:
        if len(hashes) == 0:
            return 0
        rows = self.main.find(hashes)
        self.main.kill(rows[rows >= 0])
        removed = int((rows >= 0).sum())
        if len(self.delta_rows):
            in_delta = np.isin(self.delta_rows.hashes, hashes)
            if in_delta.any():
                removed += int(in_delta.sum())
                self.delta_rows = self.delta_rows.take(np.flatnonzero(~in_delta))
        return removed

    def _refresh(self, stats: UpdateStats) -> None:
        limit = max(1024, int(self.compact_fraction * max(len(self.main), 1)))
        tombstones = len(self.main) - self.main.live_count
        if len(self.delta_rows) > limit or tombstones > limit:
            self.compact()
            stats.compactions += 1
        else:
            self.delta = Segment(self.delta_rows, self.schema, self.vocabs) if len(self.delta_rows) else None

    def compact(self) -> None:
        """Merge the delta into the main segment and drop tombstoned rows for good."""
        merged = Rows.concat([self.main.live_rows(), self.delta_rows])
        self.main = Segment(merged, self.schema, self.vocabs)
        self.delta_rows = Rows.empty(self.schema)
        self.delta = None


def _positions_of(haystack: NDArray[np.uint64], needles: NDArray[np.uint64]) -> NDArray[np.int64]:
    """Index of each needle in ``haystack`` (unsorted, distinct values), or -1."""
    if len(haystack) == 0 or len(needles) == 0:
        return np.full(len(needles), -1, dtype=np.int64)
    order = np.argsort(haystack, kind="stable")
    sorted_h = haystack[order]
    pos = np.clip(np.searchsorted(sorted_h, needles), 0, len(sorted_h) - 1)
    return np.where(sorted_h[pos] == needles, order[pos], -1).astype(np.int64)
