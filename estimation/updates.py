"""Follow ``user_profile`` events from Kafka into a running :class:`ReachForecaster`.

New users, attribute changes and deletions reach the sample and the per-stratum totals
within one poll interval. Deletion is a privacy requirement: a deleted user stops
counting in every answer as soon as its batch is applied, and its row is dropped from
memory at the next compaction.

Events are validated with the platform's own schema (:func:`streams.events.validate_json`);
anything else on the topic (impressions, clicks, ...) is skipped by a cheap byte test
before decoding. Messages are applied in batches, in partition order; since the
producer keys by ``user_id``, one user's events stay in order, and each shard keeps the
latest profile per user by event time anyway, so replaying a topic is safe.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError

from estimation.forecaster import ReachForecaster
from estimation.shard import UpdateStats
from infra.settings import Settings
from streams.events import InvalidEventError, UserProfile, validate_json

log = logging.getLogger(__name__)
_PROFILE_MARK = b'"user_profile"'


@dataclass
class FollowerStats:
    messages: int = 0
    profiles: int = 0
    invalid: int = 0
    batches: int = 0
    errors: list[str] = field(default_factory=list)
    applied: UpdateStats = field(default_factory=UpdateStats)


class ProfileFollower:
    """Consume ``topic`` (default: ``kafka.topics.events``) and apply profile events.

    Use :meth:`start`/:meth:`stop` for a background thread (the server), or call
    :meth:`poll_once` directly.
    """

    def __init__(
        self,
        settings: Settings,
        forecaster: ReachForecaster,
        *,
        topic: str | None = None,
        batch_size: int = 20_000,
        poll_timeout_s: float = 0.5,
    ) -> None:
        self.forecaster = forecaster
        self.topic = topic or settings.kafka.topics.events
        self.batch_size = batch_size
        self.poll_timeout_s = poll_timeout_s
        self.stats = FollowerStats()
        self._consumer = Consumer(
            {
                **settings.kafka_client_config(),
                "group.id": f"adreach-reach-{uuid.uuid4().hex[:10]}",
                "auto.offset.reset": settings.reach.updates_from,
                "enable.auto.commit": False,
                "session.timeout.ms": 6000,
            }
        )
        self._consumer.subscribe([self.topic])
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll_once(self) -> int:
        """Read up to ``batch_size`` messages and apply the profile events among them."""
        messages = self._consumer.consume(self.batch_size, self.poll_timeout_s)
        profiles: list[Any] = []
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    self.stats.errors.append(str(error))
                continue
            self.stats.messages += 1
            value = message.value()
            if not value or _PROFILE_MARK not in value:
                continue
            try:
                event = validate_json(value)
            except InvalidEventError:
                self.stats.invalid += 1
                continue
            if isinstance(event, UserProfile):
                profiles.append(event)
        if profiles:
            self.stats.applied += self.forecaster.apply_profiles(profiles)
            self.stats.profiles += len(profiles)
            self.stats.batches += 1
        return len(profiles)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="adreach-reach-follower", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception as exc:  # keep following; the error is visible in /v1/reach/health
                log.exception("applying profile events failed")
                self.stats.errors.append(f"{type(exc).__name__}: {exc}")
                self._stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._consumer.close()

    def to_json(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "messages": self.stats.messages,
            "profiles": self.stats.profiles,
            "invalid": self.stats.invalid,
            "batches": self.stats.batches,
            "errors": self.stats.errors[-5:],
            "applied": self.stats.applied.to_json(),
        }
