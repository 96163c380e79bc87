"""Shared fixtures: one real Tansu broker process per test run, on a free port.

Tests isolate themselves by topic name rather than by broker, because starting a
broker per test would dominate the run time; :func:`kafka` hands each test settings
with its own fresh event and dead-letter topics.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.settings import Settings, load_settings
from streams.broker import EmbeddedBroker
from streams.topics import ensure_topics


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def broker_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    state_dir = tmp_path_factory.mktemp("adreach-state")
    settings = load_settings(state_dir=state_dir, broker={"port": free_port()})
    broker = EmbeddedBroker(settings)
    broker.start()
    try:
        yield settings
    finally:
        broker.stop()


STREAM_LATENESS_S = 3_600


@pytest.fixture()
def kafka(broker_settings: Settings) -> Settings:
    """Settings pointing at the session broker, with topics unique to this test."""
    suffix = uuid.uuid4().hex[:10]
    settings = broker_settings.model_copy(deep=True)
    settings.kafka.topics.events = f"test.events.{suffix}"
    settings.kafka.topics.dead_letter = f"test.events.{suffix}.dlq"
    settings.kafka.topics.partitions = 3
    ensure_topics(settings)
    return settings


@pytest.fixture()
def cli_env(kafka: Settings) -> dict[str, str]:
    """Environment that makes an ``adreach`` subprocess use the test broker and topics."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADREACH_")}
    env.update(
        {
            "ADREACH_STATE_DIR": str(kafka.state_dir),
            "ADREACH_BROKER__PORT": str(kafka.broker.port),
            "ADREACH_KAFKA__TOPICS__EVENTS": kafka.kafka.topics.events,
            "ADREACH_KAFKA__TOPICS__DEAD_LETTER": kafka.kafka.topics.dead_letter,
            "ADREACH_KAFKA__TOPICS__PARTITIONS": str(kafka.kafka.topics.partitions),
            "COLUMNS": "200",
        }
    )
    return env


@pytest.fixture()
def adreach_bin() -> str:
    return str(Path(os.sys.executable).parent / "adreach")


@pytest.fixture()
def stream(kafka: Settings, tmp_path: Path) -> Settings:
    return stream_settings(kafka, tmp_path / "state")


def stream_settings(base: Settings, state_dir: Path, group_prefix: str = "stream") -> Settings:
    """``base`` with its own stream engine: a fresh consumer group, repartition topic and state."""
    suffix = uuid.uuid4().hex[:8]
    return base.model_copy(
        update={
            "state_dir": state_dir,
            "stream": base.stream.model_copy(
                update={
                    "consumer_group": f"{group_prefix}-{suffix}",
                    "repartition_topic": f"test.repartition.{suffix}",
                    "repartition_partitions": 3,
                    "allowed_lateness_s": STREAM_LATENESS_S,
                    "flush_interval_ms": 300,
                    "backlog_flush_interval_ms": 600,  # several cycles even while catching up
                    "batch_max_events": 2_000,
                    "checkpoint_interval_s": 1.0,  # restarts then resume from a checkpoint, not from zero
                }
            ),
        },
        deep=True,
    )
