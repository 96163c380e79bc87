"""From per-stratum sums to a reach estimate with an honest 95% interval.

Within stratum ``h`` the sample is a Bernoulli draw (by user hash) from ``N_h`` users;
given its size ``n_h`` it is a simple random sample, so the post-stratified estimator

    Y_h = N_h * m_h / n_h,    Var(Y_h) = N_h^2 (1 - n_h/N_h) * p_h (1 - p_h) / (n_h - 1)

(``m_h`` sampled users match, ``p_h = m_h / n_h``) is unbiased whatever rate the stratum
was sampled at, which is why boosting small strata (the fuzzy fall-back) costs no bias.
Strata that the stratification attributes decide completely (every user matches, or
none does) contribute their exact total ``N_h`` or 0 with no variance.

Intervals: with at least :data:`NORMAL_MIN_MATCHES` matching sampled users, the normal
interval from the stratified variance. With fewer, the normal approximation is badly
wrong (and at zero matches it would say "0 +/- 0"), so we use the Fay–Feuer gamma
interval for a weighted sum of Poisson counts (Fay & Feuer 1997, the standard for
directly standardized rates): the upper bound stays positive at zero matches, at about
``3.7 x`` the largest sampling weight of a stratum that could hold matches. The mirror
case, fewer than that many sampled users *not* matching, takes the same interval on the
misses (reach = the open strata's users minus them). Bounds are
then clipped to what is certain: at least the exact part plus the matching sampled users
themselves (they exist), at most the users of the strata not ruled out.

Horizon forecasts use the same machinery with ``y = P(active within D)`` (or expected
impressions) per matching user instead of 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from estimation.shard import PartialSums

Z95 = 1.959963984540054
NORMAL_MIN_MATCHES = 30


@dataclass
class Estimate:
    """One estimated total with its interval (users, or impressions)."""

    value: float
    low: float
    high: float
    method: str
    std_error: float


@dataclass
class ReachEstimate:
    """The answer to a reach query. ``sample_users``: matching sampled users behind it."""

    reach: float
    ci95: tuple[float, float]
    sample_users: int
    population: int
    sample_size: int
    exact_users: int
    method: str
    std_error: float
    horizon_days: float | None = None
    audience: float | None = None
    impressions: float | None = None
    impressions_ci95: tuple[float, float] | None = None
    partial: bool = False
    missing_shards: list[int] = field(default_factory=list)
    coverage: float = 1.0
    warnings: list[str] = field(default_factory=list)

    @property
    def relative_error_95(self) -> float:
        """Half-width of the interval relative to the estimate (inf when the estimate is 0)."""
        half = (self.ci95[1] - self.ci95[0]) / 2
        return half / self.reach if self.reach > 0 else math.inf

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "reach": self.reach,
            "ci95": [self.ci95[0], self.ci95[1]],
            "sample_users": self.sample_users,
            "population": self.population,
            "sample_size": self.sample_size,
            "exact_users": self.exact_users,
            "method": self.method,
            "std_error": self.std_error,
            "partial": self.partial,
            "warnings": self.warnings,
        }
        if self.horizon_days is not None:
            out.update(
                horizon_days=self.horizon_days,
                audience=self.audience,
                impressions=self.impressions,
                impressions_ci95=list(self.impressions_ci95) if self.impressions_ci95 else None,
            )
        if self.partial:
            out.update(missing_shards=self.missing_shards, coverage=self.coverage)
        return out


def estimate_reach(
    sums: PartialSums, surely_yes: NDArray[np.bool_], surely_no: NDArray[np.bool_]
) -> tuple[Estimate, int, int]:
    """Matching users now: ``(estimate, matching sampled users, exact users)``."""
    n_pop = sums.population.astype(np.float64)
    n = sums.sampled.astype(np.float64)
    m = sums.matched.astype(np.float64)
    yes = surely_yes & (sums.population > 0)
    open_ = ~surely_yes & ~surely_no & (sums.population > 0)
    exact = float(n_pop[yes].sum())
    est, var, wmax, matches = _stratified(n_pop[open_], n[open_], m[open_], m[open_], m[open_])
    misses = n[open_] - m[open_]
    floor = exact + matches
    ceiling = exact + float(n_pop[open_].sum()) - float(misses.sum())  # sampled misses exist too
    result = _interval(exact + est, var, exact, est, wmax, matches, floor, ceiling)
    if wmax > 0 and matches >= NORMAL_MIN_MATCHES and misses.sum() < NORMAL_MIN_MATCHES:
        result = _nearly_everyone(result, n_pop[open_], n[open_], misses, exact, floor, ceiling)
    return result, int(m[yes].sum() + matches), int(exact)


def _nearly_everyone(
    result: Estimate,
    n_pop: NDArray[np.float64],
    n: NDArray[np.float64],
    misses: NDArray[np.float64],
    exact: float,
    floor: float,
    ceiling: float,
) -> Estimate:
    """The interval of a targeting that almost every sampled user matches, from its few misses.

    There the normal interval collapses toward "everyone +/- 0" as the misses go to zero,
    the mirror of few matches: the users who do *not* match are a small count, so they get
    the Fay–Feuer interval and the reach is the open strata's users minus them.
    """
    miss_est, miss_var, miss_wmax, _ = _stratified(n_pop, n, misses, misses, misses)
    low_miss, high_miss = fay_feuer(miss_est, miss_var, miss_wmax)
    everyone = exact + float(n_pop.sum())
    low = min(max(everyone - high_miss, floor), result.value)
    high = max(min(everyone - low_miss, ceiling), result.value)
    return Estimate(result.value, low, high, "fay-feuer", result.std_error)


def estimate_horizon(
    sums: PartialSums, surely_no: NDArray[np.bool_], days: float
) -> tuple[Estimate, Estimate, int]:
    """Users active within ``days`` and their impressions: ``(reach, impressions, matches)``."""
    assert sums.p_sum is not None and sums.p_sq is not None
    assert sums.imp_sum is not None and sums.imp_sq is not None
    keep = ~surely_no & (sums.population > 0)
    n_pop = sums.population[keep].astype(np.float64)
    n = sums.sampled[keep].astype(np.float64)
    m = sums.matched[keep].astype(np.float64)
    reach_est, reach_var, wmax, matches = _stratified(n_pop, n, m, sums.p_sum[keep], sums.p_sq[keep])
    reach = _interval(reach_est, reach_var, 0.0, reach_est, wmax, matches, 0.0, float(n_pop.sum()))
    imp_est, imp_var, _, _ = _stratified(n_pop, n, m, sums.imp_sum[keep], sums.imp_sq[keep])
    per_user = float(sums.imp_sum[keep].sum() / max(sums.p_sum[keep].sum(), 1e-12)) if matches else days
    impressions = _interval(imp_est, imp_var, 0.0, imp_est, wmax * max(per_user, 1.0), matches, 0.0, math.inf)
    return reach, impressions, int(matches)


def _stratified(
    n_pop: NDArray[np.float64],
    n: NDArray[np.float64],
    m: NDArray[np.float64],
    y_sum: NDArray[np.float64],
    y_sq: NDArray[np.float64],
) -> tuple[float, float, float, int]:
    """Post-stratified total and variance of ``y`` over the given strata.

    Returns ``(total, variance, largest weight, matching sampled users)``. A stratum with
    users but no sampled user (possible only for tiny strata, or right after a rebuild
    raced with the stream) is imputed at the overall sampled mean, with the largest
    possible variance for its size, rather than silently counted as zero.
    """
    sampled = n > 0
    weights = np.divide(n_pop, n, out=np.zeros_like(n_pop), where=sampled)
    total = float((weights * y_sum).sum())
    mean = np.divide(y_sum, n, out=np.zeros_like(n_pop), where=sampled)
    sq_mean = np.divide(y_sq, n, out=np.zeros_like(n_pop), where=sampled)
    s2 = np.maximum(sq_mean - mean * mean, 0.0) * np.divide(n, n - 1, out=np.ones_like(n), where=n > 1)
    s2 = np.where(n > 1, s2, 0.25)
    fpc = np.clip(1.0 - np.divide(n, n_pop, out=np.ones_like(n), where=n_pop > 0), 0.0, 1.0)
    var = float((n_pop * n_pop * fpc * np.divide(s2, n, out=np.zeros_like(n), where=sampled)).sum())
    empty = ~sampled & (n_pop > 0)
    if empty.any():
        overall = float(y_sum.sum() / n.sum()) if n.sum() > 0 else 0.0
        total += float(n_pop[empty].sum()) * overall
        var += float((n_pop[empty] ** 2).sum()) * 0.25
    open_weights = weights[sampled & (fpc > 0)]
    wmax = float(open_weights.max()) if len(open_weights) else 0.0
    if empty.any():
        wmax = max(wmax, float(n_pop[empty].max()))
    return total, var, wmax, int(m.sum())


def _interval(
    value: float,
    var: float,
    exact: float,
    sampled_part: float,
    wmax: float,
    matches: int,
    floor: float,
    ceiling: float,
) -> Estimate:
    se = math.sqrt(max(var, 0.0))
    if wmax == 0.0:  # everything exact (decided or a census)
        return Estimate(value, value, value, "exact", 0.0)
    if matches >= NORMAL_MIN_MATCHES:
        low, high, method = value - Z95 * se, value + Z95 * se, "normal"
    else:
        lo_part, hi_part = fay_feuer(sampled_part, var, wmax)
        low, high, method = exact + lo_part, exact + hi_part, "fay-feuer"
    low = min(max(low, floor), value)
    high = max(min(high, ceiling), value)
    return Estimate(value, low, high, method, se)


def fay_feuer(y: float, v: float, wmax: float) -> tuple[float, float]:
    """95% gamma interval for a weighted sum of Poisson counts (Fay & Feuer 1997)."""
    low = 0.0
    if y > 0:
        low = v / (2 * y) * chi2_quantile(0.025, 2 * y * y / v) if v > 0 else y
    y_up, v_up = y + wmax, v + wmax * wmax
    high = v_up / (2 * y_up) * chi2_quantile(0.975, 2 * y_up * y_up / v_up)
    return max(low, 0.0), high


def chi2_quantile(p: float, df: float) -> float:
    """Chi-square quantile by the Wilson–Hilferty cube approximation (within ~1% for df >= 1).

    Closed form on purpose: it runs per query, and an exact inverse incomplete gamma costs
    milliseconds in pure Python.
    """
    z = _normal_quantile(p)
    h = 2.0 / (9.0 * df)
    value = df * (1.0 - h + z * math.sqrt(h)) ** 3
    return max(value, 0.0)


def _normal_quantile(p: float) -> float:
    """Acklam's rational approximation of the standard normal quantile (|error| < 1.2e-9)."""
    a = (
        -39.69683028665376,
        220.9460984245205,
        -275.9285104469687,
        138.3577518672690,
        -30.66479806614716,
        2.506628277459239,
    )
    b = (-54.47609879822406, 161.5858368580409, -155.6989798598866, 66.80131188771972, -13.28068155288572)
    c = (
        -0.007784894002430293,
        -0.3223964580411365,
        -2.400758277161838,
        -2.549732539343734,
        4.374664141464968,
        2.938163982698783,
    )
    d = (0.007784695709041462, 0.3224671290700398, 2.445134137142996, 3.754408661907416)
    low = 0.02425
    if p < low:
        q = math.sqrt(-2 * math.log(p))
        return (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / (
            (((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1
        )
    if p > 1 - low:
        return -_normal_quantile(1 - p)
    q = p - 0.5
    r = q * q
    return (
        (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5])
        * q
        / (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1)
    )
