"""The sub-slot Redis backend (`--redis-subslots`, indexer/index/redis_sharded.py) at field
size: thousands of blocks per rank, on one redis-server (4 sub-slots) and on a real
3-master cluster (3 sub-slots, one per master).

A writer stopped between two waves leaves its rank torn; readers compared with the
reference model at every wave boundary never see a block a rank did not hold before or
after the call; the next owner re-slots the rank and the index is then exact, with the
old slot id's entries collected from every sub-slot. A second writer's parts are found
the same way. Writes a promoted replica never received are found and repaired by a
resync. Removal and model collection leave no key behind, pools' included; pool writes
are indexed as the memory index indexes them (tests/test_subslot_pools.py at field
size). Hybrid models (KV-cache groups > 0) score as the in-memory index does, through
torn calls and re-slots too."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio.cluster import RedisCluster as ClusterClient
from redis.crc import key_slot

from indexer.config import parse_service_config
from indexer.errors import BackendError, ConfigError
from indexer.index.factory import build_index
from indexer.index.memory import MemoryIndex
from indexer.index.protocol import IndexConfig, ResyncRequest, ScoreQuery, WorkerRef
from indexer.index.redis import RedisIndex
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
from tests.support.fleet import Fleet as FieldFleet
from tests.support.redis_cluster import RedisCluster, pinged_after_failover
from tests.support.reference import ReferenceIndex
from tests.support.servers import RedisServer
from tests.support.subslot_backend import BACKEND_PARAMS, Backend, flushed_backend

MODEL = "org/big-model"
BS = 4
RANKS = [WorkerRef("w-0", 0), WorkerRef("w-0", 1), WorkerRef("w-1", 0), WorkerRef("w-2", 0)]
SHARED = 64  # blocks of a system prompt every rank holds
CHAIN = 1_000  # blocks of each rank's own chains
CHAINS = 3
CONFIG = IndexConfig()
Presence = dict[int, dict[WorkerRef, int]]


class Fleet:
    """Engines publishing chains; a reference model fed the same batches."""

    def __init__(self) -> None:
        self.seq = {ref: -1 for ref in RANKS}
        self.reference = ReferenceIndex(CONFIG.ghost_capacity)

    def tokens(self, ref: WorkerRef, chain: int, length: int = CHAIN) -> list[int]:
        shared = list(range(1, SHARED * BS + 1))
        own_seed = 1_000_000 * (RANKS.index(ref) + 1) + 10_000 * chain
        return shared + [own_seed + i for i in range(length * BS)]

    def hashes(self, ref: WorkerRef, chain: int, length: int = CHAIN) -> list[int]:
        return [chain * 100_000 + i + 1 for i in range(SHARED + length)]

    def keys(self, ref: WorkerRef, chain: int, length: int = CHAIN) -> list[int]:
        return block_keys_for_tokens(self.tokens(ref, chain, length), BS, MODEL)

    def store(self, ref: WorkerRef, chain: int, medium: str = "gpu",
              length: int = CHAIN) -> BlockStored:
        return BlockStored(block_hashes=self.hashes(ref, chain, length), parent_hash=None,
                           token_ids=pack_tokens(self.tokens(ref, chain, length)),
                           block_size=BS, medium=medium)

    def batch(self, ref: WorkerRef, *events: Event) -> EventBatch:
        self.seq[ref] += 1
        return EventBatch(schema=SCHEMA_VERSION, model=MODEL, worker_id=ref.worker_id,
                          dp_rank=ref.dp_rank, epoch=1, seq=self.seq[ref],
                          ts=float(self.seq[ref]), events=list(events))

    def record(self, batches: list[EventBatch]) -> list[EventBatch]:
        for batch in batches:
            self.reference.apply(batch)
        return batches

    def initial(self) -> list[EventBatch]:
        return self.record([self.batch(ref, *[self.store(ref, c) for c in range(CHAINS)])
                            for ref in RANKS])

    def churn(self, ref: WorkerRef) -> list[EventBatch]:
        """One rank evicts the tail of chain 0, offloads chain 1 to CPU, stores chain 3:
        clears and sets in every sub-slot."""
        tail = self.hashes(ref, 0)[SHARED + CHAIN // 2 :]
        return self.record([
            self.batch(ref, BlockRemoved(block_hashes=tail)),
            self.batch(ref, self.store(ref, 1, medium="cpu"), self.store(ref, CHAINS)),
        ])

    def queries(self) -> list[list[int]]:
        return [self.keys(ref, c) for ref in RANKS for c in range(CHAINS + 1)]


def union(a: Presence, b: Presence) -> Presence:
    out: Presence = {key: dict(holders) for key, holders in a.items()}
    for key, holders in b.items():
        mine = out.setdefault(key, {})
        for ref, bits in holders.items():
            mine[ref] = mine.get(ref, 0) | bits
    return out


async def assert_no_false_hit(reader: ShardedRedisIndex, allowed: Presence,
                              queries: list[list[int]]) -> None:
    """Every (block, rank, tier) the reader shows, and every block a Score credits to a
    rank, is in `allowed` (what the ranks held before or after the call in flight)."""
    for key, holders in (await reader.presence(MODEL)).items():
        for ref, bits in holders.items():
            assert bits & ~allowed.get(key, {}).get(ref, 0) == 0, (key, ref, bits)
    for keys in queries:
        result = await reader.score(ScoreQuery(model=MODEL, block_keys=keys))
        for score in result.scores:
            ref = WorkerRef(score.worker_id, score.dp_rank)
            for key in keys[: score.matched_blocks]:
                assert allowed.get(key, {}).get(ref, 0), (ref, score.matched_blocks)


async def assert_exact(index: ShardedRedisIndex, fleet: Fleet) -> None:
    reference = fleet.reference
    assert await index.presence(MODEL) == reference.presence(MODEL)
    for keys in fleet.queries():
        result = await index.score(ScoreQuery(model=MODEL, block_keys=keys))
        got = [(s.worker_id, s.dp_rank, s.matched_blocks, s.weighted_score, s.blocks_by_tier)
               for s in result.scores]
        assert got == reference.score(MODEL, keys, None, CONFIG.tier_weights, False)
    for info in await index.workers(MODEL):
        ref = WorkerRef(info.worker_id, info.dp_rank)
        assert info.blocks_by_tier == reference.blocks_by_tier(MODEL, ref)
        assert info.last_seq == fleet.seq[ref]


@pytest.fixture(params=BACKEND_PARAMS)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    yield await flushed_backend(request)


class _WriterStoppedError(Exception):
    """A writer stopped between waves (a crash, as far as Redis can tell)."""


def only_id_counters(keys: list[bytes], subslots: int) -> bool:
    """`keys` are the model's id counter copies alone: the directory's and one per
    sub-slot (they outlive the model: ids never repeat)."""
    name = MODEL.replace("/", "~2F").encode()
    directory = [k for k in keys if k == b"kvi:{s:" + name + b"}:nextslot"]
    copies = [k for k in keys
              if re.fullmatch(rb"kvi:\{s:" + re.escape(name) + rb":\d+\.\d+\}:nextslot", k)]
    return len(directory) == 1 and len(copies) == subslots and len(keys) == subslots + 1


async def slot_of(index: ShardedRedisIndex, ref: WorkerRef) -> int:
    slots = await index._redis.hgetall(f"kvi:{{s:{MODEL.replace('/', '~2F')}}}:slots")
    return int(slots[f"{ref.worker_id}\n{ref.dp_rank}".encode()])


class TestTornCalls:
    @pytest.mark.parametrize("stop_after", [1, 2])
    async def test_reslot_after_a_writer_stopped_between_waves(self, backend: Backend,
                                                               stop_after: int) -> None:
        """The first owner stops after wave `stop_after`; readers never see a false hit,
        at every wave boundary of the torn call and of the repair; the next owner
        re-slots the rank and the index is exact, the old id collected everywhere."""
        fleet = Fleet()
        first, reader = backend.index(), backend.index()
        await first.apply(fleet.initial())
        queries = fleet.queries()
        await assert_exact(reader, fleet)  # the reader caches this slot map
        torn = RANKS[1]
        before = fleet.reference.presence(MODEL)
        old_slot = await slot_of(reader, torn)
        batches = fleet.churn(torn)
        allowed = union(before, fleet.reference.presence(MODEL))
        checked: list[int] = []

        async def stop(wave: int) -> None:
            await assert_no_false_hit(reader, allowed, queries)
            checked.append(wave)
            if wave == stop_after:
                raise _WriterStoppedError

        first.wave_hook = stop
        with pytest.raises(_WriterStoppedError):
            await first.apply(batches)
        await first.close()
        await assert_no_false_hit(reader, allowed, queries)

        second = backend.index()
        second.wave_hook = lambda wave: assert_no_false_hit(reader, allowed, queries)
        await second.apply(batches)  # redelivered: not acknowledged
        assert second.reslots == 1
        new_slot = await slot_of(second, torn)
        assert new_slot != old_slot
        await assert_exact(second, fleet)
        await assert_exact(reader, fleet)
        assert await backend.entries_of(old_slot) == 0
        keys = await backend.keys()
        assert not [k for k in keys if f":w:{old_slot}:".encode() in k
                    or k.endswith(f":p:{old_slot}".encode())]
        await second.close()
        await reader.close()
        assert checked == list(range(1, stop_after + 1))

    async def test_untorn_ranks_keep_their_ids(self, backend: Backend) -> None:
        """A new owner of ranks whose calls all completed re-slots none."""
        fleet = Fleet()
        first = backend.index()
        await first.apply(fleet.initial())
        await first.apply(fleet.churn(RANKS[0]))
        slots = [await slot_of(first, ref) for ref in RANKS]
        await first.close()
        second = backend.index()
        await second.apply(fleet.churn(RANKS[2]))
        assert second.reslots == 0
        assert [await slot_of(second, ref) for ref in RANKS] == slots
        await assert_exact(second, fleet)
        await second.close()

    async def test_removing_a_torn_rank_collects_its_uncommitted_sets(
            self, backend: Backend) -> None:
        """The torn call's stores are in no committed ledger: its sub-slot parts name
        them (`p:<id>`), so removing the rank still removes every entry of its id."""
        fleet = Fleet()
        first = backend.index()
        await first.apply(fleet.initial())
        torn = RANKS[3]
        slot = await slot_of(first, torn)

        async def stop(wave: int) -> None:
            if wave == 2:
                raise _WriterStoppedError

        first.wave_hook = stop
        with pytest.raises(_WriterStoppedError):
            await first.apply(fleet.churn(torn))
        await first.close()
        assert await backend.entries_of(slot) > 0
        second = backend.index()
        assert await second.remove_worker(MODEL, torn.worker_id) == 1
        assert await backend.entries_of(slot) == 0
        assert {w.worker_id for w in await second.workers(MODEL)} == {"w-0", "w-1"}
        await second.close()


class TestRemovalAndCollection:
    async def test_clear_and_remove_at_field_size(self, backend: Backend) -> None:
        """clear_worker empties a rank's presence in every sub-slot (its ledger stays);
        removing every worker then deletes every key of the model but its id counter."""
        fleet = Fleet()
        index = backend.index()
        await index.apply(fleet.initial())
        assert await index.clear_worker(MODEL, "w-0", 1) == 1
        fleet.reference.apply(fleet.batch(RANKS[1], AllBlocksCleared()))
        fleet.seq[RANKS[1]] -= 1  # clear_worker does not move the position
        assert await index.presence(MODEL) == fleet.reference.presence(MODEL)
        cleared = await slot_of(index, RANKS[1])
        assert await backend.entries_of(cleared) == 0
        for worker in ("w-0", "w-1", "w-2"):
            assert await index.remove_worker(MODEL, worker) >= 1
        assert await index.workers() == []
        assert await index.presence(MODEL) == {}
        remaining = [k for k in await backend.keys() if not k.startswith(b"kvi:marker")]
        assert only_id_counters(remaining, backend.subslots)
        # The model starts again afresh, with ids it never used before.
        await index.apply(fleet.record([fleet.batch(RANKS[0], fleet.store(RANKS[0], 0))]))
        assert await slot_of(index, RANKS[0]) == len(RANKS)
        await index.close()

    async def test_drop_empty_models_finishes_a_crashed_removal(self, backend: Backend) -> None:
        """A removal stopped after the directory retired the id: liveness's periodic
        `drop_empty_models` collects it and the model."""
        fleet = Fleet()
        index = backend.index()
        await index.apply(fleet.record([fleet.batch(RANKS[0], fleet.store(RANKS[0], 0))]))
        slot = await slot_of(index, RANKS[0])
        await index._run([index._dir_call(MODEL, "remove", "w-0", 0)])  # then "crashed"
        assert await backend.entries_of(slot) > 0
        assert await index.drop_empty_models() == [MODEL]
        assert await backend.entries_of(slot) == 0
        await index.close()


class TestPlacementAndScope:
    @pytest.mark.redis_cluster
    async def test_subslots_on_distinct_masters(self, redis_cluster: RedisCluster) -> None:
        """Each of the 3 sub-slots' hash slots is served by a different master, and each
        master holds presence of the model."""
        backend = Backend(redis_cluster.url, 3, cluster=True)
        await backend.flush()
        fleet = Fleet()
        index = backend.index()
        await index.apply(fleet.initial())
        info = await index._model(MODEL)
        assert info is not None
        client = ClusterClient.from_url(redis_cluster.url)
        await client.initialize()
        nodes = {client.nodes_manager.get_node_from_slot(key_slot(p.encode())).name
                 for p in info.prefixes}
        assert len(nodes) == 3
        for prefix in info.prefixes:
            assert await client.hlen(prefix + "blk") > CHAIN
        await client.aclose()
        await index.close()

    async def test_pools_are_indexed_and_collected(self, backend: Backend) -> None:
        """Pool writes on a sub-slot model are indexed as the memory index indexes them
        (a redelivered call changes nothing), credited to mounters, and a removed pool
        and its model leave nothing behind but the id counters."""
        fleet = Fleet()
        index = backend.index()
        memory = MemoryIndex(CONFIG)
        hashes = fleet.hashes(RANKS[0], 0)
        pool_store = BlockStored(block_hashes=hashes, medium="storage", pool="shared")
        pool_remove = BlockRemoved(block_hashes=hashes[SHARED + 100 :], medium="storage",
                                   pool="shared")
        first = [fleet.batch(ref, *[fleet.store(ref, c) for c in range(CHAINS)], pool_store)
                 for ref in RANKS]
        later = [*fleet.churn(RANKS[0]), fleet.batch(RANKS[1], pool_remove)]
        for batches in (first, first, later):  # `first` redelivered: duplicates
            assert await index.apply(batches) == await memory.apply(batches)
        assert await index.presence(MODEL) == await memory.presence(MODEL)
        mounts = {"w-0": frozenset({"shared"}), "cold": frozenset({"shared"})}
        for keys in fleet.queries():
            query = ScoreQuery(model=MODEL, block_keys=keys, mounts=mounts)
            assert await index.score(query) == await memory.score(query)
        pools = [w for w in await index.workers(MODEL) if w.kind == "pool"]
        assert [(w.worker_id, w.blocks_by_tier) for w in pools] == [
            ("shared", {"storage": SHARED + 100})]
        slot = await slot_of(index, WorkerRef("shared", -1))
        assert await index.remove_pool(MODEL, "shared")
        assert not await index.remove_pool(MODEL, "shared")
        assert await backend.entries_of(slot) == 0
        for worker in ("w-0", "w-1", "w-2"):
            assert await index.remove_worker(MODEL, worker) >= 1
        remaining = [k for k in await backend.keys() if not k.startswith(b"kvi:marker")]
        assert only_id_counters(remaining, backend.subslots)
        await index.close()


class TestConfiguration:
    def test_flag_and_checks(self) -> None:
        assert parse_service_config([]).redis_subslots == 1
        parsed = parse_service_config(["--redis-url", "redis://h:6379/0",
                                       "--redis-subslots", "4"])
        assert parsed.redis_subslots == 4
        with pytest.raises(ConfigError, match="--redis-subslots must be"):
            parse_service_config(["--redis-url", "redis://h:6379/0", "--redis-subslots", "0"])
        with pytest.raises(ConfigError, match="--redis-subslots needs --redis-url"):
            parse_service_config(["--redis-subslots", "4"])

    async def test_factory(self, redis_server: RedisServer) -> None:
        """S >= 2 builds the sub-slot index; S = 1 keeps today's RedisIndex."""
        sharded = build_index(IndexConfig(), redis_url=redis_server.url, redis_subslots=4)
        plain = build_index(IndexConfig(), redis_url=redis_server.url, redis_subslots=1)
        assert isinstance(sharded, ShardedRedisIndex) and sharded.subslots == 4
        assert type(plain) is RedisIndex
        await sharded.close()
        await plain.close()

    async def test_layouts_do_not_mix(self, redis_server: RedisServer) -> None:
        """Each index refuses (at ping) a Redis holding the other layout's models, which it
        would not see: their workers would vanish from every answer."""
        backend = Backend(redis_server.url, 4, cluster=False)
        fleet = Fleet()
        batch = fleet.batch(RANKS[0], fleet.store(RANKS[0], 0, length=8))
        for writer_subslots, reader_subslots in ((1, 4), (4, 1)):
            await backend.flush()
            writer = build_index(IndexConfig(), redis_url=redis_server.url,
                                 redis_subslots=writer_subslots)
            reader = build_index(IndexConfig(), redis_url=redis_server.url,
                                 redis_subslots=reader_subslots)
            await writer.ping()
            await writer.apply([batch])
            await writer.ping()
            with pytest.raises(BackendError, match=r"would not see|reads only sub-slot"):
                await reader.ping()
            await writer.close()
            await reader.close()


class TestTwoWriters:
    async def test_a_second_writer_conflicts_and_its_parts_are_repaired(
            self, backend: Backend) -> None:
        """Two processes both think they own a rank (a lease lost unnoticed): the one that
        writes second conflicts where its parts meet the first's new tokens; what it
        wrote elsewhere (same call counter, another nonce) makes the rank torn, so the
        next owner re-slots it, and the index is exact after the stream's batches."""
        fleet = Fleet()
        setup = backend.index()
        await setup.apply(fleet.initial())
        await setup.close()
        ref = RANKS[2]
        first, second, reader = backend.index(), backend.index(), backend.index()
        await first.workers(MODEL)
        for index in (first, second):  # both load the rank at the same committed state
            await index.export_ranks([(MODEL, ref)])
        before = fleet.reference.presence(MODEL)
        # The first writer evicts one block (one sub-slot); the second writes the same
        # batch and more, from the state before it: its parts conflict in that sub-slot
        # and apply (wave 1) in the others.
        evict = fleet.record([fleet.batch(ref, BlockRemoved(
            block_hashes=[fleet.hashes(ref, 2)[-1]]))])
        batches = evict + fleet.churn(ref)
        allowed = union(before, fleet.reference.presence(MODEL))
        await first.apply(evict)
        with pytest.raises(BackendError, match="written by another process"):
            await second.apply(batches)
        await assert_no_false_hit(reader, allowed, fleet.queries())
        third = backend.index()
        await third.apply(batches)
        assert third.reslots == 1
        await assert_exact(third, fleet)
        for index in (first, second, third, reader):
            await index.close()

    async def test_a_part_sent_twice_applies_once(self, backend: Backend) -> None:
        """A wave's call run again (a reply lost after Redis ran it) skips the parts
        already at their new token: the presence stays the once-applied one."""
        fleet = Fleet()
        index = backend.index()
        await index.apply(fleet.initial())
        sent: list[Any] = []
        run = index._run

        async def twice(commands: Any) -> list[Any]:
            replies = await run(commands)
            if commands and commands[0][0] == "EVALSHA" and \
                    commands[0][1] == index._scripts["part"].sha:
                again = await run(commands)
                sent.append(again)
            return replies

        index._run = twice  # type: ignore[method-assign]
        await index.apply(fleet.churn(RANKS[0]))
        index._run = run  # type: ignore[method-assign]
        assert sent and all(set(reply) == {b"skip"} for replies in sent for reply in replies)
        await assert_exact(index, fleet)
        await index.close()



@pytest.mark.redis_cluster
class TestFailover:
    async def test_writes_lost_in_failover_are_repaired(self, own_cluster: RedisCluster) -> None:
        """A sub-slot's replica is cut off while its master acknowledges a rank's call,
        then the master dies and the replica is promoted without it: the index finds the
        rank behind what Redis confirmed, clears it (no block it evicted is claimed) and
        asks for a resync; after the resync the index is exact."""
        fleet = Fleet()
        resyncs: list[ResyncRequest] = []
        index = ShardedRedisIndex.from_url(own_cluster.url, subslots=3, cluster=True,
                                           config=CONFIG, on_resync=resyncs.append)
        await index.apply(fleet.initial())
        info = await index._model(MODEL)
        assert info is not None
        master = own_cluster.node_of_slot(key_slot(info.prefixes[0].encode()))
        replica = own_cluster.cut_off_replica(master)  # the initial writes reach it
        victim = RANKS[0]
        await index.apply(fleet.churn(victim))  # acknowledged by the master only
        own_cluster.promote_cut_off(master, replica)
        await pinged_after_failover(index)
        assert index.lost_write_repairs == 1
        assert [(r.worker_id, r.dp_rank, r.reason) for r in resyncs] == [
            (victim.worker_id, victim.dp_rank, "redis_lost_writes")]
        truth = fleet.reference.presence(MODEL)
        for key, holders in (await index.presence(MODEL)).items():
            for ref, bits in holders.items():
                assert bits & ~truth.get(key, {}).get(ref, 0) == 0
        resync = fleet.record([fleet.batch(
            victim, AllBlocksCleared(), fleet.store(victim, 0, length=CHAIN // 2),
            fleet.store(victim, 1), fleet.store(victim, 1, medium="cpu"),
            fleet.store(victim, 2), fleet.store(victim, CHAINS))])
        await index.apply(resync)
        await assert_exact(index, fleet)
        await index.close()

    async def test_a_sub_slot_migrated_mid_ingest(self, redis_cluster: RedisCluster) -> None:
        """A sub-slot's hash slot moves to another master while batches keep coming: the
        commands that meet it (MOVED, ASK, TRYAGAIN) are sent again, nothing applies
        twice, and the index stays exact against the reference model."""
        backend = Backend(redis_cluster.url, 3, cluster=True)
        await backend.flush()
        fleet = FieldFleet([MODEL], 8, seed=11)
        reference = ReferenceIndex(CONFIG.ghost_capacity)
        index = backend.index()

        async def steps(count: int) -> None:
            for _ in range(count):
                batches = fleet.step()
                for batch in batches:
                    reference.apply(batch)
                for attempt in range(100):  # as the consumer: again while unavailable
                    try:
                        await index.apply(batches)
                        break
                    except BackendError:
                        assert attempt < 99, "the cluster did not come back"
                        await asyncio.sleep(0.2)

        await steps(8)
        info = await index._model(MODEL)
        assert info is not None
        slot = key_slot(info.prefixes[0].encode())
        source = redis_cluster.node_of_slot(slot)
        target = next(redis_cluster.by_port(p) for p, i in redis_cluster.topology().items()
                      if i["master"] and p != source.port)
        mover = threading.Thread(target=redis_cluster.move_slot, args=(slot, target),
                                 kwargs={"pipeline": 1, "pause_s": 0.05})
        try:
            mover.start()
            steps_while_moving = 0
            while mover.is_alive():
                await steps(1)
                steps_while_moving += 1
            mover.join()
            assert steps_while_moving >= 3
            assert index.retried_calls > 0  # commands met the moving slot
            await steps(4)
            assert redis_cluster.node_of_slot(slot) is target
            assert await index.presence(MODEL) == reference.presence(MODEL)
            for keys in fleet.queries(MODEL, 20):
                got = await index.score(ScoreQuery(model=MODEL, block_keys=keys))
                assert [(s.worker_id, s.dp_rank, s.matched_blocks, s.weighted_score,
                         s.blocks_by_tier) for s in got.scores] == reference.score(
                    MODEL, keys, None, CONFIG.tier_weights, False)
        finally:
            await index.close()
            mover.join()
            redis_cluster.move_slot(slot, source)


# --- hybrid models (KV-cache groups > 0) ---------------------------------------------------

WINDOW = 2 * BS  # group 1's sliding window, in tokens: the last 2 blocks of a prefix


class HybridFleet(Fleet):
    """The fleet of a hybrid model: every chain in group 0 (full attention) and group 1
    (a sliding window); the in-memory index fed the same batches is the reference."""

    def __init__(self) -> None:
        super().__init__()
        self.memory = MemoryIndex(CONFIG)

    def store(self, ref: WorkerRef, chain: int, medium: str = "gpu",
              length: int = CHAIN, group: int = 0) -> BlockStored:
        return BlockStored(block_hashes=self.hashes(ref, chain, length), parent_hash=None,
                           token_ids=pack_tokens(self.tokens(ref, chain, length)),
                           block_size=BS, medium=medium, group=group,
                           group_kind="sliding_window" if group else None,
                           sliding_window=WINDOW if group else 0)

    def both(self, ref: WorkerRef, chain: int) -> list[Event]:
        return [self.store(ref, chain), self.store(ref, chain, group=1)]

    async def record_both(self, batches: list[EventBatch]) -> list[EventBatch]:
        await self.memory.apply(batches)
        return batches

    async def initial_hybrid(self) -> list[EventBatch]:
        return await self.record_both([
            self.batch(ref, *[e for c in range(CHAINS) for e in self.both(ref, c)])
            for ref in RANKS])

    async def churn_hybrid(self, ref: WorkerRef) -> list[EventBatch]:
        """The window group frees the first half of chain 0 (a hit there survives), full
        attention evicts the tail of chain 1, chain 3 is stored in both groups: clears and
        sets of both groups in every sub-slot."""
        hashes = self.hashes(ref, 0)
        return await self.record_both([
            self.batch(ref, BlockRemoved(block_hashes=hashes[SHARED : SHARED + CHAIN // 2],
                                         group=1)),
            self.batch(ref, BlockRemoved(block_hashes=self.hashes(ref, 1)[-CHAIN // 4 :]),
                       *self.both(ref, CHAINS)),
        ])

    def hybrid_queries(self) -> list[list[int]]:
        """Each chain, and chain 0 cut where the window group's hole begins and a block
        past it (the hole's blocks are not a hit; the prefix ending past it is)."""
        out = self.queries()
        for ref in RANKS:
            out += [self.keys(ref, 0, CHAIN // 4), self.keys(ref, 0, CHAIN // 2 + 1)]
        return out


def scored(result: Any) -> list[tuple[str, int, int, float, dict[str, int]]]:
    return [(s.worker_id, s.dp_rank, s.matched_blocks, s.weighted_score, s.blocks_by_tier)
            for s in result.scores]


async def assert_hybrid_exact(index: ShardedRedisIndex, fleet: HybridFleet) -> None:
    for keys in fleet.hybrid_queries():
        query = ScoreQuery(model=MODEL, block_keys=keys)
        assert scored(await index.score(query)) == scored(await fleet.memory.score(query))
    assert await index.presence(MODEL) == await fleet.memory.presence(MODEL)


class TestHybridGroups:
    async def test_hybrid_model_at_field_size(self, backend: Backend) -> None:
        """Thousands of blocks per rank in two KV-cache groups: Score equals the in-memory
        index's (vLLM's rule: the window group's hole is no hit, a prefix ending past it
        is); each group's presence is in its own hash per sub-slot, by block key."""
        fleet = HybridFleet()
        index = backend.index()
        await index.apply(await fleet.initial_hybrid())
        await index.apply(await fleet.churn_hybrid(RANKS[0]))
        await assert_hybrid_exact(index, fleet)
        hole = fleet.keys(RANKS[0], 0, CHAIN // 4)
        [score] = [s for s in (await index.score(ScoreQuery(model=MODEL, block_keys=hole))).scores
                   if (s.worker_id, s.dp_rank) == RANKS[0]]
        assert score.matched_blocks < len(hole)  # the window group's hole cuts the hit
        info = await index._model(MODEL)
        assert info is not None
        client = backend.client()
        try:
            for k, prefix in enumerate(info.prefixes):
                fields = await client.hgetall(prefix + "blk1")
                assert len(fields) > CHAIN // 2
                for field, value in fields.items():
                    assert int.from_bytes(field, "little") % len(info.prefixes) == k
                    assert value and len(value) % 4 == 0
        finally:
            await client.aclose()
        await index.close()

    @pytest.mark.parametrize("stop_after", [1, 2])
    async def test_torn_hybrid_call_is_reslotted(self, backend: Backend,
                                                 stop_after: int) -> None:
        """A writer stops between waves of a call changing both groups: readers never
        credit a block a rank did not hold; the next owner re-slots the rank, Score is
        exact again, and the old id has no entry left in any group's hash."""
        fleet = HybridFleet()
        first, reader = backend.index(), backend.index()
        await first.apply(await fleet.initial_hybrid())
        await assert_hybrid_exact(reader, fleet)
        torn = RANKS[2]
        before = await fleet.memory.presence(MODEL)
        old_slot = await slot_of(reader, torn)
        batches = await fleet.churn_hybrid(torn)
        allowed = union(before, await fleet.memory.presence(MODEL))
        queries = fleet.hybrid_queries()

        async def stop(wave: int) -> None:
            await assert_no_false_hit(reader, allowed, queries)
            if wave == stop_after:
                raise _WriterStoppedError

        first.wave_hook = stop
        with pytest.raises(_WriterStoppedError):
            await first.apply(batches)
        await first.close()
        second = backend.index()
        await second.apply(batches)
        assert second.reslots == 1
        await assert_hybrid_exact(second, fleet)
        await assert_hybrid_exact(reader, fleet)
        assert await backend.entries_of(old_slot) == 0
        await second.close()
        await reader.close()

    async def test_removal_leaves_no_group_key(self, backend: Backend) -> None:
        """Removing every worker of a hybrid model deletes every group's hashes and the
        directory's `groups` (only the id counter stays)."""
        fleet = HybridFleet()
        index = backend.index()
        await index.apply(await fleet.initial_hybrid())
        assert await index.clear_worker(MODEL, "w-1", 0) == 1
        assert await backend.entries_of(await slot_of(index, RANKS[2])) == 0
        for worker in ("w-0", "w-1", "w-2"):
            assert await index.remove_worker(MODEL, worker) >= 1
        remaining = [k for k in await backend.keys() if not k.startswith(b"kvi:marker")]
        assert only_id_counters(remaining, backend.subslots)
        await index.close()

    async def test_groups_listed_again_after_another_process_collected_the_model(
            self, backend: Backend) -> None:
        """A writer that listed the model's groups before another process collected the
        model lists them again when the model starts afresh: its Score is hybrid again
        and its group hashes are collectable."""
        fleet = HybridFleet()
        writer, remover = backend.index(), backend.index()
        await writer.apply([fleet.batch(RANKS[0], *fleet.both(RANKS[0], 0))])
        assert await remover.remove_worker(MODEL, RANKS[0].worker_id) == 1
        groups = f"kvi:{{s:{MODEL.replace('/', '~2F')}}}:groups"
        assert not await remover._redis.exists(groups)
        await writer.apply(await fleet.record_both(
            [fleet.batch(RANKS[2], *fleet.both(RANKS[2], 0))]))
        # group 1 listed again, and group 0 as full attention (its GPU stores name no kind)
        assert sorted(await remover._redis.hkeys(groups)) == [b"0", b"1"]
        await writer.close()
        await remover.close()
