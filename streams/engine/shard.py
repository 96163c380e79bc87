"""Stage two of the engine: one shard's windowed state in memory, checkpointed with its offsets.

A shard is one partition of the repartition topic. Its state (one
:class:`~streams.engine.state.GroupState` per feature group) lives in memory as NumPy
columns; its progress is the next repartition offset to read and, per source partition,
the highest source offset already applied.

Durability works like Kafka Streams' or Flink's: the repartition topic is the log, and
a checkpoint file holds the state *together with* the offset it reflects. :meth:`commit`
writes a checkpoint when ``checkpoint_interval_s`` has passed (or when forced, e.g.
before a rebalance hands the shard to another worker), as one file written under a
temporary name, synced and renamed, so a crash leaves either the old or the new
checkpoint, never a mix. After a crash the shard reopens at its last checkpoint and the
worker re-reads the repartition topic from the offset saved with it, which rebuilds
exactly the lost state; rows that a replaying router ships a second time are recognised
by their source offsets and skipped. Nothing is lost and nothing is counted twice.

Because everything about a shard is in its file, a shard can move between workers on a
rebalance: the new owner opens the file (on a shared state directory) and goes on.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from features.definitions import FEATURE_GROUPS, FeatureGroup
from streams.engine.router import SOURCE_OFFSET, SOURCE_PARTITION, event_type_codes
from streams.engine.state import GroupState

_FORMAT = 2  # 2: keys routed by streams.engine.keys.string_hashes (1: pandas' SipHash)


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read back; the message names the file and the reason."""


class ShardState:
    """The state of shard ``shard``, checkpointed at ``path``; see the module docstring."""

    def __init__(
        self,
        path: Path,
        shard: int,
        groups: Sequence[FeatureGroup] = FEATURE_GROUPS,
        *,
        checkpoint_interval_s: float = 10.0,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.shard = shard
        self.checkpoint_interval_s = checkpoint_interval_s
        self.groups = [GroupState(group, bit) for bit, group in enumerate(groups)]
        self.next_offset: int | None = None
        self.applied: dict[int, int] = {}
        self.durable_offset: int | None = None
        """The repartition offset the last checkpoint reflects (where a restart resumes)."""
        self._max_time = 0
        self._dirty = False
        self._last_checkpoint = time.monotonic()
        if path.exists():
            self._load()

    def apply(self, rows: pa.Table, next_offset: int) -> dict[str, pa.Table]:
        """Fold shipped rows into the state; return each group's changed features.

        ``next_offset`` is the repartition offset after the message(s) the rows came from.
        Rows already applied (source offset at or below what this shard has seen from
        that source partition) are skipped. Changes are durable after a :meth:`commit`
        that writes a checkpoint.
        """
        rows = self._fresh(rows)
        self.advance(next_offset)
        if rows.num_rows == 0:
            return {}
        changed: dict[str, pa.Table] = {}
        type_codes = event_type_codes(rows.column("type"))
        for state in self.groups:
            table = state.apply(rows, type_codes)
            if table is not None and table.num_rows:
                changed[state.group.name] = table
        self._max_time = max(self._max_time, int(pc.max(rows.column("event_time_ms")).as_py()))
        return changed

    def advance(self, next_offset: int) -> None:
        """Record that the repartition topic was read up to ``next_offset``."""
        if next_offset != self.next_offset:
            self.next_offset = next_offset
            self._dirty = True

    def _fresh(self, rows: pa.Table) -> pa.Table:
        sources = rows.column(SOURCE_PARTITION).to_numpy()
        offsets = rows.column(SOURCE_OFFSET).to_numpy()
        keep = np.ones(len(sources), dtype=bool)
        for source in np.unique(sources):
            rows_of_source = np.flatnonzero(sources == source)
            applied = self.applied.get(int(source), -1)
            source_offsets = offsets[rows_of_source]
            # A router that replays after a crash ships rows again, possibly into the same
            # batch as the first copies: a row is new only if its offset is above everything
            # applied before it, in this batch included (each source is shipped in order).
            applied_before = np.maximum.accumulate(np.r_[applied, source_offsets])[:-1]
            keep[rows_of_source] = source_offsets > applied_before
            self.applied[int(source)] = max(applied, int(source_offsets.max()))
        return rows if keep.all() else rows.filter(pa.array(keep))

    def commit(self, *, force: bool = False) -> bool:
        """Checkpoint state and offsets together if the interval has passed (or ``force``).

        Called after the features the applied rows produced are stored. Returns whether
        a checkpoint was written; :attr:`durable_offset` says what a restart resumes from.
        """
        if not self.commit_due(force=force):
            return False
        self._save()
        self._dirty = False
        self._last_checkpoint = time.monotonic()
        self.durable_offset = self.next_offset
        return True

    def commit_due(self, *, force: bool = False) -> bool:
        """Whether :meth:`commit` would write a checkpoint now."""
        if not self._dirty:
            return False
        return force or time.monotonic() - self._last_checkpoint >= self.checkpoint_interval_s

    def rewrite_all(self) -> None:
        """Every group's next emission of each entity flags all its features (see GroupState.rewrite_all)."""
        for state in self.groups:
            state.rewrite_all()

    def compact(self, retention_ms: int) -> None:
        """Drop state older than ``retention_ms`` before the newest event, and idle entities."""
        horizon = self._max_time - retention_ms
        for state in self.groups:
            state.compact(horizon)
        self._dirty = True

    def close(self) -> None:
        """Forget the in-memory state; anything not checkpointed is replayed by the next owner."""
        self.groups = []

    def sizes(self) -> dict[str, int]:
        """Rows held per part of each group's state (for status output and tests)."""
        return {f"{s.group.name}.{part}": n for s in self.groups for part, n in s.sizes().items()}

    # -- the checkpoint file -------------------------------------------------------------

    def _save(self) -> None:
        meta = {
            "format": _FORMAT,
            "shard": self.shard,
            "next_offset": self.next_offset,
            "applied": {str(k): v for k, v in self.applied.items()},
            "max_time": self._max_time,
            "groups": [state.group.name for state in self.groups],
        }
        arrays: dict[str, np.ndarray[Any, Any]] = {"meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)}
        for state in self.groups:
            for name, array in state.to_arrays().items():
                key = f"{state.group.name}/{name}"
                if isinstance(array, pa.Array):
                    arrays[key + _STRINGS] = _strings_to_bytes(array)
                else:
                    arrays[key] = np.asarray(array)
        staging = self.path.with_name(f".{self.path.name}.tmp")
        with staging.open("wb") as handle:
            np.savez(handle, allow_pickle=False, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        staging.replace(self.path)

    def _load(self) -> None:
        try:
            with np.load(self.path, allow_pickle=False) as data:
                meta = json.loads(bytes(data["meta"]).decode())
                if meta.get("format") != _FORMAT:
                    raise CheckpointError(
                        f"{self.path}: checkpoint format {meta.get('format')} is not {_FORMAT} (this version "
                        "routes keys to shards differently); start a new consumer group "
                        "(stream.consumer_group)"
                    )
                names = [state.group.name for state in self.groups]
                if meta["groups"] != names:
                    raise CheckpointError(
                        f"{self.path}: checkpoint holds groups {meta['groups']}, the definitions {names}; "
                        "feature definitions changed: start a new consumer group (stream.consumer_group)"
                    )
                for state in self.groups:
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
            raise CheckpointError(f"{self.path}: cannot read the shard checkpoint: {exc}") from exc
        self.next_offset = meta["next_offset"]
        self.durable_offset = self.next_offset
        self.applied = {int(k): int(v) for k, v in meta["applied"].items()}
        self._max_time = int(meta["max_time"])


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
