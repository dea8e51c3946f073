"""What the gRPC metrics interceptor costs per call (indexer/serve/grpc_metrics.py).

    python -m bench.grpc_metrics            (make bench-grpc-metrics)

Calls a bare async unary handler and its measured twin (the interceptor's wrapper:
two perf_counter reads, a histogram observe and a counter increment on pre-resolved
label children) in a loop on one event loop, and times `intercept_service` (the cached
per-handler lookup every call goes through) against its bare continuation. Prints the
best of five rounds of each; the difference is the interceptor's cost per call.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from indexer.serve.grpc_metrics import GrpcMetrics


class _Context:
    def code(self) -> None:
        return None

    def time_remaining(self) -> float:
        return 1.0


class _Details:
    method = "/kvindex.v1.KvIndexer/Score"
    invocation_metadata = ()


async def _handler(request: Any, _context: Any) -> Any:
    return request


async def _per_call(call: Callable[[], Awaitable[Any]], n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        await call()
    return (time.perf_counter() - started) / n


async def _best(call: Callable[[], Awaitable[Any]], n: int, rounds: int = 5) -> float:
    await _per_call(call, n // 4)  # warm up
    return min([await _per_call(call, n) for _ in range(rounds)])


async def measure(n: int) -> dict[str, float]:
    metrics = GrpcMetrics(CollectorRegistry())
    measured = metrics._measure(_handler, metrics.series(_Details.method))
    context, details = _Context(), _Details()
    handler = grpc.unary_unary_rpc_method_handler(_handler)

    async def continuation(_details: Any) -> Any:
        return handler

    bare = await _best(lambda: _handler(1, context), n)
    wrapped = await _best(lambda: measured(1, context), n)
    cont = await _best(lambda: continuation(details), n)
    intercepted = await _best(lambda: metrics.intercept_service(continuation, details), n)
    return {"handler_us": bare * 1e6, "measured_us": wrapped * 1e6,
            "wrapper_us": (wrapped - bare) * 1e6, "lookup_us": (intercepted - cont) * 1e6,
            "total_us": (wrapped - bare + intercepted - cont) * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--calls", type=int, default=200_000)
    args = parser.parse_args()
    result = asyncio.run(measure(args.calls))
    print(f"bare handler      {result['handler_us']:6.2f} us/call")
    print(f"measured handler  {result['measured_us']:6.2f} us/call "
          f"(+{result['wrapper_us']:.2f} us)")
    print(f"intercept_service +{result['lookup_us']:.2f} us/call (cached wrapper lookup)")
    print(f"interceptor cost  {result['total_us']:6.2f} us/call")


if __name__ == "__main__":
    main()
