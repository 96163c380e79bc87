"""Make Ctrl-C reach the main thread.

A signal goes to any thread that does not block it. When librdkafka's or rich's
threads take SIGINT, the main thread stays blocked in ``read()`` and Python raises
KeyboardInterrupt only later, at an arbitrary point, where it can skip the flush of
queued events. Threads started inside :func:`threads_ignore_sigint` inherit a mask
that blocks SIGINT, so Ctrl-C interrupts the main thread's read at once.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def threads_ignore_sigint() -> Iterator[None]:
    """Threads created in this block never receive SIGINT (a no-op off the main thread or POSIX)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class InterruptGuard:
    """Own SIGINT for a command: record Ctrl-C, and raise only where the command allows it.

    Inside :meth:`interruptible` (e.g. a blocking read of the input) Ctrl-C raises
    KeyboardInterrupt at once. Elsewhere the first Ctrl-C is only recorded, so that
    work such as flushing queued events to Kafka is never cut at an arbitrary point;
    a second Ctrl-C raises, for users who really want out.
    """

    def __init__(self) -> None:
        self.count = 0
        self._raise_now = False
        self._previous: object = None

    def __enter__(self) -> InterruptGuard:
        self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc_info: object) -> None:
        signal.signal(signal.SIGINT, self._previous)  # type: ignore[arg-type]

    def _on_sigint(self, signum: int, frame: object) -> None:
        self.count += 1
        if self._raise_now or self.count > 1:
            raise KeyboardInterrupt

    @property
    def requested(self) -> bool:
        return self.count > 0

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        self._raise_now = True
        try:
            yield
        finally:
            self._raise_now = False
