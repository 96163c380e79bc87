"""Data-source quality: known confusion matrices recovered, identifiability, bad inputs, the CLI.

Ground truth here is synthetic and known exactly: labels are drawn from a chosen
P(label | true) and the truth P(true | label) is computed from the draws, so every check
compares an estimate and its interval with the real value.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from estimation import build_sample
from estimation.quality import (
    QualityInputError,
    QualityReport,
    as_shares,
    assess_aggregate,
    assess_users,
    simulate_campaigns,
)
from infra.settings import ReachSettings

REPO = Path(__file__).resolve().parents[1]
CATS = ["a", "b", "c"]
P_LABEL_GIVEN_TRUE = np.array([[0.8, 0.15, 0.05], [0.1, 0.8, 0.1], [0.05, 0.25, 0.7]])


def _world(n: int, seed: int, prior: tuple[float, ...] = (0.5, 0.3, 0.2)) -> tuple[np.ndarray, np.ndarray]:
    """True categories and provider labels drawn from ``P_LABEL_GIVEN_TRUE``."""
    rng = np.random.default_rng(seed)
    truth = rng.choice(3, size=n, p=np.array(prior))
    cumulative = np.cumsum(P_LABEL_GIVEN_TRUE, axis=1)[truth]
    label = np.minimum((rng.random(n)[:, None] > cumulative).sum(axis=1), 2)
    return truth, label


def _true_given_label(truth: np.ndarray, label: np.ndarray) -> np.ndarray:
    counts = np.zeros((3, 3))
    np.add.at(counts, (label, truth), 1)
    return counts / counts.sum(axis=1, keepdims=True)


# -- aggregate -----------------------------------------------------------------------------


def test_aggregate_recovers_a_known_matrix_within_its_intervals() -> None:
    truth, label = _world(200_000, seed=1)
    expected = _true_given_label(truth, label)
    mix, vendor = simulate_campaigns(np.random.default_rng(2), label, truth, CATS, CATS, 120)
    report = assess_aggregate(mix, vendor, bootstrap=200, seed=3)
    assert report.identifiability is not None and report.identifiability["status"] == "identified"
    inside = (expected >= report.low) & (expected <= report.high)
    assert inside.sum() >= 8, (report.matrix, expected, report.low, report.high)
    assert np.abs(report.matrix - expected).mean() < 0.015
    np.testing.assert_allclose(report.matrix.sum(axis=1), 1.0, atol=1e-9)
    assert (report.matrix >= 0).all()
    assert any("counts" in note for note in report.notes)
    # precision is the diagonal of the matrix, with the same interval
    assert report.metrics["b"].precision == pytest.approx(report.matrix[1, 1])
    payload = json.loads(json.dumps(report.to_json(), allow_nan=False))
    assert set(payload["matrix"]) == set(CATS) and len(payload["ci95"]["a"]["a"]) == 2
    assert QualityReport.from_json(payload).cell("a", "a")[0] == pytest.approx(report.matrix[0, 0])


def test_aggregate_beats_naive_attribution_and_accepts_shares() -> None:
    truth, label = _world(100_000, seed=4)
    expected = _true_given_label(truth, label)
    mix, vendor = simulate_campaigns(np.random.default_rng(5), label, truth, CATS, CATS, 60)
    report = assess_aggregate(as_shares(mix), as_shares(vendor), bootstrap=100)
    assert any("shares" in note and "equally" in note for note in report.notes)
    # naive: credit each campaign's truth to its labels in proportion to the mix
    m = (
        pa.Table.to_pandas(as_shares(mix))
        .pivot(index="campaign_id", columns="label", values="share")
        .fillna(0)
    )
    t = pa.Table.to_pandas(as_shares(vendor)).pivot(index="campaign_id", columns="category", values="share")
    naive = (m.values.T @ t.fillna(0).values) / m.values.sum(axis=0)[:, None]
    assert np.abs(report.matrix - expected).mean() < 0.5 * np.abs(naive - expected).mean()


def test_aggregate_says_why_labels_spelled_unlike_the_categories_get_no_precision() -> None:
    """The matrix needs no shared vocabulary; precision, recall and accuracy pair same-named values,
    so a report without them must say why."""
    truth, label = _world(50_000, seed=6)
    upper = [c.upper() for c in CATS]
    mix, vendor = simulate_campaigns(np.random.default_rng(7), label, truth, upper, CATS, 40)
    report = assess_aggregate(mix, vendor, bootstrap=50)
    assert report.labels == upper and report.categories == CATS
    assert np.isfinite(report.matrix).all()
    assert report.accuracy is None and all(m.precision is None for m in report.metrics.values())
    assert any("no label is spelled like any true category" in note for note in report.notes), report.notes
    assert "no label is spelled" in report.describe()

    partial = [CATS[0], CATS[1], "other"]
    mix, vendor = simulate_campaigns(np.random.default_rng(7), label, truth, partial, CATS, 40)
    report = assess_aggregate(mix, vendor, bootstrap=50)
    assert report.metrics["a"].precision is not None and report.metrics["c"].precision is None
    assert any("no label named like category 'c'" in note for note in report.notes), report.notes

    mix, vendor = simulate_campaigns(np.random.default_rng(7), label, truth, CATS, CATS, 40)
    assert not any("no label" in note for note in assess_aggregate(mix, vendor, bootstrap=50).notes)


def _mixes_table(mixes: list[np.ndarray], matrix: np.ndarray, seed: int) -> tuple[pa.Table, pa.Table]:
    rng = np.random.default_rng(seed)
    mix: dict[str, list[Any]] = {"campaign_id": [], "label": [], "share": []}
    vendor: dict[str, list[Any]] = {"campaign_id": [], "category": [], "count": []}
    for j, shares in enumerate(mixes):
        counts = rng.multinomial(300, shares @ matrix)
        for i, name in enumerate(CATS):
            mix["campaign_id"].append(f"c{j}")
            mix["label"].append(name)
            mix["share"].append(float(shares[i]))
            vendor["campaign_id"].append(f"c{j}")
            vendor["category"].append(name)
            vendor["count"].append(int(counts[i]))
    return pa.table(mix), pa.table(vendor)


def test_too_few_campaigns_are_reported_not_identified() -> None:
    matrix = np.array([[0.8, 0.15, 0.05], [0.1, 0.8, 0.1], [0.05, 0.15, 0.8]])
    rng = np.random.default_rng(6)
    report = assess_aggregate(*_mixes_table([rng.dirichlet(np.ones(3)) for _ in range(2)], matrix, 7))
    ident = report.identifiability
    assert ident is not None and ident["status"] == "not_identified"
    assert "only 2 campaign(s) for 3 labels" in " ".join(ident["reasons"])
    payload = report.to_json()
    assert all(row is None for row in payload["matrix"].values())
    assert "not identified" in report.describe()


def test_similar_mixes_name_the_labels_that_cannot_be_told_apart() -> None:
    matrix = np.array([[0.8, 0.15, 0.05], [0.1, 0.8, 0.1], [0.05, 0.15, 0.8]])
    rng = np.random.default_rng(8)
    # b and c always appear 2:1, so only their blend is identified; a varies freely
    mixes = [np.array([1 - f, f * 2 / 3, f / 3]) for f in rng.uniform(0, 1, 40)]
    report = assess_aggregate(*_mixes_table(mixes, matrix, 9))
    ident = report.identifiability
    assert ident is not None and ident["status"] == "partial"
    assert set(ident["unidentified_labels"]) == {"b", "c"}
    assert ident["per_label"] == {"a": "identified", "b": "not_identified", "c": "not_identified"}
    assert report.to_json()["matrix"]["b"] is None
    assert abs(report.matrix[0, 0] - 0.8) < 0.05
    # nearly identical mixes: nothing is identified, with the condition number as the reason
    base = np.array([0.5, 0.3, 0.2])
    same = [np.abs(base + rng.normal(0, 0.002, 3)) for _ in range(40)]
    flat = assess_aggregate(*_mixes_table([m / m.sum() for m in same], matrix, 10))
    assert flat.identifiability is not None and flat.identifiability["status"] == "not_identified"
    assert "too similar" in " ".join(flat.identifiability["reasons"])


def _rows(names: tuple[str, str, str], rows: list[tuple[str, str, float]]) -> pa.Table:
    return pa.table({name: [row[i] for row in rows] for i, name in enumerate(names)})


@pytest.mark.parametrize(
    ("mix_rows", "truth_rows", "fragments"),
    [
        (
            [("c1", "a", 0.5), ("c1", "b", 0.4)],
            [("c1", "a", 1.0)],
            ["MIX shares must sum to 1", "'c1' (0.9)"],
        ),
        ([("c1", "a", 60.0), ("c1", "b", 40.0)], [("c1", "a", 1.0)], ["percentages"]),
        ([("c1", "a", 1.0)], [("c1", "a", 1.0), ("c9", "a", 1.0)], ["TRUTH has 1 campaign(s)", "'c9'"]),
        (
            [("c1", "a", 1.0), ("c2", "a", 1.0)],
            [("c1", "a", 1.0)],
            ["MIX has 1 campaign(s) with no TRUTH", "'c2'"],
        ),
        ([("c1", "a", 0.5), ("c1", "a", 0.5)], [("c1", "a", 1.0)], ["more than one row", "'c1'"]),
        ([("c1", "a", -0.5), ("c1", "b", 1.5)], [("c1", "a", 1.0)], [">= 0"]),
    ],
)
def test_malformed_aggregate_inputs_raise_clear_errors(
    mix_rows: list[tuple[str, str, float]], truth_rows: list[tuple[str, str, float]], fragments: list[str]
) -> None:
    mix = _rows(("campaign_id", "label", "share"), mix_rows)
    truth = _rows(("campaign_id", "category", "share"), truth_rows)
    with pytest.raises(QualityInputError) as info:
        assess_aggregate(mix, truth, bootstrap=20)
    for fragment in fragments:
        assert fragment in str(info.value)


# -- user level ----------------------------------------------------------------------------


def test_user_level_matrix_and_metrics_match_the_known_truth() -> None:
    truth, label = _world(30_000, seed=11)
    ids = [f"u{i}" for i in range(len(truth))]
    labelled = np.random.default_rng(12).random(len(truth)) < 0.8  # provider covers 80%
    labels = pa.table(
        {
            "user_id": [u for u, k in zip(ids, labelled, strict=True) if k],
            "label": [CATS[x] for x in label[labelled]],
        }
    )
    panel = pa.table({"user_id": ids, "truth": [CATS[x] for x in truth]})
    report = assess_users(labels, panel, provider="acme", attribute="tier")
    expected = _true_given_label(truth[labelled], label[labelled])
    assert np.abs(report.matrix - expected).max() < 1e-12  # every panel user is known: exact
    recall_a = ((label == 0) & (truth == 0) & labelled).sum() / (truth == 0).sum()
    assert report.metrics["a"].recall == pytest.approx(recall_a)
    low, high = report.metrics["a"].recall_ci95 or (0, 0)
    assert low < recall_a < high
    assert report.accuracy == pytest.approx((label == truth)[labelled].mean())
    assert "uniform sample" in report.weighting
    assert "unlabelled users count as misses" in " ".join(report.notes)


def test_biased_panel_is_reweighted_to_the_reach_sample(tmp_path: Path) -> None:
    """The provider is worse in group 'y', which the panel over-represents 5 to 1."""
    rng = np.random.default_rng(13)
    n = 60_000
    group = rng.random(n) < 0.2  # True: 'y', 20% of the population
    truth = rng.choice(3, size=n, p=[0.5, 0.3, 0.2])
    good = rng.random(n) < np.where(group, 0.5, 0.9)
    label = np.where(good, truth, rng.integers(0, 3, n))
    ids = np.array([f"p{i}" for i in range(n)])
    population = pa.table({"user_id": ids, "grp": np.where(group, "y", "x")})
    pq.write_table(population, tmp_path / "population.parquet")
    settings = ReachSettings(strata_fields=["grp"], activity_field=None, sample_rate=0.1)
    build_sample(tmp_path / "population.parquet", tmp_path / "sample", settings)
    in_panel = rng.random(n) < np.where(group, 0.25, 0.05)
    labels = pa.table({"user_id": ids, "label": np.array(CATS)[label]})
    panel = pa.table({"user_id": ids[in_panel], "truth": np.array(CATS)[truth[in_panel]]})
    weighted = assess_users(labels, panel, sample_dir=tmp_path / "sample")
    plain = assess_users(labels, panel)
    population_accuracy = float((label == truth).mean())
    assert weighted.accuracy_ci95 is not None
    assert weighted.accuracy_ci95[0] <= population_accuracy <= weighted.accuracy_ci95[1]
    assert abs((plain.accuracy or 0) - population_accuracy) > 0.05  # the panel alone is biased
    assert "post-stratified to the reach sample" in weighted.weighting
    assert weighted.details["strata_covered_share"] == pytest.approx(1.0)


def test_user_level_errors_name_the_problem() -> None:
    labels = pa.table({"user_id": ["u1", "u2"], "label": ["a", "b"]})
    with pytest.raises(QualityInputError, match="no user_id appears in both"):
        assess_users(labels, pa.table({"user_id": ["v1"], "truth": ["a"]}))
    with pytest.raises(QualityInputError, match="more than once"):
        assess_users(labels, pa.table({"user_id": ["u1", "u1"], "truth": ["a", "b"]}))
    with pytest.raises(QualityInputError, match="no column 'truth'"):
        assess_users(labels, pa.table({"user_id": ["u1"], "category": ["a"]}))
    # Boolean truth reads as 'true'/'false': labels spelled 'True'/'False' could never match.
    spelled = pa.table({"user_id": ["u1", "u2"], "label": ["True", "False"]})
    with pytest.raises(QualityInputError, match="no value in common") as info:
        assess_users(spelled, pa.table({"user_id": ["u1", "u2"], "truth": [True, False]}))
    assert "'True'" in str(info.value) and "'true'" in str(info.value)
    # Some labels unknown to the truth is a report (with a note), not an error.
    partly = assess_users(labels, pa.table({"user_id": ["u1", "u2"], "truth": ["a", "c"]}))
    assert partly.accuracy is not None and partly.accuracy > 0


# -- CLI -----------------------------------------------------------------------------------


def _cli(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADREACH_")}
    env["PYTHONPATH"] = str(REPO)
    env["COLUMNS"] = "200"
    return subprocess.run(
        [sys.executable, "-m", "infra.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_cli_aggregate_and_user_print_tables_and_json(tmp_path: Path) -> None:
    truth, label = _world(50_000, seed=14)
    mix, vendor = simulate_campaigns(np.random.default_rng(15), label, truth, CATS, CATS, 40)
    pq.write_table(mix, tmp_path / "mix.parquet")
    pq.write_table(vendor, tmp_path / "truth.parquet")
    table = _cli(
        [
            "quality",
            "aggregate",
            "--mix",
            str(tmp_path / "mix.parquet"),
            "--truth",
            str(tmp_path / "truth.parquet"),
            "--bootstrap",
            "50",
        ]
    )
    assert table.returncode == 0, table.stderr
    assert (
        "P(true category | provider label)" in table.stdout and "identifiability: identified" in table.stdout
    )
    out = tmp_path / "acme.json"
    as_json = _cli(
        [
            "quality",
            "aggregate",
            "--mix",
            str(tmp_path / "mix.parquet"),
            "--truth",
            str(tmp_path / "truth.parquet"),
            "--bootstrap",
            "50",
            "--json",
            "--provider",
            "acme",
            "--attribute",
            "tier",
            "--out",
            str(out),
        ]
    )
    assert as_json.returncode == 0, as_json.stderr
    payload = json.loads(as_json.stdout)
    assert set(payload["matrix"]["a"]) == set(CATS) and payload["truth_input"] == "counts"
    lo, hi = payload["ci95"]["a"]["a"]
    assert lo <= payload["matrix"]["a"]["a"] <= hi and payload["metrics"]["a"]["precision"] is not None
    assert QualityReport.load(out).provider == "acme"

    ids = [f"u{i}" for i in range(2_000)]
    pq.write_table(
        pa.table({"user_id": ids, "label": [CATS[x] for x in label[:2_000]]}), tmp_path / "labels.parquet"
    )
    pq.write_table(
        pa.table({"user_id": ids, "truth": [CATS[x] for x in truth[:2_000]]}), tmp_path / "panel.parquet"
    )
    user = _cli(
        [
            "quality",
            "user",
            "--labels",
            str(tmp_path / "labels.parquet"),
            "--truth",
            str(tmp_path / "panel.parquet"),
            "--json",
        ]
    )
    assert user.returncode == 0, user.stderr
    assert json.loads(user.stdout)["accuracy"] == pytest.approx(
        float((label[:2_000] == truth[:2_000]).mean())
    )
    # Panels and vendor reports often come as CSV or JSON Lines: the same answer from those.
    import pyarrow.csv as pa_csv

    pa_csv.write_csv(pq.read_table(tmp_path / "labels.parquet"), tmp_path / "labels.csv")
    (tmp_path / "panel.jsonl").write_text(
        "".join(json.dumps(row) + "\n" for row in pq.read_table(tmp_path / "panel.parquet").to_pylist())
    )
    labels_csv, panel_jsonl = str(tmp_path / "labels.csv"), str(tmp_path / "panel.jsonl")
    exported = _cli(["quality", "user", "--labels", labels_csv, "--truth", panel_jsonl, "--json"])
    assert exported.returncode == 0, exported.stderr
    assert json.loads(exported.stdout)["accuracy"] == json.loads(user.stdout)["accuracy"]


def test_an_empty_csv_label_is_no_label(tmp_path: Path) -> None:
    """A panel user whose label cell is empty is unlabelled (a miss for recall), as a JSON
    null is, not a label "" of its own."""
    from infra.tables import read_table_file

    (tmp_path / "labels.csv").write_text("user_id,label\na,x\nb,y\nc,\n")
    (tmp_path / "truth.csv").write_text("user_id,truth\na,x\nb,y\nc,x\n")
    report = assess_users(read_table_file(tmp_path / "labels.csv"), read_table_file(tmp_path / "truth.csv"))
    out = report.to_json()
    assert out["labels"] == ["x", "y"] and out["labelled_panel_users"] == 2 and out["panel_users"] == 3


def test_cli_rejects_malformed_files_with_exit_2(tmp_path: Path) -> None:
    pq.write_table(
        pa.table({"campaign_id": ["c1", "c1"], "label": ["a", "b"], "share": [0.5, 0.3]}),
        tmp_path / "bad.parquet",
    )
    pq.write_table(
        pa.table({"campaign_id": ["c1"], "category": ["a"], "share": [1.0]}), tmp_path / "truth.parquet"
    )
    pq.write_table(
        pa.table(
            {
                "campaign_id": pa.array([], pa.string()),
                "label": pa.array([], pa.string()),
                "share": pa.array([], pa.float64()),
            }
        ),
        tmp_path / "empty.parquet",
    )
    cases = [
        (["--mix", str(tmp_path / "bad.parquet")], "MIX shares must sum to 1"),
        (["--mix", str(tmp_path / "empty.parquet")], "has no rows"),
        (["--mix", str(tmp_path / "missing.parquet")], "does not exist"),
        (["--mix", str(tmp_path / "broken.csv")], "cannot read"),
    ]
    (tmp_path / "broken.csv").write_bytes(b'campaign_id,label,share\n"c1,a,1\n')
    for mix_args, fragment in cases:
        result = _cli(["quality", "aggregate", *mix_args, "--truth", str(tmp_path / "truth.parquet")])
        assert result.returncode == 2, (mix_args, result.stdout, result.stderr)
        assert fragment in result.stderr
    # not identifiable: exit 1, with the reason
    one = pa.table({"campaign_id": ["c1", "c1"], "label": ["a", "b"], "share": [0.5, 0.5]})
    pq.write_table(one, tmp_path / "one.parquet")
    pq.write_table(
        pa.table({"campaign_id": ["c1", "c1"], "category": ["a", "b"], "count": [150, 150]}),
        tmp_path / "one_truth.parquet",
    )
    result = _cli(
        [
            "quality",
            "aggregate",
            "--mix",
            str(tmp_path / "one.parquet"),
            "--truth",
            str(tmp_path / "one_truth.parquet"),
        ]
    )
    assert result.returncode == 1 and "only 1 campaign(s) for 2 labels" in result.stderr
