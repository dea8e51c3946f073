"""Which indexer process consumes which partition: leases in a JetStream KV bucket.

Every process announces itself (`m.<id>`, refreshed each tick) and holds leases `p.<k>`
created with compare-and-set and renewed with the revision it last saw; the bucket's TTL
frees the leases of a process that died. Each process aims at its fair share,
ceil(partitions / live members): it takes free leases while below it and hands back the
extras (after stopping their consumers) while above it. So there is at most one active
consumer per partition, and per-worker order holds while ingest spreads over processes.

NATS may be away for any length of time: a tick that fails is logged, counted and tried
again next tick. Leases not renewed for a TTL may belong to someone else by now, so their
consumers are stopped ("lease_expired_unreachable"); when NATS is back the process takes
its share again.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Final

import structlog
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import (
    BadRequestError,
    BucketNotFoundError,
    KeyWrongLastSequenceError,
    NoStreamResponseError,
)
from nats.js.errors import NotFoundError as JsNotFoundError
from nats.js.kv import KeyValue

__all__ = ["LEASE_BUCKET", "PartitionLeases"]

log = structlog.get_logger("indexer.ingest.partitions")

LEASE_BUCKET: Final = "kv_indexer_leases"
_MEMBER_LISTINGS: Final = 3  # tries at a member listing that includes this process

StartPartition = Callable[[int], Awaitable[None]]
StopPartition = Callable[[int], Awaitable[None]]


async def _lease_bucket(js: JetStreamContext, ttl_s: float, replicas: int) -> KeyValue:
    try:
        return await js.key_value(LEASE_BUCKET)
    except (BucketNotFoundError, JsNotFoundError):
        try:
            return await js.create_key_value(js_api.KeyValueConfig(
                bucket=LEASE_BUCKET, ttl=ttl_s, history=1, storage=js_api.StorageType.FILE,
                replicas=replicas))
        except BadRequestError:
            return await js.key_value(LEASE_BUCKET)


async def _keys(kv: KeyValue, timeout_s: float) -> list[str]:
    """The bucket's live keys. kv.keys() waits without a limit for its watcher's "no more
    keys" signal, and a tick that never ends renews nothing yet stops no consumer: this
    one raises nats' TimeoutError instead (the tick fails, and is tried again)."""
    watcher = await kv.watchall(ignore_deletes=True, meta_only=True)
    try:
        keys = []
        while (entry := await watcher.updates(timeout_s)) is not None:  # type: ignore[no-untyped-call]
            keys.append(entry.key)
        return keys
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]


class PartitionLeases:
    """Acquires, renews and releases partition leases; starts and stops consumers."""

    def __init__(
        self,
        js: JetStreamContext,
        partitions: int,
        *,
        start: StartPartition,
        stop: StopPartition,
        ttl_s: float = 6.0,
        member_id: str | None = None,
        replicas: int = 1,
    ) -> None:
        self.partitions = partitions
        self.member_id = member_id or uuid.uuid4().hex[:12]
        self.ttl_s = ttl_s
        self.replicas = replicas  # of the lease bucket, when this process creates it
        self.held: dict[int, int] = {}  # partition -> lease revision
        # Leases handed back once their consumers have stopped (renewed until then),
        # and the stops under way: a tick never waits for a consumer's batch in hand.
        self.handing_back: dict[int, int] = {}  # partition -> lease revision
        self._stops: dict[int, tuple[asyncio.Future[None], float]] = {}  # and when begun
        self.share = 0  # the fair share at the last tick
        self.all_taken = False  # every partition held (by us or others) at the last tick
        self.tick_failures = 0
        self.last_renewed = time.monotonic()  # when the last renewal of every lease began
        self._js = js
        self._start = start
        self._stop = stop
        self._kv: KeyValue | None = None
        self._log = log.bind(member=self.member_id)

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                await self._tick_or_wait_out()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.ttl_s / 3)
        finally:
            await self.release_all()

    async def _tick_or_wait_out(self) -> None:
        try:
            if self._kv is None:
                self._kv = await _lease_bucket(self._js, self.ttl_s, self.replicas)
            await self.tick()
        except Exception as exc:  # noqa: BLE001 - NATS away or slow: try again next tick
            self.tick_failures += 1
            if isinstance(exc, BucketNotFoundError | JsNotFoundError | NoStreamResponseError):
                self._kv = None  # NATS came back without its state: make the bucket again
            unrenewed_s = time.monotonic() - self.last_renewed
            self._log.warning("lease_tick_failed", error=repr(exc), held=sorted(self.held),
                              unrenewed_s=round(unrenewed_s, 1))
            # Half a TTL: the consumers are told to stop before their leases can expire.
            if (self.held or self.handing_back) and unrenewed_s > self.ttl_s / 2:
                await self._abandon_all()

    async def _abandon_all(self) -> None:
        """Stop the consumers of leases that may soon expire; NATS cannot be told."""
        for partition in sorted(self.held):
            self._log.warning("lease_expired_unreachable", partition=partition)
            del self.held[partition]
            self._stopping(partition)
        for partition in sorted(self.handing_back):  # their consumers are stopping already
            self._log.warning("lease_expired_unreachable", partition=partition)
        self.handing_back.clear()
        self.all_taken = False  # unknown until a tick succeeds

    def _stopping(self, partition: int) -> None:
        """Stop the partition's consumer in the background (it finishes its batch first)."""
        assert partition not in self._stops, "a consumer is stopped once"
        self._stops[partition] = (asyncio.ensure_future(self._stop(partition)),
                                  time.monotonic())

    def slow_stops(self, longer_than_s: float) -> dict[int, float]:
        """Partition -> seconds its consumer has been stopping, for those stopping longer."""
        now = time.monotonic()
        return {partition: now - began for partition, (stop, began) in self._stops.items()
                if now - began > longer_than_s and not stop.done()}

    def _stopped(self, partition: int) -> bool:
        task, _ = self._stops.get(partition, (None, 0.0))
        if task is None:
            return True
        if not task.done():
            return False
        del self._stops[partition]
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._log.warning("partition_stop_failed", partition=partition, error=repr(exc))
        return True

    async def tick(self) -> None:
        kv = self._kv
        assert kv is not None
        renewing = time.monotonic()
        await self._renew(kv)  # first: nothing else in a tick may delay it
        self.last_renewed = renewing
        await self._hand_back_stopped(kv)
        await kv.put(f"m.{self.member_id}", b"1")
        members = await self._live_members(kv)
        share = self.share = math.ceil(self.partitions / max(1, len(members)))
        taken = 0  # by others, or by us while a consumer of ours stops
        for partition in range(self.partitions):
            if len(self.held) >= share:
                break
            if partition in self.held:
                continue
            # A consumer of ours that is still stopping must end before another starts.
            if (partition in self.handing_back or not self._stopped(partition)
                    or not await self._try_acquire(kv, partition)):
                taken += 1
        # ceil(partitions / members) leaves some processes nothing when there are more
        # processes than partitions allow: holding none is then no fault of ours.
        self.all_taken = len(self.held) + taken >= self.partitions
        while len(self.held) > share:
            partition = max(self.held)
            self.handing_back[partition] = self.held.pop(partition)
            self._stopping(partition)

    async def _live_members(self, kv: KeyValue) -> list[str]:
        """The `m.` keys, ours among them. Ours was put just before, so a listing without
        it is incomplete: nats-py's watcher can signal "no more keys" before its first
        delivery arrives. Such a listing is asked again (the share it gave would be wrong)."""
        own = f"m.{self.member_id}"
        keys: list[str] = []
        for _ in range(_MEMBER_LISTINGS):
            keys = [k for k in await _keys(kv, self.ttl_s / 3) if k.startswith("m.")]
            if own in keys:
                return keys
        self._log.warning("lease_members_incomplete", listed=len(keys))
        return [*keys, own]

    async def _renew(self, kv: KeyValue) -> None:
        for leases in (self.held, self.handing_back):
            for partition, revision in list(leases.items()):
                try:
                    leases[partition] = await kv.update(
                        f"p.{partition}", self.member_id.encode(), last=revision)
                except (KeyWrongLastSequenceError, BadRequestError):
                    self._log.warning("lease_lost", partition=partition)
                    del leases[partition]
                    if leases is self.held:
                        self._stopping(partition)

    async def _hand_back_stopped(self, kv: KeyValue) -> None:
        """Delete the leases handed back whose consumers have stopped."""
        for partition, revision in list(self.handing_back.items()):
            if self._stopped(partition):
                del self.handing_back[partition]
                with contextlib.suppress(Exception):
                    await kv.delete(f"p.{partition}", last=revision)
                self._log.info("lease_released", partition=partition)

    async def _try_acquire(self, kv: KeyValue, partition: int) -> bool:
        """Take the lease if it is free; False when someone else holds it."""
        try:
            revision = await kv.create(f"p.{partition}", self.member_id.encode())
        except (KeyWrongLastSequenceError, BadRequestError):
            return False
        self.held[partition] = revision
        self._log.info("lease_acquired", partition=partition)
        await self._start(partition)
        return True

    async def release_all(self) -> None:
        """Stop every consumer (each finishes its batch in hand), then hand back the leases."""
        for partition in list(self.held):
            self.handing_back[partition] = self.held.pop(partition)
            self._stopping(partition)
        while stopping := [stop for stop, _ in self._stops.values() if not stop.done()]:
            await asyncio.wait(stopping, timeout=self.ttl_s / 3)
            if self._kv is not None:  # leases renewed while their consumers finish
                with contextlib.suppress(Exception):
                    await self._renew(self._kv)
        for partition in list(self._stops):
            self._stopped(partition)
        if self._kv is not None:
            await self._hand_back_stopped(self._kv)
            with contextlib.suppress(Exception):
                await self._kv.delete(f"m.{self.member_id}")
