"""Score from Redis read replicas (`--redis-read-url`), within a staleness bound.

`ReplicaReadIndex` wraps the primary's `RedisIndex`: every write, ledger, marker and
worker listing stays on the primary; only Score goes to a replica (`EVALSHA_RO`, which a
replica accepts and which cannot write), and only to one known to be at most
`max_staleness_s` behind.

How far behind a replica is comes from replication offsets, read with this process's own
clock (no clock shared between hosts is assumed). Every `probe_interval_s` the monitor
reads the primary's `master_repl_offset` P, noting the monotonic time t at which it
*asked*: every write the primary had finished by t is within P. It then reads each
replica's applied offset R (`slave_repl_offset`). A replica that has R >= P for a sample
(t, P) holds every write the primary had by t, so its copy is at most `now - t` old; the
newest such t is its `fresh_as_of`. A replica's data only grows, so a query sent after
that probe answers from a copy at least that fresh: the staleness an answer carries,
`answered_at - fresh_as_of` with `fresh_as_of` read before the query left, is an upper
bound, never an estimate.

A replica is used while its last probe succeeded, it follows this primary (same
replication id, link up) and its bound is within `max_staleness_s`; otherwise (killed,
detached with REPLICAOF NO ONE, asleep, cut off from the primary), and for a query it
does not answer within `query_timeout_s`, Score goes to another usable replica or to
the primary. Answers from the primary carry staleness 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final
from urllib.parse import urlsplit

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from indexer.errors import BackendError
from indexer.index.protocol import (
    ApplyOutcome,
    IndexConfig,
    IndexStats,
    RankState,
    ScoreQuery,
    ScoreResult,
    WorkerInfo,
    WorkerRef,
)
from indexer.index.redis import RedisIndex
from kvcore.bus import EventBatch

__all__ = ["DEFAULT_MAX_STALENESS_S", "ReadReplica", "ReplicaReadIndex"]

log = structlog.get_logger("indexer.read_replicas")

DEFAULT_MAX_STALENESS_S: Final = 1.0
DEFAULT_PROBE_INTERVAL_S: Final = 0.1
DEFAULT_QUERY_TIMEOUT_S: Final = 0.25
_PROBE_TIMEOUT_S: Final = 1.0


def replica_address(url: str) -> str:
    """host:port (or the socket path) of a Redis URL: what answers name, no secrets."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname}:{parts.port or 6379}"


def _info_fields(text: bytes | str | dict[str, Any]) -> dict[str, str]:
    """INFO replication as flat strings (redis-py parses it into a dict already)."""
    if isinstance(text, dict):
        return {str(k): str(v) for k, v in text.items()}
    raw = text.decode() if isinstance(text, bytes) else text
    fields = {}
    for line in raw.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


class ReadReplica:
    """One replica: its read-only index, its probe connection, what the last probe said."""

    def __init__(self, url: str, config: IndexConfig,
                 redis_options: dict[str, Any] | None = None) -> None:
        self.address = replica_address(url)
        self.index = RedisIndex.from_url(url, config=config, redis_options=redis_options,
                                         read_only=True)
        self._probe = aioredis.Redis.from_url(url, decode_responses=False,
                                              socket_timeout=_PROBE_TIMEOUT_S,
                                              **(redis_options or {}))
        self.fresh_as_of: float | None = None  # monotonic: it held every write of then
        self.usable = False
        self.reason = "not probed yet"

    async def applied_offset(self, primary_replid: str) -> int:
        """The replication offset it has applied; RuntimeError if it is no replica of
        the primary whose replication id is `primary_replid`, or its link is down."""
        fields = _info_fields(await self._probe.info("replication"))
        if fields.get("role") != "slave":
            raise RuntimeError(f"not a replica (role {fields.get('role')})")
        if fields.get("master_link_status") != "up":
            raise RuntimeError("replication link down")
        if fields.get("master_replid") != primary_replid:
            raise RuntimeError("replica of another primary")
        return int(fields["slave_repl_offset"])

    def staleness(self, now: float) -> float:
        return float("inf") if self.fresh_as_of is None else now - self.fresh_as_of

    def mark(self, usable: bool, reason: str) -> None:
        if usable != self.usable:
            if usable:
                log.info("read_replica_usable", replica=self.address)
            else:
                log.warning("read_replica_unusable", replica=self.address, reason=reason)
        self.usable, self.reason = usable, reason

    async def close(self) -> None:
        await self.index.close()
        await self._probe.aclose()


class ReplicaReadIndex:
    """The Index on a Redis primary, with Score served by its read replicas."""

    def __init__(self, primary: RedisIndex, replicas: Sequence[ReadReplica], *,
                 primary_probe: aioredis.Redis,
                 max_staleness_s: float = DEFAULT_MAX_STALENESS_S,
                 probe_interval_s: float = DEFAULT_PROBE_INTERVAL_S,
                 query_timeout_s: float = DEFAULT_QUERY_TIMEOUT_S) -> None:
        self.primary = primary
        self.replicas = list(replicas)
        self.max_staleness_s = max_staleness_s
        self.probe_interval_s = probe_interval_s
        self.query_timeout_s = query_timeout_s
        self._primary_probe = primary_probe
        # (asked at, primary offset), oldest first; kept for twice the bound
        self._samples: deque[tuple[float, int]] = deque()
        self._primary_replid: str | None = None
        self._turn = itertools.count()
        self.reads: dict[str, int] = {}  # Score answers by source: replica address, "primary"
        self._monitor: asyncio.Task[None] | None = None

    @classmethod
    def from_urls(cls, primary_url: str, read_urls: Sequence[str], *, config: IndexConfig,
                  redis_options: dict[str, Any] | None = None, **kwargs: Any
                  ) -> ReplicaReadIndex:
        primary = kwargs.pop("primary", None) or RedisIndex.from_url(
            primary_url, config=config, redis_options=redis_options,
            on_resync=kwargs.pop("on_resync", None))
        probe = aioredis.Redis.from_url(primary_url, decode_responses=False,
                                        socket_timeout=_PROBE_TIMEOUT_S,
                                        **(redis_options or {}))
        replicas = [ReadReplica(url, config, redis_options) for url in read_urls]
        return cls(primary, replicas, primary_probe=probe, **kwargs)

    # --- the staleness monitor ---------------------------------------------------------

    def _ensure_monitor(self) -> None:
        """Probing starts with the first call in an event loop (the index is built
        before one runs); until the first round, the primary answers."""
        if self._monitor is None or self._monitor.done():
            self._monitor = asyncio.get_running_loop().create_task(self._run_monitor())

    async def _run_monitor(self) -> None:
        """The primary sampled, and each replica probed, on loops of their own: a replica
        that does not answer holds up nobody else's bound."""
        await asyncio.gather(self._every_interval(self._sample_primary),
                             *(self._every_interval(functools.partial(self._probe_replica, r))
                               for r in self.replicas))

    async def _every_interval(self, step: Callable[[], Awaitable[None]]) -> None:
        while True:
            try:
                await step()
            except Exception as exc:  # noqa: BLE001 - a probe's bug must not end probing
                log.warning("read_replica_probe_failed", error=repr(exc))
            await asyncio.sleep(self.probe_interval_s)

    async def probe(self) -> None:
        """One round, in order: the primary's offset, then each replica's."""
        await self._sample_primary()
        for replica in self.replicas:
            await self._probe_replica(replica)

    async def _sample_primary(self) -> None:
        asked_at = time.monotonic()
        try:
            fields = _info_fields(await asyncio.wait_for(
                self._primary_probe.info("replication"), _PROBE_TIMEOUT_S))
            offset, replid = int(fields["master_repl_offset"]), fields["master_replid"]
        except (RedisError, OSError, TimeoutError, KeyError, ValueError) as exc:
            log.debug("primary_probe_failed", error=repr(exc))
            return  # no new sample: every replica's bound ages
        if replid != self._primary_replid:
            # Another replication history (a restarted or failed-over primary): offsets
            # of the old one say nothing about the new one.
            self._samples.clear()
            for replica in self.replicas:
                replica.fresh_as_of = None
            self._primary_replid = replid
        self._samples.append((asked_at, offset))
        keep_from = asked_at - max(2 * self.max_staleness_s, 2.0)
        while len(self._samples) > 1 and self._samples[0][0] < keep_from:
            self._samples.popleft()

    async def _probe_replica(self, replica: ReadReplica) -> None:
        if self._primary_replid is None:
            return  # no primary sample yet
        samples = list(self._samples)  # those taken before the replica is asked
        try:
            applied = await asyncio.wait_for(replica.applied_offset(self._primary_replid),
                                             _PROBE_TIMEOUT_S)
        except (RedisError, OSError, TimeoutError, RuntimeError, KeyError,
                ValueError) as exc:
            replica.fresh_as_of = None
            replica.mark(False, str(exc) or type(exc).__name__)
            return
        held = [asked for asked, offset in samples if offset <= applied]
        if held:
            replica.fresh_as_of = max(held[-1], replica.fresh_as_of or held[-1])
        stale = replica.staleness(time.monotonic())
        if stale <= self.max_staleness_s:
            replica.mark(True, "ok")
        else:
            replica.mark(False, f"{stale:.3f} s behind the primary" if held
                         else "behind every primary offset sampled")

    # --- queries -----------------------------------------------------------------------

    def _pick(self) -> ReadReplica | None:
        """A usable replica, in turn; None: the primary answers."""
        now = time.monotonic()
        usable = [r for r in self.replicas
                  if r.usable and r.staleness(now) <= self.max_staleness_s]
        return usable[next(self._turn) % len(usable)] if usable else None

    async def score(self, query: ScoreQuery) -> ScoreResult:
        self._ensure_monitor()
        tried: set[ReadReplica] = set()
        while (replica := self._pick()) is not None and replica not in tried:
            tried.add(replica)
            fresh_as_of = replica.fresh_as_of
            assert fresh_as_of is not None
            try:
                result = await asyncio.wait_for(replica.index.score(query),
                                                self.query_timeout_s)
            except (BackendError, TimeoutError) as exc:
                replica.mark(False, f"query failed: {exc!r}")  # until its next good probe
                replica.fresh_as_of = None
                continue
            staleness = time.monotonic() - fresh_as_of
            self._count(replica.address)
            return ScoreResult(result.query_blocks, result.scores,
                               staleness_s=staleness, replica=replica.address)
        result = await self.primary.score(query)
        self._count("primary")
        return result

    def _count(self, source: str) -> None:
        self.reads[source] = self.reads.get(source, 0) + 1

    # --- everything else: the primary --------------------------------------------------

    @property
    def config(self) -> IndexConfig:
        return self.primary.config

    async def apply(self, batches: Sequence[EventBatch], *,
                    validated: bool = False) -> list[ApplyOutcome]:
        return await self.primary.apply(batches, validated=validated)

    async def ping(self) -> None:
        self._ensure_monitor()  # health pings every process's index from its start
        await self.primary.ping()

    async def clear_worker(self, model: str, worker_id: str, dp_rank: int | None = None) -> int:
        return await self.primary.clear_worker(model, worker_id, dp_rank)

    async def remove_worker(self, model: str, worker_id: str) -> int:
        return await self.primary.remove_worker(model, worker_id)

    async def remove_pool(self, model: str, pool: str) -> bool:
        return await self.primary.remove_pool(model, pool)

    async def drop_empty_models(self) -> list[str]:
        return await self.primary.drop_empty_models()

    async def workers(self, model: str | None = None) -> list[WorkerInfo]:
        self._ensure_monitor()  # a reader process lists workers from its start
        return await self.primary.workers(model)

    async def block_size(self, model: str) -> int | None:
        return await self.primary.block_size(model)

    async def stats(self) -> IndexStats:
        return await self.primary.stats()

    async def presence(self, model: str) -> dict[int, dict[WorkerRef, int]]:
        return await self.primary.presence(model)

    async def export_ranks(self, ranks: Sequence[tuple[str, WorkerRef]]) -> list[RankState]:
        return await self.primary.export_ranks(ranks)

    async def import_ranks(self, states: Sequence[RankState]) -> None:
        await self.primary.import_ranks(states)

    async def reset_caches(self) -> None:
        await self.primary.reset_caches()

    async def get_marker(self, name: str) -> str | None:
        return await self.primary.get_marker(name)

    async def set_marker(self, name: str, value: str | None) -> None:
        await self.primary.set_marker(name, value)

    async def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._monitor
        for replica in self.replicas:
            await replica.close()
        await self._primary_probe.aclose()
        await self.primary.close()
