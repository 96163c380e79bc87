"""Reach accuracy: the stratified estimator vs a uniform sample vs theta sketches, against exact.

On a simulated population (2M users; ``--quick``: 200k) with a 10% sample:

* **exact**: DuckDB over the full population table;
* **estimator**: this package (stratified, fuzzy fall-back, exact totals of decided strata);
* **uniform**: the same code with no stratification, i.e. a Bernoulli sample of the same
  expected size and the ratio estimator ``N m / n``;
* **theta k=4096 / k=16384**: one Apache DataSketches update theta sketch per targetable
  value over the *full* population (union for ``in``/``has_any``/``between``,
  intersection for ``and``/``has_all``, A-not-B for ``not``).

Queries are generated at random (seeded) from the fields the simulator writes: 1 to 4
criteria, mostly conjunctions, some disjunctions and negations, and a share that targets
small minorities (a criterion matching < 1% of users, e.g. Iceland, 65+ on connected TV).
Estimator and uniform are run over several hash seeds and pooled. Reported: median and
p90 relative error by segment size and by number of criteria, CI coverage, memory, and
the issue's targets with pass/fail.

Usage: ``python benchmarks/reach_accuracy.py [--quick] [--users N] [--queries Q] [--seeds S]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import datasketches as ds
import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from common import print_table, versions, write_results

from estimation import ReachForecaster, build_sample
from estimation.schema import FieldKind
from estimation.sql import to_sql
from estimation.targeting import (
    And,
    Between,
    Eq,
    Expr,
    HasAll,
    HasAny,
    In,
    Not,
    Or,
    criteria_count,
    numeric_bounds,
    parse_targeting,
)
from infra.settings import ReachSettings
from streams.simulation import SimulationConfig, Simulator, population_table

BUCKETS = [(">=10%", 0.10, 1.01), ("1-10%", 0.01, 0.10), ("0.1-1%", 0.001, 0.01), ("<0.1%", 0.0, 0.001)]
TARGET_P90 = {">=10%": 0.01, "1-10%": 0.03, "0.1-1%": 0.08}
SMALL_COUNTRIES = ["IS", "NO", "PT", "SG", "NZ", "IE", "AR", "ZA"]
THETA_K = {"theta k=4096": 12, "theta k=16384": 14}


# -- data ---------------------------------------------------------------------------------


def make_population(users: int, seed: int) -> pa.Table:
    """The simulator's population (attributes, interests, provider labels, activity)."""
    simulator = Simulator(SimulationConfig(users=users, events=int(users * 1.5), seed=seed))
    try:
        table = population_table(simulator)
    except TypeError:
        # streams.simulation.population_table fails from ~2M users (pa.array of a large
        # unicode NumPy array comes back chunked); build the same columns chunk-safely.
        table = _population_table_large(simulator)
    return table.drop_columns(
        [c for c in ("joined_at", "deleted_at", "search_rate") if c in table.column_names]
    )


def _lists(mask: np.ndarray[Any, Any], names: np.ndarray[Any, Any]) -> pa.ListArray:
    rows, cols = np.nonzero(mask)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=mask.shape[0]))]).astype(np.int32)
    values = pa.DictionaryArray.from_arrays(pa.array(cols.astype(np.int32)), pa.array(list(names)))
    return pa.ListArray.from_arrays(pa.array(offsets), values.dictionary_decode())


def _population_table_large(simulator: Simulator) -> pa.Table:
    from streams.simulation.population import AGE_BANDS, COUNTRIES, DEVICES, GENDERS
    from streams.simulation.topics import SEGMENTS

    pop = simulator.population
    labels = simulator.labels
    names = np.empty(labels.shape, dtype=object)
    vocab: list[str] = []
    for k, spec in enumerate(simulator.provider_specs):
        values = [f"{spec.provider}.{spec.attribute}.{label}" for label in spec.labels]
        names[:, k] = (len(vocab) + np.maximum(labels[:, k], 0)).astype(np.int64)
        vocab += values
    provider_mask = np.zeros((len(pop), len(vocab)), dtype=bool)
    user, col = np.nonzero(labels >= 0)
    provider_mask[user, names[user, col].astype(np.int64)] = True

    def strings(codes: np.ndarray[Any, Any], categories: np.ndarray[Any, Any]) -> pa.Array:
        return pa.DictionaryArray.from_arrays(
            pa.array(np.asarray(codes, dtype=np.int32)), pa.array([str(c) for c in categories])
        ).dictionary_decode()

    def objects(values: np.ndarray[Any, Any]) -> pa.Array:
        uniques, codes = np.unique(values.astype(str), return_inverse=True)
        return strings(codes, uniques)

    return pa.table(
        {
            "user_id": pop.user_ids,
            "country": strings(pop.country, COUNTRIES),
            "region": objects(pop.region),
            "age": pa.array(pop.age, pa.int32()),
            "age_band": strings(pop.age_band, AGE_BANDS),
            "gender": strings(pop.gender, GENDERS),
            "device": strings(pop.device, DEVICES),
            "os": objects(pop.os),
            "language": objects(pop.language),
            "interests": _lists(pop.interests, np.array(SEGMENTS)),
            "provider_segments": _lists(provider_mask, np.array(vocab)),
            "activity_rate": pop.activity_rate,
        }
    )


class QueryMaker:
    """Random targeting expressions over the simulator's fields (seeded)."""

    def __init__(self, table: pa.Table, rng: np.random.Generator) -> None:
        self.rng = rng
        self.values: dict[str, list[str]] = {}
        self.weights: dict[str, np.ndarray[Any, Any]] = {}
        for name in ("country", "region", "age_band", "gender", "device", "os", "language"):
            counts = pc.value_counts(table.column(name)).to_pylist()
            self._set(name, [c["values"] for c in counts], [c["counts"] for c in counts])
        for name in ("interests", "provider_segments"):
            counts = pc.value_counts(pc.list_flatten(table.column(name))).to_pylist()
            self._set(name, [c["values"] for c in counts], [c["counts"] for c in counts])

    def _set(self, name: str, values: list[str], counts: list[int]) -> None:
        weights = np.sqrt(np.asarray(counts, dtype=float))  # favour common values, keep rare ones
        self.values[name] = values
        self.weights[name] = weights / weights.sum()

    def pick(self, name: str, k: int = 1) -> list[str]:
        idx = self.rng.choice(
            len(self.values[name]), size=min(k, len(self.values[name])), replace=False, p=self.weights[name]
        )
        return [self.values[name][i] for i in idx]

    def leaf(self) -> dict[str, Any]:
        kind = self.rng.choice(10, p=[0.14, 0.05, 0.06, 0.13, 0.07, 0.09, 0.08, 0.05, 0.2, 0.13])
        if kind == 0:
            return {"field": "country", "eq": self.pick("country")[0]}
        if kind == 1:
            return {"field": "country", "in": self.pick("country", int(self.rng.integers(2, 4)))}
        if kind == 2:
            return {"field": "region", "eq": self.pick("region")[0]}
        if kind == 3:
            low = int(self.rng.integers(18, 70))
            return {"field": "age", "between": [low, low + int(self.rng.integers(2, 20))]}
        if kind == 4:
            return {"field": "gender", "eq": self.pick("gender")[0]}
        if kind == 5:
            return {"field": "device", "eq": self.pick("device")[0]}
        if kind == 6:
            return {"field": "os", "eq": self.pick("os")[0]}
        if kind == 7:
            return {"field": "language", "eq": self.pick("language")[0]}
        if kind == 8:
            op = "has_any" if self.rng.random() < 0.6 else "has_all"
            return {"field": "interests", op: self.pick("interests", int(self.rng.integers(1, 3)))}
        return {"field": "provider_segments", "has_any": self.pick("provider_segments")}

    def minority_leaf(self) -> dict[str, Any]:
        choice = self.rng.integers(4)
        if choice == 0:
            return {"field": "country", "eq": str(self.rng.choice(SMALL_COUNTRIES))}
        if choice == 1:
            return {"and": [{"field": "age_band", "eq": "65+"}, {"field": "device", "eq": "ctv"}]}
        if choice == 2:
            return {"field": "gender", "eq": "unknown"}
        return {"and": [{"field": "device", "eq": "tablet"}, {"field": "age", "between": [18, 21]}]}

    def query(self) -> tuple[dict[str, Any], bool]:
        minority = self.rng.random() < 0.25
        n = int(self.rng.choice([1, 2, 3, 4], p=[0.25, 0.3, 0.3, 0.15]))
        leaves = [self.leaf() for _ in range(n - 1 if minority else n)]
        if minority:
            leaves.insert(0, self.minority_leaf())
        if len(leaves) >= 2 and self.rng.random() < 0.15:
            leaves = [{"or": leaves[:2]}, *leaves[2:]]
        if len(leaves) >= 2 and self.rng.random() < 0.15:
            leaves[-1] = {"not": leaves[-1]}
        return ({"and": leaves} if len(leaves) > 1 else leaves[0]), minority


# -- theta sketches ---------------------------------------------------------------------------


class ThetaIndex:
    """One update theta sketch per (field, value) over the full population, built lazily."""

    def __init__(self, table: pa.Table, lg_k: int) -> None:
        self.table = table
        self.lg_k = lg_k
        self.sketches: dict[tuple[str, Any], Any] = {}
        self.universe = self._sketch(np.arange(table.num_rows))

    def _sketch(self, rows: np.ndarray[Any, Any]) -> Any:
        sketch = ds.update_theta_sketch(self.lg_k)
        update = sketch.update
        for row in rows.tolist():
            update(row)
        return sketch.compact()

    def value(self, field: str, value: Any) -> Any:
        key = (field, value)
        if key not in self.sketches:
            column = self.table.column(field)
            if pa.types.is_list(column.type):
                flat = pc.list_flatten(column)
                parents = pc.list_parent_indices(column).to_numpy()
                rows = np.unique(parents[pc.equal(flat, value).to_numpy(zero_copy_only=False)])
            else:
                rows = np.flatnonzero(pc.equal(column, value).to_numpy(zero_copy_only=False))
            self.sketches[key] = self._sketch(rows)
        return self.sketches[key]

    def ages(self) -> list[int]:
        return sorted(set(self.table.column("age").to_numpy().tolist()))

    def evaluate(self, expr: Expr) -> Any:
        if isinstance(expr, And):
            if not expr.children:
                return self.universe
            inter = ds.theta_intersection()
            for child in expr.children:
                inter.update(self.evaluate(child))
            return inter.get_result()
        if isinstance(expr, Or):
            return self._union([self.evaluate(c) for c in expr.children])
        if isinstance(expr, Not):
            return ds.theta_a_not_b().compute(self.universe, self.evaluate(expr.child))
        if isinstance(expr, Eq):
            return self.value(expr.field, _arrow_value(expr.field, expr.value))
        if isinstance(expr, (In, HasAny)):
            return self._union([self.value(expr.field, _arrow_value(expr.field, v)) for v in expr.values])
        if isinstance(expr, HasAll):
            inter = ds.theta_intersection()
            for v in expr.values:
                inter.update(self.value(expr.field, v))
            return inter.get_result()
        assert isinstance(expr, Between)
        low, high = numeric_bounds(expr, FieldKind.INTEGER)
        ages = [a for a in self.ages() if low <= a <= high]
        return self._union([self.value(expr.field, pa.scalar(a, pa.int32())) for a in ages])

    def _union(self, sketches: list[Any]) -> Any:
        union = ds.theta_union(self.lg_k)
        for sketch in sketches:
            union.update(sketch)
        return union.get_result()

    def memory_bytes(self) -> int:
        return sum(len(s.serialize()) for s in self.sketches.values()) + len(self.universe.serialize())


def _arrow_value(field: str, value: Any) -> Any:
    return pa.scalar(value, pa.int32()) if field == "age" else value


# -- evaluation --------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="reach-accuracy-"))
    started = time.perf_counter()
    table = make_population(args.users, seed=11)
    n = table.num_rows
    print(f"population: {n:,} users ({time.perf_counter() - started:.1f} s)")
    rng = np.random.default_rng(2024)
    maker = QueryMaker(table, rng)
    raw = [maker.query() for _ in range(args.queries)]
    con = duckdb.connect()
    con.register("pop", table)
    queries: list[dict[str, Any]] = []
    for targeting, minority in raw:
        expr = parse_targeting(targeting)
        row = con.execute(f"SELECT count(*) FROM pop WHERE {to_sql(expr)}").fetchone()
        exact = int(row[0]) if row else 0
        if exact > 0:
            queries.append(
                {
                    "targeting": targeting,
                    "expr": expr,
                    "exact": exact,
                    "minority": minority,
                    "criteria": criteria_count(expr),
                    "conjunctive": _conjunctive(expr),
                }
            )
    print(f"queries: {len(queries)} with a non-empty exact answer ({time.perf_counter() - started:.1f} s)")

    methods: dict[str, dict[str, Any]] = {}
    for name, strata in (("estimator", None), ("uniform", [])):
        errors, covered, memory, sizes, build_s = [], [], [], [], []
        for seed in range(args.seeds):
            settings = ReachSettings(sample_rate=args.rate, seed=seed, strata_fields=strata)
            t0 = time.perf_counter()
            report = build_sample(table, work / f"{name}-{seed}", settings)
            build_s.append(time.perf_counter() - t0)
            if seed == 0:
                print(f"{name}: {report.strata} strata over {report.strata_fields}; {report.reason}")
            with ReachForecaster.open(work / f"{name}-{seed}", settings=settings) as reach:
                info = reach.info()["shards"][0]
                memory.append(info["index_bytes"])
                sizes.append(info["sample_users"])
                for q in queries:
                    answer = reach.estimate(q["expr"])
                    errors.append(abs(answer.reach - q["exact"]) / q["exact"])
                    covered.append(answer.ci95[0] <= q["exact"] <= answer.ci95[1])
        methods[name] = {
            "errors": np.asarray(errors).reshape(args.seeds, len(queries)),
            "covered": np.asarray(covered).reshape(args.seeds, len(queries)),
            "memory_bytes": int(np.mean(memory)),
            "sample_users": int(np.mean(sizes)),
            "build_s": float(np.mean(build_s)),
        }
        print(f"{name}: done ({time.perf_counter() - started:.1f} s)")
    if not args.no_theta:
        for name, lg_k in THETA_K.items():
            t0 = time.perf_counter()
            index = ThetaIndex(table, lg_k)
            errors, covered = [], []
            for q in queries:
                result = index.evaluate(q["expr"])
                estimate = result.get_estimate()
                errors.append(abs(estimate - q["exact"]) / q["exact"])
                covered.append(result.get_lower_bound(2) <= q["exact"] <= result.get_upper_bound(2))
            methods[name] = {
                "errors": np.asarray(errors)[None, :],
                "covered": np.asarray(covered)[None, :],
                "memory_bytes": index.memory_bytes(),
                "sample_users": None,
                "build_s": time.perf_counter() - t0,
            }
            print(f"{name}: done ({time.perf_counter() - started:.1f} s)")
    return report_results(args, n, queries, methods, time.perf_counter() - started)


def _conjunctive(expr: Expr) -> bool:
    if isinstance(expr, And):
        return all(_conjunctive(c) for c in expr.children)
    return isinstance(expr, (Eq, In, Between, HasAny, HasAll))


def _stats(values: np.ndarray[Any, Any]) -> dict[str, float | int]:
    if values.size == 0:
        return {"median": float("nan"), "p90": float("nan"), "n": 0}
    return {"median": float(np.median(values)), "p90": float(np.quantile(values, 0.9)), "n": int(values.size)}


def report_results(
    args: argparse.Namespace,
    n: int,
    queries: list[dict[str, Any]],
    methods: dict[str, dict[str, Any]],
    seconds: float,
) -> dict[str, Any]:
    share = np.array([q["exact"] / n for q in queries])
    criteria = np.array([q["criteria"] for q in queries])
    minority = np.array([q["minority"] for q in queries])
    conj3 = np.array([q["conjunctive"] and q["criteria"] >= 3 for q in queries])
    groups: dict[str, np.ndarray[Any, Any]] = {}
    for label, low, high in BUCKETS:
        groups[f"size {label}"] = (share >= low) & (share < high)
    groups["1 criterion"] = criteria == 1
    groups["2 criteria"] = criteria == 2
    groups["3+ criteria"] = criteria >= 3
    groups["3+ AND-only"] = conj3
    groups["minority-targeted"] = minority
    groups["all"] = np.ones(len(queries), dtype=bool)
    table_rows = []
    figures: dict[str, Any] = {}
    for group, mask in groups.items():
        row: list[Any] = [group, int(mask.sum())]
        figures[group] = {"queries": int(mask.sum())}
        for name, m in methods.items():
            stats = _stats(m["errors"][:, mask].ravel())
            cov = float(m["covered"][:, mask].mean()) if mask.any() else float("nan")
            figures[group][name] = {
                "median_rel_error": {"value": stats["median"], "unit": "fraction"},
                "p90_rel_error": {"value": stats["p90"], "unit": "fraction"},
                "ci_coverage": {"value": cov, "unit": "fraction"},
            }
            row += [f"{stats['median']:.2%}", f"{stats['p90']:.2%}", f"{cov:.0%}"]
        table_rows.append(row)
    headers = ["group", "queries"]
    for name in methods:
        headers += [f"{name} med", "p90", "cov"]
    print()
    print_table(headers, table_rows)
    print()
    mem_rows = [
        [name, m["sample_users"] or "-", f"{m['memory_bytes'] / 2**20:.1f}", f"{m['build_s']:.1f}"]
        for name, m in methods.items()
    ]
    print_table(["method", "sample users", "memory MiB", "build s"], mem_rows)

    est, uni = methods["estimator"], methods["uniform"]
    checks: list[tuple[str, bool, str]] = []
    for label, _, _ in BUCKETS:
        mask = groups[f"size {label}"]
        if not mask.any():
            continue
        p90 = _stats(est["errors"][:, mask].ravel())["p90"]
        p90_uni = _stats(uni["errors"][:, mask].ravel())["p90"]
        if label in TARGET_P90:
            checks.append((f"p90 {label} <= {TARGET_P90[label]:.0%}", p90 <= TARGET_P90[label], f"{p90:.2%}"))
        checks.append((f"lower p90 than uniform, {label}", p90 < p90_uni, f"{p90:.2%} vs {p90_uni:.2%}"))
    mask = groups["minority-targeted"]
    med, med_u = (
        _stats(est["errors"][:, mask].ravel())["median"],
        _stats(uni["errors"][:, mask].ravel())["median"],
    )
    p90, p90_u = _stats(est["errors"][:, mask].ravel())["p90"], _stats(uni["errors"][:, mask].ravel())["p90"]
    checks.append(
        (
            "minority queries: >= 2x lower median error than uniform",
            med_u >= 2 * med,
            f"{med_u / max(med, 1e-12):.2f}x",
        )
    )
    checks.append(
        (
            "minority queries: >= 2x lower p90 error than uniform",
            p90_u >= 2 * p90,
            f"{p90_u / max(p90, 1e-12):.2f}x",
        )
    )
    if "theta k=16384" in methods and conj3.any():
        ours = _stats(est["errors"][:, conj3].ravel())
        theta = _stats(methods["theta k=16384"]["errors"][:, conj3].ravel())
        checks.append(
            (
                "3+ AND criteria: lower median error than theta k=16384",
                ours["median"] < theta["median"],
                f"{ours['median']:.2%} vs {theta['median']:.2%}",
            )
        )
        checks.append(
            (
                "3+ AND criteria: lower p90 error than theta k=16384",
                ours["p90"] < theta["p90"],
                f"{ours['p90']:.2%} vs {theta['p90']:.2%}",
            )
        )
    coverage = float(est["covered"].mean())
    checks.append(("CI coverage within 93-97%", 0.93 <= coverage <= 0.97, f"{coverage:.1%}"))
    print()
    print_table(["target", "met", "value"], [[c, "yes" if ok else "NO", v] for c, ok, v in checks])
    payload = {
        "config": {
            "users": n,
            "sample_rate": args.rate,
            "queries": len(queries),
            "seeds": args.seeds,
            "quick": args.quick,
        },
        "groups": figures,
        "memory": {
            name: {"value": m["memory_bytes"], "unit": "bytes", "sample_users": m["sample_users"]}
            for name, m in methods.items()
        },
        "targets": [{"target": c, "met": ok, "value": v} for c, ok, v in checks],
        "seconds": {"value": round(seconds, 1), "unit": "s"},
        "versions": versions("numpy", "pyarrow", "duckdb", "datasketches"),
    }
    path = write_results("reach_accuracy", payload, quick=args.quick)
    print(f"\nwrote {path}")
    return payload


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="200k users, fewer queries and seeds")
    parser.add_argument("--users", type=int, default=None)
    parser.add_argument("--queries", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument("--no-theta", action="store_true")
    args = parser.parse_args()
    args.users = args.users or (200_000 if args.quick else 2_000_000)
    args.queries = args.queries or (200 if args.quick else 400)
    args.seeds = args.seeds or (2 if args.quick else 3)
    run(args)


if __name__ == "__main__":
    main()
