"""The reference computation of stream features: one SQL query per group, run by DuckDB.

Stream engines are checked against this, so it favours being obviously right over
being fast. It applies the semantics in :mod:`features.definitions` literally: each
entity's features are taken as of the end of the tile holding its latest event, over
all the events given (lateness rules are the engines' business, not the reference's).
A user deletion (a ``user_profile`` event with ``"action": "delete"``, when the input has
an ``action`` column) leaves out the user's events up to its event time in the groups
keyed by user; the engines also forget events with later times read before the
deletion (see :mod:`streams.engine.forget`), which inputs in time order never have.

The input is an Arrow table with the event columns (``type``, ``event_id``,
``event_time`` and whichever columns the definitions read), such as the simulator's
Parquet output.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa

from features.definitions import QUERY_BLANK_RUNS, TILE_SECONDS, Aggregation, FeatureGroup

# SQL for the query entity's key; mirrors features.definitions.normalize_query.
_KEY_SQL = {"query": f"lower(trim(regexp_replace(query, '{QUERY_BLANK_RUNS}', ' ', 'g')))"}


def feature_sql(group: FeatureGroup, source: str = "events", *, deletions: bool = False) -> str:
    """The DuckDB query computing ``group``'s features from the table named ``source``.

    ``deletions``: ``source`` has an ``action`` column, whose user deletions apply (to a
    group keyed by user).
    """
    tile_ms = TILE_SECONDS * 1000
    key_sql = _KEY_SQL.get(group.key, group.key)
    types = sorted({t for a in group.aggregations for t in a.event_types})
    columns = sorted({a.column for a in group.aggregations if a.column} - {group.key})
    type_list = ", ".join(f"'{t}'" for t in types)
    selected = ", ".join(["type", "event_id", "epoch_ms(event_time) AS t", *columns])
    outputs = [
        f"{_aggregate_sql(a, w.seconds * 1000, group)} AS {a.name}_{w.name}"
        for a in group.aggregations
        if a.windowed
        for w in group.windows
    ]
    outputs += [
        f"{_aggregate_sql(a, group.longest_window.seconds * 1000, group)} AS {a.name}"
        for a in group.aggregations
        if not a.windowed
    ]
    ratios = [
        f"CASE WHEN {r.denominator}_{w.name} > 0 THEN {r.numerator}_{w.name} / {r.denominator}_{w.name} "
        f"ELSE 0.0 END AS {r.name}_{w.name}"
        for r in group.ratios
        for w in group.windows
    ]
    output_sql = ",\n        ".join(outputs)
    ratio_sql = "".join(f",\n    {ratio}" for ratio in ratios)
    timestamp_sql = "make_timestamp(CAST(end_ms * 1000 AS BIGINT)) AS event_timestamp"
    forgotten = ""
    if deletions and group.key == "user_id":
        forgotten = (
            f"AND NOT EXISTS (SELECT 1 FROM {source} AS d WHERE d.type = 'user_profile' AND d.action = "
            f"'delete' AND d.user_id = {source}.user_id AND d.event_time >= {source}.event_time)"
        )
    return f"""
WITH ev AS (
    SELECT {key_sql} AS {group.key}, {selected}
    FROM {source}
    WHERE type IN ({type_list}) AND {key_sql} IS NOT NULL {forgotten}
),
as_of AS (
    SELECT {group.key}, (floor(max(t) / {tile_ms}) + 1) * {tile_ms} AS end_ms
    FROM ev GROUP BY {group.key}
),
features AS (
    SELECT ev.{group.key}, as_of.end_ms,
        {output_sql}
    FROM ev JOIN as_of USING ({group.key})
    WHERE ev.t < as_of.end_ms
    GROUP BY ev.{group.key}, as_of.end_ms
)
SELECT {group.key}, {timestamp_sql}, * EXCLUDE ({group.key}, end_ms){ratio_sql}
FROM features
ORDER BY {group.key}
"""


def _aggregate_sql(aggregation: Aggregation, window_ms: int, group: FeatureGroup) -> str:
    in_window = (
        f"type IN ({', '.join(repr(t) for t in aggregation.event_types)}) AND t >= as_of.end_ms - {window_ms}"
    )
    column = aggregation.column
    if column == group.key:
        column = f"ev.{column}"
    if aggregation.kind == "count":
        return f"count(*) FILTER (WHERE {in_window})"
    if aggregation.kind == "sum":
        return f"coalesce(sum(CAST({column} AS DOUBLE)) FILTER (WHERE {in_window}), 0.0)"
    if aggregation.kind == "distinct_count":
        return f"count(DISTINCT {column}) FILTER (WHERE {in_window})"
    # last_n: most recent first; ties broken by event_id so the answer is unique.
    return (
        f"coalesce(list({column} ORDER BY t DESC, event_id DESC) "
        f"FILTER (WHERE {in_window} AND {column} IS NOT NULL), [])[1:{aggregation.n}]"
    )


def reference_features(events: pa.Table, group: FeatureGroup) -> pa.Table:
    """Each entity's features as of the end of the tile holding its latest event."""
    connection = duckdb.connect()
    try:
        connection.register("events", events)
        sql = feature_sql(group, deletions="action" in events.column_names)
        table = connection.sql(sql).arrow().read_all()  # duckdb 2.0: arrow() is a reader
    finally:
        connection.close()
    # The SQL computes UTC instants as naive timestamps; say so, as Feast requires.
    position = table.schema.get_field_index("event_timestamp")
    return table.set_column(
        position, "event_timestamp", table.column(position).cast(pa.timestamp("us", "UTC"))
    )
