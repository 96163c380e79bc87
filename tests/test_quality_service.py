"""Quality over real HTTP (uvicorn in a thread) on a simulated population with known providers.

The simulator draws each provider's labels from a known confusion matrix, so the number of
users truly 25-34 among those acme labels 25-34 is known exactly and the service's
true-category reach can be checked against it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import uvicorn
from conftest import free_port

from estimation import ReachForecaster, build_sample
from estimation.quality import simulate_campaigns
from estimation.server import create_app
from infra.settings import ReachSettings
from streams.simulation import SimulationConfig, Simulator, population_table
from streams.simulation.population import AGE_BANDS, GENDERS

USERS = 30_000


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Simulator, str]]:
    sim = Simulator(SimulationConfig(users=USERS, events=45_000, days=1, seed=11))
    directory = tmp_path_factory.mktemp("quality-service")
    pq.write_table(population_table(sim), directory / "population.parquet")
    settings = ReachSettings(seed=2)
    build_sample(directory / "population.parquet", directory / "sample", settings)
    forecaster = ReachForecaster.open(directory / "sample", settings=settings)
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
        yield sim, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        forecaster.close()


def _columns(sim: Simulator, k: int, campaigns: int, seed: int) -> dict[str, Any]:
    spec = sim.provider_specs[k]
    true = sim.population.gender if spec.attribute == "gender" else sim.population.age_band
    mix, vendor = simulate_campaigns(
        np.random.default_rng(seed),
        sim.labels[:, k],
        true,
        [str(x) for x in spec.labels],
        [str(x) for x in spec.categories],
        campaigns,
    )
    return {"mix": mix.to_pydict(), "truth": vendor.to_pydict()}


def _age_specs(sim: Simulator) -> list[int]:
    return [k for k, spec in enumerate(sim.provider_specs) if spec.attribute == "age_band"]


@pytest.fixture(scope="module")
def assessed(world: tuple[Simulator, str]) -> tuple[Simulator, str]:
    """Every provider's age_band assessed from 80 simulated campaigns and kept by the service."""
    sim, url = world
    for k in _age_specs(sim):
        body = {
            **_columns(sim, k, 80, seed=k),
            "provider": sim.provider_specs[k].provider,
            "attribute": "age_band",
        }
        response = httpx.post(
            f"{url}/v1/quality/aggregate", json={**body, "save": True, "bootstrap": 100}, timeout=60
        )
        assert response.status_code == 200, response.text
        payload = response.json()
        assert payload["saved"] and payload["identifiability"]["status"] == "identified"
        assert set(payload["matrix"]) == set(AGE_BANDS) and len(payload["ci95"]["25-34"]["25-34"]) == 2
    return world


def test_aggregate_assessment_then_true_category_reach(assessed: tuple[Simulator, str]) -> None:
    sim, url = assessed
    listed = httpx.get(f"{url}/v1/quality/assessments").json()["assessments"]
    assert {a["provider"] for a in listed} == {"acme", "databridge", "segmentco"}

    acme = next(k for k in _age_specs(sim) if sim.provider_specs[k].provider == "acme")
    segment = {"field": "provider_segments", "has_any": ["acme.age_band.25-34"]}
    plain = httpx.post(f"{url}/v1/reach", json={"targeting": segment}).json()
    wanted = {"provider": "acme", "attribute": "age_band", "category": "25-34"}
    answer = httpx.post(f"{url}/v1/reach", json={"targeting": segment, "true_category": wanted}).json()
    band = int(np.flatnonzero(AGE_BANDS == "25-34")[0])
    alive = sim.population.deleted_ms < 0
    exact = int((alive & (sim.labels[:, acme] == band) & (sim.population.age_band == band)).sum())
    low, high = answer["ci95"]
    assert low <= exact <= high, (answer, exact)
    assert answer["true_category"]["segment_reach"] == pytest.approx(plain["reach"])
    assert answer["reach"] < plain["reach"]
    # the interval is wider, relative to the estimate, than the plain segment reach's
    assert (high - low) / answer["reach"] > (plain["ci95"][1] - plain["ci95"][0]) / plain["reach"]
    assert answer["method"].endswith("+quality") and any("truly" in w for w in answer["warnings"])
    # with a horizon, every figure counts users truly in the category: audience included
    week = {"targeting": segment, "true_category": wanted, "horizon_days": 7}
    horizon = httpx.post(f"{url}/v1/reach", json=week).json()
    plain_week = httpx.post(f"{url}/v1/reach", json={"targeting": segment, "horizon_days": 7}).json()
    assert horizon["reach"] <= horizon["audience"] == pytest.approx(answer["reach"], rel=1e-9)
    assert horizon["audience"] < plain_week["audience"] and horizon["impressions"] < plain_week["impressions"]

    ranked = httpx.post(f"{url}/v1/quality/rank", json={"attribute": "age_band", "category": "25-34"}).json()
    order = [row["provider"] for row in ranked["providers"]]
    truth = {
        spec.provider: float(spec.confusion[band, band])
        for spec in sim.provider_specs
        if spec.attribute == "age_band"
    }
    assert order[0] == max(truth, key=lambda p: truth[p])
    assert all(row["true_reach"] <= row["segment_reach"] for row in ranked["providers"])
    by_reach = httpx.post(
        f"{url}/v1/quality/rank", json={"attribute": "age_band", "category": "25-34", "sort_by": "true_reach"}
    ).json()["providers"]
    reaches = [row["true_reach"] for row in by_reach]
    assert reaches == sorted(reaches, reverse=True)


def test_user_assessment_is_reweighted_to_the_served_sample(world: tuple[Simulator, str]) -> None:
    sim, url = world
    k = next(k for k, spec in enumerate(sim.provider_specs) if spec.attribute == "gender")
    ids = np.array(sim.population.user_ids.to_pylist())
    rng = np.random.default_rng(3)
    panel = rng.choice(USERS, size=3_000, replace=False)
    covered = np.flatnonzero(sim.labels[:, k] >= 0)
    body = {
        "labels": {
            "user_id": ids[covered].tolist(),
            "label": sim.provider_specs[k].labels[sim.labels[covered, k]].tolist(),
        },
        "truth": {"user_id": ids[panel].tolist(), "truth": GENDERS[sim.population.gender[panel]].tolist()},
    }
    response = httpx.post(f"{url}/v1/quality/user", json=body, timeout=60)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert "post-stratified to the reach sample" in payload["weighting"]
    assert set(payload["matrix"]) == {"female", "male"} and payload["metrics"]["female"]["recall"] is not None
    plain = httpx.post(f"{url}/v1/quality/user", json={**body, "reweight": False}).json()
    assert "uniform sample" in plain["weighting"]


@pytest.mark.parametrize(
    ("path", "body", "status", "fragments"),
    [
        (
            "/v1/reach",
            {
                "targeting": {"field": "country", "eq": "US"},
                "true_category": {"provider": "acme", "attribute": "gender", "category": "female"},
            },
            400,
            ["no quality assessment for provider 'acme' attribute 'gender'"],
        ),
        (
            "/v1/reach",
            {
                "targeting": {"field": "country", "eq": "US"},
                "true_category": {"provider": "acme", "attribute": "age_band", "category": "25-34"},
            },
            400,
            ["needs the targeting to select acme's age_band segment"],
        ),
        (
            "/v1/quality/aggregate",
            {
                "mix": {"campaign_id": ["c1"], "label": ["a"], "share": [0.7]},
                "truth": {"campaign_id": ["c1"], "category": ["a"], "share": [1.0]},
            },
            400,
            ["MIX shares must sum to 1", "invalid_input"],
        ),
        (
            "/v1/quality/aggregate",
            {"mix": {}, "truth": {}},
            400,
            ["mix must be an object of equally long columns"],
        ),
        (
            "/v1/quality/aggregate",
            {"mix": {"campaign_id": []}, "truth": {}, "bootstrap": 5},
            422,
            ["bootstrap"],
        ),
        (
            "/v1/quality/rank",
            {"attribute": "income", "category": "high"},
            400,
            ["no quality assessment for attribute"],
        ),
        (
            "/v1/quality/user",
            {"labels": {"user_id": ["x"], "label": ["a"]}, "truth": {"user_id": ["y"], "truth": ["a"]}},
            400,
            ["no user_id appears in both"],
        ),
        (  # was a 500 (OverflowError converting the column)
            "/v1/quality/aggregate",
            {
                "mix": {"campaign_id": ["c1", "c1"], "label": ["a", "b"], "count": [10**30, 2]},
                "truth": {"campaign_id": ["c1"], "category": ["a"], "share": [1.0]},
            },
            400,
            ["too large", "invalid_input"],
        ),
    ],
)
def test_quality_errors_are_4xx_naming_the_problem(
    assessed: tuple[Simulator, str], path: str, body: dict[str, Any], status: int, fragments: list[str]
) -> None:
    _, url = assessed
    response = httpx.post(f"{url}{path}", json=body, timeout=60)
    assert response.status_code == status, response.text
    for fragment in fragments:
        assert fragment in response.text
