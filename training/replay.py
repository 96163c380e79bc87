"""Replay a recorded event log through the stream engine's state into Feast (a backfill).

Training sets need the *history* of the stream features, as the online path would have
written it: one offline row per entity and flush, stamped with its tile end. Rather
than recomputing features a second way, this drives the same engine code as
``adreach stream run`` (:class:`~streams.engine.replay.InProcessEngine`: the router's
lateness rules and a shard's state) from a Parquet event log instead of Kafka, one
micro-batch per ``flush`` of arrival time. Rows therefore carry the same values and timestamps a live
worker flushing at that cadence would have stored, and Feast's point-in-time joins over
them give exactly what a model could have read at serving time.

Only the offline store is written (the history is what training reads; the online store
is the live engine's business), one Parquet part per group at the end: Feast's file
offline store reads a few large files several times faster than thousands of small ones.
An entity changed by several flushes within one tile gets one row per flush with the same
timestamp; only the last is kept, since rows written together share one created
timestamp and Feast would pick among them at random (see :mod:`features.offline`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from features.definitions import FEATURE_GROUPS, FeatureGroup
from features.feast_objects import append_offline, arrow_schema
from features.offline import last_row_per_key_and_time
from infra.arrow_times import epoch_ms
from infra.settings import Settings
from streams.engine.decode import ACTION_COLUMN, EventDecoder
from streams.engine.replay import EmittedRows, InProcessEngine
from streams.engine.router import deletions, event_type_codes, of_types


@dataclass(frozen=True)
class ReplayStats:
    events: int
    batches: int
    feature_rows: int
    late: int


def decoded_columns(events: pa.Table, groups: tuple[FeatureGroup, ...] = FEATURE_GROUPS) -> pa.Table:
    """The simulator's event table in the decoder's output layout (``event_time_ms``, typed columns)."""
    schema = EventDecoder(groups).output_schema
    columns = []
    for field in schema:
        if field.name == "event_time_ms":
            columns.append(epoch_ms(events.column("event_time")))
        elif field.name not in events.column_names and field.name == ACTION_COLUMN:
            columns.append(pa.nulls(events.num_rows, field.type))  # (a log without profile actions)
        else:
            columns.append(events.column(field.name).cast(field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def replay_stream_features(
    settings: Settings,
    events: pa.Table,
    *,
    flush_s: int = 900,
    groups: tuple[FeatureGroup, ...] = FEATURE_GROUPS,
    progress: Callable[[int], None] | None = None,
) -> ReplayStats:
    """Fold ``events`` into Feast, ``flush_s`` of arrivals a time, in the order a consumer reads them.

    The Feast repository must already be applied (``features.store.open_store``). With an
    ``arrival_time`` column (the simulator's layout) events are taken in arrival order;
    without one, the log's own order is the reading order and its clock is the newest
    event time read so far, so an event far behind it is late here as it would be for a
    live worker reading the log (ordering by event time instead would let nothing be late).
    """
    if flush_s <= 0:
        raise ValueError("flush_s must be positive")
    if "arrival_time" in events.column_names:
        arrival = epoch_ms(events.column("arrival_time")).to_numpy()
        order = np.argsort(arrival, kind="stable")
        events = events.take(pa.array(order))
        arrival = arrival[order]
    else:
        arrival = np.maximum.accumulate(epoch_ms(events.column("event_time")).to_numpy())
    # Profiles carry no stream feature; only deletions act on them (the deleted users'
    # history is left out, as a live worker removes it from the stores).
    type_codes = event_type_codes(events.column("type"))
    keep = ~of_types(type_codes, ("user_profile",)) | deletions(events, type_codes)
    events, arrival = events.filter(pa.array(keep)), arrival[keep]
    if progress is not None and not keep.all():
        progress(int((~keep).sum()))  # profiles carry no stream feature: done as soon as read
    decoded = decoded_columns(events, groups)
    data_dir = settings.feature_repo_dir / "data"
    by_name = {group.name: group for group in groups}
    written = 0
    emitted = EmittedRows(groups)
    batch_index = (arrival - arrival[0]) // (flush_s * 1000) if len(arrival) else arrival
    bounds: list[int] = (
        np.flatnonzero(np.r_[True, batch_index[1:] != batch_index[:-1], True]).tolist()
        if len(arrival)
        else []
    )
    late = batches = 0
    with InProcessEngine(groups, settings.stream.allowed_lateness_s * 1000) as engine:
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            offsets = np.arange(start, end, dtype=np.int64)
            changed, chunk_late = engine.fold(
                decoded.slice(int(start), int(end - start)),
                np.zeros(len(offsets), np.int64),
                offsets,
                int(end),
            )
            late += chunk_late
            emitted.add(
                {name: table.select(arrow_schema(by_name[name]).names) for name, table in changed.items()},
                engine.take_deleted(),
            )
            batches += 1
            if progress is not None:
                progress(int(end - start))
    for group in groups:  # one part file per group: Feast reads few large files fastest
        tables = emitted.tables(group.name)
        if not tables:
            continue
        rows = pa.concat_tables(tables).cast(arrow_schema(group))
        written += rows.num_rows
        append_offline(data_dir, group, last_row_per_key_and_time(rows, group.key))
    return ReplayStats(len(decoded), batches, written, late)
