"""`kv-indexer migrate-layout` end to end (real NATS, publishers and indexers): a fleet
indexed in one layout, the indexers restarted with another --redis-subslots (they refuse:
NOT_SERVING with the command to run), the command run, and the index rebuilt into the new
layout from snapshots and the stream, exact against the reference. Score is asked all
along the gap and must never credit a rank with a block it does not hold. Also: a run
stopped halfway and run again, other applications' keys left as they were, and the way
back; on one redis-server (32 workers x 5,000 blocks, 1 -> 4 -> 1) and once on a 3-master
cluster (16 workers x 5,000 blocks, 1 -> 3 -> 1)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as ClusterClient

from indexer import cli
from indexer.app import IndexerService
from indexer.errors import BackendError
from indexer.index import layouts
from indexer.index.protocol import ScoreQuery
from indexer.ingest import consumer
from indexer.ingest.consumer import marker_is_rebuilding, marker_name
from kvcore.topology import StreamSettings
from tests.support.capture import caught_up, mismatches
from tests.support.chain_fleet import ChainFleet
from tests.support.event_path import running_service, service_config
from tests.support.polling import eventually, is_true
from tests.support.redis_cluster import RedisCluster
from tests.support.servers import RedisServer

pytestmark = [pytest.mark.integration]

PARTITIONS = 2
BS = 16
CHAIN = 50  # blocks per chain: one bus batch
CHAINS = 100  # 5,000 blocks per worker
EVICTED = range(20)  # chains every worker removes before the migration
SPARE = range(CHAINS, CHAINS + 4)  # chains Score is not asked about, removed in the gaps
MODEL = "field/migrated"
# Another application's keys in the same Redis, one under a name that mentions a tag.
FOREIGN = {b"app:session:1": b"alive", b"app:cache:{m:field~2Fmigrated}:x": b"not ours",
           b"kvi": b"a lookalike"}


def client_of(url: str, cluster: bool) -> Any:
    return ClusterClient.from_url(url) if cluster else aioredis.Redis.from_url(url)


async def flush(url: str, cluster: bool) -> None:
    client = client_of(url, cluster)
    if cluster:
        await client.flushall(target_nodes=ClusterClient.PRIMARIES)
    else:
        await client.flushall()
    await client.aclose()


async def all_keys(url: str, cluster: bool) -> dict[bytes, bytes | None]:
    """Every key; string values too (the foreign keys are strings)."""
    client = client_of(url, cluster)
    try:
        if cluster:
            keys = await client.keys("*", target_nodes=ClusterClient.PRIMARIES)
        else:
            keys = await client.keys("*")
        return {key: (await client.get(key) if await client.type(key) == b"string" else None)
                for key in keys}
    finally:
        await client.aclose()


async def put_foreign_keys(url: str, cluster: bool) -> None:
    client = client_of(url, cluster)
    for key, value in FOREIGN.items():
        await client.set(key, value)
    await client.aclose()


def expected_blocks(workers: int, gaps: int = 0) -> int:
    """Blocks held: the even workers removed one spare chain in each gap so far."""
    chains = CHAINS - len(EVICTED) + len(SPARE)
    return (workers * chains - (workers + 1) // 2 * gaps) * CHAIN


async def trusted(service: IndexerService) -> bool:
    assert service.index is not None
    return not any([marker_is_rebuilding(await service.index.get_marker(marker_name(p)))
                    for p in range(PARTITIONS)])


async def exact(service: IndexerService, fleet: ChainFleet, workers: int,
                gaps: int = 0) -> None:
    index = service.index
    assert index is not None
    await eventually(lambda: caught_up(index, fleet.published, MODEL), 180)
    await eventually(lambda: trusted(service), 60)
    await eventually(lambda: is_true(not service.rebuilding), 60)
    assert await mismatches(index, fleet.published, MODEL) == (0, 0, 0)
    blocks = sum(sum(w.blocks_by_tier.values()) for w in await index.workers(MODEL))
    assert blocks == expected_blocks(workers, gaps)


class GapScores:
    """Score asked over and over for random workers' chains while the layout changes:
    every credited block must be one the rank holds (chains are each worker's own, the
    first EVICTED ones removed)."""

    def __init__(self, service: IndexerService, fleet: ChainFleet, workers: int) -> None:
        self.service, self.fleet, self.workers = service, fleet, workers
        self.asked = self.credited = self.rebuilding = 0
        self.false_hits: list[str] = []
        self._rng = random.Random(18)

    async def ask_once(self) -> None:
        index = self.service.index
        assert index is not None
        worker = self._rng.randrange(self.workers)
        chain = self._rng.randrange(CHAINS)
        holds = 0 if chain in EVICTED else CHAIN
        result = await index.score(ScoreQuery(model=MODEL, block_size=BS,
                                              token_ids=self.fleet.chain_tokens(worker, chain)))
        self.asked += 1
        self.rebuilding += self.service.rebuilding
        for score in result.scores:
            self.credited += score.matched_blocks
            allowed = holds if score.worker_id == f"w{worker}" else 0
            if score.matched_blocks > allowed:
                self.false_hits.append(f"{score.worker_id} credited {score.matched_blocks} "
                                       f"blocks of w{worker}'s chain {chain}")

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.ask_once()
            await asyncio.sleep(0.005)


@asynccontextmanager
async def scoring_through_the_gap(service: IndexerService, fleet: ChainFleet,
                                  workers: int) -> AsyncIterator[GapScores]:
    scores = GapScores(service, fleet, workers)
    stop = asyncio.Event()
    task = asyncio.create_task(scores.run(stop))
    try:
        yield scores
    finally:
        stop.set()
        await task
    assert scores.false_hits == [], scores.false_hits[:5]
    assert scores.asked > 0


async def refuses(service: IndexerService, subslots: int) -> None:
    """The indexer started on the new flag refuses, NOT_SERVING, naming the command."""
    assert service.index is not None and service.health is not None
    with pytest.raises(BackendError, match=f"migrate-layout .*--redis-subslots {subslots}"):
        await service.index.ping()
    await service.health.update()
    assert not service.health.serving
    assert any("migrate-layout" in reason for reason in service.health.reasons)


async def migrate_with_the_command(url: str, subslots: int,
                                   capsys: pytest.CaptureFixture[str]) -> str:
    status = await asyncio.to_thread(cli.main, ["migrate-layout", "--redis-url", url,
                                                "--redis-subslots", str(subslots)])
    out, err = capsys.readouterr()
    assert status == 0, err
    return out


class KilledError(Exception):
    pass


class StopAfterUnlinks:
    """A client that dies (raises) at its `left`-th UNLINK: a migration killed halfway."""

    def __init__(self, client: Any, left: int) -> None:
        self._client, self.left = client, left

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def unlink(self, *keys: Any) -> Any:
        self.left -= 1
        if self.left < 0:
            raise KilledError("killed halfway")
        return await self._client.unlink(*keys)


async def killed_halfway(url: str, cluster: bool, subslots: int,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A migration that deleted the markers and some of the model's keys, then died."""
    monkeypatch.setattr(layouts, "_UNLINK_BATCH", 4)
    client = client_of(url, cluster)
    try:
        with pytest.raises(KilledError):
            await layouts.migrate_layout(StopAfterUnlinks(client, 6), subslots, settle_s=1.5)
    finally:
        await client.aclose()
    monkeypatch.undo()


def config_for(nats_url: str, url: str, subslots: int) -> Any:
    return service_config(nats_url, redis_url=url, partitions=PARTITIONS,
                          liveness_grace_s=3600.0, redis_subslots=subslots,
                          snapshot_every_s=1.0)


@dataclass
class Rig:
    """Where the fleet publishes and the indexers index."""

    nats_url: str
    url: str
    cluster: bool
    fleet: ChainFleet
    workers: int
    gaps: int = 0  # layout changes so far
    figures: list[str] = field(default_factory=list)  # printed at the end (pytest -s)

    async def gap_traffic(self) -> None:
        """Engines keep working while the indexers refuse: the even workers remove a
        spare chain (the events wait in the stream); the odd ones stay silent, so only a
        rebuild brings them into the new layout."""
        chain = SPARE[self.gaps]
        self.fleet.remove(range(chain, chain + 1), workers=range(0, self.workers, 2))
        await self.fleet.flush()
        self.gaps += 1


async def stopped_while_refused(rig: Rig, subslots: int) -> None:
    """An indexer on the new flag stopped while its consumers wait on the refusal (a
    rolling restart): the fetch in hand is given up unacked, nothing dead-lettered."""
    async with running_service(config_for(rig.nats_url, rig.url, subslots)) as service:
        await refuses(service, subslots)
        await rig.gap_traffic()
        await eventually(lambda: is_true(service.stats.backend_retries > 0), 30)
    assert service.stats.dead_letters == {}
    assert service.stats.batches_applied == 0


async def move(rig: Rig, subslots: int, capsys: pytest.CaptureFixture[str],
               monkeypatch: pytest.MonkeyPatch | None = None) -> str:
    """Indexers restarted on `subslots` refuse; the command (killed halfway first when
    `monkeypatch` is given) moves the Redis; the index ends exact. Score never credits a
    block a rank does not hold meanwhile. Returns the command's output."""
    url, cluster, fleet, workers = rig.url, rig.cluster, rig.fleet, rig.workers
    async with running_service(config_for(rig.nats_url, url, subslots)) as service:
        async with scoring_through_the_gap(service, fleet, workers) as scores:
            await refuses(service, subslots)
            await rig.gap_traffic()
            if monkeypatch is not None:
                await killed_halfway(url, cluster, subslots, monkeypatch)
                await refuses(service, subslots)
                await asyncio.sleep(1.0)  # its consumers retry, Score keeps being asked
            out = await migrate_with_the_command(url, subslots, capsys)
            await exact(service, fleet, workers, rig.gaps)
            await service.index.ping()  # type: ignore[union-attr]
        rig.figures.append(f"-> {subslots}: {scores.asked} Scores in the gap, "
                           f"{scores.rebuilding} while rebuilding, {scores.credited} blocks "
                           f"credited, none false\n{out}")
    keys = await all_keys(url, cluster)
    assert {key: keys.get(key) for key in FOREIGN} == FOREIGN
    tags = (b"kvi:{m:", ) if subslots > 1 else (b"kvi:{s:",)
    left = sorted(key for key in keys if key.startswith(tags))
    # the old layout's id counters stay (ids are never given out twice)
    assert all(key.endswith(b"}:nextslot") for key in left), left[:5]
    return out


@asynccontextmanager
async def indexed_in_one_slot(nats_url: str, url: str, cluster: bool,
                              workers: int) -> AsyncIterator[Rig]:
    """A flushed Redis; the fleet indexed single-slot (a snapshot of each partition
    taken), then another application's keys written beside it; the fleet closed at the
    end."""
    await flush(url, cluster)
    fleet = ChainFleet(nats_url, MODEL, workers=workers, block_size=BS, chain=CHAIN, shared=0,
                       stream=StreamSettings(partitions=PARTITIONS, liveness_ttl_s=3.0))
    try:
        async with running_service(config_for(nats_url, url, 1)) as service:
            await fleet.start()
            fleet.store(range(SPARE.stop))
            fleet.remove(EVICTED)
            await fleet.flush()
            await exact(service, fleet, workers)
            await eventually(lambda: is_true(service.stats.snapshots >= PARTITIONS), 60)
        await put_foreign_keys(url, cluster)
        yield Rig(nats_url, url, cluster, fleet, workers)
    finally:
        await fleet.close()


async def test_one_slot_to_four_subslots_and_back(
        redis_server: RedisServer, nats_url: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    async with indexed_in_one_slot(nats_url, redis_server.url, False, 32) as rig:
        await stopped_while_refused(rig, 4)
        out = await move(rig, 4, capsys, monkeypatch)
        assert f"'{MODEL}': single-slot -> 4 sub-slots" in out
        again = await migrate_with_the_command(rig.url, 4, capsys)
        assert "nothing to move: 1 model(s) already in this layout" in again
        out = await move(rig, 1, capsys)
        assert f"'{MODEL}': 4 sub-slots -> single-slot" in out
        print("\n" + "\n".join(rig.figures))


@pytest.mark.redis_cluster
async def test_one_slot_to_three_subslots_and_back_on_a_cluster(
        redis_cluster: RedisCluster, nats_url: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    async with indexed_in_one_slot(nats_url, redis_cluster.url, True, 16) as rig:
        out = await move(rig, 3, capsys)
        assert f"'{MODEL}': single-slot -> 3 sub-slots" in out
        out = await move(rig, 1, capsys)
        assert f"'{MODEL}': 3 sub-slots -> single-slot" in out
        print("\n" + "\n".join(rig.figures))


async def test_an_indexer_stopping_while_refused_never_rebuilds(
        redis_server: RedisServer, nats_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An indexer stopped (its lease lost, the process ending) while its consumers wait on
    a refusal must not rebuild when the refusal ends without a marker: the partition's
    next owner may be applying into the index already, and the stopping consumer's
    rebuild would import an older snapshot over it (blocks evicted since: false hits)."""
    url = redis_server.url
    async with indexed_in_one_slot(nats_url, url, False, 8) as rig:
        # every wait on the refusal sleeps 4 s: the migration below lands inside one
        monkeypatch.setattr(consumer, "_RETRY_BACKOFF_S", (4.0,))
        async with running_service(config_for(nats_url, url, 4)) as service:
            await refuses(service, 4)
            await rig.gap_traffic()
            await eventually(lambda: is_true(service.stats.backend_retries >= PARTITIONS), 30)
            retried = service.stats.backend_retries
            await eventually(lambda: is_true(service.stats.backend_retries > retried), 30)
            client = aioredis.Redis.from_url(url)
            try:  # the markers and the single-slot model go: the refusal ends
                await layouts.migrate_layout(client, 4, settle_s=0.0)
            finally:
                await client.aclose()
            assert service.index is not None
            await service.index.ping()
            rebuilds = service.stats.rebuilds
        assert service.stats.rebuilds == rebuilds
        keys = await all_keys(url, cluster=False)
        assert not [key for key in keys if key.startswith(b"kvi:marker:partition.")]
        assert service.stats.dead_letters == {}
