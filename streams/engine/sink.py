"""Where changed features go: Feast's online store (fast writer) and the offline store.

Rows reach the offline store as Parquet part files (the history that point-in-time
joins read, with a ``created_timestamp`` that orders two rows of the same entity and
tile) and the online store through :class:`features.online.OnlineFeatureWriter`, which
writes Feast's own format (Feast's SDK reads it) many times faster than Feast's
``write_to_online_store``.

Online rows are written every cycle (freshness); offline rows are buffered and written
by :meth:`FeatureSink.flush_offline`, which the worker calls before it checkpoints any
shard state. That keeps the guarantee (a checkpoint never covers a row that is not in
the offline store: after a crash, everything since the last checkpoint is recomputed
and written again) while one Parquet part file per group is written every checkpoint
interval instead of every cycle, a fixed cost that dominated small, frequent cycles.

A store that cannot be reached raises :class:`StoreUnavailableError`; the worker then
retries with backoff and commits nothing meanwhile, so no feature row is ever dropped.
Writes are idempotent (upserts, and offline rows identical to ones already written), so
a retry after a partial write is harmless.

Deleted users (:mod:`streams.engine.forget`) lose their online row at once, their rows
still buffered for the offline store, and, through a recorded deletion that every
compaction applies, their offline history (:mod:`features.offline`): this sink compacts
all of the group's part files, whoever wrote them, at its next offline compaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from features.definitions import FEATURE_GROUPS, FeatureGroup
from features.feast_objects import append_offline, arrow_schema
from features.offline import compact_offline, last_row_per_key_and_time, record_deletions
from features.online import CHANGED_COLUMN, OnlineFeatureWriter, OnlineStoreUnavailableError
from infra.settings import Settings

# Buffered offline rows are written early once this many are waiting (bounds memory).
MAX_BUFFERED_OFFLINE_ROWS = 500_000


class StoreUnavailableError(RuntimeError):
    """The online or offline store could not be written; retry later."""


class FeatureSink:
    """Writes each group's changed feature rows to the online and offline stores."""

    def __init__(self, settings: Settings, groups: Sequence[FeatureGroup] = FEATURE_GROUPS) -> None:
        self.groups = {group.name: group for group in groups}
        self._schemas = {group.name: arrow_schema(group) for group in groups}  # what the stores hold
        self._data_dir = settings.feature_repo_dir / "data"
        self._online = OnlineFeatureWriter(settings, tuple(groups))
        self._changed_only = settings.stream.online_writes == "changed_features"
        self.rows_written = 0
        self.writer_id = f"w{uuid.uuid4().hex[:8]}"  # this sink's offline part files carry it
        self._offline: dict[str, list[pa.Table]] = {}  # written online, not yet offline
        self._offline_rows = 0
        self._deletions: dict[str, list[tuple[str, int]]] = {}  # to record with the next offline flush
        self._purge: set[str] = set()  # groups whose every part file the next compaction rewrites

    def write(
        self, changed: Mapping[str, pa.Table], deleted: Mapping[str, Sequence[tuple[str, int]]] | None = None
    ) -> int:
        """Store the rows online and buffer them for the offline store; return the entity rows written.

        ``deleted``: per group, users deleted (with the deletion's event time) before these
        rows were computed; their stored features are deleted first. A retry after
        :class:`StoreUnavailableError` must pass the same rows and deletions again.
        """
        deleted = deleted or {}
        for name, users in deleted.items():
            try:
                self._online.delete(self.groups[name], [key for key, _ in users])
            except OnlineStoreUnavailableError as exc:
                raise StoreUnavailableError(str(exc)) from exc
        prepared: dict[str, pa.Table] = {}
        for name, rows in changed.items():
            group, schema = self.groups[name], self._schemas[name]
            mask = rows.column(CHANGED_COLUMN) if CHANGED_COLUMN in rows.column_names else None
            rows = rows.select(schema.names).cast(schema)  # (the state's timestamps carry no zone)
            online = (
                rows.append_column(CHANGED_COLUMN, mask) if mask is not None and self._changed_only else rows
            )
            try:
                self._online.write(group, online)
            except OnlineStoreUnavailableError as exc:
                raise StoreUnavailableError(str(exc)) from exc
            prepared[name] = rows
        for name, users in deleted.items():  # only once every group is online: a retry repeats all
            self._forget_buffered(name, [key for key, _ in users])
            self._deletions.setdefault(name, []).extend(users)
        for name, rows in prepared.items():
            self._offline.setdefault(name, []).append(rows)
            self._offline_rows += rows.num_rows
        written = sum(int(rows.num_rows) for rows in prepared.values())
        self.rows_written += written
        if self._offline_rows >= MAX_BUFFERED_OFFLINE_ROWS:
            self.flush_offline()
        return written

    def _forget_buffered(self, name: str, keys: list[str]) -> None:
        """Drop the buffered offline rows of these entities of ``name`` (all older than their deletion)."""
        key = self.groups[name].key
        value_set = pa.array(keys, pa.string())
        kept: list[pa.Table] = []
        for rows in self._offline.get(name, []):
            deleted = np.asarray(
                pc.is_in(rows.column(key), value_set=value_set).to_numpy(zero_copy_only=False)
            )
            kept.append(rows.filter(pa.array(~deleted)) if deleted.any() else rows)
            self._offline_rows -= int(deleted.sum())
        if name in self._offline:
            self._offline[name] = kept

    def flush_offline(self) -> None:
        """Record the deletions, then write the buffered rows to the offline store: one part file per group.

        Raises :class:`StoreUnavailableError` with the rows still buffered (a retry
        writes them again; a group written before the failure may get identical rows
        twice, which the offline compaction removes).
        """
        for name in list(self._deletions):
            users = self._deletions[name]
            try:
                record_deletions(
                    self._data_dir,
                    self.groups[name],
                    [key for key, _ in users],
                    [time_ms for _, time_ms in users],
                    writer=self.writer_id,
                )
            except OSError as exc:
                raise StoreUnavailableError(f"offline store {self._data_dir}: {exc}") from exc
            del self._deletions[name]
            self._purge.add(name)
        for name in list(self._offline):
            group = self.groups[name]
            # One part file gets one created_timestamp, so rows of one entity and tile would
            # tie; keep the last (the tile's latest value, the only one Feast should pick).
            rows = last_row_per_key_and_time(pa.concat_tables(self._offline[name]), group.key)
            try:
                append_offline(self._data_dir, group, rows, writer=self.writer_id)
            except OSError as exc:
                raise StoreUnavailableError(f"offline store {self._data_dir}: {exc}") from exc
            self._offline_rows -= sum(t.num_rows for t in self._offline.pop(name))

    def compact_offline(self) -> None:
        """Merge the part files this sink wrote since its last compaction (one file per group).

        Only its own parts, as a rule: several workers share one offline directory, and
        each merges what it wrote. A group with newly recorded deletions is compacted
        whole, every writer's parts (compactions take turns, see :mod:`features.offline`).
        Buffered rows are not part files yet and wait for the next :meth:`flush_offline`.
        """
        for group in self.groups.values():
            purge = group.name in self._purge  # deleted users' history: every writer's parts
            try:
                if purge:
                    compact_offline(self._data_dir, group)
                else:
                    compact_offline(self._data_dir, group, small_only=True, writer=self.writer_id)
            except OSError as exc:
                raise StoreUnavailableError(f"offline store {self._data_dir}: {exc}") from exc
            self._purge.discard(group.name)

    def close(self) -> None:
        self._online.close()
