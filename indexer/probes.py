"""What an indexer process checks before it says SERVING (`indexer.serve.health`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Final

from nats.aio.client import Client as NatsClient

from indexer.errors import BackendError
from indexer.index.protocol import IndexReader
from indexer.ingest.consumer import PartitionConsumer
from indexer.ingest.partitions import PartitionLeases
from indexer.serve.health import Probe

__all__ = ["ProcessProbes"]

# NATS reconnects within a second or two of a blip; past this its absence is an outage.
NATS_GRACE_S: Final = 3.0


class ProcessProbes:
    """The probes of one indexer process, and the gauges they measure on the way."""

    def __init__(self, index: IndexReader, nc: NatsClient,
                 consumers: Callable[[], Iterable[PartitionConsumer]],
                 leases: PartitionLeases | None, *, stall_s: float) -> None:
        self.index = index
        self.nc = nc
        self.consumers = consumers
        self.leases = leases
        self.stall_s = stall_s
        self.backend_up = True
        self.pending: dict[int, int] = {}  # partition -> messages not yet applied
        self._nats_down_since: float | None = None
        self._unheld_since: float | None = None

    def probes(self) -> list[Probe]:
        found: list[Probe] = [self.backend, self.nats]
        if self.leases is not None:
            found.append(self.partitions)
        found.append(self.ingest)
        return found

    async def backend(self) -> str | None:
        try:
            await self.index.ping()
        except BackendError as exc:
            self.backend_up = False
            return f"index backend unreachable: {exc}"
        self.backend_up = True
        return None

    async def nats(self) -> str | None:
        if self.nc.is_connected:
            self._nats_down_since = None
            return None
        now = time.monotonic()
        since = self._nats_down_since = self._nats_down_since or now
        if now - since < NATS_GRACE_S:
            return None
        return f"NATS unreachable for {now - since:.0f} s: the index is frozen"

    async def partitions(self) -> str | None:
        """A process whose fair share is at least one partition but holds none, while some
        partition has no holder, ingests nothing (NATS away, leases lost): its answers
        age. One holding none because others hold every partition is a spare: fine.
        A consumer stopping (its lease handed back) for longer than `stall_s` holds its
        partition with nobody ingesting it."""
        assert self.leases is not None
        if slow := self.leases.slow_stops(self.stall_s):
            return "; ".join(f"partition {partition}'s consumer has not stopped in {s:.0f} s"
                             for partition, s in sorted(slow.items()))
        if self.leases.held or self.leases.share == 0 or self.leases.all_taken:
            self._unheld_since = None
            return None
        now = time.monotonic()
        since = self._unheld_since = self._unheld_since or now
        if now - since < self.leases.ttl_s:
            return None
        return f"holds no partition (its share is {self.leases.share})"

    async def ingest(self) -> str | None:
        """A partition with pending messages and no progress for `stall_s` is stalled."""
        if not self.nc.is_connected:
            return None  # the NATS probe speaks for this
        stalled = []
        now = time.monotonic()
        pending: dict[int, int] = {}
        for consumer in self.consumers():
            try:
                waiting = pending[consumer.partition] = await consumer.pending()
            except Exception:  # noqa: BLE001 - rebuilding (no consumer yet) or a blip
                continue
            if waiting and now - consumer.last_progress > self.stall_s:
                stalled.append(f"{consumer.partition} ({waiting} pending, "
                               f"{now - consumer.last_progress:.0f} s without progress)")
        self.pending = pending
        return f"ingest stalled on partition {', '.join(stalled)}" if stalled else None
