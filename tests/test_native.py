"""The C hot loops (kvcore._native) against the pure-Python loops they replace."""

from __future__ import annotations

import itertools
import os
import random
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from indexer.index.block_table import DictBlockTable, unpack_keys
from indexer.index.protocol import TIER_BITS, TierWeights
from indexer.index.scoring import prefix_match, prefix_match_runs, slot_bits
from kvcore.bus import pack_tokens
from kvcore.keys import NATIVE, block_keys_python, pack_keys
from tests.support.key_vectors import CASES
from tests.support.protobuf_wire import unpacked_tokens, varint

if NATIVE:
    from kvcore._native import BlockTable, chain_keys, chain_keys_packed

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
    """The install built kvcore._native (a compiler was there): the fast path is live."""
    assert NATIVE, "kvcore._native is missing: run `make setup` on a machine with gcc"


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

    @fast
    @given(tokens=st.lists(token, max_size=200), block_size=st.integers(1, 40), seed=seed_st)
    def test_packed_keys(self, tokens: list[int], block_size: int, seed: int) -> None:
        """chain_keys_packed is the Python keys as u64 little-endian, from ints or bytes."""
        expected = pack_keys(block_keys_python(pack_tokens(tokens), block_size, seed))
        assert chain_keys_packed(pack_tokens(tokens), block_size, seed) == expected
        assert chain_keys_packed(tokens, block_size, seed) == expected

    def test_packed_keys_byte_order(self) -> None:
        [key] = chain_keys([1, 2], 2, 7)
        assert chain_keys_packed([1, 2], 2, 7) == key.to_bytes(8, "little")

    @pytest.mark.parametrize("bad", [-1, 2**32, 2**70])
    def test_token_out_of_range(self, bad: int) -> None:
        with pytest.raises(OverflowError):
            chain_keys([1, bad, 3, 4], 2, 0)
        with pytest.raises(OverflowError):
            chain_keys_packed([1, bad, 3, 4], 2, 0)

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


U64 = st.integers(min_value=0, max_value=2**64 - 1)
# Few distinct keys, so operations hit the same entries again and again.
key_pool = st.lists(U64, min_size=1, max_size=40, unique=True)


@st.composite
def table_ops(draw: st.DrawFn) -> list[tuple[str, list[int], int]]:
    keys = draw(key_pool)
    ops = []
    for _ in range(draw(st.integers(1, 60))):
        chosen = draw(st.lists(st.sampled_from(keys), max_size=12))
        bitpos = draw(st.integers(0, 4 * 70))
        ops.append((draw(st.sampled_from(["set", "clear"])), chosen, bitpos))
    return ops


def apply_ops(table: Any, ops: list[tuple[str, list[int], int]]) -> None:
    for op, keys, bitpos in ops:
        if op == "set":
            table.set_bits(keys, 1 << bitpos)
        else:
            table.clear_bits(keys, ~(1 << bitpos))


class TestBlockTable:
    @fast
    @given(ops=table_ops(), secret=U64, probe=U64)
    def test_same_contents_as_dict(
            self, ops: list[tuple[str, list[int], int]], secret: int, probe: int) -> None:
        """Any sequence of set/clear: the C table holds exactly what the dict holds."""
        native, reference = BlockTable(secret=secret), DictBlockTable()
        apply_ops(native, ops)
        apply_ops(reference, ops)
        assert sorted(native.items()) == sorted(reference.items())
        assert len(native) == len(reference)
        assert all(mask for _, mask in native.items())  # zero masks are dropped
        for key in [*reference, probe]:
            assert native.get(key, 0) == reference.get(key, 0)

    def test_many_keys_with_deletes_keep_every_probe_run_intact(self) -> None:
        """Grow to 200k keys, delete every third, shrink to a few: lookups stay exact.

        Deleting shifts later members of a probe run back; a wrong shift would lose keys
        that sit past a deleted one in the same run.
        """
        rng = random.Random(7)
        keys = list({rng.getrandbits(64) for _ in range(200_000)})
        table = BlockTable(secret=rng.getrandbits(64))
        table.set_bits(keys, 1)
        table.set_bits(keys[::2], 2)
        table.clear_bits(keys[::3], ~1 & ~2)
        kept = {k for i, k in enumerate(keys) if i % 3}
        assert len(table) == len(kept)
        for i, key in enumerate(keys):
            expected = 0 if i % 3 == 0 else (1 | (2 if i % 2 == 0 else 0))
            assert table.get(key, 0) == expected
        table.clear_bits(keys[: 199_000], -4)  # keep only higher bits: every mask -> 0
        assert len(table) == len([k for k in keys[199_000:] if k in kept])
        assert sorted(k for k, _ in table.items()) == sorted(k for k in keys[199_000:]
                                                             if k in kept)

    def test_bad_arguments(self) -> None:
        table = BlockTable()
        with pytest.raises(TypeError, match="bit must be an int"):
            table.set_bits([1], 1.0)  # type: ignore[arg-type]
        with pytest.raises(OverflowError, match="block key"):
            table.set_bits([2**64], 1)
        with pytest.raises(OverflowError):
            table.get(-1, 0)
        with pytest.raises(TypeError):
            table.set_bits(5, 1)  # type: ignore[arg-type]
        assert len(table) == 0
        assert table.get(3, 9) == 9

    def test_clear_empties(self) -> None:
        table = BlockTable()
        table.set_bits(range(1000), 1)
        table.clear()
        assert len(table) == 0 and table.items() == [] and table.get(5, 0) == 0
        table.set_bits([5], 4)
        assert table.items() == [(5, 4)]


@st.composite
def stored_prefixes(draw: st.DrawFn) -> tuple[list[int], int, int, list[tuple[int, int]], int]:
    """A prompt, and presence where each slot holds some prefix of it in some tiers."""
    block_size = draw(st.integers(1, 8))
    n_blocks = draw(st.integers(0, 24))
    tokens = draw(st.lists(token, min_size=n_blocks * block_size,
                           max_size=n_blocks * block_size + block_size - 1))
    seed = draw(seed_st)
    keys = block_keys_python(pack_tokens(tokens), block_size, seed)
    presence: dict[int, int] = {}
    n_slots = draw(st.integers(1, 6))
    for slot in range(n_slots):
        for depth in range(draw(st.integers(0, len(keys)))):
            bit = 1 << (slot * TIER_BITS + draw(st.integers(0, TIER_BITS - 1)))
            presence[keys[depth]] = presence.get(keys[depth], 0) | bit
    # A hole: a block evicted mid-prefix, which must end every match there.
    if keys and draw(st.booleans()):
        presence.pop(keys[draw(st.integers(0, len(keys) - 1))], None)
    candidates = slot_bits(draw(st.sets(st.integers(0, n_slots), min_size=1)))
    return tokens, block_size, seed, sorted(presence.items()), candidates


def expand(runs: list[int]) -> list[int]:
    """Runs [mask, count, ...] as one mask per block."""
    return [mask for i in range(0, len(runs), 2) for mask in [runs[i]] * runs[i + 1]]


class TestMaskRuns:
    @fast
    @given(case=stored_prefixes(), include_zero=st.booleans())
    def test_same_runs_and_scores_as_dict(
            self, case: tuple[list[int], int, int, list[tuple[int, int]], int],
            include_zero: bool) -> None:
        """The C table's hash-and-look-up loop returns the dict table's runs, and the run
        walk scores exactly like the per-block walk, for ids and packed bytes."""
        tokens, block_size, seed, presence, candidates = case
        native, reference = BlockTable(secret=seed), DictBlockTable()
        for key, mask in presence:
            native.set_bits([key], mask)
            reference.set_bits([key], mask)
        for form in (tokens, pack_tokens(tokens)):
            for wanted in (candidates * 15, None):
                expected = reference.mask_runs(form, block_size, seed, wanted)
                assert native.mask_runs(form, block_size, seed, wanted) == expected
                runs = expected[1::2]
                assert all(n > 0 for n in runs)
                masks = expected[0::2]
                assert all(a != b for a, b in itertools.pairwise(masks))
            runs = native.mask_runs(form, block_size, seed, candidates * 15)
            every_block = expand(reference.mask_runs(form, block_size, seed, None))
            assert sorted(prefix_match_runs(runs, candidates, WEIGHTS, include_zero)) == sorted(
                prefix_match(every_block, candidates, WEIGHTS, include_zero))

    @fast
    @given(case=stored_prefixes())
    def test_keys_out_and_get_many_as_dict(
            self, case: tuple[list[int], int, int, list[tuple[int, int]], int]) -> None:
        """`keys_out` gets the keys of exactly the blocks the runs cover, as the dict table
        gives them; `get_many` looks up packed keys like `get` (0 when missing), and
        `get_present` maps the positions of the held ones to their masks."""
        tokens, block_size, seed, presence, candidates = case
        native, reference = BlockTable(secret=seed), DictBlockTable()
        for key, mask in presence:
            native.set_bits([key], mask)
            reference.set_bits([key], mask)
        for wanted in (candidates * 15, None):
            native_keys, reference_keys = bytearray(), bytearray()
            runs = native.mask_runs(tokens, block_size, seed, wanted, native_keys)
            assert runs == reference.mask_runs(tokens, block_size, seed, wanted,
                                               reference_keys)
            assert native_keys == reference_keys
            all_keys = block_keys_python(pack_tokens(tokens), block_size, seed)
            assert len(native_keys) == 8 * sum(runs[1::2])
            assert native_keys == pack_keys(all_keys[: sum(runs[1::2])])
        packed = pack_keys([*block_keys_python(pack_tokens(tokens), block_size, seed), 7, 8])
        expected = [reference.get(k, 0) for k in unpack_keys(packed)]
        assert native.get_many(packed) == reference.get_many(packed) == expected
        held = {i: mask for i, mask in enumerate(expected) if mask}
        assert native.get_present(packed) == reference.get_present(packed) == held
        for bad in (native.get_many, native.get_present):
            with pytest.raises(ValueError, match="8 bytes"):
                bad(b"\x00" * 9)

    def test_stops_at_first_missing_block(self) -> None:
        keys = block_keys_python(pack_tokens(range(12)), 4, 9)
        table = BlockTable()
        table.set_bits([keys[0], keys[2]], 1)
        assert table.mask_runs(list(range(12)), 4, 9, None) == [1, 1]

    def test_stops_where_no_wanted_bit_is_set(self) -> None:
        """A block held only by slots outside `wanted` ends the lookups."""
        keys = block_keys_python(pack_tokens(range(12)), 4, 9)
        table = BlockTable()
        table.set_bits([keys[0], keys[2]], 0b1_0001)
        table.set_bits([keys[1]], 0b1_0000)
        assert table.mask_runs(list(range(12)), 4, 9, 0b1111) == [0b1_0001, 1]
        assert table.mask_runs(list(range(12)), 4, 9, None) == [
            0b1_0001, 1, 0b1_0000, 1, 0b1_0001, 1]

    def test_equal_masks_make_one_run_across_prefetch_chunks(self) -> None:
        """Prompts longer than the prefetch window: every block is looked up, in order."""
        tokens = list(range(16 * 37))
        keys = block_keys_python(pack_tokens(tokens), 16, 3)
        table = BlockTable()
        table.set_bits(keys, 0b1)
        table.set_bits(keys[:30], 0b1_0000)
        assert table.mask_runs(tokens, 16, 3, None) == [0b1_0001, 30, 0b1, 7]
        assert table.mask_runs(tokens[: 16 * 20 + 5], 16, 3, None) == [0b1_0001, 20]
        table.set_bits(keys[10:11], 0b100)
        assert table.mask_runs(tokens, 16, 3, None) == [
            0b1_0001, 10, 0b1_0101, 1, 0b1_0001, 19, 0b1, 7]


def without_tokens(message: Any) -> Any:
    """A copy of a ScoreRequest or FindBestWorkerRequest with token_ids cleared."""
    copy = type(message)()
    copy.CopyFrom(message)
    (copy.score if hasattr(copy, "score") else copy).ClearField("token_ids")
    return copy


class TestTakeUint32Field:
    @fast
    @given(tokens=st.lists(token, max_size=300),
           workers=st.lists(st.text(max_size=5), max_size=3))
    def test_values_and_rest_as_protobuf_sees_them(
            self, tokens: list[int], workers: list[str]) -> None:
        """The values come out packed; the rest parses to the message without them."""
        from indexer._proto.kvindex.v1 import indexer_pb2 as pb
        from kvcore._native import take_uint32_field

        request = pb.ScoreRequest(model="m", token_ids=tokens, workers=workers, block_size=16,
                                  block_keys=[2**64 - 1], include_zero=True)
        values, rest = take_uint32_field(request.SerializeToString(), (10,))
        assert values == pack_tokens(tokens)
        assert pb.ScoreRequest.FromString(rest) == without_tokens(request)
        nested = pb.FindBestWorkerRequest(score=request, overlap_weight=2.0,
                                          loads=[pb.WorkerLoad(worker_id="w", active_blocks=7)])
        values, rest = take_uint32_field(nested.SerializeToString(), (1, 10))
        assert values == pack_tokens(tokens)
        assert pb.FindBestWorkerRequest.FromString(rest) == without_tokens(nested)

    @fast
    @given(first=st.lists(token, max_size=20), second=st.lists(token, max_size=20))
    def test_unpacked_and_split_occurrences_concatenate(
            self, first: list[int], second: list[int]) -> None:
        """Unpacked values, and several occurrences of the field (or of the enclosing
        message), are appended in order: what protobuf's own parser makes of them."""
        from indexer._proto.kvindex.v1 import indexer_pb2 as pb
        from kvcore._native import take_uint32_field

        raw = (unpacked_tokens(10, first) + pb.ScoreRequest(model="m").SerializeToString()
               + pb.ScoreRequest(token_ids=second).SerializeToString())
        parsed = pb.ScoreRequest.FromString(raw)
        assert list(parsed.token_ids) == first + second
        values, rest = take_uint32_field(raw, (10,))
        assert values == pack_tokens(first + second)
        assert pb.ScoreRequest.FromString(rest) == pb.ScoreRequest(model="m")
        inner = [pb.ScoreRequest(token_ids=part, workers=["w"]).SerializeToString()
                 for part in (first, second)]
        outer = b"".join(varint(1 << 3 | 2) + varint(len(m)) + m for m in inner)
        merged = pb.FindBestWorkerRequest.FromString(outer)
        assert list(merged.score.token_ids) == first + second
        values, rest = take_uint32_field(outer, (1, 10))
        assert values == pack_tokens(first + second)
        assert pb.FindBestWorkerRequest.FromString(rest) == without_tokens(merged)

    def test_wide_varints_truncate_like_uint32(self) -> None:
        from indexer._proto.kvindex.v1 import indexer_pb2 as pb
        from kvcore._native import take_uint32_field

        raw = varint(10 << 3) + varint(2**40 + 5)
        assert list(pb.ScoreRequest.FromString(raw).token_ids) == [5]
        assert take_uint32_field(raw, (10,)) == (pack_tokens([5]), b"")

    @pytest.mark.parametrize("value", [0, 127, 128, 2**32 - 1, 2**32, 2**63, 2**64 - 1])
    def test_every_varint_width_with_and_without_room(self, value: int) -> None:
        """Short and 10-byte varints, near the end of the bytes and far from it."""
        from indexer._proto.kvindex.v1 import indexer_pb2 as pb
        from kvcore._native import take_uint32_field

        tail = pb.ScoreRequest(model="x" * 30).SerializeToString()
        for raw in (varint(10 << 3) + varint(value),
                    varint(10 << 3) + varint(value) + tail,
                    varint(10 << 3 | 2) + varint(len(varint(value)) * 2) + varint(value) * 2
                    + tail):
            expected = list(pb.ScoreRequest.FromString(raw).token_ids)
            assert expected[0] == value % 2**32
            values, _ = take_uint32_field(raw, (10,))
            assert values == pack_tokens(expected)

    def test_no_such_field(self) -> None:
        from kvcore._native import take_uint32_field

        assert take_uint32_field(b"", (10,)) == (b"", b"")
        raw = varint(1 << 3 | 2) + varint(1) + b"m"
        assert take_uint32_field(raw, (10,)) == (b"", raw)

    @pytest.mark.parametrize("raw", [
        varint(10 << 3) + b"\x80",  # truncated varint
        varint(10 << 3 | 2) + varint(9) + b"\x01",  # length past the end
        varint(3 << 3 | 1) + b"\0" * 3,  # truncated fixed64
        varint(3 << 3 | 3),  # group wire type
        varint(10 << 3) + b"\xff" * 11,  # varint over 10 bytes
    ])
    def test_malformed_is_value_error(self, raw: bytes) -> None:
        from kvcore._native import take_uint32_field

        with pytest.raises(ValueError):
            take_uint32_field(raw, (10,))

    def test_bad_path(self) -> None:
        from kvcore._native import take_uint32_field

        for path in ((), (0,), (2**29,), tuple(range(1, 10))):
            with pytest.raises(ValueError):
                take_uint32_field(b"", path)
        with pytest.raises(TypeError):
            take_uint32_field(b"", [10])  # type: ignore[arg-type]


class TestPackLogEntries:
    @fast
    @given(entries=st.dictionaries(U64, st.tuples(U64, st.integers(0, 15)), max_size=30),
           gone=st.lists(U64, max_size=10))
    def test_same_records_as_python(
            self, entries: dict[int, tuple[int, int]], gone: list[int]) -> None:
        """M records for mapped hashes (tiers default 0), D for the rest, in order."""
        from indexer.index.ledger import pack_log_entries_python
        from kvcore._native import pack_log_entries

        keys = {h: key for h, (key, _) in entries.items()}
        tiers = {h: t for h, (_, t) in entries.items() if t}
        hashes = [*entries, *gone]
        expected = pack_log_entries_python(hashes, keys, tiers)
        assert pack_log_entries(hashes, keys, tiers) == expected
        assert pack_log_entries(set(hashes), keys, tiers) == pack_log_entries_python(
            set(hashes), keys, tiers)

    def test_bad_values(self) -> None:
        from kvcore._native import pack_log_entries

        with pytest.raises(OverflowError):
            pack_log_entries([1], {1: 2}, {1: 256})
        with pytest.raises(OverflowError):
            pack_log_entries([-1], {}, {})
        with pytest.raises(TypeError):
            pack_log_entries([1], [], {})  # type: ignore[arg-type]


# --- sub-slot Score: split and merge (native/subslot.c, indexer/index/redis_sharded.py) ---

subslot_query = st.lists(st.integers(0, 2**64 - 1), max_size=80)


def _subslot_replies(parts: list[tuple[bytes, bytes]], held: set[int],
                     values: dict[int, bytes]) -> list[list[Any]]:
    """Each sub-slot's reply as subslot_score.lua builds it: runs of its keys' values up to
    its first key not in `held`."""
    replies: list[list[Any]] = []
    for packed, _ in parts:
        runs: list[Any] = []
        for (key,) in struct.iter_unpack("<Q", packed):
            if key not in held:
                break
            if runs and runs[-2] == values[key]:
                runs[-1] += 1
            else:
                runs += [values[key], 1]
        replies.append(runs)
    return replies


@fast
@given(keys=subslot_query, subslots=st.integers(1, 7), data=st.data())
def test_subslot_split_and_merge_match_python(keys: list[int], subslots: int,
                                              data: st.DataObject) -> None:
    """The C split and merge equal the pure-Python twins, and the merge equals a plain walk
    of the query's values up to the first key nobody holds."""
    from indexer.index.redis_sharded import _merge_py, _split_py
    from kvcore._native import subslot_merge, subslot_split

    packed = pack_keys(keys)
    parts = subslot_split(packed, subslots)
    assert parts == _split_py(packed, subslots)
    assert sorted(key for p, _ in parts for (key,) in struct.iter_unpack("<Q", p)) == sorted(keys)
    held = {key for key in keys if data.draw(st.booleans())}
    values = {key: data.draw(st.sampled_from([b"a", b"b", b"ab"])) for key in keys}
    replies = _subslot_replies(parts, held, values)
    positions = [where for _, where in parts]
    merged = subslot_merge(replies, positions, len(keys))
    assert merged == _merge_py(replies, positions, len(keys))
    expected: list[Any] = []
    for key in keys:
        if key not in held:
            break
        if expected and expected[-2] == values[key]:
            expected[-1] += 1
        else:
            expected += [values[key], 1]
    assert merged == expected


def test_subslot_merge_refuses_a_reply_longer_than_its_keys() -> None:
    from kvcore._native import subslot_merge, subslot_split

    parts = subslot_split(pack_keys([3, 4, 5]), 2)
    with pytest.raises(ValueError, match="out of range"):
        subslot_merge([[b"x", 3], [b"y", 1]], [where for _, where in parts], 3)
