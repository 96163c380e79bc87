"""User deletions in the stream features: which deleted users' events the engine must not count.

A ``user_profile`` event with ``"action": "delete"`` is a privacy deletion. The router sends
it, like the user's events, to the shard of every feature group keyed by user; there
the group forgets everything it holds about the user (:meth:`GroupState.apply
<streams.engine.state.GroupState.apply>`), the worker deletes the user's online row and
drops its offline history (:mod:`streams.engine.sink`), and the deletion stays here as a
*tombstone*: the user's events with an event time at or before the deletion's are not
counted if they arrive later (late events, or a replay of the events topic from before
the deletion). The user's events after the deletion time count anew, from nothing.

What counts as "before" is decided in each shard's order (the repartition topic's), so
a replay in other micro-batches forgets exactly the same events: a deletion forgets
every event of its user read before it, whatever their times, and those read after it
up to its event time. A deletion's time is often the request's, not the stream's, so it
moves no watermark and no shard time (:mod:`streams.engine.router`,
:mod:`streams.engine.shard`). Tombstones are checkpointed with the shard's state and kept
until every source partition shipping to the shard is a retention period (longest window
+ allowed lateness) past them: only then can no event timed before the deletion still
arrive on time, whichever partition lags.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray


class ForgottenUsers:
    """Tombstones of deleted users: key -> the latest deletion's event time (epoch ms)."""

    def __init__(self) -> None:
        self._until: dict[str, int] = {}
        self._arrays: tuple[pa.Array, NDArray[np.int64]] | None = None  # (keys, times), cached

    def __len__(self) -> int:
        return len(self._until)

    def add(self, keys: list[str], times_ms: list[int]) -> None:
        """Remember deletions (a user deleted twice keeps the later time)."""
        for key, time_ms in zip(keys, times_ms, strict=True):
            if time_ms > self._until.get(key, np.iinfo(np.int64).min):
                self._until[key] = time_ms
        self._arrays = None

    def arrays(self) -> tuple[pa.Array, NDArray[np.int64]]:
        """The tombstones as (keys, deletion times), in one order."""
        if self._arrays is None:
            self._arrays = (
                pa.array(list(self._until), pa.string()),
                np.fromiter(self._until.values(), np.int64, len(self._until)),
            )
        return self._arrays

    def blocked(self, keys: pa.Array | pa.ChunkedArray, times_ms: NDArray[Any]) -> NDArray[np.bool_]:
        """Per row, whether its key is a deleted user and its event time at or before the deletion."""
        if not self._until:
            return np.zeros(len(keys), dtype=bool)
        tombstone_keys, until = self.arrays()
        index = np.asarray(pc.index_in(keys, value_set=tombstone_keys).fill_null(-1).to_numpy(), np.int64)
        found = index >= 0
        blocked = np.zeros(len(keys), dtype=bool)
        blocked[found] = times_ms[found] <= until[index[found]]
        return blocked

    def keep(self, kept: NDArray[np.bool_]) -> None:
        """Keep only the tombstones flagged in ``kept`` (in :meth:`arrays` order)."""
        keys, times = self.arrays()
        rows = np.flatnonzero(kept)
        self._until = dict(zip(keys.take(pa.array(rows)).to_pylist(), times[rows].tolist(), strict=True))
        self._arrays = None

    def absorb(self, other: ForgottenUsers) -> None:
        """Take in another shard's tombstones (its users are never this state's)."""
        keys, times = other.arrays()
        self.add(keys.to_pylist(), times.tolist())

    def to_arrays(self, rows: NDArray[np.int64] | None = None) -> dict[str, Any]:
        """The tombstones (those at ``rows`` of :meth:`arrays`, or all) as checkpoint arrays."""
        keys, times = self.arrays()
        if rows is not None:
            keys, times = keys.take(pa.array(rows, pa.int64())), times[rows]
        return {"forgotten.keys": keys, "forgotten.times": times}

    def load_arrays(self, arrays: Mapping[str, Any]) -> None:
        """Restore :meth:`to_arrays`' output (absent in checkpoints written before deletions existed)."""
        self._until = {}
        self._arrays = None
        if "forgotten.keys" in arrays:
            keys = arrays["forgotten.keys"].to_pylist()
            self.add(keys, np.asarray(arrays["forgotten.times"], np.int64).tolist())
