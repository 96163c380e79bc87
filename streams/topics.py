"""Create the topics adreach writes to, with explicit configs.

Topics are created with every config we rely on set explicitly, never inherited from
broker defaults: clusters differ in their defaults, and some brokers (Tansu among
them) only report explicitly set configs back. Existing topics are left alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

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


def existing_topics(settings: Settings, timeout_s: float = 10.0) -> dict[str, int]:
    """Topic name -> partition count, as the cluster reports them."""
    try:
        metadata = admin_client(settings).list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise KafkaUnavailableError(unreachable_message(settings, exc)) from exc
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
