"""The traffic simulator behind ``adreach simulate``: a seeded, vectorized ad world.

``Simulator(config).batches()`` yields arrival-ordered :class:`EventBatch` objects;
:func:`simulate` drives one run into a sink and saves the ground truth.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pyarrow.compute as pc

from streams.simulation.batch import EVENT_SCHEMA, EventBatch
from streams.simulation.config import Shift, SimulationConfig, SimulationConfigError
from streams.simulation.sinks import JsonLinesSink, ParquetSink
from streams.simulation.traffic import Simulator
from streams.simulation.truth import population_table, save_truth

__all__ = [
    "EVENT_SCHEMA",
    "EventBatch",
    "JsonLinesSink",
    "ParquetSink",
    "Shift",
    "SimulationConfig",
    "SimulationConfigError",
    "SimulationSummary",
    "Simulator",
    "population_table",
    "simulate",
]


class EventSink(Protocol):
    def write(self, batch: EventBatch) -> None: ...

    def close(self) -> None: ...


@dataclass
class SimulationSummary:
    events: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    first_event_time: str = ""
    last_event_time: str = ""


def simulate(
    config: SimulationConfig,
    sink: EventSink,
    truth_dir: Path | None,
    progress: Callable[[int], None] | None = None,
    simulator: Simulator | None = None,
) -> SimulationSummary:
    """Run one simulation into ``sink`` (closed at the end) and save the truth to ``truth_dir``.

    Pass an already constructed ``simulator`` to keep population building out of the timing.
    """
    started = time.perf_counter()
    simulator = simulator or Simulator(config)
    counts: Counter[str] = Counter()
    first: int | None = None
    last: int | None = None
    try:
        for batch in simulator.batches():
            sink.write(batch)
            counts.update(batch.counts())
            times = pc.min_max(batch.table.column("event_time").cast("int64"))
            low, high = times["min"].as_py(), times["max"].as_py()
            first = low if first is None else min(first, low)
            last = high if last is None else max(last, high)
            if progress is not None:
                progress(len(batch))
    finally:
        sink.close()
    summary = SimulationSummary(
        events=sum(counts.values()),
        counts=dict(counts),
        seconds=time.perf_counter() - started,
        first_event_time=_iso(first),
        last_event_time=_iso(last),
    )
    if truth_dir is not None:
        save_truth(simulator, truth_dir, summary.counts, (summary.first_event_time, summary.last_event_time))
    return summary


def _iso(ms: int | None) -> str:
    if ms is None:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"
