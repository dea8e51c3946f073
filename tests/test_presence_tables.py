"""The in-memory index's packed structures at field scale, against plain references.

The C block table stores each block's holders (slot << 4 | tier bits), not a mask, so its
cost must not follow slot numbers; the C ledger map packs a rank's engine hash -> (key,
tiers). Both are held to dict references under random operations, with ranks at slots
near 2**20.
"""

from __future__ import annotations

import os
import random
import struct

import pytest

from indexer.index.block_table import DictBlockTable
from indexer.index.ledger import LOG_MAP, LOG_RUN, WorkerLedger
from indexer.index.ledger_map import DictLedgerMap
from kvcore.keys import NATIVE, block_keys, pack_keys, pack_tokens

if NATIVE:
    from kvcore._native import BlockTable, LedgerMap

pytestmark = pytest.mark.skipif(
    not NATIVE and os.environ.get("KV_INDEXER_ALLOW_PURE_PYTHON") == "1",
    reason="pure-Python install: the C structures are not built",
)

HIGH = 2**20
# Low slots, slots near 2**20, and the edges of the inline form (slot < 2**27) and of a
# holder's u32 (slot < 2**28).
SLOTS = [0, 1, 2, 3, 7, 15, 16, 100, 4_095, HIGH - 3, HIGH - 2, HIGH - 1, HIGH,
         2**27 - 1, 2**27, 2**28 - 1]


def logged(log: bytes) -> list[tuple[int, int, int]]:
    """The (hash, key, tiers) a ledger log maps, sorted."""
    ledger = WorkerLedger("m", "w", 0, 0, 0)
    ledger.load_log(log)
    return sorted(ledger.keys.items())


def mask_of(holders: dict[int, int]) -> int:
    mask = 0
    for slot, tiers in holders.items():
        mask |= tiers << (slot * 4)
    return mask


def expected_holders(holders: dict[int, int]) -> list[int]:
    return [slot << 4 | tiers for slot, tiers in sorted(holders.items())]


class TestHolderPresence:
    """The C table's holders against a dict of {slot: tiers} per key."""

    def test_random_set_and_clear_over_many_blocks_and_high_slots(self) -> None:
        """40,000 blocks, 600 random set/clear calls of up to 3,000 keys at slots up to
        2**28 - 1 (low slots only on 5,000 of them): every block's holders, the table's
        size and the masks are exact."""
        rng = random.Random(18)
        keys = list({rng.getrandbits(64) for _ in range(40_000)})
        table = BlockTable(secret=rng.getrandbits(64))
        reference: dict[int, dict[int, int]] = {}
        low_slots = [s for s in SLOTS if s < 4_096]
        for _ in range(600):
            # the first 5,000 keys see low slots only (their masks are compared as ints)
            start = rng.randrange(len(keys))
            slot, tier = rng.choice(low_slots if start < 5_000 else SLOTS), rng.randrange(4)
            end = start + rng.randint(1, 3_000)
            chosen = keys[start : min(end, 5_000) if start < 5_000 else end]
            if rng.random() < 0.6:
                table.set_bit_at(chosen, slot * 4 + tier)
                for key in chosen:
                    held = reference.setdefault(key, {})
                    held[slot] = held.get(slot, 0) | 1 << tier
            else:
                table.clear_bit_at(chosen, slot * 4 + tier)
                for key in chosen:
                    held = reference.get(key, {})
                    if slot in held:
                        held[slot] &= ~(1 << tier)
                        if not held[slot]:
                            del held[slot]
                        if not held:
                            del reference[key]
        assert len(table) == len(reference)
        for key in keys:
            assert table.holders(key) == expected_holders(reference.get(key, {}))
        low = [k for k, held in reference.items() if max(held) < 4_096][:2_000]
        assert low, "the draw left no block held by low slots only"
        assert table.get_many(pack_keys(low)) == [mask_of(reference[k]) for k in low]
        high = [k for k, held in reference.items() if HIGH - 3 <= max(held) <= HIGH][:3]
        for key in high:  # masks of 2**22 bits: a few only
            assert table.get(key, 0) == mask_of(reference[key])

    def test_int_masks_in_and_out_match_the_dict_table(self) -> None:
        """set_bits / clear_bits with whole masks (several slots, positive and negative
        keep) leave what the dict table leaves, over 20,000 blocks."""
        rng = random.Random(5)
        keys = list(range(20_000))
        native, reference = BlockTable(secret=9), DictBlockTable()
        for _ in range(300):
            mask = sum(rng.randrange(1, 16) << (4 * rng.randrange(300))
                       for _ in range(rng.randint(1, 4)))
            start = rng.randrange(len(keys))
            chosen = keys[start : start + rng.randint(1, 2_000)]
            op, keep = rng.random(), mask | rng.getrandbits(64)
            for table in (native, reference):
                if op < 0.5:
                    table.set_bits(chosen, mask)
                elif op < 0.8:
                    table.clear_bits(chosen, ~mask)
                else:
                    table.clear_bits(chosen, keep)
        assert sorted(native.items()) == sorted(reference.items())

    def test_runs_and_lookups_with_ranks_near_two_to_the_twenty(self) -> None:
        """A 2,000-block prompt held by ranks at slots 3 and 2**20 - 1 over different
        lengths: mask_runs, get_present and the `wanted` stop are exact."""
        block, seed = 16, 77
        tokens = list(range(2_000 * block))
        keys = block_keys(tokens, block, seed)
        table = BlockTable(secret=1)
        low, high = 3 * 4, (HIGH - 1) * 4 + 1  # slot 3 gpu, slot 2**20 - 1 cpu
        table.set_bit_at(keys[:1_500], low)
        table.set_bit_at(keys[:700], high)
        both, only_low = 1 << low | 1 << high, 1 << low
        assert table.mask_runs(pack_tokens(tokens), block, seed, None) == [
            both, 700, only_low, 800]
        assert table.mask_runs(tokens, block, seed, 1 << high) == [both, 700]
        present = table.get_present(pack_keys(keys[690:710]))
        assert present == {i: both if i < 10 else only_low for i in range(20)}

    def test_a_high_slot_costs_what_a_low_slot_costs(self) -> None:
        """20,000 blocks held by one, two or three ranks: the table's own byte count is
        the same whether the ranks sit at slots 1-3 or near 2**20."""
        keys = list(range(10**9, 10**9 + 20_000))
        for low_slots, high_slots in (([3], [HIGH - 1]), ([2, 3], [HIGH - 2, HIGH - 1]),
                                      ([1, 2, 3], [HIGH - 3, HIGH - 2, HIGH - 1]),
                                      ([3], [2**27 - 1])):
            sizes = []
            for slots in (low_slots, high_slots):
                table = BlockTable(secret=3)
                for slot in slots:
                    table.set_bit_at(keys, slot * 4)
                sizes.append(table.nbytes)
            assert sizes[0] == sizes[1], (low_slots, high_slots, sizes)
            # one or two holders inline in the 16-byte entry; three on the heap
            per_entry = sizes[0] / (len(keys) * len(low_slots))
            assert per_entry <= (40 if len(low_slots) < 3 else 26), per_entry

    def test_slots_beyond_a_holder_are_refused(self) -> None:
        """A slot that does not fit a u32 holder is an error, never a wrapped slot."""
        table = BlockTable()
        with pytest.raises(OverflowError, match="slot"):
            table.set_bit_at([1], 2**28 * 4)
        with pytest.raises(OverflowError, match="slot"):
            table.set_bits([1], 1 << (2**28 * 4))
        assert len(table) == 0


class TestLedgerLog:
    """A ledger log's N runs (consecutive mapped hashes of one tier mask)."""

    def test_m_records_of_earlier_versions_load_as_runs_do(self) -> None:
        """A log of M records (18 bytes a hash, as earlier versions wrote it) maps what
        the N runs of the same map do, ghosts (mask 0) and mixed masks included."""
        rng = random.Random(21)
        reference = DictLedgerMap()
        for _ in range(500):
            reference.put(rng.getrandbits(64), rng.getrandbits(64), rng.randrange(16))
        old = b"".join(LOG_MAP.pack(b"M", h, key, tiers) for h, key, tiers in reference.items())
        assert logged(old) == logged(reference.log_records()) == sorted(reference.items())

    def test_a_run_holds_at_most_65535_hashes(self) -> None:
        """70,000 hashes of one mask: two runs (the count is a u16), 16 bytes a hash."""
        reference = DictLedgerMap()
        reference.add_new(list(range(1, 70_001)), list(range(70_001, 140_001)), 1)
        records = reference.log_records()
        assert len(records) == 16 * 70_000 + 2 * LOG_RUN.size
        assert logged(records) == sorted(reference.items())
        native = LedgerMap()
        native.add_new(list(range(1, 70_001)), list(range(70_001, 140_001)), 1)
        assert native.pack_log(range(1, 70_001)) == records
        assert len(native.log_records()) == len(records)
        assert logged(native.log_records()) == logged(records)
        assert native.pack_log([1, 2, 99**9, 3]) == reference.pack_log([1, 2, 99**9, 3])


class TestLedgerMap:
    """The C ledger map against DictLedgerMap (the two dicts it replaced)."""

    def test_random_operations_over_100k_hashes(self) -> None:
        """Stores, re-stores, tier drops, discards over 100,000 engine hashes: contents,
        held keys, tiers and log records equal the dict map's."""
        rng = random.Random(20)
        hashes = list({rng.getrandbits(64) for _ in range(100_000)})
        native, reference = LedgerMap(secret=rng.getrandbits(64)), DictLedgerMap()
        pos = 0
        for _ in range(3_000):
            op = rng.random()
            if op < 0.45 and pos < len(hashes):
                chosen = hashes[pos : pos + rng.randint(1, 64)]
                pos += len(chosen)
                keys = [rng.getrandbits(64) for _ in chosen]
                bit = 1 << rng.randrange(4)
                assert native.add_new(chosen, keys, bit) == reference.add_new(chosen, keys, bit)
            elif op < 0.6:
                chosen = rng.sample(hashes[: pos + 10], min(40, pos + 10))
                assert native.add_new(chosen, chosen, 1) == reference.add_new(
                    chosen, chosen, 1)
            elif op < 0.8:
                chosen = rng.sample(hashes, 50)
                bit = 1 << rng.randrange(4)
                assert native.drop_tier(chosen, bit) == reference.drop_tier(chosen, bit)
            elif op < 0.9:
                h = rng.choice(hashes)
                key, tiers = rng.getrandbits(64), rng.randrange(16)
                native.put(h, key, tiers)
                reference.put(h, key, tiers)
            else:
                for h in rng.sample(hashes[: pos + 1], min(30, pos + 1)):
                    assert native.discard(h) == reference.discard(h)
        assert len(native) == len(reference)
        assert sorted(native.items()) == sorted(reference.items())
        for bit in (1, 2, 4, 8):
            assert sorted(native.held_keys(bit)) == sorted(reference.held_keys(bit))
        sample = rng.sample(hashes, 2_000)
        assert [native.get(h) for h in sample] == [reference.get(h) for h in sample]
        assert [native.tiers_of(h) for h in sample] == [reference.tiers_of(h) for h in sample]
        assert [h in native for h in sample] == [h in reference for h in sample]
        assert native.pack_log(sample) == reference.pack_log(sample)
        assert logged(native.log_records()) == logged(reference.log_records()) == sorted(
            reference.items())

    def test_add_new_changes_nothing_when_a_hash_is_known_or_repeats(self) -> None:
        """The all-new fast path is all or nothing: a known hash or a repeat inside the
        event leaves the map as it was."""
        native = LedgerMap(secret=4)
        assert native.add_new([1, 2, 3], [10, 20, 30], 1)
        assert not native.add_new([4, 5, 2], [40, 50, 60], 2)
        assert not native.add_new([6, 7, 6], [60, 70, 61], 2)
        assert sorted(native.items()) == [(1, 10, 1), (2, 20, 1), (3, 30, 1)]
        with pytest.raises(ValueError, match="tier mask"):
            native.put(9, 9, 16)
        with pytest.raises(OverflowError):
            native.put(2**64, 9, 1)

    def test_load_run_puts_a_log_run_as_the_dict_map_does(self) -> None:
        """A 100,000-hash map's log records replayed run by run with `load_run` give the
        same map in C and in dicts; bad runs raise ValueError and change nothing past the
        check."""
        rng = random.Random(21)
        source = LedgerMap(secret=rng.getrandbits(64))
        for mask in range(16):
            chosen = [rng.getrandbits(64) for _ in range(6_250)]
            assert source.add_new(chosen, [rng.getrandbits(64) for _ in chosen], mask)
        records = memoryview(source.log_records())
        native, reference = LedgerMap(secret=5), DictLedgerMap()
        pos = runs = 0
        while pos < len(records):
            assert records[pos] == ord("N")
            end = native.load_run(records, pos)
            assert reference.load_run(records, pos) == end > pos
            pos, runs = end, runs + 1
        assert runs >= 16 and sorted(native.items()) == sorted(reference.items()) == sorted(
            source.items())
        run = struct.pack("<cBH", b"N", 3, 2) + struct.pack("<QQQQ", 1, 10, 2, 20)
        for loaded in (LedgerMap(secret=6), DictLedgerMap()):
            assert loaded.load_run(b"xx" + run, 2) == len(run) + 2
            assert sorted(loaded.items()) == [(1, 10, 3), (2, 20, 3)]
            for bad, match in ((run[:-1], "truncated"), (run[:3], "truncated"),
                               (b"N\x10" + run[2:], "tier mask 16")):
                with pytest.raises(ValueError, match=match):
                    loaded.load_run(bad, 0)
            with pytest.raises(ValueError, match="truncated"):
                loaded.load_run(run, len(run))
            with pytest.raises(ValueError, match="truncated"):
                loaded.load_run(run, -1)

    def test_bytes_per_entry_and_shrink(self) -> None:
        """100,000 entries cost at most ~2x a packed 17-byte slot; discarding most of them
        gives the memory back."""
        native = LedgerMap(secret=8)
        hashes = list(range(7, 7 + 100_000))
        assert native.add_new(hashes, hashes, 1)
        assert native.nbytes / len(hashes) <= 34
        for h in hashes[1_000:]:
            native.discard(h)
        assert len(native) == 1_000 and native.nbytes <= 1_000 * 17 * 4 + 200  # <= 1/4 full
        assert all(native.get(h) == h for h in hashes[:1_000])


class TestRankNearTwoToTheTwenty:
    """A model whose ranks sit at slots 0 and near 2**20, through the whole index."""

    def test_score_presence_and_removal_are_exact(self) -> None:
        """Stores, a cpu offload and removals of a rank at slot 2**20 - 5: Score, presence
        and the table's bytes are those of a low-slot rank."""
        from indexer.index.memory import SyncMemoryIndex
        from indexer.index.protocol import ScoreQuery, WorkerScore
        from kvcore.bus import BlockRemoved
        from tests.support.ledger_batches import BS, MODEL, TOKENS, batch, stored

        def scores(index: SyncMemoryIndex) -> list[WorkerScore]:
            return index.score(ScoreQuery(model=MODEL, token_ids=TOKENS, block_size=BS)).scores

        def build(high_slot: int) -> SyncMemoryIndex:
            index = SyncMemoryIndex()
            index.apply([batch(0, stored(1, 6), worker="low")])
            index._models[MODEL]._next_slot = high_slot
            index.apply([batch(0, stored(1, 4), worker="high"),
                         batch(1, stored(1, 2, medium="cpu"), worker="high"),
                         batch(2, BlockRemoved(block_hashes=[4]), worker="high")])
            return index

        near, plain = build(HIGH - 5), build(1)
        assert near._models[MODEL].ledgers.keys() == plain._models[MODEL].ledgers.keys()
        assert scores(near) == scores(plain) == [
            WorkerScore("low", 0, 6, 6.0, {"gpu": 6}),
            WorkerScore("high", 0, 3, 3.0, {"gpu": 3}),
        ]
        assert near.presence(MODEL) == plain.presence(MODEL)
        assert near._models[MODEL].blocks.nbytes == plain._models[MODEL].blocks.nbytes
        near.apply([batch(3, BlockRemoved(block_hashes=[1, 2, 3]), worker="high")])
        assert scores(near) == [WorkerScore("low", 0, 6, 6.0, {"gpu": 6}),
                                WorkerScore("high", 0, 2, 1.6, {"cpu": 2})]  # cpu copies stay
        near.apply([batch(4, BlockRemoved(block_hashes=[1, 2], medium="cpu"), worker="high")])
        assert scores(near) == [WorkerScore("low", 0, 6, 6.0, {"gpu": 6})]
        assert near.presence(MODEL) == {k: {ref: tiers for ref, tiers in held.items()
                                            if ref.worker_id == "low"}
                                        for k, held in plain.presence(MODEL).items()}
