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
from streams.engine.shard import ShardState


@dataclass
class ReplayResult:
    """Every feature row emitted per group (in emission order), and what was left out and why."""

    features: dict[str, list[pa.Table]] = field(default_factory=dict)
    events: int = 0
    rejected: int = 0
    late: int = 0

    def table(self, group: str) -> pa.Table:
        return pa.concat_tables(self.features[group]) if self.features.get(group) else pa.table({})


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
    router = Router(1, allowed_lateness_ms, groups)
    source = np.zeros(len(lines), np.int64) if partitions is None else np.asarray(partitions, np.int64)
    offsets = np.zeros(len(lines), np.int64)
    for partition in np.unique(source):
        mask = source == partition
        offsets[mask] = np.arange(int(mask.sum()))
    result = ReplayResult(features={group.name: [] for group in groups})
    watermarks: dict[int, int] = {}
    with tempfile.TemporaryDirectory(prefix="adreach-replay-") as scratch:
        state = ShardState(Path(scratch) / "shard.npz", 0, groups, checkpoint_interval_s=float("inf"))
        for start in range(0, len(lines), batch_events):
            chunk = lines[start : start + batch_events]
            decoded = decoder.decode(chunk)
            positions = start + decoded.positions
            routed = router.route(decoded.events, source[positions], offsets[positions], watermarks)
            watermarks = routed.watermarks
            result.rejected += len(decoded.rejected)
            result.late += len(routed.late)
            result.events += len(chunk)
            for shipped in routed.shards.values():
                for name, rows in state.apply(shipped, start + len(chunk)).items():
                    result.features[name].append(rows)
    return result
