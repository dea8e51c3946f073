"""A flushed Redis for sub-slot index tests: one redis-server with 4 sub-slots, or the
3-master cluster with 3 (one per master), and `ShardedRedisIndex`es on it."""

from __future__ import annotations

import re
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as ClusterClient

from indexer.index.protocol import IndexConfig
from indexer.index.redis_sharded import ShardedRedisIndex
from tests.support.redis_cluster import RedisCluster
from tests.support.servers import RedisServer

__all__ = ["BACKEND_PARAMS", "Backend", "flushed_backend"]

# the params of a `backend` fixture calling `flushed_backend`
BACKEND_PARAMS = ["one-node", pytest.param("cluster", marks=pytest.mark.redis_cluster)]


class Backend:
    """A flushed Redis (one node or the cluster) and sub-slot indexes on it."""

    def __init__(self, url: str, subslots: int, cluster: bool) -> None:
        self.url, self.subslots, self.cluster = url, subslots, cluster

    def index(self, config: IndexConfig | None = None) -> ShardedRedisIndex:
        return ShardedRedisIndex.from_url(self.url, subslots=self.subslots,
                                          cluster=self.cluster, config=config)

    def client(self) -> Any:
        if self.cluster:
            return ClusterClient.from_url(self.url)
        return aioredis.Redis.from_url(self.url)

    async def flush(self) -> None:
        client = self.client()
        if self.cluster:
            await client.flushall(target_nodes=ClusterClient.PRIMARIES)
        else:
            await client.flushall()
        await client.aclose()

    async def keys(self) -> list[bytes]:
        client = self.client()
        try:
            if self.cluster:
                found = await client.keys("*", target_nodes=ClusterClient.PRIMARIES)
            else:
                found = await client.keys("*")
            return sorted(found)
        finally:
            await client.aclose()

    async def entries_of(self, slot: int) -> int:
        """Holder entries of slot id `slot` in every sub-slot hash, of every KV-cache group
        (a test-only scan)."""
        client = self.client()
        count = 0
        try:
            for key in await self.keys():
                if not re.search(rb":blk\d*$", key):
                    continue
                for value in (await client.hgetall(key)).values():
                    for i in range(0, len(value), 4):
                        count += int.from_bytes(value[i : i + 4], "little") >> 4 == slot
        finally:
            await client.aclose()
        return count


async def flushed_backend(request: pytest.FixtureRequest) -> Backend:
    """The Backend of `request.param` (BACKEND_PARAMS), its Redis flushed."""
    if request.param == "cluster":
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        found = Backend(cluster.url, 3, cluster=True)
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        found = Backend(server.url, 4, cluster=False)
    await found.flush()
    return found
