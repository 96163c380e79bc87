"""Where search queries come from: a file of events, or the Kafka events topic.

Both yield Arrow tables of ``(query, event_time)`` for the ``search`` events only; other
event types are skipped as cheaply as possible (a Parquet filter pushed into the scan; a
byte test before any JSON decoding of a Kafka message or a JSON line).
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc

from features.definitions import FEATURE_GROUPS
from infra.arrow_times import EventTimeError, epoch_ms, malformed_times
from infra.compressed import (
    damage_hint,
    is_gzip,
    json_lines_command,
    lines_until_damaged,
    open_binary,
    starts_like_json_array,
)
from infra.parquet import open_parquet
from infra.progress import count_lines
from infra.settings import Settings
from streams.engine.decode import EventDecoder, outside_event_time_range

SEARCH_MARK = b'"search"'
QUERY_SCHEMA = pa.schema([pa.field("query", pa.string()), pa.field("event_time", pa.timestamp("us", "UTC"))])


class QuerySourceError(ValueError):
    """The input file cannot be read as adreach events."""


def _search_decoder() -> EventDecoder:
    """The stream engine's decoder for the fields a search carries: the same rules (an RFC 3339
    time with a zone inside 2000..2100, a non-blank query), so query_features never holds a
    key or a time that query_popularity refuses."""
    return EventDecoder([group for group in FEATURE_GROUPS if group.key == "query"])


_DECODER = _search_decoder()


def decode_search_values(values: list[bytes]) -> tuple[pa.Table, int]:
    """Search events among JSON event values, and how many of the searches were not valid events."""
    candidates = [value for value in values if value and SEARCH_MARK in value]
    if not candidates:
        return QUERY_SCHEMA.empty_table(), 0
    batch = _DECODER.decode(candidates)
    events = batch.events.filter(pc.equal(batch.events.column("type"), "search"))
    times = events.column("event_time_ms").cast(pa.timestamp("ms", "UTC")).cast(pa.timestamp("us", "UTC"))
    return pa.table({"query": events.column("query"), "event_time": times}, schema=QUERY_SCHEMA), len(
        batch.rejected
    )


def file_format(path: Path) -> Literal["parquet", "jsonl"]:
    if path.is_dir() or path.suffix == ".parquet":
        return "parquet"
    text_suffix = path.with_suffix("").suffix if path.suffix == ".gz" else path.suffix
    if text_suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    raise QuerySourceError(
        f"{path}: expected events.parquet, a directory of Parquet files, or events.jsonl (or .jsonl.gz)"
    )


def count_file_events(path: Path) -> int | None:
    """Rows (Parquet) or lines (JSON Lines) in the input, for the progress bar; cheap metadata reads."""
    if not path.exists():
        raise QuerySourceError(f"no such file or directory: {path}")
    if file_format(path) == "parquet":
        try:
            return int(open_parquet(path).count_rows())
        except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
            raise QuerySourceError(f"{path}: not readable as Parquet events ({exc})") from exc
    lines = count_lines(path)
    if lines is None:
        with _open_jsonl(path) as handle:  # (only to tell gzip from plain for the message)
            raise QuerySourceError(f"{path}: cannot be read to its end ({damage_hint(handle)})")
    return lines


def _open_jsonl(path: Path) -> io.BufferedIOBase:
    """``path`` opened for reading lines, decompressed if it is gzip; unreadable: QuerySourceError."""
    try:
        return open_binary(path)
    except OSError as exc:
        raise QuerySourceError(f"{path}: cannot be read ({exc.strerror or exc})") from exc


def read_file(path: Path, chunk_rows: int = 200_000) -> Iterator[tuple[pa.Table, int, int]]:
    """``(search queries, events read, invalid searches)`` chunks of an events file (Parquet or JSON Lines).

    Invalid searches (malformed JSON, a time without a zone or outside 2000..2100, a blank
    query) are left out and counted, by the stream engine's rules.
    """
    if not path.exists():
        raise QuerySourceError(f"no such file or directory: {path}")
    if file_format(path) == "parquet":
        yield from _read_parquet(path, chunk_rows)
    else:
        yield from _read_jsonl(path, chunk_rows)


def _read_parquet(path: Path, chunk_rows: int) -> Iterator[tuple[pa.Table, int, int]]:
    try:
        dataset = open_parquet(path)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
        raise QuerySourceError(f"{path}: not readable as Parquet ({exc})") from exc
    missing = {"type", "query", "event_time"} - set(dataset.schema.names)
    if missing:
        raise QuerySourceError(f"{path}: the events have no {sorted(missing)} columns")
    for batch in dataset.to_batches(columns=["type", "query", "event_time"], batch_size=chunk_rows):
        searches = pc.fill_null(pc.equal(batch.column("type"), "search"), False)
        table = pa.Table.from_batches([batch]).filter(searches)
        times = table.column("event_time")
        if pa.types.is_string(times.type) or pa.types.is_large_string(times.type):
            # a text time without a zone (or not RFC 3339 at all) is taken as missing, which makes
            # that event invalid below, as in a JSON Lines file, instead of failing the whole file
            times = pc.if_else(pa.array(malformed_times(times)), pa.scalar(None, times.type), times)
        try:
            millis = epoch_ms(times)
        except EventTimeError as exc:
            raise QuerySourceError(f"{path}: event_time: {exc}") from exc
        query = table.column("query").cast(pa.string())
        blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(query)), 0)
        outside = outside_event_time_range(millis)
        valid = pc.invert(pc.fill_null(pc.or_(blank, outside), True))
        times = millis.cast(pa.timestamp("ms", "UTC")).cast(pa.timestamp("us", "UTC"))
        kept = pa.table({"query": query, "event_time": times}, schema=QUERY_SCHEMA).filter(valid)
        yield kept, batch.num_rows, table.num_rows - kept.num_rows


def _read_jsonl(path: Path, chunk_rows: int) -> Iterator[tuple[pa.Table, int, int]]:
    damage: list[str] = []
    with _open_jsonl(path) as handle:  # plain or gzip
        if starts_like_json_array(handle):  # (one event per line is what is read, as for produce)
            raise QuerySourceError(
                f"{path} holds one JSON array, not JSON Lines; convert it with "
                f"{json_lines_command(str(path), is_gzip(path))} > events.jsonl"
            )
        hint = damage_hint(handle)
        lines: list[bytes] = []
        for line in lines_until_damaged(handle, damage):
            if line.strip():  # blank lines are not events
                lines.append(line.rstrip(b"\r\n"))
            if len(lines) >= chunk_rows:
                yield _with_count(lines)
                lines = []
        if lines:
            yield _with_count(lines)
    if damage:
        raise QuerySourceError(f"{path}: reading stopped: {damage[0]} ({hint})")


def _with_count(lines: list[bytes]) -> tuple[pa.Table, int, int]:
    searches, invalid = decode_search_values(lines)
    return searches, len(lines), invalid


class KafkaQuerySource:
    """Search events from ``kafka.topics.events`` in a consumer group; offsets committed by the caller.

    Delivery is at least once: after a crash the uncommitted messages are read again, which
    costs nothing but a cache lookup.
    """

    def __init__(self, settings: Settings, *, group: str | None = None, from_beginning: bool = True) -> None:
        from confluent_kafka import Consumer

        self.topic = settings.kafka.topics.events
        self.group = group or f"adreach-queries-{uuid.uuid4().hex[:8]}"
        self._consumer = Consumer(
            {
                **settings.kafka_client_config(),
                "group.id": self.group,
                "auto.offset.reset": "earliest" if from_beginning else "latest",
                "enable.auto.commit": False,
                "session.timeout.ms": 6000,
            }
        )
        self._consumer.subscribe([self.topic])
        self.undecodable = 0  # search events the engine's rules refuse (left out, counted)
        self.errors: list[str] = []

    def poll(self, max_messages: int = 200_000, timeout_s: float = 1.0) -> tuple[pa.Table, int]:
        """``(search queries, messages read)``: up to ``max_messages`` within about ``timeout_s``.

        Large reads matter: each call's new queries are generated as one batch, and the
        encoder is several times faster on a batch of hundreds than on a handful.
        """
        import time

        from confluent_kafka import KafkaError

        values: list[bytes] = []
        deadline = time.monotonic() + timeout_s
        while len(values) < max_messages:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            messages = self._consumer.consume(min(20_000, max_messages - len(values)), left)
            if not messages:
                break
            for message in messages:
                error = message.error()
                if error is not None:
                    if error.code() != KafkaError._PARTITION_EOF:
                        self.errors.append(str(error))
                    continue
                value = message.value()
                if value:
                    values.append(value)
        table, bad = decode_search_values(values)
        self.undecodable += bad
        return table, len(values)

    def commit(self) -> None:
        from confluent_kafka import KafkaException

        try:
            self._consumer.commit(asynchronous=False)
        except KafkaException as exc:  # nothing consumed yet: nothing to commit
            if "_NO_OFFSET" not in str(exc):
                raise

    def assigned(self) -> bool:
        """Whether the group has given this consumer its partitions yet (idle means nothing before)."""
        return bool(self._consumer.assignment())

    def lag(self) -> int | None:
        """Messages not yet read in the assigned partitions (None before the group assigned any)."""
        assignment = self._consumer.assignment()
        if not assignment:
            return None
        total = 0
        for partition in assignment:
            low, high = self._consumer.get_watermark_offsets(partition, timeout=2.0, cached=False)
            position = self._consumer.position([partition])[0].offset
            total += max(high - (position if position >= 0 else low), 0)
        return total

    def close(self) -> None:
        self._consumer.close()
