"""The raw buffers of an Arrow string column, for hashing it column-at-a-time in NumPy.

Both the reach sample's user hashes (:mod:`estimation.hashing`) and the stream engine's
key hashes (:mod:`streams.engine.keys`) read every string's UTF-8 bytes without making a
Python object per string; this is the one place that knows how Arrow lays them out.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from numpy.typing import NDArray


def string_buffers(strings: pa.Array) -> tuple[NDArray[np.int64], NDArray[np.uint8]]:
    """``(bounds, data)`` of a string or large_string array (a slice is fine).

    String ``i`` is ``data[bounds[i]:bounds[i + 1]]``; ``bounds`` has ``len(strings) + 1``
    entries and need not start at 0. Null strings read as empty: callers handle nulls.
    """
    if not (pa.types.is_string(strings.type) or pa.types.is_large_string(strings.type)):
        raise TypeError(f"expected a string array, got {strings.type}")
    n = len(strings)
    buffers = strings.buffers()
    offset_type = np.int64 if pa.types.is_large_string(strings.type) else np.int32
    if buffers[1] is None:  # an empty array may carry no offsets
        return np.zeros(n + 1, np.int64), np.zeros(0, np.uint8)
    offsets = np.frombuffer(buffers[1], offset_type, strings.offset + n + 1)[strings.offset :]
    data = np.frombuffer(buffers[2], np.uint8) if buffers[2] is not None else np.zeros(0, np.uint8)
    return offsets.astype(np.int64), data
