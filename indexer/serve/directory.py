"""Live workers per model, as Score and FindBestWorker see them: a cached `CandidateSet` per
model, refreshed from a `LiveWorkerSource` (the index's worker list or the liveness registry)."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Final, NamedTuple

import structlog

from indexer.index.protocol import WorkerInfo
from kvcore.pools import KIND_POOL
from kvcore.roles import STORE, role_matches

__all__ = ["CandidateSet", "LiveWorkerSource", "WorkerDirectory"]

log = structlog.get_logger("indexer.serve.directory")

LiveWorkerSource = Callable[[str | None], Awaitable[list[WorkerInfo]]]

_STALE_FACTOR: Final = 4  # a cached worker list this many TTLs old is still served (refreshing)
# An empty worker list is kept this long at most, and never served stale: a model without
# workers is usually one whose first workers are about to register (start-up), and each
# call refused meanwhile is a routing decision lost.
_EMPTY_TTL_S: Final = 0.05
_MAX_CACHED_MODELS: Final = 4096


class CandidateSet:
    """Live (worker, dp_rank)s of one model, with what Score needs of them precomputed."""

    __slots__ = ("_by_role", "_ordered", "_positions", "degraded", "ids", "mounts",
                 "newest_ts", "refs", "workers")

    def __init__(self, workers: Sequence[WorkerInfo]) -> None:
        # Shared storage pools, and the stores publishing their content, are listed with
        # the workers but are never candidates.
        self.workers = tuple(w for w in workers if w.kind != KIND_POOL and w.role != STORE)
        # worker id -> the pools it mounts (Score credits their blocks), for those mounting
        self.mounts = {w.worker_id: frozenset(w.storage_pools)
                       for w in self.workers if w.storage_pools}
        self.ids = frozenset(w.worker_id for w in self.workers)
        self.refs = frozenset((w.worker_id, w.dp_rank) for w in self.workers)
        self.newest_ts = max((w.last_event_ts for w in self.workers), default=0.0)
        self.degraded = sorted({w.worker_id for w in self.workers if w.degraded})
        self._by_role: dict[str, CandidateSet] = {}
        self._ordered: tuple[tuple[str, int], ...] | None = None
        self._positions: dict[tuple[str, int], int] | None = None

    @property
    def ordered_refs(self) -> tuple[tuple[str, int], ...]:
        """Every (worker_id, dp_rank), sorted (FindBestWorker's last tie-break), computed
        once per set."""
        if self._ordered is None:
            self._ordered = tuple(sorted(self.refs))
        return self._ordered

    @property
    def positions(self) -> dict[tuple[str, int], int]:
        """(worker_id, dp_rank) -> its index in `ordered_refs` (ties broken by number, not
        by string compares), computed once per set."""
        if self._positions is None:
            self._positions = {ref: i for i, ref in enumerate(self.ordered_refs)}
        return self._positions

    def restrict(self, worker_ids: Collection[str]) -> CandidateSet:
        """The candidates whose worker id is in `worker_ids`."""
        return CandidateSet([w for w in self.workers if w.worker_id in worker_ids])

    def with_role(self, role: str) -> CandidateSet:
        """The candidates a role filter admits (kvcore/roles.py; "" = all of them), kept
        with this set: a cached model's filtered sets are computed once per refresh."""
        if not role:
            return self
        found = self._by_role.get(role)
        if found is None:
            found = self._by_role[role] = CandidateSet(
                [w for w in self.workers if role_matches(w.role, role)])
        return found

    def __len__(self) -> int:
        return len(self.workers)


class _Cached(NamedTuple):
    fetched: float  # time.monotonic() when the fetch started
    candidates: CandidateSet


class WorkerDirectory:
    """Live workers per model, from `source`, each list reused for `ttl` seconds.

    One fetch per model at a time: concurrent callers share it. An expired list younger
    than `4 * ttl` is still answered while a refresh runs in the background, so a slow
    source (Redis) costs no request its latency; an older one waits for the refresh.
    An empty list lives at most `_EMPTY_TTL_S` and is never answered stale.
    """

    def __init__(self, source: LiveWorkerSource, ttl: float) -> None:
        self.source = source
        self.ttl = ttl
        self._cache: dict[str, _Cached] = {}
        self._refreshing: dict[str, asyncio.Task[CandidateSet]] = {}

    async def candidates(self, model: str) -> CandidateSet:
        if self.ttl <= 0:
            return CandidateSet(await self.source(model))
        now = time.monotonic()
        cached = self._cache.get(model)
        if cached is not None and not cached.candidates:
            if now - cached.fetched < min(self.ttl, _EMPTY_TTL_S):
                return cached.candidates
            cached = None  # wait for the refresh below
        if cached is not None and now - cached.fetched < self.ttl:
            return cached.candidates
        task = self._refreshing.get(model)
        if task is None:
            task = asyncio.create_task(self._refresh(model))
            self._refreshing[model] = task
            task.add_done_callback(functools.partial(self._refreshed, model))
        if cached is not None and now - cached.fetched < self.ttl * _STALE_FACTOR:
            return cached.candidates
        return await asyncio.shield(task)

    async def listing(self, model: str | None) -> list[WorkerInfo]:
        """Every live worker (of one model, or all), uncached: for ListWorkers, GetStats."""
        return await self.source(model)

    async def _refresh(self, model: str) -> CandidateSet:
        started = time.monotonic()
        found = CandidateSet(await self.source(model))
        if len(self._cache) >= _MAX_CACHED_MODELS and model not in self._cache:
            del self._cache[next(iter(self._cache))]
        self._cache[model] = _Cached(started, found)
        return found

    def _refreshed(self, model: str, task: asyncio.Task[CandidateSet]) -> None:
        self._refreshing.pop(model, None)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("worker_refresh_failed", error=str(exc))
