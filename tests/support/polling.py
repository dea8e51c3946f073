"""Waiting for asynchronous effects: poll a check until it holds or a timeout passes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0, *,
                     explain: Callable[[], Awaitable[str]] | None = None) -> None:
    """Await `check()` every 50 ms until it returns True; AssertionError after `timeout` s,
    with what `explain()` then says of the state (for failures seen only in CI)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    state = f"\n{await explain()}" if explain is not None else ""
    raise AssertionError(f"condition not met within {timeout}s{state}")


async def equals(value: Awaitable[int], expected: int) -> bool:
    """An awaitable check for `eventually`: does `value` come out as `expected`?"""
    return await value == expected


async def is_true(value: bool) -> bool:
    """A plain condition as an awaitable check for `eventually` (re-evaluated per poll
    when written as `lambda: is_true(...)`)."""
    return value
