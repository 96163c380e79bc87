"""Advertisers, campaigns with targeting, and ads.

Targeting is written in adreach's JSON targeting language (``and``/``or``/``not``,
``eq``/``in``/``between``/``has_any``/``has_all``; ``{"and": []}`` is everyone), so
the ground truth doubles as realistic reach-forecast queries. A share of campaigns is
untargeted (run of network) so every impression finds an ad.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from numpy.typing import NDArray

from streams.simulation.population import AGE_BANDS, COUNTRIES, COUNTRY_P, DEVICES, GENDERS, Population
from streams.simulation.topics import SEGMENTS, TOPICS


@dataclass
class Catalog:
    advertiser_topic: NDArray[Any]  # per advertiser
    advertiser_quality: NDArray[Any]
    campaign_advertiser: NDArray[Any]  # per campaign
    campaign_topic: NDArray[Any]
    campaign_targeting: list[dict[str, Any]]
    campaign_budget: NDArray[Any]
    campaign_quality: NDArray[Any]
    campaign_start_ms: NDArray[Any]
    campaign_end_ms: NDArray[Any]
    campaign_first_ad: NDArray[Any]
    campaign_ad_count: NDArray[Any]
    ad_campaign: NDArray[Any]  # per ad
    ad_topic: NDArray[Any]
    ad_quality: NDArray[Any]

    def tables(self) -> dict[str, pa.Table]:
        advertisers = pa.table(
            {
                "advertiser_id": [f"adv{i}" for i in range(len(self.advertiser_topic))],
                "topic": [SEGMENTS[t] for t in self.advertiser_topic],
                "quality": self.advertiser_quality,
            }
        )
        campaigns = pa.table(
            {
                "campaign_id": [f"c{i}" for i in range(len(self.campaign_topic))],
                "advertiser_id": [f"adv{a}" for a in self.campaign_advertiser],
                "topic": [SEGMENTS[t] for t in self.campaign_topic],
                "targeting": [json.dumps(t) for t in self.campaign_targeting],
                "budget_weight": self.campaign_budget,
                "quality": self.campaign_quality,
                "start": pa.array(self.campaign_start_ms, pa.timestamp("ms", "UTC")),
                "end": pa.array(self.campaign_end_ms, pa.timestamp("ms", "UTC")),
            }
        )
        ads = pa.table(
            {
                "ad_id": [f"ad{i}" for i in range(len(self.ad_topic))],
                "campaign_id": [f"c{c}" for c in self.ad_campaign],
                "advertiser_id": [f"adv{self.campaign_advertiser[c]}" for c in self.ad_campaign],
                "topic": [SEGMENTS[t] for t in self.ad_topic],
                "quality": self.ad_quality,
            }
        )
        return {"advertisers": advertisers, "campaigns": campaigns, "ads": ads}


def build_catalog(
    rng: np.random.Generator,
    advertisers: int,
    campaigns: int,
    start_ms: int,
    end_ms: int,
    launch_ms: int | None,
    held_back_fraction: float,
) -> Catalog:
    n_topics = len(TOPICS)
    advertiser_topic = rng.integers(0, n_topics, size=advertisers)
    advertiser_quality = rng.normal(0, 0.3, size=advertisers)
    campaign_advertiser = np.concatenate(
        [np.arange(advertisers), rng.integers(0, advertisers, size=campaigns - advertisers)]
    )
    campaign_topic = np.where(
        rng.random(campaigns) < 0.8,
        advertiser_topic[campaign_advertiser],
        rng.integers(0, n_topics, campaigns),
    )
    targeting = [_random_targeting(rng, int(topic)) for topic in campaign_topic]
    start = np.full(campaigns, start_ms, dtype=np.int64)
    if launch_ms is not None:
        held_back = rng.random(campaigns) < held_back_fraction
        held_back[: max(1, campaigns // 10)] = False  # keep a core of campaigns live from the start
        start[held_back] = launch_ms
    ad_count = rng.integers(1, 6, size=campaigns)
    first_ad = np.concatenate([[0], np.cumsum(ad_count)[:-1]])
    ad_campaign = np.repeat(np.arange(campaigns), ad_count)
    ad_topic = np.where(
        rng.random(len(ad_campaign)) < 0.9,
        campaign_topic[ad_campaign],
        rng.integers(0, n_topics, len(ad_campaign)),
    )
    return Catalog(
        advertiser_topic=advertiser_topic,
        advertiser_quality=advertiser_quality,
        campaign_advertiser=campaign_advertiser,
        campaign_topic=campaign_topic,
        campaign_targeting=targeting,
        campaign_budget=np.exp(rng.normal(0, 1.0, size=campaigns)),
        campaign_quality=rng.normal(0, 0.3, size=campaigns),
        campaign_start_ms=start,
        campaign_end_ms=np.full(campaigns, end_ms, dtype=np.int64),
        campaign_first_ad=first_ad,
        campaign_ad_count=ad_count,
        ad_campaign=ad_campaign,
        ad_topic=ad_topic,
        ad_quality=rng.normal(0, 0.2, size=len(ad_campaign)),
    )


def _random_targeting(rng: np.random.Generator, topic: int) -> dict[str, Any]:
    if rng.random() < 0.25:
        return {"and": []}
    criteria: list[dict[str, Any]] = []
    kinds = rng.choice(5, size=int(rng.integers(1, 4)), replace=False)
    for kind in kinds:
        if kind == 0:
            picked = rng.choice(len(COUNTRIES), size=int(rng.integers(1, 4)), replace=False, p=COUNTRY_P)
            criteria.append({"field": "country", "in": sorted(str(COUNTRIES[i]) for i in picked)})
        elif kind == 1:
            low = int(rng.choice([18, 25, 35, 45]))
            criteria.append({"field": "age", "between": [low, low + int(rng.integers(10, 41))]})
        elif kind == 2:
            criteria.append({"field": "gender", "eq": str(rng.choice(GENDERS[:2]))})
        elif kind == 3:
            picked = rng.choice(len(DEVICES), size=int(rng.integers(1, 3)), replace=False)
            criteria.append({"field": "device", "in": sorted(str(DEVICES[i]) for i in picked)})
        else:
            segments = {SEGMENTS[topic], SEGMENTS[int(rng.integers(0, len(SEGMENTS)))]}
            criteria.append({"field": "interests", "has_any": sorted(segments)})
    return criteria[0] if len(criteria) == 1 else {"and": criteria}


CATEGORIES: dict[str, NDArray[Any]] = {
    "country": COUNTRIES,
    "age_band": AGE_BANDS,
    "gender": GENDERS,
    "device": DEVICES,
}


def row_view(population: Population, rows: NDArray[Any]) -> dict[str, NDArray[Any]]:
    """The targetable columns of ``rows``, gathered once so many campaigns can be evaluated cheaply.

    Categorical columns stay integer codes (see :data:`CATEGORIES`): ``eq``/``in`` then
    become a lookup in a tiny boolean table instead of string comparisons.
    """
    return {
        "country": population.country[rows],
        "age": population.age[rows],
        "age_band": population.age_band[rows],
        "gender": population.gender[rows],
        "device": population.device[rows],
        "os": population.os[rows],
        "interests": population.interests[rows],
    }


def matches(targeting: dict[str, Any], view: dict[str, NDArray[Any]]) -> NDArray[Any]:
    """Vectorized evaluation of a targeting expression over a :func:`row_view`."""
    rows = len(view["age"])
    if "and" in targeting:
        result = np.ones(rows, dtype=bool)
        for part in targeting["and"]:
            result &= matches(part, view)
        return result
    if "or" in targeting:
        result = np.zeros(rows, dtype=bool)
        for part in targeting["or"]:
            result |= matches(part, view)
        return result
    if "not" in targeting:
        return ~matches(targeting["not"], view)
    field = targeting["field"]
    values = view[field]
    if field in CATEGORIES and ("eq" in targeting or "in" in targeting):
        wanted = [targeting["eq"]] if "eq" in targeting else targeting["in"]
        return np.asarray(np.isin(CATEGORIES[field], wanted)[values])
    if "has_any" in targeting or "has_all" in targeting:
        wanted = targeting.get("has_any", targeting.get("has_all", []))
        members = values[:, [SEGMENTS.index(s) for s in wanted]]
        return np.asarray(members.any(axis=1) if "has_any" in targeting else members.all(axis=1))
    if "eq" in targeting:
        return np.asarray(values == targeting["eq"])
    if "in" in targeting:
        return np.isin(values, targeting["in"])
    low, high = targeting["between"]
    return np.asarray((values >= low) & (values <= high))


class CompiledTargeting:
    """All campaigns' targeting as lookup matrices, so eligibility is a few array operations.

    The simulator writes every targeting as a conjunction of simple criteria (country
    ``in``, age ``between``, gender ``eq``, device ``in``, interests ``has_any``);
    :func:`matches` stays the general reference evaluator, and tests check both agree.
    """

    def __init__(self, targetings: list[dict[str, Any]]) -> None:
        n = len(targetings)
        self.country = np.ones((len(COUNTRIES), n), dtype=bool)
        self.gender = np.ones((len(GENDERS), n), dtype=bool)
        self.device = np.ones((len(DEVICES), n), dtype=bool)
        self.age_low = np.full(n, -1)
        self.age_high = np.full(n, 1_000)
        self.interests = np.zeros((len(SEGMENTS), n), dtype=np.float32)
        self.needs_interest = np.zeros(n, dtype=bool)
        for j, targeting in enumerate(targetings):
            criteria = targeting.get("and", [targeting])
            for criterion in criteria:
                self._add(j, criterion)

    def _add(self, j: int, criterion: dict[str, Any]) -> None:
        field = criterion.get("field")
        if field in ("country", "gender", "device") and ("in" in criterion or "eq" in criterion):
            wanted = criterion["in"] if "in" in criterion else [criterion["eq"]]
            table = getattr(self, field)
            table[:, j] &= np.isin(CATEGORIES[field], wanted)
        elif field == "age" and "between" in criterion:
            self.age_low[j] = max(self.age_low[j], criterion["between"][0])
            self.age_high[j] = min(self.age_high[j], criterion["between"][1])
        elif field == "interests" and "has_any" in criterion:
            self.needs_interest[j] = True
            for segment in criterion["has_any"]:
                self.interests[SEGMENTS.index(segment), j] = 1.0
        else:
            raise ValueError(f"the compiled evaluator does not support {criterion!r}")

    def eligibility(self, population: Population, rows: NDArray[Any]) -> NDArray[Any]:
        """bool (len(rows), campaigns): whether each row matches each campaign's targeting."""
        age = population.age[rows][:, None]
        result = self.country[population.country[rows]] & self.gender[population.gender[rows]]
        result &= self.device[population.device[rows]]
        result &= (age >= self.age_low) & (age <= self.age_high)
        has_interest = population.interests[rows].astype(np.float32) @ self.interests > 0
        result &= has_interest | ~self.needs_interest
        return np.asarray(result)


def choose_campaigns(
    rng: np.random.Generator, eligible: NDArray[Any], weights: NDArray[Any], max_rounds: int = 16
) -> NDArray[Any]:
    """Per row, a campaign drawn with probability proportional to ``weights`` among its eligible ones.

    Rejection sampling: draw from all campaigns by weight and keep the draw if eligible.
    That is exactly the conditional distribution, at O(rows) per round instead of
    O(rows x campaigns); the few rows still unresolved after ``max_rounds`` are drawn
    exactly by inverse CDF. Returns -1 where no campaign is eligible.
    """
    rows = eligible.shape[0]
    choice = np.full(rows, -1, dtype=np.int64)
    cumulative = np.cumsum(weights)
    if rows == 0 or cumulative[-1] <= 0:
        return choice
    pending = np.arange(rows)
    for _ in range(max_rounds):
        candidates = np.searchsorted(cumulative, rng.random(pending.size) * cumulative[-1], side="right")
        candidates = np.minimum(candidates, len(weights) - 1)
        accepted = eligible[pending, candidates]
        choice[pending[accepted]] = candidates[accepted]
        pending = pending[~accepted]
        if pending.size == 0:
            return choice
    row_weights = np.cumsum(eligible[pending] * weights, axis=1)
    totals = row_weights[:, -1]
    picks = (row_weights < (rng.random(pending.size) * totals)[:, None]).sum(axis=1)
    choice[pending] = np.where(totals > 0, np.minimum(picks, len(weights) - 1), -1)
    return choice
