"""Dense key ids from vectorized string hashes: first-seen order, compaction, and the collision fall-back."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

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


def test_ids_are_dense_in_first_seen_order_across_batches_and_a_reload() -> None:
    rng = np.random.default_rng(3)
    batches = [[f"u{i}" for i in rng.integers(0, 5_000, 2_000)] for _ in range(6)]
    index = KeyIndex()
    _check_index(index, batches[:3])
    reloaded = KeyIndex(index.keys)
    assert len(reloaded) == len(index)
    _check_index(reloaded, batches[3:])


def test_keep_renumbers_in_order_and_forgets_the_rest() -> None:
    index = KeyIndex()
    index.ids(pa.array(["a", "b", "c", "d", "e"]))
    remap = index.keep(np.array([True, False, True, False, True]))
    assert remap.tolist() == [0, -1, 1, -1, 2]
    assert index.keys.to_pylist() == ["a", "c", "e"]
    ids, _, _ = index.ids(pa.array(["e", "b", "a", "f"]))
    assert ids.tolist() == [2, 3, 0, 4]


@pytest.mark.parametrize("exact", [False, True])
def test_lookup_finds_held_keys_and_adds_none(exact: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deletions look users up without adding them (and without a pass over every key held)."""
    if exact:  # first hashes in two buckets: the index falls back to exact probes at once
        real = keys_module.string_hashes
        monkeypatch.setattr(keys_module, "string_hashes", lambda s: (real(s)[0] % 2, real(s)[1]))
    index = KeyIndex()
    index.ids(pa.array(["a", "b", "c", "é", ""]))
    assert (index._exact is not None) == exact
    found = index.lookup(pa.array(["c", "x", "", "a", "é", "a ", "c"]))
    assert found.tolist() == [2, -1, 4, 0, 3, -1, 2]
    assert len(index) == 5 and index.lookup(pa.array([], pa.string())).tolist() == []


def test_a_first_hash_collision_switches_to_exact_lookups(monkeypatch: pytest.MonkeyPatch) -> None:
    real = keys_module.string_hashes

    def colliding(strings: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        primary, check = real(strings)
        return primary % 3, check  # three buckets: keys collide as soon as there are four

    monkeypatch.setattr(keys_module, "string_hashes", colliding)
    index = KeyIndex()
    _check_index(index, [["k1", "k2"], ["k2", "k3", "k1"], ["k4", "k5", "k1", "k6"]])
    assert index._exact is not None  # the fall-back took over ...
    index.keep(np.array([False, True, True, True, False, True]))
    _check_index(index, [["k6", "k1", "k3", "k7"]])  # ... and stays exact through compaction
