"""Bulk ingestion: JSON Lines files and simulator batches into Kafka through the SDK.

Malformed lines are never fatal and never silent: each one is reported with its line
number and reason and dead-lettered with its original bytes, while every good line is
still delivered.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from infra.compressed import UTF8_BOM
from streams.events import InvalidEventError, validate_json
from streams.producer import EventProducer

_MAX_KEPT_REJECTIONS = 1_000


@dataclass(frozen=True)
class Rejection:
    """One rejected input line."""

    line: int
    error_class: str
    reason: str

    def describe(self, source: str) -> str:
        return f"{source}:{self.line}: {self.error_class}: {self.reason}"


@dataclass
class IngestReport:
    source: str
    lines: int = 0
    sent: int = 0
    rejected: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    rejections: list[Rejection] = field(default_factory=list)

    @property
    def events_per_second(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


ProgressCallback = Callable[[int, int], None]
"""Called with (bytes consumed, lines consumed) since the previous call."""


def produce_lines(
    producer: EventProducer,
    lines: Iterable[bytes],
    source: str,
    progress: ProgressCallback | None = None,
    progress_every: int = 10_000,
) -> IngestReport:
    """Validate and produce every JSON line; dead-letter the bad ones with their line number.

    Blank lines are skipped (they are not events) but still count for line numbering. A
    UTF-8 byte order mark opening the input is dropped (it belongs to the file, not the event).
    The producer is not closed here, so the caller decides when to flush. Ctrl-C stops
    reading cleanly (``report.interrupted``): what was queued can still be flushed.
    """
    report = IngestReport(source=source)
    started = time.perf_counter()
    pending_bytes = pending_lines = 0
    number = 0
    try:
        for number, raw in enumerate(lines, start=1):
            pending_bytes += len(raw)
            pending_lines += 1
            if progress is not None and pending_lines >= progress_every:
                progress(pending_bytes, pending_lines)
                pending_bytes = pending_lines = 0
            line = raw.rstrip(b"\r\n")
            if number == 1 and line.startswith(UTF8_BOM):  # editors on Windows write one
                line = line[len(UTF8_BOM) :]
            if not line or line.isspace():
                continue
            try:
                event = validate_json(line)
            except InvalidEventError as exc:
                report.rejected += 1
                rejection = Rejection(number, type(exc).__name__, exc.reason)
                if len(report.rejections) < _MAX_KEPT_REJECTIONS:
                    report.rejections.append(rejection)
                producer.dead_letter(
                    line, exc.reason, error_class=rejection.error_class, source=f"{source}:{number}"
                )
                continue
            producer.send_validated(event, line)
            report.sent += 1
        if progress is not None and pending_lines:
            progress(pending_bytes, pending_lines)
    except KeyboardInterrupt:
        report.interrupted = True
    finally:
        report.lines = number
        report.seconds = time.perf_counter() - started
    return report


class _JsonBatch(Protocol):
    def __len__(self) -> int: ...

    def to_json_lines(self) -> list[bytes]: ...


class KafkaEventSink:
    """A simulator sink that sends each batch through the validating producer.

    Simulated events take the same path as anyone else's, so the simulator cannot
    write anything a real producer could not.
    """

    def __init__(self, producer: EventProducer) -> None:
        self.producer = producer
        self.invalid = 0

    def write(self, batch: _JsonBatch) -> None:
        send_json = self.producer.send_json
        for line in batch.to_json_lines():
            if send_json(line, source="simulator") is None:
                self.invalid += 1

    def close(self) -> None:
        self.producer.close()
