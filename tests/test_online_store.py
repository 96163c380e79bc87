"""The fast online writer/reader against real Feast (SQLite) and the local Redis server.

What is checked: Feast's own SDK reads what :class:`OnlineFeatureWriter` writes, value for
value (every feature type, empty lists, nulls, NaN, missing entities); the bytes stored are
the ones Feast's ``write_to_online_store`` stores; the hand-written encoders agree with
protobuf; and an unreachable store raises :class:`OnlineStoreUnavailableError`.
"""

from __future__ import annotations

import math
import os
import socket
import sqlite3
import struct
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from features import online
from features.definitions import FEATURE_GROUPS, QUERY_FEATURES, FeatureGroup
from features.feast_objects import arrow_schema
from features.online import (
    CHANGED_COLUMN,
    OnlineFeatureReader,
    OnlineFeatureWriter,
    OnlineStoreError,
    OnlineStoreSchemaError,
    OnlineStoreUnavailableError,
    decode_value,
    encode_timestamps,
    encode_values,
    serialize_entity_key,
)
from infra.settings import Settings, load_settings

USER = next(g for g in FEATURE_GROUPS if g.name == "user_activity")
QUERY = next(g for g in FEATURE_GROUPS if g.name == "query_popularity")
T0 = datetime(2026, 1, 5, 12, 0, 0, 123_456, tzinfo=UTC)

INTS = [0, 1, -1, 127, 128, -5, 300, 2**31, 2**62 + 7, 2**63 - 1, -(2**63), None]
DOUBLES = [0.0, -0.0, 0.25, -1.5, 1e300, -1e-300, 5e-324, math.inf, -math.inf, math.nan, 1 / 3, None]
LISTS: list[list[str | None] | None] = [
    [],
    ["ad1"],
    ["ü", "日本語", "emoji 🎯"],
    [""],
    ["x" * 200, "y" * 20_000],
    None,
    ["a", None],
    [f"ad{i}" for i in range(20)],
    [],
    ["über"],
    ["z"],
    ["", ""],
]
KEYS = ["u1", "ü-user", "日本", "", "u" * 300, "u6", "u7", "u8", "u9", "u10", "u11", "u12"]


def rows_for(group: FeatureGroup, keys: list[str], when: datetime, shift: int = 0) -> pa.Table:
    """One row per key; feature j of row i takes edge case (i + j + shift) of its type."""
    n = len(keys)
    columns: dict[str, Any] = {group.key: pa.array(keys, pa.string())}
    columns["event_timestamp"] = pa.array([when] * n, pa.timestamp("us", "UTC"))
    for j, feature in enumerate(group.features()):
        pool: list[Any] = {"int64": INTS, "float64": DOUBLES, "string_list": LISTS}[feature.type]
        columns[feature.name] = [pool[(i + j + shift) % len(pool)] for i in range(n)]
    return pa.table(columns, schema=arrow_schema(group))


def feast_expected(value: Any) -> Any:
    """What Feast returns for a written value: NaN is stored as null; a null list element as ''."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, list):
        return ["" if v is None else v for v in value]
    return value


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return struct.pack("<d", a) == struct.pack("<d", b)  # -0.0 is not 0.0
    return bool(a == b) and type(a) is type(b)


# --------------------------------------------------------------------------- stores


def redis_available() -> None:
    import redis

    try:
        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=2).ping()
    except redis.exceptions.ConnectionError as exc:
        pytest.fail(f"this test needs the Redis server on 127.0.0.1:6379 ({exc})")


@pytest.fixture(scope="module", params=["sqlite", "redis", "redis-arrow"])
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A Feast store with adreach's views applied, shared by the module's tests (one per backend).

    ``redis-arrow`` writes Redis commands with the Arrow encoders instead of the compiled
    writer (``redis``, where it is installed): both must store what Feast reads back.
    """
    from features.store import open_store

    state = tmp_path_factory.mktemp(f"online-{request.param}")
    if request.param.startswith("redis"):
        redis_available()
        settings = load_settings(
            state_dir=state,
            features={
                "online_store": "redis",
                "project": f"adreach_test_{uuid.uuid4().hex[:8]}",
                "compiled_redis_writer": request.param != "redis-arrow",
            },
        )
    else:
        settings = load_settings(state_dir=state)
    store = open_store(settings)
    writer = OnlineFeatureWriter(settings)
    reader = OnlineFeatureReader(settings)
    yield settings, store, writer, reader
    writer.close()
    reader.close()
    if request.param.startswith("redis"):
        store.teardown()  # remove this module's keys from the shared server


def feast_read(store: Any, group: FeatureGroup, keys: list[str], features: list[str]) -> dict[str, list[Any]]:
    result: dict[str, list[Any]] = store.get_online_features(
        features=[f"{group.name}:{name}" for name in features],
        entity_rows=[{group.key: key} for key in keys],
    ).to_dict()
    return result


def unique_keys(prefix: str) -> list[str]:
    tag = uuid.uuid4().hex[:6]
    return [f"{prefix}{tag}{k}" for k in KEYS]


# --------------------------------------------------------------------------- Feast reads what we write


@pytest.mark.parametrize("group", [USER, QUERY], ids=lambda g: g.name)
def test_feast_and_reader_return_exactly_what_was_written(backend: Any, group: FeatureGroup) -> None:
    _settings, store, writer, reader = backend
    keys = unique_keys("k")
    rows = rows_for(group, keys, T0)
    assert writer.write(group, rows) == len(keys)

    names = [f.name for f in group.features()]
    asked = [*keys, "nobody-" + uuid.uuid4().hex]
    from_feast = feast_read(store, group, asked, names)
    ours = reader.read(group, asked).to_pydict()
    assert ours[group.key] == asked
    assert from_feast[group.key] == asked
    for name in names:
        written = [feast_expected(v) for v in rows.column(name).to_pylist()]
        for i, want in enumerate(written):
            assert same(from_feast[name][i], want), (name, i, from_feast[name][i], want)
            assert same(ours[name][i], want), (name, i, ours[name][i], want)
        assert from_feast[name][-1] is None and ours[name][-1] is None, "a missing entity reads as nulls"


def test_reader_subset_duplicates_and_timestamp(backend: Any) -> None:
    _settings, _store, writer, reader = backend
    keys = unique_keys("s")
    writer.write(USER, rows_for(USER, keys, T0))
    asked = [keys[1], "missing", keys[1], keys[0]]
    table = reader.read(USER, asked, ["last_clicked_ads", "ctr_1h"], with_event_timestamp=True)
    assert table.column_names == ["user_id", "event_timestamp", "last_clicked_ads", "ctr_1h"]
    assert table.schema.field("last_clicked_ads").type == pa.list_(pa.string())
    data = table.to_pydict()
    assert data["last_clicked_ads"][0] == data["last_clicked_ads"][2]
    assert data["last_clicked_ads"][1] is None and data["event_timestamp"][1] is None
    stamp = data["event_timestamp"][0]
    if backend[0].features.online_store == "sqlite":
        assert stamp == T0.replace(microsecond=0), "Feast's SQLite store keeps whole seconds"
    else:
        assert stamp == T0
    with pytest.raises(ValueError, match="no features"):
        reader.read(USER, keys, ["nope"])


def test_each_row_keeps_its_own_timestamp(backend: Any) -> None:
    """Rows of one write with different (repeating, unordered) times: each entity reads its own."""
    _settings, _store, writer, reader = backend
    keys = unique_keys("t")
    minutes = [(7 * i) % 4 for i in range(len(keys))]
    stamps = [T0 + timedelta(minutes=m, seconds=i % 2) for i, m in enumerate(minutes)]
    rows = rows_for(USER, keys, T0).set_column(
        1, "event_timestamp", pa.array(stamps, pa.timestamp("us", "UTC"))
    )
    changed = np.zeros((len(keys), len(list(USER.features()))), dtype=bool)
    changed[:, 0] = True
    for table in (rows, with_changed(rows, changed, timestamp=True)):  # the full and the partial writer
        writer.write(USER, table)
        read = reader.read(USER, keys, with_event_timestamp=True).column("event_timestamp").to_pylist()
        if backend[0].features.online_store == "sqlite":
            assert read == [stamp.replace(microsecond=0) for stamp in stamps]
        else:
            assert read == stamps


def test_overwrite_last_row_wins_even_with_an_older_timestamp(backend: Any) -> None:
    _settings, store, writer, reader = backend
    keys = unique_keys("o")[:3]
    writer.write(USER, rows_for(USER, keys, T0))
    # A second write with an older timestamp still replaces the values (the engine is the
    # only writer; Feast's Redis writer would skip it), and of two rows of one key in one
    # call, the later one is stored.
    later = rows_for(USER, keys, T0 - timedelta(hours=1), shift=5)
    duplicate = rows_for(USER, keys[:1], T0 - timedelta(hours=1), shift=7)
    assert writer.write(USER, pa.concat_tables([later, duplicate])) == 3
    expect = pa.concat_tables([duplicate, later.slice(1)])
    names = [f.name for f in USER.features()]
    from_feast = feast_read(store, USER, keys, names)
    ours = reader.read(USER, keys).to_pydict()
    for name in names:
        want = [feast_expected(v) for v in expect.column(name).to_pylist()]
        assert all(same(a, b) for a, b in zip(from_feast[name], want, strict=True)), name
        assert all(same(a, b) for a, b in zip(ours[name], want, strict=True)), name


def with_changed(rows: pa.Table, changed: np.ndarray[Any, Any], timestamp: bool = False) -> pa.Table:
    """``rows`` with the CHANGED_COLUMN mask: ``changed`` (rows x features), then the timestamp flag."""
    flags = np.hstack([changed, np.full((len(changed), 1), timestamp)])
    return rows.append_column(
        CHANGED_COLUMN, pa.FixedSizeListArray.from_arrays(pa.array(flags.ravel()), flags.shape[1])
    )


def test_rows_with_a_changed_mask_write_only_those_features(backend: Any) -> None:
    """Unmarked features keep their stored values, even where the new row holds others; duplicate
    keys in one call write what any of their rows marked; a marked timestamp is written."""
    _settings, store, writer, reader = backend
    keys = unique_keys("c")[:4]
    names = [f.name for f in USER.features()]
    first = rows_for(USER, keys, T0)
    writer.write(USER, first)
    rng = np.random.default_rng(3)
    changed = rng.random((len(keys), len(names))) < 0.3
    changed[1] = False
    changed[2] = True
    second = rows_for(USER, keys, T0, shift=4)
    extra = np.zeros((1, len(names)), dtype=bool)
    extra[0, 0] = True  # keys[3] again (this row's values win): its first feature too
    later = rows_for(USER, keys[3:], T0, shift=4)
    assert (
        writer.write(USER, pa.concat_tables([with_changed(second, changed), with_changed(later, extra)])) == 4
    )
    changed[3, 0] = True
    from_feast = feast_read(store, USER, keys, names)
    ours = reader.read(USER, keys).to_pydict()
    for j, name in enumerate(names):
        for i in range(len(keys)):
            source, row = (first, i) if not changed[i, j] else (later, 0) if i == 3 else (second, i)
            want = feast_expected(source.column(name)[row].as_py())
            assert same(from_feast[name][i], want), (name, i, from_feast[name][i], want)
            assert same(ours[name][i], want), (name, i, ours[name][i], want)

    # A later timestamp with one changed feature: that feature and the timestamp are new; the
    # rest keep their values (SQLite, which stamps each feature, re-stamps them all).
    moved = rows_for(USER, keys[1:2], T0 + timedelta(minutes=5), shift=9)
    one = np.zeros((1, len(names)), dtype=bool)
    one[0, 5] = True
    writer.write(USER, with_changed(moved, one, timestamp=True))
    from_feast = feast_read(store, USER, keys[1:2], names)
    ours = reader.read(USER, keys[1:2], with_event_timestamp=True).to_pydict()
    for j, name in enumerate(names):
        want = feast_expected((moved if j == 5 else first).column(name)[0 if j == 5 else 1].as_py())
        assert same(from_feast[name][0], want) and same(ours[name][0], want), (
            name,
            from_feast[name][0],
            want,
        )
    assert ours["event_timestamp"][0].replace(microsecond=0) == (T0 + timedelta(minutes=5)).replace(
        microsecond=0
    )
    if backend[0].features.online_store == "sqlite":
        with sqlite3.connect(backend[0].feature_repo_dir / "online.db") as db:
            table = f"{backend[0].features.project}_{USER.name}"
            stamps = db.execute(
                f'SELECT DISTINCT event_ts FROM "{table}" WHERE entity_key = ?',
                (serialize_entity_key(USER, keys[1]),),
            ).fetchall()
        assert len(stamps) == 1, "every stored feature of the entity carries the new timestamp"
    with pytest.raises(ValueError, match="fixed-size list"):
        writer.write(USER, with_changed(second, changed[:, :3]))


def test_redis_writes_in_pipelined_chunks_and_an_error_reply_leaves_the_connection_in_step(
    tmp_path: Path,
) -> None:
    """Chunks are sent one ahead of reading replies; a refused command fails the write, not later ones."""
    import redis

    from features.store import open_store

    redis_available()
    project = f"adreach_test_{uuid.uuid4().hex[:8]}"
    settings = load_settings(state_dir=tmp_path, features={"online_store": "redis", "project": project})
    store = open_store(settings)
    writer = OnlineFeatureWriter(settings, redis_batch_commands=5)  # 12 rows: chunks of 5, 5 and 2
    reader = OnlineFeatureReader(settings)
    try:
        keys = unique_keys("p")
        rows = rows_for(USER, keys, T0)
        assert writer.write(USER, rows) == len(keys)
        names = [f.name for f in USER.features()]
        ours = reader.read(USER, keys).to_pydict()
        for name in names:
            want = [feast_expected(v) for v in rows.column(name).to_pylist()]
            assert all(same(a, b) for a, b in zip(ours[name], want, strict=True)), name

        # A string where the first chunk's second entity hash belongs: Redis refuses that HSET
        # (WRONGTYPE) and runs the others; the writer still reads every reply of every chunk.
        client = redis.Redis(host="127.0.0.1", port=6379)
        order = sorted(range(len(keys)), key=lambda i: serialize_entity_key(USER, keys[i]))
        blocked = keys[order[1]]
        client.delete(serialize_entity_key(USER, blocked) + settings.features.project.encode())
        client.set(serialize_entity_key(USER, blocked) + settings.features.project.encode(), b"not a hash")
        newer = rows_for(USER, keys, T0, shift=3)
        with pytest.raises(OnlineStoreError, match="WRONGTYPE"):
            writer.write(USER, newer)
        after = reader.read(USER, [k for k in keys if k != blocked]).to_pydict()
        kept = newer.filter(pa.array([k != blocked for k in keys]))
        for name in names:
            want = [feast_expected(v) for v in kept.column(name).to_pylist()]
            assert all(same(a, b) for a, b in zip(after[name], want, strict=True)), name
        client.delete(serialize_entity_key(USER, blocked) + settings.features.project.encode())
        assert writer.write(USER, newer) == len(keys)  # the same connection goes on in step
    finally:
        writer.close()
        reader.close()
        store.teardown()


def stored(settings: Settings, group: FeatureGroup, keys: list[str]) -> Any:
    """Everything the store holds for ``keys``: SQLite rows, or Redis hashes."""
    entity_keys = [serialize_entity_key(group, k) for k in keys]
    if settings.features.online_store == "redis":
        import redis

        client = redis.Redis(host="127.0.0.1", port=6379)
        project = settings.features.project.encode()
        return [client.hgetall(ek + project) for ek in entity_keys]
    with sqlite3.connect(settings.feature_repo_dir / "online.db") as connection:
        table = f"{settings.features.project}_{group.name}"
        marks = ",".join("?" * len(entity_keys))
        return connection.execute(
            f"SELECT entity_key, feature_name, value, value_text, vector_value, event_ts, created_ts, "
            f'typeof(event_ts), typeof(created_ts) FROM "{table}" WHERE entity_key IN ({marks}) '
            "ORDER BY entity_key, feature_name",
            entity_keys,
        ).fetchall()


def test_stores_the_same_bytes_as_feast_write_to_online_store(backend: Any) -> None:
    settings, store, writer, _reader = backend
    keys = unique_keys("b")
    rows = rows_for(USER, keys, T0)
    # Feast reads its created_ts from the source's created_timestamp column; so do we.
    created = pa.array([T0 + timedelta(seconds=3)] * len(keys), pa.timestamp("us", "UTC"))
    rows = rows.append_column("created_timestamp", created)
    # Feast's converter turns an int column with nulls into floats (and then overflows on
    # 2**63 - 1): give it int columns without nulls or huge values.
    for name in rows.column_names:
        if rows.schema.field(name).type == pa.int64():
            values = [v if v is not None and abs(v) < 2**53 else 42 for v in rows.column(name).to_pylist()]
            rows = rows.set_column(rows.column_names.index(name), name, pa.array(values, pa.int64()))
    store.write_to_online_store(USER.name, rows.to_pandas())
    by_feast = stored(settings, USER, keys)
    if settings.features.online_store == "sqlite":
        assert len(by_feast) == len(keys) * 34
    else:
        assert [len(fields) for fields in by_feast] == [34 + 1] * len(keys)  # features and _ts:
    # Feast's Redis writer skips rows that are not newer than the stored ones, so ours
    # must differ in nothing to leave an identical store behind.
    writer.write(USER, rows)
    assert stored(settings, USER, keys) == by_feast


# --------------------------------------------------------------------------- encoders vs protobuf

PROPERTY = hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def feast_bytes(values: list[Any], value_type: Any) -> list[bytes]:
    from feast.type_map import python_values_to_proto_values

    return [v.SerializeToString() for v in python_values_to_proto_values(values, value_type)]


@PROPERTY
@given(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=40))
def test_int64_encoding_matches_protobuf(values: list[int]) -> None:
    from feast.protos.feast.types.Value_pb2 import Value

    encoded = encode_values("int64", pa.array(values, pa.int64()))
    assert encoded == [Value(int64_val=v).SerializeToString() for v in values]
    assert [decode_value(b) for b in encoded] == values


@PROPERTY
@given(st.lists(st.floats(allow_nan=False, allow_infinity=True), min_size=1, max_size=40))
def test_double_encoding_matches_protobuf(values: list[float]) -> None:
    from feast.protos.feast.types.Value_pb2 import Value

    encoded = encode_values("float64", pa.array(values, pa.float64()))
    assert encoded == [Value(double_val=v).SerializeToString() for v in values]
    assert all(same(decode_value(b), v) for b, v in zip(encoded, values, strict=True))


@PROPERTY
@given(
    st.lists(st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)), min_size=1, max_size=40),
    st.lists(st.one_of(st.none(), st.floats()), min_size=1, max_size=40),
)
def test_number_bulk_strings_from_matrices_match_the_arrow_path(
    ints: list[int | None], doubles: list[float | None]
) -> None:
    """The Redis writer lays numbers' RESP pieces out in one byte matrix; the bytes must be those
    of encoding each value and joining its bulk string row by row."""
    from features import online

    for values, kind in ((ints, "int64"), (doubles, "float64")):
        array = pa.array(values, pa.int64() if kind == "int64" else pa.float64())
        prefixes = np.frombuffer(bytes(range(len(values) * 3)), np.uint8).reshape(len(values), 3)
        from_matrix = online._bulk_rows(prefixes, *online._MATRIX_ENCODERS[kind](array))
        joined = online._bulk(online._ENCODERS[kind](array), prefixes)
        assert from_matrix.to_pylist() == joined.to_pylist()


def resp_hashes(commands: bytes) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The (key, fields) of each ``HSET`` in RESP ``commands``, checking the framing on the way."""
    hashes, at = [], 0
    while at < len(commands):
        end = commands.index(b"\r\n", at)
        assert commands[at : at + 1] == b"*"
        count, at = int(commands[at + 1 : end]), end + 2
        parts = []
        for _ in range(count):
            end = commands.index(b"\r\n", at)
            assert commands[at : at + 1] == b"$"
            length = int(commands[at + 1 : end])
            parts.append(commands[end + 2 : end + 2 + length])
            assert commands[end + 2 + length : end + 4 + length] == b"\r\n"
            at = end + 4 + length
        assert parts[0] == b"HSET" and count % 2 == 0
        hashes.append((parts[1], dict(zip(parts[2::2], parts[3::2], strict=True))))
    return hashes


def edge_case_rows(group: FeatureGroup, rng: np.random.Generator, n: int) -> pa.Table:
    """``n`` rows of ``group`` drawn from every type's edge cases (nulls, NaN, extremes, Unicode)."""
    pools: dict[str, list[Any]] = {
        "int64": INTS,
        "float64": DOUBLES,
        "string_list": LISTS,
        "string": ["", "ü", "日本語", "x" * 300, None, "plain"],
        "float_list": [[], [0.5, -1.0], None, [float("nan"), 1e30], list(np.linspace(0, 1, 40)), [None, 2.0]],
    }
    schema = arrow_schema(group)
    columns: dict[str, Any] = {
        group.key: pa.array([KEYS[i] for i in rng.integers(0, len(KEYS), n)], pa.string()),
        "event_timestamp": pa.array(rng.integers(-(10**15), 10**16, n), pa.int64()).cast(
            pa.timestamp("us", "UTC")
        ),
    }
    for feature in group.features():
        pool = pools[feature.type]
        columns[feature.name] = pa.array(
            [pool[i] for i in rng.integers(0, len(pool), n)], schema.field(feature.name).type
        )
    return pa.table(columns, schema=schema)


@pytest.mark.skipif(not online.COMPILED_RESP_AVAILABLE, reason="the compiled Redis writer is not installed")
@PROPERTY
@given(
    st.integers(0, 2**32 - 1), st.integers(1, 30), st.integers(0, 5), st.sampled_from([0.0, 0.05, 0.5, 1.0])
)
def test_compiled_redis_commands_are_the_arrow_paths_bytes(
    seed: int, n: int, skip: int, share: float
) -> None:
    """The compiled writer (features/_resp.c) writes, byte for byte, the commands of the Arrow path:
    every feature type and edge case, rows that are a slice of a larger table, any mask."""
    from features.embeddings import FM_EMBEDDINGS

    rng = np.random.default_rng(seed)
    groups = (USER, QUERY_FEATURES, FM_EMBEDDINGS)
    settings = load_settings(features={"online_store": "redis", "project": "p_x"})
    writer = OnlineFeatureWriter(settings, groups)
    for group in groups:
        layout = writer._store.layout(group)
        rows = edge_case_rows(group, rng, n + skip).slice(skip)  # (buffers with an offset)
        keys = online._entity_keys(group, online._column(rows, group.key, pa.string()))
        micros = writer._micros(rows, "event_timestamp")
        changed = rng.random((n, len(layout.features))) < share
        compiled = writer._compiled_hset_commands(layout, rows, keys, micros, changed)
        arrow = writer._hset_commands(layout, rows, keys, micros, changed)
        if changed.all():  # the Arrow path's full rows put the features in another order
            assert resp_hashes(compiled) == resp_hashes(b"".join(arrow.to_pylist()))
        else:
            assert compiled == b"".join(arrow.to_pylist())
        whole = writer._compiled_hset_commands(layout, rows, keys, micros, None)
        assert resp_hashes(whole) == resp_hashes(
            b"".join(writer._hset_commands(layout, rows, keys, micros, None).to_pylist())
        )


@pytest.mark.skipif(not online.COMPILED_RESP_AVAILABLE, reason="the compiled Redis writer is not installed")
@pytest.mark.parametrize("skip", [1, 3, 8, 13])
def test_compiled_redis_writer_reads_arrays_at_their_offsets(skip: int) -> None:
    """Arrow arrays sliced from larger ones keep their buffers and carry an offset (in elements,
    in bitmap bits, in offsets entries): commands from sliced arrays equal those from copies."""
    n = 2 * len(INTS)
    numbers = pa.array([INTS[i % len(INTS)] for i in range(n + skip)], pa.int64())
    doubles = pa.array([DOUBLES[i % len(DOUBLES)] for i in range(n + skip)], pa.float64())
    encoded = pa.array([b"", b"v", None, b"\x00" * 70] * ((n + skip) // 4 + 1), pa.large_binary())
    keys = pa.array([f"k{i}".encode() for i in range(n + skip)], pa.large_binary())
    micros = np.arange(n + skip, dtype=np.int64) * 1_234_567 - 10**12

    def commands(sliced: bool) -> bytes:
        def cut(array: pa.Array) -> pa.Array:
            part = array.slice(skip, n)
            return part if sliced else pa.array(part.to_pylist(), part.type)

        ints, floats, texts, names = cut(numbers), cut(doubles), cut(encoded.fill_null(b"")), cut(keys)
        assert not sliced or ints.offset == floats.offset == texts.offset == skip
        features = (
            (b"i", 0, ints.buffers()[0], ints.buffers()[1], None, ints.offset),
            (b"d", 1, floats.buffers()[0], floats.buffers()[1], None, floats.offset),
            (b"t", 2, None, texts.buffers()[2], texts.buffers()[1], texts.offset),
        )
        key_buffers = names.buffers()
        return bytes(
            online._resp.hset_commands(
                n,
                (key_buffers[1], key_buffers[2], names.offset),
                b"proj",
                b"_ts:v",
                np.ascontiguousarray(micros[skip:]),
                features,
                None,
            )
        )

    assert commands(True) == commands(False)
    assert len(resp_hashes(commands(True))) == n


@PROPERTY
@given(st.lists(st.one_of(st.none(), st.lists(st.text(max_size=30), max_size=8)), min_size=1, max_size=20))
def test_string_list_encoding_matches_protobuf(values: list[list[str] | None]) -> None:
    from feast.protos.feast.types.Value_pb2 import StringList, Value

    encoded = encode_values("string_list", pa.array(values, pa.list_(pa.string())))
    want = [
        b"" if v is None else Value(string_list_val=StringList(val=v)).SerializeToString() for v in values
    ]
    assert encoded == want
    assert [decode_value(b) for b in encoded] == values


def test_nulls_nan_and_list_edge_cases_match_feast_conversion() -> None:
    from feast import ValueType

    # Feast's own conversion of Python values (what write_to_online_store stores).
    doubles = [0.0, -0.0, math.nan, None, math.inf, 1e308]
    assert encode_values("float64", pa.array(doubles, pa.float64())) == feast_bytes(doubles, ValueType.DOUBLE)
    ints = [0, -7, None, 2**40]
    assert encode_values("int64", pa.array(ints, pa.int64())) == feast_bytes(
        [0, -7, None, 2**40], ValueType.INT64
    )
    lists = [[], ["ü", None, ""], None, ["a" * 300]]
    assert encode_values("string_list", pa.array(lists, pa.list_(pa.string()))) == feast_bytes(
        lists, ValueType.STRING_LIST
    )
    # Sliced and chunked input is encoded the same as a fresh array.
    big = pa.array([["p", "q"], [], ["r"], None, ["s", "t", "u"]], pa.list_(pa.string()))
    assert encode_values("string_list", big.slice(2)) == encode_values(
        "string_list", pa.array(big.slice(2).to_pylist())
    )
    chunked = pa.chunked_array([pa.array([1, 2]), pa.array([300])])
    assert encode_values("int64", chunked) == encode_values("int64", pa.array([1, 2, 300]))


def test_timestamp_and_entity_key_encoding_match_feast() -> None:
    from feast.infra.key_encoding_utils import serialize_entity_key as feast_serialize
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value
    from google.protobuf.timestamp_pb2 import Timestamp

    moments = [
        T0,
        T0.replace(microsecond=0),
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(1969, 7, 20, 20, 17, 40, 5, tzinfo=UTC),
    ]
    micros = [(m - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) for m in moments]
    expected = []
    for moment in moments:
        stamp = Timestamp()
        stamp.FromDatetime(moment)
        expected.append(stamp.SerializeToString())
    assert encode_timestamps(micros) == expected
    for key in ["u1", "", "ü日本", "k" * 1000]:
        proto = EntityKey(join_keys=[USER.key], entity_values=[Value(string_val=key)])
        assert serialize_entity_key(USER, key) == feast_serialize(proto, entity_key_serialization_version=3)


def test_sqlite_timestamps_follow_feasts_local_time_adapter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Feast stores int(naive_utc.timestamp()), which depends on the machine's time zone."""
    from features.online import _local_epoch_seconds

    micros = [1_767_614_400_123_456, 0, 1_700_000_000_999_999]
    try:
        monkeypatch.setenv("TZ", "America/New_York")
        time.tzset()
        feast = [int((datetime(1970, 1, 1) + timedelta(microseconds=m)).timestamp()) for m in micros]
        assert _local_epoch_seconds(np.asarray(micros, np.int64)).tolist() == feast
    finally:
        monkeypatch.undo()
        time.tzset()


# --------------------------------------------------------------------------- failures


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])  # closed again on exit: nothing listens there


def test_unreachable_redis_raises_unavailable(tmp_path: Path) -> None:
    settings = load_settings(
        state_dir=tmp_path,
        features={
            "online_store": "redis",
            "redis_connection": f"127.0.0.1:{closed_port()},socket_connect_timeout=1",
        },
    )
    with (
        OnlineFeatureWriter(settings) as writer,
        pytest.raises(OnlineStoreUnavailableError, match="Redis") as info,
    ):
        writer.write(USER, rows_for(USER, ["u1"], T0))
    assert "redis_connection" in str(info.value)
    with OnlineFeatureReader(settings) as reader, pytest.raises(OnlineStoreUnavailableError):
        reader.read(USER, ["u1"])


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Settings:
    from features.store import open_store

    settings = load_settings(state_dir=tmp_path)
    open_store(settings, (USER,))
    return settings


def test_the_writer_drops_feasts_redundant_entity_key_index_and_reads_still_use_the_primary_key(
    sqlite_store: Settings,
) -> None:
    from features.store import open_store

    db = sqlite3.connect(sqlite_store.feature_repo_dir / "online.db")
    table = f"{sqlite_store.features.project}_{USER.name}"
    indexes = f"SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = '{table}'"
    assert (f"{table}_ek",) in db.execute(indexes).fetchall()  # as Feast's apply creates it
    written = rows_for(USER, ["u1", "u2"], T0)
    with OnlineFeatureWriter(sqlite_store, (USER,)) as writer:
        writer.write(USER, written)
    assert (f"{table}_ek",) not in db.execute(indexes).fetchall()
    # Feast's read (online_read) is served by the primary key's index alone
    plan = db.execute(
        f'EXPLAIN QUERY PLAN SELECT entity_key, feature_name, value, event_ts FROM "{table}" '
        "WHERE entity_key IN (?, ?) ORDER BY entity_key",
        (b"a", b"b"),
    ).fetchall()
    assert "USING INDEX sqlite_autoindex" in str(plan), plan
    store = open_store(sqlite_store, (USER,))  # applying again recreates it; reads are unchanged
    found = store.get_online_features(
        features=[f"{USER.name}:impressions_1h"], entity_rows=[{"user_id": "u2"}]
    ).to_dict()
    assert found["impressions_1h"] == [written.column("impressions_1h")[1].as_py()]
    db.close()


def test_locked_sqlite_raises_unavailable_then_recovers(sqlite_store: Settings) -> None:
    blocker = sqlite3.connect(sqlite_store.feature_repo_dir / "online.db", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    writer = OnlineFeatureWriter(sqlite_store, (USER,), sqlite_timeout_s=0.1)
    with pytest.raises(OnlineStoreUnavailableError, match="locked"):
        writer.write(USER, rows_for(USER, ["u1"], T0))
    blocker.execute("ROLLBACK")
    blocker.close()
    assert writer.write(USER, rows_for(USER, ["u1"], T0)) == 1, "the same call succeeds on retry"
    writer.close()


def test_unwritable_sqlite_raises_unavailable(sqlite_store: Settings) -> None:
    db = sqlite_store.feature_repo_dir / "online.db"
    if os.geteuid() != 0:
        db.chmod(0o444)
    else:  # root ignores permissions: make the rollback journal impossible to create instead
        (db.parent / "online.db-journal").mkdir()
    with (
        OnlineFeatureWriter(sqlite_store, (USER,), sqlite_wal=False) as writer,
        pytest.raises(OnlineStoreUnavailableError, match="not writable"),
    ):
        writer.write(USER, rows_for(USER, ["u1"], T0))


def test_store_without_applied_views_is_a_schema_error(tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path)
    with OnlineFeatureWriter(settings) as writer, pytest.raises(OnlineStoreSchemaError, match="open_store"):
        writer.write(USER, rows_for(USER, ["u1"], T0))
    settings.feature_repo_dir.mkdir(parents=True)
    sqlite3.connect(settings.feature_repo_dir / "online.db").close()
    with (
        OnlineFeatureWriter(settings) as writer,
        pytest.raises(OnlineStoreSchemaError, match="no such table"),
    ):
        writer.write(USER, rows_for(USER, ["u1"], T0))


def test_rows_that_do_not_fit_the_group_are_rejected(sqlite_store: Settings) -> None:
    with OnlineFeatureWriter(sqlite_store, (USER,)) as writer:
        with pytest.raises(ValueError, match="lack columns"):
            writer.write(USER, rows_for(USER, ["u1"], T0).drop(["ctr_1h"]))
        with pytest.raises(ValueError, match="not one of"):
            writer.write(QUERY, rows_for(QUERY, ["q"], T0))
        assert writer.write(USER, rows_for(USER, [], T0)) == 0


def test_reader_column_fast_paths_agree_with_feast(backend: Any) -> None:
    """Columns with every double present and every int below 128 are decoded in one go."""
    _settings, store, writer, reader = backend
    keys = unique_keys("f")[:5]
    rows = rows_for(USER, keys, T0)
    for index, field in enumerate(rows.schema):
        if field.type == pa.int64():
            rows = rows.set_column(index, field.name, pa.array([3, 0, 127, 5, 1], pa.int64()))
        elif field.type == pa.float64():
            rows = rows.set_column(index, field.name, pa.array([0.5, -0.0, 1e300, 2.0, -3.25], pa.float64()))
    writer.write(USER, rows)
    names = [f.name for f in USER.features()]
    from_feast = feast_read(store, USER, keys, names)
    ours = reader.read(USER, keys).to_pydict()
    for name in names:
        want = [feast_expected(v) for v in rows.column(name).to_pylist()]
        assert all(same(a, b) for a, b in zip(from_feast[name], want, strict=True)), name
        assert all(same(a, b) for a, b in zip(ours[name], want, strict=True)), name
