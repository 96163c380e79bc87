"""The simulated world over time: who sees which ad, who clicks, converts, searches.

Time advances in chunks (an hour by default). Within a chunk everything is vectorized:
users are drawn in proportion to their activity and a diurnal curve, each impression
picks a live campaign whose targeting matches (Gumbel-max over log budgets), and
clicks and conversions come from a hidden logistic response model:

    logit P(click) = base + a * affinity(user, ad topic) + position + hour + device + quality

where affinity is the dot product of the user's hidden taste vector with the topic's.
Events leave in *arrival* order: event time plus a delivery delay, with a small late
and a tiny very-late fraction, so downstream engines see out-of-order data. Events
that have not arrived by the end of a chunk are carried into the next one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray

from streams.simulation.batch import ATTRIBUTES_TYPE, EventBatch, assemble
from streams.simulation.catalog import Catalog, CompiledTargeting, build_catalog, choose_campaigns
from streams.simulation.config import SimulationConfig
from streams.simulation.population import (
    AGE_BANDS,
    COUNTRIES,
    COUNTRY_P,
    DEVICES,
    GENDERS,
    TASTE_DIM,
    Population,
    affinity,
    build_population,
    draw_interests,
    segment_lists,
)
from streams.simulation.providers import ProviderAttribute, draw_labels, provider_attributes
from streams.simulation.topics import SEGMENTS, TOPICS, query_pools, zipf_indices

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
PLACEMENTS = pa.array(["feed", "search_top", "sidebar", "video"])
PLACEMENT_P = np.array([0.5, 0.25, 0.15, 0.1])


@dataclass(frozen=True)
class ResponseModel:
    """The hidden click and conversion model (saved with the ground truth)."""

    click_base: float = -3.6
    click_affinity: float = 0.8
    position_effect: tuple[float, ...] = (0.0, -0.35, -0.6, -0.8, -0.95)
    hour_amplitude: float = 0.25  # CTR peaks in the evening (UTC hour 20)
    device_effect: tuple[float, ...] = (0.1, 0.0, -0.1, -0.4)  # mobile, desktop, tablet, ctv
    conversion_base: float = -2.6
    conversion_affinity: float = 0.5
    mean_click_delay_s: float = 8.0
    median_conversion_delay_min: float = 25.0

    def click_logit(
        self,
        aff: NDArray[Any],
        position: NDArray[Any],
        hour: NDArray[Any],
        device: NDArray[Any],
        quality: NDArray[Any],
    ) -> NDArray[Any]:
        hour_term = self.hour_amplitude * np.cos(2 * np.pi * (hour - 20) / 24)
        positions = np.asarray(self.position_effect)[np.minimum(position, len(self.position_effect)) - 1]
        logit: NDArray[Any] = (
            self.click_base
            + self.click_affinity * aff
            + positions
            + hour_term
            + np.asarray(self.device_effect)[device]
            + quality
        )
        return logit


class Simulator:
    """Generates one seeded simulation. Construct, iterate :meth:`batches`, then save the truth."""

    def __init__(self, config: SimulationConfig) -> None:
        self.config = config
        root = np.random.SeedSequence(config.seed)
        world_seq, population_seq, traffic_seq = root.spawn(3)
        world = np.random.default_rng(world_seq)
        self.rng = np.random.default_rng(traffic_seq)
        self.response = ResponseModel()

        vectors = world.normal(0, 1, size=(len(TOPICS), TASTE_DIM)) / math.sqrt(TASTE_DIM)
        self.topic_vectors = vectors.astype(np.float32)
        popularity = 1.0 / np.arange(1, len(TOPICS) + 1) ** 0.8
        self.topic_popularity = popularity[world.permutation(len(TOPICS))]
        self.catalog: Catalog = build_catalog(
            world,
            config.advertisers,
            config.campaigns,
            config.start_ms,
            config.end_ms,
            config.shift_ms("new_campaigns"),
            config.held_back_campaign_fraction,
        )
        self.provider_specs: list[ProviderAttribute] = provider_attributes(world, config.providers)
        self.query_pools = query_pools(world)
        self._pool_sizes = np.array([len(p) for p in self.query_pools])
        self._pool_offsets = np.concatenate([[0], np.cumsum(self._pool_sizes)[:-1]])
        self._all_queries = np.concatenate(self.query_pools)

        self._population_rng = np.random.default_rng(population_seq)
        self.population: Population = build_population(
            self._population_rng,
            config.users,
            first_id=0,
            joined_ms=config.start_ms,
            topic_vectors=self.topic_vectors,
            topic_popularity=self.topic_popularity,
        )
        self.labels = np.stack(
            [draw_labels(self._population_rng, self.population, spec) for spec in self.provider_specs], axis=1
        )
        self._targeting = CompiledTargeting(self.catalog.campaign_targeting)
        self._eligible: NDArray[Any] | None = None  # (users, campaigns), built on first use
        self.shift_log: list[dict[str, object]] = []
        self.truth_impressions: list[pa.Table] = []
        self.truth_searches: list[pa.Table] = []
        self._sequence = 0
        self.rate_scale = self._calibrate()

    # -- targeting eligibility -----------------------------------------------------------

    def _eligible_rows(self, rows: NDArray[Any]) -> NDArray[Any]:
        if self._eligible is None:
            self._eligible = self._targeting.eligibility(self.population, np.arange(len(self.population)))
        return np.asarray(self._eligible[rows])

    def _profiles_changed(self, rows: NDArray[Any]) -> None:
        """Keep the eligibility cache in step with new users and changed profiles."""
        if self._eligible is None:
            return
        if len(self.population) > len(self._eligible):
            new = np.arange(len(self._eligible), len(self.population))
            self._eligible = np.concatenate(
                [self._eligible, self._targeting.eligibility(self.population, new)]
            )
        if rows.size:
            self._eligible[rows] = self._targeting.eligibility(self.population, rows)

    # -- calibration ---------------------------------------------------------------------

    def _calibrate(self) -> float:
        """Scale activity so the expected total event count is close to ``config.events``."""
        c = self.config
        new_users = c.users * c.new_source_fraction_active
        profile_events = (
            c.users
            + new_users
            + (c.users + new_users) * c.days * (c.profile_update_rate_per_day + c.deletion_rate_per_day)
        )
        per_impression = 1.0 + 0.035 * 1.07  # clicks (~3.5% CTR) and conversions (~7% of clicks)
        base = c.days * (
            per_impression * self.population.activity_rate.sum() + self.population.search_rate.sum()
        )
        base *= 1 + new_users / c.users
        return float(max(c.events - profile_events, 0.0) / base)

    # -- the public stream ---------------------------------------------------------------

    def batches(self) -> Iterator[EventBatch]:
        c = self.config
        pending: list[pa.Table] = []  # generated, not yet arrived
        chunk_ms = c.chunk_minutes * 60_000
        start = c.start_ms
        while start < c.end_ms:
            end = min(start + chunk_ms, c.end_ms)
            fresh = self._chunk(start, end, first=start == c.start_ms)
            pending.append(fresh)
            table = self._drop_after_deletion(pa.concat_tables(pending))
            arrival = table.column("arrival_time").cast(pa.int64()).to_numpy()
            if end >= c.end_ms:  # the last chunk flushes everything still in flight
                ready = np.argsort(arrival, kind="stable")
                pending = []
            else:
                arrived = arrival < end
                ready = np.nonzero(arrived)[0]
                ready = ready[np.argsort(arrival[ready], kind="stable")]
                pending = [table.take(pa.array(np.nonzero(~arrived)[0]))]
            if ready.size:
                yield EventBatch(table.take(pa.array(ready)))
            start = end

    # -- one chunk -----------------------------------------------------------------------

    def _chunk(self, start: int, end: int, first: bool) -> pa.Table:
        parts: list[pa.Table] = []
        self._apply_shifts(start, end, parts)
        if first:
            rows = np.arange(len(self.population))
            times = start + self.rng.integers(0, min(HOUR_MS, end - start), size=rows.size)
            parts.append(self._profiles(rows, times))
        parts.append(self._deletions(start, end))
        parts.append(self._profile_updates(start, end))
        parts.extend(self._impressions(start, end))
        parts.append(self._searches(start, end))
        tables = [part for part in parts if part.num_rows]
        return pa.concat_tables(tables) if tables else assemble({}, 0)

    def _alive(self, at: int) -> NDArray[Any]:
        pop = self.population
        return (pop.joined_ms <= at) & ((pop.deleted_ms < 0) | (pop.deleted_ms > at))

    def _apply_shifts(self, start: int, end: int, parts: list[pa.Table]) -> None:
        c = self.config
        for shift in c.shifts:
            at = c.shift_ms(shift.kind)
            if at is None or not start <= at < end:
                continue
            detail: dict[str, object] = {"kind": shift.kind, "at": at}
            if shift.kind == "new_campaigns":
                launched = np.nonzero(self.catalog.campaign_start_ms == at)[0]
                detail["campaigns"] = [f"c{i}" for i in launched]
            elif shift.kind == "interest_drift":
                drift = self.rng.normal(0, 1, size=self.topic_vectors.shape) / math.sqrt(TASTE_DIM)
                self.topic_vectors = (0.7 * self.topic_vectors + 0.3 * drift).astype(np.float32)
                swap = self.rng.permutation(len(TOPICS))[:6]
                self.topic_popularity[swap] = self.topic_popularity[np.roll(swap, 1)]
                movers = np.nonzero(self._alive(at) & (self.rng.random(len(self.population)) < 0.3))[0]
                pop = self.population
                pop.interests[movers] = draw_interests(
                    self.rng, pop.taste[movers], self.topic_vectors, self.topic_popularity
                )
                self._profiles_changed(movers)
                parts.append(self._profiles(movers, self.rng.integers(at, end, size=movers.size)))
                detail["users_with_new_interests"] = int(movers.size)
            else:
                parts.append(self._new_traffic_source(at, end))
                detail["new_users"] = int(round(c.users * c.new_source_user_fraction))
                detail["countries"] = ["BR", "MX", "AR", "IN"]
            self.shift_log.append(detail)

    def _new_traffic_source(self, at: int, end: int) -> pa.Table:
        c = self.config
        count = int(round(c.users * c.new_source_user_fraction))
        if count == 0:
            return assemble({}, 0)
        country_p = COUNTRY_P * 0.3
        for code in ("BR", "MX", "AR", "IN"):
            country_p[np.nonzero(code == COUNTRIES)[0][0]] += 0.7 / 4
        newcomers = build_population(
            self._population_rng,
            count,
            first_id=len(self.population),
            joined_ms=at,
            topic_vectors=self.topic_vectors,
            topic_popularity=self.topic_popularity,
            country_p=country_p / country_p.sum(),
            device_bias=np.array([0.8, -0.5, 0.0, 0.6]),
            taste_offset=self._population_rng.normal(0, 0.5, size=TASTE_DIM),
        )
        newcomers.joined_ms = self.rng.integers(at, end, size=count).astype(np.int64)
        labels = np.stack(
            [draw_labels(self._population_rng, newcomers, s) for s in self.provider_specs], axis=1
        )
        first = len(self.population)
        self.population.extend(newcomers)
        self.labels = np.concatenate([self.labels, labels])
        rows = np.arange(first, first + count)
        self._profiles_changed(np.zeros(0, dtype=np.int64))
        return self._profiles(rows, self.population.joined_ms[rows])

    def _deletions(self, start: int, end: int) -> pa.Table:
        rate = self.config.deletion_rate_per_day * (end - start) / DAY_MS
        alive = np.nonzero(self._alive(start))[0]
        rows = alive[self.rng.random(alive.size) < rate]
        times = self.rng.integers(start, end, size=rows.size)
        times = np.maximum(times, self.population.joined_ms[rows] + 1)
        self.population.deleted_ms[rows] = times
        return assemble(
            {**self._common("user_profile", rows, times), "action": _constant("delete", rows.size)}, rows.size
        )

    def _profile_updates(self, start: int, end: int) -> pa.Table:
        rate = self.config.profile_update_rate_per_day * (end - start) / DAY_MS
        alive = np.nonzero(self._alive(end))[0]
        rows = alive[self.rng.random(alive.size) < rate]
        pop = self.population
        new_device = self.rng.random(rows.size) < 0.3
        device_rows = rows[new_device]
        pop.device[device_rows] = self.rng.integers(0, len(DEVICES), size=device_rows.size)
        os_choices = np.array(
            [["ios", "android"], ["windows", "macos"], ["ipados", "android"], ["roku", "tvos"]], dtype=object
        )
        pop.os[device_rows] = os_choices[
            pop.device[device_rows], self.rng.integers(0, 2, size=device_rows.size)
        ]
        interest_rows = rows[~new_device]
        pop.interests[interest_rows] = draw_interests(
            self.rng, pop.taste[interest_rows], self.topic_vectors, self.topic_popularity
        )
        self._profiles_changed(rows)
        times = np.maximum(self.rng.integers(start, end, size=rows.size), pop.joined_ms[rows] + 1)
        return self._profiles(rows, times)

    def _profiles(self, rows: NDArray[Any], times: NDArray[Any]) -> pa.Table:
        pop = self.population
        attributes = pa.StructArray.from_arrays(
            [
                _labels(COUNTRIES, pop.country[rows]),
                pa.array(pop.region[rows], pa.string()),
                pa.array(pop.age[rows], pa.int32()),
                _labels(AGE_BANDS, pop.age_band[rows]),
                _labels(GENDERS, pop.gender[rows]),
                _labels(DEVICES, pop.device[rows]),
                pa.array(pop.os[rows], pa.string()),
                pa.array(pop.language[rows], pa.string()),
            ],
            fields=list(ATTRIBUTES_TYPE),
        )
        return assemble(
            {
                **self._common("user_profile", rows, times),
                "action": _constant("upsert", rows.size),
                "attributes": attributes,
                "interests": segment_lists(pop.interests[rows], np.array(SEGMENTS)),
                "provider_labels": self.provider_segments(rows),
            },
            rows.size,
        )

    def provider_segments(self, rows: NDArray[Any]) -> pa.ListArray:
        """Provider labels of ``rows`` as a list<string> of ``provider.attribute.label``."""
        labels = self.labels[rows]
        names = np.empty(labels.shape, dtype=object)
        for k, spec in enumerate(self.provider_specs):
            values = np.array(
                [f"{spec.provider}.{spec.attribute}.{label}" for label in spec.labels], dtype=object
            )
            names[:, k] = values[np.maximum(labels[:, k], 0)]
        mask = labels >= 0
        user, column = np.nonzero(mask)
        offsets = np.concatenate([[0], np.cumsum(np.bincount(user, minlength=len(rows)))]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(names[user, column], type=pa.string()))

    def _diurnal(self, start: int, end: int) -> float:
        hour = ((start + end) / 2 % DAY_MS) / HOUR_MS
        return 1.0 + 0.5 * math.sin(2 * math.pi * (hour - 9) / 24)

    def _draw_users(
        self, rate_per_day: NDArray[Any], start: int, end: int
    ) -> tuple[NDArray[Any], NDArray[Any]]:
        """Users active in the chunk, drawn in proportion to their (scaled) daily rate and
        the diurnal curve, with event times inside the chunk, sorted by time."""
        pop = self.population
        alive = self._alive(start) | ((pop.joined_ms >= start) & (pop.joined_ms < end))
        weights = rate_per_day * alive
        expected = self.rate_scale * weights.sum() * (end - start) / DAY_MS * self._diurnal(start, end)
        count = self.rng.poisson(max(expected, 0.0))
        cumulative = np.cumsum(weights)
        if count == 0 or cumulative[-1] <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        rows = np.searchsorted(cumulative, self.rng.random(count) * cumulative[-1], side="right")
        times = self.rng.integers(start, end, size=count)
        ok = (pop.joined_ms[rows] <= times) & ((pop.deleted_ms[rows] < 0) | (pop.deleted_ms[rows] > times))
        order = np.argsort(times[ok], kind="stable")
        return rows[ok][order], times[ok][order]

    def _impressions(self, start: int, end: int) -> list[pa.Table]:
        cat, pop, rng = self.catalog, self.population, self.rng
        rows, times = self._draw_users(pop.activity_rate, start, end)
        if rows.size == 0:
            return []
        live = (cat.campaign_start_ms <= start) & (cat.campaign_end_ms > start)
        choice = choose_campaigns(rng, self._eligible_rows(rows), cat.campaign_budget * live)
        served = choice >= 0
        rows, times, campaign = rows[served], times[served], choice[served]
        n = rows.size
        ad = cat.campaign_first_ad[campaign] + (rng.random(n) * cat.campaign_ad_count[campaign]).astype(
            np.int64
        )
        advertiser = cat.campaign_advertiser[campaign]
        position = np.minimum(rng.geometric(0.5, size=n), 5).astype(np.int32)
        topic = cat.ad_topic[ad]
        aff = np.einsum("ij,ij->i", pop.taste[rows], self.topic_vectors[topic])
        hour = (times % DAY_MS) / HOUR_MS
        quality = cat.ad_quality[ad] + cat.campaign_quality[campaign] + cat.advertiser_quality[advertiser]
        p_click = _sigmoid(self.response.click_logit(aff, position, hour, pop.device[rows], quality))
        p_convert = _sigmoid(
            self.response.conversion_base
            + self.response.conversion_affinity * aff
            + cat.advertiser_quality[advertiser]
        )
        base_cost = np.array([t.base_cost_micros for t in TOPICS])[topic]
        costs = (base_cost * np.exp(rng.normal(0, 0.3, size=n))).astype(np.int64)

        ad_ids = _prefixed("ad", ad)
        campaign_ids = _prefixed("c", campaign)
        advertiser_ids = _prefixed("adv", advertiser)
        impressions = {
            **self._common("impression", rows, times),
            "ad_id": ad_ids,
            "campaign_id": campaign_ids,
            "advertiser_id": advertiser_ids,
            "placement": PLACEMENTS.take(pa.array(rng.choice(len(PLACEMENTS), size=n, p=PLACEMENT_P))),
            "position": position,
            "cost_micros": costs,
            "device": _labels(DEVICES, pop.device[rows]),
            "country": _labels(COUNTRIES, pop.country[rows]),
        }
        impression_ids = impressions["event_id"]
        self.truth_impressions.append(
            pa.table(
                {"event_id": impression_ids, "p_click": p_click, "p_conversion": p_convert, "affinity": aff}
            )
        )

        clicked = np.nonzero(rng.random(n) < p_click)[0]
        click_times = (
            times[clicked]
            + 1_000
            + rng.exponential(self.response.mean_click_delay_s * 1000, clicked.size).astype(np.int64)
        )
        idx = pa.array(clicked)
        clicks = {
            **self._common("click", rows[clicked], click_times),
            "impression_id": impression_ids.take(idx),
            "ad_id": ad_ids.take(idx),
            "campaign_id": campaign_ids.take(idx),
            "advertiser_id": advertiser_ids.take(idx),
        }
        converted = np.nonzero(rng.random(clicked.size) < p_convert[clicked])[0]
        delay_ms = np.exp(
            rng.normal(math.log(self.response.median_conversion_delay_min * 60_000), 1.0, converted.size)
        ).astype(np.int64)
        source = clicked[converted]
        values = np.array([t.conversion_value for t in TOPICS])[topic[source]]
        cidx = pa.array(source)
        conversions = {
            **self._common("conversion", rows[source], click_times[converted] + delay_ms),
            "ad_id": ad_ids.take(cidx),
            "campaign_id": campaign_ids.take(cidx),
            "advertiser_id": advertiser_ids.take(cidx),
            "click_id": clicks["event_id"].take(pa.array(converted)),
            "conversion_type": _constant("purchase", converted.size),
            "value": np.round(values * np.exp(rng.normal(0, 0.4, converted.size)), 2),
            "currency": _constant("USD", converted.size),
        }
        return [
            assemble(impressions, n),
            assemble(clicks, clicked.size),
            assemble(conversions, converted.size),
        ]

    def _searches(self, start: int, end: int) -> pa.Table:
        pop, rng = self.population, self.rng
        rows, times = self._draw_users(pop.search_rate, start, end)
        scores = affinity(pop.taste[rows], self.topic_vectors) + np.log(self.topic_popularity)
        topic = np.argmax(scores + rng.gumbel(size=scores.shape), axis=1)
        index = self._pool_offsets[topic] + zipf_indices(rng, self._pool_sizes[topic])
        queries = self._all_queries[index]
        columns = {
            **self._common("search", rows, times),
            "query": pa.array(queries, pa.string()),
            "locale": pa.array(pop.language[rows], pa.string()),
            "device": _labels(DEVICES, pop.device[rows]),
        }
        self.truth_searches.append(
            pa.table(
                {
                    "event_id": columns["event_id"],
                    "query": columns["query"],
                    "topic": pa.array(np.array(SEGMENTS)[topic]),
                }
            )
        )
        return assemble(columns, rows.size)

    # -- helpers -------------------------------------------------------------------------

    def _common(self, kind: str, rows: NDArray[Any], times: NDArray[Any]) -> dict[str, pa.Array]:
        """event_id, event_time, arrival_time and user_id for new events of one type."""
        n = rows.size
        sequence = np.arange(self._sequence, self._sequence + n, dtype=np.int64)
        self._sequence += n
        prefix = {
            "impression": "imp",
            "click": "clk",
            "conversion": "cnv",
            "search": "srch",
            "user_profile": "prof",
        }[kind]
        event_ids = pc.binary_join_element_wise(
            f"{prefix}-{self.config.seed}-", pc.cast(pa.array(sequence), pa.string()), ""
        )
        times = np.asarray(times, dtype=np.int64)
        return {
            "type": _constant(kind, n),
            "event_id": event_ids,
            "event_time": pa.array(times, pa.timestamp("ms", "UTC")),
            "arrival_time": pa.array(times + self._arrival_delay(n), pa.timestamp("ms", "UTC")),
            "user_id": self.population.user_ids.take(pa.array(rows)),
        }

    def _arrival_delay(self, n: int) -> NDArray[Any]:
        c, rng = self.config, self.rng
        delay = rng.exponential(200.0, size=n)
        u = rng.random(n)
        late = u < c.late_fraction
        very_late = u > 1 - c.very_late_fraction
        delay[late] += rng.uniform(60_000, 30 * 60_000, size=int(late.sum()))
        delay[very_late] += rng.uniform(HOUR_MS, 6 * HOUR_MS, size=int(very_late.sum()))
        return delay.astype(np.int64)

    def _drop_after_deletion(self, table: pa.Table) -> pa.Table:
        """Events generated earlier (e.g. delayed conversions) of users deleted since then."""
        deleted = self.population.deleted_ms
        if not (deleted >= 0).any() or table.num_rows == 0:
            return table
        user_number = pc.cast(pc.utf8_slice_codeunits(table.column("user_id"), 1), pa.int64()).to_numpy()
        event_time = table.column("event_time").cast(pa.int64()).to_numpy()
        when = deleted[user_number]
        is_delete = table.column("action").to_numpy(zero_copy_only=False) == "delete"
        keep = (when < 0) | (event_time < when) | is_delete
        return table if keep.all() else table.filter(pa.array(keep))


def _sigmoid(x: NDArray[Any]) -> NDArray[Any]:
    return np.asarray(1.0 / (1.0 + np.exp(-x)))


def _prefixed(prefix: str, numbers: NDArray[Any]) -> pa.Array:
    return pc.binary_join_element_wise(prefix, pc.cast(pa.array(numbers), pa.string()), "")


_LABEL_ARRAYS: dict[int, pa.Array] = {}


def _labels(categories: NDArray[Any], codes: NDArray[Any]) -> pa.Array:
    """Strings for integer codes, gathered in Arrow (far cheaper than converting NumPy unicode)."""
    table = _LABEL_ARRAYS.get(id(categories))
    if table is None:
        table = _LABEL_ARRAYS[id(categories)] = pa.array(categories.tolist(), pa.string())
    return table.take(pa.array(codes))


def _constant(value: str, n: int) -> pa.Array:
    return pa.nulls(n, pa.string()).fill_null(value)
