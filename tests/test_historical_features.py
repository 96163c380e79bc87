"""Point-in-time training sets through Feast's own SDK, at the size the issue asks for (100k+ rows).

Read through :func:`features.training.historical_features`, which calls Feast's
``get_historical_features`` and puts back the examples Feast 0.67's file store drops.

The feature history is what the engine emits over simulated events (replayed in-process,
then written to the offline store as the worker would); the training examples are 120k
(user, time) rows. Every value Feast returns must equal an independent as-of join done
by DuckDB: the latest feature row at or before the example's time, within the view's TTL.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from features.definitions import FEATURE_GROUPS
from features.feast_objects import CREATED_FIELD, append_offline
from features.store import open_store
from features.training import historical_features
from infra.settings import load_settings
from streams.engine.replay import replay
from streams.simulation import SimulationConfig, Simulator

GROUP = next(g for g in FEATURE_GROUPS if g.name == "user_activity")
FEATURES = [
    "impressions_1h",
    "clicks_24h",
    "ctr_24h",
    "spend_micros_7d",
    "distinct_ads_24h",
    "last_clicked_ads",
]
EXAMPLES = 120_000


def test_point_in_time_training_set_of_120k_rows_matches_an_as_of_join(tmp_path: Path) -> None:
    simulator = Simulator(SimulationConfig(users=20_000, events=120_000, days=3.0, seed=31, campaigns=40))
    lines = [line for batch in simulator.batches() for line in batch.to_json_lines()]
    history = replay(lines, groups=[GROUP]).features[GROUP.name]
    settings = load_settings(state_dir=tmp_path / "state")
    store = open_store(settings, (GROUP,))
    data_dir = settings.feature_repo_dir / "data"
    parts = []
    for index, rows in enumerate(history):  # the worker writes one part per cycle, created in order
        created = pa.array(np.full(rows.num_rows, 1_700_000_000_000_000 + index * 1_000_000), pa.int64())
        parts.append(rows.append_column(CREATED_FIELD, created.cast(pa.timestamp("us", "UTC"))))
        append_offline(data_dir, GROUP, parts[-1])
    feature_rows = pa.concat_tables(parts)

    rng = np.random.default_rng(7)
    users = pc.unique(feature_rows.column("user_id")).to_numpy(zero_copy_only=False)
    first = pc.min(feature_rows.column("event_timestamp")).as_py()
    last = pc.max(feature_rows.column("event_timestamp")).as_py()
    span_us = int((last - first).total_seconds() * 1e6) + 3_600_000_000
    offsets_us = rng.integers(-3_600_000_000, span_us, EXAMPLES)
    examples = pd.DataFrame(
        {
            "user_id": rng.choice(users, EXAMPLES),
            "event_timestamp": pd.Timestamp(first) + pd.to_timedelta(offsets_us, unit="us"),
            "example_id": np.arange(EXAMPLES),
        }
    )
    # Examples sharing a user and a time (two impressions in one millisecond): Feast answers
    # such a pair once and drops the other, which then read as "no feature value".
    twins = examples.loc[:4_999, ["user_id", "event_timestamp"]].to_numpy()
    examples.loc[EXAMPLES - 5_000 :, ["user_id", "event_timestamp"]] = twins

    started = time.perf_counter()
    training = historical_features(store, examples, [f"{GROUP.name}:{name}" for name in FEATURES])
    seconds = time.perf_counter() - started
    print(f"get_historical_features: {EXAMPLES:,} rows x {len(FEATURES)} features in {seconds:.1f} s")

    connection = duckdb.connect()
    connection.register("examples", examples)
    connection.register("emitted", feature_rows)
    # Two rows of one user and tile: the later one (larger created timestamp) holds the tile's value.
    connection.execute(
        f"CREATE TABLE features AS SELECT * FROM emitted QUALIFY row_number() OVER "
        f"(PARTITION BY user_id, event_timestamp ORDER BY {CREATED_FIELD} DESC) = 1"
    )
    ttl = GROUP.longest_window.seconds
    expected = connection.sql(
        f"""
        SELECT e.example_id, {", ".join(f"f.{name}" for name in FEATURES)}
        FROM examples e ASOF LEFT JOIN features f
          ON e.user_id = f.user_id AND e.event_timestamp >= f.event_timestamp
        WHERE f.event_timestamp IS NULL OR f.event_timestamp >= e.event_timestamp - INTERVAL {ttl} SECOND
        UNION ALL
        SELECT e.example_id, {", ".join(f"NULL AS {name}" for name in FEATURES)}
        FROM examples e ASOF LEFT JOIN features f
          ON e.user_id = f.user_id AND e.event_timestamp >= f.event_timestamp
        WHERE f.event_timestamp < e.event_timestamp - INTERVAL {ttl} SECOND
        ORDER BY example_id
        """
    ).df()
    actual = training
    assert training["example_id"].tolist() == list(range(EXAMPLES)), "one row per example, in order"
    parts = list((data_dir / GROUP.name).glob("part-*.parquet"))
    assert len(parts) == 1 and parts[0].name.endswith("-compacted.parquet"), "read after compaction"
    assert len(actual) == EXAMPLES
    assert actual["example_id"].tolist() == expected["example_id"].tolist()
    answered = expected["impressions_1h"].notna()
    assert 0.5 < answered.mean() < 1.0, "the examples should mostly, not all, have features"
    mismatches = []
    for name in FEATURES:
        for i, (want, got) in enumerate(zip(expected[name], actual[name], strict=True)):
            if _missing(want):
                ok = _missing(got)
            elif isinstance(want, float):
                ok = not _missing(got) and math.isclose(want, got, rel_tol=1e-9, abs_tol=1e-9)
            elif name == "last_clicked_ads":
                ok = not _missing(got) and list(want) == list(got)
            else:
                ok = not _missing(got) and int(want) == int(got)
            if not ok:
                mismatches.append((name, i, want, got))
    assert not mismatches, f"{len(mismatches)} mismatches, e.g. {mismatches[:5]}"


def _missing(value: object) -> bool:
    if value is None or value is pd.NA:
        return True
    return isinstance(value, float) and math.isnan(value)


def test_identity_naming_holds_while_any_thread_reads_and_is_undone_after() -> None:
    """Overlapping reads in two threads: naming by identity lasts until the last one ends, then goes.

    (Each read used to save and restore dask's normalizers itself: the first to end put
    content hashing back under the second, and the second then left identity naming
    installed for good.)
    """
    import threading

    from dask.base import tokenize

    from features.training import _object_pandas_tokens

    frame = pd.DataFrame({"user_id": ["u1", "u2"], "x": [1.0, 2.0]})
    assert tokenize(frame) == tokenize(frame.copy())  # dask's own: by content
    first_in, first_out = threading.Event(), threading.Event()
    seen: dict[str, bool] = {}

    def first() -> None:
        with _object_pandas_tokens():
            first_in.set()
            seen["first, by identity"] = tokenize(frame) != tokenize(frame.copy())
        first_out.set()

    def second() -> None:
        first_in.wait(10)
        with _object_pandas_tokens():
            first_out.wait(10)
            seen["second, after the first ended"] = tokenize(frame) != tokenize(frame.copy())
            seen["same object, same name"] = tokenize(frame) == tokenize(frame)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert seen == {
        "first, by identity": True,
        "second, after the first ended": True,
        "same object, same name": True,
    }
    assert tokenize(frame) == tokenize(frame.copy())  # content naming is back


def test_examples_sharing_an_entity_and_a_time_all_get_their_features(tmp_path: Path) -> None:
    """Feast answers each (entity, time) once: of two impressions of one user in the same
    instant (on different ads), one came back as if no feature value had existed."""
    simulator = Simulator(SimulationConfig(users=300, events=6_000, days=1.0, seed=32, campaigns=40))
    lines = [line for batch in simulator.batches() for line in batch.to_json_lines()]
    history = replay(lines, groups=[GROUP]).features[GROUP.name]
    settings = load_settings(state_dir=tmp_path / "state")
    store = open_store(settings, (GROUP,))
    rows = pa.concat_tables(history)
    created = pa.array(np.full(rows.num_rows, 1_700_000_000_000_000), pa.int64()).cast(
        pa.timestamp("us", "UTC")
    )
    append_offline(settings.feature_repo_dir / "data", GROUP, rows.append_column(CREATED_FIELD, created))
    user = rows.column("user_id")[0].as_py()
    at = pd.Timestamp(rows.column("event_timestamp")[0].as_py(), tz="UTC") + pd.Timedelta(minutes=30)
    examples = pd.DataFrame(
        {
            "user_id": [user, user, user, user],
            "ad_id": ["ad1", "ad2", "ad3", "ad4"],
            # The same instant written in another zone is the same time too.
            "event_timestamp": [at, at, at + pd.Timedelta(seconds=1), at.tz_convert("Asia/Kolkata")],
            "impression_id": ["i1", "i2", "i3", "i4"],
        }
    )
    training = historical_features(store, examples, [f"{GROUP.name}:impressions_24h"])
    assert training["impression_id"].tolist() == ["i1", "i2", "i3", "i4"]
    # No value yet (before the user's first row: Feast drops the example) and an unknown
    # user (Feast answers it): the same missing value either way, None for a list.
    early = at - pd.Timedelta(days=3)
    missing = pd.DataFrame({"user_id": [user, "nobody"], "event_timestamp": [early, at]})
    lists = historical_features(store, missing, [f"{GROUP.name}:last_clicked_ads"])["last_clicked_ads"]
    assert lists.tolist() == [None, None]
    counts = training["impressions_24h"].tolist()
    assert not any(_missing(count) for count in counts), counts
    assert counts[0] == counts[1] == counts[3]
