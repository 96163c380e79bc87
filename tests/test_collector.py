"""The worker's collector policy: paused while a read pass runs, the due collection after it."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from streams.engine.collector import collect_if_due, collected_after


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def _cycles(count: int) -> weakref.ref[_Node]:
    """Make ``count`` two-node reference cycles (garbage at once); a weak reference to one node."""
    first = None
    for _ in range(count):
        a, b = _Node(), _Node()
        a.other, b.other = b, a
        first = first or a
    assert first is not None
    return weakref.ref(first)


@pytest.fixture(autouse=True)
def _interpreter_defaults() -> Iterator[None]:
    """Each test starts from an enabled collector with empty young generations, and leaves it so."""
    enabled, thresholds = gc.isenabled(), gc.get_threshold()
    gc.enable()
    gc.collect()
    yield
    gc.set_threshold(*thresholds)
    (gc.enable if enabled else gc.disable)()


def test_the_collector_is_paused_inside_and_running_after() -> None:
    with collected_after():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_cycles_made_inside_are_collected_when_the_pass_ends() -> None:
    gc.set_threshold(100, 10, 10)
    with collected_after():
        node = _cycles(1_000)  # far past the young generation's threshold
        assert node() is not None  # not collected while the pass runs
    assert node() is None
    assert gc.get_count()[0] < 100


def test_collected_after_even_when_the_pass_raises() -> None:
    gc.set_threshold(100, 10, 10)
    with pytest.raises(RuntimeError), collected_after():
        node = _cycles(1_000)
        raise RuntimeError("a failed pass")
    assert gc.isenabled()
    assert node() is None


def test_a_pass_within_a_paused_collector_leaves_it_paused() -> None:
    gc.disable()
    with collected_after():
        node = _cycles(1_000)
    assert not gc.isenabled()
    assert node() is not None  # the caller paused collection: nothing is collected
    gc.collect()
    assert node() is None


def test_collect_if_due_picks_the_oldest_generation_past_its_threshold() -> None:
    gc.set_threshold(100, 10, 10)
    gc.disable()
    assert collect_if_due() is None  # nothing allocated since the fixture's full collection
    _cycles(200)
    assert collect_if_due() == 0
    assert gc.get_count()[0] == 0
    for _ in range(11):  # each young collection counts one for the middle generation
        _cycles(200)
        gc.collect(0)
    _cycles(200)  # the young generation is due too: the older one goes first, with it
    assert collect_if_due() == 1
    assert gc.get_count()[:2] == (0, 0)


def test_collect_if_due_respects_automatic_collection_turned_off() -> None:
    gc.set_threshold(0)
    gc.disable()
    node = _cycles(1_000)
    assert collect_if_due() is None
    assert node() is not None
