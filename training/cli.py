"""``adreach train fm``, ``adreach train vm --variant ...`` and ``adreach evaluate``.

Mounted by :mod:`infra.cli` (one line each). Models go to the registry folder
(``models.registry_dir``, default ``<state_dir>/models``) with their metadata; every
command reads the event log given by ``--events`` (``adreach simulate --format parquet``
output) and the Feast repository of the settings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from infra.outputs import writable_file, writable_folder
from training.cli_common import (
    exit_usage,
    fail,
    load_data,
    model_settings,
    progress_task,
)

train_app = typer.Typer(help="Train the foundation model and the vertical models.", no_args_is_help=True)

EventsOption = Annotated[
    Path,
    typer.Option("--events", "-e", help="Event log: Parquet file or directory (simulate --format parquet)."),
]
EpochsOption = Annotated[
    int | None, typer.Option("--epochs", help="Training epochs (default: models.epochs_*).")
]
SeedOption = Annotated[int | None, typer.Option("--seed", help="Random seed (default: models.seed).")]
MaxOption = Annotated[
    int | None,
    typer.Option("--max-examples", help="Cap on examples per split part (default: models.max_examples)."),
]
VerticalOption = Annotated[
    str | None,
    typer.Option(
        "--vertical",
        help="Only this placement's impressions (one of models.placements; by default the simulator's feed, "
        "search_top, sidebar, video): one vertical model per surface, as in LoopFM's setting (default: "
        "models.vm_vertical; the FM is never restricted).",
    ),
]


@train_app.command("fm")
def train_fm_command(
    ctx: typer.Context,
    events: EventsOption,
    epochs: EpochsOption = None,
    seed: SeedOption = None,
) -> None:
    """Train the foundation model on the users' full histories (time < models.fm_train_end).

    Every impression of that period is an example (models.max_examples caps the VM parts only).
    """
    from training.pipeline import split, train_foundation

    settings = model_settings(ctx, epochs_fm=epochs, seed=seed)
    writable_folder(settings.model_registry_dir, "models.registry_dir")
    dataset = load_data(events, settings)
    train = split(dataset, settings.models).fm_train
    _require_both_labels(train, " before models.fm_train_end")
    examples = len(train)
    with progress_task("training fm", examples * settings.models.epochs_fm, "examples") as advance:
        model, saved = train_foundation(settings, dataset, progress=advance)
    assert saved is not None
    print(
        f"saved {saved.name} v{saved.version} ({saved.metadata['parameters']:,} parameters) to {saved.path}"
    )


@train_app.command("vm")
def train_vm_command(
    ctx: typer.Context,
    events: EventsOption,
    variant: Annotated[str, typer.Option("--variant", help="base, kd, loopfm or kd+loopfm.")] = "base",
    epochs: EpochsOption = None,
    seed: SeedOption = None,
    max_examples: MaxOption = None,
    vertical: VerticalOption = None,
) -> None:
    """Train a vertical model from Feast features (point in time), optionally with KD and/or LoopFM."""
    from features.store import open_store
    from models.registry import RegistryError
    from models.vm import VariantError, parse_variant
    from training.datasets import vm_inputs
    from training.pipeline import ModelMismatchError, load_foundation, split, train_vertical

    try:
        _, loopfm = parse_variant(variant)
    except VariantError as exc:
        fail(str(exc), exit_usage())
    settings = model_settings(
        ctx, epochs_vm=epochs, seed=seed, max_examples=max_examples, vm_vertical=vertical
    )
    writable_folder(settings.model_registry_dir, "models.registry_dir")
    try:
        fm, _ = load_foundation(settings)
    except (RegistryError, ModelMismatchError) as exc:
        fail(str(exc), exit_usage())
    dataset = load_data(events, settings)
    train = split(dataset, settings.models).vm_train
    placement = settings.models.vm_vertical
    where = f" of placement {placement}" if placement else ""
    _require_both_labels(train, f"{where} before models.vm_train_end", settings.models.max_examples)
    store = open_store(settings)
    with progress_task("reading features from Feast", 5 if loopfm else 4, "views") as advance:
        inputs, stats = vm_inputs(
            store,
            train,
            loopfm=loopfm,
            embedding_dim=fm.config.embedding_dim,
            embedding_history=settings.models.embedding_history,
            progress=lambda _view: advance(1),
        )
    stream_views = [view for view in stats.missing if view != "fm_embeddings"]
    if stream_views and all(stats.missing[view] >= 1.0 for view in stream_views):
        from infra.progress import stderr

        stderr.print(
            f"warning: none of the {len(train):,} training examples has a stream-feature row in Feast "
            f"({', '.join(stream_views)}): run `adreach features backfill --events {events}` first, or the "
            "model learns without them",
            highlight=False,
            markup=False,
        )
    if loopfm and stats.missing.get("fm_embeddings", 1.0) >= 1.0:
        fail(
            f"none of the {len(train):,} training examples has an fm_embeddings row stamped before its "
            "time (an embedding serves the impressions after the run that stored it): run `adreach features "
            "fm-embeddings --backfill` first, over a log where users have events before their impressions",
            exit_usage(),
        )
    with progress_task(
        f"training vm-{variant}", len(train) * settings.models.epochs_vm, "examples"
    ) as advance:
        _, saved = train_vertical(settings, store, dataset, variant, inputs=inputs, fm=fm, progress=advance)
    assert saved is not None
    missing = ", ".join(f"{view} {share:.1%}" for view, share in stats.missing.items())
    print(
        f"saved {saved.name} v{saved.version} ({saved.metadata['parameters']:,} parameters) to {saved.path}"
    )
    print(f"examples without a feature row: {missing}")


def evaluate_command(
    ctx: typer.Context,
    events: EventsOption,
    max_examples: MaxOption = None,
    output: Annotated[
        Path | None, typer.Option("--json", help="Also write the results as JSON here.")
    ] = None,
    vertical: VerticalOption = None,
) -> None:
    """Score the FM and every trained VM variant on the evaluation period (after models.vm_train_end)."""
    from features.store import open_store
    from models.registry import NoModelError, RegistryError
    from models.vm import VARIANTS
    from training.datasets import vm_inputs
    from training.metrics import auc_standard_error
    from training.pipeline import (
        ModelMismatchError,
        evaluate_predictions,
        load_foundation,
        load_vertical,
        split,
        transfer_ratio,
    )
    from training.train import fm_predict, vm_predict

    settings = model_settings(ctx, max_examples=max_examples, vm_vertical=vertical)
    if output is not None:
        writable_file(output, "--json")
    try:
        fm, fm_saved = load_foundation(settings)
    except (RegistryError, ModelMismatchError) as exc:
        fail(str(exc), exit_usage())
    dataset = load_data(events, settings)
    evaluation = split(dataset, settings.models).evaluation
    if len(evaluation) == 0:
        fail("no impressions after models.vm_train_end to evaluate on", exit_usage())
    if not evaluation.click.any():
        fail(
            f"none of the {len(evaluation):,} impressions after models.vm_train_end was clicked: click AUC "
            "and NE are undefined; evaluate on a log with clicks in that period",
            exit_usage(),
        )
    clicks = int(evaluation.click.sum())
    if clicks < _FEW_CLICKS:
        from infra.progress import stderr

        stderr.print(
            f"warning: only {clicks} clicks among the {len(evaluation):,} evaluation impressions: AUC "
            f"differences of a few hundredths are noise at this size (a longer log, or an earlier "
            "models.vm_train_end, gives more)",
            highlight=False,
        )
    results: dict[str, Any] = {}
    store = open_store(settings)
    available, untrained = [], []
    versions = {"fm": fm_saved.version}  # (which saved model each row scored)
    for variant in VARIANTS:
        try:
            model, saved = load_vertical(settings, variant)
            available.append((variant, model))
            versions[f"vm-{variant}"] = saved.version
        except NoModelError:
            untrained.append(f"vm-{variant}")  # not trained (for this vertical): not scored
        except (RegistryError, ModelMismatchError) as exc:
            fail(str(exc), exit_usage())
    if untrained:
        from infra.progress import stderr

        where = f" for --vertical {settings.models.vm_vertical}" if settings.models.vm_vertical else ""
        stderr.print(f"not trained{where}, not scored: {', '.join(untrained)}", highlight=False)
    loopfm = any(model.config.loopfm for _, model in available)
    inputs = None
    if available or fm.config.dense_features:
        with progress_task("reading features from Feast", 4 + int(loopfm), "views") as advance:
            inputs, _ = vm_inputs(
                store,
                evaluation,
                loopfm=loopfm,
                embedding_dim=fm.config.embedding_dim,
                embedding_history=settings.models.embedding_history,
                progress=lambda _view: advance(1),
            )
    with progress_task("fm predictions", len(evaluation), "examples") as advance:
        fm_dense = inputs.dense if inputs is not None and fm.config.dense_features else None
        results["fm"] = evaluate_predictions(
            evaluation, fm_predict(fm, dataset.log, evaluation, dense=fm_dense, progress=advance)
        )
    if inputs is not None:
        for variant, model in available:
            results[f"vm-{variant}"] = evaluate_predictions(evaluation, vm_predict(model, inputs))
    if not all(__import__("numpy").isnan(evaluation.p_click)):
        import numpy as np

        known = ~np.isnan(evaluation.p_click)
        logits = np.log(evaluation.p_click[known] / (1 - evaluation.p_click[known]))
        results["oracle (true p_click)"] = evaluate_predictions(
            evaluation.take(np.flatnonzero(known)), np.stack([logits, logits], axis=1).astype(np.float32)
        )
    base = results.get("vm-base", {}).get("click", {}).get("auc")
    where = f" ({settings.models.vm_vertical} only)" if settings.models.vm_vertical else ""
    scored = ", ".join(f"{name} v{version}" for name, version in versions.items())
    print(f"evaluation: {len(evaluation):,} impressions after models.vm_train_end{where}; {scored}")
    for name, version in versions.items():
        results[name]["version"] = version
    fm_auc = results["fm"]["click"]["auc"]
    clicks = int((evaluation.click > 0.5).sum())
    noise = auc_standard_error(fm_auc, clicks, len(evaluation) - clicks)
    print(f"{'model':<24}{'click AUC':>10}{'click NE':>10}{'CVR AUC':>10}{'transfer':>10}")
    for name, result in results.items():
        click = result["click"]
        cvr = result.get("conversion_given_click", {}).get("auc", float("nan"))
        ratio = (
            transfer_ratio(click["auc"], base, fm_auc, min_gain=noise)
            if base is not None and name.startswith("vm-")
            else float("nan")
        )
        result["transfer_ratio_auc"] = ratio
        print(f"{name:<24}{_cell(click['auc'], 4)}{_cell(click['ne'], 4)}{_cell(cvr, 4)}{_cell(ratio, 2)}")
    if base is not None and not fm_auc - base > noise:
        print(
            f"transfer: not shown: the FM's click AUC gain over vm-base ({fm_auc - base:+.4f}) is not above "
            f"the AUC's standard error on these {len(evaluation):,} impressions ({noise:.4f}); "
            "evaluate on more impressions (--max-examples) or a longer period"
        )
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(_json_safe(results), indent=2, allow_nan=False) + "\n")


_FEW_CLICKS = 100  # below this an AUC's standard error is several hundredths


def _require_both_labels(examples: Any, period: str, capped: int | None = None) -> None:
    """Refuse a training part a click model cannot learn from (it would save a constant model)."""
    if len(examples) == 0:
        fail(f"no impressions{period}: nothing to train on", exit_usage())
    if not examples.click.any() or examples.click.all():
        label = "clicked" if examples.click.any() else "unclicked"
        fail(
            f"all {len(examples):,} impressions{period} are {label}: a click model needs both; "
            "use a log with clicks and impressions without them in that period"
            + (f" (or a larger --max-examples than {capped:,})" if capped else ""),
            exit_usage(),
        )


def _cell(value: float, digits: int) -> str:
    """A 10-wide table cell; "n/a" where a metric is undefined (no conversions, no FM gain)."""
    if value != value:  # NaN
        return f"{'n/a':>10}"
    text = f"{value:.{digits}f}"
    return f"{text:>10}" if len(text) < 10 else f" {value:.3g}".rjust(10)


def _json_safe(value: Any) -> Any:
    """``value`` with NaN as null (standard JSON: other readers refuse a bare NaN), numbers as floats."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    if isinstance(value, str | bool | int) or value is None:
        return value
    number = float(value)
    return None if number != number else number
