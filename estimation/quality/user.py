"""User-level assessment: provider labels against panel truth for the same users.

The panel is never a uniform sample of the population (panels over-represent some ages,
countries, devices), and a provider's accuracy differs between groups, so unweighted
counts describe the panel, not the audience a buyer reaches. With a reach sample at hand,
each panel user is **post-stratified** to the sample's strata: weight ``N_h / n_h`` where
``N_h`` is the exact population of stratum ``h`` (kept by ``adreach reach build``) and
``n_h`` the panel users in it. When the panel is itself the reach sample this is exactly
the sample's own weight ``N_h / n_h``. The assumption is the usual one: within a stratum,
panel users are like the others. Strata the panel does not touch cannot be represented;
the report says what share of the population they hold.

Intervals are Wilson intervals with Kish's effective sample size (equal to the user count
when unweighted).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from numpy.typing import NDArray

from estimation.hashing import hash_user_ids
from estimation.quality.inputs import QualityInputError, UserData, user_inputs
from estimation.quality.report import CategoryMetrics, QualityReport
from estimation.quality.stats import kish, wilson
from estimation.store import load_meta


def poststratify(user_ids: pa.Array, sample_dir: Path) -> tuple[NDArray[np.float64], str, dict[str, float]]:
    """Weights that make panel users stand for the population of their reach-sample stratum.

    Returns ``(weights, description, figures)``; users the sample's population does not know
    (or who were deleted) get weight 0 and are counted in the description.
    """
    meta = load_meta(sample_dir)
    directory = pq.read_table(sample_dir / "directory.parquet", columns=["user_hash", "stratum"])
    keys = directory.column("user_hash").to_numpy()
    strata = directory.column("stratum").to_numpy().astype(np.int64)
    order = np.argsort(keys, kind="stable")
    keys, strata = keys[order], strata[order]
    hashes = hash_user_ids(user_ids, meta.seed)
    pos = np.clip(np.searchsorted(keys, hashes), 0, max(len(keys) - 1, 0))
    found = (keys[pos] == hashes) if len(keys) else np.zeros(len(hashes), dtype=bool)
    stratum = np.where(found, strata[pos], -1)
    known = stratum >= 0
    if not known.any():
        raise QualityInputError(
            f"none of the {len(hashes):,} panel users is in the population of the reach sample "
            f"{sample_dir}; reweighting needs the panel's user ids to be the population's"
        )
    population = meta.population.astype(np.float64)
    panel = np.bincount(stratum[known], minlength=len(population)).astype(np.float64)
    weights = np.zeros(len(hashes))
    weights[known] = population[stratum[known]] / panel[stratum[known]]
    covered = float(population[panel > 0].sum() / max(population.sum(), 1.0))
    attrs = ", ".join(a.name for a in meta.strata.attrs) or "(no attributes)"
    description = (
        f"post-stratified to the reach sample {sample_dir} ({int((panel > 0).sum()):,} of "
        f"{len(population):,} strata over {attrs} hold panel users, {covered:.1%} of the population); "
        f"the panel is not a uniform sample, so its users are weighted N_h/n_h"
    )
    if (~known).any():
        description += f"; {int((~known).sum()):,} panel users not in that population were left out"
    figures = {"strata_covered_share": covered, "panel_users_outside_population": float((~known).sum())}
    return weights, description, figures


def assess_users(
    labels: pa.Table,
    truth: pa.Table,
    *,
    sample_dir: Path | None = None,
    provider: str | None = None,
    attribute: str | None = None,
) -> QualityReport:
    """Confusion matrix P(true | label), precision, recall and accuracy with 95% intervals.

    Weights, in order of preference: post-stratification to ``sample_dir`` (a reach
    sample), a ``weight`` column in TRUTH, none (the panel taken as a uniform sample, and
    the report says so).
    """
    data = user_inputs(labels, truth)
    details: dict[str, float] = {}
    if sample_dir is not None:
        weights, weighting, details = poststratify(data.user_ids, sample_dir)
    elif data.weight is not None:
        weights, weighting = data.weight, "the TRUTH file's weight column"
    else:
        weights = np.ones(len(data.truth))
        weighting = (
            "none: the panel is taken as a uniform sample of the population (pass a reach sample to "
            "reweight it to the population's strata)"
        )
    return _report(data, weights, weighting, details, provider, attribute)


def _report(
    data: UserData,
    weights: NDArray[np.float64],
    weighting: str,
    details: dict[str, float],
    provider: str | None,
    attribute: str | None,
) -> QualityReport:
    n_labels, n_cats = len(data.labels), len(data.categories)
    labelled = (data.label >= 0) & (weights > 0)
    if not labelled.any():
        raise QualityInputError("no labelled panel user has a positive weight")
    cells = data.label[labelled] * n_cats + data.truth[labelled]
    w = weights[labelled]
    counts = np.bincount(cells, weights=w, minlength=n_labels * n_cats).reshape(n_labels, n_cats)
    rows = counts.sum(axis=1, keepdims=True)
    matrix = np.divide(counts, rows, out=np.full_like(counts, np.nan), where=rows > 0)
    row_eff = kish(w, data.label[labelled], n_labels)
    low, high = wilson(np.nan_to_num(matrix), np.repeat(row_eff[:, None], n_cats, axis=1))
    low = np.where(rows > 0, low, np.nan)
    high = np.where(rows > 0, high, np.nan)

    alive = weights > 0
    true_totals = np.bincount(data.truth[alive], weights=weights[alive], minlength=n_cats)
    true_eff = kish(weights[alive], data.truth[alive], n_cats)
    metrics: dict[str, CategoryMetrics] = {}
    hits = 0.0
    for j, cat in enumerate(data.categories):
        m = CategoryMetrics(support=float(true_totals[j]))
        if cat in data.labels:
            i = data.labels.index(cat)
            hits += counts[i, j]
            if rows[i, 0] > 0:
                m.precision = float(matrix[i, j])
                m.precision_ci95 = (float(low[i, j]), float(high[i, j]))
            if true_totals[j] > 0:
                recall = float(counts[i, j] / true_totals[j])
                lo, hi = wilson(np.array([recall]), np.array([true_eff[j]]))
                m.recall, m.recall_ci95 = recall, (float(lo[0]), float(hi[0]))
        metrics[cat] = m
    total = float(counts.sum())
    accuracy = hits / total
    lo, hi = wilson(np.array([accuracy]), np.array([float(kish(w, np.zeros(len(w), np.int64), 1)[0])]))
    coverage = float(weights[labelled].sum() / weights[alive].sum())
    notes = [
        f"{int(labelled.sum()):,} panel users carry a label, {int((alive & ~labelled).sum()):,} do not "
        f"(weighted coverage {coverage:.1%}; unlabelled users count as misses for recall)",
    ]
    if data.labelled_only:
        notes.append(f"{data.labelled_only:,} labelled users are not in the panel and were ignored")
    missing = sorted(set(data.categories) - set(data.labels))
    if missing:
        notes.append(f"the provider never uses the label(s) {', '.join(missing)}: no precision for them")
    return QualityReport(
        kind="user",
        labels=data.labels,
        categories=data.categories,
        matrix=matrix,
        low=low,
        high=high,
        metrics=metrics,
        method="weighted confusion counts; Wilson 95% intervals with Kish effective sizes",
        weighting=weighting,
        provider=provider,
        attribute=attribute,
        accuracy=accuracy,
        accuracy_ci95=(float(lo[0]), float(hi[0])),
        support={label: float(rows[i, 0]) for i, label in enumerate(data.labels)},
        notes=notes,
        details={
            "panel_users": len(data.truth),
            "labelled_panel_users": int(labelled.sum()),
            "coverage": coverage,
            **details,
        },
    )
