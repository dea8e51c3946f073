"""The C hot loops (indexer._native) against the pure-Python loops they replace."""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from indexer.index.protocol import TIER_BITS, TierWeights
from indexer.keys import NATIVE, block_keys_python
from indexer.scoring import prefix_match_tokens, prefix_match_tokens_python, slot_bits
from publisher.bus import pack_tokens
from tests.test_keys import CASES

if NATIVE:
    from indexer._native import chain_keys, chain_masks

# `make setup` builds the extension; only an install without a compiler may lack it.
pytestmark = pytest.mark.skipif(
    not NATIVE and os.environ.get("KV_INDEXER_ALLOW_PURE_PYTHON") == "1",
    reason="C extension not built and KV_INDEXER_ALLOW_PURE_PYTHON=1",
)

token = st.integers(min_value=0, max_value=2**32 - 1)
seed_st = st.integers(min_value=0, max_value=2**64 - 1)
fast = settings(max_examples=200, deadline=None)
WEIGHTS = TierWeights()


def test_extension_is_built() -> None:
    """The install built indexer._native (a compiler was there): the fast path is live."""
    assert NATIVE, "indexer._native is missing: run `make setup` on a machine with gcc"


class TestChainKeys:
    @pytest.mark.parametrize("case", [c for c in CASES if c["extra_keys"] is None],
                             ids=lambda c: c["name"])
    def test_vectors(self, case: dict[str, Any]) -> None:
        """The C loop reproduces the spec's vectors from ints and from packed bytes."""
        root = case["root_seed"]
        assert chain_keys(case["tokens"], case["block_size"], root) == case["keys"]
        assert chain_keys(pack_tokens(case["tokens"]), case["block_size"], root) == case["keys"]

    @fast
    @given(tokens=st.lists(token, max_size=200), block_size=st.integers(1, 40), seed=seed_st)
    def test_same_keys_as_python(self, tokens: list[int], block_size: int, seed: int) -> None:
        """Any tokens, block size and seed: C and Python give the same keys."""
        packed = pack_tokens(tokens)
        expected = block_keys_python(packed, block_size, seed)
        assert chain_keys(packed, block_size, seed) == expected
        assert chain_keys(tokens, block_size, seed) == expected
        assert chain_keys(tuple(tokens), block_size, seed) == expected
        assert chain_keys(memoryview(packed), block_size, seed) == expected
        assert chain_keys(bytearray(packed), block_size, seed) == expected

    @pytest.mark.parametrize("bad", [-1, 2**32, 2**70])
    def test_token_out_of_range(self, bad: int) -> None:
        with pytest.raises(OverflowError):
            chain_keys([1, bad, 3, 4], 2, 0)

    def test_non_int_token(self) -> None:
        with pytest.raises(TypeError):
            chain_keys([1, 2.0, 3, 4], 2, 0)

    def test_bad_arguments(self) -> None:
        with pytest.raises(ValueError, match="block_size must be > 0"):
            chain_keys(b"\0" * 8, 0, 0)
        with pytest.raises(OverflowError):
            chain_keys(b"\0" * 8, 1, -1)
        with pytest.raises(TypeError):
            chain_keys(42, 1, 0)
        with pytest.raises(TypeError):
            chain_keys(b"", 1)  # type: ignore[call-arg]

    def test_error_after_some_blocks_leaks_nothing(self) -> None:
        """A bad token in block 3 fails the call; the blocks before it are not returned."""
        tokens: list[Any] = [*range(12), "x", 0, 0, 0]
        with pytest.raises(TypeError):
            chain_keys(tokens, 4, 0)

    def test_partial_block_ignored(self) -> None:
        assert chain_keys(list(range(15)), 16, 7) == []
        assert chain_keys(pack_tokens(range(17)), 16, 7) == chain_keys(list(range(16)), 16, 7)


@st.composite
def stored_prefixes(draw: st.DrawFn) -> tuple[list[int], int, dict[int, int], int, bool]:
    """A prompt, and an index where each slot holds some prefix of it in some tiers."""
    block_size = draw(st.integers(1, 8))
    n_blocks = draw(st.integers(0, 24))
    tokens = draw(st.lists(token, min_size=n_blocks * block_size,
                           max_size=n_blocks * block_size + block_size - 1))
    seed = draw(seed_st)
    keys = block_keys_python(pack_tokens(tokens), block_size, seed)
    blocks: dict[int, int] = {}
    n_slots = draw(st.integers(1, 6))
    for slot in range(n_slots):
        held = draw(st.integers(0, len(keys)))
        for depth in range(held):
            tier = draw(st.integers(0, TIER_BITS - 1))
            bit = 1 << (slot * TIER_BITS + tier)
            blocks[keys[depth]] = blocks.get(keys[depth], 0) | bit
    # A hole: a block a slot lost mid-prefix (evicted), which must end its match there.
    if keys and draw(st.booleans()):
        blocks.pop(keys[draw(st.integers(0, len(keys) - 1))], None)
    candidates = slot_bits(draw(st.sets(st.integers(0, n_slots), min_size=1)))
    return tokens, block_size, blocks, candidates, draw(st.booleans())


class TestChainMasks:
    @fast
    @given(case=stored_prefixes(), seed=seed_st)
    def test_walk_matches_python(
            self, case: tuple[list[int], int, dict[int, int], int, bool], seed: int) -> None:
        """Scores through the C lookup loop equal the Python loop's, in every case."""
        tokens, block_size, blocks, candidates, include_zero = case
        for form in (tokens, pack_tokens(tokens)):
            for root in (seed, 0):
                kwargs: dict[str, Any] = dict(block_size=block_size, seed=root,
                                              candidates=candidates, weights=WEIGHTS,
                                              include_zero=include_zero)
                native = prefix_match_tokens(blocks, form, **kwargs)
                python = prefix_match_tokens_python(blocks, form, **kwargs)
                assert sorted(native) == sorted(python)

    def test_stops_at_first_missing_block(self) -> None:
        keys = block_keys_python(pack_tokens(range(12)), 4, 9)
        blocks = {keys[0]: 1, keys[2]: 1}
        assert chain_masks(blocks, list(range(12)), 4, 9, None) == [1]

    def test_stops_where_no_wanted_bit_is_set(self) -> None:
        """A block held only by slots outside `wanted` ends the lookups."""
        keys = block_keys_python(pack_tokens(range(12)), 4, 9)
        blocks = {keys[0]: 0b1_0001, keys[1]: 0b1_0000, keys[2]: 0b1_0001}
        assert chain_masks(blocks, list(range(12)), 4, 9, 0b1111) == [0b1_0001]
        assert chain_masks(blocks, list(range(12)), 4, 9, None) == [0b1_0001, 0b1_0000, 0b1_0001]

    def test_needs_a_dict(self) -> None:
        with pytest.raises(TypeError, match="dict"):
            chain_masks([], [1, 2], 1, 0, None)  # type: ignore[arg-type]
