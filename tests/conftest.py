from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from indexer.embedded import EmbeddedNats
from indexer.index.protocol import Index
from tests.support.grpc_scenario import make_index, scenario
from tests.support.redis_cluster import RedisCluster
from tests.support.servers import RedisServer, empty_jetstream, kvi_module


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One private redis-server for the session; tests flush it before use."""
    server = RedisServer(Path(tmp_path_factory.mktemp("redis"))).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def module_redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server with the Redis module loaded (`make redis-module`), for the
    session; tests flush it before use."""
    server = RedisServer(Path(tmp_path_factory.mktemp("redis-kvi")),
                         modules=(kvi_module(),)).start()
    yield server
    server.stop()


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=False)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own (for processes the test starts, or to kill)."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A private nats-server with JetStream in a temp dir; the test may kill and restart it.
    Tests that leave the server alone take `nats_url` instead."""
    server = EmbeddedNats(tmp_path / "nats").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def session_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    """One nats-server with JetStream for the session; tests reach it through `nats_url`."""
    server = EmbeddedNats(Path(tmp_path_factory.mktemp("nats"))).start()
    yield server
    server.stop()


@pytest.fixture
async def nats_url(session_nats: EmbeddedNats) -> AsyncIterator[str]:
    """The session nats-server's URL, its JetStream empty: every stream, KV bucket and
    object store is deleted before the test and again after it, so a test sees only what
    it made (the product's stream and bucket names are fixed: there is no per-test prefix).
    The server must stay up: a test that stops, kills or restarts NATS takes `nats_server`.
    Core NATS subjects are shared, but nothing outlives a test to listen on them."""
    assert session_nats.proc is not None and session_nats.proc.poll() is None, \
        "the session nats-server is down: did a test stop it instead of using nats_server?"
    await empty_jetstream(session_nats.url)
    yield session_nats.url
    await empty_jetstream(session_nats.url)


@pytest.fixture(params=["memory", "redis", "redis-subslots"])
async def index(request: pytest.FixtureRequest) -> AsyncIterator[Index]:
    """The gRPC scenario (tests/support/grpc_scenario.py), loaded into each backend in
    turn: the in-memory index, then the Redis index on the flushed session redis-server,
    in one hash slot per model and in 4 sub-slots (`--redis-subslots 4`)."""
    idx = await make_index(request.param, request)
    await idx.apply(scenario())
    yield idx
    await idx.close()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """One private Redis Cluster (3 masters, a replica each) for the session's tests that
    leave its nodes alone; tests flush it before use. Killers make their own."""
    cluster = RedisCluster(Path(tmp_path_factory.mktemp("redis-cluster"))).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    """A cluster of the test's own, to kill, stop and fail over nodes of."""
    cluster = RedisCluster(tmp_path / "cluster").start()
    yield cluster
    cluster.stop()
