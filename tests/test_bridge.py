"""The bridge against mock vLLM engines speaking the real ZMQ wire: every wire form, gaps
filled by replay, gaps replay cannot fill, engine restarts, and the bridge restarted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import zmq.asyncio

from indexer.app import IndexerService
from indexer.index.protocol import ScoreQuery
from kvcore.topology import StreamSettings
from kvsim.mock_engines import MockEngine
from publisher.publisher import KVEventPublisher
from publisher.zmq_source import EngineSource
from tests.support.event_path import service_config
from tests.support.polling import eventually, is_true
from tests.support.prompts import prompts

pytestmark = pytest.mark.integration

MODEL = "mock/model"
BS = 16
WORKER = "engine-0"


def engine_matched(engine: MockEngine, tokens: list[int]) -> int:
    """Leading full blocks of `tokens` the engine holds (any tier)."""
    held = set(engine.pool.gpu) | set(engine.pool.cpu)  # the pool's own (raw) hashes
    count = 0
    for h in engine.pool.block_hashes(tokens):
        if h not in held:
            break
        count += 1
    return count


async def index_matched(service: IndexerService, tokens: list[int]) -> int:
    assert service.index is not None
    result = await service.index.score(ScoreQuery(model=MODEL, token_ids=tokens, block_size=BS))
    return next((s.matched_blocks for s in result.scores if s.worker_id == WORKER), 0)


async def agrees(service: IndexerService, engine: MockEngine, queries: list[list[int]]) -> bool:
    for tokens in queries:
        if await index_matched(service, tokens) != engine_matched(engine, tokens):
            return False
    return True


@asynccontextmanager
async def bridge(nats_url: str, engine: MockEngine) -> AsyncIterator[EngineSource]:
    """A bridge process in miniature: KVEventPublisher + EngineSource for rank 0."""
    pub = KVEventPublisher(MODEL, WORKER, block_size=BS, nats_url=nats_url,
                           stream=StreamSettings(partitions=2))
    await pub.start()
    ctx = zmq.asyncio.Context()
    source = EngineSource(ctx, pub.ranks[0], engine.endpoint,
                          replay_endpoint=engine.replay_endpoint, replay_timeout_s=1.0)
    stop = asyncio.Event()
    task = asyncio.create_task(source.run(stop))
    await asyncio.sleep(0.2)  # let SUB connect (PUB drops until then; replay covers it)
    try:
        yield source
    finally:
        stop.set()
        await task
        await pub.close()
        ctx.term()


@asynccontextmanager
async def setup(nats_url: str, **engine_kwargs: Any) -> AsyncIterator[
        tuple[IndexerService, MockEngine]]:
    service = IndexerService(service_config(nats_url))
    await service.start()
    engine = MockEngine(capacity_blocks=engine_kwargs.pop("capacity_blocks", 24),
                        block_size=BS, endpoint="tcp://127.0.0.1:*",
                        replay_endpoint="tcp://127.0.0.1:*", **engine_kwargs).start()
    try:
        yield service, engine
    finally:
        engine.close()
        await service.close()


class TestWireForms:
    """Every wire form the field sends ends up as the same index."""

    @pytest.mark.parametrize(("wire", "hash_form"), [("map", "u64"), ("positional", "u64"),
                                                     ("positional", "signed"), ("map", "bytes")])
    async def test_index_follows_engine(self, nats_url: str, wire: str,
                                        hash_form: str) -> None:
        """After serving prompts (with LRU evictions), the index matches the engine's pool."""
        async with setup(nats_url, wire=wire, hash_form=hash_form) as (service, engine), \
                bridge(nats_url, engine) as source:
            queries = prompts(30)
            for tokens in queries:
                engine.serve(tokens)
            await eventually(lambda: agrees(service, engine, queries), timeout=10)
            assert engine.stats.removed_blocks > 0  # the LRU pool evicted along the way
            assert sum(engine_matched(engine, tokens) for tokens in queries) > 0
            assert source.stats.gaps_unfilled == 0


class TestGaps:
    """Lost engine messages: refilled from the replay buffer, or cleared when they can't be."""

    async def test_gap_filled_by_replay(self, nats_url: str) -> None:
        """Dropped live batches come back through the replay socket."""
        async with setup(nats_url) as (service, engine), \
                bridge(nats_url, engine) as source:
            queries = prompts(12)
            for i, tokens in enumerate(queries):
                if i == 4:
                    engine.drop_next(3)
                engine.serve(tokens)
            await eventually(lambda: agrees(service, engine, queries))
            assert source.stats.gaps_filled >= 1
            assert source.stats.gaps_unfilled == 0

    async def test_gap_replay_cannot_fill(self, nats_url: str) -> None:
        """A gap beyond the replay buffer clears the worker: fewer hits, never wrong ones."""
        async with setup(nats_url, buffer_steps=2) as (service, engine), \
                bridge(nats_url, engine) as source:
            queries = prompts(12)
            for tokens in queries[:4]:
                engine.serve(tokens)
            await eventually(lambda: agrees(service, engine, queries[:4]))
            engine.drop_next(5)
            for tokens in queries[4:]:
                engine.serve(tokens)
            await eventually(lambda: is_true(source.stats.gaps_unfilled == 1))
            await asyncio.sleep(0.3)
            for tokens in queries:
                assert await index_matched(service, tokens) <= engine_matched(engine, tokens)


class TestRestarts:
    """Engine and bridge restarts."""

    async def test_engine_restart(self, nats_url: str) -> None:
        """seq back to 0: a new epoch; the old blocks are forgotten."""
        async with setup(nats_url) as (service, engine), \
                bridge(nats_url, engine) as source:
            queries = prompts(10)
            for tokens in queries[:5]:
                engine.serve(tokens)
            await eventually(lambda: agrees(service, engine, queries))
            engine.restart()
            for tokens in queries[5:]:
                engine.serve(tokens)
            await eventually(lambda: agrees(service, engine, queries))
            assert source.stats.engine_restarts == 1

    async def test_bridge_restart(self, nats_url: str) -> None:
        """Events published while no bridge ran are recovered by the next one from replay."""
        async with setup(nats_url) as (service, engine):
            queries = prompts(12)
            async with bridge(nats_url, engine):
                for tokens in queries[:4]:
                    engine.serve(tokens)
                await eventually(lambda: agrees(service, engine, queries[:4]))
            for tokens in queries[4:8]:
                engine.serve(tokens)  # nobody listening
            async with bridge(nats_url, engine) as source:
                for tokens in queries[8:]:
                    engine.serve(tokens)
                await eventually(lambda: agrees(service, engine, queries))
                assert source.stats.gaps_filled == 1

