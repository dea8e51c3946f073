"""Publishing a worker's KV events: per-rank sequencing, size limits, resyncs, liveness.

`RankPublisher` turns event lists into bus batches for one (worker, dp_rank): a new epoch
per start (and per engine restart), a gapless seq, and a mirror of the rank's blocks.
Events are cut to the connected server's max_payload (`publisher.splitter`): an engine
step or a resync that does not fit one message goes out as several consecutive batches,
each with its own seq. A block too large for any message is dropped (counted, logged),
forgotten by the mirror with every block chaining from it, and a resync is asked for, so
the index ends equal to what the mirror can publish. When the sink refuses a batch (buffer
full), a batch is dropped on the way, or the indexer asks for a resync, the rank publishes
AllBlocksCleared plus its mirror once the sink has room: the index is rebuilt exactly.

`KVEventPublisher` is the library face for engines that publish directly (stored, removed,
cleared), and the core the ZMQ bridge drives. It owns the NATS connection, the sink, the
liveness entry (refreshed every TTL / 3, deleted on close) and the resync responder.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Coroutine, Sequence
from typing import Any, Final, TypeVar

import msgspec
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

from kvcore.bus import (
    STREAM_NAME,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    BusError,
    Event,
    EventBatch,
    check_identity,
    engine_hash_to_u64,
    pack_tokens,
    schema_for,
    validate_event,
)
from kvcore.connect import NatsSecurity, connect_nats
from kvcore.pools import check_pools
from kvcore.redact import redact_url
from kvcore.roles import DEFAULT_ROLE, check_worker_role
from kvcore.topology import (
    StreamSettings,
    WorkerRecord,
    ensure_liveness_bucket,
    liveness_key,
    resync_subject,
    worker_inbox_prefix,
)
from publisher.mirror import BlockMirror
from publisher.nats_sink import NatsSink
from publisher.splitter import envelope_bytes, event_bytes, split_events

__all__ = ["RESYNC_REQUEST_INTERVAL_S", "KVEventPublisher", "RankPublisher",
           "SyncKVEventPublisher", "new_epoch"]

log = structlog.get_logger("publisher")

T = TypeVar("T")
_UNSENDABLE_CAPACITY: Final = 65_536
# A resync asked for because blocks were dropped waits this long after the previous one:
# a server limit smaller than a block makes every step drop, and each resync re-sends all.
_DROP_RESYNC_INTERVAL_S: Final = 5.0
_TICK_S: Final = 0.5
# Resyncs asked for over the bus: at most one per rank per this many seconds.
RESYNC_REQUEST_INTERVAL_S: Final = 5.0


def new_epoch() -> int:
    """Unique per publisher start (and engine restart), growing with time."""
    return time.time_ns()


class RankPublisher:
    """Bus batches of one (worker, dp_rank): epoch, gapless seq, mirror, size, resync."""

    def __init__(self, model: str, worker_id: str, dp_rank: int, sink: NatsSink) -> None:
        self.model = model
        self.worker_id = worker_id
        self.dp_rank = dp_rank
        self.epoch = new_epoch()
        self.seq = 0
        self.mirror = BlockMirror()
        self.resyncs = 0
        self.resync_requests = 0  # asked for over the bus (by the indexer)
        self.resync_requests_limited = 0  # of those, merged into a later resync
        self._limited_logged = False
        self._sink = sink
        self._envelope = envelope_bytes(model, worker_id, dp_rank)
        self._reserve = sink.header_reserve(worker_id, dp_rank)
        self._resync_due = False
        self._resync_blocking = False  # batches were lost: hold live events until it goes
        self._resync_not_before = 0.0
        self._last_resync = -math.inf
        self._resync_seq = -1  # first seq of the newest resync of this epoch
        # Blocks that could not be published (too large), and blocks chaining from them.
        self._unsendable: OrderedDict[int, None] = OrderedDict()
        self._log = log.bind(model=model, worker=worker_id, dp_rank=dp_rank)

    def publish(self, events: Sequence[Event], ts: float | None = None) -> None:
        """Publish one engine step's events (mirrored even if the sink refuses them)."""
        events = self._checked(events)
        batches, unsendable = self._fit(events, resync=False)
        self.mirror.apply(events)
        if unsendable:
            self.mirror.forget(unsendable)
        if self._resync_due and self._resync_blocking:
            self._try_resync()  # its snapshot holds this step too
            return
        if batches and not self._offer_all(batches, ts):
            self._resync_due = self._resync_blocking = True
            self._resync_not_before = 0.0
            self._log.warning("sink_full_resync_pending", pending=self._sink.pending)
            return
        if self._resync_due:
            self._try_resync()

    def restart_epoch(self) -> None:
        """The engine restarted: its old blocks are gone; the index forgets the old epoch."""
        self.epoch = new_epoch()
        self.seq = 0
        self.mirror.clear()
        self._unsendable.clear()
        self._resync_due = self._resync_blocking = False
        self._resync_seq = -1

    def request_resync(self, reason: str) -> None:
        self._log.info("resync", reason=reason, blocks=len(self.mirror))
        self._resync_due = True
        self._resync_not_before = 0.0
        self._try_resync()

    def resync_requested(self, reason: str, min_interval_s: float) -> float:
        """The indexer asked for a resync over the bus. Answered at once unless this rank
        resynced less than `min_interval_s` ago; then the request is rate-limited: counted
        (`resync_requests_limited`), and every request of the window is merged into one
        resync at its end, so a requester, however fast it asks, gets at most one full
        re-send per interval and rank. Returns the seconds until that resync (0: now)."""
        self.resync_requests += 1
        wait = self._last_resync + min_interval_s - time.monotonic()
        if wait <= 0:
            self.request_resync(reason)
            return 0.0
        self.resync_requests_limited += 1
        if not self._resync_due:
            self._resync_due = True
            self._resync_not_before = self._last_resync + min_interval_s
        if not self._limited_logged:  # once per window: a flood of requests is counted
            self._limited_logged = True
            self._log.info("resync_request_rate_limited", reason=reason,
                           resync_in_s=round(wait, 3), min_interval_s=min_interval_s)
        return wait

    def batch_dropped(self, epoch: int, seq: int, reason: str) -> None:
        """The sink could not publish batch `seq` (see `NatsSink`): re-send the rank,
        unless a resync that follows that batch is already on its way."""
        if epoch != self.epoch or seq < self._resync_seq:
            return
        self._resync_after_drop(reason)

    def tick(self) -> None:
        """Publish a resync that is due (called periodically and after drops)."""
        if self._resync_due:
            self._try_resync()

    # --- internals ---------------------------------------------------------------------

    def _checked(self, events: Sequence[Event]) -> list[Event]:
        """The events the indexer's validator accepts (block counts aside: cut later)."""
        kept: list[Event] = []
        for event in events:
            try:
                validate_event(event, max_blocks=None)
            except BusError as exc:
                blocks = 0 if isinstance(event, AllBlocksCleared) else len(event.block_hashes)
                self._sink.stats.drop("invalid_event", blocks=blocks)
                self._log.warning("event_dropped", reason="invalid_event", error=str(exc),
                                  blocks=blocks)
                continue
            kept.append(event)
        return kept

    def _resync_after_drop(self, reason: str) -> None:
        if not self._resync_due:
            self._resync_not_before = self._last_resync + _DROP_RESYNC_INTERVAL_S
        self._resync_due = True
        self._log.info("resync_after_drop", reason=reason, blocks=len(self.mirror))

    def _fit(self, events: Sequence[Event], *, resync: bool) -> tuple[list[list[Event]],
                                                                      list[int]]:
        """`events` cut into batches that fit the sink; the hashes that cannot be sent."""
        if not events:
            return [], []
        limit = self._sink.batch_limit(self._reserve)
        split = split_events(events, limit - self._envelope)
        stats = self._sink.stats
        if len(split.batches) > 1:
            stats.splits += 1
        stats.split_events += split.cut_events
        unsendable: list[int] = []
        if split.oversized:
            # A stored block is dropped with its descendants; a removal or a clear that
            # does not fit (a limit of a few hundred bytes) leaves the index behind: both
            # ask for a resync, which re-sends what can be sent.
            other = 0
            for event in split.oversized:
                if isinstance(event, BlockStored):
                    unsendable.extend(event.block_hashes)
                else:
                    other += 1 if isinstance(event, AllBlocksCleared) else len(
                        event.block_hashes)
            for h in unsendable:
                self._mark_unsendable(h)
            for reason, blocks in (("block_too_large", len(unsendable)),
                                   ("event_too_large", other)):
                if blocks:
                    stats.drop(reason, blocks=blocks)
                    self._log.warning("blocks_dropped", reason=reason, blocks=blocks,
                                      event_bytes=event_bytes(split.oversized[0]),
                                      batch_limit=limit, max_payload=self._sink.max_payload,
                                      during_resync=resync)
            if not resync:
                self._resync_after_drop("block_too_large" if unsendable else "event_too_large")
        batches = self._without_unsendable(split.batches, unsendable)
        if resync and unsendable:
            self.mirror.forget(unsendable)
        return batches, unsendable

    def _mark_unsendable(self, h: int) -> None:
        self._unsendable[h] = None
        self._unsendable.move_to_end(h)
        if len(self._unsendable) > _UNSENDABLE_CAPACITY:
            self._unsendable.popitem(last=False)

    def _without_unsendable(self, batches: list[list[Event]],
                            unsendable: list[int]) -> list[list[Event]]:
        """Leave out blocks chaining from (or naming) a block that could not be sent."""
        if not self._unsendable:
            return batches
        bad = self._unsendable
        out: list[list[Event]] = []
        dropped = 0
        for batch in batches:
            kept: list[Event] = []
            for event in batch:
                if isinstance(event, AllBlocksCleared):
                    kept.append(event)
                    continue
                hashes = event.block_hashes
                if isinstance(event, BlockStored) and event.token_ids:
                    if event.parent_hash is not None and event.parent_hash in bad:
                        for h in hashes:
                            self._mark_unsendable(h)
                        unsendable.extend(hashes)
                        dropped += len(hashes)
                        continue
                    for h in hashes:  # sent now (a larger limit than before): sendable
                        bad.pop(h, None)
                elif any(h in bad for h in hashes):
                    rest = [h for h in hashes if h not in bad]
                    if isinstance(event, BlockStored):
                        dropped += len(hashes) - len(rest)
                    if rest:
                        kept.append(msgspec.structs.replace(event, block_hashes=rest))
                    continue
                kept.append(event)
            if kept:
                out.append(kept)
        if dropped:
            self._sink.stats.drop("unsendable_chain", blocks=dropped)
            self._log.warning("blocks_dropped", reason="unsendable_chain", blocks=dropped)
        return out

    def _offer_all(self, batches: list[list[Event]], ts: float | None, *,
                   force: bool = False) -> bool:
        """Offer every batch, or none when the sink lacks room for all of them."""
        if len(batches) > self._sink.room() and not force:
            self._sink.stats.refused += len(batches)
            return False
        stamp = time.time() if ts is None else ts
        for events in batches:
            batch = EventBatch(schema=schema_for(events), model=self.model,
                               worker_id=self.worker_id, dp_rank=self.dp_rank,
                               epoch=self.epoch, seq=self.seq, ts=stamp, events=events)
            accepted = self._sink.offer(batch, force=force)
            assert accepted, "the sink had room"
            self.seq += 1
        return True

    def _try_resync(self) -> bool:
        if time.monotonic() < self._resync_not_before or not self._sink.room():
            return False  # not yet: try again on the next step or tick
        started = time.perf_counter()
        batches, _ = self._fit(list(self.mirror.snapshot()), resync=True)
        # A resync larger than the whole buffer (a mirror of 10^5 blocks cut to a server
        # limit of a few KiB) goes once the buffer is empty, or it never could.
        idle = self._sink.pending == 0
        if len(batches) > self._sink.room() and not idle:
            return False
        first = self.seq
        self._offer_all(batches, None, force=idle)
        self._resync_due = self._resync_blocking = False
        self._resync_seq = first
        self._last_resync = time.monotonic()
        self._limited_logged = False
        self.resyncs += 1
        self._log.info("resync_queued", blocks=len(self.mirror), batches=len(batches),
                       first_seq=first, seconds=round(time.perf_counter() - started, 4))
        return True


class KVEventPublisher:
    """Publish a worker's KV cache events to JetStream (async).

    ```
    async with KVEventPublisher("meta-llama/Llama-3.1-8B", "worker-0", block_size=16,
                                nats_url="nats://127.0.0.1:4222") as pub:
        pub.stored([h1, h2], token_ids=tokens, parent_hash=None)
        pub.removed([h1])
        await pub.flush()
    ```
    Events given between two `flush()` / `end_step()` calls form one engine step: one bus
    batch, or several consecutive ones when the step does not fit the server's max_payload.
    """

    def __init__(
        self,
        model: str,
        worker_id: str,
        *,
        block_size: int,
        nats_url: str = "nats://127.0.0.1:4222",
        dp_size: int = 1,
        stream: StreamSettings | None = None,
        max_pending: int = 10_000,
        version: str = "",
        stall_s: float = 30.0,
        resync_min_interval_s: float = RESYNC_REQUEST_INTERVAL_S,
        nats_security: NatsSecurity | None = None,
        start_timeout_s: float | None = None,
        role: str = DEFAULT_ROLE,
        storage_pools: Sequence[str] = (),
    ) -> None:
        check_identity(model, worker_id)  # BusError: refused here, not by the indexer
        # prefill, decode or both: which requests a disaggregated router sends this worker;
        # store: none (a shared pool's own publisher, never a routing candidate).
        self.role = check_worker_role(role)
        # Shared storage pools it mounts and may write into (kvcore/pools.py).
        self.storage_pools = check_pools(storage_pools)
        self.model = model
        self.worker_id = worker_id
        self.block_size = block_size
        self.nats_url = nats_url
        self.dp_size = dp_size
        self.version = version
        self._stream = stream or StreamSettings()
        self._max_pending = max_pending
        self.stall_s = stall_s
        self.resync_min_interval_s = resync_min_interval_s
        self.resync_requests_invalid = 0  # undecodable, or naming no rank of ours
        # TLS and credentials for NATS; how long start() may wait for the first connection
        # (None: until it connects; a set-up that cannot work fails at once either way).
        self.nats_security = nats_security or NatsSecurity()
        self.start_timeout_s = start_timeout_s
        self._nc: NatsClient | None = None
        self.sink: NatsSink | None = None
        self.ranks: list[RankPublisher] = []
        self._pending: list[list[Event]] = [[] for _ in range(dp_size)]
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> KVEventPublisher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        log.info("nats_connecting", url=redact_url(self.nats_url), worker=self.worker_id)
        # Replies come to an inbox of this worker's own (`worker_inbox_prefix`): with the
        # NATS permissions `kv-indexer nats-auth` writes, a worker reads no one else's.
        self._nc = await connect_nats(self.nats_url, self.nats_security,
                                      name=f"kv-publisher:{self.worker_id}",
                                      start_timeout_s=self.start_timeout_s,
                                      max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                                      inbox_prefix=worker_inbox_prefix(self.model,
                                                                       self.worker_id))
        js = self._nc.jetstream()
        # The indexer owns the stream (its partition count); until it exists the sink
        # buffers (bounded) and retries.
        self.sink = NatsSink(js, max_pending=self._max_pending, nc=self._nc,
                             on_dropped=self._on_dropped)
        self.ranks = [RankPublisher(self.model, self.worker_id, r, self.sink)
                      for r in range(self.dp_size)]
        self._tasks.append(asyncio.create_task(self.sink.run(self._stop)))
        self._tasks.append(asyncio.create_task(self._keep_alive()))
        self._tasks.append(asyncio.create_task(self._tick()))
        await self._nc.subscribe(resync_subject(self.model, self.worker_id),
                                 cb=self._on_resync)

    async def event_stream_exists(self) -> bool:
        """Whether the NATS this publisher reached holds the indexer's event stream. Ask
        only where the connection may look it up (no per-worker user: those may not)."""
        assert self._nc is not None, "start() first"
        try:
            await self._nc.jetstream().stream_info(STREAM_NAME)
        except (NotFoundError, NoRespondersError):  # no such stream; no JetStream at all
            return False
        return True

    # --- events (collected per rank until end_step / flush) ----------------------------

    def stored(
        self,
        block_hashes: Sequence[int | bytes],
        token_ids: Sequence[int] | bytes,
        *,
        parent_hash: int | bytes | None = None,
        medium: str = "gpu",
        lora_name: str | None = None,
        cache_salt: str | None = None,
        dp_rank: int = 0,
        pool: str | None = None,
        group: int = 0,
        group_kind: str | None = None,
        sliding_window: int = 0,
    ) -> None:
        """Blocks stored; with `pool`, written into that shared storage pool (declared in
        `storage_pools`), known by the hashes this worker stored them under. Hybrid-attention
        engines name the KV-cache `group` and its `group_kind` ("full_attention",
        "sliding_window", "mamba") and window (tokens). A pool's presence lives in group 0:
        a pool write names no other group."""
        if pool is not None and (group or group_kind is not None or sliding_window):
            raise ValueError("a pool write belongs to KV-cache group 0 (no group fields)")
        tokens = token_ids if isinstance(token_ids, bytes) else pack_tokens(token_ids)
        self._pending[dp_rank].append(BlockStored(
            block_hashes=[engine_hash_to_u64(h) for h in block_hashes],
            parent_hash=None if parent_hash is None else engine_hash_to_u64(parent_hash),
            token_ids=tokens, block_size=self.block_size if tokens else 0,
            medium="storage" if pool else medium.lower(), lora_name=lora_name,
            cache_salt=cache_salt, group=group, group_kind=group_kind,
            sliding_window=sliding_window, pool=self._declared(pool)))

    def removed(self, block_hashes: Sequence[int | bytes], *, medium: str = "gpu",
                dp_rank: int = 0, pool: str | None = None, group: int = 0) -> None:
        """Blocks left a tier (of KV-cache `group`); with `pool`, evicted from that shared
        storage pool (group 0 only)."""
        if pool is not None and group:
            raise ValueError("a pool removal belongs to KV-cache group 0")
        self._pending[dp_rank].append(BlockRemoved(
            block_hashes=[engine_hash_to_u64(h) for h in block_hashes],
            medium="storage" if pool else medium.lower(), group=group,
            pool=self._declared(pool)))

    def cleared(self, *, dp_rank: int = 0, pool: str | None = None) -> None:
        """The rank's cache was dropped; with `pool`, that shared pool was wiped."""
        self._pending[dp_rank].append(AllBlocksCleared(pool=self._declared(pool)))

    def _declared(self, pool: str | None) -> str | None:
        if pool is not None and pool not in self.storage_pools:
            raise ValueError(f"pool {pool!r} is not one of this worker's storage_pools "
                             f"{self.storage_pools}")
        return pool

    def end_step(self) -> None:
        """Close the current batch of every rank (one engine step)."""
        for rank, events in zip(self.ranks, self._pending, strict=True):
            if events:
                rank.publish(events)
        self._pending = [[] for _ in range(self.dp_size)]

    async def flush(self, timeout_s: float = 10.0) -> bool:
        """End the step and wait until JetStream has stored everything; False on timeout."""
        self.end_step()
        assert self.sink is not None
        return await self.sink.flush(timeout_s)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.flush(5.0)
        self._stop.set()
        for task in self._tasks:
            with contextlib.suppress(Exception):
                await task
        if self._nc is not None:
            with contextlib.suppress(Exception):
                kv = await ensure_liveness_bucket(self._nc.jetstream(),
                                                  self._stream.liveness_ttl_s,
                                                  self._stream.replicas)
                await kv.delete(liveness_key(self.model, self.worker_id))
            with contextlib.suppress(Exception):
                await self._nc.drain()

    # --- health ------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    def health(self) -> tuple[bool, str]:
        """(healthy, why): NATS connected and the sink not stalled for `stall_s`."""
        if self._nc is None or self.sink is None:
            return False, "not started"
        if self._nc.is_closed:
            return False, "NATS connection closed"
        if not self._nc.is_connected:
            return False, f"NATS disconnected (reconnecting to {redact_url(self.nats_url)})"
        stalled = self.sink.stalled_for()
        if stalled > self.stall_s:
            return False, (f"sink stalled: {self.sink.pending} batches pending, none "
                           f"acknowledged for {stalled:.0f} s (last error: "
                           f"{self.sink.last_error or 'none'})")
        return True, f"ok: NATS connected, {self.sink.pending} batches pending"

    # --- liveness and resync -----------------------------------------------------------

    def _on_dropped(self, dp_rank: int, epoch: int, seq: int, reason: str) -> None:
        if 0 <= dp_rank < len(self.ranks):
            rank = self.ranks[dp_rank]
            rank.batch_dropped(epoch, seq, reason)
            # not from inside the sink's loop: the rank offers to the sink
            asyncio.get_running_loop().call_soon(rank.tick)

    async def _tick(self) -> None:
        """Resyncs that are due go out even while the engine is idle."""
        while not self._stop.is_set():
            for rank in self.ranks:
                rank.tick()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), _TICK_S)

    def record(self) -> WorkerRecord:
        return WorkerRecord(
            model=self.model, worker_id=self.worker_id, block_size=self.block_size,
            dp_size=self.dp_size, epoch=self.ranks[0].epoch if self.ranks else 0,
            last_seq={str(r.dp_rank): r.seq - 1 for r in self.ranks}, version=self.version,
            role=self.role, storage_pools=list(self.storage_pools))

    async def _keep_alive(self) -> None:
        assert self._nc is not None
        ttl = self._stream.liveness_ttl_s
        kv: KeyValue | None = None
        key = liveness_key(self.model, self.worker_id)
        while not self._stop.is_set():
            try:
                # Looked up until found: NATS may be away at start, and a worker allowed
                # only its own key (`kv-indexer nats-auth`) waits for the indexer to
                # create the bucket.
                if kv is None:
                    kv = await ensure_liveness_bucket(self._nc.jetstream(), ttl,
                                                      self._stream.replicas)
                await kv.put(key, msgspec.json.encode(self.record()))
            except Exception as exc:  # noqa: BLE001 - NATS away: retry next tick
                log.warning("liveness_put_failed", error=repr(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), ttl / 3)

    async def _on_resync(self, msg: Msg) -> None:
        """A resync request (only the indexer may send one: NATS permissions)."""
        try:
            request = msgspec.json.decode(msg.data)
            rank = int(request.get("dp_rank", 0))
            reason = str(request.get("reason", "requested"))
        except (msgspec.DecodeError, AttributeError, TypeError, ValueError):
            self.resync_requests_invalid += 1
            await _reply(msg, {"ok": False, "error": "bad request"})
            return
        if not 0 <= rank < len(self.ranks):
            self.resync_requests_invalid += 1
            await _reply(msg, {"ok": False, "error": "unknown dp_rank"})
            return
        wait = self.ranks[rank].resync_requested(reason[:200], self.resync_min_interval_s)
        await _reply(msg, {"ok": True} if wait <= 0 else
                     {"ok": True, "rate_limited": True, "resync_in_s": round(wait, 3)})


async def _reply(msg: Msg, answer: dict[str, object]) -> None:
    if msg.reply:  # a request sent without a reply subject gets no answer
        await msg.respond(msgspec.json.encode(answer))


class SyncKVEventPublisher:
    """The same calls without an event loop: runs one in a background thread."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="kv-publisher")
        self._thread.start()
        self._pub = KVEventPublisher(*args, **kwargs)
        self._run(self._pub.start())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        self._loop.call_soon_threadsafe(lambda: fn(*args, **kwargs))

    def stored(self, *args: Any, **kwargs: Any) -> None:
        self._call(self._pub.stored, *args, **kwargs)

    def removed(self, *args: Any, **kwargs: Any) -> None:
        self._call(self._pub.removed, *args, **kwargs)

    def cleared(self, **kwargs: Any) -> None:
        self._call(self._pub.cleared, **kwargs)

    def flush(self, timeout_s: float = 10.0) -> bool:
        return self._run(self._pub.flush(timeout_s))

    def close(self) -> None:
        self._run(self._pub.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
