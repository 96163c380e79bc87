"""The vertical setting of the time split (``models.vm_vertical``): no Feast, no training.

LoopFM's setting: one FM learns from every surface, each vertical model from its own
surface only. The split must restrict the VM parts and the evaluation to the placement
and leave the FM's part, and the default (no vertical), exactly as they were.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import numpy as np
import pydantic
import pytest

from infra.settings import ModelSettings
from training.events import PLACEMENTS
from training.examples import Examples
from training.pipeline import Dataset, split, vertical_mask


def _dataset(n: int = 2_000, seed: int = 3) -> Dataset:
    rng = np.random.default_rng(seed)
    time_ms = np.sort(rng.integers(0, 1_000_000, n)).astype(np.int64)
    ints = {"user", "ad", "campaign", "advertiser", "topic", "position", "device", "hour"}
    columns: dict[str, np.ndarray[Any, Any]] = {}
    for f in fields(Examples):
        if f.name in ints:
            columns[f.name] = rng.integers(0, 5, n).astype(np.int64)
        elif f.name.endswith("_id"):
            columns[f.name] = np.array([f"{f.name}-{i}" for i in range(n)], object)
    columns["time_ms"] = time_ms
    columns["placement"] = rng.integers(1, len(PLACEMENTS) + 1, n).astype(np.int64)
    columns["click"] = (rng.random(n) < 0.1).astype(np.float32)
    columns["conversion"] = np.zeros(n, np.float32)
    columns["p_click"] = np.full(n, np.nan)
    examples = Examples(**columns)
    return Dataset(events_path=None, log=None, examples=examples, start_ms=0, end_ms=1_000_000)  # type: ignore[arg-type]


@pytest.mark.parametrize("max_examples", [None, 300])
def test_vertical_split_restricts_the_vms_only(max_examples: int | None) -> None:
    dataset = _dataset()
    default = ModelSettings(max_examples=max_examples)
    everything = split(dataset, default)
    for placement in PLACEMENTS:
        code = PLACEMENTS.index(placement) + 1
        parts = split(dataset, default.model_copy(update={"vm_vertical": placement}))
        # The FM still trains on every placement of its period.
        assert np.array_equal(parts.fm_train.example_id, everything.fm_train.example_id)
        assert len(np.unique(parts.fm_train.placement)) == len(PLACEMENTS)
        # The VM parts, the validation slice and the evaluation are the placement's only.
        for part in (parts.vm_train, parts.vm_fit, parts.validation, parts.evaluation):
            assert len(part) > 0 and (part.placement == code).all()
        assert (parts.fm_end_ms, parts.vm_end_ms, parts.validation_ms) == (
            everything.fm_end_ms,
            everything.vm_end_ms,
            everything.validation_ms,
        )
        if max_examples is None:
            # Uncapped: exactly the placement's share of the undivided parts.
            expected = everything.evaluation.example_id[everything.evaluation.placement == code]
            assert np.array_equal(parts.evaluation.example_id, expected)
            expected = everything.vm_train.example_id[everything.vm_train.placement == code]
            assert np.array_equal(parts.vm_train.example_id, expected)
        else:
            assert len(parts.vm_train) <= max_examples


def test_default_split_is_unchanged_and_bad_placements_are_refused() -> None:
    dataset = _dataset()
    parts = split(dataset, ModelSettings(max_examples=300))
    # The default draws the same seeded subset as a split that never heard of verticals.
    t = dataset.examples.time_ms
    rng = np.random.default_rng(0)
    index = np.flatnonzero(t < dataset.at(0.7))
    assert np.array_equal(
        parts.vm_train.example_id, dataset.examples.example_id[np.sort(rng.choice(index, 300, replace=False))]
    )
    assert vertical_mask(dataset.examples, None).all()
    with pytest.raises(ValueError, match="unknown placement"):
        vertical_mask(dataset.examples, "banner")
    with pytest.raises(pydantic.ValidationError):
        ModelSettings.model_validate({"vm_vertical": "banner"})
