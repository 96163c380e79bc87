"""Reach over real HTTP, from the real CLI, following real Kafka profile events.

The server runs in uvicorn (in a thread, or as ``adreach reach serve`` in a subprocess
with two shard processes); profile events go through the platform's producer into the
session's Tansu broker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pyarrow.parquet as pq
import pytest
import uvicorn
from conftest import free_port
from reach_data import population, with_dates

from estimation import ReachForecaster, build_sample
from estimation.server import MAX_QUERY_BODY_BYTES, create_app
from estimation.updates import ProfileFollower
from infra.settings import ReachSettings, Settings
from streams.producer import EventProducer

REPO = Path(__file__).resolve().parents[1]
N_USERS = 20_000


def _reach_settings(**kw: Any) -> ReachSettings:
    return ReachSettings(activity_field="visits_per_day", interests_field="tags", seed=4, **kw)


@pytest.fixture(scope="module")
def population_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("reach-pop") / "population.parquet"
    pq.write_table(with_dates(population(N_USERS)), path)
    return path


@pytest.fixture(scope="module")
def sample_dir(population_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reach-service") / "sample"
    build_sample(population_file, out, _reach_settings())
    return out


@pytest.fixture(scope="module")
def base_url(sample_dir: Path) -> Iterator[str]:
    forecaster = ReachForecaster.open(sample_dir, settings=_reach_settings())
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(forecaster), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        forecaster.close()


# -- HTTP ----------------------------------------------------------------------------------


def test_reach_answers_with_interval_and_support(base_url: str) -> None:
    body = {
        "targeting": {
            "and": [{"field": "market", "in": ["east", "west"]}, {"field": "tags", "has_any": ["t2"]}]
        }
    }
    response = httpx.post(f"{base_url}/v1/reach", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert isinstance(answer["reach"], float)
    low, high = answer["ci95"]
    assert low <= answer["reach"] <= high
    assert isinstance(answer["sample_users"], int) and answer["sample_users"] > 0
    everyone = httpx.post(f"{base_url}/v1/reach", json={"targeting": {"and": []}}).json()
    assert everyone["reach"] == N_USERS and everyone["ci95"] == [N_USERS, N_USERS]
    week = httpx.post(f"{base_url}/v1/reach", json={**body, "horizon_days": 7}).json()
    assert week["horizon_days"] == 7 and 0 < week["reach"] <= answer["reach"] * 1.2
    assert week["impressions"] > 0 and len(week["impressions_ci95"]) == 2


def test_dates_and_timestamps_are_targeted_with_iso_text(base_url: str, population_file: Path) -> None:
    body = {
        "targeting": {
            "and": [
                {"field": "signup", "between": ["2022-02-01", "2022-02-28"]},
                {"field": "last_seen", "between": ["2023-11-16T00:00:00Z", "2023-11-20T00:00:00+01:00"]},
            ]
        }
    }
    response = httpx.post(f"{base_url}/v1/reach", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    con = duckdb.connect()
    con.register("pop", pq.read_table(population_file))
    truth = con.execute(
        "SELECT count(*) FROM pop WHERE signup BETWEEN DATE '2022-02-01' AND DATE '2022-02-28' "
        "AND last_seen BETWEEN TIMESTAMPTZ '2023-11-16 00:00:00+00' AND TIMESTAMPTZ '2023-11-19 23:00:00+00'"
    ).fetchall()[0][0]
    assert answer["sample_users"] > 0 and answer["ci95"][0] <= truth <= answer["ci95"][1], (answer, truth)


def test_fields_and_docs(base_url: str) -> None:
    fields = httpx.get(f"{base_url}/v1/reach/fields").json()
    by_name = {f["name"]: f for f in fields["fields"]}
    assert set(by_name) == {
        "market",
        "plan",
        "level",
        "score",
        "paid",
        "tags",
        "signup",
        "last_seen",
        "first_seen",
    }
    assert by_name["market"]["kind"] == "categorical" and "island" in by_name["market"]["values"]
    assert by_name["level"]["kind"] == "integer" and by_name["level"]["minimum"] >= 1
    assert by_name["tags"]["kind"] == "list" and fields["operators"]["list"] == ["has_any", "has_all"]
    assert by_name["signup"]["kind"] == "date" and by_name["signup"]["minimum"] == "2022-01-08"
    assert by_name["last_seen"]["kind"] == "timestamp" and by_name["last_seen"]["minimum"].startswith(
        "2023-11-14T"
    )
    assert httpx.get(f"{base_url}/docs").status_code == 200
    assert "/v1/reach" in httpx.get(f"{base_url}/openapi.json").json()["paths"]
    assert httpx.get(f"{base_url}/v1/reach/health").json()["shards"][0]["ok"]


@pytest.mark.parametrize(
    ("body", "status", "fragments"),
    [
        ({"targeting": {"field": "country", "eq": "US"}}, 400, ["unknown field 'country'", "market"]),
        ({"targeting": {"field": "market", "eq": 5}}, 400, ["'market'", "strings", "number 5"]),
        ({"targeting": {"field": "level", "between": ["a", 3]}}, 400, ["$.between[0]", "finite numbers"]),
        ({"targeting": {"field": "tags", "in": ["t1"]}}, 400, ["has_any or has_all"]),
        ({"targeting": {"field": "signup", "eq": "08/01/2022"}}, 400, ["$.eq", "not a date", "YYYY-MM-DD"]),
        ({"targeting": {"and": [{"field": "plan"}]}}, 400, ["$.and[0]", "exactly one operator"]),
        ({"targeting": {"or": "market"}}, 400, ["$.or", "takes a list of expressions"]),
        ({"targeting": "market = north"}, 400, ["expected an object"]),
        ({}, 422, ["targeting"]),
        ({"targeting": {"and": []}, "horizon_days": -1}, 422, ["horizon_days"]),
        ({"targeting": {"and": []}, "horizon_days": 1e308}, 422, ["horizon_days", "3650"]),
        ({"targeting": {"and": []}, "horizonn_days": 3}, 422, ["horizonn_days"]),
    ],
)
def test_bad_queries_get_4xx_naming_the_problem(
    base_url: str, body: dict[str, Any], status: int, fragments: list[str]
) -> None:
    response = httpx.post(f"{base_url}/v1/reach", json=body)
    assert response.status_code == status, response.text
    for fragment in fragments:
        assert fragment in response.text
    if status == 400:
        assert response.json()["detail"]["error"] in {"unknown_field", "invalid_value", "malformed_targeting"}


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "not valid JSON: Expecting property name enclosed in double quotes at character 1"),
        (b'{"targeting": {"and": []}} xx', "not valid JSON: Extra data at character 27"),
        (b"", "the request body is empty"),
        (b'{"targeting": {"field": "market", "eq": "\xff"}}', "not UTF-8 text (byte 41: invalid start byte)"),
        (b'{"targeting": {"field": "level", "between": [' + b"9" * 5000 + b", null]}}", "more digits"),
    ],
)
def test_a_body_that_cannot_be_parsed_is_a_400_saying_why(base_url: str, body: bytes, fragment: str) -> None:
    for route in ("/v1/reach", "/v1/quality/rank", "/v1/quality/user"):
        response = httpx.post(
            f"{base_url}{route}", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400, (route, response.text)
        detail = response.json()["detail"]
        assert detail["error"] == "malformed_body" and fragment in detail["message"], (route, detail)


def test_json_of_the_wrong_shape_stays_a_422_and_oversized_queries_a_413(base_url: str) -> None:
    assert httpx.post(f"{base_url}/v1/reach", json=[]).status_code == 422
    huge = {"targeting": {"field": "market", "eq": "x" * MAX_QUERY_BODY_BYTES}}
    response = httpx.post(f"{base_url}/v1/reach", json=huge)
    assert response.status_code == 413
    assert response.json()["detail"]["error"] == "body_too_large"

    def chunked(data: bytes) -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for start in range(0, len(data), 65_536):
            yield data[start : start + 65_536]

    headers = {"content-type": "application/json"}
    big = httpx.post(f"{base_url}/v1/reach", content=chunked(json.dumps(huge).encode()), headers=headers)
    small = httpx.post(
        f"{base_url}/v1/reach", content=chunked(b'{"targeting": {"and": []}}'), headers=headers
    )
    assert big.status_code == 413 and small.status_code == 200 and small.json()["reach"] > 0
    # below the limit, a long unknown value is named in a warning, not echoed back whole
    long_value = {"targeting": {"field": "market", "in": ["y" * 500_000] + [f"zz{i}" for i in range(50)]}}
    answer = httpx.post(f"{base_url}/v1/reach", json=long_value)
    assert answer.status_code == 200 and answer.json()["reach"] == 0
    assert len(answer.content) < 20_000
    warnings = answer.json()["warnings"]
    assert "(500,000 characters)" in warnings[0] and warnings[-1] == "market: 31 more values no user had"


def test_json_nested_past_the_parser_is_a_structured_400(base_url: str) -> None:
    # Deeper than Python's JSON parser goes: FastAPI's own 400 carries a bare string detail.
    depth = 5_000
    body = '{"targeting": ' + '{"not": ' * depth + '{"field": "country", "eq": "US"}' + "}" * depth + "}"
    response = httpx.post(
        f"{base_url}/v1/reach", content=body.encode(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert detail["error"] == "malformed_body"
    assert "32 levels" in detail["message"]
    assert httpx.get(f"{base_url}/v1/no-such-route").json() == {"detail": "Not Found"}  # others unchanged


# -- Kafka profile events ----------------------------------------------------------------


def _profile(user_id: str, **attributes: Any) -> dict[str, Any]:
    return {
        "type": "user_profile",
        "event_id": uuid.uuid4().hex,
        "event_time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "user_id": user_id,
        "action": "upsert",
        "attributes": attributes,
        "interests": ["t7", "streamed"],
    }


def _delete(user_id: str) -> dict[str, Any]:
    return {
        "type": "user_profile",
        "event_id": uuid.uuid4().hex,
        "event_time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "user_id": user_id,
        "action": "delete",
    }


def _island_users(population_file: Path) -> list[str]:
    table = pq.read_table(population_file, columns=["user_id", "market"])
    return [
        u
        for u, m in zip(table.column("user_id").to_pylist(), table.column("market").to_pylist(), strict=True)
        if m == "island"
    ]


def test_follower_applies_new_users_changes_and_deletions(
    kafka: Settings, sample_dir: Path, population_file: Path
) -> None:
    settings = kafka.model_copy(update={"reach": _reach_settings()})
    islanders = _island_users(population_file)
    with ReachForecaster.open(sample_dir, settings=settings.reach) as reach:
        outpost_before = reach.estimate({"field": "market", "eq": "outpost"}).reach
        with EventProducer(settings) as producer:
            for i in range(300):
                producer.send(
                    _profile(f"stream-{i}", market="outpost", plan="pro", level=12, paid=True, score=1.0)
                )
            for user in islanders:
                producer.send(_delete(user))
            producer.send(_profile(islanders[0], market="island", plan="free"))  # deleted first: stays gone
            other = {"type": "impression", "event_id": "x", "event_time": "2026-01-05T00:00:00Z"}
            producer.send({**other, "user_id": "u", "ad_id": "a", "campaign_id": "c", "advertiser_id": "v"})
        follower = ProfileFollower(settings, reach)
        try:
            deadline = time.monotonic() + 60
            expected = 300 + len(islanders) + 1
            while follower.stats.profiles < expected and time.monotonic() < deadline:
                follower.poll_once()
        finally:
            follower.stop()
        assert follower.stats.profiles == expected, follower.to_json()
        outpost = reach.estimate({"field": "market", "eq": "outpost"})
        island = reach.estimate({"field": "market", "eq": "island"})
        streamed = reach.estimate({"field": "tags", "has_any": ["streamed"]})
    assert outpost.reach == outpost_before + 300
    assert island.reach == 1 and island.sample_users <= 1  # only the re-profiled (newer) user is back
    assert streamed.ci95[0] <= 301 <= streamed.ci95[1]


# -- CLI -----------------------------------------------------------------------------------


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADREACH_")}
    env.update(extra or {})
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["ADREACH_REACH__ACTIVITY_FIELD"] = "visits_per_day"
    env["ADREACH_REACH__INTERESTS_FIELD"] = "tags"
    return env


def _adreach(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "infra.cli", *args],
        capture_output=True,
        text=True,
        env=env or _env(),
        timeout=120,
    )


def test_cli_build_and_serve_with_two_shards_following_kafka(
    population_file: Path, tmp_path: Path, cli_env: dict[str, str], kafka: Settings
) -> None:
    out = tmp_path / "sample"
    pop = str(population_file)
    built = _adreach(
        "reach", "build", "--population", pop, "--out", str(out), "--sample-rate", "0.2", "--seed", "5"
    )
    assert built.returncode == 0, built.stderr
    assert "built reach sample" in built.stdout and (out / "manifest.json").is_file()
    missing = _adreach("reach", "build", "--population", str(tmp_path / "nope.parquet"), "--out", str(out))
    assert missing.returncode == 2 and "no such population file" in missing.stderr
    bad_rate = _adreach("reach", "build", "--population", pop, "--out", str(out), "--sample-rate", "2")
    assert bad_rate.returncode == 2 and "sample_rate" in bad_rate.stderr
    no_sample = _adreach("reach", "serve", "--sample", str(tmp_path))
    assert no_sample.returncode == 2 and "not a reach sample" in no_sample.stderr

    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "infra.cli",
            "reach",
            "serve",
            "--sample",
            str(out),
            "--port",
            str(port),
            "--shards",
            "2",
            "--follow",
        ],  # fmt: skip
        env=_env(cli_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        health: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                health = httpx.get(f"{url}/v1/reach/health", timeout=5).json()
                break
            except httpx.HTTPError:
                assert server.poll() is None, server.communicate()[1]
                time.sleep(0.3)
        assert [s["ok"] for s in health["shards"]] == [True, True], health
        query = {"targeting": {"field": "market", "eq": "outpost"}}
        before = httpx.post(f"{url}/v1/reach", json=query).json()["reach"]
        with EventProducer(kafka) as producer:
            for i in range(50):
                producer.send(_profile(f"cli-{i}", market="outpost", plan="basic"))
        deadline = time.monotonic() + 60
        after = before
        while after != before + 50 and time.monotonic() < deadline:
            time.sleep(0.3)
            after = httpx.post(f"{url}/v1/reach", json=query).json()["reach"]
        assert after == before + 50
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
