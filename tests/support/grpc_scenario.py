"""The gRPC suites' scenario and server: a few workers' batches over one prompt of the
prompt tree, each backend loaded with them, and a real grpc.aio server for an index.

The scenario (BLOCK = 4 tokens per block, prompt = 4 blocks):

    w-a rank 0   the whole prompt on GPU          matched 4
    w-c rank 0   its first 3 blocks on CPU        matched 3
    w-b rank 0   its first 2 blocks on GPU        matched 2
    w-b rank 1   another prefix                   matched 0

Shared by tests/test_service.py, tests/test_client_cli.py and tests/test_grpcload.py; the
`index` fixture in tests/conftest.py loads it into each backend in turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from indexer._proto.kvindex.v1 import indexer_pb2_grpc as pb_grpc
from indexer.index.memory import MemoryIndex
from indexer.index.protocol import Index, IndexConfig, ScoreQuery, ScoreResult
from indexer.index.redis import RedisIndex
from indexer.index.redis_sharded import ShardedRedisIndex
from indexer.serve.service import ServiceSettings, start_grpc_server
from kvcore.bus import SCHEMA_VERSION, Event, EventBatch
from tests.support.prompt_tree import BLOCK, MODEL, make_event, path_tokens
from tests.support.servers import RedisServer

PROMPT = (0, 0, 0, 0)
TOKENS = path_tokens(PROMPT)
CONFIG = IndexConfig(max_query_tokens=4096, min_block_size=BLOCK)
AGE = 5.0  # seconds: the scenario's events were published this long ago
NO_CACHE = ServiceSettings(worker_cache_seconds=0)


def batch(worker: str, rank: int, seq: int, events: list[Event], *, model: str = MODEL,
          ts: float | None = None) -> EventBatch:
    return EventBatch(schema=SCHEMA_VERSION, model=model, worker_id=worker, dp_rank=rank,
                      epoch=1, seq=seq, events=events,
                      ts=time.time() - AGE if ts is None else ts)


def store(path: tuple[int, ...], medium: str = "gpu") -> Event:
    return make_event("store", (path, 0, medium, None), 1)


def scenario() -> list[EventBatch]:
    return [
        batch("w-a", 0, 0, [store(PROMPT)]),
        batch("w-b", 0, 0, [store((0, 0))]),
        batch("w-b", 1, 0, [store((1,))]),
        batch("w-c", 0, 0, [store((0, 0, 0), "cpu")]),
    ]


async def make_index(kind: str, request: pytest.FixtureRequest) -> Index:
    """An empty index of `kind` ("memory"; "redis", or "redis-subslots" with 4 sub-slots,
    on the flushed session redis-server)."""
    if kind == "memory":
        return MemoryIndex(CONFIG)
    server: RedisServer = request.getfixturevalue("redis_server")
    admin = aioredis.Redis.from_url(server.url)
    await admin.flushall()
    await admin.aclose()
    if kind == "redis-subslots":
        return ShardedRedisIndex.from_url(server.url, subslots=4, config=CONFIG)
    return RedisIndex.from_url(server.url, config=CONFIG)


@contextlib.asynccontextmanager
async def serving(
    index: Any, settings: ServiceSettings = NO_CACHE, listen: str = "127.0.0.1:0",
    **hooks: Any,
) -> AsyncIterator[tuple[pb_grpc.KvIndexerStub, int]]:
    """A real server for `index` and a stub on an aio channel to it."""
    server, port = await start_grpc_server(index, listen, settings=settings, **hooks)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield pb_grpc.KvIndexerStub(channel), port
    finally:
        await channel.close()
        await server.stop(None)


class SlowScores:
    """A real index whose score() first waits `delay` seconds (to let deadlines pass)."""

    def __init__(self, inner: Index, delay: float) -> None:
        self.inner = inner
        self.delay = delay
        self.cancelled = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def score(self, query: ScoreQuery) -> ScoreResult:
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return await self.inner.score(query)
