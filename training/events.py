"""Users' event histories as integer arrays, and the last L events of any user at any time.

The foundation model reads each user's raw history: ads seen, clicked and converted on,
search queries, the ads' topics and the time since each event. This module turns an
event log (the simulator's Parquet layout) into one NumPy array per token field, sorted
by (user, event time), so the history of a whole batch of (user, time) queries is a
single ``searchsorted`` plus a gather: no per-user Python.

Identifiers are hashed into fixed-size buckets (a stable hash, the same in every process)
instead of being looked up in a vocabulary, so a model keeps working when new ads,
campaigns or queries appear after it was trained (they share buckets with old ones).
Topics come from the ad catalog (an ad's category is platform metadata, known for every
ad), falling back to "unknown" for ads the catalog does not list. Search events get the
topic of their query when ``query_topics`` (normalized query -> category, from the
platform's query categorizer, :func:`categorize_queries`) is given: searches are the
densest signal of a user's taste (a few clicks per user, several searches).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from numpy.typing import NDArray

from infra.arrow_times import EventTimeError, epoch_ms
from infra.parquet import open_parquet
from infra.settings import DEFAULT_DEVICES, DEFAULT_PLACEMENTS, ModelSettings
from streams.engine.decode import outside_event_time_range
from streams.engine.router import deletions, normalize_queries

EVENT_TYPES = ("impression", "click", "conversion", "search")
"""Token types; 0 is padding, so type ``i`` is code ``i + 1``."""
PLACEMENTS = DEFAULT_PLACEMENTS
"""Default placements (``models.placements``): the simulator's; code ``i + 1``, 0 for any other value."""
DEVICES = DEFAULT_DEVICES
GAP_BUCKETS = 24
"""Time-gap buckets: ``1 + floor(log2(1 + seconds))``, capped (2**23 s is about 97 days)."""


@dataclass(frozen=True)
class Buckets:
    """How identifiers become embedding rows: hash buckets per id kind, and the named placements
    and devices (index 0 is reserved for "none" or "unknown"). Saved with each model."""

    ads: int = 2_048
    campaigns: int = 512
    advertisers: int = 128
    queries: int = 4_096
    topics: int = 64
    profile_values: int = 1_024
    placements: tuple[str, ...] = PLACEMENTS
    devices: tuple[str, ...] = DEVICES

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Buckets:
        """From ``asdict`` output read back from JSON (lists for tuples; models saved before the
        placement and device lists existed get the defaults they were trained with)."""
        values = dict(raw)
        for name in ("placements", "devices"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)

    @classmethod
    def for_models(cls, models: ModelSettings) -> Buckets:
        """The buckets models trained with these settings use."""
        return cls(placements=tuple(models.placements), devices=tuple(models.devices))


class EventLogError(ValueError):
    """The event log or catalog cannot be read or lacks a needed column."""


def stable_bucket(values: pa.Array | pa.ChunkedArray, buckets: int) -> NDArray[np.int64]:
    """``1 + hash(value) % (buckets - 1)`` per value (0 for nulls), stable across processes."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    encoded = pc.dictionary_encode(values)
    dictionary = encoded.dictionary.to_numpy(zero_copy_only=False).astype(object)
    hashes = (pd.util.hash_array(dictionary, categorize=False) % np.uint64(buckets - 1)).astype(np.int64) + 1
    indices = encoded.indices
    out = np.zeros(len(indices), np.int64)
    valid = np.asarray(indices.is_valid().to_numpy(zero_copy_only=False), bool)
    if valid.any():
        positions = np.asarray(indices.fill_null(0).to_numpy(zero_copy_only=False), np.int64)
        out[valid] = hashes[positions[valid]]
    return out


def category_codes(values: pa.ChunkedArray, categories: tuple[str, ...]) -> NDArray[np.int64]:
    """Index of each value in ``categories`` plus one (0: null or unknown)."""
    index = pc.index_in(values, value_set=pa.array(categories, pa.string()))
    return np.asarray(index.fill_null(-1).to_numpy(zero_copy_only=False), np.int64) + 1


def category_code(value: str, categories: tuple[str, ...]) -> int:
    """The code :func:`category_codes` gives ``value``."""
    return categories.index(value) + 1 if value in categories else 0


REQUIRED_COLUMNS = ("type", "event_id", "event_time", "user_id", "ad_id", "campaign_id", "advertiser_id")
"""What every event log must have: the events' identity, time and the ad they are about."""
OPTIONAL_COLUMNS: dict[str, pa.DataType] = {
    "impression_id": pa.string(),  # clicks name their impression: the click labels
    "click_id": pa.string(),  # conversions name their click: the conversion labels
    "query": pa.string(),
    "placement": pa.string(),
    "device": pa.string(),
    "position": pa.int64(),
    "cost_micros": pa.int64(),
    "value": pa.float64(),
    "action": pa.string(),  # a user_profile's upsert or delete
}
"""Columns a log may lack (its producers never send them): read as all null."""


def read_events(path: Path) -> pa.Table:
    """Events from a Parquet file or directory (``adreach simulate --format parquet`` output, or any
    log with the SDK's field names: :data:`REQUIRED_COLUMNS`, and the :data:`OPTIONAL_COLUMNS`
    it has; missing optional ones are added as nulls)."""
    if not path.exists():
        raise EventLogError(
            f"{path}: no such event file or directory (run `adreach simulate --format parquet`)"
        )
    try:
        table = open_parquet(path).to_table()
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
        raise EventLogError(f"{path}: not a Parquet event log ({exc})") from exc
    if table.num_rows == 0:
        raise EventLogError(f"{path}: the event log holds no events")
    return with_event_columns(table, source=str(path))


def with_event_columns(events: pa.Table, *, source: str = "the event log") -> pa.Table:
    """``events`` checked for :data:`REQUIRED_COLUMNS`, with missing :data:`OPTIONAL_COLUMNS` added as nulls.

    The one column rule of every reader of event logs (files, or tables built in memory).
    A user deletion leaves out the user's events up to it (:func:`without_deleted_history`).
    """
    missing = [name for name in REQUIRED_COLUMNS if name not in events.column_names]
    if missing:
        raise EventLogError(
            f"{source}: the event log has no {', '.join(map(repr, missing))} column(s); every log needs "
            f"{', '.join(REQUIRED_COLUMNS)} (the producer SDK's field names)"
        )
    for name, kind in OPTIONAL_COLUMNS.items():
        if name not in events.column_names:
            events = events.append_column(name, pa.nulls(events.num_rows, kind))
        elif events.schema.field(name).type != kind:
            events = _cast_column(events, name, kind, source)
    for name in _TEXT_COLUMNS:  # ids are strings in the SDK; a log may store integers
        if events.schema.field(name).type != pa.string():
            events = _cast_column(events, name, pa.string(), source)
    _check_event_times(events, source)
    return without_deleted_history(events)


def user_deletions(events: pa.Table) -> dict[str, int]:
    """Each deleted user's latest deletion time (epoch ms), from user_profile deletion events."""
    return _latest_deletions(events, deletions(events))


def _latest_deletions(events: pa.Table, deleting: NDArray[np.bool_]) -> dict[str, int]:
    if not deleting.any():
        return {}
    rows = events.filter(pa.array(deleting))
    times = epoch_ms(rows.column("event_time"))
    latest = (
        pa.table({"user_id": rows.column("user_id"), "t": times})
        .group_by("user_id")
        .aggregate([("t", "max")])
    )
    return dict(zip(latest.column("user_id").to_pylist(), latest.column("t_max").to_pylist(), strict=True))


def without_deleted_history(events: pa.Table) -> pa.Table:
    """``events`` without a deleted user's events at or before the user's latest deletion.

    The privacy rule of the stream features (:mod:`streams.engine.forget`) for logs read
    whole: no model, training set or embedding learns from a deleted user's past. The
    deletion events themselves stay (a profile reader sees the profile end there).
    """
    deleting = deletions(events)
    deleted = _latest_deletions(events, deleting)
    if not deleted:
        return events
    index = pc.index_in(events.column("user_id"), value_set=pa.array(list(deleted), pa.string()))
    index = np.asarray(index.fill_null(-1).to_numpy(zero_copy_only=False), np.int64)
    found = index >= 0
    until = np.asarray(list(deleted.values()), np.int64)
    times = np.asarray(epoch_ms(events.column("event_time")).to_numpy(zero_copy_only=False), np.int64)
    forgotten = np.zeros(events.num_rows, dtype=bool)
    forgotten[found] = times[found] <= until[index[found]]
    forgotten &= ~deleting
    return events.filter(pa.array(~forgotten)) if forgotten.any() else events


_TEXT_COLUMNS = ("type", "event_id", "user_id", "ad_id", "campaign_id", "advertiser_id")


def _cast_column(events: pa.Table, name: str, kind: pa.DataType, source: str) -> pa.Table:
    column = events.column(name)
    try:
        cast = column.cast(kind)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise EventLogError(
            f"{source}: column {name!r} of type {column.type} cannot be read as {kind} ({exc})"
        ) from exc
    return events.set_column(events.schema.get_field_index(name), name, cast)


def _check_event_times(events: pa.Table, source: str) -> None:
    """Every event needs an instant inside the SDK's 2000..2100: one stray time would stretch the
    time split over decades and leave the training parts nearly empty."""
    times = events.column("event_time")
    try:
        millis = epoch_ms(times)
    except EventTimeError as exc:
        raise EventLogError(
            f"{source}: event_time: {exc} (texts must be RFC 3339 instants with a zone, such as "
            "2026-01-05T10:00:00Z; or store timestamps)"
        ) from exc
    event_ids = events.column("event_id")
    if millis.null_count:
        first = pc.index(pc.is_null(millis), True).as_py()
        raise EventLogError(
            f"{source}: {millis.null_count:,} events have no event_time "
            f"(the first: event_id {event_ids[first].as_py()!r})"
        )
    outside = outside_event_time_range(millis)
    if pc.any(outside).as_py():
        first = pc.index(outside, True).as_py()
        shown = times[first].as_py()
        shown = shown.isoformat() if hasattr(shown, "isoformat") else repr(shown)
        raise EventLogError(
            f"{source}: {pc.sum(outside).as_py():,} events have an event_time outside 2000-01-01..2100-01-01 "
            f"(the first: {shown}, event_id {event_ids[first].as_py()!r}); check the unit and the zone"
        )


def read_topics(catalog: Path | None) -> dict[str, str]:
    """Ad id -> topic from an ad catalog (``ads.parquet`` with ``ad_id`` and ``topic``)."""
    if catalog is None or not catalog.exists():
        return {}
    try:
        table = pq.read_table(catalog)
    except (pa.ArrowInvalid, OSError) as exc:
        raise EventLogError(f"{catalog}: not a Parquet ad catalog ({exc})") from exc
    missing = [name for name in ("ad_id", "topic") if name not in table.column_names]
    if missing:
        raise EventLogError(
            f"{catalog}: the ad catalog has no {', '.join(map(repr, missing))} column(s); it needs ad_id "
            f"and topic (it has {', '.join(table.column_names)}); move it away to train without topics"
        )
    try:  # ids as the log's are read: integers as their decimal text
        ads, topics = (table.column(name).cast(pa.string()) for name in ("ad_id", "topic"))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise EventLogError(f"{catalog}: ad_id and topic must be text or integers ({exc})") from exc
    return dict(zip(ads.to_pylist(), topics.to_pylist(), strict=True))


@dataclass
class EventLog:
    """Every user's events, sorted by (user, time), one integer array per token field."""

    user_ids: NDArray[Any]  # object array: user index -> id
    user: NDArray[np.int64]
    time_ms: NDArray[np.int64]
    kind: NDArray[np.int64]
    ad: NDArray[np.int64]
    campaign: NDArray[np.int64]
    advertiser: NDArray[np.int64]
    topic: NDArray[np.int64]
    query: NDArray[np.int64]
    user_start: NDArray[np.int64]  # first position of each user; user_start[-1] == len
    topics: tuple[str, ...]  # topic code i + 1 -> name
    ad_topics: dict[str, str]
    buckets: Buckets
    profiles: ProfileLog = field(default_factory=lambda: ProfileLog({}))
    deletions: dict[str, int] = field(default_factory=dict)
    """Deleted users (also those with no other event here) -> their latest deletion time, epoch ms."""

    @property
    def user_index(self) -> dict[str, int]:
        return {str(u): i for i, u in enumerate(self.user_ids.tolist())}

    @property
    def time_range_ms(self) -> tuple[int, int]:
        return int(self.time_ms.min()), int(self.time_ms.max()) + 1

    def history(
        self,
        users: NDArray[np.int64],
        times_ms: NDArray[np.int64],
        length: int,
        attributes: tuple[str, ...] = (),
    ) -> dict[str, NDArray[Any]]:
        """The last ``length`` events of each user strictly before each time, right-aligned.

        Returns ``(n, length)`` int64 arrays ``kind``, ``ad``, ``campaign``, ``advertiser``,
        ``topic``, ``query``, ``gap`` (time-gap bucket); padding slots are all 0.
        Users given as -1 (unknown) get an empty history. Each profile attribute named in
        ``attributes`` adds an ``(n,)`` array ``attribute:<name>``: the code of its latest
        value strictly before each time (:meth:`ProfileLog.as_of`).
        """
        known = users >= 0
        safe_users = np.where(known, users, 0)
        keys = self.user * _KEY_SCALE + self.time_ms
        end = np.searchsorted(keys, safe_users * _KEY_SCALE + times_ms, side="left")
        start = self.user_start[safe_users]
        end = np.where(known, end, start)
        index = end[:, None] - length + np.arange(length)[None, :]
        valid = index >= start[:, None]
        index = np.where(valid, index, 0)
        out = {
            name: np.where(valid, getattr(self, name)[index], 0)
            for name in ("kind", "ad", "campaign", "advertiser", "topic", "query")
        }
        gap_s = np.maximum(times_ms[:, None] - self.time_ms[index], 0) / 1000.0
        gap = np.minimum(1 + np.floor(np.log2(1.0 + gap_s)), GAP_BUCKETS - 1).astype(np.int64)
        out["gap"] = np.where(valid, gap, 0)
        if attributes:
            out.update(self.profiles.as_of(users, times_ms, attributes))
        return out


ATTRIBUTE_PREFIX = "attribute:"
"""History keys of profile attributes: ``attribute:<name>``."""


@dataclass
class ProfileLog:
    """Every user-profile attribute's values over time, as hashed codes, for as-of lookups.

    Profiles change rarely and a user's first one is soon pushed out of a window of the last
    L events, so the FM does not read them as tokens: each example gets the latest value of
    each attribute (age band, gender, country, ...) known strictly before its time, the
    same point-in-time rule as the events. A profile update that leaves an attribute out
    (or sets it null) keeps its earlier value.
    """

    values: dict[str, tuple[NDArray[np.int64], NDArray[np.int64]]]
    """Per attribute: the sorted keys ``user * 2**42 + time_ms`` of its non-null values (users as
    :class:`EventLog` indices), and their codes (``1 + hash % (Buckets.profile_values - 1)``)."""

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.values)

    def as_of(
        self, users: NDArray[np.int64], times_ms: NDArray[np.int64], names: tuple[str, ...]
    ) -> dict[str, NDArray[np.int64]]:
        """``attribute:<name>`` -> ``(n,)`` codes (0: no value yet, an unknown user (-1) or attribute)."""
        out: dict[str, NDArray[np.int64]] = {}
        for name in names:
            codes = np.zeros(len(users), np.int64)
            if name in self.values and len(users):
                keys, values = self.values[name]
                wanted = users * _KEY_SCALE + times_ms
                position = np.searchsorted(keys, wanted, side="left") - 1  # strictly before t
                safe = np.maximum(position, 0)
                found = (users >= 0) & (position >= 0) & (keys[safe] // _KEY_SCALE == users)
                codes = np.where(found, values[safe], 0)
            out[ATTRIBUTE_PREFIX + name] = codes
        return out


def topic_codes(
    ad_ids: pa.Array, ad_topics: dict[str, str], topic_names: tuple[str, ...]
) -> NDArray[np.int64]:
    """Topic code (1-based index in ``topic_names``; 0: unknown ad) of each ad id."""
    if not ad_topics:
        return np.zeros(len(ad_ids), np.int64)
    code_of = {name: i + 1 for i, name in enumerate(topic_names)}
    codes = pa.array([code_of.get(t, 0) for t in ad_topics.values()], pa.int64())
    position = pc.index_in(ad_ids, value_set=pa.array(list(ad_topics), pa.string()))
    return np.asarray(pc.take(codes, position).fill_null(0).to_numpy(zero_copy_only=False), np.int64)


_KEY_SCALE = np.int64(1) << np.int64(42)  # ms timestamps stay below 2**42 until the year 2109


def search_queries(events: pa.Table) -> list[str]:
    """The distinct normalized queries of the search events in ``events``."""
    searches = events.filter(pc.equal(events.column("type"), "search"))
    normalized = normalize_queries(searches.column("query").combine_chunks())
    return sorted(q for q in pc.unique(normalized).to_pylist() if q)


def build_event_log(
    events: pa.Table,
    topics: dict[str, str],
    buckets: Buckets = Buckets(),
    query_topics: dict[str, str] | None = None,
) -> EventLog:
    """Index ``events`` (columns: :func:`with_event_columns`) by user and time; profile events are left out.

    ``query_topics``: normalized query -> topic name, the topic of search events (others: 0).
    """
    events = with_event_columns(events)
    profile_events = events.filter(pc.equal(events.column("type"), "user_profile"))
    kind_all = category_codes(events.column("type"), EVENT_TYPES)
    keep = kind_all > 0
    events = events.filter(pa.array(keep))
    kind = kind_all[keep]
    user_codes = pc.dictionary_encode(events.column("user_id").combine_chunks())
    user_ids = user_codes.dictionary.to_numpy(zero_copy_only=False).astype(object)
    user = np.asarray(user_codes.indices.to_numpy(zero_copy_only=False), np.int64)
    time_ms = np.asarray(epoch_ms(events.column("event_time")).to_numpy(), np.int64)
    topic_names = tuple(sorted(set(topics.values())))
    if len(topic_names) >= buckets.topics:
        raise EventLogError(f"{len(topic_names)} topics do not fit in {buckets.topics - 1} topic codes")
    ad_column = events.column("ad_id").combine_chunks()
    topic = topic_codes(ad_column, topics, topic_names)
    queries = events.column("query").combine_chunks()
    normalized = normalize_queries(queries)  # the query entity's key, as the stream features use
    if query_topics:
        code_of = {name: i + 1 for i, name in enumerate(topic_names)}
        known = {q: code_of[t] for q, t in query_topics.items() if t in code_of}
        if known:
            position = pc.index_in(normalized, value_set=pa.array(list(known), pa.string()))
            codes = np.asarray(list(known.values()), np.int64)
            found = position.is_valid().to_numpy(zero_copy_only=False) & (
                kind == EVENT_TYPES.index("search") + 1
            )
            index = position.fill_null(0).to_numpy(zero_copy_only=False)
            topic = np.where(found, codes[index], topic)
    fields = {
        "kind": kind,
        "ad": stable_bucket(ad_column, buckets.ads),
        "campaign": stable_bucket(events.column("campaign_id"), buckets.campaigns),
        "advertiser": stable_bucket(events.column("advertiser_id"), buckets.advertisers),
        "topic": topic,
        "query": stable_bucket(normalized, buckets.queries),
    }
    order = np.lexsort((time_ms, user))
    counts = np.bincount(user, minlength=len(user_ids))
    profiles = build_profile_log(profile_events, user_ids, buckets)
    user_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return EventLog(
        user_ids=user_ids,
        user=user[order],
        time_ms=time_ms[order],
        topics=topic_names,
        ad_topics=topics,
        buckets=buckets,
        user_start=user_start,
        profiles=profiles,
        deletions=user_deletions(profile_events),
        **{name: values[order] for name, values in fields.items()},
    )


def build_profile_log(profiles: pa.Table, user_ids: NDArray[Any], buckets: Buckets) -> ProfileLog:
    """The ``attributes`` of ``user_profile`` events (a struct, or a map of strings) as a :class:`ProfileLog`.

    Every scalar attribute is kept (values read as text and hashed, so any producer's
    attributes work); nested ones (lists, structs) and users without other events are
    left out. A log without an ``attributes`` column gives an empty profile log.
    """
    if "attributes" not in profiles.column_names or profiles.num_rows == 0 or not len(user_ids):
        return ProfileLog({})
    column = profiles.column("attributes").combine_chunks()
    if pa.types.is_struct(column.type):
        # flatten(): a null profile (a deletion) makes every attribute of its row null
        attributes = {column.type.field(i).name: child for i, child in enumerate(column.flatten())}
    elif pa.types.is_map(column.type):
        keys = pc.unique(column.keys).drop_null().to_pylist()  # MapArray.keys: every entry's key
        key_type = column.type.key_type
        attributes = {str(key): pc.map_lookup(column, pa.scalar(key, key_type), "last") for key in keys}
    else:
        return ProfileLog({})
    position = pc.index_in(profiles.column("user_id"), value_set=pa.array(user_ids.tolist(), pa.string()))
    user = np.asarray(position.fill_null(-1).to_numpy(zero_copy_only=False), np.int64)
    time_ms = np.asarray(epoch_ms(profiles.column("event_time")).to_numpy(), np.int64)
    values: dict[str, tuple[NDArray[np.int64], NDArray[np.int64]]] = {}
    for name, array in attributes.items():
        if pa.types.is_nested(array.type):
            continue
        text = array.cast(pa.string())
        keep = (user >= 0) & np.asarray(text.is_valid().to_numpy(zero_copy_only=False), bool)
        if not keep.any():
            continue
        keys = user[keep] * _KEY_SCALE + time_ms[keep]
        codes = stable_bucket(text.filter(pa.array(keep)), buckets.profile_values)
        order = np.argsort(keys, kind="stable")  # same-instant updates: the log's later row wins
        values[name] = (keys[order], codes[order])
    return ProfileLog(values)
