"""Training sets from Feast: each example's features as they were at the example's time.

Every impression is an entity row (its user, ad, campaign and advertiser, and its time);
Feast's ``get_historical_features`` joins each feature view point-in-time: the latest
row at or before the example, within the view's TTL. Views are fetched one call each
through :func:`features.training.historical_features`, which keeps every example (Feast
0.67's file offline store drops those whose entity has only later rows: they become
missing values) and compacts the views first so ties between rows of one timestamp
cannot be picked at random.

Dense inputs of the vertical models are the stream features' numeric columns: counts
and sums as ``log1p``, ratios as they are, plus one "missing" flag per view.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from feast import FeatureStore
from numpy.typing import NDArray

from features.definitions import FEATURE_GROUPS, FeatureGroup
from features.embeddings import FM_EMBEDDINGS, FM_HISTORY, FM_HISTORY_LEN
from features.training import historical_features
from training.examples import Examples
from training.train import VMInputs

VM_VIEWS = ("user_activity", "ad_performance", "campaign_performance", "advertiser_performance")
"""Stream feature views the vertical models read (query features need a query, ads have none)."""
_KEYS = {
    "user_id": "user_id",
    "ad_id": "ad_id",
    "campaign_id": "campaign_id",
    "advertiser_id": "advertiser_id",
}


def vm_groups() -> tuple[FeatureGroup, ...]:
    return tuple(g for g in FEATURE_GROUPS if g.name in VM_VIEWS)


def numeric_features(group: FeatureGroup) -> list[str]:
    return [f.name for f in group.features() if f.type in ("int64", "float64")]


def dense_feature_names() -> tuple[str, ...]:
    names: list[str] = []
    for group in vm_groups():
        names += [f"{group.name}__{name}" for name in numeric_features(group)]
        names.append(f"{group.name}__missing")
    return tuple(names)


def historical_view(
    store: FeatureStore, examples: Examples, group: FeatureGroup, features: Sequence[str]
) -> pd.DataFrame:
    """``features`` of ``group`` point-in-time for every example, in example order (NaN: none)."""
    key = group.key
    if key not in _KEYS:
        raise ValueError(f"examples carry no {key!r} for view {group.name}")
    entity_df = pd.DataFrame(
        {
            "example_id": examples.example_id,
            key: getattr(examples, key),
            "event_timestamp": pd.to_datetime(examples.time_ms, unit="ms", utc=True),
        }
    )
    joined = historical_features(store, entity_df, [f"{group.name}:{name}" for name in features])
    return joined[list(features)].reset_index(drop=True)


@dataclass(frozen=True)
class FrameStats:
    examples: int
    missing: dict[str, float]  # view -> fraction of examples with no row


def vm_inputs(
    store: FeatureStore,
    examples: Examples,
    *,
    loopfm: bool,
    embedding_dim: int,
    embedding_history: int,
    progress: Callable[[str], None] | None = None,
) -> tuple[VMInputs, FrameStats]:
    """The vertical models' inputs for ``examples``, read from Feast point-in-time."""
    columns: list[NDArray[np.float32]] = []
    missing: dict[str, float] = {}
    for group in vm_groups():
        if progress is not None:
            progress(group.name)
        names = numeric_features(group)
        frame = historical_view(store, examples, group, names)
        absent = frame[names[0]].isna().to_numpy()
        missing[group.name] = float(absent.mean()) if len(absent) else 0.0
        for name in names:
            values = frame[name].to_numpy(dtype=np.float64, na_value=0.0)
            if not name.startswith(("ctr_", "cvr_")):
                values = np.log1p(np.maximum(values, 0.0))
            columns.append(values.astype(np.float32))
        columns.append(absent.astype(np.float32))
    fm_history: NDArray[np.float32] | None = None
    fm_length: NDArray[np.int64] | None = None
    if loopfm:
        if progress is not None:
            progress(FM_EMBEDDINGS.name)
        fm_history, fm_length, absent_fm = embedding_history_inputs(
            store, examples, embedding_dim, embedding_history
        )
        missing[FM_EMBEDDINGS.name] = absent_fm
    dense = np.stack(columns, axis=1) if columns else np.zeros((len(examples), 0), np.float32)
    inputs = VMInputs(
        dense=dense,
        candidate=examples.candidate(),
        fm_history=fm_history,
        fm_history_len=fm_length,
        click=examples.click,
        conversion=examples.conversion,
    )
    return inputs, FrameStats(len(examples), missing)


def embedding_history_inputs(
    store: FeatureStore, examples: Examples, embedding_dim: int, embedding_history: int
) -> tuple[NDArray[np.float32], NDArray[np.int64], float]:
    """(n, K, E) last-K FM embeddings as of each example, their filled lengths, and the missing rate."""
    frame = historical_view(store, examples, FM_EMBEDDINGS, [FM_HISTORY, FM_HISTORY_LEN])
    n, width = len(examples), embedding_history * embedding_dim
    history = np.zeros((n, width), np.float32)
    lengths = np.zeros(n, np.int64)
    values: list[Any] = frame[FM_HISTORY].tolist()
    stored_lengths = frame[FM_HISTORY_LEN].to_numpy(dtype=np.float64, na_value=0.0).astype(np.int64)
    present = np.array(
        [v is not None and not (isinstance(v, float)) and len(v) == width for v in values], bool
    )
    if present.any():
        history[present] = np.stack([np.asarray(values[i], np.float32) for i in np.flatnonzero(present)])
        lengths[present] = stored_lengths[present]
    wrong = [v for v in values if v is not None and not isinstance(v, float) and len(v) != width]
    if wrong:
        raise ValueError(
            f"fm_embeddings rows hold {len(wrong[0])} values, the model expects K x E = {width}: "
            "rematerialize with `adreach features fm-embeddings` for the current FM"
        )
    return (
        history.reshape(n, embedding_history, embedding_dim),
        lengths,
        float(1.0 - present.mean()) if n else 0.0,
    )
