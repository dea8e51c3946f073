"""The Index contract: every backend gives exactly the reference model's answers.

Hypothesis generates engine histories (stores, offloads, removes, clears, restarts,
duplicates, stale epochs, gaps, unknown parents, interleaved workers and DP ranks); each
backend ingests them and must agree with `tests.support.reference.ReferenceIndex` on outcomes,
presence (block key by block key), scores, per-worker tier counts and drop counters.
The Redis backend is also driven by two successive index instances, so a worker's ledger
reloaded from Redis must carry on exactly where the first left off.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from indexer.index.block_table import DictBlockTable
from indexer.index.ledger_map import DictLedgerMap
from indexer.index.memory import MemoryIndex
from indexer.index.protocol import Index, IndexConfig, ScoreQuery, TierWeights, WorkerRef
from indexer.index.redis import COMPACT_BUCKET_LOAD, DEFAULT_BUCKET_LOAD, RedisIndex
from indexer.index.redis_cluster import RedisClusterIndex
from indexer.index.redis_sharded import ShardedRedisIndex
from kvcore.bus import (
    SCHEMA_VERSION,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Event,
    EventBatch,
    pack_tokens,
)
from kvcore.keys import block_keys_for_tokens
from tests.support.prompt_tree import BLOCK, MODEL, event_specs, make_event, path_tokens, paths
from tests.support.redis_cluster import RedisCluster
from tests.support.reference import ReferenceIndex
from tests.support.servers import RedisServer

WORKERS = ("w-a", "10.0.0.2:8000", "w/c")
GHOST_CAPACITY = 3


@dataclass
class Engine:
    """What one simulated engine rank has published so far."""

    epoch: int = 1
    seq: int = -1
    last: EventBatch | None = None
    history: list[int] = field(default_factory=list)


worker_refs = st.tuples(st.sampled_from(WORKERS), st.integers(0, 1))


@st.composite
def histories(draw: st.DrawFn) -> list[EventBatch]:
    """A sequence of bus batches as engines (and a flaky network) would produce them."""
    engines: dict[tuple[str, int], Engine] = {}
    batches: list[EventBatch] = []
    for _ in range(draw(st.integers(1, 40))):
        worker_id, rank = draw(worker_refs)
        engine = engines.setdefault((worker_id, rank), Engine())
        action = draw(st.sampled_from(["events"] * 8 + ["dup", "stale", "gap", "restart"]))
        if action == "dup" and engine.last is not None:
            batches.append(engine.last)
            continue
        if action == "stale" and engine.last is not None and engine.epoch > 1:
            stale = EventBatch(schema=SCHEMA_VERSION, model=MODEL, worker_id=worker_id,
                               dp_rank=rank, epoch=engine.epoch - 1, seq=engine.seq + 5,
                               events=[AllBlocksCleared()])
            batches.append(stale)
            continue
        if action == "restart":
            engine.epoch += 1
            engine.seq = -1
        if action == "gap":
            engine.seq += 2
        specs = draw(st.lists(event_specs(), min_size=1, max_size=3))
        engine.seq += 1
        batch = EventBatch(
            schema=SCHEMA_VERSION, model=MODEL, worker_id=worker_id, dp_rank=rank,
            epoch=engine.epoch, seq=engine.seq, ts=float(len(batches)),
            events=[make_event(kind, spec, engine.epoch) for kind, spec in specs],
        )
        engine.last = batch
        batches.append(batch)
    return batches


weights_st = st.one_of(
    st.none(),
    st.builds(TierWeights, gpu=st.sampled_from([1.0, 0.3]), cpu=st.sampled_from([0.8, 2.0]),
              storage=st.sampled_from([0.5, 0.0]), other=st.sampled_from([0.25, 1.5])),
)
queries_st = st.lists(
    st.tuples(paths, st.one_of(st.none(), st.frozensets(st.sampled_from((*WORKERS, "nobody")))),
              weights_st, st.booleans(), st.sampled_from((None, "adapter"))),
    min_size=1, max_size=12,
)
chunk_sizes = st.lists(st.one_of(st.integers(1, 6), st.just(64)), min_size=1, max_size=40)

CONFIG = IndexConfig(ghost_capacity=GHOST_CAPACITY)


async def check_against_reference(
    make_index: Callable[[], Awaitable[Index]],
    batches: list[EventBatch],
    chunks: list[int],
    queries: list[Any],
    *,
    split_at: int | None = None,
) -> None:
    reference = ReferenceIndex(GHOST_CAPACITY)
    expected_outcomes = [reference.apply(b) for b in batches]
    one_instance = split_at is None or split_at >= len(batches)
    index = await make_index()
    outcomes: list[str] = []
    pos = 0
    chunk_iter = iter(chunks * (len(batches) + 1))
    while pos < len(batches):
        if split_at is not None and pos >= split_at:
            await index.close()
            index = await make_index()  # a new process: ledgers come back from Redis
            split_at = None
        end = min(pos + next(chunk_iter), len(batches))
        if split_at is not None and pos < split_at < end:
            end = split_at
        outcomes += [o.value for o in await index.apply(batches[pos:end])]
        pos = end
    try:
        assert outcomes == expected_outcomes
        assert await index.presence(MODEL) == reference.presence(MODEL)
        for path, workers, weights, include_zero, lora in queries:
            keys = block_keys_for_tokens(path_tokens(path), BLOCK, MODEL, lora_name=lora)
            result = await index.score(ScoreQuery(
                model=MODEL, block_keys=keys, workers=workers, tier_weights=weights,
                include_zero=include_zero))
            got = [(s.worker_id, s.dp_rank, s.matched_blocks, s.weighted_score, s.blocks_by_tier)
                   for s in result.scores]
            assert got == reference.score(MODEL, keys, workers, weights or CONFIG.tier_weights,
                                          include_zero)
            assert result.query_blocks == len(keys)
            tokens = path_tokens(path) + [7] * (len(path) % BLOCK)  # a partial block: ignored
            for token_form in (tokens, pack_tokens(tokens)):
                by_tokens = await index.score(ScoreQuery(
                    model=MODEL, token_ids=token_form, block_size=BLOCK, lora_name=lora,
                    workers=workers, tier_weights=weights, include_zero=include_zero))
                assert by_tokens == result
        infos = await index.workers(MODEL)
        assert {(w.worker_id, w.dp_rank) for w in infos} == {
            (ref.worker_id, ref.dp_rank) for (_, ref) in reference.workers}
        for info in infos:
            ref = WorkerRef(info.worker_id, info.dp_rank)
            ref_worker = reference.workers[(MODEL, ref)]
            assert info.blocks_by_tier == reference.blocks_by_tier(MODEL, ref)
            assert (info.epoch, info.last_seq) == (ref_worker.epoch, ref_worker.last_seq)
            assert info.degraded == ref_worker.degraded
        if one_instance:  # counters are per process
            stats = await index.stats()
            assert stats.duplicates == expected_outcomes.count("duplicate")
            assert stats.stale == expected_outcomes.count("stale_epoch")
    finally:
        await index.close()


def reference_drops(batches: list[EventBatch]) -> dict[str, int]:
    reference = ReferenceIndex(GHOST_CAPACITY)
    for batch in batches:
        reference.apply(batch)
    return reference.dropped


class TestMemoryIndexContract:
    """The in-memory backend against the reference model."""

    @settings(max_examples=300, deadline=None)
    @given(batches=histories(), chunks=chunk_sizes, queries=queries_st)
    def test_matches_reference(self, batches: list[EventBatch], chunks: list[int],
                               queries: list[Any]) -> None:
        """Outcomes, presence, scores and worker views equal the reference model's."""

        async def make() -> Index:
            return MemoryIndex(CONFIG)

        asyncio.run(check_against_reference(make, batches, chunks, queries))

    @settings(max_examples=100, deadline=None)
    @given(batches=histories())
    def test_drop_counters_match_reference(self, batches: list[EventBatch]) -> None:
        """Unknown parents and unknown blocks are counted exactly as the reference counts them."""
        index = MemoryIndex(CONFIG)
        index.sync.apply(batches)
        assert index.sync.stats().dropped == reference_drops(batches)


class TestMemoryIndexPurePythonContract:
    """The in-memory backend as an install without the C extension runs it: dict table,
    Python key loop. Same reference, same answers."""

    @settings(max_examples=150, deadline=None)
    @given(batches=histories(), chunks=chunk_sizes, queries=queries_st)
    def test_matches_reference(self, batches: list[EventBatch], chunks: list[int],
                               queries: list[Any]) -> None:
        made: list[MemoryIndex] = []

        async def make() -> Index:
            made.append(MemoryIndex(CONFIG))
            return made[-1]

        with mock.patch("indexer.index.memory.new_block_table", DictBlockTable), \
                mock.patch("indexer.index.ledger.new_ledger_map", DictLedgerMap), \
                mock.patch("kvcore.keys._native", None):
            asyncio.run(check_against_reference(make, batches, chunks, queries))
        spaces = [space for index in made for space in index.sync._models.values()]
        assert all(type(space.blocks) is DictBlockTable for space in spaces)
        assert all(type(ledger.keys) is DictLedgerMap
                   for space in spaces for ledger in space.ledgers.values())


# The private redis-server, and one with the Redis module loaded (native/redis_module)
REDIS_SERVERS = ["redis_server", "module_redis_server"]


class TestRedisIndexContract:
    """The Redis backend against the reference model, on a private redis-server (and one
    with the Redis module, whose KVI.HOLDERS then writes presence)."""

    @pytest.mark.parametrize("server_fixture", REDIS_SERVERS)
    @settings(max_examples=80, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(batches=histories(), chunks=chunk_sizes, queries=queries_st,
           split=st.one_of(st.none(), st.integers(0, 40)), compact=st.sampled_from([0, 65536]))
    def test_matches_reference(self, request: pytest.FixtureRequest, server_fixture: str,
                               batches: list[EventBatch], chunks: list[int],
                               queries: list[Any], *, split: int | None,
                               compact: int) -> None:
        """Same as memory, and a second instance resumes from the ledger logs in Redis
        (appended to, or compacted into snapshots)."""
        redis_server: RedisServer = request.getfixturevalue(server_fixture)

        async def run() -> None:
            admin = aioredis.Redis.from_url(redis_server.url)
            await admin.flushall()
            await admin.aclose()

            async def make() -> Index:
                return RedisIndex.from_url(redis_server.url, config=CONFIG,
                                           log_compact_min_bytes=compact)

            await check_against_reference(make, batches, chunks, queries, split_at=split)

        asyncio.run(run())

    @pytest.mark.parametrize("server_fixture", REDIS_SERVERS)
    @settings(max_examples=30, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(batches=histories())
    def test_drop_counters_match_reference(self, request: pytest.FixtureRequest,
                                           server_fixture: str,
                                           batches: list[EventBatch]) -> None:
        """Drop counters of the Redis backend equal the reference model's."""
        redis_server: RedisServer = request.getfixturevalue(server_fixture)

        async def run() -> dict[str, int]:
            admin = aioredis.Redis.from_url(redis_server.url)
            await admin.flushall()
            await admin.aclose()
            index = RedisIndex.from_url(redis_server.url, config=CONFIG)
            try:
                await index.apply(batches)
                return (await index.stats()).dropped
            finally:
                await index.close()

        assert asyncio.run(run()) == reference_drops(batches)


@pytest.mark.redis_cluster
class TestRedisClusterIndexContract:
    """The Redis Cluster backend against the reference model, on a private 3-master
    cluster with replicas: the same histories, a second instance resuming from Redis."""

    @settings(max_examples=40, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(batches=histories(), chunks=chunk_sizes, queries=queries_st,
           split=st.one_of(st.none(), st.integers(0, 40)), compact=st.sampled_from([0, 65536]))
    def test_matches_reference(self, redis_cluster: RedisCluster, batches: list[EventBatch],
                               chunks: list[int], queries: list[Any], *,
                               split: int | None, compact: int) -> None:
        async def run() -> None:
            admin = RedisClusterIndex.from_url(redis_cluster.url)
            await admin._cluster.flushall()
            await admin.close()

            async def make() -> Index:
                return RedisClusterIndex.from_url(redis_cluster.url, config=CONFIG,
                                                  log_compact_min_bytes=compact)

            await check_against_reference(make, batches, chunks, queries, split_at=split)

        asyncio.run(run())


class TestShardedRedisIndexContract:
    """The sub-slot backend (`--redis-subslots`) against the reference model: 4 sub-slots
    on one redis-server, 3 on a 3-master cluster (one per master); a second instance
    resumes from the ledgers and sub-slot positions in Redis."""

    @settings(max_examples=60, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(batches=histories(), chunks=chunk_sizes, queries=queries_st,
           split=st.one_of(st.none(), st.integers(0, 40)), compact=st.sampled_from([0, 65536]))
    def test_matches_reference(self, redis_server: RedisServer, batches: list[EventBatch],
                               chunks: list[int], queries: list[Any], *,
                               split: int | None, compact: int) -> None:
        async def run() -> None:
            admin = aioredis.Redis.from_url(redis_server.url)
            await admin.flushall()
            await admin.aclose()

            async def make() -> Index:
                return ShardedRedisIndex.from_url(redis_server.url, subslots=4, config=CONFIG,
                                                  log_compact_min_bytes=compact)

            await check_against_reference(make, batches, chunks, queries, split_at=split)

        asyncio.run(run())

    @pytest.mark.redis_cluster
    @settings(max_examples=30, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(batches=histories(), chunks=chunk_sizes, queries=queries_st,
           split=st.one_of(st.none(), st.integers(0, 40)))
    def test_matches_reference_on_a_cluster(self, redis_cluster: RedisCluster,
                                            batches: list[EventBatch], chunks: list[int],
                                            queries: list[Any], *, split: int | None) -> None:
        async def run() -> None:
            admin = RedisClusterIndex.from_url(redis_cluster.url)
            await admin._cluster.flushall()
            await admin.close()

            async def make() -> Index:
                return ShardedRedisIndex.from_url(redis_cluster.url, subslots=3, cluster=True,
                                                  config=CONFIG)

            await check_against_reference(make, batches, chunks, queries, split_at=split)

        asyncio.run(run())


BACKENDS = ["memory", "redis", "redis-compact", "redis-module",
            pytest.param("redis-cluster", marks=pytest.mark.redis_cluster)]
SUBSLOT_BACKENDS = ["redis-subslots",
                    pytest.param("redis-cluster-subslots", marks=pytest.mark.redis_cluster)]


async def open_backend(request: pytest.FixtureRequest) -> Index:
    """The backend `request.param` names, on a flushed private Redis (or cluster)."""
    name = request.param
    if name == "memory":
        return MemoryIndex(CONFIG)
    if name in ("redis-cluster", "redis-cluster-subslots"):
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        cluster_index = RedisClusterIndex.from_url(cluster.url, config=CONFIG,
                                                   bucket_load=COMPACT_BUCKET_LOAD)
        await cluster_index._cluster.flushall()
        if name == "redis-cluster":
            return cluster_index
        await cluster_index.close()
        return ShardedRedisIndex.from_url(cluster.url, subslots=3, cluster=True, config=CONFIG)
    server: RedisServer = request.getfixturevalue(
        "module_redis_server" if name == "redis-module" else "redis_server")
    client = aioredis.Redis.from_url(server.url)
    await client.flushall()
    if name == "redis-subslots":
        return ShardedRedisIndex(client, subslots=4, config=CONFIG)
    load = COMPACT_BUCKET_LOAD if name == "redis-compact" else DEFAULT_BUCKET_LOAD
    return RedisIndex(client, config=CONFIG, bucket_load=load)


@pytest.fixture(params=BACKENDS + SUBSLOT_BACKENDS)
async def plain_index(request: pytest.FixtureRequest) -> AsyncIterator[Index]:
    """Each backend in turn; the Redis one on a flushed private redis-server, with one
    presence hash per model (the default) and with buckets (`--redis-bucket-load 40`), one
    hash on a redis-server with the Redis module, on a Redis Cluster with buckets, and the
    sub-slot one (`--redis-subslots`: 4 on one redis-server, 3 on the cluster)."""
    index = await open_backend(request)
    yield index
    await index.close()


class TestQueryErrors:
    """Queries the index refuses get a clear error on every backend; nothing changes."""

    @pytest.mark.parametrize(
        ("query", "message"),
        [
            (ScoreQuery(model="", block_keys=[1]), "model must not be empty"),
            (ScoreQuery(model=MODEL), "exactly one of block_keys and token_ids"),
            (ScoreQuery(model=MODEL, block_keys=[1], token_ids=[1, 2], block_size=1),
             "exactly one of"),
            (ScoreQuery(model=MODEL, token_ids=[1, 2, 3, 4]), "block_size must be > 0"),
            (ScoreQuery(model=MODEL, token_ids=b"\x01\x02\x03", block_size=1), "multiple of 4"),
            (ScoreQuery(model=MODEL, token_ids=[0] * (CONFIG.max_query_tokens + 1),
                        block_size=16), "exceeds the limit"),
            (ScoreQuery(model=MODEL, block_keys=[0] * (CONFIG.max_query_blocks + 1)),
             "exceeds the limit"),
            (ScoreQuery(model=MODEL, block_keys=[1], tier_weights=TierWeights(cpu=-1.0)),
             "tier weight cpu"),
        ],
    )
    async def test_refused(self, plain_index: Index, query: ScoreQuery, message: str) -> None:
        """Each malformed query raises InvalidQueryError naming what is wrong."""
        from indexer.errors import InvalidQueryError

        with pytest.raises(InvalidQueryError, match=message):
            await plain_index.score(query)

    async def test_bad_batch_leaves_index_unchanged(self, plain_index: Index) -> None:
        """A batch list with one invalid batch raises before any batch is applied."""
        from kvcore.bus import BusError

        good = EventBatch(schema=SCHEMA_VERSION, model=MODEL, worker_id="w", epoch=1, seq=0,
                          events=[make_event("store", ((0, 1), 0, "gpu", None), 1)])
        bad_tokens = EventBatch(schema=SCHEMA_VERSION, model=MODEL, worker_id="w", epoch=1,
                                seq=1, events=[BlockStored(block_hashes=[1, 2],
                                                           token_ids=b"\x00" * 12,
                                                           block_size=BLOCK)])
        wrong_schema = EventBatch(schema=SCHEMA_VERSION + 1, model=MODEL, worker_id="w",
                                  epoch=1, seq=1, events=[])
        huge_hash = EventBatch(schema=SCHEMA_VERSION, model=MODEL, worker_id="w", epoch=1,
                               seq=1, events=[BlockRemoved(block_hashes=[2**64])])
        for bad in (bad_tokens, wrong_schema, huge_hash):
            with pytest.raises(BusError):
                await plain_index.apply([good, bad])
        assert await plain_index.presence(MODEL) == {}
        assert await plain_index.workers() == []

    async def test_block_size_is_learned(self, plain_index: Index) -> None:
        """The model's block size comes from its workers' token-carrying stores."""
        assert await plain_index.block_size(MODEL) is None
        await plain_index.apply([EventBatch(
            schema=SCHEMA_VERSION, model=MODEL, worker_id="w", epoch=1, seq=0,
            events=[make_event("store", ((0, 1), 0, "gpu", None), 1)])])
        assert await plain_index.block_size(MODEL) == BLOCK
        assert await plain_index.block_size("other") is None

    async def test_unknown_model_scores_nothing(self, plain_index: Index) -> None:
        """A model nobody serves gives no scores, with the query's block count."""
        result = await plain_index.score(ScoreQuery(model="nobody/serves-this", block_keys=[1, 2]))
        assert (result.query_blocks, result.scores) == (2, [])


class TestModelLifetime:
    """A model lives while it has a worker rank, on every backend."""

    async def test_model_goes_with_its_last_worker(self, plain_index: Index) -> None:
        """Removing the last worker forgets the model: no blocks, no block size, no
        listing; another model is untouched, and the model can start again afresh."""
        def stores(model: str, worker: str, rank: int = 0) -> EventBatch:
            return EventBatch(schema=SCHEMA_VERSION, model=model, worker_id=worker,
                              dp_rank=rank, epoch=1, seq=0,
                              events=[make_event("store", ((0, 1), 0, "gpu", None), 1)])

        await plain_index.apply([stores(MODEL, "a"), stores(MODEL, "b", 0),
                               stores(MODEL, "b", 1), stores("other", "c")])
        assert await plain_index.remove_worker(MODEL, "a") == 1
        assert await plain_index.block_size(MODEL) == BLOCK  # b still serves it
        assert await plain_index.remove_worker(MODEL, "b") == 2
        assert await plain_index.workers(MODEL) == []
        assert await plain_index.presence(MODEL) == {}
        assert await plain_index.block_size(MODEL) is None
        assert [w.model for w in await plain_index.workers()] == ["other"]
        assert await plain_index.drop_empty_models() == []  # nothing was left behind
        assert len(await plain_index.presence("other")) == 2
        await plain_index.apply([stores(MODEL, "d")])
        assert [(w.worker_id, w.last_seq) for w in await plain_index.workers(MODEL)] == [("d", 0)]
        assert await plain_index.block_size(MODEL) == BLOCK


class TestExportImport:
    """A rank's exported state, imported into a fresh index, gives the same index."""

    @settings(max_examples=40, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(batches=histories())
    def test_round_trip(self, redis_server: RedisServer, batches: list[EventBatch]) -> None:
        """Export every rank from memory; import into memory, into Redis and into Redis
        sub-slots: same presence, same positions, and later batches apply the same way."""

        async def run() -> None:
            source = MemoryIndex(CONFIG)
            half = len(batches) // 2
            await source.apply(batches[:half])
            ranks = [(MODEL, WorkerRef(w.worker_id, w.dp_rank))
                     for w in await source.workers(MODEL)]
            states = await source.export_ranks(ranks)
            admin = aioredis.Redis.from_url(redis_server.url)
            targets: list[Index] = [MemoryIndex(CONFIG), RedisIndex.from_url(
                redis_server.url, config=CONFIG), ShardedRedisIndex.from_url(
                redis_server.url, subslots=4, config=CONFIG)]
            await source.apply(batches[half:])
            for target in targets:
                await admin.flushall()  # one layout per Redis: the other one refuses it
                await target.import_ranks(states)
                await target.apply(batches[half:])
                assert await target.presence(MODEL) == await source.presence(MODEL)
                assert [(w.worker_id, w.dp_rank, w.epoch, w.last_seq, w.blocks_by_tier)
                        for w in await target.workers(MODEL)] == [
                    (w.worker_id, w.dp_rank, w.epoch, w.last_seq, w.blocks_by_tier)
                    for w in await source.workers(MODEL)]
                await target.close()
            await admin.aclose()

        asyncio.run(run())

    async def test_markers(self, plain_index: Index) -> None:
        """Markers are stored, read back and deleted."""
        assert await plain_index.get_marker("p.0") is None
        await plain_index.set_marker("p.0", "gen-1")
        assert await plain_index.get_marker("p.0") == "gen-1"
        await plain_index.set_marker("p.0", None)
        assert await plain_index.get_marker("p.0") is None


# --- shared storage pools --------------------------------------------------------------

POOL_WRITERS = ("A", "B", "C")
POOL_CHAIN = 12
pool_ops = st.lists(
    st.tuples(
        st.sampled_from(POOL_WRITERS),
        st.sampled_from(["store", "store", "remove", "wipe", "gap"]),
        st.lists(st.integers(0, POOL_CHAIN - 1), min_size=1, max_size=6, unique=True),
        st.integers(0, 6).map(float),  # few distinct times: ties and out-of-order writes
    ),
    max_size=25,
)


class _PoolReference:
    """The pool rule, written from its description (docs/architecture.md): the newest write
    wins per engine hash; a wipe removes what was stored up to its time and sets a floor;
    a writer's gap wipes the pools it wrote into."""

    def __init__(self) -> None:
        self.held: dict[int, float] = {}
        self.gone: dict[int, float] = {}
        self.floor = 0.0
        self.written: set[str] = set()

    def store(self, hashes: list[int], ts: float) -> None:
        for h in hashes if ts >= self.floor else []:
            if self.gone.get(h, ts) <= ts and self.held.get(h, ts) <= ts:
                self.gone.pop(h, None)
                self.held[h] = ts

    def remove(self, hashes: list[int], ts: float) -> None:
        for h in hashes:
            if self.held.get(h, ts) <= ts:
                self.held.pop(h, None)
                if ts >= self.floor:
                    self.gone[h] = max(self.gone.get(h, ts), ts)

    def wipe(self, ts: float) -> None:
        self.held = {h: t for h, t in self.held.items() if t > ts}
        self.floor = max(self.floor, ts)
        self.gone = {h: t for h, t in self.gone.items() if t > self.floor}


def _pool_batches(ops: list[tuple[str, str, list[int], float]]
                  ) -> tuple[list[EventBatch], _PoolReference]:
    tokens = list(range(POOL_CHAIN * BLOCK))
    seqs = dict.fromkeys(POOL_WRITERS, 0)

    def batch(writer: str, events: list[Any], ts: float, skip: int = 0) -> EventBatch:
        seqs[writer] += skip
        made = EventBatch(schema=SCHEMA_VERSION, model=MODEL, worker_id=writer, epoch=1,
                          seq=seqs[writer], events=events, ts=ts)
        seqs[writer] += 1
        return made

    batches = [batch(w, [BlockStored(block_hashes=list(range(100, 100 + POOL_CHAIN)),
                                     token_ids=pack_tokens(tokens), block_size=BLOCK)], 0.0)
               for w in POOL_WRITERS]
    # D holds nothing itself and mounts P.
    batches.append(EventBatch(schema=SCHEMA_VERSION, model=MODEL, worker_id="D", epoch=1,
                              seq=0, events=[AllBlocksCleared()]))
    reference = _PoolReference()
    written: dict[str, bool] = dict.fromkeys(POOL_WRITERS, False)
    for writer, kind, picked, ts in ops:
        hashes = [100 + i for i in picked]
        if kind == "gap":
            batches.append(batch(writer, [], ts, skip=1))
            if written[writer]:
                reference.wipe(ts)
            written[writer] = False
            continue
        event: Any = (BlockStored(block_hashes=hashes, medium="storage", pool="P")
                      if kind == "store" else
                      BlockRemoved(block_hashes=hashes, medium="storage", pool="P")
                      if kind == "remove" else AllBlocksCleared(pool="P"))
        batches.append(batch(writer, [event], ts))
        written[writer] = True
        if kind == "store":
            reference.store(hashes, ts)
        elif kind == "remove":
            reference.remove(hashes, ts)
        else:
            reference.wipe(ts)
    return batches, reference


async def _check_pool_history(index: Index, ops: list[tuple[str, str, list[int], float]]
                              ) -> None:
    batches, reference = _pool_batches(ops)
    for one in batches:  # one call each: the order the reference applies them in
        await index.apply([one])
    keys = block_keys_for_tokens(list(range(POOL_CHAIN * BLOCK)), BLOCK, MODEL)
    key_of = {100 + i: key for i, key in enumerate(keys)}
    presence = await index.presence(MODEL)
    pool = WorkerRef("P", -1)
    in_pool = {key for key, owners in presence.items() if pool in owners}
    assert in_pool == {key_of[h] for h in reference.held}
    expected = 0
    while expected < POOL_CHAIN and 100 + expected in reference.held:
        expected += 1
    result = await index.score(ScoreQuery(model=MODEL, block_keys=keys,
                                          mounts={"D": frozenset({"P"})}))
    got = next((s.matched_blocks for s in result.scores if s.worker_id == "D"), 0)
    assert got == expected
    assert all(s.worker_id != "P" for s in result.scores)


class TestPoolContract:
    """Random pool histories (stores, evictions, wipes, writer gaps, out-of-order times)
    from three writers: every backend holds exactly the reference's pool, and credit a
    mounting worker with its prefix."""

    @settings(max_examples=150, deadline=None)
    @given(ops=pool_ops)
    def test_memory_matches_reference(self, ops: list[tuple[str, str, list[int], float]]
                                      ) -> None:
        asyncio.run(_check_pool_history(MemoryIndex(CONFIG), ops))

    @settings(max_examples=60, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(ops=pool_ops)
    def test_redis_matches_reference(self, redis_server: RedisServer,
                                     ops: list[tuple[str, str, list[int], float]]) -> None:
        async def run() -> None:
            admin = aioredis.Redis.from_url(redis_server.url)
            await admin.flushall()
            await admin.aclose()
            index = RedisIndex.from_url(redis_server.url, config=CONFIG)
            try:
                await _check_pool_history(index, ops)
            finally:
                await index.close()

        asyncio.run(run())

    @settings(max_examples=60, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(ops=pool_ops)
    def test_subslots_match_reference(self, redis_server: RedisServer,
                                      ops: list[tuple[str, str, list[int], float]]) -> None:
        """The sub-slot backend (4 sub-slots): the pool decided in its home sub-slot, its
        presence spread over the others."""
        async def run() -> None:
            admin = aioredis.Redis.from_url(redis_server.url)
            await admin.flushall()
            await admin.aclose()
            index = ShardedRedisIndex.from_url(redis_server.url, subslots=4, config=CONFIG)
            try:
                await _check_pool_history(index, ops)
            finally:
                await index.close()

        asyncio.run(run())

    @pytest.mark.redis_cluster
    @settings(max_examples=20, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(ops=pool_ops)
    def test_subslots_on_a_cluster_match_reference(
            self, redis_cluster: RedisCluster, ops: list[tuple[str, str, list[int], float]]
    ) -> None:
        """3 sub-slots on the 3-master cluster: the pool's home on one master, its
        presence on all three."""
        async def run() -> None:
            admin = RedisClusterIndex.from_url(redis_cluster.url)
            await admin._cluster.flushall()
            await admin.close()
            index = ShardedRedisIndex.from_url(redis_cluster.url, subslots=3, cluster=True,
                                               config=CONFIG)
            try:
                await _check_pool_history(index, ops)
            finally:
                await index.close()

        asyncio.run(run())


# --- hybrid-attention models ------------------------------------------------------------

HYBRID_MODEL = "google/gemma-3-27b"
HYBRID_BS = 4
HYBRID_TOKENS = list(range(300, 300 + 6 * HYBRID_BS))
HYBRID_HASHES = [0xA0 + i for i in range(6)]


def group_stores(*groups: tuple[int, str | None, int]) -> list[Event]:
    """The six blocks stored in each (group, kind, window)."""
    return [BlockStored(HYBRID_HASHES, None, pack_tokens(HYBRID_TOKENS), HYBRID_BS, group=g,
                        group_kind=kind, sliding_window=window) for g, kind, window in groups]


def hybrid_batch(seq: int, events: list[Event], worker: str = "w", epoch: int = 1,
          schema: int = 2) -> EventBatch:
    return EventBatch(schema=schema, model=HYBRID_MODEL, worker_id=worker, epoch=epoch,
                      seq=seq, events=events)


async def hybrid_hit(index: Index, n: int, worker: str = "w") -> int:
    result = await index.score(ScoreQuery(model=HYBRID_MODEL, block_size=HYBRID_BS,
                                          token_ids=HYBRID_TOKENS[: n * HYBRID_BS]))
    return next((s.matched_blocks for s in result.scores if s.worker_id == worker), 0)


HYBRID = group_stores((0, None, 0), (1, "sliding_window", 2 * HYBRID_BS))


class TestHybridGroups:
    """Hybrid-attention models (bus schema 2): presence per KV-cache group, and Score by
    vLLM's reuse rule (indexer/index/hybrid.py), the same on every backend (sub-slot
    models included)."""

    async def test_window_group_evicting_its_past_keeps_the_hit(self, plain_index: Index) -> None:
        """The issue's scenario: six blocks in both groups, the window group frees 0..3:
        a 6-block prompt still hits 6 (vLLM reuses them); its 4-block prefix hits 0."""
        await plain_index.apply([hybrid_batch(0, HYBRID)])
        assert [await hybrid_hit(plain_index, n) for n in (6, 4)] == [6, 4]
        await plain_index.apply([hybrid_batch(1, [BlockRemoved(HYBRID_HASHES[:4], group=1)])])
        assert [await hybrid_hit(plain_index, n) for n in (6, 5, 4, 1)] == [6, 0, 0, 0]
        # Full attention losing a block cuts the hit there, whatever the window holds.
        await plain_index.apply([hybrid_batch(2, [BlockRemoved(HYBRID_HASHES[5:], group=0)])])
        assert await hybrid_hit(plain_index, 6) == 0

    async def test_a_group_removal_leaves_the_other_groups(self, plain_index: Index) -> None:
        """Group 0's presence, tiers and counts do not move when group 1 evicts."""
        await plain_index.apply([hybrid_batch(0, HYBRID),
                                 hybrid_batch(1, [BlockRemoved(HYBRID_HASHES, group=1)])])
        [info] = await plain_index.workers(HYBRID_MODEL)
        assert info.blocks_by_tier == {"gpu": 6}
        assert len(await plain_index.presence(HYBRID_MODEL)) == 6
        assert await hybrid_hit(plain_index, 6) == 0  # the window group holds nothing

    async def test_offload_tiers_per_group(self, plain_index: Index) -> None:
        """A CPU copy in full attention counts at the CPU weight; the GPU window group's
        copies do not make the prefix GPU."""
        await plain_index.apply([hybrid_batch(0, [*HYBRID,
                                                  BlockStored(HYBRID_HASHES[:2], medium="cpu"),
                                           BlockRemoved(HYBRID_HASHES[:2])])])
        result = await plain_index.score(ScoreQuery(model=HYBRID_MODEL, token_ids=HYBRID_TOKENS,
                                                    block_size=HYBRID_BS))
        [score] = result.scores
        assert (score.matched_blocks, score.blocks_by_tier) == (6, {"gpu": 4, "cpu": 2})
        assert score.weighted_score == pytest.approx(4 + 2 * 0.8)

    async def test_clear_and_new_epoch_clear_every_group(self, plain_index: Index) -> None:
        """AllBlocksCleared and a restart empty the groups too: no stale window presence
        turns a later full-attention store into a hit the window group does not hold."""
        await plain_index.apply([hybrid_batch(0, HYBRID)])
        await plain_index.apply([hybrid_batch(0, group_stores((0, None, 0)), epoch=2)])
        assert await hybrid_hit(plain_index, 6) == 0

    async def test_plain_model_with_kind_annotations_scores_as_today(self, plain_index: Index
                                                                     ) -> None:
        """One group (even one naming a window) is scored by the plain prefix walk."""
        window = group_stores((0, "sliding_window", 2 * HYBRID_BS))
        await plain_index.apply([hybrid_batch(0, window),
                                 hybrid_batch(1, [BlockRemoved(HYBRID_HASHES[:4])])])
        assert await hybrid_hit(plain_index, 6) == 0
        assert [await hybrid_hit(plain_index, n) for n in (6, 4)] == [0, 0]

    async def test_v1_batches_of_a_plain_model(self, plain_index: Index) -> None:
        """Schema 1 (a publisher that predates groups) is indexed exactly as before."""
        await plain_index.apply([hybrid_batch(0, group_stores((0, None, 0)), schema=1),
                                 hybrid_batch(1, [BlockRemoved(HYBRID_HASHES[4:])], schema=1)])
        assert [await hybrid_hit(plain_index, n) for n in (6, 4)] == [4, 4]

    async def test_chain_resolves_across_groups(self, plain_index: Index) -> None:
        """A window group's child whose parent it evicted resolves through another group
        (engine hashes name the same content in every group)."""
        hashes = HYBRID_HASHES

        def block_tokens(first: int, end: int) -> bytes:
            return pack_tokens(HYBRID_TOKENS[first * HYBRID_BS : end * HYBRID_BS])

        await plain_index.apply([hybrid_batch(0, [
            BlockStored(hashes[:3], None, block_tokens(0, 3), HYBRID_BS),
            BlockStored(hashes[2:3], hashes[1], block_tokens(2, 3), HYBRID_BS,
                        group=1, group_kind="sliding_window", sliding_window=2 * HYBRID_BS),
        ])])
        assert (await plain_index.stats()).dropped == {}
        assert await hybrid_hit(plain_index, 3) == 0  # the window needs blocks 1 and 2: 1 missing
        await plain_index.apply([hybrid_batch(1, [BlockStored(
            hashes[1:2], hashes[0], block_tokens(1, 2), HYBRID_BS, group=1)])])
        assert await hybrid_hit(plain_index, 3) == 3


class TestHybridPools:
    """Hybrid models and shared storage pools together: a pool's presence lives in KV-cache
    group 0 (the full-attention group), so its credit lengthens a mounter's full-attention
    prefix and the hit is still vLLM's rule over every group."""

    @staticmethod
    async def _setup(index: Index) -> None:
        tokens = pack_tokens(HYBRID_TOKENS)
        await index.apply([
            # w: both groups, and a write-through of its blocks into pool P
            hybrid_batch(0, [*HYBRID, BlockStored(HYBRID_HASHES, medium="storage",
                                                  pool="P")]),
            # m: only the window group holds the blocks (its full-attention copies gone)
            hybrid_batch(0, [BlockStored(HYBRID_HASHES, None, tokens, HYBRID_BS, group=1,
                                         group_kind="sliding_window",
                                         sliding_window=2 * HYBRID_BS)], worker="m"),
        ])

    @staticmethod
    async def _hits(index: Index, mounts: dict[str, frozenset[str]] | None,
                    keys: bool = False) -> dict[str, int]:
        if keys:
            query = ScoreQuery(model=HYBRID_MODEL, block_size=HYBRID_BS, mounts=mounts,
                               block_keys=block_keys_for_tokens(HYBRID_TOKENS, HYBRID_BS,
                                                                HYBRID_MODEL))
        else:
            query = ScoreQuery(model=HYBRID_MODEL, block_size=HYBRID_BS, mounts=mounts,
                               token_ids=HYBRID_TOKENS)
        result = await index.score(query)
        return {s.worker_id: s.matched_blocks for s in result.scores}

    @pytest.mark.parametrize("keys", [False, True])
    async def test_pool_credit_applies_to_group_0(self, plain_index: Index, keys: bool) -> None:
        await self._setup(plain_index)
        presence = await plain_index.presence(HYBRID_MODEL)
        assert all(WorkerRef("P", -1) in owners for owners in presence.values())
        assert len(presence) == 6
        # Without mounts m's full-attention group holds nothing: no hit.
        assert (await self._hits(plain_index, None, keys)).get("m", 0) == 0
        # Mounting P credits group 0; m's own window group holds the window: a 6-block hit.
        mounts = {"m": frozenset({"P"}), "c": frozenset({"P"})}
        hits = await self._hits(plain_index, mounts, keys)
        assert hits["w"] == 6 and hits["m"] == 6
        # A cold mounter (no cache of its own) has no window group: vLLM reuses nothing.
        assert hits.get("c", 0) == 0
        assert "P" not in hits

    async def test_window_eviction_cuts_the_mounter_hit(self, plain_index: Index) -> None:
        await self._setup(plain_index)
        await plain_index.apply([hybrid_batch(1, [BlockRemoved(HYBRID_HASHES[4:], group=1)],
                                            worker="m")])
        hits = await self._hits(plain_index, {"m": frozenset({"P"})})
        # the window of 2 blocks must end at the hit: blocks 2..3 are held, so L = 4
        assert hits["m"] == 4
