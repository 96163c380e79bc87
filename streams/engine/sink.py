"""Where changed features go: Feast's online store (fast writer) and the offline store.

Rows reach the offline store as Parquet part files (the history that point-in-time
joins read, with a ``created_timestamp`` that orders two rows of the same entity and
tile) and the online store through :class:`features.online.OnlineFeatureWriter`, which
writes Feast's own format (Feast's SDK reads it) many times faster than Feast's
``write_to_online_store``.

A store that cannot be reached raises :class:`StoreUnavailableError`; the worker then
retries with backoff and commits nothing meanwhile, so no feature row is ever dropped.
Writes are idempotent (upserts, and offline rows identical to ones already written), so
a retry after a partial write is harmless.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence

import pyarrow as pa

from features.definitions import FEATURE_GROUPS, FeatureGroup
from features.feast_objects import append_offline, arrow_schema
from features.offline import compact_offline
from features.online import OnlineFeatureWriter, OnlineStoreUnavailableError
from infra.settings import Settings


class StoreUnavailableError(RuntimeError):
    """The online or offline store could not be written; retry later."""


class FeatureSink:
    """Writes each group's changed feature rows to the online and offline stores."""

    def __init__(self, settings: Settings, groups: Sequence[FeatureGroup] = FEATURE_GROUPS) -> None:
        self.groups = {group.name: group for group in groups}
        self._data_dir = settings.feature_repo_dir / "data"
        self._online = OnlineFeatureWriter(settings, tuple(groups))
        self.rows_written = 0
        self.writer_id = f"w{uuid.uuid4().hex[:8]}"  # this sink's offline part files carry it

    def write(self, changed: Mapping[str, pa.Table]) -> int:
        """Store the rows (online first, then offline); return how many entity rows were written."""
        written = 0
        for name, rows in changed.items():
            group = self.groups[name]
            rows = rows.select(arrow_schema(group).names).cast(arrow_schema(group))
            try:
                self._online.write(group, rows)
            except OnlineStoreUnavailableError as exc:
                raise StoreUnavailableError(str(exc)) from exc
            try:
                append_offline(self._data_dir, group, rows, writer=self.writer_id)
            except OSError as exc:
                raise StoreUnavailableError(f"offline store {self._data_dir}: {exc}") from exc
            written += rows.num_rows
        self.rows_written += written
        return written

    def compact_offline(self) -> None:
        """Merge the part files this sink wrote since its last compaction (one file per group).

        Only its own parts: several workers share one offline directory, and each merges
        what it wrote, so no worker deletes a file another one is reading.
        """
        for group in self.groups.values():
            try:
                compact_offline(self._data_dir, group, small_only=True, writer=self.writer_id)
            except OSError as exc:
                raise StoreUnavailableError(f"offline store {self._data_dir}: {exc}") from exc

    def close(self) -> None:
        self._online.close()
