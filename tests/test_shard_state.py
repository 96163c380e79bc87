"""The shard state on its own: simulated events in random micro-batches, checked against the reference.

No broker here: events are decoded and routed as the worker does, then folded into a
:class:`ShardStates` in batches of random sizes, with checkpoints written and read back
and compactions in between. Each entity's last emitted features must equal the DuckDB
reference over the on-time events, value for value.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from features.definitions import FEATURE_GROUPS
from features.online import CHANGED_COLUMN
from features.reference import reference_features
from streams.engine import runs as runs_module
from streams.engine import shard as shard_module
from streams.engine import state as state_module
from streams.engine.decode import EventDecoder
from streams.engine.router import Router, shard_of
from streams.engine.shard import CheckpointError, ShardStates
from streams.simulation import SimulationConfig, Simulator

LATENESS_MS = 3_600_000
RETENTION_MS = max(g.longest_window.seconds for g in FEATURE_GROUPS) * 1000 + LATENESS_MS


def routed_batches(days: float, events: int, seed: int) -> tuple[list[pa.Table], pa.Table]:
    """Shipped rows for one shard in micro-batches of random size, and the on-time events."""
    batches, on_time = routed_to_shards(days, events, seed, shards=1)
    return [batch[0] for batch in batches if 0 in batch], on_time


def routed_to_shards(
    days: float, events: int, seed: int, *, shards: int
) -> tuple[list[dict[int, pa.Table]], pa.Table]:
    """Shipped rows per shard in micro-batches of random size, and the on-time events."""
    simulator = Simulator(SimulationConfig(users=800, events=events, days=days, seed=seed, campaigns=40))
    lines = [line for batch in simulator.batches() for line in batch.to_json_lines()]
    decoded = EventDecoder().decode(lines)
    assert not decoded.rejected
    events = decoded.events
    partitions = np.arange(events.num_rows) % 2  # two source partitions, interleaved
    offsets = np.arange(events.num_rows) // 2
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, events.num_rows), size=40, replace=False))
    router = Router(shards, LATENESS_MS)
    watermarks: dict[int, int] = {}
    shipped: list[dict[int, pa.Table]] = []
    late_rows: list[int] = []
    for start, end in zip(np.r_[0, cuts], np.r_[cuts, events.num_rows], strict=True):
        routed = router.route(
            events.slice(start, end - start), partitions[start:end], offsets[start:end], watermarks
        )
        watermarks = routed.watermarks
        late_rows += [start + row for row, _ in routed.late]
        shipped.append(routed.shards)
    on_time = np.ones(events.num_rows, dtype=bool)
    on_time[late_rows] = False
    reference_input = events.filter(pa.array(on_time))
    times = pc.cast(reference_input.column("event_time_ms"), pa.timestamp("ms", "UTC"))
    reference_input = reference_input.append_column("event_time", times)
    return shipped, reference_input


def one_shard(directory: Path, *, checkpoint_interval_s: float = 10.0) -> ShardStates:
    """The state of shard 0 of 1, read from its checkpoint in ``directory`` if there is one."""
    state = ShardStates(directory, 1, checkpoint_interval_s=checkpoint_interval_s)
    state.open(0)
    return state


def fold(
    state_dir: Path, batches: list[pa.Table], *, restart_every: int, compact_every: int
) -> dict[str, dict]:
    """Apply batches, restarting from the checkpoint and compacting now and then; the last rows per key."""
    latest: dict[str, dict] = {g.name: {} for g in FEATURE_GROUPS}
    stored: dict[str, dict] = {g.name: {} for g in FEATURE_GROUPS}  # only what the changed flags say
    state = one_shard(state_dir, checkpoint_interval_s=0)
    for index, rows in enumerate(batches):
        _apply_and_record(state, {0: rows}, {0: index + 1}, latest, stored)
        if index % compact_every == compact_every - 1:
            state.compact(RETENTION_MS)
        assert state.commit() == {0: index + 1}
        if index % restart_every == restart_every - 1:
            state.close_all()
            state = one_shard(state_dir, checkpoint_interval_s=0)
            assert state.next_offset(0) == index + 1
    for group in FEATURE_GROUPS:  # a store given only the changed features holds the latest rows
        for key, row in latest[group.name].items():
            assert stored[group.name][key] == row, (group.name, key)
    return latest


def assert_equal_to_reference(latest: dict[str, dict], events: pa.Table) -> None:
    for group in FEATURE_GROUPS:
        expected = reference_features(events, group).to_pylist()
        assert expected, group.name
        mismatches = []
        for want in expected:
            got = latest[group.name].get(want[group.key])
            assert got is not None, (group.name, want[group.key])
            for feature in group.features():
                a, b = want[feature.name], got[feature.name]
                same = math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9) if isinstance(a, float) else a == b
                if not same:
                    mismatches.append((want[group.key], feature.name, a, b))
            assert got["event_timestamp"] == want["event_timestamp"].replace(tzinfo=None)
        assert not mismatches, f"{group.name}: {len(mismatches)} mismatches, e.g. {mismatches[:5]}"
        assert len(latest[group.name]) == len(expected)


def _apply_and_record(
    state: ShardStates,
    rows: dict[int, pa.Table],
    offsets: dict[int, int],
    latest: dict[str, dict],
    stored: dict[str, dict],
) -> None:
    """Apply ``rows`` as a worker does: deleted users' stored rows go first, then the changed rows."""
    changed = state.apply(rows, offsets)
    for name, users in state.take_deleted().items():
        for key, _ in users:
            latest[name].pop(key, None)
            stored[name].pop(key, None)
    for name, table in changed.items():
        _record(name, table, latest, stored)


def _record(name: str, table: pa.Table, latest: dict[str, dict], stored: dict[str, dict]) -> None:
    """Note each emitted row in ``latest`` (by key) and only its flagged features in ``stored``."""
    group = next(g for g in FEATURE_GROUPS if g.name == name)
    fields = [f.name for f in group.features()] + ["event_timestamp"]
    for row in table.to_pylist():
        flags = row.pop(CHANGED_COLUMN)
        key = row.pop(group.key)
        latest[name][key] = row
        kept = stored[name].setdefault(key, {})
        kept.update({field: row[field] for field, flag in zip(fields, flags, strict=True) if flag})


def _stored_rows(
    state: ShardStates, batches: list[pa.Table], stored: dict[str, dict], start: int
) -> dict[str, dict]:
    """Apply ``batches``; feed ``stored`` only the flagged features; return the latest full rows."""
    latest: dict[str, dict] = {g.name: {} for g in FEATURE_GROUPS}
    for index, rows in enumerate(batches, start=start):
        _apply_and_record(state, {0: rows}, {0: index + 1}, latest, stored)
    return latest


@pytest.mark.parametrize("rewrite", [True, False])
def test_rewrite_all_makes_rows_a_store_lost_whole_again(tmp_path: Path, rewrite: bool) -> None:
    """The store loses every key halfway (a Redis restart without persistence); after
    ``rewrite_all`` the next write of each entity is whole. Without it rows stay partial."""
    batches, _ = routed_batches(days=1.0, events=6_000, seed=5)
    state = one_shard(tmp_path, checkpoint_interval_s=0)
    half = len(batches) // 2
    _stored_rows(state, batches[:half], {g.name: {} for g in FEATURE_GROUPS}, 0)
    stored: dict[str, dict] = {g.name: {} for g in FEATURE_GROUPS}  # the store after losing everything
    if rewrite:
        state.rewrite_all()
    latest = _stored_rows(state, batches[half:], stored, half)
    partial = [
        (name, key) for name, rows in latest.items() for key, row in rows.items() if stored[name][key] != row
    ]
    if rewrite:
        assert not partial
    else:  # the failure rewrite_all exists for
        assert len(partial) > 100


def test_batched_state_with_restarts_equals_the_reference(tmp_path: Path) -> None:
    batches, events = routed_batches(days=1.0, events=12_000, seed=3)
    latest = fold(tmp_path, batches, restart_every=7, compact_every=5)
    assert_equal_to_reference(latest, events)


def test_a_checkpoint_written_in_the_background_holds_the_state_as_of_its_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's checkpoints are copied at commit and written by another thread while
    batches go on being applied; the file must hold the state and offsets of the commit,
    never a mix with later batches (a restart from it then replays exactly the rest)."""
    batches, events = routed_batches(days=1.0, events=8_000, seed=11)
    release = threading.Event()
    real_save = shard_module._save

    def held_save(*args: Any) -> None:
        assert release.wait(60)  # the worker's thread applies more batches meanwhile
        real_save(*args)

    monkeypatch.setattr(shard_module, "_save", held_save)
    state = ShardStates(tmp_path, 1, checkpoint_interval_s=0, write_in_background=True)
    state.open(0)
    latest: dict[str, dict] = {g.name: {} for g in FEATURE_GROUPS}
    stored: dict[str, dict] = {g.name: {} for g in FEATURE_GROUPS}
    cut = len(batches) // 2
    for index, rows in enumerate(batches[:cut]):
        _apply_and_record(state, {0: rows}, {0: index + 1}, latest, stored)
    assert state.commit() == {}  # (being written)
    assert not state.commit_due()  # one write at a time
    for index, rows in enumerate(batches[cut:], start=cut):
        _apply_and_record(state, {0: rows}, {0: index + 1}, {g.name: {} for g in FEATURE_GROUPS}, stored)
    assert not state.path(0).exists()
    release.set()
    state.wait_for_writes()
    assert one_shard(tmp_path).next_offset(0) == cut  # the file: as of the commit
    assert state.commit() == {0: cut}  # the next one reports the first's offsets first ...
    state.wait_for_writes()
    assert state.commit() == {0: len(batches)}  # ... and then its own
    state.close_all()
    resumed = one_shard(tmp_path)  # from the background-written checkpoint
    assert resumed.next_offset(0) == len(batches)
    # and from the first file alone: the state as of batch `cut`, then the rest replayed
    monkeypatch.setattr(shard_module, "_save", real_save)
    first = ShardStates(tmp_path / "first", 1, checkpoint_interval_s=0, write_in_background=True)
    first.open(0)
    for index, rows in enumerate(batches[:cut]):
        first.apply({0: rows}, {0: index + 1})
    first.commit()
    for rows in batches[cut : cut + 3]:  # applied, never checkpointed: lost in a crash
        first.apply({0: rows}, {0: len(batches)})
    first.wait_for_writes()
    replayed = one_shard(tmp_path / "first")
    assert replayed.next_offset(0) == cut
    for index, rows in enumerate(batches[cut:], start=cut):
        _apply_and_record(replayed, {0: rows}, {0: index + 1}, latest, stored)
    assert_equal_to_reference(latest, events)


def test_a_failed_background_write_is_reported_and_a_slow_snapshot_spaces_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches, _ = routed_batches(days=0.5, events=2_000, seed=2)
    state = ShardStates(tmp_path, 1, checkpoint_interval_s=0, write_in_background=True, snapshot_share=1e-9)
    state.open(0)
    state.apply({0: batches[0]}, {0: 1})
    state.commit()
    state.apply({0: batches[1]}, {0: 2})
    state.wait_for_writes()
    assert not state.commit_due()  # the snapshot's time over a tiny share: not due for ages
    assert state.commit(force=True) == {0: 2}  # forced: written before it returns
    assert one_shard(tmp_path).next_offset(0) == 2

    def failing_save(*args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shard_module, "_save", failing_save)
    state = ShardStates(tmp_path / "full", 1, checkpoint_interval_s=0, write_in_background=True)
    state.open(0)
    state.apply({0: batches[2]}, {0: 3})
    assert state.commit() == {}
    with pytest.raises(CheckpointError, match="No space left on device"):
        state.wait_for_writes()


def assert_holds_only_its_shards(state: ShardStates) -> None:
    """Every entity a state holds hashes to one of the shards it holds (closed shards are forgotten)."""
    for group in state.groups:
        owners = set(shard_of(group.entities.keys, state.shard_count).tolist())
        assert owners <= set(state.shards), (group.group.name, owners, state.shards)


def test_shards_handed_between_workers_keep_every_feature_exact(tmp_path: Path) -> None:
    """One state holds four shards, checkpoints them per shard, and hands shards over (a
    rebalance): the features of both holders together equal the reference, each checkpoint
    holds exactly its own shard's entities, and a handed-over shard resumes at its offset."""
    shards = 4
    batches, events = routed_to_shards(days=3.0, events=12_000, seed=9, shards=shards)
    first = ShardStates(tmp_path, shards, checkpoint_interval_s=0)
    second = ShardStates(tmp_path, shards, checkpoint_interval_s=0)
    for shard in range(shards):
        first.open(shard)
    latest: dict[str, dict] = {g.name: {} for g in FEATURE_GROUPS}
    stored: dict[str, dict] = {g.name: {} for g in FEATURE_GROUPS}
    next_offsets = dict.fromkeys(range(shards), 0)
    handed = len(batches) // 3
    for index, rows in enumerate(batches):
        if index == handed:  # shards 1 and 3 move to the second holder; later 1 moves back, 2 over
            written = first.commit(force=True)
            assert written[1] == next_offsets[1] and written[3] == next_offsets[3]
            first.close([1, 3])
            assert second.open(1) == next_offsets[1] and second.open(3) == next_offsets[3]
            assert_holds_only_its_shards(first)
            assert_holds_only_its_shards(second)
        if index == 2 * handed:
            second.commit(force=True)
            first.commit(force=True)
            second.close([1])
            first.close([2])
            assert first.open(1) == next_offsets[1]
            assert second.open(2) == next_offsets[2]
            assert_holds_only_its_shards(first)
            assert_holds_only_its_shards(second)
        for shard in rows:
            next_offsets[shard] += 1
        for state in (first, second):
            mine = {shard: table for shard, table in rows.items() if shard in state}
            offsets = {shard: next_offsets[shard] for shard in mine}
            _apply_and_record(state, mine, offsets, latest, stored)
        if index % 4 == 3:
            first.compact(RETENTION_MS)
            second.compact(RETENTION_MS)
    assert first.shards == [0, 1] and second.shards == [2, 3]
    assert_equal_to_reference(latest, events)
    for group in FEATURE_GROUPS:  # only the changed features were flagged: the store holds every row whole
        for key, row in latest[group.name].items():
            assert stored[group.name][key] == row, (group.name, key)

    first.commit(force=True)
    second.commit(force=True)
    for shard in range(shards):
        alone = ShardStates(tmp_path, shards)
        alone.open(shard)
        for state in alone.groups:
            keys = state.entities.keys
            assert len(keys) > 0, (shard, state.group.name)
            assert (shard_of(keys, shards) == shard).all(), (shard, state.group.name)


def test_compaction_over_ten_days_keeps_every_window_exact(tmp_path: Path) -> None:
    batches, events = routed_batches(days=10.0, events=12_000, seed=4)
    latest = fold(tmp_path, batches, restart_every=11, compact_every=2)
    assert_equal_to_reference(latest, events)
    state = one_shard(tmp_path)
    state.compact(RETENTION_MS)
    sizes = state.sizes()
    # Ten days of users, but only what the last 7 days + lateness can still read is kept.
    counted = events.filter(
        pc.is_in(events.column("type"), pa.array(["impression", "click", "conversion", "search"]))
    )
    newest = int(pc.max(counted.column("event_time_ms")).as_py())
    recent = counted.filter(pc.greater_equal(counted.column("event_time_ms"), newest - RETENTION_MS))
    deletions = events.filter(pc.equal(events.column("action"), "delete"))
    assert deletions.num_rows > 0  # (the simulator deletes some users; they are forgotten at once)
    deleted_at = dict(
        zip(*(deletions.column(c).to_pylist() for c in ("user_id", "event_time_ms")), strict=True)
    )
    recent_users = {
        user
        for user, time_ms in zip(
            *(recent.column(c).to_pylist() for c in ("user_id", "event_time_ms")), strict=True
        )
        if time_ms > deleted_at.get(user, -1)
    }
    assert sizes["user_activity.entities"] == len(recent_users)


def test_run_merges_keep_every_window_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sorted runs merged every few batches, over ten days with compactions and restarts."""
    monkeypatch.setattr(runs_module, "MERGE_AT_LEAST", 16)
    batches, events = routed_batches(days=10.0, events=12_000, seed=6)
    latest = fold(tmp_path, batches, restart_every=9, compact_every=3)
    assert_equal_to_reference(latest, events)


def test_running_window_sums_match_the_tiles_after_batches_and_compactions(tmp_path: Path) -> None:
    """The running sums, moved batch by batch, equal every window summed afresh from the kept tiles."""
    batches, _ = routed_batches(days=10.0, events=8_000, seed=8)
    state = one_shard(tmp_path)
    checked = 0
    for index, rows in enumerate(batches):
        state.apply({0: rows}, {0: index + 1})
        if index % 4 == 3:
            state.compact(RETENTION_MS)
        if index % 10 == 9 or index == len(batches) - 1:
            for group in state.groups:
                running = group.running[: len(group.entities)].copy()
                group._recompute_windows()
                np.testing.assert_allclose(running, group.running, rtol=1e-12, atol=1e-6)
                checked += len(running)
    assert checked > 0


def test_a_checkpoint_of_an_earlier_version_with_hour_and_day_tiles_still_loads(tmp_path: Path) -> None:
    """Earlier versions also saved coarse tile levels ("tile_codes.60", ...); the minute tiles suffice."""
    batches, events = routed_batches(days=3.0, events=6_000, seed=7)
    half = len(batches) // 2
    latest = fold(tmp_path, batches[:half], restart_every=1_000, compact_every=1_000)
    state = one_shard(tmp_path)
    for index, group in enumerate(state.groups):
        arrays = group.to_arrays()
        for span in (60, 1_440):  # what those versions wrote next to the minute tiles
            arrays[f"tile_codes.{span}"] = np.zeros(3, np.int64)
            arrays[f"tile_values.{span}"] = np.zeros((len(group.columns), 3))
        state.groups[index] = state_module.GroupState(group.group, group.bit)
        state.groups[index].load_arrays(arrays)
    stored: dict[str, dict] = {g.name: {} for g in FEATURE_GROUPS}
    for index, rows in enumerate(batches[half:], start=half):
        _apply_and_record(state, {0: rows}, {0: index + 1}, latest, stored)
    assert_equal_to_reference(latest, events)


def test_replayed_rows_are_not_counted_twice(tmp_path: Path) -> None:
    batches, events = routed_batches(days=1.0, events=4_000, seed=5)
    state = one_shard(tmp_path)
    once: dict[str, dict] = {}
    for index, rows in enumerate(batches):
        # A replaying router's second copy can land in the same batch as the first.
        changed = state.apply({0: pa.concat_tables([rows, rows]) if index % 2 else rows}, {0: index + 1})
        if "user_activity" in changed:
            once.update({row["user_id"]: row for row in changed["user_activity"].to_pylist()})
        again = state.apply({0: rows}, {0: index + 1})  # a replaying router ships the same rows again
        assert again == {}
    expected = {r["user_id"]: r for r in reference_features(events, FEATURE_GROUPS[0]).to_pylist()}
    assert {k: v["impressions_24h"] for k, v in once.items()} == {
        k: v["impressions_24h"] for k, v in expected.items()
    }


def test_a_corrupt_checkpoint_is_reported_with_its_path(tmp_path: Path) -> None:
    (tmp_path / "shard-0.npz").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="shard-0.npz"):
        one_shard(tmp_path)


def test_an_event_from_a_clock_far_ahead_is_dropped_without_making_later_events_late() -> None:
    """One device clock years ahead must not raise its partition's watermark (every later event
    would be "too late"); with the rule off, that is exactly what happens."""
    import json

    from streams.engine.decode import EventDecoder

    def search(i: int, when: str) -> bytes:
        return json.dumps(
            {"type": "search", "event_id": f"e{i}", "event_time": when, "user_id": "u1", "query": "shoes"}
        ).encode()

    now_ms = 1_767_607_260_000  # 2026-01-05T10:01:00Z
    lines = [search(0, "2026-01-05T10:00:00Z"), search(1, "2031-01-05T10:00:00Z")]
    lines += [search(i, f"2026-01-05T10:00:{i:02d}Z") for i in range(2, 40)]
    events = EventDecoder().decode(lines).events
    partitions, offsets = np.zeros(len(lines), np.int64), np.arange(len(lines))

    guarded = Router(3, LATENESS_MS, max_future_ms=86_400_000)
    first = guarded.route(events.slice(0, 10), partitions[:10], offsets[:10], {}, now_ms=now_ms)
    rest = guarded.route(events.slice(10), partitions[10:], offsets[10:], first.watermarks, now_ms=now_ms)
    assert [row for row, _ in first.future] == [1] and "ahead of the worker's clock" in first.future[0][1]
    assert not first.late and not rest.late and not rest.future
    assert rest.watermarks[0] == 1_767_607_239_000  # 10:00:39, the newest on-time event
    shipped = {
        i for t in [*first.shards.values(), *rest.shards.values()] for i in t.column("event_id").to_pylist()
    }
    assert shipped == {f"e{i}" for i in range(40)} - {"e1"}  # every other event is counted

    unguarded = Router(3, LATENESS_MS).route(events, partitions, offsets, {}, now_ms=now_ms)
    assert len(unguarded.late) == 38 and not unguarded.future
