"""`kv-indexer serve`: NATS (embedded or given) -> consumers -> index -> gRPC.

Start-up order: NATS, stream and buckets, the index, the gRPC server, then the consumers
(partition leases with Redis; every partition, replayed from the start of the stream, with
the in-memory index), and the liveness watcher. SIGTERM or SIGINT stops fetching, lets each
consumer finish and ack the batch in hand, then closes gRPC, NATS and the index.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import nats
import structlog
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from indexer.config import ServiceConfig, parse_service_config
from indexer.consumer import (
    ConsumerSettings,
    ConsumerStats,
    PartitionConsumer,
    ResyncRequester,
    SequenceTracker,
)
from indexer.embedded import NATS_DEFAULT_PORT, EmbeddedNats, port_is_free
from indexer.errors import ConfigError
from indexer.index.instrumented import InstrumentedIndex
from indexer.index.memory import MemoryIndex
from indexer.index.protocol import Index, IndexConfig, WorkerInfo
from indexer.index.redis import RedisIndex
from indexer.liveness import LivenessWatcher
from indexer.metrics import MetricsExporter
from indexer.partitions import PartitionLeases
from indexer.readers import PartitionMarkers, ReaderPool
from indexer.recovery import SnapshotStore
from publisher.jetstream import (
    StreamSettings,
    ensure_dead_letter_stream,
    ensure_liveness_bucket,
    ensure_stream,
)

__all__ = ["IndexerService", "configure_logging", "main", "run_event_loop", "scoped_logging",
           "settle_gc"]

log = structlog.get_logger("indexer.app")
T = TypeVar("T")


GC_THRESHOLDS = (2_000, 50, 1000)


def settle_gc() -> None:
    """Keep full collections rare and every collection short: the index is long-lived,
    event lag and Score latency are not.

    Python's default thresholds run a full collection every few hundred thousand
    allocations, walking every tracked object: measured on the event path it put 200 ms
    into the p99 lag at 10k blocks/s. Long-lived objects are frozen (moved out of the
    collector's sight) after start-up and after each rebuild, and full collections wait
    for 1,000 middle ones. The youngest generation stays small on purpose: grpc.aio
    leaves three objects in a reference cycle per call, which only a collection frees.
    At 50,000 that was one 11-15 ms pause every ~17,000 calls, the worst of the Score
    p99.9 at 1,000 calls/s; at 2,000 the pauses are 25 times shorter and more frequent.
    """
    gc.set_threshold(*GC_THRESHOLDS)
    gc.collect()
    gc.freeze()


def run_event_loop(main: Coroutine[Any, Any, T], event_loop: str = "auto") -> T:
    """Run `main` to completion on uvloop (libuv), unless `event_loop` is "asyncio" or, for
    "auto", uvloop is not installed.

    Under uvloop a server process spends less CPU per call in the loop and in its
    transports (the Redis pipe, gRPC's wake-ups): at 1,000 Score calls/s with Redis the
    p99 fell by 10-13% in A/B runs, and 32 calls in flight were served a third faster.
    """
    if event_loop != "asyncio":
        try:
            import uvloop  # noqa: PLC0415 - optional: not on every platform
        except ImportError:
            if event_loop == "uvloop":
                raise
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def configure_logging(log_format: str = "auto", level: str = "info") -> None:
    """structlog: JSON lines in containers, readable console output on a terminal."""
    json_logs = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json_logs else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


@contextlib.contextmanager
def scoped_logging(level: str) -> Iterator[None]:
    """Plain console logs at `level` to stderr for a while (demo, benchmarks); the previous
    structlog setup afterwards."""
    saved = structlog.get_config()
    structlog.configure(
        processors=[structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    structlog.dev.ConsoleRenderer(colors=False)],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    try:
        yield
    finally:
        structlog.configure(**saved)


@dataclass
class IndexerService:
    """The running parts of one indexer process (also driven directly by tests)."""

    config: ServiceConfig
    stats: ConsumerStats = field(default_factory=ConsumerStats)
    nats_url: str = ""
    grpc_port: int = 0
    index: Index | None = None
    _embedded: EmbeddedNats | None = None
    _nc: NatsClient | None = None
    _js: JetStreamContext | None = None
    _server: object | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _consumers: dict[int, tuple[asyncio.Event, asyncio.Task[None], PartitionConsumer]] = field(
        default_factory=dict)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    liveness: LivenessWatcher | None = None
    leases: PartitionLeases | None = None
    snapshots: SnapshotStore | None = None
    metrics: MetricsExporter | None = None
    metrics_port: int = 0
    readers: ReaderPool | None = None

    async def start(self) -> None:
        config = self.config
        if config.nats_url is None:
            # NATS's usual port when it is free, so a bridge next to `make run` finds it.
            port = NATS_DEFAULT_PORT if port_is_free(NATS_DEFAULT_PORT) else None
            self._embedded = EmbeddedNats(config.data_dir / "nats", port=port).start()
            self.nats_url = self._embedded.url
        else:
            self.nats_url = config.nats_url
        self._nc = await nats.connect(self.nats_url, name="kv-indexer",
                                      max_reconnect_attempts=-1, reconnect_time_wait=0.5)
        self._js = self._nc.jetstream()
        settings = StreamSettings(partitions=config.partitions,
                                  max_age_s=config.stream_max_age_s,
                                  max_bytes=config.stream_max_bytes,
                                  liveness_ttl_s=config.liveness_ttl_s)
        await ensure_stream(self._js, settings)
        await ensure_dead_letter_stream(self._js)
        await ensure_liveness_bucket(self._js, config.liveness_ttl_s)
        resync = ResyncRequester(self._nc, 5.0, self.stats)
        index_config = IndexConfig(max_query_tokens=config.max_query_tokens)
        self.index = (
            RedisIndex.from_url(config.redis_url, config=index_config, on_resync=resync.request)
            if config.redis_url else MemoryIndex(index_config, on_resync=resync.request)
        )
        self._tracker = SequenceTracker()
        for info in await self.index.workers():
            self._tracker.seed((info.model, info.worker_id, info.dp_rank), info.epoch,
                               info.last_seq)
        self._resync = resync
        if config.metrics_listen:
            self.metrics = MetricsExporter(self.index, self.stats)
            # The index served to routers is timed; ingest uses the bare one.
            self._served_index: Index = InstrumentedIndex(self.index, self.metrics.registry)
        else:
            self._served_index = self.index
        await self._start_grpc()
        await self._start_consumers()
        self.liveness = LivenessWatcher(self._js, self.index, ttl_s=config.liveness_ttl_s,
                                        grace_s=config.liveness_grace_s)
        self._tasks.append(asyncio.create_task(self.liveness.run(self._stop)))
        settle_gc()
        if self.metrics is not None:
            self.metrics_port = self.metrics.serve(config.metrics_listen)
            self._tasks.append(asyncio.create_task(self.metrics.run(self._stop)))

    async def _start_grpc(self) -> None:
        if not self.config.grpc_listen:
            return
        from indexer.service import ServiceSettings, start_grpc_server  # noqa: PLC0415

        assert self.index is not None
        extra = self.config.grpc_processes - 1
        markers: PartitionMarkers | None = None
        if extra:  # answer `rebuilding` from the partition markers too, as the readers do
            markers = PartitionMarkers(self.index, self.config.partitions)
            self._tasks.append(asyncio.create_task(markers.run(self._stop)))

        def rebuilding() -> bool:
            return self.rebuilding or (markers is not None and markers.rebuilding)

        self._server, self.grpc_port = await start_grpc_server(
            self._served_index, self.config.grpc_listen, consumer_stats=self.stats,
            settings=ServiceSettings(share_port=extra > 0),
            rebuilding=rebuilding, live_workers=self._live_workers)
        if extra:
            host = self.config.grpc_listen.rpartition(":")[0]
            reader_config = msgspec.structs.replace(self.config, nats_url=self.nats_url)
            self.readers = ReaderPool(reader_config, f"{host}:{self.grpc_port}", extra)
            self.readers.start()
            self._tasks.append(asyncio.create_task(self.readers.supervise(self._stop)))

    async def _live_workers(self, model: str | None) -> list[WorkerInfo]:
        """Workers routers may be sent to: in the index, and not known to be gone."""
        assert self.index is not None
        workers = await self.index.workers(model)
        return workers if self.liveness is None else self.liveness.live_only(workers)

    async def _start_consumers(self) -> None:
        assert self._js is not None
        self.snapshots = SnapshotStore(self._js, self.config.partitions,
                                       keep=self.config.snapshot_keep)
        await self.snapshots.open()
        if self.config.redis_url:
            self.leases = PartitionLeases(self._js, self.config.partitions,
                                          start=self._start_partition,
                                          stop=self._stop_partition)
            self._tasks.append(asyncio.create_task(self.leases.run(self._stop)))
            return
        # In memory every partition is ours, and rebuilt at start (the index is empty).
        for partition in range(self.config.partitions):
            await self._start_partition(partition)

    async def _start_partition(self, partition: int) -> None:
        assert self._js is not None and self.index is not None
        consumer = PartitionConsumer(
            self._js, self.index, partition, tracker=self._tracker, resync=self._resync,
            stats=self.stats, snapshots=self.snapshots, settings=ConsumerSettings(
                fetch_batch=self.config.fetch_batch, apply_chunk=self.config.apply_chunk,
                snapshot_every_batches=self.config.snapshot_every_batches,
                snapshot_every_s=self.config.snapshot_every_s))
        stop = asyncio.Event()
        task = asyncio.create_task(self._supervise(consumer, stop))
        self._consumers[partition] = (stop, task, consumer)

    async def _supervise(self, consumer: PartitionConsumer, stop: asyncio.Event) -> None:
        """Run a partition consumer; if it fails unexpectedly, log it and start it again."""
        while not stop.is_set():
            try:
                await consumer.run(stop)
            except Exception:
                self.stats.consumer_restarts += 1
                log.exception("partition_consumer_failed", partition=consumer.partition)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)

    async def _stop_partition(self, partition: int) -> None:
        entry = self._consumers.pop(partition, None)
        if entry is not None:
            stop, task, _ = entry
            stop.set()
            with contextlib.suppress(Exception):
                await task

    @property
    def rebuilding(self) -> bool:
        """True while any partition this process owns is being rebuilt."""
        return any(consumer.rebuilding for _, _, consumer in self._consumers.values())

    def consumers(self) -> list[PartitionConsumer]:
        return [consumer for _, _, consumer in self._consumers.values()]

    def request_stop(self) -> None:
        self._stop.set()

    async def wait(self) -> None:
        await self._stop.wait()

    async def close(self) -> None:
        """Graceful: consumers finish the batch in hand, then gRPC, NATS and the index."""
        self._stop.set()
        for task in self._tasks:
            with contextlib.suppress(Exception):
                await task
        for partition in list(self._consumers):
            await self._stop_partition(partition)
        if self.readers is not None:
            await asyncio.to_thread(self.readers.stop)
        if self._server is not None:
            await self._server.stop(2.0)  # type: ignore[attr-defined]
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.drain()
        if self.index is not None:
            await self.index.close()
        if self._embedded is not None:
            self._embedded.stop()

    def banner(self) -> str:
        backend = f"redis {self.config.redis_url}" if self.config.redis_url else "in-memory"
        nats_kind = "embedded" if self._embedded else "external"
        return (f"kv-indexer serving\n  gRPC     {self.config.grpc_listen} (port "
                f"{self.grpc_port}, {self.config.grpc_processes} process(es))\n"
                f"  NATS     {self.nats_url} ({nats_kind})\n"
                f"  metrics  {self.config.metrics_listen or 'off'}\n"
                f"  index    {backend}\n  partitions {self.config.partitions}\n"
                f"  loop     {_loop_name()}")


def _loop_name() -> str:
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"


async def serve(config: ServiceConfig) -> None:
    service = IndexerService(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.request_stop)
    try:
        await service.start()
        print(service.banner(), flush=True)
        await service.wait()
    finally:
        await service.close()
        log.info("stopped")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = parse_service_config(argv)
    except ConfigError as exc:
        print(f"kv-indexer serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_format, config.log_level)
    run_event_loop(serve(config), config.event_loop)
    return 0
