"""Aggregate-only assessment: a provider's confusion matrix from per-campaign totals.

The usual situation (Geyik et al., *Towards Data Quality Assessment in Online
Advertising*): nobody knows any single user's true category, but for each campaign we
know the mix of provider labels among the users it reached (from our own logs) and a
measurement vendor reports the share of each true category among those users, measured
on a panel of a few hundred. With ``M[l, c] = P(true c | label l)`` the same for every
campaign, campaign ``j``'s true composition is the mixture

    t_j = sum_l mix[j, l] * M[l, :]

("learning from label proportions"). The vendor's panel gives multinomial counts
``y_j ~ Multinomial(n_j, t_j)``, so we maximise the **multinomial likelihood** over all
campaigns jointly, with every row of ``M`` on the probability simplex. This weights each
campaign by its panel size and each cell by its own binomial noise, which unweighted
least squares does not (see ``benchmarks/quality.py`` for what that costs).

The maximiser is found by EM (each panel user's unseen provider label is the latent
variable: its posterior is ``mix[j, l] M[l, c] / t_j[c]``), which keeps rows on the
simplex by construction, accelerated with SQUAREM (Varadhan & Roland 2008) and run on all
bootstrap replicates at once as one batched NumPy computation.

**Intervals**: bootstrap over campaigns (the independent units: it also absorbs
campaign-to-campaign variation the model ignores); the interval is the estimate plus or
minus a Student t quantile (``J - L`` degrees of freedom) times the bootstrap standard
error, clipped to [0, 1]. In simulation this covers better than percentile intervals
with few campaigns.

**Identifiability**: ``M`` is identified only if the mix matrix (campaigns x labels,
rows weighted by panel size) has full column rank, well conditioned. Before trusting any
number we look at its singular values: with fewer campaigns than labels, or label mixes
so alike that some combination of labels is (nearly) in the null space, the labels
involved are reported as not identified and their rows are withheld (``null``), instead
of printing whatever the optimiser stopped at. Rows that are identified in principle but
whose bootstrap intervals are still very wide are reported as weakly identified.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
from numpy.typing import NDArray

from estimation.quality.inputs import (
    SHARE_TOLERANCE,
    AggregateData,
    QualityInputError,
    aggregate_inputs,
    listed,
)
from estimation.quality.report import CategoryMetrics, QualityReport
from estimation.quality.stats import condition_text, t_quantile

NULL_COMPONENT = 0.2
"""A label is unidentified when its unit vector has at least this much length in the
(near-)null space of the weighted mix matrix."""

_TINY = 1e-300
MAX_ITER = 3000


def _em_step(x: NDArray[np.float64], y: NDArray[np.float64], m: NDArray[np.float64]) -> NDArray[np.float64]:
    q = np.maximum(x @ m, _TINY)
    g = m * (np.swapaxes(x, -1, -2) @ (y / q))
    total = g.sum(axis=-1, keepdims=True)
    # A label absent from every campaign of a replicate keeps its row (it is unidentified anyway).
    return np.where(total > 0, g / np.where(total > 0, total, 1.0), m)


def _loglik(x: NDArray[np.float64], y: NDArray[np.float64], m: NDArray[np.float64]) -> NDArray[np.float64]:
    q = np.maximum(x @ m, _TINY)
    return np.asarray((y * np.log(q)).sum(axis=(-1, -2)))


def project_rows_to_simplex(v: NDArray[np.float64]) -> NDArray[np.float64]:
    """Euclidean projection of every last-axis vector onto the probability simplex."""
    u = -np.sort(-v, axis=-1)
    css = np.cumsum(u, axis=-1) - 1.0
    k = np.arange(1, v.shape[-1] + 1)
    cond = u - css / k > 0
    rho = cond.shape[-1] - 1 - np.argmax(cond[..., ::-1], axis=-1)
    theta = np.take_along_axis(css, rho[..., None], axis=-1) / (rho[..., None] + 1)
    return np.asarray(np.maximum(v - theta, 0.0))


def _start(x: NDArray[np.float64], y: NDArray[np.float64]) -> NDArray[np.float64]:
    """Ridge least squares projected onto the simplex, pulled slightly to uniform (EM needs no zeros)."""
    n = y.sum(axis=-1, keepdims=True)
    shares = y / np.maximum(n, _TINY)
    w = n / np.maximum(n.mean(axis=-2, keepdims=True), _TINY)
    xt = np.swapaxes(x * w, -1, -2)
    gram = xt @ x
    ridge = 1e-6 * np.trace(gram, axis1=-2, axis2=-1)[..., None, None] * np.eye(x.shape[-1])
    solved = np.linalg.solve(gram + ridge + 1e-12 * np.eye(x.shape[-1]), xt @ shares)
    cats = y.shape[-1]
    return np.asarray(0.9 * project_rows_to_simplex(solved) + 0.1 / cats, dtype=np.float64)


def fit_matrix(
    mix: NDArray[np.float64],
    counts: NDArray[np.float64],
    start: NDArray[np.float64] | None = None,
    *,
    tol: float = 1e-7,
    max_iter: int = MAX_ITER,
) -> tuple[NDArray[np.float64], int]:
    """Maximum-likelihood ``P(true | label)`` by SQUAREM-accelerated EM.

    ``mix``: ``(..., campaigns, labels)`` label shares; ``counts``: ``(..., campaigns,
    categories)`` measured users per true category (shares times a panel size when only
    shares are known). Leading axes are independent problems solved together (bootstrap
    replicates); each stops once no entry moves by more than ``tol``. Returns ``(matrix
    (..., labels, categories), most iterations any problem took)``.
    """
    m = _start(mix, counts) if start is None else start.copy()
    lead = m.shape[:-2]
    x = mix.reshape(-1, *mix.shape[-2:])
    y = counts.reshape(-1, *counts.shape[-2:])
    flat = m.reshape(-1, *m.shape[-2:]).copy()
    active = np.arange(len(flat))
    iterations = 0
    while active.size and iterations < max_iter:
        iterations += 1
        xa, ya, ma = x[active], y[active], flat[active]
        m1 = _em_step(xa, ya, ma)
        m2 = _em_step(xa, ya, m1)
        r = m1 - ma
        v = m2 - 2 * m1 + ma
        r_norm = np.sqrt((r * r).sum(axis=(-1, -2), keepdims=True))
        v_norm = np.sqrt((v * v).sum(axis=(-1, -2), keepdims=True))
        alpha = np.minimum(-np.divide(r_norm, v_norm, out=np.ones_like(r_norm), where=v_norm > 0), -1.0)
        jump = np.maximum(ma - 2 * alpha * r + alpha * alpha * v, 1e-12)
        jump /= jump.sum(axis=-1, keepdims=True)
        candidate = _em_step(xa, ya, jump)
        better = (_loglik(xa, ya, candidate) >= _loglik(xa, ya, m2))[:, None, None]
        new = np.where(better, candidate, m2)
        change = np.abs(new - ma).max(axis=(-1, -2))
        flat[active] = new
        active = active[change >= tol]
    return flat.reshape(*lead, *m.shape[-2:]), iterations


def identifiability(
    mix: NDArray[np.float64], weights: NDArray[np.float64], labels: list[str], max_condition: float
) -> dict[str, Any]:
    """Can these campaigns identify every row? Rank, condition number and the labels involved."""
    campaigns, n_labels = mix.shape
    scaled = mix * np.sqrt(weights / weights.mean())[:, None]
    _, singular, vt = np.linalg.svd(scaled, full_matrices=True)
    s = np.zeros(n_labels)
    s[: len(singular)] = singular
    top = float(s[0]) if len(s) else 0.0
    condition = top / float(s[-1]) if s[-1] > 0 else math.inf
    rank = int((s > top / max_condition).sum()) if top > 0 else 0
    null = vt[rank:] if rank < n_labels else np.zeros((0, n_labels))
    component = np.sqrt((null * null).sum(axis=0)) if len(null) else np.zeros(n_labels)
    unidentified = [labels[i] for i in np.flatnonzero(component >= NULL_COMPONENT)]
    if campaigns < n_labels:  # no row can be trusted: the whole system is underdetermined
        unidentified = list(labels)
    reasons = []
    if campaigns < n_labels:
        reasons.append(
            f"only {campaigns} campaign(s) for {n_labels} labels: at least {n_labels} campaigns with "
            "different label mixes are needed"
        )
    absent = [labels[i] for i in np.flatnonzero(mix.max(axis=0) <= 0)]
    if absent:
        reasons.append(f"label(s) {', '.join(absent)} appear in no campaign's mix")
    if rank < n_labels and campaigns >= n_labels:
        reasons.append(
            f"the label mixes are too similar: the mix matrix has effective rank {rank} < {n_labels} "
            f"(condition number {condition_text(condition)} > "
            f"{max_condition:,.0f})"
        )
    if unidentified and len(unidentified) < n_labels:
        reasons.append(
            f"label(s) {', '.join(unidentified)} occur in (nearly) fixed proportions to each other across "
            "campaigns, so their rows cannot be told apart; campaigns that target them separately are needed"
        )
    status = (
        "identified"
        if not unidentified
        else ("not_identified" if len(unidentified) == n_labels else "partial")
    )
    return {
        "status": status,
        "campaigns": campaigns,
        "labels": n_labels,
        "rank": rank,
        "condition_number": condition if math.isfinite(condition) else None,
        "max_condition_number": max_condition,
        "singular_values": [float(v) for v in s],
        "unidentified_labels": unidentified,
        "reasons": reasons,
    }


def assess_aggregate(
    mix: pa.Table,
    truth: pa.Table,
    *,
    bootstrap: int = 200,
    seed: int = 0,
    max_condition: float = 100.0,
    max_ci_width: float = 0.5,
    tolerance: float = SHARE_TOLERANCE,
    label_shares: dict[str, float] | None = None,
    provider: str | None = None,
    attribute: str | None = None,
) -> QualityReport:
    """Estimate P(true | label) from MIX and TRUTH tables (see the module docstring)."""
    return assess_data(
        aggregate_inputs(mix, truth, tolerance=tolerance),
        bootstrap=bootstrap,
        seed=seed,
        max_condition=max_condition,
        max_ci_width=max_ci_width,
        label_shares=label_shares,
        provider=provider,
        attribute=attribute,
    )


def assess_data(
    data: AggregateData,
    *,
    bootstrap: int = 200,
    seed: int = 0,
    max_condition: float = 100.0,
    max_ci_width: float = 0.5,
    label_shares: dict[str, float] | None = None,
    provider: str | None = None,
    attribute: str | None = None,
) -> QualityReport:
    """:func:`assess_aggregate` on already checked arrays (what the benchmark calls)."""
    if bootstrap < 20:
        raise QualityInputError(f"bootstrap replicates must be at least 20, got {bootstrap}")
    n_campaigns, n_labels = data.mix.shape
    n_cats = data.truth.shape[1]
    panel = data.panel if data.panel is not None else np.ones(n_campaigns)
    counts = data.truth * panel[:, None]
    ident = identifiability(data.mix, panel, data.labels, max_condition)
    matrix, iterations = fit_matrix(data.mix, counts)

    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n_campaigns, size=(bootstrap, n_campaigns))
    replicates, boot_iterations = fit_matrix(data.mix[picks], counts[picks])
    inflate = math.sqrt(n_campaigns / max(n_campaigns - 1, 1))
    se = replicates.std(axis=0, ddof=1) * inflate
    t = t_quantile(0.975, max(n_campaigns - n_labels, 1))
    low = np.clip(matrix - t * se, 0.0, 1.0)
    high = np.clip(matrix + t * se, 0.0, 1.0)

    unidentified = set(ident["unidentified_labels"])
    row_ok = np.array([label not in unidentified for label in data.labels])
    width = (high - low).max(axis=1)
    weak = [label for i, label in enumerate(data.labels) if row_ok[i] and width[i] > max_ci_width]
    per_label = {
        label: ("not_identified" if not row_ok[i] else ("weak" if label in weak else "identified"))
        for i, label in enumerate(data.labels)
    }
    ident["per_label"] = per_label
    if weak:
        ident["reasons"].append(
            f"label(s) {', '.join(weak)}: 95% intervals wider than {max_ci_width} (bootstrap over "
            "campaigns); too few campaigns where they dominate the mix"
        )
        if ident["status"] == "identified":
            ident["status"] = "weak"
    for name in (matrix, low, high, se):
        name[~row_ok] = np.nan

    shares = _label_distribution(data, panel, label_shares)
    metrics, accuracy, accuracy_ci = _metrics(data, matrix, replicates, shares, row_ok, t, inflate, low, high)
    support = {label: float((data.mix[:, i] * panel).sum()) for i, label in enumerate(data.labels)}
    notes = [
        "TRUTH given as counts: each campaign weighted by its panel size (multinomial likelihood)"
        if data.truth_kind == "counts"
        else "TRUTH given as shares: panel sizes unknown, every campaign weighted equally "
        "(give counts to weight campaigns by how many users the vendor measured)",
        f"MIX given as {data.mix_kind}",
        "label distribution for recall and accuracy: "
        + ("as given" if label_shares else "pooled over the campaigns' reached users (not the population)"),
    ]
    notes.extend(_unmatched_categories_notes(data))
    details: dict[str, Any] = {
        "campaigns": n_campaigns,
        "truth_input": data.truth_kind,
        "mix_input": data.mix_kind,
        "bootstrap_replicates": bootstrap,
        "iterations": iterations,
        "label_distribution": {label: float(shares[i]) for i, label in enumerate(data.labels)},
    }
    if data.panel is not None:
        details["panel_users"] = float(panel.sum())
        dispersion = _dispersion(data.mix, counts, matrix, row_ok)
        if dispersion is not None:
            details["dispersion"] = dispersion
            df = max(n_campaigns * (n_cats - 1) - n_labels * (n_cats - 1), 1)
            if dispersion > 1 + 3 * math.sqrt(2 / df):
                notes.append(
                    f"campaign truths vary {dispersion:.2f}x more than panel noise explains: the provider's "
                    "accuracy may differ between campaigns (intervals from the bootstrap over campaigns "
                    "include that variation)"
                )
    if boot_iterations >= MAX_ITER:
        notes.append("some bootstrap fits stopped at the iteration limit")
    return QualityReport(
        kind="aggregate",
        labels=data.labels,
        categories=data.categories,
        matrix=matrix,
        low=low,
        high=high,
        se=se,
        metrics=metrics,
        method=(
            f"multinomial maximum likelihood across {n_campaigns} campaigns (EM with SQUAREM), rows "
            f"constrained to the simplex; 95% intervals: t({max(n_campaigns - n_labels, 1)}) x bootstrap "
            f"standard error over campaigns ({bootstrap} replicates)"
        ),
        weighting="campaigns weighted by panel size"
        if data.panel is not None
        else "campaigns weighted equally",
        provider=provider,
        attribute=attribute,
        accuracy=accuracy,
        accuracy_ci95=accuracy_ci,
        support=support,
        identifiability=ident,
        notes=notes,
        details=details,
    )


def _unmatched_categories_notes(data: AggregateData) -> list[str]:
    """Why precision, recall or accuracy may be missing: they pair a label with the category
    of the same name, and the two files need not spell their values alike (the matrix itself
    does not need that)."""
    unmatched = [category for category in data.categories if category not in data.labels]
    if not unmatched:
        return []
    if len(unmatched) == len(data.categories):
        return [
            f"no label is spelled like any true category (labels {listed(data.labels)}; categories "
            f"{listed(data.categories)}): the matrix is estimated, but precision, recall and accuracy "
            "pair a label with the category of the same name; spell both files' values alike to get them"
        ]
    return [
        f"no label named like categor{'y' if len(unmatched) == 1 else 'ies'} {listed(unmatched)}: "
        "no precision or recall for them (they pair a label with the category of the same name)"
    ]


def _label_distribution(
    data: AggregateData, panel: NDArray[np.float64], given: dict[str, float] | None
) -> NDArray[np.float64]:
    if given:
        unknown = sorted(set(given) - set(data.labels))
        if unknown:
            raise QualityInputError(
                f"label_shares names label(s) the mix does not have: {', '.join(unknown)}"
            )
        shares = np.array([float(given.get(label, 0.0)) for label in data.labels])
        if not np.all(np.isfinite(shares) & (shares >= 0)) or shares.sum() <= 0:
            raise QualityInputError("label_shares must be finite, >= 0 and not all 0")
    else:
        shares = (data.mix * panel[:, None]).sum(axis=0)
    return np.asarray(shares / shares.sum())


def _metrics(
    data: AggregateData,
    matrix: NDArray[np.float64],
    replicates: NDArray[np.float64],
    shares: NDArray[np.float64],
    row_ok: NDArray[np.bool_],
    t: float,
    inflate: float,
    low: NDArray[np.float64],
    high: NDArray[np.float64],
) -> tuple[dict[str, CategoryMetrics], float | None, tuple[float, float] | None]:
    """Precision from the matrix; recall and accuracy through the label distribution, with
    intervals from the same bootstrap replicates."""

    def interval(value: float, boot: NDArray[np.float64]) -> tuple[float, float]:
        half = t * float(boot.std(ddof=1)) * inflate
        return max(value - half, 0.0), min(value + half, 1.0)

    metrics: dict[str, CategoryMetrics] = {}
    all_ok = bool(row_ok.all())
    panel = data.panel if data.panel is not None else np.ones(len(data.campaigns))
    measured = (data.truth * panel[:, None]).sum(axis=0)  # panel users (or campaigns) per category
    diag_pairs = []
    for j, cat in enumerate(data.categories):
        m = CategoryMetrics(support=float(measured[j]))
        if cat in data.labels:
            i = data.labels.index(cat)
            diag_pairs.append((i, j))
            if row_ok[i]:
                m.precision = float(matrix[i, j])
                m.precision_ci95 = (float(low[i, j]), float(high[i, j]))
            if all_ok:
                column = shares @ matrix[:, j]
                boot_column = replicates[:, :, j] @ shares
                if column > 0:
                    m.recall = float(shares[i] * matrix[i, j] / column)
                    boot = shares[i] * replicates[:, i, j] / np.maximum(boot_column, _TINY)
                    m.recall_ci95 = interval(m.recall, boot)
        metrics[cat] = m
    if not diag_pairs or not all(row_ok[i] for i, _ in diag_pairs):
        return metrics, None, None
    rows = np.array([i for i, _ in diag_pairs])
    cols = np.array([j for _, j in diag_pairs])
    accuracy = float((shares[rows] * matrix[rows, cols]).sum())
    boot_accuracy = (replicates[:, rows, cols] * shares[rows]).sum(axis=1)
    return metrics, accuracy, interval(accuracy, boot_accuracy)


def _dispersion(
    mix: NDArray[np.float64],
    counts: NDArray[np.float64],
    matrix: NDArray[np.float64],
    row_ok: NDArray[np.bool_],
) -> float | None:
    """Pearson chi-square over degrees of freedom: about 1 when the one-matrix model fits."""
    if not row_ok.all():
        return None
    n = counts.sum(axis=1, keepdims=True)
    expected = n * (mix @ matrix)
    keep = expected > 0
    chi2 = float((((counts - expected) ** 2)[keep] / expected[keep]).sum())
    campaigns, cats = counts.shape
    df = campaigns * (cats - 1) - matrix.shape[0] * (cats - 1)
    return chi2 / df if df > 0 else None
