"""FindBestWorkerStream: many decisions on one bidirectional stream, answered in order.

A unary call costs grpc.aio a task, a call object, metadata and a status per decision; on
a stream each decision is one message read and one written. The servicer decides up to
`window` requests of a stream at once (the in-flight limit per stream, `kv-indexer serve
--grpc-stream-window`) and answers them in request order; the stream reads no further
request while `window` are undecided or unsent, so gRPC's flow control holds the client
back instead of the server buffering without bound. A window of 1 decides one request at
a time with no task per decision (enough for the in-memory index, which never waits);
more overlaps a backend's round trips (Redis).

A request that fails is answered with the status the unary call would have ended with
(`FindBestWorkerStreamResponse.code`, `.message`) and the stream goes on; a message that
does not parse is INVALID_ARGUMENT in its answer. What ends the stream: the client closing
or cancelling it, its deadline (every later answer would be DEADLINE_EXCEEDED), a message
over the size limit (gRPC ends the stream RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Final, TypeVar

__all__ = ["DEFAULT_STREAM_CANDIDATES", "answer_in_order"]

# Candidates answered per decision when a streamed request sets no `max_candidates`.
DEFAULT_STREAM_CANDIDATES: Final = 8

T = TypeVar("T")
R = TypeVar("R")


async def answer_in_order(
    items: AsyncIterable[T], decide: Callable[[T], Awaitable[R]], window: int
) -> AsyncIterator[R]:
    """`decide(item)` of every item, in item order, at most `window` of them undecided or
    unsent at once (no item is read beyond that)."""
    if window <= 1:
        async for item in items:
            yield await decide(item)
        return
    slots = asyncio.Semaphore(window)
    decided: asyncio.Queue[asyncio.Future[R] | None] = asyncio.Queue()

    async def read() -> None:
        try:
            iterator = aiter(items)
            while True:
                await slots.acquire()
                try:
                    item = await anext(iterator)
                except StopAsyncIteration:
                    return
                decided.put_nowait(asyncio.ensure_future(decide(item)))
        finally:
            decided.put_nowait(None)

    reader = asyncio.create_task(read())
    try:
        while (future := await decided.get()) is not None:
            answer = await future
            slots.release()
            yield answer
        await reader  # a broken request stream raises here
    finally:
        reader.cancel()
        while not decided.empty():
            leftover = decided.get_nowait()
            if leftover is not None:
                leftover.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
