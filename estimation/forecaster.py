"""The aggregator and Python API: open a sample, ask reach questions, feed profile changes.

    from estimation import ReachForecaster, build_sample

    build_sample(Path("population.parquet"), Path("reach-sample"))
    with ReachForecaster.open(Path("reach-sample"), shards=2) as reach:
        answer = reach.estimate({"field": "country", "eq": "US"}, horizon_days=7)
        print(answer.reach, answer.ci95, answer.sample_users)

The forecaster owns what every shard must agree on: the field schema and the strata
table (including strata first seen in the stream, which it numbers centrally). It
stratifies incoming profiles, decides which users enter the sample and routes each user
to its shard by hash; it fans each query out, adds the shards' per-stratum sums and
computes one estimate (:mod:`estimation.estimator`). Because shards only ever return
integer counts per stratum (and float sums for horizons), K shards answer exactly what
one shard answers.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from numpy.typing import NDArray

from estimation import temporal
from estimation.estimator import Z95, ReachEstimate, estimate_horizon, estimate_reach
from estimation.hashing import hash_user_ids, shard_of, uniform
from estimation.rows import arrow_type
from estimation.schema import OPERATORS, FieldKind, normalize_column
from estimation.shard import PartialSums, ShardUpdate, UpdateStats
from estimation.sharding import LocalShard, ProcessShard, ShardClient, ShardReply, ShardUnavailableError
from estimation.store import SampleMeta, load_meta, load_shard
from estimation.strata import stratum_decisions
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
    parse_targeting,
    unknown_value_warnings,
)
from infra.arrow_times import EventTimeError, malformed_times, rfc3339_epoch_ms
from infra.settings import ReachSettings

log = logging.getLogger(__name__)

# The longest forecast horizon (ten years): beyond it every user with any activity counts
# as active and the impressions overflow to infinity, which no client could use.
MAX_HORIZON_DAYS = 3650


@dataclass
class ProfileChanges:
    """A batch of profile changes in columnar form (what :meth:`ReachForecaster.apply` takes).

    ``upserts``: ``user_id``, ``event_ms`` and any of the schema's columns (missing ones
    are null: profiles are full snapshots). ``deletes``: ``user_id`` and ``event_ms``.
    ``unreadable``: per field, how many given values did not fit its kind and became null.
    """

    upserts: pa.Table
    deletes: pa.Table
    unreadable: dict[str, int] = field(default_factory=dict)


class ReachForecaster:
    """Reach estimates over a sample split across ``len(clients)`` shards."""

    def __init__(self, meta: SampleMeta, clients: Sequence[ShardClient], settings: ReachSettings) -> None:
        self.meta = meta
        self.clients = list(clients)
        self.settings = settings
        self._lock = threading.Lock()
        self._shard_population = [int(meta.population.sum()) // max(len(clients), 1)] * len(clients)
        self.updates = UpdateStats()

    @classmethod
    def open(
        cls, sample: Path, *, shards: int | None = None, settings: ReachSettings | None = None
    ) -> ReachForecaster:
        """Load a sample built by :func:`estimation.build_sample`.

        ``shards=1`` (the default) keeps everything in this process; ``shards=K`` starts K
        shard processes and waits until each has loaded its part.
        """
        settings = settings or ReachSettings()
        count = shards or settings.shards
        meta = load_meta(sample)
        if count == 1:
            shard = load_shard(meta, 0, 1, compact_fraction=settings.compact_fraction)
            forecaster = cls(meta, [LocalShard(shard)], settings)
        else:
            workers = [
                ProcessShard(
                    sample,
                    i,
                    count,
                    compact_fraction=settings.compact_fraction,
                    timeout_s=settings.shard_timeout_s,
                )
                for i in range(count)
            ]
            deadline = time.monotonic() + max(120.0, settings.shard_timeout_s)
            failures = [(w.index, w.wait_ready(deadline)) for w in workers]
            bad = [(i, r.error) for i, r in failures if not r.ok]
            if bad:
                for worker in workers:
                    worker.close()
                raise ShardUnavailableError([i for i, _ in bad], "; ".join(e for _, e in bad))
            forecaster = cls(meta, workers, settings)
        forecaster._shard_population = [int(info["population"]) for info in forecaster.info()["shards"]]
        return forecaster

    def __enter__(self) -> ReachForecaster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for client in self.clients:
            client.close()

    # -- queries -------------------------------------------------------------------------

    def parse(self, targeting: object) -> Expr:
        """Check a targeting expression against the schema (raises a ``TargetingError``)."""
        return parse_targeting(targeting, self.meta.schema)

    def estimate(
        self, targeting: object, horizon_days: float | None = None, *, allow_partial: bool | None = None
    ) -> ReachEstimate:
        """Users matching ``targeting`` now, or active within ``horizon_days`` days."""
        expr: Expr = targeting if isinstance(targeting, _EXPR_TYPES) else self.parse(targeting)  # type: ignore[assignment]
        if horizon_days is not None and not 0 < horizon_days <= MAX_HORIZON_DAYS:
            raise ValueError(f"horizon_days must be in (0, {MAX_HORIZON_DAYS}], got {horizon_days}")
        allow = self.settings.allow_partial if allow_partial is None else allow_partial
        with self._lock:
            replies = self._fan_out("query", expr, horizon_days)
            strata = self.meta.strata
            yes, no = stratum_decisions(expr, strata, strata.keys)
        good = [(i, r.value) for i, r in replies if r.ok]
        missing = [i for i, r in replies if not r.ok]
        if missing and (not allow or not good):
            reasons = sorted({r.error for _, r in replies if not r.ok})
            raise ShardUnavailableError(missing, "; ".join(reasons))
        for i, part in good:
            self._shard_population[i] = int(part.population.sum())
        sums = PartialSums.add([part for _, part in good]).resized(len(yes))
        if horizon_days is None:
            est, matches, exact = estimate_reach(sums, yes, no)
            answer = ReachEstimate(
                reach=est.value,
                ci95=(est.low, est.high),
                sample_users=matches,
                population=int(sums.population.sum()),
                sample_size=int(sums.sampled.sum()),
                exact_users=exact,
                method=est.method,
                std_error=est.std_error,
            )
        else:
            audience, _, _ = estimate_reach(sums, yes, no)
            reach, impressions, matches = estimate_horizon(sums, no, horizon_days)
            answer = ReachEstimate(
                reach=reach.value,
                ci95=(reach.low, reach.high),
                sample_users=matches,
                population=int(sums.population.sum()),
                sample_size=int(sums.sampled.sum()),
                exact_users=0,
                method=reach.method,
                std_error=reach.std_error,
                horizon_days=horizon_days,
                audience=audience.value,
                impressions=impressions.value,
                impressions_ci95=(impressions.low, impressions.high),
            )
        answer.warnings = unknown_value_warnings(expr, self.meta.schema)
        if missing:
            _mark_partial(answer, missing, self._shard_population)
        return answer

    def fields(self) -> dict[str, Any]:
        """Targetable fields with their values (and population counts at build) or ranges."""
        schema = self.meta.schema.to_json()
        return {
            "fields": schema["fields"],
            "not_targetable": schema["skipped"],
            "strata_fields": [a.name for a in self.meta.strata.attrs],
            "operators": {kind.value: list(ops) for kind, ops in OPERATORS.items()},
            "population_at_build": int(self.meta.manifest["counts"]["population"]),
            "activity": self.meta.activity.to_json(),
        }

    def info(self) -> dict[str, Any]:
        with self._lock:
            replies = self._fan_out("info")
        shards = [{"shard": i, "ok": r.ok, **(r.value if r.ok else {"error": r.error})} for i, r in replies]
        return {"shards": shards, "strata": len(self.meta.strata), "updates": self.updates.to_json()}

    def compact(self) -> None:
        with self._lock:
            self._fan_out("compact")

    # -- updates -------------------------------------------------------------------------

    def apply(self, changes: ProfileChanges) -> UpdateStats:
        """Apply a batch of profile upserts and deletions (latest event per user wins)."""
        seed = self.meta.seed
        count = len(self.clients)
        upserts = changes.upserts
        up_hashes = (
            hash_user_ids(upserts.column("user_id"), seed) if upserts.num_rows else np.zeros(0, np.uint64)
        )
        up_ms = _ms(upserts)
        del_hashes = (
            hash_user_ids(changes.deletes.column("user_id"), seed)
            if changes.deletes.num_rows
            else np.zeros(0, np.uint64)
        )
        del_ms = _ms(changes.deletes)
        with self._lock:
            columns = self._normalized(upserts)
            strata = self.meta.strata
            full = strata.full_keys(columns) if strata.attrs else np.zeros(upserts.num_rows, dtype=np.int64)
            stratum = strata.index_of(strata.final_keys(full), create=True)
            sampled = uniform(up_hashes) < strata.rates[stratum]
            table = pa.table(columns) if columns else pa.table({"_": pa.nulls(upserts.num_rows)})
            up_shard = shard_of(up_hashes, count)
            del_shard = shard_of(del_hashes, count)
            requests = []
            for client in self.clients:
                mine = np.flatnonzero(up_shard == client.index)
                gone = del_shard == client.index
                update = ShardUpdate(
                    n_strata=len(strata),
                    upsert_hashes=up_hashes[mine],
                    upsert_strata=stratum[mine],
                    upsert_sampled=sampled[mine],
                    upsert_ms=up_ms[mine],
                    upserts=table.take(pa.array(mine)),
                    delete_hashes=del_hashes[gone],
                    delete_ms=del_ms[gone],
                )
                requests.append((client, client.submit("apply", update)))
            stats = UpdateStats(unreadable_values=sum(changes.unreadable.values()))
            failed = []
            deadline = time.monotonic() + self.settings.shard_timeout_s
            for client, request in requests:
                reply = client.result(request, deadline)
                if reply.ok:
                    stats += reply.value
                else:
                    failed.append((client.index, reply.error))
            self.updates += stats
        if changes.unreadable:
            log.warning(
                "profile updates: values that do not fit their field were stored as null: %s",
                ", ".join(
                    f"{count} of {name!r} ({self.meta.schema[name].kind.value} field)"
                    for name, count in changes.unreadable.items()
                ),
            )
        if failed:
            raise ShardUnavailableError([i for i, _ in failed], "; ".join(e for _, e in failed))
        return stats

    def apply_profiles(self, events: Iterable[Any]) -> UpdateStats:
        """Apply ``user_profile`` events (:class:`streams.events.UserProfile` or plain dicts)."""
        return self.apply(profiles_to_changes(events, self.meta, self.settings))

    def delete_users(self, user_ids: Sequence[str], event_ms: int | None = None) -> UpdateStats:
        """Remove users from the sample and the totals (a privacy deletion)."""
        when = int(time.time() * 1000) if event_ms is None else event_ms
        deletes = pa.table(
            {"user_id": pa.array(list(user_ids), pa.string()), "event_ms": [when] * len(user_ids)}
        )
        return self.apply(ProfileChanges(_empty_upserts(), deletes))

    # -- internals -----------------------------------------------------------------------

    def _fan_out(self, method: str, *args: Any) -> list[tuple[int, ShardReply]]:
        requests = [(client, client.submit(method, *args)) for client in self.clients]
        deadline = time.monotonic() + self.settings.shard_timeout_s
        return [(client.index, client.result(request, deadline)) for client, request in requests]

    def _normalized(self, upserts: pa.Table) -> dict[str, pa.Array]:
        n = upserts.num_rows
        out: dict[str, pa.Array] = {}
        for name, spec in self.meta.schema.fields.items():
            if name in upserts.column_names:
                out[name] = normalize_column(upserts.column(name), spec.kind)
            elif spec.kind is FieldKind.LIST:
                out[name] = pa.ListArray.from_arrays(
                    pa.array(np.zeros(n + 1, np.int32)), pa.array([], pa.string())
                )
            else:
                out[name] = pa.nulls(n, arrow_type(spec.kind))
        return out


_EXPR_TYPES: tuple[type, ...] = (And, Or, Not, Eq, In, Between, HasAny, HasAll)


def _mark_partial(answer: ReachEstimate, missing: list[int], shard_population: list[int]) -> None:
    """Scale an answer from the shards that replied up to everyone, and say so.

    Users are spread over shards by hash, so the answering shards hold a random share
    ``f`` of them: a true total ``Y`` shows up there as about Binomial(Y, f). Scaling by
    ``1 / f`` adds that variance, ``Y (1 - f) / f``, to the scaled interval's own (combined
    per side in quadrature); an answer exact on the answering shards is not exact any more.
    """
    total = sum(shard_population)
    answered = total - sum(shard_population[i] for i in missing)
    coverage = answered / total if total else 0.0
    scale = 1.0 / coverage if coverage > 0 else 1.0

    def split_se(scaled: float) -> float:
        """Standard error the hash split adds to a scaled total: sqrt(Y (1 - f) / f), Y = scaled."""
        return math.sqrt(max(scaled, 0.0) * (1.0 - coverage) * scale)

    def widened(value: float, low: float, high: float) -> tuple[float, float, float]:
        scaled = value * scale
        split = Z95 * split_se(scaled)
        low_half, high_half = (value - low) * scale, (high - value) * scale
        return (
            scaled,
            max(scaled - math.hypot(low_half, split), 0.0),
            scaled + math.hypot(high_half, split),
        )

    answer.reach, low, high = widened(answer.reach, *answer.ci95)
    answer.ci95 = (low, high)
    answer.std_error = math.hypot(answer.std_error * scale, split_se(answer.reach))
    if answer.method == "exact" and answer.std_error > 0:
        answer.method = "normal"
    answer.population = total  # every shard's users: what the scaled answer is a share of
    if answer.impressions is not None and answer.impressions_ci95 is not None:
        answer.impressions, low, high = widened(answer.impressions, *answer.impressions_ci95)
        answer.impressions_ci95 = (low, high)
    if answer.audience is not None:
        answer.audience *= scale
    answer.partial = True
    answer.missing_shards = missing
    answer.coverage = round(coverage, 6)
    answer.warnings.append(
        f"partial answer: shard(s) {', '.join(map(str, missing))} did not answer; scaled up from the shards "
        f"holding {coverage:.1%} of users"
    )


def _ms(table: pa.Table) -> NDArray[np.int64]:
    if table.num_rows == 0:
        return np.zeros(0, dtype=np.int64)
    if "event_ms" not in table.column_names:
        return np.full(table.num_rows, int(time.time() * 1000), dtype=np.int64)
    return np.asarray(table.column("event_ms").to_numpy(zero_copy_only=False), dtype=np.int64)


def _empty_upserts() -> pa.Table:
    return pa.table({"user_id": pa.array([], pa.string()), "event_ms": pa.array([], pa.int64())})


def profiles_to_changes(events: Iterable[Any], meta: SampleMeta, settings: ReachSettings) -> ProfileChanges:
    """Columnar :class:`ProfileChanges` from ``user_profile`` events.

    ``attributes`` map to the schema's columns of the same name; ``interests`` to
    ``reach.interests_field``; ``provider_labels`` (provider -> attribute -> label) to
    ``reach.provider_labels_field`` as ``provider.attribute.label`` strings. A value of the
    wrong type for its column becomes null rather than failing the batch, and is counted
    (``unreadable``; :attr:`UpdateStats.unreadable_values`, with a warning naming the field).
    """
    schema = meta.schema
    up_ids: list[str] = []
    up_ms: list[Any] = []  # event times as given; read by _event_ms
    values: dict[str, list[Any]] = {name: [] for name in schema.names()}
    del_ids: list[str] = []
    del_ms: list[Any] = []
    interests, labels = settings.interests_field, settings.provider_labels_field
    for event in events:
        data = _as_dict(event)
        if data.get("type", "user_profile") != "user_profile":
            continue
        when = data.get("event_time")
        if data.get("action", "upsert") == "delete":
            del_ids.append(str(data["user_id"]))
            del_ms.append(when)
            continue
        up_ids.append(str(data["user_id"]))
        up_ms.append(when)
        attributes = data.get("attributes") or {}
        for name, column in values.items():
            if name == interests:
                column.append(list(data.get("interests") or []))
            elif name == labels:
                column.append(
                    [
                        f"{provider}.{attribute}.{label}"
                        for provider, attrs in (data.get("provider_labels") or {}).items()
                        for attribute, label in attrs.items()
                    ]
                )
            else:
                column.append(attributes.get(name))
    columns: dict[str, pa.Array] = {
        "user_id": pa.array(up_ids, pa.string()),
        "event_ms": pa.array(_event_ms(up_ms), pa.int64()),
    }
    unreadable: dict[str, int] = {}
    for name, column in values.items():
        columns[name] = _typed(column, schema[name].kind)
        lost = _unreadable(column, columns[name], schema[name].kind)
        if lost:
            unreadable[name] = lost
    return ProfileChanges(
        pa.table(columns),
        pa.table(
            {"user_id": pa.array(del_ids, pa.string()), "event_ms": pa.array(_event_ms(del_ms), pa.int64())}
        ),
        unreadable,
    )


def _typed(values: list[Any], kind: FieldKind) -> pa.Array:
    if kind is FieldKind.LIST:
        target: pa.DataType = pa.list_(pa.string())
        clean: list[Any] = [[str(v) for v in vs] if isinstance(vs, list) else [] for vs in values]
    elif kind.temporal:
        target = pa.int64()
        clean = [_epoch_number(v, kind) for v in values]
    else:
        target = arrow_type(kind)
        accepted: tuple[type, ...] = {
            FieldKind.CATEGORICAL: (str,),
            FieldKind.BOOLEAN: (bool,),
            FieldKind.INTEGER: (int,),
            FieldKind.NUMBER: (int, float),
        }[kind]
        clean = [
            v
            if isinstance(v, accepted) and not (kind is not FieldKind.BOOLEAN and isinstance(v, bool))
            else None
            for v in values
        ]
    return pa.array(clean, target)


def _unreadable(given: list[Any], typed: pa.Array, kind: FieldKind) -> int:
    """How many of the ``given`` values (``None``: not given) did not survive :func:`_typed`."""
    if kind is FieldKind.LIST:
        return sum(1 for v in given if v is not None and not isinstance(v, list))
    return sum(1 for v in given if v is not None) - (len(typed) - int(typed.null_count))


def _epoch_number(value: Any, kind: FieldKind) -> int | None:
    """A profile's date or timestamp attribute (ISO 8601 text) as the sample holds it; anything
    else is null, as a value of the wrong type is for the other kinds."""
    if not isinstance(value, str):
        return None
    try:
        return int(temporal.as_number(value, kind is FieldKind.DATE))
    except temporal.TemporalValueError:
        return None


def _as_dict(event: Any) -> dict[str, Any]:
    if isinstance(event, dict):
        return event
    import msgspec

    data = msgspec.to_builtins(event)
    assert isinstance(data, dict)
    return data


def _event_ms(values: Sequence[Any]) -> list[int]:
    """Profile event times as epoch ms: the SDK's reading (RFC 3339 with a zone), never local time.

    A time without a zone would be read in this machine's zone, so the same events could
    order differently on another server; it is refused, as the SDK refuses it. Texts (what
    events from Kafka carry) are read in one vector call; a missing time is "now".
    """
    from datetime import datetime

    now = int(time.time() * 1000)
    out: list[int] = []
    texts: dict[int, str] = {}
    for i, value in enumerate(values):
        if value is None:
            out.append(now)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out.append(int(value))
        elif isinstance(value, datetime):
            if value.utcoffset() is None:
                raise EventTimeError(f"profile event_time {value.isoformat()} has no time zone; give it one")
            out.append(int(value.timestamp() * 1000))
        elif isinstance(value, str):
            texts[i] = value
            out.append(0)
        else:
            raise EventTimeError(f"profile event_time {value!r} is not RFC 3339 text, a datetime or epoch ms")
    if texts:
        column = pa.array(list(texts.values()), pa.string())
        try:
            read = rfc3339_epoch_ms(column).to_pylist()
        except EventTimeError as exc:
            given = list(texts.values())
            bad = [given[i] for i in np.flatnonzero(malformed_times(column))] or given
            raise EventTimeError(f"profile event_time {bad[0]!r}: {exc}") from exc
        for i, ms in zip(texts, read, strict=True):
            out[i] = ms
    return out
