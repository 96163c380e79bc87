"""The worker's allocator policy (streams/engine/memory.py), observed in a fresh process.

A fresh process because the policy is process-wide and one-way: the test run's own
process must keep malloc's defaults. glibc's ``mallinfo2`` says where a 48 MB array
lives: in its own ``mmap`` (fresh pages, given back when freed) or in the heap, and how
much freed memory the heap keeps.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys

import pytest

_PROBE = """
import ctypes, json, sys
import numpy as np
from streams.engine.memory import keep_freed_memory

FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"

class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS.split()]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = Info
applied = keep_freed_memory(int(sys.argv[1]))
array = np.ones(6 << 20)  # 48 MB
mapped = mallinfo2().hblkhd
del array
print(json.dumps({"applied": applied, "mapped_while_held": mapped, "kept_after_free": mallinfo2().fordblks}))
"""

_MB48 = 48 << 20


def _has_mallinfo2() -> bool:
    try:
        ctypes.CDLL(None).mallinfo2  # noqa: B018 (glibc >= 2.33)
    except (OSError, AttributeError):
        return False
    return True


needs_glibc = pytest.mark.skipif(not _has_mallinfo2(), reason="glibc's mallopt and mallinfo2")


def _probe(limit_mib: int) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(limit_mib)], check=True, capture_output=True, text=True
    ).stdout
    result: dict[str, int] = json.loads(out)
    return result


@needs_glibc
def test_large_arrays_come_from_the_heap_and_their_memory_is_kept_for_reuse() -> None:
    result = _probe(1024)
    assert result["applied"]
    assert result["mapped_while_held"] < _MB48
    assert result["kept_after_free"] >= _MB48


@needs_glibc
def test_zero_leaves_malloc_its_fresh_pages() -> None:
    result = _probe(0)
    assert not result["applied"]
    assert result["mapped_while_held"] >= _MB48
    assert result["kept_after_free"] < _MB48
