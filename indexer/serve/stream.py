"""FindBestWorkerStream: many decisions on one bidirectional stream, answered in order.

A unary call costs grpc.aio a task, a call object, metadata and a status per decision; on
a stream a message of one or more decisions is one message read and one written. The
servicer decides up to `window` messages of a stream at once (the in-flight limit per
stream, `kv-indexer serve --grpc-stream-window`) and answers them in order; the stream
reads no further message while `window` are undecided or unsent, so gRPC's flow control
holds the client back instead of the server buffering without bound. A window of 1
decides one message at a time with no task per message (enough for the in-memory index,
which never waits); more overlaps a backend's round trips (Redis).

A message carries one or more requests and is answered by one message, one answer per
request in order. A request that fails is answered with the
status the unary call would have ended with (`StreamedDecision.code`, `.message`) and
the stream goes on; a request that does not parse is INVALID_ARGUMENT in its answer, a
message that cannot even be split into requests gets one INVALID_ARGUMENT answer. What
ends the stream: the client closing or cancelling it, its deadline (every later answer
would be DEADLINE_EXCEEDED), a message over the size limit (gRPC ends the stream
RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Final, TypeVar

__all__ = ["DEFAULT_STREAM_CANDIDATES", "StreamedAnswers", "answer_in_order", "split_requests",
           "varint"]

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


# --- the wire form of the stream's messages ------------------------------------------------
# A stream message's requests are sliced out of its bytes here and each parsed on its own
# (with the token ids read off the wire), and answers are written as bytes: building a
# FindBestWorkerStreamResponse would copy every answer once more.

_LEN: Final = 2  # wire type of a length-delimited field


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def varint(value: int) -> bytes:
    """`value` (>= 0) as protobuf's base-128 varint."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def split_requests(message: bytes) -> list[memoryview]:
    """The serialised FindBestWorkerRequests of a FindBestWorkerStreamRequest (field 1),
    as views of `message` (a prompt is tens of kB: no copy); ValueError when the bytes
    are not a message."""
    parts: list[memoryview] = []
    view = memoryview(message)
    at = 0
    while at < len(message):
        key, at = _read_varint(message, at)
        wire = key & 7
        if wire == 0:
            _, at = _read_varint(message, at)
        elif wire == 1:
            at += 8
        elif wire == 5:
            at += 4
        elif wire == _LEN:
            length, at = _read_varint(message, at)
            if key >> 3 == 1:
                parts.append(view[at : at + length])
            at += length
        else:
            raise ValueError(f"wire type {wire}")
        if at > len(message):
            raise ValueError("a field runs past the end")
    return parts


class StreamedAnswers:
    """One FindBestWorkerStreamResponse as bytes, and each answer's status code (for the
    metrics interceptor)."""

    __slots__ = ("codes", "data")

    def __init__(self) -> None:
        self.data = bytearray()
        self.codes: list[int] = []

    def add_answer(self, answer: bytes) -> None:
        self._add(b"\x0a" + varint(len(answer)) + answer, 0)

    def add_error(self, code: int, message: str) -> None:
        text = message.encode()
        self._add(b"\x10" + varint(code) + b"\x1a" + varint(len(text)) + text, code)

    def _add(self, entry: bytes, code: int) -> None:
        self.data += b"\x0a" + varint(len(entry)) + entry
        self.codes.append(code)

    def SerializeToString(self) -> bytes:  # noqa: N802 - what grpc's serialiser calls
        return bytes(self.data)
