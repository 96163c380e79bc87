"""Carry the Flink job's feature rows into Feast (``adreach stream flink-writer``).

The job emits, per feature group, one JSON row per (entity, tile with events): the
entity's features as of the end of that tile. This module stores them exactly where
the embedded engine stores its rows: every row in the offline store (a Parquet part
file per batch, :func:`features.feast_objects.append_offline`) and the latest row per
entity in the online store (:class:`features.online.OnlineFeatureWriter`, Feast's own
SQLite/Redis format). Rows of one entity arrive in tile order (one Flink subtask, one
Kafka partition or one sequence of part files per entity), and within a batch they are
sorted by tile, so the online store ends with the features as of the entity's latest tile.

Delivery: the job's sinks are exactly-once (files appear, renamed from hidden names,
only when a checkpoint completes; Kafka rows are in transactions read with
``read_committed``). The writer stores a batch, then records it as applied (a manifest
of part files, or committed consumer offsets). A crash in between replays the batch:
online upserts of the same values are harmless and the offline store gets identical
duplicate rows, which point-in-time joins resolve to the same values. So the online
store is effectively exactly-once, the offline store at-least-once with identical
duplicates.
"""

from __future__ import annotations

import io
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from features.definitions import FEATURE_GROUPS, FeatureGroup
from features.feast_objects import TIMESTAMP_FIELD, append_offline, arrow_schema
from features.online import OnlineFeatureWriter
from infra.settings import Settings
from streams.flink.errors import FlinkOutputError
from streams.flink.sql import TIMESTAMP_MS

_MANIFEST = ".applied"


def json_schema(group: FeatureGroup) -> pa.Schema:
    """The job's JSON rows for ``group`` as Arrow types (the tile end as epoch ms)."""
    schema = arrow_schema(group)
    fields = [f if f.name != TIMESTAMP_FIELD else pa.field(TIMESTAMP_MS, pa.int64()) for f in schema]
    return pa.schema(fields)


def _non_finite_as_numbers(group: FeatureGroup, payload: bytes) -> bytes:
    """Flink's JSON format writes a double that is not finite (a sum of huge amounts that
    overflowed) as the string ``"Infinity"``, ``"-Infinity"`` or ``"NaN"``, which Arrow's
    JSON reader refuses for a float column; its parser takes them bare.

    Only the values of the group's double features are rewritten: the pattern includes the
    key, and inside a JSON string (an id, a query) its quotes would be escaped.
    """
    if b'Infinity"' not in payload and b'NaN"' not in payload:
        return payload
    doubles = [f.name for f in json_schema(group) if pa.types.is_floating(f.type)]
    if not doubles:
        return payload
    keys = b"|".join(re.escape(name.encode()) for name in doubles)
    return re.sub(b'("(?:' + keys + b')":)"(-?Infinity|NaN)"', rb"\1\2", payload)


def rows_from_json(group: FeatureGroup, payload: bytes) -> pa.Table:
    """Parse JSON Lines rows of the job into Feast's columns, sorted by entity then tile."""
    schema = arrow_schema(group)
    if not payload.strip():
        return schema.empty_table()
    payload = _non_finite_as_numbers(group, payload)
    table = pa_json.read_json(
        io.BytesIO(payload),
        read_options=pa_json.ReadOptions(block_size=max(1 << 20, len(payload) + 1)),
        parse_options=pa_json.ParseOptions(
            explicit_schema=json_schema(group), unexpected_field_behavior="error"
        ),
    )
    micros = pc.multiply(table.column(TIMESTAMP_MS), 1000).cast(pa.timestamp("us", "UTC"))
    table = table.append_column(TIMESTAMP_FIELD, micros)
    columns = []
    for field in schema:
        column = table.column(field.name)
        if pa.types.is_list(field.type) and column.null_count:
            column = pc.if_else(pc.is_null(column), pa.scalar([], field.type), column)
        columns.append(column)
    table = pa.Table.from_arrays(columns, schema=schema)
    return table.sort_by([(group.key, "ascending"), (TIMESTAMP_FIELD, "ascending")])


class FeastRowSink:
    """Stores parsed rows online (latest per entity) and offline (all)."""

    def __init__(self, settings: Settings, groups: Sequence[FeatureGroup] = FEATURE_GROUPS) -> None:
        from features.store import open_store

        open_store(settings, tuple(groups))  # registers views, creates online tables and offline dirs
        self.groups = {g.name: g for g in groups}
        self._data_dir = settings.feature_repo_dir / "data"
        self._online = OnlineFeatureWriter(settings, tuple(groups))
        self.rows_written = 0

    def write(self, group: FeatureGroup, rows: pa.Table) -> int:
        if rows.num_rows == 0:
            return 0
        self._online.write(group, rows)
        append_offline(self._data_dir, group, rows)
        count = int(rows.num_rows)
        self.rows_written += count
        return count

    def close(self) -> None:
        self._online.close()


class FileOutputWriter:
    """Applies the job's committed JSON part files under ``output_dir/<group>/`` to Feast.

    Flink writes in-progress files under hidden names (``.part-...``) and renames them
    when a checkpoint completes, so every visible file is complete. Applied files are
    listed in ``output_dir/<group>/.applied``.
    """

    def __init__(
        self,
        settings: Settings,
        output_dir: Path | None = None,
        groups: Sequence[FeatureGroup] = FEATURE_GROUPS,
    ) -> None:
        self.output_dir = output_dir or settings.flink_output_dir
        self.groups = tuple(groups)
        self._sink = FeastRowSink(settings, self.groups)
        self._applied: dict[str, set[str]] = {}
        for group in self.groups:
            manifest = self.output_dir / group.name / _MANIFEST
            names = manifest.read_text().split() if manifest.exists() else []
            self._applied[group.name] = set(names)

    @property
    def rows_written(self) -> int:
        return self._sink.rows_written

    def pending(self, group: FeatureGroup) -> list[Path]:
        directory = self.output_dir / group.name
        if not directory.is_dir():
            return []
        applied = self._applied[group.name]
        return sorted(
            p
            for p in directory.rglob("*")
            if p.is_file() and not p.name.startswith(".") and p.name not in applied
        )

    def apply_new(self) -> int:
        """Store every committed file not yet applied; returns the feature rows stored."""
        written = 0
        for group in self.groups:
            files = self.pending(group)
            if not files:
                continue
            try:
                payload = b"".join(_with_newline(path.read_bytes()) for path in files)
                rows = rows_from_json(group, payload)
            except (OSError, pa.ArrowInvalid) as exc:
                raise FlinkOutputError(
                    f"{group.name}: cannot read Flink output {files[0].parent}: {exc}"
                ) from exc
            written += self._sink.write(group, rows)
            self._record(group, files)
        return written

    def _record(self, group: FeatureGroup, files: list[Path]) -> None:
        manifest = self.output_dir / group.name / _MANIFEST
        with manifest.open("a") as handle:
            handle.write("".join(f"{path.name}\n" for path in files))
            handle.flush()
            os.fsync(handle.fileno())
        self._applied[group.name].update(path.name for path in files)

    def follow(self, stop: Callable[[], bool], poll_s: float = 1.0) -> int:
        """Apply new files every ``poll_s`` until ``stop()``, then once more; returns rows stored."""
        written = 0
        while not stop():
            written += self.apply_new()
            time.sleep(poll_s)
        return written + self.apply_new()

    def close(self) -> None:
        self._sink.close()


def _with_newline(data: bytes) -> bytes:
    return data if not data or data.endswith(b"\n") else data + b"\n"


class KafkaOutputWriter:
    """Consumes the job's per-group feature topics (``read_committed``) and stores them in Feast.

    Offsets are committed after the rows are stored, so a crash replays, never skips.
    """

    def __init__(self, settings: Settings, groups: Sequence[FeatureGroup] = FEATURE_GROUPS) -> None:
        from confluent_kafka import Consumer

        self.groups = {f"{settings.flink.features_topic_prefix}{g.name}": g for g in groups}
        self._sink = FeastRowSink(settings, tuple(groups))
        self._consumer = Consumer(
            {
                **settings.kafka_client_config(),
                "group.id": f"{settings.flink.consumer_group}-feast-writer",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
            }
        )
        self._consumer.subscribe(list(self.groups))

    @property
    def rows_written(self) -> int:
        return self._sink.rows_written

    def poll(self, timeout_s: float = 1.0, max_messages: int = 50_000) -> int:
        """Store one batch of rows; returns how many were stored."""
        messages = self._consumer.consume(max_messages, timeout_s)
        by_topic: dict[str, list[bytes]] = {}
        for message in messages:
            if message.error() is not None:
                if message.error().code() == -191:  # _PARTITION_EOF
                    continue
                raise FlinkOutputError(f"Kafka consumer error: {message.error()}")
            by_topic.setdefault(message.topic() or "", []).append(message.value() or b"")
        written = 0
        for topic, values in by_topic.items():
            group = self.groups[topic]
            rows = rows_from_json(group, b"\n".join(v.replace(b"\n", b" ") for v in values if v))
            written += self._sink.write(group, rows)
        if messages:
            self._consumer.commit(asynchronous=False)
        return written

    def close(self) -> None:
        try:
            self._consumer.close()
        finally:
            self._sink.close()
