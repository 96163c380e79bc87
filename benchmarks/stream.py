"""Stream engine throughput and freshness: Kafka events -> windowed features stored in Feast.

Cases, in one run against one embedded broker:

* ``adreach stream (backlog)``: simulated events already in Kafka; one worker process
  (in-process here, one core) decodes, routes, aggregates all five feature groups and
  stores the changed features online (SQLite, Feast format) and offline; events/s from
  start of consumption to the last stored feature.
* ``quixstreams count (backlog)``: the peer: a 1-minute tumbling-window count per user
  (one feature, RocksDB state) over the same events from the same topic.
* ``freshness``: events produced live at a fixed rate (event time = now); the engine
  samples, for one event in 50, the wall time from its event time to its features being
  stored; p50/p99 reported.

Usage: ``python benchmarks/stream.py [--quick]``. Targets (issue 3): >= 200k events/s
per core, >= 5x quixstreams, freshness p99 < 2 s at 50k events/s.
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
from common import print_table, versions, write_results

from infra.settings import Settings, load_settings
from streams.broker import EmbeddedBroker
from streams.engine.worker import StreamWorker
from streams.producer import EventProducer
from streams.simulation import SimulationConfig, Simulator
from streams.topics import ensure_topics


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _fresh(settings: Settings, name: str) -> Settings:
    run = uuid.uuid4().hex[:6]
    topics = settings.kafka.topics.model_copy(
        update={"events": f"bench.{name}.{run}", "dead_letter": f"bench.{name}.{run}.dlq"}
    )
    kafka = settings.kafka.model_copy(update={"topics": topics})
    stream = settings.stream.model_copy(
        update={"consumer_group": f"bench-{name}-{run}", "repartition_topic": f"bench.{name}.{run}.shuffle"}
    )
    features = settings.features.model_copy(update={"repo_dir": settings.state_dir / f"repo-{name}-{run}"})
    fresh = settings.model_copy(update={"kafka": kafka, "stream": stream, "features": features})
    ensure_topics(fresh)
    return fresh


def _produce(settings: Settings, payloads: list[bytes]) -> None:
    with EventProducer(settings) as producer:
        for payload in payloads:
            producer.send_json(payload)


def bench_engine(settings: Settings, payloads: list[bytes]) -> dict[str, Any]:
    settings = _fresh(settings, "engine")
    _produce(settings, payloads)
    worker = StreamWorker(settings)
    first: list[float] = []
    original = worker._handle

    def timed(messages: list[Any]) -> None:
        if not first:
            first.append(time.perf_counter())
        original(messages)

    worker._handle = timed  # type: ignore[method-assign]
    done: list[float] = []

    def cycle(stats: Any, rows: int) -> None:
        if stats.events >= len(payloads) and rows == 0 and not done:
            done.append(time.perf_counter())

    worker._on_cycle = cycle
    stats = worker.run(idle_exit_s=3.0)
    seconds = (done[0] if done else time.perf_counter()) - first[0]
    return {
        "events": stats.events,
        "seconds": seconds,
        "events_per_s": stats.events / seconds,
        "feature_rows": stats.feature_rows,
    }


def bench_quixstreams(settings: Settings, payloads: list[bytes]) -> dict[str, Any]:
    from datetime import timedelta

    from quixstreams import Application

    settings = _fresh(settings, "quix")
    _produce(settings, payloads)
    app = Application(
        broker_address=settings.bootstrap_servers,
        consumer_group=f"quix-{uuid.uuid4().hex[:6]}",
        auto_offset_reset="earliest",
        state_dir=str(settings.state_dir / f"quix-{uuid.uuid4().hex[:6]}"),
        loglevel="WARNING",
    )
    topic = app.topic(settings.kafka.topics.events, value_deserializer="json", timestamp_extractor=None)
    seen = [0]
    first: list[float] = []

    def count(value: dict[str, Any]) -> None:
        if not first:
            first.append(time.perf_counter())
        seen[0] += 1
        if seen[0] >= len(payloads):
            app.stop()

    sdf = app.dataframe(topic)
    sdf = sdf.update(count)
    sdf.tumbling_window(timedelta(minutes=1)).count().final()
    app.run()
    seconds = time.perf_counter() - first[0]
    return {"events": seen[0], "seconds": seconds, "events_per_s": seen[0] / seconds}


def bench_freshness(settings: Settings, rate: int, seconds: float) -> dict[str, Any]:
    settings = _fresh(settings, "fresh")
    worker = StreamWorker(settings)
    encoder = msgspec.json.Encoder()
    stop = threading.Event()

    def feed() -> None:
        time.sleep(8.0)  # let the worker join its group
        with EventProducer(settings) as producer:
            sent = 0
            start = time.perf_counter()
            while not stop.is_set() and time.perf_counter() - start < seconds:
                due = int((time.perf_counter() - start) * rate)
                now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
                for i in range(sent, due):
                    producer.send_json(
                        encoder.encode(
                            {
                                "type": "impression",
                                "event_id": f"f{i}",
                                "event_time": now,
                                "user_id": f"u{i % 50_000}",
                                "ad_id": f"ad{i % 500}",
                                "campaign_id": f"c{i % 100}",
                                "advertiser_id": f"adv{i % 20}",
                                "cost_micros": 1000,
                            }  # fmt: skip
                        )
                    )
                sent = due
                time.sleep(0.005)
        time.sleep(3.0)
        worker.stop()

    feeder = threading.Thread(target=feed)
    feeder.start()
    stats = worker.run(max_seconds=seconds + 60)
    stop.set()
    feeder.join()
    samples = np.asarray(stats.freshness_ms)
    return {
        "rate_events_per_s": rate,
        "events": stats.events,
        "samples": int(samples.size),
        "p50_ms": float(np.percentile(samples, 50)) if samples.size else None,
        "p99_ms": float(np.percentile(samples, 99)) if samples.size else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smaller run (about a minute or two)")
    args = parser.parse_args()
    events = 60_000 if args.quick else 300_000
    rate, live_s = (10_000, 10.0) if args.quick else (50_000, 20.0)
    state = Path(tempfile.mkdtemp(prefix="adreach-stream-bench-"))
    settings = load_settings(state_dir=state, broker={"port": _free_port()})
    broker = EmbeddedBroker(settings)
    broker.start()
    try:
        simulator = Simulator(SimulationConfig(users=20_000, events=events, days=1.0, seed=5))
        payloads = [line for batch in simulator.batches() for line in batch.to_json_lines()]
        engine = bench_engine(settings, payloads)
        try:
            quix: dict[str, Any] = bench_quixstreams(settings, payloads)
        except Exception as exc:  # the peer failing must not hide our figures; report it
            quix = {"error": f"{type(exc).__name__}: {exc}"}
        fresh = bench_freshness(settings, rate, live_s)
    finally:
        broker.stop()
    ratio = engine["events_per_s"] / quix["events_per_s"] if "events_per_s" in quix else None
    rows = [
        [
            "adreach stream (5 groups, stored)",
            f"{engine['events']:,}",
            f"{engine['events_per_s']:,.0f}",
            "1.00",
        ],
        [
            "quixstreams 1-min count per user",
            f"{quix.get('events', 0):,}",
            f"{quix['events_per_s']:,.0f}" if "events_per_s" in quix else quix.get("error", ""),
            f"{1 / ratio:.2f}" if ratio else "-",
        ],
    ]
    print_table(["case", "events", "events/s", "vs adreach"], rows)
    print(f"adreach / quixstreams: {ratio:.2f}x" if ratio else "quixstreams failed")
    print(
        f"freshness at {fresh['rate_events_per_s']:,} events/s: p50 {fresh['p50_ms']:.0f} ms, "
        f"p99 {fresh['p99_ms']:.0f} ms ({fresh['samples']:,} samples)"
        if fresh["samples"]
        else "freshness: no samples"
    )
    path = write_results(
        "stream",
        {
            "quick": args.quick,
            "engine": {**engine, "unit": "events/s"},
            "quixstreams": quix,
            "ratio_adreach_over_quixstreams": ratio,
            "freshness": {**fresh, "unit": "ms from event time to features stored"},
            "targets": {"events_per_s": 200_000, "ratio": 5.0, "freshness_p99_ms_at_50k": 2_000},
            "versions": versions("duckdb", "pyarrow", "quixstreams", "confluent-kafka"),
        },
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
