"""Dense key ids from vectorized string hashes: first-seen order, compaction, and the collision fall-back."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from streams.engine import kernels
from streams.engine import keys as keys_module
from streams.engine.keys import KeyIndex, string_hashes


def test_hashes_tell_apart_prefixes_trailing_zero_bytes_and_unicode() -> None:
    values = ["", "a", "a\0", "\0a", "ab", "ba", "user-1", "user-10", "ü", "u\u0308", "x" * 300]
    primary, check = string_hashes(pa.array(values))
    assert len(set(primary.tolist())) == len(values)
    assert len(set(check.tolist())) == len(values)
    # A sliced array (non-zero offset) hashes its own strings, as a fresh array would.
    sliced = pa.array(["zz", *values]).slice(1)
    assert np.array_equal(string_hashes(sliced)[0], primary)
    assert np.array_equal(string_hashes(pa.array(values, pa.large_string()))[1], check)


def test_hashes_do_not_change_when_longer_strings_grow_the_multiplier_table() -> None:
    before = string_hashes(pa.array(["ad-7", "campaign-12"]))
    string_hashes(pa.array(["q" * 5_000]))
    after = string_hashes(pa.array(["ad-7", "campaign-12"]))
    assert np.array_equal(before[0], after[0]) and np.array_equal(before[1], after[1])


def test_a_string_hashes_the_same_whether_its_column_has_similar_or_varied_lengths() -> None:
    """Columns of similar lengths take a per-position pass, others a per-byte one: same hashes."""
    rng = np.random.default_rng(3)
    ids = [f"user-{i}" for i in rng.integers(0, 10**6, 500)] + ["", "a\0", "ü", "\0"]
    alone = string_hashes(pa.array(ids))
    with_free_text = string_hashes(pa.array([*ids, "a much longer free-text query " * 40]))
    for one, other in zip(alone, with_free_text, strict=True):
        assert np.array_equal(one, other[: len(ids)])
    # Definition: sum((byte_i + 1) * M[i]) modulo 2^64, with the table's multipliers.
    table = keys_module._position_multipliers(8)
    for key, h in zip(ids[:20], alone[0][:20], strict=True):
        expected = sum((b + 1) * int(m) for b, m in zip(key.encode(), table[0], strict=False)) % 2**64
        assert int(h) % 2**64 == expected


@pytest.fixture(params=["compiled", "numpy"])
def table_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test of an index runs on the compiled hash table and on the NumPy one (no compiler)."""
    if request.param == "numpy":
        monkeypatch.setattr(kernels, "compiled", None)
    elif kernels.compiled is None:
        pytest.skip("the compiled state kernels are not installed")
    return str(request.param)


def _check_index(index: KeyIndex, batches: list[list[str]]) -> None:
    expected: dict[str, int] = {key: i for i, key in enumerate(index.keys.to_pylist())}
    for batch in batches:
        ids, distinct_ids, distinct = index.ids(pa.array(batch))
        for key in batch:
            expected.setdefault(key, len(expected))
        assert ids.tolist() == [expected[key] for key in batch]
        assert distinct.to_pylist() == list(dict.fromkeys(batch))
        assert distinct_ids.tolist() == [expected[key] for key in distinct.to_pylist()]
    assert index.keys.to_pylist() == list(expected)


def test_ids_are_dense_in_first_seen_order_across_batches_and_a_reload(table_kind: str) -> None:
    rng = np.random.default_rng(3)
    batches = [[f"u{i}" for i in rng.integers(0, 5_000, 2_000)] for _ in range(6)]
    index = KeyIndex()
    _check_index(index, batches[:3])
    reloaded = KeyIndex(index.keys)
    assert len(reloaded) == len(index)
    _check_index(reloaded, batches[3:])


def test_ids_at_positions_equal_the_ids_of_the_taken_keys(table_kind: str) -> None:
    """A group's rows are positions in the batch's key column: same ids as taking them first,
    whatever else (nulls, other groups' keys) the column holds; a table that fills up mid-call
    and keys longer than the hash multipliers reach included."""
    rng = np.random.default_rng(5)
    long_key = "q" * 3_000  # past the multipliers any earlier test grew
    for size in (50, 5_000, 40_000):  # 40,000 new keys: the table grows several times in one call
        column = pa.array(
            [None if i % 7 == 0 else f"k{i}" for i in rng.integers(0, size, 3 * size)] + [long_key, None]
        )
        valid = np.flatnonzero(column.is_valid().to_numpy(zero_copy_only=False))
        positions = np.sort(rng.choice(valid, len(valid) // 2, replace=False))
        positions = np.r_[positions, len(column) - 2]
        at_positions, reference = KeyIndex(pa.array(["k3", "zz"])), KeyIndex(pa.array(["k3", "zz"]))
        ids, distinct_ids, distinct = at_positions.ids_at(column, positions)
        expected = reference.ids(column.take(pa.array(positions)))
        assert ids.tolist() == expected[0].tolist()
        assert distinct_ids.tolist() == expected[1].tolist()
        assert distinct.to_pylist() == expected[2].to_pylist()
        assert at_positions.keys.to_pylist() == reference.keys.to_pylist()
        again, _, _ = at_positions.ids_at(column, positions[::-1].copy())  # all held now: no new ids
        assert again.tolist() == ids[::-1].tolist() and len(at_positions) == len(reference)
        assert at_positions.lookup(column.take(pa.array(positions))).tolist() == ids.tolist()


def test_keep_renumbers_in_order_and_forgets_the_rest(table_kind: str) -> None:
    index = KeyIndex()
    index.ids(pa.array(["a", "b", "c", "d", "e"]))
    remap = index.keep(np.array([True, False, True, False, True]))
    assert remap.tolist() == [0, -1, 1, -1, 2]
    assert index.keys.to_pylist() == ["a", "c", "e"]
    assert index.lookup(pa.array(["b", "c", "e"])).tolist() == [-1, 1, 2]
    ids, _, _ = index.ids(pa.array(["e", "b", "a", "f"]))
    assert ids.tolist() == [2, 3, 0, 4]


@pytest.mark.parametrize("exact", [False, True])
def test_lookup_finds_held_keys_and_adds_none(
    exact: bool, table_kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deletions look users up without adding them (and without a pass over every key held)."""
    if exact:  # first hashes in two buckets: the index falls back to exact probes at once
        monkeypatch.setattr(keys_module, "PRIMARY_MASK", 1)
    index = KeyIndex()
    index.ids(pa.array(["a", "b", "c", "é", ""]))
    assert (index._exact is not None) == exact
    found = index.lookup(pa.array(["c", "x", "", "a", "é", "a ", "c"]))
    assert found.tolist() == [2, -1, 4, 0, 3, -1, 2]
    assert len(index) == 5 and index.lookup(pa.array([], pa.string())).tolist() == []


def test_a_first_hash_collision_switches_to_exact_lookups(
    table_kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keys_module, "PRIMARY_MASK", 3)  # four buckets: six keys collide
    index = KeyIndex()
    _check_index(index, [["k1", "k2"], ["k2", "k3", "k1"], ["k4", "k5", "k1", "k6"]])
    assert index._exact is not None  # the fall-back took over ...
    index.keep(np.array([False, True, True, True, False, True]))
    _check_index(index, [["k6", "k1", "k3", "k7"]])  # ... and stays exact through compaction
    ids, _, distinct = index.ids_at(pa.array(["k9", None, "k3"]), np.array([2, 0]))
    assert ids.tolist() == [1, 6] and distinct.to_pylist() == ["k3", "k9"]
