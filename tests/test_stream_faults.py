"""Fault tests of the stream engine: the online store and the broker go away mid-stream.

Each test runs ``adreach stream run`` as a separate process against real servers it owns
(a private ``redis-server``, a private Tansu broker), breaks one of them while events are
flowing, brings it back, and checks the features read through Feast's SDK against the
DuckDB reference over the same events: the values of a failure-free run.

The embedded Tansu build keeps topics in memory only (its Postgres and S3 storage engines
are not compiled in), so a broker *restart* would lose the topics themselves; the broker
test freezes the process instead (SIGSTOP / SIGCONT), which is what a network partition
or a long GC pause looks like to the clients.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.settings import Settings, load_settings
from streams.broker import EmbeddedBroker
from streams.topics import ensure_topics
from tests.kafka_helpers import consume
from tests.test_stream_engine import (
    assert_features_match,
    expected_events,
    produce,
    simulated_payloads,
    start_engine,
)

REDIS_SERVER = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """A private redis-server with an append-only file, so a stop and start keeps its data."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert REDIS_SERVER is not None
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory)]
            + ["--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SHUTDOWN: the append-only file is complete
            self.process.wait(timeout=20)
        self.process = None


@pytest.fixture()
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path / "redis")
    server.directory.mkdir()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def wait_for_stored_features(settings: Settings, parts: int = 2, timeout_s: float = 120) -> None:
    """Until the engine has stored features a few times: it is mid-stream."""
    data = settings.feature_repo_dir / "data" / "user_activity"
    deadline = time.monotonic() + timeout_s
    while len(list(data.glob("part-*.parquet"))) < parts and time.monotonic() < deadline:
        time.sleep(0.1)
    assert time.monotonic() < deadline, "the engine stored no features"


def test_online_store_down_for_a_while_loses_nothing(stream: Settings, redis_server: RedisServer) -> None:
    settings = stream.model_copy(
        update={
            "features": stream.features.model_copy(
                update={
                    "online_store": "redis",
                    "redis_connection": f"127.0.0.1:{redis_server.port}",
                    "project": f"faults_{uuid.uuid4().hex[:8]}",
                }
            ),
            "stream": stream.stream.model_copy(update={"retry_initial_s": 0.2, "retry_max_s": 1.0}),
        }
    )
    payloads = simulated_payloads(users=1_200, events=16_000, seed=21)
    first, rest = payloads[:4_000], payloads[4_000:]
    produce(settings, first)
    engine = start_engine(settings, "--until-idle", "4", "--every", "1")
    try:
        wait_for_stored_features(settings)
        redis_server.stop()
        produce(settings, rest)  # arrives while the online store is down
        time.sleep(5.0)
        assert engine.poll() is None, engine.communicate()[1]
        redis_server.start()
        out, err = engine.communicate(timeout=240)
    finally:
        if engine.poll() is None:
            engine.kill()
            engine.communicate()
    assert engine.returncode == 0, err
    assert "feature store unavailable" in err, err[-2000:]
    records = consume(settings, settings.kafka.topics.events, len(payloads))
    events, _ = expected_events(settings, records)
    assert_features_match(settings, events)


@pytest.fixture()
def private_broker(stream: Settings, tmp_path: Path) -> Iterator[tuple[Settings, EmbeddedBroker]]:
    broker_settings = load_settings(state_dir=tmp_path / "broker", broker={"port": free_port()})
    broker = EmbeddedBroker(broker_settings)
    broker.start()
    settings = stream.model_copy(update={"broker": broker_settings.broker}, deep=True)
    ensure_topics(settings)
    try:
        yield settings, broker
    finally:
        broker.stop()


def test_broker_frozen_mid_stream_loses_nothing(private_broker: tuple[Settings, EmbeddedBroker]) -> None:
    settings, broker = private_broker
    pid = broker.status().pid
    assert pid is not None
    payloads = simulated_payloads(users=1_200, events=16_000, seed=22)
    first, rest = payloads[:4_000], payloads[4_000:]
    produce(settings, first)
    # Idle must outlast the freeze: the events produced meanwhile reach the broker only after it.
    engine = start_engine(settings, "--until-idle", "15", "--every", "1")
    feeder = threading.Thread(target=produce, args=(settings, rest))
    try:
        wait_for_stored_features(settings)
        feeder.start()
        time.sleep(0.5)
        os.kill(pid, signal.SIGSTOP)
        time.sleep(8.0)
        os.kill(pid, signal.SIGCONT)
        feeder.join(timeout=120)
        out, err = engine.communicate(timeout=300)
    finally:
        if engine.poll() is None:
            engine.kill()
            engine.communicate()
    assert engine.returncode == 0, err
    records = consume(settings, settings.kafka.topics.events, len(payloads))
    events, _ = expected_events(settings, records)
    assert_features_match(settings, events)
