"""The stream worker: Kafka events in, windowed features in Feast out (``adreach stream run``).

One worker process is one member of a Kafka consumer group reading two topics:

1. the **events** topic: the events a cycle read (while catching up, every 20,000) are
   decoded (:mod:`~streams.engine.decode`), malformed and too-late events are
   dead-lettered with the reason, and the rest are routed by entity to the
   **repartition** topic (:mod:`~streams.engine.router`);
2. the **repartition** topic: each partition is a shard whose windowed state is
   checkpointed in its own file (:mod:`~streams.engine.shard`); the worker holds its
   shards' state together and folds a cycle's rows of all of them in at once, and the
   changed entities' features are written to Feast (:mod:`~streams.engine.sink`).

Every ``flush_interval_ms`` (``backlog_flush_interval_ms`` while it is catching up on a
backlog) the worker first reads back what it routed to its own shards (so a cycle
stores the features of the events it read, instead of the next cycle doing so: that
halves event-to-feature latency), then makes the cycle durable, in this order: routed
records and dead letters acknowledged by Kafka; routers' offsets and watermarks saved;
features stored online by the store thread while this one reads the next events (one
write at a time; retried with backoff while a store is down, with consumption paused
and nothing committed); when a shard checkpoint is due, that write finished and the
buffered offline rows written, then shard state and offsets copied together and
written to the shard's checkpoint file by a background thread (the next checkpoint, a
rebalance and shutdown wait for it); offsets committed to Kafka (for lag monitoring,
those of a shard once its file is written; restarts resume from the checkpoints).
A crash anywhere replays from the last checkpoint and reproduces exactly the same
state, so features are neither lost nor double counted.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from features.definitions import FEATURE_GROUPS, FeatureGroup
from infra.settings import Settings
from streams.engine.collector import collected_after, startup_heap_frozen
from streams.engine.decode import EventDecoder
from streams.engine.memory import keep_freed_memory
from streams.engine.router import Router
from streams.engine.shard import ShardStates
from streams.engine.sink import FeatureSink, StoreUnavailableError
from streams.producer import EventProducer
from streams.topics import TopicSpec, default_topics, ensure_topics

log = logging.getLogger("adreach.stream")

_MAX_SHIP_ROWS = 4_000  # rows per repartition record (~0.4 MB of ids and amounts)
# Bytes per repartition record at most: under Kafka's default 1 MB record-batch limit (brokers'
# message.max.bytes, topics' max.message.bytes) with room for the batch's own header. Rows
# with long texts (queries up to 1,024 characters) make records of fewer rows.
_MAX_SHIP_BYTES = 900_000
_MAX_PENDING_ROWS = 1_000_000  # shipped rows held for the next cycle (a backlog cycle ends here)
# Events read are routed once per cycle, or as soon as this many wait (a backlog's reads):
# each routing ships one repartition record per shard, and on the embedded broker every
# record batch stays an object that later fetches list (see ProducerSettings.linger_ms).
_ROUTE_EVENTS = 20_000
_COMPACT_EVERY_S = 30.0
# Passes over the whole state on the worker's thread take at most about this share of its
# time: a large state is checkpointed less often than stream.checkpoint_interval_s (the copy
# of a checkpoint; the file is written on another thread, see ShardStates.commit) and
# compacted less often than every _COMPACT_EVERY_S (0.5 - 0.8 s for 3.9M tiles).
_STATE_PASS_SHARE = 0.1
_UNREACHED_END_GRACE_S = 60.0  # see StreamWorker._end_reached
_FRESHNESS_SAMPLE_EVERY = 50  # one event in 50 is timed
_FRESHNESS_SAMPLES = 200_000


class StreamError(RuntimeError):
    """The worker cannot go on (e.g. Kafka refused a record); the message says why."""


@dataclass
class StreamStats:
    """Counters for progress output, tests and benchmarks."""

    events: int = 0
    dead_lettered: int = 0
    late: int = 0
    future: int = 0
    """Events dropped as too far ahead of the worker's clock (``stream.max_future_s``)."""
    malformed: int = 0
    feature_rows: int = 0
    users_deleted: int = 0
    """Users whose stream features a privacy deletion removed (user_profile ``"action": "delete"``)."""
    repartition_records: int = 0
    """Records shipped to the repartition topic (at most one per shard and cycle, unless a backlog's)."""
    cycles: int = 0
    store_retries: int = 0
    freshness_ms: list[float] = field(default_factory=list)
    """Sampled wall-clock ms from an event's time to its features being stored (live traffic)."""
    started: float = field(default_factory=time.monotonic)
    last_message: float = field(default_factory=time.monotonic)
    first_message: float | None = None
    """``time.monotonic()`` when the first message arrived (throughput is measured from there)."""

    @property
    def events_per_second(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.events / elapsed if elapsed > 0 else 0.0


@dataclass
class _StoreInFlight:
    """A cycle's feature write, running on the store thread (see :meth:`StreamWorker._store`)."""

    changed: dict[str, pa.Table]
    deleted: dict[str, list[tuple[str, int]]]
    event_times_ms: list[npt.NDArray[np.int64]]  # sampled event times of the cycle's rows (freshness)
    done: Future[tuple[int, float]]  # rows written, and the wall time (epoch ms) when stored


def repartition_spec(settings: Settings) -> TopicSpec:
    topics = settings.kafka.topics
    return TopicSpec(
        settings.stream.repartition_topic,
        settings.stream.repartition_partitions,
        topics.replication_factor,
        dict(topics.config),
    )


def stream_consumer_config(settings: Settings) -> dict[str, Any]:
    """The librdkafka settings of a worker's consumer (its group is ``stream.consumer_group``)."""
    config = settings.stream
    return {
        **settings.kafka_client_config(),
        "group.id": config.consumer_group,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": config.session_timeout_ms,
        "heartbeat.interval.ms": max(500, config.session_timeout_ms // 6),
        "max.poll.interval.ms": 600_000,
        "fetch.max.bytes": 16_000_000,
        "fetch.wait.max.ms": config.fetch_wait_max_ms,
    }


def _usable(error: KafkaError | None) -> bool:
    """Whether a consumed message carries data: end-of-partition notices are skipped, other errors raise."""
    if error is None:
        return True
    if error.code() == KafkaError._PARTITION_EOF:
        return False
    raise StreamError(f"Kafka consumer error: {error}")


class _RouterCheckpoints:
    """Per source partition: the next offset to read and the watermark there (one JSON file each)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def _path(self, partition: int) -> Path:
        return self.directory / f"partition-{partition}.json"

    def load(self, partition: int) -> tuple[int, int | None] | None:
        """The saved next offset and watermark (None: no valid event had set one), or None if never saved."""
        path = self._path(partition)
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        watermark = data.get("watermark_ms")
        return int(data["next_offset"]), None if watermark is None else int(watermark)

    def save(self, partition: int, next_offset: int, watermark_ms: int | None) -> None:
        path = self._path(partition)
        staging = path.with_name(f".{path.name}")
        with staging.open("w") as handle:
            json.dump({"next_offset": next_offset, "watermark_ms": watermark_ms}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        staging.replace(path)


class StreamWorker:
    """One member of the stream engine's consumer group; see the module docstring.

    ``run()`` loops until ``stop()`` is called, ``max_seconds`` pass, or (with
    ``idle_exit_s``) no message arrived for that long. ``on_cycle`` is called after each
    durable cycle with the stats (for progress output).
    """

    def __init__(
        self,
        settings: Settings,
        groups: Sequence[FeatureGroup] = FEATURE_GROUPS,
        *,
        worker_id: str | None = None,
        on_cycle: Callable[[StreamStats, int], None] | None = None,
    ) -> None:
        self.settings = settings
        self.groups = tuple(groups)
        self.stats = StreamStats()
        self._on_cycle = on_cycle
        config = settings.stream
        self._events_topic = settings.kafka.topics.events
        self._shard_topic = config.repartition_topic
        self._state_dir = settings.stream_state_dir
        self._decoder = EventDecoder(self.groups, fast=settings.stream.compiled_decode)
        self._router = Router(
            config.repartition_partitions,
            config.allowed_lateness_s * 1000,
            self.groups,
            max_future_ms=config.max_future_ms,
        )
        self._router_checkpoints = _RouterCheckpoints(self._state_dir / "routers")
        self._watermarks: dict[int, int] = {}
        self._router_next: dict[int, int] = {}  # routed but not yet checkpointed
        self._unrouted: list[Message] = []  # events read, to be routed (see _ROUTE_EVENTS)
        self._state = ShardStates(
            self._state_dir / "shards",
            config.repartition_partitions,
            self.groups,
            checkpoint_interval_s=config.checkpoint_interval_s,
            write_in_background=True,
            snapshot_share=_STATE_PASS_SHARE,
        )
        self._pending: dict[int, list[pa.Table]] = {}
        self._pending_next: dict[int, int] = {}
        self._pending_rows = 0
        self._newest_event_ms: int | None = None  # the highest watermark (event time) read
        self._shipped: dict[int, int] = {}  # per shard: the highest offset Kafka acknowledged for this worker
        self._stopping = False
        self._failed = False
        self._assigned = False  # no partitions yet: the group join has not finished
        self._assignment_generation = 0  # changes with every assignment and revocation
        self._start_offsets: dict[tuple[str, int], int] = {}  # where each assigned partition resumed
        self._unreached_ends: dict[tuple[str, int], tuple[int, float]] = {}  # see _end_reached
        self._warned_ends: set[tuple[str, int, int]] = set()  # (topic, partition, end) taken as read
        self._last_compact = time.monotonic()
        self._compact_every_s = _COMPACT_EVERY_S  # longer where compactions take long (_STATE_PASS_SHARE)
        self._last_full_rewrite = time.monotonic()
        self._last_offline_compact = time.monotonic()
        self._failed_records: list[str] = []

        ensure_topics(settings, [*default_topics(settings), repartition_spec(settings)])
        from features.store import open_store

        open_store(settings, self.groups)  # registers views, creates online tables and offline dirs
        self._sink = FeatureSink(settings, self.groups)
        # One thread writes a cycle's features while this one goes on reading the next
        # cycle's events; one write at a time (see _store).
        self._store_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adreach-store")
        self._in_flight: _StoreInFlight | None = None
        base = settings.kafka_client_config()
        self._producer = Producer(
            {
                **base,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
                "compression.type": settings.stream.repartition_compression,
                "message.max.bytes": 2_000_000,
                "on_delivery": self._on_delivery,
            }
        )
        self._dead_letters = EventProducer(settings, on_invalid="dead_letter")
        consumer_config = stream_consumer_config(settings)
        if worker_id:
            consumer_config["client.id"] = worker_id
        self._consumer = Consumer(consumer_config)
        self._consumer.subscribe(
            [self._events_topic, self._shard_topic], on_assign=self._on_assign, on_revoke=self._on_revoke
        )

    # -- the loop --------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask ``run()`` to finish its cycle and return (safe from a signal handler)."""
        self._stopping = True

    def run(self, *, max_seconds: float | None = None, idle_exit_s: float | None = None) -> StreamStats:
        """Read, aggregate and store until stopped, ``max_seconds`` passed, or (with
        ``idle_exit_s``) every partition is caught up and no message came for that long."""
        keep_freed_memory(self.settings.stream.keep_freed_memory_mib)  # see streams.engine.memory
        with startup_heap_frozen():  # see streams.engine.collector
            return self._run(max_seconds, idle_exit_s)

    def _run(self, max_seconds: float | None, idle_exit_s: float | None) -> StreamStats:
        config = self.settings.stream
        timeout_s = config.batch_timeout_ms / 1000
        flush_every = config.flush_interval_ms / 1000
        backlog_flush_every = max(flush_every, config.backlog_flush_interval_ms / 1000)
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        last_flush = time.monotonic()
        try:
            while not self._stopping:
                with collected_after():  # see streams.engine.collector
                    messages = self._consumer.consume(config.batch_max_events, timeout_s)
                    self._receive(messages)
                    full = len(messages) >= config.batch_max_events
                    behind = full and self._reading_behind(backlog_flush_every)
                    now = time.monotonic()
                    if (
                        now - last_flush >= (backlog_flush_every if behind else flush_every)
                        or self._pending_rows >= _MAX_PENDING_ROWS
                    ):
                        self._route_unrouted()
                        self._read_own_shipments(timeout_s=flush_every)
                        self.checkpoint()
                        last_flush = now
                    del messages  # routed messages must be freed before the collection after the pass
                if deadline is not None and now >= deadline:
                    break
                if (
                    idle_exit_s is not None
                    and now - self.stats.last_message >= idle_exit_s
                    and self._caught_up()
                ):
                    break
            self.checkpoint(final=True)
        except BaseException:
            self._failed = True  # closing must not checkpoint a half-done cycle
            raise
        finally:
            self.close()
        return self.stats

    def _reading_behind(self, by_s: float) -> bool:
        """Whether the newest event time read so far (the highest partition watermark) is over ``by_s`` old.

        A full micro-batch alone does not mean a backlog: live traffic fills one too at a
        high rate, and switching to long cycles then costs freshness for nothing. Events
        that are already this old cannot be fresh any more, so catching up comes first.
        (Event times come from the producers' clocks: a producer clock running behind
        by more than ``by_s`` makes live traffic look like a backlog.)
        """
        if self._newest_event_ms is None:
            return True
        return time.time() * 1000 - self._newest_event_ms > by_s * 1000

    def _receive(self, messages: list[Message]) -> None:
        """Note when messages arrived (progress, idle exit) and handle them."""
        if not messages:
            return
        self.stats.last_message = time.monotonic()
        if self.stats.first_message is None:
            self.stats.first_message = self.stats.last_message
        self._handle(messages)

    def _handle(self, messages: list[Message]) -> None:
        """Events join the routing queue; repartition records join their shard's pending rows.

        The per-message accessors are mapped in C, so a batch of events runs no Python per
        message here (a Python loop over the messages cost ~45 ns per message more, measured).
        """
        errors = list(map(Message.error, messages))
        if errors.count(None) != len(errors):
            messages = [m for m, error in zip(messages, errors, strict=True) if _usable(error)]
        topics = list(map(Message.topic, messages))
        if topics.count(self._events_topic) == len(topics):
            events = messages
        else:
            events = []
            for message, topic in zip(messages, topics, strict=True):
                if topic == self._events_topic:
                    events.append(message)
                else:
                    self._take_shipment(message)
        if events:
            self._unrouted.extend(events)
            if len(self._unrouted) >= _ROUTE_EVENTS:
                self._route_unrouted()

    def _take_shipment(self, message: Message) -> None:
        """A repartition record: its rows wait in their shard's pending rows for the next cycle."""
        partition = message.partition()
        payload = message.value()
        if payload:
            rows = pa.ipc.open_stream(payload).read_all()
            self._pending.setdefault(partition, []).append(rows)
            self._pending_rows += rows.num_rows
        self._pending_next[partition] = message.offset() + 1

    def _route_unrouted(self) -> None:
        messages, self._unrouted = self._unrouted, []
        if messages:
            self._route(messages)

    def _route(self, messages: list[Message]) -> None:
        values = list(map(Message.value, messages))
        partitions = np.fromiter(map(Message.partition, messages), np.int64, len(messages))
        offsets = np.fromiter(map(Message.offset, messages), np.int64, len(messages))
        batch = self._decoder.decode(values)
        for index, error in batch.rejected:
            self._dead_letter(messages[index], str(error), type(error).__name__)
        self.stats.malformed += len(batch.rejected)
        routed = self._router.route(
            batch.events,
            partitions[batch.positions],
            offsets[batch.positions],
            self._watermarks,
            now_ms=int(time.time() * 1000),
        )
        for row, reason in routed.late:
            self._dead_letter(messages[int(batch.positions[row])], reason, "LateEventError")
        for row, reason in routed.future:
            self._dead_letter(messages[int(batch.positions[row])], reason, "FutureEventError")
        self.stats.late += len(routed.late)
        self.stats.future += len(routed.future)
        self._watermarks = routed.watermarks
        self._newest_event_ms = max(self._watermarks.values(), default=None)
        for shard, rows in routed.shards.items():
            for start in range(0, rows.num_rows, _MAX_SHIP_ROWS):
                self._ship(shard, rows.slice(start, _MAX_SHIP_ROWS))
        for partition in np.unique(partitions).tolist():  # a partition's messages come in offset order
            self._router_next[partition] = int(offsets[partitions == partition].max()) + 1
        self.stats.events += len(messages)

    def _ship(self, shard: int, rows: pa.Table) -> None:
        """Send ``rows`` to ``shard`` as Arrow IPC records of at most :data:`_MAX_SHIP_BYTES`, in order."""
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, rows.schema) as writer:
            writer.write_table(rows)
        if sink.tell() > _MAX_SHIP_BYTES and rows.num_rows > 1:  # rare: long texts; halves keep the order
            half = rows.num_rows // 2
            self._ship(shard, rows.slice(0, half))
            self._ship(shard, rows.slice(half))
            return
        payload = sink.getvalue()  # (produce reads the Arrow buffer itself: no copy into bytes first)
        while True:
            try:
                self._producer.produce(self._shard_topic, payload, partition=shard)
                self.stats.repartition_records += 1
                break
            except BufferError:
                self._producer.poll(0.05)
        self._producer.poll(0)

    def _read_own_shipments(self, *, timeout_s: float) -> None:
        """Consume until the rows this worker shipped to its own shards are read back (or ``timeout_s``).

        Without this, rows routed in one cycle reach their shard's state in the next: a
        whole extra cycle between an event and its features. Everything still goes through
        the repartition topic (the log a restart replays), in its order; this only reads
        it before storing. Messages of the events topic that arrive meanwhile are routed
        as usual (their rows are stored by the next cycle). Runs outside
        :meth:`checkpoint`, where the run loop's own reads run, so a rebalance
        triggered here is handled exactly as there; it ends the wait.
        """
        self._flush_producers()
        targets = {shard: offset + 1 for shard, offset in self._shipped.items() if shard in self._state}
        self._shipped.clear()
        deadline = time.monotonic() + timeout_s
        batch = self.settings.stream.batch_max_events
        read_timeout_s = self.settings.stream.batch_timeout_ms / 1000
        assignment = self._assignment_generation
        while targets and not self._stopping and assignment == self._assignment_generation:
            targets = {
                shard: target
                for shard, target in targets.items()
                if shard in self._state and self._read_up_to(shard) < target
            }
            remaining = deadline - time.monotonic()
            if not targets or remaining <= 0:
                break
            # consume() returns early only once ``batch`` messages are in: wait in short reads
            self._receive(self._consumer.consume(batch, min(remaining, read_timeout_s)))

    def _read_up_to(self, shard: int) -> int:
        """The next repartition offset of ``shard`` this worker has not read yet (-1: none read)."""
        if shard in self._pending_next:
            return self._pending_next[shard]
        next_offset = self._state.next_offset(shard)
        return next_offset if next_offset is not None else -1

    def _dead_letter(self, message: Message, reason: str, error_class: str) -> None:
        source = f"{message.topic()}[{message.partition()}]@{message.offset()}"
        self._dead_letters.dead_letter(message.value(), reason, error_class=error_class, source=source)
        self.stats.dead_lettered += 1

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self._failed_records.append(f"{message.topic()}[{message.partition()}]: {error}")
            return
        offset = message.offset()
        partition = message.partition()
        if offset is not None and partition is not None and offset > self._shipped.get(partition, -1):
            self._shipped[partition] = offset

    # -- durability ------------------------------------------------------------------------

    def _rewrite_all_if_due(self) -> None:
        """Every ``stream.full_rewrite_interval_s``, have each entity's next write store all its features."""
        interval = self.settings.stream.full_rewrite_interval_s
        if interval <= 0 or time.monotonic() - self._last_full_rewrite < interval:
            return
        self._state.rewrite_all()
        self._last_full_rewrite = time.monotonic()

    def checkpoint(self, *, final: bool = False) -> None:
        """Make everything consumed so far durable (see the module docstring for the order).

        Shard state is written to its checkpoint file every ``checkpoint_interval_s`` (and
        always when ``final``: on shutdown and before partitions are handed over); between
        checkpoints the repartition topic holds what a restart would replay.
        """
        self._route_unrouted()  # (what arrived while own shipments were read back; all of it when final)
        self._flush_producers()
        commits: list[TopicPartition] = []
        for partition, next_offset in self._router_next.items():
            # (A partition whose messages so far were all dead-lettered has no watermark yet.)
            self._router_checkpoints.save(partition, next_offset, self._watermarks.get(partition))
            commits.append(TopicPartition(self._events_topic, partition, next_offset))
        self._router_next.clear()

        self._rewrite_all_if_due()
        shipped = {shard: pa.concat_tables(tables) for shard, tables in self._pending.items() if tables}
        self._pending.clear()
        self._pending_rows = 0
        event_times = [
            rows.column("event_time_ms").to_numpy()[::_FRESHNESS_SAMPLE_EVERY] for rows in shipped.values()
        ]
        changed = self._state.apply(shipped, self._pending_next)  # one row per changed entity and group
        self._store(changed, self._state.take_deleted(), event_times)
        now = time.monotonic()
        compact = now - self._last_compact >= self._compact_every_s
        retention_ms = (
            max(g.longest_window.seconds for g in self.groups) + self.settings.stream.allowed_lateness_s
        ) * 1000
        if compact:
            self._state.compact(retention_ms)
            self._compact_every_s = max(_COMPACT_EVERY_S, (time.monotonic() - now) / _STATE_PASS_SHARE)
        # Idle shards too: a quiet stream must not leave state and offline rows unwritten.
        due = self._state.commit_due(force=final)
        offline_compact = now - self._last_offline_compact >= self.settings.stream.offline_compact_interval_s
        if final or due or offline_compact:
            self._finish_store()  # what is checkpointed (and the sink's buffers) must be stored first
        if final or due:
            # A checkpoint must never cover rows still waiting for the offline store.
            self._with_store_retries(self._sink.flush_offline)
        if due:
            for shard, durable_offset in self._state.commit(force=final).items():
                commits.append(TopicPartition(self._shard_topic, shard, durable_offset))
        if compact:
            self._last_compact = now
        if offline_compact or final:
            self._sink.compact_offline()
            self._last_offline_compact = now
        self._pending_next.clear()
        if commits:
            try:
                self._consumer.commit(offsets=commits, asynchronous=True)
            except KafkaException as exc:  # informational only: restarts use the checkpoints
                log.warning("could not commit offsets to Kafka (checkpoints are intact): %s", exc)
        self.stats.cycles += 1
        if self._on_cycle is not None:
            self._on_cycle(self.stats, sum(t.num_rows for t in changed.values()))

    def _flush_producers(self) -> None:
        for producer in (self._producer, self._dead_letters):
            remaining = producer.flush(60.0)
            if remaining:
                raise StreamError(f"Kafka did not acknowledge {remaining} records within 60 s")
        if self._failed_records or self._dead_letters.stats.failed:
            failures = self._failed_records[:3] or [str(f) for f in self._dead_letters.stats.failures[:3]]
            raise StreamError(f"Kafka rejected records the engine produced: {failures}")

    def _store(
        self,
        changed: dict[str, pa.Table],
        deleted: dict[str, list[tuple[str, int]]],
        event_times_ms: list[npt.NDArray[np.int64]],
    ) -> None:
        """Start storing a cycle's features on the store thread: deleted users' first, then the changed.

        Why a thread: most of a write's time is the store's (Redis applying the commands on
        another core); meanwhile this thread reads, decodes and routes the next events,
        instead of waiting. The previous cycle's write is finished first (and retried here
        if it failed), so writes reach the store in cycle order and a later row never
        lands before an earlier one; nothing is checkpointed or committed before the
        write it covers is finished (:meth:`checkpoint`).
        """
        self._finish_store()
        if not changed and not deleted:
            return

        done = self._store_thread.submit(self._write_features, changed, deleted)
        self._in_flight = _StoreInFlight(changed, deleted, event_times_ms, done)

    def _write_features(
        self, changed: dict[str, pa.Table], deleted: dict[str, list[tuple[str, int]]]
    ) -> tuple[int, float]:
        """Store the features (see :meth:`FeatureSink.write`): rows written, and when (epoch ms)."""
        return self._sink.write(changed, deleted), time.time() * 1000

    def _finish_store(self) -> None:
        """Wait for the write in flight, if any; retry it here, with backoff, if a store was down.

        Never drops rows: a failed write is repeated with the same rows (writes are
        idempotent upserts) until it succeeds or the worker stops.
        """
        flight, self._in_flight = self._in_flight, None
        if flight is None:
            return
        try:
            rows, stored_ms = flight.done.result()
        except StoreUnavailableError as exc:
            self.stats.store_retries += 1
            log.warning("feature store unavailable, retrying: %s", exc)
            results: list[tuple[int, float]] = []

            def write() -> None:
                results.append(self._write_features(flight.changed, flight.deleted))

            self._with_store_retries(write)
            rows, stored_ms = results[-1]
        self.stats.feature_rows += rows
        self.stats.users_deleted += len({key for users in flight.deleted.values() for key, _ in users})
        if flight.event_times_ms and len(self.stats.freshness_ms) < _FRESHNESS_SAMPLES:
            samples = stored_ms - np.concatenate(flight.event_times_ms)
            self.stats.freshness_ms.extend(samples.tolist())

    def _with_store_retries(self, write: Callable[[], None]) -> None:
        """Run ``write`` until it succeeds, backing off while a store is down (data paused meanwhile)."""
        delay = self.settings.stream.retry_initial_s
        paused: list[TopicPartition] = []
        try:
            while True:
                try:
                    write()
                    return
                except StoreUnavailableError as exc:
                    self.stats.store_retries += 1
                    log.warning("feature store unavailable, retrying in %.1f s: %s", delay, exc)
                    if not paused:
                        paused = self._consumer.assignment()
                        self._consumer.pause(paused)
                    waited = 0.0
                    while waited < delay and not self._stopping:
                        self._consumer.poll(min(0.2, delay))  # keeps group membership; paused: no data
                        waited += min(0.2, delay)
                    if self._stopping:
                        raise StreamError(f"stopped while the feature store was unavailable: {exc}") from exc
                    delay = min(delay * 2, self.settings.stream.retry_max_s)
        finally:
            if paused:
                self._consumer.resume(paused)

    # -- rebalancing -----------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            if tp.topic == self._events_topic:
                saved = self._router_checkpoints.load(tp.partition)
                if saved is not None:
                    tp.offset, watermark = saved
                    if watermark is not None:
                        self._watermarks[tp.partition] = watermark
            else:
                next_offset = self._state.open(tp.partition)
                tp.offset = next_offset if next_offset is not None else OFFSET_BEGINNING
        self._assigned = True
        self._assignment_generation += 1
        self._start_offsets = {(tp.topic, tp.partition): tp.offset for tp in partitions}
        log.info("assigned %s", [(tp.topic, tp.partition, tp.offset) for tp in partitions])
        consumer.assign(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if not self._failed:
            self.checkpoint(final=True)
        self._assigned = False  # until the next assignment: "caught up" means nothing while unassigned
        self._assignment_generation += 1
        for tp in partitions:
            if tp.topic == self._events_topic:
                self._watermarks.pop(tp.partition, None)
        self._state.close([tp.partition for tp in partitions if tp.topic == self._shard_topic])
        log.info("revoked %s", [(tp.topic, tp.partition) for tp in partitions])

    def _position(self, tp: TopicPartition, low: int) -> int:
        """The next offset this worker will read (before its first fetch: where it resumed)."""
        position = int(self._consumer.position([tp])[0].offset)
        if position >= 0:
            return position
        start = self._start_offsets.get((tp.topic, tp.partition), -1)
        return start if start >= 0 else low

    def _caught_up(self) -> bool:
        if not self._assigned:
            return False
        for tp in self._consumer.assignment():
            try:
                low, high = self._consumer.get_watermark_offsets(tp, timeout=5.0, cached=False)
            except KafkaException as exc:  # the broker is unreachable right now: not idle, just waiting
                log.warning("could not read the end offsets of %s[%d]: %s", tp.topic, tp.partition, exc)
                return False
            if not self._end_reached(tp, high, self._position(tp, low)):
                return False
        return not self._pending_next and not self._router_next and not self._unrouted

    def _end_reached(self, tp: TopicPartition, end: int, position: int) -> bool:
        """Whether ``position`` is at the partition's ``end`` (the broker's ListOffsets answer).

        An end that the fetches never reach is taken as reached once it has stood still for
        :data:`_UNREACHED_END_GRACE_S` while this worker's fetches report the position as
        the partition's end (their high watermark): the two broker answers disagree (Tansu's
        ListOffsets is known to be off in places), no message has come for that long, and
        waiting longer would keep an ``--until-idle`` worker running forever. Nothing is
        lost: offsets are committed only for what was processed. Logged once per partition and end.
        """
        key = (tp.topic, tp.partition)
        if end <= position:
            self._unreached_ends.pop(key, None)
            return True
        fetched_end = self._consumer.get_watermark_offsets(tp, cached=True)[1]
        now = time.monotonic()
        seen_end, since = self._unreached_ends.get(key, (-1, now))
        if fetched_end != position or seen_end != end:
            self._unreached_ends[key] = (end, now)
            return False
        if now - since < _UNREACHED_END_GRACE_S:
            return False
        if (tp.topic, tp.partition, end) not in self._warned_ends:
            self._warned_ends.add((tp.topic, tp.partition, end))
            log.warning(
                "%s[%d]: the broker lists its end at offset %d, but fetches end at %d (this worker's "
                "position) and no message has come for %.0f s: taking the partition as read",
                tp.topic,
                tp.partition,
                end,
                position,
                now - since,
            )
        return True

    def lag(self) -> int | None:
        """Events not yet read by this worker on its assigned event partitions (None: not known yet).

        Not known before the group has assigned any events partition, or before the first
        fetch has told the end offsets (they are read from what fetches reported, so this
        costs no broker request): a 0 then would claim the worker has caught up.
        """
        total, assigned = 0, False
        for tp in self._consumer.assignment():
            if tp.topic != self._events_topic:
                continue
            assigned = True
            low, high = self._consumer.get_watermark_offsets(tp, cached=True)
            if high < 0:
                return None
            total += max(0, high - self._position(tp, low))
        return total if assigned else None

    def close(self) -> None:
        try:
            self._consumer.close()
        finally:
            try:
                self._state.close_all()  # (after the checkpoint file being written, if any)
            finally:
                try:
                    # A write in flight when the worker failed is let finish (its rows are not
                    # committed, so a restart replays them); its outcome no longer matters.
                    self._store_thread.shutdown(wait=True)
                finally:
                    self._dead_letters.close()
                    self._sink.close()
