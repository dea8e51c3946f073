"""`--grpc-processes`: reader processes serve gRPC on the consumer's address from Redis."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection

import grpc
import msgspec
import pytest

from indexer.app import IndexerService
from indexer.client import AsyncIndexerClient, Query, ScoreAnswer
from indexer.config import ServiceConfig, parse_service_config
from indexer.errors import ConfigError
from indexer.serve.readers import ReaderPool
from tests.support.event_path import BS, MODEL, TOKENS, publisher, service_config
from tests.support.polling import eventually, is_true
from tests.support.processes import exited
from tests.support.servers import RedisServer

pytestmark = pytest.mark.integration

QUERY = Query(model=MODEL, token_ids=TOKENS, block_size=BS)


@pytest.fixture
async def service(nats_url: str,
                  private_redis: RedisServer) -> AsyncIterator[IndexerService]:
    svc = IndexerService(service_config(nats_url, redis_url=private_redis.url,
                                        grpc_listen="127.0.0.1:0", grpc_processes=3))
    await svc.start()
    yield svc
    await svc.close()


async def score_on_new_connection(port: int, query: Query = QUERY) -> ScoreAnswer | None:
    """A Score over a connection of its own (no shared subchannel); None if refused."""
    client = AsyncIndexerClient(f"127.0.0.1:{port}", timeout=2.0,
                                options=[("grpc.use_local_subchannel_pool", 1)])
    try:
        return await client.score(query)
    except Exception:  # noqa: BLE001 - not serving (yet)
        return None
    finally:
        await client.close()


def matched(answer: ScoreAnswer | None) -> dict[str, int]:
    return {} if answer is None else {s.worker_id: s.matched_blocks for s in answer.scores}


class TestReaders:
    async def test_readers_answer_alone_from_redis(self, service: IndexerService,
                                                   nats_url: str) -> None:
        """With the consumer process's own server stopped, new connections still get
        the right scores, freshness and worker list: the readers serve them, with the
        workers' prefill/decode roles from their own liveness watchers."""
        assert service.readers is not None
        await eventually(lambda: is_true(len(service.readers.pids) == 2))  # type: ignore[union-attr]
        async with publisher(nats_url, "w1") as one, \
                publisher(nats_url, "w2", role="decode") as two:
            one.stored(list(range(1, 9)), TOKENS, parent_hash=None)
            two.stored(list(range(1, 4)), TOKENS[: 3 * BS], parent_hash=None)
            assert await one.flush() and await two.flush()

            async def indexed() -> bool:
                answer = await score_on_new_connection(service.grpc_port)
                return matched(answer) == {"w1": 8, "w2": 3}

            await eventually(indexed, timeout=20)
            await eventually(lambda: is_true(not service.rebuilding))
            await service._server.stop(0)  # type: ignore[union-attr]

            async def readers_answer() -> bool:
                answers = await asyncio.gather(*(score_on_new_connection(service.grpc_port)
                                                 for _ in range(8)))
                return all(matched(a) == {"w1": 8, "w2": 3} and not a.freshness.rebuilding
                           for a in answers if a is not None) and any(answers)

            await eventually(readers_answer, timeout=20)
            prefill = msgspec.structs.replace(QUERY, role="prefill")

            async def readers_filter_roles() -> bool:
                answers = await asyncio.gather(*(score_on_new_connection(
                    service.grpc_port, prefill) for _ in range(8)))
                return all(matched(a) == {"w1": 8} for a in answers) and any(answers)

            await eventually(readers_filter_roles, timeout=20)
            client = AsyncIndexerClient(f"127.0.0.1:{service.grpc_port}", timeout=2.0)
            try:
                workers = await client.list_workers(MODEL)
                decode = await client.list_workers(MODEL, role="decode")

                async def reader_diagnoses() -> bool:
                    """Nothing wrong, and it says it has no view of the event path (once
                    its registry view has settled, a liveness TTL after its start)."""
                    diagnosis = await client.diagnose(MODEL)
                    return (diagnosis.findings == [] and len(diagnosis.limitations) == 1
                            and "event path" in diagnosis.limitations[0])

                await eventually(reader_diagnoses, timeout=20)
            finally:
                await client.close()
            assert sorted((w.worker_id, w.role) for w in workers) == [
                ("w1", "both"), ("w2", "decode")]
            assert [w.worker_id for w in decode] == ["w1", "w2"]

    async def test_a_dead_reader_is_started_again(self, service: IndexerService) -> None:
        assert service.readers is not None
        readers = service.readers
        await eventually(lambda: is_true(len(readers.pids) == 2), timeout=20)
        victim = readers.pids[0]
        os.kill(victim, signal.SIGKILL)
        await eventually(lambda: is_true(len(readers.pids) == 2 and victim not in readers.pids),
                         timeout=20)
        assert readers.restarts == 1

    async def test_close_stops_the_readers(self, nats_url: str,
                                           private_redis: RedisServer) -> None:
        svc = IndexerService(service_config(nats_url, redis_url=private_redis.url,
                                            grpc_listen="127.0.0.1:0", grpc_processes=2))
        await svc.start()
        assert svc.readers is not None
        await eventually(lambda: is_true(len(svc.readers.pids) == 1))  # type: ignore[union-attr]
        [pid] = svc.readers.pids
        await svc.close()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        with grpc.insecure_channel(f"127.0.0.1:{svc.grpc_port}") as channel, \
                pytest.raises(grpc.FutureTimeoutError):
            grpc.channel_ready_future(channel).result(timeout=0.5)


class TestConfig:
    def test_readers_need_redis_and_a_listen_address(self) -> None:
        with pytest.raises(ConfigError, match="needs --redis-url"):
            parse_service_config(["--grpc-processes", "2"], environ={})
        with pytest.raises(ConfigError, match="needs --grpc-listen"):
            parse_service_config(["--grpc-processes", "2", "--redis-url", "redis://x",
                                  "--grpc-listen", ""], environ={})
        with pytest.raises(ConfigError, match=">= 1"):
            parse_service_config(["--grpc-processes", "0"], environ={})
        config = parse_service_config([], environ={"KV_INDEXER_GRPC_PROCESSES": "4",
                                                   "KV_INDEXER_REDIS_URL": "redis://x"})
        assert config.grpc_processes == 4


def _pool_parent(config: ServiceConfig, listen: str, conn: Connection) -> None:
    """A stand-in consumer process: starts one reader, reports its pid, then idles."""
    pool = ReaderPool(config, listen, 1)
    pool.start()
    conn.send(pool.pids)
    time.sleep(3600)


async def test_a_reader_stops_when_its_consumer_process_dies(
        nats_url: str, private_redis: RedisServer) -> None:
    """SIGKILL of the process that started the readers (no clean shutdown): they exit
    instead of serving a port nobody ingests for."""
    config = service_config(nats_url, redis_url=private_redis.url,
                            grpc_listen="127.0.0.1:0", grpc_processes=2)
    ctx = mp.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    parent = ctx.Process(target=_pool_parent, args=(config, f"127.0.0.1:{port}", child_conn))
    parent.start()
    child_conn.close()
    try:
        assert parent_conn.poll(30)
        [reader] = parent_conn.recv()
        await eventually(lambda: is_true(serving(port)), timeout=30)  # serving
        os.kill(parent.pid, signal.SIGKILL)  # type: ignore[arg-type]
        parent.join(5)
        await eventually(lambda: is_true(exited(reader)), timeout=15)
    finally:
        if parent.is_alive():
            parent.kill()


def serving(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=0.5)
        except grpc.FutureTimeoutError:
            return False
    return True


def free_port_pair() -> int:
    """A port P with P + 1 free too (the service's metrics port and reader 0's)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no two adjacent free ports")


async def test_a_reader_exports_its_score_latency(nats_url: str,
                                                  private_redis: RedisServer) -> None:
    """Reader processes build their index with the same factory as the consumer process:
    Scores they answer are timed, on the service's metrics port + 1 + reader number, and
    counted per gRPC method beside the reader's build info and process metrics."""
    import urllib.request

    port = free_port_pair()
    svc = IndexerService(service_config(nats_url, redis_url=private_redis.url,
                                        grpc_listen="127.0.0.1:0", grpc_processes=2,
                                        metrics_listen=f"127.0.0.1:{port}"))
    await svc.start()
    try:
        assert svc.readers is not None
        await eventually(lambda: is_true(len(svc.readers.pids) == 1))  # type: ignore[union-attr]
        async with publisher(nats_url, "w1") as one:  # a candidate, so Score runs
            one.stored(list(range(1, 9)), TOKENS, parent_hash=None)
            assert await one.flush()

            async def indexed() -> bool:
                return matched(await score_on_new_connection(svc.grpc_port)) == {"w1": 8}

            await eventually(indexed, timeout=20)
            await svc._server.stop(0)  # type: ignore[union-attr]  # only the reader answers

            def reader_scrape() -> str:
                url = f"http://127.0.0.1:{port + 1}/metrics"
                with urllib.request.urlopen(url, timeout=2) as reply:
                    return str(reply.read().decode())

            def reader_score_count(prefix: str = "kv_indexer_score_seconds_count") -> float:
                return sum(float(line.rsplit(" ", 1)[1])
                           for line in reader_scrape().splitlines() if line.startswith(prefix))

            async def reader_timed_a_score() -> bool:
                await score_on_new_connection(svc.grpc_port)
                try:
                    return await asyncio.to_thread(reader_score_count) > 0
                except OSError:
                    return False

            await eventually(reader_timed_a_score, timeout=20)
            assert await asyncio.to_thread(
                reader_score_count,
                'kv_indexer_grpc_requests_total{code="OK",method="Score"}') > 0
            assert await asyncio.to_thread(
                reader_score_count, 'kv_indexer_grpc_request_seconds_count{method="Score"}') > 0
            text = await asyncio.to_thread(reader_scrape)
            assert "kv_indexer_build_info{" in text and "process_open_fds " in text
    finally:
        await svc.close()
