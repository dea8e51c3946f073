"""Operations metrics: per-method gRPC requests / codes / latency (indexer/serve/grpc_metrics.py)
on a real grpc.aio server, build info and process metrics of the indexer and the bridge."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from indexer._proto.kvindex.v1 import indexer_pb2 as pb
from indexer._proto.kvindex.v1 import indexer_pb2_grpc as pb_grpc
from indexer.index.memory import MemoryIndex
from indexer.metrics import register_process_metrics
from indexer.serve.auth import GrpcSecurity
from indexer.serve.grpc_metrics import GrpcMetrics, method_label
from indexer.serve.service import start_grpc_server
from kvcore import __version__
from kvcore.keys import NATIVE
from publisher.metrics import BridgeHttpServer
from publisher.publisher import KVEventPublisher

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(registry: CollectorRegistry) -> Samples:
    """Every sample of a scrape, keyed by (name, sorted labels)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(generate_latest(registry).decode())
            for s in family.samples}


def requests(found: Samples, method: str, code: str) -> float:
    return found.get(("kv_indexer_grpc_requests_total",
                      (("code", code), ("method", method))), 0.0)


def handled(found: Samples, method: str) -> float:
    return found.get(("kv_indexer_grpc_request_seconds_count", (("method", method),)), 0.0)


@pytest.fixture
async def served() -> AsyncIterator[tuple[CollectorRegistry, grpc.aio.Channel]]:
    """An empty in-memory index served with metrics into a fresh registry."""
    registry = CollectorRegistry()
    server, port = await start_grpc_server(MemoryIndex(), "127.0.0.1:0", registry=registry)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield registry, channel
    await channel.close()
    await server.stop(0)


class TestGrpcMetrics:
    async def test_codes_and_latency_per_method(
            self, served: tuple[CollectorRegistry, grpc.aio.Channel]) -> None:
        """OK, INVALID_ARGUMENT and FAILED_PRECONDITION are counted per method; every call
        lands in its method's histogram; health checks count under their full name."""
        registry, channel = served
        stub = pb_grpc.KvIndexerStub(channel)
        for _ in range(3):
            await stub.Score(pb.ScoreRequest(model="m", block_keys=[1, 2]))  # no workers: OK
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await stub.Score(pb.ScoreRequest(model=""))
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as precondition:
            await stub.FindBestWorker(pb.FindBestWorkerRequest(
                score=pb.ScoreRequest(model="m", block_keys=[1])))
        assert precondition.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        await stub.GetStats(pb.GetStatsRequest())
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())

        found = samples(registry)
        assert requests(found, "Score", "OK") == 3
        assert requests(found, "Score", "INVALID_ARGUMENT") == 1
        assert requests(found, "FindBestWorker", "FAILED_PRECONDITION") == 1
        assert requests(found, "FindBestWorker", "OK") == 0
        assert requests(found, "GetStats", "OK") == 1
        assert requests(found, "grpc.health.v1.Health/Check", "OK") == 1
        assert handled(found, "Score") == 4
        assert handled(found, "FindBestWorker") == 1
        assert found[("kv_indexer_grpc_request_seconds_bucket",
                      (("le", "+Inf"), ("method", "Score")))] == 4

    async def test_streaming_rpcs_pass_unmeasured(
            self, served: tuple[CollectorRegistry, grpc.aio.Channel]) -> None:
        """Reflection (a bidirectional stream) still answers through the interceptor."""
        registry, channel = served
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            list_services="")]))
        services = [s.name async for answer in call
                    for s in answer.list_services_response.service]
        assert "kvindex.v1.KvIndexer" in services
        assert not any("Reflection" in value for _, labels in samples(registry)
                       for _, value in labels)

    async def test_refused_token_is_counted(self) -> None:
        """The interceptor runs before the bearer-token check: refusals are UNAUTHENTICATED."""
        registry = CollectorRegistry()
        server, port = await start_grpc_server(
            MemoryIndex(), "127.0.0.1:0", registry=registry,
            security=GrpcSecurity(tokens=(b"s3cret",)))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.KvIndexerStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Score(pb.ScoreRequest(model="m", block_keys=[1]))
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
                await stub.Score(pb.ScoreRequest(model="m", block_keys=[1]),
                                 metadata=(("authorization", "Bearer s3cret"),))
                # the same refusing handler answers another method: counted under that one
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.GetStats(pb.GetStatsRequest())
        finally:
            await server.stop(0)
        found = samples(registry)
        assert requests(found, "Score", "UNAUTHENTICATED") == 1
        assert requests(found, "Score", "OK") == 1
        assert requests(found, "GetStats", "UNAUTHENTICATED") == 1

    async def test_no_registry_no_interceptor(self) -> None:
        """Without a registry nothing is wrapped (and nothing registered anywhere)."""
        server, port = await start_grpc_server(MemoryIndex(), "127.0.0.1:0")
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await pb_grpc.KvIndexerStub(channel).GetStats(pb.GetStatsRequest())
        finally:
            await server.stop(0)


class _Context:
    """The parts of a ServicerContext the wrapper reads."""

    def __init__(self, code: Any = None, remaining: float | None = 1.0) -> None:
        self._code = code
        self._remaining = remaining

    def code(self) -> Any:
        return self._code

    def time_remaining(self) -> float | None:
        return self._remaining


class TestWrapper:
    """The measured handler's outcomes, without a server."""

    @staticmethod
    async def call(raises: BaseException | None, context: _Context) -> Samples:
        metrics = GrpcMetrics(registry := CollectorRegistry())

        async def behavior(request: Any, _context: Any) -> Any:
            if raises is not None:
                raise raises
            return request

        measured = metrics._measure(behavior, metrics.series("/kvindex.v1.KvIndexer/Score"))
        if raises is None:
            assert await measured("answer", context) == "answer"
        else:
            with pytest.raises(type(raises)):
                await measured("request", context)
        return samples(registry)

    @pytest.mark.parametrize(("raises", "context", "code"), [
        (None, _Context(), "OK"),
        (None, _Context(grpc.StatusCode.NOT_FOUND), "NOT_FOUND"),  # set_code, no raise
        (grpc.aio.AbortError(), _Context(grpc.StatusCode.UNAVAILABLE), "UNAVAILABLE"),
        (asyncio.CancelledError(), _Context(remaining=0.0), "DEADLINE_EXCEEDED"),
        (asyncio.CancelledError(), _Context(remaining=3.0), "CANCELLED"),
        (RuntimeError("boom"), _Context(), "UNKNOWN"),
    ])
    async def test_outcome_codes(self, raises: BaseException | None, context: _Context,
                                 code: str) -> None:
        found = await self.call(raises, context)
        assert requests(found, "Score", code) == 1
        assert handled(found, "Score") == 1

    def test_method_label(self) -> None:
        assert method_label("/kvindex.v1.KvIndexer/FindBestWorker") == "FindBestWorker"
        assert method_label("/grpc.health.v1.Health/Check") == "grpc.health.v1.Health/Check"

    async def test_handlers_wrapped_once(self) -> None:
        """The measured twin of a handler is made once and reused for every call."""
        metrics = GrpcMetrics(CollectorRegistry())

        async def behavior(request: Any, _context: Any) -> Any:
            return request

        handler = grpc.unary_unary_rpc_method_handler(behavior)

        async def continuation(_details: Any) -> Any:
            return handler

        class Details:
            method = "/kvindex.v1.KvIndexer/Score"
            invocation_metadata = ()

        first = await metrics.intercept_service(continuation, Details())
        assert first is not handler
        assert await metrics.intercept_service(continuation, Details()) is first


class TestBuildInfo:
    def test_indexer_build_info_and_process(self) -> None:
        registry = CollectorRegistry()
        register_process_metrics(registry)
        found = samples(registry)
        native = "true" if NATIVE else "false"
        assert found[("kv_indexer_build_info",
                      (("native", native), ("version", __version__)))] == 1
        names = {name for name, _ in found}
        assert {"process_cpu_seconds_total", "process_resident_memory_bytes",
                "process_open_fds", "python_info"} <= names

    def test_bridge_build_info_and_process(self) -> None:
        """The bridge's /metrics carries kv_publisher_build_info and process_* beside its
        kv_publisher_* series (a publisher that never connected)."""
        pub = KVEventPublisher("m", "w", block_size=4, nats_url="nats://127.0.0.1:1")
        status, _, body = BridgeHttpServer(pub).respond("GET", "/metrics")
        assert status == 200
        text = body.decode()
        assert f'kv_publisher_build_info{{native="{"true" if NATIVE else "false"}",' \
               f'version="{__version__}"}} 1.0' in text
        assert "process_resident_memory_bytes" in text
        assert 'kv_publisher_nats_connected{model="m",worker="w"} 0.0' in text
