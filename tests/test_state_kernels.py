"""The compiled state kernels (``streams/engine/_kernels.c``) against their NumPy references.

Both paths must give the same bits: the compiled one runs where the install had a C
compiler, the NumPy one elsewhere, and the state they build (and checkpoint) must not
depend on which.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from streams.engine import kernels
from streams.engine import keys as keys_module
from streams.engine import router as router_module
from streams.engine import runs as runs_module
from streams.engine import state as state_module

compiled = kernels.compiled
needs_kernels = pytest.mark.skipif(compiled is None, reason="the compiled state kernels are not installed")

# Codes as the state makes them (entity << 27 | tile, some with negative tiles: events
# before 1970) and any int64 at all, with many repeats.
_codes = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.builds(lambda entity, tile: (entity << 27) | tile, st.integers(0, 5_000), st.integers(-3, 30)),
    st.integers(-5, 5),
)
_deltas = st.floats(allow_nan=False, width=64) | st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e308, -1e308])


def test_the_kernels_are_built_where_the_project_is_installed() -> None:
    """CI installs with a C compiler: a silently missing kernel would test only the fallback."""
    assert kernels.KERNELS_AVAILABLE


@needs_kernels
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.integers(1, 6))  # (a group has at least one column)
def test_sums_by_code_are_the_numpy_sums_to_the_bit(data: st.DataObject, width: int) -> None:
    codes = np.asarray(data.draw(st.lists(_codes, max_size=300)), dtype=np.int64)
    deltas = data.draw(hnp.arrays(np.float64, (width, len(codes)), elements=_deltas))
    expected_codes, expected_sums = state_module._summed_by_code_numpy(codes, deltas)
    assert compiled is not None
    got_codes, got_sums = state_module._summed_by_code_compiled(compiled, codes, deltas)
    assert got_codes.tolist() == expected_codes.tolist()
    assert got_sums.shape == expected_sums.shape == (width, len(expected_codes))
    assert got_sums.tobytes() == expected_sums.tobytes()


@needs_kernels
def test_sums_of_many_codes_in_wide_ranges_and_nan_deltas_match() -> None:
    """Large inputs (the hash table's probing, every radix digit, codes repeated hundreds of times,
    so that any other order of the additions shows in the last bits) and NaN, which both propagate."""
    rng = np.random.default_rng(7)
    codes = np.concatenate(
        [
            rng.integers(-(2**63), 2**63 - 1, 20_000, dtype=np.int64),
            (rng.integers(0, 50_000, 60_000) << 27) | rng.integers(28_000_000, 28_001_440, 60_000),
            (rng.integers(0, 200, 60_000) << 27) | rng.integers(28_000_000, 28_000_003, 60_000),
        ]
    )
    rng.shuffle(codes)
    deltas = rng.normal(size=(5, len(codes)))
    deltas[2, ::997] = np.nan
    expected = state_module._summed_by_code_numpy(codes, deltas)
    assert compiled is not None
    got = state_module._summed_by_code_compiled(compiled, codes, deltas)
    assert np.array_equal(got[0], expected[0])
    assert np.array_equal(got[1], expected[1], equal_nan=True)
    finite = ~np.isnan(expected[1])
    assert got[1][finite].tobytes() == expected[1][finite].tobytes()


@needs_kernels
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_codes, st.integers(-(2**63), 2**63 - 1) | st.integers(-3, 3)), max_size=300))
def test_latest_tiles_by_pair_are_the_numpy_ones(rows: list[tuple[int, int]]) -> None:
    pairs = np.asarray([pair for pair, _ in rows], dtype=np.int64)
    tiles = np.asarray([tile for _, tile in rows], dtype=np.int64)
    expected = state_module._latest_by_pair_numpy(pairs, tiles)
    assert compiled is not None
    got = state_module._latest_by_pair_compiled(compiled, pairs, tiles)
    assert got[0].tolist() == expected[0].tolist()
    assert got[1].tolist() == expected[1].tolist()


@needs_kernels
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.integers(0, 3), st.sampled_from([np.int64, np.float64]))
def test_merged_runs_are_the_numpy_merge(data: st.DataObject, width: int, dtype: type[np.generic]) -> None:
    both = data.draw(st.lists(_codes, unique=True, max_size=200))
    new_mask = data.draw(st.lists(st.booleans(), min_size=len(both), max_size=len(both)))
    old = np.sort(np.asarray([c for c, new in zip(both, new_mask, strict=True) if not new], dtype=np.int64))
    new = np.sort(np.asarray([c for c, new in zip(both, new_mask, strict=True) if new], dtype=np.int64))
    elements = st.integers(-(2**63), 2**63 - 1) if dtype is np.int64 else _deltas
    values = data.draw(hnp.arrays(dtype, (width, len(old)), elements=elements))
    new_values = data.draw(hnp.arrays(dtype, (width, len(new)), elements=elements))
    expected = runs_module._insert_sorted_numpy(old, values, new, new_values)
    assert compiled is not None
    got = runs_module._insert_sorted_compiled(compiled, old, values, new, new_values)
    assert got[0].tolist() == expected[0].tolist()
    assert got[1].dtype == expected[1].dtype and got[1].shape == expected[1].shape
    assert got[1].tobytes() == expected[1].tobytes()


@needs_kernels
def test_merging_into_a_non_contiguous_payload_reads_it_as_numpy_does() -> None:
    """A payload that is a view (every other column) is read by value, not by its base's layout."""
    base = np.arange(20, dtype=np.float64).reshape(2, 10)
    values = base[:, ::2]
    old, new = np.array([1, 5, 9, 13, 17]), np.array([0, 6, 20])
    new_values = np.full((2, 3), -1.0)
    expected = runs_module._insert_sorted_numpy(old, values, new, new_values)
    assert compiled is not None
    got = runs_module._insert_sorted_compiled(compiled, old, values, new, new_values)
    assert np.array_equal(got[0], expected[0]) and got[1].tobytes() == expected[1].tobytes()


@needs_kernels
def test_kernels_refuse_buffers_too_small_for_what_they_write() -> None:
    assert compiled is not None
    codes = np.arange(10, dtype=np.int64)
    with pytest.raises(ValueError, match="out_sums"):
        compiled.sum_by_code(codes, np.zeros((2, 10)), 2, np.empty(10, np.int64), np.empty(19))
    with pytest.raises(ValueError, match="out_max"):
        compiled.max_by_code(codes, codes, np.empty(10, np.int64), np.empty(9, np.int64))
    with pytest.raises(ValueError, match="deltas"):
        compiled.sum_by_code(codes, np.zeros((1, 10)), 2, np.empty(10, np.int64), np.empty(20))
    merge_inputs = (codes, np.zeros(10), np.array([20]), np.zeros(1), 1, np.empty(11, np.int64))
    with pytest.raises(ValueError, match="out_values"):
        compiled.merge_sorted(*merge_inputs, np.empty(10))
    with pytest.raises(BufferError):  # read-only output
        compiled.merge_sorted(*merge_inputs, bytes(88))


_texts = st.text(st.characters(codec="utf-8"), max_size=80) | st.sampled_from(
    ["", "\x00", "a", "a\x00", "x" * 400]
)


@needs_kernels
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_texts, max_size=60), st.integers(0, 5), st.booleans())
def test_string_hashes_are_the_numpy_ones(texts: list[str], skip: int, large: bool) -> None:
    """Both hashes, for any text (the lengths switch the NumPy path between its two passes),
    of sliced arrays too (offsets not starting at 0) and of large strings."""
    strings = pa.array(texts, pa.large_string() if large else pa.string()).slice(min(skip, len(texts)))
    expected = _without_kernels(strings)
    got = keys_module.string_hashes(strings)
    assert [h.tolist() for h in got] == [h.tolist() for h in expected]
    assert keys_module.first_string_hashes(strings).tolist() == expected[0].tolist()


@needs_kernels
@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.none() | _texts, max_size=30), max_size=4), st.integers(1, 70))
def test_shards_of_keys_hashed_each_are_those_of_the_distinct_keys(
    chunks: list[list[str | None]], shards: int
) -> None:
    """The router's per-key path (compiled) and its dictionary path (without): the same shards,
    null keys included, over chunked columns."""
    keys = pa.chunked_array([pa.array(chunk, pa.string()) for chunk in chunks], pa.string())
    expected = _without_kernels(keys, shards)
    assert router_module.shard_of(keys, shards).tolist() == expected.tolist()


def _without_kernels(*args: Any) -> Any:
    """string_hashes(strings) or, with a shard count, shard_of(keys, shards), on the NumPy paths."""
    saved, kernels.compiled = kernels.compiled, None
    try:
        if len(args) == 1:
            return keys_module.string_hashes(args[0])
        return router_module.shard_of(*args)
    finally:
        kernels.compiled = saved


@needs_kernels
def test_string_hashing_refuses_bounds_it_cannot_read() -> None:
    assert compiled is not None
    data = np.frombuffer(b"abcdef", np.uint8)
    multipliers = np.ones((1, 4), np.uint64)
    out = np.empty((1, 2), np.int64)
    # past the end, descending, negative, longer than the multipliers
    for bounds in ([0, 3, 7], [0, 4, 2], [-1, 2, 3], [0, 5, 6]):
        with pytest.raises(ValueError, match="bounds"):
            compiled.hash_strings(np.array(bounds, np.int64), data, multipliers, 4, 1, out)
    with pytest.raises(ValueError, match="out"):
        compiled.hash_strings(np.array([0, 1, 2], np.int64), data, multipliers, 4, 1, np.empty(1, np.int64))
    compiled.hash_strings(np.array([0, 1, 2], np.int64), data, multipliers, 4, 1, out)
    assert out.tolist() == [[ord("a") + 1, ord("b") + 1]]


def test_the_state_without_the_kernels_gives_the_features_it_gives_with_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole fold (tile sums, run merges, compactions, restarts) on the NumPy paths equals the
    compiled one, row for row."""
    from tests.test_shard_state import fold, routed_batches

    batches, _ = routed_batches(days=2.0, events=6_000, seed=11)
    monkeypatch.setattr(runs_module, "MERGE_AT_LEAST", 16)  # merges every few batches
    with_kernels = fold(tmp_path / "compiled", batches, restart_every=5, compact_every=3)
    monkeypatch.setattr(kernels, "compiled", None)
    without = fold(tmp_path / "numpy", batches, restart_every=5, compact_every=3)
    assert with_kernels == without
    assert all(with_kernels.values())
