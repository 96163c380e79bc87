"""How the stream engine keeps Python's cyclic garbage collector off its hot path.

Every Kafka message a worker reads is a new Python object that the collector tracks, so
collections run every few hundred messages; each full one used to walk every object
alive since start-up (imported modules, Feast's registry, Arrow and NumPy internals),
although none of those is ever freed while the worker runs. Nothing on the hot path
builds reference cycles (messages, decoded structs and batches are freed by reference
counting), so the collector finds nothing there either.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def startup_heap_frozen() -> Iterator[None]:
    """Move every object alive now out of the collector's view for the block.

    Collections keep running for objects made inside the block, but no longer walk the
    start-up heap (measured: reading 300k events with the worker's consumer took 3.3 - 4.0
    CPU µs per event without this and 2.1 - 2.5 with it, in a process holding ~300k
    tracked objects; 16% of a whole worker's CPU when first measured).
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextmanager
def collector_paused() -> Iterator[None]:
    """Pause the collector for the block (if it was running): for loops that only build
    short-lived, acyclic objects, such as decoding a batch of messages."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
