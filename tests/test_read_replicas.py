"""Score from Redis read replicas (`--redis-read-url`): real `redis-server --replicaof`
processes behind a live service. Answers are exact and say which replica answered and how
far behind it may be; a replica that falls behind (DEBUG SLEEP), is detached (REPLICAOF NO
ONE) or is killed stops serving, and Score goes to the other replica or the primary,
never answering with a block removed longer ago than the staleness it declares."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from indexer.app import IndexerService
from indexer.client import AsyncIndexerClient, Query, ScoreAnswer
from indexer.config import ServiceConfig
from indexer.index.read_replicas import ReadReplica, ReplicaReadIndex
from indexer.index.redis import RedisIndex
from kvcore.topology import StreamSettings
from tests.support.capture import caught_up, mismatches
from tests.support.chain_fleet import ChainFleet
from tests.support.event_path import BS, TOKENS, publisher, service_config
from tests.support.event_path import MODEL as EVENT_MODEL
from tests.support.polling import eventually
from tests.support.redis_replicas import RedisReplica, gauges
from tests.support.servers import RedisServer

pytestmark = pytest.mark.integration

MODEL = "replicas/model"
WORKERS = 4
PARTITIONS = 2
CHAINS = 400  # of 50 blocks: 20,000 blocks per worker
CHAIN = 50
BOUND_S = 0.5  # --redis-read-max-staleness


class Holdings:
    """Which chains each worker holds now (the fleet's own bookkeeping)."""

    def __init__(self, fleet: ChainFleet) -> None:
        self.fleet = fleet
        self.held = [set() for _ in range(WORKERS)]  # type: list[set[int]]

    def store(self, chains: range) -> None:
        self.fleet.store(chains)
        for held in self.held:
            held.update(chains)

    def remove(self, chains: range) -> None:
        self.fleet.remove(chains)
        for held in self.held:
            held.difference_update(chains)

    def expected(self, worker: int, chain: int) -> dict[str, int]:
        """worker id -> matched blocks for the query of `worker`'s chain `chain`."""
        if chain < self.fleet.shared:
            return {f"w{w}": CHAIN for w in range(WORKERS) if chain in self.held[w]}
        return {f"w{worker}": CHAIN} if chain in self.held[worker] else {}


async def ask(client: AsyncIndexerClient, holdings: Holdings, worker: int,
              chain: int) -> ScoreAnswer:
    """Score the chain's tokens; assert the answer is exact; return it."""
    answer = await client.score(Query(model=MODEL,
                                      token_ids=holdings.fleet.chain_tokens(worker, chain)))
    got = {s.worker_id: s.matched_blocks for s in answer.scores}
    assert got == holdings.expected(worker, chain), (
        worker, chain, answer.freshness.read_replica, answer.freshness.index_staleness_seconds)
    return answer


async def ask_many(client: AsyncIndexerClient, holdings: Holdings, rng: random.Random,
                   chains: list[int], n: int = 40) -> set[str]:
    """n exact answers about `chains`; the replicas (or "" for the primary) that gave them."""
    sources = set()
    for _ in range(n):
        answer = await ask(client, holdings, rng.randrange(WORKERS), rng.choice(chains))
        fresh = answer.freshness
        if fresh.read_replica:
            assert 0 < fresh.index_staleness_seconds <= BOUND_S + 0.25
        else:
            assert fresh.index_staleness_seconds == 0
        sources.add(fresh.read_replica)
    return sources


class TestScoreFromReplicas:
    """Exact answers, the answering replica and its staleness named, failures ridden out."""

    async def test_replicas_fall_behind_detach_and_die(self, nats_url: str,
                                                       tmp_path: Path) -> None:
        """Two replicas serve Score in turn; one asleep or detached is skipped and the
        other serves; both gone, the primary serves; removals are never missed once
        the staleness bound has passed."""
        rng = random.Random(18)
        primary = RedisServer(tmp_path / "primary").start()
        replicas = [RedisReplica(tmp_path / f"replica{i}", primary).start() for i in range(2)]
        a, b = replicas
        fleet = ChainFleet(nats_url, MODEL, workers=WORKERS, stream=StreamSettings(
            partitions=PARTITIONS, liveness_ttl_s=3.0))
        holdings = Holdings(fleet)
        service = IndexerService(ServiceConfig(
            nats_url=nats_url, redis_url=primary.url,
            redis_read_url=",".join(r.url for r in replicas),
            redis_read_max_staleness_s=BOUND_S, grpc_listen="127.0.0.1:0", metrics_listen="",
            partitions=PARTITIONS, liveness_ttl_s=3.0, liveness_grace_s=3600.0))
        try:
            for replica in replicas:
                await replica.wait_in_sync()
            await service.start()
            assert service.index is not None
            await fleet.start()
            holdings.store(range(CHAINS))
            await fleet.flush(120)
            await eventually(lambda: caught_up(service.index, fleet.published, MODEL), 120)
            assert await mismatches(service.index, fleet.published, MODEL) == (0, 0, 0)
            async with AsyncIndexerClient(f"127.0.0.1:{service.grpc_port}") as client:
                # healthy: both replicas answer, exactly
                await asyncio.sleep(BOUND_S)
                every = list(range(CHAINS))
                assert await ask_many(client, holdings, rng, every) == {a.address, b.address}

                # a asleep: removals answered exactly by b
                sleeping = asyncio.create_task(a.sleep(8.0))
                await asyncio.sleep(0.2)
                await self._remove(service, fleet, holdings, range(300, 320))
                assert await ask_many(client, holdings, rng, list(range(290, 330))) == {
                    b.address}
                assert not sleeping.done()  # all those answers came while a slept
                await sleeping
                await a.wait_in_sync()
                await eventually(lambda: self._answered_by(client, holdings, a.address), 10)

                # a detached: it keeps the removed chains, and is never asked again
                await a.detach()
                await self._remove(service, fleet, holdings, range(320, 340))
                assert a.address not in await ask_many(client, holdings, rng,
                                                       list(range(310, 350)))

                # b killed too: the primary answers
                b.kill()
                await self._remove(service, fleet, holdings, range(340, 350))
                assert await ask_many(client, holdings, rng, list(range(330, 360))) == {""}
                assert await ask_many(client, holdings, rng, every, n=20) == {""}
        finally:
            await service.close()
            await fleet.close()
            for replica in replicas:
                replica.stop()
            primary.stop()

    @staticmethod
    async def _remove(service: IndexerService, fleet: ChainFleet, holdings: Holdings,
                      chains: range) -> None:
        """Every worker removes `chains`; returns once the primary has applied it and the
        staleness bound has passed since (no copy within the bound may miss it)."""
        holdings.remove(chains)
        await fleet.flush(60)
        await eventually(lambda: caught_up(service.index, fleet.published, MODEL), 60)
        await asyncio.sleep(BOUND_S + 0.1)

    @staticmethod
    async def _answered_by(client: AsyncIndexerClient, holdings: Holdings,
                           address: str) -> bool:
        answer = await ask(client, holdings, 0, 0)
        return answer.freshness.read_replica == address


class TestReaderProcesses:
    """`--grpc-processes`: the reader processes score from the replicas too."""

    async def test_readers_answer_from_the_replica(self, nats_url: str,
                                                   tmp_path: Path) -> None:
        """With the consumer process's own gRPC server stopped, the reader process
        answers, exactly, from the replica, and says so."""
        primary = RedisServer(tmp_path / "primary").start()
        replica = RedisReplica(tmp_path / "replica", primary).start()
        service = IndexerService(service_config(
            nats_url, redis_url=primary.url, redis_read_url=replica.url,
            grpc_listen="127.0.0.1:0", grpc_processes=2))
        try:
            await replica.wait_in_sync()
            await service.start()
            async with publisher(nats_url, "w1") as pub:
                pub.stored(list(range(1, 9)), TOKENS, parent_hash=None)
                assert await pub.flush()
                query = Query(model=EVENT_MODEL, token_ids=TOKENS, block_size=BS)
                await self._answered(service.grpc_port, query, "")  # indexed, whoever answers
                await service._server.stop(0)  # type: ignore[union-attr]
                await self._answered(service.grpc_port, query, replica.address)
        finally:
            await service.close()
            replica.stop()
            primary.stop()

    @staticmethod
    async def _answered(port: int, query: Query, source: str) -> None:
        """Until a new connection's Score says w1 holds all 8 blocks and, if `source`
        is given, that this replica answered."""

        async def answered() -> bool:
            client = AsyncIndexerClient(f"127.0.0.1:{port}", timeout=2.0,
                                        options=[("grpc.use_local_subchannel_pool", 1)])
            try:
                answer = await client.score(query)
            except Exception:  # noqa: BLE001 - not serving (yet)
                return False
            finally:
                await client.close()
            got = {s.worker_id: s.matched_blocks for s in answer.scores}
            return got == {"w1": 8} and (not source or answer.freshness.read_replica == source)

        await eventually(answered, timeout=30)


class TestReplicaProbe:
    """What one probe round decides about a replica."""

    async def test_detached_then_reattached(self, tmp_path: Path) -> None:
        """In sync: usable, its bound under the limit. Detached (REPLICAOF NO ONE) while
        the primary takes writes: unusable at the next probe. Following the primary
        again and caught up: usable again."""
        primary = RedisServer(tmp_path / "primary").start()
        replica = RedisReplica(tmp_path / "replica", primary).start()
        writer = aioredis.Redis.from_url(primary.url)
        index = ReplicaReadIndex(
            RedisIndex.from_url(primary.url),
            [ReadReplica(replica.url, RedisIndex.from_url(primary.url).config)],
            primary_probe=aioredis.Redis.from_url(primary.url), max_staleness_s=0.3)
        try:
            await replica.wait_in_sync()
            await index.probe()
            assert index.replicas[0].usable
            assert index.replicas[0].staleness(time.monotonic()) < 0.3
            assert gauges(index) == {("usable", replica.address): 1.0,
                                     ("staleness", replica.address): pytest.approx(0.0, abs=0.3)}
            await replica.detach()
            await writer.set("kvi:test-write", b"1")
            await index.probe()
            assert not index.replicas[0].usable
            assert "not a replica" in index.replicas[0].reason
            assert gauges(index) == {("usable", replica.address): 0.0,
                                     ("staleness", replica.address): -1.0}
            async with aioredis.Redis.from_url(replica.url) as client:
                await client.execute_command("REPLICAOF", "127.0.0.1", str(primary.port))
            await replica.wait_in_sync()
            await index.probe()
            assert index.replicas[0].usable
        finally:
            await writer.aclose()
            await index.close()
            replica.stop()
            primary.stop()
