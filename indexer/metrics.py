"""Prometheus metrics on /metrics, from snapshots refreshed by the service's event loop.

The HTTP server runs in prometheus-client's thread; it only reads the latest snapshot, so
a scrape never touches the index or the event loop.

Per-worker series (`kv_indexer_worker_blocks`, `kv_indexer_worker_degraded`) are bounded:
at most `max_worker_series` worker ranks have series of their own (the first ones the
exporter sees, each keeping its series while it stays in the index); every other rank is
summed into one series labelled `model="_other", worker="_other", dp_rank="_other"`. A
fleet, or a worker publishing many ranks on its own subject, cannot grow the scrape
without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from indexer.errors import ConfigError
from indexer.index.protocol import IndexReader, IndexStats, WorkerInfo
from indexer.ingest.consumer import ConsumerStats
from indexer.ingest.partitions import PartitionLeases
from indexer.probes import ProcessProbes
from indexer.serve.health import ServingHealth
from kvcore.about import build_labels
from kvcore.pools import KIND_POOL

__all__ = [
    "APPLY_BUCKETS_S",
    "DEFAULT_MAX_WORKER_SERIES",
    "LAG_BUCKETS_S",
    "OTHER_WORKERS",
    "EventPathMetrics",
    "MetricsExporter",
    "WorkerSeries",
    "register_process_metrics",
]

DEFAULT_MAX_WORKER_SERIES: Final = 1_000
LAG_BUCKETS_S: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
APPLY_BUCKETS_S: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                          0.1, 0.25, 0.5, 1.0, 2.5)
OTHER_WORKERS: Final = "_other"  # the label values of the series the others are summed in
MAX_POOL_SERIES: Final = 256  # pools with a kv_indexer_pool_blocks series

RankKey = tuple[str, str, int]


@dataclass
class _Snapshot:
    index: IndexStats = field(default_factory=IndexStats)
    consumer: ConsumerStats = field(default_factory=ConsumerStats)
    workers: list[WorkerInfo] = field(default_factory=list)  # every rank in the index
    named: list[WorkerInfo] = field(default_factory=list)  # the ranks with series of their own
    other_ranks: int = 0  # the ranks summed into worker="_other"
    other_blocks: dict[str, int] = field(default_factory=dict)  # their blocks per tier
    other_degraded: int = 0  # how many of them are degraded
    lag_p50: float = 0.0
    lag_p99: float = 0.0
    pools: list[WorkerInfo] = field(default_factory=list)  # shared storage pools (capped)


def register_process_metrics(registry: CollectorRegistry) -> None:
    """`kv_indexer_build_info{version,native}` (always 1) and prometheus_client's `process_*`
    (CPU, resident memory, open descriptors, start time; Linux) and `python_info` series,
    in the main process and every reader."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    Gauge("kv_indexer_build_info", "The running version, and whether the C extension "
          "(kvcore._native) is in use; always 1", ["version", "native"],
          registry=registry).labels(*build_labels()).set(1)


class EventPathMetrics:
    """The consumers' histograms (`PartitionConsumer(lag_seconds=, apply_seconds=)`):
    aggregatable across replicas with `histogram_quantile(q, sum by (le) (rate(..)))`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.lag_seconds = Histogram(
            "kv_indexer_event_lag_seconds",
            "Batch timestamp (publisher clock) to applied to the index, per applied batch",
            buckets=LAG_BUCKETS_S, registry=registry)
        self.apply_seconds = Histogram(
            "kv_indexer_apply_seconds", "Duration of one index apply call (a chunk of batches)",
            buckets=APPLY_BUCKETS_S, registry=registry)


class WorkerSeries:
    """Which worker ranks have series of their own: at most `cap`, the first seen, each
    keeping its series while it is in the index (no churn as others come and go)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._named: dict[RankKey, None] = {}

    def split(self, workers: list[WorkerInfo]) -> tuple[list[WorkerInfo], list[WorkerInfo]]:
        """(ranks with series of their own, ranks summed into "_other")."""
        present = {(w.model, w.worker_id, w.dp_rank): w for w in workers}
        for key in [k for k in self._named if k not in present]:
            del self._named[key]
        room = self.cap - len(self._named)
        if room > 0:
            new = sorted(k for k in present if k not in self._named)
            self._named.update(dict.fromkeys(new[:room]))
        named = [w for k, w in present.items() if k in self._named]
        return named, [w for k, w in present.items() if k not in self._named]


class _Collector(Collector):
    def __init__(self, exporter: MetricsExporter) -> None:
        self._exporter = exporter

    def collect(self) -> Iterator[Metric]:
        snap = self._exporter.snapshot
        idx, con = snap.index, snap.consumer
        counters = (
            ("kv_indexer_batches_applied", "Bus batches applied to the index", idx.batches_applied),
            ("kv_indexer_events_applied", "Events applied to the index", idx.events_applied),
            ("kv_indexer_blocks_stored", "Block entries added to the index", idx.blocks_stored),
            ("kv_indexer_blocks_removed", "Block entries removed", idx.blocks_removed),
            ("kv_indexer_duplicates", "Batches skipped as already applied",
             idx.duplicates),
            ("kv_indexer_stale", "Batches of an older epoch skipped", idx.stale),
            ("kv_indexer_gaps", "Sequence gaps seen by the consumer", con.gaps),
            ("kv_indexer_resyncs_requested", "Resyncs asked of publishers",
             con.resyncs_requested),
            ("kv_indexer_resync_retries", "Resync requests sent again: nobody answered",
             con.resync_retries),
            ("kv_indexer_resyncs_unanswered",
             "Resync requests given up after every retry", con.resyncs_unanswered),
            ("kv_indexer_messages", "Messages fetched from JetStream", con.messages),
            ("kv_indexer_backend_retries", "Index apply calls retried", con.backend_retries),
            ("kv_indexer_rebuilds", "Partition rebuilds (snapshot + stream replay)",
             con.rebuilds),
            ("kv_indexer_snapshots", "Partition snapshots stored", con.snapshots),
            ("kv_indexer_consumer_restarts", "Partition consumers restarted after a failure",
             con.consumer_restarts),
            ("kv_indexer_consumer_resets",
             "Durable consumers re-created or resubscribed: deliveries lost in transit",
             con.consumer_resets),
            ("kv_indexer_topology_restores",
             "Event stream found missing (NATS back without its data) and re-created",
             con.topology_restores),
        )
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)
        dropped = CounterMetricFamily("kv_indexer_dropped", "Events or blocks dropped",
                                      labels=["reason"])
        reasons = dict(idx.dropped)
        for reason, count in con.dropped.items():  # refused before the index (pools)
            reasons[reason] = reasons.get(reason, 0) + count
        for reason, count in sorted(reasons.items()):
            dropped.add_metric([reason], count)
        yield dropped
        failures = CounterMetricFamily(
            "kv_indexer_task_failures", "Background tasks that failed and were restarted",
            labels=["task"])
        for task, count in sorted(con.task_failures.items()):
            failures.add_metric([task], count)
        yield failures
        dead = CounterMetricFamily("kv_indexer_dead_letters", "Poison messages dead-lettered",
                                   labels=["reason"])
        for reason, count in sorted(con.dead_letters.items()):
            dead.add_metric([reason], count)
        yield dead
        lag = GaugeMetricFamily("kv_indexer_lag_seconds",
                                "DEPRECATED (removed in the next release): use the "
                                "kv_indexer_event_lag_seconds histogram. Event timestamp "
                                "to applied, recent quantiles",
                                labels=["quantile"])
        lag.add_metric(["0.5"], snap.lag_p50)
        lag.add_metric(["0.99"], snap.lag_p99)
        yield lag
        blocks = GaugeMetricFamily("kv_indexer_worker_blocks", "Blocks held per worker and tier",
                                   labels=["model", "worker", "dp_rank", "tier"])
        degraded = GaugeMetricFamily("kv_indexer_worker_degraded", "1 while a worker is degraded",
                                     labels=["model", "worker", "dp_rank"])
        for w in snap.named:
            for tier, n in w.blocks_by_tier.items():
                blocks.add_metric([w.model, w.worker_id, str(w.dp_rank), tier], n)
            degraded.add_metric([w.model, w.worker_id, str(w.dp_rank)], int(w.degraded))
        if snap.other_ranks:
            other = [OTHER_WORKERS] * 3
            for tier, n in sorted(snap.other_blocks.items()):
                blocks.add_metric([*other, tier], n)
            degraded.add_metric(other, snap.other_degraded)  # a count here, not 0 / 1
        yield blocks
        yield degraded
        yield GaugeMetricFamily("kv_indexer_workers", "Worker ranks in the index",
                                value=len(snap.workers))
        pool_blocks = GaugeMetricFamily(
            "kv_indexer_pool_blocks", "Blocks held per shared storage pool (the first "
            f"{MAX_POOL_SERIES} pools)", labels=["model", "pool"])
        for pool in snap.pools:
            pool_blocks.add_metric([pool.model, pool.worker_id],
                                   sum(pool.blocks_by_tier.values()))
        yield pool_blocks
        yield GaugeMetricFamily(
            "kv_indexer_worker_ranks_aggregated",
            f'Worker ranks beyond --metrics-max-workers, summed into worker="{OTHER_WORKERS}"',
            value=snap.other_ranks)
        yield from self._exporter.process_gauges()


class MetricsExporter:
    """Serves /metrics; `run()` refreshes the snapshot every `interval_s`."""

    def __init__(self, index: IndexReader, consumer: ConsumerStats,
                 registry: CollectorRegistry | None = None, interval_s: float = 2.0, *,
                 health: ServingHealth | None = None, probes: ProcessProbes | None = None,
                 leases: PartitionLeases | None = None,
                 max_worker_series: int = DEFAULT_MAX_WORKER_SERIES) -> None:
        self.health = health
        self.worker_series = WorkerSeries(max_worker_series)
        self.probes = probes
        self.leases = leases
        self.snapshot = _Snapshot()
        self.registry = registry or CollectorRegistry()
        self.registry.register(_Collector(self))
        self._index = index
        self._consumer = consumer
        self._interval_s = interval_s
        self.port = 0

    def process_gauges(self) -> Iterator[Metric]:
        """What health judges by, read live (cheap attributes only)."""
        con = self._consumer
        since = time.time() - con.last_applied_at if con.last_applied_at else -1.0
        yield GaugeMetricFamily("kv_indexer_seconds_since_last_apply",
                                "Seconds since a batch was last applied (-1: none yet)",
                                value=since)
        if self.health is not None:
            yield GaugeMetricFamily("kv_indexer_serving",
                                    "1 while gRPC health says SERVING, 0 while NOT_SERVING",
                                    value=int(self.health.serving))
        if self.probes is not None:
            yield GaugeMetricFamily("kv_indexer_backend_up",
                                    "1 while the index backend answers", value=int(
                                        self.probes.backend_up))
            pending = GaugeMetricFamily("kv_indexer_consumer_pending",
                                        "Messages of a held partition not yet applied",
                                        labels=["partition"])
            for partition, count in sorted(self.probes.pending.items()):
                pending.add_metric([str(partition)], count)
            yield pending
        if self.leases is not None:
            yield GaugeMetricFamily("kv_indexer_partitions_held",
                                    "Partitions whose lease this process holds",
                                    value=len(self.leases.held))

    def serve(self, listen: str) -> int:
        host, _, port = listen.rpartition(":")
        try:
            server, _thread = start_http_server(int(port), addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"--metrics-listen {listen}: cannot listen there "
                              f"({exc.strerror or exc})") from exc
        self.port = int(server.server_port)
        return self.port

    async def refresh(self) -> None:
        lags = list(self._consumer.lag_samples)[-10_000:]
        listed = await self._index.workers()
        workers = [w for w in listed if w.kind != KIND_POOL]
        pools = [w for w in listed if w.kind == KIND_POOL][:MAX_POOL_SERIES]
        named, others = self.worker_series.split(workers)
        other_blocks: dict[str, int] = {}
        for w in others:
            for tier, n in w.blocks_by_tier.items():
                other_blocks[tier] = other_blocks.get(tier, 0) + n
        self.snapshot = _Snapshot(
            index=await self._index.stats(), consumer=self._consumer, workers=workers,
            named=named, other_ranks=len(others), other_blocks=other_blocks,
            other_degraded=sum(w.degraded for w in others),
            lag_p50=statistics.median(lags) if lags else 0.0,
            lag_p99=sorted(lags)[int(0.99 * (len(lags) - 1))] if lags else 0.0,
            pools=pools,
        )

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):
                await self.refresh()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._interval_s)
