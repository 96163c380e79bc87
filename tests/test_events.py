"""Event validation: every valid event round-trips; every malformed input gets a specific error."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import jsonschema
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams import events as ev
from streams.schema_file import SCHEMA_PATH, render_schema

T0 = "2026-01-05T10:00:00.250Z"

VALID: dict[str, dict[str, Any]] = {
    "impression": {
        "type": "impression",
        "event_id": "i-1",
        "event_time": T0,
        "user_id": "u1",
        "ad_id": "ad1",
        "campaign_id": "c1",
        "advertiser_id": "adv1",
        "placement": "search_top",
        "position": 2,
        "cost_micros": 1500,
        "device": "mobile",
        "country": "DE",
    },
    "click": {
        "type": "click",
        "event_id": "k-1",
        "event_time": T0,
        "user_id": "u1",
        "impression_id": "i-1",
        "ad_id": "ad1",
        "campaign_id": "c1",
        "advertiser_id": "adv1",
    },
    "conversion": {
        "type": "conversion",
        "event_id": "v-1",
        "event_time": T0,
        "user_id": "u1",
        "ad_id": "ad1",
        "campaign_id": "c1",
        "advertiser_id": "adv1",
        "click_id": "k-1",
        "conversion_type": "purchase",
        "value": 49.9,
        "currency": "EUR",
    },
    "search": {
        "type": "search",
        "event_id": "s-1",
        "event_time": T0,
        "user_id": "u1",
        "query": "cheap running shoes",
        "locale": "de-DE",
    },
    "user_profile": {
        "type": "user_profile",
        "event_id": "p-1",
        "event_time": T0,
        "user_id": "u1",
        "attributes": {"country": "DE", "age": 31, "age_band": "25-34", "premium": True},
        "interests": ["running", "travel"],
        "provider_labels": {"acme": {"gender": "female", "age_band": "25-34"}},
    },
}
REQUIRED = {
    "impression": ["ad_id", "campaign_id", "advertiser_id"],
    "click": ["impression_id", "ad_id", "campaign_id", "advertiser_id"],
    "conversion": ["ad_id", "campaign_id", "advertiser_id"],
    "search": ["query"],
    "user_profile": [],
}

SCHEMA = json.loads(SCHEMA_PATH.read_text())


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode()


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_events_round_trip(name: str) -> None:
    event = ev.validate_json(encode(VALID[name]))
    assert ev.event_type(event) == name
    again = ev.validate_json(ev.encode(event))
    assert again == event
    assert ev.event_time_ms(event) == 1767607200250


@pytest.mark.parametrize("name", sorted(VALID))
@pytest.mark.parametrize("field", ["event_id", "event_time", "user_id"])
def test_missing_common_field_is_a_schema_violation(name: str, field: str) -> None:
    payload = dict(VALID[name])
    del payload[field]
    with pytest.raises(ev.SchemaViolationError, match=f"missing required field `{field}`"):
        ev.validate_json(encode(payload))


@pytest.mark.parametrize("name", sorted(VALID))
def test_missing_type_specific_field(name: str) -> None:
    for field in REQUIRED[name]:
        payload = dict(VALID[name])
        del payload[field]
        with pytest.raises(ev.SchemaViolationError, match=field):
            ev.validate_json(encode(payload))


def test_specific_errors_name_the_problem() -> None:
    base = VALID["impression"]
    cases: list[tuple[bytes, type[ev.InvalidEventError], str]] = [
        (b"{", ev.MalformedJSONError, "truncated"),
        (b"\xff\xfe{}", ev.MalformedJSONError, "malformed"),
        (b"[1, 2]", ev.SchemaViolationError, "must be a JSON object"),
        (encode({**base, "type": "teleport"}), ev.UnknownEventTypeError, "teleport.*impression, click"),
        (encode({k: v for k, v in base.items() if k != "type"}), ev.UnknownEventTypeError, "type"),
        (
            encode({**base, "position": "2"}),
            ev.SchemaViolationError,
            r"Expected `int`, got `str` - at `\$.position`",
        ),
        (encode({**base, "position": 0}), ev.SchemaViolationError, "position"),
        # (every store downstream holds it as an int64)
        (
            encode({**base, "cost_micros": 2**63}),
            ev.SchemaViolationError,
            r"<= 9223372036854775807.*cost_micros",
        ),
        (encode({**base, "ad_ld": "x"}), ev.SchemaViolationError, "unknown field `ad_ld`"),
        (encode({**base, "event_time": "2026-01-05T10:00:00"}), ev.SchemaViolationError, "timezone"),
        (encode({**base, "event_time": 1767607200250}), ev.SchemaViolationError, "not an epoch number"),
        (
            encode({**base, "event_time": "1970-01-01T00:00:01Z"}),
            ev.SchemaViolationError,
            "outside 2000-01-01",
        ),
        (encode({**base, "event_id": ""}), ev.SchemaViolationError, "event_id"),
        (encode({**base, "country": "Germany"}), ev.SchemaViolationError, "country"),
        (encode({**base, "schema_version": 2}), ev.SchemaViolationError, "reads schema_version 1 events"),
        (encode({**VALID["search"], "query": "   "}), ev.SchemaViolationError, "non-whitespace"),
        (encode({**VALID["conversion"], "value": -1}), ev.SchemaViolationError, "value"),
        (encode({**VALID["conversion"], "currency": "euro"}), ev.SchemaViolationError, "currency"),
        (
            encode(
                {
                    "type": "user_profile",
                    "event_id": "p",
                    "event_time": T0,
                    "user_id": "u",
                    "action": "delete",
                    "interests": ["x"],
                }
            ),
            ev.SchemaViolationError,
            "a delete carries no",
        ),
        (
            encode({**VALID["user_profile"], "attributes": {"age": [1]}}),
            ev.SchemaViolationError,
            "attributes",
        ),
        # A field that must be an object is not the event itself (was "an event must be a JSON object")
        (
            encode({**VALID["user_profile"], "attributes": []}),
            ev.SchemaViolationError,
            r"^Expected `object`, got `array` - at `\$.attributes`$",
        ),
    ]
    for payload, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            ev.validate_json(payload)


def test_validate_accepts_structs_and_dicts_and_checks_struct_types() -> None:
    event = ev.validate_json(encode(VALID["click"]))
    assert ev.validate(event) == event
    assert ev.validate(msgspec.json.decode(encode(VALID["click"]))) == event
    bad = ev.Click(
        event_id="k",
        event_time=datetime.now(UTC),
        user_id="u",
        impression_id="i",
        ad_id=1,
        campaign_id="c",
        advertiser_id="a",  # type: ignore[arg-type]
    )
    with pytest.raises(ev.SchemaViolationError, match="ad_id"):
        ev.validate(bad)
    with pytest.raises(ev.SchemaViolationError, match="not list"):
        ev.validate([1, 2])


def test_published_schema_file_is_up_to_date() -> None:
    assert SCHEMA_PATH.read_text() == render_schema(), (
        "regenerate with: adreach schema --out streams/schemas/adreach-events-v1.schema.json"
    )


@pytest.mark.parametrize("name", sorted(VALID))
def test_published_schema_agrees_with_the_sdk(name: str) -> None:
    validator = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.FormatChecker())
    validator.validate(VALID[name])
    broken = {**VALID[name], "unexpected_field": 1}
    assert not validator.is_valid(broken)
    missing = {k: v for k, v in VALID[name].items() if k != "event_id"}
    assert not validator.is_valid(missing)


# -- property tests ----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash(payload: bytes) -> None:
    try:
        ev.validate_json(payload)
    except ev.InvalidEventError as exc:
        assert exc.reason


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_arbitrary_json_never_crashes(value: object) -> None:
    try:
        ev.validate_json(json.dumps(value).encode())
    except ev.InvalidEventError as exc:
        assert exc.reason


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(sorted(VALID)),
    field=st.sampled_from(sorted({f for p in VALID.values() for f in p})),
    replacement=json_values,
    drop=st.booleans(),
)
def test_mutated_valid_events_give_a_specific_error_or_a_valid_event(
    name: str, field: str, replacement: object, drop: bool
) -> None:
    """Any single-field mutation yields either a valid event or a specific, explained error."""
    payload = dict(VALID[name])
    if drop:
        payload.pop(field, None)
    else:
        payload[field] = replacement
    try:
        event = ev.validate_json(encode(payload))
    except ev.InvalidEventError as exc:
        assert type(exc) is not ev.InvalidEventError, "errors must use a specific subclass"
        assert exc.reason
    else:
        assert ev.validate_json(ev.encode(event)) == event


@settings(max_examples=200)
@given(
    user=st.text(min_size=1, max_size=40),
    offset_ms=st.integers(min_value=0, max_value=10 * 365 * 24 * 3600 * 1000),
    query=st.text(min_size=1, max_size=100).filter(lambda q: q.strip() != ""),
)
def test_generated_valid_searches_validate(user: str, offset_ms: int, query: str) -> None:
    when = datetime(2020, 1, 1, tzinfo=UTC) + timedelta(milliseconds=offset_ms)
    event = ev.Search(event_id="s", event_time=when, user_id=user, query=query)
    validated = ev.validate(event)
    assert validated.query == query
    assert ev.event_time_ms(validated) == int(when.timestamp() * 1000)
