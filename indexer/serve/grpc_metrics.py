"""Per-method gRPC metrics of a server: requests by status code, latency histograms.

`GrpcMetrics` is a grpc.aio server interceptor (installed first by `start_grpc_server`
when the process has a metrics registry, so it also sees what the bearer-token check
refuses). It wraps each unary-unary handler once (cached per method and handler) and keeps
the label children of every method pre-resolved, so a call costs two `perf_counter`
reads, one histogram observe and one counter increment (measured in the README).

    kv_indexer_grpc_requests_total{method, code}    counter
    kv_indexer_grpc_request_seconds{method}          histogram (handler time, server side)

`method` is the RPC name for `kvindex.v1.KvIndexer` (`Score`, `FindBestWorker`,
`ScoreBatch`, `ListWorkers`, `GetStats`, `Diagnose`, `FindBestWorkerStream`) and
`Service/Method` for the others (`grpc.health.v1.Health/Check`). `code` is the status name
(`OK`, `INVALID_ARGUMENT`, `UNAVAILABLE`, ...).

FindBestWorkerStream is counted per answer, by the status each answer carries (one
decision, one count), and once more when the stream itself ends in an error (cancelled,
a message over the size limit); its answers are not timed (a stream has no per-message
handler time). Other streaming RPCs (reflection, health Watch) pass unmeasured.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

__all__ = ["GRPC_BUCKETS_S", "GrpcMetrics", "method_label"]

GRPC_BUCKETS_S: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                         0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_KV_INDEXER_PREFIX: Final = "/kvindex.v1.KvIndexer/"

Handler = Any  # grpc.RpcMethodHandler (grpc ships no type stubs)
Behavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
# An async generator, or a coroutine that aborts (the bearer-token check's refusal).
StreamBehavior = Callable[[Any, grpc.aio.ServicerContext], Any]
# Streaming RPCs whose answers carry a `code` each, counted one by one.
_COUNTED_STREAMS: Final = frozenset({_KV_INDEXER_PREFIX + "FindBestWorkerStream"})


def method_label(method: str) -> str:
    """`/kvindex.v1.KvIndexer/Score` -> `Score`; `/pkg.Service/Method` -> `pkg.Service/Method`."""
    if method.startswith(_KV_INDEXER_PREFIX):
        return method[len(_KV_INDEXER_PREFIX):]
    return method.lstrip("/")


def _code_of(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The code a handler left on its context (set_code or abort); OK when none."""
    code = context.code()
    if code is None:
        return grpc.StatusCode.OK
    if isinstance(code, grpc.StatusCode):
        return code
    for status in grpc.StatusCode:  # some grpc versions keep the integer
        if status.value[0] == code:
            return status
    return grpc.StatusCode.UNKNOWN


class _MethodSeries:
    """The pre-resolved label children of one method."""

    __slots__ = ("_by_code", "_method", "_requests", "ok", "seconds")

    def __init__(self, method: str, requests: Counter, seconds: Histogram) -> None:
        self._method = method
        self._requests = requests
        self.seconds = seconds.labels(method)
        self.ok = requests.labels(method, "OK")
        self._by_code: dict[grpc.StatusCode, Counter] = {grpc.StatusCode.OK: self.ok}

    def count(self, code: grpc.StatusCode) -> None:
        child = self._by_code.get(code)
        if child is None:
            child = self._by_code[code] = self._requests.labels(self._method, code.name)
        child.inc()


class GrpcMetrics(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc has no stubs
    """Counts and times every unary-unary call of a server into `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "kv_indexer_grpc_requests", "gRPC requests handled, by method and status code",
            ["method", "code"], registry=registry)
        self.seconds = Histogram(
            "kv_indexer_grpc_request_seconds",
            "gRPC request handling time on the server, by method",
            ["method"], buckets=GRPC_BUCKETS_S, registry=registry)
        # (method, id(handler)) -> (handler, its measured twin); the handler is kept so its
        # id stays its own. Keyed by method too: one handler may serve several methods
        # (the bearer-token check's refusals). Handlers are made once per method (and
        # refusal shape), so this stays as small as the server's method table.
        self._wrapped: dict[tuple[str, int], tuple[Handler, Handler]] = {}

    def series(self, method: str) -> _MethodSeries:
        return _MethodSeries(method_label(method), self.requests, self.seconds)

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        key = (method, id(handler))
        cached = self._wrapped.get(key)
        if cached is not None and cached[0] is handler:
            return cached[1]
        if handler.stream_stream is not None and method in _COUNTED_STREAMS:
            wrapped = grpc.stream_stream_rpc_method_handler(
                self._count_answers(handler.stream_stream, self.series(method)),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        elif handler.unary_unary is None:  # other streaming RPCs: not measured
            wrapped = handler
        else:
            wrapped = grpc.unary_unary_rpc_method_handler(
                self._measure(handler.unary_unary, self.series(method)),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        self._wrapped[key] = (handler, wrapped)
        return wrapped

    @staticmethod
    def _count_answers(behavior: StreamBehavior, series: _MethodSeries) -> StreamBehavior:
        codes = {code.value[0]: code for code in grpc.StatusCode}

        async def counted(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                answers = behavior(requests, context)
                if not hasattr(answers, "__aiter__"):  # a refusal (the token check's)
                    await answers
                    return
                async for message in answers:
                    for code in message.codes:  # indexer.serve.stream.StreamedAnswers
                        series.count(codes.get(code, grpc.StatusCode.UNKNOWN) if code
                                     else grpc.StatusCode.OK)
                    yield message
            except grpc.aio.AbortError:
                series.count(_code_of(context))
                raise
            except asyncio.CancelledError:
                series.count(grpc.StatusCode.CANCELLED)
                raise

        return counted

    @staticmethod
    def _measure(behavior: Behavior, series: _MethodSeries) -> Behavior:
        perf_counter = time.perf_counter
        observe = series.seconds.observe
        count_ok = series.ok.inc
        count = series.count

        async def measured(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = perf_counter()
            try:
                response = await behavior(request, context)
            except grpc.aio.AbortError:
                observe(perf_counter() - started)
                count(_code_of(context))
                raise
            except asyncio.CancelledError:  # deadline passed or the client went away
                observe(perf_counter() - started)
                remaining = context.time_remaining()
                count(grpc.StatusCode.DEADLINE_EXCEEDED
                      if remaining is not None and remaining <= 0
                      else grpc.StatusCode.CANCELLED)
                raise
            except Exception:
                observe(perf_counter() - started)
                count(grpc.StatusCode.UNKNOWN)
                raise
            observe(perf_counter() - started)
            if context.code() is None:
                count_ok()
            else:
                count(_code_of(context))
            return response

        return measured
