"""The compiled decode fast path gives exactly what msgspec gives, on any bytes.

The fast path accepts a message only when it is sure of it and hands the rest to msgspec,
so the one property that matters is equality with the msgspec-only decoder: the same
rows, values, positions and rejection reasons, whatever the messages hold.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.engine import decode
from streams.engine.decode import EventDecoder
from streams.simulation import SimulationConfig, Simulator

pytestmark = pytest.mark.skipif(
    not decode.FAST_DECODE_AVAILABLE, reason="the compiled decoder is not built (pip install -e . builds it)"
)

FAST, REFERENCE = EventDecoder(), EventDecoder(fast=False)


def float_bits(column: pa.ChunkedArray) -> list[int]:
    return column.fill_null(0.0).to_numpy().view(np.int64).tolist()


def assert_same_decoding(values: list[bytes | None]) -> None:
    fast, reference = FAST.decode(values), REFERENCE.decode(values)
    assert fast.events.schema == reference.events.schema
    assert fast.events.to_pydict() == reference.events.to_pydict()
    for name, column in zip(fast.events.column_names, fast.events.columns, strict=True):
        if pa.types.is_floating(column.type):  # bit for bit: -0.0 == 0.0, yet they differ
            assert float_bits(column) == float_bits(reference.events.column(name)), name
    assert fast.positions.tolist() == reference.positions.tolist()
    assert [(i, type(e).__name__, str(e)) for i, e in fast.rejected] == [
        (i, type(e).__name__, str(e)) for i, e in reference.rejected
    ]


def test_the_extension_is_built_where_the_project_is_installed() -> None:
    """CI installs with `pip install -e .`: the engine's tests must run on the path production takes."""
    assert decode.FAST_DECODE_AVAILABLE


def test_simulated_traffic_is_decoded_by_the_fast_path_alone_and_identically() -> None:
    simulator = Simulator(SimulationConfig(users=500, events=6_000, days=1.0, seed=11))
    values: list[bytes | None] = [line for batch in simulator.batches() for line in batch.to_json_lines()]
    assert FAST._fast_fields is not None
    _, handed_back = decode._fastdecode.decode(list(values), FAST._fast_fields)  # type: ignore[arg-type]
    assert handed_back == []  # the SDK's own encoding never needs msgspec
    assert_same_decoding(values)


BASE = {
    "type": "click",
    "event_id": "e1",
    "event_time": "2026-01-05T10:00:00.250Z",
    "user_id": "u1",
    "ad_id": "ad7",
    "campaign_id": "c3",
    "advertiser_id": "adv1",
    "impression_id": "i9",
    "cost_micros": 1500,
}

# Hand-picked edges of each rule the fast path decides itself or hands back.
EDGES: list[bytes] = [
    json.dumps(BASE).encode(),
    json.dumps(BASE, indent=2).encode(),  # whitespace everywhere
    b" \t\r\n" + json.dumps(BASE).encode() + b"\n ",
    json.dumps({**BASE, "ad_id": "caf\u00e9 \u2603 \U0001f600"}, ensure_ascii=False).encode(),  # raw UTF-8
    json.dumps({**BASE, "ad_id": "caf\u00e9"}).encode(),  # \u escape in a read field: handed back
    json.dumps({**BASE, "ad_id": 'say "hi"\\'}).encode(),
    json.dumps({**BASE, "note": 'x"\\\u00e9\ud83d\ude00'}).encode(),  # escapes in a skipped field
    json.dumps(BASE).encode().replace(b'"user_id"', b'"user\\u005fid"'),  # an escaped read key
    json.dumps(BASE).encode()[:-1] + b',"ad_id":"ad8"}',  # a repeated read field
    json.dumps(BASE).encode()[:-1] + b',"extra":1,"extra":2}',  # a repeated skipped field
    json.dumps({**BASE, "cost_micros": 2**63 - 1}).encode(),
    json.dumps({**BASE, "cost_micros": -(2**63)}).encode(),
    json.dumps({**BASE, "cost_micros": 2**63}).encode(),
    json.dumps({**BASE, "cost_micros": 123456789012345678}).encode(),  # 18 digits
    json.dumps({**BASE, "cost_micros": -0}).encode().replace(b"0}", b"-0}"),
    json.dumps({**BASE, "cost_micros": 1.0}).encode(),
    json.dumps({**BASE, "cost_micros": 1e3}).encode(),
    json.dumps(BASE).encode().replace(b"1500", b"01500"),
    json.dumps(BASE).encode().replace(b"1500", b"1500."),
    json.dumps(BASE).encode().replace(b"1500", b"+1500"),
    json.dumps({**BASE, "type": "conversion", "value": 12}).encode(),
    json.dumps({**BASE, "type": "conversion", "value": 12.5e-3}).encode(),
    json.dumps({**BASE, "type": "conversion", "value": 0.1}).encode(),
    json.dumps({**BASE, "type": "conversion"}).encode()[:-1] + b',"value":-0}',  # msgspec: +0.0
    json.dumps({**BASE, "type": "conversion"}).encode()[:-1] + b',"value":-0.0}',
    json.dumps({**BASE, "type": "conversion"}).encode()[:-1] + b',"value":-0e5}',
    json.dumps({**BASE, "type": "conversion"}).encode()[:-1] + b',"value":1e400}',
    json.dumps({**BASE, "type": "conversion"}).encode()[:-1] + b',"value":1e-400}',
    json.dumps({**BASE, "type": "conversion"}).encode()[:-1] + b',"value":NaN}',
    json.dumps({**BASE, "type": "conversion"}).encode()[:-1] + b',"value":12345678901234567890}',
    json.dumps({**BASE, "type": "conversion"}).encode()[:-1] + b',"value":0.30000000000000004441}',
    json.dumps({**BASE, "schema_version": 1}).encode(),
    json.dumps({**BASE, "schema_version": 1.0}).encode(),
    json.dumps({**BASE, "schema_version": None}).encode(),
    json.dumps({**BASE, "schema_version": "1"}).encode(),
    json.dumps({**BASE, "ad_id": None}).encode(),
    json.dumps({**BASE, "ad_id": 7}).encode(),
    json.dumps({**BASE, "ad_id": True}).encode(),
    json.dumps({**BASE, "ad_id": ["a"]}).encode(),
    json.dumps({**BASE, "ad_id": {"a": 1}}).encode(),
    json.dumps({**BASE, "deep": [[[[{"a": [None, True, False, -1.5e2]}]]]]}).encode(),
    b'{"d":' + b"[" * 70 + b"]" * 70 + b"," + json.dumps(BASE).encode()[1:],  # deeper than the fast path goes
    json.dumps(BASE).encode().replace(b'"ad7"', b'"ad\x017"'),  # a raw control character
    json.dumps(BASE).encode().replace(b'"ad7"', b'"ad\xe97"'),  # not UTF-8 in a read field
    json.dumps({**BASE, "note": "x"}).encode().replace(b'"x"', b'"\xe9"'),  # not UTF-8 in a skipped field
    json.dumps(BASE).encode().replace(b'"ad7"', b'"\xed\xa0\x80"'),  # an encoded surrogate
    json.dumps(BASE).encode().replace(b'"ad7"', b'"ad\xc3z"'),  # a lead byte without its continuation
    json.dumps(BASE).encode().replace(b'"ad7"', b'"ad\xe2\x82"'),  # a sequence cut by the closing quote
    json.dumps(BASE).encode().replace(b'"ad7"', b'"\xe0\x80\xaf"'),  # overlong, three bytes
    json.dumps(BASE).encode().replace(b'"ad7"', b'"\xf0\x8f\xbf\xbf"'),  # overlong, four bytes
    json.dumps(BASE).encode().replace(b'"ad7"', b'"\x80ad"'),  # a lone continuation byte
    json.dumps(BASE).encode().replace(b'"ad7"', b'"\xc0\xaf"'),  # an overlong encoding
    json.dumps(BASE).encode().replace(b'"ad7"', b'"\xf4\x90\x80\x80"'),  # past U+10FFFF
    json.dumps(BASE).encode() + b"x",
    json.dumps(BASE).encode() + json.dumps(BASE).encode(),
    json.dumps(BASE).encode()[:-1],
    json.dumps(BASE).encode()[:-1] + b",}",
    json.dumps(BASE).encode().replace(b", ", b",,", 1),
    b"\xef\xbb\xbf" + json.dumps(BASE).encode(),  # a byte-order mark
    b"{}",
    b"[]",
    b'"text"',
    b"",
    b'{"type": "search", "query": ""}',  # an empty text first (nothing appended to a fresh buffer)
    b'{"type": "click", "n": tru}',
    b'{"type": "click", "n": nul}',
]


TIMES = [
    "2026-01-05T10:00:00.250Z",
    "2026-01-05T10:00:00Z",
    "2026-01-05t10:00:00.250123456789z",
    "2026-01-05 10:00:00.2+01:30",
    "2026-01-05T10:00:00.250-0100",
    "2026-01-05T10:00:00.250-00:00",
    "2024-02-29T23:59:59.999+23:59",
    "2026-02-30T10:00:00Z",  # the form, not an instant
    "2026-13-05T10:00:00Z",
    "2026-01-05T24:00:00Z",
    "2026-01-05T23:59:60Z",
    "2026-01-05T10:00:00+24:00",
    "2026-01-05T10:00:00.Z",
    "2026-01-05T10:00:00+01",
    "2026-01-05T10:00:00+01:0",
    "2026-01-05T10:00:00+010",
    "2026-01-05T10:00Z",
    "2026-01-05T10:00:00",
    "2026-01-05",
    "2026-01-05T10:00:00Zjunk",
    "2026-01-05T10:00:00Z ",
    "\u0032026-01-05T10:00:00Z",  # an escape: handed back
    "2026-01-05T10:00:00\u005a",
    "+2026-01-05T10:00:00Z",
    "26-01-05T10:00:00Z",
    "2026-1-05T10:00:00Z",
    "2026-01-05X10:00:00Z",
    "0000-01-01T00:00:00Z",
    "9999-12-31T23:59:59.999999999Z",
]


def test_event_times_of_every_form_decode_as_msgspec_and_arrow_decode_them() -> None:
    """The fast path checks the form of RFC 3339 itself and leaves the values to Arrow."""
    values = [
        json.dumps({**BASE, "event_time": "T"}).encode().replace(b'"T"', f'"{t}"'.encode()) for t in TIMES
    ]
    assert_same_decoding(list(values))
    for value in values:
        assert_same_decoding([value, json.dumps(BASE).encode()])


def test_edge_cases_decode_as_msgspec_decodes_them() -> None:
    assert_same_decoding(list(EDGES))
    for edge in EDGES:  # one at a time too: a batch of one takes other branches
        assert_same_decoding([edge])


_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)
_number = st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
_json_leaf = st.one_of(st.none(), st.booleans(), _number, _text)
_json = st.recursive(
    _json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=8,
)
_field_values: dict[str, Any] = {
    "type": st.sampled_from(["impression", "click", "conversion", "search", "user_profile", "clik"]) | _json,
    "event_id": st.sampled_from(["e1", "e2", ""]) | _json,
    "event_time": st.sampled_from(TIMES) | st.datetimes(timezones=st.timezones()).map(str) | _json,
    "user_id": st.sampled_from(["u1", "u\u00e9", "u\\1"]) | _json,
    "ad_id": _text | _json,
    "query": _text | _json,
    "cost_micros": st.integers(-5, 2**64) | _json,
    "value": st.floats(allow_nan=False, allow_infinity=False) | _json,
    "action": st.sampled_from(["upsert", "delete", "remove"]) | _json,
    "schema_version": st.sampled_from([1, 2, 1.0]) | _json,
    "attributes": _json,
}


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    names = draw(st.lists(st.sampled_from(sorted(_field_values)), max_size=len(_field_values), unique=True))
    event = {name: draw(_field_values[name]) for name in names}
    text = json.dumps(event, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 1])))
    raw = text.encode("utf-8", "surrogatepass")
    cut = draw(st.one_of(st.none(), st.integers(0, max(len(raw) - 1, 0))))
    if cut is not None:  # damage it: drop, replace or insert a byte
        how = draw(st.sampled_from(["drop", "replace", "insert"]))
        byte = bytes([draw(st.integers(0, 255))])
        raw = raw[:cut] + (b"" if how == "drop" else byte) + raw[cut + (how != "insert") :]
    return raw


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(messages(), min_size=1, max_size=6))
def test_any_messages_decode_as_msgspec_decodes_them(values: list[bytes]) -> None:
    assert_same_decoding(list(values))
