"""Publishing a worker's KV events: per-rank sequencing, resyncs, liveness.

`RankPublisher` turns event lists into bus batches for one (worker, dp_rank): a new epoch
per start (and per engine restart), a gapless seq, and a mirror of the rank's blocks. When
the sink refuses a batch (buffer full) or the indexer asks for a resync, the rank publishes
AllBlocksCleared plus its mirror once the sink has room: the index is rebuilt exactly.

`KVEventPublisher` is the library face for engines that publish directly (stored, removed,
cleared), and the core the ZMQ bridge drives. It owns the NATS connection, the sink, the
liveness entry (refreshed every TTL / 3, deleted on close) and the resync responder.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import msgspec
import nats
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from kvcore.bus import (
    SCHEMA_VERSION,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Event,
    EventBatch,
    engine_hash_to_u64,
    pack_tokens,
)
from kvcore.topology import (
    StreamSettings,
    WorkerRecord,
    ensure_liveness_bucket,
    liveness_key,
    resync_subject,
)
from publisher.mirror import BlockMirror
from publisher.nats_sink import NatsSink

__all__ = ["KVEventPublisher", "RankPublisher", "SyncKVEventPublisher", "new_epoch"]

log = structlog.get_logger("publisher")

T = TypeVar("T")
_SNAPSHOT_EVENTS_PER_BATCH = 256


def new_epoch() -> int:
    """Unique per publisher start (and engine restart), growing with time."""
    return time.time_ns()


class RankPublisher:
    """Bus batches of one (worker, dp_rank): epoch, gapless seq, mirror, resync."""

    def __init__(self, model: str, worker_id: str, dp_rank: int, sink: NatsSink) -> None:
        self.model = model
        self.worker_id = worker_id
        self.dp_rank = dp_rank
        self.epoch = new_epoch()
        self.seq = 0
        self.mirror = BlockMirror()
        self.resyncs = 0
        self._sink = sink
        self._resync_due = False
        self._log = log.bind(model=model, worker=worker_id, dp_rank=dp_rank)

    def publish(self, events: Sequence[Event], ts: float | None = None) -> None:
        """Publish one engine step's events (mirrored even if the sink refuses them)."""
        self.mirror.apply(events)
        if self._resync_due and not self._try_resync():
            return
        if events and not self._offer(list(events), ts):
            self._resync_due = True
            self._log.warning("sink_full_resync_pending", pending=self._sink.pending)

    def restart_epoch(self) -> None:
        """The engine restarted: its old blocks are gone; the index forgets the old epoch."""
        self.epoch = new_epoch()
        self.seq = 0
        self.mirror.clear()
        self._resync_due = False

    def request_resync(self, reason: str) -> None:
        self._log.info("resync", reason=reason, blocks=len(self.mirror))
        self._resync_due = True
        self._try_resync()

    def _try_resync(self) -> bool:
        events = list(self.mirror.snapshot())
        n_batches = -(-len(events) // _SNAPSHOT_EVENTS_PER_BATCH)
        if self._sink.pending + n_batches > self._sink.max_pending:
            return False  # not yet: try again when the sink has room
        for i in range(0, len(events), _SNAPSHOT_EVENTS_PER_BATCH):
            self._offer(events[i : i + _SNAPSHOT_EVENTS_PER_BATCH], None)
        self._resync_due = False
        self.resyncs += 1
        return True

    def _offer(self, events: list[Event], ts: float | None) -> bool:
        batch = EventBatch(schema=SCHEMA_VERSION, model=self.model, worker_id=self.worker_id,
                           dp_rank=self.dp_rank, epoch=self.epoch, seq=self.seq,
                           ts=time.time() if ts is None else ts, events=events)
        if not self._sink.offer(batch):
            return False
        self.seq += 1
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
    Events given between two `flush()` / `end_step()` calls form one bus batch.
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
    ) -> None:
        self.model = model
        self.worker_id = worker_id
        self.block_size = block_size
        self.nats_url = nats_url
        self.dp_size = dp_size
        self.version = version
        self._stream = stream or StreamSettings()
        self._max_pending = max_pending
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
        self._nc = await nats.connect(self.nats_url, name=f"kv-publisher:{self.worker_id}",
                                      max_reconnect_attempts=-1, reconnect_time_wait=0.5)
        js = self._nc.jetstream()
        # The indexer owns the stream (its partition count); until it exists the sink
        # buffers (bounded) and retries.
        self.sink = NatsSink(js, max_pending=self._max_pending)
        self.ranks = [RankPublisher(self.model, self.worker_id, r, self.sink)
                      for r in range(self.dp_size)]
        self._tasks.append(asyncio.create_task(self.sink.run(self._stop)))
        self._tasks.append(asyncio.create_task(self._keep_alive()))
        await self._nc.subscribe(resync_subject(self.model, self.worker_id),
                                 cb=self._on_resync)

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
    ) -> None:
        tokens = token_ids if isinstance(token_ids, bytes) else pack_tokens(token_ids)
        self._pending[dp_rank].append(BlockStored(
            block_hashes=[engine_hash_to_u64(h) for h in block_hashes],
            parent_hash=None if parent_hash is None else engine_hash_to_u64(parent_hash),
            token_ids=tokens, block_size=self.block_size if tokens else 0,
            medium=medium.lower(), lora_name=lora_name, cache_salt=cache_salt))

    def removed(self, block_hashes: Sequence[int | bytes], *, medium: str = "gpu",
                dp_rank: int = 0) -> None:
        self._pending[dp_rank].append(BlockRemoved(
            block_hashes=[engine_hash_to_u64(h) for h in block_hashes], medium=medium.lower()))

    def cleared(self, *, dp_rank: int = 0) -> None:
        self._pending[dp_rank].append(AllBlocksCleared())

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
                                                  self._stream.liveness_ttl_s)
                await kv.delete(liveness_key(self.model, self.worker_id))
            with contextlib.suppress(Exception):
                await self._nc.drain()

    # --- liveness and resync -----------------------------------------------------------

    def record(self) -> WorkerRecord:
        return WorkerRecord(
            model=self.model, worker_id=self.worker_id, block_size=self.block_size,
            dp_size=self.dp_size, epoch=self.ranks[0].epoch if self.ranks else 0,
            last_seq={str(r.dp_rank): r.seq - 1 for r in self.ranks}, version=self.version)

    async def _keep_alive(self) -> None:
        assert self._nc is not None
        ttl = self._stream.liveness_ttl_s
        kv = await ensure_liveness_bucket(self._nc.jetstream(), ttl)
        key = liveness_key(self.model, self.worker_id)
        while not self._stop.is_set():
            try:
                await kv.put(key, msgspec.json.encode(self.record()))
            except Exception as exc:  # noqa: BLE001 - NATS away: retry next tick
                log.warning("liveness_put_failed", error=repr(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), ttl / 3)

    async def _on_resync(self, msg: Msg) -> None:
        try:
            request = msgspec.json.decode(msg.data)
            rank = int(request.get("dp_rank", 0))
            reason = str(request.get("reason", "requested"))
        except (msgspec.DecodeError, AttributeError, TypeError, ValueError):
            await msg.respond(b'{"ok": false, "error": "bad request"}')
            return
        if not 0 <= rank < len(self.ranks):
            await msg.respond(b'{"ok": false, "error": "unknown dp_rank"}')
            return
        self.ranks[rank].request_resync(reason)
        await msg.respond(b'{"ok": true}')


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
