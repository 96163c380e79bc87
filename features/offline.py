"""Compaction of the offline store: one row per (entity, event timestamp), in few files.

The stream engine appends a Parquet part file per cycle, so an entity that changes in
several cycles within one tile leaves several rows with the same event timestamp; the
last one (largest ``created_timestamp``) holds the tile's value. Feast's file offline
store is meant to keep that row, but it sorts by created and then by event timestamp
with Dask's sort, which is not stable, so it picks among the tied rows at random (seen
in ``tests/test_historical_features.py``). Compaction removes the ties, and turns
thousands of small part files into one, which also makes Feast's reads faster.

Compaction only reads the part files present when it starts and replaces them with one
file (written under a dot-name, then renamed, then the inputs deleted), so a worker may
keep appending meanwhile; rows appended after it started are compacted next time.
Compactions of one group take turns (a lock file in its directory): two at once could
each merge the same parts, and one could bring back rows the other had purged.

**User deletions**: a worker that forgets a deleted user records the deletion in
``data/deletions/<group>/`` (:func:`record_deletions`); every compaction then leaves
out the user's rows *created* before the deletion was recorded (rows created later
come from the user's activity after it). The worker compacts all of the group's parts
after recording deletions, so they leave the offline store within
``stream.offline_compact_interval_s``; training sets compact before they read.
"""

from __future__ import annotations

import fcntl
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from features.definitions import FeatureGroup
from features.feast_objects import CREATED_FIELD, TIMESTAMP_FIELD, offline_path, offline_schema

COMPACTED_SUFFIX = "-compacted.parquet"
DELETIONS_DIR = "deletions"
_DELETED_KEY, _DELETED_AT, _RECORDED_AT = "key", "deleted_at", "recorded_at"
_DELETIONS_SCHEMA = pa.schema(
    [
        (_DELETED_KEY, pa.string()),
        (_DELETED_AT, pa.timestamp("us", "UTC")),  # the deletion event's time
        (_RECORDED_AT, pa.timestamp("us", "UTC")),  # rows created up to here are the user's old ones
    ]
)
_LOCK_FILE = ".compaction.lock"


def deletions_path(data_dir: Path, group: FeatureGroup) -> Path:
    """Where the user deletions that apply to ``group``'s offline rows are recorded."""
    return data_dir / DELETIONS_DIR / group.name


def record_deletions(
    data_dir: Path,
    group: FeatureGroup,
    keys: Sequence[str],
    deleted_at_ms: Sequence[int],
    *,
    writer: str = "",
) -> Path:
    """Record deleted entities of ``group``: the next compaction drops their rows written until now."""
    directory = deletions_path(data_dir, group)
    directory.mkdir(parents=True, exist_ok=True)
    now_us = time.time_ns() // 1000
    table = pa.table(
        {
            _DELETED_KEY: pa.array(list(keys), pa.string()),
            _DELETED_AT: pa.array(np.asarray(deleted_at_ms, np.int64) * 1000, pa.int64()),
            _RECORDED_AT: pa.array(np.full(len(keys), now_us, np.int64)),
        }
    )
    tag = f"-{writer}" if writer else ""
    name = f"part-{time.time_ns():020d}{tag}-{uuid.uuid4().hex[:8]}.parquet"
    staging = directory / f".{name}"
    pq.write_table(table.cast(_DELETIONS_SCHEMA), staging)
    staging.rename(directory / name)
    return directory / name


def recorded_deletions(data_dir: Path, group: FeatureGroup) -> dict[str, int]:
    """Each entity of ``group`` whose deletion is recorded -> its latest deletion time (epoch ms)."""
    files = sorted(deletions_path(data_dir, group).glob("part-*.parquet"))
    if not files:
        return {}
    table = pa.concat_tables([pq.read_table(f).cast(_DELETIONS_SCHEMA) for f in files])
    millis = pc.divide(table.column(_DELETED_AT).cast(pa.int64()), 1000)
    latest = (
        pa.table({"key": table.column(_DELETED_KEY), "t": millis}).group_by("key").aggregate([("t", "max")])
    )
    return dict(zip(latest.column("key").to_pylist(), latest.column("t_max").to_pylist(), strict=True))


@contextmanager
def _compaction_lock(directory: Path) -> Iterator[None]:
    """Hold the group's compaction lock (other processes' compactions of it wait)."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / _LOCK_FILE).open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@dataclass(frozen=True)
class CompactionResult:
    group: str
    files_before: int
    rows_before: int
    rows_after: int


def compact_offline(
    data_dir: Path, group: FeatureGroup, *, small_only: bool = False, writer: str = "", attempts: int = 5
) -> CompactionResult:
    """Merge ``group``'s offline part files into one, keeping the latest row per entity and timestamp.

    ``small_only`` merges just the parts not yet compacted (what the stream worker does
    every few minutes, at a cost that does not grow with the history); ties between two
    compacted files then remain possible where a tile spans two compactions, which a full
    compaction (as before every training set) removes. ``writer`` limits it to the parts
    that writer appended. A part that another compaction removes meanwhile makes it list
    the files again (up to ``attempts`` times).
    """
    for attempt in range(attempts):
        try:
            with _compaction_lock(offline_path(data_dir, group)):
                parts = _parts(offline_path(data_dir, group), small_only, writer)
                return _compact(group, parts, deletions_path(data_dir, group))
        except (duckdb.IOException, FileNotFoundError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def _parts(directory: Path, small_only: bool, writer: str) -> list[Path]:
    parts = sorted(directory.glob("part-*.parquet"))
    if small_only:
        parts = [part for part in parts if not part.name.endswith(COMPACTED_SUFFIX)]
    if writer:
        parts = [part for part in parts if f"-{writer}-" in part.name]
    return parts


def _sql_files(paths: Sequence[Path]) -> str:
    return "[" + ", ".join(f"'{str(p).replace(chr(39), chr(39) * 2)}'" for p in paths) + "]"


def _compact(group: FeatureGroup, parts: list[Path], deletions: Path) -> CompactionResult:
    deletion_files = sorted(deletions.glob("part-*.parquet"))
    rows_before = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
    key, ts, created = f'"{group.key}"', f'"{TIMESTAMP_FIELD}"', f'"{CREATED_FIELD}"'
    connection = duckdb.connect(config={"threads": 1})
    try:
        source = f"read_parquet({_sql_files(parts)})" if parts else ""
        purge = ""
        if deletion_files and parts:
            purge = (
                f"WHERE NOT EXISTS (SELECT 1 FROM read_parquet({_sql_files(deletion_files)}) AS d "
                f"WHERE d.{_DELETED_KEY} = r.{key} AND r.{created} <= d.{_RECORDED_AT})"
            )
            kept = connection.sql(f"SELECT count(*) FROM {source} AS r {purge}").fetchall()[0][0]
            if kept == rows_before:
                purge = ""  # nothing to take out: merge as usual
        if len(parts) <= 1 and not purge:
            return CompactionResult(group.name, len(parts), rows_before, rows_before)
        table = connection.sql(
            f"SELECT r.* FROM {source} AS r {purge} QUALIFY row_number() OVER "
            f"(PARTITION BY r.{key}, r.{ts} ORDER BY r.{created} DESC) = 1 ORDER BY r.{ts}, r.{key}"
        ).to_arrow_table()
    finally:
        connection.close()
    directory = parts[0].parent
    schema = offline_schema(group)
    name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}{COMPACTED_SUFFIX}"
    staging = directory / f".{name}"
    pq.write_table(_conform(table, schema), staging, use_compliant_nested_type=False)
    staging.rename(directory / name)
    for part in parts:
        part.unlink(missing_ok=True)
    return CompactionResult(group.name, len(parts), rows_before, table.num_rows)


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """DuckDB hands back timestamps with its own time zone and list field names; restore Feast's."""
    columns = []
    for field in schema:
        column = table.column(field.name)
        if pa.types.is_timestamp(field.type):
            column = column.cast(pa.timestamp("us", "UTC"))
        columns.append(column.cast(field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def last_row_per_key_and_time(rows: pa.Table, key: str) -> pa.Table:
    """The last row (in table order) of each (``key``, event timestamp) pair, in table order.

    Feature rows are emitted in order, so the last row of an entity and tile holds the
    tile's final value; earlier ones are intermediate states Feast must not pick.
    """
    indexed = rows.append_column("__row", pa.array(np.arange(rows.num_rows, dtype=np.int64)))
    last = indexed.group_by([key, TIMESTAMP_FIELD]).aggregate([("__row", "max")])
    keep = np.sort(last.column("__row_max").to_numpy())
    return rows.take(pa.array(keep))
