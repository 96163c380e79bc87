"""Record a Kafka topic as the files the Flink filesystem source replays (``adreach stream flink-record``).

One gzip JSON Lines file per partition, ``partition-NNNN.jsonl.gz``, holding the
partition's message values in offset order. The layout is what makes a replay exact:
the Flink job decides lateness per source file, in read order, just as the embedded
engine decides it per Kafka partition in offset order, and gzip files are never split
between readers, so each is read start to end by one. Values are written as they are,
except that raw line breaks (legal in JSON only between tokens) become spaces.
"""

from __future__ import annotations

import gzip
import os
import time
import uuid
from pathlib import Path

import msgspec
from confluent_kafka import Consumer, KafkaException, TopicPartition

from infra.settings import Settings
from streams.topics import KafkaUnavailableError, existing_topics


class ReplayError(RuntimeError):
    """The topic could not be read completely; the message says which partition."""


def partition_file(directory: Path, partition: int) -> Path:
    return directory / f"partition-{partition:04d}.jsonl.gz"


def _one_line(value: bytes) -> bytes:
    """``value`` on one line, as valid or as invalid as it was.

    In valid JSON a line break can only be whitespace between tokens: a space does as well.
    Inside a string it is invalid, and a space there would make the message valid for the
    replay where the engine refused it; a NUL byte keeps it invalid.
    """
    if b"\n" not in value and b"\r" not in value:
        return value
    try:
        msgspec.json.decode(value)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return value.replace(b"\n", b"\x00").replace(b"\r", b"\x00")
    return value.replace(b"\n", b" ").replace(b"\r", b" ")


def write_partition(directory: Path, partition: int, values: list[bytes]) -> Path:
    """Write one partition's values (in offset order) atomically: a hidden file, then renamed."""
    directory.mkdir(parents=True, exist_ok=True)
    target = partition_file(directory, partition)
    staging = directory / f".{target.name}.{uuid.uuid4().hex[:8]}"
    lines = [_one_line(v) for v in values if v]
    with gzip.open(staging, "wb", compresslevel=1) as handle:
        handle.write(b"\n".join(lines) + (b"\n" if lines else b""))
    os.replace(staging, target)
    return target


def record_topic(
    settings: Settings, directory: Path, topic: str | None = None, *, timeout_s: float = 120.0
) -> dict[int, int]:
    """Copy every partition of ``topic`` (default: the events topic) up to its current end.

    Returns the number of messages written per partition.
    """
    topic = topic or settings.kafka.topics.events
    try:
        partitions = existing_topics(settings).get(topic)
    except KafkaUnavailableError as exc:
        raise ReplayError(str(exc)) from exc
    if partitions is None:
        raise ReplayError(f"topic {topic!r} does not exist at {settings.bootstrap_servers}")
    consumer = Consumer(
        {
            **settings.kafka_client_config(),
            "group.id": f"adreach-record-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    counts: dict[int, int] = {}
    try:
        for partition in range(partitions):
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10.0)
            values: list[bytes] = []
            if high > low:
                consumer.assign([TopicPartition(topic, partition, low)])
                deadline = time.monotonic() + timeout_s
                position = low
                while position < high:  # offsets, not counts: transaction markers take offsets too
                    if time.monotonic() > deadline:
                        raise ReplayError(f"{topic}[{partition}]: read up to offset {position} of {high}")
                    for message in consumer.consume(10_000, 0.5):
                        if message.error() is not None:
                            raise ReplayError(f"{topic}[{partition}]: {message.error()}")
                        values.append(message.value() or b"")
                    position = max(position, consumer.position([TopicPartition(topic, partition)])[0].offset)
            write_partition(directory, partition, values)
            counts[partition] = len(values)
    except KafkaException as exc:
        raise ReplayError(f"{topic}: {exc}") from exc
    finally:
        consumer.close()
    # A recording replaces the one before it: a partition file left from an earlier, wider
    # topic would be replayed with this one.
    for stale in directory.glob("partition-*.jsonl.gz"):
        if stale not in {partition_file(directory, partition) for partition in counts}:
            stale.unlink()
    return counts
