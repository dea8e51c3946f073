"""Bus batches -> JetStream, in order, with dedup ids and a bounded buffer.

`offer()` never blocks: a full buffer refuses the batch and the caller (a `RankPublisher`)
turns the loss into a resync once there is room again. The sender keeps up to `window`
publishes in flight; when one fails (NATS away, timeout) it re-sends everything from the
first unacknowledged batch on, in order. JetStream drops the re-sends it already stored
(same `Nats-Msg-Id` within the stream's duplicate window), so each batch lands once and
per-rank order is kept.

Size: publishers cut their events to `batch_limit()` (the connected server's
`max_payload`, read from its INFO on every connect, less room for the headers, and never
above the bus's `MAX_MESSAGE_BYTES`), so every batch fits when it is offered. One can
still be too large when it is sent: the client reconnected to a server with a smaller
limit, or a caller offered it uncut. Such a batch is never sent (nor retried) as it is:
its seq is already taken and the batches after it are numbered, so it is replaced, under
the same seq and dedup id, by a batch holding only AllBlocksCleared (the index loses hits
on that rank, never gains wrong ones), counted as dropped (`exceeds_max_payload`) and
reported through `on_dropped`, which has the rank re-send its state cut to the new limit.
When even that replacement does not fit (a server limit of a few hundred bytes), the
batch is dropped outright (`unpublishable`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import msgspec
import structlog
from nats.aio.client import Client as NatsClient
from nats.errors import MaxPayloadError
from nats.js import JetStreamContext

from kvcore.bus import (
    MAX_MESSAGE_BYTES,
    SCHEMA_V1,
    AllBlocksCleared,
    EventBatch,
    block_count,
    encode_batch,
    msg_id,
    subject_for,
)

__all__ = ["DEFAULT_MAX_PAYLOAD", "NatsSink", "SinkStats", "header_bytes"]

log = structlog.get_logger("publisher.sink")

_BACKOFF_S: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
DEFAULT_MAX_PAYLOAD: Final = 1024 * 1024  # nats-server's default, until a server says
_U64_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF
# "NATS/1.0\r\n" "Nats-Msg-Id: " <id> "\r\n" "\r\n": what nats-py sends before the payload;
# nats-server holds header and payload together to its max_payload.
_HEADER_FRAMING: Final = 10 + 13 + 2 + 2
_HEADER_SLACK: Final = 64

DroppedCallback = Callable[[int, int, int, str], None]  # dp_rank, epoch, seq, reason


def header_bytes(dedup_id: str) -> int:
    """Bytes of the headers a batch is published with."""
    return _HEADER_FRAMING + len(dedup_id.encode())


class SinkStats(msgspec.Struct):
    published: int = 0
    refused: int = 0  # offered while the buffer was full
    retries: int = 0
    blocks: int = 0
    bytes: int = 0  # payload bytes acknowledged by JetStream
    splits: int = 0  # steps or resyncs published as more than one batch (by the ranks)
    split_events: int = 0  # events cut into several events (by the ranks)
    max_payload_errors: int = 0  # MaxPayloadError raised by the client (never retried)
    dropped_batches: dict[str, int] = msgspec.field(default_factory=dict)
    dropped_blocks: dict[str, int] = msgspec.field(default_factory=dict)

    def drop(self, reason: str, *, batches: int = 0, blocks: int = 0) -> None:
        if batches:
            self.dropped_batches[reason] = self.dropped_batches.get(reason, 0) + batches
        if blocks:
            self.dropped_blocks[reason] = self.dropped_blocks.get(reason, 0) + blocks


class _Queued:
    """A batch waiting for its ack: what to publish, and who it belongs to."""

    __slots__ = ("blocks", "dedup_id", "dp_rank", "epoch", "model", "payload", "seq", "subject",
                 "ts", "worker_id")

    def __init__(self, batch: EventBatch, payload: bytes) -> None:
        self.subject = subject_for(batch.model, batch.worker_id)
        self.payload = payload
        self.dedup_id = msg_id(batch.worker_id, batch.dp_rank, batch.epoch, batch.seq)
        self.blocks = block_count(batch)
        self.model = batch.model
        self.worker_id = batch.worker_id
        self.dp_rank = batch.dp_rank
        self.epoch = batch.epoch
        self.seq = batch.seq
        self.ts = batch.ts

    def fits(self, max_payload: int) -> bool:
        return (len(self.payload) <= MAX_MESSAGE_BYTES
                and len(self.payload) + header_bytes(self.dedup_id) <= max_payload)


def _discard_outcome(future: asyncio.Future[Any]) -> None:
    """Read a publish's outcome nobody waits for any more, so a failure (the stream had no
    leader for a moment, a lost connection) is not logged as never retrieved."""
    if not future.cancelled():
        future.exception()


class NatsSink:
    """An ordered, bounded queue of bus batches and the task that publishes it."""

    def __init__(self, js: JetStreamContext, max_pending: int = 10_000, window: int = 64,
                 timeout_s: float = 5.0, *, nc: NatsClient | None = None,
                 on_dropped: DroppedCallback | None = None) -> None:
        self.stats = SinkStats()
        self.max_pending = max_pending
        self.on_dropped = on_dropped
        self.last_error = ""
        self._js = js
        self._nc: NatsClient | None = nc if nc is not None else getattr(js, "_nc", None)
        self._window = window
        self._timeout_s = timeout_s
        self._queue: deque[_Queued] = deque()
        self._queued_bytes = 0
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._progress = time.monotonic()  # last ack, or when the queue last filled up

    @property
    def pending(self) -> int:
        return len(self._queue)

    @property
    def pending_bytes(self) -> int:
        return self._queued_bytes

    def room(self) -> int:
        """Batches the buffer takes before it refuses."""
        return max(0, self.max_pending - len(self._queue))

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    @property
    def max_payload(self) -> int:
        """The connected (or last connected) server's max_payload."""
        if self._nc is None:
            return DEFAULT_MAX_PAYLOAD
        return int(self._nc.max_payload)

    @staticmethod
    def header_reserve(worker_id: str, dp_rank: int) -> int:
        """Bytes a rank's batches leave for headers (its longest dedup id, and slack)."""
        return header_bytes(msg_id(worker_id, dp_rank, _U64_MAX, _U64_MAX)) + _HEADER_SLACK

    def batch_limit(self, reserve: int) -> int:
        """Largest encoded batch that fits the server (less `reserve`) and the indexer."""
        return min(self.max_payload - reserve, MAX_MESSAGE_BYTES)

    def stalled_for(self) -> float:
        """Seconds batches have waited without any being acknowledged (0 when empty)."""
        if not self._queue:
            return 0.0
        return time.monotonic() - self._progress

    def offer(self, batch: EventBatch, *, force: bool = False) -> bool:
        """Queue a batch; False (and counted) when the buffer is full, unless `force`d."""
        if len(self._queue) >= self.max_pending and not force:
            self.stats.refused += 1
            return False
        if not self._queue:
            self._progress = time.monotonic()
        item = _Queued(batch, encode_batch(batch))
        self._queue.append(item)
        self._queued_bytes += len(item.payload)
        self._idle.clear()
        self._wakeup.set()
        return True

    async def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything queued so far is stored; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until `stop` is set and the queue is empty (or `stop` and NATS is gone)."""
        attempt = 0
        while True:
            if not self._queue:
                self._idle.set()
                if stop.is_set():
                    return
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), 0.5)
                continue
            sent = await self._send_window()
            if sent:
                attempt = 0
                continue
            if not self._queue:
                continue  # everything left was dropped as too large
            attempt += 1
            self.stats.retries += 1
            if stop.is_set() and attempt > 3:
                log.warning("sink_abandoned", pending=len(self._queue))
                return
            await asyncio.sleep(_BACKOFF_S[min(attempt, len(_BACKOFF_S)) - 1])

    async def _send_window(self) -> int:
        """Publish up to `window` batches; pop those acknowledged in order. Returns count."""
        if self._nc is not None and not self._nc.is_connected:
            # The client would buffer these and flush them to whichever server it reaches
            # next, unchecked against that server's limit: wait for the connection instead.
            self.last_error = "NATS not connected"
            return 0
        count = self._fit_window(min(self._window, len(self._queue)), self.max_payload)
        window = [self._queue[i] for i in range(count)]
        futures = []
        try:
            for i, item in enumerate(window):
                try:
                    futures.append(await self._js.publish_async(
                        item.subject, item.payload, headers={"Nats-Msg-Id": item.dedup_id}))
                except MaxPayloadError:
                    # The limit shrank between the check and the publish (a reconnect):
                    # this batch is replaced, never retried as it is.
                    self.stats.max_payload_errors += 1
                    self._replace(i, self.max_payload)
                    break
        except Exception as exc:  # noqa: BLE001 - any failure: retry from the first unacked
            self.last_error = repr(exc)
            log.debug("publish_failed", error=repr(exc))
        acked = 0
        for future in futures:
            try:
                await asyncio.wait_for(future, self._timeout_s)
            except Exception as exc:  # noqa: BLE001
                self.last_error = repr(exc)
                log.warning("publish_unacknowledged", error=repr(exc), pending=len(self._queue))
                break
            acked += 1
        for future in futures[acked:]:  # re-sent from the first unacked: outcomes unread
            future.add_done_callback(_discard_outcome)
        for _ in range(acked):
            item = self._queue.popleft()
            self._queued_bytes -= len(item.payload)
            self.stats.published += 1
            self.stats.blocks += item.blocks
            self.stats.bytes += len(item.payload)
        if acked:
            self.last_error = ""
            self._progress = time.monotonic()
        return acked

    def _fit_window(self, count: int, max_payload: int) -> int:
        """Replace the batches among the first `count` that exceed the limit; new count."""
        i = 0
        while i < min(count, len(self._queue)):
            if self._queue[i].fits(max_payload) or self._replace(i, max_payload):
                i += 1
        return min(count, len(self._queue))

    def _replace(self, i: int, max_payload: int) -> bool:
        """Batch i is too large: put AllBlocksCleared under its seq, or drop it if even that
        does not fit. Returns whether a batch is still at i for this seq."""
        item = self._queue[i]
        size = len(item.payload)
        clear = EventBatch(schema=SCHEMA_V1, model=item.model, worker_id=item.worker_id,
                           dp_rank=item.dp_rank, epoch=item.epoch, seq=item.seq, ts=item.ts,
                           events=[AllBlocksCleared()])
        replacement = _Queued(clear, encode_batch(clear))
        kept = replacement.fits(max_payload)
        reason = "exceeds_max_payload" if kept else "unpublishable"
        self.stats.drop(reason, batches=1, blocks=item.blocks)
        log.warning("batch_dropped", reason=reason, worker=item.worker_id, dp_rank=item.dp_rank,
                    epoch=item.epoch, seq=item.seq, bytes=size, blocks=item.blocks,
                    max_payload=max_payload,
                    replaced_by="AllBlocksCleared" if kept else None)
        self._queued_bytes -= size
        if kept:
            self._queue[i] = replacement
            self._queued_bytes += len(replacement.payload)
        else:
            del self._queue[i]
        if self.on_dropped is not None:
            self.on_dropped(item.dp_rank, item.epoch, item.seq, reason)
        return kept
