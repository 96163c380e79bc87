"""Open the Feast feature store described by the settings, and register adreach's features.

The store is configured in code (``RepoConfig``) rather than by a ``feature_store.yaml``
in the repository, so that the one settings object stays the only configuration and no
``feast apply`` has to import the project's modules.
"""

from __future__ import annotations

from feast import FeatureStore, RepoConfig

from features.definitions import BATCH_TABLES, FEATURE_GROUPS, FeatureGroup
from features.embeddings import MODEL_FEATURE_GROUPS
from features.feast_objects import ensure_offline_files, feast_objects
from infra.settings import Settings


def repo_config(settings: Settings) -> RepoConfig:
    repo = settings.feature_repo_dir
    online: dict[str, str]
    if settings.features.online_store == "redis":
        online = {"type": "redis", "connection_string": settings.features.redis_connection}
    else:
        online = {"type": "sqlite", "path": str(repo / "online.db")}
    return RepoConfig(
        project=settings.features.project,
        registry=str(repo / "registry.db"),
        provider="local",
        online_store=online,
        offline_store={"type": "file"},
        entity_key_serialization_version=3,
    )


ALL_VIEWS: tuple[FeatureGroup, ...] = FEATURE_GROUPS + BATCH_TABLES + MODEL_FEATURE_GROUPS


def open_store(settings: Settings, groups: tuple[FeatureGroup, ...] = ALL_VIEWS) -> FeatureStore:
    """The feature store, with adreach's entities, push sources and views applied (idempotent).

    By default every view is registered: the stream engines' groups, the batch jobs'
    tables (query features) and the views model jobs write (LoopFM embeddings), so any
    reader sees all of them.
    """
    repo = settings.feature_repo_dir
    repo.mkdir(parents=True, exist_ok=True)
    ensure_offline_files(repo / "data", groups)
    store = FeatureStore(config=repo_config(settings))
    store.apply(feast_objects(repo / "data", groups))
    return store
