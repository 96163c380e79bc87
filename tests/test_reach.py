"""Reach estimator: unbiased, honest intervals, exact where it can be, shards agree, deletions hold.

Everything runs the real pipeline (build -> files -> shards -> estimate) on synthetic
populations whose exact answers come from DuckDB over the full table.
"""

from __future__ import annotations

import json
import math
from datetime import UTC
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reach_data import MARKETS, PLANS, QUERIES, TAGS, population, with_dates

from estimation import (
    PopulationError,
    ReachForecaster,
    SampleError,
    ShardUnavailableError,
    TargetingError,
    build_sample,
    parse_targeting,
)
from estimation.estimator import chi2_quantile, fay_feuer
from estimation.forecaster import ProfileChanges
from estimation.sql import to_sql
from estimation.targeting import MalformedTargetingError, TargetingTypeError, UnknownFieldError, to_json
from infra.settings import ReachSettings

N_USERS = 20_000


@pytest.fixture(scope="module")
def pop() -> pa.Table:
    return population(N_USERS)


@pytest.fixture(scope="module")
def exact(pop: pa.Table) -> dict[int, int]:
    con = duckdb.connect()
    con.register("pop", pop)
    out = {}
    for i, query in enumerate(QUERIES):
        row = con.execute(f"SELECT count(*) FROM pop WHERE {to_sql(parse_targeting(query))}").fetchone()
        assert row is not None
        out[i] = int(row[0])
    return out


def _settings(**kw: Any) -> ReachSettings:
    return ReachSettings(activity_field="visits_per_day", **kw)


@pytest.fixture(scope="module")
def sample_dir(pop: pa.Table, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reach") / "sample"
    build_sample(pop, out, _settings(seed=3))
    return out


# -- statistical properties ----------------------------------------------------------------


@pytest.mark.parametrize("fallback", ["boost", "merge"])
def test_unbiased_and_ci_covers_95_percent(
    pop: pa.Table, exact: dict[int, int], tmp_path: Path, fallback: str
) -> None:
    """Over many hash seeds the mean estimate is the truth and ~95% of intervals cover it."""
    seeds = 120
    estimates = np.zeros((seeds, len(QUERIES)))
    covered = np.zeros((seeds, len(QUERIES)), dtype=bool)
    for seed in range(seeds):
        out = tmp_path / f"s{seed}"
        build_sample(pop, out, _settings(seed=seed, fallback=fallback))
        with ReachForecaster.open(out) as reach:
            for i, query in enumerate(QUERIES):
                answer = reach.estimate(query)
                estimates[seed, i] = answer.reach
                covered[seed, i] = answer.ci95[0] <= exact[i] <= answer.ci95[1]
    for i in range(len(QUERIES)):
        truth = exact[i]
        sd = estimates[:, i].std(ddof=1)
        bias = estimates[:, i].mean() - truth
        assert abs(bias) <= 4 * sd / math.sqrt(seeds) + 1e-6, (QUERIES[i], truth, estimates[:, i].mean(), sd)
    sampled_queries = [i for i in range(len(QUERIES)) if estimates[:, i].std() > 0]
    coverage = covered[:, sampled_queries].mean()
    assert 0.92 <= coverage <= 0.985, coverage
    assert covered.mean() >= 0.92


def test_strata_decided_by_the_predicate_use_exact_totals(sample_dir: Path, pop: pa.Table) -> None:
    with ReachForecaster.open(sample_dir) as reach:
        assert reach.meta.strata.attrs, "the synthetic population has dependencies worth stratifying on"
        field = reach.meta.strata.attrs[0].name
        value = reach.meta.strata.attrs[0].levels[0]
        answer = reach.estimate({"field": field, "eq": value})
        everyone = reach.estimate({"and": []})
    truth = int(np.sum(np.asarray(pop.column(field).to_pylist(), dtype=object) == value))
    assert answer.reach == truth and answer.ci95 == (truth, truth) and answer.method == "exact"
    assert everyone.reach == N_USERS and everyone.exact_users == N_USERS


def test_few_or_no_sampled_matches_give_a_positive_upper_bound(sample_dir: Path) -> None:
    with ReachForecaster.open(sample_dir) as reach:
        none = reach.estimate({"field": "tags", "has_all": list(TAGS[:7])})
        rare = reach.estimate(
            {"and": [{"field": "market", "eq": "north"}, {"field": "tags", "has_all": ["t3", "t4", "t5"]}]}
        )
        census = reach.estimate(
            {"and": [{"field": "market", "eq": "outpost"}, {"field": "tags", "has_all": ["t5", "t11"]}]}
        )
    assert none.sample_users == 0 and none.reach == 0.0
    assert none.ci95[0] == 0.0 and none.ci95[1] > 0, "never 0 +/- 0"
    assert none.method == "fay-feuer"
    assert 0 < rare.sample_users < 30 and rare.method == "fay-feuer"
    assert rare.ci95[0] >= rare.sample_users and rare.ci95[1] > rare.reach
    # the outpost minority is small enough to be sampled in full (the fall-back): its answer is exact
    assert census.method == "exact" and census.ci95 == (census.reach, census.reach)


def test_nearly_everyone_matching_gives_an_interval_from_the_few_misses(
    sample_dir: Path, pop: pa.Table
) -> None:
    """The mirror of few matches: when almost every sampled user matches, the normal interval
    collapsed toward "everyone +/- 0" (13% of such answers missed the truth in a probe)."""
    con = duckdb.connect()
    con.register("pop", pop)
    with ReachForecaster.open(sample_dir) as reach:
        for negated in (
            {"field": "tags", "has_all": ["t3", "t4", "t5"]},
            {"field": "tags", "has_all": list(TAGS[:7])},
        ):
            query = {"not": negated}
            answer = reach.estimate(query)
            truth = con.execute(
                f"SELECT count(*) FROM pop WHERE {to_sql(parse_targeting(query))}"
            ).fetchall()[0][0]
            misses = answer.sample_size - answer.sample_users
            assert misses < 30 and answer.method == "fay-feuer", (answer.method, misses)
            assert answer.ci95[0] < answer.ci95[1], "never everyone +/- 0"
            assert answer.ci95[0] <= truth <= answer.ci95[1], (truth, answer.ci95)


def test_fay_feuer_and_chi_square_helpers() -> None:
    assert chi2_quantile(0.975, 2) == pytest.approx(7.3778, rel=0.01)
    assert chi2_quantile(0.025, 10) == pytest.approx(3.247, rel=0.02)
    low, high = fay_feuer(0.0, 0.0, 10.0)
    assert low == 0 and high == pytest.approx(36.9, rel=0.02)  # ~ 3.69 x the largest weight


def test_horizon_forecast_is_between_zero_and_the_audience(sample_dir: Path) -> None:
    with ReachForecaster.open(sample_dir) as reach:
        day = reach.estimate({"field": "market", "eq": "north"}, horizon_days=1)
        month = reach.estimate({"field": "market", "eq": "north"}, horizon_days=30)
    assert day.audience is not None and month.audience is not None
    assert 0 < day.reach < month.reach <= month.audience * 1.001
    assert day.impressions is not None and month.impressions is not None
    assert month.impressions == pytest.approx(30 * day.impressions, rel=1e-6)
    assert day.ci95[0] <= day.reach <= day.ci95[1]


def test_horizons_outside_zero_to_ten_years_are_refused(sample_dir: Path) -> None:
    # Infinite and 1e308-day horizons gave infinite impressions and NaN intervals (or a NaN reach).
    with ReachForecaster.open(sample_dir) as reach:
        for days in (0.0, -1.0, math.nan, math.inf, 1e308, 3650.5):
            with pytest.raises(ValueError, match=r"horizon_days must be in \(0, 3650\]"):
                reach.estimate({"and": []}, horizon_days=days)
        longest = reach.estimate({"and": []}, horizon_days=3650)
    assert longest.impressions is not None and math.isfinite(longest.impressions)
    assert math.isfinite(longest.reach) and longest.reach <= longest.population


def test_horizon_matches_known_rates(tmp_path: Path) -> None:
    """With known rates (a column), the forecast is the population sum of 1 - exp(-rate D)."""
    pop = population(N_USERS, seed=11)
    rates = pop.column("visits_per_day").to_numpy() * 0.3
    build_sample(pop, tmp_path / "s", _settings(seed=5, activity_scale=0.3))
    with ReachForecaster.open(tmp_path / "s") as reach:
        answer = reach.estimate({"and": []}, horizon_days=2)
    truth = float(np.sum(1 - np.exp(-rates * 2)))
    assert answer.ci95[0] <= truth <= answer.ci95[1]
    assert answer.reach == pytest.approx(truth, rel=0.03)
    # users without a usable rate (missing, negative) get the default, and the report says how many
    unusable = pa.array([None, -2.0] + [1.0] * (N_USERS - 2))
    odd = pop.set_column(pop.schema.get_field_index("visits_per_day"), "visits_per_day", unusable)
    report = build_sample(odd, tmp_path / "t", _settings(seed=5, default_activity_rate=0.5))
    assert "2 users without a usable value (missing or negative) at 0.5/day" in report.describe()


@pytest.mark.parametrize("chunk_bits", [65_536, 256, 64])  # (64: one block per run, some wider)
def test_horizon_sums_equal_the_per_user_sums_by_stratum(
    sample_dir: Path, chunk_bits: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-block horizon sums (cached P(active) or not, main and delta segments, with
    tombstones) equal the matched users' per-user values summed by stratum."""
    from estimation import segment as segment_module
    from estimation.activity import p_active
    from estimation.bitmaps import to_positions
    from estimation.targeting import parse_targeting

    monkeypatch.setattr(segment_module, "_CHUNK_BITS", chunk_bits)
    with ReachForecaster.open(sample_dir) as reach:
        reach.apply(_changes(["user-1", "new-1", "new-2"], markets=["outpost", "island", "north"]))
        reach.delete_users([f"user-{i}" for i in range(3, 400)])  # (some of them sampled)
        shard = reach.clients[0].shard
        assert shard.delta is not None and shard.main.live_count < len(shard.main)
        for query in [*QUERIES, {"and": []}]:
            expr = parse_targeting(query, shard.schema)
            for days in (7.0, 0.5, 7.0, 30.0):  # (7 again: from the cache where the first filled it)
                sums = shard.query(expr, days)
                want = np.zeros((4, shard.n_strata))
                for segment in (shard.main, shard.delta):
                    pos = to_positions(segment.evaluate(expr))
                    strata = segment.rows.strata[segment.pos_row[pos]]
                    p = p_active(segment.shape[pos], segment.rate[pos], days)
                    imp = days * segment.shape[pos] / segment.rate[pos]
                    for row, values in enumerate((p, p * p, imp, imp * imp)):
                        want[row] += np.bincount(strata, weights=values, minlength=shard.n_strata)
                got = np.stack([sums.p_sum, sums.p_sq, sums.imp_sum, sums.imp_sq])
                np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


# -- sharding ------------------------------------------------------------------------------


def test_one_and_two_shards_give_identical_answers(sample_dir: Path) -> None:
    with ReachForecaster.open(sample_dir, shards=1) as one, ReachForecaster.open(sample_dir, shards=2) as two:
        infos = two.info()["shards"]
        assert len(infos) == 2 and all(s["sample_users"] > 0 for s in infos)
        for query in QUERIES:
            a, b = one.estimate(query), two.estimate(query)
            assert (a.reach, a.ci95, a.sample_users, a.method) == (b.reach, b.ci95, b.sample_users, b.method)
            ha, hb = one.estimate(query, horizon_days=7), two.estimate(query, horizon_days=7)
            assert ha.reach == pytest.approx(hb.reach, rel=1e-12)
            assert ha.sample_users == hb.sample_users
        changes = _changes(["user-1", "user-2", "new-1"], markets=["outpost", "island", "island"])
        one.apply(changes)
        two.apply(changes)
        one.delete_users(["user-3", "user-4"])
        two.delete_users(["user-3", "user-4"])
        for query in QUERIES:
            assert one.estimate(query).reach == two.estimate(query).reach
        # a missing shard: a clear error, or an answer explicitly marked partial
        worker = two.clients[1]
        process = getattr(worker, "process")  # noqa: B009 - ProcessShard's own child process
        process.kill()
        process.join(timeout=10)
        with pytest.raises(ShardUnavailableError, match="shard"):
            two.estimate({"and": []})
        partial = two.estimate({"and": []}, allow_partial=True)
        assert partial.partial and partial.missing_shards == [1] and 0 < partial.coverage < 1
        assert partial.warnings and "partial" in partial.warnings[-1]
        # Everyone, exact on the shard that answered, is a scaled guess for all of them: its
        # interval must cover the true total, and population counts every shard's users.
        everyone = one.estimate({"and": []})
        assert partial.method != "exact" and partial.ci95[0] < partial.ci95[1]
        assert partial.ci95[0] <= everyone.reach <= partial.ci95[1]
        assert partial.population == everyone.population


def test_shards_without_users_answer_and_take_new_users(pop: pa.Table, tmp_path: Path) -> None:
    """A population whose users were all deleted, or too few to reach every shard, still
    serves: its empty shards answer zero, and users added later are counted."""
    one_user = pop.slice(0, 1)
    everyone_deleted = pop.slice(0, 5).append_column("deleted_at", pa.array([1] * 5, pa.timestamp("ms")))
    for name, table in (("one", one_user), ("deleted", everyone_deleted)):
        report = build_sample(table, tmp_path / name, _settings(sample_rate=0.5))
    assert "why: no live users to stratify" in report.describe()
    with ReachForecaster.open(tmp_path / "one", shards=3) as reach:
        infos = reach.info()["shards"]
        assert sorted(s["sample_users"] for s in infos) == [0, 0, 1]
        everyone = reach.estimate({"and": []})
        assert (everyone.reach, everyone.method, everyone.partial) == (1, "exact", False)
        assert reach.estimate({"and": []}, horizon_days=7).reach > 0
    with ReachForecaster.open(tmp_path / "deleted") as reach:
        assert reach.estimate({"and": []}).reach == 0
        assert reach.estimate({"field": "market", "eq": "island"}, horizon_days=7).reach == 0
        reach.apply(_changes(["late-1", "late-2"], markets=["island", "north"]))
        island = reach.estimate({"field": "market", "eq": "island"})
        assert reach.estimate({"and": []}).population == 2 and 0 <= island.reach <= 2


# -- streaming updates and deletions ---------------------------------------------------


def _changes(
    ids: list[str], *, markets: list[str], event_ms: int = 1_000, tags: list[list[str]] | None = None
) -> ProfileChanges:
    n = len(ids)
    upserts = pa.table(
        {
            "user_id": ids,
            "event_ms": [event_ms] * n,
            "market": markets,
            "plan": ["pro"] * n,
            "level": [12] * n,
            "score": [1.0] * n,
            "paid": [True] * n,
            "tags": tags or [["t1"]] * n,
        }
    )
    deletes = pa.table({"user_id": pa.array([], pa.string()), "event_ms": pa.array([], pa.int64())})
    return ProfileChanges(upserts, deletes)


def test_deletions_leave_the_sample_and_the_totals(pop: pa.Table, tmp_path: Path) -> None:
    out = tmp_path / "s"
    build_sample(pop, out, _settings(seed=3))
    sampled = set(pq.read_table(out / "sample.parquet").column("_user_hash").to_pylist())
    from estimation.hashing import hash_user_ids

    ids = pop.column("user_id").to_pylist()
    hashes = hash_user_ids(pop.column("user_id"), 3)
    market = pop.column("market").to_pylist()
    # delete every sampled user of one market plus as many unsampled ones
    victims = [ids[i] for i in range(len(ids)) if market[i] == "island"]
    victim_sampled = sum(1 for i in range(len(ids)) if market[i] == "island" and int(hashes[i]) in sampled)
    assert victim_sampled > 0
    with ReachForecaster.open(out) as reach:
        before = reach.estimate({"field": "market", "eq": "island"})
        stats = reach.delete_users(victims)
        after = reach.estimate({"field": "market", "eq": "island"})
        everyone = reach.estimate({"and": []})
        tagged = reach.estimate(
            {"and": [{"field": "market", "eq": "island"}, {"field": "tags", "has_any": ["t4"]}]}
        )
        # a replayed older profile must not bring a deleted user back
        stale = reach.apply(_changes(victims[:5], markets=["island"] * 5, event_ms=0))
        again = reach.estimate({"field": "market", "eq": "island"})
        reach.compact()
        compacted = reach.estimate({"field": "market", "eq": "island"})
    assert before.reach == len(victims)
    assert stats.deleted_users == len(victims) and stats.sample_removed == victim_sampled
    assert after.reach == 0 and after.ci95 == (0, 0)
    assert everyone.reach == N_USERS - len(victims)
    assert tagged.reach == 0 and tagged.sample_users == 0
    assert stale.stale_ignored == 5 and again.reach == 0 and compacted.reach == 0


def test_new_users_and_attribute_changes_are_counted(sample_dir: Path) -> None:
    with ReachForecaster.open(sample_dir) as reach:
        base = reach.estimate({"field": "market", "eq": "outpost"})
        base_all = reach.estimate({"and": []})
        new_ids = [f"fresh-{i}" for i in range(400)]
        stats = reach.apply(_changes(new_ids, markets=["outpost"] * 400, tags=[["t7", "brand-new"]] * 400))
        grown = reach.estimate({"field": "market", "eq": "outpost"})
        moved = reach.apply(_changes(new_ids[:100], markets=["north"] * 100, event_ms=2_000))
        after_move = reach.estimate({"field": "market", "eq": "outpost"})
        new_tag = reach.estimate({"field": "tags", "has_any": ["brand-new"]})
        total = reach.estimate({"and": []})
    assert stats.new_users == 400 and moved.changed_users == 100
    assert grown.reach == base.reach + 400  # market is a stratum attribute: exact totals
    assert after_move.reach == base.reach + 300
    assert total.reach == base_all.reach + 400
    assert new_tag.ci95[0] <= 300 <= new_tag.ci95[1]  # the 100 moved users were re-profiled without it


def test_profile_event_times_are_read_as_the_sdk_reads_them(sample_dir: Path) -> None:
    """Dict events from the Python API: every RFC 3339 form the SDK takes; a zone-less time is refused.

    (A zone-less time used to be read in the server's local zone.)
    """
    from datetime import UTC, datetime, timedelta, timezone

    from estimation.forecaster import profiles_to_changes
    from infra.arrow_times import EventTimeError

    instant = datetime(2026, 1, 5, 10, 0, 0, 250_000, tzinfo=UTC)
    expected = int(instant.timestamp() * 1000)
    forms = [
        "2026-01-05T10:00:00.250Z",
        "2026-01-05t10:00:00.250999z",  # lowercase, microseconds (truncated to the ms)
        "2026-01-05 11:00:00.25+01:00",
        "2026-01-05T05:00:00.250-0500",
        instant.astimezone(timezone(timedelta(hours=9))),  # an aware datetime in another zone
        expected,  # epoch ms
    ]
    with ReachForecaster.open(sample_dir) as reach:
        events = [
            {"type": "user_profile", "user_id": f"u{i}", "event_time": when, "attributes": {"plan": "pro"}}
            for i, when in enumerate(forms)
        ]
        events.append({"type": "user_profile", "user_id": "gone", "action": "delete", "event_time": forms[1]})
        changes = profiles_to_changes(events, reach.meta, reach.settings)
        assert changes.upserts.column("event_ms").to_pylist() == [expected] * len(forms)
        assert changes.deletes.column("event_ms").to_pylist() == [expected]
        for naive in ("2026-01-05T10:00:00", datetime(2026, 1, 5, 10), "2026-01-05T10Z", 1.5e20j):
            with pytest.raises(EventTimeError, match="profile event_time"):
                reach.apply_profiles([{"type": "user_profile", "user_id": "x", "event_time": naive}])


# -- targeting language ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("targeting", "error", "fragment"),
    [
        ({"field": "markets", "eq": "north"}, UnknownFieldError, "did you mean 'market'"),
        ({"field": "market", "eq": 3}, TargetingTypeError, "values are strings"),
        ({"field": "level", "between": [5]}, TargetingTypeError, "[low, high]"),
        ({"field": "level", "between": [9, 2]}, TargetingTypeError, "above high"),
        ({"field": "tags", "eq": "t1"}, TargetingTypeError, "has_any or has_all"),
        ({"field": "market", "has_any": ["north"]}, TargetingTypeError, "use eq or in"),
        ({"and": {"field": "market", "eq": "north"}}, MalformedTargetingError, "takes a list"),
        ({"field": "market", "eq": "north", "in": ["x"]}, MalformedTargetingError, "exactly one operator"),
        ({"xor": []}, MalformedTargetingError, "expected one of"),
        ([1, 2], MalformedTargetingError, "expected an object"),
        ({"field": "paid", "eq": "yes"}, TargetingTypeError, "boolean"),
        ({"field": "level", "in": [1.5]}, TargetingTypeError, "whole number"),
    ],
)
def test_bad_targeting_is_rejected_with_a_message(
    sample_dir: Path, targeting: Any, error: type[TargetingError], fragment: str
) -> None:
    with ReachForecaster.open(sample_dir) as reach, pytest.raises(error) as caught:
        reach.estimate(targeting)
    assert fragment in str(caught.value)


def test_a_column_that_cannot_be_targeted_is_named_as_such(pop: pa.Table, tmp_path: Path) -> None:
    """A population column of another type (binary) is reported as such, not as an unknown field."""
    blobs = pa.array([b"\x00\x01"] * pop.num_rows, pa.binary())
    unnamed = pa.array(["x"] * pop.num_rows)  # (a CSV header with an empty cell)
    table = pop.append_column("blob", blobs).append_column("", unnamed)
    report = build_sample(table, tmp_path / "s", _settings(seed=3))
    assert "  not targetable: blob: type binary is not targetable" in report.describe().splitlines()
    assert "  not targetable: '': a column needs a name to be targeted" in report.describe().splitlines()
    assert "level (integer)" in report.describe() and "blob" not in report.fields and "" not in report.fields
    with ReachForecaster.open(tmp_path / "s") as reach:
        with pytest.raises(UnknownFieldError, match=r"'blob' cannot be targeted: type binary"):
            reach.estimate({"field": "blob", "eq": "x"})
        with pytest.raises(TargetingTypeError, match="'level' is an integer field; expected a number"):
            reach.estimate({"field": "level", "eq": "3"})


def test_a_column_whose_values_do_not_fit_is_not_targetable_and_the_build_goes_on(
    pop: pa.Table, tmp_path: Path
) -> None:
    """A uint64 column past int64's range stopped the whole build with Arrow's raw error."""
    big = pa.array(np.where(np.arange(pop.num_rows) == 7, 2**63 + 5, 1).astype(np.uint64))
    build_sample(pop.append_column("big", big), tmp_path / "s", _settings(seed=3))
    with ReachForecaster.open(tmp_path / "s") as reach:
        assert "not in range" in reach.fields()["not_targetable"]["big"]
        with pytest.raises(UnknownFieldError, match="'big' cannot be targeted: type uint64"):
            reach.estimate({"field": "big", "eq": 1})


def test_a_decimal_column_is_a_number_field(pop: pa.Table, tmp_path: Path) -> None:
    """Warehouse exports keep money as decimals; they were "not targetable"."""
    cents = np.arange(pop.num_rows) % 1000
    spend = pa.array([Decimal(int(c)) / 100 for c in cents], pa.decimal128(12, 2))
    build_sample(pop.append_column("spend", spend), tmp_path / "s", _settings(seed=3))
    with ReachForecaster.open(tmp_path / "s") as reach:
        kinds = {spec["name"]: spec["kind"] for spec in reach.fields()["fields"]}
        assert kinds["spend"] == "number"
        answer = reach.estimate({"field": "spend", "between": [0, 4.995]})
        truth = int((cents <= 499).sum())
        assert answer.ci95[0] <= truth <= answer.ci95[1]


_TEMPORAL_QUERIES: list[dict[str, Any]] = [
    {"field": "signup", "between": ["2022-02-01", "2022-02-14"]},
    {"field": "signup", "between": ["2022-02-01", None]},  # an open end: on or after
    {"field": "last_seen", "between": [None, "2023-11-17T00:00:00Z"]},
    {"field": "signup", "eq": "2022-01-20"},
    {"field": "signup", "in": ["2022-01-20", "2022-03-01", "1999-01-01"]},
    {"not": {"field": "signup", "between": ["2022-01-01", "2022-01-31"]}},  # nulls included
    {"field": "last_seen", "between": ["2023-11-16T00:00:00Z", "2023-11-18T09:30:00+09:00"]},
    {"field": "last_seen", "between": ["2023-11-16", "2023-11-17"]},
    {"field": "first_seen", "between": ["2023-11-15T12:00:00", "2023-11-20T00:00:00.5Z"]},
    {
        "and": [
            {"field": "market", "eq": "north"},
            {"field": "signup", "between": ["2022-01-15", "2022-02-15"]},
        ]
    },
]


def test_date_and_timestamp_fields_are_targeted_with_iso_text(pop: pa.Table, tmp_path: Path) -> None:
    """Dates and timestamps were "not targetable". With every user sampled the answers are
    exact, so each must equal DuckDB's count over the population (dates compared as DATE,
    timestamps as instants), through the strata decisions (``signup`` is a stratum
    attribute) and the sample's bitmaps alike."""
    table = with_dates(pop)
    build_sample(
        table, tmp_path / "s", _settings(seed=3, sample_rate=1.0, strata_fields=["signup", "market"])
    )
    con = duckdb.connect()
    con.register("pop", table)
    with ReachForecaster.open(tmp_path / "s") as reach:
        fields = {spec["name"]: spec for spec in reach.fields()["fields"]}
        assert reach.fields()["operators"]["date"] == ["eq", "in", "between"]
        for query in _TEMPORAL_QUERIES:
            answer = reach.estimate(query)
            truth = con.execute(
                f"SELECT count(*) FROM pop WHERE {to_sql(parse_targeting(query, reach.meta.schema))}"
            ).fetchall()[0][0]
            assert answer.reach == truth and answer.ci95 == (truth, truth), (query, answer.reach, truth)
            assert 0 < truth < table.num_rows, query  # (each query tells the fields' values apart)
            expected = [
                'signup has no user with value "1999-01-01" (values at build: 2022-01-08..2022-03-08)'
            ]
            assert answer.warnings == (expected if "1999-01-01" in str(query) else []), query
        typo = reach.estimate({"field": "signup", "between": ["2032-01-01", "2032-02-01"]})
    assert typo.warnings == [
        'signup BETWEEN "2032-01-01" AND "2032-02-01" matches no user '
        "(values at build: 2022-01-08..2022-03-08)"
    ]
    low, high = con.execute("SELECT min(signup), max(signup) FROM pop").fetchall()[0]
    assert (fields["signup"]["kind"], fields["signup"]["minimum"], fields["signup"]["maximum"]) == (
        "date",
        low.isoformat(),
        high.isoformat(),
    )
    assert fields["signup"]["nulls"] > 0
    first = con.execute("SELECT min(last_seen) FROM pop").fetchall()[0][0]
    assert fields["last_seen"]["kind"] == "timestamp"
    assert fields["last_seen"]["minimum"] == first.astimezone(UTC).isoformat().replace("+00:00", "Z")


def test_values_outside_the_build_time_range_are_warned_about(sample_dir: Path) -> None:
    """A mistyped year or a range past the data matches nobody: the answer says why."""
    with ReachForecaster.open(sample_dir) as reach:
        past = reach.estimate({"field": "level", "between": [500, None]})
        listed = reach.estimate({"field": "level", "in": [12, 500]})
        inside = reach.estimate({"field": "level", "between": [1, 30]})
    assert past.reach == 0 and len(past.warnings) == 1
    assert past.warnings[0].startswith("level >= 500 matches no user (values at build: 1..")
    assert len(listed.warnings) == 1 and "value 500 (values at build: 1.." in listed.warnings[0]
    assert inside.warnings == []


def test_open_ended_ranges_read_as_comparisons() -> None:
    from estimation.targeting import to_text

    older = parse_targeting({"field": "level", "between": [30, None]})
    early = parse_targeting({"field": "level", "between": [None, 12.5]})
    assert (to_text(older), to_text(early)) == ("level >= 30", "level <= 12.5")
    assert parse_targeting(to_json(older)) == older and to_json(early)["between"] == [None, 12.5]
    with pytest.raises(TargetingTypeError, match="at least one bound"):
        parse_targeting({"field": "level", "between": [None, None]})


def test_dates_that_iso_text_cannot_write_are_not_targetable() -> None:
    """Years past 9999 (a sentinel, a unit mix-up) would break the fields endpoint's ISO ranges."""
    from estimation.schema import infer_schema

    far = 20_000 * 365 * 86_400 * 10**6  # microseconds: the year ~21970
    table = pa.table(
        {
            "user_id": ["a", "b"],
            "far": pa.array([0, far], pa.timestamp("us")),
            "huge_seconds": pa.array([0, 2**50], pa.timestamp("s")),  # past int64 in microseconds
            "fine": pa.array([0, 10], pa.date32()),
        }
    )
    schema = infer_schema(table)
    assert schema.names() == ["fine"]
    assert "outside the years 1 - 9999" in schema.skipped["far"]
    assert "overflow" in schema.skipped["huge_seconds"]


@pytest.mark.parametrize(
    ("targeting", "fragment"),
    [
        ({"field": "signup", "eq": 19_010}, 'ISO 8601 text such as "2024-01-31", got number'),
        ({"field": "signup", "eq": "2022-13-01"}, "is not a date"),
        ({"field": "signup", "eq": "2022-01-20T10:00:00Z"}, "is not a date"),
        ({"field": "last_seen", "in": ["yesterday"]}, "is not a timestamp"),
        ({"field": "signup", "between": ["2022-02-01", "2022-01-01"]}, "is after high bound"),
        ({"field": "signup", "between": [None, None]}, "at least one bound"),
        ({"field": "signup", "has_any": ["2022-01-20"]}, "use eq, in or between"),
    ],
)
def test_bad_date_and_timestamp_values_are_rejected_with_the_form_to_use(
    pop: pa.Table, tmp_path_factory: pytest.TempPathFactory, targeting: Any, fragment: str
) -> None:
    out = tmp_path_factory.getbasetemp() / "dated-sample"
    if not out.exists():
        build_sample(with_dates(pop), out, _settings(seed=3))
    with ReachForecaster.open(out) as reach, pytest.raises(TargetingTypeError) as caught:
        reach.estimate(targeting)
    assert fragment in str(caught.value)


def test_profile_updates_set_dates_from_iso_text(
    pop: pa.Table, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """ISO text sets a date; a value that is not one becomes null, counted and logged by field."""
    build_sample(
        with_dates(pop), tmp_path / "s", _settings(seed=3, sample_rate=1.0, strata_fields=["signup"])
    )
    query = {"field": "signup", "eq": "2030-06-01"}
    with ReachForecaster.open(tmp_path / "s") as reach:
        before = reach.estimate(query).reach
        stats = reach.apply_profiles(
            [
                {
                    "type": "user_profile",
                    "user_id": f"new-{i}",
                    "event_time": "2026-01-05T10:00:00Z",
                    "attributes": {"signup": value, "last_seen": "2030-06-01T08:00:00+02:00", "level": 3},
                }
                for i, value in enumerate(["2030-06-01", "2030-06-01", "June 1st", 7])
            ]
        )
        after = reach.estimate(query).reach
        seen = reach.estimate({"field": "last_seen", "eq": "2030-06-01T06:00:00Z"}).reach
        unknown = reach.estimate({"not": {"field": "signup", "between": ["1900-01-01", "2100-01-01"]}}).reach
    assert (before, after, seen) == (0, 2, 4)
    assert stats.new_users == 4 and stats.unreadable_values == 2
    assert "2 of 'signup' (date field)" in caplog.text and "level" not in caplog.text
    assert unknown == int(with_dates(pop).column("signup").null_count) + 2  # unreadable values are null


_leaf = st.one_of(
    st.builds(lambda v: {"field": "market", "eq": v}, st.sampled_from(list(MARKETS))),
    st.builds(lambda vs: {"field": "plan", "in": vs}, st.lists(st.sampled_from(list(PLANS)), min_size=1)),
    st.builds(
        lambda a, b: {"field": "level", "between": [min(a, b), max(a, b)]},
        st.integers(0, 60),
        st.integers(0, 60),
    ),
    st.builds(lambda a: {"field": "level", "between": [a, None]}, st.integers(0, 60)),
    st.builds(lambda b: {"field": "score", "between": [None, b]}, st.floats(0, 10)),
    st.builds(
        lambda vs: {"field": "tags", "has_any": vs},
        st.lists(st.sampled_from(list(TAGS)), min_size=1, max_size=3),
    ),
    st.builds(
        lambda vs: {"field": "tags", "has_all": vs},
        st.lists(st.sampled_from(list(TAGS)), min_size=1, max_size=2),
    ),
    st.builds(lambda v: {"field": "paid", "eq": v}, st.booleans()),
)
_expr = st.recursive(
    _leaf,
    lambda inner: st.one_of(
        st.builds(lambda xs: {"and": xs}, st.lists(inner, max_size=3)),
        st.builds(lambda xs: {"or": xs}, st.lists(inner, max_size=3)),
        st.builds(lambda x: {"not": x}, inner),
    ),
    max_leaves=6,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(targeting=_expr)
def test_sampled_matches_equal_exact_evaluation_on_the_sample(
    targeting: dict[str, Any], sample_dir: Path
) -> None:
    """Bitmap evaluation agrees with DuckDB on the sampled rows, for any expression."""
    global _forecaster, _sample_table
    if _forecaster is None:
        _forecaster = ReachForecaster.open(sample_dir)
        _sample_table = pq.read_table(sample_dir / "sample.parquet")
    expr = parse_targeting(targeting)
    assert parse_targeting(to_json(expr)) == expr
    answer = _forecaster.estimate(targeting)
    con = duckdb.connect()
    con.register("sample", _sample_table)
    row = con.execute(f"SELECT count(*) FROM sample WHERE {to_sql(expr)}").fetchone()
    assert row is not None
    assert answer.sample_users == row[0]
    assert answer.ci95[0] <= answer.reach <= answer.ci95[1]


_forecaster: ReachForecaster | None = None
_sample_table: pa.Table | None = None


# -- building --------------------------------------------------------------------------


def test_integer_user_ids_are_the_ids_profile_events_name(pop: pa.Table, tmp_path: Path) -> None:
    """Warehouse populations key users by integers; profile events carry ids as text."""
    numbered = pop.set_column(0, "user_id", pa.array(np.arange(pop.num_rows, dtype=np.int64) + 1000))
    build_sample(numbered, tmp_path / "s", _settings(seed=3))
    outpost = {"field": "market", "eq": "outpost"}
    with ReachForecaster.open(tmp_path / "s") as reach:
        before = reach.estimate(outpost).reach
        stats = reach.apply(_changes(["1000", "1001"], markets=["outpost", "outpost"]))
        gone = reach.delete_users(["1002"])
        after = reach.estimate(outpost).reach
    moved = sum(m != "outpost" for m in pop.column("market").to_pylist()[:2])
    assert stats.new_users == 0 and stats.changed_users == 2 and gone.deleted_users == 1
    assert after == before + moved - (pop.column("market")[2].as_py() == "outpost")


def _assert_every_user_sampled_answers_exactly(
    path: Path, table: pa.Table, fields: dict[str, str], query: dict[str, Any], out: Path
) -> None:
    """Built from ``path`` with every user sampled: the fields and kinds given, and ``query``
    answered exactly as DuckDB answers it over ``table`` (the rows the file holds)."""
    report = build_sample(path, out, _settings(seed=3, sample_rate=1.0))
    assert report.fields == fields
    with ReachForecaster.open(out) as reach:
        answer = reach.estimate(query)
        where = to_sql(parse_targeting(query, reach.meta.schema))
    con = duckdb.connect()
    con.register("pop", table)
    truth = con.execute(f"SELECT count(*) FROM pop WHERE {where}").fetchall()[0][0]
    assert answer.reach == truth > 0


def test_a_csv_population_builds_with_the_types_arrow_infers(pop: pa.Table, tmp_path: Path) -> None:
    """Exports often come as CSV: integers, floats, booleans and ISO dates keep their kinds."""
    import pyarrow.csv as pa_csv

    table = with_dates(pop).drop_columns(["tags", "last_seen", "first_seen"])
    path = tmp_path / "population.csv"
    pa_csv.write_csv(table, path)
    fields = {"market": "categorical", "plan": "categorical", "level": "integer", "score": "number"}
    fields |= {"paid": "boolean", "signup": "date"}
    query = {
        "and": [{"field": "signup", "between": ["2022-02-01", None]}, {"field": "level", "between": [10, 30]}]
    }
    _assert_every_user_sampled_answers_exactly(path, table, fields, query, tmp_path / "s")
    with pytest.raises(PopulationError, match="as CSV"):
        (tmp_path / "broken.csv").write_bytes(b'user_id,x\n"a,1\n')
        build_sample(tmp_path / "broken.csv", tmp_path / "t")


def test_empty_csv_cells_are_missing_values_in_text_columns_too(tmp_path: Path) -> None:
    """An empty cell is "no value" (matched by no leaf, by a not): as in number columns, and
    as null is in JSON; "NA" (Namibia) stays a value."""
    path = tmp_path / "blanks.csv"
    path.write_text("user_id,city,age\nu1,Paris,30\nu2,,31\nu3,Rome,\nu4,,33\nu5,NA,34\n")
    build_sample(path, tmp_path / "s", _settings(sample_rate=1.0))
    with ReachForecaster.open(tmp_path / "s") as reach:
        assert reach.estimate({"not": {"field": "city", "in": ["Paris", "Rome"]}}).reach == 3
        assert reach.estimate({"field": "city", "eq": ""}).reach == 0
        assert reach.estimate({"field": "city", "eq": "NA"}).reach == 1
        city = next(f for f in reach.fields()["fields"] if f["name"] == "city")
    assert city["values"] == ["Paris", "Rome", "NA"] and city["nulls"] == 2
    (tmp_path / "no-id.csv").write_text("user_id,city\n,Paris\nu2,Rome\n")
    with pytest.raises(PopulationError, match="user_id is null in 1 rows"):
        build_sample(tmp_path / "no-id.csv", tmp_path / "t")


def test_a_json_lines_population_builds_with_its_lists_and_times(pop: pa.Table, tmp_path: Path) -> None:
    """JSON Lines exports keep list columns (interest segments) that CSV cannot carry."""
    import gzip

    table = with_dates(pop).drop_columns(["last_seen"])
    lines = []
    for row in table.to_pylist():
        row["signup"] = row["signup"] and row["signup"].isoformat()  # ISO text, as exports write
        row["first_seen"] = row["first_seen"].isoformat() + "Z"
        lines.append(json.dumps(row))
    path = tmp_path / "population.jsonl.gz"
    path.write_bytes(gzip.compress("\n".join(lines).encode()))
    fields = {"market": "categorical", "plan": "categorical", "level": "integer", "score": "number"}
    # ISO dates stay dates, as from CSV (Arrow's JSON reader alone makes them midnight timestamps)
    fields |= {"paid": "boolean", "tags": "list", "signup": "date", "first_seen": "timestamp"}
    query = {
        "and": [
            {"field": "signup", "between": ["2022-02-01", None]},
            {"field": "tags", "has_any": [str(TAGS[0]), str(TAGS[3])]},
            {"not": {"field": "market", "eq": str(MARKETS[0])}},
        ]
    }
    _assert_every_user_sampled_answers_exactly(path, table, fields, query, tmp_path / "s")
    (tmp_path / "array.json").write_text(
        json.dumps(table.slice(0, 3).drop_columns(["signup", "first_seen"]).to_pylist())
    )
    with pytest.raises(PopulationError, match=r"one JSON array: convert it first, e.g. jq -c"):
        build_sample(tmp_path / "array.json", tmp_path / "t")


def test_json_lines_time_columns_are_typed_as_from_csv(tmp_path: Path) -> None:
    from infra.tables import read_table_file

    rows = [
        ("a", "2024-01-31", "2024-01-31T10:00:00.123Z", "2024-01-31", "2024-01-31 10:00:00"),
        ("b", "2024-02-01", "2024-01-31T11:00:00+02:00", "2024-02-01T08:00:00", "2024-01-31 11:00:00"),
    ]
    names = ["user_id", "day", "zoned", "mixed", "naive"]
    lines = [json.dumps(dict(zip(names, row, strict=True))) for row in rows]
    (tmp_path / "p.jsonl").write_text("\n".join(lines))
    table = read_table_file(tmp_path / "p.jsonl")
    assert table.column_names == names
    assert table.schema.field("day").type == pa.date32()
    assert table.schema.field("zoned").type == pa.timestamp("us", "UTC")
    assert table.schema.field("naive").type == pa.timestamp("us")
    # dates and instants in one column: Arrow's own reading (timestamps, dates at midnight)
    assert pa.types.is_timestamp(table.schema.field("mixed").type)
    assert table.column("mixed").to_pylist()[0].isoformat() == "2024-01-31T00:00:00"


def test_build_rejects_bad_populations(tmp_path: Path) -> None:
    with pytest.raises(PopulationError, match="no user_id column"):
        build_sample(pa.table({"id": ["a"]}), tmp_path / "a")
    with pytest.raises(PopulationError, match="unique"):
        build_sample(pa.table({"user_id": ["a", "a"], "x": ["1", "2"]}), tmp_path / "b")
    # These built an unreadable sample or surfaced as tracebacks (exit 1, not 2) from the CLI.
    with pytest.raises(PopulationError, match="no users"):
        build_sample(
            pa.table({"user_id": pa.array([], pa.string()), "x": pa.array([], pa.string())}), tmp_path / "c"
        )
    with pytest.raises(PopulationError, match="string or integer column, not double"):
        build_sample(pa.table({"user_id": [1.5, 2.5], "x": ["1", "2"]}), tmp_path / "d")
    with pytest.raises(PopulationError, match="null"):
        build_sample(pa.table({"user_id": ["a", None], "x": ["1", "2"]}), tmp_path / "e")
    with pytest.raises(SampleError, match="not a reach sample"):
        ReachForecaster.open(tmp_path)


def test_build_is_deterministic_and_honours_strata_fields(pop: pa.Table, tmp_path: Path) -> None:
    a = build_sample(pop, tmp_path / "a", _settings(seed=9, strata_fields=["plan"]))
    build_sample(pop, tmp_path / "b", _settings(seed=9, strata_fields=["plan"]))
    assert a.strata_fields == ["plan"]
    ta, tb = (
        pq.read_table(tmp_path / "a" / "sample.parquet"),
        pq.read_table(tmp_path / "b" / "sample.parquet"),
    )
    assert ta.column("_user_hash").equals(tb.column("_user_hash"))
    assert abs(a.sample_users / N_USERS - 0.1) < 0.01


def test_event_histories_are_read_with_any_timestamp_unit_zone_or_rfc3339_text(tmp_path: Path) -> None:
    """Histories exported by pandas (nanosecond timestamps), by Spark (microseconds) or as
    the SDK's text all give the same rates; a history without the needed columns is named."""
    from estimation.activity import ActivityError, learn_from_events

    times = [
        "2026-01-01T00:00:00Z",
        "2026-01-02T12:00:00+02:00",
        "2026-01-03T00:00:00.5Z",
        "2026-01-01T06:00:00Z",
    ]
    base = {"type": ["impression", "impression", "impression", "click"], "user_id": ["a", "a", "b", "b"]}
    millis = np.array([1767225600000, 1767348000000, 1767398400500, 1767247200000])  # the texts' instants
    forms = {
        "text": pa.array(times),
        "ns": pa.array(millis * 1_000_000, pa.timestamp("ns")),  # pandas, no zone (UTC)
        "us_utc": pa.array(millis * 1_000, pa.timestamp("us", "UTC")),  # Spark
    }
    answers = []
    for name, column in forms.items():
        pq.write_table(pa.table({**base, "event_time": column}), tmp_path / f"{name}.parquet")
        shape, rate, model = learn_from_events(
            tmp_path / f"{name}.parquet", pa.array(["a", "b", "c"]), seed=1
        )
        answers.append((shape.tolist(), rate.tolist(), model.history_days))
    assert answers[0] == answers[1] == answers[2]
    assert answers[0][2] == 2.0  # first to last impression, in days (rounded to 4 places)
    pq.write_table(pa.table({"user_id": ["a"], "ts": forms["ns"].slice(0, 1)}), tmp_path / "bare.parquet")
    with pytest.raises(ActivityError, match="no column type, event_time: an event history needs"):
        learn_from_events(tmp_path / "bare.parquet", pa.array(["a"]), seed=1)


def test_horizon_learned_from_simulated_history_matches_ground_truth(tmp_path: Path) -> None:
    """Activity learned from the simulator's impressions forecasts what its true rates imply."""
    from streams.simulation import ParquetSink, SimulationConfig, simulate

    config = SimulationConfig(users=10_000, days=7, events=400_000, seed=3)
    simulate(config, ParquetSink(tmp_path / "events"), tmp_path / "truth")
    report = build_sample(
        tmp_path / "truth" / "population.parquet",
        tmp_path / "sample",
        ReachSettings(sample_rate=0.3),
        events=tmp_path / "events",
    )
    assert "impression history" in report.activity_source
    truth_pop = pq.read_table(tmp_path / "truth" / "population.parquet")
    scale = json.loads((tmp_path / "truth" / "response_model.json").read_text())["rate_scale"]
    alive = truth_pop.column("deleted_at").is_null().to_numpy(zero_copy_only=False)
    rates = truth_pop.column("activity_rate").to_numpy()[alive] * scale
    with ReachForecaster.open(tmp_path / "sample") as reach:
        for days in (1, 7):
            answer = reach.estimate({"and": []}, horizon_days=days)
            assert answer.impressions is not None
            assert answer.reach == pytest.approx(float(np.sum(1 - np.exp(-rates * days))), rel=0.04)
            assert answer.impressions == pytest.approx(float(rates.sum() * days), rel=0.05)
        mobile = reach.estimate({"field": "device", "eq": "mobile"}, horizon_days=1)
    is_mobile = np.asarray(truth_pop.column("device").to_pylist(), dtype=object)[alive] == "mobile"
    assert mobile.reach == pytest.approx(float(np.sum(1 - np.exp(-rates[is_mobile]))), rel=0.06)
