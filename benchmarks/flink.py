"""The Flink feature job next to the embedded engine, on the same events in the same run.

Simulated events (with their out-of-order and late events) are produced to a topic of
the embedded broker. The embedded engine (one in-process ``adreach stream run`` worker)
computes all five feature groups into a Feast repo; the topic is then recorded as
per-partition files and the generated Flink job (PyFlink local mini-cluster,
filesystem source, exactly-once checkpoints) computes the same features, which the
writer stores in a second Feast repo. Figures:

* embedded engine events/s (first message read -> last feature stored);
* Flink events/s over the job's run (submission -> final checkpoint, all rows committed)
  plus the Feast write, and the ratio Flink / embedded;
* the JVM start-up (PyFlink gateway + TableEnvironment) separately, and the fixed cost
  of a job on a tiny input (planning, deployment, final checkpoint), so that the
  per-event cost can be told apart from the set-up cost.

The machine is a shared 2-core VM (other engineers' jobs run alongside): figures drift.
Usage: ``python benchmarks/flink.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from common import print_table, versions, write_results
from stream import _free_port, _fresh, _produce

from features.definitions import FEATURE_GROUPS
from infra.settings import Settings, load_settings
from streams.broker import EmbeddedBroker
from streams.engine.worker import StreamStats, StreamWorker
from streams.flink.job import run_job
from streams.flink.replay import record_topic, write_partition
from streams.flink.writer import FileOutputWriter
from streams.simulation import SimulationConfig, Simulator


def bench_embedded(settings: Settings, payloads: list[bytes]) -> dict[str, Any]:
    """One in-process worker over the backlog: first message read -> last feature rows stored."""
    settings = _fresh(settings, "engine")
    _produce(settings, payloads)
    marks: dict[str, float] = {}

    def cycle(stats: StreamStats, rows: int) -> None:
        if rows:
            marks["last_rows"] = time.monotonic()

    worker = StreamWorker(settings, on_cycle=cycle)
    stats = worker.run(idle_exit_s=3.0)
    assert stats.first_message is not None
    seconds = marks["last_rows"] - stats.first_message
    return {
        "events": stats.events,
        "seconds": seconds,
        "events_per_s": stats.events / seconds,
        "feature_rows": stats.feature_rows,
        "late": stats.late,
    }


def _flink_settings(settings: Settings, input_dir: Path, name: str, parallelism: int) -> Settings:
    flink = settings.flink.model_copy(
        update={
            "source": "files",
            "sink": "files",
            "input_dir": input_dir,
            "output_dir": settings.state_dir / f"flink-out-{name}",
            "parallelism": parallelism,
            "checkpoint_interval_s": 2.0,
        }
    )
    features = settings.features.model_copy(update={"repo_dir": settings.state_dir / f"repo-flink-{name}"})
    return settings.model_copy(
        update={"flink": flink, "features": features, "state_dir": settings.state_dir / f"flink-{name}"}
    )


def bench_flink(
    settings: Settings, input_dir: Path, events: int, name: str, parallelism: int
) -> dict[str, Any]:
    settings = _flink_settings(settings, input_dir, name, parallelism)
    run = run_job(settings)
    started = time.perf_counter()
    writer = FileOutputWriter(settings)
    try:
        rows = writer.apply_new()
    finally:
        writer.close()
    write_s = time.perf_counter() - started
    seconds = run.execute_s + write_s
    return {
        "events": events,
        "parallelism": parallelism,
        "jvm_start_s": run.jvm_start_s,
        "plan_submit_s": run.plan_s,
        "execute_s": run.execute_s,
        "feast_write_s": write_s,
        "seconds": seconds,
        "events_per_s": events / seconds,
        "end_to_end_s": run.jvm_start_s + run.run_s + write_s,
        "feature_rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smaller run (a few minutes with the JVM)")
    args = parser.parse_args()
    events = 10_000 if args.quick else 100_000
    users = 2_000 if args.quick else 10_000
    state = Path(tempfile.mkdtemp(prefix="adreach-flink-bench-"))
    settings = load_settings(state_dir=state, broker={"port": _free_port()})
    broker = EmbeddedBroker(settings)
    broker.start()
    try:
        simulator = Simulator(SimulationConfig(users=users, events=events, days=1.0, seed=5))
        payloads = [line for batch in simulator.batches() for line in batch.to_json_lines()]
        topic_settings = _fresh(settings, "flink")
        _produce(topic_settings, payloads)
        recorded = state / "recorded"
        record_topic(topic_settings, recorded)
        engine = bench_embedded(settings, payloads)
        tiny_dir = state / "tiny"
        write_partition(tiny_dir, 0, payloads[:200])
        tiny = bench_flink(settings, tiny_dir, 200, "tiny", 2)
        flink = bench_flink(settings, recorded, len(payloads), "full", 2)
    finally:
        broker.stop()

    ratio = flink["events_per_s"] / engine["events_per_s"]
    net_s = max(flink["seconds"] - tiny["seconds"], 1e-9)
    net_rate = flink["events"] / net_s
    rows = [
        [
            "embedded engine: adreach stream run, 1 worker",
            engine["events"],
            engine["seconds"],
            engine["events_per_s"],
        ],
        [
            "Flink job (mini-cluster, p=2): execution + Feast write",
            flink["events"],
            flink["seconds"],
            flink["events_per_s"],
        ],
        [
            "Flink fixed execution cost: same job on 200 events",
            tiny["events"],
            tiny["seconds"],
            tiny["events_per_s"],
        ],
        ["Flink net of the fixed execution cost", flink["events"], net_s, net_rate],
        ["Flink JVM start-up (PyFlink gateway), once", "", tiny["jvm_start_s"], ""],
        ["Flink planning + submission (Calcite, codegen), per job", "", flink["plan_submit_s"], ""],
    ]
    print_table(["case", "events", "seconds", "events/s"], rows)
    print(
        f"\nratio Flink / embedded events/s: {ratio:.3f}; net of Flink's fixed execution cost: "
        f"{net_rate / engine['events_per_s']:.3f}"
    )
    print("machine: shared 2-core VM with other jobs running; figures vary between runs")
    path = write_results(
        "flink",
        {
            "events": len(payloads),
            "feature_groups": len(FEATURE_GROUPS),
            "embedded": {**engine, "unit": "events/s"},
            "flink": {**flink, "unit": "events/s"},
            "flink_tiny_job": {**tiny, "unit": "events/s"},
            "ratio_flink_over_embedded": ratio,
            "flink_net_events_per_s": net_rate,
            "jvm_start_s": {"value": tiny["jvm_start_s"], "unit": "s"},
            "versions": versions("apache-flink", "duckdb", "pyarrow", "feast"),
            "note": "shared 2-core VM; Flink source = recorded per-partition files of the same topic",
        },
        quick=args.quick,
    )
    print(json.dumps({"results": str(path)}))


if __name__ == "__main__":
    main()
