"""The embedded broker's lifecycle: start, idempotent start, status, clean stop, port conflicts."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from conftest import free_port

from infra.settings import load_settings
from streams.broker import (
    BrokerBinaryNotFound,
    BrokerStartError,
    EmbeddedBroker,
    PortInUseError,
    wait_for_kafka,
)


def test_start_status_stop(tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path, broker={"port": free_port()})
    broker = EmbeddedBroker(settings)
    assert not broker.status().running
    status = broker.start()
    try:
        assert status.running and status.pid
        assert wait_for_kafka(settings.bootstrap_servers, timeout_s=2)
        again = broker.start()
        assert again.pid == status.pid, "start is idempotent"
        assert "running" in EmbeddedBroker(settings).status().describe()
    finally:
        assert broker.stop()
    assert not broker.status().running
    assert not wait_for_kafka(settings.bootstrap_servers, timeout_s=0.5)
    assert not broker.stop(), "stopping a stopped broker says so"
    assert "listening on" in broker.log_tail()


def test_port_taken_by_another_process_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        broker = EmbeddedBroker(load_settings(state_dir=tmp_path, broker={"port": port}))
        with pytest.raises(PortInUseError, match=f"port {port}.*ADREACH_BROKER__PORT"):
            broker.start()
    assert not broker.status().running


def test_stale_state_file_is_not_mistaken_for_a_running_broker(tmp_path: Path) -> None:
    broker = EmbeddedBroker(load_settings(state_dir=tmp_path, broker={"port": free_port()}))
    broker.directory.mkdir(parents=True)
    broker.state_file.write_text('{"pid": 999999999, "address": "x"}')
    assert not broker.status().running


def test_missing_binary_is_reported(tmp_path: Path) -> None:
    broker = EmbeddedBroker(
        load_settings(state_dir=tmp_path, broker={"port": free_port(), "binary": tmp_path / "nope"})
    )
    with pytest.raises(BrokerBinaryNotFound, match="nope"):
        broker.start()


def test_a_storage_the_shipped_build_lacks_is_named_in_the_error(tmp_path: Path) -> None:
    storage = "postgres://postgres@127.0.0.1/tansu"
    broker = EmbeddedBroker(
        load_settings(state_dir=tmp_path, broker={"port": free_port(), "storage": storage})
    )
    with pytest.raises(BrokerStartError, match=f"broker.storage = '{storage}'.*memory:// and s3://"):
        broker.start()
    assert not broker.status().running
