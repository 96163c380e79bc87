"""Types of the compiled state kernels (streams/engine/_kernels.c)."""

from typing import Any

# Buffers are anything with the buffer protocol, C-contiguous, of 8-byte items.
def sum_by_code(codes: Any, deltas: Any, m: int, out_codes: Any, out_sums: Any, /) -> int: ...
def max_by_code(codes: Any, values: Any, out_codes: Any, out_max: Any, /) -> int: ...
def merge_sorted(
    codes: Any, values: Any, new_codes: Any, new_values: Any, width: int, out_codes: Any, out_values: Any, /
) -> None: ...
