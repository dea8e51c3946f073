"""A hybrid model end to end: vLLM 0.34's own events (recorded with its event structs,
tests/fixtures/engine_frames/make_frames.py) through the bridge's EngineSource and NATS
into an IndexerService on each backend, then a router's Score.

The issue's observation: six blocks stored in the full-attention and the sliding-window
group (window of 8 tokens: 2 blocks of 4), then the window group frees blocks 0..3. vLLM
still reuses all six for the 6-block prompt; before groups were indexed, Score said 0."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import zmq.asyncio

from indexer.app import IndexerService
from indexer.index.protocol import ScoreQuery
from kvcore.topology import StreamSettings
from publisher.publisher import KVEventPublisher
from publisher.zmq_source import EngineSource
from tests.support.event_path import service_config
from tests.support.polling import eventually
from tests.support.servers import RedisServer

pytestmark = pytest.mark.integration

FRAMES = Path(__file__).resolve().parent / "fixtures" / "engine_frames"
MODEL = "openai/gpt-oss-20b"
BS = 4
PROMPT = list(range(300, 324))  # make_frames.HYBRID_PROMPT: six blocks


def frames(name: str, seq: int) -> list[bytes]:
    return [b"kv-events", seq.to_bytes(8, "big"), (FRAMES / f"{name}.bin").read_bytes()]


@asynccontextmanager
async def bridged(nats_url: str, redis_url: str | None) -> AsyncIterator[
        tuple[IndexerService, EngineSource, KVEventPublisher]]:
    service = IndexerService(service_config(nats_url, redis_url=redis_url))
    await service.start()
    pub = KVEventPublisher(MODEL, "gpu-0", block_size=BS, nats_url=nats_url,
                           stream=StreamSettings(partitions=2))
    await pub.start()
    ctx = zmq.asyncio.Context()
    source = EngineSource(ctx, pub.ranks[0], "tcp://127.0.0.1:1", flavor="vllm")
    try:
        yield service, source, pub
    finally:
        await pub.close()
        ctx.term()
        await service.close()


async def hit(service: IndexerService, blocks: int) -> int:
    assert service.index is not None
    result = await service.index.score(ScoreQuery(model=MODEL, token_ids=PROMPT[: blocks * BS],
                                                  block_size=BS))
    return max((s.matched_blocks for s in result.scores), default=0)


async def applied(service: IndexerService, seq: int) -> bool:
    assert service.index is not None
    return any(w.last_seq == seq for w in await service.index.workers(MODEL))


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_window_group_eviction_keeps_what_vllm_reuses(
        nats_url: str, request: pytest.FixtureRequest, backend: str) -> None:
    redis_url = None
    if backend == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        await aioredis.Redis.from_url(server.url).flushall()
        redis_url = server.url
    async with bridged(nats_url, redis_url) as (service, source, pub):
        await source.on_frames(frames("vllm_0_34_hybrid", 0))
        await eventually(lambda: applied(service, 0))
        assert [await hit(service, n) for n in (6, 4)] == [6, 4]
        await source.on_frames(frames("vllm_0_34_hybrid_evict", 1))
        await eventually(lambda: applied(service, 1))
        assert source.stats.skipped_events == {}
        assert [await hit(service, n) for n in (6, 5, 4)] == [6, 0, 0]
        # A resync re-sends the bridge's mirror, group by group: the same answers after.
        mirror = pub.ranks[0].mirror
        assert len(mirror.groups[1]) == 2 and mirror.group_specs[1] == ("sliding_window", 8)
        pub.ranks[0].request_resync("test")
        await eventually(lambda: applied(service, 2))
        assert [await hit(service, n) for n in (6, 5, 4)] == [6, 0, 0]
