"""Types of the compiled state kernels (streams/engine/_kernels.c)."""

from typing import Any

# Buffers are anything with the buffer protocol, C-contiguous, of 8-byte items (strings' data: bytes).
def sum_by_code(codes: Any, deltas: Any, m: int, out_codes: Any, out_sums: Any, /) -> int: ...
def max_by_code(codes: Any, values: Any, out_codes: Any, out_max: Any, /) -> int: ...
def merge_sorted(
    codes: Any, values: Any, new_codes: Any, new_values: Any, width: int, out_codes: Any, out_values: Any, /
) -> None: ...
def hash_strings(bounds: Any, data: Any, multipliers: Any, length: int, rows: int, out: Any, /) -> None: ...
def intern_strings(
    cells: Any,
    held: int,
    bounds: Any,
    data: Any,
    multipliers: Any,
    length: int,
    positions: Any,
    primary_mask: int,
    next_id: int,
    stamps: Any,
    serial: int,
    out_ids: Any,
    out_distinct: Any,
    out_rows: Any,
    /,
) -> tuple[int, int, int] | int | None: ...
def find_strings(
    cells: Any, bounds: Any, data: Any, multipliers: Any, length: int, primary_mask: int, out_ids: Any, /
) -> None: ...
def place_cells(cells: Any, first: Any, second: Any, ids: Any, /) -> None: ...
