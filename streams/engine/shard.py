"""Stage two of the engine: the windowed state of a worker's shards in memory, checkpointed per shard.

A shard is one partition of the repartition topic. A worker holds the state of all the
shards it owns in one :class:`~streams.engine.state.GroupState` per feature group (NumPy
columns), so each cycle folds every shard's rows in with one pass per group: per-shard
states cost a fixed ~10 ms per shard and cycle, and with six shards that was half the
state work of a live cycle (107 vs 56 ms per 10,000 events, measured). Each shard's
progress is kept apart: the next repartition offset to read and, per source partition,
the highest source offset already applied.

Durability works like Kafka Streams' or Flink's: the repartition topic is the log, and
each shard's checkpoint file holds its part of the state *together with* the offset it
reflects (an entity belongs to the shard its key hashes to, as the router sends it).
:meth:`ShardStates.commit` writes the files when ``checkpoint_interval_s`` has passed (or
when forced, e.g. before a rebalance hands shards to another worker), each written under
a temporary name, synced and renamed, so a crash leaves either the old or the new
checkpoint of a shard, never a mix. After a crash a shard reopens at its last checkpoint
and the worker re-reads the repartition topic from the offset saved with it, which
rebuilds exactly the lost state; rows that a replaying router ships a second time are
recognised by their source offsets and skipped. Nothing is lost and nothing is counted twice.

Because everything about a shard is in its file, a shard can move between workers on a
rebalance: the old owner writes its file and forgets the shard's entities
(:meth:`ShardStates.close`), the new owner reads the file (on a shared state directory)
into its own state (:meth:`ShardStates.open`) and goes on.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from numpy.typing import NDArray

from features.definitions import FEATURE_GROUPS, FeatureGroup
from streams.engine.router import SOURCE_OFFSET, SOURCE_PARTITION, deletions, event_type_codes, shard_of
from streams.engine.shipped import ShippedRows
from streams.engine.state import GroupState

_FORMAT = 2  # 2: keys routed by streams.engine.keys.string_hashes (1: pandas' SipHash)


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read back; the message names the file and the reason."""


@dataclass
class _Progress:
    """How far one shard is (saved in its checkpoint with its part of the state)."""

    next_offset: int | None = None
    """The next repartition offset to read."""
    applied: dict[int, int] = field(default_factory=dict)
    """Per source partition, the highest source offset applied."""
    max_time: int = 0
    """The newest event time applied (compaction keeps what windows from there can read)."""
    source_times: dict[int, int] = field(default_factory=dict)
    """Per source partition, the newest event time applied from it (user deletions excepted)."""
    dirty: bool = False

    def oldest_source_time(self) -> int | None:
        """The newest event time of the source partition that is furthest behind (None: none yet)."""
        return min(self.source_times.values()) if self.source_times else None


class ShardStates:
    """The state of the shards one worker owns, checkpointed per shard in ``directory``.

    ``shard_count`` is the repartition topic's partition count: an entity's shard is its
    key's :func:`~streams.engine.router.shard_of`, as the router decides.
    """

    def __init__(
        self,
        directory: Path,
        shard_count: int,
        groups: Sequence[FeatureGroup] = FEATURE_GROUPS,
        *,
        checkpoint_interval_s: float = 10.0,
        write_in_background: bool = False,
        snapshot_share: float | None = None,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.shard_count = shard_count
        self.checkpoint_interval_s = checkpoint_interval_s
        self.write_in_background = write_in_background
        self.snapshot_share = snapshot_share
        self._definitions = tuple(groups)
        self.groups = self._new_groups()
        self._progress: dict[int, _Progress] = {}
        self._entity_shards: list[NDArray[np.int64]] = []
        self._forget_entity_shards()
        self._last_checkpoint = time.monotonic()
        self._gap_s = checkpoint_interval_s  # see commit(): longer where snapshots take long
        self._writer: ThreadPoolExecutor | None = None
        self._writing: Future[None] | None = None
        self._writing_offsets: dict[int, int] = {}
        self._written: dict[int, int] = {}  # offsets of files written, not yet reported by commit()

    def _new_groups(self) -> list[GroupState]:
        return [GroupState(group, bit) for bit, group in enumerate(self._definitions)]

    def path(self, shard: int) -> Path:
        """The checkpoint file of ``shard``."""
        return self.directory / f"shard-{shard}.npz"

    @property
    def shards(self) -> list[int]:
        """The shards held, in order."""
        return sorted(self._progress)

    def __contains__(self, shard: object) -> bool:
        return shard in self._progress

    def next_offset(self, shard: int) -> int | None:
        """The next repartition offset of ``shard`` to read (None: from its start)."""
        return self._progress[shard].next_offset

    def open(self, shard: int) -> int | None:
        """Hold ``shard``: read its checkpoint into the state, if it has one; return :meth:`next_offset`."""
        if shard not in self._progress:
            path = self.path(shard)
            progress = _Progress()
            if path.exists():
                loaded = self._new_groups()
                progress = _load(path, shard, loaded)
                if all(len(state.entities) == 0 and not len(state.forgotten) for state in self.groups):
                    self.groups = loaded  # the first shard with state: nothing to merge it with
                    self._forget_entity_shards()
                else:
                    for state, part in zip(self.groups, loaded, strict=True):
                        state.absorb(part)
            self._progress[shard] = progress
        return self._progress[shard].next_offset

    def close(self, shards: Collection[int]) -> None:
        """Forget these shards' state; anything not checkpointed is replayed by their next owner.

        One pass over the state for all of them (a rebalance revokes several at once).
        """
        self.wait_for_writes()  # (their next owner reads the files)
        closed = [shard for shard in shards if self._progress.pop(shard, None) is not None]
        if not closed:
            return
        if not self._progress:
            self.close_all()
            return
        for index, state in enumerate(self.groups):
            state.drop(np.isin(self._shard_of_entities(index), closed))
            state.forgotten.keep(~np.isin(self._shard_of_tombstones(state), closed))
        self._forget_entity_shards()  # ids renumbered

    def close_all(self) -> None:
        """Forget every shard's state (see :meth:`close`)."""
        self.wait_for_writes()
        if self._writer is not None:
            self._writer.shutdown()
            self._writer = None
        self._progress.clear()
        self.groups = self._new_groups()
        self._forget_entity_shards()

    def apply(self, rows: Mapping[int, pa.Table], next_offsets: Mapping[int, int]) -> dict[str, pa.Table]:
        """Fold shipped rows (per shard) into the state; return each group's changed features.

        ``next_offsets`` gives, per shard read, the repartition offset after the
        message(s) the rows came from (a shard may have an offset and no rows). Rows a
        shard already applied (source offset at or below what it has seen from that
        source partition) are skipped. Changes are durable after a :meth:`commit` that
        writes the shard's checkpoint. Each group folds all shards' rows in one pass.
        """
        fresh: list[pa.Table] = []
        fresh_codes: list[NDArray[np.int8]] = []  # each table's event type codes, computed once
        for shard, next_offset in next_offsets.items():
            progress = self._progress[shard]
            if next_offset != progress.next_offset:
                progress.next_offset = next_offset
                progress.dirty = True
            shipped = rows.get(shard)
            if shipped is None or shipped.num_rows == 0:
                continue
            shipped = _fresh(progress.applied, shipped)
            if shipped.num_rows:
                codes = event_type_codes(shipped.column("type"))
                fresh.append(shipped)
                fresh_codes.append(codes)
                _note_times(progress, shipped, codes)
        if not fresh:
            return {}
        batch = ShippedRows(
            fresh[0] if len(fresh) == 1 else pa.concat_tables(fresh),
            fresh_codes[0] if len(fresh_codes) == 1 else np.concatenate(fresh_codes),
        )
        changed: dict[str, pa.Table] = {}
        for state in self.groups:
            table = state.apply(batch)
            if table is not None and table.num_rows:
                changed[state.group.name] = table
        return changed

    def take_deleted(self) -> dict[str, list[tuple[str, int]]]:
        """Per group, the users deleted since the last call, with each deletion's event time.

        The worker deletes their stored features before it stores the changed rows that
        :meth:`apply` returned with them (a user deleted and then active again in one
        cycle has a fresh row among those).
        """
        deleted = {state.group.name: state.deleted for state in self.groups if state.deleted}
        for state in self.groups:
            state.deleted = []
        return deleted

    def commit(self, *, force: bool = False) -> dict[int, int]:
        """Checkpoint each changed shard's state and offsets together once the interval has passed.

        ``force``: now, whatever the interval, and written before it returns. Called after
        the features the applied rows produced are stored. Returns, per shard whose file
        was written since the last call, the offset a restart resumes from.

        Why in the background (``write_in_background``): a checkpoint of a large state is
        hundreds of MB (390 MB for 206k users over 2 days), and copying, writing and syncing
        it stalled the worker's cycle 1.6 - 2.2 s every interval there (0.5 s now). The
        state is copied on the caller's thread (the snapshot: the files hold the state as of
        this call) and written by another; the next commit waits for it. Why a gap
        (``snapshot_share``): the copy still costs in proportion to the state, so the next
        checkpoint is due no sooner than this copy's time over that share of the worker's
        time (a restart then replays more of the repartition topic).
        """
        self._collect_write(wait=force)
        written, self._written = self._written, {}
        if not self.commit_due(force=force):
            return written
        started = time.monotonic()
        dirty = [shard for shard, progress in self._progress.items() if progress.dirty]
        splits = [
            state.split_arrays(self._shard_of_entities(i), dirty, self._shard_of_tombstones(state))
            for i, state in enumerate(self.groups)
        ]
        names = [state.group.name for state in self.groups]
        files: list[tuple[Path, int, _Progress, list[str], list[dict[str, Any]]]] = []
        offsets: dict[int, int] = {}
        for shard in dirty:
            progress = self._progress[shard]
            snapshot = replace(
                progress, applied=dict(progress.applied), source_times=dict(progress.source_times)
            )
            files.append((self.path(shard), shard, snapshot, names, [split[shard] for split in splits]))
            progress.dirty = False
            if progress.next_offset is not None:
                offsets[shard] = progress.next_offset
        if self.write_in_background and not force:
            if self._writer is None:
                self._writer = ThreadPoolExecutor(1, thread_name_prefix="adreach-checkpoint")
            self._writing, self._writing_offsets = self._writer.submit(_save_all, files), offsets
        else:
            _save_all(files)
            written.update(offsets)
        self._last_checkpoint = time.monotonic()
        if self.snapshot_share:
            self._gap_s = max(
                self.checkpoint_interval_s, (self._last_checkpoint - started) / self.snapshot_share
            )
        return written

    def commit_due(self, *, force: bool = False) -> bool:
        """Whether :meth:`commit` would write a checkpoint now (not while one is still being written)."""
        if not any(progress.dirty for progress in self._progress.values()):
            return False
        if force:
            return True
        if self._writing is not None and not self._writing.done():
            return False
        return time.monotonic() - self._last_checkpoint >= self._gap_s

    def wait_for_writes(self) -> None:
        """Return once the checkpoint files being written are complete (raises if writing one failed).

        Their offsets are reported by the next :meth:`commit`.
        """
        self._collect_write(wait=True)

    def _collect_write(self, *, wait: bool) -> None:
        """Note the background write's offsets as written once it finished (waiting for it if ``wait``)."""
        if self._writing is None or not (wait or self._writing.done()):
            return
        writing, self._writing = self._writing, None
        try:
            writing.result()
        except OSError as exc:
            raise CheckpointError(f"writing shard checkpoints in {self.directory} failed: {exc}") from exc
        self._written.update(self._writing_offsets)

    def rewrite_all(self) -> None:
        """Every group's next emission of each entity flags all its features (see GroupState.rewrite_all)."""
        for state in self.groups:
            state.rewrite_all()

    def compact(self, retention_ms: int) -> None:
        """Drop state older than ``retention_ms`` before each shard's newest event, and idle entities."""
        if not self._progress:
            return
        horizons = np.zeros(self.shard_count, dtype=np.int64)
        for shard, progress in self._progress.items():
            horizons[shard] = progress.max_time - retention_ms
            progress.dirty = True
        # A tombstone goes once every source partition that ships to its shard is a retention
        # period past it: then no event timed before the deletion can still arrive on time.
        # (By the shard's newest event alone, a lagging partition could still bring one.)
        tombstone_horizons = np.full(self.shard_count, np.iinfo(np.int64).min, dtype=np.int64)
        for shard, progress in self._progress.items():
            oldest = progress.oldest_source_time()
            if oldest is not None:
                tombstone_horizons[shard] = oldest - retention_ms
        for index, state in enumerate(self.groups):
            state.compact(horizons[self._shard_of_entities(index)])
            if len(state.forgotten):
                _, deleted_at = state.forgotten.arrays()
                state.forgotten.keep(deleted_at >= tombstone_horizons[self._shard_of_tombstones(state)])
        self._forget_entity_shards()  # ids renumbered

    def sizes(self) -> dict[str, int]:
        """Rows held per part of each group's state, over all shards held (for status output and tests)."""
        return {f"{s.group.name}.{part}": n for s in self.groups for part, n in s.sizes().items()}

    def _forget_entity_shards(self) -> None:
        """Drop the cache of entity shards (after entities were renumbered or the groups replaced).

        Per group it holds the shard of each entity id seen so far, so a key is hashed
        once, not at every checkpoint and compaction.
        """
        self._entity_shards = [np.zeros(0, np.int64) for _ in self.groups]

    def _shard_of_entities(self, index: int) -> NDArray[np.int64]:
        """The shard of each entity id of group ``index`` (its key's shard, as the router picks it)."""
        state, known = self.groups[index], self._entity_shards[index]
        count = len(state.entities)
        if len(known) < count:
            keys = state.entities.keys.slice(len(known))
            known = np.concatenate([known, shard_of(keys, self.shard_count)])
            self._entity_shards[index] = known
        return known[:count]

    def _shard_of_tombstones(self, state: GroupState) -> NDArray[np.int64]:
        """The shard of each of ``state``'s tombstones (:meth:`ForgottenUsers.arrays` order)."""
        if not len(state.forgotten):
            return np.zeros(0, dtype=np.int64)
        return shard_of(state.forgotten.arrays()[0], self.shard_count)


def _note_times(progress: _Progress, rows: pa.Table, type_codes: NDArray[np.int8]) -> None:
    """Move the shard's newest event times (overall and per source partition) past ``rows``'
    (``type_codes``: their :func:`event_type_codes`).

    A user deletion's time moves neither: it is often the request's time, not the stream's,
    and compaction by it would forget everything older (see :mod:`streams.engine.forget`).
    """
    counted = ~deletions(rows, type_codes)
    if not counted.any():
        return
    times = rows.column("event_time_ms").to_numpy()[counted]
    sources = rows.column(SOURCE_PARTITION).to_numpy()[counted]
    progress.max_time = max(progress.max_time, int(times.max()))
    for source in np.unique(sources).tolist():
        newest = int(times[sources == source].max())
        progress.source_times[source] = max(progress.source_times.get(source, newest), newest)


def _fresh(applied: dict[int, int], rows: pa.Table) -> pa.Table:
    """``rows`` without those already applied; moves ``applied`` (per source partition) past them."""
    sources = rows.column(SOURCE_PARTITION).to_numpy()
    offsets = rows.column(SOURCE_OFFSET).to_numpy()
    keep = np.ones(len(sources), dtype=bool)
    for source in np.unique(sources):
        rows_of_source = np.flatnonzero(sources == source)
        before = applied.get(int(source), -1)
        source_offsets = offsets[rows_of_source]
        # A router that replays after a crash ships rows again, possibly into the same
        # batch as the first copies: a row is new only if its offset is above everything
        # applied before it, in this batch included (each source is shipped in order).
        applied_before = np.maximum.accumulate(np.r_[before, source_offsets])[:-1]
        keep[rows_of_source] = source_offsets > applied_before
        applied[int(source)] = max(before, int(source_offsets.max()))
    return rows if keep.all() else rows.filter(pa.array(keep))


# -- checkpoint files ----------------------------------------------------------------------


def _save_all(files: Sequence[tuple[Path, int, _Progress, list[str], list[dict[str, Any]]]]) -> None:
    for path, shard, progress, names, parts in files:
        _save(path, shard, progress, names, parts)


def _save(
    path: Path, shard: int, progress: _Progress, names: Sequence[str], parts: Sequence[dict[str, Any]]
) -> None:
    """Write ``shard``'s checkpoint: its progress and each group's part of the state (``parts``, by group
    ``names``)."""
    meta = {
        "format": _FORMAT,
        "shard": shard,
        "next_offset": progress.next_offset,
        "applied": {str(k): v for k, v in progress.applied.items()},
        "max_time": progress.max_time,
        "source_times": {str(k): v for k, v in progress.source_times.items()},
        "groups": list(names),
    }
    arrays: dict[str, np.ndarray[Any, Any]] = {"meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)}
    for group_name, part in zip(names, parts, strict=True):
        for name, array in part.items():
            key = f"{group_name}/{name}"
            if isinstance(array, pa.Array):
                arrays[key + _STRINGS] = _strings_to_bytes(array)
            else:
                arrays[key] = np.asarray(array)
    staging = path.with_name(f".{path.name}.tmp")
    with staging.open("wb") as handle:
        np.savez(handle, allow_pickle=False, **arrays)
        handle.flush()
        os.fsync(handle.fileno())
    staging.replace(path)


def _load(path: Path, shard: int, groups: Sequence[GroupState]) -> _Progress:
    """Read ``shard``'s checkpoint at ``path`` into the empty ``groups``; return its progress."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data["meta"]).decode())
            if meta.get("format") != _FORMAT:
                raise CheckpointError(
                    f"{path}: checkpoint format {meta.get('format')} is not {_FORMAT} (this version "
                    "routes keys to shards differently); start a new consumer group "
                    "(stream.consumer_group)"
                )
            names = [state.group.name for state in groups]
            if meta["groups"] != names:
                raise CheckpointError(
                    f"{path}: checkpoint holds groups {meta['groups']}, the definitions {names}; "
                    "feature definitions changed: start a new consumer group (stream.consumer_group)"
                )
            if meta.get("shard", shard) != shard:
                raise CheckpointError(f"{path}: the file holds shard {meta['shard']}, not shard {shard}")
            for state in groups:
                prefix = f"{state.group.name}/"
                arrays = {
                    key[len(prefix) :].removesuffix(_STRINGS): (
                        _bytes_to_strings(data[key]) if key.endswith(_STRINGS) else data[key]
                    )
                    for key in data.files
                    if key.startswith(prefix)
                }
                state.load_arrays(arrays)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: cannot read the shard checkpoint: {exc}") from exc
    return _Progress(
        next_offset=meta["next_offset"],
        applied={int(k): int(v) for k, v in meta["applied"].items()},
        max_time=int(meta["max_time"]),
        source_times={int(k): int(v) for k, v in meta.get("source_times", {}).items()},
    )


_STRINGS = "#strings"  # suffix of the names of string arrays in the file


def _strings_to_bytes(array: pa.Array) -> np.ndarray[Any, Any]:
    """An Arrow string array as the bytes of an Arrow IPC stream (``np.savez`` stores no strings)."""
    sink = io.BytesIO()
    table = pa.table({"v": array})
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return np.frombuffer(sink.getvalue(), dtype=np.uint8)


def _bytes_to_strings(data: np.ndarray[Any, Any]) -> pa.Array:
    table = pa.ipc.open_stream(pa.py_buffer(data.tobytes())).read_all()
    return table.column("v").combine_chunks()
