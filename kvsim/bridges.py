"""A `MockFleet` wired to an indexer as `kv-publisher bridge` would wire real engines: one
bridge (`EngineSource` + `KVEventPublisher`) per worker, and the worker ids they publish as.

The demo and the routing bench both run their fleets through these.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import zmq.asyncio

from kvcore.topology import StreamSettings
from kvsim.mock_engines import MockEngine, MockFleet
from publisher.publisher import KVEventPublisher
from publisher.zmq_source import EngineSource

__all__ = ["Bridge", "bridges", "worker_id", "worker_number"]

_WORKER_PREFIX = "engine-"


def worker_id(worker: int) -> str:
    """The id worker `worker` of a fleet publishes as. Zero-padded, so the index's
    tie-break on worker id follows the worker number."""
    return f"{_WORKER_PREFIX}{worker:03d}"


def worker_number(wid: str) -> int:
    """The fleet position of a worker id made by `worker_id` (ValueError for any other)."""
    number = wid.removeprefix(_WORKER_PREFIX)
    if number == wid or not number.isdigit():
        raise ValueError(f"unknown worker {wid!r}")
    return int(number)


@dataclass(slots=True)
class Bridge:
    """What carries one engine's events to JetStream."""

    engine: MockEngine
    publisher: KVEventPublisher
    source: EngineSource


@contextlib.asynccontextmanager
async def bridges(fleet: MockFleet, nats_url: str, model: str, block_size: int,
                  liveness_ttl_s: float, *, start_timeout_s: float | None = None,
                  ) -> AsyncIterator[list[Bridge]]:
    """One bridge per worker (its rank 0), publishing as `worker_id(w)`, for the duration."""
    ctx = zmq.asyncio.Context()
    stop = asyncio.Event()
    publishers: list[KVEventPublisher] = []
    running: list[Bridge] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        for w, ranks in enumerate(fleet.engines):
            engine = ranks[0]
            publisher = KVEventPublisher(model, worker_id(w), block_size=block_size,
                                         nats_url=nats_url,
                                         stream=StreamSettings(liveness_ttl_s=liveness_ttl_s),
                                         start_timeout_s=start_timeout_s)
            await publisher.start()
            publishers.append(publisher)
            source = EngineSource(ctx, publisher.ranks[0], engine.endpoint,
                                  replay_endpoint=engine.replay_endpoint)
            running.append(Bridge(engine, publisher, source))
            tasks.append(asyncio.create_task(source.run(stop)))
        await asyncio.sleep(0.3)  # SUB sockets connect (earlier batches come back by replay)
        yield running
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(p.close() for p in publishers), return_exceptions=True)
        ctx.term()
