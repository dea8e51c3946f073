"""Shared storage pools on sub-slot models (indexer/index/redis_sharded.py) at field size:
256 ranks over 4 sub-slots on one redis-server (3 on the 3-master cluster), half of them
writing one pool of 20,000 blocks through three indexers at once, with evictions by
other writers interleaved and applied out of time order. The index ends exactly as the
memory index fed the same batches; a replay changes nothing; a writer stopped after its
pool ops were decided (or between waves) leaves readers no false hit, another writer's
pool op or the redelivery finishes its work, and a removed pool leaves no entry. Writes a
failover lost on a sub-slot's side or on the pool's home are found at the next pool op
and the pool re-slotted wiped: no false hit, and what is stored after the repair is
credited (DUMP / RESTORE stands for the promoted replica)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from redis.crc import key_slot

from indexer.index.memory import MemoryIndex
from indexer.index.protocol import ApplyOutcome, IndexConfig, ScoreQuery, WorkerRef
from indexer.index.redis_sharded import ShardedRedisIndex
from kvcore.bus import SCHEMA_VERSION, BlockRemoved, BlockStored, Event, EventBatch, pack_tokens
from kvcore.keys import block_keys_for_tokens
from tests.support.redis_cluster import RedisCluster, pinged_after_failover
from tests.support.subslot_backend import BACKEND_PARAMS, Backend, flushed_backend

MODEL = "org/pooled-model"
POOL = "fs"
BS = 4
RANKS = [WorkerRef(f"w-{i // 2:03d}", i % 2) for i in range(256)]
WRITERS = RANKS[:128]  # the ranks of the 64 workers mounting the pool
OWN = 32  # blocks of each rank's own chain
CHAINS = 160  # pool chains of CHAIN blocks: 20,000 pool blocks
CHAIN = 125
INDEXERS = 3
CONFIG = IndexConfig()
MOUNTS = {**{ref.worker_id: frozenset({POOL}) for ref in WRITERS}, "cold": frozenset({POOL})}
Presence = dict[int, dict[WorkerRef, int]]


def chain_tokens(chain: int) -> list[int]:
    return [7_000_000 + chain * 10_000 + i for i in range(CHAIN * BS)]


def chain_hashes(chain: int) -> list[int]:
    return [900_000_000 + chain * 1_000 + i for i in range(CHAIN)]


class PoolFleet:
    """Each rank's batches in seq order. Times: own stores at 1000, the pool's stores at
    1000 + c, evictions of chain c's second half by another writer at 3000 + c, the
    storer's late copy of its chain (older than the eviction: must stay evicted) at
    2000 + c, and for every fourth chain a newer offload of its tail at 4000 + c."""

    def __init__(self) -> None:
        self.seq = dict.fromkeys(RANKS, -1)
        self.batches: dict[WorkerRef, list[EventBatch]] = {ref: [] for ref in RANKS}

    def batch(self, ref: WorkerRef, ts: float, *events: Event) -> EventBatch:
        self.seq[ref] += 1
        made = EventBatch(schema=SCHEMA_VERSION, model=MODEL, worker_id=ref.worker_id,
                          dp_rank=ref.dp_rank, epoch=1, seq=self.seq[ref], ts=ts,
                          events=list(events))
        self.batches[ref].append(made)
        return made

    @staticmethod
    def own_store(i: int) -> BlockStored:
        tokens = [1_000_000 * (i + 1) + t for t in range(OWN * BS)]
        return BlockStored(block_hashes=[i * 1_000 + j + 1 for j in range(OWN)],
                           token_ids=pack_tokens(tokens), block_size=BS)

    @staticmethod
    def pool_store(chain: int) -> BlockStored:
        """Chain `chain` offloaded (its tokens from the root, so any writer can name it)."""
        return BlockStored(block_hashes=chain_hashes(chain),
                           token_ids=pack_tokens(chain_tokens(chain)), block_size=BS,
                           medium="storage", pool=POOL)

    def build(self) -> None:
        for i, ref in enumerate(RANKS):
            self.batch(ref, 1000.0, self.own_store(i))
        for c in range(CHAINS):
            self.batch(WRITERS[c % len(WRITERS)], 1000.0 + c, self.pool_store(c))
        for c in range(CHAINS):
            evictor = WRITERS[(c + 1) % len(WRITERS)]
            tail = chain_hashes(c)[CHAIN // 2 :]
            self.batch(evictor, 3000.0 + c,
                       BlockRemoved(block_hashes=tail, medium="storage", pool=POOL))
        for c in range(CHAINS):
            self.batch(WRITERS[c % len(WRITERS)], 2000.0 + c, self.pool_store(c))
        for c in range(0, CHAINS, 4):
            self.batch(WRITERS[(c + 2) % len(WRITERS)], 4000.0 + c, self.pool_store(c))
        for i, ref in enumerate(RANKS):
            if i % 3 == 0:
                self.batch(ref, 5000.0, BlockRemoved(block_hashes=[i * 1_000 + OWN]))

    def in_order(self) -> list[EventBatch]:
        return [batch for ref in RANKS for batch in self.batches[ref]]

    def partition(self, indexer: int) -> list[EventBatch]:
        """The batches of the ranks indexer `indexer` owns, interleaved across its ranks
        (each rank's in seq order), as a consumer's fetches mix them."""
        mine = [self.batches[ref] for i, ref in enumerate(RANKS) if i % INDEXERS == indexer]
        out: list[EventBatch] = []
        for step in range(max(len(b) for b in mine)):
            out += [batches[step] for batches in mine if step < len(batches)]
        return out


def queries() -> list[list[int]]:
    return [block_keys_for_tokens(chain_tokens(c), BS, MODEL) for c in range(0, CHAINS, 7)]


async def apply_chunked(index: ShardedRedisIndex, batches: Sequence[EventBatch],
                        chunk: int = 24) -> list[ApplyOutcome]:
    outcomes: list[ApplyOutcome] = []
    for first in range(0, len(batches), chunk):
        outcomes += await index.apply(batches[first : first + chunk])
        await asyncio.sleep(0)  # let the other indexers' calls in between
    return outcomes


async def assert_exact(index: ShardedRedisIndex, memory: MemoryIndex) -> None:
    assert await index.presence(MODEL) == await memory.presence(MODEL)
    for keys in queries():
        query = ScoreQuery(model=MODEL, block_keys=keys, mounts=MOUNTS)
        assert await index.score(query) == await memory.score(query)
    pools = [(w.worker_id, w.blocks_by_tier) for w in await index.workers(MODEL)
             if w.kind == "pool"]
    expected = [(w.worker_id, w.blocks_by_tier) for w in await memory.workers(MODEL)
                if w.kind == "pool"]
    assert pools == expected


def pool_entries(presence: Presence) -> set[int]:
    return {key for key, holders in presence.items() if WorkerRef(POOL, -1) in holders}


@pytest.fixture(params=BACKEND_PARAMS)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    yield await flushed_backend(request)


class _StoppedError(Exception):
    """A writer stopped mid-call (a crash, as far as Redis can tell)."""


async def test_concurrent_writers_end_exact_and_a_replay_changes_nothing(
        backend: Backend) -> None:
    fleet = PoolFleet()
    fleet.build()
    memory = MemoryIndex(CONFIG)
    await memory.apply(fleet.in_order())
    indexers = [backend.index(CONFIG) for _ in range(INDEXERS)]
    outcomes = await asyncio.gather(*(apply_chunked(index, fleet.partition(i))
                                      for i, index in enumerate(indexers)))
    assert all(o is ApplyOutcome.APPLIED for batch_outcomes in outcomes for o in batch_outcomes)
    assert [index.pool_reslots for index in indexers] == [0] * INDEXERS  # no false alarm
    held = pool_entries(await memory.presence(MODEL))
    assert 10_000 < len(held) < CHAINS * CHAIN  # evictions won over the late stores
    for index in indexers:
        await assert_exact(index, memory)
    # Redelivered, every batch through another indexer than its owner: nothing moves.
    replayed = await asyncio.gather(*(apply_chunked(index, fleet.partition((i + 1) % INDEXERS))
                                      for i, index in enumerate(indexers)))
    assert all(o is ApplyOutcome.DUPLICATE for batch_outcomes in replayed for o in batch_outcomes)
    await assert_exact(indexers[0], memory)
    # A snapshot of every listed entry exports the ranks and creates nothing for the pool.
    listed = await indexers[0].workers(MODEL)
    states = await indexers[0].export_ranks([(w.model, WorkerRef(w.worker_id, w.dp_rank))
                                             for w in listed])
    assert sorted((s.worker_id, s.dp_rank) for s in states) == sorted(RANKS)
    assert await indexers[0].workers(MODEL) == listed
    # The pool goes with its entries; the ranks stay.
    slots = await indexers[0]._redis.hgetall(f"kvi:{{s:{MODEL.replace('/', '~2F')}}}:slots")
    pool_slot = int(slots[f"{POOL}\n-1".encode()])
    assert await indexers[1].remove_pool(MODEL, POOL)
    assert await backend.entries_of(pool_slot) == 0
    await memory.remove_pool(MODEL, POOL)
    await assert_exact(indexers[2], memory)
    for index in indexers:
        await index.close()


async def test_a_writer_stopped_after_its_pool_ops_leaves_no_false_hit(
        backend: Backend) -> None:
    """The eviction's pool op is decided in the pool's home, then the writer stops before
    any sub-slot applied it: readers see the pool as it was (no entry it never held);
    another writer's pool op applies the stopped one's pending changes (nothing waits
    for the stopped process), and the redelivered batch changes nothing more."""
    fleet = PoolFleet()
    first = [fleet.batch(WRITERS[c % len(WRITERS)], 1000.0 + c, fleet.pool_store(c))
             for c in range(CHAINS)]
    memory = MemoryIndex(CONFIG)
    index, reader = backend.index(CONFIG), backend.index(CONFIG)
    await index.apply(first)
    await memory.apply(first)
    before = await memory.presence(MODEL)
    assert await reader.presence(MODEL) == before
    evict = fleet.batch(WRITERS[5], 3000.0, *[
        BlockRemoved(block_hashes=chain_hashes(c)[10:], medium="storage", pool=POOL)
        for c in range(0, CHAINS, 2)])

    async def stop() -> None:
        raise _StoppedError

    stopped = backend.index(CONFIG)
    stopped.pool_hook = stop
    with pytest.raises(_StoppedError):
        await stopped.apply([evict])
    await stopped.close()
    assert await reader.presence(MODEL) == before  # decided, not yet applied anywhere
    await memory.apply([evict])
    # Another writer's offload (through another indexer) drains the pending eviction.
    other = fleet.batch(WRITERS[9], 3500.0, fleet.pool_store(CHAINS - 1))
    await index.apply([other])
    await memory.apply([other])
    assert pool_entries(await reader.presence(MODEL)) == pool_entries(
        await memory.presence(MODEL))
    # The stopped writer's batches are redelivered to the next owner: duplicates of the
    # pool's side, applied once on the rank's own.
    assert await index.apply([evict]) == [ApplyOutcome.APPLIED]
    await assert_exact(reader, memory)
    for one in (index, reader):
        await one.close()


async def test_a_writer_stopped_between_waves_is_finished_by_the_redelivery(
        backend: Backend) -> None:
    """Pool ops are in before the rank's waves: a writer stopped after wave 1 has its
    pool writes applied; the redelivery re-slots the torn rank and writes the pool ops
    no second time."""
    fleet = PoolFleet()
    fleet.build()
    batches = fleet.in_order()
    last = [fleet.batches[ref][-1] for ref in WRITERS[:8]]
    head = [b for b in batches if b not in last]
    memory = MemoryIndex(CONFIG)
    await memory.apply(head)
    index = backend.index(CONFIG)
    await apply_chunked(index, head, chunk=64)
    allowed = await memory.presence(MODEL)
    await memory.apply(last)
    after = await memory.presence(MODEL)
    for key, holders in after.items():
        merged = allowed.setdefault(key, {})
        for ref, bits in holders.items():
            merged[ref] = merged.get(ref, 0) | bits

    async def stop(wave: int) -> None:
        if wave == 1:
            raise _StoppedError

    stopped = backend.index(CONFIG)
    stopped.wave_hook = stop
    with pytest.raises(_StoppedError):
        await stopped.apply(last)
    await stopped.close()
    for key, holders in (await index.presence(MODEL)).items():
        for ref, bits in holders.items():
            assert bits & ~allowed.get(key, {}).get(ref, 0) == 0, (key, ref, bits)
    second = backend.index(CONFIG)
    assert all(o.applied for o in await second.apply(last))
    assert second.reslots >= 1
    await assert_exact(second, memory)
    for one in (index, second):
        await one.close()


async def _snapshot(client: Any, keys: list[str]) -> dict[str, bytes | None]:
    return {key: await client.dump(key) for key in keys}


async def _restore(client: Any, saved: dict[str, bytes | None]) -> None:
    """The keys as they were (a master failed over to a replica that lacked what
    followed)."""
    for key, dumped in saved.items():
        await client.delete(key)
        if dumped is not None:
            await client.restore(key, 0, dumped)


async def _two_indexers(redis_server: Any) -> tuple[
        Backend, PoolFleet, MemoryIndex, tuple[ShardedRedisIndex, ShardedRedisIndex], int]:
    """Two indexers on one flushed redis-server (4 sub-slots), the pool's chains stored
    through the first, the model known to both; the backend, the fleet, the reference,
    the indexers and the pool's id."""
    backend = Backend(redis_server.url, 4, cluster=False)
    await backend.flush()
    fleet, memory = PoolFleet(), MemoryIndex(CONFIG)
    first, second = backend.index(CONFIG), backend.index(CONFIG)
    pool_id, _ = await _pooled_fleet(first, memory, fleet)
    await second._model(MODEL)
    return backend, fleet, memory, (first, second), pool_id


async def _pooled_fleet(index: ShardedRedisIndex, memory: MemoryIndex,
                        fleet: PoolFleet) -> tuple[int, Any]:
    """The pool's chains stored by the writers (each writer's first batch holds nothing
    of its own: later pool-only batches write no rank part); the pool's id and model."""
    stores = [fleet.batch(WRITERS[c % len(WRITERS)], 1000.0 + c, fleet.pool_store(c))
              for c in range(40)]
    await index.apply(stores)
    await memory.apply(stores)
    slots = await index._redis.hgetall(f"kvi:{{s:{MODEL.replace('/', '~2F')}}}:slots")
    info = await index._model(MODEL)
    return int(slots[f"{POOL}\n-1".encode()]), info


def _evictions(fleet: PoolFleet) -> list[EventBatch]:
    return [fleet.batch(WRITERS[(c + 1) % len(WRITERS)], 3000.0 + c,
                        BlockRemoved(block_hashes=chain_hashes(c)[20:], medium="storage",
                                     pool=POOL)) for c in range(40)]


class TestFailovers:
    """A failover loses writes Redis confirmed (replication is asynchronous): on the
    sub-slot side (its pool entries and applied number roll back, past what the home
    already trimmed) or on the home side (ops the sub-slots applied are gone). Either is
    found at the next pool op, and the pool re-slotted: no block is left credited that
    a lost eviction took."""

    async def test_a_sub_slot_that_lost_entries_is_repaired(self, redis_server: Any) -> None:
        backend = Backend(redis_server.url, 4, cluster=False)
        await backend.flush()
        fleet, memory, index = PoolFleet(), MemoryIndex(CONFIG), backend.index(CONFIG)
        pool_id, info = await _pooled_fleet(index, memory, fleet)
        k = (pool_id + 1) % 4  # not the pool's home
        client = backend.client()
        saved = await _snapshot(client, [info.prefixes[k] + "blk", info.prefixes[k] + "pos"])
        evictions = _evictions(fleet)
        await index.apply(evictions)
        await memory.apply(evictions)
        await assert_exact(index, memory)
        await _restore(client, saved)  # sub-slot k's master lost the evictions
        stale = pool_entries(await index.presence(MODEL)) - pool_entries(
            await memory.presence(MODEL))
        assert stale  # the hazard: evicted blocks credited again
        more = [fleet.batch(WRITERS[1], 5000.0 + c, fleet.pool_store(c))
                for c in range(40, 48)]
        await index.apply(more)
        await memory.apply(more)
        assert index.pool_reslots == 1
        # Wiped: nothing stamped before the repair is credited, what follows it is.
        assert pool_entries(await index.presence(MODEL)) == set()
        await _assert_credited_after_repair(index, memory, fleet, 48, 49)
        await client.aclose()
        await index.close()

    async def test_a_home_that_lost_ops_is_wiped_under_a_new_id(
            self, redis_server: Any) -> None:
        backend = Backend(redis_server.url, 4, cluster=False)
        await backend.flush()
        fleet, memory, index = PoolFleet(), MemoryIndex(CONFIG), backend.index(CONFIG)
        pool_id, _ = await _pooled_fleet(index, memory, fleet)
        client = backend.client()
        await _lose_home_ops(index, memory, fleet, client)
        more = [fleet.batch(WRITERS[1], 5000.0 + c, fleet.pool_store(c)) for c in range(2)]
        await index.apply(more)
        await memory.apply(more)
        assert index.pool_reslots == 1
        # Wiped: the pool holds nothing stamped before the repair (its floor is at least
        # the repairing process's clock), nothing the lost evictions took.
        assert pool_entries(await index.presence(MODEL)) == set()
        reader = backend.index(CONFIG)
        await _assert_credited_after_repair(reader, memory, fleet, 2)
        await _assert_one_pool_id(index, pool_id)
        for one in (index, reader):
            await one.close()
        await client.aclose()

    @pytest.mark.parametrize("lost_ops", [False, True], ids=["lost_entries", "lost_ops"])
    async def test_a_reslot_stopped_after_its_mark_is_finished_by_the_next_writer(
            self, redis_server: Any, lost_ops: bool) -> None:
        """The old id marked (its re-slot's new id set with the mark in its home), the
        writer stopped there: the next writer through another indexer finishes that same
        re-slot, wiped."""
        backend = Backend(redis_server.url, 4, cluster=False)
        await backend.flush()
        fleet, memory, index = PoolFleet(), MemoryIndex(CONFIG), backend.index(CONFIG)
        pool_id, _ = await _pooled_fleet(index, memory, fleet)
        client = backend.client()
        lose = _lose_home_ops if lost_ops else _lose_subslot_entries
        await lose(index, memory, fleet, client)

        async def stop() -> None:
            raise _StoppedError

        index.reslot_hook = stop
        more = [fleet.batch(WRITERS[1], 5000.0, fleet.pool_store(45))]
        with pytest.raises(_StoppedError):
            await index.apply(more)
        await index.close()
        other = backend.index(CONFIG)
        await other.apply(more)  # the redelivery
        await memory.apply(more)
        assert other.pool_reslots == 1
        assert pool_entries(await other.presence(MODEL)) == set()
        await _assert_credited_after_repair(other, memory, fleet, 47)
        await _assert_one_pool_id(other, pool_id)
        await other.close()
        await client.aclose()

    @pytest.mark.parametrize("lost_ops", [False, True], ids=["lost_entries", "lost_ops"])
    @pytest.mark.parametrize("meet", ["before_the_mark", "after_the_mark"])
    async def test_two_indexers_reslotting_one_pool_at_once(
            self, redis_server: Any, lost_ops: bool, meet: str) -> None:
        """Both indexers find the failover's damage; the second comes in while the first
        takes its new id (and runs the whole re-slot) or after the first marked the old
        id (and finishes the first's re-slot). One re-slot happens, both calls end
        applied, the pool starts wiped (late stores older than the repair refused)."""
        backend, fleet, memory, (first, second), pool_id = await _two_indexers(redis_server)
        client = backend.client()
        lose = _lose_home_ops if lost_ops else _lose_subslot_entries
        await lose(first, memory, fleet, client)
        theirs = [fleet.batch(WRITERS[2], 5000.0, fleet.pool_store(46))]
        mine = [fleet.batch(WRITERS[1], 5001.0, fleet.pool_store(45))]
        met: list[list[ApplyOutcome]] = []

        async def meanwhile(*_: Any) -> None:
            if not met:
                met.append(await second.apply(theirs))

        if meet == "before_the_mark":
            first.claim_hook = meanwhile
        else:
            first.reslot_hook = meanwhile
        assert all(o.applied for o in await first.apply(mine))
        assert met and all(o.applied for o in met[0])
        await memory.apply(theirs + mine)
        assert first.pool_reslots + second.pool_reslots >= 1
        late = [fleet.batch(WRITERS[c], 2000.0 + c, fleet.pool_store(c)) for c in range(10)]
        third = backend.index(CONFIG)
        await third.apply(late)
        await memory.apply(late)
        assert pool_entries(await third.presence(MODEL)) == set()
        await _assert_credited_after_repair(third, memory, fleet, 47)
        await _assert_one_pool_id(third, pool_id)
        for one in (first, second, third):
            await one.close()
        await client.aclose()


    async def test_an_id_taken_while_another_re_slot_marks_the_pool_is_abandoned(
            self, redis_server: Any) -> None:
        """The second indexer found no re-slot and takes a new id; meanwhile the first
        marks its own and stops. The second's id is abandoned (the mark is the re-slot's
        one owner: taking an id retires no other pending one), and it finishes the
        first's re-slot."""
        backend, fleet, memory, (first, second), pool_id = await _two_indexers(redis_server)
        client = backend.client()
        await _lose_subslot_entries(first, memory, fleet, client)
        stopped = [fleet.batch(WRITERS[1], 5000.0, fleet.pool_store(45))]
        theirs = [fleet.batch(WRITERS[2], 5001.0, fleet.pool_store(46))]

        async def stop() -> None:
            raise _StoppedError

        async def first_marks_and_stops(_: int) -> None:
            second.claim_hook = None
            first.reslot_hook = stop
            with pytest.raises(_StoppedError):
                await first.apply(stopped)

        second.claim_hook = first_marks_and_stops
        assert all(o.applied for o in await second.apply(theirs))
        await memory.apply(theirs)
        await second.apply(stopped)  # the redelivery of the stopped call
        await memory.apply(stopped)
        assert pool_entries(await second.presence(MODEL)) == set()
        await _assert_credited_after_repair(second, memory, fleet, 47)
        await _assert_one_pool_id(second, pool_id)
        for one in (first, second):
            await one.close()
        await client.aclose()

    async def test_a_gap_in_the_homes_own_sub_slot_wipes_the_pool(
            self, redis_server: Any) -> None:
        """The home and its own sub-slot roll back together over two calls' evictions
        (the replica lagged both): the drain of the second finds a gap in the home's own
        sub-slot, not the home behind. The re-slot still starts wiped: the home's rolled
        back map (the evicted blocks among them) is never credited."""
        backend = Backend(redis_server.url, 4, cluster=False)
        await backend.flush()
        fleet, memory, index = PoolFleet(), MemoryIndex(CONFIG), backend.index(CONFIG)
        pool_id, info = await _pooled_fleet(index, memory, fleet)
        home = info.home(pool_id)
        client = backend.client()
        pool_keys = [key for key in index._pool_keys(info, pool_id) if not key.endswith("pos")]
        saved = await _snapshot(client, [*pool_keys, home + "blk", home + "pos"])

        def evict(chains: range) -> list[EventBatch]:
            return [fleet.batch(WRITERS[(c + 1) % len(WRITERS)], 3000.0 + c,
                                BlockRemoved(block_hashes=chain_hashes(c)[20:],
                                             medium="storage", pool=POOL)) for c in chains]

        first = evict(range(0, 20))
        await index.apply(first)
        await memory.apply(first)

        async def failover() -> None:
            index.pool_hook = None
            await _restore(client, saved)

        index.pool_hook = failover  # after the second call's decisions, before its drain
        second = evict(range(20, 40))
        await index.apply(second)
        await memory.apply(second)
        await _assert_repaired_once(index, memory, fleet, 45)
        await _assert_one_pool_id(index, pool_id)
        await client.aclose()
        await index.close()

    async def test_a_wiped_floor_is_above_every_writers_older_batches(
            self, redis_server: Any) -> None:
        """Batch times are not monotone per writer: the evicting writers' last batches are
        older than their lost evictions. A late store older than those evictions, sent
        after them, is refused by the new id's floor (no false hit)."""
        backend = Backend(redis_server.url, 4, cluster=False)
        await backend.flush()
        fleet, memory, index = PoolFleet(), MemoryIndex(CONFIG), backend.index(CONFIG)
        await _pooled_fleet(index, memory, fleet)
        client = backend.client()
        await _lose_home_ops(index, memory, fleet, client)  # evictions at 3000 + c
        own = [fleet.batch(WRITERS[w], 1500.0, fleet.own_store(w)) for w in range(1, 41)]
        await index.apply(own)
        await memory.apply(own)
        late = [fleet.batch(WRITERS[0], 2000.0, fleet.pool_store(0))]
        await index.apply(late)
        await memory.apply(late)
        await _assert_repaired_once(index, memory, fleet, 45)
        await client.aclose()
        await index.close()

    async def test_an_old_id_dead_without_a_mark_is_re_slotted_wiped(
            self, redis_server: Any) -> None:
        """An id marked collected in every sub-slot with no re-slot named in its home
        while the directory still maps it (a re-slot stopped by an older version): the
        next writer re-slots it wiped (what the stopped one meant is not known)."""
        backend = Backend(redis_server.url, 4, cluster=False)
        await backend.flush()
        fleet, memory, index = PoolFleet(), MemoryIndex(CONFIG), backend.index(CONFIG)
        pool_id, info = await _pooled_fleet(index, memory, fleet)
        await index._run([("HSET", prefix + "pos", f"q{pool_id}", "x")
                          for prefix in info.prefixes])
        other = backend.index(CONFIG)
        more = [fleet.batch(WRITERS[1], 5000.0, fleet.pool_store(45))]
        await other.apply(more)
        await memory.apply(more)
        assert other.pool_reslots == 1
        assert pool_entries(await other.presence(MODEL)) == set()
        await _assert_credited_after_repair(other, memory, fleet, 46)
        await _assert_one_pool_id(other, pool_id)
        for one in (index, other):
            await one.close()


async def _assert_repaired_once(index: ShardedRedisIndex, memory: MemoryIndex,
                                fleet: PoolFleet, *chains: int) -> None:
    """One re-slot happened, the pool holds nothing the memory index does not, and
    chains offloaded after it are credited."""
    assert index.pool_reslots == 1
    assert pool_entries(await index.presence(MODEL)) <= pool_entries(
        await memory.presence(MODEL))
    await _assert_credited_after_repair(index, memory, fleet, *chains)


async def _assert_credited_after_repair(index: ShardedRedisIndex, memory: MemoryIndex,
                                       fleet: PoolFleet, *chains: int) -> None:
    """Chains offloaded after a re-slot (stamped now: its floor is the repairing
    process's clock) are credited; the pool holds no entry the memory index does not."""
    later = [fleet.batch(WRITERS[3], time.time(), fleet.pool_store(c)) for c in chains]
    await index.apply(later)
    await memory.apply(later)
    got = pool_entries(await index.presence(MODEL))
    assert chain_keys(*chains) <= got <= pool_entries(await memory.presence(MODEL))


def chain_keys(*chains: int) -> set[int]:
    return {key for c in chains for key in block_keys_for_tokens(chain_tokens(c), BS, MODEL)}


async def _lose_subslot_entries(index: ShardedRedisIndex, memory: MemoryIndex,
                                fleet: PoolFleet, client: Any) -> None:
    """The evictions applied, then lost by a sub-slot other than the pool's home."""
    pool_id, info = await _pool_of(index)
    k = (pool_id + 1) % info.subslots
    saved = await _snapshot(client, [info.prefixes[k] + "blk", info.prefixes[k] + "pos"])
    evictions = _evictions(fleet)
    await index.apply(evictions)
    await memory.apply(evictions)
    await _restore(client, saved)


async def _lose_home_ops(index: ShardedRedisIndex, memory: MemoryIndex, fleet: PoolFleet,
                         client: Any) -> None:
    """The evictions applied, then lost by the pool's home (its state and its own
    sub-slot roll back together; the other sub-slots keep them)."""
    pool_id, info = await _pool_of(index)
    home = info.home(pool_id)
    pool_keys = [key for key in index._pool_keys(info, pool_id) if not key.endswith("pos")]
    saved = await _snapshot(client, [*pool_keys, home + "blk", home + "pos"])
    evictions = _evictions(fleet)
    await index.apply(evictions)
    await memory.apply(evictions)
    await _restore(client, saved)


async def _pool_of(index: ShardedRedisIndex) -> tuple[int, Any]:
    slots = await index._redis.hgetall(f"kvi:{{s:{MODEL.replace('/', '~2F')}}}:slots")
    return int(slots[f"{POOL}\n-1".encode()]), await index._model(MODEL)


async def _assert_one_pool_id(index: ShardedRedisIndex, old: int) -> None:
    """The pool re-slotted: mapped at a new id, the old one collected, no id left pending
    or retired (entries of the old id a lost eviction left in a sub-slot stay, credited
    to nobody: its map no longer names their keys)."""
    prefix = f"kvi:{{s:{MODEL.replace('/', '~2F')}}}:"
    slots = await index._redis.hgetall(prefix + "slots")
    assert int(slots[f"{POOL}\n-1".encode()]) != old
    assert await index._redis.hgetall(prefix + "pending") == {}
    assert await index._redis.hgetall(prefix + "retired") == {}


async def test_a_gap_after_a_reload_wipes_a_pool_whose_name_holds_a_line_break(
        backend: Backend) -> None:
    """The pools a rank wrote since its last gap are kept with its ledger; a name with a
    line break comes back whole in another process, and the gap wipes that pool (not
    pools named by its fragments)."""
    fleet, memory = PoolFleet(), MemoryIndex(CONFIG)
    name = "fs\nx"
    writer = WRITERS[0]
    stored = BlockStored(block_hashes=chain_hashes(0), token_ids=pack_tokens(chain_tokens(0)),
                         block_size=BS, medium="storage", pool=name)
    first = [fleet.batch(writer, 1000.0, stored),
             fleet.batch(WRITERS[1], 1000.0, fleet.pool_store(1))]
    index = backend.index(CONFIG)
    await index.apply(first)
    await memory.apply(first)
    await index.close()
    fleet.seq[writer] += 1  # a batch lost on the bus
    after_gap = [fleet.batch(writer, 2000.0, fleet.own_store(0))]
    reloaded = backend.index(CONFIG)
    assert await reloaded.apply(after_gap) == [ApplyOutcome.APPLIED_AFTER_GAP]
    assert await memory.apply(after_gap) == [ApplyOutcome.APPLIED_AFTER_GAP]
    held = await reloaded.presence(MODEL)
    assert not [key for key, holders in held.items() if WorkerRef(name, -1) in holders]
    assert held == await memory.presence(MODEL)
    await reloaded.close()


@pytest.mark.redis_cluster
async def test_a_failover_that_lost_a_pools_ops_is_found_by_the_lost_writes_check(
        own_cluster: RedisCluster) -> None:
    """The pool home's replica is cut off while its master decides evictions, then the
    master dies and the replica is promoted without them (the home's own sub-slot rolls
    back with the home: its evicted entries come back). The lost-writes check finds the
    home behind the op counter Redis confirmed and re-slots the pool wiped, before any
    further pool op: no evicted block is credited."""
    fleet, memory = PoolFleet(), MemoryIndex(CONFIG)
    index = ShardedRedisIndex.from_url(own_cluster.url, subslots=3, cluster=True,
                                       config=CONFIG)
    pool_id, info = await _pooled_fleet(index, memory, fleet)
    master = own_cluster.node_of_slot(key_slot(info.home(pool_id).encode()))
    replica = own_cluster.cut_off_replica(master)
    evictions = _evictions(fleet)
    await index.apply(evictions)  # acknowledged by the master only
    await memory.apply(evictions)
    own_cluster.promote_cut_off(master, replica)
    await pinged_after_failover(index)
    await _assert_repaired_once(index, memory, fleet, 45)
    await index.close()
