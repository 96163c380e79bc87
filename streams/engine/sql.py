"""DuckDB SQL for a shard's windowed state, generated from the feature definitions.

Per feature group the state is a handful of tables:

* ``<group>_tiles (k, tile, <one column per count/sum>)``: partial aggregates per
  entity and :data:`~features.definitions.TILE_SECONDS` tile. A window W as of
  ``end`` is the sum over tiles starting at or after ``end - W`` (windows and ``end``
  are tile-aligned, so this is exact).
* ``<group>_<agg>_seen (k, value, t)``: for a distinct count, the latest time each
  value was seen; the distinct count over W is the number of values seen since
  ``end - W``. Exact, and bounded by the number of distinct values in the longest window.
* ``<group>_<agg>_last (k, t, event_id, value)``: candidates for a "last N" list,
  trimmed to N per entity when the shard compacts.
* ``<group>_latest (k, t)``: each entity's latest event time; features are computed
  as of the end of its tile (:mod:`features.definitions`).

Every update statement is an ``INSERT ... ON CONFLICT DO UPDATE`` over the batch
aggregated by DuckDB, so a micro-batch costs a few vectorized statements per group.
"""

from __future__ import annotations

from dataclasses import dataclass

from features.definitions import TILE_SECONDS, Aggregation, FeatureGroup
from streams.engine.router import MASK_COLUMN, key_column

TILE_MS = TILE_SECONDS * 1000


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _types(aggregation: Aggregation) -> str:
    return ", ".join(f"'{t}'" for t in aggregation.event_types)


@dataclass(frozen=True)
class GroupSql:
    """The statements maintaining and reading one group's state (see the module docstring)."""

    group: FeatureGroup
    bit: int

    @property
    def tiles(self) -> str:
        return _q(f"{self.group.name}_tiles")

    @property
    def latest(self) -> str:
        return _q(f"{self.group.name}_latest")

    def seen(self, aggregation: Aggregation) -> str:
        return _q(f"{self.group.name}_{aggregation.name}_seen")

    def last(self, aggregation: Aggregation) -> str:
        return _q(f"{self.group.name}_{aggregation.name}_last")

    @property
    def additive(self) -> tuple[Aggregation, ...]:
        return tuple(a for a in self.group.aggregations if a.kind in ("count", "sum"))

    @property
    def distinct(self) -> tuple[Aggregation, ...]:
        return tuple(a for a in self.group.aggregations if a.kind == "distinct_count")

    @property
    def last_n(self) -> tuple[Aggregation, ...]:
        return tuple(a for a in self.group.aggregations if a.kind == "last_n")

    def create(self) -> list[str]:
        statements = [f"CREATE TABLE IF NOT EXISTS {self.latest} (k VARCHAR PRIMARY KEY, t BIGINT NOT NULL)"]
        if self.additive:
            columns = ", ".join(
                f"{_q(a.name)} {'BIGINT' if a.kind == 'count' else 'DOUBLE'} NOT NULL" for a in self.additive
            )
            statements.append(
                f"CREATE TABLE IF NOT EXISTS {self.tiles} "
                f"(k VARCHAR NOT NULL, tile BIGINT NOT NULL, {columns}, PRIMARY KEY (k, tile))"
            )
        for a in self.distinct:
            statements.append(
                f"CREATE TABLE IF NOT EXISTS {self.seen(a)} "
                "(k VARCHAR NOT NULL, value VARCHAR NOT NULL, t BIGINT NOT NULL, PRIMARY KEY (k, value))"
            )
        for a in self.last_n:
            statements.append(
                f"CREATE TABLE IF NOT EXISTS {self.last(a)} "
                "(k VARCHAR NOT NULL, t BIGINT NOT NULL, event_id VARCHAR NOT NULL, value VARCHAR NOT NULL)"
            )
        return statements

    @property
    def _rows(self) -> str:
        """The batch's rows counted by this group, as ``ev`` (key ``k``, time ``t``)."""
        types = sorted({t for a in self.group.aggregations for t in a.event_types})
        type_list = ", ".join(f"'{t}'" for t in types)
        return (
            f"ev AS (SELECT {_q(key_column(self.group))} AS k, event_time_ms AS t, * "
            f"FROM batch WHERE ({MASK_COLUMN} & {1 << self.bit}) <> 0 AND type IN ({type_list}))"
        )

    def update(self) -> list[str]:
        """Statements folding the registered Arrow table ``batch`` into the state."""
        statements = [
            f"WITH {self._rows} INSERT INTO {self.latest} SELECT k, max(t) FROM ev GROUP BY k "
            f"ON CONFLICT (k) DO UPDATE SET t = greatest(t, excluded.t)"
        ]
        if self.additive:
            selects = []
            for a in self.additive:
                where = f"type IN ({_types(a)})"
                if a.kind == "count":
                    selects.append(f"count(*) FILTER (WHERE {where}) AS {_q(a.name)}")
                else:
                    selects.append(
                        f"coalesce(sum(CAST({_q(a.column or '')} AS DOUBLE)) FILTER (WHERE {where}), 0.0) "
                        f"AS {_q(a.name)}"
                    )
            sets = ", ".join(f"{_q(a.name)} = {_q(a.name)} + excluded.{_q(a.name)}" for a in self.additive)
            statements.append(
                f"WITH {self._rows} INSERT INTO {self.tiles} SELECT k, t // {TILE_MS} AS tile, "
                f"{', '.join(selects)} FROM ev GROUP BY k, tile ON CONFLICT (k, tile) DO UPDATE SET {sets}"
            )
        for a in self.distinct:
            column = _q(a.column or "")
            statements.append(
                f"WITH {self._rows} INSERT INTO {self.seen(a)} SELECT k, CAST({column} AS VARCHAR), max(t) "
                f"FROM ev WHERE type IN ({_types(a)}) AND {column} IS NOT NULL GROUP BY ALL "
                "ON CONFLICT (k, value) DO UPDATE SET t = greatest(t, excluded.t)"
            )
        for a in self.last_n:
            statements.append(
                f"WITH {self._rows} INSERT INTO {self.last(a)} SELECT k, t, event_id, "
                f"CAST({_q(a.column or '')} AS VARCHAR) FROM ev "
                f"WHERE type IN ({_types(a)}) AND {_q(a.column or '')} IS NOT NULL"
            )
        return statements

    def features(self) -> str:
        """Features of the entities in ``batch``, as of the end of each one's latest tile."""
        group = self.group
        longest = group.longest_window.seconds * 1000
        ctes = [
            self._rows,
            "changed AS (SELECT DISTINCT k FROM ev)",
            f"as_of AS (SELECT l.k, (l.t // {TILE_MS} + 1) * {TILE_MS} AS end_ms "
            f"FROM {self.latest} l JOIN changed USING (k))",
        ]
        outputs: list[str] = []
        joins: list[str] = []
        if self.additive:
            sums = []
            for a in self.additive:
                for w in group.windows:
                    column = f"{a.name}_{w.name}"
                    since = f"a.end_ms - {w.seconds * 1000}"
                    sums.append(
                        f"sum(s.{_q(a.name)}) FILTER (WHERE s.tile * {TILE_MS} >= {since}) AS {_q(column)}"
                    )
            ctes.append(
                f"tiles AS (SELECT s.k, {', '.join(sums)} FROM {self.tiles} s JOIN as_of a USING (k) "
                f"WHERE s.tile * {TILE_MS} >= a.end_ms - {longest} GROUP BY s.k)"
            )
            joins.append("LEFT JOIN tiles USING (k)")
        for index, a in enumerate(self.distinct):
            name = f"seen{index}"
            counts = ", ".join(
                f"count(*) FILTER (WHERE s.t >= a.end_ms - {w.seconds * 1000}) AS {_q(f'{a.name}_{w.name}')}"
                for w in group.windows
            )
            ctes.append(
                f"{name} AS (SELECT s.k, {counts} FROM {self.seen(a)} s JOIN as_of a USING (k) "
                f"WHERE s.t >= a.end_ms - {longest} GROUP BY s.k)"
            )
            joins.append(f"LEFT JOIN {name} USING (k)")
        for index, a in enumerate(self.last_n):
            name = f"last{index}"
            ctes.append(
                f"{name} AS (SELECT s.k, list(s.value ORDER BY s.t DESC, s.event_id DESC)[1:{a.n}] "
                f"AS {_q(a.name)} FROM {self.last(a)} s JOIN as_of a USING (k) "
                f"WHERE s.t >= a.end_ms - {longest} GROUP BY s.k)"
            )
            joins.append(f"LEFT JOIN {name} USING (k)")
        for a in group.aggregations:
            if a.kind == "last_n":
                outputs.append(f"coalesce({_q(a.name)}, []::VARCHAR[]) AS {_q(a.name)}")
                continue
            for w in group.windows:
                column = _q(f"{a.name}_{w.name}")
                if a.kind == "sum":
                    outputs.append(f"coalesce({column}, 0.0)::DOUBLE AS {column}")
                else:
                    outputs.append(f"coalesce({column}, 0)::BIGINT AS {column}")
        for r in group.ratios:
            for w in group.windows:
                num, den = _q(f"{r.numerator}_{w.name}"), _q(f"{r.denominator}_{w.name}")
                outputs.append(
                    f"CASE WHEN coalesce({den}, 0) > 0 THEN coalesce({num}, 0) / {den} ELSE 0.0 END::DOUBLE "
                    f"AS {_q(f'{r.name}_{w.name}')}"
                )
        return (
            f"WITH {', '.join(ctes)} SELECT as_of.k AS {_q(group.key)}, "
            f"make_timestamp(as_of.end_ms * 1000) AS event_timestamp, {', '.join(outputs)} "
            f"FROM as_of {' '.join(joins)}"
        )

    def compact(self, horizon_ms: int) -> list[str]:
        """Drop state no future feature can read (older than ``horizon_ms``) and trim last-N lists."""
        statements = (
            [f"DELETE FROM {self.tiles} WHERE tile * {TILE_MS} < {horizon_ms}"] if self.additive else []
        )
        statements += [f"DELETE FROM {self.seen(a)} WHERE t < {horizon_ms}" for a in self.distinct]
        for a in self.last_n:
            table = self.last(a)
            statements.append(
                f"DELETE FROM {table} WHERE t < {horizon_ms} OR rowid IN (SELECT rowid FROM "
                f"(SELECT rowid, row_number() OVER (PARTITION BY k ORDER BY t DESC, event_id DESC) AS n "
                f"FROM {table}) WHERE n > {a.n})"
            )
        return statements
