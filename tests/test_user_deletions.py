"""User deletions in the stream features, end to end: the real broker, ``adreach stream run``
processes, Feast's SDK for the reads and the offline part files as Feast reads them.

A user_profile event with ``"action": "delete"`` must take the user's stream features out
of the online store at once and out of the offline store (its history), forget the user's
state so that later events count from nothing, and keep forgetting events from before the
deletion that arrive late, across a restart of the worker.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.definitions import FEATURE_GROUPS
from features.online import CHANGED_COLUMN
from features.reference import reference_features
from infra.settings import Settings
from streams.engine.decode import EventDecoder
from streams.engine.replay import replay
from streams.engine.router import Router
from streams.engine.shard import ShardStates
from tests.test_online_store import redis_available
from tests.test_stream_engine import online_features, produce, run_engine

USER_GROUP = next(g for g in FEATURE_GROUPS if g.name == "user_activity")
DAY = "2026-01-05"


def event(kind: str, event_id: str, minute: int, user: str, **fields: object) -> dict[str, object]:
    """An SDK-valid event of ``user`` at 10:``minute`` of the test day."""
    chain = {"ad_id": "ad-1", "campaign_id": "c-1", "advertiser_id": "adv-1"}
    extra: dict[str, object] = {
        "impression": {**chain, "cost_micros": 1_000},
        "click": {**chain, "impression_id": f"imp-of-{event_id}"},
        "search": {"query": f"query of {event_id}"},
        "user_profile": {},
    }[kind]
    when = f"{DAY}T10:{minute:02d}:00Z"
    return {"type": kind, "event_id": event_id, "event_time": when, "user_id": user, **extra, **fields}


def deletion(event_id: str, minute: int, user: str) -> dict[str, object]:
    return event("user_profile", event_id, minute, user, action="delete")


def as_lines(events: list[dict[str, object]]) -> list[bytes]:
    return [json.dumps(e).encode() for e in events]


def offline_user_rows(settings: Settings) -> pa.Table:
    """The user view's offline rows, every part file as Feast reads them."""
    return pq.read_table(settings.feature_repo_dir / "data" / USER_GROUP.name)


@pytest.fixture(params=["sqlite", "redis"])
def deleting(stream: Settings, request: pytest.FixtureRequest) -> Settings:
    if request.param == "redis":
        redis_available()
    features = stream.features.model_copy(
        update={"online_store": request.param, "project": f"adreach_del_{uuid.uuid4().hex[:8]}"}
    )
    return stream.model_copy(update={"features": features})


def test_a_deleted_users_features_leave_both_stores_and_only_later_events_count_again(
    deleting: Settings,
) -> None:
    settings = deleting
    before = [
        event("impression", "imp-1", 0, "gone"),
        event("impression", "imp-2", 1, "gone"),
        event("click", "clk-1", 2, "gone"),
        event("search", "srch-1", 3, "gone"),
        event("impression", "imp-keep-1", 3, "kept"),
    ]
    produce(settings, as_lines(before))
    run_engine(settings)
    gone, kept = online_features(settings, USER_GROUP, ["gone", "kept"])
    assert gone["impressions_24h"] == 2 and gone["last_queries"] == ["query of srch-1"]
    assert "gone" in offline_user_rows(settings).column("user_id").to_pylist()

    # The deletion, then (read after it) an event from before it and one after it; a user
    # never seen is deleted too (nothing to do, no error).
    after = [
        deletion("del-1", 10, "gone"),
        event("impression", "imp-3", 9, "gone"),  # late for the deletion: forgotten
        event("impression", "imp-4", 20, "gone"),  # counts, from nothing
        event("impression", "imp-keep-2", 20, "kept"),
        deletion("del-2", 21, "never-seen"),
    ]
    produce(settings, as_lines(after))
    output = run_engine(settings)
    assert "2 users deleted" in output, output
    gone, kept = online_features(settings, USER_GROUP, ["gone", "kept"])
    assert gone["impressions_24h"] == 1 and gone["clicks_24h"] == 0 and gone["last_queries"] == []
    assert kept["impressions_24h"] == 2
    expected = {r["user_id"]: r for r in reference_features(_table(before + after), USER_GROUP).to_pylist()}
    for feature in USER_GROUP.features():
        assert gone[feature.name] == expected["gone"][feature.name], feature.name
    rows = offline_user_rows(settings)
    gone_rows = rows.filter(pa.compute.equal(rows.column("user_id"), "gone"))
    assert gone_rows.num_rows > 0 and set(gone_rows.column("impressions_24h").to_pylist()) == {1}

    # A restart: the deletion's tombstone comes back from the checkpoint and still holds.
    produce(settings, as_lines([event("impression", "imp-5", 8, "gone")]))
    run_engine(settings)
    (gone,) = online_features(settings, USER_GROUP, ["gone"])
    assert gone["impressions_24h"] == 1


def test_a_user_deleted_for_good_has_no_row_in_either_store(stream: Settings) -> None:
    produce(stream, as_lines([event("impression", "imp-1", 0, "gone"), event("click", "clk-1", 1, "gone")]))
    run_engine(stream)
    produce(stream, as_lines([deletion("del-1", 5, "gone"), event("impression", "imp-k", 6, "kept")]))
    run_engine(stream)
    (gone,) = online_features(stream, USER_GROUP, ["gone"])
    assert all(gone[f.name] is None for f in USER_GROUP.features())
    users = offline_user_rows(stream).column("user_id").to_pylist()
    assert "gone" not in users and "kept" in users
    # The other groups keep their aggregates (the ad's impressions counted the user's).
    ad = next(g for g in FEATURE_GROUPS if g.name == "ad_performance")
    (counted,) = online_features(stream, ad, ["ad-1"])
    assert counted["impressions_24h"] == 2


@pytest.mark.parametrize("batch_events", [1, 2, 3, 7, 1_000])
def test_deletions_forget_the_same_events_however_the_stream_is_batched(batch_events: int) -> None:
    """Read order decides what a deletion forgets, never micro-batch boundaries (replays repeat it)."""
    rng = np.random.default_rng(7)
    events: list[dict[str, object]] = []
    for number in range(60):
        user = f"u{rng.integers(4)}"
        if rng.random() < 0.15:
            events.append(deletion(f"del-{number}", int(rng.integers(0, 40)), user))
        else:
            kind = str(rng.choice(["impression", "click", "search"]))
            events.append(event(kind, f"e-{number}", int(rng.integers(0, 40)), user))
    one_by_one = replay(as_lines(events), batch_events=1)
    result = replay(as_lines(events), batch_events=batch_events)
    for group in FEATURE_GROUPS:
        want, got = one_by_one.table(group.name), result.table(group.name)
        assert _last_rows(got, group.key) == _last_rows(want, group.key), group.name
    kept = [e for e in events if e["type"] != "user_profile"]  # (the deletions did forget events)
    user_rows = _last_rows(
        replay(as_lines(kept), batch_events=batch_events).table(USER_GROUP.name), "user_id"
    )
    assert user_rows != _last_rows(result.table(USER_GROUP.name), "user_id")


def _last_rows(table: pa.Table, key: str) -> dict[str, dict[str, object]]:
    """Each key's last row (its features; which ones changed since the last write depends on batching)."""
    if not table.num_rows:
        return {}
    return {row[key]: row for row in table.drop_columns([CHANGED_COLUMN]).to_pylist()}


def _table(events: list[dict[str, object]]) -> pa.Table:
    """``events`` as the reference reads them (typed columns, the action included)."""
    columns = ["type", "event_id", "user_id", "ad_id", "campaign_id", "advertiser_id", "query", "action"]
    table = pa.table({name: pa.array([e.get(name) for e in events], pa.string()) for name in columns})
    times = pa.array(
        [datetime.fromisoformat(str(e["event_time"]).replace("Z", "+00:00")) for e in events],
        pa.timestamp("s", "UTC"),
    )
    costs = pa.array([e.get("cost_micros") for e in events], pa.int64())
    return (
        table.append_column("event_time", times)
        .append_column("cost_micros", costs)
        .append_column("value", pa.nulls(len(events), pa.float64()))
    )


RETENTION_MS = (7 * 86_400 + 3_600) * 1000


def _route(
    router: Router,
    events: list[dict[str, object]],
    partition: int,
    first_offset: int,
    watermarks: dict[int, int],
) -> Any:
    decoded = EventDecoder().decode(as_lines(events))
    assert not decoded.rejected
    partitions = np.full(decoded.events.num_rows, partition)
    offsets = np.arange(decoded.events.num_rows) + first_offset
    return router.route(decoded.events, partitions, offsets, watermarks)


def test_a_deletion_timed_ahead_of_the_stream_makes_no_later_event_late() -> None:
    """A deletion stamped with the request's time (days ahead of the events being read)
    raised its partition's watermark: every later event of the partition was "late"."""
    router = Router(1, 3_600_000)
    events = [
        event("impression", "imp-1", 30, "other"),
        {**deletion("del-1", 0, "gone"), "event_time": "2026-02-05T10:00:00Z"},  # a month ahead
        event("impression", "imp-2", 31, "other"),
    ]
    routed = _route(router, events, 0, 0, {})
    assert routed.late == []
    assert routed.watermarks[0] == int(datetime.fromisoformat("2026-01-05T10:31:00+00:00").timestamp() * 1000)


def test_a_deleted_users_rows_are_emptied_in_place_never_saved_and_count_again(tmp_path: Path) -> None:
    """A deletion empties the user's tiles and seen pairs where they are (removing them cost a pass
    over the whole state per batch with a deletion). The emptied pairs must not reach a
    checkpoint, and the user's values count anew when the user returns, in memory and after
    a reload."""
    router = Router(1, 3_600_000)
    state = ShardStates(tmp_path, 1, checkpoint_interval_s=0)
    state.open(0)
    seen = [event("impression", "imp-1", 0, "gone"), event("impression", "imp-2", 1, "stays")]
    state.apply(_route(router, seen, 0, 0, {}).shards, {0: 1})
    state.apply(_route(router, [deletion("del-1", 2, "gone")], 0, 2, {0: 0}).shards, {0: 2})
    state.commit(force=True)
    user = next(g for g in state.groups if g.group.name == USER_GROUP.name)
    assert user.sizes()["distinct_ads.seen"] == 2  # (emptied in place)
    saved = user.to_arrays()
    assert saved["distinct_ads.seen_tiles"].tolist() == [saved["latest"].max() // 60_000]  # "stays" only
    assert saved["tile_values"][user.columns.index("distinct_ads")].sum() == 1
    back = [event("impression", "imp-3", 5, "gone")]
    rows = []
    for reload in (False, True):
        if reload:
            state.close_all()
            state = ShardStates(tmp_path, 1, checkpoint_interval_s=0)
            state.open(0)
        routed = _route(router, back, 0, 10, {0: 0})
        rows.append(
            state.apply(routed.shards, {0: 2})[USER_GROUP.name].drop_columns([CHANGED_COLUMN]).to_pylist()
        )
    assert rows[0] == rows[1]
    (returned,) = rows[0]
    assert returned["distinct_ads_10m"] == 1 and returned["impressions_10m"] == 1


def test_a_tombstone_stays_while_a_lagging_partition_could_still_bring_the_users_old_events(
    tmp_path: Path,
) -> None:
    """Tombstones expired by the shard's newest event: events of other partitions 8 days on
    dropped them, and a late event of the deleted user (on time in its own partition)
    counted again. A deletion's time must not move the shard's time either (compaction by
    it would forget everyone else)."""
    router = Router(1, 3_600_000)
    state = ShardStates(tmp_path, 1, checkpoint_interval_s=0)
    state.open(0)
    watermarks: dict[int, int] = {}
    batches = [
        (0, [event("impression", "imp-1", 0, "gone"), deletion("del-1", 10, "gone")]),
        (0, [{**deletion("del-2", 0, "far"), "event_time": "2026-02-05T10:00:00Z"}]),  # ahead: moves nothing
        (1, [{**event("impression", "imp-k", 0, "kept"), "event_time": "2026-01-13T10:00:00Z"}]),
        (0, [event("impression", "imp-2", 5, "gone"), event("impression", "imp-3", 6, "stays")]),
    ]
    latest: dict[str, dict[str, object]] = {}
    for number, (partition, events) in enumerate(batches, start=1):
        routed = _route(router, events, partition, 10 * number, watermarks)  # (offsets grow per partition)
        watermarks = routed.watermarks
        assert routed.late == []  # (10:05 is on time in partition 0, whose watermark is 10:10)
        changed = state.apply(routed.shards, {0: number})
        for key, _ in state.take_deleted().get(USER_GROUP.name, []):
            latest.pop(key, None)
        if USER_GROUP.name in changed:
            latest.update({row["user_id"]: row for row in changed[USER_GROUP.name].to_pylist()})
        state.compact(RETENTION_MS)
        state.commit(force=True)
        state.close_all()
        state = ShardStates(tmp_path, 1, checkpoint_interval_s=0)  # (and back from the checkpoint)
        state.open(0)
    assert "gone" not in latest  # the late 10:05 impression of the deleted user did not count
    assert latest["stays"]["impressions_7d"] == 1 and latest["kept"]["impressions_7d"] == 1
    assert state.sizes()["user_activity.entities"] >= 1  # not all forgotten by the far deletion
