"""The reach part of ``adreach demo``: build a sample from the simulated population, ask.

Kept out of :mod:`infra.cli` so that the demo command only needs one call. Each example
is answered by the estimator and, for comparison, exactly by DuckDB over the full
population table, so the printout shows the error next to the interval.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import duckdb

from estimation.build import build_sample
from estimation.forecaster import ReachForecaster
from estimation.schema import Schema
from estimation.targeting import Expr, parse_targeting, to_text
from estimation.temporal import iso_timestamp
from infra.settings import ReachSettings

EXAMPLES: list[dict[str, Any]] = [
    {"field": "country", "eq": "US"},
    {"and": [{"field": "country", "in": ["DE", "FR"]}, {"field": "interests", "has_any": ["travel"]}]},
    {"and": [{"field": "age", "between": [25, 34]}, {"field": "device", "eq": "mobile"}]},
    {"and": [{"field": "country", "eq": "IS"}, {"field": "interests", "has_any": ["gaming", "pets"]}]},
    {
        "and": [
            {"field": "gender", "eq": "female"},
            {"field": "interests", "has_all": ["travel", "pets"]},
            {"not": {"field": "device", "eq": "desktop"}},
        ]
    },
]


def print_reach_examples(truth_dir: Path, out: Path, settings: ReachSettings | None = None) -> None:
    """Build ``out`` from ``truth_dir/population.parquet`` and print example forecasts."""
    settings = settings or ReachSettings()
    population = truth_dir / "population.parquet"
    model = truth_dir / "response_model.json"
    if model.is_file() and settings.activity_field == "activity_rate":
        # The simulator's activity_rate is before its event-volume scaling; apply it.
        scale = float(json.loads(model.read_text()).get("rate_scale", 1.0))
        settings = settings.model_copy(update={"activity_scale": scale})
    report = build_sample(population, out, settings)
    print(report.describe())
    with ReachForecaster.open(out, shards=1, settings=settings) as reach:
        schema = reach.meta.schema
        for example in [*EXAMPLES, *_newcomers_on_mobile(population, schema)]:
            expr = parse_targeting(example, schema)
            started = time.perf_counter()
            answer = reach.estimate(expr)
            week = reach.estimate(expr, horizon_days=7)
            elapsed_ms = (time.perf_counter() - started) * 1000 / 2
            exact = _exact(population, expr, settings)
            error = f"{(answer.reach - exact) / exact:+.1%}" if exact else "n/a"
            low, high = answer.ci95
            print(
                f"  {to_text(expr)}\n"
                f"    reach {answer.reach:,.0f} (95% {low:,.0f}..{high:,.0f}; exact {exact:,}, "
                f"error {error}; "
                f"{answer.sample_users:,} sampled users), active within 7 days {week.reach:,.0f}, "
                f"{week.impressions or 0:,.0f} impressions; {elapsed_ms:.2f} ms"
            )


def _newcomers_on_mobile(population: Path, schema: Schema) -> list[dict[str, Any]]:
    """Users who joined after the first simulated day, on mobile: an open timestamp range
    (dates follow the simulation's start, so none is written here)."""
    if "joined_at" not in schema or "device" not in schema:
        return []
    first = schema["joined_at"].minimum
    if first is None:
        return []
    between = {"field": "joined_at", "between": [iso_timestamp(first + 86_400 * 1_000_000), None]}
    return [{"and": [between, {"field": "device", "eq": "mobile"}]}]


def _exact(population: Path, expr: Expr, settings: ReachSettings) -> int:
    from estimation.sql import to_sql

    deleted = settings.deleted_field
    where = to_sql(expr)
    alive = f" AND {deleted} IS NULL" if deleted else ""
    with duckdb.connect() as con:
        row = con.execute(
            f"SELECT count(*) FROM read_parquet('{population}') WHERE ({where}){alive}"
        ).fetchone()
    return int(row[0]) if row else 0
