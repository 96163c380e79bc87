"""`adreach simulate` and `adreach demo` end to end: every sink gets the same, valid events."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import duckdb
import pytest
from conftest import free_port
from kafka_helpers import consume

from infra.settings import Settings
from streams import validate_json

SMALL = ["--users", "2000", "--events", "20000", "--days", "1", "--seed", "7"]


def run(
    bin_path: str, args: list[str], env: dict[str, str], timeout: int = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([bin_path, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def jsonl_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    import os
    import sys

    out = tmp_path_factory.mktemp("sim-jsonl")
    bin_path = str(Path(sys.executable).parent / "adreach")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADREACH_")}
    result = run(bin_path, ["simulate", *SMALL, "--format", "jsonl", "--out", str(out)], env)
    return out, result


def test_simulate_to_jsonl_writes_valid_unique_events_and_the_ground_truth(
    jsonl_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    out, result = jsonl_run
    assert result.returncode == 0, result.stderr
    lines = (out / "events.jsonl").read_bytes().splitlines()
    events = [validate_json(line) for line in lines]
    assert 10_000 <= len(events) <= 40_000, "close to the requested 20,000"
    assert len({e.event_id for e in events}) == len(events)
    assert f"simulated {len(events):,} events" in result.stdout
    types = Counter(type(e).__name__ for e in events)
    assert {"Impression", "Click", "Search", "UserProfile"} <= set(types)
    for name in ["population.parquet", "providers.json", "campaigns.parquet", "manifest.json"]:
        assert (out / "truth" / name).is_file(), name
    manifest = json.loads((out / "truth" / "manifest.json").read_text())
    assert manifest, "the manifest describes the run"


def test_simulate_to_parquet_matches_jsonl_for_the_same_seed(
    tmp_path: Path,
    jsonl_run: tuple[Path, subprocess.CompletedProcess[str]],
    cli_env: dict[str, str],
    adreach_bin: str,
) -> None:
    result = run(adreach_bin, ["simulate", *SMALL, "--format", "parquet", "--out", str(tmp_path)], cli_env)
    assert result.returncode == 0, result.stderr
    parquet_ids = duckdb.sql(
        f"SELECT event_id FROM read_parquet('{tmp_path / 'events'}/*.parquet')"
    ).fetchall()
    jsonl_ids = [
        validate_json(line).event_id for line in (jsonl_run[0] / "events.jsonl").read_bytes().splitlines()
    ]
    assert sorted(i for (i,) in parquet_ids) == sorted(jsonl_ids)


def test_simulate_into_kafka_delivers_every_event_once(
    tmp_path: Path,
    kafka: Settings,
    cli_env: dict[str, str],
    adreach_bin: str,
    jsonl_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    result = run(adreach_bin, ["simulate", *SMALL, "--out", str(tmp_path)], cli_env)
    assert result.returncode == 0, result.stderr
    expected = [
        validate_json(line).event_id for line in (jsonl_run[0] / "events.jsonl").read_bytes().splitlines()
    ]
    records = consume(kafka, kafka.kafka.topics.events, expected=len(expected))
    delivered = Counter(validate_json(r.value).event_id for r in records)
    assert set(delivered.values()) == {1}
    assert sorted(delivered) == sorted(expected)
    assert consume(kafka, kafka.kafka.topics.dead_letter, expected=0, timeout_s=2) == []


def test_simulate_rejects_bad_options(cli_env: dict[str, str], adreach_bin: str, tmp_path: Path) -> None:
    result = run(
        adreach_bin, ["simulate", "--users", "0", "--format", "jsonl", "--out", str(tmp_path)], cli_env
    )
    assert result.returncode == 2
    assert "users" in result.stderr
    # These were tracebacks (OverflowError, FileExistsError); a start in 1999 wrote events the SDK refuses.
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for options, reason in (
        (["--days", "inf", "--out", str(tmp_path)], "days must be at most"),
        (["--out", str(a_file)], "is a file"),
    ):
        result = run(adreach_bin, ["simulate", "--format", "jsonl", *options], cli_env)
        assert result.returncode == 2 and reason in result.stderr, result.stderr
    early = {**cli_env, "ADREACH_SIMULATE__START": "1999-12-31T23:00:00Z"}
    result = run(adreach_bin, ["simulate", "--format", "jsonl", "--out", str(tmp_path)], early)
    assert result.returncode == 2 and "2000-01-01..2100-01-01" in result.stderr, result.stderr


def test_demo_runs_end_to_end_and_stops_the_broker_it_started(
    tmp_path: Path, cli_env: dict[str, str], adreach_bin: str
) -> None:
    env = {**cli_env, "ADREACH_STATE_DIR": str(tmp_path), "ADREACH_BROKER__PORT": str(free_port())}
    result = run(adreach_bin, ["demo", "--events", "30000", "--users", "3000"], env)
    assert result.returncode == 0, result.stderr
    assert "simulated" in result.stdout and "demo finished" in result.stdout
    assert "query features read back through Feast" in result.stdout  # issue 8
    assert (tmp_path / "demo" / "truth" / "population.parquet").is_file()
    assert run(adreach_bin, ["broker", "status"], env).returncode == 1, "the demo's broker was stopped"
