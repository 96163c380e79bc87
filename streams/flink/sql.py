"""Flink SQL for the stream features, generated from :mod:`features.definitions`.

Nothing here names a feature: every statement is derived from the feature groups, the
event-validation rules of the embedded decoder (:mod:`streams.engine.decode`) and the
lateness rule of its router (:mod:`streams.engine.router`), so a changed definition
changes both engines. The plan is pure Flink SQL (no Python functions: PyFlink's Python
UDFs run at a few thousand events/s, generated SQL runs in the JVM).

The pipeline, per feature group, reproduces the embedded engine's final features value
for value:

1. **Validation** restates the decoder's rules (known type, ids present, time inside
   2000..2100, per-type required fields, non-negative amounts, non-blank queries);
   rejected events count for nothing, in either engine.
2. **Lateness** is decided per *source partition* in read order, as the router does:
   ``MAX(event_time) OVER (PARTITION BY partition ORDER BY proctime ROWS UNBOUNDED
   PRECEDING)`` is the highest time seen so far in the partition (including the event,
   which changes nothing: an event is never later than itself), and an event more than
   ``allowed_lateness`` behind it is dropped (and written to the ``late`` output). This
   is deterministic because a partition is read by one source reader, in order, and Flink
   keeps the order of records between two operators. Flink's own watermark only decides
   when results are emitted, never what they are; see :func:`watermark_sql`.
3. **Tiles**: a ``TUMBLE`` of :data:`~features.definitions.TILE_SECONDS` per entity key
   gives one *anchor* row per (key, tile) with the tile's counts and sums, plus one row
   per (key, tile, value) for each distinct count.
4. **Windows**: a chain of ``OVER (PARTITION BY key ORDER BY tile_time RANGE BETWEEN
   INTERVAL W - tile PRECEDING AND CURRENT ROW)`` levels, one per window (Flink computes
   one OVER window per SELECT), adds ``SUM`` and ``COUNT(DISTINCT)`` over exactly the
   tiles starting at or after ``tile_end - W``; the anchor rows are the feature rows.
5. **Last N**: per tile the N latest candidates (window Top-N, ordered by time then
   event id, as the embedded engine breaks ties), each encoded as a text that sorts the
   same way; an ``ARRAY_AGG`` over the longest window's frame, sorted, reversed and cut
   to N, then stripped of the sort keys, is the list. (An interval join would also do,
   but Flink holds its output watermark back by the join's bound, here 7 days.)

Each feature row holds the features of one entity as of the end of one tile in which it
had events; the last one per entity is what the embedded engine leaves in the online
store, and every one is a correct point-in-time row for the offline store.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from features.definitions import FEATURE_GROUPS, QUERY_BLANK_RUNS, TILE_SECONDS, Aggregation, FeatureGroup
from infra.arrow_times import RFC3339_PATTERN
from streams.engine.decode import (
    ACTION_COLUMN,
    ALWAYS_PRESENT,
    DELETE_ACTION,
    EARLIEST_MS,
    FIELD_TYPES,
    LATEST_MS,
    NON_NEGATIVE,
    VERSION_FIELD,
    literal_rules,
    needed_columns,
    required_by_type,
    text_length_rules,
)
from streams.engine.router import forgets_users
from streams.events import EVENT_TYPE_NAMES, SCHEMA_VERSION

TILE_MS = TILE_SECONDS * 1000
EVENTS_TABLE = "adreach_events"
PARTITION_COLUMN = "src_partition"
EVENT_TIME_MS = "event_time_ms"
ROWTIME = "ts"
PROCTIME = "proc"
PARTITION_MAX = "partition_max_ms"
TIMESTAMP_MS = "event_timestamp_ms"
"""The output column with the end of the row's tile (epoch ms): Feast's event timestamp."""
LATE_OUTPUT = "_late"
DELETIONS_OUTPUT = "_deletions"

_FLINK_TYPES = {"string": "STRING", "int64": "BIGINT", "double": "DOUBLE"}
_FEATURE_TYPES = {"int64": "BIGINT", "float64": "DOUBLE", "string_list": "ARRAY<STRING>"}
_SEP1 = "U&'\\0001'"  # inside a last-N item: time, event id, value
_SEP2 = "U&'\\0002'"  # between items while the sort keys are cut off
_ITEM_PREFIX = r"[0-9]{13}\x01[^\x01]*\x01"
_MAX_INTERVAL_DAYS = 99  # Flink's DAY TO SECOND literals take two day digits


class FlinkSqlError(ValueError):
    """The feature definitions or settings cannot be expressed as this Flink job."""


def q(name: str) -> str:
    """A quoted Flink SQL identifier (``value``, ``type``, ``query`` are reserved words)."""
    return "`" + name.replace("`", "``") + "`"


# A user deletion (the embedded router's ``deletions``): never late, never counted, and its
# time (often the request's, not the stream's) moves neither a partition maximum nor Flink's
# watermark.
_DELETION = f"({q('type')} = 'user_profile' AND COALESCE({q(ACTION_COLUMN)} = '{DELETE_ACTION}', FALSE))"


def literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def interval(ms: int) -> str:
    """A ``DAY TO SECOND`` interval literal of ``ms`` milliseconds (at most 99 days)."""
    if ms < 0:
        raise FlinkSqlError(f"negative interval {ms} ms")
    days, rest = divmod(ms, 86_400_000)
    if days > _MAX_INTERVAL_DAYS:
        raise FlinkSqlError(f"interval of {days} days exceeds Flink's {_MAX_INTERVAL_DAYS}-day literals")
    hours, rest = divmod(rest, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    return f"INTERVAL '{days} {hours:02d}:{minutes:02d}:{seconds:02d}.{millis:03d}' DAY TO SECOND(3)"


def event_time_ms_sql(column: str = "event_time", *, max_future_ms: int = 0) -> str:
    """Epoch milliseconds of an RFC 3339 text with offset, NULL when it is not one.

    With ``max_future_ms`` > 0, also NULL when the time is more than that ahead of the
    job's clock (``stream.max_future_s``, the embedded router's rule): such an event is
    then invalid, and it moves no watermark, which one event from a clock running years
    ahead would otherwise push past every later event.

    Written with integer arithmetic (``UNIX_TIMESTAMP`` of the seconds, in the job's UTC
    session zone, plus the milliseconds, minus the offset) because Flink's
    ``TO_TIMESTAMP_LTZ(text, format)`` ignores the offset. Reads what the embedded
    decoder reads (:mod:`infra.arrow_times`): ``T``, ``t`` or a space between date and
    time, a lowercase ``z``, and fractions finer than a millisecond, truncated.
    """
    text = q(column)
    date_time = f"CONCAT(SUBSTRING({text} FROM 1 FOR 10), ' ', SUBSTRING({text} FROM 12 FOR 8))"
    seconds = f"UNIX_TIMESTAMP({date_time}, 'yyyy-MM-dd HH:mm:ss')"
    fraction = f"REGEXP_EXTRACT({text}, '\\.([0-9]+)', 1)"
    # RPAD both pads and cuts: "5" -> "500", "123456" -> "123" (truncated, as the decoder does)
    millis = f"CAST(RPAD(COALESCE({fraction}, ''), 3, '0') AS BIGINT)"
    zone = "'([+-])([0-9]{2}):?([0-9]{2})$'"
    sign = f"CASE WHEN REGEXP_EXTRACT({text}, {zone}, 1) = '-' THEN -1 ELSE 1 END"
    hours = f"CAST(REGEXP_EXTRACT({text}, {zone}, 2) AS BIGINT)"
    minutes = f"CAST(REGEXP_EXTRACT({text}, {zone}, 3) AS BIGINT)"
    offset_ms = f"{sign} * ({hours} * 3600000 + {minutes} * 60000)"
    offset = f"CASE WHEN UPPER({text}) LIKE '%Z' THEN 0 ELSE {offset_ms} END"
    parsed = (
        f"CASE WHEN REGEXP({text}, {literal(RFC3339_PATTERN)}) "
        f"THEN {seconds} * 1000 + {millis} - {offset} ELSE CAST(NULL AS BIGINT) END"
    )
    if max_future_ms <= 0:
        return parsed
    ahead = f"({parsed}) > UNIX_TIMESTAMP() * 1000 + {max_future_ms}"
    return f"CASE WHEN {ahead} THEN CAST(NULL AS BIGINT) ELSE {parsed} END"


def watermark_sql(delay_ms: int | None, max_future_ms: int = 0) -> str:
    """The watermark expression: the event time minus ``delay_ms`` (``None``: held until the end).

    Lateness is decided exactly by the per-partition rule above; the watermark only has to
    stay behind every event that rule keeps, or a tile would close before it arrives. With
    the Kafka source the watermark is generated per partition (Flink pushes it into the
    connector) and the operator watermark is the minimum over partitions, so a delay of
    ``allowed_lateness`` is exactly enough. The filesystem source reads its files one
    after another, so a later file's events can be far behind an earlier file's; there the
    default holds the watermark until the input ends.
    """
    held = delay_ms is None
    delay = 200 * 365 * 86_400_000 if held else delay_ms
    return f"TO_TIMESTAMP_LTZ(COALESCE({event_time_ms_sql(max_future_ms=max_future_ms)}, 0) - {delay}, 3)"


def _physical_columns(groups: Sequence[FeatureGroup]) -> list[str]:
    columns = [f"{q(name)} {_FLINK_TYPES[str(FIELD_TYPES[name])]}" for name in needed_columns(groups)]
    return [*columns, f"{q(VERSION_FIELD)} BIGINT"]


def _computed_columns(delay_ms: int | None, max_future_ms: int) -> list[str]:
    ms = event_time_ms_sql(max_future_ms=max_future_ms)
    return [
        f"{q(PROCTIME)} AS PROCTIME()",
        f"{q(EVENT_TIME_MS)} AS {ms}",
        # A user deletion's time (often the request's) must not move Flink's watermark
        # either: its row time is the epoch, which no watermark waits for.
        f"{q(ROWTIME)} AS TO_TIMESTAMP_LTZ(CASE WHEN {_DELETION} THEN 0 ELSE COALESCE({ms}, 0) END, 3)",
        f"WATERMARK FOR {q(ROWTIME)} AS {watermark_sql(delay_ms, max_future_ms)}",
    ]


def _with(options: Mapping[str, str]) -> str:
    return "WITH (\n  " + ",\n  ".join(f"{literal(k)} = {literal(v)}" for k, v in options.items()) + "\n)"


_JSON_SOURCE = {"format": "json", "json.ignore-parse-errors": "true", "json.fail-on-missing-field": "false"}


def files_source_ddl(
    path: str,
    *,
    delay_ms: int | None,
    monitor_interval_s: float | None = None,
    groups: Sequence[FeatureGroup] = FEATURE_GROUPS,
    max_future_ms: int = 0,
) -> str:
    """The filesystem source over JSON Lines files; each file is one source partition.

    Files ending in ``.gz`` are never split, so each is read by one reader in order; use
    one gzip file per Kafka partition, in offset order, to replay a topic exactly
    (:mod:`streams.flink.replay` writes them). Lines that are not JSON are skipped, as
    the embedded engine dead-letters them.
    """
    columns = [
        *_physical_columns(groups),
        f"{q(PARTITION_COLUMN)} STRING NOT NULL METADATA FROM 'file.path' VIRTUAL",
        *_computed_columns(delay_ms, max_future_ms),
    ]
    options = {"connector": "filesystem", "path": path, **_JSON_SOURCE}
    if monitor_interval_s is not None:
        options["source.monitor-interval"] = f"{int(monitor_interval_s * 1000)} ms"
    return f"CREATE TABLE {EVENTS_TABLE} (\n  " + ",\n  ".join(columns) + f"\n) {_with(options)}"


@dataclass(frozen=True)
class KafkaSource:
    """What the Kafka source DDL needs (from the settings; see :mod:`streams.flink.job`)."""

    topic: str
    bootstrap_servers: str
    group_id: str
    startup_mode: str = "earliest-offset"
    properties: Mapping[str, str] | None = None


def kafka_source_ddl(
    source: KafkaSource,
    *,
    delay_ms: int | None,
    groups: Sequence[FeatureGroup] = FEATURE_GROUPS,
    max_future_ms: int = 0,
) -> str:
    """The events topic through the Flink Kafka SQL connector, partition number as the source partition.

    The connector generates watermarks per Kafka partition (watermark push-down), which
    with a delay of ``allowed_lateness`` keeps Flink's watermark behind every event the
    per-partition lateness rule keeps. Idle partitions hold the watermark back (results
    wait for them); ``table.exec.source.idle-timeout`` would release it but could then
    drop events of a partition that wakes up behind the others.
    """
    columns = [
        *_physical_columns(groups),
        f"{q(PARTITION_COLUMN + '_id')} INT NOT NULL METADATA FROM 'partition' VIRTUAL",
        *_computed_columns(delay_ms, max_future_ms),
    ]
    options = {
        "connector": "kafka",
        "topic": source.topic,
        "properties.bootstrap.servers": source.bootstrap_servers,
        "properties.group.id": source.group_id,
        "properties.isolation.level": "read_committed",
        "scan.startup.mode": source.startup_mode,
        **_JSON_SOURCE,
    }
    if source.startup_mode == "group-offsets":  # a new group starts at the beginning, not the end
        options["properties.auto.offset.reset"] = "earliest"
    for key, value in (source.properties or {}).items():
        options[f"properties.{key}"] = value
    return f"CREATE TABLE {EVENTS_TABLE} (\n  " + ",\n  ".join(columns) + f"\n) {_with(options)}"


def _key_sql(group: FeatureGroup) -> str:
    # mirrors features.definitions.normalize_query / streams.engine.router.normalize_queries
    if group.key == "query":
        return f"LOWER(TRIM(REGEXP_REPLACE({q('query')}, {literal(QUERY_BLANK_RUNS)}, ' ')))"
    return q(group.key)


def _types_in(types: Sequence[str]) -> str:
    return f"{q('type')} IN ({', '.join(literal(t) for t in sorted(types))})"


def validation_sql(groups: Sequence[FeatureGroup] = FEATURE_GROUPS) -> str:
    """The conditions under which the embedded decoder accepts an event (see its ``_check``)."""
    columns = needed_columns(groups)
    version = q(VERSION_FIELD)
    conditions = [_types_in(EVENT_TYPE_NAMES), f"{version} IS NULL OR {version} = {SCHEMA_VERSION}"]
    for name in ("event_id", "user_id"):
        conditions.append(f"{q(name)} IS NOT NULL AND CHAR_LENGTH({q(name)}) > 0")
    ms = q(EVENT_TIME_MS)
    conditions.append(f"{ms} IS NOT NULL AND {ms} >= {EARLIEST_MS} AND {ms} < {LATEST_MS}")
    for event_type, required in required_by_type(columns).items():
        missing = [f"{q(name)} IS NULL" for name in required if name not in ALWAYS_PRESENT]
        if missing:
            conditions.append(f"NOT ({q('type')} = {literal(event_type)} AND ({' OR '.join(missing)}))")
    for (name, shortest, longest), event_types in text_length_rules(columns).items():
        length = f"CHAR_LENGTH({q(name)})"
        outside = f"{length} < {shortest}" + (f" OR {length} > {longest}" if longest is not None else "")
        conditions.append(f"NOT ({_types_in(event_types)} AND {q(name)} IS NOT NULL AND ({outside}))")
    for (name, values), event_types in literal_rules(columns).items():
        allowed = ", ".join(literal(value) for value in values)
        conditions.append(
            f"NOT ({_types_in(event_types)} AND {q(name)} IS NOT NULL AND {q(name)} NOT IN ({allowed}))"
        )
    for name in NON_NEGATIVE:
        if name in columns:
            conditions.append(f"({q(name)} IS NULL OR {q(name)} >= 0)")
    if "query" in columns:
        blank = f"CHAR_LENGTH(TRIM(REGEXP_REPLACE({q('query')}, {literal(QUERY_BLANK_RUNS)}, ' '))) = 0"
        conditions.append(f"NOT ({q('type')} = 'search' AND ({q('query')} IS NULL OR {blank}))")
    return "\n  AND ".join(f"({c})" for c in conditions)


def lateness_views(allowed_lateness_ms: int, groups: Sequence[FeatureGroup] = FEATURE_GROUPS) -> list[str]:
    """Views ``adreach_valid``, ``adreach_ordered``, ``adreach_on_time`` and ``adreach_late``."""
    columns = ", ".join(q(c) for c in needed_columns(groups) if c != "event_time")
    return [
        f"CREATE TEMPORARY VIEW adreach_valid AS SELECT {columns}, {q(EVENT_TIME_MS)}, {q(ROWTIME)}, "
        f"{q(PROCTIME)}, CAST({q(PARTITION_COLUMN)} AS STRING) AS {q(PARTITION_COLUMN)} "
        f"FROM {EVENTS_TABLE} WHERE {validation_sql(groups)}",
        # (a deletion's time moves no partition maximum, as in the embedded router)
        f"CREATE TEMPORARY VIEW adreach_ordered AS SELECT *, "
        f"MAX(CASE WHEN {_DELETION} THEN CAST(NULL AS BIGINT) ELSE {q(EVENT_TIME_MS)} END) OVER ("
        f"PARTITION BY {q(PARTITION_COLUMN)} ORDER BY {q(PROCTIME)} "
        f"ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS {q(PARTITION_MAX)} FROM adreach_valid",
        f"CREATE TEMPORARY VIEW adreach_on_time AS SELECT * FROM adreach_ordered "
        f"WHERE {q(EVENT_TIME_MS)} >= {q(PARTITION_MAX)} - {allowed_lateness_ms}",
        f"CREATE TEMPORARY VIEW adreach_late AS SELECT * FROM adreach_ordered "
        f"WHERE {q(EVENT_TIME_MS)} < {q(PARTITION_MAX)} - {allowed_lateness_ms} AND NOT ({_DELETION})",
    ]


def _tile_tvf(view: str) -> str:
    return f"TABLE(TUMBLE(TABLE {view}, DESCRIPTOR({q(ROWTIME)}), {interval(TILE_MS)}))"


@dataclass(frozen=True)
class GroupPlan:
    """The views and sink of one feature group (see the module docstring for the steps)."""

    group: FeatureGroup

    @property
    def prefix(self) -> str:
        return f"{self.group.name}__"

    @property
    def sink(self) -> str:
        return f"{self.prefix}sink"

    @property
    def additive(self) -> tuple[Aggregation, ...]:
        return tuple(a for a in self.group.aggregations if a.kind in ("count", "sum"))

    @property
    def distinct(self) -> tuple[Aggregation, ...]:
        return tuple(a for a in self.group.aggregations if a.kind == "distinct_count")

    @property
    def last_n(self) -> tuple[Aggregation, ...]:
        return tuple(a for a in self.group.aggregations if a.kind == "last_n")

    def _v(self, name: str) -> str:
        return q(self.prefix + name)

    def _events(self) -> str:
        group = self.group
        types = sorted({t for a in group.aggregations for t in a.event_types})
        columns = sorted({a.column for a in group.aggregations if a.column} - {"type", "event_id"})
        selected = ", ".join(q(c) for c in ("type", "event_id", *columns))
        key = _key_sql(group)
        return (
            f"CREATE TEMPORARY VIEW {self._v('events')} AS SELECT {key} AS k, {selected}, "
            f"{q(EVENT_TIME_MS)}, {q(ROWTIME)} FROM adreach_on_time "
            f"WHERE {_types_in(types)} AND {key} IS NOT NULL"
        )

    def _null_columns(self, keep: str | None = None) -> dict[str, str]:
        """Every unified-row column, NULL (typed), except ``keep``."""
        columns: dict[str, str] = {}
        for a in self.additive:
            columns[f"a__{a.name}"] = f"CAST(NULL AS {'BIGINT' if a.kind == 'count' else 'DOUBLE'})"
        for a in self.distinct:
            columns[f"d__{a.name}"] = "CAST(NULL AS STRING)"
        for a in self.last_n:
            columns[f"i__{a.name}"] = "CAST(NULL AS STRING)"
        if keep is not None:
            columns.pop(keep)
        return columns

    def _row(self, anchor: bool, values: Mapping[str, str]) -> str:
        """The SELECT list of one unified row kind: key, tile time, tile end, anchor flag, the columns."""
        end = (
            f"MAX({q(EVENT_TIME_MS)}) - MOD(MAX({q(EVENT_TIME_MS)}), {TILE_MS}) + {TILE_MS}"
            if anchor
            else "CAST(NULL AS BIGINT)"
        )
        columns = {**self._null_columns(), **values}
        return f"SELECT k, window_time AS wt, {end} AS end_ms, {str(anchor).upper()} AS anchor, " + ", ".join(
            f"{v} AS {q(n)}" for n, v in columns.items()
        )

    def _last_n_items(self) -> list[str]:
        """Per last-N aggregation, the N latest candidates of each (entity, tile), encoded for sorting.

        An item is ``<event time, 13 digits> U+0001 <event id> U+0001 <value>``: sorting the
        texts sorts by time, then event id (the embedded engine's order; ids and values must
        not contain U+0001 or U+0002).
        """
        statements: list[str] = []
        for a in self.last_n:
            column = q(a.column or "")
            source = self._v(f"cand_{a.name}")
            statements.append(
                f"CREATE TEMPORARY VIEW {source} AS SELECT k, {q('event_id')}, {q(EVENT_TIME_MS)}, "
                f"CAST({column} AS STRING) AS v, {q(ROWTIME)} FROM {self._v('events')} "
                f"WHERE {_types_in(a.event_types)} AND {column} IS NOT NULL"
            )
            item = (
                f"CONCAT(LPAD(CAST({q(EVENT_TIME_MS)} AS STRING), 13, '0'), {_SEP1}, {q('event_id')}, "
                f"{_SEP1}, v)"
            )
            statements.append(
                f"CREATE TEMPORARY VIEW {self._v(f'top_{a.name}')} AS "
                f"SELECT k, window_time, {item} AS item FROM ("
                f"SELECT *, ROW_NUMBER() OVER (PARTITION BY window_start, window_end, k "
                f"ORDER BY {q(EVENT_TIME_MS)} DESC, {q('event_id')} DESC) AS rn FROM {_tile_tvf(source)}) "
                f"WHERE rn <= {a.n}"
            )
        return statements

    def _tiles(self) -> list[str]:
        tvf = _tile_tvf(self._v("events"))
        values: dict[str, str] = {}
        for a in self.additive:
            matches = _types_in(a.event_types)
            if a.kind == "count":
                values[f"a__{a.name}"] = f"SUM(CASE WHEN {matches} THEN CAST(1 AS BIGINT) ELSE 0 END)"
            else:
                column = q(a.column or "")
                values[f"a__{a.name}"] = (
                    f"SUM(CASE WHEN {matches} AND {column} IS NOT NULL THEN CAST({column} AS DOUBLE) "
                    "ELSE CAST(0 AS DOUBLE) END)"
                )
        selects = [self._row(True, values) + f" FROM {tvf} GROUP BY k, window_start, window_end, window_time"]
        for a in self.distinct:
            column = q(a.column or "")
            selects.append(
                self._row(False, {f"d__{a.name}": f"CAST({column} AS STRING)"})
                + f" FROM {tvf} WHERE {_types_in(a.event_types)} AND {column} IS NOT NULL "
                f"GROUP BY k, {column}, window_start, window_end, window_time"
            )
        for a in self.last_n:
            selects.append(self._row(False, {f"i__{a.name}": "item"}) + f" FROM {self._v(f'top_{a.name}')}")
        return [f"CREATE TEMPORARY VIEW {self._v('tiles')} AS " + "\nUNION ALL\n".join(selects)]

    def _windows(self) -> tuple[list[str], str]:
        """The OVER levels; returns the statements and the last level's view name."""
        statements: list[str] = []
        previous = self._v("tiles")
        lists_done = False

        def frame(ms: int) -> str:
            preceding = interval(ms - TILE_MS)
            return f"OVER (PARTITION BY k ORDER BY wt RANGE BETWEEN {preceding} PRECEDING AND CURRENT ROW)"

        for index, window in enumerate(self.group.windows):
            over = frame(window.seconds * 1000)
            outputs = [
                f"SUM({q('a__' + a.name)}) {over} AS {q(f'{a.name}_{window.name}')}" for a in self.additive
            ]
            outputs += [
                f"COUNT(DISTINCT {q('d__' + a.name)}) {over} AS {q(f'{a.name}_{window.name}')}"
                for a in self.distinct
            ]
            if window == self.group.longest_window and not lists_done:  # last-N lists share its frame
                outputs += [
                    f"ARRAY_AGG({q('i__' + a.name)}) {over} AS {q('l__' + a.name)}" for a in self.last_n
                ]
                lists_done = True
            if not outputs:
                continue
            view = self._v(f"w{index}")
            statements.append(
                f"CREATE TEMPORARY VIEW {view} AS SELECT *, {', '.join(outputs)} FROM {previous}"
            )
            previous = view
        return statements, previous

    def windowed_columns(self) -> list[str]:
        return [
            f"{a.name}_{w.name}" for a in self.group.aggregations if a.windowed for w in self.group.windows
        ]

    def _features(self, last_level: str) -> str:
        columns = ["k", "wt", "end_ms", *(q(c) for c in self.windowed_columns())]
        for a in self.last_n:
            items = f"ARRAY_REMOVE({q('l__' + a.name)}, CAST(NULL AS STRING))"
            latest = f"ARRAY_SLICE(ARRAY_REVERSE(ARRAY_SORT({items})), 1, {a.n})"
            values = (
                f"SPLIT(REGEXP_REPLACE(ARRAY_JOIN({latest}, {_SEP2}), {literal(_ITEM_PREFIX)}, ''), {_SEP2})"
            )
            columns.append(
                f"CASE WHEN CARDINALITY({items}) > 0 THEN {values} ELSE CAST(NULL AS ARRAY<STRING>) END "
                f"AS {q(a.name)}"
            )
        return (
            f"CREATE TEMPORARY VIEW {self._v('features')} AS SELECT {', '.join(columns)} "
            f"FROM {last_level} WHERE anchor"
        )

    def views(self) -> list[str]:
        statements = [self._events(), *self._last_n_items(), *self._tiles()]
        levels, last_level = self._windows()
        return [*statements, *levels, self._features(last_level)]

    def sink_columns(self) -> list[tuple[str, str]]:
        """(name, Flink type) of the output rows: key, tile end (epoch ms), features in Feast's order."""
        columns = [(self.group.key, "STRING"), (TIMESTAMP_MS, "BIGINT")]
        return columns + [(f.name, _FEATURE_TYPES[f.type]) for f in self.group.features()]

    def insert(self) -> str:
        group = self.group
        source = self._v("features")
        outputs = [f"k AS {q(group.key)}", f"end_ms AS {q(TIMESTAMP_MS)}"]
        for feature in group.features():
            outputs.append(q(feature.name))
        for ratio in group.ratios:
            for w in group.windows:
                num, den = q(f"{ratio.numerator}_{w.name}"), q(f"{ratio.denominator}_{w.name}")
                name = q(f"{ratio.name}_{w.name}")
                outputs[outputs.index(name)] = (
                    f"CASE WHEN {den} > 0 THEN CAST({num} AS DOUBLE) / CAST({den} AS DOUBLE) "
                    f"ELSE CAST(0 AS DOUBLE) END AS {name}"
                )
        return f"INSERT INTO {q(self.sink)} SELECT {', '.join(outputs)} FROM {source}"


def sink_ddl(name: str, columns: Sequence[tuple[str, str]], options: Mapping[str, str]) -> str:
    body = ",\n  ".join(f"{q(column)} {kind}" for column, kind in columns)
    return f"CREATE TABLE {q(name)} (\n  {body}\n) {_with(options)}"


def late_columns(groups: Sequence[FeatureGroup] = FEATURE_GROUPS) -> list[tuple[str, str]]:
    """Columns of the ``late`` output: enough to find the event and see why it was dropped."""
    return [
        (PARTITION_COLUMN, "STRING"),
        ("event_id", "STRING"),
        ("type", "STRING"),
        ("user_id", "STRING"),
        (EVENT_TIME_MS, "BIGINT"),
        (PARTITION_MAX, "BIGINT"),
    ]


def late_insert(sink: str, groups: Sequence[FeatureGroup] = FEATURE_GROUPS) -> str:
    names = ", ".join(q(name) for name, _ in late_columns(groups))
    return f"INSERT INTO {q(sink)} SELECT {names} FROM adreach_late"


def deletion_columns() -> list[tuple[str, str]]:
    """Columns of the ``deletions`` output: the deleted user and the deletion's time."""
    return [("user_id", "STRING"), (EVENT_TIME_MS, "BIGINT"), ("event_id", "STRING")]


def deletions_insert(sink: str) -> str:
    """Every valid user deletion, on time or not (the writer deletes the user's stored features)."""
    names = ", ".join(q(name) for name, _ in deletion_columns())
    return f"INSERT INTO {q(sink)} SELECT {names} FROM adreach_valid WHERE {_DELETION}"


@dataclass(frozen=True)
class JobSql:
    """Every statement of the job: the source, views and sinks, then the inserts (one statement set)."""

    ddl: list[str]
    inserts: list[str]

    def script(self) -> str:
        """The whole job as one SQL script (for review, or for Flink's SQL client)."""
        return ";\n\n".join([*self.ddl, *self.inserts]) + ";\n"


def job_sql(
    source_ddl: str,
    sink_options: Mapping[str, Mapping[str, str]],
    *,
    allowed_lateness_ms: int,
    groups: Sequence[FeatureGroup] = FEATURE_GROUPS,
    late_sink_options: Mapping[str, str] | None = None,
    deletions_sink_options: Mapping[str, str] | None = None,
) -> JobSql:
    """The job for ``groups``: ``sink_options`` gives each group's sink connector options.

    ``deletions_sink_options``: where user deletions go, for the writer (needed when a
    group is keyed by user: Flink's windows cannot forget a user, the writer does).
    """
    missing = [g.name for g in groups if g.name not in sink_options]
    if missing:
        raise FlinkSqlError(f"no sink options for feature groups {missing}")
    ddl = [source_ddl, *lateness_views(allowed_lateness_ms, groups)]
    inserts: list[str] = []
    for group in groups:
        plan = GroupPlan(group)
        ddl += plan.views()
        ddl.append(sink_ddl(plan.sink, plan.sink_columns(), sink_options[group.name]))
        inserts.append(plan.insert())
    if late_sink_options is not None:
        ddl.append(sink_ddl(LATE_OUTPUT, late_columns(groups), late_sink_options))
        inserts.append(late_insert(LATE_OUTPUT, groups))
    if deletions_sink_options is not None and any(forgets_users(group) for group in groups):
        ddl.append(sink_ddl(DELETIONS_OUTPUT, deletion_columns(), deletions_sink_options))
        inserts.append(deletions_insert(DELETIONS_OUTPUT))
    return JobSql(ddl, inserts)
