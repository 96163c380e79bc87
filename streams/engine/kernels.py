"""The compiled state kernels (``_kernels.c``), or None where the install had no C compiler.

The state's callers (:mod:`streams.engine.runs`, :mod:`streams.engine.state`) look this up
at each call, so the NumPy paths, which give the same bits, can also be run on purpose
(tests, A/B measurements) by setting :data:`compiled` to None.
"""

from __future__ import annotations

from types import ModuleType

compiled: ModuleType | None
try:
    from streams.engine import _kernels as compiled
except ImportError:  # built without a C compiler: the NumPy paths
    compiled = None

KERNELS_AVAILABLE = compiled is not None
"""Whether the compiled state kernels are installed."""
