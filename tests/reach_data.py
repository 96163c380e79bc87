"""Synthetic populations for the reach tests, with deliberately generic column names.

Nothing here uses the simulator's column names, so the tests also show that the sample
builder works on any Parquet population: a skewed categorical with tiny minorities, an
integer, a float, a boolean, and a list<string> column that depends on the others; and
(:func:`with_dates`) a date and two timestamp columns.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

MARKETS = np.array(["north", "south", "east", "west", "island", "outpost"])
MARKET_P = np.array([0.45, 0.3, 0.15, 0.085, 0.013, 0.002])
PLANS = np.array(["free", "basic", "pro"])
TAGS = np.array([f"t{i}" for i in range(12)])


def population(n: int, seed: int = 7, *, prefix: str = "user-") -> pa.Table:
    rng = np.random.default_rng(seed)
    market = rng.choice(len(MARKETS), size=n, p=MARKET_P)
    plan = np.minimum(rng.poisson(0.4 + 0.3 * (market % 3), size=n), 2)
    level = rng.integers(1, 40, size=n) + 5 * plan
    score = rng.gamma(2.0, 1.0 + market, size=n)
    paid = rng.random(n) < 0.2 + 0.25 * plan
    affinity = rng.normal(size=(n, len(TAGS))) + 0.8 * (
        np.arange(len(TAGS))[None, :] % len(MARKETS) == market[:, None]
    )
    affinity += 0.5 * (plan[:, None] == (np.arange(len(TAGS))[None, :] % 3))
    k = 1 + rng.poisson(1.5, size=n)
    ranks = np.argsort(np.argsort(-affinity, axis=1), axis=1)
    member = ranks < k[:, None]
    rows, cols = np.nonzero(member)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))]).astype(np.int32)
    tags = pa.ListArray.from_arrays(pa.array(offsets), pa.array(TAGS[cols]))
    level_arr = pa.array(level.astype(np.int64), mask=rng.random(n) < 0.02)  # a few unknown levels
    return pa.table(
        {
            "user_id": pa.array([f"{prefix}{i}" for i in range(n)]),
            "market": pa.array(MARKETS[market]),
            "plan": pa.array(PLANS[plan]),
            "level": level_arr,
            "score": pa.array(score),
            "paid": pa.array(paid),
            "tags": tags,
            "visits_per_day": pa.array(rng.gamma(1.5, 2.0, size=n)),
        }
    )


QUERIES: list[dict[str, Any]] = [
    {"and": []},
    {"field": "market", "eq": "north"},
    {"field": "tags", "has_any": ["t1"]},
    {"and": [{"field": "market", "in": ["east", "west"]}, {"field": "tags", "has_any": ["t2", "t3"]}]},
    {"and": [{"field": "level", "between": [10, 20]}, {"field": "paid", "eq": True}]},
    {"or": [{"field": "plan", "eq": "pro"}, {"field": "score", "between": [0, 0.5]}]},
    {"not": {"field": "tags", "has_all": ["t0", "t6"]}},
    {"and": [{"field": "market", "eq": "island"}, {"field": "tags", "has_any": ["t4"]}]},
    {
        "and": [
            {"field": "plan", "in": ["basic", "pro"]},
            {"field": "tags", "has_any": ["t5", "t9"]},
            {"not": {"field": "market", "eq": "north"}},
        ]
    },
]


def with_dates(pop: pa.Table) -> pa.Table:
    """``pop`` plus a date, a zoned nanosecond timestamp (as pandas writes) and a naive one."""
    rng = np.random.default_rng(17)
    n = pop.num_rows
    days = rng.integers(19_000, 19_060, n)  # 2022-01-08 .. 2022-03-08
    micros = 1_700_000_000_000_000 + rng.integers(0, 10 * 86_400 * 10**6, n)  # 2023-11-14 .. 24
    return (
        pop.append_column("signup", pa.array(days.astype(np.int32), pa.date32(), mask=rng.random(n) < 0.05))
        .append_column("last_seen", pa.array(micros * 1000, pa.timestamp("ns", tz="Asia/Tokyo")))
        .append_column("first_seen", pa.array(micros // 1000 - 86_400_000, pa.timestamp("ms")))
    )
