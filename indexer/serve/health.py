"""gRPC health that tells the truth: NOT_SERVING while answers would be wrong or frozen.

`ServingHealth` runs its probes every `interval_s` and sets the standard health service's
status for "" and `kvindex.v1.KvIndexer` alike. A probe returns None when its part is
fine, else the reason (logged when the status changes, exported on /metrics). The
service's probes (`indexer.app`): the index backend answers, NATS is connected, the
process holds the partitions it should, and no held partition has pending messages
without progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import structlog
from grpc_health.v1 import health, health_pb2

from indexer.serve.grpc_handlers import SERVICE_NAME

__all__ = ["HEALTH_NAMES", "Probe", "ServingHealth"]

log = structlog.get_logger("indexer.serve.health")

HEALTH_NAMES: Final = ("", SERVICE_NAME)
Probe = Callable[[], Awaitable[str | None]]
_PROBE_TIMEOUT_S: Final = 2.0


class ServingHealth:
    """Runs the probes; the health servicer follows their verdict."""

    def __init__(self, servicer: health.aio.HealthServicer, probes: Sequence[Probe],
                 interval_s: float = 1.0) -> None:
        self.servicer = servicer
        self.probes = list(probes)
        self.interval_s = interval_s
        self.serving = True
        self.reasons: list[str] = []
        self.changed_at = time.monotonic()

    async def check(self) -> list[str]:
        reasons = []
        for probe in self.probes:
            try:
                reason = await asyncio.wait_for(probe(), _PROBE_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - a probe that fails is a verdict too
                reason = f"{getattr(probe, '__name__', 'probe')} failed: {exc!r}"
            if reason is not None:
                reasons.append(reason)
        return reasons

    async def update(self) -> None:
        self.reasons = await self.check()
        serving = not self.reasons
        if serving != self.serving:
            self.serving = serving
            self.changed_at = time.monotonic()
            if serving:
                log.info("health_serving")
            else:
                log.warning("health_not_serving", reasons=self.reasons)
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in HEALTH_NAMES:
            await self.servicer.set(name, status)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.update()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)
