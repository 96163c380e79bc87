"""The ground truth a simulation leaves behind, for evaluating everything downstream.

Files (in the truth directory):
- ``population.parquet``: every user ever simulated, in their final state: user_id,
  country, region, age, age_band, gender, device, os, language, interests
  (list<string>), provider_segments (list<string>, ``provider.attribute.label``),
  activity_rate (impressions/day before scaling), search_rate, joined_at, deleted_at.
- ``provider_labels.parquet``: long form user_id, provider, attribute, label.
- ``providers.json``: per provider and attribute: categories, labels, coverage,
  ``p_label_given_true`` and ``p_true_given_label`` (measured on the population).
- ``advertisers.parquet``, ``campaigns.parquet`` (targeting as JSON), ``ads.parquet``.
- ``response_model.json`` (+ ``user_taste.npy``, ``topic_vectors.npy``): the hidden model.
- ``shifts.json``: what changed and when. ``searches.parquet``: event_id, query, topic.
- ``impressions.parquet``: event_id, p_click, p_conversion, affinity (true probabilities).
- ``manifest.json``: configuration, counts per type, time range.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from streams.simulation.population import AGE_BANDS, COUNTRIES, DEVICES, GENDERS, segment_lists
from streams.simulation.providers import true_given_label
from streams.simulation.topics import SEGMENTS
from streams.simulation.traffic import Simulator


def population_table(simulator: Simulator) -> pa.Table:
    pop = simulator.population
    return pa.table(
        {
            "user_id": pop.user_ids,
            "country": pa.array(COUNTRIES[pop.country]),
            "region": pa.array(pop.region, pa.string()),
            "age": pa.array(pop.age, pa.int32()),
            "age_band": pa.array(AGE_BANDS[pop.age_band]),
            "gender": pa.array(GENDERS[pop.gender]),
            "device": pa.array(DEVICES[pop.device]),
            "os": pa.array(pop.os, pa.string()),
            "language": pa.array(pop.language, pa.string()),
            "interests": segment_lists(pop.interests, np.array(SEGMENTS)),
            "provider_segments": simulator.provider_segments(np.arange(len(pop))),
            "activity_rate": pop.activity_rate,
            "search_rate": pop.search_rate,
            "joined_at": pa.array(pop.joined_ms, pa.timestamp("ms", "UTC")),
            "deleted_at": pa.array(
                np.where(pop.deleted_ms >= 0, pop.deleted_ms, 0),
                pa.timestamp("ms", "UTC"),
                mask=pop.deleted_ms < 0,
            ),
        }
    )


def save_truth(
    simulator: Simulator, directory: Path, counts: dict[str, int], time_range: tuple[str, str]
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    pop = simulator.population
    pq.write_table(population_table(simulator), directory / "population.parquet")

    long_rows: dict[str, list[Any]] = {"user_id": [], "provider": [], "attribute": [], "label": []}
    providers: dict[str, dict[str, Any]] = {}
    for k, spec in enumerate(simulator.provider_specs):
        labels = simulator.labels[:, k]
        covered = np.nonzero(labels >= 0)[0]
        long_rows["user_id"].append(pop.user_ids.take(pa.array(covered)))
        long_rows["provider"].append(pa.array([spec.provider] * covered.size))
        long_rows["attribute"].append(pa.array([spec.attribute] * covered.size))
        long_rows["label"].append(pa.array(spec.labels[labels[covered]]))
        providers.setdefault(spec.provider, {})[spec.attribute] = {
            "categories": [str(c) for c in spec.categories],
            "labels": [str(x) for x in spec.labels],
            "coverage": spec.coverage,
            "p_label_given_true": {
                str(cat): {str(lab): float(spec.confusion[i, j]) for j, lab in enumerate(spec.labels)}
                for i, cat in enumerate(spec.categories)
            },
            "p_true_given_label": true_given_label(pop, spec, labels),
        }
    pq.write_table(
        pa.table({name: pa.concat_arrays(parts) for name, parts in long_rows.items()}),
        directory / "provider_labels.parquet",
    )
    _write_json(directory / "providers.json", providers)
    for name, table in simulator.catalog.tables().items():
        pq.write_table(table, directory / f"{name}.parquet")
    _write_json(
        directory / "response_model.json",
        {
            **dataclasses.asdict(simulator.response),
            "topics": list(SEGMENTS),
            "topic_popularity": simulator.topic_popularity.tolist(),
            "rate_scale": simulator.rate_scale,
            "formula": "logit P(click) = click_base + click_affinity * (taste . topic_vector) "
            "+ position_effect[position-1] + hour_amplitude * cos(2 pi (utc_hour - 20) / 24) "
            "+ device_effect[device] + ad, campaign and advertiser quality",
        },
    )
    np.save(directory / "user_taste.npy", pop.taste)
    np.save(directory / "topic_vectors.npy", simulator.topic_vectors)
    _write_json(directory / "shifts.json", simulator.shift_log)
    for name, tables in (
        ("impressions", simulator.truth_impressions),
        ("searches", simulator.truth_searches),
    ):
        if tables:
            pq.write_table(pa.concat_tables(tables), directory / f"{name}.parquet")
    config = dataclasses.asdict(simulator.config)
    config["start"] = simulator.config.start.isoformat()
    _write_json(
        directory / "manifest.json",
        {
            "config": config,
            "counts": counts,
            "events": sum(counts.values()),
            "first_event_time": time_range[0],
            "last_event_time": time_range[1],
            "users": len(pop),
        },
    )


def _write_json(path: Path, payload: object) -> None:
    path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")


def _jsonable(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")
