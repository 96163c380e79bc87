"""The embedded stream engine end to end: real broker, real worker processes, real Feast repo.

Every test produces simulated traffic (plus malformed and very late events) through the
SDK, runs ``adreach stream run`` as a separate process, reads the features back through
Feast's own SDK and compares them, value for value, with the DuckDB reference
computation over the same events. The events the reference must leave out (too late)
are found by an independent re-statement of the lateness rule over the topic's contents.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from confluent_kafka import Producer

from features.definitions import FEATURE_GROUPS, FeatureGroup, normalize_query
from features.reference import reference_features
from infra.settings import Settings
from streams.engine.router import normalize_queries
from streams.producer import EventProducer
from streams.simulation import SimulationConfig, Simulator
from tests.kafka_helpers import Record, consume

REQUIRED = ("type", "event_id", "event_time", "user_id")
COLUMNS = ("ad_id", "campaign_id", "advertiser_id", "query", "cost_micros", "value", "action")
READ_TYPES: dict[str, type | tuple[type, ...]] = {
    **dict.fromkeys(
        ("type", "event_id", "event_time", "user_id", "ad_id", "campaign_id", "advertiser_id"), str
    ),
    "query": str,
    "action": str,
    "cost_micros": int,
    "value": (int, float),
}
# The SDK's event-time forms, restated for the reference: RFC 3339 (t/T/space, z/Z, any fraction).
RFC3339 = re.compile(r"\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:?\d\d)")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
FUTURE_TIME = "2031-01-05T10:00:00Z"  # more than stream.max_future_s (a day) ahead of any test run


def engine_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADREACH_")}
    stream = settings.stream
    env.update(
        {
            "ADREACH_STATE_DIR": str(settings.state_dir),
            "ADREACH_BROKER__PORT": str(settings.broker.port),
            "ADREACH_KAFKA__TOPICS__EVENTS": settings.kafka.topics.events,
            "ADREACH_KAFKA__TOPICS__DEAD_LETTER": settings.kafka.topics.dead_letter,
            "ADREACH_KAFKA__TOPICS__PARTITIONS": str(settings.kafka.topics.partitions),
            "ADREACH_STREAM__CONSUMER_GROUP": stream.consumer_group,
            "ADREACH_STREAM__REPARTITION_TOPIC": stream.repartition_topic,
            "ADREACH_STREAM__REPARTITION_PARTITIONS": str(stream.repartition_partitions),
            "ADREACH_STREAM__ALLOWED_LATENESS_S": str(stream.allowed_lateness_s),
            "ADREACH_STREAM__FLUSH_INTERVAL_MS": str(stream.flush_interval_ms),
            "ADREACH_STREAM__BACKLOG_FLUSH_INTERVAL_MS": str(stream.backlog_flush_interval_ms),
            "ADREACH_STREAM__BATCH_MAX_EVENTS": str(stream.batch_max_events),
            "ADREACH_STREAM__COMPILED_DECODE": json.dumps(stream.compiled_decode),
            "ADREACH_STREAM__CHECKPOINT_INTERVAL_S": str(stream.checkpoint_interval_s),
            "ADREACH_STREAM__RETRY_INITIAL_S": str(stream.retry_initial_s),
            "ADREACH_STREAM__RETRY_MAX_S": str(stream.retry_max_s),
            "ADREACH_STREAM__FULL_REWRITE_INTERVAL_S": json.dumps(stream.full_rewrite_interval_s),
            "ADREACH_FEATURES__ONLINE_STORE": settings.features.online_store,
            "ADREACH_FEATURES__REDIS_CONNECTION": settings.features.redis_connection,
            "ADREACH_FEATURES__PROJECT": settings.features.project,
        }
    )
    return env


def start_engine(settings: Settings, *args: str) -> subprocess.Popen[str]:
    adreach = str(Path(os.sys.executable).parent / "adreach")
    return subprocess.Popen(
        [adreach, "stream", "run", *args],
        env=engine_env(settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str], timeout_s: float) -> tuple[str, str]:
    """The engine's output once it exits with 0; on a timeout, stopped, with what it printed."""
    try:
        out, err = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
        try:
            out, err = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        printed = f"{out[-3000:]}\n{err[-6000:]}"
        raise AssertionError(f"the engine did not exit in {timeout_s:.0f} s:\n{printed}") from None
    assert process.returncode == 0, err
    return out, err


def run_engine(settings: Settings, idle_s: float = 3.0, timeout_s: float = 240.0) -> str:
    process = start_engine(settings, "--until-idle", str(idle_s), "--every", "1")
    out, err = finish(process, timeout_s)
    return out + err


def simulated_payloads(users: int, events: int, seed: int) -> list[bytes]:
    simulator = Simulator(SimulationConfig(users=users, events=events, days=1.0, seed=seed, campaigns=40))
    return [line for batch in simulator.batches() for line in batch.to_json_lines()]


def produce(settings: Settings, payloads: list[bytes]) -> None:
    with EventProducer(settings) as producer:
        for payload in payloads:
            producer.send_json(payload)


def produce_raw(settings: Settings, items: list[tuple[bytes, bytes | None]]) -> None:
    """Bypass the SDK's validation: what a misbehaving producer would send."""
    producer = Producer(settings.kafka_client_config())
    for key, value in items:
        producer.produce(settings.kafka.topics.events, value, key)
    assert producer.flush(30) == 0


def bad_events(user: str, late_time: str) -> list[tuple[bytes, bytes]]:
    """Events both engines must dead-letter (with the reference's ``expected_events`` leaving them out)."""
    recent = {
        "type": "impression",
        "event_time": "2026-01-05T10:00:00Z",
        "user_id": user,
        "ad_id": "ad1",
        "campaign_id": "c1",
        "advertiser_id": "adv1",
        "cost_micros": 1_000,
    }
    late = {
        "type": "click",
        "event_id": "late-click-1",
        "event_time": late_time,
        "user_id": user,
        "impression_id": "imp-x",
        "ad_id": "ad1",
        "campaign_id": "c1",
        "advertiser_id": "adv1",
    }
    return [
        (user.encode(), b'{"type": "impression", "event_id": '),
        (
            user.encode(),
            b'{"type": "teleport", "event_id": "t1", "event_time": "2026-01-05T10:00:00Z", "user_id": "u"}',
        ),
        (
            user.encode(),
            b'{"type": "search", "event_id": "s1", "event_time": "2026-01-05T10:00:00Z", "user_id": "u"}',
        ),
        (user.encode(), json.dumps(late).encode()),
        # A device clock years ahead: dead-lettered, and it must not make its partition's
        # later events "too late" (tests produce simulated events after these).
        (user.encode(), json.dumps({**late, "event_id": "future-1", "event_time": FUTURE_TIME}).encode()),
        # Valid JSON the SDK refuses on fields the engines read: an empty ad id (it would
        # become an ad entity of its own), and an event of a schema version to come.
        (user.encode(), json.dumps({**recent, "event_id": "empty-ad-1", "ad_id": ""}).encode()),
        (user.encode(), json.dumps({**recent, "event_id": "version-2-1", "schema_version": 2}).encode()),
    ]


def expected_events(settings: Settings, records: list[Record]) -> tuple[pa.Table, set[str]]:
    """The topic's valid, on-time events as the reference's input, and the late events' ids.

    Lateness restated independently of the engine: per partition, in offset order, an event
    is late when its time is more than the allowed lateness behind the maximum before it.
    Events more than ``stream.max_future_s`` ahead of now are left out and move no maximum.
    """
    now_ms = time.time() * 1000
    rows: list[dict[str, object]] = []
    late: set[str] = set()
    watermark: dict[int, int] = {}
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        try:
            event = json.loads(record.value)
        except json.JSONDecodeError:
            continue
        if event.get("type") not in ("impression", "click", "conversion", "search", "user_profile"):
            continue
        if event["type"] == "search" and not str(event.get("query", "")).strip():
            continue
        version = event.get("schema_version", 1)
        if type(version) is not int or version != 1:
            continue
        # The JSON types of the fields features read (null is not "absent"), whatever the event type.
        if any(
            name in event and (isinstance(event[name], bool) or not isinstance(event[name], kind))
            for name, kind in READ_TYPES.items()
        ):
            continue
        # The SDK's lengths of the fields features read (the event types that have them).
        ids = ["event_id", "user_id"]
        if event["type"] in ("impression", "click", "conversion"):
            ids += ["ad_id", "campaign_id", "advertiser_id"]
        limits = dict.fromkeys(ids, 128) | ({"query": 1024} if event["type"] == "search" else {})
        if any(
            name in event and not (isinstance(event[name], str) and 1 <= len(event[name]) <= most)
            for name, most in limits.items()
        ):
            continue
        text = str(event.get("event_time"))
        if not RFC3339.fullmatch(text):
            continue
        # Python reads at most microseconds; the engines truncate finer fractions to milliseconds.
        when = datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", text.upper()))
        millis = (when - EPOCH) // timedelta(milliseconds=1)
        if millis > now_ms + settings.stream.max_future_s * 1000:
            continue
        before = watermark.get(record.partition)
        # A deletion is never late and moves no watermark (its time is often the request's).
        deletion = event["type"] == "user_profile" and event.get("action") == "delete"
        if (
            before is not None
            and millis < before - settings.stream.allowed_lateness_s * 1000
            and not deletion
        ):
            late.add(event["event_id"])
            continue
        if not deletion:
            watermark[record.partition] = max(before or millis, millis)
        fields = {c: event.get(c) for c in REQUIRED[:2] + REQUIRED[3:] + COLUMNS}
        rows.append({"event_time": EPOCH + timedelta(milliseconds=millis), **fields})
    schema = pa.schema(
        [
            ("type", pa.string()),
            ("event_id", pa.string()),
            ("user_id", pa.string()),
            ("event_time", pa.timestamp("ms", "UTC")),
            ("ad_id", pa.string()),
            ("campaign_id", pa.string()),
            ("advertiser_id", pa.string()),
            ("query", pa.string()),
            ("cost_micros", pa.int64()),
            ("value", pa.float64()),
            ("action", pa.string()),
        ]
    )
    return pa.Table.from_pylist(rows, schema), late


def online_features(settings: Settings, group: FeatureGroup, keys: list[str]) -> list[dict[str, object]]:
    """Read through Feast's own SDK, as a model would."""
    from features.store import open_store

    store = open_store(settings)
    names = [f"{group.name}:{feature.name}" for feature in group.features()]
    result = store.get_online_features(
        features=names, entity_rows=[{group.key: key} for key in keys]
    ).to_dict()
    return [{name: result[name][i] for name in result} for i in range(len(keys))]


def deleted_users(events: pa.Table) -> set[str]:
    """Users with a deletion after their last counted event (the simulator's deleted users)."""
    deleting = pc.and_(
        pc.equal(events.column("type"), "user_profile"), pc.equal(events.column("action"), "delete")
    )
    return set(events.filter(pc.fill_null(deleting, False)).column("user_id").to_pylist())


def assert_features_match(settings: Settings, events: pa.Table) -> None:
    deleted = deleted_users(events)
    for group in FEATURE_GROUPS:
        expected = reference_features(events, group).to_pylist()
        keys = [str(row[group.key]) for row in expected]
        if group.key == "user_id" and deleted:  # their stored features are gone
            assert not deleted & set(keys)
            gone = online_features(settings, group, sorted(deleted))
            assert all(row[f.name] is None for row in gone for f in group.features()), group.name
        actual = online_features(settings, group, keys)
        mismatches = []
        for want, got in zip(expected, actual, strict=True):
            for feature in group.features():
                a, b = want[feature.name], got[feature.name]
                same = math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9) if isinstance(a, float) else a == b
                if not same:
                    mismatches.append((want[group.key], feature.name, a, b))
        assert not mismatches, f"{group.name}: {len(mismatches)} mismatches, e.g. {mismatches[:5]}"
        assert len(expected) > 0, group.name


def assert_offline_latest_matches_online(settings: Settings) -> None:
    """Each entity's newest offline row (latest event time, then latest created) holds its online features."""
    for group in FEATURE_GROUPS:
        parts = sorted((settings.feature_repo_dir / "data" / group.name).glob("part-*.parquet"))
        rows = pa.concat_tables([pq.read_table(part) for part in parts]).to_pylist()
        newest: dict[str, dict[str, object]] = {}
        for row in sorted(rows, key=lambda r: (r["event_timestamp"], r["created_timestamp"])):
            newest[str(row[group.key])] = row
        keys = sorted(newest)
        mismatches = []
        for key, got in zip(keys, online_features(settings, group, keys), strict=True):
            for feature in group.features():
                a, b = newest[key][feature.name], got[feature.name]
                same = math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9) if isinstance(a, float) else a == b
                if not same:
                    mismatches.append((key, feature.name, a, b))
        assert not mismatches, f"{group.name} offline vs online: {len(mismatches)}, e.g. {mismatches[:5]}"
        assert keys, group.name


def test_reference_query_key_matches_definitions() -> None:
    assert normalize_query("  Cheap   FLIGHTS\tto Rome ") == "cheap flights to rome"


ODD_QUERIES = ["a\u00a0b  Nbsp", "tab\vVert", "東京\u3000ホテル", "sep\x1cx", "\u2003 em  space \u2003"]


def odd_query_searches(user: str) -> list[tuple[bytes, bytes]]:
    """Valid searches whose blanks are not ASCII spaces: every engine must key them as Python does."""
    return [
        (
            user.encode(),
            json.dumps(
                {
                    "type": "search",
                    "event_id": f"odd-q{i}",
                    "event_time": "2026-01-05T10:00:00Z",
                    "user_id": user,
                    "query": query,
                }
            ).encode(),
        )
        for i, query in enumerate(ODD_QUERIES)
    ]


def test_the_engine_keys_queries_exactly_as_normalize_query() -> None:
    """The engine's Arrow form collapsed only ASCII blanks and lower-cased "İ" its own way, so
    such queries' popularity features did not join the query features keyed in Python."""
    queries = [*ODD_QUERIES, "İSTANBUL hotels", "ΟΔΟΣ", "Straße", "  ", None]
    keys = normalize_queries(pa.chunked_array([pa.array(queries[:4]), pa.array(queries[4:])])).to_pylist()
    assert keys == [None if q is None else normalize_query(q) for q in queries]


def extreme_amounts(user: str) -> list[tuple[bytes, bytes]]:
    """Valid events at the edges of the documented ranges: a cost of 2**63 - 1 micros (past
    the 2**53 a double holds exactly) and two values of 1e308 (their sum overflows)."""
    chain = {"user_id": user, "ad_id": "ad-x", "campaign_id": "c-x", "advertiser_id": "adv-x"}
    events = [
        {"type": "impression", "event_id": "max-cost-1", "cost_micros": 2**63 - 1},
        {"type": "conversion", "event_id": "huge-value-1", "value": 1e308},
        {"type": "conversion", "event_id": "huge-value-2", "value": 1e308},
    ]
    return [
        (user.encode(), json.dumps({**event, "event_time": "2026-01-05T10:00:00Z", **chain}).encode())
        for event in events
    ]


def deleted_user_events(user: str) -> list[tuple[bytes, bytes]]:
    """A user active at 10:00-10:03, deleted at 10:05, then an event from 10:04 read after the
    deletion (forgotten too): the user must end with no stored feature in any store. Then a
    second deletion stamped with the wall clock, far ahead of the simulated day: the events
    after it in its partition must stay on time (a deletion moves no watermark)."""
    chain = {"ad_id": "ad-del", "campaign_id": "c-del", "advertiser_id": "adv-del"}
    events = [
        {"type": "impression", "event_id": "del-imp-1", "event_time": "10:00", **chain},
        {"type": "click", "event_id": "del-clk-1", "event_time": "10:01", "impression_id": "i", **chain},
        {"type": "search", "event_id": "del-srch-1", "event_time": "10:02", "query": "private query"},
        {"type": "user_profile", "event_id": "del-1", "event_time": "10:05", "action": "delete"},
        {"type": "impression", "event_id": "del-imp-2", "event_time": "10:04", **chain},
    ]
    for e in events:
        e["event_time"] = f"2026-01-05T{e['event_time']}:00Z"
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    events.append({"type": "user_profile", "event_id": "del-2", "event_time": now, "action": "delete"})
    return [(user.encode(), json.dumps({**e, "user_id": user}).encode()) for e in events]


@pytest.mark.parametrize("compiled_decode", [True, False], ids=["compiled-reader", "msgspec-only"])
def test_features_in_feast_equal_the_reference_and_bad_events_are_dead_lettered(
    stream: Settings, compiled_decode: bool
) -> None:
    """Also with every message decoded by msgspec: the whole path where no C compiler built the reader."""
    stream = stream.model_copy(
        update={"stream": stream.stream.model_copy(update={"compiled_decode": compiled_decode})}
    )
    payloads = simulated_payloads(users=1_500, events=15_000, seed=11)
    bad = bad_events("u0000001", "2025-12-01T00:00:00Z")
    # (at 10:00 of the simulated day: on time only when produced before its traffic)
    first = odd_query_searches("u0000003") + extreme_amounts("u0000004") + deleted_user_events("u-deleted")
    produce_raw(stream, first)
    produce(stream, payloads[:7_000])
    produce_raw(stream, bad)
    produce(stream, payloads[7_000:])
    output = run_engine(stream)
    assert "dead-lettered" in output
    for group in FEATURE_GROUPS:  # the worker merged its per-cycle part files when it stopped
        parts = list((stream.feature_repo_dir / "data" / group.name).glob("part-*.parquet"))
        with_rows = [p for p in parts if pq.ParquetFile(p).metadata.num_rows]  # + Feast's empty schema file
        # (a group that purged deleted users merged every part file, Feast's empty one too)
        assert len(with_rows) == 1 and len(parts) == (1 if group.key == "user_id" else 2), parts

    records = consume(stream, stream.kafka.topics.events, len(payloads) + len(bad) + len(first))
    events, late = expected_events(stream, records)
    assert "late-click-1" in late
    assert not late & {json.loads(value)["event_id"] for _, value in first}  # (they count)
    assert_features_match(stream, events)
    user_rows = pq.read_table(stream.feature_repo_dir / "data" / "user_activity").column("user_id")
    assert "u-deleted" in deleted_users(events)
    assert not deleted_users(events) & set(user_rows.to_pylist())  # their history is purged offline too

    dead = consume(stream, stream.kafka.topics.dead_letter, 6 + len(late))
    reasons = {
        r.headers["adreach.error.class"].decode(): r.headers["adreach.error.reason"].decode() for r in dead
    }
    assert "MalformedJSONError" in reasons
    assert "LateEventError" in reasons and "allowed lateness" in reasons["LateEventError"]
    assert "ahead of the worker's clock" in reasons["FutureEventError"]
    said = " ".join(r.headers["adreach.error.reason"].decode() for r in dead)
    assert "search needs query" in said
    assert "ad_id must have 1 to 128 characters" in said and "schema_version" in said
    late_ids = {
        json.loads(r.value)["event_id"] for r in dead if r.headers["adreach.error.class"] == b"LateEventError"
    }
    assert late_ids == late


def test_a_partition_of_only_bad_messages_is_dead_lettered_once_and_never_stops_the_worker(
    stream: Settings,
) -> None:
    """A partition whose messages were all rejected has no watermark yet: checkpointing its
    offset crashed the worker (KeyError), and every restart dead-lettered them again. A
    read field that is not UTF-8 crashed the decoder (UnicodeDecodeError) the same way. A
    tombstone (null value) is dead-lettered as null, as it came."""
    not_utf8 = b'{"type": "search", "event_id": "s", "event_time": "2026-01-05T10:00:00Z", "user_id": "u", '
    bad = [
        (b"bad-only", b'{"type": "search"}'),
        (b"bad-only", b"\xff not json"),
        (b"bad-only", not_utf8 + b'"query": "caf\xe9"}'),
    ]
    produce_raw(stream, [*bad, (b"bad-only", None)])
    run_engine(stream)
    run_engine(stream)  # a restart resumes after them
    dead = consume(stream, stream.kafka.topics.dead_letter, len(bad) + 1)
    assert sorted(r.value for r in dead if not r.null) == sorted(value for _, value in bad)
    assert sum(r.null for r in dead) == 1
    assert "utf-8" in " ".join(r.headers["adreach.error.reason"].decode() for r in dead).lower()


def test_kill_9_mid_stream_then_restart_neither_loses_nor_double_counts(stream: Settings) -> None:
    payloads = simulated_payloads(users=1_500, events=30_000, seed=12)
    first, rest = payloads[:5_000], payloads[5_000:]
    produce(stream, first)
    engine = start_engine(stream)
    chunks = [rest[i : i + 2_500] for i in range(0, len(rest), 2_500)]
    feeder = threading.Thread(target=lambda: [produce(stream, c) or time.sleep(0.3) for c in chunks])
    try:
        repo_data = stream.feature_repo_dir / "data" / "user_activity"
        deadline = time.monotonic() + 120
        while len(list(repo_data.glob("part-*.parquet"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)  # a first checkpoint wrote offline rows: the worker is mid-stream
        feeder.start()
        time.sleep(1.5)
        assert engine.poll() is None, engine.communicate()[1]
    finally:
        engine.send_signal(signal.SIGKILL)
        engine.communicate()
        if feeder.is_alive() or feeder.ident is not None:
            feeder.join()
    run_engine(stream)
    records = consume(stream, stream.kafka.topics.events, len(payloads))
    events, _ = expected_events(stream, records)
    assert_features_match(stream, events)
    # Offline rows buffered when the worker was killed were recomputed on the replay.
    assert_offline_latest_matches_online(stream)


def test_two_workers_in_one_group_give_the_features_of_one(stream: Settings) -> None:
    payloads = simulated_payloads(users=1_500, events=15_000, seed=13)
    produce(stream, payloads)
    first = start_engine(stream, "--until-idle", "4", "--worker-id", "w1")
    second = start_engine(stream, "--until-idle", "4", "--worker-id", "w2")
    for process in (first, second):
        finish(process, 240)
    records = consume(stream, stream.kafka.topics.events, len(payloads))
    events, _ = expected_events(stream, records)
    assert_features_match(stream, events)


def test_rows_the_online_store_lost_are_whole_again_after_the_rewrite_interval(stream: Settings) -> None:
    """The online store loses a group's rows while the worker runs (as an evicting or restarted
    Redis would); with changed-feature writes, the next events of those entities after
    ``stream.full_rewrite_interval_s`` write them in full again, without a restart."""
    import sqlite3

    settings = stream.model_copy(
        update={"stream": stream.stream.model_copy(update={"full_rewrite_interval_s": 2.0})}, deep=True
    )
    payloads = simulated_payloads(users=300, events=8_000, seed=14)
    first, rest = payloads[:4_000], payloads[4_000:]
    produce(settings, first)
    engine = start_engine(settings)
    online = settings.feature_repo_dir / "online.db"

    def user_table_settled() -> tuple[str, int]:
        """The user group's SQLite table and its row count once it stops changing (the worker caught up)."""
        counts: list[int] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(0.5)
            assert engine.poll() is None, engine.communicate()[1]
            if not online.is_file():
                continue
            with sqlite3.connect(online) as db:
                tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
                table = next((t for t in tables if t.endswith("_user_activity")), "")
                counts.append(db.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0] if table else 0)
            if counts[-1] and counts[-3:] == [counts[-1]] * 3:
                return table, counts[-1]
        raise AssertionError(f"the worker did not settle: user rows {counts[-5:]}")

    try:
        table, _ = user_table_settled()
        with sqlite3.connect(online) as db:  # the store loses every user row
            db.execute(f'DELETE FROM "{table}"')
        time.sleep(5.0)  # a rewrite falls between the loss and the next events (interval 2 s)
        produce(settings, rest)
        user_table_settled()
    finally:
        engine.send_signal(signal.SIGINT)
        engine.communicate(timeout=60)
    records = consume(settings, settings.kafka.topics.events, len(payloads))
    events, _ = expected_events(settings, records)
    group = next(g for g in FEATURE_GROUPS if g.name == "user_activity")
    counted = {t for a in group.aggregations for t in a.event_types}  # what re-emits a user
    rest_users = {e["user_id"] for e in map(json.loads, rest) if e["type"] in counted}
    expected = [row for row in reference_features(events, group).to_pylist() if row["user_id"] in rest_users]
    assert len(expected) > 100
    actual = online_features(settings, group, [row["user_id"] for row in expected])
    mismatches = [
        (want["user_id"], feature.name, want[feature.name], got[feature.name])
        for want, got in zip(expected, actual, strict=True)
        for feature in group.features()
        if not (
            math.isclose(want[feature.name], got[feature.name], rel_tol=1e-9, abs_tol=1e-9)
            if isinstance(want[feature.name], float) and got[feature.name] is not None
            else want[feature.name] == got[feature.name]
        )
    ]
    assert not mismatches, f"{len(mismatches)} mismatches, e.g. {mismatches[:5]}"


def test_sdk_events_with_microsecond_times_and_long_queries_are_all_counted(stream: Settings) -> None:
    """What the typed SDK sends from ``datetime.now(UTC)`` (microseconds) and queries near the SDK's
    1,024-character limit (a shard's micro-batch of them is several MB: shipped in records under
    Kafka's 1 MB limit): every event counts, none is dead-lettered."""
    from random import Random

    from streams.events import Impression, Search

    rng = Random(5)
    start = datetime(2026, 1, 5, 10, 0, 0, 123_456, tzinfo=UTC)
    events: list[Impression | Search] = []
    for i in range(6_000):
        common = {
            "event_id": f"e{i}",
            "event_time": start + timedelta(milliseconds=97 * i),
            "user_id": f"u{i % 5}",
        }
        if i % 6:
            query = "".join(rng.choice("abcdefgh ") for _ in range(1_000)) + f" q{i}"
            events.append(Search(query=query, **common))
        else:
            events.append(Impression(ad_id=f"ad{i % 7}", campaign_id="c1", advertiser_id="adv1", **common))
    with EventProducer(stream) as producer:
        for event in events:
            producer.send(event)
    output = run_engine(stream)
    assert "; 0 dead-lettered" in output, output[-2000:]

    records = consume(stream, stream.kafka.topics.events, len(events))
    expected, late = expected_events(stream, records)
    assert expected.num_rows == len(events) and not late
    assert_features_match(stream, expected)


def test_lag_is_not_known_until_the_end_offsets_are_and_is_zero_once_caught_up(stream: Settings) -> None:
    """Progress lines must not claim "lag 0" before the worker knows where the partitions end.

    (Before the group assigns partitions, and before a fetch reports their end, lag used
    to read 0: `adreach stream run` printed "0 events ... lag 0" over a full topic.)
    """
    from streams.engine.worker import StreamWorker

    payloads = simulated_payloads(users=200, events=3_000, seed=3)
    produce(stream, payloads)
    seen: list[tuple[int, int | None]] = []
    worker = StreamWorker(stream, on_cycle=lambda stats, rows: seen.append((stats.events, worker.lag())))
    assert worker.lag() is None
    stats = worker.run(idle_exit_s=2.0)
    assert stats.events == len(payloads)
    assert seen[-1] == (len(payloads), 0)
    unread = [lag for events, lag in seen if events < len(payloads)]
    assert all(lag is None or lag > 0 for lag in unread), seen


def test_a_cycle_ships_each_shard_at_most_one_record_however_many_reads_it_took(stream: Settings) -> None:
    """Events are routed once per cycle: every routing ships one repartition record per shard,
    and reads of a few events each (live traffic, here forced by 50-event micro-batches)
    used to ship one per read. The features stay exactly the reference's."""
    from streams.engine.worker import StreamWorker

    cycles = {"batch_max_events": 50, "flush_interval_ms": 1_000, "backlog_flush_interval_ms": 1_000}
    settings = stream.model_copy(update={"stream": stream.stream.model_copy(update=cycles)})
    payloads = simulated_payloads(users=300, events=3_000, seed=5)
    produce(settings, payloads)
    stats = StreamWorker(settings).run(idle_exit_s=2.0)
    assert stats.events == len(payloads)
    assert 0 < stats.repartition_records <= settings.stream.repartition_partitions * stats.cycles, stats
    assert stats.cycles < len(payloads) // 50  # (many reads per cycle, or this would test nothing)
    events, _ = expected_events(settings, consume(settings, settings.kafka.topics.events, len(payloads)))
    assert_features_match(settings, events)


def checkpointed_offsets(shards: Path) -> dict[int, int]:
    """Per shard, the repartition offset its checkpoint file covers up to (its ``next_offset``)."""
    covered = {}
    for path in shards.glob("shard-*.npz"):
        with np.load(path, allow_pickle=False) as data:
            covered[int(path.stem.split("-")[1])] = int(json.loads(bytes(data["meta"]))["next_offset"] or 0)
    return covered


def test_a_write_in_flight_holds_back_the_next_cycle_and_every_checkpoint_until_it_is_stored(
    stream: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Features are stored by the worker's store thread while it reads on. One write at a time,
    and no checkpoint covers rows not yet stored: with one write held back (a slow store),
    no later cycle ends and no shard checkpoint file changes, though checkpoints fall due
    every 0.2 s; once the write goes through, the features of all events, those produced
    after it too, equal the reference."""
    from streams.engine import sink as sink_module
    from streams.engine.worker import StreamWorker

    quick = {"flush_interval_ms": 200, "backlog_flush_interval_ms": 200, "checkpoint_interval_s": 0.2}
    settings = stream.model_copy(update={"stream": stream.stream.model_copy(update=quick)})
    payloads = simulated_payloads(users=300, events=6_000, seed=9)
    first, rest = payloads[:3_000], payloads[3_000:]
    produce(settings, first)
    write = sink_module.FeatureSink.write
    held, release = threading.Event(), threading.Event()
    writes = 0

    def slow_store_write(self: sink_module.FeatureSink, *args: object) -> int:
        nonlocal writes
        writes += 1
        if writes == 2:  # the first write of the events produced later
            held.set()
            release.wait(60)
        return write(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(sink_module.FeatureSink, "write", slow_store_write)
    cycles: list[int] = []
    worker = StreamWorker(settings, on_cycle=lambda stats, rows: cycles.append(stats.cycles))
    outcome: list[object] = []
    runner = threading.Thread(target=lambda: outcome.append(worker.run(idle_exit_s=3.0)))
    runner.start()
    shards = settings.stream_state_dir / "shards"
    try:
        deadline = time.monotonic() + 120
        while worker.stats.feature_rows == 0 or not list(shards.glob("shard-*.npz")):
            assert time.monotonic() < deadline and runner.is_alive(), "the worker stored nothing"
            time.sleep(0.05)
        produce(settings, rest)
        assert held.wait(60), "the later events were never stored"
        time.sleep(0.5)  # (a checkpoint started before the held write finishes writing its files)
        files = {path.name: path.stat().st_mtime_ns for path in shards.glob("shard-*.npz")}
        ended = len(cycles)
        time.sleep(2.0)
        assert {path.name: path.stat().st_mtime_ns for path in shards.glob("shard-*.npz")} == files
        assert len(cycles) <= ended + 1, "cycles went on past a write in flight"  # (the one submitting it)
        # The held write's rows are in the state, and no checkpoint covers them yet.
        covered = checkpointed_offsets(shards)
        applied = {shard: worker._state.next_offset(shard) for shard in covered}
        assert any(covered[shard] < (applied[shard] or 0) for shard in covered), (covered, applied)
    finally:
        release.set()
        runner.join(timeout=240)
    assert outcome and worker.stats.events == len(payloads)
    events, _ = expected_events(settings, consume(settings, settings.kafka.topics.events, len(payloads)))
    assert_features_match(settings, events)
