"""Stage one of the engine: drop too-late events and route the rest to their entities' shards.

Events arrive keyed by user, but ad, campaign, advertiser and query features need every
event of an entity in one place. The router hashes each group's entity key to one of
the repartition topic's partitions (a shard) and ships, per shard, the events that any
group routes there, with a bit mask saying which groups they count for. This is the
shuffle a Kafka Streams repartition topic or a Flink ``keyBy`` performs; with it several
workers can split the event partitions and still compute each entity in one place.

Lateness is decided per *source* partition, in offset order: an event is too late when
its time is more than ``allowed_lateness`` behind the highest event time seen before it
in its partition (the partition's watermark). The decision depends only on the
partition's contents and the checkpointed watermark, never on how messages were batched
or which worker read them, so replays and rebalances reproduce it exactly.

An event time too far ahead of the reading worker's clock (more than ``max_future_ms``,
``stream.max_future_s``) is dropped too, before lateness is judged: one event from a
device whose clock runs years ahead would otherwise raise its partition's watermark so
far that every later event of the partition is "too late". This one rule reads the
wall clock, so a replay can decide differently only for an event whose time has come
between the first read and the replay.

Every shipped row carries its source partition and offset; shards use them to skip rows
they already applied when a router replays after a crash (exactly-once state).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray

from features.definitions import FEATURE_GROUPS, QUERY_BLANK_RUNS, FeatureGroup, normalize_query
from streams.engine import kernels
from streams.engine.decode import ACTION_COLUMN, DELETE_ACTION
from streams.engine.keys import dictionary_encoded, first_string_hashes, string_hashes
from streams.events import EVENT_TYPE_NAMES

QUERY_KEY_COLUMN = "query_key"
MASK_COLUMN = "groups"  # bit ``i`` set: feature group ``i`` counts this row (its key and event type)
SOURCE_PARTITION = "src_partition"
SOURCE_OFFSET = "src_offset"


def key_column(group: FeatureGroup) -> str:
    """The shipped column holding ``group``'s entity key (queries are normalized first)."""
    return QUERY_KEY_COLUMN if group.key == "query" else group.key


def normalize_queries(queries: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Vector form of :func:`features.definitions.normalize_query`, equal to it for every text.

    Arrow's lower case maps code point by code point, which differs from Python's for a few
    non-ASCII letters (``"İ"``, a final ``"Σ"``), so queries that are not pure ASCII (few)
    are normalized by the Python function itself.
    """
    array = queries.combine_chunks() if isinstance(queries, pa.ChunkedArray) else queries
    collapsed = pc.replace_substring_regex(array, pattern=QUERY_BLANK_RUNS, replacement=" ")
    normalized = pc.utf8_lower(pc.utf8_trim(collapsed, characters=" "))
    other = pc.invert(pc.fill_null(pc.string_is_ascii(array), True))
    if not pc.any(other).as_py():
        return normalized
    rows = np.flatnonzero(other.to_numpy(zero_copy_only=False))
    texts = array.take(pa.array(rows)).to_pylist()
    return pc.replace_with_mask(normalized, other, pa.array([normalize_query(t) for t in texts], pa.string()))


_EVENT_TYPES = pa.array(EVENT_TYPE_NAMES, pa.string())


def event_type_codes(types: pa.Array | pa.ChunkedArray) -> NDArray[np.int8]:
    """Each row's event type as its index in :data:`~streams.events.EVENT_TYPE_NAMES` (-1: unknown or null).

    Computed once per batch and shared by everything that selects rows by type (the
    router per group, each shard's group states per aggregation): a lookup in these codes
    (:func:`of_types`) instead of an Arrow ``is_in`` over the type strings each time (tens
    of microseconds each, per shard, group and aggregation in a live cycle).
    """
    codes = pc.index_in(types, value_set=_EVENT_TYPES).fill_null(-1)
    return np.asarray(codes.to_numpy(), dtype=np.int8)


def of_types(codes: NDArray[np.int8], event_types: Iterable[str]) -> NDArray[np.bool_]:
    """Per row of :func:`event_type_codes`, whether its type is one of ``event_types``."""
    wanted = np.zeros(len(EVENT_TYPE_NAMES) + 1, dtype=bool)  # the last entry answers code -1
    wanted[[EVENT_TYPE_NAMES.index(name) for name in event_types]] = True
    return wanted[codes]


def deletions(events: pa.Table, type_codes: NDArray[np.int8] | None = None) -> NDArray[np.bool_]:
    """Per row, whether it is a user deletion (a user_profile event with ``"action": "delete"``).

    ``type_codes``: :func:`event_type_codes` of the rows, if the caller has them; they are
    computed only when some row has an action at all (the usual batch has none).
    """
    if ACTION_COLUMN not in events.column_names or events.column(ACTION_COLUMN).null_count == len(events):
        return np.zeros(len(events), dtype=bool)
    if type_codes is None:
        type_codes = event_type_codes(events.column("type"))
    deleting = pc.fill_null(pc.equal(events.column(ACTION_COLUMN), DELETE_ACTION), False)
    deleting_rows: NDArray[np.bool_] = np.asarray(deleting.to_numpy(zero_copy_only=False), dtype=bool)
    return of_types(type_codes, ("user_profile",)) & deleting_rows


def forgets_users(group: FeatureGroup) -> bool:
    """Whether ``group``'s entities are users, whose features a user deletion removes."""
    return group.key == "user_id"


def shard_of(keys: pa.ChunkedArray | pa.Array, shards: int) -> NDArray[Any]:
    """Shard index per key (-1 for null keys): a stable hash, the same in every process.

    The hash is :func:`~streams.engine.keys.string_hashes`' first (its multipliers come
    from a fixed seed); its high bits pick the shard: they mix every byte, where the
    lowest bits of a sum do not. With the compiled kernels every key is hashed where it
    stands, one pass over its bytes (cheaper than finding the distinct keys first);
    without them only the distinct keys are hashed, then spread back by dictionary index.
    """
    chunks = keys.chunks if isinstance(keys, pa.ChunkedArray) else [keys]
    if kernels.compiled is not None and all(_is_string(chunk.type) for chunk in chunks):
        return _shard_of_each(chunks, shards)
    encoded = dictionary_encoded(keys)
    primary, _ = string_hashes(encoded.dictionary)
    hashes = _shards_of_hashes(primary, shards)
    indices = encoded.indices
    if indices.null_count == 0:
        return np.asarray(hashes[indices.to_numpy()])
    result = np.full(len(indices), -1, dtype=np.int64)
    valid = indices.is_valid().to_numpy(zero_copy_only=False)
    result[valid] = hashes[indices.fill_null(0).to_numpy()[valid]]
    return result


def _is_string(data_type: pa.DataType) -> bool:
    return bool(pa.types.is_string(data_type) or pa.types.is_large_string(data_type))


def _shards_of_hashes(primary: NDArray[np.int64], shards: int) -> NDArray[np.int64]:
    return ((primary.view(np.uint64) >> np.uint64(32)) % np.uint64(shards)).astype(np.int64)


def _shard_of_each(chunks: Sequence[pa.Array], shards: int) -> NDArray[np.int64]:
    """:func:`shard_of` hashing every key of these string chunks (null keys: -1)."""
    parts = []
    for chunk in chunks:
        part = _shards_of_hashes(first_string_hashes(chunk), shards)
        if chunk.null_count:
            part[~np.asarray(chunk.is_valid().to_numpy(zero_copy_only=False), dtype=bool)] = -1
        parts.append(part)
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


@dataclass
class RoutedBatch:
    """What routing one micro-batch produced.

    ``shards`` maps a shard to its rows; ``late`` and ``future`` list (row, reason) for
    events dropped as too late or too far ahead of the clock; ``watermarks`` holds the
    updated watermark of every source partition in the batch.
    """

    shards: dict[int, pa.Table]
    late: list[tuple[int, str]]
    watermarks: dict[int, int]
    future: list[tuple[int, str]] = field(default_factory=list)


class Router:
    def __init__(
        self,
        shards: int,
        allowed_lateness_ms: int,
        groups: Sequence[FeatureGroup] = FEATURE_GROUPS,
        *,
        max_future_ms: int = 0,
    ) -> None:
        """``max_future_ms``: events more than this ahead of ``route``'s ``now_ms`` are dropped (0: never)."""
        if len(groups) > 63:
            raise ValueError("at most 63 feature groups can share one engine")
        self.shards = shards
        self.allowed_lateness_ms = allowed_lateness_ms
        self.max_future_ms = max_future_ms
        self.groups = tuple(groups)
        self._cell_type = next(
            t for t in (np.uint8, np.uint16, np.uint32, np.uint64) if np.iinfo(t).bits >= len(groups)
        )

    def route(
        self,
        events: pa.Table,
        partitions: NDArray[Any],
        offsets: NDArray[Any],
        watermarks: dict[int, int],
        now_ms: int | None = None,
    ) -> RoutedBatch:
        """Route decoded ``events`` read from ``partitions``/``offsets`` (in offset order per partition).

        ``watermarks`` are the source partitions' watermarks before this batch (missing:
        none yet); the result carries the new ones. ``now_ms``: the reading worker's
        clock, for the ``max_future_ms`` rule (None: no such rule, as in replays).
        """
        times = events.column("event_time_ms").to_numpy()
        future_mask = np.zeros(len(times), dtype=bool)
        future: list[tuple[int, str]] = []
        if self.max_future_ms > 0 and now_ms is not None:
            future_mask = times > now_ms + self.max_future_ms
            future = [
                (
                    int(row),
                    f"event time is {(times[row] - now_ms) / 3_600_000:,.1f} h ahead of the worker's clock, "
                    f"more than stream.max_future_s = {self.max_future_ms / 1000:g} s (a producer clock "
                    "running ahead?); not counted in stream features",
                )
                for row in np.flatnonzero(future_mask)
            ]
        type_codes = event_type_codes(events.column("type"))
        # A privacy deletion is never late, and its time (often the request's, not the
        # stream's) moves no watermark: later events must not become "late" because of it.
        deleting = deletions(events, type_codes) & ~future_mask
        late_mask, watermark_at, new_watermarks = self._late(
            times, partitions, watermarks, future_mask | deleting
        )
        late = [
            (
                int(row),
                f"event time is {(watermark_at[row] - times[row]) / 1000:,.3f} s behind the watermark of "
                f"partition {int(partitions[row])}, more than the allowed lateness of "
                f"{self.allowed_lateness_ms / 1000:g} s; not counted in stream features",
            )
            for row in np.flatnonzero(late_mask)
        ]
        on_time = ~(late_mask | future_mask)  # (deletions included: ignored only for lateness)
        if "query" in events.column_names:
            events = events.append_column(QUERY_KEY_COLUMN, normalize_queries(events.column("query")))
        events = events.append_column(SOURCE_PARTITION, pa.array(partitions.astype(np.int32)))
        events = events.append_column(SOURCE_OFFSET, pa.array(offsets.astype(np.int64)))

        # One shipped row per (event, shard), with the OR of the bits of the groups routed
        # there: a mask per (shard, event) cell, set group by group (a group routes an
        # event to one shard), read back in (shard, event) order. Cells are as narrow as
        # the group count allows (one byte for up to 8 groups: 1.3 MB for 64 shards x 20k).
        n = len(events)
        cells = np.zeros(self.shards * n, dtype=self._cell_type)
        for bit, group in enumerate(self.groups):
            relevant = of_types(type_codes, {t for a in group.aggregations for t in a.event_types})
            if forgets_users(group):
                relevant = relevant | deleting
            shard = shard_of(events.column(key_column(group)), self.shards)
            rows = np.flatnonzero(relevant & on_time & (shard >= 0))
            cells[shard[rows] * n + rows] |= 1 << bit
        unique_pairs = np.flatnonzero(cells)
        if len(unique_pairs) == 0:
            return RoutedBatch({}, late, new_watermarks, future)
        masks = cells[unique_pairs].astype(np.int64)
        pair_shard = unique_pairs // n
        pair_row = unique_pairs % n
        shipped = events.take(pa.array(pair_row)).append_column(MASK_COLUMN, pa.array(masks))
        boundaries = np.flatnonzero(np.r_[True, pair_shard[1:] != pair_shard[:-1], True])
        shards = {
            int(pair_shard[start]): shipped.slice(start, end - start)
            for start, end in zip(boundaries[:-1], boundaries[1:], strict=True)
        }
        return RoutedBatch(shards, late, new_watermarks, future)

    def _late(
        self,
        times: NDArray[Any],
        partitions: NDArray[Any],
        watermarks: dict[int, int],
        ignored: NDArray[np.bool_],
    ) -> tuple[NDArray[Any], NDArray[Any], dict[int, int]]:
        """Per event: too late?, the watermark it was judged against; and the new watermarks.

        ``ignored`` events (already dropped) neither move a watermark nor count as late.
        """
        late = np.zeros(len(times), dtype=bool)
        watermark_at = np.zeros(len(times), dtype=np.int64)
        updated = dict(watermarks)
        no_time = np.iinfo(np.int64).min + self.allowed_lateness_ms
        for partition in np.unique(partitions):
            rows = np.flatnonzero(partitions == partition)
            start = watermarks.get(int(partition), no_time)
            counted = np.where(ignored[rows], no_time, times[rows])
            seen = np.maximum.accumulate(np.r_[start, counted])[:-1]  # watermark before each event
            late[rows] = (times[rows] < seen - self.allowed_lateness_ms) & ~ignored[rows]
            watermark_at[rows] = seen
            updated[int(partition)] = int(max(start, counted.max()))  # (no_time while all were ignored)
        return late, watermark_at, updated
