"""The quality part of ``adreach demo``: score the simulated providers, compare with the truth.

The simulator knows every provider's true P(true | label) (``providers.json``). For each
provider and attribute the demo assesses it twice, as a platform would without that
knowledge: from a **panel** of a few thousand users that over-represents older users
(user-level truth, post-stratified to the demo's reach sample), and from **100 simulated
campaigns** whose vendor truth comes from panels of 200-500 users (aggregate truth). It
prints both next to the true matrix, one full report, and the providers ranked for two
target categories with their reach from the sample.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from estimation.forecaster import ReachForecaster
from estimation.quality.aggregate import assess_aggregate
from estimation.quality.forecast import QualityRegistry, rank_providers
from estimation.quality.report import QualityReport
from estimation.quality.simulated import simulate_campaigns
from estimation.quality.user import assess_users
from estimation.store import SampleError
from infra.settings import Settings

PANEL_USERS = 4_000
CAMPAIGNS = 100
AGE_BIAS = {"18-24": 0.4, "25-34": 0.6, "35-44": 1.0, "45-54": 1.4, "55-64": 1.8, "65+": 2.2}


def true_matrix(spec: dict[str, Any], report: QualityReport) -> np.ndarray[Any, np.dtype[np.float64]]:
    truth = spec["p_true_given_label"]
    return np.array([[truth[label][cat] for cat in report.categories] for label in report.labels])


def print_quality_report(truth_dir: Path, sample_dir: Path | None, settings: Settings, seed: int = 6) -> None:
    """Assess every simulated provider attribute both ways and print the comparison."""
    providers = json.loads((truth_dir / "providers.json").read_text())
    population = pq.read_table(
        truth_dir / "population.parquet", columns=["user_id", "gender", "age_band", "deleted_at"]
    )
    population = population.filter(pc.is_null(population.column("deleted_at")))
    labels = pq.read_table(truth_dir / "provider_labels.parquet")
    rng = np.random.default_rng(seed)
    bias = np.array([AGE_BIAS.get(v, 1.0) for v in population.column("age_band").to_pylist()])
    panel_size = min(PANEL_USERS, population.num_rows)
    panel_rows = rng.choice(population.num_rows, size=panel_size, replace=False, p=bias / bias.sum())
    panel = population.take(pa.array(panel_rows))
    sample = sample_dir if sample_dir is not None and (sample_dir / "manifest.json").is_file() else None
    quality = settings.quality
    registry = QualityRegistry()
    rows = []
    shown: QualityReport | None = None
    for provider, attributes in providers.items():
        for attribute, spec in attributes.items():
            mine = labels.filter(
                pc.and_(
                    pc.equal(labels.column("provider"), provider),
                    pc.equal(labels.column("attribute"), attribute),
                )
            )
            user = assess_users(
                mine.select(["user_id", "label"]),
                pa.table({"user_id": panel.column("user_id"), "truth": panel.column(attribute)}),
                sample_dir=sample,
                provider=provider,
                attribute=attribute,
            )
            mix, vendor = _campaigns(rng, population, mine, attribute, spec)
            agg = assess_aggregate(
                mix,
                vendor,
                bootstrap=quality.bootstrap_replicates,
                seed=quality.seed,
                max_condition=quality.max_condition_number,
                max_ci_width=quality.max_ci_width,
                provider=provider,
                attribute=attribute,
            )
            registry.add(agg)
            true = true_matrix(spec, agg)
            user_true = true_matrix(spec, user)
            low, high = agg.accuracy_ci95 or (float("nan"), float("nan"))
            user_mae = np.nanmean(np.abs(user.matrix - user_true))
            agg_mae = np.nanmean(np.abs(agg.matrix - true))
            covered = np.mean((true >= agg.low) & (true <= agg.high))
            status = agg.identifiability["status"] if agg.identifiability else ""
            rows.append(
                f"  {provider:<11}{attribute:<10}{user.accuracy or 0:>9.3f}{user_mae:>10.4f}"
                f"{agg.accuracy or 0:>9.3f} [{low:.3f}, {high:.3f}]{agg_mae:>10.4f}{covered:>8.0%}  {status}"
            )
            if provider == next(iter(providers)) and attribute == "age_band":
                shown = agg
    weighting = "post-stratified to the reach sample" if sample else "unweighted (no reach sample)"
    print(
        f"  panel: {panel_size:,} users, older users over-represented, {weighting}; "
        f"{CAMPAIGNS} campaigns with vendor panels of 200-500 users; MAE vs the simulator's true matrix"
    )
    header = f"{'user acc':>9}{'user MAE':>10}{'agg acc [95%]':>25}{'agg MAE':>10}{'CI cov':>8}"
    print(f"  {'provider':<11}{'attribute':<10}{header}  identifiability")
    print("\n".join(rows))
    if shown is not None:
        print("\n".join("  " + line for line in shown.describe().splitlines()))
    if sample is None:
        return
    try:
        forecaster = ReachForecaster.open(sample, shards=1, settings=settings.reach)
    except SampleError as exc:
        print(f"  (no ranking: {exc})")
        return
    with forecaster:
        for attribute, category in (("age_band", "25-34"), ("gender", "female")):
            print(
                f"  providers ranked for {attribute} = {category} "
                f"(precision, segment reach -> users truly {category}):"
            )
            for row in rank_providers(registry, attribute, category, forecaster=forecaster):
                if row.get("precision") is None:
                    print(f"    {row['rank']}. {row['provider']}: {row.get('note', 'not identified')}")
                    continue
                lo, hi = row["true_reach_ci95"]
                print(
                    f"    {row['rank']}. {row['provider']:<11} precision {row['precision']:.3f} "
                    f"[{row['precision_ci95'][0]:.3f}, {row['precision_ci95'][1]:.3f}]  segment "
                    f"{row['segment_reach']:>9,.0f} -> truly {row['true_reach']:>9,.0f} "
                    f"(95% {lo:,.0f}..{hi:,.0f})"
                )


def _campaigns(
    rng: np.random.Generator, population: pa.Table, mine: pa.Table, attribute: str, spec: dict[str, Any]
) -> tuple[pa.Table, pa.Table]:
    label_names = [str(x) for x in spec["labels"]]
    categories = [str(x) for x in spec["categories"]]
    position = pc.index_in(population.column("user_id"), value_set=mine.column("user_id"))
    user_labels = pc.take(mine.column("label"), position)
    label = pc.fill_null(pc.index_in(user_labels, value_set=pa.array(label_names)), -1).to_numpy()
    truth = pc.fill_null(
        pc.index_in(population.column(attribute), value_set=pa.array(categories)), 0
    ).to_numpy()
    return simulate_campaigns(
        rng, np.asarray(label, np.int64), np.asarray(truth, np.int64), label_names, categories, CAMPAIGNS
    )
