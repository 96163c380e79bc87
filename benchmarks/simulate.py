"""Simulator throughput: events/s generated and written, per sink, on one core.

Measures, for the same seeded configuration: population build time; generation alone;
generation + Parquet; generation + JSON Lines. The simulator is single-threaded, so the
figures are per core. Target (issue 2): at least 200k events/s writing Parquet.

Usage: ``python benchmarks/simulate.py [--quick]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import print_table, versions, write_results

from streams.simulation import (
    EventBatch,
    EventSink,
    JsonLinesSink,
    ParquetSink,
    SimulationConfig,
    Simulator,
    simulate,
)

TARGET_EVENTS_PER_S = 200_000


class NullSink:
    def write(self, batch: EventBatch) -> None:
        pass

    def close(self) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller run, well under a minute")
    args = parser.parse_args()
    config = (
        SimulationConfig(users=50_000, events=500_000, days=3.0, seed=1)
        if args.quick
        else SimulationConfig(users=200_000, events=3_000_000, days=7.0, seed=1)
    )
    out = Path(tempfile.mkdtemp(prefix="adreach-sim-bench-"))
    rows: list[list[Any]] = []
    results: list[dict[str, Any]] = []
    rates: dict[str, float] = {}
    sinks: list[tuple[str, Callable[[], EventSink]]] = [
        ("generate only", lambda: NullSink()),
        ("generate + Parquet", lambda: ParquetSink(out / "events")),
        ("generate + JSON Lines", lambda: JsonLinesSink(out / "events.jsonl")),
    ]
    for name, make_sink in sinks:
        started = time.perf_counter()
        simulator = Simulator(config)
        build_s = time.perf_counter() - started
        summary = simulate(config, make_sink(), None, simulator=simulator)
        rate = rates[name] = summary.events / summary.seconds
        rows.append([name, summary.events, build_s, summary.seconds, rate])
        results.append(
            {
                "case": name,
                "events": summary.events,
                "population_build": {"value": round(build_s, 3), "unit": "s"},
                "seconds": {"value": round(summary.seconds, 3), "unit": "s"},
                "throughput": {"value": round(rate), "unit": "events/s"},
            }
        )
        print(f"{name}: {summary.events:,} events in {summary.seconds:.1f} s", flush=True)
    print()
    print(
        f"config: {config.users:,} users, ~{config.events:,} events, {config.days} days, "
        f"{config.campaigns} campaigns, seed {config.seed}"
    )
    print_table(["case", "events", "population s", "seconds", "events/s"], rows)
    parquet_rate = rates["generate + Parquet"]
    verdict = "met" if parquet_rate >= TARGET_EVENTS_PER_S else "NOT met"
    print(
        f"\ntarget >= {TARGET_EVENTS_PER_S:,} events/s writing Parquet on one core: "
        f"{verdict} ({parquet_rate:,.0f})"
    )
    path = write_results(
        "simulate",
        {
            "config": {
                "users": config.users,
                "events": config.events,
                "days": config.days,
                "campaigns": config.campaigns,
                "seed": config.seed,
            },
            "target": {"value": TARGET_EVENTS_PER_S, "unit": "events/s writing Parquet"},
            "results": results,
            "versions": versions("numpy", "pyarrow"),
        },
        quick=args.quick,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
