"""Strata: which attributes to stratify on, stratum keys, and the fuzzy fall-back allocation.

Following Jalali et al. (ICDM workshops 2013), strata are the value combinations of a few
attributes chosen from the *dependency structure* of the data: attributes whose values
say a lot about other attributes (and about list memberships such as interests) are the
ones whose exact totals improve every correlated estimate. We measure dependency with the
symmetric uncertainty ``SU(a, b) = 2 I(a; b) / (H(a) + H(b))``, draw an edge where it is
at least :data:`DEPENDENCY_THRESHOLD`, and pick a greedy weighted vertex cover of that
graph (the paper's minimum vertex cover), within a strata budget, in order of importance.

Sampling is proportional (one rate for all strata) except for *unstable* strata whose
expected sample is below the stability threshold ``t`` (the paper's threshold ~ N/n).
They get the fuzzy fall-back:

* ``boost``: sample them at ``min(1, t / N_h)``, and lower the base rate so that the
  total expected sample stays ``rate x N`` (so comparisons at equal size are fair);
* ``merge``: fold them together along the least important attribute (its code becomes
  "any"), then the next least important, until the merged stratum is stable; what is
  still unstable at the top is boosted.

Weights stay unbiased because every estimate is post-stratified on the final strata
(``N_h / n_h`` within each), whatever rate each stratum got.

A stratum key is a mixed-radix integer over the attributes' codes. Each attribute has its
build-time levels ``0..L-1`` plus three codes: ``NULL`` (missing), ``OTHER`` (a value
unseen at build, arriving by streaming) and ``ANY`` (merged away). Keys are the same on
every shard, so partial answers are merged by key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray

from estimation.schema import FieldKind, Schema, normalize_column
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
    numeric_bounds,
    numeric_values,
)

DEPENDENCY_THRESHOLD = 0.02
REDUNDANT = 0.5  # SU at which one attribute stands in for another
MAX_LEVELS = 64
INTEGER_LEVELS = 16
NUMERIC_BINS = 4
LIST_INDICATORS = 8
MIN_MEAN_STRATUM_SAMPLE = 2.0  # mean expected sampled users per stratum, in units of the threshold
BOOST_SHARE = 0.3  # at most this share of the sample may go to boosting unstable strata
ANALYSIS_ROWS = 200_000

Fallback = Literal["boost", "merge"]


class StrataError(ValueError):
    """The stratification cannot be built as asked (unknown attribute, too many strata, ...)."""


@dataclass(frozen=True)
class StratAttr:
    """One stratification attribute: either a value per level or numeric bins.

    For ``bins``, level ``i`` holds values ``edges[i-1] <= v < edges[i]`` (first and last
    open-ended); integer bins hold the whole numbers in that half-open range.
    """

    name: str
    kind: FieldKind
    levels: tuple[Any, ...] = ()
    edges: tuple[float, ...] = ()
    importance: float = 0.0

    @property
    def binned(self) -> bool:
        return bool(self.edges) or (self.kind.numeric and not self.levels)

    @property
    def size(self) -> int:
        return len(self.edges) + 1 if self.binned else len(self.levels)

    @property
    def null_code(self) -> int:
        return self.size

    @property
    def other_code(self) -> int:
        return self.size + 1

    @property
    def any_code(self) -> int:
        return self.size + 2

    @property
    def radix(self) -> int:
        return self.size + 3

    def codes(self, column: pa.Array) -> NDArray[np.int64]:
        """Level code of every value (null -> NULL, unseen value -> OTHER)."""
        if self.binned:
            values = column.to_numpy(zero_copy_only=False).astype(np.float64)
            nulls = np.isnan(values)
            if column.null_count:
                nulls |= column.is_null().to_numpy(zero_copy_only=False)
            edges = np.asarray(self.edges, dtype=np.float64)
            out: NDArray[np.int64] = np.searchsorted(edges, values, side="right").astype(np.int64)
            out[nulls] = self.null_code
            return out
        value_set = pa.array(list(self.levels), type=column.type)
        found = pc.index_in(column, value_set=value_set)
        codes = found.to_numpy(zero_copy_only=False)
        out = np.where(np.isnan(codes.astype(np.float64)), self.other_code, codes).astype(np.int64)
        if column.null_count:
            out[column.is_null().to_numpy(zero_copy_only=False)] = self.null_code
        return out

    def describe_level(self, code: int) -> str:
        if code == self.null_code:
            return "null"
        if code == self.other_code:
            return "other"
        if code == self.any_code:
            return "*"
        if not self.binned:
            return str(self.levels[code])
        low = "-inf" if code == 0 else _fmt(self.edges[code - 1])
        high = "inf" if code == len(self.edges) else _fmt(self.edges[code])
        return f"[{low}, {high})"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind.value,
            "levels": list(self.levels),
            "edges": list(self.edges),
            "importance": self.importance,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StratAttr:
        return cls(
            name=data["name"],
            kind=FieldKind(data["kind"]),
            levels=tuple(data.get("levels", ())),
            edges=tuple(float(e) for e in data.get("edges", ())),
            importance=float(data.get("importance", 0.0)),
        )


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.4g}"


@dataclass
class StrataTable:
    """The final strata: key, sampling rate, and (merge mode) where each full key went."""

    attrs: list[StratAttr]
    keys: NDArray[np.int64]
    rates: NDArray[np.float64]
    merged: dict[int, int] = field(default_factory=dict)
    new_stratum_rate: float = 1.0
    _sorted_cache: tuple[NDArray[np.int64], NDArray[np.int64]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        radix = 1
        for attr in reversed(self.attrs):
            radix *= attr.radix
        if radix >= 2**62:
            raise StrataError(
                "too many stratification levels for a 64-bit stratum key; stratify on fewer attributes"
            )

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def radices(self) -> NDArray[np.int64]:
        return np.array([a.radix for a in self.attrs], dtype=np.int64)

    def full_keys(self, columns: dict[str, pa.Array]) -> NDArray[np.int64]:
        """Unmerged key of every row, from the attribute columns (normalized arrays)."""
        return keys_from_codes([a.codes(columns[a.name]) for a in self.attrs], self.attrs)

    def final_keys(self, full: NDArray[np.int64]) -> NDArray[np.int64]:
        """Apply the merge map (identity for keys that were not merged)."""
        if not self.merged:
            return full
        source = np.fromiter(self.merged.keys(), dtype=np.int64, count=len(self.merged))
        target = np.fromiter(self.merged.values(), dtype=np.int64, count=len(self.merged))
        order = np.argsort(source)
        source, target = source[order], target[order]
        pos = np.clip(np.searchsorted(source, full), 0, len(source) - 1)
        hit = source[pos] == full
        return np.where(hit, target[pos], full)

    def index_of(self, keys: NDArray[np.int64], *, create: bool = False) -> NDArray[np.int64]:
        """Dense index of each key; unknown keys become new strata when ``create`` (else -1).

        New strata (value combinations first seen in the stream) are sampled at
        ``new_stratum_rate`` (a census by default) until the next rebuild re-allocates.
        Vectorized: a binary search over the sorted known keys.
        """
        sorted_keys, sorted_idx = self._sorted()
        pos = np.clip(np.searchsorted(sorted_keys, keys), 0, max(len(sorted_keys) - 1, 0))
        found = sorted_keys[pos] == keys if len(sorted_keys) else np.zeros(len(keys), dtype=bool)
        out = np.where(found, sorted_idx[pos] if len(sorted_keys) else -1, -1).astype(np.int64)
        if create and not found.all():
            added = np.unique(keys[~found])
            first = len(self.keys)
            self.keys = np.concatenate([self.keys, added.astype(np.int64)])
            self.rates = np.concatenate([self.rates, np.full(len(added), self.new_stratum_rate)])
            self._sorted_cache = None
            out[~found] = first + np.searchsorted(added, keys[~found])
        return out

    def _sorted(self) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        if self._sorted_cache is None or len(self._sorted_cache[0]) != len(self.keys):
            order = np.argsort(self.keys, kind="stable").astype(np.int64)
            self._sorted_cache = (self.keys[order], order)
        return self._sorted_cache

    def coords(self, keys: NDArray[np.int64]) -> NDArray[np.int64]:
        """Per-attribute codes of each key, shape ``(len(keys), len(attrs))``."""
        out = np.empty((len(keys), len(self.attrs)), dtype=np.int64)
        rest = keys.copy()
        for j in range(len(self.attrs) - 1, -1, -1):
            radix = self.attrs[j].radix
            out[:, j] = rest % radix
            rest //= radix
        return out

    def describe(self, key: int) -> dict[str, str]:
        codes = self.coords(np.array([key], dtype=np.int64))[0]
        return {a.name: a.describe_level(int(c)) for a, c in zip(self.attrs, codes, strict=True)}

    def to_json(self) -> dict[str, Any]:
        return {
            "attributes": [a.to_json() for a in self.attrs],
            "merged": {str(k): v for k, v in self.merged.items()},
            "new_stratum_rate": self.new_stratum_rate,
        }

    @classmethod
    def from_json(
        cls, data: dict[str, Any], keys: NDArray[np.int64], rates: NDArray[np.float64]
    ) -> StrataTable:
        return cls(
            attrs=[StratAttr.from_json(a) for a in data["attributes"]],
            keys=keys.astype(np.int64),
            rates=rates.astype(np.float64),
            merged={int(k): int(v) for k, v in data.get("merged", {}).items()},
            new_stratum_rate=float(data.get("new_stratum_rate", 1.0)),
        )


def keys_from_codes(
    codes: list[NDArray[np.int64]], attrs: list[StratAttr], n: int | None = None
) -> NDArray[np.int64]:
    """Mixed-radix stratum key per row (all zeros, one stratum, when there are no attributes)."""
    n = len(codes[0]) if codes else (n or 0)
    key = np.zeros(n, dtype=np.int64)
    for attr, code in zip(attrs, codes, strict=True):
        key = key * attr.radix + code
    return key


# -- choosing the attributes ---------------------------------------------------------------


@dataclass
class StrataChoice:
    """The chosen attributes (most important first) and why."""

    attrs: list[StratAttr]
    dependency: dict[str, dict[str, float]]
    edges: list[tuple[str, str, float]]
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {
            "chosen": [a.name for a in self.attrs],
            "reason": self.reason,
            "dependency_threshold": DEPENDENCY_THRESHOLD,
            "edges": [[a, b, round(w, 4)] for a, b, w in self.edges],
            "symmetric_uncertainty": {
                a: {b: round(w, 4) for b, w in row.items()} for a, row in self.dependency.items()
            },
        }


def candidate_attr(name: str, kind: FieldKind, column: pa.Array) -> StratAttr | None:
    """How a column would be stratified: per value (few levels) or in quantile bins."""
    if kind is FieldKind.LIST:
        return None
    if kind in (FieldKind.CATEGORICAL, FieldKind.BOOLEAN):
        counted = pc.value_counts(column.drop_null())
        if len(counted) == 0 or len(counted) > MAX_LEVELS:
            return None
        values = counted.field("values").to_pylist()
        counts = counted.field("counts").to_numpy()
        order = np.lexsort((np.arange(len(values)), -counts))
        return StratAttr(name, kind, levels=tuple(values[i] for i in order))
    data = column.drop_null().to_numpy(zero_copy_only=False).astype(np.float64)
    data = data[~np.isnan(data)]
    if data.size == 0:
        return None
    distinct = np.unique(data)
    if kind.integral and len(distinct) <= INTEGER_LEVELS:
        return StratAttr(name, kind, levels=tuple(int(v) for v in distinct))
    if len(distinct) < 2:
        return None
    quantiles = np.quantile(data, np.linspace(0, 1, NUMERIC_BINS + 1)[1:-1])
    if kind.integral:
        quantiles = np.ceil(quantiles)
    edges = np.unique(quantiles[(quantiles > distinct[0]) & (quantiles <= distinct[-1])])
    if edges.size == 0:
        edges = np.array([distinct[len(distinct) // 2]])
    return StratAttr(name, kind, edges=tuple(float(e) for e in edges))


def _entropy(counts: NDArray[np.int64]) -> float:
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())


def symmetric_uncertainty(a: NDArray[np.int64], b: NDArray[np.int64]) -> float:
    """``2 I(a;b) / (H(a) + H(b))`` from two code arrays (0 = independent, 1 = determined)."""
    ka, kb = int(a.max()) + 1, int(b.max()) + 1
    joint = np.bincount(a * kb + b, minlength=ka * kb)
    ha = _entropy(np.bincount(a, minlength=ka))
    hb = _entropy(np.bincount(b, minlength=kb))
    if ha + hb == 0:
        return 0.0
    mutual = ha + hb - _entropy(joint)
    return float(max(0.0, 2.0 * mutual / (ha + hb)))


def choose_strata(
    columns: dict[str, pa.Array],
    schema: Schema,
    uniform: NDArray[np.float64],
    *,
    sample_size: float,
    threshold: int,
    max_fields: int,
    fields: list[str] | None = None,
) -> StrataChoice:
    """Pick stratification attributes (or build the ones given) for a population.

    ``columns`` holds normalized arrays of every field, ``uniform`` each user's hash
    coin (the analysis runs on a deterministic subsample of at most 200k users).
    """
    n_users = len(uniform)
    if fields is not None:
        attrs = []
        for name in fields:
            if name not in schema:
                raise StrataError(
                    f"strata field {name!r} is not a targetable column ({', '.join(schema.names())})"
                )
            attr = candidate_attr(name, schema[name].kind, columns[name])
            if attr is None:
                raise StrataError(
                    f"strata field {name!r} cannot be stratified: a list field, an empty column, "
                    f"or more than {MAX_LEVELS} distinct values"
                )
            attrs.append(attr)
        return StrataChoice(attrs, {}, [], "given (--strata or reach.strata_fields)")
    if max_fields == 0:
        return StrataChoice([], {}, [], "stratification disabled (max_strata_fields = 0)")
    if n_users == 0:
        return StrataChoice([], {}, [], "no live users to stratify")

    keep = uniform < min(1.0, ANALYSIS_ROWS / max(n_users, 1))
    candidates: dict[str, StratAttr] = {}
    codes: dict[str, NDArray[np.int64]] = {}
    for name, spec in schema.fields.items():
        if spec.kind.temporal:
            # Dates and timestamps (signup, last seen) are recency, usually targeted by ranges
            # that quantile bins do not follow, and such columns depend on each other (first
            # and last seen) strongly enough to take the strata budget from the attributes
            # audiences are defined by. Stratified only when named (reach.strata_fields).
            continue
        attr = candidate_attr(name, spec.kind, columns[name])
        if attr is not None:
            candidates[name] = attr
            codes[name] = attr.codes(columns[name].filter(pa.array(keep)))
    # List memberships are not stratified on, but attributes that explain them matter.
    dependents: dict[str, NDArray[np.int64]] = {}
    for name, spec in schema.fields.items():
        if spec.kind is FieldKind.LIST:
            sub = columns[name].filter(pa.array(keep))
            flat = pc.list_flatten(sub)
            parents = pc.list_parent_indices(sub).to_numpy()
            for value in spec.values[:LIST_INDICATORS]:
                hit = pc.equal(flat, pa.scalar(value, pa.string())).to_numpy(zero_copy_only=False)
                indicator = np.zeros(len(sub), dtype=np.int64)
                indicator[parents[hit]] = 1
                dependents[f"{name}:{value}"] = indicator

    dependency: dict[str, dict[str, float]] = {name: {} for name in candidates}
    names = list(candidates)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            su = symmetric_uncertainty(codes[a], codes[b])
            dependency[a][b] = dependency[b][a] = su
        for dep_name, indicator in dependents.items():
            dependency[a][dep_name] = symmetric_uncertainty(codes[a], indicator)
    edges = [
        (a, b, w)
        for a in names
        for b, w in dependency[a].items()
        if w >= DEPENDENCY_THRESHOLD and (b not in candidates or a < b)
    ]
    importance = {a: sum(dependency[a].values()) for a in names}

    max_strata = max(1.0, sample_size / (MIN_MEAN_STRATUM_SAMPLE * threshold))
    full_codes = {name: candidates[name].codes(columns[name]) for name in names}
    chosen: list[str] = []
    uncovered = list(edges)
    key = np.zeros(n_users, dtype=np.int64)
    while len(chosen) < max_fields and uncovered:
        gains: dict[str, float] = {}
        for a in names:
            if a in chosen:
                continue
            gains[a] = sum(w for x, y, w in uncovered if a in (x, y))
        best = None
        for a in sorted(gains, key=lambda x: (-gains[x], x)):
            if gains[a] <= 0:
                break
            trial = key * candidates[a].radix + full_codes[a]
            if _feasible(trial, sample_size, threshold, max_strata):
                best = a
                key = trial
                break
        if best is None:
            break
        chosen.append(best)
        # An attribute (nearly) determined by the chosen one is represented by it: its
        # dependencies are covered too (age by age_band, language by country, ...).
        represented = {best} | {b for b in names if dependency[best].get(b, 0.0) >= REDUNDANT}
        names = [a for a in names if a == best or a not in represented]
        uncovered = [e for e in uncovered if not represented & {e[0], e[1]}]
    if not edges:
        reason = f"no dependency reached SU >= {DEPENDENCY_THRESHOLD}; no stratification"
    elif uncovered:
        reason = (
            f"greedy vertex cover of the dependency graph, stopped by the strata budget "
            f"(<= {max_strata:.0f} strata, <= {BOOST_SHARE:.0%} of the sample on unstable strata) "
            f"or max_strata_fields={max_fields}; {len(uncovered)} edge(s) left uncovered"
        )
    else:
        reason = "greedy weighted vertex cover of the dependency graph (every edge covered)"
    attrs = [
        StratAttr(
            candidates[a].name,
            candidates[a].kind,
            candidates[a].levels,
            candidates[a].edges,
            importance=round(importance[a], 6),
        )
        for a in chosen
    ]
    return StrataChoice(attrs, dependency, edges, reason)


def _feasible(keys: NDArray[np.int64], sample_size: float, threshold: int, max_strata: float) -> bool:
    _, counts = np.unique(keys, return_counts=True)
    if len(counts) > max_strata:
        return False
    boost_cost = np.minimum(counts, threshold).sum()
    return bool(boost_cost <= BOOST_SHARE * sample_size)


# -- allocation --------------------------------------------------------------------------


@dataclass
class Allocation:
    table: StrataTable
    final_keys: NDArray[np.int64]  # per user
    base_rate: float
    unstable: int
    merged_groups: int


def allocate(
    attrs: list[StratAttr],
    full_keys: NDArray[np.int64],
    *,
    rate: float,
    threshold: int,
    fallback: Fallback,
) -> Allocation:
    """Sampling rate per final stratum: proportional, with the fuzzy fall-back for unstable ones."""
    n_users = len(full_keys)
    target = rate * n_users
    keys, inverse, counts = np.unique(full_keys, return_inverse=True, return_counts=True)
    merged: dict[int, int] = {}
    merged_groups = 0
    if fallback == "merge" and attrs:
        keys, inverse, counts, merged, merged_groups = _merge_unstable(
            attrs, keys, inverse, counts, rate=rate, threshold=threshold
        )
    stable_floor = np.minimum(1.0, threshold / np.maximum(counts, 1))
    unstable = int((counts * rate < threshold).sum())
    base = _solve_base_rate(counts.astype(np.float64), stable_floor, target) if rate < 1.0 else 1.0
    rates = np.minimum(1.0, np.maximum(base, stable_floor))
    table = StrataTable(attrs, keys.astype(np.int64), rates.astype(np.float64), merged)
    return Allocation(table, keys[inverse].astype(np.int64), base, unstable, merged_groups)


def _solve_base_rate(counts: NDArray[np.float64], floor: NDArray[np.float64], target: float) -> float:
    """The base rate r0 with ``sum(N_h * max(r0, floor_h)) = target`` (bisection; monotone)."""

    def size(r0: float) -> float:
        return float((counts * np.minimum(1.0, np.maximum(r0, floor))).sum())

    if size(0.0) >= target:
        return 0.0 if size(0.0) > 0 else min(1.0, target / max(counts.sum(), 1.0))
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        if size(mid) < target:
            low = mid
        else:
            high = mid
    return high


def _merge_unstable(
    attrs: list[StratAttr],
    keys: NDArray[np.int64],
    inverse: NDArray[np.int64],
    counts: NDArray[np.int64],
    *,
    rate: float,
    threshold: int,
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64], dict[int, int], int]:
    """Fold unstable strata along the least important attribute, then the next, ..."""
    radices = [a.radix for a in attrs]
    multipliers = [int(np.prod(radices[j + 1 :], dtype=np.int64)) for j in range(len(attrs))]
    final = keys.copy()  # final key of every distinct full key
    for j in range(len(attrs) - 1, -1, -1):
        values, group_inverse = np.unique(final, return_inverse=True)
        group_counts = np.bincount(group_inverse, weights=counts).astype(np.int64)
        unstable_groups = group_counts * rate < threshold
        if not unstable_groups.any():
            break
        move = unstable_groups[group_inverse]
        code = (final // multipliers[j]) % radices[j]
        final = np.where(move, final + (attrs[j].any_code - code) * multipliers[j], final)
    merged = {int(k): int(f) for k, f in zip(keys.tolist(), final.tolist(), strict=True) if k != f}
    new_keys, group_inverse = np.unique(final, return_inverse=True)
    new_counts = np.bincount(group_inverse, weights=counts).astype(np.int64)
    user_group = group_inverse[inverse]
    merged_groups = int(len(set(merged.values())))
    return new_keys, user_group, new_counts, merged, merged_groups


# -- stratum-level evaluation ----------------------------------------------------------------


def stratum_decisions(
    expr: Expr, table: StrataTable, keys: NDArray[np.int64]
) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """Three-valued evaluation per stratum: (surely all match, surely none match).

    A stratum is decided when the predicate depends only on stratification attributes
    whose level in that stratum is known; such strata use their exact population totals
    (no sampling error), which is what makes demographic targeting exact.
    """
    coords = table.coords(keys)
    positions = {a.name: j for j, a in enumerate(table.attrs)}

    def visit(node: Expr) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
        n = len(keys)
        if isinstance(node, (And, Or)):
            is_and = isinstance(node, And)
            yes = np.full(n, is_and)
            no = np.full(n, not is_and)
            for child in node.children:
                c_yes, c_no = visit(child)
                if is_and:
                    yes &= c_yes
                    no |= c_no
                else:
                    yes |= c_yes
                    no &= c_no
            return yes, no
        if isinstance(node, Not):
            c_yes, c_no = visit(node.child)
            return c_no, c_yes
        if isinstance(node, (HasAny, HasAll)) or node.field not in positions:
            return np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        j = positions[node.field]
        return _leaf_decision(node, table.attrs[j], coords[:, j])

    return visit(expr)


def _leaf_decision(
    node: Eq | In | Between, attr: StratAttr, codes: NDArray[np.int64]
) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """(surely yes, surely no) per level of one attribute, then looked up per stratum.

    NULL never matches a leaf; OTHER (a value unseen at build) and ANY (merged) are
    unknown, except that OTHER surely fails eq/in when every listed value was seen at build.
    Decisions only need to be sound: "unknown" just means the sample is used.
    """
    size = attr.size
    level_yes = np.zeros(attr.radix, dtype=bool)
    level_no = np.zeros(attr.radix, dtype=bool)
    level_no[attr.null_code] = True
    if attr.binned:
        bounds = np.concatenate([[-math.inf], np.asarray(attr.edges, dtype=np.float64), [math.inf]])
        lows = bounds[:-1]
        # highest value a bin can hold: whole numbers up to edge-1, or just below the edge
        tops = bounds[1:] - 1 if attr.kind.integral else bounds[1:]
        strict = not attr.kind.integral  # v < top for floats, v <= top for whole numbers
        if isinstance(node, Between):
            low, high = numeric_bounds(node, attr.kind)
            level_yes[:size] = (lows >= low) & (tops <= high)
            below = (tops <= low) if strict else (tops < low)
            level_no[:size] = below | (lows > high)
        else:
            listed = numeric_values(node, attr.kind)
            values = [float(v) for v in listed if isinstance(v, (int, float))]
            holds_any = np.zeros(size, dtype=bool)
            for v in values:
                holds_any |= (lows <= v) & ((v < tops) if strict else (v <= tops))
            level_no[:size] = ~holds_any
        return level_yes[codes], level_no[codes]
    seen = {_norm(level) for level in attr.levels}
    if isinstance(node, Between):
        low, high = numeric_bounds(node, attr.kind)
        for i, level in enumerate(attr.levels):
            level_yes[i] = low <= float(level) <= high
    else:
        wanted = {_norm(v) for v in numeric_values(node, attr.kind)}
        for i, level in enumerate(attr.levels):
            level_yes[i] = _norm(level) in wanted
        level_no[attr.other_code] = wanted <= seen
    level_no[:size] = ~level_yes[:size]
    return level_yes[codes], level_no[codes]


def _norm(value: Any) -> tuple[str, Any]:
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (int, float)):
        return ("num", float(value))
    return ("str", value)


def normalized_columns(table: pa.Table, schema: Schema) -> dict[str, pa.Array]:
    """Every schema field of ``table`` as one contiguous array in its canonical type."""
    return {name: normalize_column(table.column(name), spec.kind) for name, spec in schema.fields.items()}
