"""Prometheus series of the Redis read replicas (`ReplicaReadIndex`), collected at scrape
time from what its probes last found: no metrics code in the index itself."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from indexer.index.read_replicas import ReplicaReadIndex

__all__ = ["ReadReplicaCollector"]


class ReadReplicaCollector(Collector):
    """Per replica: usable or not, its staleness bound; Score answers by source."""

    def __init__(self, index: ReplicaReadIndex) -> None:
        self._index = index

    def collect(self) -> Iterator[Metric]:
        now = time.monotonic()
        usable = GaugeMetricFamily(
            "kv_indexer_read_replica_usable",
            "1 while the read replica may answer Score (probed fit, within the bound)",
            labels=["replica"])
        staleness = GaugeMetricFamily(
            "kv_indexer_read_replica_staleness_seconds",
            "Upper bound on how far the read replica is behind the primary; -1: unknown",
            labels=["replica"])
        for replica in self._index.replicas:
            bound = replica.staleness(now)
            fit = replica.usable and bound <= self._index.max_staleness_s
            usable.add_metric([replica.address], 1.0 if fit else 0.0)
            staleness.add_metric([replica.address], bound if bound != float("inf") else -1.0)
        reads = CounterMetricFamily(
            "kv_indexer_read_replica_reads", "Score answers by source: a replica's "
            "host:port (each replica of a sub-slot answer that read several), or primary",
            labels=["source"])
        for source, count in sorted(self._index.reads.items()):
            reads.add_metric([source], float(count))
        yield usable
        yield staleness
        yield reads
