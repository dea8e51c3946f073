"""Faults at production sizes, end to end with real servers: a NATS outage of tens of
seconds under a fleet holding ~90,000 blocks, Redis going away, ingest stalling. Each case
ends with the index equal to the reference model block by block, and gRPC health told the
truth while things were broken."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from indexer.app import IndexerService
from indexer.config import ServiceConfig
from indexer.embedded import EmbeddedNats
from kvcore.bus import EventBatch
from kvcore.topology import StreamSettings
from publisher.publisher import KVEventPublisher
from tests.support.capture import CapturingSink, caught_up, mismatches
from tests.support.polling import eventually
from tests.support.servers import RedisServer, free_port

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

MODEL = "field/model"
WORKERS = 8
PARTITIONS = 4
BS = 16
CHAIN = 50  # blocks per stored chain: one bus batch
SHARED_CHAINS = 10  # chains every worker holds with the same tokens (a common system prompt)
OUTAGE_S = 15.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def chain_tokens(worker: int, chain: int) -> list[int]:
    owner = 0 if chain < SHARED_CHAINS else worker + 1
    start = (owner * 1000 + chain) * CHAIN * BS
    return list(range(start, start + CHAIN * BS))


def chain_hashes(worker: int, chain: int) -> list[int]:
    return [(worker << 40) | (chain << 16) | i for i in range(CHAIN)]


class Fleet:
    """WORKERS library publishers storing and removing whole chains, every batch recorded."""

    def __init__(self, nats_url: str) -> None:
        self.pubs = [KVEventPublisher(MODEL, f"w{w}", block_size=BS, nats_url=nats_url,
                                      stream=StreamSettings(partitions=PARTITIONS,
                                                            liveness_ttl_s=3.0),
                                      max_pending=100_000)
                     for w in range(WORKERS)]
        self.published: list[EventBatch] = []

    async def start(self) -> None:
        for pub in self.pubs:
            await pub.start()
            CapturingSink(pub, self.published)

    def store(self, chains: range) -> None:
        for w, pub in enumerate(self.pubs):
            for chain in chains:
                pub.stored(chain_hashes(w, chain), chain_tokens(w, chain))
                pub.end_step()

    def remove(self, chains: range, workers: range = range(WORKERS)) -> None:
        for w in workers:
            for chain in chains:
                self.pubs[w].removed(chain_hashes(w, chain))
                self.pubs[w].end_step()

    async def flush(self, timeout: float = 90.0) -> None:
        for pub in self.pubs:
            assert await pub.flush(timeout)

    async def close(self) -> None:
        for pub in self.pubs:
            await pub.close()


async def health(port: int) -> int:
    """The status gRPC health answers for the whole server ("")."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=2.0)
        return int(reply.status)


async def health_is(port: int, status: int) -> bool:
    try:
        return await health(port) == status
    except grpc.aio.AioRpcError:
        return False


@asynccontextmanager
async def indexer(nats_url: str, redis_url: str | None,
                  **overrides: object) -> AsyncIterator[IndexerService]:
    values: dict[str, object] = {
        "nats_url": nats_url, "redis_url": redis_url, "grpc_listen": "127.0.0.1:0",
        "metrics_listen": "", "partitions": PARTITIONS, "liveness_ttl_s": 3.0,
        "liveness_grace_s": 3600.0}
    values.update(overrides)
    service = IndexerService(ServiceConfig(**values))  # type: ignore[arg-type]
    await service.start()
    try:
        yield service
    finally:
        await service.close()


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_a_long_nats_outage_ends_exact(backend: str, tmp_path: Path) -> None:
    """NATS SIGKILLed for 15 s while 8 workers holding ~10,000 blocks each keep storing
    and removing: health says NOT_SERVING during the outage, ingest resumes when NATS is
    back (the lease loop survives with Redis), and the index ends equal to the reference
    with 0 phantom and 0 missing blocks."""
    nats_server = EmbeddedNats(tmp_path / "nats", port=free_port()).start()
    redis_server = RedisServer(tmp_path / "redis").start() if backend == "redis" else None
    fleet = Fleet(nats_server.url)
    try:
        async with indexer(nats_server.url, redis_server and redis_server.url) as service:
            assert service.index is not None
            await fleet.start()
            fleet.store(range(200))
            fleet.remove(range(150, 170))
            await fleet.flush()
            await eventually(lambda: caught_up(service.index, fleet.published, MODEL), 120)
            assert await health(service.grpc_port) == SERVING

            nats_server.kill()
            down_at = time.monotonic()
            fleet.store(range(200, 260))  # buffered by the publishers meanwhile
            fleet.remove(range(5), workers=range(0, WORKERS, 2))
            await eventually(lambda: health_is(service.grpc_port, NOT_SERVING), OUTAGE_S)
            await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))
            nats_server.start()
            back_at = time.monotonic()
            await fleet.flush()
            await eventually(lambda: caught_up(service.index, fleet.published, MODEL), 120)
            caught_up_s = time.monotonic() - back_at
            await eventually(lambda: health_is(service.grpc_port, SERVING), 30)
            phantom, missing, differing = await mismatches(service.index, fleet.published,
                                                           MODEL)
            blocks = sum(sum(w.blocks_by_tier.values())
                         for w in await service.index.workers(MODEL))
            print(f"\nnats outage ({backend}): {OUTAGE_S:.0f} s down, "
                  f"{len(fleet.published)} batches, {blocks} (block, worker) entries, "
                  f"caught up {caught_up_s:.1f} s after NATS returned, "
                  f"phantom={phantom} missing={missing} differing={differing}")
            assert blocks > 80_000
            assert (phantom, missing, differing) == (0, 0, 0)
            if service.leases is not None:
                assert service.leases.held  # taken again after the outage
    finally:
        await fleet.close()
        if redis_server is not None:
            redis_server.stop()
        nats_server.stop()


async def test_health_follows_the_redis_backend(nats_url: str, tmp_path: Path) -> None:
    """Redis gone: NOT_SERVING (every query would fail); back: SERVING again."""
    redis_server = RedisServer(tmp_path / "redis").start()
    try:
        async with indexer(nats_url, redis_server.url) as service:
            await eventually(lambda: health_is(service.grpc_port, SERVING), 20)
            redis_server.kill()
            await eventually(lambda: health_is(service.grpc_port, NOT_SERVING), 20)
            assert service.probes is not None and not service.probes.backend_up
            redis_server.start()
            await eventually(lambda: health_is(service.grpc_port, SERVING), 30)
    finally:
        redis_server.stop()


async def test_health_says_when_ingest_stalls(nats_url: str, tmp_path: Path) -> None:
    """Writes paused in Redis (CLIENT PAUSE WRITE) while batches wait in the stream: after
    --ingest-stall seconds without progress health says NOT_SERVING and names the
    partition; once writes resume the batches are applied and health is SERVING again."""
    redis_server = RedisServer(tmp_path / "redis").start()
    fleet = Fleet(nats_url)
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        async with indexer(nats_url, redis_server.url, ingest_stall_s=2.0) as service:
            assert service.index is not None
            await fleet.start()
            fleet.store(range(2))
            await fleet.flush()
            await eventually(lambda: caught_up(service.index, fleet.published, MODEL), 60)
            await eventually(lambda: health_is(service.grpc_port, SERVING), 20)
            await client.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")
            fleet.store(range(2, 40))
            await fleet.flush()
            await eventually(lambda: health_is(service.grpc_port, NOT_SERVING), 9)
            assert service.health is not None
            assert any("ingest stalled" in r for r in service.health.reasons)
            await client.execute_command("CLIENT", "UNPAUSE")
            await eventually(lambda: caught_up(service.index, fleet.published, MODEL), 60)
            await eventually(lambda: health_is(service.grpc_port, SERVING), 20)
            assert await mismatches(service.index, fleet.published, MODEL) == (0, 0, 0)
    finally:
        await client.aclose()
        await fleet.close()
        redis_server.stop()
