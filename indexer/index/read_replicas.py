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

The sub-slot layout (`ShardedRedisIndex`, `--redis-subslots`) reads the same way, per
master: on one node every replica follows the one primary; on a Redis Cluster each
replica (READONLY on connecting) follows the master its INFO names, whose offsets are
sampled on their own, so each replica's bound is against its own master. A Score picks,
for each master, one usable replica of it (none: that master answers), sends that
master's share of the reads to it (`read_from`), and carries the worst bound among the
replicas it picked; a replica that fails its share is marked unusable and the Score is
asked again without it. Each block an answer credits was held, at some moment within
that bound, by the rank credited: the directory's slot map may come from the master,
and slot ids are never reused, so a map newer or older than a replica's holder lists
loses blocks, never moves them to another rank.
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
from indexer.index.redis_pipe import RedisPipe
from indexer.index.redis_sharded import ReplicaReadError, ShardedRedisIndex
from kvcore.bus import EventBatch

__all__ = ["DEFAULT_MAX_STALENESS_S", "ReadReplica", "ReplicaReadIndex"]

# The master name a one-node Redis's replicas follow (ShardedRedisIndex._node_name).
_ONE_NODE: Final = frozenset({""})

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


def _pipe_to(url: str, redis_options: dict[str, Any] | None, *, readonly: bool,
             timeout_s: float) -> RedisPipe:
    """The pipelined connection a sub-slot Score reads a replica through; a replica too
    slow to connect or answer within `timeout_s` fails its share (then is not read)."""
    client = aioredis.Redis.from_url(url, socket_timeout=timeout_s,
                                     socket_connect_timeout=timeout_s, **(redis_options or {}))
    pipe = RedisPipe.for_client(client, readonly=readonly)
    if pipe is None:
        raise BackendError(f"read replica {replica_address(url)}: its connection settings "
                           "need redis-py (RESP3 or a credential provider)")
    return pipe


class ReadReplica:
    """One replica: how Score reads it (a read-only `RedisIndex`, or for the sub-slot
    layout a pipe), its probe connection, what the last probe said."""

    def __init__(self, url: str, config: IndexConfig,
                 redis_options: dict[str, Any] | None = None, *, subslots: bool = False,
                 cluster: bool = False,
                 query_timeout_s: float = DEFAULT_QUERY_TIMEOUT_S) -> None:
        self.address = replica_address(url)
        self.index = None if subslots else RedisIndex.from_url(
            url, config=config, redis_options=redis_options, read_only=True)
        self.pipe = _pipe_to(url, redis_options, readonly=cluster,
                             timeout_s=query_timeout_s) if subslots else None
        self._probe = aioredis.Redis.from_url(url, decode_responses=False,
                                              socket_timeout=_PROBE_TIMEOUT_S,
                                              **(redis_options or {}))
        self.fresh_as_of: float | None = None  # monotonic: it held every write of then
        self.follows = ""  # the master it replicates (host:port), as its last probe said
        self.usable = False
        self.reason = "not probed yet"

    async def replication(self) -> tuple[str, str, int]:
        """The master it follows (host:port), that master's replication id, and the
        offset it has applied; RuntimeError if it is no replica or its link is down."""
        fields = _info_fields(await self._probe.info("replication"))
        if fields.get("role") != "slave":
            raise RuntimeError(f"not a replica (role {fields.get('role')})")
        if fields.get("master_link_status") != "up":
            raise RuntimeError("replication link down")
        master = f"{fields.get('master_host')}:{fields.get('master_port')}"
        return master, fields["master_replid"], int(fields["slave_repl_offset"])

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
        if self.index is not None:
            await self.index.close()
        if self.pipe is not None:
            await self.pipe.close()
        await self._probe.aclose()


class _Primary:
    """A primary's replication history as sampled: its id, (asked at, offset) oldest
    first."""

    def __init__(self, probe: aioredis.Redis) -> None:
        self.probe = probe
        self.samples: deque[tuple[float, int]] = deque()
        self.replid: str | None = None


class ReplicaReadIndex:
    """The Index on a Redis primary (or a sub-slot index on one node or a cluster), with
    Score served by read replicas."""

    def __init__(self, primary: RedisIndex | ShardedRedisIndex,
                 replicas: Sequence[ReadReplica], *,
                 primary_probe: aioredis.Redis | None = None,
                 node_url: Callable[[str], str] | None = None,
                 node_options: dict[str, Any] | None = None,
                 max_staleness_s: float = DEFAULT_MAX_STALENESS_S,
                 probe_interval_s: float = DEFAULT_PROBE_INTERVAL_S,
                 query_timeout_s: float = DEFAULT_QUERY_TIMEOUT_S) -> None:
        """`primary_probe`: a connection to the one primary; or, on a Redis Cluster,
        `node_url` (a master's host:port -> its URL) with `node_options` to probe each
        master the primary index knows."""
        if (primary_probe is None) == (node_url is None):
            raise ValueError("a primary probe, or a cluster's node_url: exactly one")
        self.primary = primary
        self.replicas = list(replicas)
        self.max_staleness_s = max_staleness_s
        self.probe_interval_s = probe_interval_s
        self.query_timeout_s = query_timeout_s
        self._node_url = node_url
        self._node_options = node_options or {}
        # master name ("" for the one primary) -> its samples, kept for twice the bound
        self._primaries: dict[str, _Primary] = (
            {"": _Primary(primary_probe)} if primary_probe is not None else {})
        self._turn = itertools.count()
        self.reads: dict[str, int] = {}  # Score answers by source: replica address, "primary"
        self._monitor: asyncio.Task[None] | None = None

    @classmethod
    def from_urls(cls, primary_url: str, read_urls: Sequence[str], *, config: IndexConfig,
                  redis_options: dict[str, Any] | None = None, **kwargs: Any
                  ) -> ReplicaReadIndex:
        """Replicas of the primary at `primary_url`; with `primary` a ShardedRedisIndex,
        read through pipes (READONLY ones on a cluster, each following one master)."""
        primary = kwargs.pop("primary", None) or RedisIndex.from_url(
            primary_url, config=config, redis_options=redis_options,
            on_resync=kwargs.pop("on_resync", None))
        subslots = isinstance(primary, ShardedRedisIndex)
        cluster = bool(kwargs.pop("cluster", False)) and subslots
        timeout = kwargs.get("query_timeout_s", DEFAULT_QUERY_TIMEOUT_S)
        replicas = [ReadReplica(url, config, redis_options, subslots=subslots, cluster=cluster,
                                query_timeout_s=timeout) for url in read_urls]
        if cluster:
            scheme = "rediss" if "rediss" in urlsplit(primary_url).scheme else "redis"
            return cls(primary, replicas, node_url=lambda name: f"{scheme}://{name}",
                       node_options=redis_options, **kwargs)
        probe = aioredis.Redis.from_url(primary_url, decode_responses=False,
                                        socket_timeout=_PROBE_TIMEOUT_S,
                                        **(redis_options or {}))
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
        await asyncio.gather(self._every_interval(self._sample_primaries),
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
        """One round, in order: the primaries' offsets, then each replica's."""
        await self._sample_primaries()
        for replica in self.replicas:
            await self._probe_replica(replica)

    def _master_of(self, replica: ReadReplica) -> str:
        """The key of the primary a replica's offsets compare with."""
        return replica.follows if self._node_url is not None else ""

    async def _sample_primaries(self) -> None:
        """Each primary's offset, in parallel; on a cluster, the masters the primary
        index knows now (a failover brings new ones, drops old ones)."""
        if self._node_url is not None:
            assert isinstance(self.primary, ShardedRedisIndex)
            masters = self.primary.master_names()
            for name in set(self._primaries) - masters:
                await self._primaries.pop(name).probe.aclose()
            for name in masters - set(self._primaries):
                self._primaries[name] = _Primary(aioredis.Redis.from_url(
                    self._node_url(name), decode_responses=False,
                    socket_timeout=_PROBE_TIMEOUT_S, **self._node_options))
        await asyncio.gather(*(self._sample_primary(name, primary)
                               for name, primary in list(self._primaries.items())))

    async def _sample_primary(self, name: str, primary: _Primary) -> None:
        asked_at = time.monotonic()
        try:
            fields = _info_fields(await asyncio.wait_for(
                primary.probe.info("replication"), _PROBE_TIMEOUT_S))
            offset, replid = int(fields["master_repl_offset"]), fields["master_replid"]
        except (RedisError, OSError, TimeoutError, KeyError, ValueError) as exc:
            log.debug("primary_probe_failed", primary=name, error=repr(exc))
            return  # no new sample: the bound of every replica following it ages
        if replid != primary.replid:
            # Another replication history (a restarted or failed-over primary): offsets
            # of the old one say nothing about the new one.
            primary.samples.clear()
            for replica in self.replicas:
                if self._master_of(replica) == name:
                    replica.fresh_as_of = None
            primary.replid = replid
        primary.samples.append((asked_at, offset))
        keep_from = asked_at - max(2 * self.max_staleness_s, 2.0)
        while len(primary.samples) > 1 and primary.samples[0][0] < keep_from:
            primary.samples.popleft()

    async def _probe_replica(self, replica: ReadReplica) -> None:
        # the samples taken before the replica is asked
        samples = {name: list(p.samples) for name, p in self._primaries.items()}
        try:
            follows, replid, applied = await asyncio.wait_for(replica.replication(),
                                                              _PROBE_TIMEOUT_S)
        except (RedisError, OSError, TimeoutError, RuntimeError, KeyError,
                ValueError) as exc:
            replica.fresh_as_of = None
            replica.mark(False, str(exc) or type(exc).__name__)
            return
        if follows != replica.follows:
            replica.fresh_as_of = None  # its bound was against another master's offsets
            replica.follows = follows
        primary = self._primaries.get(self._master_of(replica))
        if primary is None or primary.replid is None:
            replica.mark(False, f"follows {follows}: no offsets of it sampled")
            return
        if replid != primary.replid:
            replica.fresh_as_of = None
            replica.mark(False, "replica of another primary")
            return
        held = [asked for asked, offset in samples.get(self._master_of(replica), [])
                if offset <= applied]
        if held:
            replica.fresh_as_of = max(held[-1], replica.fresh_as_of or held[-1])
        stale = replica.staleness(time.monotonic())
        if stale <= self.max_staleness_s:
            replica.mark(True, "ok")
        else:
            replica.mark(False, f"{stale:.3f} s behind the primary" if held
                         else "behind every primary offset sampled")

    # --- queries -----------------------------------------------------------------------

    def _usable(self) -> list[ReadReplica]:
        now = time.monotonic()
        return [r for r in self.replicas
                if r.usable and r.staleness(now) <= self.max_staleness_s]

    def _pick(self) -> ReadReplica | None:
        """A usable replica, in turn; None: the primary answers."""
        usable = self._usable()
        return usable[next(self._turn) % len(usable)] if usable else None

    def _pick_per_master(self, tried: set[ReadReplica]) -> dict[str, ReadReplica]:
        """Per master ("" for the one primary), a usable replica of it not yet tried, in
        turn; a master without one is read itself."""
        by_master: dict[str, list[ReadReplica]] = {}
        for replica in self._usable():
            if replica not in tried:
                by_master.setdefault(self._master_of(replica), []).append(replica)
        turn = next(self._turn)
        return {master: found[turn % len(found)] for master, found in by_master.items()}

    @staticmethod
    def _failed(replica: ReadReplica, exc: Exception) -> None:
        replica.mark(False, f"query failed: {exc!r}")  # until its next good probe
        replica.fresh_as_of = None

    async def score(self, query: ScoreQuery) -> ScoreResult:
        self._ensure_monitor()
        if isinstance(self.primary, ShardedRedisIndex):
            return await self._score_per_master(self.primary, query)
        tried: set[ReadReplica] = set()
        while (replica := self._pick()) is not None and replica not in tried:
            tried.add(replica)
            fresh_as_of = replica.fresh_as_of
            assert fresh_as_of is not None and replica.index is not None
            try:
                result = await asyncio.wait_for(replica.index.score(query),
                                                self.query_timeout_s)
            except (BackendError, TimeoutError) as exc:
                self._failed(replica, exc)
                continue
            staleness = time.monotonic() - fresh_as_of
            self._count(replica.address)
            return ScoreResult(result.query_blocks, result.scores,
                               staleness_s=staleness, replica=replica.address)
        result = await self.primary.score(query)
        self._count("primary")
        return result

    async def _score_per_master(self, primary: ShardedRedisIndex,
                                query: ScoreQuery) -> ScoreResult:
        """Each master's share of the reads from a usable replica of it; the answer
        carries the worst bound among them (their addresses, comma-separated)."""
        tried: set[ReadReplica] = set()
        while True:
            picked = self._pick_per_master(tried)
            bounds = [r.fresh_as_of for r in picked.values()]
            read_from = {master: r.pipe for master, r in picked.items() if r.pipe is not None}
            try:
                result = await primary.score(query, read_from=read_from)
            except ReplicaReadError as exc:
                failed = picked[exc.node]
                self._failed(failed, exc)
                tried.add(failed)
                continue
            for replica in picked.values():
                self._count(replica.address)
            if not (primary.master_names() or _ONE_NODE) <= picked.keys():
                self._count("primary")  # a master without a usable replica read itself
            if not picked:
                return result
            oldest = min(bound for bound in bounds if bound is not None)
            return ScoreResult(result.query_blocks, result.scores,
                               staleness_s=time.monotonic() - oldest,
                               replica=",".join(sorted(r.address for r in picked.values())))

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
        for primary in self._primaries.values():
            await primary.probe.aclose()
        await self.primary.close()
