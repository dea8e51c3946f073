"""Redis-specific guarantees: durable ledgers, bounded logs, atomic guarded writes, layout."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import hiredis
import msgspec
import nats
import pytest
import redis.asyncio as aioredis
from redis.cluster import key_slot

from bench.workload import make_workload, pool_mounts
from indexer.embedded import EmbeddedNats
from indexer.errors import BackendError
from indexer.index import scoring
from indexer.index.layouts import model_prefix
from indexer.index.memory import MemoryIndex
from indexer.index.protocol import ApplyOutcome, IndexConfig, ScoreQuery, WorkerRef
from indexer.index.redis import MODELS_KEY, RedisIndex, _hmget_packed
from indexer.ingest.liveness import LivenessWatcher
from kvcore.bus import SCHEMA_VERSION, BlockRemoved, BlockStored, EventBatch, pack_tokens
from kvcore.keys import NATIVE, block_keys_for_tokens, pack_keys
from kvcore.topology import WorkerRecord, ensure_liveness_bucket, liveness_key
from tests.support.ledger_batches import BS, MODEL, TOKENS, batch, stored
from tests.support.polling import eventually
from tests.support.servers import RedisServer

pytestmark = pytest.mark.integration

CONFIG = IndexConfig(ghost_capacity=3)


def keys_of_prompt() -> list[int]:
    from kvcore.keys import block_keys_for_tokens

    return block_keys_for_tokens(TOKENS, BS, MODEL)


async def matched(index: RedisIndex | MemoryIndex) -> int:
    result = await index.score(ScoreQuery(model=MODEL, block_keys=keys_of_prompt()))
    return result.scores[0].matched_blocks if result.scores else 0


class TestDurableLedger:
    """A new process resumes a worker exactly where the last one stopped."""

    async def test_ghost_fifo_survives_reload(self, redis_client: aioredis.Redis) -> None:
        """Ghosts popped before a restart stay forgotten; the ones kept still resolve."""
        from kvcore.bus import BlockRemoved

        history = [batch(0, stored(1, 6)), batch(1, BlockRemoved(block_hashes=[6, 5, 4, 3, 2]))]
        later = [batch(2, stored(4, 4, parent=3)), batch(3, stored(6, 6, parent=5))]
        memory = MemoryIndex(CONFIG)
        await memory.apply(history + later)

        first = RedisIndex(redis_client, config=CONFIG)
        await first.apply(history)
        second = RedisIndex(redis_client, config=CONFIG)  # no shared Python state
        await second.apply(later)
        # ghosts after the removal: [4, 3, 2] (6 and 5 were popped): parent 3 resolves,
        # parent 5 does not
        assert (await second.stats()).dropped == (await memory.stats()).dropped == {
            "unknown_parent": 1}
        assert await second.presence(MODEL) == await memory.presence(MODEL)

    async def test_compacted_log_stays_bounded_and_replays(
        self, redis_client: aioredis.Redis
    ) -> None:
        """Store/remove churn keeps the log within twice its live size; a reload agrees."""
        from kvcore.bus import BlockRemoved

        index = RedisIndex(redis_client, config=CONFIG, log_compact_min_bytes=0)
        memory = MemoryIndex(CONFIG)
        seq = 0
        for _ in range(50):
            for b in (batch(seq, stored(1, 6)), batch(seq + 1, BlockRemoved(block_hashes=[5, 6]))):
                await index.apply([b])
                await memory.apply([b])
            seq += 2
        log_key = f"{model_prefix(MODEL)}w:0:log"
        live = 18 * 6 + 9 * 3
        assert 0 < len(await log_of(redis_client, log_key)) <= 2 * live + 18 * 6
        reloaded = RedisIndex(redis_client, config=CONFIG)
        final = batch(seq, stored(6, 6, parent=5))
        await reloaded.apply([final])
        await memory.apply([final])
        assert await reloaded.presence(MODEL) == await memory.presence(MODEL)
        assert (await reloaded.stats()).dropped == {}  # parent 5 is a ghost: it resolved
        assert await matched(reloaded) == 4  # block 5 itself is evicted: the prefix stops


    async def test_string_log_of_an_earlier_version_loads_and_is_replaced(
        self, redis_client: aioredis.Redis
    ) -> None:
        """A log an earlier version wrote as one string replays; the next write replaces
        it by a list that replays to the same ledger."""
        history = [batch(0, stored(1, 2)), batch(1, stored(3, 4, parent=2))]
        await RedisIndex(redis_client, config=CONFIG).apply(history)
        log_key = f"{model_prefix(MODEL)}w:0:log"
        whole = await log_of(redis_client, log_key)
        await redis_client.delete(log_key)
        await redis_client.set(log_key, whole)  # as earlier versions stored it
        reloaded = RedisIndex(redis_client, config=CONFIG)
        later = batch(2, stored(5, 5, parent=4))
        await reloaded.apply([later])
        assert await redis_client.type(log_key) == b"list"
        memory = MemoryIndex(CONFIG)
        await memory.apply([*history, later])
        again = RedisIndex(redis_client, config=CONFIG)
        after = batch(3, stored(6, 6, parent=5))  # parent 5 resolves from the new log
        await again.apply([after])
        await memory.apply([after])
        assert await again.presence(MODEL) == await memory.presence(MODEL)
        assert (await again.stats()).dropped == {}

    async def test_a_restart_restores_many_ranks_at_once(
        self, redis_client: aioredis.Redis
    ) -> None:
        """After a restart, one apply naming 150 ranks (5,000 blocks each, some evicted,
        some offloaded, one rank degraded, one with an earlier version's string log)
        restores their ledgers in round trips of many ranks: each continues its chain
        where it stopped, exactly as the memory index fed the same batches."""
        blocks, ranks = 5_000, 150
        tokens = pack_tokens([t % 50_000 for t in range(blocks * BS)])
        history: list[EventBatch] = []
        for rank in range(ranks):
            worker = f"w{rank}"
            history += [
                batch(0, BlockStored(block_hashes=list(range(1, blocks + 1)), parent_hash=None,
                                     token_ids=tokens, block_size=BS), worker=worker),
                batch(1, BlockRemoved(block_hashes=list(range(blocks - rank, blocks + 1))),
                      BlockStored(block_hashes=[1, 2], parent_hash=None,
                                  token_ids=tokens[: 2 * BS * 4], block_size=BS,
                                  medium="cpu"), worker=worker),
            ]
        history.append(batch(2, BlockStored(block_hashes=[77_777], parent_hash=88_888,
                                            token_ids=tokens[: BS * 4], block_size=BS),
                             worker="w7"))  # an unknown parent: degraded
        memory = MemoryIndex(CONFIG)
        for start in range(0, len(history), 64):
            await RedisIndex(redis_client, config=CONFIG).apply(history[start : start + 64])
        await memory.apply(history)
        string_log = f"{model_prefix(MODEL)}w:3:log"
        whole = await log_of(redis_client, string_log)
        await redis_client.delete(string_log)
        await redis_client.set(string_log, whole)  # as earlier versions stored it
        children = [batch(3 if rank == 7 else 2,
                          BlockStored(block_hashes=[blocks + 1], parent_hash=blocks - rank - 1,
                                      token_ids=tokens[: BS * 4], block_size=BS),
                          worker=f"w{rank}")
                    for rank in range(ranks)]
        reloaded = RedisIndex(redis_client, config=CONFIG)
        read_alone: list[str] = []  # ranks read by a round trip of their own
        read_rank = reloaded._read_rank

        async def counted(wp: str, ledger: Any) -> Any:
            read_alone.append(wp)
            return await read_rank(wp, ledger)

        reloaded._read_rank = counted  # type: ignore[method-assign]
        outcomes = await reloaded.apply(children)
        await memory.apply(children)
        assert outcomes == [ApplyOutcome.APPLIED] * ranks
        assert read_alone == [f"{model_prefix(MODEL)}w:3:"]  # only the string log's
        assert (await reloaded.stats()).dropped == {}  # every parent resolved
        assert await reloaded.presence(MODEL) == await memory.presence(MODEL)
        by_worker = {(w.worker_id, w.dp_rank): w for w in await reloaded.workers(MODEL)}
        assert by_worker == {(w.worker_id, w.dp_rank): w for w in await memory.workers(MODEL)}
        assert by_worker[("w7", 0)].degraded and not by_worker[("w8", 0)].degraded
        assert by_worker[("w9", 0)].blocks_by_tier == {"gpu": blocks - 10 + 1, "cpu": 2}

    async def test_an_import_over_many_ranks_some_stored(
        self, redis_client: aioredis.Redis
    ) -> None:
        """A rebuild's import of 200 ranks (2,000 blocks each) in one call, half of them
        already in Redis at an older position: every rank ends at the imported state and
        later batches apply exactly as in the memory index."""
        blocks, ranks = 2_000, 200
        tokens = pack_tokens([t % 50_000 for t in range((blocks + 1) * BS)])

        def chain(rank: int, first: int, count: int, seq: int) -> EventBatch:
            parent = first - 1 if first > 1 else None
            return batch(seq, BlockStored(
                block_hashes=list(range(first, first + count)), parent_hash=parent,
                token_ids=tokens[(first - 1) * BS * 4 : (first - 1 + count) * BS * 4],
                block_size=BS), worker=f"w{rank}")

        older = [chain(rank, 1, 500, 0) for rank in range(0, ranks, 2)]
        newer = [chain(rank, 1, blocks - rank, 0) for rank in range(ranks)]
        later = [chain(rank, blocks - rank + 1, 1, 1) for rank in range(ranks)]
        source = MemoryIndex(CONFIG)
        await source.apply(newer)
        states = await source.export_ranks([(MODEL, WorkerRef(f"w{r}", 0))
                                            for r in range(ranks)])
        await RedisIndex(redis_client, config=CONFIG).apply(older)
        target = RedisIndex(redis_client, config=CONFIG)
        await target.import_ranks(states)
        assert await target.presence(MODEL) == await source.presence(MODEL)
        again = RedisIndex(redis_client, config=CONFIG)  # the ledgers as Redis has them
        assert await again.apply(later) == [ApplyOutcome.APPLIED] * ranks
        await source.apply(later)
        assert await again.presence(MODEL) == await source.presence(MODEL)
        assert (await again.stats()).dropped == {}

    async def test_string_log_is_appended_to_by_the_script(
        self, redis_client: aioredis.Redis
    ) -> None:
        """A record appending to a string log (a writer that did not replace it) extends
        the string instead of failing half-way."""
        index = RedisIndex(redis_client, config=CONFIG)
        await index.apply([batch(0, stored(1, 2))])
        log_key = f"{model_prefix(MODEL)}w:0:log"
        whole = await log_of(redis_client, log_key)
        await redis_client.delete(log_key)
        await redis_client.set(log_key, whole)
        await index.apply([batch(1, stored(3, 4, parent=2))])  # its cached ledger appends
        assert await redis_client.type(log_key) == b"string"
        again = RedisIndex(redis_client, config=CONFIG)
        await again.apply([batch(2, stored(5, 6, parent=4))])
        assert (await again.stats()).dropped == {}
        assert await matched(again) == 6


    async def test_snapshot_is_stored_in_chunks_and_replays(
        self, redis_client: aioredis.Redis
    ) -> None:
        """A log replaced by a snapshot (a resync's clear), or a segment appended, larger
        than one list element is pushed in elements of at most 8,000 bytes, and a
        reload maps what was stored."""
        from kvcore.bus import AllBlocksCleared, BlockStored

        blocks = 1_400  # 22,404 bytes of snapshot (16 a block, 4 of run header): three elements
        big = BlockStored(block_hashes=list(range(1, blocks + 1)), parent_hash=None,
                          token_ids=pack_tokens(list(range(blocks * BS))), block_size=BS)
        index = RedisIndex(redis_client, config=CONFIG)
        await index.apply([batch(0, stored(1, 2)), batch(1, AllBlocksCleared(), big)])
        log_key = f"{model_prefix(MODEL)}w:0:log"
        elements = await redis_client.lrange(log_key, 0, -1)
        assert len(elements) == 3 and max(len(e) for e in elements) <= 8_000
        await index.apply([batch(0, big, worker="appended")])  # a first batch: appended
        appended = await redis_client.lrange(f"{model_prefix(MODEL)}w:1:log", 0, -1)
        assert [len(e) for e in appended] == [len(e) for e in elements]
        memory = MemoryIndex(CONFIG)
        await memory.apply([batch(0, stored(1, 2)), batch(1, AllBlocksCleared(), big),
                            batch(0, big, worker="appended")])
        reloaded = RedisIndex(redis_client, config=CONFIG)
        child = BlockStored(block_hashes=[blocks + 1], parent_hash=blocks,
                            token_ids=pack_tokens(list(range(BS))), block_size=BS)
        await reloaded.apply([batch(2, child)])  # its parent resolves from the snapshot
        await memory.apply([batch(2, child)])
        assert (await reloaded.stats()).dropped == {}
        assert await reloaded.presence(MODEL) == await memory.presence(MODEL)


async def log_of(client: aioredis.Redis, log_key: str) -> bytes:
    """A rank's log as one byte string (its segments joined, or a string log)."""
    if await client.type(log_key) == b"string":
        return bytes(await client.get(log_key))
    return b"".join(await client.lrange(log_key, 0, -1))


class TestGuardedWrites:
    """A batch is written only from the position the writer's ledger started at."""

    async def test_replayed_batches_change_nothing(self, redis_client: aioredis.Redis) -> None:
        """Re-applying applied batches from a fresh process reports duplicates, state intact."""
        history = [batch(0, stored(1, 3)), batch(1, stored(4, 6, parent=3))]
        await RedisIndex(redis_client).apply(history)
        before = await RedisIndex(redis_client).presence(MODEL)
        again = RedisIndex(redis_client)
        assert await again.apply(history) == [ApplyOutcome.DUPLICATE] * 2
        assert await again.presence(MODEL) == before

    async def test_second_writer_is_refused(self, redis_client: aioredis.Redis) -> None:
        """A writer whose ledger is stale gets BackendError; it recovers after reloading."""
        a, b = RedisIndex(redis_client), RedisIndex(redis_client)
        await a.apply([batch(0, stored(1, 2))])
        await b.apply([batch(1, stored(3, 3, parent=2))])  # b loads the ledger at seq 0
        with pytest.raises(BackendError, match="another process"):
            await a.apply([batch(1, stored(3, 3, parent=2)), batch(2, stored(4, 4, parent=3))])
        assert await matched(b) == 3  # nothing of a's refused call landed
        assert await a.apply([batch(2, stored(4, 4, parent=3))]) == [ApplyOutcome.APPLIED]
        assert await matched(a) == 4


class TestLayout:
    """Keys of a model share one hash slot; worker removal never scans the keyspace."""

    async def test_one_hash_slot_per_model(self, redis_client: aioredis.Redis) -> None:
        """Every key the index writes for a model maps to the same cluster slot."""
        index = RedisIndex(redis_client)
        await index.apply([batch(0, stored(1, 6)), batch(0, stored(1, 2), worker="other:1")])
        keys = [k async for k in redis_client.scan_iter(match="kvi:{*")]
        assert len(keys) >= 5
        assert len({key_slot(k) for k in keys}) == 1

    async def test_clear_and_remove_do_not_scan(self, redis_client: aioredis.Redis) -> None:
        """clear_worker and remove_worker use per-worker structures only (no KEYS/SCAN)."""
        index = RedisIndex(redis_client)
        await index.apply([batch(0, stored(1, 6)), batch(0, stored(1, 3), worker="x")])
        await redis_client.config_resetstat()
        assert await index.clear_worker(MODEL, "w") == 1
        assert await matched(index) == 3
        assert await index.remove_worker(MODEL, "x") == 1
        stats = await redis_client.info("commandstats")
        assert not {"cmdstat_keys", "cmdstat_scan", "cmdstat_hscan"} & set(stats)
        assert [w.worker_id for w in await index.workers(MODEL)] == ["w"]
        assert await index.presence(MODEL) == {}


DEAD_MODELS = 2_000
DEAD_BLOCKS = 16  # blocks each abandoned model's worker stores


def dead_batch(i: int) -> EventBatch:
    """The one batch the worker of abandoned model i ever sent: 16 blocks of its own."""
    tokens = [i * 1_000 + t for t in range(DEAD_BLOCKS * BS)]
    return EventBatch(schema=SCHEMA_VERSION, model=f"abandoned/{i}", worker_id=f"gone-{i}",
                      dp_rank=0, epoch=1, seq=0, events=[stored_tokens(tokens)])


def stored_tokens(tokens: list[int]) -> Any:
    from kvcore.bus import BlockStored

    return BlockStored(block_hashes=list(range(1, len(tokens) // BS + 1)), parent_hash=None,
                       token_ids=pack_tokens(tokens), block_size=BS)


async def ingest(index: RedisIndex, batches: list[EventBatch], chunk: int = 256) -> None:
    for start in range(0, len(batches), chunk):
        await index.apply(batches[start : start + chunk])


async def keys_outside(client: aioredis.Redis, model: str) -> list[bytes]:
    """Keys of the database that are neither `model`'s nor the model list (SCAN, here in
    the test: the product never scans)."""
    prefix = model_prefix(model).encode()
    return [key async for key in client.scan_iter(count=1000)
            if not key.startswith(prefix) and key != MODELS_KEY.encode()]


class CountingConnection(aioredis.Connection):
    """A redis-py connection that counts its writes: pipelined commands leave in one."""

    sends = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.sends += 1
        await super().send_packed_command(command, check_health)


class TestModelCollection:
    """A model goes with its last worker rank; models listed without one are dropped."""

    async def test_expired_models_leave_nothing(self, redis_client: aioredis.Redis,
                                                redis_server: RedisServer,
                                                nats_server: EmbeddedNats) -> None:
        """2,000 models whose only worker stops: liveness removes the workers, and with
        them every key of their models; the live model beside them keeps its blocks."""
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        kv = await ensure_liveness_bucket(js, 60.0)
        await kv.put(liveness_key(MODEL, "w"), msgspec.json.encode(
            WorkerRecord(model=MODEL, worker_id="w", block_size=BS)))
        # The process that expires workers is not the one that wrote them (no shared cache).
        expiring = RedisIndex.from_url(redis_server.url)
        watcher = LivenessWatcher(js, expiring, ttl_s=60.0, grace_s=0.0, check_every_s=0.1)
        stop = asyncio.Event()
        task = asyncio.create_task(watcher.run(stop))
        writer = RedisIndex.from_url(redis_server.url)
        try:
            await eventually(lambda: _true(watcher.is_live(MODEL, "w")))
            await writer.apply([batch(0, stored(1, 6))])
            await ingest(writer, [dead_batch(i) for i in range(DEAD_MODELS)])
            live_blocks = await writer.presence(MODEL)
            await eventually(lambda: _true(watcher.removed == DEAD_MODELS), timeout=120)
        finally:
            stop.set()
            await task
            await nc.close()
        assert await redis_client.smembers(MODELS_KEY) == {MODEL.encode()}
        assert await keys_outside(redis_client, MODEL) == []
        reader = RedisIndex.from_url(redis_server.url)
        assert await matched(reader) == 6
        assert await reader.presence(MODEL) == live_blocks
        assert [w.worker_id for w in await reader.workers()] == ["w"]
        for index in (writer, expiring, reader):
            await index.close()

    async def test_leftovers_go_at_the_first_sweep(self, redis_client: aioredis.Redis,
                                                   nats_server: EmbeddedNats) -> None:
        """Models an older version left listed without a rank (slot allocation, version,
        block size; a crash's stray rank keys) are dropped by the first liveness sweep."""
        index = RedisIndex(redis_client)
        await index.apply([batch(0, stored(1, 6))])
        pipe = redis_client.pipeline(transaction=False)
        for i in range(DEAD_MODELS):
            model = f"left/{i}"
            prefix = model_prefix(model)
            pipe.sadd(MODELS_KEY, model)
            pipe.set(prefix + "slotver", 7)
            pipe.set(prefix + "nextslot", 2)
            pipe.zadd(prefix + "free", {"0": 0, "1": 1})
            pipe.set(prefix + "block_size", 16)
            pipe.hset(prefix + "w:1:meta", "pos", b"\x00" * 16)
            pipe.set(prefix + "w:1:log", b"M" * 17)
            pipe.hset(prefix + "blk", b"\x00" * 8, b"\x10")
        await pipe.execute()
        nc = await nats.connect(nats_server.url)
        try:
            watcher = LivenessWatcher(nc.jetstream(), RedisIndex(redis_client), ttl_s=10.0,
                                      grace_s=3600.0)
            await watcher.sweep()
        finally:
            await nc.close()
        assert await redis_client.smembers(MODELS_KEY) == {MODEL.encode()}
        assert await keys_outside(redis_client, MODEL) == []
        assert await matched(index) == 6

    async def test_workers_costs_constant_round_trips(self, redis_server: RedisServer) -> None:
        """workers() over 10 or 2,000 models: the same number of writes to Redis (the
        model list, then one pipeline of one script call per model)."""
        client = aioredis.Redis.from_url(redis_server.url, connection_class=CountingConnection)
        await client.flushall()
        index = RedisIndex(client)
        sends = {}
        for models in (10, DEAD_MODELS):
            await ingest(index, [dead_batch(i) for i in range(models)])
            assert len(await index.workers()) == models  # loads the script if need be
            CountingConnection.sends = 0
            infos = await index.workers()
            sends[models] = CountingConnection.sends
            assert len(infos) == models
            assert infos[0].blocks_by_tier == {"gpu": DEAD_BLOCKS}
        assert sends == {10: 2, DEAD_MODELS: 2}
        await index.close()

    async def test_a_collected_model_starts_afresh(self, redis_client: aioredis.Redis) -> None:
        """A model collected and used again: a reader that cached its old slot map, and a
        writer that still holds the old rank's ledger, both see the new rank only."""
        writer, reader, stale = (RedisIndex(redis_client) for _ in range(3))
        # stale wrote a (slot 0) up to (epoch 1, seq 1) and keeps a's ledger there.
        await stale.apply([batch(0, stored(1, 3), worker="a"),
                           batch(1, stored(4, 6, parent=3), worker="a")])
        assert await matched(reader) == 6  # caches slot 0 = a
        assert await writer.remove_worker(MODEL, "a") == 1
        assert await redis_client.smembers(MODELS_KEY) == set()
        assert await redis_client.keys("*") == []
        # b takes slot 0 again, at the position a's stale ledger expects (epoch 1, seq 1).
        await writer.apply([batch(0, stored(1, 3), worker="b"), batch(1, stored(4, 4, parent=3),
                                                                      worker="b")])
        result = await reader.score(ScoreQuery(model=MODEL, block_keys=keys_of_prompt()))
        assert [(s.worker_id, s.matched_blocks) for s in result.scores] == [("b", 4)]
        with pytest.raises(BackendError, match="written or removed by another process"):
            await stale.apply([batch(2, stored(5, 5, parent=4), worker="a")])
        assert await reader.workers() == await writer.workers()
        assert [w.worker_id for w in await reader.workers()] == ["b"]
        assert await reader.block_size(MODEL) == BS
        assert await matched(reader) == 4

    async def test_a_model_with_a_rank_is_never_collected(
            self, redis_client: aioredis.Redis) -> None:
        """drop_empty_models leaves models that have a rank, even one without a batch yet."""
        index = RedisIndex(redis_client)
        await index.apply([batch(0, stored(1, 2))])
        await index.export_ranks([("other", WorkerRef("x", 0))])  # allocates, applies nothing
        assert await index.drop_empty_models() == []
        assert await redis_client.smembers(MODELS_KEY) == {MODEL.encode(), b"other"}
        assert await matched(index) == 2


async def _true(value: bool) -> bool:
    return value


class TestRedisFailure:
    """Redis going away is a BackendError; nothing half-applied when it comes back."""

    async def test_restart_mid_stream(self, tmp_path: Path) -> None:
        """Apply, kill redis-server, apply fails cleanly, restart (empty) and continue."""
        server = RedisServer(tmp_path).start()
        try:
            index = RedisIndex.from_url(server.url)
            await index.apply([batch(0, stored(1, 3))])
            server.kill()
            with pytest.raises(BackendError):
                await index.apply([batch(1, stored(4, 4, parent=3))])
            server.start()
            await asyncio.sleep(0.05)
            # Redis came back empty: the ledger is reloaded from it, so the worker starts
            # fresh and the orphan is an unknown parent, not a wrong answer.
            await index.apply([batch(1, stored(4, 4, parent=3))])
            assert (await index.stats()).dropped == {"unknown_parent": 1}
            assert await index.presence(MODEL) == {}
            await index.close()
        finally:
            server.stop()

    async def test_queries_survive_a_restart(self, tmp_path: Path) -> None:
        """Score fails cleanly while Redis is down and works again once it is back
        (the empty Redis has lost the score script too)."""
        server = RedisServer(tmp_path).start()
        try:
            index = RedisIndex.from_url(server.url)
            assert index._queries is not None  # the query pipe is what is under test
            await index.apply([batch(0, stored(1, 3))])
            assert await matched(index) == 3
            server.kill()
            with pytest.raises(BackendError):
                await matched(index)
            server.start()
            await asyncio.sleep(0.05)
            assert await matched(index) == 0  # an empty Redis, and no error
            await index.apply([batch(0, stored(1, 2), worker="v")])
            assert await matched(index) == 2
            await index.close()
        finally:
            server.stop()

    async def test_queries_survive_a_script_flush(self, redis_client: aioredis.Redis) -> None:
        index = RedisIndex(redis_client)
        assert index._queries is not None
        await index.apply([batch(0, stored(1, 3))])
        assert await matched(index) == 3
        await redis_client.script_flush()
        assert await matched(index) == 3
        await index.close()


class TestQueryPaths:
    """Queries over the pipelined connection and through redis-py (the TLS path) agree."""

    async def test_same_answers(self, redis_client: aioredis.Redis) -> None:
        writer = RedisIndex(redis_client)
        await writer.apply([batch(0, stored(1, 3)), batch(0, stored(1, 2), worker="v")])
        piped = RedisIndex(redis_client)
        plain = RedisIndex(redis_client, pipelined_queries=False)
        assert piped._queries is not None and plain._queries is None
        query = ScoreQuery(model=MODEL, block_keys=keys_of_prompt(), include_zero=True)
        first, second = await piped.score(query), await plain.score(query)
        assert first == second
        assert sorted((s.worker_id, s.matched_blocks) for s in first.scores) == [
            ("v", 2), ("w", 3)]
        await piped.close()


    async def test_c_and_python_walks_agree(self, redis_client: aioredis.Redis,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
        """Score's walk in C (scoring.score_runs with the extension) and its pure-Python
        twin give the in-memory index's answers: copies on CPU, zero matches, a pool half
        the workers mount."""
        workload = make_workload(12, 6_000, n_queries=40)
        batches = workload.pool_batches(MODEL, "pool-a")
        for n, one in enumerate(batches[::3]):  # a third of the steps offload to CPU
            gpu = [h for e in one.events if isinstance(e, BlockStored) and e.pool is None
                   for h in e.block_hashes]
            one.events.append(BlockStored(block_hashes=gpu, medium="cpu"))
            if n % 2:  # and half of those leave the GPU
                one.events.append(BlockRemoved(block_hashes=gpu))
        index, memory = RedisIndex(redis_client), MemoryIndex(IndexConfig())
        await index.apply(batches)
        await memory.apply(batches)
        mounts = pool_mounts(12, "pool-a")
        seen = 0
        for n, tokens in enumerate(workload.queries):
            query = ScoreQuery(model=MODEL, block_keys=block_keys_for_tokens(tokens, 16, MODEL),
                               include_zero=n % 2 == 0, mounts=mounts if n % 3 else None)
            fast = await index.score(query)
            monkeypatch.setattr(scoring, "USE_NATIVE_TALLY", False)
            slow = await index.score(query)
            monkeypatch.setattr(scoring, "USE_NATIVE_TALLY", NATIVE)
            assert fast == slow == await memory.score(query)
            seen += sum(s.blocks_by_tier.get("cpu", 0) > 0 for s in fast.scores)
        assert seen  # CPU copies were scored
        await index.close()


    def test_hmget_of_packed_keys_is_framed_as_hiredis_frames_it(self) -> None:
        keys = [0, 1, 2**64 - 1, 0x0D0A0D0A0D0A0D0A, 12_345]
        packed = pack_keys(keys)
        assert _hmget_packed("kvi:{m:x}:b:0", packed) == hiredis.pack_command(
            ("HMGET", "kvi:{m:x}:b:0", *(packed[i : i + 8] for i in range(0, 40, 8))))

    @pytest.mark.parametrize("bucket_load", [0, 40])
    async def test_one_bucket_is_read_without_lua(self, redis_client: aioredis.Redis,
                                                   bucket_load: int) -> None:
        """A model in one hash (load 0) is scored by one MULTI / EXEC of plain reads, a
        model in many buckets by score.lua after one look (remembered); both give the
        in-memory index's answers, as does score.lua over redis-py."""
        workload = make_workload(8, 4_000, n_queries=30)
        batches = workload.batches(MODEL)
        index = RedisIndex(redis_client, bucket_load=bucket_load)
        plain = RedisIndex(redis_client, pipelined_queries=False)
        memory = MemoryIndex(IndexConfig())
        await index.apply(batches)
        await memory.apply(batches)
        queries = [ScoreQuery(model=MODEL, block_keys=block_keys_for_tokens(tokens, 16, MODEL))
                   for tokens in workload.queries]
        assert await index.score(queries[0]) == await memory.score(queries[0])  # slot map
        await redis_client.config_resetstat()
        for query in queries:
            assert await index.score(query) == await memory.score(query)
        stats = await redis_client.info("commandstats")
        scripts = stats.get("cmdstat_evalsha", {}).get("calls", 0)
        transactions = stats.get("cmdstat_exec", {}).get("calls", 0)
        n = len(queries)
        assert (scripts, transactions) == ((0, n) if bucket_load == 0 else (n, 0))
        for query in queries:
            assert await plain.score(query) == await memory.score(query)
        await index.close()
        await plain.close()


class TestBenchRedisTarget:
    """`make bench-redis --redis-url` empties its database each round: only an empty one."""

    async def test_refuses_a_database_with_keys(self, redis_client: aioredis.Redis,
                                                redis_server: RedisServer) -> None:
        from bench.redis_backend import NotEmptyError, check_empty

        await redis_client.set("someone:else", b"1")
        with pytest.raises(NotEmptyError, match="holds 1 key and"):
            await check_empty(redis_client, redis_server.url)
        assert await redis_client.get("someone:else") == b"1"

    async def test_accepts_an_empty_database(self, redis_client: aioredis.Redis,
                                             redis_server: RedisServer) -> None:
        from bench.redis_backend import check_empty

        await check_empty(redis_client, redis_server.url)
