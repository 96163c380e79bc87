"""Run the engine's feature logic over recorded events in-process: backfills, parity checks, benchmarks.

The same decoder, lateness rule, router and shard state as ``adreach stream run``, minus
Kafka and the stores: events go through in micro-batches in one process (one shard, one
source partition unless given), and every feature row the engine would have stored comes
back, in order. Writing those rows to the offline store builds the feature history a
point-in-time training set reads, for events recorded before the stream engine ran.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray

from features.definitions import FEATURE_GROUPS, FeatureGroup
from streams.engine.decode import EventDecoder
from streams.engine.router import Router
from streams.engine.shard import ShardStates


class EmittedRows:
    """Feature rows in emission order, minus those a later user deletion took back.

    A deleted user's rows emitted before the deletion are what the live worker deletes
    from the stores; the rows a fold returns together with a deletion are already the
    user's fresh ones (see :meth:`streams.engine.shard.ShardStates.take_deleted`).
    """

    def __init__(self, groups: Sequence[FeatureGroup]) -> None:
        self._keys = {group.name: group.key for group in groups}
        self._tables: dict[str, list[pa.Table]] = {group.name: [] for group in groups}
        self._cuts: dict[str, dict[str, int]] = {group.name: {} for group in groups}

    def add(self, changed: Mapping[str, pa.Table], deleted: Mapping[str, Sequence[tuple[str, int]]]) -> None:
        """One fold's output: its deletions apply to the rows added before."""
        for name, users in deleted.items():
            for key, _ in users:
                self._cuts[name][key] = len(self._tables[name])
        for name, rows in changed.items():
            self._tables[name].append(rows)

    def tables(self, name: str) -> list[pa.Table]:
        """Group ``name``'s rows, one table per fold that changed any, deleted users' old rows left out."""
        tables, cuts = self._tables[name], self._cuts[name]
        if not cuts:
            return list(tables)
        deleted = pa.array(list(cuts), pa.string())
        cut_at = np.asarray(list(cuts.values()), np.int64)
        kept = []
        for position, rows in enumerate(tables):
            index = pc.index_in(rows.column(self._keys[name]), value_set=deleted).fill_null(-1).to_numpy()
            index = np.asarray(index, np.int64)
            taken_back = (index >= 0) & (position < cut_at[np.maximum(index, 0)])
            kept.append(rows.filter(pa.array(~taken_back)) if taken_back.any() else rows)
        return kept


@dataclass
class ReplayResult:
    """Every feature row emitted per group (in emission order; deleted users' rows from before
    their deletion left out), and what was left out and why."""

    features: dict[str, list[pa.Table]] = field(default_factory=dict)
    events: int = 0
    rejected: int = 0
    late: int = 0

    def table(self, group: str) -> pa.Table:
        return pa.concat_tables(self.features[group]) if self.features.get(group) else pa.table({})


class InProcessEngine:
    """The router and one shard's state in this process: a worker's feature logic minus Kafka and stores.

    The one place where replays (benchmarks, parity tests, backfills) drive the engine,
    so they can only differ from ``adreach stream run`` in how events are batched.
    """

    def __init__(self, groups: Sequence[FeatureGroup], allowed_lateness_ms: int) -> None:
        self._router = Router(1, allowed_lateness_ms, groups)
        self._scratch = tempfile.TemporaryDirectory(prefix="adreach-replay-")
        self._state = ShardStates(Path(self._scratch.name), 1, groups, checkpoint_interval_s=float("inf"))
        self._state.open(0)
        self._watermarks: dict[int, int] = {}

    def fold(
        self, events: pa.Table, partitions: NDArray[Any], offsets: NDArray[Any], next_offset: int
    ) -> tuple[dict[str, pa.Table], int]:
        """Route decoded ``events`` (read at ``partitions``/``offsets``) and fold them into the state.

        Returns the changed entities' feature rows per group and how many events were too late.
        """
        routed = self._router.route(events, partitions, offsets, self._watermarks)
        self._watermarks = routed.watermarks
        return self._state.apply(routed.shards, {0: next_offset}), len(routed.late)

    def take_deleted(self) -> dict[str, list[tuple[str, int]]]:
        """Per group, the users deleted by the folds since the last call (see ShardStates.take_deleted)."""
        return self._state.take_deleted()

    def close(self) -> None:
        self._state.close_all()
        self._scratch.cleanup()

    def __enter__(self) -> InProcessEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def replay(
    lines: Sequence[bytes],
    *,
    groups: Sequence[FeatureGroup] = FEATURE_GROUPS,
    batch_events: int = 20_000,
    allowed_lateness_ms: int = 3_600_000,
    partitions: NDArray[Any] | None = None,
    compiled_decode: bool = True,
) -> ReplayResult:
    """Feature rows for JSON ``lines`` processed ``batch_events`` at a time.

    ``partitions`` (one per line) says which source partition each event came from, for
    the per-partition lateness rule; by default all come from one partition, in order.
    ``compiled_decode``: as the setting ``stream.compiled_decode`` (false: msgspec only).
    """
    decoder = EventDecoder(groups, fast=compiled_decode)
    source = np.zeros(len(lines), np.int64) if partitions is None else np.asarray(partitions, np.int64)
    offsets = np.zeros(len(lines), np.int64)
    for partition in np.unique(source):
        mask = source == partition
        offsets[mask] = np.arange(int(mask.sum()))
    result = ReplayResult(features={group.name: [] for group in groups})
    emitted = EmittedRows(groups)
    with InProcessEngine(groups, allowed_lateness_ms) as engine:
        for start in range(0, len(lines), batch_events):
            chunk = lines[start : start + batch_events]
            decoded = decoder.decode(chunk)
            positions = start + decoded.positions
            changed, late = engine.fold(
                decoded.events, source[positions], offsets[positions], start + len(chunk)
            )
            result.rejected += len(decoded.rejected)
            result.late += late
            result.events += len(chunk)
            emitted.add(changed, engine.take_deleted())
    result.features = {group.name: emitted.tables(group.name) for group in groups}
    return result
