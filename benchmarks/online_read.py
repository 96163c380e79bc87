"""Online feature reads and writes: Feast's SDK vs adreach's fast reader/writer, same store.

Cases, for the ``user_activity`` view (34 features: 20 int64, 12 double, 2 lists of 20
ad ids), on Feast's SQLite online store and on Redis:

* read latency, p50 and p99, for 1 entity and for 100 entities per request, through
  ``FeatureStore.get_online_features`` (all 34 features, ``to_dict()``) and through
  ``OnlineFeatureReader.read`` (all 34 features, a ``pyarrow.Table``);
* write throughput in entity rows/s: ``FeatureStore.write_to_online_store`` (a DataFrame
  built beforehand, so Feast is not charged for it) vs ``OnlineFeatureWriter.write``
  (Arrow), in batches of ``BATCH`` rows like the stream engine's micro-batches; then the
  same rows updated the way the stream engine writes an impression (``CHANGED_COLUMN``:
  its impression counts, spend and click-through rates, 12 of the 34 features, and the
  timestamp); on Redis both writes again with the Arrow encoders instead of the compiled
  writer (``features/_resp.c``), which write the same bytes.

Feast publishes 1.70 ms p99 for one precomputed row and 114 ms for 100 rows (its Python
feature server); both are printed next to the figures measured here.

Usage: ``python benchmarks/online_read.py [--quick] [--redis HOST:PORT]``. The Redis case
uses a fresh project on the server (default the local one) and deletes its keys afterwards.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from common import print_table, versions, write_results

from features.definitions import FEATURE_GROUPS
from features.feast_objects import arrow_schema
from features.online import CHANGED_COLUMN, COMPILED_RESP_AVAILABLE, OnlineFeatureReader, OnlineFeatureWriter
from features.store import open_store
from infra.settings import Settings, load_settings

GROUP = next(g for g in FEATURE_GROUPS if g.name == "user_activity")
FEAST_P99_1_MS = 1.70
FEAST_100_MS = 114.0
BATCH = 10_000


def make_rows(keys: list[str], seed: int) -> pa.Table:
    """Realistic values: counts, sums and ratios, and last-20 lists of ad ids."""
    rng = np.random.default_rng(seed)
    n = len(keys)
    columns: dict[str, Any] = {
        GROUP.key: pa.array(keys, pa.string()),
        "event_timestamp": pa.array([datetime.now(UTC)] * n, pa.timestamp("us", "UTC")),
    }
    for feature in GROUP.features():
        if feature.type == "int64":
            columns[feature.name] = pa.array(rng.integers(0, 5_000, n), pa.int64())
        elif feature.type == "float64":
            columns[feature.name] = pa.array(rng.random(n) * 100, pa.float64())
        else:
            ids = rng.integers(0, 100_000, (n, 20))
            columns[feature.name] = pa.array([[f"ad{i}" for i in row] for row in ids], pa.list_(pa.string()))
    return pa.table(columns, schema=arrow_schema(GROUP))


IMPRESSION_CHANGES = ("impressions_", "spend_micros_", "ctr_")  # what an impression moves


def as_impression_update(rows: pa.Table) -> pa.Table:
    """``rows`` flagged as the stream engine flags an impression's update (12 of 34 features)."""
    flags = [f.name.startswith(IMPRESSION_CHANGES) for f in GROUP.features()] + [True]  # + timestamp
    mask = np.tile(np.asarray(flags), rows.num_rows)
    return rows.append_column(CHANGED_COLUMN, pa.FixedSizeListArray.from_arrays(pa.array(mask), len(flags)))


def with_created(rows: pa.Table) -> pa.Table:
    """Feast's writer reads the source's created_timestamp column; give it one."""
    return rows.append_column("created_timestamp", rows.column("event_timestamp"))


def latencies_ms(call: Callable[[], object], iterations: int) -> tuple[float, float]:
    for _ in range(min(20, iterations)):  # warm up connections and caches
        call()
    samples = []
    for _ in range(iterations):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return float(np.percentile(samples, 50)), float(np.percentile(samples, 99))


def without_compiled_writer(settings: Settings) -> Settings:
    features = settings.features.model_copy(update={"compiled_redis_writer": False})
    return settings.model_copy(update={"features": features})


def write_case(store: str, path: str, write: Callable[[pa.Table], object], rows: pa.Table) -> dict[str, Any]:
    """Write ``rows`` in batches of BATCH: entity rows/s, and the writer's CPU per row.

    Why the CPU: on Redis the wall-clock rate is mostly the server's time (it runs on the
    other core); the writer's own CPU is what a stream worker's core spends per row.
    """
    started, cpu = time.perf_counter(), time.process_time()
    for start in range(0, rows.num_rows, BATCH):
        write(rows.slice(start, BATCH))
    seconds, cpu_s = time.perf_counter() - started, time.process_time() - cpu
    return {"store": store, "case": "write", "path": path, "rows": rows.num_rows, "seconds": seconds,
            "rows_per_s": rows.num_rows / seconds, "cpu_us_per_row": 1e6 * cpu_s / rows.num_rows}  # fmt: skip


def run_store(name: str, settings: Settings, quick: bool) -> list[dict[str, Any]]:
    n_fast = 20_000 if quick else 100_000
    n_feast = 2_000 if quick else 10_000
    reads_1 = 300 if quick else 2_000
    reads_100 = 60 if quick else 400
    store = open_store(settings, (GROUP,))
    writer = OnlineFeatureWriter(settings, (GROUP,))
    reader = OnlineFeatureReader(settings, (GROUP,))
    results: list[dict[str, Any]] = []
    try:
        print(f"[{name}] writing {n_feast:,} rows through Feast, {n_fast:,} through OnlineFeatureWriter ...")
        feast_rows = with_created(make_rows([f"f{i}" for i in range(n_feast)], seed=1))
        frames = [feast_rows.slice(s, BATCH).to_pandas() for s in range(0, n_feast, BATCH)]
        started, feast_cpu = time.perf_counter(), time.process_time()
        for frame in frames:
            store.write_to_online_store(GROUP.name, frame)
        feast_seconds, feast_cpu_s = time.perf_counter() - started, time.process_time() - feast_cpu
        fast_rows = make_rows([f"u{i}" for i in range(n_fast)], seed=2)
        results.append(
            {"store": name, "case": "write", "path": "Feast write_to_online_store", "rows": n_feast,
             "seconds": feast_seconds, "rows_per_s": n_feast / feast_seconds,
             "cpu_us_per_row": 1e6 * feast_cpu_s / n_feast}
        )  # fmt: skip
        writers = [("OnlineFeatureWriter", writer)]
        if name == "redis" and COMPILED_RESP_AVAILABLE:
            # The same writes with the Arrow encoders instead of the compiled writer (features/_resp.c).
            writers.append(
                (
                    "OnlineFeatureWriter, Arrow encoder",
                    OnlineFeatureWriter(without_compiled_writer(settings), (GROUP,)),
                )
            )
        for seed, (path, fast_writer) in enumerate(writers):

            def write(rows: pa.Table, fast_writer: OnlineFeatureWriter = fast_writer) -> object:
                return fast_writer.write(GROUP, rows)

            update = as_impression_update(make_rows(fast_rows.column(0).to_pylist(), 4 + seed))
            results.append(write_case(name, path, write, fast_rows))
            results.append(write_case(name, f"{path}, an impression's changes", write, update))
            if fast_writer is not writer:
                fast_writer.close()

        features = [f"{GROUP.name}:{f.name}" for f in GROUP.features()]
        rng = np.random.default_rng(3)
        for size, iterations in ((1, reads_1), (100, reads_100)):
            print(f"[{name}] reading {size} entities x {iterations} ...")
            picks = [[f"u{i}" for i in rng.integers(0, n_fast, size)] for _ in range(8)]
            rows_of = [[{GROUP.key: key} for key in keys] for keys in picks]
            turn = iter(range(10**9))

            def feast_read(rows_of: list[Any] = rows_of, turn: Any = turn) -> object:
                entity_rows = rows_of[next(turn) % 8]
                return store.get_online_features(features=features, entity_rows=entity_rows).to_dict()

            def fast_read(picks: list[list[str]] = picks, turn: Any = turn) -> object:
                return reader.read(GROUP, picks[next(turn) % 8])

            check = reader.read(GROUP, picks[0]).column("impressions_1h").to_pylist()
            if (
                check
                != store.get_online_features(features=features, entity_rows=rows_of[0]).to_dict()[
                    "impressions_1h"
                ]
            ):
                raise SystemExit(f"{name}: reader and Feast disagree")
            for path, call in (("Feast get_online_features", feast_read), ("OnlineFeatureReader", fast_read)):
                p50, p99 = latencies_ms(call, iterations)
                results.append(
                    {"store": name, "case": f"read {size}", "path": path, "iterations": iterations,
                     "p50_ms": p50, "p99_ms": p99}
                )  # fmt: skip
    finally:
        writer.close()
        reader.close()
        if name == "redis":
            store.teardown()  # type: ignore[no-untyped-call]  # (Feast leaves it untyped)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller run, about a minute")
    parser.add_argument("--redis", default="127.0.0.1:6379", help="Redis server for the Redis case")
    args = parser.parse_args()

    state = Path(tempfile.mkdtemp(prefix="adreach-bench-online-"))
    results = run_store("sqlite", load_settings(state_dir=state / "sqlite"), args.quick)
    redis_settings = load_settings(
        state_dir=state / "redis",
        features={
            "online_store": "redis",
            "redis_connection": args.redis,
            "project": f"bench_{uuid.uuid4().hex[:8]}",
        },
    )
    results += run_store("redis", redis_settings, args.quick)

    print()
    rows: list[list[Any]] = []
    for store in ("sqlite", "redis"):
        for case in ("read 1", "read 100"):
            feast, fast = (r for r in results if r["store"] == store and r["case"] == case)
            for r in (feast, fast):
                rows.append([store, case, r["path"], r["p50_ms"], r["p99_ms"], feast["p99_ms"] / r["p99_ms"]])
    print_table(["store", "case", "path", "p50 ms", "p99 ms", "p99 speed-up vs Feast"], rows)
    print()
    write_rows = []
    for store in ("sqlite", "redis"):
        writes = [r for r in results if r["store"] == store and r["case"] == "write"]
        feast = writes[0]
        for r in writes:
            write_rows.append([store, r["path"], r["rows"], r["seconds"], r["rows_per_s"],
                               r["rows_per_s"] / feast["rows_per_s"], r["cpu_us_per_row"]])  # fmt: skip
    print_table(
        ["store", "write path", "entity rows", "seconds", "rows/s", "ratio to Feast", "writer CPU µs/row"],
        write_rows,
    )
    best_1 = max(r["p99_ms"] for r in results if r["case"] == "read 1" and r["path"] == "OnlineFeatureReader")
    best_100 = max(
        r["p50_ms"] for r in results if r["case"] == "read 100" and r["path"] == "OnlineFeatureReader"
    )
    print(
        f"\nFeast's published figures: {FEAST_P99_1_MS} ms p99 for 1 row, "
        f"{FEAST_100_MS:.0f} ms for 100 rows. "
        f"OnlineFeatureReader, worst store: {best_1:.2f} ms p99 for 1 entity "
        f"({FEAST_P99_1_MS / best_1:.1f}x better), {best_100:.2f} ms p50 for 100 "
        f"({FEAST_100_MS / best_100:.0f}x better)."
    )

    def measured(r: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"store": r["store"], "case": r["case"], "path": r["path"]}
        if r["case"] == "write":
            out["entity_rows"] = r["rows"]
            out["seconds"] = {"value": round(r["seconds"], 3), "unit": "s"}
            out["throughput"] = {"value": round(r["rows_per_s"]), "unit": "entity rows/s"}
            out["writer_cpu"] = {
                "value": round(r["cpu_us_per_row"], 2),
                "unit": "µs of this process's CPU per row",
            }
        else:
            out["iterations"] = r["iterations"]
            out["p50"] = {"value": round(r["p50_ms"], 3), "unit": "ms"}
            out["p99"] = {"value": round(r["p99_ms"], 3), "unit": "ms"}
        return out

    path = write_results(
        "online_read",
        {
            "feature_view": {"name": GROUP.name, "features": len(list(GROUP.features()))},
            "write_batch_rows": BATCH,
            "redis": args.redis,
            "feast_published": {
                "p99_single_row": {"value": FEAST_P99_1_MS, "unit": "ms"},
                "latency_100_rows": {"value": FEAST_100_MS, "unit": "ms"},
            },
            "results": [measured(r) for r in results],
            "versions": versions("feast", "redis", "pyarrow", "numpy"),
        },
        quick=args.quick,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
