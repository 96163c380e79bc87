"""Stream engine throughput and freshness: Kafka events -> windowed features stored in Feast.

Cases, in one run against one embedded broker:

* ``engine core``: the engine's own work on one core, without Kafka or stores: JSON
  decoding, lateness and routing, and all five groups' windowed state and feature rows
  (what a stream processor's operator does), over the events as micro-batches.
* ``engine core, msgspec decode (baseline)``: the same with ``stream.compiled_decode``
  off (every message decoded by msgspec, as before the compiled reader).
* ``adreach stream (backlog)``: simulated events already in Kafka; one worker (in-process,
  one core) decodes, routes through the repartition topic, aggregates all five feature
  groups and stores the changed features online (Redis, the production store, and
  SQLite, the embedded default; Feast's own formats) and offline; events/s from the first
  message to the last stored feature. The Redis case runs three times (once with
  ``--quick``) and reports the run with the median CPU per event, and each run's figure.
* ``... msgspec decode (baseline)``: the Redis case again with ``stream.compiled_decode``
  off (every message decoded by msgspec, as before the compiled reader): the reader's
  gain measured in the same run, on the same VM phase.
* ``... Arrow-encoded writes (baseline)``: the Redis case again with
  ``features.compiled_redis_writer`` off (Redis commands built by the Arrow encoders, as
  before the compiled writer, ``features/_resp.c``): the writer's gain, same run.
* ``confluent-kafka consume only (backlog)``: the floor under any stream processor built on
  confluent-kafka: the same events read with the worker's consumer settings and the
  per-message calls the worker makes, and nothing else (CPU per event).
* ``quixstreams count (backlog)``: the peer: a 1-minute tumbling-window count per user
  (one feature, RocksDB state) over the same events from the same topic.
* ``freshness``: events produced live at fixed rates (a sweep) by a separate process
  (event time = now, every event a different user of 50,000: the worst case for the
  online writes), stored in Redis; the engine samples, for one event in 50, the wall time
  from its event time to its features being stored; p50/p99 reported per rate, over the
  whole run (the target's reading) and after warm-up (without the first quarter of the
  samples: the first seconds write every user in full). The feeder is a lean load
  generator (templated JSON, the SDK's librdkafka settings and keys, no per-event
  validation), as it shares the two cores with the broker, Redis and the engine; like a
  long-lived producer it is connected before the rate starts (its first event, delivered
  first, takes about a second: a new producer's connection and id). Each run also reports
  the CPU seconds the engine, the broker, Redis and the feeder used while the feeder sent:
  they share the machine's cores, and when together they need more, the backlog that
  builds up, not the engine's cycle, sets the freshness.

"Per core": the end-to-end cases also report the CPU time the engine process used
(all its threads, librdkafka's included) and, for Redis, the Redis server's, per event;
quixstreams' process CPU is measured the same way (its RocksDB and librdkafka threads
included), so the two can also be compared per CPU-second, which a busy machine moves
less than wall-clock rates.
On this machine the broker, Redis and the engine share two cores, so wall-clock
events/s understate what one engine core does when the broker and the store run
elsewhere, as they do in production.

Usage: ``python benchmarks/stream.py [--quick]``. Targets (issue 3): >= 200k events/s
per core, >= 5x quixstreams, freshness p99 < 2 s at 50k events/s.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from common import print_table, versions, write_results

from features.online import COMPILED_RESP_AVAILABLE, parse_redis_connection
from infra.settings import Settings, load_settings
from streams.broker import EmbeddedBroker
from streams.engine.collector import collected_after, startup_heap_frozen
from streams.engine.decode import FAST_DECODE_AVAILABLE
from streams.engine.replay import replay
from streams.engine.worker import StreamWorker, stream_consumer_config
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


def bench_core(payloads: list[bytes], batch: int, compiled_decode: bool = True) -> dict[str, Any]:
    """Decode + route + windowed state for all groups, in-process, one shard, no Kafka or stores."""
    started = time.perf_counter()
    result = replay(payloads, batch_events=batch, compiled_decode=compiled_decode)
    seconds = time.perf_counter() - started
    rows = sum(t.num_rows for tables in result.features.values() for t in tables)
    return {
        "events": len(payloads),
        "seconds": seconds,
        "events_per_s": len(payloads) / seconds,
        "feature_rows": rows,
    }


def _redis(settings: Settings) -> Any:
    """A client of the Redis server the settings' online store uses (its whole connection string)."""
    import redis

    return redis.Redis(**parse_redis_connection(settings.features.redis_connection))


def _redis_cpu_s(settings: Settings) -> float | None:
    """CPU seconds the Redis server has used so far (its INFO), or None if unreachable."""
    import redis

    try:
        info: Any = _redis(settings).info("cpu")
    except redis.RedisError:
        return None
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _drop_redis_project(settings: Settings) -> None:
    """Delete a benchmark project's keys from the shared Redis server (each run uses a new project)."""
    client = _redis(settings)
    keys: list[bytes] = []
    for key in client.scan_iter(match=b"*" + settings.features.project.encode(), count=10_000):
        keys.append(key)
        if len(keys) >= 10_000:
            client.unlink(*keys)
            keys.clear()
    if keys:
        client.unlink(*keys)


def bench_engine(settings: Settings, payloads: list[bytes], online_store: str) -> dict[str, Any]:
    settings = _fresh(settings, f"engine-{online_store}")
    features = settings.features.model_copy(
        update={"online_store": online_store, "project": f"bench_{uuid.uuid4().hex[:8]}"}
    )
    settings = settings.model_copy(update={"features": features})
    _produce(settings, payloads)
    done: list[float] = []
    # CPU readings at the cycle before the first events and when all are stored
    cpu: dict[str, dict[str, float | None]] = {}

    def cycle(stats: Any, rows: int) -> None:
        reading = _cpu_readings(settings, redis=online_store == "redis")
        if stats.events == 0:
            cpu["start"] = reading
        elif stats.events >= len(payloads) and rows == 0 and not done:
            done.append(time.monotonic())
            cpu["end"] = reading

    worker = StreamWorker(settings, on_cycle=cycle)
    stats = worker.run(idle_exit_s=3.0)
    if online_store == "redis":
        _drop_redis_project(settings)
    assert stats.first_message is not None
    seconds = (done[0] if done else time.monotonic()) - stats.first_message
    result: dict[str, Any] = {
        "online_store": online_store,
        "events": stats.events,
        "seconds": seconds,
        "events_per_s": stats.events / seconds,
        "feature_rows": stats.feature_rows,
    }
    if "start" in cpu and "end" in cpu:
        used = _cpu_used(cpu["start"], cpu["end"])
        engine_cpu = used["engine"]
        assert engine_cpu is not None  # (this process's own CPU is always readable)
        result["engine_cpu_us_per_event"] = engine_cpu / stats.events * 1e6
        result["events_per_engine_cpu_s"] = stats.events / engine_cpu
        redis_cpu = used["redis"]
        if redis_cpu is not None:
            result["redis_server_cpu_us_per_event"] = redis_cpu / stats.events * 1e6
    return result


def bench_engine_median(
    settings: Settings, payloads: list[bytes], online_store: str, runs: int
) -> dict[str, Any]:
    """:func:`bench_engine` ``runs`` times: the run with the median engine CPU per event, with every
    run's figure (``engine_cpu_us_per_event_runs``).

    Why: one 300k-event backlog is drained in a cycle or two, and on the shared VM the same
    code measured 5.5 and 6.2 µs per event in two runs minutes apart; a median of three
    is the figure the target is judged on, and all three are reported.
    """
    results = [bench_engine(settings, payloads, online_store) for _ in range(runs)]
    measured = sorted(
        (r for r in results if "engine_cpu_us_per_event" in r), key=lambda r: r["engine_cpu_us_per_event"]
    )
    if not measured:
        return results[0]
    median = dict(measured[len(measured) // 2])
    median["engine_cpu_us_per_event_runs"] = [r["engine_cpu_us_per_event"] for r in measured]
    return median


def _cpu_gain(baseline: dict[str, Any], engine: dict[str, Any]) -> float | None:
    """``baseline``'s engine CPU per event over ``engine``'s (None where either was not measured)."""
    key = "engine_cpu_us_per_event"
    return baseline[key] / engine[key] if key in baseline and key in engine else None


def _rates(events: int, seconds: float, cpu_s: float) -> dict[str, Any]:
    """The figures of a backlog case: events/s by wall clock and CPU per event (process CPU)."""
    return {
        "events": events,
        "seconds": seconds,
        "events_per_s": events / seconds,
        "cpu_us_per_event": cpu_s / events * 1e6,
        "events_per_cpu_s": events / cpu_s,
    }


def bench_consume_only(settings: Settings, payloads: list[bytes]) -> dict[str, Any]:
    """The floor under any confluent-kafka stream processor: read the events and do nothing else.

    A consumer with the worker's settings reads the events and calls the accessors the
    worker calls per message (error, topic, value, partition, offset), with the worker's
    collector policy (the start-up heap frozen: without it this floor measured 3.3 - 4.0
    µs per event instead of 2.1 - 2.5; collections after each read, see
    ``streams.engine.collector.collected_after``); process CPU (the Kafka client's threads included)
    and wall time from the assignment to the last message. Partitions are assigned, not
    joined as a group, so no group join is timed.
    """
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    settings = _fresh(settings, "consume")
    _produce(settings, payloads)
    topic = settings.kafka.topics.events
    consumer = Consumer(stream_consumer_config(settings))
    read = 0
    try:
        with startup_heap_frozen():
            partitions = consumer.list_topics(topic, timeout=30).topics[topic].partitions
            start = (time.perf_counter(), time.process_time())
            consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
            deadline = time.monotonic() + 120
            while read < len(payloads) and time.monotonic() < deadline:
                with collected_after():
                    for message in consumer.consume(settings.stream.batch_max_events, 0.1):
                        if message.error() is not None:  # (end-of-partition events are off: none expected)
                            continue
                        # the calls the worker makes per message:
                        message.topic(), message.value(), message.partition(), message.offset()
                        read += 1
            end = (time.perf_counter(), time.process_time())
    finally:
        consumer.close()
    if read < len(payloads):
        raise RuntimeError(f"read {read} of {len(payloads)} events within 120 s")
    return _rates(read, end[0] - start[0], end[1] - start[1])


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
    marks: list[tuple[float, float]] = []  # (wall, process CPU) at the first and the last event

    def count(value: dict[str, Any]) -> None:
        if not marks:
            marks.append((time.perf_counter(), time.process_time()))
        seen[0] += 1
        if seen[0] >= len(payloads):
            marks.append((time.perf_counter(), time.process_time()))
            app.stop()

    sdf = app.dataframe(topic)
    sdf = sdf.update(count)
    sdf.tumbling_window(timedelta(minutes=1)).count().final()
    app.run()
    if len(marks) < 2:
        marks.append((time.perf_counter(), time.process_time()))
    return _rates(seen[0], marks[-1][0] - marks[0][0], marks[-1][1] - marks[0][1])


def _feed(settings: Settings, rate: int, seconds: float, delay_s: float, window: _TrafficWindow) -> None:
    """Produce impressions at ``rate`` per second with event time = now (runs in its own process).

    A lean load generator: the JSON is formatted from a template and sent with the SDK's
    librdkafka configuration, keyed and timestamped as the SDK does, without the SDK's
    per-event validation (these events are valid by construction). Producers run on
    their own machines in production; here the feeder shares two cores with the broker,
    Redis and the engine, so every microsecond it spends is taken from what is measured.
    ``window`` is told when the rate starts and ends, and the CPU the feeder used meanwhile.
    """
    from confluent_kafka import Producer

    from streams.producer import producer_config

    template = (
        b'{"type":"impression","event_id":"f%d","event_time":"%s","user_id":"u%d","ad_id":"ad%d",'
        b'"campaign_id":"c%d","advertiser_id":"adv%d","cost_micros":1000}'
    )
    topic = settings.kafka.topics.events
    time.sleep(delay_s)  # let the worker join its group
    producer = Producer(producer_config(settings))
    # A long-lived producer is connected, has its producer id and knows the topic; this
    # one gets there with its first event (about a second here), before the rate starts.
    first = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z").encode()
    producer.produce(topic, template % (-1, first, 0, 0, 0, 0), b"u0")
    if producer.flush(30.0):
        raise RuntimeError("the feeder could not deliver its first event")
    sent = 0
    cpu_start = time.process_time()
    window.started.set()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        due = int((time.perf_counter() - start) * rate)
        now = datetime.now(UTC)
        stamp = now.isoformat(timespec="milliseconds").replace("+00:00", "Z").encode()
        now_ms = int(now.timestamp() * 1000)
        for i in range(sent, due):
            user = i % 50_000
            payload = template % (i, stamp, user, i % 500, i % 100, i % 20)
            while True:
                try:
                    producer.produce(topic, payload, b"u%d" % user, timestamp=now_ms)
                    break
                except BufferError:
                    producer.poll(0.05)
        sent = due
        producer.poll(0)
        time.sleep(0.002)
    if producer.flush(30.0):
        raise RuntimeError("the feeder's events were not all delivered")
    window.feeder_cpu_s.value = time.process_time() - cpu_start
    window.ended.set()


@dataclass
class _TrafficWindow:
    """Signals from the feeder's process: its rate started, it ended, its CPU meanwhile."""

    started: Any  # multiprocessing Events and a Value("d") of the spawn context
    ended: Any
    feeder_cpu_s: Any

    @classmethod
    def new(cls, context: Any) -> _TrafficWindow:
        return cls(context.Event(), context.Event(), context.Value("d", 0.0))


def _process_cpu_s(pid: int | None) -> float | None:
    """CPU seconds process ``pid`` has used so far (user + system, from /proc), or None if unreadable."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_freshness(
    settings: Settings, rate: int, seconds: float, broker_pid: int | None = None
) -> dict[str, Any]:
    """Freshness at ``rate`` events/s, and the CPU each process used while the traffic ran.

    Why the CPU: the feeder, the broker (``broker_pid``), Redis and the engine share two
    cores here, and once they need more than that, the backlog, not the engine's cycle,
    sets the freshness; the CPU-seconds over the traffic's seconds say how close to that
    the run was.
    """
    settings = _fresh(settings, "fresh")
    features = settings.features.model_copy(
        update={"online_store": "redis", "project": f"bench_{uuid.uuid4().hex[:8]}"}
    )
    stream = settings.stream.model_copy(update={"flush_interval_ms": 200, "batch_timeout_ms": 20})
    settings = settings.model_copy(update={"features": features, "stream": stream})
    worker = StreamWorker(settings)
    context = multiprocessing.get_context("spawn")
    window = _TrafficWindow.new(context)
    feeder = context.Process(target=_feed, args=(settings, rate, seconds, 8.0, window))
    feeder.start()
    readings: dict[str, Any] = {}

    def read_cpu_around_traffic() -> None:
        if window.started.wait(120.0):
            readings["start"] = (time.perf_counter(), _cpu_readings(settings, broker_pid))
            if window.ended.wait(seconds + 120.0):
                readings["end"] = (time.perf_counter(), _cpu_readings(settings, broker_pid))

    def stop_after_feeder() -> None:
        feeder.join()
        time.sleep(3.0)  # the last events' features get stored
        worker.stop()

    stopper = threading.Thread(target=stop_after_feeder)
    reader = threading.Thread(target=read_cpu_around_traffic, daemon=True)
    stopper.start()
    reader.start()
    stats = worker.run(max_seconds=seconds + 60)
    stopper.join()
    reader.join(timeout=5.0)
    _drop_redis_project(settings)
    traffic: dict[str, Any] = {}
    if "start" in readings and "end" in readings:
        (t0, before), (t1, after) = readings["start"], readings["end"]
        traffic = {
            "traffic_s": t1 - t0,
            "cpu_s": {**_cpu_used(before, after), "feeder": float(window.feeder_cpu_s.value)},
        }
    samples = np.asarray(stats.freshness_ms)  # in the order the cycles stored them
    steady = samples[len(samples) // 4 :]
    return {
        "rate_events_per_s": rate,
        "events": stats.events,
        "samples": int(samples.size),
        "p50_ms": float(np.percentile(samples, 50)) if samples.size else None,
        "p99_ms": float(np.percentile(samples, 99)) if samples.size else None,
        "steady_p50_ms": float(np.percentile(steady, 50)) if steady.size else None,
        "steady_p99_ms": float(np.percentile(steady, 99)) if steady.size else None,
        **traffic,
    }


def _cpu_readings(
    settings: Settings, broker_pid: int | None = None, *, redis: bool = True
) -> dict[str, float | None]:
    """CPU seconds so far: this process (the engine, all its threads), the broker, Redis.

    None where not read: no ``broker_pid``, or ``redis`` False (a case storing elsewhere).
    """
    return {
        "engine": time.process_time(),
        "broker": _process_cpu_s(broker_pid),
        "redis": _redis_cpu_s(settings) if redis else None,
    }


def _cpu_used(before: dict[str, float | None], after: dict[str, float | None]) -> dict[str, float | None]:
    used: dict[str, float | None] = {}
    for name, start in before.items():
        end = after[name]
        used[name] = None if start is None or end is None else end - start
    return used


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smaller run (about a minute or two)")
    parser.add_argument(
        "--rate", type=int, action="append", help="live events/s for the freshness case (repeatable)"
    )
    args = parser.parse_args()
    events = 60_000 if args.quick else 300_000
    rates, live_s = ([2_000, 5_000, 10_000], 10.0) if args.quick else ([5_000, 10_000, 20_000, 50_000], 20.0)
    rates = args.rate or rates
    state = Path(tempfile.mkdtemp(prefix="adreach-stream-bench-"))
    settings = load_settings(state_dir=state, broker={"port": _free_port()})
    broker = EmbeddedBroker(settings)
    broker.start()
    try:
        simulator = Simulator(SimulationConfig(users=20_000, events=events, days=1.0, seed=5))
        payloads = [line for batch in simulator.batches() for line in batch.to_json_lines()]
        core = bench_core(payloads, settings.stream.batch_max_events)
        core_msgspec = bench_core(payloads, settings.stream.batch_max_events, compiled_decode=False)
        engines = [
            bench_engine_median(settings, payloads, "redis", runs=1 if args.quick else 3),
            bench_engine(settings, payloads, "sqlite"),
        ]
        msgspec_only = settings.stream.model_copy(update={"compiled_decode": False})
        baseline = bench_engine(settings.model_copy(update={"stream": msgspec_only}), payloads, "redis")
        baseline["online_store"] = "redis, msgspec decode (baseline)"
        arrow_only = settings.features.model_copy(update={"compiled_redis_writer": False})
        arrow_baseline = bench_engine(settings.model_copy(update={"features": arrow_only}), payloads, "redis")
        arrow_baseline["online_store"] = "redis, Arrow-encoded writes (baseline)"
        consume = bench_consume_only(settings, payloads)
        try:
            quix: dict[str, Any] = bench_quixstreams(settings, payloads)
        except Exception as exc:  # the peer failing must not hide our figures; report it
            quix = {"error": f"{type(exc).__name__}: {exc}"}
        fresh = [bench_freshness(settings, rate, live_s, broker.status().pid) for rate in rates]
    finally:
        broker.stop()
    quix_rate = quix.get("events_per_s")
    rows: list[tuple[str, dict[str, Any]]] = [
        ("engine core (decode, route, 5 groups' state; no Kafka/stores)", core),
        ("engine core, msgspec decode (baseline)", core_msgspec),
        *[(f"adreach stream, Kafka -> features in {e['online_store']} + offline", e) for e in engines],
        ("adreach stream, Kafka -> redis + offline, msgspec decode (baseline)", baseline),
        ("adreach stream, Kafka -> redis + offline, Arrow-encoded writes (baseline)", arrow_baseline),
    ]
    table = [
        [
            name,
            f"{r['events']:,}",
            f"{r['events_per_s']:,.0f}",
            f"{r['events_per_s'] / quix_rate:.2f}x" if quix_rate else "-",
        ]
        for name, r in rows
    ]
    table.append(
        [
            "quixstreams 1-min count per user (peer)",
            f"{quix.get('events', 0):,}",
            f"{quix_rate:,.0f}" if quix_rate else quix.get("error", ""),
            "1.00x" if quix_rate else "-",
        ]
    )
    print_table(["case (one core)", "events", "events/s", "vs quixstreams"], table)
    print()
    quix_per_cpu = quix.get("events_per_cpu_s")
    print_table(
        ["end to end: CPU per event", "µs", "events per CPU-s", "vs quixstreams", "Redis server µs"],
        [
            *[
                [
                    e["online_store"],
                    f"{e['engine_cpu_us_per_event']:.1f}" if "engine_cpu_us_per_event" in e else "-",
                    f"{e['events_per_engine_cpu_s']:,.0f}" if "events_per_engine_cpu_s" in e else "-",
                    f"{e['events_per_engine_cpu_s'] / quix_per_cpu:.2f}x"
                    if quix_per_cpu and "events_per_engine_cpu_s" in e
                    else "-",
                    f"{e['redis_server_cpu_us_per_event']:.1f}"
                    if "redis_server_cpu_us_per_event" in e
                    else "-",
                ]
                for e in (*engines, baseline, arrow_baseline)
            ],
            [
                "quixstreams (peer)",
                f"{quix['cpu_us_per_event']:.1f}" if quix_per_cpu else "-",
                f"{quix_per_cpu:,.0f}" if quix_per_cpu else "-",
                "1.00x" if quix_per_cpu else "-",
                "-",
            ],
            [
                "confluent-kafka consume only (the floor)",
                f"{consume['cpu_us_per_event']:.1f}",
                f"{consume['events_per_cpu_s']:,.0f}",
                f"{consume['events_per_cpu_s'] / quix_per_cpu:.2f}x" if quix_per_cpu else "-",
                "-",
            ],
        ],
    )
    print(
        "(the floor: the events read with the worker's consumer settings and per-message calls, "
        "nothing else done)"
    )
    redis_runs = engines[0].get("engine_cpu_us_per_event_runs", [])
    if len(redis_runs) > 1:
        print(
            f"(redis: the median of {len(redis_runs)} runs, "
            + " / ".join(f"{run:.1f}" for run in redis_runs)
            + " µs per event)"
        )
    decode_gain = _cpu_gain(baseline, engines[0])
    writer_gain = _cpu_gain(arrow_baseline, engines[0])
    if decode_gain is not None:
        print(
            f"(compiled reader: {decode_gain:.2f}x less engine CPU per event than msgspec decoding, "
            "Redis, this run)"
        )
    if writer_gain is not None:
        print(
            f"(compiled Redis writer: {writer_gain:.2f}x less engine CPU per event than Arrow-encoded "
            "writes, this run)"
        )
    if not FAST_DECODE_AVAILABLE:
        print("(the compiled reader is not installed here: both Redis cases decoded with msgspec)")
    if not COMPILED_RESP_AVAILABLE:
        print("(the compiled Redis writer is not installed here: every Redis case wrote Arrow-encoded)")
    print()
    print_table(
        [
            "freshness (Redis), live events/s",
            "events",
            "samples",
            "p50 ms",
            "p99 ms",
            "after warm-up: p50",
            "p99",
            "CPU s while fed: engine / broker / Redis / feeder (of s)",
        ],
        [
            [
                f"{f['rate_events_per_s']:,}",
                f"{f['events']:,}",
                f"{f['samples']:,}",
                *(
                    f"{f[k]:,.0f}" if f[k] is not None else "-"
                    for k in ("p50_ms", "p99_ms", "steady_p50_ms", "steady_p99_ms")
                ),
                " / ".join("-" if v is None else f"{v:.1f}" for v in f["cpu_s"].values())
                + f" ({f['traffic_s']:.0f})"
                if "cpu_s" in f
                else "-",
            ]
            for f in fresh
        ],
    )
    print("(after warm-up: without the first quarter of each run's samples; the target is judged on all)")
    print(
        "(CPU s: used by each process while the feeder sent; they share the machine's "
        f"{os.cpu_count()} cores: near cores x seconds, the backlog sets the freshness)"
    )
    path = write_results(
        "stream",
        {
            "engine_core": {**core, "unit": "events/s"},
            "engine": [{**e, "unit": "events/s"} for e in engines],
            "engine_msgspec_decode_baseline": {**baseline, "unit": "events/s"},
            "engine_core_msgspec_decode_baseline": {**core_msgspec, "unit": "events/s"},
            "compiled_decode_gain": {
                "engine_core_events_per_s_ratio": core["events_per_s"] / core_msgspec["events_per_s"],
                "engine_cpu_per_event_ratio": decode_gain,
                "unit": "msgspec-only CPU per event / compiled reader's (Redis case, same run)",
            },
            "engine_arrow_redis_writes_baseline": {**arrow_baseline, "unit": "events/s"},
            "compiled_redis_writer_gain": {
                "engine_cpu_per_event_ratio": writer_gain,
                "unit": "Arrow-encoded writes' CPU per event / the compiled writer's (Redis case, same run)",
            },
            "decoder": {"compiled_reader_installed": FAST_DECODE_AVAILABLE},
            "redis_writer": {"compiled_writer_installed": COMPILED_RESP_AVAILABLE},
            "quixstreams": {**quix, "unit": "events/s"},
            "kafka_consume_only": {**consume, "unit": "events/s"},
            "ratio_over_quixstreams": {
                "engine_core": core["events_per_s"] / quix_rate if quix_rate else None,
                **{e["online_store"]: e["events_per_s"] / quix_rate if quix_rate else None for e in engines},
            },
            "ratio_over_quixstreams_per_cpu_s": {
                e["online_store"]: e["events_per_engine_cpu_s"] / quix_per_cpu
                for e in engines
                if quix_per_cpu and "events_per_engine_cpu_s" in e
            },
            "freshness": [
                {**f, "unit": "ms from event time to features stored", "online_store": "redis"} for f in fresh
            ],
            "targets": {"events_per_s": 200_000, "ratio": 5.0, "freshness_p99_ms_at_50k": 2_000},
            "versions": versions("numpy", "pyarrow", "quixstreams", "confluent-kafka", "redis"),
        },
        quick=args.quick,
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
