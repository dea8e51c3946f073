"""ListWorkers in pages: a fleet whose one answer passes the message limit is listed
whole, page by page, by both client faces; page tokens neither repeat nor skip an entry
that stays listed, and are refused with another filter or when forged.

20,000 ranks on a server whose message limit is 512 KiB (one answer of them is ~1.4 MB):
the same shape as ~230,000 ranks against the default 16 MiB."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Iterator

import grpc
import msgspec
import pytest

from indexer._proto.kvindex.v1 import indexer_pb2 as pb
from indexer._proto.kvindex.v1 import indexer_pb2_grpc as pb_grpc
from indexer.client import AsyncIndexerClient, IndexerClient, WorkerStatus
from indexer.index.memory import MemoryIndex
from indexer.index.protocol import WorkerInfo
from indexer.serve.listing import MAX_PAGE_SIZE, ListingCache, listing_key, page_of
from indexer.serve.service import ServiceSettings, start_grpc_server
from kvcore.bus import EventBatch
from tests.support.ledger_batches import MODEL, batch, stored

WORKERS, DP = 2_500, 8
OTHER = "other-model"
LIMIT = 512 * 1024


def fleet_batches(model: str, workers: int) -> list[EventBatch]:
    """Each of `workers` workers' DP ranks stores two blocks."""
    return [msgspec.structs.replace(batch(0, stored(1, 2), worker=f"worker-{w:05d}", rank=r),
                                    model=model)
            for w in range(workers) for r in range(DP)]


@pytest.fixture
async def served() -> AsyncIterator[tuple[MemoryIndex, int]]:
    index = MemoryIndex()
    batches = fleet_batches(MODEL, WORKERS) + fleet_batches(OTHER, 10)
    for start in range(0, len(batches), 2_000):
        await index.apply(batches[start : start + 2_000])
    server, port = await start_grpc_server(
        index, "127.0.0.1:0",
        settings=ServiceSettings(worker_cache_seconds=0, max_message_bytes=LIMIT))
    try:
        yield index, port
    finally:
        await server.stop(0)


def refs(statuses: list[WorkerStatus]) -> list[tuple[str, str, int]]:
    return [(s.model, s.worker_id, s.dp_rank) for s in statuses]


def index_refs(infos: list[WorkerInfo]) -> list[tuple[str, str, int]]:
    return [(w.model, w.worker_id, w.dp_rank) for w in sorted(infos, key=listing_key)]


async def test_one_answer_of_the_fleet_is_refused_with_a_clear_status(
        served: tuple[MemoryIndex, int]) -> None:
    _, port = served
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.KvIndexerStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ListWorkers(pb.ListWorkersRequest(model=MODEL))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "page_size" in (refused.value.details() or "")
        first = await stub.ListWorkers(pb.ListWorkersRequest(model=MODEL, page_size=50_000))
        assert len(first.workers) == MAX_PAGE_SIZE and first.next_page_token


async def test_the_async_client_lists_every_rank_in_order(
        served: tuple[MemoryIndex, int]) -> None:
    index, port = served
    async with AsyncIndexerClient(f"127.0.0.1:{port}", timeout=30.0) as client:
        listed = await client.list_workers(MODEL)
        everything = await client.list_workers()
    assert len(listed) == WORKERS * DP
    assert refs(listed) == index_refs(await index.workers(MODEL))
    assert refs(everything) == index_refs(await index.workers())
    assert sum(sum(s.blocks_by_tier.values()) for s in listed) == WORKERS * DP * 2


async def test_the_sync_client_lists_every_rank(served: tuple[MemoryIndex, int]) -> None:
    index, port = served
    expected = index_refs(await index.workers(MODEL))

    def listed() -> list[WorkerStatus]:
        with IndexerClient(f"127.0.0.1:{port}", timeout=30.0) as client:
            return client.list_workers(MODEL, kind="worker")

    assert refs(await asyncio.to_thread(listed)) == expected


async def test_ranks_removed_between_pages_skip_nothing_else(
        served: tuple[MemoryIndex, int]) -> None:
    index, port = served
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.KvIndexerStub(channel)
        pages: list[pb.ListWorkersResponse] = []
        token = ""
        while True:
            page = await stub.ListWorkers(pb.ListWorkersRequest(
                model=MODEL, page_size=3_000, page_token=token))
            pages.append(page)
            if len(pages) == 2:
                # the last entry of this page and the first ones of the next go; so does a
                # worker already listed
                for w in (int(page.workers[-1].worker_id[-5:]) + 1, 0):
                    await index.remove_worker(MODEL, f"worker-{w:05d}")
            token = page.next_page_token
            if not token:
                break
    listed = [(w.worker_id, w.dp_rank) for p in pages for w in p.workers]
    assert len(listed) == len(set(listed)), "an entry was listed twice"
    remaining = {(w.worker_id, w.dp_rank) for w in await index.workers(MODEL)}
    assert remaining <= set(listed), "an entry that stayed listed was skipped"


async def test_a_token_continues_only_its_own_filter(served: tuple[MemoryIndex, int]) -> None:
    _, port = served
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.KvIndexerStub(channel)
        first = await stub.ListWorkers(pb.ListWorkersRequest(model=MODEL, page_size=10))
        for request in (pb.ListWorkersRequest(model=OTHER, page_size=10,
                                              page_token=first.next_page_token),
                        pb.ListWorkersRequest(model=MODEL, page_size=10,
                                              page_token=first.next_page_token + "x"),
                        pb.ListWorkersRequest(model=MODEL, page_size=10,
                                              page_token=base64.urlsafe_b64encode(
                                                  b"\x93\xa1m\xa0\xa0").decode())):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ListWorkers(request)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "page_token" in (refused.value.details() or "")


def infos(n: int) -> list[WorkerInfo]:
    return sorted((WorkerInfo(MODEL, f"w{i:04d}", r, 1, 0, False, {}, 0.0)
                   for i in range(n) for r in range(2)), key=listing_key)


def pages(entries: list[WorkerInfo], size: int) -> Iterator[list[WorkerInfo]]:
    token = ""
    while True:
        page = page_of(entries, model=MODEL, role="", kind="", page_size=size, page_token=token)
        yield list(page.entries)
        token = page.next_page_token
        if not token:
            return


@pytest.mark.parametrize("size", [1, 7, 200, MAX_PAGE_SIZE, 0])
def test_pages_cover_the_listing_exactly(size: int) -> None:
    entries = infos(100)
    got = [e for page in pages(entries, size) for e in page]
    assert got == entries
    assert all(len(page) == (size or len(entries)) for page in list(pages(entries, size))[:-1])


async def test_a_continued_listing_reuses_its_first_pages_listing() -> None:
    cache, fetched = ListingCache(), []

    async def fetch() -> list[WorkerInfo]:
        fetched.append(1)
        return list(reversed(infos(3)))

    first = await cache.sorted_listing((MODEL, "", ""), False, fetch)
    assert first == infos(3)
    assert await cache.sorted_listing((MODEL, "", ""), True, fetch) is first
    assert len(fetched) == 1
    await cache.sorted_listing((MODEL, "", ""), False, fetch)  # a first page reads afresh
    await cache.sorted_listing((OTHER, "", ""), True, fetch)  # nothing kept for it
    assert len(fetched) == 3
