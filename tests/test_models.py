"""Foundation model, LoopFM embeddings in Feast, vertical models: on a tiny simulated world.

Runs against the real parts: the simulator, the stream engine (replayed into Feast's
offline store), a real Feast repository (point-in-time joins by Feast itself), the
online writer/reader, and the ``adreach`` CLI in a subprocess.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pydantic
import pytest
import torch
from feast import FeatureStore
from torch import Tensor

from features.embeddings import FM_EMBEDDING, FM_EMBEDDINGS, FM_HISTORY, FM_HISTORY_LEN
from features.online import OnlineFeatureReader, encode_values
from features.store import open_store
from infra.settings import ModelSettings, Settings, load_settings
from models.attention import sliding_window_attention
from models.fm import CANDIDATE_FIELDS, HISTORY_FIELDS, FMConfig, FoundationModel
from models.registry import ModelRegistry, RegistryError
from models.vm import VerticalModel, VMConfig
from streams.simulation import ParquetSink, SimulationConfig, simulate
from training.datasets import dense_feature_names, historical_view, vm_inputs
from training.events import (
    EVENT_TYPES,
    Buckets,
    build_event_log,
    read_topics,
    search_queries,
    stable_bucket,
    with_event_columns,
)
from training.examples import Examples
from training.metrics import auc
from training.pipeline import (
    Dataset,
    ModelMismatchError,
    load_dataset,
    load_foundation,
    load_vertical,
    materialize_embeddings,
    split,
    train_foundation,
    train_vertical,
)
from training.replay import replay_stream_features
from training.train import VMInputs, fm_predict, fm_user_embeddings, sigmoid, vm_predict

TINY_MODELS = {
    "history_len": 24,
    "window": 8,
    "dim": 16,
    "layers": 1,
    "heads": 2,
    "embedding_dim": 8,
    "embedding_history": 3,
    "epochs_fm": 3,
    "epochs_vm": 2,
    "batch_size": 256,
    "threads": 1,
    "max_examples": 12_000,
    "fm_stream_features": True,  # exercise the optional path where the FM reads the stream features too
}


@dataclass
class World:
    settings: Settings
    store: FeatureStore
    dataset: Dataset
    events_dir: Path
    fm: FoundationModel


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("models")
    config = SimulationConfig(users=400, days=2.0, events=30_000, seed=5)
    simulate(config, ParquetSink(root / "sim" / "events"), root / "sim" / "truth")
    settings = load_settings(state_dir=root / "state", models=TINY_MODELS)
    store = open_store(settings)
    replay_stream_features(settings, pq.read_table(root / "sim" / "events"), flush_s=1_800)
    dataset = load_dataset(root / "sim" / "events", queries=settings.queries)
    fm, saved = train_foundation(settings, dataset)
    assert saved is not None and saved.version == 1
    materialize_embeddings(settings, fm, dataset, backfill=True)
    return World(settings, store, dataset, root / "sim" / "events", fm)


def test_sliding_window_attention_equals_dense_banded_attention() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 37, 8) for _ in range(3))
    padding = torch.zeros(2, 37, dtype=torch.bool)
    padding[0, :10] = True
    out = sliding_window_attention(q, k, v, 5, padding)
    i = torch.arange(37)
    delta = i[:, None] - i[None, :]
    allowed = ((delta >= 0) & (delta < 5))[None, None] & ~padding[:, None, None, :]
    scores = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~allowed, float("-inf"))
    reference = torch.softmax(scores, -1).nan_to_num(0.0) @ v
    assert torch.allclose(out, reference, atol=1e-5)


def test_float_list_values_are_feasts_own_bytes() -> None:
    from feast.protos.feast.types.Value_pb2 import FloatList, Value

    lists = [[1.0, -2.5, 3.25], [], None, [0.1] * 40]
    encoded = encode_values("float_list", pa.array(lists, pa.list_(pa.float32())))
    expected = [
        b"" if x is None else Value(float_list_val=FloatList(val=x)).SerializeToString() for x in lists
    ]
    assert encoded == expected


def _offline_embeddings(settings: Settings) -> pa.Table:
    return pq.read_table(settings.feature_repo_dir / "data" / FM_EMBEDDINGS.name)


def test_embedding_features_are_point_in_time_correct(world: World) -> None:
    """Each example gets the latest run at or before it, computed from events before that run."""
    offline = _offline_embeddings(world.settings).to_pandas()
    offline = offline[offline["user_id"].notna()]
    run_ms = offline["event_timestamp"].astype("int64") // 1_000
    assert (run_ms % (world.settings.models.embedding_every_s * 1000) == 0).all()
    # Examples 1 ms before and exactly at some runs, for users that run wrote.
    picked = offline.groupby("user_id").nth(2).head(40)
    at_ms = picked["event_timestamp"].astype("int64").to_numpy() // 1_000
    users = picked["user_id"].to_numpy(object)
    times = np.concatenate([at_ms - 1, at_ms])
    examples = _examples(np.concatenate([users, users]), times)
    frame = historical_view(world.store, examples, FM_EMBEDDINGS, [FM_EMBEDDING, FM_HISTORY_LEN])
    for row, (user, t) in enumerate(zip(examples.user_id, examples.time_ms, strict=True)):
        mine = offline[(offline["user_id"] == user)]
        mine_ms = mine["event_timestamp"].astype("int64").to_numpy() // 1_000
        past = mine[mine_ms <= t]
        got = frame[FM_EMBEDDING].iloc[row]
        if past.empty:
            assert got is None or (isinstance(got, float) and math.isnan(got))
            continue
        latest = past.iloc[np.argmax(past["event_timestamp"].astype("int64").to_numpy())]
        assert np.allclose(np.asarray(got, np.float32), np.asarray(latest[FM_EMBEDDING], np.float32))
        future = mine[mine_ms > t]
        for _, later in future.iterrows():
            assert not np.allclose(np.asarray(got), np.asarray(later[FM_EMBEDDING])), (
                "an embedding from the future"
            )
    # A stored embedding is the FM's output on events strictly before its run time.
    index = world.dataset.log.user_index
    sample = offline.head(30)
    rows = np.array([index[u] for u in sample["user_id"]], np.int64)
    stamp = sample["event_timestamp"].astype("int64").to_numpy() // 1_000
    recomputed = fm_user_embeddings(world.fm, world.dataset.log, rows, stamp)
    stored = np.stack([np.asarray(v, np.float32) for v in sample[FM_EMBEDDING]])
    assert np.allclose(recomputed, stored, atol=1e-5)


def _examples(users: np.ndarray, times: np.ndarray) -> Examples:
    n = len(users)
    zeros = np.zeros(n, np.int64)
    return Examples(
        example_id=np.array([f"x{i}" for i in range(n)], object),
        user_id=users,
        ad_id=np.full(n, "ad0", object),
        campaign_id=np.full(n, "c0", object),
        advertiser_id=np.full(n, "adv0", object),
        user=zeros - 1,
        time_ms=np.asarray(times, np.int64),
        ad=zeros,
        campaign=zeros,
        advertiser=zeros,
        topic=zeros,
        position=zeros + 1,
        placement=zeros,
        device=zeros,
        hour=zeros,
        click=np.zeros(n, np.float32),
        conversion=np.zeros(n, np.float32),
        p_click=np.full(n, np.nan),
    )


def test_online_store_serves_the_latest_embedding_history(world: World) -> None:
    offline = _offline_embeddings(world.settings).to_pandas()
    offline = offline[offline["user_id"].notna()]
    latest = offline.sort_values("event_timestamp").groupby("user_id").tail(1).head(25)
    with OnlineFeatureReader(world.settings, (FM_EMBEDDINGS,)) as reader:
        online = reader.read(FM_EMBEDDINGS, latest["user_id"].tolist(), [FM_HISTORY, FM_HISTORY_LEN])
    k, e = world.settings.models.embedding_history, world.fm.config.embedding_dim
    for (_, row), history, length in zip(
        latest.iterrows(),
        online.column(FM_HISTORY).to_pylist(),
        online.column(FM_HISTORY_LEN).to_pylist(),
        strict=True,
    ):
        assert len(history) == k * e
        assert length == row[FM_HISTORY_LEN] and 1 <= length <= k
        assert np.allclose(history, np.asarray(row[FM_HISTORY], np.float32))
        assert np.allclose(history[:e], np.asarray(row[FM_EMBEDDING], np.float32)), "newest first"


def test_a_run_back_in_time_leaves_the_newer_online_embeddings_alone(world: World) -> None:
    """`fm-embeddings --once --at <past>` used to overwrite the backfill's newer online rows
    (serving then read an older embedding) and continue their newer history."""
    from training.pipeline import materialize_embeddings

    users = [str(u) for u in world.dataset.log.user_ids[:50].tolist()]

    def stored() -> list[Any]:
        with OnlineFeatureReader(world.settings, (FM_EMBEDDINGS,)) as reader:
            table = reader.read(FM_EMBEDDINGS, users, [FM_HISTORY_LEN], with_event_timestamp=True)
        return table.column("event_timestamp").to_pylist()

    before = stored()
    middle = (world.dataset.start_ms + world.dataset.end_ms) // 2
    stats = materialize_embeddings(world.settings, world.fm, world.dataset, backfill=False, at_ms=middle)
    assert stats.skipped > 0 and stats.rows == 0  # every user active then has a later backfill run
    assert stored() == before


def test_a_user_deleted_in_the_log_loses_its_embeddings_and_its_old_events(
    world: World, tmp_path: Path
) -> None:
    """The log gets a deletion of a user with stored embeddings: the next run deletes them
    (online and offline), the log reader leaves the user's earlier events out, and a run
    after that neither deletes again nor brings them back."""
    from training.pipeline import load_dataset, materialize_embeddings

    offline = _offline_embeddings(world.settings)
    user = str(offline.column("user_id")[offline.num_rows // 2].as_py())
    deleted_at = datetime.fromtimestamp(world.dataset.end_ms / 1000, UTC)  # after all of the user's events
    log = tmp_path / "events"
    shutil.copytree(world.events_dir, log)
    deletion = {"type": "user_profile", "event_id": "del-1", "event_time": deleted_at, "user_id": user}
    schema = pq.read_schema(next(log.rglob("*.parquet")))  # (the parts of one log share it)
    assert "action" in schema.names
    row = {name: None for name in schema.names} | deletion | {"action": "delete"}
    pq.write_table(pa.Table.from_pylist([row], schema), log / "zz-deletion.parquet")
    dataset = load_dataset(log, queries=world.settings.queries)
    assert dataset.log.deletions[user] == int(deleted_at.timestamp() * 1000)
    assert user in world.dataset.log.user_index and user not in dataset.log.user_index  # its events are gone

    for run in range(2):
        materialize_embeddings(world.settings, world.fm, dataset, backfill=False)
        with OnlineFeatureReader(world.settings, (FM_EMBEDDINGS,)) as reader:
            stored = reader.read(FM_EMBEDDINGS, [user], [FM_HISTORY_LEN], with_event_timestamp=True)
        assert stored.column("event_timestamp").to_pylist() == [None], run
        kept = _offline_embeddings(world.settings)
        assert user not in kept.column("user_id").to_pylist(), run
        assert kept.num_rows > 0.9 * offline.num_rows  # (only the user's rows went)


def _inputs(world: World, examples: Examples) -> VMInputs:
    inputs, stats = vm_inputs(
        world.store,
        examples,
        loopfm=True,
        embedding_dim=world.fm.config.embedding_dim,
        embedding_history=world.settings.models.embedding_history,
    )
    assert all(share < 0.5 for share in stats.missing.values()), stats.missing
    return inputs


def test_shapes_dtypes_and_a_tiny_run_beats_a_constant_predictor(world: World) -> None:
    parts = split(world.dataset, world.settings.models)
    train = _inputs(world, parts.vm_train)
    evaluation = _inputs(world, parts.evaluation)
    n, k, e = len(parts.vm_train), world.settings.models.embedding_history, world.fm.config.embedding_dim
    assert train.dense.shape == (n, len(dense_feature_names())) and train.dense.dtype == np.float32
    assert np.isfinite(train.dense).all()
    assert train.fm_history is not None and train.fm_history.shape == (n, k, e)
    assert train.fm_history.dtype == np.float32
    assert train.fm_history_len is not None and train.fm_history_len.dtype == np.int64
    assert ((train.fm_history_len >= 0) & (train.fm_history_len <= k)).all()
    # Slots past the filled length are zero; filled ones are not.
    filled = np.arange(k)[None, :] < train.fm_history_len[:, None]
    assert (np.abs(train.fm_history).sum(axis=2)[~filled] == 0).all()
    assert (np.abs(train.fm_history).sum(axis=2)[filled] > 0).all()

    # The FM reads the same stream features as the VMs (a superset of their inputs).
    assert world.fm.config.dense_features == dense_feature_names()
    fm_logits = fm_predict(world.fm, world.dataset.log, parts.evaluation, dense=evaluation.dense)
    assert fm_logits.shape == (len(parts.evaluation), 2) and fm_logits.dtype == np.float32
    model, saved = train_vertical(
        world.settings, world.store, world.dataset, "kd+loopfm", inputs=train, fm=world.fm
    )
    # A constant predictor ranks at AUC 0.5. (In log loss the VMs do not beat the training
    # base rate on a world this small; on the benchmark's larger world their NE is < 1.)
    logits = vm_predict(model, evaluation)
    assert logits.shape == (len(parts.evaluation), 2) and logits.dtype == np.float32
    assert (
        auc(parts.evaluation.click, sigmoid(logits[:, 0])) > 0.53
    )  # deterministic run; ~2 standard errors above chance here
    assert auc(parts.evaluation.click, sigmoid(fm_logits[:, 0])) > 0.55

    # Save / load round trip: same predictions, metadata kept.
    assert saved is not None
    loaded, again = load_vertical(world.settings, "kd+loopfm")
    assert again.version == saved.version and again.metadata["variant"] == "kd+loopfm"
    assert "adapter" in again.weights and again.metadata["kind"] == "vertical_model"
    assert np.array_equal(vm_predict(loaded, evaluation), logits)
    fm_loaded, fm_saved = load_foundation(world.settings)
    assert fm_saved.metadata["config"]["embedding_dim"] == e
    assert fm_loaded.config == world.fm.config
    assert np.array_equal(
        fm_predict(fm_loaded, world.dataset.log, parts.evaluation, dense=evaluation.dense), fm_logits
    )


def _subset(inputs: VMInputs, mask: np.ndarray) -> VMInputs:
    assert inputs.fm_history is not None and inputs.fm_history_len is not None
    return VMInputs(
        inputs.dense[mask],
        {k: v[mask] for k, v in inputs.candidate.items()},
        inputs.fm_history[mask],
        inputs.fm_history_len[mask],
        inputs.click[mask],
        inputs.conversion[mask],
    )


def test_registry_versions_and_errors(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    with pytest.raises(RegistryError, match="train it first"):
        registry.load("fm")
    weights = {"model": {"w": torch.arange(3.0)}}
    first = registry.save("vm-base", weights, {"note": "one"})
    second = registry.save("vm-base", {"model": {"w": torch.ones(3)}}, {"note": "two"})
    assert (first.version, second.version) == (1, 2)
    assert registry.load("vm-base").metadata["note"] == "two"
    assert torch.equal(registry.load("vm-base", 1).weights["model"]["w"], torch.arange(3.0))
    with pytest.raises(RegistryError, match="no version 7"):
        registry.load("vm-base", 7)
    assert json.loads((first.path / "metadata.json").read_text())["version"] == 1
    # a version folder without its files (made by hand, emptied) is no version: it hid v2
    (tmp_path / "vm-base" / "v0003").mkdir()
    assert registry.versions("vm-base") == [1, 2] and registry.load("vm-base").version == 2
    with pytest.raises(RegistryError, match=r"train it first \(adreach train vm --variant kd\)"):
        registry.load("vm-kd")


def _cli(world: World, *args: str, models: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADREACH_")}
    env.update({"ADREACH_STATE_DIR": str(world.settings.state_dir), "COLUMNS": "200"})
    env.update({f"ADREACH_MODELS__{k.upper()}": str(v) for k, v in {**TINY_MODELS, **(models or {})}.items()})
    return subprocess.run(
        [sys.executable, "-m", "infra.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def _refuse_non_standard_json(constant: str) -> None:
    raise AssertionError(f"{constant} is not JSON (JavaScript's and other parsers refuse it)")


def test_a_catalog_named_in_other_words_than_the_query_taxonomy_is_warned_about(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Searches take their query category as topic only where it is a catalog topic: a catalog
    with its own labels left every search without one, silently."""
    from training.cli_common import load_data

    settings = world.settings.model_copy(
        update={"models": world.settings.models.model_copy(update={"search_topics": True})}
    )
    load_data(world.events_dir, settings)  # the simulator's catalog uses the taxonomy's ids
    assert "searches got a topic" not in capsys.readouterr().err
    shutil.copytree(world.events_dir, tmp_path / "sim" / "events")
    (tmp_path / "sim" / "truth").mkdir()
    ads = pq.read_table(world.events_dir.parent / "truth" / "ads.parquet")
    labels = pc.binary_join_element_wise("label-", ads.column("topic"), "")
    pq.write_table(
        ads.set_column(ads.schema.get_field_index("topic"), "topic", labels),
        tmp_path / "sim" / "truth" / "ads.parquet",
    )
    load_data(tmp_path / "sim" / "events", settings)
    assert "none of the" in capsys.readouterr().err


def test_a_transfer_ratio_is_only_given_for_an_fm_gain_above_the_auc_noise() -> None:
    """`evaluate` showed -301 for an FM 0.0002 AUC above VM-base on a tiny evaluation."""
    from training.metrics import auc_standard_error
    from training.pipeline import transfer_ratio

    # Hanley & McNeil's formula by hand: A = 0.75, Q1 = 0.6, Q2 = 0.642857, 100 + 100 examples.
    assert auc_standard_error(0.75, 100, 100) == pytest.approx(0.03443, abs=1e-4)
    assert auc_standard_error(0.75, 10_000, 10_000) < 0.004  # shrinks with the evaluation
    assert math.isnan(transfer_ratio(0.61, 0.60, 0.6002, min_gain=0.0344))
    assert transfer_ratio(0.65, 0.60, 0.70, min_gain=0.0344) == pytest.approx(0.5)


def test_cli_train_vm_and_evaluate(world: World) -> None:
    bad = _cli(world, "train", "vm", "--events", str(world.events_dir), "--variant", "distilled")
    assert bad.returncode == 2 and "unknown variant" in bad.stderr
    flush = _cli(world, "features", "backfill", "--events", str(world.events_dir), "--flush", "0")
    assert flush.returncode == 2 and "--flush 0: " in flush.stderr  # named by the option typed
    trained = _cli(
        world,
        "train",
        "vm",
        "--events",
        str(world.events_dir),
        "--variant",
        "loopfm",
        "--max-examples",
        "2000",
    )
    assert trained.returncode == 0, trained.stderr
    assert "saved vm-loopfm v1" in trained.stdout
    out = Path(world.settings.state_dir) / "reports" / "eval.json"  # a folder that does not exist yet
    evaluated = _cli(
        world, "evaluate", "--events", str(world.events_dir), "--max-examples", "2000", "--json", str(out)
    )
    assert evaluated.returncode == 0, evaluated.stderr
    results: dict[str, Any] = json.loads(out.read_text(), parse_constant=_refuse_non_standard_json)
    assert {"fm", "vm-loopfm"} <= set(results)
    assert 0.0 <= results["vm-loopfm"]["click"]["auc"] <= 1.0
    assert results["vm-loopfm"]["version"] == 1 and "; fm v1, vm-loopfm v1" in evaluated.stdout
    # One surface only (models.vm_vertical): fewer impressions, all of them scored.
    feed = _cli(world, "evaluate", "--events", str(world.events_dir), "--vertical", "feed")
    assert feed.returncode == 0, feed.stderr
    assert "(feed only)" in feed.stdout
    assert "vm-loopfm" not in feed.stdout  # trained for every placement, not feed: never mixed in
    n_feed = len(
        split(world.dataset, world.settings.models.model_copy(update={"vm_vertical": "feed"})).evaluation
    )
    assert 0 < n_feed < len(split(world.dataset, world.settings.models).evaluation)
    assert f"evaluation: {n_feed:,} impressions" in feed.stdout
    bad_vertical = _cli(world, "evaluate", "--events", str(world.events_dir), "--vertical", "banner")
    assert bad_vertical.returncode == 2 and "vm_vertical" in bad_vertical.stderr
    assert "not trained for --vertical feed, not scored: vm-base" in feed.stderr
    # results that could not be saved are refused before the work, not after it
    events = ["--events", str(world.events_dir)]
    folder = _cli(world, "evaluate", *events, "--json", str(out.parent))
    assert folder.returncode == 2 and "is a folder; give a file name" in folder.stderr, folder.stderr
    blocked = Path(world.settings.state_dir) / "a-file"
    blocked.write_text("")
    registry = _cli(world, "train", "fm", *events, models={"registry_dir": str(blocked / "models")})
    assert (
        registry.returncode == 2
        and "models.registry_dir" in registry.stderr
        and "cannot write" in registry.stderr
    )
    assert "Traceback" not in folder.stderr + registry.stderr


SEARCH = EVENT_TYPES.index("search") + 1


def test_placement_and_device_lists_come_from_the_settings(world: World) -> None:
    """Another platform's surfaces: models.placements names them; saved models refuse other lists."""
    models = ModelSettings.model_validate(
        {**world.settings.models.model_dump(), "placements": ["video", "feed", "app_banner"]}
    )
    dataset = load_dataset(
        world.events_dir, queries=world.settings.queries, buckets=Buckets.for_models(models)
    )
    default = world.dataset.examples.placement  # feed 1, search_top 2, sidebar 3, video 4
    assert np.array_equal(dataset.examples.placement, np.select([default == 4, default == 1], [1, 2], 0))
    assert np.array_equal(dataset.examples.device, world.dataset.examples.device)
    # A listed surface without traffic here: empty VM parts, the FM's part unchanged.
    parts = split(dataset, models.model_copy(update={"vm_vertical": "app_banner"}))
    assert len(parts.vm_train) == 0 and len(parts.evaluation) == 0
    assert np.array_equal(
        parts.fm_train.example_id, split(world.dataset, world.settings.models).fm_train.example_id
    )
    with pytest.raises(ValueError, match="another list than models.placements"):
        split(world.dataset, models)
    with pytest.raises(pydantic.ValidationError, match="not one of models.placements"):
        ModelSettings.model_validate({"placements": ["video"], "vm_vertical": "feed"})
    # The saved FM was trained with the default lists: its codes would mean other surfaces now.
    with pytest.raises(ModelMismatchError, match="models.placements"):
        load_foundation(world.settings.model_copy(update={"models": models}))
    refused = _cli(
        world, "features", "fm-embeddings", "--events", str(world.events_dir), models={"devices": '["tv"]'}
    )
    assert refused.returncode == 2 and "trained with models.devices" in refused.stderr, refused.stderr


def _profile_log_events(attributes: pa.Array) -> pa.Table:
    """u1: an impression at t=10 s, profiles at 1 s (a full one), 5 s (country only), 6 s (a deletion)."""
    at = pa.array([t + 1_767_600_000_000 for t in [10_000, 1_000, 5_000, 6_000, 2_000]], pa.int64()).cast(
        pa.timestamp("ms", "UTC")
    )
    return pa.table(
        {
            "type": ["impression", "user_profile", "user_profile", "user_profile", "user_profile"],
            "event_id": ["i", "p1", "p2", "p3", "p4"],
            "event_time": at,
            "user_id": ["u1", "u1", "u1", "u1", "nobody"],
            "ad_id": ["a1", None, None, None, None],
            "campaign_id": ["c1", None, None, None, None],
            "advertiser_id": ["v1", None, None, None, None],
            "attributes": attributes,
        }
    )


@pytest.mark.parametrize("kind", ["struct", "map"])
def test_profile_attributes_are_read_as_of_each_time(kind: str) -> None:
    """The latest value of each attribute strictly before the time; a later update that leaves an
    attribute out (or a deletion) keeps its earlier value; users and attributes unknown read 0."""
    rows = [
        {"country": "DE", "gender": "f"},
        {"country": "FR", "gender": None},
        None,  # a deletion
        {"country": "US", "gender": "m"},  # a user without other events: left out
    ]
    if kind == "struct":
        attributes = pa.array(rows, pa.struct([("country", pa.string()), ("gender", pa.string())]))
    else:
        pairs = [None if r is None else [(k, v) for k, v in r.items() if v is not None] for r in rows]
        attributes = pa.array(pairs, pa.map_(pa.string(), pa.string()))
    log = build_event_log(
        _profile_log_events(pa.concat_arrays([pa.nulls(1, attributes.type), attributes])), {}
    )
    assert set(log.profiles.names) == {"country", "gender"}
    base = 1_767_600_000_000
    times = np.array([base + 1_000, base + 1_001, base + 5_000, base + 5_001, base + 9_000], np.int64)
    users = np.zeros(len(times), np.int64)
    got = log.history(users, times, 2, ("country", "gender", "age_band"))
    code = {v: int(stable_bucket(pa.array([v]), Buckets().profile_values)[0]) for v in ("DE", "FR", "f")}
    assert got["attribute:country"].tolist() == [0, code["DE"], code["DE"], code["FR"], code["FR"]]
    assert got["attribute:gender"].tolist() == [0, code["f"], code["f"], code["f"], code["f"]]
    assert got["attribute:age_band"].tolist() == [0] * 5
    unknown = log.history(np.array([-1]), times[-1:], 2, ("country",))
    assert unknown["attribute:country"].tolist() == [0]
    assert "attribute:country" not in log.history(users, times, 2)  # only what is asked for


def test_search_events_carry_their_query_topic(world: World) -> None:
    """Search tokens get the categorizer's topic; other events keep their ad's topic."""
    log = world.dataset.log
    searches = log.kind == SEARCH
    assert searches.any() and (log.topic[searches] > 0).mean() > 0.8  # "general" queries stay 0
    events = pq.read_table(world.events_dir)
    topics = read_topics(world.events_dir.parent / "truth" / "ads.parquet")
    queries = search_queries(events)
    mapped = {q: "running" for q in queries[:3]}
    log = build_event_log(events, topics, Buckets(), mapped)
    plain = build_event_log(events, topics, Buckets())
    running = log.topics.index("running") + 1
    searches = log.kind == SEARCH
    changed = log.topic != plain.topic
    assert changed.any() and searches[changed].all() and (log.topic[changed] == running).all()
    assert (plain.topic[searches] == 0).all()


def test_profile_loss_and_the_vms_profile_scores() -> None:
    torch.manual_seed(0)
    config = FMConfig(history_len=4, window=2, dim=8, layers=1, heads=2, embedding_dim=4, profile_weight=1.0)
    fm = FoundationModel(config)
    assert fm.topic_profile is not None
    click, search, impression = EVENT_TYPES.index("click") + 1, SEARCH, EVENT_TYPES.index("impression") + 1
    history = {
        name: torch.zeros(2, 4, dtype=torch.long) for name in ("ad", "campaign", "advertiser", "query")
    }
    history["gap"] = torch.ones(2, 4, dtype=torch.long)
    # User 0: two clicks on topic 3, a search of topic 5, an impression of topic 7 (ignored).
    history["kind"] = torch.tensor([[click, click, search, impression], [impression, 0, 0, 0]])
    history["topic"] = torch.tensor([[3, 3, 5, 7], [7, 0, 0, 0]])
    user = torch.randn(2, 4)
    log_p = torch.log_softmax(fm.topic_profile(user[:1]), dim=1)[0]
    expected = -(2 / 3 * log_p[3] + 1 / 3 * log_p[5])
    assert torch.allclose(fm.profile_loss(user, history), expected)  # user 1 has no signal: left out

    vm_config = VMConfig(
        variant="loopfm", dense_features=(), embedding_dim=4, fm_profile_topics=config.buckets.topics
    )
    vm = VerticalModel(vm_config)
    assert not hasattr(vm, "query"), "raw FM embeddings are opt-in (fm_raw_inputs)"
    vm.load_fm_profile(fm)
    stored = torch.randn(3, 2, 4)
    length = torch.tensor([2, 1, 0])
    topic = torch.tensor([3, 5, 3])
    scores = vm.profile_scores(stored, length, topic)
    uniform = math.log(config.buckets.topics)  # scores are log(p / uniform)
    log_p = torch.log_softmax(fm.topic_profile(stored[:, 0]), dim=1) + uniform
    assert torch.allclose(scores[:2, 0], log_p[torch.arange(2), topic[:2]], atol=1e-5)
    mean0 = torch.log_softmax(fm.topic_profile(stored[0].mean(0, keepdim=True)), dim=1)[0, 3] + uniform
    assert torch.allclose(scores[0, 1], mean0, atol=1e-5) and torch.allclose(scores[1, 1], scores[1, 0])
    assert (scores[2] == 0).all(), "no embedding yet: no score"
    with pytest.raises(ValueError, match="fm_profile_topics > 0, fm_taste_dim > 0 or fm_raw_inputs"):
        VerticalModel(VMConfig(variant="loopfm", dense_features=(), embedding_dim=4))


def test_the_fm_wide_part_adds_id_biases_and_a_user_topic_taste_term() -> None:
    """The wide part adds exactly its biases plus (W user) . topic_vector; old configs load without it."""
    torch.manual_seed(0)
    config = FMConfig(history_len=4, window=2, dim=8, layers=1, heads=2, embedding_dim=4)
    fm = FoundationModel(config)
    assert fm.wide is not None
    history = {name: torch.zeros(2, 4, dtype=torch.long) for name in HISTORY_FIELDS}
    history["kind"] = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    candidate = {name: torch.tensor([1, 2]) for name in CANDIDATE_FIELDS}
    before, user = fm(history, candidate)
    with torch.no_grad():
        fm.wide.bias["ad"].weight[2] = torch.tensor([0.5, -0.25])  # the second example's ad
        fm.wide.topic_taste.weight[1] += 1.0  # the first example's topic
    after, _ = fm(history, candidate)
    taste = fm.wide.user_taste(user)
    expected = torch.stack([taste[0].sum(), torch.tensor(0.0)])
    assert torch.allclose(after[0] - before[0], expected, atol=1e-5)
    assert torch.allclose(after[1] - before[1], torch.tensor([0.5, -0.25]), atol=1e-6)

    saved = FMConfig(history_len=4, window=2, dim=8, layers=1, heads=2, embedding_dim=4).to_dict()
    del saved["wide"]  # a model saved before the wide part existed
    old = FoundationModel(FMConfig.from_dict(saved))
    assert old.wide is None
    assert set(old.state_dict()) == {k for k in fm.state_dict() if not k.startswith("wide.")}


def test_the_vms_taste_scores_are_the_fms_wide_taste_term() -> None:
    """VM+LoopFM scores the candidate's topic with the FM's own taste term, from stored embeddings."""
    torch.manual_seed(0)
    config = FMConfig(history_len=4, window=2, dim=8, layers=1, heads=2, embedding_dim=4, profile_weight=1.0)
    fm = FoundationModel(config)
    assert fm.wide is not None
    vm = VerticalModel(
        VMConfig(
            variant="loopfm",
            dense_features=(),
            embedding_dim=4,
            fm_profile_topics=config.buckets.topics,
            fm_taste_dim=config.taste_dim,
        )
    )
    vm.load_fm_profile(fm)
    stored = torch.randn(3, 2, 4)  # (users, K, E), newest first
    length = torch.tensor([2, 1, 0])
    topic = torch.tensor([3, 5, 3])
    scores = vm.taste_scores(stored, length, topic)

    def fm_taste(user: Tensor, topics: Tensor) -> Tensor:
        assert fm.wide is not None
        return (fm.wide.user_taste(user) * fm.wide.topic_taste(topics)).sum(1)

    assert torch.allclose(scores[:2, 0], fm_taste(stored[:2, 0], topic[:2]), atol=1e-5)
    assert torch.allclose(scores[0, 1], fm_taste(stored[0].mean(0, keepdim=True), topic[:1])[0], atol=1e-5)
    assert (scores[2] == 0).all(), "no embedding yet: no score"
    logits, _ = vm(
        torch.zeros(3, 0), {name: torch.zeros(3, dtype=torch.long) for name in vm.ids}, stored, length
    )
    assert logits.shape == (3, 2)


def test_an_event_log_needs_only_the_sdk_core_fields_and_any_time_unit(world: World, tmp_path: Path) -> None:
    """Another producer's log: pandas' nanosecond timestamps without a zone, no optional columns."""
    from training.events import OPTIONAL_COLUMNS, EventLogError

    table = pq.read_table(world.events_dir)
    nanos = table.column("event_time").cast(pa.int64()).to_numpy() * 1_000_000 + 999_999
    # (labels need the impression and click ids; the profile action carries the user deletions)
    foreign = table.drop_columns(
        [c for c in OPTIONAL_COLUMNS if c not in ("impression_id", "click_id", "action")]
    )
    foreign = foreign.set_column(
        foreign.schema.get_field_index("event_time"), "event_time", pa.array(nanos, pa.timestamp("ns"))
    )
    (tmp_path / "foreign" / "events").mkdir(parents=True)
    pq.write_table(foreign, tmp_path / "foreign" / "events" / "part.parquet")

    dataset = load_dataset(tmp_path / "foreign" / "events")

    ours = world.dataset.examples
    assert np.array_equal(dataset.examples.time_ms, ours.time_ms)  # truncated to the same milliseconds
    assert np.array_equal(dataset.examples.click, ours.click)
    assert (dataset.examples.position == 1).all() and (dataset.examples.device == 0).all()
    pq.write_table(foreign.drop_columns(["campaign_id"]), tmp_path / "foreign" / "events" / "part.parquet")
    with pytest.raises(EventLogError, match="no 'campaign_id' column"):
        load_dataset(tmp_path / "foreign" / "events")
    # An in-memory table goes by the same rule (it used to demand a query column of its own).
    topics = read_topics(world.events_dir.parent / "truth" / "ads.parquet")
    in_memory = build_event_log(foreign, topics, Buckets())
    assert np.array_equal(in_memory.time_ms, world.dataset.log.time_ms)
    assert (in_memory.query == world.dataset.log.query[world.dataset.log.kind != SEARCH][0]).all()


def test_integer_ids_and_parts_with_other_columns_read_as_the_sdk_log_and_bad_times_are_refused(
    world: World, tmp_path: Path
) -> None:
    """Integer user ids silently gave every example an empty history (ids were looked up as
    text); a directory took its columns from its first part, so clicks named only in later
    parts vanished; one event from 1970 stretched the time split over 56 years."""
    from training.events import EventLogError, read_events

    table = pq.read_table(world.events_dir)
    users = table.column("user_id").to_pylist()
    numbered = {user: index for index, user in enumerate(sorted(set(users)))}
    as_integers = table.set_column(
        table.schema.get_field_index("user_id"), "user_id", pa.array([numbered[u] for u in users], pa.int64())
    )
    parts = tmp_path / "int-ids" / "events"
    parts.mkdir(parents=True)
    # A producer of impressions and searches never writes the label columns; clicks and conversions do.
    labelled = pc.is_in(as_integers.column("type"), value_set=pa.array(["click", "conversion"]))
    unlabelled = as_integers.filter(pc.invert(labelled)).drop_columns(["impression_id", "click_id"])
    pq.write_table(unlabelled, parts / "a.parquet")
    pq.write_table(as_integers.filter(labelled), parts / "b.parquet")

    read = read_events(parts)
    assert read.column("user_id").type == pa.string()
    assert read.column("click_id").null_count < read.num_rows  # the later part's labels are kept
    dataset = load_dataset(parts)
    ours = world.dataset.examples
    assert (dataset.examples.user >= 0).all()  # every example's user has a history
    assert len(dataset.examples.click) == len(ours.click)
    assert dataset.examples.click.sum() == ours.click.sum() > 0

    pq.write_table(table.slice(0, 0), tmp_path / "empty.parquet")
    with pytest.raises(EventLogError, match="holds no events"):
        read_events(tmp_path / "empty.parquet")
    for time, reason in (
        (
            pa.scalar(0, pa.timestamp("ms", "UTC")),
            r"outside 2000-01-01..2100-01-01 \(the first: 1970-01-01T00:00:00",
        ),
        (None, r"no event_time \(the first: event_id '"),
    ):
        times = table.column("event_time").to_pylist()
        times[7] = time.as_py() if time is not None else None
        broken = table.set_column(
            table.schema.get_field_index("event_time"),
            "event_time",
            pa.array(times, table.column("event_time").type),
        )
        pq.write_table(broken, tmp_path / "broken.parquet")
        with pytest.raises(EventLogError, match=reason):
            read_events(tmp_path / "broken.parquet")


def test_ad_catalogs_with_integer_ids_are_read_and_ones_without_topics_refused(tmp_path: Path) -> None:
    from training.events import EventLogError, read_topics

    pq.write_table(pa.table({"ad_id": [1, 2], "topic": ["travel", "finance"]}), tmp_path / "ads.parquet")
    assert read_topics(tmp_path / "ads.parquet") == {"1": "travel", "2": "finance"}  # as the log's ids read
    pq.write_table(pa.table({"ad_id": ["a"], "category": ["travel"]}), tmp_path / "other.parquet")
    with pytest.raises(EventLogError, match="has no 'topic' column"):
        read_topics(tmp_path / "other.parquet")


def test_a_backfill_reads_a_log_without_arrival_times_in_its_own_order(tmp_path: Path) -> None:
    """Sorted by event time, a log whose producer sent an event two hours late had nothing
    late in the backfill, where the stream engine (and Flink) reading it dropped that event."""
    settings = load_settings(state_dir=tmp_path / "state")
    open_store(settings)

    def impression(event_id: str, time: str) -> dict[str, str]:
        ids = {"user_id": "u1", "ad_id": "ad1", "campaign_id": "c1", "advertiser_id": "adv1"}
        return {"type": "impression", "event_id": event_id, "event_time": time, **ids}

    log = pa.Table.from_pylist(
        [
            impression("e1", "2026-01-05T10:00:00Z"),
            impression("e2", "2026-01-05T13:00:00Z"),
            impression("e3", "2026-01-05T10:30:00Z"),  # sent 2.5 h late: past the allowed hour
            impression("e4", "2026-01-05T13:05:00Z"),
        ]
    )
    stats = replay_stream_features(settings, with_event_columns(log), flush_s=60)
    assert stats.late == 1
