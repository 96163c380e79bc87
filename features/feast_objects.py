"""Feast objects generated from :mod:`features.definitions`.

Each :class:`~features.definitions.FeatureGroup` becomes a Feast entity, a push source
(backed by a Parquet file, so pushes land in the offline store too) and a feature view
whose TTL is the group's longest window. Nothing here is written by hand per feature:
adding an aggregation to a definition adds its columns everywhere.
"""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from feast import Entity, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Array, Float32, Float64, Int64, String

from features.definitions import FEATURE_GROUPS, FeatureGroup, FeatureTable, FeatureType

TIMESTAMP_FIELD = "event_timestamp"
CREATED_FIELD = "created_timestamp"

_FEAST_TYPES: dict[FeatureType, Any] = {
    "int64": Int64,
    "float64": Float64,
    "string_list": Array(String),
    "string": String,
    "float_list": Array(Float32),
}
_ARROW_TYPES: dict[FeatureType, pa.DataType] = {
    "int64": pa.int64(),
    "float64": pa.float64(),
    "string_list": pa.list_(pa.string()),
    "string": pa.string(),
    "float_list": pa.list_(pa.float32()),
}


def push_source_name(group: FeatureGroup) -> str:
    return f"{group.name}_push"


def arrow_schema(group: FeatureGroup) -> pa.Schema:
    """Columns of a row pushed for ``group``: key, event timestamp, features."""
    fields = [pa.field(group.key, pa.string()), pa.field(TIMESTAMP_FIELD, pa.timestamp("us", "UTC"))]
    fields += [pa.field(f.name, _ARROW_TYPES[f.type]) for f in group.features()]
    return pa.schema(fields)


def offline_schema(group: FeatureGroup) -> pa.Schema:
    """Offline rows also carry when they were written: it orders two rows of one entity and tile."""
    return arrow_schema(group).append(pa.field(CREATED_FIELD, pa.timestamp("us", "UTC")))


def offline_path(data_dir: Path, group: FeatureGroup) -> Path:
    """The group's offline store: a directory of Parquet part files."""
    return data_dir / group.name


def append_offline(data_dir: Path, group: FeatureGroup, rows: pa.Table, *, writer: str = "") -> Path:
    """Add feature rows to the offline store as a new part file (atomic: written, then renamed).

    adreach writes offline rows itself instead of through ``FeatureStore.push``: Feast's
    file store rewrites one file per push (slow, and with Arrow's compliant list naming,
    which its own type map then fails to read). Part files are written with the legacy
    ``item`` list naming that Feast reads.
    """
    directory = offline_path(data_dir, group)
    directory.mkdir(parents=True, exist_ok=True)
    tag = f"-{writer}" if writer else ""  # lets a writer find (and compact) its own parts
    name = f"part-{time.time_ns():020d}{tag}-{uuid.uuid4().hex[:8]}.parquet"
    staging = directory / f".{name}"
    schema = offline_schema(group)
    if CREATED_FIELD not in rows.column_names:
        now = pa.array([time.time_ns() // 1000] * rows.num_rows, pa.int64()).cast(
            schema.field(CREATED_FIELD).type
        )
        rows = rows.append_column(CREATED_FIELD, now)
    pq.write_table(
        rows.select(schema.names).cast(schema),
        staging,
        use_compliant_nested_type=False,
    )
    staging.rename(directory / name)
    return directory / name


def ensure_offline_files(data_dir: Path, groups: tuple[FeatureGroup, ...] = FEATURE_GROUPS) -> None:
    """Give each group's offline directory an empty part file, so Feast can read its schema."""
    for group in groups:
        directory = offline_path(data_dir, group)
        if not any(directory.glob("part-*.parquet")):
            append_offline(data_dir, group, offline_schema(group).empty_table())


def _computed_by(group: FeatureGroup) -> str:
    return "adreach batch jobs" if isinstance(group, FeatureTable) else group.computed_by


def feast_objects(data_dir: Path, groups: tuple[FeatureGroup, ...] = FEATURE_GROUPS) -> list[Any]:
    """Entities, push sources and feature views for ``groups``, ready for ``FeatureStore.apply``."""
    objects: list[Any] = []
    entities: dict[str, Entity] = {}
    for group in groups:
        known = entities.get(group.entity)  # groups may share an entity (query): register it once
        entity = known or Entity(
            name=group.entity,
            join_keys=[group.key],
            value_type=ValueType.STRING,
            description=f"keyed by the events' {group.key}",
        )
        batch = FileSource(
            name=f"{group.name}_offline",
            path=str(offline_path(data_dir, group)),
            timestamp_field=TIMESTAMP_FIELD,
            created_timestamp_column=CREATED_FIELD,
        )
        push = PushSource(name=push_source_name(group), batch_source=batch)
        view = FeatureView(
            name=group.name,
            entities=[entity],
            ttl=timedelta(seconds=group.longest_window.seconds),
            schema=[
                Field(name=f.name, dtype=_FEAST_TYPES[f.type], description=f.description)
                for f in group.features()
            ],
            source=push,
            online=True,
            description=group.description,
            tags={"owner": "adreach", "computed_by": _computed_by(group)},
        )
        objects += [push, view] if known else [entity, push, view]
        entities[group.entity] = entity
    return objects
