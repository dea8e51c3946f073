"""Block keys (kvcore.keys) against the spec: vectors, properties, errors."""

from __future__ import annotations

import importlib.util
import struct
from array import array
from types import ModuleType
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kvcore.bus import pack_tokens
from kvcore.keys import (
    KEY_SCHEME,
    MultimodalItem,
    block_extra_key,
    block_keys,
    block_keys_for_tokens,
    block_keys_packed,
    multimodal_extra_keys,
    pack_keys,
    root_seed,
)
from tests.support.key_vectors import CASES, VECTORS, VECTORS_DIR

U64_MAX = 2**64 - 1


def _load_reference() -> ModuleType:
    """The independent implementation that wrote the vectors (not a package: load by path)."""
    path = VECTORS_DIR / "make_block_keys.py"
    spec = importlib.util.spec_from_file_location("make_block_keys", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REF = _load_reference()


def _extra(case: dict[str, Any]) -> list[bytes] | None:
    hexes = case["extra_keys"]
    return None if hexes is None else [bytes.fromhex(x) for x in hexes]


token = st.integers(min_value=0, max_value=2**32 - 1)
name = st.one_of(st.none(), st.text(max_size=12))
fast = settings(max_examples=100, deadline=None)


class TestVectors:
    @pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
    def test_root_seed(self, case: dict[str, Any]) -> None:
        """root_seed reproduces the vector's root seed (scheme tag + length-prefixed names)."""
        assert root_seed(case["model"], case["lora_name"], case["cache_salt"]) == case["root_seed"]

    @pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
    def test_keys_from_token_list(self, case: dict[str, Any]) -> None:
        """block_keys_for_tokens reproduces the vector's keys from a list of token ids."""
        keys = block_keys_for_tokens(
            case["tokens"],
            case["block_size"],
            case["model"],
            lora_name=case["lora_name"],
            cache_salt=case["cache_salt"],
            extra_keys=_extra(case),
        )
        assert keys == case["keys"]

    @pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
    def test_keys_from_packed_bytes(self, case: dict[str, Any]) -> None:
        """block_keys over packed u32 LE bytes, seeded with the root, reproduces the keys."""
        packed = struct.pack(f"<{len(case['tokens'])}I", *case["tokens"])
        keys = block_keys(packed, case["block_size"], case["root_seed"], _extra(case))
        assert keys == case["keys"]

    def test_keys_are_u64(self) -> None:
        """Every vector key is an unsigned 64-bit int and some exceed 2**63 (no signed folding)."""
        keys = [k for c in CASES for k in [c["root_seed"], *c["keys"]]]
        assert all(isinstance(k, int) and 0 <= k <= U64_MAX for k in keys)
        assert any(k >= 2**63 for k in keys)

    def test_file_matches_generator(self) -> None:
        """block_keys.json is exactly what make_block_keys.py writes (no hand edits, no drift)."""
        assert REF.build() == VECTORS
        assert VECTORS["scheme"] == KEY_SCHEME.decode()

    def test_vectors_cover_the_brief(self) -> None:
        """The vector set keeps covering the edge cases a port must get right."""
        by_name = {c["name"]: c for c in CASES}
        assert {1, 16, 32} <= {c["block_size"] for c in CASES}
        assert any(c["model"] == "" for c in CASES)
        assert any(
            not c["model"].isascii() and "/" in c["model"] and "." in c["model"] for c in CASES
        )
        assert any(c["lora_name"] and c["cache_salt"] for c in CASES)
        assert any(c["lora_name"] and not c["cache_salt"] for c in CASES)
        assert any(c["cache_salt"] and not c["lora_name"] for c in CASES)
        assert any(len(c["tokens"]) % c["block_size"] and c["keys"] for c in CASES)
        assert any(c["tokens"] and not c["keys"] for c in CASES)
        assert any(c["extra_keys"] and "" in c["extra_keys"] for c in CASES)
        assert any(2**32 - 1 in c["tokens"] for c in CASES)
        assert len(by_name) == len(CASES)
        # "" and None are the same lora/salt.
        assert by_name["lora_empty_equals_none"]["keys"] == by_name["worked_example"]["keys"]
        assert by_name["lora"]["root_seed"] != by_name["worked_example"]["root_seed"]
        mm_cases = [c for c in CASES if c["mm_items"]]
        assert any(c["embeds_digests"] for c in CASES)
        assert any(len(c["mm_items"]) > 1 for c in mm_cases)
        assert any(not c["model"].isascii() or not item[0].isascii()
                   for c in mm_cases for item in c["mm_items"])
        assert any("f5ffffffffffffff" in x for c in mm_cases for x in c["extra_keys"])  # -11


MM_CASES = [c for c in CASES if c["mm_items"] is not None or c["embeds_digests"] is not None]


class TestMultimodalExtraKeys:
    """The canonical extra keys a router derives from its prompt's media (docs/block-keys.md)."""

    @pytest.mark.parametrize("case", MM_CASES, ids=[c["name"] for c in MM_CASES])
    def test_vectors(self, case: dict[str, Any]) -> None:
        """multimodal_extra_keys reproduces each vector's extra keys from its media."""
        items = [MultimodalItem(*item) for item in case["mm_items"] or []]
        digests = (None if case["embeds_digests"] is None
                   else [bytes.fromhex(d) for d in case["embeds_digests"]])
        extra = multimodal_extra_keys(items, len(case["tokens"]), case["block_size"], digests)
        assert extra is not None and [x.hex() for x in extra] == case["extra_keys"]

    def test_item_bytes(self) -> None:
        """One item: tag "m", u32 LE byte length, UTF-8 identifier, i64 LE offset; a digest:
        tag "e", u32 LE length, the digest."""
        assert block_extra_key([("é", -1)], [b"\x01\x02"]) == (
            b"m\x02\x00\x00\x00\xc3\xa9" + b"\xff" * 8 + b"e\x02\x00\x00\x00\x01\x02")
        assert block_extra_key() == b""

    def test_no_media_is_none(self) -> None:
        """Without media (or with media only in the partial tail) there are no extra keys."""
        assert multimodal_extra_keys([], 32, 16) is None
        assert multimodal_extra_keys([MultimodalItem("x", 33, 4)], 40, 16) is None

    def test_identifier_and_offset_are_unambiguous(self) -> None:
        """Length prefixes keep ("ab", offset) and ("a", ...) apart; item order matters."""
        a = block_extra_key([("ab", 0)])
        b = block_extra_key([("a", int.from_bytes(b"b" + bytes(7), "little"))])
        assert a != b
        assert block_extra_key([("x", 0), ("y", 1)]) != block_extra_key([("y", 1), ("x", 0)])

    def test_errors(self) -> None:
        with pytest.raises(ValueError, match="block_size must be > 0"):
            multimodal_extra_keys([], 4, 0)
        with pytest.raises(ValueError, match="embeds_digests has 1 entries for 2 blocks"):
            multimodal_extra_keys([], 8, 4, [b"x"])


class TestAgainstReference:
    @fast
    @given(
        model=st.text(max_size=20),
        lora=name,
        salt=name,
        tokens=st.lists(token, max_size=70),
        block_size=st.integers(1, 9),
    )
    def test_matches_independent_implementation(
        self, model: str, lora: str | None, salt: str | None, tokens: list[int], block_size: int
    ) -> None:
        """On arbitrary inputs the canonical keys equal the naive spec implementation's."""
        root = REF.reference_root_seed(model, lora, salt)
        assert root_seed(model, lora, salt) == root
        expected = REF.reference_keys(tokens, block_size, root, None)
        assert (
            block_keys_for_tokens(tokens, block_size, model, lora_name=lora, cache_salt=salt)
            == expected
        )

    @fast
    @given(
        blocks=st.lists(
            st.tuples(st.lists(token, min_size=4, max_size=4), st.binary(max_size=12)), max_size=8
        )
    )
    def test_extra_keys_match_independent_implementation(
        self, blocks: list[tuple[list[int], bytes]]
    ) -> None:
        """Extra key bytes are appended to their block's token bytes exactly as specified."""
        tokens = [t for block, _ in blocks for t in block]
        extra = [e for _, e in blocks]
        root = REF.reference_root_seed("m", None, None)
        assert block_keys_for_tokens(tokens, 4, "m", extra_keys=extra) == REF.reference_keys(
            tokens, 4, root, extra
        )


class TestProperties:
    @fast
    @given(
        tokens=st.lists(token, max_size=80), block_size=st.integers(1, 8), cut=st.integers(0, 80)
    )
    def test_prefix_keys_are_prefix(self, tokens: list[int], block_size: int, cut: int) -> None:
        """Chaining: the keys of a token prefix are a prefix of the full prompt's keys."""
        full = block_keys_for_tokens(tokens, block_size, "m")
        prefix = block_keys_for_tokens(tokens[:cut], block_size, "m")
        assert prefix == full[: len(prefix)]
        assert len(prefix) == min(cut, len(tokens)) // block_size

    @fast
    @given(
        tokens=st.lists(token, min_size=1, max_size=40),
        block_size=st.integers(1, 4),
        pos=st.integers(0, 39),
        delta=st.integers(1, 2**32 - 1),
    )
    def test_change_propagates(
        self, tokens: list[int], block_size: int, pos: int, delta: int
    ) -> None:
        """Chaining: changing one token changes its block's key and every later key only."""
        covered = len(tokens) // block_size * block_size
        assume(covered > 0)
        pos %= covered
        changed = list(tokens)
        changed[pos] = (changed[pos] + delta) % 2**32
        a = block_keys_for_tokens(tokens, block_size, "m")
        b = block_keys_for_tokens(changed, block_size, "m")
        first = pos // block_size
        assert a[:first] == b[:first]
        assert all(x != y for x, y in zip(a[first:], b[first:], strict=True))

    @fast
    @given(
        a=st.tuples(st.text(max_size=8), name, name),
        b=st.tuples(st.text(max_size=8), name, name),
        tokens=st.lists(token, min_size=4, max_size=4),
    )
    def test_namespace_changes_first_key(
        self,
        a: tuple[str, str | None, str | None],
        b: tuple[str, str | None, str | None],
        tokens: list[int],
    ) -> None:
        """Different model/lora/salt (None == "") give a different root and first key."""
        norm_a = tuple(x or "" for x in a)
        norm_b = tuple(x or "" for x in b)
        keys_a = block_keys_for_tokens(tokens, 4, a[0], lora_name=a[1], cache_salt=a[2])
        keys_b = block_keys_for_tokens(tokens, 4, b[0], lora_name=b[1], cache_salt=b[2])
        if norm_a == norm_b:
            assert keys_a == keys_b
        else:
            assert root_seed(*a) != root_seed(*b)
            assert keys_a[0] != keys_b[0]

    def test_field_boundaries_matter(self) -> None:
        """Length prefixes keep ("ab","c") and ("a","bc") apart, and each field has its slot."""
        assert root_seed("ab", "c") != root_seed("a", "bc")
        assert root_seed("m", "x", None) != root_seed("m", None, "x")
        assert root_seed("m", "", None) == root_seed("m", None, "") == root_seed("m")

    @fast
    @given(tokens=st.lists(token, max_size=80), block_size=st.integers(1, 8), k=st.integers(1, 10))
    def test_resume_from_key(self, tokens: list[int], block_size: int, k: int) -> None:
        """block_keys(tokens[k*bs*4:], seed=keys[k-1]) equals keys[k:] (resuming the chain)."""
        packed = pack_tokens(tokens)
        keys = block_keys(packed, block_size, root_seed("m"))
        assume(keys)
        k = 1 + (k - 1) % len(keys)
        assert block_keys(packed[k * block_size * 4 :], block_size, keys[k - 1]) == keys[k:]

    @fast
    @given(
        tokens=st.lists(token, max_size=80),
        block_size=st.integers(1, 8),
        model=st.text(max_size=10),
        lora=name,
        salt=name,
    )
    def test_list_array_packed_agree(
        self, tokens: list[int], block_size: int, model: str, lora: str | None, salt: str | None
    ) -> None:
        """List input, array('I') input, packed bytes and a memoryview give the same keys."""
        seed = root_seed(model, lora, salt)
        packed = pack_tokens(tokens)
        from_list = block_keys_for_tokens(
            tokens, block_size, model, lora_name=lora, cache_salt=salt
        )
        assert from_list == block_keys_for_tokens(
            array("I", tokens), block_size, model, lora_name=lora, cache_salt=salt
        )
        assert from_list == block_keys(packed, block_size, seed)
        assert from_list == block_keys(memoryview(packed), block_size, seed)
        assert len(from_list) == len(tokens) // block_size

    def test_partial_tail_ignored(self) -> None:
        """Only full blocks get keys: a trailing partial block adds no key and changes none."""
        tokens = list(range(40))
        assert block_keys_for_tokens(tokens, 16, "m") == block_keys_for_tokens(tokens[:32], 16, "m")
        assert len(block_keys_for_tokens(tokens, 16, "m")) == 2
        assert block_keys_for_tokens(tokens[:15], 16, "m") == []
        assert block_keys(b"", 16, root_seed("m")) == []

    def test_empty_extra_equals_no_extra(self) -> None:
        """An empty extra-key entry is the same as no extra keys; a non-empty one changes keys."""
        tokens = list(range(48))
        plain = block_keys_for_tokens(tokens, 16, "m")
        assert block_keys_for_tokens(tokens, 16, "m", extra_keys=[b"", b"", b""]) == plain
        mixed = block_keys_for_tokens(tokens, 16, "m", extra_keys=[b"", b"\x01", b""])
        assert mixed[0] == plain[0]
        assert mixed[1] != plain[1] and mixed[2] != plain[2]

    def test_keys_are_plain_ints(self) -> None:
        """Keys are Python ints in the unsigned 64-bit range (never negative)."""
        keys = block_keys_for_tokens(list(range(16 * 64)), 16, "m")
        assert all(type(k) is int and 0 <= k <= U64_MAX for k in keys)
        assert type(root_seed("m")) is int


class TestErrors:
    @pytest.mark.parametrize("block_size", [0, -1, -16])
    def test_block_size_must_be_positive(self, block_size: int) -> None:
        """block_size <= 0 raises ValueError from both entry points (even with no tokens)."""
        with pytest.raises(ValueError, match="block_size"):
            block_keys(pack_tokens(range(32)), block_size, 0)
        with pytest.raises(ValueError, match="block_size"):
            block_keys(b"", block_size, 0)
        with pytest.raises(ValueError, match="block_size"):
            block_keys_for_tokens(list(range(32)), block_size, "m")

    def test_extra_keys_shorter_than_blocks(self) -> None:
        """extra_keys with fewer entries than full blocks raises ValueError naming the counts."""
        with pytest.raises(ValueError, match="1 entries for 2 blocks"):
            block_keys(pack_tokens(range(32)), 16, 0, [b"x"])
        with pytest.raises(ValueError, match="0 entries for 1 blocks"):
            block_keys_for_tokens(list(range(16)), 16, "m", extra_keys=[])

    def test_extra_keys_for_zero_blocks(self) -> None:
        """With no full block, an empty extra_keys list is fine and yields no keys."""
        assert block_keys(pack_tokens(range(15)), 16, 0, []) == []

    @pytest.mark.parametrize("bad", [-1, 2**32])
    def test_token_out_of_u32_range(self, bad: int) -> None:
        """Token ids outside 0..2**32-1 are rejected instead of silently wrapping."""
        with pytest.raises(OverflowError):
            block_keys_for_tokens([1, 2, bad, 4], 2, "m")


class TestPacked:
    """The keys Redis is sent: u64 little-endian, 8 bytes per block, C or Python."""

    @settings(max_examples=100, deadline=None)
    @given(tokens=st.lists(st.integers(0, 2**32 - 1), max_size=100),
           block_size=st.integers(1, 8), seed=st.integers(0, 2**64 - 1))
    def test_packed_keys_are_the_keys_little_endian(self, tokens: list[int], block_size: int,
                                                    seed: int) -> None:
        keys = block_keys(pack_tokens(tokens), block_size, seed)
        expected = b"".join(key.to_bytes(8, "little") for key in keys)
        assert pack_keys(keys) == expected
        assert block_keys_packed(pack_tokens(tokens), block_size, seed) == expected
        assert block_keys_packed(tokens, block_size, seed) == expected

    @pytest.mark.parametrize("bad", [-1, 2**64])
    def test_key_out_of_u64_range(self, bad: int) -> None:
        with pytest.raises(OverflowError):
            pack_keys([1, bad])

    def test_python_fallback(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without the C extension the same bytes come from the Python loop."""
        import kvcore.keys as keys_module

        tokens = list(range(64))
        expected = block_keys_packed(tokens, 4, 7)
        monkeypatch.setattr(keys_module, "_native", None)
        assert keys_module.block_keys_packed(tokens, 4, 7) == expected
        assert len(expected) == 16 * 8
