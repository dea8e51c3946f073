"""The shard simulation's model (bench/shard_sim.py) against what it stands for: fleets
that fill every rank, a one-round-trip walk that reads every key it needs, mask and ledger
sizes of the real structures, sub-slot tags one per shard."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from redis.crc import key_slot

from bench.shard_sim import (
    LOG_AVERAGE_SLACK,
    QUERY_BLOCKS,
    SHARD_COUNTS,
    SUBSLOT_FIRST_CHUNK,
    Query,
    binomial_shares,
    build_fleet,
    ledger_bytes_per_rank,
    placed_tags,
    read_trace,
    shard_of_slot,
    shard_score,
    top_slot,
    value_bytes,
)
from indexer.index.ledger import WorkerLedger
from indexer.index.protocol import IndexStats
from kvcore.bus import SCHEMA_VERSION, BlockRemoved, BlockStored, EventBatch, pack_tokens

RANKS = 500
BLOCKS_PER_RANK = 20_000


def write_trace(path: Path, sessions: int = 300, turns: int = 3) -> Path:
    """Every request starts with id 0 (a system prompt); each session's turn k extends
    turn k-1 by two ids of its own."""
    rows, next_id = [], 1
    for session in range(sessions):
        history: list[int] = [0]
        for turn in range(turns):
            history = [*history, next_id, next_id + 1]
            next_id += 2
            rows.append({"timestamp": session * 10 + turn, "input_length": 512 * len(history),
                         "output_length": 10, "hash_ids": history})
    path.write_text("\n".join(json.dumps(row) for row in rows))
    return path


class _NullSink:
    """Presence goes nowhere: only the ledger's own log is measured."""

    def set_bits(self, keys: list[int], bitpos: int) -> None:
        pass

    def clear_bits(self, keys: list[int], bitpos: int) -> None:
        pass


class TestFleet:
    """The fleet model fills every rank's cache and gives holders the routing implies."""

    @pytest.mark.parametrize("routing", ["affinity", "random"])
    def test_entries_fill_every_rank(self, tmp_path: Path, routing: str) -> None:
        trace = read_trace(write_trace(tmp_path / "t.jsonl"))
        fleet = build_fleet(trace, RANKS, BLOCKS_PER_RANK, routing, global_min=32)
        assert fleet.entries == pytest.approx(RANKS * BLOCKS_PER_RANK, rel=0.005)
        assert fleet.global_ids == {0}

    def test_holders_follow_the_routing(self, tmp_path: Path) -> None:
        trace = read_trace(write_trace(tmp_path / "t.jsonl"))
        affinity = build_fleet(trace, RANKS, BLOCKS_PER_RANK, "affinity", global_min=32)
        scattered = build_fleet(trace, RANKS, BLOCKS_PER_RANK, "random", global_min=32)
        assert affinity.id_holders[0] == RANKS  # every request uses it: every rank's load
        assert affinity.id_holders[1] == 1  # a session stays on its rank
        # id 1 is in all three turns of session 0: three random ranks, almost surely distinct
        assert scattered.id_holders[1] == 3
        assert scattered.id_holders[0] == RANKS
        # the same entries spread over more holders are fewer distinct blocks
        assert scattered.distinct_blocks < affinity.distinct_blocks


def read_like_a_subslot(keys: list[int], matched: int) -> tuple[set[int], int | None]:
    """What a sub-slot script reads: its keys in order, chunks of 4, 8, 16, ..., stopping
    after the chunk holding its first unheld key. Returns (read, first unheld position)."""
    read: set[int] = set()
    chunk, at = SUBSLOT_FIRST_CHUNK, 0
    while at < len(keys):
        part = keys[at:at + chunk]
        read.update(part)
        miss = next((i for i in part if i >= matched), None)
        if miss is not None:
            return read, miss
        at += chunk
        chunk *= 2
    return read, None


class TestOneRoundTrip:
    """Keys spread over sub-slots by hash: each sub-slot stops at its own first unheld key,
    and together they still return every mask the walk needs."""

    @pytest.mark.parametrize("shards", SHARD_COUNTS)
    def test_every_matched_key_is_read_and_the_match_is_the_first_miss(
            self, shards: int) -> None:
        rng = random.Random(shards)
        for _ in range(200):
            matched = rng.choice([0, 1, 31, 32, 100, 255, 511, QUERY_BLOCKS])
            placed = [rng.randrange(shards) for _ in range(QUERY_BLOCKS)]
            runs = [(0, matched, 1)] if matched else []
            query = Query(matched, runs)
            reported = list(shard_score(query, placed, shards=shards, layout="proposed",
                                        ranks=RANKS, rng=rng))
            read_all: set[int] = set()
            misses: list[int] = []
            for k in range(shards):
                mine = [i for i, s in enumerate(placed) if s == k]
                read, miss = read_like_a_subslot(mine, matched)
                read_all |= read
                misses += [miss] if miss is not None else []
                assert reported[k][1] == len(read)  # keys looked up, as the sim counts them
            assert set(range(matched)) <= read_all
            if matched < QUERY_BLOCKS:
                assert min(misses) == matched


class TestSizes:
    """Value and ledger sizes are those of the real structures."""

    def test_todays_mask_grows_with_the_slot_number(self) -> None:
        rng = random.Random(1)
        ranks = 10_000
        lengths = [value_bytes("today", 1, top_slot(rng, 1, ranks)) for _ in range(20_000)]
        # one holder at a uniform slot: 4 bits per slot, so ranks / 4 bytes on average
        assert sum(lengths) / len(lengths) == pytest.approx(ranks / 4, rel=0.03)
        assert {value_bytes("proposed", 1, top_slot(rng, 1, ranks)) for _ in range(100)} == {5}

    def test_a_block_every_rank_holds_is_a_bitmask_either_way(self) -> None:
        rng = random.Random(2)
        ranks = 10_000
        top = top_slot(rng, ranks, ranks)
        assert top >= ranks - 10
        assert value_bytes("proposed", ranks, top) == value_bytes("today", ranks, top) + 1

    def test_ledger_bytes_match_a_real_ledger_log(self) -> None:
        held, ghosts = 20_000, 5_000
        ledger = WorkerLedger("m", "w", 0, slot=0, ghost_capacity=ghosts)
        blocks = held + ghosts
        tokens = pack_tokens([i % 50_000 for i in range(blocks * 16)])
        stored = BlockStored(block_hashes=list(range(1, blocks + 1)), token_ids=tokens,
                             block_size=16)
        removed = BlockRemoved(block_hashes=list(range(held + 1, blocks + 1)))
        for seq, event in enumerate([stored, removed]):
            batch = EventBatch(schema=SCHEMA_VERSION, model="m", worker_id="w", dp_rank=0,
                               epoch=1, seq=seq, events=[event])
            ledger.apply(batch, _NullSink(), IndexStats(), None)
        assert len(ledger.ghosts) == ghosts
        assert len(ledger.to_log()) * LOG_AVERAGE_SLACK == ledger_bytes_per_rank(held, ghosts)


class TestPlacement:
    """Sub-slots land one per shard; a binomial split keeps every item."""

    @pytest.mark.parametrize("shards", SHARD_COUNTS)
    def test_placed_tags_put_one_subslot_on_each_shard(self, shards: int) -> None:
        tags = placed_tags("deepseek-ai/DeepSeek-V3", shards)
        owners = sorted(shard_of_slot(key_slot(tag.encode()), shards) for tag in tags)
        assert owners == list(range(shards))

    def test_binomial_shares_keep_the_total(self) -> None:
        rng = random.Random(3)
        parts = binomial_shares(rng, 1e9, 24)
        assert sum(parts) == pytest.approx(1e9)
        assert max(parts) < 1e9 / 24 * 1.001
