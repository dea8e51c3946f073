"""Worker liveness: publishers keep an entry in a KV bucket with a TTL; the indexer drops
the blocks of a worker whose entry expired or was deleted, after a grace period.

The watcher tracks when each entry was last written. A worker counts as gone when its entry
was deleted, or was not refreshed within the bucket TTL; once gone for `grace_s` it is
removed from the index (all DP ranks). Workers the index holds that never had an entry
since this process started are treated the same way, from start-up on.

Removing a model's last worker removes the model from the index. Models the index lists
without any worker (left by older versions, or by a crash in between) are dropped at the
first sweep and every `EMPTY_MODELS_EVERY_S` after.

Each entry also declares the worker's prefill/decode role (kvcore/roles.py); `live_only`
hands it on in the `WorkerInfo`s Score, FindBestWorker and ListWorkers see. An entry
without one (a publisher older than roles) counts as `both`, and so does one naming a role
this version does not know (logged once per worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import msgspec
import structlog
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from indexer.index.protocol import Index, WorkerInfo
from kvcore.pools import KIND_POOL
from kvcore.roles import DEFAULT_ROLE, WORKER_ROLES
from kvcore.topology import (
    WorkerRecord,
    ensure_liveness_bucket,
    parse_liveness_key,
)

__all__ = ["LivenessWatcher"]

log = structlog.get_logger("indexer.ingest.liveness")

_DELETE_OPS = {"DEL", "PURGE"}
EMPTY_MODELS_EVERY_S = 60.0


class LivenessWatcher:
    """Keeps `live` (model, worker) -> record; removes expired workers from the index."""

    def __init__(
        self,
        js: JetStreamContext,
        index: Index,
        *,
        ttl_s: float,
        grace_s: float,
        check_every_s: float = 1.0,
        remove_expired: bool = True,
    ) -> None:
        self.live: dict[tuple[str, str], WorkerRecord] = {}
        # (model, worker) -> declared role, for workers whose role is not the default.
        self.roles: dict[tuple[str, str], str] = {}
        self.removed = 0
        # Workers that had an entry since this process started and are still in the index
        # (Diagnose tells a worker that left from one that never registered).
        self.registered_once: set[tuple[str, str]] = set()
        self._js = js
        self._index = index
        self._ttl_s = ttl_s
        self._grace_s = grace_s
        self._check_every_s = check_every_s
        self._remove_expired = remove_expired  # False: only track (read-only processes)
        self._seen_at: dict[tuple[str, str], float] = {}
        self._gone_since: dict[tuple[str, str], float] = {}
        self._started = time.monotonic()
        self._empty_models_due = 0.0  # monotonic time of the next drop_empty_models
        self._synced = asyncio.Event()  # the bucket's current entries have been read
        # (model, pool) -> monotonic time since when no live entry declares it
        self._pool_unclaimed: dict[tuple[str, str], float] = {}

    async def wait_synced(self, timeout_s: float) -> bool:
        """Wait until the registry's current entries are known (at most `timeout_s`)."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._synced.wait(), timeout_s)
        return self._synced.is_set()

    def pools_of(self, model: str, worker_id: str) -> list[str] | None:
        """The shared storage pools the worker's entry declares; None without an entry."""
        record = self.live.get((model, worker_id))
        return None if record is None else record.storage_pools

    async def run(self, stop: asyncio.Event) -> None:
        kv = await ensure_liveness_bucket(self._js, self._ttl_s)
        watch_task = asyncio.create_task(self._watch(kv))
        try:
            while not stop.is_set():
                try:
                    await self.sweep()
                except Exception as exc:  # noqa: BLE001 - index away: keep watching, retry
                    log.warning("liveness_sweep_failed", error=str(exc))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), self._check_every_s)
        finally:
            # On Python 3.11 a cancel that lands just as an asyncio.wait_for inside nats-py
            # completes (the watch's set-up) is lost, and the task would go on watching
            # for ever, holding up the process's shutdown: cancel until it has ended.
            while not watch_task.done():
                watch_task.cancel()
                await asyncio.wait({watch_task}, timeout=0.5)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watch_task

    async def _watch(self, kv: KeyValue) -> None:
        watcher = await kv.watchall()
        async for entry in watcher:
            if entry is None:
                self._synced.set()  # the end of the initial values
                continue
            if entry.key is None:
                continue
            try:
                key = parse_liveness_key(entry.key)
            except ValueError:
                continue
            if entry.operation in _DELETE_OPS:
                self.live.pop(key, None)
                self.roles.pop(key, None)
                self._seen_at.pop(key, None)
                self._gone_since.setdefault(key, time.monotonic())
                continue
            try:
                record = msgspec.json.decode(entry.value or b"", type=WorkerRecord)
            except msgspec.DecodeError:
                log.warning("bad_liveness_entry", key=entry.key)
                continue
            self.live[key] = record
            self.registered_once.add(key)
            self._set_role(key, record.role)
            self._seen_at[key] = time.monotonic()
            self._gone_since.pop(key, None)

    def _set_role(self, key: tuple[str, str], role: str) -> None:
        if role not in WORKER_ROLES:
            if self.roles.get(key) != role:
                log.warning("unknown_worker_role", model=key[0], worker=key[1], role=role,
                            counted_as=DEFAULT_ROLE)
            self.roles[key] = role  # remembered to log once; role_of answers the default
        elif role == DEFAULT_ROLE:
            self.roles.pop(key, None)
        else:
            self.roles[key] = role

    def role_of(self, model: str, worker_id: str) -> str:
        """The worker's declared role; `both` when it declared none (or one unknown)."""
        role = self.roles.get((model, worker_id), DEFAULT_ROLE)
        return role if role in WORKER_ROLES else DEFAULT_ROLE

    def is_gone(self, model: str, worker_id: str) -> bool:
        """The worker's entry expired or was deleted (its blocks go after the grace)."""
        return (model, worker_id) in self._gone_since

    def live_only(self, workers: list[WorkerInfo], model: str | None = None
                  ) -> list[WorkerInfo]:
        """The workers routers may be sent to: not known to be gone; each with the role
        and the storage pools its registry entry declares. Pools pass as they are. `workers`
        are the index's (of `model`, or of all models): live workers the index holds
        nothing of that mount a pool are added (rank 0), since a pool's blocks are theirs
        to load."""
        live = [self._declared(w) for w in workers
                if w.kind == KIND_POOL or not self.is_gone(w.model, w.worker_id)]
        return live + self._cold_mounting(workers, model)

    def _cold_mounting(self, indexed: list[WorkerInfo], model: str | None) -> list[WorkerInfo]:
        known = {(w.model, w.worker_id) for w in indexed}
        return [WorkerInfo(key[0], key[1], 0, record.epoch, -1, False, {}, 0.0,
                           role=self.role_of(*key), storage_pools=tuple(record.storage_pools))
                for key, record in self.live.items()
                if record.storage_pools and key not in known
                and (model is None or key[0] == model)]

    def _declared(self, info: WorkerInfo) -> WorkerInfo:
        if info.kind == KIND_POOL:
            return info
        key = (info.model, info.worker_id)
        role = self.role_of(*key)
        record = self.live.get(key)
        pools = tuple(record.storage_pools) if record is not None else ()
        if role == info.role and pools == info.storage_pools:
            return info
        return msgspec.structs.replace(info, role=role, storage_pools=pools)

    async def _sweep_pools(self, listed: list[WorkerInfo], now: float) -> None:
        """Remove pools no live entry has declared for the grace period (a pool is alive
        while a worker that mounts or writes it is)."""
        declared = {(model, pool) for (model, _), record in self.live.items()
                    for pool in record.storage_pools}
        pools = {(info.model, info.worker_id) for info in listed if info.kind == KIND_POOL}
        for key in list(self._pool_unclaimed):
            if key in declared or key not in pools:
                del self._pool_unclaimed[key]
        for key in pools - declared:
            since = self._pool_unclaimed.setdefault(key, now)
            if now - since >= self._grace_s and await self._index.remove_pool(*key):
                del self._pool_unclaimed[key]
                log.info("pool_expired", model=key[0], pool=key[1],
                         unclaimed_for_s=round(now - since, 1))

    @property
    def settled(self) -> bool:
        """Watched for a TTL: every live worker has refreshed its entry since the start."""
        return time.monotonic() - self._started >= self._ttl_s

    def is_live(self, model: str, worker_id: str) -> bool:
        seen = self._seen_at.get((model, worker_id))
        return seen is not None and time.monotonic() - seen <= self._ttl_s

    async def sweep(self) -> None:
        """Remove workers gone for longer than the grace period."""
        now = time.monotonic()
        for key, seen in list(self._seen_at.items()):
            if now - seen > self._ttl_s:
                self.live.pop(key, None)
                self.roles.pop(key, None)
                del self._seen_at[key]
                self._gone_since.setdefault(key, seen + self._ttl_s)
        listed = await self._index.workers()
        indexed = {(info.model, info.worker_id) for info in listed if info.kind != KIND_POOL}
        for key in indexed - self._seen_at.keys():
            self._gone_since.setdefault(key, max(self._started, now - self._ttl_s))
        if not self._remove_expired:
            # Whoever removes workers does it; forget those no longer in the index.
            for key in self._gone_since.keys() - indexed:
                del self._gone_since[key]
            self.registered_once &= indexed | self.live.keys()
            return
        for key, since in list(self._gone_since.items()):
            if now - since >= self._grace_s:
                ranks = await self._index.remove_worker(*key)
                del self._gone_since[key]
                if ranks:
                    self.removed += 1
                    log.info("worker_expired", model=key[0], worker=key[1], ranks=ranks,
                             gone_for_s=round(now - since, 1))
        self.registered_once &= indexed | self.live.keys()
        await self._sweep_pools(listed, now)
        if now >= self._empty_models_due:
            self._empty_models_due = now + EMPTY_MODELS_EVERY_S
            dropped = await self._index.drop_empty_models()
            if dropped:
                log.info("empty_models_dropped", count=len(dropped), models=dropped[:8])
