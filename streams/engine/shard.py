"""Stage two of the engine: one shard's windowed state, in a DuckDB file with its offsets.

A shard is one partition of the repartition topic. Its state tables (see
:mod:`streams.engine.sql`) and its progress (the next repartition offset to read, and
per source partition the highest source offset already applied) live in one DuckDB
database file, changed inside one transaction that the worker commits only after the
features it produced are stored. A crash at any point therefore leaves the file at the
last commit, whose offsets say exactly where to resume: nothing is lost, and rows that
a replaying router sends again are recognised by their source offsets and skipped.

Because everything about a shard is in its file, a shard can move between workers on a
rebalance: the new owner opens the file (on a shared state directory) and goes on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from features.definitions import FEATURE_GROUPS, FeatureGroup
from streams.engine.router import SOURCE_OFFSET, SOURCE_PARTITION
from streams.engine.sql import GroupSql

_CONSUMED = "consumed"


class ShardState:
    """The state of shard ``shard`` stored at ``path``; see the module docstring."""

    def __init__(
        self,
        path: Path,
        shard: int,
        groups: Sequence[FeatureGroup] = FEATURE_GROUPS,
        *,
        memory_limit: str = "1GB",
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.shard = shard
        self.sql = [GroupSql(group, bit) for bit, group in enumerate(groups)]
        self._db = duckdb.connect(str(path), config={"threads": 1, "memory_limit": memory_limit})
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS progress (name VARCHAR PRIMARY KEY, value BIGINT NOT NULL)"
        )
        for group_sql in self.sql:
            for statement in group_sql.create():
                self._db.execute(statement)
        progress = dict(self._db.execute("SELECT name, value FROM progress").fetchall())
        self.next_offset: int | None = progress.pop(_CONSUMED, None)
        self.applied: dict[int, int] = {int(name.split(":")[1]): value for name, value in progress.items()}
        self._max_time = self._latest_time()
        self._in_transaction = False
        self._dirty_sources: set[int] = set()
        self._consumed_changed = False

    def _latest_time(self) -> int:
        times = [
            self._db.execute(f"SELECT coalesce(max(t), 0) FROM {group_sql.latest}").fetchall()[0][0]
            for group_sql in self.sql
        ]
        return int(max(times, default=0))

    def apply(self, rows: pa.Table, next_offset: int) -> dict[str, pa.Table]:
        """Fold shipped rows into the state; return each group's changed features.

        ``next_offset`` is the repartition offset after the message(s) the rows came from.
        Rows already applied (source offset at or below what this shard has seen from
        that source partition) are skipped. Changes stay uncommitted until :meth:`commit`.
        """
        rows = self._fresh(rows)
        self.advance(next_offset)
        if rows.num_rows == 0:
            return {}
        self._begin()
        self._db.register("batch", rows)
        try:
            changed: dict[str, pa.Table] = {}
            for group_sql in self.sql:
                for statement in group_sql.update():
                    self._db.execute(statement)
                table = self._db.sql(group_sql.features()).to_arrow_table()
                if table.num_rows:
                    changed[group_sql.group.name] = table
        finally:
            with contextlib.suppress(duckdb.Error):  # a failed transaction: the caller sees the error
                self._db.unregister("batch")
        self._max_time = max(self._max_time, int(pc.max(rows.column("event_time_ms")).as_py()))
        return changed

    def advance(self, next_offset: int) -> None:
        """Record that the repartition topic was read up to ``next_offset`` (saved by :meth:`commit`)."""
        self.next_offset = next_offset
        self._consumed_changed = True

    def _fresh(self, rows: pa.Table) -> pa.Table:
        sources = rows.column(SOURCE_PARTITION).to_numpy()
        offsets = rows.column(SOURCE_OFFSET).to_numpy()
        keep = np.ones(len(sources), dtype=bool)
        for source in np.unique(sources):
            mask = sources == source
            applied = self.applied.get(int(source), -1)
            keep[mask] = offsets[mask] > applied
            self.applied[int(source)] = max(applied, int(offsets[mask].max()))
            self._dirty_sources.add(int(source))
        return rows if keep.all() else rows.filter(pa.array(keep))

    def _begin(self) -> None:
        if not self._in_transaction:
            self._db.execute("BEGIN TRANSACTION")
            self._in_transaction = True

    def commit(self) -> None:
        """Make the applied rows and the offsets durable, atomically."""
        if not (self._consumed_changed or self._dirty_sources):
            return
        self._begin()
        records = [(f"source:{source}", self.applied[source]) for source in sorted(self._dirty_sources)]
        if self.next_offset is not None:
            records.append((_CONSUMED, self.next_offset))
        self._db.executemany(
            "INSERT INTO progress VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            records,
        )
        self._db.execute("COMMIT")
        self._in_transaction = False
        self._dirty_sources.clear()
        self._consumed_changed = False

    def compact(self, retention_ms: int) -> None:
        """Drop state older than ``retention_ms`` before the newest event, trim last-N lists."""
        horizon = self._max_time - retention_ms
        self._begin()
        for group_sql in self.sql:
            for statement in group_sql.compact(horizon):
                self._db.execute(statement)

    def close(self) -> None:
        """Close the file, discarding anything not committed (the worker replays it)."""
        if self._in_transaction:
            self._db.execute("ROLLBACK")
            self._in_transaction = False
        self._db.close()

    def row_counts(self) -> dict[str, int]:
        """Rows per state table (for status output and tests)."""
        names = [row[0] for row in self._db.execute("SHOW TABLES").fetchall()]
        return {
            name: int(self._db.execute(f'SELECT count(*) FROM "{name}"').fetchall()[0][0]) for name in names
        }
