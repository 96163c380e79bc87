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

User deletions: the job also emits every user deletion (``_deletions``). Flink's
windows cannot forget a user's events, so the writer does: it deletes the user's online
row, records the deletion for the offline store and compacts it (the user's history
leaves it, :mod:`features.offline`), and from then on drops the job's rows of that user
whose windows still reach back to the deletion (a row at tile end t covers events after
t minus the longest window). The user's features therefore reappear only once a whole
longest window of new activity lies after the deletion, where the embedded engine
counts the new activity at once; neither ever stores a feature computed from an event
at or before the deletion. Deletions are applied before the feature rows read with them.
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
from features.offline import compact_offline, record_deletions, recorded_deletions
from features.online import OnlineFeatureWriter
from infra.settings import Settings
from streams.engine.forget import ForgottenUsers
from streams.engine.router import forgets_users
from streams.flink.errors import FlinkOutputError
from streams.flink.sql import DELETIONS_OUTPUT, EVENT_TIME_MS, TIMESTAMP_MS

_MANIFEST = ".applied"


def deletions_from_json(payload: bytes) -> list[tuple[str, int]]:
    """The job's deletion rows (JSON Lines of user_id, event time in ms) as (user, time) pairs."""
    if not payload.strip():
        return []
    table = pa_json.read_json(
        io.BytesIO(payload),
        read_options=pa_json.ReadOptions(block_size=max(1 << 20, len(payload) + 1)),
        parse_options=pa_json.ParseOptions(
            explicit_schema=pa.schema([("user_id", pa.string()), (EVENT_TIME_MS, pa.int64())]),
            unexpected_field_behavior="ignore",
        ),
    )
    return list(
        zip(table.column("user_id").to_pylist(), table.column(EVENT_TIME_MS).to_pylist(), strict=True)
    )


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
        self.users_deleted = 0
        # Deleted users per group keyed by user, as recorded in the offline store (a restart reads them).
        self._forgotten: dict[str, ForgottenUsers] = {}
        for group in groups:
            if forgets_users(group):
                recorded = recorded_deletions(self._data_dir, group)
                forgotten = ForgottenUsers()
                forgotten.add(list(recorded), list(recorded.values()))
                self._forgotten[group.name] = forgotten

    def delete(self, users: Sequence[tuple[str, int]]) -> None:
        """Delete these users' stored features (online row, offline history); then drop their old rows."""
        if not users:
            return
        keys, times = [key for key, _ in users], [time_ms for _, time_ms in users]
        for name, forgotten in self._forgotten.items():
            group = self.groups[name]
            self._online.delete(group, keys)
            record_deletions(self._data_dir, group, keys, times)
            compact_offline(self._data_dir, group)
            forgotten.add(keys, times)
        self.users_deleted += len(set(keys))

    def write(self, group: FeatureGroup, rows: pa.Table) -> int:
        forgotten = self._forgotten.get(group.name)
        if forgotten is not None and len(forgotten) and rows.num_rows:
            # A row at tile end t counts events after t - longest window: those reaching back
            # to a deletion of its user are dropped.
            reach_ms = rows.column(TIMESTAMP_FIELD).cast(pa.int64()).to_numpy() // 1000
            reach_ms = reach_ms - group.longest_window.seconds * 1000
            blocked = forgotten.blocked(rows.column(group.key), reach_ms)
            if blocked.any():
                rows = rows.filter(pa.array(~blocked))
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
        self._applied: dict[str, set[str]] = {}  # per output folder, read from its manifest when first listed

    @property
    def rows_written(self) -> int:
        return self._sink.rows_written

    @property
    def users_deleted(self) -> int:
        return self._sink.users_deleted

    def pending(self, group: FeatureGroup) -> list[Path]:
        return self._pending(group.name)

    def _pending(self, output: str) -> list[Path]:
        directory = self.output_dir / output
        if not directory.is_dir():
            return []
        if output not in self._applied:
            self._applied[output] = self._manifest(output)
        applied = self._applied[output]
        return sorted(
            p
            for p in directory.rglob("*")
            if p.is_file() and not p.name.startswith(".") and p.name not in applied
        )

    def _manifest(self, output: str) -> set[str]:
        manifest = self.output_dir / output / _MANIFEST
        return set(manifest.read_text().split()) if manifest.exists() else set()

    def apply_new(self) -> int:
        """Apply new user deletions, then store every committed file not yet applied; returns the
        feature rows stored."""
        deletions = self._pending(DELETIONS_OUTPUT)
        if deletions:
            try:
                users = deletions_from_json(b"".join(_with_newline(path.read_bytes()) for path in deletions))
            except (OSError, pa.ArrowInvalid) as exc:
                raise FlinkOutputError(f"cannot read Flink output {deletions[0].parent}: {exc}") from exc
            self._sink.delete(users)
            self._record(DELETIONS_OUTPUT, deletions)
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
            self._record(group.name, files)
        return written

    def _record(self, output: str, files: list[Path]) -> None:
        manifest = self.output_dir / output / _MANIFEST
        with manifest.open("a") as handle:
            handle.write("".join(f"{path.name}\n" for path in files))
            handle.flush()
            os.fsync(handle.fileno())
        self._applied[output].update(path.name for path in files)

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
        self._deletions_topic = f"{settings.flink.features_topic_prefix}deletions"
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
        topics = list(self.groups)
        if any(forgets_users(group) for group in groups):
            topics.append(self._deletions_topic)
        self._consumer.subscribe(topics)

    @property
    def rows_written(self) -> int:
        return self._sink.rows_written

    @property
    def users_deleted(self) -> int:
        return self._sink.users_deleted

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
        deletions = by_topic.pop(self._deletions_topic, [])
        if deletions:  # before the rows read with them
            self._sink.delete(deletions_from_json(b"\n".join(v.replace(b"\n", b" ") for v in deletions if v)))
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
