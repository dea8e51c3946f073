"""Read-only gRPC server processes over the shared Redis index (`--grpc-processes N`).

One Python process serves about one core of Score calls. With a Redis index, the process
that runs the consumers also serves gRPC, and N-1 reader processes serve the same address
beside it: every server binds with SO_REUSEPORT and the kernel hands each new connection
to one of them. A reader scores from Redis, watches worker liveness and partition markers,
and applies nothing: ingest, expiry and recovery stay with the consumer process.

The main process supervises its readers: one that dies is started again (counted in
`ReaderPool.restarts`); closing the service stops them.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import signal
import time
from multiprocessing.process import BaseProcess

import structlog
from prometheus_client import CollectorRegistry, start_http_server

from indexer.config import ServiceConfig, nats_security, redis_read_urls
from indexer.index.factory import RedisSecurity, build_index, served_index
from indexer.index.protocol import IndexConfig, IndexReader, WorkerInfo
from indexer.ingest.consumer import marker_is_rebuilding, marker_name
from indexer.ingest.liveness import LivenessWatcher
from indexer.metrics import register_process_metrics
from indexer.serve.auth import GrpcSecurity
from kvcore.connect import connect_nats
from kvcore.runtime import (
    SERVER_GC_THRESHOLDS,
    configure_logging,
    run_event_loop,
    settle_gc,
    supervise,
)

__all__ = ["PartitionMarkers", "ReaderPool", "serve_reader"]

log = structlog.get_logger("indexer.serve.readers")

_SUPERVISE_EVERY_S = 1.0
_RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # a reader that keeps dying waits longer
_MARKER_POLL_S = 1.0


class ReaderPool:
    """The reader processes of one indexer: started, restarted when they die, stopped."""

    def __init__(self, config: ServiceConfig, listen: str, count: int) -> None:
        self.config = config
        self.listen = listen  # the address the main process bound, with its real port
        self.count = count
        self.restarts = 0
        self._procs: list[BaseProcess] = []
        self._started = [0.0] * count  # monotonic time each reader was (re)started
        self._failures = [0] * count  # consecutive early deaths per reader
        self._due = [0.0] * count  # when a dead reader may start again; 0: not yet dead
        self._ctx = mp.get_context("spawn")  # a fresh interpreter: no inherited event loop

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None and p.is_alive()]

    def start(self) -> None:
        self._procs = [self._spawn(i) for i in range(self.count)]

    def _spawn(self, number: int) -> BaseProcess:
        proc = self._ctx.Process(target=reader_main, args=(self.config, self.listen, number),
                                 name=f"kv-indexer-reader-{number}", daemon=True)
        proc.start()
        self._started[number] = time.monotonic()
        return proc

    async def supervise(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            now = time.monotonic()
            for number, proc in enumerate(self._procs):
                if proc.is_alive() or stop.is_set():
                    continue
                if self._due[number] == 0.0:  # just found dead
                    early = now - self._started[number] < _RESTART_BACKOFF_S[-1]
                    self._failures[number] = self._failures[number] + 1 if early else 1
                    delay = _RESTART_BACKOFF_S[min(self._failures[number],
                                                   len(_RESTART_BACKOFF_S)) - 1]
                    self._due[number] = now + delay
                    log.warning("reader_died", reader=number, exitcode=proc.exitcode,
                                restart_in_s=delay)
                if now >= self._due[number]:
                    self.restarts += 1
                    self._due[number] = 0.0
                    self._procs[number] = self._spawn(number)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), _SUPERVISE_EVERY_S)

    def stop(self, timeout_s: float = 5.0) -> None:
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()  # SIGTERM: the reader stops its server gracefully
        deadline = time.monotonic() + timeout_s
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(1.0)
        self._procs = []


class PartitionMarkers:
    """Whether any partition is being rebuilt, as the consumers' markers in the index say."""

    def __init__(self, index: IndexReader, partitions: int) -> None:
        self.rebuilding = True  # until the first look
        self._index = index
        self._partitions = partitions

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                markers = [await self._index.get_marker(marker_name(p))
                           for p in range(self._partitions)]
                self.rebuilding = any(marker_is_rebuilding(m) for m in markers)
            except Exception as exc:  # noqa: BLE001 - Redis away: keep the last answer
                log.warning("marker_poll_failed", error=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), _MARKER_POLL_S)


def reader_main(config: ServiceConfig, listen: str, number: int) -> None:
    configure_logging(config.log_format, config.log_level)
    settle_gc(SERVER_GC_THRESHOLDS)
    log.info("reader_starting", reader=number, listen=listen)
    run_event_loop(serve_reader(config, listen, number), config.event_loop)


def reader_metrics_address(metrics_listen: str, number: int) -> tuple[str, int]:
    """Reader n (from 0) answers /metrics on the service's metrics port + n + 1 (any free
    port when the service's is 0)."""
    host, _, port = metrics_listen.rpartition(":")
    return host, int(port) + number + 1 if int(port) else 0


async def serve_reader(config: ServiceConfig, listen: str, number: int = 0) -> None:
    """Serve gRPC reads of the Redis index on `listen` until SIGTERM / SIGINT."""
    from indexer.serve.diagnose import EventPathView  # noqa: PLC0415
    from indexer.serve.service import service_settings, start_grpc_server  # noqa: PLC0415

    assert config.redis_url is not None and config.nats_url is not None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parent = mp.parent_process()
    if parent is not None:  # the consumer process died without stopping us: stop too
        loop.add_reader(parent.sentinel, stop.set)
    nc = await connect_nats(config.nats_url, nats_security(config), name="kv-indexer-reader",
                            start_timeout_s=config.nats_start_timeout_s,
                            max_reconnect_attempts=-1, reconnect_time_wait=0.5)
    registry = CollectorRegistry() if config.metrics_listen else None
    if registry is not None:
        register_process_metrics(registry)
    index = served_index(build_index(IndexConfig(max_query_tokens=config.max_query_tokens),
                                     redis_url=config.redis_url,
                                     redis_security=RedisSecurity.from_config(config),
                                 redis_read_urls=redis_read_urls(config),
                                 max_staleness_s=config.redis_read_max_staleness_s,
                                 redis_subslots=config.redis_subslots), registry)
    if registry is not None:
        host, port = reader_metrics_address(config.metrics_listen, number)
        start_http_server(port, addr=host, registry=registry)
    liveness = LivenessWatcher(nc.jetstream(), index, ttl_s=config.liveness_ttl_s,
                               grace_s=config.liveness_grace_s, remove_expired=False)
    markers = PartitionMarkers(index, config.partitions)
    tasks = [asyncio.create_task(supervise("liveness", liveness.run, stop)),
             asyncio.create_task(supervise("markers", markers.run, stop))]

    async def live_workers(model: str | None) -> list[WorkerInfo]:
        return liveness.live_only(await index.workers(model), model)

    server, _ = await start_grpc_server(
        index, listen, live_workers=live_workers, rebuilding=lambda: markers.rebuilding,
        settings=service_settings(config, share_port=True),
        security=GrpcSecurity.from_config(config), registry=registry,
        event_path=EventPathView.watching(lambda: liveness))
    log.info("reader_serving", listen=listen)
    try:
        await stop.wait()
    finally:
        await server.stop(2.0)
        for task in tasks:
            with contextlib.suppress(Exception):
                await task
        with contextlib.suppress(Exception):
            await nc.drain()
        await index.close()
        log.info("reader_stopped")
