"""Create the topics adreach writes to, with explicit configs.

Topics are created with every config we rely on set explicitly, never inherited from
broker defaults: clusters differ in their defaults, and some brokers (Tansu among
them) only report explicitly set configs back. Existing topics are left alone.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ClusterMetadata, NewTopic

from infra.settings import Settings


class TopicError(RuntimeError):
    """A topic could not be created or inspected."""


class KafkaUnavailableError(TopicError):
    """No broker answered at the configured bootstrap servers."""


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication_factor: int
    config: Mapping[str, str] = field(default_factory=dict)


def default_topics(settings: Settings) -> list[TopicSpec]:
    """The event topic and its dead-letter topic, as configured."""
    topics = settings.kafka.topics
    return [
        TopicSpec(topics.events, topics.partitions, topics.replication_factor, dict(topics.config)),
        TopicSpec(topics.dead_letter, topics.partitions, topics.replication_factor, dict(topics.config)),
    ]


def admin_client(settings: Settings) -> AdminClient:
    return AdminClient(settings.kafka_client_config())


# Once every bootstrap broker has refused, failed to resolve or failed the handshake for this
# long, the cluster is reported unreachable without waiting out the whole timeout.
UNREACHABLE_AFTER_S = 3.0
# The client errors that name why a broker could not be reached (kept as the reported cause).
_CAUSES = frozenset(
    {
        KafkaError._TRANSPORT,
        KafkaError._RESOLVE,
        KafkaError._AUTHENTICATION,
        KafkaError._SSL,
        KafkaError._BAD_MSG,
    }
)


def cluster_metadata(settings: Settings, timeout_s: float = 10.0) -> ClusterMetadata:
    """The cluster's metadata, or :class:`KafkaUnavailableError` naming why no broker answered.

    librdkafka retries an unreachable cluster until the timeout and then reports only
    "Broker transport failure". The client's own error events say more (connection
    refused, a name that does not resolve, a failed TLS or SASL handshake) and say it
    within milliseconds: once they report every broker down for
    :data:`UNREACHABLE_AFTER_S`, the wait ends with that cause.
    """
    errors: list[KafkaError] = []
    admin = AdminClient({**settings.kafka_client_config(), "error_cb": errors.append})
    started = time.monotonic()
    deadline = started + timeout_s
    while True:
        seen = len(errors)
        try:
            return admin.list_topics(timeout=max(0.05, min(0.5, deadline - time.monotonic())))
        except KafkaException as exc:
            failure: object = exc
        admin.poll(0)  # serves error_cb
        now = time.monotonic()
        all_down = any(error.code() == KafkaError._ALL_BROKERS_DOWN for error in errors[seen:])
        if now >= deadline or (all_down and now - started >= min(UNREACHABLE_AFTER_S, timeout_s)):
            # (librdkafka reports a repeated connection error once, so the cause may be older)
            causes = [error.str() for error in errors if error.code() in _CAUSES]
            raise KafkaUnavailableError(unreachable_message(settings, causes[-1] if causes else failure))


def existing_topics(settings: Settings, timeout_s: float = 10.0) -> dict[str, int]:
    """Topic name -> partition count, as the cluster reports them."""
    metadata = cluster_metadata(settings, timeout_s)
    return {name: len(topic.partitions) for name, topic in metadata.topics.items()}


def ensure_topics(
    settings: Settings, specs: Sequence[TopicSpec] | None = None, timeout_s: float = 15.0
) -> list[str]:
    """Create the topics that do not exist yet; return the names that were created."""
    specs = list(specs) if specs is not None else default_topics(settings)
    present = existing_topics(settings, timeout_s)
    missing = [spec for spec in specs if spec.name not in present]
    if not missing:
        return []
    admin = admin_client(settings)
    futures = admin.create_topics(
        [
            NewTopic(
                spec.name,
                num_partitions=spec.partitions,
                replication_factor=spec.replication_factor,
                config=dict(spec.config),
            )
            for spec in missing
        ],
        request_timeout=timeout_s,
    )
    created = []
    for name, future in futures.items():
        try:
            future.result()
            created.append(name)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if isinstance(error, KafkaError) and error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue  # created concurrently by someone else: fine
            raise TopicError(f"could not create topic {name!r}: {exc}") from exc
    return created


def unreachable_message(settings: Settings, cause: object) -> str:
    hint = (
        "start the embedded broker with `adreach broker start`"
        if settings.uses_embedded_broker
        else "check kafka.bootstrap_servers and kafka.client_config"
    )
    return f"no Kafka broker answered at {settings.bootstrap_servers} ({cause}); {hint}"
