"""Shard clients: the same calls in-process (K = 1) or in a separate process per shard.

The aggregator submits a request to every shard first and collects afterwards, so K
shard processes work in parallel. A shard process that died, or does not answer within
``reach.shard_timeout_s``, is reported as missing (:class:`ShardUnavailableError`); a late
answer to an abandoned request is recognised by its request id and dropped, so a slow
shard can never make a later query read a stale answer.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import multiprocessing.connection
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from estimation.shard import Shard


class ShardUnavailableError(RuntimeError):
    """One or more shards did not answer; ``missing`` lists their numbers."""

    def __init__(self, missing: list[int], reason: str) -> None:
        shards = ", ".join(str(i) for i in missing)
        super().__init__(
            f"shard(s) {shards} did not answer ({reason}); the answer would be missing their users. "
            "Restart the server, or ask with allow_partial for an answer marked partial."
        )
        self.missing = missing
        self.reason = reason


@dataclass
class ShardReply:
    ok: bool
    value: Any = None
    error: str = ""


class ShardClient(Protocol):
    index: int

    def submit(self, method: str, *args: Any) -> int: ...

    def result(self, request: int, deadline: float) -> ShardReply: ...

    def close(self) -> None: ...

    @property
    def alive(self) -> bool: ...


def _call(shard: Shard, method: str, args: tuple[Any, ...]) -> Any:
    if method == "query":
        return shard.query(*args)
    if method == "apply":
        return shard.apply(*args)
    if method == "info":
        return shard.info()
    if method == "compact":
        shard.compact()
        return None
    raise ValueError(f"unknown shard method {method!r}")


class LocalShard:
    """A shard in this process (the embedded default)."""

    def __init__(self, shard: Shard, index: int = 0) -> None:
        self.shard = shard
        self.index = index
        self._replies: dict[int, ShardReply] = {}
        self._ids = itertools.count()

    def submit(self, method: str, *args: Any) -> int:
        request = next(self._ids)
        self._replies[request] = ShardReply(True, _call(self.shard, method, args))
        return request

    def result(self, request: int, deadline: float) -> ShardReply:
        return self._replies.pop(request)

    @property
    def alive(self) -> bool:
        return True

    def close(self) -> None:
        self._replies.clear()


def _worker(
    conn: multiprocessing.connection.Connection, sample: str, index: int, count: int, compact: float
) -> None:
    """Shard process main loop: load this shard, then answer requests until told to stop."""
    from estimation.store import load_meta, load_shard

    try:
        shard = load_shard(load_meta(Path(sample)), index, count, compact_fraction=compact)
    except Exception as exc:  # report a load failure to the parent rather than dying silently
        conn.send((-1, ShardReply(False, error=f"{type(exc).__name__}: {exc}")))
        return
    conn.send((-1, ShardReply(True, shard.info())))
    while True:
        try:
            request, method, args = conn.recv()
        except (EOFError, OSError):
            return
        if method == "stop":
            return
        try:
            reply = ShardReply(True, _call(shard, method, args))
        except Exception as exc:  # the aggregator turns this into a clear error
            reply = ShardReply(False, error=f"{type(exc).__name__}: {exc}")
        conn.send((request, reply))


class ProcessShard:
    """A shard in its own process, talked to over a pipe."""

    def __init__(
        self, sample: Path, index: int, count: int, *, compact_fraction: float, timeout_s: float
    ) -> None:
        self.index = index
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self.process = context.Process(
            target=_worker,
            args=(child, str(sample), index, count, compact_fraction),
            name=f"adreach-reach-shard-{index}",
            daemon=True,
        )
        self.process.start()
        child.close()
        self._ids = itertools.count()
        self._broken = ""
        self.startup_timeout_s = max(timeout_s, 120.0)

    def wait_ready(self, deadline: float) -> ShardReply:
        reply = self.result(-1, deadline)
        if not reply.ok:
            self._broken = reply.error
        return reply

    def submit(self, method: str, *args: Any) -> int:
        request = next(self._ids)
        if self._broken:
            return request
        try:
            self._conn.send((request, method, args))
        except (OSError, ValueError) as exc:
            self._broken = f"cannot reach the shard process: {exc}"
        return request

    def result(self, request: int, deadline: float) -> ShardReply:
        if self._broken:
            return ShardReply(False, error=self._broken)
        while True:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0 or not self._conn.poll(remaining):
                    if not self.process.is_alive():
                        self._broken = f"the shard process exited (code {self.process.exitcode})"
                        return ShardReply(False, error=self._broken)
                    return ShardReply(False, error="timed out")
                answered, reply = self._conn.recv()
            except (EOFError, OSError) as exc:
                self._broken = f"the shard process is gone ({type(exc).__name__})"
                return ShardReply(False, error=self._broken)
            if answered == request:
                assert isinstance(reply, ShardReply)
                return reply
            # an answer to a request we gave up on: drop it and keep waiting

    @property
    def alive(self) -> bool:
        return not self._broken and self.process.is_alive()

    def close(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(OSError, ValueError):
                self._conn.send((0, "stop", ()))
            self.process.join(timeout=5)
            if self.process.is_alive():
                self.process.terminate()
                self.process.join(timeout=5)
        self._conn.close()
