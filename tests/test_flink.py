"""The Flink job against the embedded engine: same recorded events, same features in Feast.

One recorded event set (simulated traffic with its out-of-order and very late events,
plus hand-made malformed, offset-time and late events) is produced to a real Tansu
topic, run through ``adreach stream run`` (embedded engine, one Feast repo) and, after
``adreach stream flink-record``, through ``adreach stream flink --input`` (PyFlink local
mini-cluster, filesystem source, another Feast repo). The features read back through
Feast's own SDK must be identical, value for value. The JVM starts once for the module.

The Kafka source cannot run here (the connector jar is not installed and cannot be
downloaded); its generated DDL, configuration and the missing-jar error are tested.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from features.definitions import FEATURE_GROUPS
from features.feast_objects import offline_path
from infra.settings import Settings
from streams.flink.errors import FlinkConfigError
from streams.flink.job import (
    build_job_sql,
    feature_topics,
    flink_configuration,
    job_jars,
    sink_options,
)
from streams.flink.sql import DELETIONS_OUTPUT, interval
from streams.flink.writer import KafkaOutputWriter
from streams.topics import ensure_topics, existing_topics
from tests.conftest import stream_settings
from tests.kafka_helpers import consume
from tests.test_stream_engine import (
    bad_events,
    deleted_user_events,
    engine_env,
    expected_events,
    extreme_amounts,
    odd_query_searches,
    online_features,
    produce,
    produce_raw,
    run_engine,
    simulated_payloads,
)

ADREACH = str(Path(sys.executable).parent / "adreach")


def _offset_time_events(user: str) -> list[tuple[bytes, bytes]]:
    """Valid events in other zones and other RFC 3339 forms, and one that is not RFC 3339 (both refuse it)."""
    impression = {
        "type": "impression",
        "event_id": "imp-offset-1",
        "event_time": "2026-01-06T01:30:00.250+02:00",
        "user_id": user,
        "ad_id": "ad-offset",
        "campaign_id": "c-offset",
        "advertiser_id": "adv-offset",
        "placement": "feed",
        "position": 1,
        "cost_micros": 1_500,
    }
    forms = {
        "imp-micro-1": "2026-01-05T23:40:00.123456Z",  # Python's isoformat()
        "imp-nano-1": "2026-01-05T22:41:00.999999999-01:00",  # Java's Instant, truncated to .999
        "imp-lower-1": "2026-01-05t23:42:00.5z",
        "imp-space-1": "2026-01-06 00:43:00+0100",
        "imp-no-seconds-1": "2026-01-05T23:44Z",  # refused by the SDK, the decoder and the Flink job
    }
    copies = [{**impression, "event_id": key, "event_time": text} for key, text in forms.items()]
    return [(user.encode(), json.dumps(event).encode()) for event in [impression, *copies]]


@dataclass
class Parity:
    embedded: Settings
    flink: Settings
    expected_late: set[str]
    keys: dict[str, list[str]]
    flink_output: str


def _settings(base: Settings, state_dir: Path) -> Settings:
    return stream_settings(base, state_dir, "flink-parity")


@pytest.fixture(scope="module")
def parity(broker_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Parity]:
    """Both engines over one recorded event set (the expensive part, shared by the tests)."""
    if shutil.which("java") is None:
        pytest.fail("the Flink tests need Java 17 on the PATH (PyFlink starts a JVM)")
    root = tmp_path_factory.mktemp("flink-parity")
    base = broker_settings.model_copy(deep=True)
    suffix = uuid.uuid4().hex[:10]
    base.kafka.topics.events = f"test.events.{suffix}"
    base.kafka.topics.dead_letter = f"test.events.{suffix}.dlq"
    base.kafka.topics.partitions = 3
    ensure_topics(base)
    embedded = _settings(base, root / "embedded")
    flink = _settings(base, root / "flink")

    payloads = simulated_payloads(users=1_500, events=15_000, seed=21)
    # blanks other than ASCII spaces, keyed alike everywhere, and amounts at the edges of
    # their ranges (at 10:00 of the simulated day: on time only before its traffic)
    first = odd_query_searches("u0000003") + extreme_amounts("u0000004") + deleted_user_events("u-deleted")
    produce_raw(embedded, first)
    produce(embedded, payloads[:7_000])
    raw = first + bad_events("u0000001", "2025-12-01T00:00:00Z") + _offset_time_events("u0000002")
    produce_raw(embedded, raw[len(first) :])  # with a far-future event: later ones stay on time
    produce(embedded, payloads[7_000:])
    run_engine(embedded)

    records = consume(embedded, embedded.kafka.topics.events, len(payloads) + len(raw))
    events, late = expected_events(embedded, records)
    assert not late & {json.loads(value)["event_id"] for _, value in first}  # (they count)
    keys = {}
    for group in FEATURE_GROUPS:
        from features.reference import reference_features

        keys[group.name] = [str(k) for k in reference_features(events, group).column(group.key).to_pylist()]

    recorded = root / "recorded"
    env = engine_env(flink) | {
        "ADREACH_FLINK__CHECKPOINT_INTERVAL_S": "1",
        "ADREACH_FLINK__PARALLELISM": "2",
    }
    # A file left from an earlier recording of a wider topic: replayed, it would add its event.
    recorded.mkdir()
    with gzip.open(recorded / "partition-0042.jsonl.gz", "wb") as stale:
        stale.write(_offset_time_events("u0000002")[0][1] + b"\n")
    subprocess.run([ADREACH, "stream", "flink-record", "--output", str(recorded)], env=env, check=True)
    assert not (recorded / "partition-0042.jsonl.gz").exists()
    run = subprocess.run(
        [ADREACH, "stream", "flink", "--input", str(recorded)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-5000:]
    yield Parity(embedded, flink, late, keys, run.stdout)


def test_flink_features_in_feast_equal_the_embedded_engines(parity: Parity) -> None:
    assert "feature rows stored in Feast" in parity.flink_output
    for group in FEATURE_GROUPS:
        keys = parity.keys[group.name]
        assert keys, group.name
        embedded = online_features(parity.embedded, group, keys)
        flink = online_features(parity.flink, group, keys)
        mismatches = []
        for key, want, got in zip(keys, embedded, flink, strict=True):
            for feature in group.features():
                a, b = want[feature.name], got[feature.name]
                assert a is not None, (group.name, key, feature.name)  # the embedded engine stored it
                if isinstance(a, float) and isinstance(b, float):
                    same = math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
                else:
                    same = a == b
                if not same:
                    mismatches.append((key, feature.name, a, b))
        assert not mismatches, f"{group.name}: {len(mismatches)} mismatches, e.g. {mismatches[:5]}"


def assert_deleted_users_are_gone(settings: Settings, users: list[str]) -> None:
    """No stored feature of these users: none online (Feast's SDK), no offline row."""
    user = next(g for g in FEATURE_GROUPS if g.name == "user_activity")
    for row in online_features(settings, user, users):
        assert all(row[f.name] is None for f in user.features()), row
    stored = pq.read_table(offline_path(settings.feature_repo_dir / "data", user)).column("user_id")
    assert not set(users) & set(stored.to_pylist())


def test_a_deleted_user_has_no_stored_features_in_either_engine(parity: Parity) -> None:
    deleted = [key for key in ["u-deleted"] if key not in parity.keys["user_activity"]]
    assert deleted  # (the reference forgets the user too)
    assert "users deleted" in parity.flink_output
    for settings in (parity.embedded, parity.flink):
        assert_deleted_users_are_gone(settings, deleted)


def test_the_offset_time_event_counts_and_last_n_lists_are_filled(parity: Parity) -> None:
    """Guards against a vacuous comparison: the hand-made rows and non-empty lists are there."""
    user = next(g for g in FEATURE_GROUPS if g.name == "user_activity")
    ad = next(g for g in FEATURE_GROUPS if g.name == "ad_performance")
    (offset_ad,) = online_features(parity.flink, ad, ["ad-offset"])
    assert offset_ad["impressions_7d"] == 5  # every RFC 3339 form; the time without seconds refused
    users = online_features(parity.flink, user, parity.keys[user.name])
    assert sum(1 for row in users if row["last_queries"]) > 100
    assert sum(1 for row in users if row["last_clicked_ads"]) > 10


def test_late_events_are_the_ones_the_lateness_rule_names(parity: Parity) -> None:
    late_dir = Path(parity.flink.state_dir) / "flink" / "output" / "_late"
    rows = [
        json.loads(line)
        for path in late_dir.rglob("*")
        if path.is_file() and not path.name.startswith(".")
        for line in path.read_text().splitlines()
    ]
    assert "late-click-1" in parity.expected_late
    assert {row["event_id"] for row in rows} == parity.expected_late


def test_offline_store_history_ends_at_the_online_row(parity: Parity) -> None:
    """Every (entity, tile) row goes offline; the latest one per entity is the online value."""
    group = next(g for g in FEATURE_GROUPS if g.name == "campaign_performance")
    table = pq.read_table(offline_path(parity.flink.feature_repo_dir / "data", group))
    rows = sorted(table.to_pylist(), key=lambda r: (r[group.key], r["event_timestamp"]))
    latest = {row[group.key]: row for row in rows}
    assert set(latest) == set(parity.keys[group.name])
    assert len(rows) > 2 * len(latest)  # a history, not just the last state
    keys = sorted(latest)
    online = online_features(parity.flink, group, keys)
    for key, row in zip(keys, online, strict=True):
        assert row["impressions_24h"] == latest[key]["impressions_24h"]
        assert row["spend_micros_7d"] == latest[key]["spend_micros_7d"]  # integral micros: exact


def test_rows_on_the_feature_topics_reach_feast_like_the_files(parity: Parity, tmp_path: Path) -> None:
    """The Kafka sink's half that runs here: the job's rows, keyed on per-group topics of a
    real broker, stored by the Kafka writer into a third Feast repo, equal the file path's."""
    from confluent_kafka import Producer

    settings = parity.flink.model_copy(update={"state_dir": tmp_path / "state"}, deep=True)
    settings.flink.sink = "kafka"
    settings.flink.features_topic_prefix = f"test.features.{uuid.uuid4().hex[:8]}."
    settings.flink.consumer_group = f"flink-writer-{uuid.uuid4().hex[:8]}"
    created = ensure_topics(settings, feature_topics(settings))
    assert len(created) == len(FEATURE_GROUPS) + 2  # + late events, user deletions
    assert existing_topics(settings)[created[0]] == settings.kafka.topics.partitions
    output = parity.flink.flink_output_dir
    producer = Producer(settings.kafka_client_config())
    total = 0
    for group in FEATURE_GROUPS:
        lines = [
            line
            for path in sorted((output / group.name).iterdir())
            if not path.name.startswith(".")
            for line in path.read_bytes().splitlines()
        ]
        rows = sorted(
            ((json.loads(line), line) for line in lines if line),
            key=lambda pair: (pair[0][group.key], pair[0]["event_timestamp_ms"]),
        )
        topic = f"{settings.flink.features_topic_prefix}{group.name}"
        for row, line in rows:  # one entity's rows in tile order, keyed like the Flink sink
            producer.produce(topic, line, str(row[group.key]).encode())
        total += len(rows)
    deletions = [
        line
        for path in sorted((output / DELETIONS_OUTPUT).iterdir())
        if not path.name.startswith(".")
        for line in path.read_bytes().splitlines()
        if line
    ]
    assert deletions
    for line in deletions:
        producer.produce(
            f"{settings.flink.features_topic_prefix}deletions", line, json.loads(line)["user_id"].encode()
        )
    assert producer.flush(30) == 0
    writer = KafkaOutputWriter(settings)
    try:
        deadline = time.monotonic() + 90
        quiet = 0  # polls in a row that found nothing, once rows came (the group join takes a while)
        while quiet < 3 and time.monotonic() < deadline:
            before = (writer.rows_written, writer.users_deleted)
            writer.poll(1.0)
            idle = (writer.rows_written, writer.users_deleted) == before
            quiet = quiet + 1 if idle and writer.rows_written else 0
    finally:
        writer.close()
    assert writer.users_deleted == len({json.loads(line)["user_id"] for line in deletions})
    assert 0 < total - writer.rows_written < total // 100  # only the deleted users' rows were dropped
    for group in FEATURE_GROUPS:
        keys = parity.keys[group.name]
        assert online_features(settings, group, keys) == online_features(parity.flink, group, keys)
    assert_deleted_users_are_gone(settings, ["u-deleted"])


# -- the Kafka path: generated DDL and configuration (no connector jar here) ------------------


def _kafka_settings(tmp_path: Path, jar: Path | None) -> Settings:
    from infra.settings import load_settings

    return load_settings(
        state_dir=tmp_path,
        kafka={"bootstrap_servers": "kafka-0.kafka:9092,kafka-1.kafka:9092", "topics": {"events": "ev"}},
        stream={"allowed_lateness_s": 1_800},
        flink={
            "source": "kafka",
            "sink": "kafka",
            "kafka_connector_jar": jar,
            "parallelism": 8,
            "checkpoint_interval_s": 30,
            "kafka_properties": {"security.protocol": "SASL_SSL"},
        },
    )


def test_kafka_source_ddl_reads_partitions_with_per_partition_watermarks(tmp_path: Path) -> None:
    settings = _kafka_settings(tmp_path, None)
    script = build_job_sql(settings).script()
    source = script.split(";")[0]
    assert "'connector' = 'kafka'" in source
    assert "'topic' = 'ev'" in source
    assert "'properties.bootstrap.servers' = 'kafka-0.kafka:9092,kafka-1.kafka:9092'" in source
    assert "'properties.security.protocol' = 'SASL_SSL'" in source
    assert "'properties.isolation.level' = 'read_committed'" in source
    assert "METADATA FROM 'partition'" in source
    assert "- 1800000, 3)" in source  # watermark delay = allowed lateness
    assert "PARTITION BY `src_partition` ORDER BY `proc`" in script
    assert "`partition_max_ms` - 1800000" in script


def test_kafka_sink_is_transactional_and_keyed_by_entity(tmp_path: Path) -> None:
    settings = _kafka_settings(tmp_path, None)
    sinks, late, deletions = sink_options(settings)
    user = sinks["user_activity"]
    assert user["topic"] == "adreach.features.user_activity"
    assert user["sink.delivery-guarantee"] == "exactly-once"
    assert user["key.fields"] == "user_id"
    assert user["sink.transactional-id-prefix"] != sinks["ad_performance"]["sink.transactional-id-prefix"]
    assert late["topic"] == "adreach.features.late"
    assert deletions["topic"] == "adreach.features.deletions" and deletions["key.fields"] == "user_id"


def test_job_configuration_has_exactly_once_checkpoints_and_remote_target(tmp_path: Path) -> None:
    jar = tmp_path / "flink-sql-connector-kafka-4.0.1-2.0.jar"
    jar.write_bytes(b"PK")
    settings = _kafka_settings(tmp_path, jar)
    config = flink_configuration(settings, job_jars(settings), "flink-jobmanager:8081")
    assert config["execution.checkpointing.mode"] == "EXACTLY_ONCE"
    assert config["execution.checkpointing.interval"] == "30000 ms"
    assert config["parallelism.default"] == "8"
    assert config["pipeline.jars"] == jar.resolve().as_uri()
    assert (config["execution.target"], config["rest.address"], config["rest.port"]) == (
        "remote",
        "flink-jobmanager",
        "8081",
    )
    with pytest.raises(FlinkConfigError, match="host:port"):
        flink_configuration(settings, [], "flink-jobmanager")


def test_missing_connector_jar_fails_fast_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "lib" / "flink-sql-connector-kafka-4.0.1-2.0.jar"
    with pytest.raises(FlinkConfigError, match="flink.kafka_connector_jar"):
        job_jars(_kafka_settings(tmp_path, None))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADREACH_")}
    env |= {
        "ADREACH_STATE_DIR": str(tmp_path),
        "ADREACH_FLINK__KAFKA_CONNECTOR_JAR": str(missing),
        "COLUMNS": "400",
    }
    result = subprocess.run(
        [ADREACH, "stream", "flink", "--source", "kafka"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert f"Flink Kafka SQL connector jar not found: {missing}" in result.stderr


def test_an_invalid_option_is_named_by_its_flag_on_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADREACH_")}
    env |= {"ADREACH_STATE_DIR": str(tmp_path), "COLUMNS": "400"}
    result = subprocess.run(
        [ADREACH, "stream", "flink", "--monitor", "-1", "--parallelism", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "--monitor -1.0: Input should be greater than 0 (flink.monitor_interval_s)" in result.stderr
    assert "--parallelism 0: Input should be greater than or equal to 1 (flink.parallelism)" in result.stderr
    # The reach and query-feature commands name their options the same way.
    result = subprocess.run(
        [ADREACH, "reach", "build", "--population", "p.parquet", "--out", "s", "--sample-rate", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--sample-rate 2.0: Input should be less than or equal to 1 (reach.sample_rate)" in result.stderr


def test_interval_literals_cover_the_windows() -> None:
    assert interval(604_800_000 - 60_000) == "INTERVAL '6 23:59:00.000' DAY TO SECOND(3)"
    assert interval(540_000) == "INTERVAL '0 00:09:00.000' DAY TO SECOND(3)"


def test_a_changed_definition_changes_the_generated_job() -> None:
    """No second copy of the logic: a new aggregation appears in the job's views and output."""
    import dataclasses

    from features.definitions import Aggregation
    from streams.flink.sql import GroupPlan

    ads = next(g for g in FEATURE_GROUPS if g.name == "ad_performance")
    changed = dataclasses.replace(
        ads,
        aggregations=(*ads.aggregations, Aggregation("responses", "count", ("click", "conversion"))),
    )
    plan = GroupPlan(changed)
    columns = [name for name, _ in plan.sink_columns()]
    assert columns[2:] == [f.name for f in changed.features()]
    assert "responses_7d" in columns and "responses_7d" not in [n for n, _ in GroupPlan(ads).sink_columns()]
    views = "\n".join(plan.views())
    assert "`type` IN ('click', 'conversion')" in views
    assert "SUM(`a__responses`) OVER" in views


def test_a_recording_keeps_each_message_as_valid_or_invalid_as_it_was() -> None:
    """One message per line: a line break between tokens becomes a space, but one inside a
    string (invalid JSON) used to become a space too, and the replay counted the event."""
    from streams.engine.decode import EventDecoder
    from streams.flink.replay import _one_line

    head = b'{"type": "search", "event_id": "s", "event_time": "2026-01-05T10:00:00Z", "user_id": "u", '
    between_tokens, inside_a_string = head + b'\n"query": "q"}', head + b'"query": "a\nb"}'
    decoder = EventDecoder()
    for message in (between_tokens, inside_a_string):
        line = _one_line(message)
        assert b"\n" not in line
        assert decoder.decode([line]).events.num_rows == decoder.decode([message]).events.num_rows
