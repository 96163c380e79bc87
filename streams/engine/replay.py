"""Run the engine's feature logic over recorded events in-process: backfills, parity checks, benchmarks.

The same decoder, lateness rule, router and shard state as ``adreach stream run``, minus
Kafka and the stores: events go through in micro-batches in one process (one shard, one
source partition unless given), and every feature row the engine would have stored comes
back, in order. Writing those rows to the offline store builds the feature history a
point-in-time training set reads, for events recorded before the stream engine ran.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from numpy.typing import NDArray

from features.definitions import FEATURE_GROUPS, FeatureGroup
from streams.engine.decode import EventDecoder
from streams.engine.router import Router
from streams.engine.shard import ShardStates


@dataclass
class ReplayResult:
    """Every feature row emitted per group (in emission order), and what was left out and why."""

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
) -> ReplayResult:
    """Feature rows for JSON ``lines`` processed ``batch_events`` at a time.

    ``partitions`` (one per line) says which source partition each event came from, for
    the per-partition lateness rule; by default all come from one partition, in order.
    """
    decoder = EventDecoder(groups)
    source = np.zeros(len(lines), np.int64) if partitions is None else np.asarray(partitions, np.int64)
    offsets = np.zeros(len(lines), np.int64)
    for partition in np.unique(source):
        mask = source == partition
        offsets[mask] = np.arange(int(mask.sum()))
    result = ReplayResult(features={group.name: [] for group in groups})
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
            for name, rows in changed.items():
                result.features[name].append(rows)
    return result
