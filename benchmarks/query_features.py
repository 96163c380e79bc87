"""Query features: queries/s on CPU, and on a GPU bf16 vs FP8 throughput and agreement.

CPU cases (the embedded backend, all-MiniLM-L6-v2, ``queries.torch_threads`` threads):

* ``embed + category`` in float32 and in bfloat16 (the issue's target: >= 500 queries/s),
  with bf16's agreement with float32 (same category; embedding cosine similarity);
* the full feature set (category, commercial intent, keyword expansions);
* the baseline: the same encoder called one query at a time (no batching);
* the pipeline over simulated search events (Zipf-repeated queries, as the simulator
  draws them), written to Feast, then the same events again (everything cached);
* category accuracy on the simulator's queries, whose topic is known (chance: 1/25).

GPU cases (run only where CUDA is available; the script says so otherwise):

* the MiniLM encoder in bf16 vs FP8 (W8A8 via ``torch._scaled_mm``, per-tensor scales;
  compute capability >= 8.9): queries/s and embedding cosine similarity / category agreement;
* with vLLM installed and ``ADREACH_QUERIES__MODEL_PATH`` set: the LLM backend in bf16 vs
  FP8 (each in its own process so GPU memory is fully released): queries/s and agreement of
  the categories (and of relevance labels on the gold set). Target: FP8 >= 1.5x bf16 at
  >= 99% agreement.

Usage: ``python benchmarks/query_features.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from common import print_table, versions, write_results
from numpy.typing import NDArray

from features.definitions import normalize_query
from features.queries.cpu import CPUBackend
from features.queries.pipeline import QueryFeaturePipeline
from infra.settings import QueryFeatureSettings, load_settings
from streams.simulation.topics import TOPICS, query_pools, zipf_indices

TARGET_CPU_QPS = 500.0
TARGET_FP8_SPEEDUP = 1.5
TARGET_AGREEMENT = 0.99


def simulator_queries(per_topic: int, seed: int = 7) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    queries: list[str] = []
    topics: list[str] = []
    for topic, pool in zip(TOPICS, query_pools(rng, per_topic=per_topic), strict=True):
        queries += [normalize_query(str(q)) for q in pool]
        topics += [topic.segment] * len(pool)
    return queries, topics


def search_events(n: int, per_topic: int, seed: int = 11) -> pa.Table:
    """``n`` search rows drawn like the simulator: a topic, then a Zipf-ranked query of it."""
    rng = np.random.default_rng(seed)
    pools = query_pools(np.random.default_rng(seed), per_topic=per_topic)
    sizes = np.asarray([len(p) for p in pools])
    topic = rng.integers(0, len(pools), n)
    index = zipf_indices(rng, sizes[topic])
    queries = [str(pools[t][i]) for t, i in zip(topic.tolist(), index.tolist(), strict=True)]
    start = 1_767_571_200_000_000
    return pa.table(
        {
            "query": pa.array(queries, pa.string()),
            "event_time": pa.array(start + np.arange(n) * 1000, pa.timestamp("us", "UTC")),
        }
    )


def timed(function: Any, *args: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


def cpu_cases(quick: bool) -> tuple[list[list[Any]], dict[str, Any]]:
    per_topic = 40 if quick else 200
    queries, topics = simulator_queries(per_topic)
    rows: list[list[Any]] = []
    figures: dict[str, Any] = {"queries": len(queries), "threads": QueryFeatureSettings().torch_threads}
    backend = CPUBackend(QueryFeatureSettings(encoder_dtype="float32"))
    bf16 = CPUBackend(QueryFeatureSettings(encoder_dtype="bfloat16"))

    def embed_and_classify(b: CPUBackend, texts: list[str]) -> tuple[NDArray[Any], NDArray[Any]]:
        vectors = b.embed(texts)
        return vectors, b.classify(vectors)[0]

    best = 0.0
    for threads in (1, 2):
        torch.set_num_threads(threads)
        backend.embed(queries[:256])  # warm-up (allocator, tokenizer memo)
        (vectors32, categories32), seconds = timed(embed_and_classify, backend, queries)
        qps32 = len(queries) / seconds
        accuracy = float(
            np.mean([backend.taxonomy.ids[c] == t for c, t in zip(categories32, topics, strict=True)])
        )
        rows.append(
            [
                f"embed + category, float32, {threads} thread(s)",
                len(queries),
                qps32,
                "",
                f"accuracy {accuracy:.1%}",
            ]
        )
        figures[f"embed_category_float32_{threads}t"] = {"value": round(qps32, 1), "unit": "queries/s"}
        bf16.embed(queries[:256])
        (vectors16, categories16), seconds = timed(embed_and_classify, bf16, queries)
        qps16 = len(queries) / seconds
        cosine = np.einsum("ij,ij->i", vectors16, vectors32)
        same = float(np.mean(categories16 == categories32))
        rows.append(
            [
                f"embed + category, bfloat16, {threads} thread(s)",
                len(queries),
                qps16,
                f"{qps16 / qps32:.2f}x",
                f"category = fp32 {same:.2%}; cosine min {cosine.min():.4f}",
            ]
        )
        figures[f"embed_category_bfloat16_{threads}t"] = {
            "value": round(qps16, 1),
            "unit": "queries/s",
            "category_agreement_with_float32": round(same, 4),
            "cosine_with_float32_min": round(float(cosine.min()), 5),
            "cosine_with_float32_mean": round(float(cosine.mean()), 6),
        }
        best = max(best, qps32, qps16)
    figures["category_accuracy"] = {
        "value": round(accuracy, 4),
        "unit": "share of simulator queries whose category is their topic",
        "chance": round(1 / len(backend.taxonomy.categories), 4),
    }
    torch.set_num_threads(QueryFeatureSettings().torch_threads or torch.get_num_threads())
    qps32 = figures["embed_category_float32_1t"]["value"]

    _, seconds = timed(backend.generate, queries)
    full = len(queries) / seconds
    rows.append(["all features (+ intent, keywords), float32", len(queries), full, "", ""])
    figures["all_features_float32"] = {"value": round(full, 1), "unit": "queries/s"}

    sample = queries[: 100 if quick else 300]
    started = time.perf_counter()
    for query in sample:
        embed_and_classify(backend, [query])
    single = len(sample) / (time.perf_counter() - started)
    rows.append(
        [
            "baseline: one query per call, float32",
            len(sample),
            single,
            f"{qps32 / single:.1f}x",
            "batching gain",
        ]
    )
    figures["baseline_unbatched_float32"] = {"value": round(single, 1), "unit": "queries/s"}

    events = search_events(20_000 if quick else 200_000, per_topic)
    with tempfile.TemporaryDirectory() as state:
        settings = load_settings(state_dir=Path(state))
        pipeline = QueryFeaturePipeline(settings, backend)
        _, first = timed(pipeline.process, events)
        stats = pipeline.stats
        distinct = stats.distinct_queries
        pipeline.close()
        again = QueryFeaturePipeline(settings, backend)
        _, second = timed(again.process, events)
        hits = again.stats.cache_hits
        again.close()
    rows.append(
        [
            "pipeline: search events -> Feast (cold cache)",
            events.num_rows,
            events.num_rows / first,
            "",
            f"{distinct:,} distinct queries generated",
        ]
    )
    rows.append(
        [
            "pipeline: same events again (all cached)",
            events.num_rows,
            events.num_rows / second,
            "",
            f"{hits:,} hits",
        ]
    )
    figures["pipeline_cold"] = {
        "value": round(events.num_rows / first, 1),
        "unit": "search events/s",
        "distinct": distinct,
    }
    figures["pipeline_cached"] = {"value": round(events.num_rows / second, 1), "unit": "search events/s"}
    figures["target_cpu"] = {
        "target": TARGET_CPU_QPS,
        "best": round(best, 1),
        "met": bool(best >= TARGET_CPU_QPS),
        "unit": "queries/s (embed + category)",
    }
    return rows, figures


# -- GPU ------------------------------------------------------------------------------------


class FP8Linear(torch.nn.Module):
    """W8A8 FP8 (e4m3) linear layer: per-tensor weight scale, dynamic per-tensor activation scale."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        self.weight_scale = (weight.abs().max() / 448.0).clamp(min=1e-12).reshape(())
        # _scaled_mm wants the second operand column-major: store W (out, in) and pass W.t().
        self.weight = (weight / self.weight_scale).to(torch.float8_e4m3fn)
        self.bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        scale = (flat.abs().max().float() / 448.0).clamp(min=1e-12).reshape(())
        quantized = (flat.float() / scale).to(torch.float8_e4m3fn)
        out = torch._scaled_mm(
            quantized,
            self.weight.t(),
            scale_a=scale,
            scale_b=self.weight_scale,
            bias=self.bias,
            out_dtype=torch.bfloat16,
        )
        return out.reshape(*shape[:-1], -1)


def to_fp8(module: torch.nn.Module) -> torch.nn.Module:
    for name, child in module.named_children():
        if isinstance(child, torch.nn.Linear):
            setattr(module, name, FP8Linear(child))
        else:
            to_fp8(child)
    return module


def gpu_encoder_cases(quick: bool) -> tuple[list[list[Any]], dict[str, Any]]:
    from features.queries.encoder import MiniLMEncoder
    from features.queries.vllm_backend import fp8_supported

    capability = torch.cuda.get_device_capability()
    queries, topics = simulator_queries(40 if quick else 200)
    queries = (queries * (4 if quick else 20))[: 20_000 if quick else 100_000]
    figures: dict[str, Any] = {"device": torch.cuda.get_device_name(), "capability": list(capability)}
    encoder = MiniLMEncoder(batch_size=1024, device="cuda", dtype=torch.bfloat16)
    rows: list[list[Any]] = []

    def run(enc: MiniLMEncoder) -> tuple[NDArray[Any], float]:
        enc.encode(queries[:2048])
        torch.cuda.synchronize()
        started = time.perf_counter()
        vectors = enc.encode(queries)
        torch.cuda.synchronize()
        return vectors, len(queries) / (time.perf_counter() - started)

    bf16_vectors, bf16_qps = run(encoder)
    rows.append(["GPU encoder bf16", len(queries), bf16_qps, "", ""])
    figures["encoder_bf16"] = {"value": round(bf16_qps, 1), "unit": "queries/s"}
    if not fp8_supported(capability):
        figures["encoder_fp8"] = {"skipped": f"compute capability {capability} < 8.9: no FP8 matmul"}
        return rows, figures
    to_fp8(encoder.model)
    fp8_vectors, fp8_qps = run(encoder)
    cosine = np.einsum("ij,ij->i", fp8_vectors, bf16_vectors)
    backend = CPUBackend(QueryFeatureSettings())  # category centroids (fp32, CPU)
    same = float(np.mean(backend.classify(fp8_vectors)[0] == backend.classify(bf16_vectors)[0]))
    rows.append(
        [
            "GPU encoder FP8 (W8A8)",
            len(queries),
            fp8_qps,
            f"{fp8_qps / bf16_qps:.2f}x",
            f"category = bf16 {same:.2%}; cosine min {cosine.min():.4f}",
        ]
    )
    figures["encoder_fp8"] = {
        "value": round(fp8_qps, 1),
        "unit": "queries/s",
        "speedup_vs_bf16": round(fp8_qps / bf16_qps, 3),
        "category_agreement_with_bf16": round(same, 4),
        "cosine_with_bf16_min": round(float(cosine.min()), 5),
        "cosine_with_bf16_mean": round(float(cosine.mean()), 6),
    }
    return rows, figures


def vllm_worker(precision: str, out: Path, quick: bool) -> None:
    """One precision in its own process: generate features and relevance labels, record timings."""
    from features.queries.factory import gold_pairs
    from features.queries.vllm_backend import VLLMBackend

    settings = load_settings().queries
    queries, _ = simulator_queries(10 if quick else 60)
    backend = VLLMBackend(settings, precision=precision)  # type: ignore[arg-type]
    backend.generate(queries[:32])  # warm-up: CUDA graphs, grammar compilation
    batch, seconds = timed(backend.generate, queries)
    gold = gold_pairs()
    verdicts, judge_seconds = timed(backend.judge, [(p.query, p.ad) for p in gold], 1)
    out.write_text(
        json.dumps(
            {
                "precision": precision,
                "queries": len(queries),
                "qps": len(queries) / seconds,
                "categories": {r.query: r.category for r in batch.records},
                "intent": {r.query: r.commercial_intent for r in batch.records},
                "rejected": dict(batch.rejections.counts),
                "relevance": [v[0].label if hasattr(v[0], "label") else None for v in verdicts],
                "pairs_per_s": len(gold) / judge_seconds,
            }
        )
    )


def gpu_vllm_cases(quick: bool) -> tuple[list[list[Any]], dict[str, Any]]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("bf16", "fp8"):
            out = Path(tmp) / f"{precision}.json"
            command = [sys.executable, __file__, "--vllm-worker", precision, "--worker-out", str(out)]
            subprocess.run(command + (["--quick"] if quick else []), check=True, env=os.environ.copy())
            results[precision] = json.loads(out.read_text())
    bf16, fp8 = results["bf16"], results["fp8"]
    common = sorted(set(bf16["categories"]) & set(fp8["categories"]))
    agreement = (
        float(np.mean([bf16["categories"][q] == fp8["categories"][q] for q in common])) if common else 0.0
    )
    labels = float(np.mean([a == b for a, b in zip(bf16["relevance"], fp8["relevance"], strict=True)]))
    speedup = fp8["qps"] / bf16["qps"]
    rows = [
        ["vLLM bf16: query features", bf16["queries"], bf16["qps"], "", f"rejected {bf16['rejected']}"],
        [
            "vLLM FP8: query features",
            fp8["queries"],
            fp8["qps"],
            f"{speedup:.2f}x",
            f"category = bf16 {agreement:.2%}; relevance = bf16 {labels:.2%}",
        ],
    ]
    figures = {
        "vllm_bf16": {
            "value": round(bf16["qps"], 2),
            "unit": "queries/s",
            "pairs_per_s": round(bf16["pairs_per_s"], 2),
        },
        "vllm_fp8": {
            "value": round(fp8["qps"], 2),
            "unit": "queries/s",
            "pairs_per_s": round(fp8["pairs_per_s"], 2),
        },
        "fp8_speedup": {
            "value": round(speedup, 3),
            "target": TARGET_FP8_SPEEDUP,
            "met": speedup >= TARGET_FP8_SPEEDUP,
        },
        "category_agreement": {
            "value": round(agreement, 4),
            "target": TARGET_AGREEMENT,
            "met": agreement >= TARGET_AGREEMENT,
        },
        "relevance_label_agreement": {"value": round(labels, 4)},
    }
    return rows, figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="A smaller run (about a minute).")
    parser.add_argument("--vllm-worker", choices=["bf16", "fp8"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.vllm_worker:
        vllm_worker(args.vllm_worker, args.worker_out, args.quick)
        return
    torch.set_num_threads(QueryFeatureSettings().torch_threads or torch.get_num_threads())
    rows, figures = cpu_cases(args.quick)
    payload: dict[str, Any] = {"quick": args.quick, "cpu": figures}
    if torch.cuda.is_available():
        gpu_rows, gpu = gpu_encoder_cases(args.quick)
        rows += gpu_rows
        settings = load_settings().queries
        try:
            import vllm  # noqa: F401

            has_vllm = True
        except ImportError:
            has_vllm = False
        if has_vllm and settings.model_path:
            vllm_rows, vllm_figures = gpu_vllm_cases(args.quick)
            rows += vllm_rows
            gpu.update(vllm_figures)
        else:
            gpu["vllm"] = {"skipped": "vllm not installed or ADREACH_QUERIES__MODEL_PATH not set"}
        payload["gpu"] = gpu
    else:
        note = "no CUDA GPU on this machine: the GPU comparison (bf16 vs FP8) was not run"
        print(note)
        payload["gpu"] = {"available": False, "note": note}
    print_table(["case", "items", "per second", "vs", "notes"], rows)
    payload["versions"] = versions("torch", "feast", "vllm")
    payload["note"] = "CPU figures on a shared 2-core VM (other jobs running); see machine.cpu_calibration."
    path = write_results("query_features", payload, quick=args.quick)
    target = figures["target_cpu"]
    print(
        f"CPU embed + category: best {target['best']:,.0f} queries/s (target {TARGET_CPU_QPS:,.0f}: "
        f"{'met' if target['met'] else 'not met'}); results: {path}"
    )


if __name__ == "__main__":
    main()
