"""LoopFM vs ExFM-style distillation: how much of the foundation model's gain reaches a small model.

On one simulated world (seeded), with a time split (FM trained on the first
``fm_train_end`` of the period, VMs on the first ``vm_train_end``, evaluation on the
rest, after the simulator's interest drift and new traffic source), for each of
``--seeds`` training seeds:

1. stream features replayed through the stream engine into Feast (once, seed-free);
2. the FM trained on the raw histories; LoopFM runs every hour write its user
   embeddings (+ last K) into the ``fm_embeddings`` Feast view;
3. VM inputs read from Feast with ``get_historical_features`` (point in time);
4. VM-base, VM+KD (aux head + student adapter), VM+LoopFM, VM+KD+LoopFM trained.

Reported: click AUC and normalized entropy (NE) on the validation slice (the end of the
VM period, ``models.vm_validation``; VMs fit on the VM period before it: where options
such as ``models.embedding_history`` and ``models.kd_weight`` are chosen) and on the
evaluation period (VMs fit on the whole VM period), mean ± std over seeds and per seed;
the transfer ratio of each variant, ``(VM - VM_base) / (FM - VM_base)``
(AUC, per seed, then averaged); serving cost per request: VM+LoopFM (one online read of
the embedding row + the VM) vs the FM (its forward pass over the user's L-event history
and the same stream features; reading that history is not even counted), as wall time
and FLOPs; a bootstrap of the evaluation impressions for the transfer of mean gains.
Sizes (every size reads every impression of the VM and evaluation periods, no cap):

* full (the default): 3,000 users, 300,000 events, 3 seeds (about 36 minutes here);
* ``--medium``: 1,000 users, 80,000 events, 3 seeds (about 20 minutes; the size of the
  documented multi-seed runs, which were made when it was called ``--quick``);
* ``--quick``: 300 users, 20,000 events, 1 seed (about a minute): a smoke run of the whole
  pipeline (simulation, Feast backfill, FM, embeddings, four VMs, serving); its world is
  too small for the comparisons to mean anything.

``--users``, ``--events`` and ``--seeds`` override a size's values; ``--world-seed`` simulates
another world of the same size (each size's results are for one world, seed 7: AUCs
differ between worlds, so compare ratios and say which worlds were run).

``--vertical PLACEMENT`` (LoopFM's own setting): one FM learns from every surface's traffic,
and each vertical model serves one surface and learns only from its impressions; the VMs
train and are scored on that placement's impressions only (validation slice and evaluation
period alike), the FM and its embeddings are unchanged. ``--fm-train-end`` overrides
``models.fm_train_end`` (default 0.5); past the validation slice's start the FM has seen the
slice, so its validation figures are flagged. Results go to ``results/loopfm.json`` only in
the default mode at full size, else to
``results/loopfm[_vertical_<placement>][_fm<end>][_users<U>_events<E>_days<D>][_world<S>][_medium|_quick].json``
(the world part where ``--users``, ``--events`` or ``--days`` change the size's world;
``_world<S>`` where ``--world-seed`` simulates another world of that size than seed 7's).

Targets (issue 7): LoopFM's transfer ratio >= 2x KD's, its gain over VM-base larger
than the seed-to-seed spread, VM+LoopFM serving >= 10x cheaper than the FM.
Usage: ``python benchmarks/loopfm.py [--quick | --medium] [--seeds N] [--vertical P] [--fm-train-end F]``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import print_table, versions, write_results
from numpy.typing import NDArray
from torch.utils.flop_counter import FlopCounterMode

from features.embeddings import FM_EMBEDDINGS
from features.online import OnlineFeatureReader
from features.store import open_store
from infra.settings import Settings, load_settings
from models.vm import VARIANTS
from streams.simulation import ParquetSink, SimulationConfig, simulate
from training.datasets import embedding_history_inputs, vm_inputs
from training.events import PLACEMENTS, Buckets
from training.metrics import auc
from training.pipeline import (
    evaluate_predictions,
    load_dataset,
    materialize_embeddings,
    split,
    stream_features,
    train_foundation,
    train_vertical,
    transfer_ratio,
)
from training.replay import replay_stream_features
from training.train import VMInputs, fm_batch, fm_predict, vm_predict


@dataclass(frozen=True)
class Size:
    users: int
    events: int
    seeds: int


SIZES = {
    "full": Size(users=3_000, events=300_000, seeds=3),
    "medium": Size(users=1_000, events=80_000, seeds=3),
    "quick": Size(users=300, events=20_000, seeds=1),
}


DAYS = 4.0  # every size's simulated period (--days overrides)
WORLD_SEED = 7  # the simulator's seed of every size's world (--world-seed overrides)


def _size_name(args: argparse.Namespace) -> str:
    return "quick" if args.quick else "medium" if args.medium else "full"


def _world(args: argparse.Namespace) -> tuple[int, int]:
    """(users, events) of the simulated world: the size's, unless ``--users``/``--events`` say otherwise."""
    size = SIZES[_size_name(args)]
    return args.users or size.users, args.events or size.events


def _with_fm(inputs: VMInputs, history: NDArray[Any], length: NDArray[Any]) -> VMInputs:
    return VMInputs(inputs.dense, inputs.candidate, history, length, inputs.click, inputs.conversion)


def _per_request(fn: Any, repeats: int) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def serving_cost(
    settings: Settings, fm: Any, vm: Any, dataset: Any, evaluation: Any, inputs: VMInputs
) -> dict[str, Any]:
    """Per-request cost of scoring one (user, ad) pair: batch 1, and per example in batches of 256."""
    index = np.arange(min(256, len(evaluation)))
    history, candidate = fm_batch(dataset.log, evaluation, index, fm.config)
    dense = torch.from_numpy(inputs.dense[index])
    fm_dense = dense if fm.config.dense_features else None
    vm_cand = {k: torch.from_numpy(v[index]) for k, v in inputs.candidate.items()}
    assert inputs.fm_history is not None and inputs.fm_history_len is not None
    fm_hist = torch.from_numpy(inputs.fm_history[index])
    fm_len = torch.from_numpy(inputs.fm_history_len[index])

    def one(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v[:1] for k, v in d.items()}

    results: dict[str, Any] = {}
    with torch.no_grad():
        for name, call1, call256 in (
            (
                "fm",
                lambda: fm(one(history), one(candidate), None if fm_dense is None else fm_dense[:1]),
                lambda: fm(history, candidate, fm_dense),
            ),
            (
                "vm+loopfm",
                lambda: vm(dense[:1], one(vm_cand), fm_hist[:1], fm_len[:1]),
                lambda: vm(dense, vm_cand, fm_hist, fm_len),
            ),
        ):
            with FlopCounterMode(display=False) as counter:
                call1()  # type: ignore[no-untyped-call]
            results[name] = {
                "latency_batch1_ms": _per_request(call1, 200) * 1e3,
                "per_example_batch256_us": _per_request(call256, 20) / len(index) * 1e6,
                "flops_per_example": int(counter.get_total_flops()),
            }
    users = [str(u) for u in evaluation.user_id[:200]]
    with OnlineFeatureReader(settings, (FM_EMBEDDINGS,)) as reader:
        read_ms = _per_request(
            lambda: reader.read(FM_EMBEDDINGS, users[:1], ["fm_history", "fm_history_len"]), 200
        )
    results["vm+loopfm"]["online_read_ms"] = read_ms * 1e3
    results["vm+loopfm"]["latency_batch1_with_read_ms"] = (
        results["vm+loopfm"]["latency_batch1_ms"] + read_ms * 1e3
    )
    return results


def _take(inputs: VMInputs, mask: NDArray[Any]) -> VMInputs:
    index = np.flatnonzero(mask)
    return VMInputs(
        inputs.dense[index],
        {k: v[index] for k, v in inputs.candidate.items()},
        None if inputs.fm_history is None else inputs.fm_history[index],
        None if inputs.fm_history_len is None else inputs.fm_history_len[index],
        inputs.click[index],
        inputs.conversion[index],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help="a smoke run of the pipeline (about a minute)")
    sizes.add_argument("--medium", action="store_true", help="1,000 users, 80,000 events (about 20 minutes)")
    parser.add_argument("--seeds", type=int, help="training seeds (default: 1 with --quick, else 3)")
    parser.add_argument("--users", type=int)
    parser.add_argument("--days", type=float, default=DAYS)
    parser.add_argument("--events", type=int)
    parser.add_argument(
        "--world-seed",
        type=int,
        default=WORLD_SEED,
        help=f"the simulator's seed: another world of the same size (default {WORLD_SEED})",
    )
    parser.add_argument(
        "--max-examples", type=int, help="cap on VM training impressions (default: all); evaluation: all"
    )
    parser.add_argument(
        "--vertical",
        choices=PLACEMENTS,
        help="VMs train and are evaluated on this placement's impressions only; the FM on everything",
    )
    parser.add_argument(
        "--fm-train-end", type=float, help="models.fm_train_end (fraction of the log; default: the setting's)"
    )
    args = parser.parse_args()
    size = _size_name(args)
    users, events = _world(args)
    seeds = args.seeds or SIZES[size].seeds
    torch.set_num_threads(1)
    scratch = Path(tempfile.mkdtemp(prefix="adreach-loopfm-"))
    timings: dict[str, float] = {}
    try:
        config = SimulationConfig(users=users, days=args.days, events=events, seed=args.world_seed)
        simulate(config, ParquetSink(scratch / "sim" / "events"), scratch / "sim" / "truth")
        settings = load_settings(
            state_dir=scratch / "state",
            models={
                "max_examples": args.max_examples,
                "epochs_fm": 4,
                "threads": 1,
                "vm_vertical": args.vertical,
                **({} if args.fm_train_end is None else {"fm_train_end": args.fm_train_end}),
            },
        )
        store = open_store(settings)
        queries = settings.queries if settings.models.search_topics else None
        dataset = load_dataset(
            scratch / "sim" / "events", queries=queries, buckets=Buckets.for_models(settings.models)
        )
        started = time.perf_counter()
        replay_stream_features(settings, dataset_events(scratch), flush_s=settings.models.replay_flush_s)
        timings["stream feature backfill s"] = time.perf_counter() - started
        parts = split(dataset, settings.models)
        if parts.fm_end_ms > parts.validation_ms:
            print("note: the FM trains past the validation slice's start (validation: in-sample)")
        # Every impression of the evaluation period, whatever the cap on VM training examples.
        evaluation = split(dataset, settings.models.model_copy(update={"max_examples": None})).evaluation
        in_validation = parts.vm_train.time_ms >= parts.validation_ms
        fit_examples, validation = parts.vm_fit, parts.validation
        started = time.perf_counter()
        train_inputs, train_stats = vm_inputs(
            store, parts.vm_train, loopfm=False, embedding_dim=1, embedding_history=1
        )
        eval_inputs, eval_stats = vm_inputs(
            store, evaluation, loopfm=False, embedding_dim=1, embedding_history=1
        )
        fm_dense = stream_features(store, parts.fm_train) if settings.models.fm_stream_features else None
        timings["feast stream-feature reads s"] = time.perf_counter() - started
        per_seed: list[dict[str, Any]] = []
        per_seed_validation: list[dict[str, Any]] = []
        eval_logits: list[dict[str, NDArray[Any]]] = []
        serving: dict[str, Any] = {}
        for seed in range(seeds):
            print(f"seed {seed}: training fm ...", flush=True)
            started = time.perf_counter()
            fm, _ = train_foundation(settings, dataset, seed=seed, dense=fm_dense, save=False)
            timings[f"fm training s (seed {seed})"] = time.perf_counter() - started
            shutil.rmtree(settings.feature_repo_dir / "data" / FM_EMBEDDINGS.name, ignore_errors=True)
            open_store(settings)
            started = time.perf_counter()
            materialize_embeddings(settings, fm, dataset, backfill=True)
            k, e = settings.models.embedding_history, fm.config.embedding_dim
            train_loop = _with_fm(train_inputs, *embedding_history_inputs(store, parts.vm_train, e, k)[:2])
            eval_loop = _with_fm(eval_inputs, *embedding_history_inputs(store, evaluation, e, k)[:2])
            timings[f"fm-embeddings + feast read s (seed {seed})"] = time.perf_counter() - started
            started = time.perf_counter()
            fm_train_dense = train_inputs.dense if fm_dense is not None else None
            fm_validation = fm_predict(
                fm, dataset.log, validation, dense=_take_dense(fm_train_dense, in_validation)
            )
            fm_logits = fm_predict(
                fm, dataset.log, evaluation, dense=eval_inputs.dense if fm_dense is not None else None
            )
            metrics: dict[str, Any] = {"fm": evaluate_predictions(evaluation, fm_logits)}
            checks: dict[str, Any] = {"fm": evaluate_predictions(validation, fm_validation)}
            logits: dict[str, NDArray[Any]] = {"fm": fm_logits[:, 0]}
            for variant in VARIANTS:
                print(f"seed {seed}: training vm-{variant} ...", flush=True)
                inputs = train_loop if "loopfm" in variant else train_inputs
                # Validation: fit on the VM period before the slice, score on the slice.
                vm, _ = train_vertical(
                    settings,
                    store,
                    dataset,
                    variant,
                    inputs=_take(inputs, ~in_validation),
                    examples=fit_examples,
                    fm=fm,
                    seed=seed,
                    save=False,
                )
                checks[f"vm-{variant}"] = evaluate_predictions(
                    validation, vm_predict(vm, _take(inputs, in_validation))
                )
                # Evaluation: fit on the whole VM period, score after it.
                vm, _ = train_vertical(
                    settings, store, dataset, variant, inputs=inputs, fm=fm, seed=seed, save=False
                )
                predicted = vm_predict(vm, eval_loop if "loopfm" in variant else eval_inputs)
                metrics[f"vm-{variant}"] = evaluate_predictions(evaluation, predicted)
                logits[f"vm-{variant}"] = predicted[:, 0]
                if variant == "loopfm" and seed == 0:
                    serving = serving_cost(settings, fm, vm, dataset, evaluation, eval_loop)
            timings[f"vm training + scoring s (seed {seed})"] = time.perf_counter() - started
            print(
                f"seed {seed}: evaluation AUC "
                + ", ".join(f"{n} {m['click']['auc']:.4f}" for n, m in metrics.items())
                + "; validation AUC "
                + ", ".join(f"{n} {m['click']['auc']:.4f}" for n, m in checks.items()),
                flush=True,
            )
            per_seed.append(metrics)
            per_seed_validation.append(checks)
            eval_logits.append(logits)
        known = ~np.isnan(evaluation.p_click)
        oracle = None
        if known.all():
            p = evaluation.p_click
            logit = np.log(p / (1 - p)).astype(np.float32)
            oracle = evaluate_predictions(evaluation, np.stack([logit, logit], 1))
        report(
            args,
            per_seed,
            per_seed_validation,
            bootstrap(evaluation.click, eval_logits),
            serving,
            oracle,
            timings,
            (len(parts.vm_train), len(fit_examples), len(validation), len(evaluation)),
            train_stats,
            eval_stats,
            {
                "vm_vertical": settings.models.vm_vertical,
                "fm_train_end": settings.models.fm_train_end,
                "vm_train_end": settings.models.vm_train_end,
                "vm_validation": settings.models.vm_validation,
                "fm_train_examples": len(parts.fm_train),
                "fm_sees_validation_slice": bool(parts.fm_end_ms > parts.validation_ms),
            },
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _take_dense(dense: NDArray[Any] | None, mask: NDArray[Any]) -> NDArray[Any] | None:
    return None if dense is None else dense[mask]


def bootstrap(
    click: NDArray[Any], logits: list[dict[str, NDArray[Any]]], rounds: int = 200
) -> dict[str, Any]:
    """Evaluation-sample noise of the transfer of mean gains: the evaluation impressions resampled
    (the same resample for every seed and model), the seed-mean AUCs recomputed on each."""
    rng = np.random.default_rng(0)
    names = list(logits[0])
    kd: list[float] = []
    loop: list[float] = []
    ahead = 0
    for _ in range(rounds):
        index = rng.integers(0, len(click), len(click))
        mean = {n: float(np.mean([auc(click[index], s[n][index]) for s in logits])) for n in names}
        fm_gain = mean["fm"] - mean["vm-base"]
        kd.append((mean["vm-kd"] - mean["vm-base"]) / fm_gain if fm_gain > 0 else float("nan"))
        loop.append((mean["vm-loopfm"] - mean["vm-base"]) / fm_gain if fm_gain > 0 else float("nan"))
        ahead += int(mean["vm-loopfm"] > mean["vm-kd"])
    kd_a, loop_a = np.asarray(kd), np.asarray(loop)
    return {
        "rounds": rounds,
        "kd_transfer_of_mean_gains_p5_p95": [
            float(np.nanpercentile(kd_a, 5)),
            float(np.nanpercentile(kd_a, 95)),
        ],
        "loopfm_transfer_of_mean_gains_p5_p95": [
            float(np.nanpercentile(loop_a, 5)),
            float(np.nanpercentile(loop_a, 95)),
        ],
        "share_loopfm_at_least_2x_kd": float(np.nanmean(loop_a >= 2 * kd_a)),
        "share_loopfm_auc_above_kd": ahead / rounds,
    }


def dataset_events(scratch: Path) -> Any:
    from training.events import read_events

    return read_events(scratch / "sim" / "events")


def _stats(values: list[float]) -> tuple[float, float]:
    """Mean and std over the defined values (NaN: a seed whose ratio is undefined); NaN if none."""
    array = np.asarray(values, np.float64)
    array = array[~np.isnan(array)]
    if len(array) == 0:
        return float("nan"), float("nan")
    return float(array.mean()), float(array.std())


NAMES = ["fm", *(f"vm-{v}" for v in VARIANTS)]


def summarize(per_seed: list[dict[str, Any]]) -> tuple[dict[str, Any], list[list[Any]]]:
    """Per-model figures over seeds (mean, std, per seed) and the rows of the summary table."""
    rows: list[list[Any]] = []
    figures: dict[str, Any] = {}
    for name in NAMES:
        aucs = [m[name]["click"]["auc"] for m in per_seed]
        nes = [m[name]["click"]["ne"] for m in per_seed]
        ratios = [
            transfer_ratio(m[name]["click"]["auc"], m["vm-base"]["click"]["auc"], m["fm"]["click"]["auc"])
            for m in per_seed
        ]
        gains = [m[name]["click"]["auc"] - m["vm-base"]["click"]["auc"] for m in per_seed]
        auc_mean, auc_std = _stats(aucs)
        ne_mean, ne_std = _stats(nes)
        ratio_mean, ratio_std = (
            _stats(ratios) if name.startswith("vm-") and name != "vm-base" else (float("nan"),) * 2
        )
        figures[name] = {
            "click_auc": {"mean": auc_mean, "std": auc_std, "per_seed": aucs},
            "click_ne": {"mean": ne_mean, "std": ne_std, "per_seed": nes},
            "auc_gain_over_vm_base": {"mean": _stats(gains)[0], "std": _stats(gains)[1], "per_seed": gains},
            "transfer_ratio_auc": {"mean": ratio_mean, "std": ratio_std, "per_seed": ratios},
        }
        rows.append(
            [
                name,
                f"{auc_mean:.4f} ± {auc_std:.4f}",
                f"{ne_mean:.4f} ± {ne_std:.4f}",
                "" if name in ("fm", "vm-base") else f"{_stats(gains)[0]:+.4f}",
                "" if np.isnan(ratio_mean) else f"{ratio_mean:.2f} ± {ratio_std:.2f}",
            ]
        )
    # The mean of per-seed ratios is dominated by seeds where the FM barely beats VM-base
    # (a small denominator); the ratio of the mean gains is the steadier reading.
    # No ratio when the FM does not beat VM-base on average (as transfer_ratio per seed).
    fm_gain = figures["fm"]["auc_gain_over_vm_base"]["mean"]
    for name in NAMES[2:]:
        figures[name]["transfer_of_mean_gains_auc"] = (
            figures[name]["auc_gain_over_vm_base"]["mean"] / fm_gain if fm_gain > 0 else float("nan")
        )
    return figures, rows


def _at_least_twice(loopfm: float, kd: float) -> bool:
    """LoopFM's transfer at least 2x KD's (when KD transfers nothing, any positive LoopFM transfer)."""
    return bool(loopfm >= 2 * kd) if kd > 0 else bool(loopfm > 0)


def _range(pair: list[float]) -> str:
    return f"{pair[0]:.2f}..{pair[1]:.2f}"


def print_per_seed(per_seed: list[dict[str, Any]]) -> None:
    print_table(
        ["seed", *NAMES],
        [[seed, *(f"{m[n]['click']['auc']:.4f}" for n in NAMES)] for seed, m in enumerate(per_seed)],
    )


def report(
    args: argparse.Namespace,
    per_seed: list[dict[str, Any]],
    per_seed_validation: list[dict[str, Any]],
    noise: dict[str, Any],
    serving: dict[str, Any],
    oracle: dict[str, Any] | None,
    timings: dict[str, float],
    sizes: tuple[int, int, int, int],
    train_stats: Any,
    eval_stats: Any,
    setting: dict[str, Any],
) -> None:
    train_examples, fit_examples, validation_examples, eval_examples = sizes
    vertical = setting["vm_vertical"]
    if vertical is not None:
        print(
            f"\nvertical mode: VMs train and are scored on {vertical} impressions only; the FM trained on "
            f"{setting['fm_train_examples']:,} impressions of every placement (fm_train_end "
            f"{setting['fm_train_end']})"
        )
    names = NAMES
    checks, check_rows = summarize(per_seed_validation)
    print()
    print(
        f"validation slice (end of the VM period, {validation_examples:,} impressions; VMs fit on the "
        f"{fit_examples:,} before it): click AUC / NE, {len(per_seed)} seeds"
    )
    print_table(["model", "click AUC", "click NE", "AUC gain vs base", "transfer ratio (AUC)"], check_rows)
    print_per_seed(per_seed_validation)
    print(
        "validation transfer of mean gains: "
        + ", ".join(f"{name} {checks[name]['transfer_of_mean_gains_auc']:.2f}" for name in names[2:])
    )
    figures, rows = summarize(per_seed)
    if oracle is not None:
        rows.append(
            ["oracle (true p_click)", f"{oracle['click']['auc']:.4f}", f"{oracle['click']['ne']:.4f}", "", ""]
        )
        figures["oracle"] = {"click_auc": oracle["click"]["auc"], "click_ne": oracle["click"]["ne"]}
    print()
    print(
        f"click AUC / NE on {eval_examples:,} evaluation impressions; VMs trained on {train_examples:,}; "
        f"{len(per_seed)} seeds (mean ± std); shared 2-core machine"
    )
    print_table(["model", "click AUC", "click NE", "AUC gain vs base", "transfer ratio (AUC)"], rows)
    print_per_seed(per_seed)
    kd = figures["vm-kd"]["transfer_ratio_auc"]["mean"]
    loop = figures["vm-loopfm"]["transfer_ratio_auc"]["mean"]
    loop_gain = figures["vm-loopfm"]["auc_gain_over_vm_base"]
    spread = max(figures["vm-base"]["click_auc"]["std"], figures["vm-loopfm"]["click_auc"]["std"])
    print()
    if serving:
        fm_cost, vm_cost = serving["fm"], serving["vm+loopfm"]
        print_table(
            ["serving (per request)", "batch-1 latency ms", "per example in batch 256 us", "FLOPs / example"],
            [
                [
                    "fm",
                    fm_cost["latency_batch1_ms"],
                    fm_cost["per_example_batch256_us"],
                    fm_cost["flops_per_example"],
                ],
                [
                    "vm+loopfm (+ online read)",
                    vm_cost["latency_batch1_with_read_ms"],
                    vm_cost["per_example_batch256_us"],
                    vm_cost["flops_per_example"],
                ],
            ],
        )
        speedup = fm_cost["per_example_batch256_us"] / vm_cost["per_example_batch256_us"]
        flop_ratio = fm_cost["flops_per_example"] / max(vm_cost["flops_per_example"], 1)
        serving["per_example_speedup"] = speedup
        serving["flop_ratio"] = flop_ratio
        print(f"VM+LoopFM vs FM: {speedup:.1f}x less time per example, {flop_ratio:.0f}x fewer FLOPs")
    kd_of_means = figures["vm-kd"]["transfer_of_mean_gains_auc"]
    loop_of_means = figures["vm-loopfm"]["transfer_of_mean_gains_auc"]
    print(
        "transfer of mean gains (mean VM gain / mean FM gain): "
        + ", ".join(f"{name} {figures[name]['transfer_of_mean_gains_auc']:.2f}" for name in names[2:])
    )
    # A transfer ratio needs an FM that beats VM-base: when it does not on average (a small
    # vertical can get there), the ratio targets are undefined (None), not met by accident
    # through the seeds where the FM's lead is tiny.
    fm_ahead = figures["fm"]["auc_gain_over_vm_base"]["mean"] > 0
    targets = {
        "loopfm_transfer_at_least_2x_kd": _at_least_twice(loop, kd) if fm_ahead else None,
        "loopfm_transfer_of_mean_gains_at_least_2x_kd": _at_least_twice(loop_of_means, kd_of_means)
        if fm_ahead
        else None,
        "loopfm_gain_above_seed_spread": bool(loop_gain["mean"] > spread),
        "serving_at_least_10x_cheaper": bool(serving.get("per_example_speedup", 0) >= 10),
    }
    print(
        "evaluation-sample noise (bootstrap of the evaluation impressions, seed means): transfer of mean "
        f"gains KD {_range(noise['kd_transfer_of_mean_gains_p5_p95'])}, "
        f"LoopFM {_range(noise['loopfm_transfer_of_mean_gains_p5_p95'])}"
        f" (5th-95th pct); LoopFM >= 2x KD in {noise['share_loopfm_at_least_2x_kd']:.0%} of resamples"
    )
    print(
        f"targets: {targets}  (KD ratio {kd:.2f}, LoopFM ratio {loop:.2f}, "
        f"LoopFM gain {loop_gain['mean']:+.4f} vs spread {spread:.4f})"
    )
    both = figures["vm-kd+loopfm"]["transfer_ratio_auc"]["mean"]
    print(
        f"not a target, for the paper's framing (LoopFM on top of KD): KD+LoopFM ratio {both:.2f} "
        f"= {both / kd:.1f}x KD's"
        if kd > 0
        else f"KD+LoopFM ratio {both:.2f}"
    )
    for name, seconds in timings.items():
        print(f"  {name}: {seconds:,.0f}")
    name = "loopfm"
    if vertical is not None:
        name += f"_vertical_{vertical}"
    if args.fm_train_end is not None:
        name += f"_fm{args.fm_train_end:g}"
    size = _size_name(args)
    world = SIZES[size]
    users, events = _world(args)
    if (users, events, args.days) != (world.users, world.events, DAYS):
        # another world: its figures never replace those of the size's own world
        name += f"_users{users}_events{events}_days{args.days:g}"
    if args.world_seed != WORLD_SEED:
        name += f"_world{args.world_seed}"
    if size == "medium":
        name += "_medium"  # smaller runs never overwrite a full run's figures (quick: write_results)
    path = write_results(
        name,
        {
            "size": size,
            "seeds": len(per_seed),
            "setting": setting,
            "data": {
                "users": users,
                "events": events,
                "days": args.days,
                "world_seed": args.world_seed,
                "train_examples": train_examples,
                "fit_examples_before_validation": fit_examples,
                "validation_examples": validation_examples,
                "eval_examples": eval_examples,
                "missing_feature_rows_train": train_stats.missing,
                "missing_feature_rows_eval": eval_stats.missing,
            },
            "metrics": figures,
            "validation_metrics": checks,
            "evaluation_bootstrap": noise,
            "serving": serving,
            "targets": targets,
            "timings_s": timings,
            "public_ctr_dataset": "none offline: PyPI criteo* packages are API clients; loaders download",
            "versions": versions("torch", "feast", "numpy"),
        },
        quick=args.quick,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
