"""Slot ids of a sub-slot model (indexer/index/redis_sharded.py, lua/subslot_claim.lua,
lua/subslot_dir.lua) are never given out twice, even when the directory's id counter
rolls back (its master restored from an older dump; here the directory's keys are set
back by hand, as such a dump would have them, on one redis-server with 4 sub-slots and
on a 3-master cluster). An id is claimed in every sub-slot (each sub-slot's copy of the
counter raised past it) before the directory takes it; an allocation stopped between the
two steps, or raced by another process, wastes an id and never shares one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from indexer.index.layouts import directory_prefix
from indexer.index.redis_sharded import ShardedRedisIndex
from kvcore.bus import SCHEMA_VERSION, BlockStored, EventBatch, pack_tokens
from tests.support.subslot_backend import BACKEND_PARAMS, Backend, flushed_backend

MODEL = "org/ids-model"
BS = 4
BLOCKS = 200
DIRECTORY = directory_prefix(MODEL)


class _StoppedError(Exception):
    """An allocation stopped after its claim (a crash, as far as Redis can tell)."""


@pytest.fixture(params=BACKEND_PARAMS)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    yield await flushed_backend(request)


def stored(worker: str, seq: int = 0) -> EventBatch:
    base = 1_000_000 * (sum(worker.encode()) + 7 * len(worker)) + 10_000 * seq
    tokens = list(range(base, base + BLOCKS * BS))
    return EventBatch(schema=SCHEMA_VERSION, model=MODEL, worker_id=worker, dp_rank=0,
                      epoch=1, seq=seq, ts=float(seq),
                      events=[BlockStored(block_hashes=list(range(seq * BLOCKS + 1,
                                                                  (seq + 1) * BLOCKS + 1)),
                                          parent_hash=None, token_ids=pack_tokens(tokens),
                                          block_size=BS, medium="gpu")])


async def ids(index: ShardedRedisIndex) -> dict[str, int]:
    return {ref.worker_id: slot for slot, ref in (await index._refs_by_id(MODEL)).items()}


async def copies(index: ShardedRedisIndex) -> list[int]:
    """Each sub-slot's copy of the id counter (the lowest id not claimed there)."""
    info = await index._model(MODEL)
    assert info is not None
    raw = await index._run([("GET", prefix + "nextslot") for prefix in info.prefixes])
    return [int(value.split(b" ")[0]) if value else 0 for value in raw]


async def roll_back_directory(index: ShardedRedisIndex, *, created_after: list[str],
                              counter: int) -> None:
    """The directory as a dump taken before `created_after` were created would have it:
    those ranks unmapped, the counter back at `counter` (the sub-slots untouched, as
    when only the directory's master is restored)."""
    await index._run([("HDEL", DIRECTORY + "slots", *[f"{w}\n0" for w in created_after]),
                      ("SET", DIRECTORY + "nextslot", counter)])
    await index.reset_caches()


async def test_a_rolled_back_directory_gives_no_id_out_again(backend: Backend) -> None:
    """Ranks created after the (simulated) dump keep their ids in the sub-slots; the ranks
    created after the directory rolled back get ids above all of them."""
    index = backend.index()
    try:
        await index.apply([stored(f"before-{i}") for i in range(2)])
        await index.apply([stored(f"after-{i}") for i in range(3)])
        given = await ids(index)
        assert sorted(given.values()) == list(range(5))
        await roll_back_directory(index, created_after=[f"after-{i}" for i in range(3)],
                                  counter=2)
        await index.apply([stored(f"new-{i}") for i in range(3)])
        now = await ids(index)
        new = {now[f"new-{i}"] for i in range(3)}
        assert not new & set(given.values()), f"ids given again: {new & set(given.values())}"
        assert min(new) >= 5
        assert all(copy > max(new) for copy in await copies(index))
    finally:
        await index.close()


async def test_a_subslot_copy_rolled_back_alone_is_raised_again(backend: Backend) -> None:
    """A sub-slot's copy behind the directory's counter (its master restored alone): the
    directory's counter still decides, and the copy is raised past the new id."""
    index = backend.index()
    try:
        await index.apply([stored(f"before-{i}") for i in range(3)])
        info = await index._model(MODEL)
        assert info is not None
        await index._run([("DEL", info.prefixes[1] + "nextslot")])
        await index.apply([stored("new")])
        assert (await ids(index))["new"] == 3
        assert await copies(index) == [4] * backend.subslots
    finally:
        await index.close()


async def test_an_allocation_stopped_after_its_claim_wastes_the_id(backend: Backend) -> None:
    """Stopped between the claim and the directory: the rank is not mapped, the id is
    claimed in every sub-slot and never given out; the next allocation takes the next
    one. With the directory rolled back past both, neither is given again."""
    index = backend.index()
    try:
        await index.apply([stored("first")])

        async def stop(claimed: int) -> None:
            raise _StoppedError(claimed)

        index.claim_hook = stop
        with pytest.raises(_StoppedError):
            await index.apply([stored("stopped")])
        assert "stopped" not in await ids(index)
        assert await copies(index) == [2] * backend.subslots
        index.claim_hook = None
        await index.apply([stored("stopped")])
        assert (await ids(index))["stopped"] == 2
        await roll_back_directory(index, created_after=["stopped"], counter=1)
        await index.apply([stored("later")])
        assert (await ids(index))["later"] == 3
    finally:
        await index.close()


async def test_a_reslot_stopped_after_its_claim_takes_a_higher_id(backend: Backend) -> None:
    """A re-slot (a torn rank loaded again) stopped after claiming its new id: the next
    load claims another, above it, and the rank ends at that id; ids stay unique."""
    index = backend.index()
    try:
        await index.apply([stored("torn"), stored("other")])

        async def stop_after_sets(wave: int) -> None:
            if wave == 2:
                raise _StoppedError(wave)

        index.wave_hook = stop_after_sets
        with pytest.raises(_StoppedError):
            await index.apply([stored("torn", seq=1)])
        index.wave_hook = None

        async def stop(claimed: int) -> None:
            raise _StoppedError(claimed)

        index.claim_hook = stop
        with pytest.raises(_StoppedError):
            await index.apply([stored("torn", seq=1)])  # loads the torn rank: re-slot
        assert await copies(index) == [3] * backend.subslots
        index.claim_hook = None
        await index.apply([stored("torn", seq=1)])
        assert await ids(index) == {"torn": 3, "other": 1}
        assert index.reslots == 1  # the stopped one never took its id
    finally:
        await index.close()


async def claim_of(task: asyncio.Task[object], claimed: asyncio.Queue[int]) -> int:
    """The id `task`'s allocation claimed (it waits in the claim hook); fails if the task
    ended without claiming."""
    getter = asyncio.ensure_future(claimed.get())
    done, _ = await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
    if getter not in done:
        getter.cancel()
        pytest.fail(f"the allocation ended without claiming an id: {task}")
    return getter.result()


async def test_concurrent_allocations_never_share_an_id(backend: Backend) -> None:
    """Two processes allocate at once: the first claims an id and waits before the
    directory; the second claims above it and takes its own; the first then finds the
    directory's counter past its claim and claims again. Then the same while the
    directory rolls back under the first: its claim still keeps the second off it."""
    first, second = backend.index(), backend.index()
    try:
        await first.apply([stored("base")])
        claimed: asyncio.Queue[int] = asyncio.Queue()
        go = asyncio.Event()

        async def wait(want: int) -> None:
            await claimed.put(want)
            await go.wait()

        first.claim_hook = wait
        task: asyncio.Task[object] = asyncio.create_task(first.apply([stored("one")]))
        held = await claim_of(task, claimed)
        first.claim_hook = None
        await second.apply([stored("two")])
        go.set()
        await task
        given = await ids(second)
        assert held == 1 and given["two"] == 2 and given["one"] == 3

        go.clear()
        first.claim_hook = wait
        task = asyncio.create_task(first.apply([stored("three")]))
        held = await claim_of(task, claimed)
        first.claim_hook = None
        await roll_back_directory(second, created_after=["one", "two"], counter=1)
        await second.apply([stored("four")])
        go.set()
        await task
        given = await ids(second)
        assert held == 4 and given["four"] == 5 and given["three"] == 6
    finally:
        await first.close()
        await second.close()
