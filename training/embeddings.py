"""LoopFM embedding materialization: FM user embeddings into the ``fm_embeddings`` Feast view.

One *run* at time T embeds every user with events in ``[T - every, T)`` from their last
L events strictly before T, pushes the new embedding onto the user's last-K history
(newest first), and writes one row per user stamped ``event_timestamp = T``: to the
offline store (Parquet, the history training sets join point-in-time) and to the online
store (the latest row, which serving reads). Because a row at T depends only on events
before T, an example joined to it can never see its own future.

Run periodically (``adreach features fm-embeddings``, e.g. hourly from cron) this builds
the history of representations. ``backfill`` replays the same runs over a past period at
once, keeping the last-K histories in memory, as a sequence of periodic runs would have.
An incremental run continues each user's history from the online store.

A user deletion in the log (whose events before it the log reader already left out,
:func:`training.events.without_deleted_history`) also deletes the user's stored
embeddings, the first time a run sees it: the online row, and the offline history through
a recorded deletion (:mod:`features.offline`). Later runs embed the user's activity after
the deletion only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray

from features.embeddings import FM_EMBEDDING, FM_EMBEDDINGS, FM_HISTORY, FM_HISTORY_LEN
from features.feast_objects import append_offline, arrow_schema
from features.offline import compact_offline, record_deletions, recorded_deletions
from features.online import OnlineFeatureReader, OnlineFeatureWriter
from infra.settings import Settings
from models.fm import FoundationModel
from training.events import EventLog
from training.train import fm_user_embeddings


@dataclass(frozen=True)
class MaterializeStats:
    runs: int
    rows: int
    users: int
    embedding_dim: int
    history: int
    skipped: int = 0  # users left out: the online store already holds a newer run of theirs


def run_times(start_ms: int, end_ms: int, every_s: int) -> NDArray[np.int64]:
    """Run times on the ``every_s`` grid after ``start_ms``, through the first one at/after ``end_ms``."""
    step = every_s * 1000
    first = (start_ms // step + 1) * step
    last = -(-end_ms // step) * step
    return np.arange(first, last + 1, step, dtype=np.int64)


class _Histories:
    """Each user's last K embeddings (newest first) and how many slots are filled."""

    def __init__(self, users: int, k: int, dim: int) -> None:
        self.values = np.zeros((users, k, dim), np.float32)
        self.length = np.zeros(users, np.int64)

    def push(self, users: NDArray[np.int64], embeddings: NDArray[np.float32]) -> None:
        self.values[users, 1:] = self.values[users, :-1]
        self.values[users, 0] = embeddings
        self.length[users] = np.minimum(self.length[users] + 1, self.values.shape[1])


def _rows(
    user_ids: NDArray[Any],
    at_ms: NDArray[np.int64],
    embeddings: NDArray[np.float32],
    history: NDArray[np.float32],
    length: NDArray[np.int64],
) -> pa.Table:
    n, dim = embeddings.shape
    flat = history.reshape(n, -1)
    schema = arrow_schema(FM_EMBEDDINGS)
    return pa.Table.from_arrays(
        [
            pa.array(user_ids.tolist(), pa.string()),
            pa.array(at_ms, pa.int64()).cast(pa.timestamp("ms", "UTC")).cast(pa.timestamp("us", "UTC")),
            pa.FixedSizeListArray.from_arrays(pa.array(embeddings.ravel(), pa.float32()), dim).cast(
                pa.list_(pa.float32())
            ),
            pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel(), pa.float32()), flat.shape[1]).cast(
                pa.list_(pa.float32())
            ),
            pa.array(length, pa.int64()),
        ],
        schema=schema,
    )


def materialize(
    settings: Settings,
    model: FoundationModel,
    log: EventLog,
    times_ms: NDArray[np.int64],
    *,
    every_s: int,
    history: int,
    resume_from_online: bool,
    write_online: bool = True,
    progress: Callable[[int], None] | None = None,
) -> MaterializeStats:
    """Run the job at each of ``times_ms`` (ascending); see the module docstring.

    ``resume_from_online`` starts each user's last-K history from the online store (an
    incremental periodic run); otherwise histories start empty (a backfill from scratch).
    The Feast repository must be applied (``features.store.open_store``).
    """
    _delete_embeddings(settings, log.deletions, write_online=write_online)
    dim = model.config.embedding_dim
    states = _Histories(len(log.user_ids), history, dim)
    newer = np.zeros(len(log.user_ids), bool)
    left_out = np.zeros(len(log.user_ids), bool)  # active users skipped for a newer stored run
    if resume_from_online and len(times_ms):
        newer = _load_online(settings, log, states, int(np.min(times_ms)))
    order = np.argsort(log.time_ms, kind="stable")
    sorted_times = log.time_ms[order]
    parts: list[pa.Table] = []
    latest: dict[int, int] = {}  # user -> index into the final rows
    rows = 0
    touched = np.zeros(len(log.user_ids), bool)
    for at in np.asarray(times_ms, np.int64):
        low, high = np.searchsorted(sorted_times, [at - every_s * 1000, at], side="left")
        users = np.unique(log.user[order[low:high]])
        left_out[users[newer[users]]] = True
        users = users[~newer[users]]
        if len(users):
            embeddings = fm_user_embeddings(model, log, users, np.full(len(users), at, np.int64))
            states.push(users, embeddings)
            parts.append(
                _rows(
                    log.user_ids[users],
                    np.full(len(users), at),
                    embeddings,
                    states.values[users],
                    states.length[users],
                )
            )
            touched[users] = True
            rows += len(users)
        if progress is not None:
            progress(1)
    del latest
    if parts:
        table = pa.concat_tables(parts)
        append_offline(settings.feature_repo_dir / "data", FM_EMBEDDINGS, table)
        if write_online:
            with OnlineFeatureWriter(settings, (FM_EMBEDDINGS,)) as writer:
                writer.write(FM_EMBEDDINGS, table)  # the last row of each user wins
    return MaterializeStats(len(times_ms), rows, int(touched.sum()), dim, history, int(left_out.sum()))


def _delete_embeddings(settings: Settings, deletions: dict[str, int], *, write_online: bool) -> None:
    """Delete the stored embeddings of users deleted in the log that no earlier run saw deleted.

    Before this run writes anything: the recorded deletion purges the offline rows created
    before it, and a row this run writes comes after. A deletion already recorded (an
    earlier run saw it) is not recorded again, which would also purge the rows of the
    user's activity since.
    """
    if not deletions:
        return
    data_dir = settings.feature_repo_dir / "data"
    done = recorded_deletions(data_dir, FM_EMBEDDINGS)
    new = {user: at for user, at in deletions.items() if done.get(user, -1) < at}
    if not new:
        return
    if write_online:  # (a stored row was computed before the deletion was known: from the old events)
        with OnlineFeatureWriter(settings, (FM_EMBEDDINGS,)) as writer:
            writer.delete(FM_EMBEDDINGS, list(new))
    record_deletions(data_dir, FM_EMBEDDINGS, list(new), list(new.values()))
    compact_offline(data_dir, FM_EMBEDDINGS)


def _load_online(
    settings: Settings, log: EventLog, states: _Histories, first_run_ms: int
) -> NDArray[np.bool_]:
    """Start from the histories the previous run left in the online store.

    Returns the users whose stored row is from a run at or after ``first_run_ms``: a run
    back in time (``--once --at`` a past time) must neither continue their newer history
    nor replace the row serving reads with an older one, so they are left out.
    """
    k, dim = states.values.shape[1:]
    with OnlineFeatureReader(settings, (FM_EMBEDDINGS,)) as reader:
        stored = reader.read(
            FM_EMBEDDINGS,
            [str(u) for u in log.user_ids.tolist()],
            [FM_HISTORY, FM_HISTORY_LEN],
            with_event_timestamp=True,
        )
    stamped = stored.column("event_timestamp").cast(pa.timestamp("ms", "UTC")).cast(pa.int64())
    # (SQLite keeps whole seconds: a row stamped within the run's second counts as that run.)
    newer = np.asarray(pc.fill_null(pc.greater_equal(stamped, first_run_ms // 1000 * 1000), False), bool)
    values = stored.column(FM_HISTORY).to_pylist()
    lengths = stored.column(FM_HISTORY_LEN).to_pylist()
    for i, (flat, length) in enumerate(zip(values, lengths, strict=True)):
        if newer[i]:
            continue
        if flat and length and len(flat) == k * dim:
            states.values[i] = np.asarray(flat, np.float32).reshape(k, dim)
            states.length[i] = int(length)
    return newer


__all__ = ["FM_EMBEDDING", "MaterializeStats", "materialize", "run_times"]
