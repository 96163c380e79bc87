"""The reference feature computation, on hand-made events with answers worked out by hand."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa

from features.definitions import FEATURE_GROUPS, normalize_query
from features.feast_objects import append_offline, arrow_schema, push_source_name
from features.reference import feature_sql, reference_features
from infra.settings import load_settings

GROUPS = {g.name: g for g in FEATURE_GROUPS}
T = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)  # a tile boundary


def events(rows: list[dict[str, object]]) -> pa.Table:
    columns = [
        "type",
        "event_id",
        "event_time",
        "user_id",
        "ad_id",
        "campaign_id",
        "advertiser_id",
        "cost_micros",
        "value",
        "query",
    ]
    data = {c: [r.get(c) for r in rows] for c in columns}
    return pa.table(
        {
            **{
                c: pa.array(data[c], pa.string())
                for c in columns
                if c not in ("event_time", "cost_micros", "value")
            },
            "event_time": pa.array(data["event_time"], pa.timestamp("ms", "UTC")),
            "cost_micros": pa.array(data["cost_micros"], pa.int64()),
            "value": pa.array(data["value"], pa.float64()),
        }
    )


def imp(i: int, at: datetime, user: str = "u1", ad: str = "ad1", cost: int = 100) -> dict[str, object]:
    return {
        "type": "impression",
        "event_id": f"i{i}",
        "event_time": at,
        "user_id": user,
        "ad_id": ad,
        "campaign_id": "c1",
        "advertiser_id": "a1",
        "cost_micros": cost,
    }


def click(i: int, at: datetime, user: str = "u1", ad: str = "ad1") -> dict[str, object]:
    return {
        "type": "click",
        "event_id": f"k{i}",
        "event_time": at,
        "user_id": user,
        "ad_id": ad,
        "campaign_id": "c1",
        "advertiser_id": "a1",
    }


def by_key(table: pa.Table, key: str) -> dict[str, dict[str, object]]:
    return {row[key]: row for row in table.to_pylist()}


def test_windows_are_tile_aligned_and_inclusive_at_the_start() -> None:
    last = T + timedelta(minutes=59, seconds=30)  # in the tile [12:59, 13:00): as of 13:00
    rows = [
        imp(1, T - timedelta(minutes=1)),  # 11:59: outside 1h (window starts at 12:00)
        imp(2, T),  # 12:00 exactly: inside 1h
        imp(3, T + timedelta(minutes=50)),  # 12:50 exactly: inside 10m (starts 12:50)
        imp(4, T + timedelta(minutes=49, seconds=59)),  # just outside 10m
        imp(5, last, ad="ad2"),
        click(1, last),
    ]
    user = by_key(reference_features(events(rows), GROUPS["user_activity"]), "user_id")["u1"]
    assert user["event_timestamp"] == T + timedelta(hours=1)
    assert (user["impressions_10m"], user["impressions_1h"], user["impressions_24h"]) == (2, 4, 5)
    assert user["clicks_10m"] == 1 and user["ctr_10m"] == 0.5 and user["ctr_1h"] == 0.25
    assert user["cvr_1h"] == 0.0, "no clicks converted: 0, not a division error"
    assert user["spend_micros_1h"] == 400.0
    assert user["distinct_ads_1h"] == 2


def test_last_n_lists_are_most_recent_first_capped_and_within_the_longest_window() -> None:
    rows = [click(i, T + timedelta(minutes=i), ad=f"ad{i}") for i in range(25)]
    rows.append(click(99, T - timedelta(days=8), ad="ancient"))
    user = by_key(reference_features(events(rows), GROUPS["user_activity"]), "user_id")["u1"]
    assert user["last_clicked_ads"] == [f"ad{i}" for i in range(24, 4, -1)]
    assert user["last_queries"] == []


def test_entities_other_than_users_and_normalized_queries() -> None:
    rows = [
        imp(1, T, user="u1"),
        imp(2, T, user="u2"),
        imp(3, T, user="u2"),
        {
            "type": "conversion",
            "event_id": "v1",
            "event_time": T + timedelta(minutes=5),
            "user_id": "u2",
            "ad_id": "ad1",
            "campaign_id": "c1",
            "advertiser_id": "a1",
            "value": 30.0,
        },
        {"type": "search", "event_id": "s1", "event_time": T, "user_id": "u1", "query": "Running  Shoes "},
        {"type": "search", "event_id": "s2", "event_time": T, "user_id": "u2", "query": "running shoes"},
    ]
    table = events(rows)
    ad = by_key(reference_features(table, GROUPS["ad_performance"]), "ad_id")["ad1"]
    assert ad["impressions_24h"] == 3 and ad["distinct_users_24h"] == 2 and ad["conversions_24h"] == 1
    campaign = by_key(reference_features(table, GROUPS["campaign_performance"]), "campaign_id")["c1"]
    assert campaign["conversion_value_1h"] == 30.0
    queries = by_key(reference_features(table, GROUPS["query_popularity"]), "query")
    assert list(queries) == [normalize_query("Running  Shoes ")] == ["running shoes"]
    assert queries["running shoes"]["searches_1h"] == 2 and queries["running shoes"]["distinct_users_1h"] == 2


def test_reference_rows_fit_the_feast_views_and_read_back(tmp_path: Path) -> None:
    from feast.data_source import PushMode

    from features.store import open_store

    settings = load_settings(state_dir=tmp_path)
    store = open_store(settings)
    group = GROUPS["user_activity"]
    table = reference_features(
        events([imp(1, T), click(1, T + timedelta(seconds=5)), imp(2, T, user="u9")]), group
    )
    assert table.schema.names == arrow_schema(group).names
    frame = table.to_pandas()
    frame["created_timestamp"] = frame["event_timestamp"]
    store.push(push_source_name(group), frame, to=PushMode.ONLINE)
    append_offline(settings.feature_repo_dir / "data", group, table)
    online = store.get_online_features(
        features=["user_activity:ctr_10m", "user_activity:last_clicked_ads"],
        entity_rows=[{"user_id": "u1"}, {"user_id": "u9"}],
    ).to_dict()
    assert online["ctr_10m"] == [1.0, 0.0]
    assert online["last_clicked_ads"] == [["ad1"], []]


def test_sql_is_generated_from_the_definitions() -> None:
    sql = feature_sql(GROUPS["user_activity"])
    for feature in GROUPS["user_activity"].features():
        assert f" AS {feature.name}" in sql
