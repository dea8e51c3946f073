"""Bus batches -> JetStream, in order, with dedup ids and a bounded buffer.

`offer()` never blocks: a full buffer refuses the batch and the caller (a `RankPublisher`)
turns the loss into a resync once there is room again. The sender keeps up to `window`
publishes in flight; when one fails (NATS away, timeout) it re-sends everything from the
first unacknowledged batch on, in order. JetStream drops the re-sends it already stored
(same `Nats-Msg-Id` within the stream's duplicate window), so each batch lands once and
per-rank order is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Final

import msgspec
import structlog
from nats.js import JetStreamContext

from kvcore.bus import EventBatch, block_count, encode_batch, msg_id, subject_for

__all__ = ["NatsSink", "SinkStats"]

log = structlog.get_logger("publisher.sink")

_BACKOFF_S: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)


class SinkStats(msgspec.Struct):
    published: int = 0
    refused: int = 0  # offered while the buffer was full
    retries: int = 0
    blocks: int = 0


class NatsSink:
    """An ordered, bounded queue of bus batches and the task that publishes it."""

    def __init__(self, js: JetStreamContext, max_pending: int = 10_000, window: int = 64,
                 timeout_s: float = 5.0) -> None:
        self.stats = SinkStats()
        self.max_pending = max_pending
        self._js = js
        self._window = window
        self._timeout_s = timeout_s
        self._queue: deque[tuple[str, bytes, str, int]] = deque()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def pending(self) -> int:
        return len(self._queue)

    def offer(self, batch: EventBatch) -> bool:
        """Queue a batch; False (and counted) when the buffer is full."""
        if len(self._queue) >= self.max_pending:
            self.stats.refused += 1
            return False
        self._queue.append((subject_for(batch.model, batch.worker_id), encode_batch(batch),
                            msg_id(batch.worker_id, batch.dp_rank, batch.epoch, batch.seq),
                            block_count(batch)))
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
            attempt += 1
            self.stats.retries += 1
            if stop.is_set() and attempt > 3:
                log.warning("sink_abandoned", pending=len(self._queue))
                return
            await asyncio.sleep(_BACKOFF_S[min(attempt, len(_BACKOFF_S)) - 1])

    async def _send_window(self) -> int:
        """Publish up to `window` batches; pop those acknowledged in order. Returns count."""
        window = [self._queue[i] for i in range(min(self._window, len(self._queue)))]
        futures = []
        try:
            for subject, payload, dedup_id, _ in window:
                futures.append(await self._js.publish_async(
                    subject, payload, headers={"Nats-Msg-Id": dedup_id}))
        except Exception as exc:  # noqa: BLE001 - any failure: retry from the first unacked
            log.debug("publish_failed", error=repr(exc))
        acked = 0
        for future in futures:
            try:
                await asyncio.wait_for(future, self._timeout_s)
            except Exception as exc:  # noqa: BLE001
                log.warning("publish_unacknowledged", error=repr(exc), pending=len(self._queue))
                break
            acked += 1
        for _ in range(acked):
            _, _, _, blocks = self._queue.popleft()
            self.stats.published += 1
            self.stats.blocks += blocks
        return acked
