"""Read topics back in tests, the way a real consumer would."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from infra.settings import Settings
from streams.topics import existing_topics


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp_ms: int
    headers: dict[str, bytes]
    null: bool = False  # a tombstone: ``value`` reads b"" then


def consume(
    settings: Settings, topic: str, expected: int, *, group: bool = False, timeout_s: float = 60.0
) -> list[Record]:
    """Read ``topic`` from the beginning until ``expected`` records arrived (or time out).

    ``group=True`` joins a fresh consumer group (subscribe) like a production consumer;
    otherwise partitions are assigned directly, which skips the group join delay.
    Waits one extra poll after reaching ``expected`` so that duplicates would show.
    """
    consumer = Consumer(
        {
            **settings.kafka_client_config(),
            "group.id": f"test-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
        }
    )
    try:
        if group:
            consumer.subscribe([topic])
        else:
            partitions = existing_topics(settings)[topic]
            consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        records: list[Record] = []
        deadline = time.monotonic() + timeout_s
        extra_polls = 0
        while time.monotonic() < deadline:
            for message in consumer.consume(10_000, 0.5):
                error = message.error()
                if error is not None:
                    raise RuntimeError(f"consumer error: {error}")
                records.append(
                    Record(
                        topic=message.topic() or "",
                        partition=message.partition() or 0,
                        offset=message.offset() or 0,
                        key=message.key(),
                        value=message.value() or b"",
                        timestamp_ms=message.timestamp()[1],
                        headers={k: v or b"" for k, v in (message.headers() or [])},
                        null=message.value() is None,
                    )
                )
            if len(records) >= expected:
                extra_polls += 1
                if extra_polls > 1:
                    break
        return records
    finally:
        consumer.close()
