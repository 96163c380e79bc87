"""The modelling workflow end to end, shared by the CLI and the benchmark.

1. :func:`load_dataset`: an event log (simulator Parquet) -> per-user histories and
   impression examples, split by time (:class:`Split`).
2. :func:`train_foundation`: the FM on ``[0, fm_train_end)``, saved to the registry.
3. :func:`materialize_embeddings`: LoopFM runs over the log -> ``fm_embeddings`` in Feast.
4. :func:`train_vertical`: a VM variant on ``[0, vm_train_end)`` from Feast point-in-time
   features (+ FM pseudo-labels through the student adapter for KD), saved.
5. :func:`evaluate`: every saved model on ``[vm_train_end, end]``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from feast import FeatureStore
from numpy.typing import NDArray

from features.store import open_store
from infra.settings import ModelSettings, QueryFeatureSettings, Settings
from models.fm import FMConfig, FoundationModel
from models.registry import ModelRegistry, NoModelError, SavedModel
from models.vm import StudentAdapter, VerticalModel, VMConfig, parse_variant
from training.datasets import dense_feature_names, vm_inputs
from training.embeddings import MaterializeStats, materialize, run_times
from training.events import (
    PLACEMENTS,
    Buckets,
    EventLog,
    build_event_log,
    category_code,
    read_events,
    read_topics,
    search_queries,
)
from training.examples import Examples, build_examples
from training.metrics import summary
from training.train import (
    VMInputs,
    adapter_predict,
    fm_predict,
    parameter_count,
    sigmoid,
    train_adapter,
    train_fm,
    train_vm,
)

Progress = Callable[[int], None]
FM_NAME = "fm"


def vm_name(variant: str) -> str:
    parse_variant(variant)
    return f"vm-{variant}"


@dataclass
class Dataset:
    events_path: Path
    log: EventLog
    examples: Examples
    start_ms: int
    end_ms: int

    def at(self, fraction: float) -> int:
        return int(self.start_ms + fraction * (self.end_ms - self.start_ms))


@dataclass
class Split:
    fm_train: Examples
    vm_train: Examples
    evaluation: Examples
    fm_end_ms: int
    vm_end_ms: int
    validation_ms: int  # start of the validation slice (== vm_end_ms when there is none)

    @property
    def vm_fit(self) -> Examples:
        """The VM training examples before the validation slice (what is fit when validating)."""
        return self.vm_train.take(np.flatnonzero(self.vm_train.time_ms < self.validation_ms))

    @property
    def validation(self) -> Examples:
        """The VM training examples in the validation slice, the end of the VM period."""
        return self.vm_train.take(np.flatnonzero(self.vm_train.time_ms >= self.validation_ms))


def load_dataset(
    events_path: Path,
    catalog: Path | None = None,
    truth: Path | None = None,
    *,
    queries: QueryFeatureSettings | None = None,
    buckets: Buckets | None = None,
) -> Dataset:
    """Events (+ the ad catalog and ground truth next to them, ``../truth``, when present).

    ``queries``: categorize the search queries with the platform's query-feature backend
    so search events carry a topic (what the FM's taste profile learns from).
    ``buckets``: how ids, placements and devices are coded (default: the defaults; use
    ``Buckets.for_models(settings.models)`` for the configured placements and devices).
    """
    truth_dir = events_path.parent / "truth"
    catalog = catalog if catalog is not None else truth_dir / "ads.parquet"
    truth = truth if truth is not None else truth_dir / "impressions.parquet"
    events = read_events(events_path)
    query_topics = categorize_queries(search_queries(events), queries) if queries is not None else None
    log = build_event_log(events, read_topics(catalog), buckets or Buckets(), query_topics)
    examples = build_examples(events, log, truth)
    start, end = log.time_range_ms
    return Dataset(events_path, log, examples, start, end)


def categorize_queries(queries: list[str], settings: QueryFeatureSettings) -> dict[str, str]:
    """Normalized query -> category id from the CPU query-feature backend ("general" left out)."""
    from features.queries.cpu import CPUBackend

    if not queries:
        return {}
    backend = CPUBackend(settings)
    try:
        batch = backend.generate(queries)
    finally:
        backend.close()
    return {r.query: r.category for r in batch.records if r.category != "general"}


def split(dataset: Dataset, models: ModelSettings) -> Split:
    """Time-ordered split; ``max_examples`` keeps a seeded random subset of the VM parts.

    The FM always trains on every impression of its period: it is the model that sees
    everything, which is what makes its knowledge worth transferring. ``models.vm_vertical``
    restricts the VM parts and the evaluation to one placement (see :func:`vertical_mask`). The validation
    slice (``models.vm_validation``) is the end of the VM period, a subset of ``vm_train``:
    choices are made by fitting on :attr:`Split.vm_fit` and scoring on it.
    """
    if models.fm_train_end > models.vm_train_end:
        raise ValueError("models.fm_train_end must not be after models.vm_train_end")
    if models.vm_validation >= models.vm_train_end:
        raise ValueError("models.vm_validation must be shorter than the VM period (models.vm_train_end)")
    fm_end, vm_end = dataset.at(models.fm_train_end), dataset.at(models.vm_train_end)
    validation = dataset.at(models.vm_train_end - models.vm_validation) if models.vm_validation else vm_end
    t = dataset.examples.time_ms
    mismatched = None if dataset.log is None else _mismatched_category(dataset.log.buckets, models)
    if mismatched is not None:
        raise ValueError(
            f"the dataset codes {mismatched} by another list than models.{mismatched}: load it with "
            "buckets=Buckets.for_models(settings.models)"
        )
    vertical = vertical_mask(dataset.examples, models.vm_vertical, models.placements)
    rng = np.random.default_rng(models.seed)

    def part(mask: NDArray[np.bool_], cap: bool = True) -> Examples:
        index = np.flatnonzero(mask)
        if cap and models.max_examples is not None and len(index) > models.max_examples:
            index = np.sort(rng.choice(index, models.max_examples, replace=False))
        return dataset.examples.take(index)

    return Split(
        part(t < fm_end, cap=False),
        part((t < vm_end) & vertical),
        part((t >= vm_end) & vertical),
        fm_end,
        vm_end,
        validation,
    )


def vertical_mask(
    examples: Examples, placement: str | None, placements: tuple[str, ...] = PLACEMENTS
) -> NDArray[np.bool_]:
    """The impressions a vertical model serves: those of ``placement`` (all when None).

    ``placements`` is the list ``examples`` were coded with (:func:`category_codes`).
    The FM is not restricted: in LoopFM's setting one FM learns from every surface's
    traffic and each VM from its own surface's, so the FM's embeddings can carry what the
    other surfaces taught it about a user.
    """
    if placement is None:
        return np.ones(len(examples), bool)
    if placement not in placements:
        raise ValueError(f"unknown placement {placement!r}; expected one of {', '.join(placements)}")
    return np.asarray(examples.placement == category_code(placement, placements), bool)


def fm_config(models: ModelSettings, dense: NDArray[np.float32] | None = None) -> FMConfig:
    """The FM's shape from settings; ``dense`` (its training examples' stream features) sets their scaling."""
    stats: dict[str, Any] = {}
    if dense is not None:
        stats = {
            "dense_features": dense_feature_names(),
            "dense_mean": tuple(float(x) for x in dense.mean(axis=0)),
            "dense_std": tuple(float(x) for x in np.maximum(dense.std(axis=0), 0.05)),
        }
    return FMConfig(
        buckets=Buckets.for_models(models),
        history_len=models.history_len,
        window=models.window,
        dim=models.dim,
        layers=models.layers,
        heads=models.heads,
        embedding_dim=models.embedding_dim,
        profile_weight=models.fm_profile_weight,
        wide=models.fm_wide,
        profile_attributes=tuple(models.fm_profile_attributes),
        **stats,
    )


def stream_features(store: FeatureStore, examples: Examples) -> NDArray[np.float32]:
    """The VMs' dense stream features of ``examples``, point-in-time from Feast (what the FM reads too)."""
    inputs, _ = vm_inputs(store, examples, loopfm=False, embedding_dim=1, embedding_history=1)
    return inputs.dense


def _data_metadata(dataset: Dataset, part: Examples) -> dict[str, Any]:
    return {
        "events": str(dataset.events_path.resolve()),  # absolute: metadata outlives its shell
        "examples": len(part),
        "from": _iso(int(part.time_ms.min())) if len(part) else None,
        "until": _iso(int(part.time_ms.max())) if len(part) else None,
        "click_rate": float(part.click.mean()) if len(part) else None,
    }


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def train_foundation(
    settings: Settings,
    dataset: Dataset,
    *,
    seed: int | None = None,
    dense: NDArray[np.float32] | None = None,
    progress: Progress | None = None,
    save: bool = True,
) -> tuple[FoundationModel, SavedModel | None]:
    """The FM on ``[0, fm_train_end)``; with ``models.fm_stream_features`` it also reads the
    examples' stream features (``dense``, read from Feast here when not given)."""
    models = settings.models
    seed = models.seed if seed is None else seed
    torch.set_num_threads(models.threads)
    parts = split(dataset, models)
    if not models.fm_stream_features:
        dense = None
    elif dense is None:
        dense = stream_features(open_store(settings), parts.fm_train)
    torch.manual_seed(seed)
    model = FoundationModel(fm_config(models, dense))
    started = time.perf_counter()
    losses = train_fm(
        model,
        dataset.log,
        parts.fm_train,
        epochs=models.epochs_fm,
        batch_size=models.batch_size,
        learning_rate=models.learning_rate,
        seed=seed,
        dense=dense,
        progress=progress,
    )
    metadata = {
        "kind": "foundation_model",
        "config": model.config.to_dict(),
        "parameters": parameter_count(model),
        "seed": seed,
        "train": _data_metadata(dataset, parts.fm_train),
        "epoch_losses": losses,
        "train_seconds": time.perf_counter() - started,
        "topics": list(dataset.log.topics),
    }
    saved = (
        ModelRegistry(settings.model_registry_dir).save(FM_NAME, {"model": model.state_dict()}, metadata)
        if save
        else None
    )
    return model, saved


def load_foundation(settings: Settings, version: int | None = None) -> tuple[FoundationModel, SavedModel]:
    saved = ModelRegistry(settings.model_registry_dir).load(FM_NAME, version)
    config = FMConfig.from_dict(saved.metadata["config"])
    _check_categories(saved, config.buckets, settings.models)
    model = FoundationModel(config)
    model.load_state_dict(saved.weights["model"])
    model.eval()
    return model, saved


class ModelMismatchError(ValueError):
    """A saved model codes placements or devices by other lists than the settings name."""


def _mismatched_category(buckets: Buckets, models: ModelSettings) -> str | None:
    """``"placements"`` or ``"devices"`` if ``buckets`` code it by another list than ``models``; else None."""
    return next(
        (
            name
            for name in ("placements", "devices")
            if getattr(buckets, name) != tuple(getattr(models, name))
        ),
        None,
    )


def _check_categories(saved: SavedModel, buckets: Buckets, models: ModelSettings) -> None:
    """Refuse a model whose placement/device codes would mean other names under these settings."""
    name = _mismatched_category(buckets, models)
    if name is not None:
        raise ModelMismatchError(
            f"{saved.name} v{saved.version} was trained with models.{name} = {list(getattr(buckets, name))}, "
            f"but the settings say {list(getattr(models, name))}: set models.{name} to the model's list (its "
            "embedding rows follow that order), or retrain the model"
        )


def materialize_embeddings(
    settings: Settings,
    model: FoundationModel,
    dataset: Dataset,
    *,
    backfill: bool,
    at_ms: int | None = None,
    progress: Progress | None = None,
) -> MaterializeStats:
    """Backfill runs every ``embedding_every_s`` over the log, or one run at ``at_ms`` (default: its end)."""
    models = settings.models
    torch.set_num_threads(models.threads)
    if backfill:
        times = run_times(dataset.start_ms, dataset.end_ms, models.embedding_every_s)
    else:
        times = np.array([at_ms if at_ms is not None else dataset.end_ms], np.int64)
    return materialize(
        settings,
        model,
        dataset.log,
        times,
        every_s=models.embedding_every_s,
        history=models.embedding_history,
        resume_from_online=not backfill,
        progress=progress,
    )


def vm_config(models: ModelSettings, variant: str, fm: FMConfig, inputs: VMInputs) -> VMConfig:
    mean = inputs.dense.mean(axis=0)
    std = np.maximum(inputs.dense.std(axis=0), 0.05)  # near-constant columns must not blow up
    return VMConfig(
        variant=variant,
        dense_features=dense_feature_names(),
        buckets=fm.buckets,
        embedding_dim=fm.embedding_dim,
        embedding_history=models.embedding_history,
        fm_profile_topics=fm.buckets.topics if fm.profile_weight > 0 else 0,
        fm_taste_dim=fm.taste_dim if fm.wide and models.vm_fm_taste else 0,
        fm_raw_inputs=models.vm_raw_fm_inputs or fm.profile_weight == 0,
        dense_mean=tuple(float(x) for x in mean),
        dense_std=tuple(float(x) for x in std),
    )


def teacher_logits(
    settings: Settings,
    fm: FoundationModel,
    dataset: Dataset,
    train: Examples,
    fm_end_ms: int,
    seed: int,
    dense: NDArray[np.float32] | None = None,
) -> tuple[NDArray[np.float32], StudentAdapter, dict[str, Any]]:
    """ExFM: FM pseudo-labels of the VM's training examples, corrected by a student adapter.

    The adapter learns on the examples after the FM's training period (where the FM is
    stale); with none there, on all of them.
    """
    models = settings.models
    fm_logits = fm_predict(fm, dataset.log, train, dense=dense if fm.config.dense_features else None)[:, 0]
    fresh = train.time_ms >= fm_end_ms
    if fresh.sum() < 100:
        fresh = np.ones(len(train), bool)
    adapter = StudentAdapter(fm.config.buckets)
    candidate = train.candidate()
    train_adapter(
        adapter,
        fm_logits[fresh],
        {k: v[fresh] for k, v in candidate.items()},
        train.click[fresh],
        epochs=2,
        batch_size=models.batch_size,
        learning_rate=models.learning_rate,
        seed=seed,
    )
    adapted = adapter_predict(adapter, fm_logits, candidate)
    info = {
        "adapter_examples": int(fresh.sum()),
        "fm_on_fresh": summary(train.click[fresh], sigmoid(fm_logits[fresh])),
        "adapted_on_fresh": summary(train.click[fresh], sigmoid(adapted[fresh])),
    }
    return adapted, adapter, info


def train_vertical(
    settings: Settings,
    store: FeatureStore,
    dataset: Dataset,
    variant: str,
    *,
    inputs: VMInputs | None = None,
    examples: Examples | None = None,
    fm: FoundationModel | None = None,
    seed: int | None = None,
    progress: Progress | None = None,
    save: bool = True,
) -> tuple[VerticalModel, SavedModel | None]:
    """Train one VM variant; ``inputs`` (from :func:`training.datasets.vm_inputs`) may be reused.

    ``examples``: what to train on (default: the split's ``vm_train``; ``Split.vm_fit``
    when choosing options on the validation slice); ``inputs`` must then match them.
    """
    models = settings.models
    seed = models.seed if seed is None else seed
    torch.set_num_threads(models.threads)
    kd, loopfm = parse_variant(variant)
    parts = split(dataset, models)
    train = parts.vm_train if examples is None else examples
    if fm is None:
        fm, _ = load_foundation(settings)
    if inputs is None:
        inputs, _ = vm_inputs(
            store,
            train,
            loopfm=loopfm,
            embedding_dim=fm.config.embedding_dim,
            embedding_history=models.embedding_history,
        )
    if len(inputs) != len(train):
        raise ValueError(f"inputs hold {len(inputs)} examples, the training examples {len(train)}")
    if loopfm and inputs.fm_history is None:
        raise ValueError("LoopFM variants need inputs read with loopfm=True")
    teacher: NDArray[np.float32] | None = None
    extra: dict[str, Any] = {}
    weights: dict[str, dict[str, torch.Tensor]] = {}
    if kd:
        teacher, adapter, extra = teacher_logits(
            settings, fm, dataset, train, parts.fm_end_ms, seed, inputs.dense
        )
        weights["adapter"] = adapter.state_dict()
    torch.manual_seed(seed)
    model = VerticalModel(vm_config(models, variant, fm.config, inputs))
    if model.config.loopfm and (model.config.fm_profile_topics or model.config.fm_taste_dim):
        model.load_fm_profile(fm)
    started = time.perf_counter()
    losses = train_vm(
        model,
        inputs,
        teacher_logit=teacher,
        kd_weight=models.kd_weight,
        epochs=models.epochs_vm,
        batch_size=models.batch_size,
        learning_rate=models.learning_rate,
        seed=seed,
        progress=progress,
    )
    weights["model"] = model.state_dict()
    metadata = {
        "kind": "vertical_model",
        "variant": variant,
        "config": model.config.to_dict(),
        "parameters": parameter_count(model),
        "seed": seed,
        "train": _data_metadata(dataset, train),
        "vertical": models.vm_vertical,
        "epoch_losses": losses,
        "train_seconds": time.perf_counter() - started,
        "feature_views": ["user_activity", "ad_performance", "campaign_performance", "advertiser_performance"]
        + (["fm_embeddings"] if loopfm else []),
        **extra,
    }
    saved = (
        ModelRegistry(settings.model_registry_dir).save(vm_name(variant), weights, metadata) if save else None
    )
    return model, saved


def load_vertical(
    settings: Settings, variant: str, version: int | None = None
) -> tuple[VerticalModel, SavedModel]:
    """The given version of a VM variant, else the latest trained for ``models.vm_vertical``.

    A VM trained for one surface must not be scored or compared as another's (or as the
    all-surfaces model): the vertical is part of what a version is.
    """
    registry = ModelRegistry(settings.model_registry_dir)
    name = vm_name(variant)
    if version is None:
        version = _latest_for_vertical(registry, name, settings.models.vm_vertical)
    saved = registry.load(name, version)
    config = VMConfig.from_dict(saved.metadata["config"])
    _check_categories(saved, config.buckets, settings.models)
    model = VerticalModel(config)
    model.load_state_dict(saved.weights["model"])
    model.eval()
    return model, saved


def _latest_for_vertical(registry: ModelRegistry, name: str, vertical: str | None) -> int | None:
    """The newest version of ``name`` trained for ``vertical`` (None: every surface); None: no versions."""
    versions = registry.versions(name)
    if not versions:
        return None  # the registry's own "train it first" error follows
    trained_for = {version: registry.metadata(name, version).get("vertical") for version in versions}
    matching = [version for version in versions if trained_for[version] == vertical]
    if not matching:
        where = f"--vertical {vertical}" if vertical else "every placement (no --vertical)"
        others = sorted({str(v) if v else "every placement" for v in trained_for.values()})
        raise NoModelError(f"no {name} trained for {where}; its versions are for: {', '.join(others)}")
    return matching[-1]


def evaluate_predictions(examples: Examples, logits: NDArray[np.float32]) -> dict[str, Any]:
    """Click AUC/NE on every example, conversion-given-click AUC on the clicked ones."""
    result: dict[str, Any] = {"click": summary(examples.click, sigmoid(logits[:, 0]))}
    clicked = examples.click > 0.5
    if clicked.any():
        result["conversion_given_click"] = summary(examples.conversion[clicked], sigmoid(logits[clicked, 1]))
    return result


def transfer_ratio(vm_metric: float, base_metric: float, fm_metric: float, *, min_gain: float = 0.0) -> float:
    """Share of the FM's gain over the base VM that a VM variant captures.

    NaN when the FM gains ``min_gain`` or less (e.g. the metric's standard error): a ratio
    to a gain that small is noise divided by noise (it read -301 on a tiny evaluation).
    """
    gain = fm_metric - base_metric
    return float((vm_metric - base_metric) / gain) if gain > max(min_gain, 0.0) else float("nan")
