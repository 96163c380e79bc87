"""Reach query latency: in-process and over HTTP, for a 1M-user sample; queries/s on one core.

The sample is built from a simulated population of 2M users at a 50% sample rate, so it
holds ~1M sampled users (``--quick``: 200k users, ~100k sampled). Queries are the random
targeting mix of ``reach_accuracy.py`` (1-4 criteria, negations, disjunctions, minority
criteria), each sent as JSON, so parsing and validation are part of every timing.

Cases:

* ``in-process``: ``ReachForecaster.estimate`` on one shard in this process; queries/s is
  the sequential rate on one core (the shard is single-threaded);
* ``in-process, horizon 7 d``: the same with ``horizon_days`` (per-user sums);
* ``in-process, 2 shards``: the aggregator fanning out to two shard processes;
* ``HTTP``: ``adreach reach serve`` in a separate process, one keep-alive client
  sending requests one after another.

Targets (issue 5): p99 < 5 ms in-process, < 20 ms over HTTP, >= 1000 queries/s.
Usage: ``python benchmarks/reach_latency.py [--quick] [--users N] [--rate R] [--queries Q]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from common import print_table, versions, write_results
from reach_accuracy import QueryMaker, make_population

from estimation import ReachForecaster, build_sample
from infra.settings import ReachSettings

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"in-process p99 ms": 5.0, "HTTP p99 ms": 20.0, "queries/s": 1000.0}


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _percentiles(samples: list[float]) -> dict[str, float]:
    ms = np.asarray(samples) * 1000
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "qps": float(1000 / ms.mean()),
    }


def time_calls(call: Any, queries: list[dict[str, Any]], warmup: int = 50) -> dict[str, float]:
    for q in queries[:warmup]:
        call(q)
    samples = []
    for q in queries:
        t0 = time.perf_counter()
        call(q)
        samples.append(time.perf_counter() - t0)
    return _percentiles(samples)


def run(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="reach-latency-"))
    table = make_population(args.users, seed=5)
    settings = ReachSettings(sample_rate=args.rate, seed=1)
    report = build_sample(table, work / "sample", settings)
    print(report.describe())
    del table
    maker = QueryMaker_from(work / "sample")
    queries = [maker.query()[0] for _ in range(args.queries)]
    results: dict[str, dict[str, float]] = {}
    with ReachForecaster.open(work / "sample", settings=settings) as reach:
        info = reach.info()["shards"][0]
        results["in-process"] = time_calls(lambda q: reach.estimate(q), queries)
        results["in-process, horizon 7 d"] = time_calls(lambda q: reach.estimate(q, horizon_days=7), queries)
    with ReachForecaster.open(work / "sample", shards=2, settings=settings) as reach:
        results["in-process, 2 shards"] = time_calls(lambda q: reach.estimate(q), queries)
    results["HTTP"] = http_latency(work / "sample", queries)
    rows = [
        [name, f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['mean_ms']:.2f}", f"{r['qps']:,.0f}"]
        for name, r in results.items()
    ]
    print()
    print_table(["case", "p50 ms", "p99 ms", "mean ms", "queries/s"], rows)
    checks = [
        (
            "in-process p99 < 5 ms",
            results["in-process"]["p99_ms"] < 5.0,
            f"{results['in-process']['p99_ms']:.2f} ms",
        ),
        ("HTTP p99 < 20 ms", results["HTTP"]["p99_ms"] < 20.0, f"{results['HTTP']['p99_ms']:.2f} ms"),
        (
            "queries/s on one core >= 1000",
            results["in-process"]["qps"] >= 1000,
            f"{results['in-process']['qps']:,.0f}",
        ),
    ]
    print()
    print_table(["target", "met", "value"], [[c, "yes" if ok else "NO", v] for c, ok, v in checks])
    payload = {
        "config": {
            "population": report.population,
            "sample_rate": args.rate,
            "sample_users": info["sample_users"],
            "index_bytes": info["index_bytes"],
            "queries": len(queries),
            "quick": args.quick,
        },
        "cases": {
            name: {
                "p50": {"value": r["p50_ms"], "unit": "ms"},
                "p99": {"value": r["p99_ms"], "unit": "ms"},
                "mean": {"value": r["mean_ms"], "unit": "ms"},
                "throughput": {"value": r["qps"], "unit": "queries/s"},
            }
            for name, r in results.items()
        },
        "targets": [{"target": c, "met": ok, "value": v} for c, ok, v in checks],
        "versions": versions("numpy", "pyarrow", "fastapi", "uvicorn"),
    }
    path = write_results("reach_latency", payload, quick=args.quick)
    print(f"\nwrote {path}")


def QueryMaker_from(sample: Path) -> QueryMaker:  # noqa: N802 - reads like the class it builds
    """The accuracy benchmark's query generator, over the sampled users' values."""
    import pyarrow.parquet as pq

    return QueryMaker(pq.read_table(sample / "sample.parquet"), np.random.default_rng(99))


def http_latency(sample: Path, queries: list[dict[str, Any]]) -> dict[str, float]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADREACH_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    server = subprocess.Popen(
        [sys.executable, "-m", "infra.cli", "reach", "serve", "--sample", str(sample), "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    client.get("/v1/reach/health")
                    break
                except httpx.HTTPError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        output = server.stderr.read() if server.stderr else b""
                        raise RuntimeError(f"server did not start: {output!r}") from None
                    time.sleep(0.2)

            def call(q: dict[str, Any]) -> None:
                response = client.post("/v1/reach", json={"targeting": q})
                response.raise_for_status()

            return time_calls(call, queries)
    finally:
        server.terminate()
        server.wait(timeout=20)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="200k users (a ~100k-user sample)")
    parser.add_argument("--users", type=int, default=None)
    parser.add_argument("--rate", type=float, default=0.5)
    parser.add_argument("--queries", type=int, default=None)
    args = parser.parse_args()
    args.users = args.users or (200_000 if args.quick else 2_000_000)
    args.queries = args.queries or (500 if args.quick else 2000)
    run(args)


if __name__ == "__main__":
    main()
