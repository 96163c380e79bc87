"""Build a reach sample from a population table (``adreach reach build``).

Steps, all column-at-a-time:

1. read the population (``user_id`` + attribute columns); users with a non-null
   ``deleted_field`` are left out of the totals but remembered as deleted;
2. hash every ``user_id`` with the seed (the inclusion coin and the shard);
3. activity rates for horizon forecasts (:mod:`estimation.activity`);
4. choose the stratification attributes from the dependency structure, or take them
   from settings (:func:`estimation.strata.choose_strata`);
5. allocate: proportional, with the fuzzy fall-back for unstable strata
   (:func:`estimation.strata.allocate`);
6. keep each user whose coin is below its stratum's rate, and write the sample.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from estimation.activity import column_rates, constant_rates, learn_from_events
from estimation.hashing import UserIdError, hash_user_ids, uniform
from estimation.schema import FieldKind, PopulationError, field_kind, infer_schema, normalize_column
from estimation.store import write_sample
from estimation.strata import allocate, choose_strata, keys_from_codes, normalized_columns
from infra.arrow_times import epoch_ms
from infra.settings import ReachSettings
from infra.tables import TableFileError, read_table_file


@dataclass
class BuildReport:
    """What a build produced (printed by the CLI, returned by the Python API)."""

    out: Path
    population: int
    deleted: int
    sample_users: int
    strata: int
    unstable_strata: int
    strata_fields: list[str]
    reason: str
    base_rate: float
    activity_source: str
    seconds: float
    fields: dict[str, str] = field(default_factory=dict)
    """Targetable fields and their kinds, in population column order."""
    not_targetable: dict[str, str] = field(default_factory=dict)
    """Population columns left out, with the reason (a type no targeting operator takes, ...)."""

    def describe(self) -> str:
        fields = ", ".join(f"{name} ({kind})" for name, kind in self.fields.items()) or "(none)"
        return "\n".join(
            [
                f"built reach sample in {self.out}: {self.sample_users:,} of {self.population:,} users "
                f"({self.sample_users / max(self.population, 1):.2%}) in {self.seconds:.1f} s",
                f"  strata: {self.strata:,} over {', '.join(self.strata_fields) or '(none)'} "
                f"({self.unstable_strata:,} below the stability threshold got the fall-back; "
                f"base rate {self.base_rate:.4f})",
                f"  why: {self.reason}",
                f"  activity: {self.activity_source}",
                f"  deleted users left out: {self.deleted:,}",
                f"  fields: {fields}",
                *[
                    f"  not targetable: {name if name.strip() else repr(name)}: {why}"
                    for name, why in self.not_targetable.items()
                ],
            ]
        )


def build_sample(
    population: Path | pa.Table,
    out: Path,
    settings: ReachSettings | None = None,
    *,
    events: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> BuildReport:
    """Build a sample from a Parquet file (or an Arrow table) into ``out``."""
    settings = settings or ReachSettings()
    say = progress or (lambda _message: None)
    started = time.perf_counter()
    say("reading the population")
    table = _read(population)
    if "user_id" not in table.column_names:
        raise PopulationError(
            f"the population has no user_id column (columns: {', '.join(table.column_names)})"
        )
    if table.num_rows == 0:
        where = population if isinstance(population, Path) else "the population"
        raise PopulationError(f"{where} holds no users: a sample needs at least one")
    deleted = _deleted_mask(table, settings.deleted_field)
    user_ids = table.column("user_id")
    say("hashing user ids")
    try:
        hashes = hash_user_ids(user_ids, settings.seed)
    except UserIdError as exc:
        raise PopulationError(str(exc)) from None
    if len(np.unique(hashes)) != len(hashes):
        duplicates = pc.filter(
            pc.value_counts(user_ids).field("values"),
            pc.greater(pc.value_counts(user_ids).field("counts"), 1),
        )
        raise PopulationError(
            f"user_id must be unique; {len(duplicates)} ids repeat (e.g. {duplicates[0].as_py()!r})"
        )
    say("learning activity rates")
    act_shape, act_rate, activity = _activity(table, settings, events)
    alive_idx = np.flatnonzero(~deleted)
    alive = table.take(pa.array(alive_idx))
    exclude = {name for name in (settings.activity_field, settings.deleted_field) if name}
    schema = infer_schema(alive, exclude=exclude)
    columns = normalized_columns(alive, schema)
    alive_hashes = hashes[alive_idx]
    coins = uniform(alive_hashes)
    n = len(alive_idx)
    say(f"choosing strata over {n:,} users")
    choice = choose_strata(
        columns,
        schema,
        coins,
        sample_size=settings.sample_rate * n,
        threshold=settings.stability_threshold,
        max_fields=settings.max_strata_fields,
        fields=settings.strata_fields,
    )
    full = keys_from_codes([a.codes(columns[a.name]) for a in choice.attrs], choice.attrs, n)
    allocation = allocate(
        choice.attrs,
        full,
        rate=settings.sample_rate,
        threshold=settings.stability_threshold,
        fallback=settings.fallback,
    )
    strata = allocation.table
    stratum = strata.index_of(allocation.final_keys)
    sampled = coins < strata.rates[stratum]
    population_counts = np.bincount(stratum, minlength=len(strata)).astype(np.int64)
    say("writing the sample")
    sample_idx = np.flatnonzero(sampled)
    sample_columns: dict[str, pa.Array] = {
        "_user_hash": pa.array(alive_hashes[sample_idx], pa.uint64()),
        "_stratum": pa.array(stratum[sample_idx].astype(np.int32)),
        "_act_shape": pa.array(act_shape[alive_idx][sample_idx]),
        "_act_rate": pa.array(act_rate[alive_idx][sample_idx]),
    }
    taken = pa.array(sample_idx)
    for name in schema.names():
        sample_columns[name] = columns[name].take(taken)
    deleted_ms = _deleted_ms(table, settings.deleted_field, deleted)
    directory = pa.table(
        {
            "user_hash": pa.array(np.concatenate([alive_hashes, hashes[deleted]]), pa.uint64()),
            "stratum": pa.array(np.concatenate([stratum, np.full(int(deleted.sum()), -1)]).astype(np.int32)),
            "updated_ms": pa.array(np.concatenate([np.zeros(n, np.int64), deleted_ms]), pa.int64()),
        }
    )
    report = BuildReport(
        out=out,
        population=n,
        deleted=int(deleted.sum()),
        sample_users=len(sample_idx),
        strata=len(strata),
        unstable_strata=allocation.unstable,
        strata_fields=[a.name for a in choice.attrs],
        reason=choice.reason,
        base_rate=allocation.base_rate,
        activity_source=activity.source,
        seconds=0.0,
        fields={name: spec.kind.value for name, spec in schema.fields.items()},
        not_targetable=dict(schema.skipped),
    )
    manifest: dict[str, Any] = {
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": str(population) if isinstance(population, Path) else "<arrow table>",
        "settings": settings.model_dump(mode="json"),
        "schema": schema.to_json(),
        "strata": strata.to_json(),
        "strata_choice": choice.to_json(),
        "allocation": {
            "base_rate": allocation.base_rate,
            "unstable_strata": allocation.unstable,
            "merged_groups": allocation.merged_groups,
        },
        "activity": activity.to_json(),
        "counts": {"population": n, "deleted": int(deleted.sum()), "sample_users": len(sample_idx)},
    }
    write_sample(out, manifest, strata, population_counts, pa.table(sample_columns), directory)
    report.seconds = time.perf_counter() - started
    return report


def _read(population: Path | pa.Table) -> pa.Table:
    if isinstance(population, pa.Table):
        return population
    if not population.exists():
        raise PopulationError(f"no such population file: {population}")
    try:
        return read_table_file(population)
    except TableFileError as exc:
        raise PopulationError(str(exc)) from None


def _deleted_mask(table: pa.Table, name: str | None) -> np.ndarray[Any, np.dtype[np.bool_]]:
    if not name or name not in table.column_names:
        return np.zeros(table.num_rows, dtype=bool)
    return np.asarray(table.column(name).is_valid().to_numpy(zero_copy_only=False), dtype=bool)


def _deleted_ms(table: pa.Table, name: str | None, deleted: np.ndarray[Any, np.dtype[np.bool_]]) -> Any:
    if not deleted.any() or not name:
        return np.zeros(int(deleted.sum()), dtype=np.int64)
    column = table.column(name).filter(pa.array(deleted))
    if pa.types.is_timestamp(column.type):
        column = epoch_ms(column)
    elif not pa.types.is_integer(column.type):
        return np.zeros(int(deleted.sum()), dtype=np.int64)
    return column.to_numpy().astype(np.int64)


def _activity(
    table: pa.Table, settings: ReachSettings, events: Path | None
) -> tuple[np.ndarray[Any, np.dtype[np.float64]], np.ndarray[Any, np.dtype[np.float64]], Any]:
    if events is not None:
        joined = None
        if "joined_at" in table.column_names and pa.types.is_timestamp(table.schema.field("joined_at").type):
            column = table.column("joined_at")
            joined = epoch_ms(column).to_numpy(zero_copy_only=False)
            joined = np.nan_to_num(joined.astype(np.float64), nan=0.0).astype(np.int64)
        return learn_from_events(events, table.column("user_id"), settings.seed, joined)
    name = settings.activity_field
    if name and name in table.column_names:
        column = normalize_column(table.column(name), _numeric_kind(table, name))
        values = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
        return column_rates(values, name, settings.activity_scale, settings.default_activity_rate)
    return constant_rates(table.num_rows, settings.default_activity_rate)


def _numeric_kind(table: pa.Table, name: str) -> FieldKind:
    data_type = table.schema.field(name).type
    kind = field_kind(data_type)
    if kind not in (FieldKind.INTEGER, FieldKind.NUMBER):
        raise PopulationError(
            f"activity column {name!r} must be numeric (impressions per day), not {data_type}"
        )
    return kind
