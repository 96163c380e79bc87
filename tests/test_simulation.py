"""The simulator's promises: seeded, valid, causal, targeted, correlated, shifting, late."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streams import validate_json
from streams.simulation import (
    JsonLinesSink,
    ParquetSink,
    SimulationConfig,
    SimulationConfigError,
    Simulator,
    simulate,
)
from streams.simulation.catalog import matches, row_view

SMALL = SimulationConfig(users=3_000, events=60_000, days=2.0, seed=11)


class Collect:
    def __init__(self) -> None:
        self.tables: list[pa.Table] = []

    def write(self, batch: object) -> None:
        self.tables.append(batch.table)  # type: ignore[attr-defined]

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def run() -> Iterator[tuple[Simulator, pa.Table]]:
    simulator = Simulator(SMALL)
    sink = Collect()
    simulate(SMALL, sink, None, simulator=simulator)
    yield simulator, pa.concat_tables(sink.tables)


def column(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False)


def millis(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).cast(pa.int64()).to_numpy()


def test_same_seed_same_events_other_seed_other_events() -> None:
    config = SimulationConfig(users=500, events=8_000, days=0.5, seed=3)
    first = pa.concat_tables([b.table for b in Simulator(config).batches()])
    again = pa.concat_tables([b.table for b in Simulator(config).batches()])
    other = pa.concat_tables(
        [b.table for b in Simulator(SimulationConfig(**{**config.__dict__, "seed": 4})).batches()]
    )
    assert first.equals(again)
    assert not first.equals(other)


def test_event_count_is_close_to_the_request(run: tuple[Simulator, pa.Table]) -> None:
    _, events = run
    assert abs(events.num_rows - SMALL.events) / SMALL.events < 0.15


def test_every_event_is_valid_and_unique(run: tuple[Simulator, pa.Table]) -> None:
    from streams.simulation import EventBatch

    _, events = run
    lines = EventBatch(events).to_json_lines()
    ids = [validate_json(line).event_id for line in lines]
    assert len(set(ids)) == len(ids) == events.num_rows


def test_clicks_follow_their_impressions_and_conversions_their_clicks(
    run: tuple[Simulator, pa.Table],
) -> None:
    _, events = run
    kind = column(events, "type")
    ids = column(events, "event_id")
    time_of = dict(zip(ids, millis(events, "event_time"), strict=True))
    user_of = dict(zip(ids, column(events, "user_id"), strict=True))
    clicks = np.nonzero(kind == "click")[0]
    conversions = np.nonzero(kind == "conversion")[0]
    assert clicks.size > 100 and conversions.size > 10
    times, users = millis(events, "event_time"), column(events, "user_id")
    for row, parent_column in [(r, "impression_id") for r in clicks] + [(r, "click_id") for r in conversions]:
        parent = column(events, parent_column)[row]
        assert time_of[parent] < times[row]
        assert user_of[parent] == users[row]


def test_no_events_from_a_user_after_their_deletion(run: tuple[Simulator, pa.Table]) -> None:
    simulator, events = run
    deleted = simulator.population.deleted_ms
    assert (deleted >= 0).sum() > 0, "the run should delete someone"
    user_number = np.array([int(u[1:]) for u in column(events, "user_id")])
    when = deleted[user_number]
    is_delete = column(events, "action") == "delete"
    after = (when >= 0) & (millis(events, "event_time") > when) & ~is_delete
    assert not after.any()


def test_impressions_honour_campaign_targeting() -> None:
    # A static world (no profile changes, no shifts) so the final population is the one served.
    config = SimulationConfig(
        users=2_000,
        events=30_000,
        days=1.0,
        seed=5,
        shifts=(),
        profile_update_rate_per_day=0.0,
        deletion_rate_per_day=0.0,
    )
    simulator = Simulator(config)
    events = pa.concat_tables([b.table for b in simulator.batches()])
    impressions = events.filter(pa.compute.equal(events.column("type"), "impression"))
    users = np.array([int(u[1:]) for u in column(impressions, "user_id")])
    campaigns = np.array([int(c[1:]) for c in column(impressions, "campaign_id")])
    view = row_view(simulator.population, users)
    targeted = 0
    for campaign in np.unique(campaigns):
        rows = campaigns == campaign
        targeting = simulator.catalog.campaign_targeting[campaign]
        targeted += targeting != {"and": []}
        sub_view = {name: values[rows] for name, values in view.items()}
        assert matches(targeting, sub_view).all(), f"campaign c{campaign} served outside {targeting}"
    assert targeted > 10


def test_attributes_are_correlated(run: tuple[Simulator, pa.Table]) -> None:
    simulator, _ = run
    pop = simulator.population
    mobile_os = set(pop.os[pop.device == 0])
    desktop_os = set(pop.os[pop.device == 1])
    assert mobile_os <= {"ios", "android"} and desktop_os <= {"windows", "macos", "linux"}
    young = pop.age < 25
    assert (pop.device[young] == 0).mean() > (pop.device[pop.age >= 65] == 0).mean() + 0.1


def test_provider_labels_follow_the_stated_confusion_matrices(run: tuple[Simulator, pa.Table]) -> None:
    simulator, _ = run
    for k, spec in enumerate(simulator.provider_specs):
        labels = simulator.labels[:, k]
        true = simulator.population.gender if spec.attribute == "gender" else simulator.population.age_band
        covered = labels >= 0
        assert abs(covered.mean() - spec.coverage) < 0.05
        for category in range(len(spec.categories)):
            rows = covered & (true == category)
            if rows.sum() < 300:
                continue
            observed = np.bincount(labels[rows], minlength=len(spec.labels)) / rows.sum()
            assert np.abs(observed - spec.confusion[category]).max() < 0.08, (spec.provider, spec.attribute)


def test_click_probability_rises_with_affinity(run: tuple[Simulator, pa.Table]) -> None:
    simulator, events = run
    truth = pa.concat_tables(simulator.truth_impressions)
    clicked = set(column(events, "impression_id")[column(events, "type") == "click"])
    affinity = column(truth, "affinity")
    was_clicked = np.array([i in clicked for i in column(truth, "event_id")])
    high, low = affinity > np.quantile(affinity, 0.8), affinity < np.quantile(affinity, 0.2)
    assert was_clicked[high].mean() > 1.5 * was_clicked[low].mean()
    p_click = column(truth, "p_click")
    assert abs(was_clicked.mean() - p_click.mean()) < 0.01, "clicks are drawn from the stated probabilities"


def test_shifts_happen_at_their_times(run: tuple[Simulator, pa.Table]) -> None:
    simulator, events = run
    kinds = {entry["kind"]: entry["at"] for entry in simulator.shift_log}
    assert set(kinds) == {"new_campaigns", "interest_drift", "new_traffic_source"}
    launched = next(e for e in simulator.shift_log if e["kind"] == "new_campaigns")["campaigns"]
    assert launched, "some campaigns are held back until the shift"
    impressions = column(events, "type") == "impression"
    late_campaign = np.isin(column(events, "campaign_id"), launched) & impressions
    assert late_campaign.any()
    assert (millis(events, "event_time")[late_campaign] >= kinds["new_campaigns"]).all()
    newcomers = simulator.population.joined_ms > simulator.config.start_ms
    first_new = f"u{np.nonzero(newcomers)[0][0]:07d}"
    assert (
        millis(events, "event_time")[column(events, "user_id") == first_new] >= kinds["new_traffic_source"]
    ).all()


def test_arrival_order_has_a_small_late_fraction(run: tuple[Simulator, pa.Table]) -> None:
    _, events = run
    arrival, event_time = millis(events, "arrival_time"), millis(events, "event_time")
    assert (np.diff(arrival) >= 0).all(), "batches come in arrival order"
    late = (arrival - event_time) > 60_000
    assert 0.001 < late.mean() < 0.02
    assert (np.diff(event_time) < 0).any(), "event time is out of order"


def test_parquet_and_json_lines_sinks_write_the_same_events(tmp_path: Path) -> None:
    config = SimulationConfig(users=300, events=5_000, days=0.5, seed=9)
    simulate(config, ParquetSink(tmp_path / "pq"), None)
    simulate(config, JsonLinesSink(tmp_path / "events.jsonl"), tmp_path / "truth")
    table = pq.read_table(tmp_path / "pq")
    from_json = [validate_json(line) for line in (tmp_path / "events.jsonl").read_bytes().splitlines()]
    assert column(table, "event_id").tolist() == [e.event_id for e in from_json]
    manifest = json.loads((tmp_path / "truth" / "manifest.json").read_text())
    assert manifest["events"] == len(from_json)
    providers = json.loads((tmp_path / "truth" / "providers.json").read_text())
    for attributes in providers.values():
        for spec in attributes.values():
            for row in spec["p_label_given_true"].values():
                assert abs(sum(row.values()) - 1) < 1e-9
    population = pq.read_table(tmp_path / "truth" / "population.parquet")
    assert {"user_id", "country", "age", "interests", "provider_segments", "activity_rate"} <= set(
        population.column_names
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"users": 0}, "users"),
        ({"days": 0}, "days"),
        ({"events": 100}, "too few"),
        ({"late_fraction": 0.9}, "late_fraction"),
        ({"start": datetime(2026, 1, 1)}, "timezone"),
    ],
)
def test_bad_configurations_are_explained(changes: dict[str, object], message: str) -> None:
    base = {"users": 1_000, "events": 10_000, "start": datetime(2026, 1, 1, tzinfo=UTC)}
    with pytest.raises(SimulationConfigError, match=message):
        SimulationConfig(**{**base, **changes})  # type: ignore[arg-type]
