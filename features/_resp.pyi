"""Types of the compiled Redis command writer (features/_resp.c)."""

from typing import Any

# (offsets, data, offset) of a LargeBinary array; buffers are anything with the buffer protocol.
Binary = tuple[Any, Any, int]
# (hash field, kind 0 int64 | 1 float64 | 2 encoded, validity | None, data, offsets | None, offset)
Feature = tuple[bytes, int, Any, Any, Any, int]

def hset_commands(
    rows: int,
    keys: Binary,
    suffix: bytes,
    ts_field: bytes,
    micros: Any,
    features: tuple[Feature, ...],
    changed: Any,
    /,
) -> bytes: ...
