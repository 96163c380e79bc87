"""The engine's batch decoder: valid events become columns, every bad message is isolated with its reason."""

from __future__ import annotations

import json

from streams.engine.decode import EventDecoder
from streams.events import MalformedJSONError, SchemaViolationError


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
    (impression("b5", type="impresion"), SchemaViolationError, "unknown or missing event type"),
]


def test_bad_messages_are_isolated_with_their_reasons_and_the_rest_decoded() -> None:
    good = [impression(f"g{i}") for i in range(4)]
    offset = impression("g-offset", event_time="2026-01-05T12:00:00.250+02:00")
    values = [good[0], good[1], *(line for line, _, _ in BAD), offset, None, good[2], good[3]]
    batch = EventDecoder().decode(values)

    assert batch.positions.tolist() == [0, 1, 2 + len(BAD), 4 + len(BAD), 5 + len(BAD)]
    assert batch.events.column("event_id").to_pylist() == ["g0", "g1", "g-offset", "g2", "g3"]
    times = batch.events.column("event_time_ms").to_pylist()
    assert times[0] == times[2] == 1_767_607_200_250  # 10:00Z and 12:00+02:00 are one instant
    assert batch.events.column("cost_micros").to_pylist() == [1_500] * 5

    rejected = dict(batch.rejected)
    assert sorted(rejected) == [*range(2, 2 + len(BAD)), 3 + len(BAD)]
    for index, (_, kind, fragment) in enumerate(BAD, start=2):
        assert isinstance(rejected[index], kind), (index, rejected[index])
        assert fragment.lower() in str(rejected[index]).lower(), (index, rejected[index])
    assert isinstance(rejected[3 + len(BAD)], MalformedJSONError)  # the empty message
