"""Read the dead-letter topic back: what was rejected, why, and from where (``adreach dead-letters``).

Every rejected message is kept with its original bytes and ``adreach.error.*`` headers
(:mod:`streams.producer`): the SDK's error class, the reason, where it came from (a file
line, or a topic, partition and offset) and when it was rejected. This reads the newest
ones without joining a consumer group (partitions are assigned, nothing is committed), so
looking never moves anyone's offsets.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, KafkaError, TopicPartition

from infra.settings import Settings
from streams.producer import (
    HEADER_ERROR_CLASS,
    HEADER_FAILED_AT,
    HEADER_ORIGINAL_TOPIC,
    HEADER_REASON,
    HEADER_SOURCE,
)
from streams.topics import existing_topics

_READ_TIMEOUT_S = 10.0  # (a broker's answer to a metadata or offsets request)


class DeadLetterTopicError(RuntimeError):
    """The dead-letter topic cannot be read (it does not exist yet, or the broker failed)."""


@dataclass(frozen=True)
class DeadLetter:
    """One rejected message as the dead-letter topic holds it."""

    partition: int
    offset: int
    failed_at_ms: int | None
    error_class: str
    reason: str
    source: str
    original_topic: str
    value: bytes | None

    def as_json(self) -> dict[str, Any]:
        """A JSON object: the headers by name, the original value as text (invalid UTF-8 replaced)."""
        return {
            "partition": self.partition,
            "offset": self.offset,
            "failed_at": _iso(self.failed_at_ms),
            "error_class": self.error_class,
            "reason": self.reason,
            "source": self.source,
            "original_topic": self.original_topic,
            "value": None if self.value is None else self.value.decode("utf-8", errors="replace"),
        }


def newest_dead_letters(settings: Settings, limit: int) -> list[DeadLetter]:
    """The ``limit`` newest dead letters (by the time they were rejected), oldest first.

    Reads at most ``limit`` records from the end of each partition: the newest overall are
    among them, however the rejects are spread over the partitions.
    """
    topic = settings.kafka.topics.dead_letter
    partitions = existing_topics(settings).get(topic)
    if partitions is None:
        raise DeadLetterTopicError(
            f"the dead-letter topic {topic!r} does not exist (kafka.topics.dead_letter): nothing was "
            "dead-lettered on this cluster yet"
        )
    consumer = Consumer(
        {
            **settings.kafka_client_config(),
            "group.id": "adreach-dead-letters-reader",  # (never joined: partitions are assigned)
            "enable.auto.commit": False,
            "enable.partition.eof": True,  # (how the reader knows a partition is read)
        }
    )
    try:
        return _read_newest(consumer, topic, partitions, limit)
    finally:
        consumer.close()


def _read_newest(consumer: Consumer, topic: str, partitions: int, limit: int) -> list[DeadLetter]:
    """Read each partition from ``limit`` records before its listed end until the fetches say
    it is read (partition EOF), and keep the ``limit`` newest.

    The end comes from the fetches, not from the listed offsets alone: the embedded broker's
    ListOffsets answer can fall short for multi-record batches, which here only means
    starting earlier and reading a little more.
    """
    starts: list[TopicPartition] = []
    for partition in range(partitions):
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=_READ_TIMEOUT_S)
        starts.append(TopicPartition(topic, partition, max(low, high - limit)))
    consumer.assign(starts)
    unread = {tp.partition for tp in starts}
    letters: list[DeadLetter] = []
    heard = time.monotonic()
    while unread:
        messages = consumer.consume(1_000, 0.5)
        if not messages:
            if time.monotonic() - heard > _READ_TIMEOUT_S:
                raise DeadLetterTopicError(
                    f"{topic}: partitions {sorted(unread)} sent neither records nor their end "
                    f"in {_READ_TIMEOUT_S:.0f} s"
                )
            continue
        heard = time.monotonic()
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    unread.discard(message.partition())
                    continue
                raise DeadLetterTopicError(f"{topic}: {error}")
            partition, offset = message.partition(), message.offset()
            if partition is not None and offset is not None:
                letters.append(_letter(partition, offset, dict(message.headers() or []), message.value()))
    letters.sort(key=lambda letter: (letter.failed_at_ms or 0, letter.partition, letter.offset))
    return letters[-limit:]


def _letter(partition: int, offset: int, headers: dict[str, bytes | None], value: bytes | None) -> DeadLetter:
    def text(name: str) -> str:
        value = headers.get(name)
        return "" if value is None else value.decode("utf-8", errors="replace")

    failed_at = text(HEADER_FAILED_AT)
    return DeadLetter(
        partition=partition,
        offset=offset,
        failed_at_ms=int(failed_at) if failed_at.isdigit() else None,
        error_class=text(HEADER_ERROR_CLASS),
        reason=text(HEADER_REASON),
        source=text(HEADER_SOURCE),
        original_topic=text(HEADER_ORIGINAL_TOPIC),
        value=value,
    )


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def describe(letter: DeadLetter, width: int = 120) -> str:
    """Two lines for a terminal: when, class, source and reason; then the start of the value."""
    value = "null (a tombstone)" if letter.value is None else letter.value.decode("utf-8", errors="replace")
    if len(value) > width:
        value = value[: width - 3] + "..."
    when = _iso(letter.failed_at_ms) or "?"
    return f"{when}  {letter.error_class}  {letter.source}: {letter.reason}\n    {value}"
