"""Per-user activity (impressions per day) for horizon forecasts, learned from history.

A user's impressions are modelled as a Poisson process with an unknown daily rate
``lambda`` that has a Gamma(shape, rate) distribution across users. From history we fit
that Gamma prior by the method of moments (empirical Bayes), then each user with ``k``
impressions over ``T`` days of exposure has the posterior Gamma(shape + k, rate + T).
Keeping the posterior rather than the point estimate ``k / T`` matters for reach: a user
seen once in a week is not "certainly active tomorrow", and the Jensen gap between
``1 - exp(-E[lambda] D)`` and ``E[1 - exp(-lambda D)]`` is what over-forecasts naive
reach curves. For a horizon of ``D`` days:

* ``P(active within D) = 1 - (rate / (rate + D)) ** shape`` (posterior predictive);
* expected impressions ``= D * shape / rate``.

Sources, in order of preference (see ``ReachSettings``): an event history (Parquet with
``user_id``, ``type`` and ``event_time``; impressions are ``type = 'impression'``), a
population column of known impressions/day (multiplied by ``activity_scale``), or one
constant rate for everyone (``default_activity_rate``). A known rate is stored as a
very sharp Gamma (``shape = lambda * S``, ``rate = S``, ``S = 1e9``), so every source
goes through the same formulas. Users streamed in later get the prior.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
from numpy.typing import NDArray

from estimation.hashing import hash_user_ids

SHARP = 1e9  # pseudo-exposure (days) that turns a known rate into a near-point-mass Gamma
DAY_MS = 86_400_000
# What an event history must hold (other columns, e.g. the SDK's other event fields, are ignored).
EVENT_COLUMNS = ("type", "user_id", "event_time")


class ActivityError(ValueError):
    """Activity rates cannot be learned (no such events file, no impressions, bad column)."""


@dataclass(frozen=True)
class ActivityModel:
    """Where rates came from and the prior that new users get."""

    source: str
    prior_shape: float
    prior_rate: float
    history_days: float = 0.0
    users_with_history: int = 0

    @property
    def prior_mean(self) -> float:
        return self.prior_shape / self.prior_rate

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "prior_shape": self.prior_shape,
            "prior_rate": self.prior_rate,
            "prior_mean_impressions_per_day": self.prior_mean,
            "history_days": self.history_days,
            "users_with_history": self.users_with_history,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ActivityModel:
        return cls(
            source=str(data["source"]),
            prior_shape=float(data["prior_shape"]),
            prior_rate=float(data["prior_rate"]),
            history_days=float(data.get("history_days", 0.0)),
            users_with_history=int(data.get("users_with_history", 0)),
        )


def constant_rates(n: int, rate: float) -> tuple[NDArray[np.float64], NDArray[np.float64], ActivityModel]:
    """Everyone at ``rate`` impressions/day (the fallback when nothing better is known)."""
    model = ActivityModel(f"constant {rate:g}/day (reach.default_activity_rate)", rate * SHARP, SHARP)
    return np.full(n, rate * SHARP), np.full(n, SHARP), model


def column_rates(
    values: NDArray[np.float64], name: str, scale: float, default: float
) -> tuple[NDArray[np.float64], NDArray[np.float64], ActivityModel]:
    """Known rates from a population column (nulls/negatives get ``default``)."""
    rates = np.asarray(values, dtype=np.float64) * scale
    bad = ~np.isfinite(rates) | (rates < 0)
    rates = np.where(bad, default, rates)
    mean = float(rates.mean()) if len(rates) else default
    source = f"column {name!r} x {scale:g} (impressions/day)"
    if bad.any():
        unusable = int(bad.sum())
        source += f"; {unusable:,} users without a usable value (missing or negative) at {default:g}/day"
    model = ActivityModel(source, mean * SHARP, SHARP)
    return rates * SHARP, np.full(len(rates), SHARP), model


def learn_from_events(
    events: Path,
    user_ids: pa.Array | pa.ChunkedArray,
    seed: int,
    joined_ms: NDArray[np.int64] | None = None,
) -> tuple[NDArray[np.float64], NDArray[np.float64], ActivityModel]:
    """Posterior (shape, rate) for every population user from an impression history.

    ``events`` is a Parquet file or a directory of Parquet files. Exposure runs from the
    later of the history start and the user's ``joined_ms`` to the history end.
    """
    pattern = str(events / "**" / "*.parquet") if events.is_dir() else str(events)
    if not events.exists():
        raise ActivityError(f"no events at {events}")
    con = duckdb.connect()
    try:
        source = f"read_parquet('{pattern.replace(chr(39), chr(39) * 2)}', union_by_name = true)"
        columns = {row[0] for row in con.sql(f"DESCRIBE SELECT * FROM {source}").fetchall()}
        missing = [name for name in EVENT_COLUMNS if name not in columns]
        if missing:
            raise ActivityError(
                f"{events} has no column {', '.join(missing)}: an event history needs "
                f"{', '.join(EVENT_COLUMNS)} (impressions are the rows whose type is 'impression'; "
                f"event_time an RFC 3339 text or a timestamp); it has {', '.join(sorted(columns))}"
            )
        impressions = f"FROM {source} WHERE type = 'impression'"
        # As instants whatever the column holds: timestamps of any unit, zoned or not (naive
        # ones are UTC, as everywhere in adreach), or ISO 8601 texts in any UTC offset.
        con.sql("SET TimeZone = 'UTC'")
        instant = "CAST(event_time AS TIMESTAMPTZ)"
        span_sql = f"SELECT epoch_ms(min({instant})), epoch_ms(max({instant})) {impressions}"
        span = con.sql(span_sql).fetchall()[0]
        counts = con.sql(f"SELECT user_id, count(*) AS k {impressions} GROUP BY user_id").arrow().read_all()
    except duckdb.Error as exc:
        raise ActivityError(f"cannot read events from {events}: {exc}") from None
    finally:
        con.close()
    if span[0] is None:
        raise ActivityError(f"{events} holds no impression events to learn activity from")
    start_ms, end_ms = int(span[0]), int(span[1])
    days = max((end_ms - start_ms) / DAY_MS, 1e-6)
    population_hashes = hash_user_ids(user_ids, seed)
    order = np.argsort(population_hashes)
    sorted_hashes = population_hashes[order]
    k = np.zeros(len(population_hashes), dtype=np.float64)
    if counts.num_rows:
        event_hashes = hash_user_ids(counts.column("user_id"), seed)
        pos = np.clip(np.searchsorted(sorted_hashes, event_hashes), 0, max(len(sorted_hashes) - 1, 0))
        hit = sorted_hashes[pos] == event_hashes
        k[order[pos[hit]]] = counts.column("k").to_numpy()[hit]
    exposure = np.full(len(k), days)
    if joined_ms is not None:
        exposure = np.clip((end_ms - np.maximum(joined_ms, start_ms)) / DAY_MS, 1e-3, days)
    shape, rate = fit_gamma_prior(k, exposure)
    model = ActivityModel(
        f"impression history {events.name} (Gamma-Poisson posterior)",
        shape,
        rate,
        history_days=round(days, 4),
        users_with_history=int((k > 0).sum()),
    )
    return shape + k, rate + exposure, model


def fit_gamma_prior(k: NDArray[np.float64], exposure: NDArray[np.float64]) -> tuple[float, float]:
    """Method-of-moments Gamma prior for Poisson counts ``k`` over ``exposure`` days.

    The between-user variance of the rates is the variance of ``k / T`` minus the Poisson
    noise ``mean(lambda / T)``; when noise explains everything the prior is made sharp.
    """
    if len(k) == 0 or exposure.sum() <= 0:
        raise ActivityError("no users to learn activity rates from")
    mean = float(k.sum() / exposure.sum())
    if mean <= 0:
        raise ActivityError("the history holds no impressions for the population's users")
    observed = k / exposure
    between = float(observed.var() - mean * np.mean(1.0 / exposure))
    between = max(between, mean**2 * 1e-4)
    return mean**2 / between, mean / between


def p_active(shape: NDArray[np.float64], rate: NDArray[np.float64], days: float) -> NDArray[np.float64]:
    """Posterior probability of at least one impression within ``days``."""
    result: NDArray[np.float64] = -np.expm1(-shape * np.log1p(days / rate))
    return result
