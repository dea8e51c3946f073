"""The Redis index on a real Redis Cluster (3 masters, one replica each, local ports):
models spread over the masters, ingest and Score exact against the reference model at
field scale, a model's hash slot migrated mid-ingest (MOVED/ASK/TRYAGAIN), a master
SIGKILLed and replaced by its replica with ingest going on, and writes a promoted replica
never received found and repaired by resyncs."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio.cluster import RedisCluster as ClusterClient
from redis.crc import key_slot

from indexer.app import IndexerService
from indexer.config import parse_service_config, validate
from indexer.errors import BackendError, ConfigError
from indexer.index.factory import build_index
from indexer.index.layouts import model_prefix
from indexer.index.protocol import IndexConfig, ResyncRequest, ScoreQuery, WorkerRef
from indexer.index.redis import RedisIndex
from indexer.index.redis_cluster import LOST_WRITES_REASON, RedisClusterIndex
from kvcore.bus import EventBatch
from tests.support.event_path import MODEL as EVENT_MODEL
from tests.support.event_path import matched, publisher, service_config, store
from tests.support.fleet import Fleet
from tests.support.polling import equals, eventually
from tests.support.redis_cluster import RedisCluster
from tests.support.reference import ReferenceIndex
from tests.support.servers import RedisServer

pytestmark = pytest.mark.redis_cluster

WORKERS = 8  # per model
CHUNK = 256  # batches per apply call, as the consumer's --apply-chunk


def model_slot(model: str) -> int:
    return key_slot(model_prefix(model).encode())


def spread_models(per_shard: int = 1, shards: int = 3) -> list[str]:
    """Model names whose hash slots fall in each third of the slot space (where
    `--cluster create` puts each master) `per_shard` times."""
    picked: dict[int, list[str]] = {s: [] for s in range(shards)}
    i = 0
    while any(len(names) < per_shard for names in picked.values()):
        name = f"org/model-{i}"
        shard = min(model_slot(name) * shards // 16384, shards - 1)
        if len(picked[shard]) < per_shard:
            picked[shard].append(name)
        i += 1
    return [name for names in picked.values() for name in names]


class Ingest:
    """An index, the reference fed the same batches, and what resyncs were asked for."""

    def __init__(self, cluster: RedisCluster, fleet: Fleet) -> None:
        self.fleet = fleet
        self.reference = ReferenceIndex(IndexConfig().ghost_capacity)
        self.resyncs: list[ResyncRequest] = []
        self.index = RedisClusterIndex.from_url(cluster.url, on_resync=self.resyncs.append)
        self.retries = 0

    async def apply(self, batches: list[EventBatch], deadline_s: float = 60) -> None:
        """As the consumer does: each chunk again while the backend is unavailable."""
        for batch in batches:
            self.reference.apply(batch)
        for start in range(0, len(batches), CHUNK):
            chunk = batches[start : start + CHUNK]
            deadline = time.monotonic() + deadline_s
            while True:
                try:
                    await self.index.apply(chunk)
                    break
                except BackendError:
                    self.retries += 1
                    assert time.monotonic() < deadline, "cluster did not come back"
                    await asyncio.sleep(0.2)

    async def steps(self, count: int) -> None:
        for _ in range(count):
            await self.apply(self.fleet.step())

    async def assert_exact(self, queries_per_model: int = 20) -> None:
        models = sorted({r.model for r in self.fleet.ranks})
        for model in models:
            assert await self.index.presence(model) == self.reference.presence(model), model
            for keys in self.fleet.queries(model, queries_per_model):
                got = await self.index.score(ScoreQuery(model=model, block_keys=keys))
                want = self.reference.score(model, keys, None,
                                            self.index.config.tier_weights, False)
                assert [(s.worker_id, s.dp_rank, s.matched_blocks, s.weighted_score,
                         s.blocks_by_tier) for s in got.scores] == want
            infos = await self.index.workers(model)
            assert {(w.worker_id, w.dp_rank): (w.epoch, w.last_seq) for w in infos} == {
                (ref.worker_id, ref.dp_rank): (w.epoch, w.last_seq)
                for (m, ref), w in self.reference.workers.items() if m == model}

    def held_entries(self) -> int:
        return sum(len(w.held) for w in self.reference.workers.values())


@pytest.fixture
async def flushed_cluster(redis_cluster: RedisCluster) -> AsyncIterator[RedisCluster]:
    client = ClusterClient.from_url(redis_cluster.url)
    await client.flushall()
    await client.aclose()
    yield redis_cluster



async def test_a_cluster_node_url_gets_the_cluster_index(
        flushed_cluster: RedisCluster, redis_server: RedisServer) -> None:
    """serve's factory: a cluster node's redis:// URL (detected) and redis+cluster://
    (forced) give the cluster index; a single node keeps the plain one."""
    url = flushed_cluster.url
    forced = url.replace("redis://", "redis+cluster://")
    for cluster_url in (url, forced):
        index = build_index(IndexConfig(), redis_url=cluster_url)
        try:
            assert isinstance(index, RedisClusterIndex)
            assert await index.workers() == []
        finally:
            await index.close()
    single = build_index(IndexConfig(), redis_url=redis_server.url)
    assert type(single) is RedisIndex
    await single.close()


async def test_models_spread_over_masters_exact_at_field_scale(
        flushed_cluster: RedisCluster) -> None:
    """Three models, one per master, 8 workers each, each rank's cache past 20,000
    blocks (long prompts, the oldest evicted): presence, scores and positions equal the
    reference, and every master holds a model."""
    fleet = Fleet(spread_models(), WORKERS, tail_blocks=192, keep_prompts=125, seed=13)
    ingest = Ingest(flushed_cluster, fleet)
    try:
        await ingest.steps(135)  # eviction from step 126 on: removals as well as stores
        per_rank = [len(w.held) for w in ingest.reference.workers.values()]
        assert len(per_rank) == 3 * WORKERS and min(per_rank) >= 20_000
        await ingest.assert_exact()
        assert ingest.retries == 0
        holders = {flushed_cluster.node_of_slot(model_slot(r.model)).port
                   for r in ingest.fleet.ranks}
        assert len(holders) == 3
        for node in (flushed_cluster.by_port(p) for p in holders):
            assert int(node.cli("DBSIZE")) > 0
    finally:
        await ingest.index.close()


async def test_slot_migrated_mid_ingest(flushed_cluster: RedisCluster) -> None:
    """A model's hash slot moves to another master while its batches keep coming: the
    calls are redirected or retried, nothing applies twice, the index stays exact."""
    models = spread_models()
    ingest = Ingest(flushed_cluster, Fleet(models, WORKERS, seed=11))
    moving = models[0]
    source = flushed_cluster.node_of_slot(model_slot(moving))
    target = next(flushed_cluster.by_port(p) for p, i in flushed_cluster.topology().items()
                  if i["master"] and p != source.port)
    try:
        await ingest.steps(8)
        mover = threading.Thread(
            target=flushed_cluster.move_slot, args=(model_slot(moving), target),
            kwargs={"pipeline": 1, "pause_s": 0.05})
        mover.start()
        steps_while_moving = 0
        while mover.is_alive():
            await ingest.steps(1)
            steps_while_moving += 1
        mover.join()
        assert steps_while_moving >= 3
        assert ingest.index.retried_calls > 0  # calls met the moving slot (TRYAGAIN, MOVED)
        await ingest.steps(4)
        assert flushed_cluster.node_of_slot(model_slot(moving)) is target
        await ingest.assert_exact()
    finally:
        await ingest.index.close()
        flushed_cluster.move_slot(model_slot(moving), source)


async def test_master_killed_replica_takes_over(own_cluster: RedisCluster) -> None:
    """SIGKILL the master of two models mid-ingest: its replica is promoted (the
    cluster's own failure detection), ingest carries on, the index ends exact."""
    ingest = Ingest(own_cluster, Fleet(spread_models(), WORKERS, seed=5))
    victim_model = ingest.fleet.ranks[0].model
    try:
        await ingest.steps(10)
        master = own_cluster.node_of_slot(model_slot(victim_model))
        replica = own_cluster.wait_replica_synced(master)  # this test loses nothing
        master.kill()
        await ingest.steps(10)
        assert own_cluster.node_of_slot(model_slot(victim_model)) is replica
        await ingest.assert_exact()
        assert [r for r in ingest.resyncs if r.reason == LOST_WRITES_REASON] == []
    finally:
        await ingest.index.close()


async def test_writes_lost_in_failover_are_repaired(own_cluster: RedisCluster) -> None:
    """The replica is cut off while its master acknowledges batches, then the master dies
    and the replica is promoted without them: the index finds the ranks behind what it
    confirmed, clears them (no block they may have dropped is claimed) and asks each for
    a resync; once the resyncs are applied the index is exact again."""
    ingest = Ingest(own_cluster, Fleet(spread_models(), WORKERS, seed=3))
    victim_model = ingest.fleet.ranks[0].model
    try:
        await ingest.steps(8)
        master = own_cluster.node_of_slot(model_slot(victim_model))
        replica = own_cluster.cut_off_replica(master)
        await ingest.steps(3)  # acknowledged by the master only
        own_cluster.promote_cut_off(master, replica)
        lost_ranks = {(r.model, r.worker_id, r.dp_rank) for r in ingest.fleet.ranks
                      if r.model == victim_model}
        await ingest.steps(1)
        asked = {(r.model, r.worker_id, r.dp_rank) for r in ingest.resyncs
                 if r.reason == LOST_WRITES_REASON}
        assert asked == lost_ranks
        for model, worker, rank in sorted(asked):  # no false hit meanwhile
            ref = WorkerRef(worker, rank)
            truth = ingest.reference.presence(model)
            held = [k for k, holders in (await ingest.index.presence(model)).items()
                    if ref in holders]
            assert all(ref in truth.get(k, {}) for k in held)
        await ingest.apply([ingest.fleet.resync(ingest.fleet.rank(*r)) for r in sorted(asked)])
        await ingest.steps(3)
        await ingest.assert_exact()
    finally:
        await ingest.index.close()


async def test_serve_on_a_cluster_repairs_writes_lost_in_failover(
        own_cluster: RedisCluster, nats_url: str) -> None:
    """The service itself (NATS consumers, markers, positions, snapshots, liveness) on the
    cluster: it starts on a node's plain URL, ingests; the master of the model's slot
    dies with writes its replica never got; the service finds them missing, the
    publisher's resync restores them (or, when the master died before answering the apply
    that wrote them, the apply is tried again on the promoted replica), and later events
    apply on the promoted replica."""
    svc = IndexerService(service_config(nats_url, redis_url=own_cluster.url))
    await svc.start()
    try:
        assert isinstance(svc.index, RedisClusterIndex)
        async with publisher(nats_url) as pub:
            store(pub, 1, 4)
            await pub.flush()
            await eventually(lambda: equals(matched(svc), 4))
            master = own_cluster.node_of_slot(model_slot(EVENT_MODEL))
            replica = own_cluster.wait_replica_synced(master)
            replica.stop_signal(signal.SIGSTOP)
            master.cli("CLIENT", "KILL", "TYPE", "replica")
            store(pub, 5, 6)
            await pub.flush()
            await eventually(lambda: equals(matched(svc), 6))  # on the master only
            master.kill()
            replica.stop_signal(signal.SIGCONT)
            replica.cli("CLUSTER", "FAILOVER", "TAKEOVER")
            own_cluster.wait_ok(replicated=False)

            index = svc.index

            async def restored() -> bool:
                # The writes the replica never got come back by the publisher's resync
                # when the lost-writes check finds the rank behind, or by the apply
                # itself when the master died after running it and before answering:
                # that call is tried again on the promoted replica.
                return await matched(svc) == 6 and (pub.ranks[0].resync_requests >= 1
                                                    or index.retried_calls >= 1)

            await eventually(restored, timeout=30)
            store(pub, 7, 8)
            await pub.flush()
            await eventually(lambda: equals(matched(svc), 8), timeout=20)
    finally:
        await svc.close()


def test_cluster_url_schemes_are_accepted_by_serve(tmp_path: Path) -> None:
    """`--redis-url redis+cluster://` (and rediss+cluster:// with the TLS flags) pass
    serve's checks; another scheme is still refused, naming the flag."""
    config = parse_service_config(["--redis-url", "redis+cluster://node-1:6379"], environ={})
    validate(config)
    ca = tmp_path / "ca.pem"
    ca.write_text("not read by validate")
    validate(parse_service_config(["--redis-url", "rediss+cluster://node-1:6379",
                                   "--redis-tls-ca", str(ca)], environ={}))
    with pytest.raises(ConfigError, match="--redis-url must be"):
        validate(parse_service_config(["--redis-url", "cluster://node-1:6379"], environ={}))
