"""The typed producer SDK: validated ad events into Kafka, nothing silently lost.

Usage::

    from infra.settings import load_settings
    from streams import EventProducer, Click

    with EventProducer(load_settings()) as producer:
        producer.send(Click(event_id=..., event_time=..., user_id="u1", impression_id=..., ...))
        producer.send({"type": "search", ...})          # dicts are validated too
        producer.send_json(b'{"type": "impression", ...}')  # raw JSON, validated in C
    # leaving the block flushes; undelivered events raise DeliveryError

Guarantees:

* **Validated**: every event is checked against the v1 schemas before it is queued.
  An invalid event raises a specific :class:`~streams.events.InvalidEventError`, or,
  with ``on_invalid="dead_letter"``, goes to the dead-letter topic with its original
  bytes and the reason in record headers (``adreach.error.*``).
* **Idempotent and ordered per user**: the producer runs with
  ``enable.idempotence`` (acks=all, no duplicates from retries) and keys every record
  by ``user_id`` with the Java-compatible ``murmur2_random`` partitioner, so all of a
  user's events land in one partition, in order, whichever client language wrote them.
* **Accounted for**: delivery reports are counted; :meth:`close` raises
  :class:`DeliveryError` when anything was not delivered.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from infra.settings import Settings
from streams.events import (
    Event,
    InvalidEventError,
    encode,
    validate_json,
    validate_to_json,
)

# Record headers on dead-lettered events. Values are UTF-8 strings.
HEADER_REASON = "adreach.error.reason"
HEADER_ERROR_CLASS = "adreach.error.class"
HEADER_SOURCE = "adreach.error.source"
HEADER_ORIGINAL_TOPIC = "adreach.error.topic"
HEADER_FAILED_AT = "adreach.error.timestamp_ms"

_POLL_EVERY = 1_000  # serve delivery callbacks every N sends to keep memory flat
_MAX_KEPT_FAILURES = 1_000

OnInvalid = Literal["raise", "dead_letter"]


class ProducerError(RuntimeError):
    """Base class for producer failures other than invalid events."""


@dataclass(frozen=True)
class DeliveryFailure:
    topic: str
    key: bytes | None
    error: str


class DeliveryError(ProducerError):
    """Some events were not acknowledged by the brokers."""

    def __init__(self, message: str, failures: list[DeliveryFailure]) -> None:
        super().__init__(message)
        self.failures = failures


@dataclass
class ProducerStats:
    """Running counts.

    ``sent`` events were queued for the event topic and ``dead_lettered`` payloads for
    the dead-letter topic; ``delivered`` and ``dead_letters_delivered`` are the ones
    Kafka acknowledged; ``failed`` counts records of either kind that Kafka did not take.
    Acknowledgements are exact after :meth:`EventProducer.flush` or ``close``; before
    that they may lag (successes are only reported per record when ``on_delivery`` is given).
    """

    sent: int = 0
    delivered: int = 0
    dead_lettered: int = 0
    dead_letters_delivered: int = 0
    failed: int = 0
    invalid: int = 0
    failures: list[DeliveryFailure] = field(default_factory=list)

    @property
    def pending(self) -> int:
        acknowledged = self.delivered + self.dead_letters_delivered + self.failed
        return self.sent + self.dead_lettered - acknowledged


DeliveryCallback = Callable[[KafkaError | None, Message], None]


class EventProducer:
    """Validate, key, batch and deliver ad events. Use as a context manager or call :meth:`close`."""

    def __init__(
        self,
        settings: Settings,
        *,
        on_invalid: OnInvalid | None = None,
        topic: str | None = None,
        dead_letter_topic: str | None = None,
        on_delivery: DeliveryCallback | None = None,
        client_config: Mapping[str, object] | None = None,
    ) -> None:
        self.settings = settings
        self.topic = topic or settings.kafka.topics.events
        self.dead_letter_topic = dead_letter_topic or settings.kafka.topics.dead_letter
        self.on_invalid: OnInvalid = on_invalid or settings.producer.on_invalid
        self.stats = ProducerStats()
        self._user_on_delivery = on_delivery
        # Without a caller callback only failures need a Python call per record: successes
        # are settled in bulk at flush time (saves ~1 us per event on the hot path).
        self._reports_every_record = on_delivery is not None
        self._failed_dead_letters = 0
        self._since_poll = 0
        self._closed = False
        config = producer_config(settings)
        config["on_delivery"] = self._on_delivery
        config["delivery.report.only.error"] = not self._reports_every_record
        config.update(client_config or {})
        self._producer = Producer(config)

    # -- sending ---------------------------------------------------------------------------

    def send(self, event: Event | Mapping[str, object]) -> Event | None:
        """Validate and queue one event (a typed struct or a dict).

        Returns the validated event, or ``None`` when it was invalid and dead-lettered.
        """
        try:
            validated, payload = validate_to_json(dict(event) if isinstance(event, Mapping) else event)
        except InvalidEventError as exc:
            self._reject(_best_effort_bytes(event), exc, source=None)
            return None
        self.send_validated(validated, payload)
        return validated

    def send_json(self, payload: bytes, *, source: str | None = None) -> Event | None:
        """Validate and queue one JSON-encoded event.

        A valid payload is forwarded byte for byte (re-encoding it would cost ~10% of
        throughput and change nothing a schema-conforming consumer can see).
        ``source`` (e.g. ``"events.jsonl:17"``) is recorded on a dead-lettered event so
        that its origin can be traced. Returns ``None`` when the event was dead-lettered.
        """
        try:
            event = validate_json(payload)
        except InvalidEventError as exc:
            self._reject(payload, exc, source=source)
            return None
        self.send_validated(event, payload)
        return event

    def dead_letter(
        self, payload: bytes | None, reason: str, *, error_class: str, source: str | None = None
    ) -> None:
        """Route a payload rejected elsewhere (e.g. unreadable input) to the dead-letter topic.

        ``payload`` is kept as it was: ``None`` (a Kafka tombstone) stays a null value.
        """
        headers = {
            HEADER_REASON: reason.encode(),
            HEADER_ERROR_CLASS: error_class.encode(),
            HEADER_ORIGINAL_TOPIC: self.topic.encode(),
            HEADER_FAILED_AT: str(int(time.time() * 1000)).encode(),
        }
        if source is not None:
            headers[HEADER_SOURCE] = source.encode()
        self._produce(self.dead_letter_topic, payload, None, 0, headers)
        self.stats.dead_lettered += 1

    def _reject(self, payload: bytes, exc: InvalidEventError, source: str | None) -> None:
        self.stats.invalid += 1
        if self.on_invalid == "raise":
            raise exc
        self.dead_letter(payload, exc.reason, error_class=type(exc).__name__, source=source)

    def send_validated(self, event: Event, payload: bytes | None = None) -> None:
        """Queue an event already returned by :func:`~streams.events.validate` or ``validate_json``.

        ``payload`` is the JSON the event was decoded from, if any; else it is encoded.
        """
        value = payload if payload is not None else encode(event)
        # The record timestamp is the event time (computed inline: this is the per-event hot path).
        self._produce(
            self.topic, value, event.user_id.encode(), int(event.event_time.timestamp() * 1000), None
        )
        self.stats.sent += 1

    def _produce(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None,
        timestamp_ms: int,
        headers: dict[str, bytes] | None,
    ) -> None:
        if self._closed:
            raise ProducerError("this EventProducer is closed")
        while True:
            try:
                self._producer.produce(topic, value, key, timestamp=timestamp_ms, headers=headers)
                break
            except BufferError:
                # The local queue is full: wait for deliveries to free room (backpressure).
                self._producer.poll(0.05)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.MSG_SIZE_TOO_LARGE:
                    raise
                # Refused before queueing: a delivery failure of this record alone (the
                # dead-letter topic could not take it either); the records around it go on.
                self._record_failure(topic, key, _too_large(len(value or b""), exc))
                return
        self._since_poll += 1
        if self._since_poll >= _POLL_EVERY:
            self._since_poll = 0
            self._producer.poll(0)

    # -- delivery --------------------------------------------------------------------------

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
        if error is None:
            if message.topic() == self.dead_letter_topic:
                self.stats.dead_letters_delivered += 1
            else:
                self.stats.delivered += 1
        else:
            self._record_failure(message.topic() or "", message.key(), str(error))
        if self._user_on_delivery is not None:
            self._user_on_delivery(error, message)

    def _record_failure(self, topic: str, key: bytes | None, error: str) -> None:
        self.stats.failed += 1
        if topic == self.dead_letter_topic:
            self._failed_dead_letters += 1
        if len(self.stats.failures) < _MAX_KEPT_FAILURES:
            self.stats.failures.append(DeliveryFailure(topic, key, error))

    @property
    def in_flight(self) -> int:
        """Records queued or sent but not yet acknowledged (or failed) by Kafka."""
        return len(self._producer)

    def poll(self, timeout_s: float = 0.0) -> int:
        """Serve pending delivery reports; returns how many were served."""
        return int(self._producer.poll(timeout_s))

    def flush(self, timeout_s: float = 30.0) -> int:
        """Wait for outstanding events; return how many are still undelivered."""
        remaining = int(self._producer.flush(timeout_s))
        if remaining == 0 and not self._reports_every_record:
            # Every queued record has been reported; only failures were, so the rest succeeded.
            stats = self.stats
            stats.dead_letters_delivered = stats.dead_lettered - self._failed_dead_letters
            stats.delivered = stats.sent - (stats.failed - self._failed_dead_letters)
        return remaining

    def close(self, timeout_s: float = 30.0) -> ProducerStats:
        """Flush and close; raise :class:`DeliveryError` if any event was not delivered."""
        if self._closed:
            return self.stats
        remaining = self.flush(timeout_s)
        self._closed = True
        if remaining:
            raise DeliveryError(
                f"{remaining} events were still undelivered after {timeout_s:.0f} s "
                f"(is the broker at {self.settings.bootstrap_servers} reachable?)",
                self.stats.failures,
            )
        if self.stats.failed:
            first = self.stats.failures[0].error if self.stats.failures else "unknown error"
            raise DeliveryError(
                f"{self.stats.failed} events were not delivered; first error: {first}", self.stats.failures
            )
        return self.stats

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            # Do not mask the original error; still try to deliver what was queued.
            self._closed = True
            self._producer.flush(5.0)


def producer_config(settings: Settings) -> dict[str, object]:
    """The librdkafka producer configuration the SDK runs with (benchmarks reuse it for peers)."""
    p = settings.producer
    return {
        **settings.kafka_client_config(),
        "enable.idempotence": True,
        "acks": "all",
        "partitioner": "murmur2_random",
        "linger.ms": settings.producer_linger_ms,
        "batch.size": p.batch_size_bytes,
        "queue.buffering.max.messages": p.queue_max_messages,
        "compression.type": p.compression,
        "delivery.timeout.ms": p.delivery_timeout_ms,
    }


def _best_effort_bytes(event: object) -> bytes:
    """Original bytes of a rejected event for the dead-letter topic (never raises)."""
    import msgspec

    try:
        return msgspec.json.encode(event)
    except Exception:
        return repr(event).encode("utf-8", errors="replace")


def _too_large(size: int, error: KafkaException) -> str:
    return (
        f"a record of {size:,} bytes is larger than the producer's message.max.bytes allows "
        f"({error.args[0].str()}); "
        "raise message.max.bytes in kafka.client_config (and the topic's max.message.bytes) to send records "
        "this large"
    )
