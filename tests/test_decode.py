"""The engine's batch decoder: valid events become columns, every bad message is isolated with its reason."""

from __future__ import annotations

import gc
import json

import pytest

from streams.engine import decode
from streams.engine.decode import EventDecoder
from streams.events import MalformedJSONError, SchemaViolationError, UnknownEventTypeError


def impression(event_id: str, **changes: object) -> bytes:
    event = {
        "type": "impression",
        "event_id": event_id,
        "event_time": "2026-01-05T10:00:00.250Z",
        "user_id": "u1",
        "ad_id": "ad7",
        "campaign_id": "c3",
        "advertiser_id": "adv1",
        "cost_micros": 1_500,
        "attributes": {"nested": [1, {"deep": None}]},  # a field no feature reads: skipped
    }
    return json.dumps({**event, **changes}).encode()


def search(event_id: str, query: str) -> bytes:
    event = json.loads(impression(event_id, type="search", query=query))
    for name in ("ad_id", "campaign_id", "advertiser_id", "cost_micros", "attributes"):
        del event[name]
    return json.dumps(event).encode()


BAD = [
    (impression("b1", cost_micros="12"), SchemaViolationError, "cost_micros"),
    (b'{"type":"impression"', MalformedJSONError, "malformed"),
    (b"[1, 2]", SchemaViolationError, "object"),
    (b"null", SchemaViolationError, "object"),  # with the array above, this mix crashed Arrow's reader
    (b'{"a": 1}, {"b": 2}', MalformedJSONError, "one JSON object per message"),
    (b"   ", MalformedJSONError, "one JSON object per message"),
    (impression("b2", event_time="not a time"), SchemaViolationError, "RFC 3339"),
    (impression("b3", cost_micros=2**64), SchemaViolationError, "cost_micros"),
    (b"\xff\xfe{}", MalformedJSONError, "malformed"),
    (impression(""), SchemaViolationError, "event_id is missing or empty"),
    (impression("b5", type="impresion"), UnknownEventTypeError, "unknown or missing event type"),
    # The SDK's lengths and version on the fields features read (an empty ad id was an entity).
    (impression("b7", ad_id=""), SchemaViolationError, "ad_id must have 1 to 128 characters"),
    (impression("b8", campaign_id="c" * 129), SchemaViolationError, "campaign_id must have 1 to 128"),
    (impression("x" * 129), SchemaViolationError, "event_id must have 1 to 128"),
    (search("b9", "q" * 1025), SchemaViolationError, "query must have 1 to 1024 characters"),
    (impression("b10", schema_version=2), SchemaViolationError, "reads schema_version 1 events"),
    (impression("b14", schema_version=None), SchemaViolationError, "reads schema_version 1 events"),
    (impression("b15", event_time=1767607200250), SchemaViolationError, "not an epoch number"),
    (impression("b11", cost_micros=2**63), SchemaViolationError, "cost_micros"),
    # null is not "absent" where no event type lets the field be null (the SDK refuses it)
    (impression("b12", cost_micros=None), SchemaViolationError, "got `null` - at `$.cost_micros`"),
    (impression("b13", type=None), UnknownEventTypeError, "`$.type`"),
    # Not UTF-8 inside a field the engine reads (a query, an id): used to crash the worker.
    (
        impression("b6", ad_id="caf\u00e9").replace(b"caf\\u00e9", b"caf\xe9"),
        MalformedJSONError,
        "utf-8",
    ),
]


def test_bad_messages_are_isolated_with_their_reasons_and_the_rest_decoded() -> None:
    good = [impression(f"g{i}") for i in range(4)]
    offset = impression("g-offset", event_time="2026-01-05T12:00:00.250+02:00")
    # At the limits: 128 characters of two bytes each (lengths count characters), version 1.
    good[2] = impression("g2", ad_id="\u00e9" * 128, schema_version=1, cost_micros=2**63 - 1)
    good[3] = search("g3", "q" * 1024)
    values = [good[0], good[1], *(line for line, _, _ in BAD), offset, None, good[2], good[3]]
    batch = EventDecoder().decode(values)

    assert batch.positions.tolist() == [0, 1, 2 + len(BAD), 4 + len(BAD), 5 + len(BAD)]
    assert batch.events.column("event_id").to_pylist() == ["g0", "g1", "g-offset", "g2", "g3"]
    times = batch.events.column("event_time_ms").to_pylist()
    assert times[0] == times[2] == 1_767_607_200_250  # 10:00Z and 12:00+02:00 are one instant
    assert batch.events.column("cost_micros").to_pylist() == [1_500] * 3 + [2**63 - 1, None]

    rejected = dict(batch.rejected)
    assert sorted(rejected) == [*range(2, 2 + len(BAD)), 3 + len(BAD)]
    for index, (_, kind, fragment) in enumerate(BAD, start=2):
        assert isinstance(rejected[index], kind), (index, rejected[index])
        assert fragment.lower() in str(rejected[index]).lower(), (index, rejected[index])
    assert isinstance(rejected[3 + len(BAD)], MalformedJSONError)  # the empty message
    # Columns are built with the garbage collector paused; a bad event time (an exception
    # inside that block) must leave it running, and a caller's own pause must stay.
    assert gc.isenabled()
    gc.disable()
    try:
        EventDecoder().decode(values)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_batch_decoded_in_chunks_equals_one_decoded_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """Big batches are decoded in chunks: positions and rejects must keep their batch-wide numbers,
    including across a chunk of only bad messages."""
    good = [impression(f"g{i}", user_id=f"u{i % 3}") for i in range(10)]
    bad = [line for line, _, _ in BAD]
    values = [*good[:3], *bad[:5], *good[3:7], None, *bad[5:], *good[7:]]
    whole = EventDecoder().decode(values)
    monkeypatch.setattr(decode, "DECODE_CHUNK", 4)
    chunked = EventDecoder().decode(values)
    assert chunked.events.equals(whole.events)
    assert chunked.positions.tolist() == whole.positions.tolist()
    assert [(i, type(e), str(e)) for i, e in chunked.rejected] == [
        (i, type(e), str(e)) for i, e in whole.rejected
    ]
    assert len(whole.rejected) == len(BAD) + 1


# Forms of one instant (2026-01-05T10:00:00.250Z, to the millisecond) the SDK accepts.
SDK_TIMES = [
    "2026-01-05T10:00:00.250Z",
    "2026-01-05T10:00:00.250123Z",  # microseconds: Python's isoformat() and the SDK's own encoder
    "2026-01-05T10:00:00.250999999Z",  # nanoseconds (Java's Instant): truncated (the SDK rounds to µs)
    "2026-01-05T11:30:00.25+01:30",
    "2026-01-05t10:00:00.2501z",  # RFC 3339 allows lowercase t and z
    "2026-01-05 10:00:00.250-00:00",  # and a space for the T
    "2026-01-05T09:00:00.250-0100",  # not RFC 3339 (no colon), but the SDK's parser takes it
]
# Forms Arrow's parser would take but the SDK refuses: the engines must refuse them too.
NOT_RFC3339 = ["2026-01-05T10:00Z", "2026-01-05T10:00:00+01", "2026-01-05T10:00:00", "2026-01-05Z"]


def test_event_times_are_read_in_every_form_the_sdk_accepts_and_only_those() -> None:
    from datetime import UTC, datetime

    from streams.events import Impression, encode, event_time_ms, validate_json

    sdk_encoded = encode(
        Impression(
            event_id="sdk",
            event_time=datetime(2026, 1, 5, 10, 0, 0, 250_123, tzinfo=UTC),
            user_id="u1",
            ad_id="ad7",
            campaign_id="c3",
            advertiser_id="adv1",
        )
    )

    def sdk_impression(event_id: str, event_time: str) -> bytes:  # no field the SDK does not know
        event = json.loads(impression(event_id, event_time=event_time))
        del event["attributes"]
        return json.dumps(event).encode()

    accepted = [sdk_impression(f"t{i}", text) for i, text in enumerate(SDK_TIMES)] + [sdk_encoded]
    refused = [sdk_impression(f"r{i}", text) for i, text in enumerate(NOT_RFC3339)]
    for payload in accepted:
        assert event_time_ms(validate_json(payload)) in (1_767_607_200_250, 1_767_607_200_251), payload
    for payload in refused:
        with pytest.raises(SchemaViolationError):
            validate_json(payload)

    batch = EventDecoder().decode([*accepted, *refused])

    assert batch.events.column("event_time_ms").to_pylist() == [1_767_607_200_250] * len(accepted)
    assert [index for index, _ in batch.rejected] == list(range(len(accepted), len(accepted) + len(refused)))
    for _, error in batch.rejected:
        assert isinstance(error, SchemaViolationError) and "RFC 3339" in str(error), error


def test_time_columns_of_any_unit_read_as_truncated_milliseconds() -> None:
    import pyarrow as pa

    from infra.arrow_times import EventTimeError, epoch_ms

    nanos = [1_767_607_200_250_999_999, None]
    for unit, scale in (("s", 10**9), ("ms", 10**6), ("us", 10**3), ("ns", 1)):
        for zone in (None, "UTC", "Europe/Paris"):
            column = pa.array([n // scale if n else None for n in nanos], pa.timestamp(unit, zone))
            want = nanos[0] // 10**9 * 1000 if unit == "s" else 1_767_607_200_250
            assert epoch_ms(column).to_pylist() == [want, None], (unit, zone)
    with pytest.raises(EventTimeError, match="texts or timestamps"):
        epoch_ms(pa.array([1.5]))
    with pytest.raises(EventTimeError):
        epoch_ms(pa.array(["2026-02-30T10:00:00Z"]))


def test_two_broken_messages_never_merge_into_one_event_across_their_boundary() -> None:
    """Each message is one event or a reject: a message ending mid-object and the next one
    completing it used to decode as events (the batch was parsed as one joined JSON array)."""
    first, second = impression("split-1").decode(), impression("split-2").decode()
    head = f'{first[:-1]}}},{second[:-1]}, "x": "'.encode()  # e1 whole, e2 open inside a string
    tail = b'"}'
    batch = EventDecoder().decode([impression("before"), head, tail, impression("after")])

    assert batch.events.column("event_id").to_pylist() == ["before", "after"]
    rejected = dict(batch.rejected)
    assert sorted(rejected) == [1, 2]
    assert all(isinstance(error, MalformedJSONError) for error in rejected.values())
