"""Score from read replicas with the sub-slot layout (`--redis-subslots 4` with
`--redis-read-url`), at field size: 64 ranks x 20,000 blocks each over 4 sub-slots, on
one redis-server with two `redis-server --replicaof` replicas, and on a real 3-master
Redis Cluster whose replicas serve their masters' shares (READONLY).

Caught up, replica answers equal the primary's and the fleet's bookkeeping; a replica
stopped (SIGSTOP) falls behind, is left out of reads with its staleness reported, and
serves again once it has caught up; one killed while Scores are in flight is left out
without a failed or wrong answer; a cluster master failed over to its replica keeps
every answer exact and moves that shard's reads to the old master, now a replica. No
answer ever credits a chain removed longer ago than the staleness it declares."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from indexer.client import AsyncIndexerClient, Query
from indexer.index.factory import build_index
from indexer.index.protocol import IndexConfig, ScoreQuery, ScoreResult, WorkerRef
from indexer.index.read_replicas import ReplicaReadIndex
from indexer.index.redis_sharded import ShardedRedisIndex
from kvcore.bus import SCHEMA_VERSION, BlockRemoved, BlockStored, EventBatch, pack_tokens
from kvcore.keys import block_keys_for_tokens
from tests.support.event_path import BS as EVENT_BS
from tests.support.event_path import MODEL as EVENT_MODEL
from tests.support.event_path import TOKENS, publisher, running_service, service_config
from tests.support.polling import eventually
from tests.support.redis_cluster import RedisCluster
from tests.support.redis_replicas import RedisReplica, gauges
from tests.support.servers import RedisServer

pytestmark = pytest.mark.integration

MODEL = "org/model-larger-than-a-shard"
SUBSLOTS = 4
RANKS = [WorkerRef(f"w{i:02d}", 0) for i in range(64)]
CHAINS = 400  # of 50 blocks: 20,000 blocks per rank
CHAIN = 50
SHARED = 100  # chains 0..99 every rank holds; the others are each rank's own
BS = 4
BOUND_S = 0.5  # --redis-read-max-staleness
CHAINS_PER_BATCH = 100


class FieldFleet:
    """64 ranks' stores and removals, and which chains they hold now."""

    def __init__(self) -> None:
        self.seq = {ref: -1 for ref in RANKS}
        self.removed: dict[int, float] = {}  # chain -> monotonic time its removal applied
        self.removing: set[int] = set()  # chains whose removal is being applied
        self._keys: dict[tuple[int, int], list[int]] = {}

    @staticmethod
    def tokens(rank: int, chain: int) -> list[int]:
        first = 1 + (chain if chain < SHARED else (rank + 1) * CHAINS + chain) * CHAIN * BS
        return list(range(first, first + CHAIN * BS))

    @staticmethod
    def hashes(chain: int) -> list[int]:
        return [chain * CHAIN + i + 1 for i in range(CHAIN)]

    def keys(self, rank: int, chain: int) -> list[int]:
        owner = 0 if chain < SHARED else rank
        found = self._keys.get((owner, chain))
        if found is None:
            found = self._keys[(owner, chain)] = block_keys_for_tokens(
                self.tokens(rank, chain), BS, MODEL)
        return found

    def _batch(self, ref: WorkerRef, events: Sequence[BlockStored | BlockRemoved]
               ) -> EventBatch:
        self.seq[ref] += 1
        return EventBatch(schema=SCHEMA_VERSION, model=MODEL, worker_id=ref.worker_id,
                          dp_rank=ref.dp_rank, epoch=1, seq=self.seq[ref],
                          ts=float(self.seq[ref]), events=list(events))

    def stores(self) -> list[list[EventBatch]]:
        """Every rank's chains, CHAINS_PER_BATCH per batch, one batch per rank per call."""
        calls = []
        for start in range(0, CHAINS, CHAINS_PER_BATCH):
            calls.append([self._batch(ref, [
                BlockStored(block_hashes=self.hashes(c), parent_hash=None,
                            token_ids=pack_tokens(self.tokens(r, c)), block_size=BS)
                for c in range(start, start + CHAINS_PER_BATCH)]) for r, ref in enumerate(RANKS)])
        return calls

    def removals(self, chains: range) -> list[EventBatch]:
        return [self._batch(ref, [BlockRemoved(block_hashes=[h for c in chains
                                                             for h in self.hashes(c)])])
                for ref in RANKS]

    @staticmethod
    def stored(rank: int, chain: int) -> dict[WorkerRef, int]:
        """Who matches the chain before its removal."""
        return dict.fromkeys(RANKS if chain < SHARED else [RANKS[rank]], CHAIN)

    def expected(self, rank: int, chain: int) -> dict[WorkerRef, int]:
        return {} if chain in self.removed else self.stored(rank, chain)

    def query(self, rank: int, chain: int) -> ScoreQuery:
        return ScoreQuery(model=MODEL, block_keys=self.keys(rank, chain))


def credited(result: ScoreResult) -> dict[WorkerRef, int]:
    return {WorkerRef(s.worker_id, s.dp_rank): s.matched_blocks for s in result.scores}


class Reads:
    """Scores through the replica-reading index, each checked against the fleet."""

    def __init__(self, index: ReplicaReadIndex, fleet: FieldFleet, seed: int) -> None:
        self.index, self.fleet = index, fleet
        self.rng = random.Random(seed)
        self.answers = 0

    async def ask(self, rank: int, chain: int) -> ScoreResult:
        """One Score; asserts it is exact, or (from a replica) differs only by chains
        removed within the staleness it declares."""
        asked_at = time.monotonic()
        result = await self.index.score(self.fleet.query(rank, chain))
        got, want = credited(result), self.fleet.expected(rank, chain)
        self.answers += 1
        if result.replica:  # picked within the bound after it was asked
            assert 0 < result.staleness_s <= BOUND_S + time.monotonic() - asked_at, result
        else:
            assert result.staleness_s == 0
        if got != want and chain in self.fleet.removing:
            # mid-removal, the sub-slots' parts not all applied: a prefix of the chain
            before = self.fleet.stored(rank, chain)
            assert all(before.get(ref, 0) >= n for ref, n in got.items()), (rank, chain, result)
        elif got != want:
            removed_at = self.fleet.removed.get(chain)
            assert removed_at is not None and result.replica, (rank, chain, result)
            assert asked_at - removed_at <= result.staleness_s, (rank, chain, result)
            assert got == self.fleet.stored(rank, chain), (rank, chain, result)
        return result

    async def sources(self, chains: Sequence[int], n: int = 60) -> set[str]:
        """The replicas named by n answers about `chains` ("" for the primary); every
        replica of a multi-replica answer counted."""
        found: set[str] = set()
        for _ in range(n):
            result = await self.ask(self.rng.randrange(len(RANKS)), self.rng.choice(chains))
            found.update(result.replica.split(",") if result.replica else [""])
        return found

    async def until_quiet(self, stop: asyncio.Event) -> None:
        """Scores back to back until `stop` (a run other steps happen during)."""
        while not stop.is_set():
            await self.sources(range(CHAINS), n=1)
            await asyncio.sleep(0)


async def fill(index: ReplicaReadIndex, fleet: FieldFleet) -> float:
    """Every rank's 20,000 blocks, on the primary; the seconds it took."""
    started = time.monotonic()
    for call in fleet.stores():
        await index.apply(call)
    return time.monotonic() - started


async def remove(index: ReplicaReadIndex, fleet: FieldFleet, chains: range) -> None:
    """Every rank removes `chains`; the time the primary had it is noted."""
    fleet.removing.update(chains)
    await index.apply(fleet.removals(chains))
    now = time.monotonic()
    for chain in chains:
        fleet.removed[chain] = now
    fleet.removing.difference_update(chains)


async def agree_with_the_primary(reads: Reads, samples: int = 300) -> None:
    """Replica answers equal the primary's own (ShardedRedisIndex without read_from)."""
    primary = reads.index.primary
    assert isinstance(primary, ShardedRedisIndex)
    for _ in range(samples):
        rank, chain = reads.rng.randrange(len(RANKS)), reads.rng.randrange(CHAINS)
        mine = await reads.ask(rank, chain)
        theirs = await primary.score(reads.fleet.query(rank, chain))
        assert mine.replica
        assert credited(mine) == credited(theirs) == reads.fleet.expected(rank, chain)
        assert mine.scores == theirs.scores


def replica_index(url: str, read_urls: list[str]) -> ReplicaReadIndex:
    """The factory's index for `--redis-subslots 4 --redis-read-url ...`."""
    index = build_index(IndexConfig(), redis_url=url, redis_read_urls=read_urls,
                        max_staleness_s=BOUND_S, redis_subslots=SUBSLOTS)
    assert isinstance(index, ReplicaReadIndex)
    assert isinstance(index.primary, ShardedRedisIndex)
    return index


async def scores_served(url: str) -> int:
    """EVALSHA_RO calls the node at `url` has answered (a sub-slot's share of a Score)."""
    async with aioredis.Redis.from_url(url) as client:
        stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha_ro", {}).get("calls", 0))


async def usable(index: ReplicaReadIndex, addresses: set[str]) -> bool:
    """Exactly `addresses` are usable replicas now."""
    now = time.monotonic()
    return {r.address for r in index.replicas
            if r.usable and r.staleness(now) <= BOUND_S} == addresses


class TestOneNode:
    """One redis-server primary with 4 sub-slots, two replicas of it."""

    async def test_stopped_then_back_killed_mid_run(self, tmp_path: Path) -> None:
        primary = RedisServer(tmp_path / "primary").start()
        a, b = (RedisReplica(tmp_path / f"replica{i}", primary).start() for i in range(2))
        fleet = FieldFleet()
        index = replica_index(primary.url, [a.url, b.url])
        reads = Reads(index, fleet, seed=18)
        try:
            await index.ping()  # starts the probes
            print(f"filled in {await fill(index, fleet):.1f} s")
            for replica in (a, b):
                await replica.wait_in_sync(120)
            await eventually(lambda: usable(index, {a.address, b.address}), 10)

            # caught up: the replicas answer, as the primary does
            await agree_with_the_primary(reads)
            assert await reads.sources(range(CHAINS)) == {a.address, b.address}
            assert await scores_served(a.url) > 0 and await scores_served(b.url) > 0
            assert await scores_served(primary.url) == 0

            # a stopped: it falls behind and is left out, its staleness reported
            assert a.proc is not None
            os.kill(a.proc.pid, signal.SIGSTOP)
            try:
                await remove(index, fleet, range(300, 320))
                await remove(index, fleet, range(20, 25))  # shared chains: every rank's
                await eventually(lambda: usable(index, {b.address}), 10)
                for _ in range(4):  # a, past the bound, is not even asked (no timeout)
                    started = time.monotonic()
                    assert await reads.sources(range(CHAINS), n=1) == {b.address}
                    assert time.monotonic() - started < index.query_timeout_s * 0.8
                await asyncio.sleep(1.5)  # past the probe's timeout too
                left_out = next(r for r in index.replicas if r.address == a.address)
                assert left_out.staleness(time.monotonic()) > BOUND_S
                assert gauges(index)[("usable", a.address)] == 0.0
                assert gauges(index)[("staleness", a.address)] in (-1.0, pytest.approx(
                    left_out.staleness(time.monotonic()), abs=0.2))
                assert await reads.sources([*range(15, 30), *range(290, 330)]) == {b.address}
                assert index.reads.get(a.address, 0) > 0  # (it had answered before)
            finally:
                os.kill(a.proc.pid, signal.SIGCONT)
            await a.wait_in_sync(60)
            await eventually(lambda: usable(index, {a.address, b.address}), 10)
            assert a.address in await reads.sources(range(CHAINS))

            # b killed while Scores are in flight: none fails or is wrong
            stop = asyncio.Event()
            running = asyncio.create_task(reads.until_quiet(stop))
            await asyncio.sleep(0.5)
            before = reads.answers
            b.kill()
            await remove(index, fleet, range(320, 330))
            await asyncio.sleep(1.0)
            stop.set()
            await running
            assert reads.answers > before
            assert await reads.sources(range(CHAINS)) == {a.address}

            # a killed too: the primary answers, staleness 0
            a.kill()
            assert await reads.sources(range(CHAINS)) == {""}
        finally:
            await index.close()
            for replica in (a, b):
                replica.stop()
            primary.stop()


class TestService:
    """`serve --redis-subslots 4 --redis-read-url ...`: the gRPC answer names the replica."""

    async def test_answer_names_the_replica(self, nats_url: str, tmp_path: Path) -> None:
        primary = RedisServer(tmp_path / "primary").start()
        replica = RedisReplica(tmp_path / "replica", primary).start()
        config = service_config(nats_url, redis_url=primary.url, redis_read_url=replica.url,
                                redis_subslots=SUBSLOTS, grpc_listen="127.0.0.1:0")
        try:
            await replica.wait_in_sync()
            async with running_service(config) as service, publisher(nats_url, "w1") as pub:
                pub.stored(list(range(1, 9)), TOKENS, parent_hash=None)
                assert await pub.flush()
                query = Query(model=EVENT_MODEL, token_ids=TOKENS, block_size=EVENT_BS)
                async with AsyncIndexerClient(f"127.0.0.1:{service.grpc_port}") as client:

                    async def from_the_replica() -> bool:
                        answer = await client.score(query)
                        got = {s.worker_id: s.matched_blocks for s in answer.scores}
                        fresh = answer.freshness
                        return (got == {"w1": 8} and fresh.read_replica == replica.address
                                and 0 < fresh.index_staleness_seconds <= BOUND_S + 1.0)

                    await eventually(from_the_replica, 30)
        finally:
            replica.stop()
            primary.stop()


@pytest.mark.redis_cluster
class TestCluster:
    """A 3-master cluster, a replica each; 4 sub-slots over the 3 masters."""

    async def test_replicas_answer_then_a_master_fails_over(
            self, own_cluster: RedisCluster) -> None:
        """Every node is listed: the masters are not read (not replicas). After a
        graceful failover of one master to its replica, that shard is read from the old
        master, now its replica; another master's replica killed mid-run, that master
        reads itself and the others' replicas still serve; every answer exact
        throughout."""
        cluster = own_cluster
        fleet = FieldFleet()
        nodes = {f"127.0.0.1:{node.port}": node for node in cluster.nodes}
        index = replica_index(cluster.url, [node.url for node in cluster.nodes])
        reads = Reads(index, fleet, seed=19)
        try:
            await index.ping()
            print(f"filled in {await fill(index, fleet):.1f} s")
            masters = [cluster.by_port(p) for p, i in cluster.topology().items()
                       if i["master"]]
            replicas = {cluster.wait_replica_synced(m, 120) for m in masters}
            replica_addresses = {f"127.0.0.1:{r.port}" for r in replicas}
            await eventually(lambda: usable(index, replica_addresses), 10)

            await agree_with_the_primary(reads)
            assert await reads.sources(range(CHAINS)) == replica_addresses
            # A master is read only when its replica was left out (a probe late on a
            # loaded machine): the index counts every such read as the primary's.
            fell_back = index.reads.get("primary", 0) > 0
            for node in cluster.nodes:
                served = await scores_served(node.url)
                if node in replicas:
                    assert served > 0, node.port
                else:
                    assert fell_back or served == 0, (node.port, index.reads)
            answer = await reads.ask(0, CHAINS - 1)  # 50 blocks: all 4 sub-slots
            assert set(answer.replica.split(",")) == replica_addresses

            old_master = index.primary.master_names()
            promoted = cluster.replica_of(masters[0])
            stop = asyncio.Event()
            running = asyncio.create_task(reads.until_quiet(stop))
            await asyncio.to_thread(promoted.cli, "CLUSTER", "FAILOVER")
            await eventually(lambda: _is_master(promoted), 30)
            await asyncio.to_thread(cluster.wait_ok, 60)
            await remove(index, fleet, range(330, 340))  # the client learns the new master
            await asyncio.sleep(1.0)
            stop.set()
            await running
            assert index.primary.master_names() != old_master

            demoted = f"127.0.0.1:{masters[0].port}"
            now_replicas = replica_addresses - {f"127.0.0.1:{promoted.port}"} | {demoted}
            await eventually(lambda: usable(index, now_replicas), 30)
            await agree_with_the_primary(reads, samples=100)
            assert await reads.sources(range(CHAINS)) == now_replicas
            assert set(nodes) >= now_replicas

            # another master's replica killed mid-run: that master reads itself
            victim = cluster.replica_of(masters[1])
            stop.clear()
            running = asyncio.create_task(reads.until_quiet(stop))
            await asyncio.sleep(0.3)
            victim.kill()
            await remove(index, fleet, range(340, 350))
            await asyncio.sleep(1.0)
            stop.set()
            await running
            left = now_replicas - {f"127.0.0.1:{victim.port}"}
            await eventually(lambda: usable(index, left), 10)
            assert await reads.sources(range(CHAINS)) == left
            answer = await reads.ask(1, CHAINS - 1)
            assert set(answer.replica.split(",")) == left
        finally:
            await index.close()


async def _is_master(node: RedisServer) -> bool:
    async with aioredis.Redis.from_url(node.url) as client:
        return bool((await client.info("replication"))["role"] == "master")
