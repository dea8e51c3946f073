"""Online per-model layout migration (indexer/index/online_migration.py) on one
redis-server: 64 ranks x 5,000 blocks moved 1 -> 4 sub-slots and back while 8 partition
writers keep ingesting (each rank storing a chain and removing its oldest every round) and a
reader of its own asks Score throughout. Never a false hit against the reference (the memory
index fed the same batches), every held chain a full hit during the migration, exact at the
end, the old layout's keys gone; the same 1 -> 3 -> 1 on a real 3-master cluster. Also: a
migration killed in its copy and in its switch, with its writers replaced, then run again;
one rolled back; and the service (`--redis-model-layouts on`, real publishers over NATS)
moved 1 -> 4 -> 1 by `kv-indexer migrate-model` while serving, and two indexers, one
stopping mid-move, its partitions taken over by the other."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as ClusterClient
from redis.exceptions import ConnectionError as RedisConnectionError

from indexer import cli
from indexer.app import IndexerService
from indexer.errors import BackendError
from indexer.index import online_migration as om
from indexer.index.factory import build_index
from indexer.index.layouts import directory_prefix, model_prefix
from indexer.index.memory import MemoryIndex
from indexer.index.protocol import Index, IndexConfig, ScoreQuery
from indexer.index.redis_cluster import cluster_url
from indexer.ingest.recovery import partition_of
from kvcore.bus import SCHEMA_VERSION, BlockRemoved, BlockStored, EventBatch, pack_tokens
from kvcore.topology import StreamSettings
from tests.support.capture import caught_up, mismatches
from tests.support.chain_fleet import ChainFleet
from tests.support.event_path import running_service, service_config
from tests.support.polling import eventually, is_true
from tests.support.redis_cluster import RedisCluster
from tests.support.servers import RedisServer

pytestmark = [pytest.mark.integration]

MODEL = "field/online"
PARTITIONS = 8
WORKERS, DP = 16, 4  # 64 ranks
BS = 16
CHAIN = 50  # blocks per chain, one batch
HELD = 100  # chains each rank holds: 5,000 blocks
SETTLE_S = 0.75  # 3 x om.RECHECK_S
RANKS = [(f"w{w:02d}", dp) for w in range(WORKERS) for dp in range(DP)]


def chain_tokens(rank: int, chain: int) -> list[int]:
    """Unique to (rank, chain) by its first block; the keys chain from it."""
    return [rank, chain] + [7] * (CHAIN * BS - 2)


def hashes(rank: int, chain: int) -> list[int]:
    return [(rank << 40) | (chain * CHAIN + i) for i in range(CHAIN)]


def batch(rank: int, seq: int, *events: Any) -> EventBatch:
    worker, dp = RANKS[rank]
    return EventBatch(schema=SCHEMA_VERSION, model=MODEL, worker_id=worker, dp_rank=dp,
                      epoch=1, seq=seq, events=list(events))


def store(rank: int, chain: int) -> BlockStored:
    return BlockStored(block_hashes=hashes(rank, chain), parent_hash=None,
                       token_ids=pack_tokens(chain_tokens(rank, chain)), block_size=BS)


def remove(rank: int, chain: int) -> BlockRemoved:
    return BlockRemoved(block_hashes=hashes(rank, chain))


def process(url: str) -> om.PerModelLayouts:
    """What one indexer process (flag 1, --redis-model-layouts on) holds: a
    PerModelLayouts over its own indexes and client (a redis+cluster:// URL: on the
    cluster)."""
    index = build_index(IndexConfig(), redis_url=url, model_layouts_partitions=PARTITIONS)
    assert isinstance(index, om.PerModelLayouts)
    return index


async def reader_process(url: str) -> om.PerModelLayouts:
    """A process that scores: pinged first, as the service's health check does (a
    cluster client learns its slots)."""
    index = process(url)
    await index.ping()
    return index


def redis_client(url: str) -> Any:
    plain = cluster_url(url)
    return ClusterClient.from_url(plain) if plain else aioredis.Redis.from_url(url)


async def keys_matching(client: Any, pattern: str) -> list[bytes]:
    if isinstance(client, ClusterClient):
        found = await client.keys(pattern, target_nodes=ClusterClient.PRIMARIES)
        return [key for key in found if isinstance(key, bytes)]
    return list(await client.keys(pattern))


@dataclass
class Fleet:
    """64 ranks, each its chains [low, high) held; `low`/`high` move only after the apply
    call that changed them returned (on the index and on the reference)."""

    reference: MemoryIndex = field(default_factory=MemoryIndex)
    seq: list[int] = field(default_factory=lambda: [0] * len(RANKS))
    low: list[int] = field(default_factory=lambda: [0] * len(RANKS))
    high: list[int] = field(default_factory=lambda: [0] * len(RANKS))
    # chains [low, dropping) are being removed: neither a false hit nor a miss
    dropping: list[int] = field(default_factory=lambda: [0] * len(RANKS))

    def ranks_of(self, partition: int) -> list[int]:
        return [r for r, (worker, _) in enumerate(RANKS)
                if partition_of(MODEL, worker, PARTITIONS) == partition]

    async def fill(self, index: Index) -> None:
        for r in range(len(RANKS)):
            batches = [batch(r, chain, store(r, chain)) for chain in range(HELD)]
            await index.apply(batches)
            await self.reference.apply(batches)
            self.seq[r], self.high[r] = HELD, HELD

    async def round(self, index: om.PerModelLayouts, partition: int) -> None:
        """Each rank of the partition stores its next chain and removes its oldest."""
        ranks = self.ranks_of(partition)
        batches = []
        for r in ranks:
            batches.append(batch(r, self.seq[r], store(r, self.high[r])))
            batches.append(batch(r, self.seq[r] + 1, remove(r, self.low[r])))
            self.dropping[r] = self.low[r] + 1
        await index.apply(batches)
        await self.reference.apply(batches)
        for r in ranks:
            self.seq[r] += 2
            self.high[r] += 1
            self.low[r] += 1


@dataclass
class Asked:
    scores: int = 0
    full_hits: int = 0
    misses: list[str] = field(default_factory=list)
    false_hits: list[str] = field(default_factory=list)


async def ask(reader: om.PerModelLayouts, fleet: Fleet, asked: Asked, rng: random.Random) -> None:
    """One Score for a chain of a random rank: removed before the call (a false hit if
    credited), or held from before the call to after it (a miss if not fully matched)."""
    r = rng.randrange(len(RANKS))
    low, high = fleet.low[r], fleet.high[r]
    chain = rng.choice([rng.randrange(max(low - 20, 0), low) if low else high - 1,
                        rng.randrange(low, high)])
    result = await reader.score(ScoreQuery(model=MODEL, token_ids=chain_tokens(r, chain),
                                           block_size=BS))
    asked.scores += 1
    worker, dp = RANKS[r]
    credited = {(s.worker_id, s.dp_rank): s.matched_blocks for s in result.scores}
    others = {ref: n for ref, n in credited.items() if ref != (worker, dp) and n}
    if others:
        asked.false_hits.append(f"rank {r} chain {chain}: others credited {others}")
    if chain < low and credited.get((worker, dp)):
        asked.false_hits.append(f"rank {r} chain {chain} (removed below {low}) credited")
    elif chain >= fleet.dropping[r]:
        if credited.get((worker, dp)) == CHAIN:
            asked.full_hits += 1
        else:
            asked.misses.append(f"rank {r} chain {chain}: {credited.get((worker, dp))}")


class Writers:
    """One writer process: 8 partition writers on a PerModelLayouts of its own, each
    tending its partition and applying a round, until stopped."""

    def __init__(self, url: str, fleet: Fleet) -> None:
        self.index = process(url)
        self._fleet = fleet
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._write(p)) for p in range(PARTITIONS)]

    async def _write(self, partition: int) -> None:
        while not self._stop.is_set():
            await self.index.tend(partition)
            await self._fleet.round(self.index, partition)
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self.index.close()


@asynccontextmanager
async def running(url: str, fleet: Fleet, reader: om.PerModelLayouts,
                  asked: Asked) -> AsyncIterator[list[Writers]]:
    """A writer process (replaceable: the list's item) and a scorer on `reader`, until
    the block ends."""
    writers = [Writers(url, fleet)]
    stop = asyncio.Event()

    async def score() -> None:
        rng = random.Random(7)
        while not stop.is_set():
            await ask(reader, fleet, asked, rng)
            await asyncio.sleep(0)

    scorer = asyncio.create_task(score())
    try:
        yield writers
    finally:
        stop.set()
        await scorer
        await writers[0].stop()


async def assert_exact(url: str, client: Any, fleet: Fleet, subslots: int) -> None:
    checker = await reader_process(url)
    try:
        got = await checker.presence(MODEL)
        want = await fleet.reference.presence(MODEL)
        assert len(got) == len(want) == len(RANKS) * HELD * CHAIN
        assert got == want
        assert sorted((w.worker_id, w.dp_rank, w.last_seq) for w in await checker.workers(MODEL)) \
            == sorted((*RANKS[r], fleet.seq[r] - 1) for r in range(len(RANKS)))
    finally:
        await checker.close()
    record = await om.read_layout(client, MODEL)
    assert record is not None and record.phase == om.DONE and record.target == subslots
    # the other layout's keys: the single slot's tag, or the directory's and sub-slots'
    old = model_prefix(MODEL) + "*" if subslots > 1 else directory_prefix(MODEL)[:-2] + "*"
    left = [k for k in await keys_matching(client, old) if not k.endswith(b"nextslot")]
    assert left == []


async def filled(url: str) -> tuple[str, Any, Fleet]:
    fleet = Fleet()
    first = process(url)
    await fleet.fill(first)
    await first.close()
    return url, redis_client(url), fleet


@pytest.fixture
async def setup(private_redis: RedisServer) -> AsyncIterator[tuple[str, Any, Fleet]]:
    url, client, fleet = await filled(private_redis.url)
    yield url, client, fleet
    await client.aclose()


@pytest.fixture
async def cluster_setup(redis_cluster: RedisCluster) -> AsyncIterator[tuple[str, Any, Fleet]]:
    plain = ClusterClient.from_url(redis_cluster.url)
    await plain.flushall(target_nodes=ClusterClient.PRIMARIES)
    await plain.aclose()
    url, client, fleet = await filled("redis+cluster://" + redis_cluster.url.split("://", 1)[1])
    yield url, client, fleet
    await client.aclose()


async def test_one_slot_to_four_subslots_and_back_while_ingesting(
        setup: tuple[str, Any, Fleet]) -> None:
    await there_and_back(*setup, 4)


@pytest.mark.redis_cluster
async def test_one_slot_to_three_subslots_and_back_on_a_cluster(
        cluster_setup: tuple[str, Any, Fleet]) -> None:
    await there_and_back(*cluster_setup, 3)


async def there_and_back(url: str, client: Any, fleet: Fleet, subslots: int) -> None:
    reader = await reader_process(url)
    asked = Asked()
    for target in (subslots, 1):
        async with running(url, fleet, reader, asked):
            await asyncio.sleep(0.3)
            before = asked.full_hits
            await om.migrate_model(client, MODEL, target, partitions=PARTITIONS,
                                   settle_s=SETTLE_S, say=lambda _: None)
            await asyncio.sleep(0.3)
        assert asked.false_hits == []
        assert asked.misses == []
        assert asked.full_hits - before > 50
        await assert_exact(url, client, fleet, target)
    await reader.close()


async def test_killed_in_copy_and_in_switch_then_run_again(
        setup: tuple[str, Any, Fleet]) -> None:
    url, client, fleet = setup
    reader = await reader_process(url)
    asked = Asked()
    async with running(url, fleet, reader, asked) as writers:
        for phase in (om.COPY, om.SWITCHED):
            run = asyncio.create_task(om.migrate_model(
                client, MODEL, 4, partitions=PARTITIONS, settle_s=SETTLE_S,
                say=lambda _: None))
            while not (record := await om.read_layout(client, MODEL)) or (
                    record.phase != phase):
                await asyncio.sleep(0.01)
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run
            # The writer process stops too; a new one takes its partitions over.
            await writers[0].stop()
            writers[0] = Writers(url, fleet)
            await asyncio.sleep(0.5)
        await om.migrate_model(client, MODEL, 4, partitions=PARTITIONS, settle_s=SETTLE_S,
                               say=lambda _: None)
    assert asked.false_hits == [] and asked.misses == []
    await assert_exact(url, client, fleet, 4)
    await reader.close()


async def test_rolled_back_in_its_switch(setup: tuple[str, Any, Fleet]) -> None:
    url, client, fleet = setup
    reader = await reader_process(url)
    asked = Asked()
    async with running(url, fleet, reader, asked):
        run = asyncio.create_task(om.migrate_model(
            client, MODEL, 4, partitions=PARTITIONS, settle_s=SETTLE_S, say=lambda _: None))
        while not (record := await om.read_layout(client, MODEL)) or (
                record.phase != om.SWITCHED):
            await asyncio.sleep(0.01)
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run
        await om.rollback_model(client, MODEL, settle_s=SETTLE_S, say=lambda _: None)
        with pytest.raises(BackendError):
            await om.rollback_model(client, MODEL, settle_s=SETTLE_S, say=lambda _: None)
    assert asked.false_hits == [] and asked.misses == []
    await assert_exact(url, client, fleet, 1)
    await reader.close()


# --- through `kv-indexer serve` and `kv-indexer migrate-model` ---------------------------

E2E_PARTITIONS = 4
E2E_WORKERS = 16
EVICTED = range(20)  # removed before the migration
MOVING = range(20, 30)  # removed by the traffic during it, one per round
KEPT = range(30, HELD)  # held all along: a full hit whenever asked


class ServiceScores:
    """Score asked of the service all along: no chain of a worker credited to another,
    none of EVICTED credited, every KEPT chain a full hit."""

    def __init__(self, index: Index, fleet: ChainFleet) -> None:
        self.index, self.fleet = index, fleet
        self.asked = Asked()
        self._rng = random.Random(3)

    async def ask_once(self) -> None:
        worker = self._rng.randrange(E2E_WORKERS)
        chain = self._rng.choice([*EVICTED, *KEPT])
        result = await self.index.score(ScoreQuery(
            model=MODEL, block_size=BS, token_ids=self.fleet.chain_tokens(worker, chain)))
        self.asked.scores += 1
        credited = {s.worker_id: s.matched_blocks for s in result.scores if s.matched_blocks}
        mine = credited.pop(f"w{worker}", 0)
        if credited or (chain in EVICTED and mine):
            self.asked.false_hits.append(f"w{worker} chain {chain}: {mine}, {credited}")
        elif chain in KEPT and mine != CHAIN:
            self.asked.misses.append(f"w{worker} chain {chain}: {mine}")
        else:
            self.asked.full_hits += chain in KEPT

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.ask_once()
            await asyncio.sleep(0.002)


async def traffic(fleet: ChainFleet, rounds: range, stop: asyncio.Event) -> None:
    """Every worker stores a new chain and removes one of MOVING each round."""
    for k in rounds:
        if stop.is_set():
            return
        fleet.store(range(HELD + k, HELD + k + 1))
        fleet.remove(range(MOVING[k], MOVING[k] + 1))
        await fleet.flush()
        await asyncio.sleep(0.3)


async def exact_service(index: Index, fleet: ChainFleet) -> None:
    await eventually(lambda: caught_up(index, fleet.published, MODEL), 120)
    assert await mismatches(index, fleet.published, MODEL) == (0, 0, 0)


async def migrate_with_the_command(url: str, subslots: int) -> None:
    status = await asyncio.to_thread(cli.main, [
        "migrate-model", "--redis-url", url, "--model", MODEL, "--redis-subslots",
        str(subslots), "--partitions", str(E2E_PARTITIONS), "--settle", "1"])
    assert status == 0


async def test_served_model_moved_by_the_command_while_serving(
        private_redis: RedisServer, nats_url: str) -> None:
    """`kv-indexer serve --redis-model-layouts on`: the model moved 1 -> 4 -> 1 by
    `kv-indexer migrate-model` while its workers keep storing and removing and Score is
    asked of the service throughout (16 workers x 5,000 blocks)."""
    url = private_redis.url
    fleet = ChainFleet(nats_url, MODEL, workers=E2E_WORKERS, block_size=BS, chain=CHAIN,
                       shared=0, stream=StreamSettings(partitions=E2E_PARTITIONS,
                                                       liveness_ttl_s=3.0))
    config = service_config(nats_url, redis_url=url, partitions=E2E_PARTITIONS,
                            liveness_grace_s=3600.0, redis_model_layouts="on")
    client = aioredis.Redis.from_url(url)
    try:
        async with running_service(config) as service:
            index = service.index
            assert isinstance(index, om.PerModelLayouts)
            await fleet.start()
            fleet.store(range(HELD))
            fleet.remove(EVICTED)
            await fleet.flush()
            await exact_service(index, fleet)
            scores = ServiceScores(index, fleet)
            for target, rounds in ((4, range(0, 5)), (1, range(5, 10))):
                stop = asyncio.Event()
                tasks = [asyncio.create_task(scores.run(stop)),
                         asyncio.create_task(traffic(fleet, rounds, stop))]
                await migrate_with_the_command(url, target)
                await tasks[1]
                stop.set()
                await asyncio.gather(*tasks)
                await exact_service(index, fleet)
                record = await om.read_layout(client, MODEL)
                assert record is not None and (record.phase, record.target) == (om.DONE, target)
            assert scores.asked.false_hits == [] and scores.asked.misses == []
            assert scores.asked.full_hits > 100
            assert service.stats.dead_letters == {}
    finally:
        await fleet.close()
        await client.aclose()


class FailingFlag:
    """A records client whose HSET of a `copied.<p>` flag fails: a writer dying after
    importing its partition into the target, before recording it."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def hset(self, key: str, field: str | None = None, value: Any = None,
                   **kwargs: Any) -> Any:
        if field is not None and field.startswith("copied."):
            raise RedisConnectionError("killed before recording the copy")
        return await self._client.hset(key, field, value, **kwargs)


async def test_a_writer_killed_inside_its_copy(setup: tuple[str, Any, Fleet]) -> None:
    """A copies partition 0 into the target and dies before recording it; a rank of the
    partition is then removed from the source alone (while uncopied, writes go there
    only); B takes the partition over, copies it again (the removed rank's copy
    dropped from the target), and the move ends exact."""
    url, client, fleet = setup
    run = asyncio.create_task(om.migrate_model(client, MODEL, 4, partitions=PARTITIONS,
                                               settle_s=SETTLE_S, say=lambda _: None))
    while await om.read_layout(client, MODEL) is None:
        await asyncio.sleep(0.01)
    first = process(url)
    first._client = FailingFlag(first._client)
    with pytest.raises(BackendError, match="killed before recording"):
        await first.tend(0)
    target = await first.layout(4)
    victim = RANKS[fleet.ranks_of(0)[0]][0]
    assert victim in {w.worker_id for w in await target.workers(MODEL)}
    await first.home.remove_worker(MODEL, victim)
    await fleet.reference.remove_worker(MODEL, victim)
    await first.close()
    second = process(url)
    for partition in range(PARTITIONS):
        await second.tend(partition)
        if partition:  # the victim's partition: copied, no round (it would come back)
            await fleet.round(second, partition)
    await run
    await second.close()
    checker = await reader_process(url)
    assert await checker.presence(MODEL) == await fleet.reference.presence(MODEL)
    assert victim not in {w.worker_id for w in await checker.workers(MODEL)}
    await checker.close()


async def test_an_indexer_leaving_mid_move_hands_its_partitions_over(
        private_redis: RedisServer, nats_url: str) -> None:
    """Two indexers share the partitions; one stops while the model is being copied; the
    other takes its partitions over (reading the records afresh) and the move ends exact,
    Score asked of the one staying throughout."""
    url = private_redis.url
    fleet = ChainFleet(nats_url, MODEL, workers=E2E_WORKERS, block_size=BS, chain=CHAIN,
                       shared=0, stream=StreamSettings(partitions=E2E_PARTITIONS,
                                                       liveness_ttl_s=3.0))
    config = service_config(nats_url, redis_url=url, partitions=E2E_PARTITIONS,
                            liveness_grace_s=3600.0, redis_model_layouts="on")
    client = aioredis.Redis.from_url(url)
    leaving = IndexerService(config)
    try:
        async with running_service(config) as staying:
            await leaving.start()
            index = staying.index
            assert index is not None
            await fleet.start()
            fleet.store(range(HELD))
            fleet.remove(EVICTED)
            await fleet.flush()
            await exact_service(index, fleet)
            leases = leaving.leases
            assert leases is not None
            await eventually(lambda: is_true(len(leases.held) == E2E_PARTITIONS // 2), 30)
            scores = ServiceScores(index, fleet)
            stop = asyncio.Event()
            tasks = [asyncio.create_task(scores.run(stop)),
                     asyncio.create_task(traffic(fleet, range(0, 10), stop))]
            move = asyncio.create_task(migrate_with_the_command(url, 4))
            while not (record := await om.read_layout(client, MODEL)) or record.phase != om.COPY:
                await asyncio.sleep(0.01)
            copied_before = len(record.copied)
            await leaving.close()
            await move
            await tasks[1]
            stop.set()
            await asyncio.gather(*tasks)
            await exact_service(index, fleet)
            record = await om.read_layout(client, MODEL)
            assert record is not None and (record.phase, record.target) == (om.DONE, 4)
            assert scores.asked.false_hits == [] and scores.asked.misses == []
            assert staying.stats.dead_letters == {}
            assert copied_before < E2E_PARTITIONS  # some were copied by the one staying
    finally:
        await leaving.close()
        await fleet.close()
        await client.aclose()


async def test_a_move_with_other_partitions_is_refused(setup: tuple[str, Any, Fleet]) -> None:
    """A record made with another --partitions than the indexers': they copy nothing,
    refuse the model's writes and fail health, until it is rolled back."""
    url, client, fleet = setup
    run = asyncio.create_task(om.migrate_model(client, MODEL, 4, partitions=PARTITIONS - 1,
                                               settle_s=SETTLE_S, say=lambda _: None))
    while await om.read_layout(client, MODEL) is None:
        await asyncio.sleep(0.01)
    writer = process(url)
    with pytest.raises(BackendError, match="--partitions"):
        await writer.tend(0)
    with pytest.raises(BackendError, match="--partitions"):
        await fleet.round(writer, 0)
    with pytest.raises(BackendError, match="--partitions"):
        await writer.ping()
    run.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await run
    record = await om.read_layout(client, MODEL)
    assert record is not None and record.copied == frozenset()
    await om.rollback_model(client, MODEL, settle_s=SETTLE_S, say=lambda _: None)
    await writer.ping()
    await fleet.round(writer, 0)
    await writer.close()
    await assert_exact(url, client, fleet, 1)
