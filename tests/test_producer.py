"""The producer SDK against a real broker: delivery, exactly-once read-back, dead letters, failures."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from kafka_helpers import consume

from infra.settings import CLUSTER_LINGER_MS, EMBEDDED_BROKER_LINGER_MS, Settings, load_settings
from streams import EventProducer, Impression, InvalidEventError, SchemaViolationError, validate_json
from streams.producer import HEADER_ERROR_CLASS, HEADER_REASON, HEADER_SOURCE, DeliveryError, producer_config

T0 = datetime(2026, 1, 5, 10, tzinfo=UTC)


def impression(i: int, user: str) -> Impression:
    return Impression(
        event_id=f"imp-{i}",
        event_time=T0 + timedelta(seconds=i),
        user_id=user,
        ad_id=f"ad{i % 7}",
        campaign_id="c1",
        advertiser_id="adv1",
        position=1 + i % 4,
    )


def test_every_event_is_read_back_exactly_once_by_a_group_consumer(kafka: Settings) -> None:
    events = [impression(i, f"u{i % 50}") for i in range(3_000)]
    with EventProducer(kafka) as producer:
        for event in events[:1_000]:
            producer.send(event)
        for event in events[1_000:2_000]:
            producer.send_json(json.dumps({**_as_dict(event)}).encode())
        for event in events[2_000:]:
            producer.send(_as_dict(event))
    assert producer.stats.delivered == 3_000
    assert producer.stats.failed == 0

    records = consume(kafka, kafka.kafka.topics.events, expected=3_000, group=True)
    ids = Counter(validate_json(r.value).event_id for r in records)
    assert len(ids) == 3_000
    assert set(ids.values()) == {1}, "an event was delivered more than once"
    assert set(ids) == {e.event_id for e in events}


def test_records_are_keyed_by_user_ordered_per_user_and_timestamped(kafka: Settings) -> None:
    events = [impression(i, f"user-{i % 13}") for i in range(1_300)]
    with EventProducer(kafka) as producer:
        for event in events:
            producer.send(event)
    records = consume(kafka, kafka.kafka.topics.events, expected=len(events))
    partitions_by_user: dict[bytes, set[int]] = defaultdict(set)
    sequence_by_user: dict[bytes, list[tuple[int, int]]] = defaultdict(list)
    for record in records:
        assert record.key is not None
        event = validate_json(record.value)
        assert record.key == event.user_id.encode()
        assert record.timestamp_ms == int(event.event_time.timestamp() * 1000)
        partitions_by_user[record.key].add(record.partition)
        sequence_by_user[record.key].append((record.offset, int(event.event_id.split("-")[1])))
    assert all(len(parts) == 1 for parts in partitions_by_user.values())
    assert len({p for parts in partitions_by_user.values() for p in parts}) > 1, "users should spread"
    for sequence in sequence_by_user.values():
        in_offset_order = [n for _, n in sorted(sequence)]
        assert in_offset_order == sorted(in_offset_order), "per-user order must be preserved"


def test_invalid_event_raises_by_default_and_nothing_is_sent(kafka: Settings) -> None:
    with EventProducer(kafka) as producer:
        with pytest.raises(SchemaViolationError, match="position"):
            producer.send({**_as_dict(impression(1, "u")), "position": -3})
        with pytest.raises(InvalidEventError):
            producer.send_json(b"not json")
    assert producer.stats.sent == 0
    assert producer.stats.invalid == 2
    assert consume(kafka, kafka.kafka.topics.dead_letter, expected=0, timeout_s=2) == []


def test_invalid_events_go_to_the_dead_letter_topic_with_payload_and_reason(kafka: Settings) -> None:
    bad_payloads = [
        b"{oops",
        b'{"type":"teleport"}',
        json.dumps({**_as_dict(impression(1, "u")), "ad_id": 5}).encode(),
    ]
    with EventProducer(kafka, on_invalid="dead_letter") as producer:
        producer.send(impression(0, "u"))
        results = [producer.send_json(p, source=f"unit:{i}") for i, p in enumerate(bad_payloads)]
        assert producer.send({"type": "click"}) is None
    assert results == [None, None, None]
    assert producer.stats.dead_lettered == 4 and producer.stats.dead_letters_delivered == 4
    assert producer.stats.delivered == 1

    dead = consume(kafka, kafka.kafka.topics.dead_letter, expected=4)
    by_source = {r.headers.get(HEADER_SOURCE, b"").decode(): r for r in dead}
    for i, payload in enumerate(bad_payloads):
        record = by_source[f"unit:{i}"]
        assert record.value == payload, "the original bytes are kept"
        assert record.headers[HEADER_REASON]
    assert by_source["unit:0"].headers[HEADER_ERROR_CLASS] == b"MalformedJSONError"
    assert by_source["unit:1"].headers[HEADER_ERROR_CLASS] == b"UnknownEventTypeError"
    assert b"ad_id" in by_source["unit:2"].headers[HEADER_REASON]
    good = consume(kafka, kafka.kafka.topics.events, expected=1)
    assert [validate_json(r.value).event_id for r in good] == ["imp-0"]


def test_undeliverable_events_raise_on_close_instead_of_vanishing(kafka: Settings) -> None:
    unreachable = kafka.model_copy(deep=True)
    unreachable.kafka.bootstrap_servers = "127.0.0.1:1"
    unreachable.producer.delivery_timeout_ms = 1_500
    producer = EventProducer(unreachable)
    for i in range(5):
        producer.send(impression(i, "u"))
    with pytest.raises(DeliveryError, match="not delivered|undelivered"):
        producer.close(timeout_s=10)
    assert producer.stats.delivered == 0


def _as_dict(event: Impression) -> dict[str, object]:
    payload = json.loads(json.dumps({f: getattr(event, f) for f in event.__struct_fields__}, default=str))
    payload["type"] = "impression"
    payload["event_time"] = event.event_time.isoformat()
    return {k: v for k, v in payload.items() if v is not None}


def test_an_event_too_large_for_kafka_is_a_delivery_failure_and_the_others_are_delivered(
    kafka: Settings,
) -> None:
    """librdkafka refuses a record over message.max.bytes when it is produced: that used to
    escape as a raw KafkaException, losing the events queued before it."""
    big = {
        "type": "user_profile",
        "event_id": "p-big",
        "event_time": "2026-01-05T10:00:00Z",
        "user_id": "u-big",
        "attributes": {f"a{i}": "x" * 1_000 for i in range(1_500)},  # 1.5 MB, schema-valid
    }
    producer = EventProducer(kafka)
    for i in range(3):
        producer.send(impression(i, "u"))
    producer.send(big)
    for i in range(3, 6):
        producer.send(impression(i, "u"))
    with pytest.raises(DeliveryError, match="message.max.bytes"):
        producer.close(timeout_s=30)
    assert (producer.stats.sent, producer.stats.delivered, producer.stats.failed) == (7, 6, 1)
    delivered = consume(kafka, kafka.kafka.topics.events, expected=6)
    assert sorted(validate_json(r.value).event_id for r in delivered) == [f"imp-{i}" for i in range(6)]


def test_batches_wait_longer_on_the_embedded_broker_unless_linger_is_set(tmp_path: Path) -> None:
    # The embedded broker's fetches cost per stored batch (see ProducerSettings.linger_ms).
    embedded = load_settings(state_dir=tmp_path)
    cluster = load_settings(state_dir=tmp_path, kafka={"bootstrap_servers": "kafka-1:9092"})
    explicit = load_settings(state_dir=tmp_path, producer={"linger_ms": 7})
    assert producer_config(embedded)["linger.ms"] == EMBEDDED_BROKER_LINGER_MS
    assert producer_config(cluster)["linger.ms"] == CLUSTER_LINGER_MS
    assert producer_config(explicit)["linger.ms"] == 7
