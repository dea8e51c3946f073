"""Shared storage pools: pool writes through writers' batches, Score credit to mounting
workers, evictions and wipes by any writer, out-of-order application across writers,
refusal of undeclared pools; at field scale (pools of 50,000 blocks), on both backends
(the memory index and a private redis-server)."""

from __future__ import annotations

import asyncio
import random
import urllib.request
from collections.abc import AsyncIterator

import msgspec
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from indexer.index.memory import MemoryIndex
from indexer.index.pools import MAX_TOMBSTONES, POOL_RANK, refuse_undeclared
from indexer.index.protocol import ApplyOutcome, Index, ScoreQuery, WorkerRef
from indexer.index.redis import RedisIndex
from indexer.index.redis_sharded import ShardedRedisIndex
from indexer.ingest.consumer import ConsumerStats
from indexer.metrics import MetricsExporter
from kvcore.bus import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Event,
    EventBatch,
    decode_batch,
    encode_batch,
    pack_tokens,
    schema_for,
)
from kvcore.pools import KIND_POOL
from publisher.engines import decode_engine_payload
from publisher.mirror import BlockMirror
from tests.support.servers import RedisServer

MODEL = "m"
BS = 16
POOL_BLOCKS = 50_000


@pytest.fixture(params=["memory", "redis", "redis-subslots"])
async def index(request: pytest.FixtureRequest) -> AsyncIterator[Index]:
    """Each backend in turn; the Redis ones on a flushed private redis-server (the
    sub-slot one over 4 sub-slots)."""
    if request.param == "memory":
        yield MemoryIndex()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    client = aioredis.Redis.from_url(server.url)
    await client.flushall()
    redis_index: RedisIndex | ShardedRedisIndex = (
        ShardedRedisIndex(client, subslots=4) if request.param == "redis-subslots"
        else RedisIndex(client))
    yield redis_index
    await redis_index.close()


class _Writer:
    """One worker rank's batches, seq by seq, each a second after the last."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.seq = 0

    def batch(self, *events: Event, ts: float | None = None) -> EventBatch:
        batch = EventBatch(schema=1, model=MODEL, worker_id=self.worker_id, epoch=1,
                           seq=self.seq, events=list(events),
                           ts=1000.0 + self.seq if ts is None else ts)
        self.seq += 1
        return batch


def _tokens(n_blocks: int, seed: int = 7) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(50_000) for _ in range(n_blocks * BS)]


def _hashes(n: int, base: int = 1_000_000) -> list[int]:
    return list(range(base, base + n))


def _gpu_store(hashes: list[int], tokens: list[int]) -> BlockStored:
    return BlockStored(block_hashes=hashes, token_ids=pack_tokens(tokens), block_size=BS)


def _query(tokens: list[int], mounts: dict[str, frozenset[str]] | None) -> ScoreQuery:
    return ScoreQuery(model=MODEL, token_ids=tokens, block_size=BS, mounts=mounts)


async def _scores(index: Index, query: ScoreQuery) -> dict[str, tuple[int, dict[str, int]]]:
    return {s.worker_id: (s.matched_blocks, s.blocks_by_tier)
            for s in (await index.score(query)).scores}


async def _fleet(index: Index) -> tuple[list[int], list[int], dict[str, _Writer]]:
    """A holds the whole prompt on GPU and offloads it to pool P, then evicts all but the
    first 10 blocks from GPU; B holds the first 10 on GPU; C the first 5."""
    tokens = _tokens(POOL_BLOCKS)
    hashes = _hashes(POOL_BLOCKS)
    writers = {w: _Writer(w) for w in "ABC"}
    outcomes = await index.apply([
        writers["A"].batch(_gpu_store(hashes, tokens),
                           BlockStored(block_hashes=hashes, medium="storage", pool="P"),
                           BlockRemoved(block_hashes=hashes[10:])),
        writers["B"].batch(_gpu_store(hashes[:10], tokens[: 10 * BS])),
        writers["C"].batch(_gpu_store(hashes[:5], tokens[: 5 * BS])),
    ])
    assert all(o is ApplyOutcome.APPLIED for o in outcomes)
    return tokens, hashes, writers


MOUNTS = {"A": frozenset({"P"}), "B": frozenset({"P"})}


async def test_mounting_workers_continue_their_prefix_through_the_pool(index: Index) -> None:
    tokens, _, _ = await _fleet(index)
    scores = await _scores(index, _query(tokens, MOUNTS))
    assert scores["A"] == (POOL_BLOCKS, {"gpu": 10, "storage": POOL_BLOCKS - 10})
    assert scores["B"] == (POOL_BLOCKS, {"gpu": 10, "storage": POOL_BLOCKS - 10})
    assert scores["C"] == (5, {"gpu": 5})  # mounts nothing: no credit
    # Without mounts nobody is credited; the pool is never a candidate.
    plain = await _scores(index, _query(tokens, None))
    assert plain == {"A": (10, {"gpu": 10}), "B": (10, {"gpu": 10}), "C": (5, {"gpu": 5})}
    assert "P" not in scores  # a pool is never a candidate


async def test_a_worker_the_index_never_saw_is_credited_through_its_mount(
    index: Index,
) -> None:
    """A worker that has published nothing (just started, empty cache) but mounts P is
    credited on a slot of its own for the query; not when the query leaves it out."""
    tokens, _, _ = await _fleet(index)
    mounts = {**MOUNTS, "new": frozenset({"P"}), "other": frozenset({"Q"})}
    scores = await _scores(index, _query(tokens, mounts))
    assert scores["new"] == (POOL_BLOCKS, {"storage": POOL_BLOCKS})
    assert scores["A"] == (POOL_BLOCKS, {"gpu": 10, "storage": POOL_BLOCKS - 10})
    assert "other" not in scores  # mounts a pool the index does not have
    narrowed = ScoreQuery(model=MODEL, token_ids=tokens, block_size=BS, mounts=mounts,
                          workers=frozenset({"A", "C"}))
    assert set(await _scores(index, narrowed)) == {"A", "C"}


async def test_many_mounters_each_get_their_own_answer(index: Index) -> None:
    """Mounters holding nothing of the prompt share one walk; those holding some of it
    walk on their own; a second pool's mounters are a group of their own."""
    tokens, hashes, writers = await _fleet(index)
    # C can name only the 5 blocks it stored: the other 95 are dropped, counted.
    await index.apply([writers["C"].batch(
        BlockStored(block_hashes=hashes[:100], medium="storage", pool="Q"))])
    assert (await index.stats()).dropped == {"pool_unknown_block": 95}
    cold = {f"n{i}": frozenset({"P"}) for i in range(6)}
    cold_q = {f"q{i}": frozenset({"Q"}) for i in range(3)}
    mounts = {**MOUNTS, "C": frozenset({"P", "Q"}), **cold, **cold_q}
    scores = await _scores(index, _query(tokens, mounts))
    full = (POOL_BLOCKS, {"gpu": 10, "storage": POOL_BLOCKS - 10})
    assert scores == {
        "A": full, "B": full, "C": (POOL_BLOCKS, {"gpu": 5, "storage": POOL_BLOCKS - 5}),
        **dict.fromkeys(cold, (POOL_BLOCKS, {"storage": POOL_BLOCKS})),
        **dict.fromkeys(cold_q, (5, {"storage": 5})),
    }
    # Scores of one answer with equal tier counts may share a dict (answers are read-only:
    # WorkerScore); two answers never share one, so a caller changing its copy of one
    # answer changes no other answer.
    q0 = (await index.score(_query(tokens, mounts))).scores
    q1 = (await index.score(_query(tokens, mounts))).scores
    assert q0 == q1
    assert not {id(s.blocks_by_tier) for s in q0} & {id(s.blocks_by_tier) for s in q1}


async def test_a_cold_worker_is_credited_only_through_its_mount(index: Index) -> None:
    tokens, _, writers = await _fleet(index)
    await index.apply([_Writer("D").batch(AllBlocksCleared())])  # a rank with no blocks
    mounts = {**MOUNTS, "D": frozenset({"P"})}
    scores = await _scores(index, _query(tokens, mounts))
    assert scores["D"] == (POOL_BLOCKS, {"storage": POOL_BLOCKS})
    assert "D" not in await _scores(index, _query(tokens, MOUNTS))
    assert writers  # keeps the fleet's writers alive for the reader


async def test_evictions_from_the_pool_by_any_writer_apply(index: Index) -> None:
    tokens, hashes, writers = await _fleet(index)
    # B never stored blocks 20.. itself: its eviction resolves through the pool's own map.
    await index.apply([writers["B"].batch(
        BlockRemoved(block_hashes=hashes[20:], medium="storage", pool="P"))])
    scores = await _scores(index, _query(tokens, MOUNTS))
    assert scores["A"] == (20, {"gpu": 10, "storage": 10})
    assert scores["B"] == (20, {"gpu": 10, "storage": 10})
    # A hole in the pool ends the credited prefix there.
    await index.apply([writers["A"].batch(
        BlockRemoved(block_hashes=[hashes[12]], medium="storage", pool="P"))])
    assert (await _scores(index, _query(tokens, MOUNTS)))["B"] == (12, {"gpu": 10, "storage": 2})
    assert (await index.stats()).dropped.get("pool_unknown_block", 0) == 0


async def test_a_wiped_pool_is_cleared_and_its_epoch_moves(index: Index) -> None:
    tokens, _, writers = await _fleet(index)
    before = next(w for w in (await index.workers(MODEL)) if w.kind == KIND_POOL)
    assert before.blocks_by_tier == {"storage": POOL_BLOCKS}
    await index.apply([writers["B"].batch(AllBlocksCleared(pool="P"))])
    assert (await _scores(index, _query(tokens, MOUNTS)))["B"] == (10, {"gpu": 10})
    after = next(w for w in (await index.workers(MODEL)) if w.kind == KIND_POOL)
    assert after.blocks_by_tier == {} and after.epoch == before.epoch + 1
    # A's own GPU blocks survive the pool's wipe.
    assert (await _scores(index, _query(tokens, None)))["A"] == (10, {"gpu": 10})


async def test_a_gone_pool_is_removed_with_its_blocks(index: Index) -> None:
    tokens, _, _ = await _fleet(index)
    assert await index.remove_pool(MODEL, "P")
    assert not await index.remove_pool(MODEL, "P")
    assert (await _scores(index, _query(tokens, MOUNTS)))["B"] == (10, {"gpu": 10})
    assert all(w.kind != KIND_POOL for w in (await index.workers(MODEL)))
    assert all(POOL_RANK not in {ref.dp_rank for ref in owners}
               for owners in (await index.presence(MODEL)).values())


async def test_pool_writes_follow_the_writers_sequence(index: Index) -> None:
    tokens, hashes, writers = await _fleet(index)
    evict = writers["B"].batch(BlockRemoved(block_hashes=hashes[30:], medium="storage",
                                            pool="P"))
    assert await index.apply([evict]) == [ApplyOutcome.APPLIED]
    # A redelivered store by A (seq already applied) changes nothing.
    replay = EventBatch(schema=1, model=MODEL, worker_id="A", epoch=1, seq=0, events=[
        BlockStored(block_hashes=hashes, medium="storage", pool="P")])
    assert await index.apply([replay]) == [ApplyOutcome.DUPLICATE]
    assert (await _scores(index, _query(tokens, MOUNTS)))["B"] == (30, {"gpu": 10, "storage": 20})


async def test_a_gap_in_a_writers_batches_wipes_the_pools_it_wrote(index: Index) -> None:
    tokens, _, writers = await _fleet(index)
    writers["A"].seq += 1  # one batch of A lost (it may have evicted from P)
    outcome = await index.apply([writers["A"].batch()])
    assert outcome == [ApplyOutcome.APPLIED_AFTER_GAP]
    assert (await _scores(index, _query(tokens, MOUNTS)))["B"] == (10, {"gpu": 10})


async def test_presence_names_the_pool_as_its_own_owner(index: Index) -> None:
    await _fleet(index)
    presence = (await index.presence(MODEL))
    holders = [owners for owners in presence.values() if WorkerRef("P", POOL_RANK) in owners]
    assert len(holders) == POOL_BLOCKS
    assert all(owners[WorkerRef("P", POOL_RANK)] == 0b0100 for owners in holders)


async def test_a_store_applied_after_a_later_eviction_stays_evicted(index: Index) -> None:
    """A's offload (t=1000) and B's eviction (t=2000) come through different partitions;
    B's is applied first. The eviction wins: the pool never claims the block."""
    tokens = _tokens(20)
    hashes = _hashes(20)
    a, b = _Writer("A"), _Writer("B")
    await index.apply([
        a.batch(_gpu_store(hashes, tokens), ts=999.0),
        b.batch(_gpu_store(hashes[:2], tokens[: 2 * BS]), ts=999.0),
    ])
    await index.apply([
        b.batch(BlockRemoved(block_hashes=hashes[5:], medium="storage", pool="P"), ts=2000.0),
    ])
    await index.apply([
        a.batch(BlockStored(block_hashes=hashes, medium="storage", pool="P"),
                BlockRemoved(block_hashes=hashes[2:]), ts=1000.0),
    ])
    assert (await _scores(index, _query(tokens, MOUNTS)))["B"] == (5, {"gpu": 2, "storage": 3})
    # A store newer than the eviction (the block was offloaded again) holds it again.
    await index.apply([a.batch(BlockStored(block_hashes=hashes[5:8], medium="storage",
                                           pool="P"), ts=3000.0)])
    assert (await _scores(index, _query(tokens, MOUNTS)))["B"] == (8, {"gpu": 2, "storage": 6})
    # And an eviction older than that store, applied late, does not take it away.
    await index.apply([b.batch(BlockRemoved(block_hashes=hashes[5:8], medium="storage",
                                            pool="P"), ts=2500.0)])
    assert (await _scores(index, _query(tokens, MOUNTS)))["B"] == (8, {"gpu": 2, "storage": 6})


async def test_a_wipe_keeps_blocks_stored_after_it_and_refuses_older_stores(
    index: Index,
) -> None:
    tokens = _tokens(20)
    hashes = _hashes(20)
    a, b = _Writer("A"), _Writer("B")
    await index.apply([
        a.batch(_gpu_store(hashes, tokens), ts=999.0),
        b.batch(_gpu_store(hashes[:2], tokens[: 2 * BS]), ts=999.0),
        a.batch(BlockStored(block_hashes=hashes[:10], medium="storage", pool="P"), ts=1000.0),
    ])
    await index.apply([b.batch(AllBlocksCleared(pool="P"), ts=2000.0)])
    await index.apply([
        a.batch(BlockStored(block_hashes=hashes[:4], medium="storage", pool="P"), ts=3000.0),
        # applied after the wipe, though stored before it (A's batches in flight)
        a.batch(BlockStored(block_hashes=hashes[:10], medium="storage", pool="P"), ts=1500.0),
    ])
    assert (await _scores(index, _query(tokens, MOUNTS)))["B"] == (4, {"gpu": 2, "storage": 2})


async def test_forgotten_tombstones_raise_the_floor(index: Index) -> None:
    """Past MAX_TOMBSTONES removals the pool forgets them and ignores every store older
    than the newest: a late store can never resurrect a block evicted meanwhile."""
    n = MAX_TOMBSTONES + 10  # in two events (a bus event holds at most 65,536 blocks)
    tokens = _tokens(8)
    a, b = _Writer("A"), _Writer("B")
    await index.apply([
        a.batch(_gpu_store(_hashes(8), tokens), ts=999.0),
        b.batch(_gpu_store(_hashes(1), tokens[:BS]), ts=999.0),
        b.batch(*(BlockRemoved(block_hashes=_hashes(n // 2, base=base), medium="storage",
                               pool="P") for base in (5_000_000, 6_000_000)), ts=2000.0),
    ])
    # A's offload of t=1000 is applied after B's evictions (another partition, late).
    await index.apply([
        a.batch(BlockStored(block_hashes=_hashes(8), medium="storage", pool="P"), ts=1000.0),
    ])
    assert (await _scores(index, _query(tokens, MOUNTS)))["B"] == (1, {"gpu": 1})
    await index.apply([a.batch(BlockStored(block_hashes=_hashes(8), medium="storage",
                                           pool="P"), ts=2001.0)])
    assert (await _scores(index, _query(tokens, MOUNTS)))["B"] == (8, {"gpu": 1, "storage": 7})


def test_undeclared_pool_writes_are_refused() -> None:
    batch = _Writer("A").batch(
        BlockStored(block_hashes=[1], medium="storage", pool="P"),
        BlockRemoved(block_hashes=[2], medium="storage", pool="P"),
        AllBlocksCleared(pool="Q"),
        BlockStored(block_hashes=[3]))
    kept, refused = refuse_undeclared(batch, ["P"])
    assert refused == 1 and [e.pool for e in kept.events] == ["P", "P", None]
    kept, refused = refuse_undeclared(batch, [])
    assert refused == 3 and [e.pool for e in kept.events] == [None]
    # A writer without a registry entry yet keeps only removals (they invent nothing).
    kept, refused = refuse_undeclared(batch, None)
    assert refused == 2
    assert [type(e).__name__ for e in kept.events] == ["BlockRemoved", "BlockStored"]


def test_todays_batches_decode_unchanged() -> None:
    batch = _Writer("A").batch(AllBlocksCleared(), BlockStored(block_hashes=[1]),
                               BlockRemoved(block_hashes=[1]))
    payload = encode_batch(batch)
    assert b"pool" not in payload
    assert decode_batch(payload) == batch
    pooled = _Writer("A").batch(AllBlocksCleared(pool="P"))
    assert decode_batch(encode_batch(pooled)).events[0].pool == "P"


def _engine_payload(*events: dict[str, object]) -> bytes:
    return msgspec.msgpack.encode([1.0, list(events), 0])


def test_the_bridge_turns_shared_tier_events_into_pool_writes() -> None:
    remote = {"type": "BlockStored", "block_hashes": [5, 6], "parent_block_hash": None,
              "token_ids": [], "block_size": 0, "medium": "STORAGE", "locality": "REMOTE"}
    owned = {"type": "BlockRemoved", "block_hashes": [5], "medium": "CPU", "ownership": "Q"}
    external = {"type": "BlockStored", "block_hashes": [7], "parent_block_hash": None,
                "token_ids": [], "block_size": 0, "medium": "EXTERNAL"}
    payload = _engine_payload(remote, owned, external)
    without = decode_engine_payload(payload)
    assert [s.split(":")[0] for s in without.skipped] == ["remote_block", "remote_block"]
    assert [e.pool for e in without.events] == [None]  # the CPU removal is the worker's own
    with_pools = decode_engine_payload(payload, pools=("P", "Q"))
    assert with_pools.skipped == []
    assert [(e.pool, e.medium) for e in with_pools.events] == [
        ("P", "storage"), ("Q", "storage"), ("P", "storage")]
    assert with_pools.owners == {}
    # The rank's mirror (its resync) holds only its own blocks, never a pool's.
    mirror = BlockMirror()
    mirror.apply(with_pools.events)
    assert len(mirror) == 0


async def test_pools_have_a_series_of_their_own_not_a_worker_series() -> None:
    index = MemoryIndex()
    await _fleet(index)
    stats = ConsumerStats()
    stats.dropped["pool_not_declared"] = 3
    exporter = MetricsExporter(index, stats, CollectorRegistry(), max_worker_series=10)
    exporter.serve("127.0.0.1:0")
    await exporter.refresh()
    url = f"http://127.0.0.1:{exporter.port}/metrics"
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(body.decode())
               for s in family.samples}
    assert samples[("kv_indexer_pool_blocks", (("model", MODEL), ("pool", "P")))] == \
        POOL_BLOCKS
    assert samples[("kv_indexer_workers", ())] == 3
    assert {dict(labels)["worker"] for name, labels in samples
            if name == "kv_indexer_worker_blocks"} == {"A", "B", "C"}
    assert samples[("kv_indexer_dropped_total", (("reason", "pool_not_declared"),))] == 3


async def test_after_a_snapshot_import_pools_take_no_write_older_than_it(index: Index) -> None:
    """A rebuild imports ranks up to their last batch and replays what follows: pool
    evictions inside the snapshot are not replayed, so an older store that is (another
    partition's snapshot was older) must not bring a block back."""
    source = MemoryIndex()
    tokens = _tokens(8)
    a, b = _Writer("A"), _Writer("B")
    early = a.batch(_gpu_store(_hashes(8), tokens), ts=900.0)
    await source.apply([early, b.batch(_gpu_store(_hashes(1), tokens[:BS]), ts=2000.0)])
    states = await source.export_ranks([(MODEL, WorkerRef("A", 0)), (MODEL, WorkerRef("B", 0))])
    await index.import_ranks(states)
    # Replayed after A's snapshot point: an offload from before B's (snapshotted) eviction.
    await index.apply([a.batch(BlockStored(block_hashes=_hashes(8), medium="storage",
                                           pool="P"), ts=1000.0)])
    assert (await _scores(index, _query(tokens, MOUNTS)))["B"] == (1, {"gpu": 1})
    await index.apply([a.batch(BlockStored(block_hashes=_hashes(8), medium="storage",
                                           pool="P"), ts=2500.0)])
    assert (await _scores(index, _query(tokens, MOUNTS)))["B"] == (8, {"gpu": 1, "storage": 7})


async def test_an_eviction_older_than_the_floor_still_takes_a_block_stored_before_it(
    index: Index,
) -> None:
    """A snapshot import raises the floor to t=1000 but keeps what the pool held: a late
    eviction (t=800) of blocks stored at t=500 still takes them, though it is older than
    the floor."""
    tokens = _tokens(8)
    a, b = _Writer("A"), _Writer("B")
    await index.apply([
        a.batch(_gpu_store(_hashes(8), tokens), ts=400.0),
        b.batch(_gpu_store(_hashes(1), tokens[:BS]), ts=400.0),
        a.batch(BlockStored(block_hashes=_hashes(8), medium="storage", pool="P"), ts=500.0),
    ])
    source = MemoryIndex()
    await source.apply([_Writer("Z").batch(_gpu_store(_hashes(1), tokens[:BS]), ts=1000.0)])
    await index.import_ranks(await source.export_ranks([(MODEL, WorkerRef("Z", 0))]))
    await index.apply([b.batch(BlockRemoved(block_hashes=_hashes(8)[4:], medium="storage",
                                            pool="P"), ts=800.0)])
    assert (await _scores(index, _query(tokens, MOUNTS)))["B"] == (4, {"gpu": 1, "storage": 3})


def test_pool_events_live_in_group_0() -> None:
    """A pool's presence lives in KV-cache group 0: the bridge keeps a hybrid model's
    group-0 pool writes (without the group's kind) and leaves out another group's
    (`pool_group`), and a batch naming a pool is written as bus schema 2."""
    group0 = {"type": "BlockStored", "block_hashes": [5, 6], "parent_block_hash": None,
              "token_ids": [], "block_size": 0, "medium": "STORAGE", "locality": "REMOTE",
              "group_idx": 0, "kv_cache_spec_kind": "full_attention"}
    group1 = {**group0, "group_idx": 1, "kv_cache_spec_kind": "sliding_window",
              "kv_cache_spec_sliding_window": 64}
    removed1 = {"type": "BlockRemoved", "block_hashes": [5], "medium": "STORAGE",
                "locality": "REMOTE", "group_idx": 1}
    decoded = decode_engine_payload(_engine_payload(group0, group1, removed1), pools=("P",))
    assert [s.split(":")[0] for s in decoded.skipped] == ["pool_group", "pool_group"]
    [event] = decoded.events
    assert isinstance(event, BlockStored)
    assert (event.pool, event.group, event.group_kind, event.sliding_window) == ("P", 0, None, 0)
    assert schema_for(decoded.events) == 2
    assert schema_for([BlockRemoved([1], pool="P")]) == 2
    assert schema_for([AllBlocksCleared(pool="P")]) == 2
    assert schema_for([BlockStored([1]), BlockRemoved([1]), AllBlocksCleared()]) == 1
    # Readers still take pool fields in a schema-1 batch (bridges built before the bump).
    old = _Writer("A").batch(AllBlocksCleared(pool="P"))
    assert old.schema == 1
    assert decode_batch(encode_batch(old)).events[0].pool == "P"
