"""`kv-indexer serve`: NATS (embedded or given) -> consumers -> index -> gRPC.

Start-up order: NATS, stream and buckets, the index, the gRPC server, then the consumers
(partition leases with Redis; every partition, replayed from the start of the stream, with
the in-memory index), and the liveness watcher. SIGTERM or SIGINT stops fetching, lets each
consumer finish and ack the batch in hand, then closes gRPC, NATS and the index.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

import msgspec
import structlog
from grpc_health.v1 import health
from nats.aio.client import Client as NatsClient
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import APIError as JsApiError
from nats.js.errors import NotFoundError
from prometheus_client import CollectorRegistry

from indexer.config import (
    ServiceConfig,
    nats_security,
    parse_service_config,
    pool_writer_patterns,
    redis_read_urls,
)
from indexer.embedded import NATS_DEFAULT_PORT, EmbeddedNats, port_is_free
from indexer.errors import BackendError, ConfigError
from indexer.index.factory import RedisSecurity, build_index, served_index
from indexer.index.protocol import Index, IndexConfig, WorkerInfo
from indexer.ingest.activity import EventActivity
from indexer.ingest.consumer import (
    ConsumerSettings,
    ConsumerStats,
    PartitionConsumer,
    ResyncRequester,
)
from indexer.ingest.liveness import LivenessWatcher
from indexer.ingest.partitions import LEASE_BUCKET, PartitionLeases
from indexer.ingest.recovery import SNAPSHOT_BUCKET, STATE_BUCKET, SnapshotStore
from indexer.metrics import EventPathMetrics, MetricsExporter, register_process_metrics
from indexer.probes import ProcessProbes
from indexer.runfile import Endpoints, remove_endpoints, write_endpoints
from indexer.serve.auth import GrpcSecurity
from indexer.serve.diagnose import DoctorSettings, EventPathView
from indexer.serve.health import ServingHealth
from indexer.serve.readers import PartitionMarkers, ReaderPool
from kvcore.about import NATIVE_MISSING_SHORT
from kvcore.bus import STREAM_NAME
from kvcore.connect import NatsSetupError, connect_nats
from kvcore.keys import NATIVE
from kvcore.redact import redact_text, redact_url
from kvcore.runtime import (
    SERVER_GC_THRESHOLDS,
    configure_logging,
    json_logs,
    loop_name,
    run_event_loop,
    settle_gc,
    supervise,
    warn_if_pure_python,
)
from kvcore.topology import (
    DEAD_LETTER_STREAM,
    LIVENESS_BUCKET,
    StreamSettings,
    ensure_dead_letter_stream,
    ensure_liveness_bucket,
    ensure_stream,
    kv_stream,
    object_store_stream,
    reconcile_replicas,
)

__all__ = ["IndexerService", "main"]

log = structlog.get_logger("indexer.app")

# A backend or NATS away: background tasks are restarted without a traceback in the log.
OUTAGES: Final = (BackendError, NatsError, TimeoutError, ConnectionError)


# How long start-up waits for the registry's current entries before consuming events.
_REGISTRY_SYNC_S = 5.0
# How often the event stream's existence is checked (a NATS back without its data).
_TOPOLOGY_CHECK_S = 2.0


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
    health: ServingHealth | None = None
    probes: ProcessProbes | None = None
    registry: CollectorRegistry | None = None  # set while metrics are on
    event_metrics: EventPathMetrics | None = None
    # What the consumers saw of each rank, and the thresholds of Diagnose's checks.
    activity: EventActivity = field(default_factory=EventActivity)
    doctor: DoctorSettings = field(default_factory=DoctorSettings)
    _pool_writers: list[str] = field(default_factory=list)  # --pool-writers

    async def start(self) -> None:
        config = self.config
        self._pool_writers = pool_writer_patterns(config)
        self._health_servicer = health.aio.HealthServicer()
        if config.nats_url is None:
            # NATS's usual port when it is free, so a bridge next to `make run` finds it.
            port = NATS_DEFAULT_PORT if port_is_free(NATS_DEFAULT_PORT) else None
            self._embedded = EmbeddedNats(config.data_dir / "nats", port=port).start()
            self.nats_url = self._embedded.url
        else:
            self.nats_url = config.nats_url
        log.info("nats_connecting", url=redact_url(self.nats_url))
        self._nc = await connect_nats(self.nats_url, nats_security(config), name="kv-indexer",
                                      start_timeout_s=config.nats_start_timeout_s,
                                      max_reconnect_attempts=-1, reconnect_time_wait=0.5)
        self._js = self._nc.jetstream()
        await self._ensure_topology()
        resync = ResyncRequester(self._nc, 5.0, self.stats)
        registry = CollectorRegistry() if config.metrics_listen else None
        if registry is not None:
            register_process_metrics(registry)
            self.event_metrics = EventPathMetrics(registry)
        self.registry = registry
        self.index = build_index(IndexConfig(max_query_tokens=config.max_query_tokens),
                                 redis_url=config.redis_url, on_resync=resync.request,
                                 redis_security=RedisSecurity.from_config(config),
                                 redis_read_urls=redis_read_urls(config),
                                 max_staleness_s=config.redis_read_max_staleness_s,
                                 redis_bucket_load=config.redis_bucket_load,
                                 redis_subslots=config.redis_subslots)
        self._served_index = served_index(self.index, registry)
        self._resync = resync
        await self._start_grpc()
        # Liveness first: consumers check pool writes against the registry it follows.
        self.liveness = LivenessWatcher(self._js, self.index, ttl_s=config.liveness_ttl_s,
                                        grace_s=config.liveness_grace_s)
        self._background("liveness", self.liveness.run)
        await self.liveness.wait_synced(_REGISTRY_SYNC_S)
        await self._start_consumers()
        self._background("topology", self._keep_topology)
        self.probes = ProcessProbes(self.index, self._nc, self.consumers, self.leases,
                                    stall_s=config.ingest_stall_s)
        self.health = ServingHealth(self._health_servicer, self.probes.probes())
        await self.health.update()
        self._background("health", self.health.run)
        if registry is not None:
            self.metrics = MetricsExporter(self.index, self.stats, registry,
                                           health=self.health, probes=self.probes,
                                           leases=self.leases,
                                           max_worker_series=config.metrics_max_workers)
        settle_gc(SERVER_GC_THRESHOLDS)
        if self.metrics is not None:
            self.metrics_port = self.metrics.serve(config.metrics_listen)
            self._background("metrics", self.metrics.run)

    async def _ensure_topology(self) -> None:
        """The streams and buckets, with `--stream-replicas` copies (ConfigError if the
        NATS server cannot place that many: one server, or too few cluster nodes)."""
        assert self._js is not None
        config = self.config
        settings = StreamSettings(partitions=config.partitions,
                                  max_age_s=config.stream_max_age_s,
                                  max_bytes=config.stream_max_bytes,
                                  liveness_ttl_s=config.liveness_ttl_s,
                                  replicas=config.stream_replicas)
        try:
            await ensure_stream(self._js, settings)
            await ensure_dead_letter_stream(self._js, config.stream_replicas)
            await ensure_liveness_bucket(self._js, config.liveness_ttl_s,
                                         config.stream_replicas)
            await self._reconcile_replicas()
        except JsApiError as exc:
            reason = (exc.description or "").lower()
            placing = ("replica", "placement", "insufficient resources")
            if config.stream_replicas == 1 or not any(word in reason for word in placing):
                raise  # not about where the copies go: a server not ready, say
            raise ConfigError(f"--stream-replicas {config.stream_replicas}: NATS refused "
                              f"it: {exc.description}") from exc

    async def _keep_topology(self, stop: asyncio.Event) -> None:
        """Re-create the streams, buckets and snapshot store when the event stream is gone.

        A NATS that comes back without its JetStream data (a fresh volume, a wiped store)
        has none of them: publishers' writes find no stream and consumers no consumer,
        for good, since only start-up made them. The consumers then rebuild from the new
        stream, and the gaps its first batches show ask the workers for resyncs."""
        assert self._js is not None
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), _TOPOLOGY_CHECK_S)
            if stop.is_set():
                return
            try:
                await self._js.stream_info(STREAM_NAME)
            except NotFoundError:
                log.warning("event_stream_missing",
                            action="re-creating the streams, buckets and snapshot store")
                await self._ensure_topology()
                if self.snapshots is not None:
                    await self.snapshots.open()
                self.stats.topology_restores += 1

    async def _reconcile_replicas(self) -> None:
        """Streams and buckets made earlier with another replica count get this one's."""
        assert self._js is not None
        streams = [STREAM_NAME, DEAD_LETTER_STREAM, kv_stream(LIVENESS_BUCKET),
                   kv_stream(LEASE_BUCKET), kv_stream(STATE_BUCKET),
                   object_store_stream(SNAPSHOT_BUCKET)]
        for name, old in await reconcile_replicas(self._js, streams,
                                                  self.config.stream_replicas):
            log.warning("stream_replicas_changed", stream=name, old=old,
                        new=self.config.stream_replicas)

    async def _start_grpc(self) -> None:
        if not self.config.grpc_listen:
            return
        from indexer.serve.service import service_settings, start_grpc_server  # noqa: PLC0415

        assert self.index is not None
        extra = self.config.grpc_processes - 1
        markers: PartitionMarkers | None = None
        if extra:  # answer `rebuilding` from the partition markers too, as the readers do
            markers = PartitionMarkers(self.index, self.config.partitions)
            self._background("markers", markers.run)

        def rebuilding() -> bool:
            return self.rebuilding or (markers is not None and markers.rebuilding)

        self._server, self.grpc_port = await start_grpc_server(
            self._served_index, self.config.grpc_listen, consumer_stats=self.stats,
            health_servicer=self._health_servicer,
            settings=service_settings(self.config, share_port=extra > 0),
            rebuilding=rebuilding, live_workers=self._live_workers,
            security=self.grpc_security, registry=self.registry,
            event_path=self._event_path(), doctor=self.doctor)
        if extra:
            host = self.config.grpc_listen.rpartition(":")[0]
            reader_config = msgspec.structs.replace(self.config, nats_url=self.nats_url)
            self.readers = ReaderPool(reader_config, f"{host}:{self.grpc_port}", extra)
            self.readers.start()
            self._background("readers", self.readers.supervise)

    def _event_path(self) -> EventPathView:
        """What Diagnose sees of the registry and the event path in this process."""
        return EventPathView.watching(lambda: self.liveness, activity=self.activity,
                                      dead_letters=lambda: self.stats.dead_letters)

    def _pool_grants(self, model: str, worker_id: str) -> list[str] | None:
        """The shared storage pools a worker may write into: those its registry entry
        declares (None: no entry), none when `--pool-writers` does not name it."""
        declared = None if self.liveness is None else self.liveness.pools_of(model, worker_id)
        if declared and self._pool_writers and not any(
                fnmatch.fnmatchcase(worker_id, p) for p in self._pool_writers):
            return []
        return declared

    async def _live_workers(self, model: str | None) -> list[WorkerInfo]:
        """Workers routers may be sent to: in the index, and not known to be gone."""
        assert self.index is not None
        workers = await self.index.workers(model)
        return workers if self.liveness is None else self.liveness.live_only(workers, model)

    async def _start_consumers(self) -> None:
        assert self._js is not None
        replicas = self.config.stream_replicas
        self.snapshots = SnapshotStore(self._js, self.config.partitions,
                                       keep=self.config.snapshot_keep, replicas=replicas)
        await self.snapshots.open()
        if self.config.redis_url:
            self.leases = PartitionLeases(self._js, self.config.partitions,
                                          start=self._start_partition,
                                          stop=self._stop_partition, replicas=replicas)
            self._background("leases", self.leases.run)
            return
        # In memory every partition is ours, and rebuilt at start (the index is empty).
        for partition in range(self.config.partitions):
            await self._start_partition(partition)
        log.info("consumers_started", partitions=self.config.partitions,
                 replaying="the retained stream, into the empty in-memory index")

    async def _start_partition(self, partition: int) -> None:
        assert self._js is not None and self.index is not None
        timings = self.event_metrics
        consumer = PartitionConsumer(
            self._js, self.index, partition, resync=self._resync,
            stats=self.stats, snapshots=self.snapshots, settings=ConsumerSettings(
                fetch_batch=self.config.fetch_batch, apply_chunk=self.config.apply_chunk,
                snapshot_every_batches=self.config.snapshot_every_batches,
                snapshot_every_s=self.config.snapshot_every_s,
                quiet_first_rebuild=not self.config.redis_url),
            pool_grants=self._pool_grants,
            lag_seconds=timings.lag_seconds if timings is not None else None,
            apply_seconds=timings.apply_seconds if timings is not None else None,
            activity=self.activity)
        stop = asyncio.Event()
        task = asyncio.create_task(supervise(f"partition-{partition}", consumer.run, stop,
                                             on_failure=self._consumer_failed,
                                             outages=OUTAGES))
        self._consumers[partition] = (stop, task, consumer)

    def _consumer_failed(self, _name: str) -> None:
        self.stats.consumer_restarts += 1

    def _background(self, name: str, run: Callable[[asyncio.Event], Awaitable[None]]) -> None:
        """A task that lives as long as the process: supervised, its failures counted."""
        self._tasks.append(asyncio.create_task(
            supervise(name, run, self._stop, on_failure=self.stats.task_failed,
                      outages=OUTAGES)))

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

    def endpoints(self) -> Endpoints:
        """Where local tools reach this process (the run file, indexer.runfile)."""
        grpc_target = ""
        if self.config.grpc_listen:
            host = self.config.grpc_listen.rpartition(":")[0].strip("[]")
            host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
            grpc_target = f"{host}:{self.grpc_port}"
        return Endpoints(self.nats_url, grpc_target, os.getpid())

    @property
    def grpc_security(self) -> GrpcSecurity:
        return GrpcSecurity.from_config(self.config)

    def banner_fields(self) -> dict[str, str]:
        """What this process serves, and from where (URL secrets as ***)."""
        redis_url = self.config.redis_url
        backend = f"redis {redact_url(redis_url)}" if redis_url else "in-memory"
        nats_kind = "embedded" if self._embedded else "external"
        if nats_security(self.config).uses_tls:
            nats_kind += ", TLS"
        return {
            "gRPC": (f"{self.config.grpc_listen} (port {self.grpc_port}, "
                     f"{self.config.grpc_processes} process(es), "
                     f"{self.grpc_security.describe()})"),
            "NATS": f"{redact_url(self.nats_url)} ({nats_kind})",
            "metrics": self.config.metrics_listen or "off",
            "index": backend,
            "partitions": str(self.config.partitions),
            "C ext": "yes" if NATIVE else NATIVE_MISSING_SHORT,
            "loop": loop_name(),
        }

    def banner(self) -> str:
        """The start-up banner for a terminal, one field a line (`loop` last)."""
        return "kv-indexer serving\n" + "\n".join(
            f"  {name:<8} {value}" for name, value in self.banner_fields().items())

    def announce(self) -> None:
        """The banner on stdout, or one `serving` log line where logs are JSON."""
        if json_logs(self.config.log_format):
            fields = {name.lower().replace(" ", "_"): value
                      for name, value in self.banner_fields().items()}
            log.info("serving", **fields)
        else:
            print(self.banner(), flush=True)


async def serve(config: ServiceConfig) -> None:
    """Run the service until SIGTERM / SIGINT, which also end a start-up still under way
    (NATS not reached yet): nothing waits unbounded before the signal handlers are in."""
    service = IndexerService(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.request_stop)
    starting = asyncio.ensure_future(service.start())
    stopping = asyncio.ensure_future(service.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            log.info("stopping_during_startup")
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        else:
            starting.result()  # a start-up error propagates
            service.announce()
            write_endpoints(config.data_dir, service.endpoints())
            await stopping
    finally:
        stopping.cancel()
        remove_endpoints(config.data_dir)
        await service.close()
        log.info("stopped")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = parse_service_config(argv)
    except ConfigError as exc:
        print(f"kv-indexer serve: {redact_text(str(exc))}", file=sys.stderr)
        return 2
    configure_logging(config.log_format, config.log_level)
    warn_if_pure_python()
    try:
        run_event_loop(serve(config), config.event_loop)
    except ConfigError as exc:
        print(f"kv-indexer serve: {redact_text(str(exc))}", file=sys.stderr)
        return 2
    except NatsSetupError as exc:
        print(f"kv-indexer serve: {redact_text(str(exc))}", file=sys.stderr)
        return 1
    except Exception:  # the traceback goes through the redacting log processors
        log.exception("serve_failed")
        return 1
    return 0
