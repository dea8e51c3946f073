"""Field-scale batches against NATS's max_payload, end to end on private nats-servers.

A rank holding 25,000 blocks resyncs through a server with the default 1 MiB limit and one
with 256 KiB; a 320k-token engine step (20,000 blocks in one BlockStored) goes from a mock
vLLM engine over ZMQ through the bridge; a block larger than a tiny server's limit is
dropped, counted and resynced around while later batches keep flowing; a bridge whose
server comes back with a smaller limit replaces the batches that no longer fit. Each ends
with the in-memory index equal, block key by block key, to the reference model.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
import zmq.asyncio
from structlog.testing import capture_logs

from indexer.app import IndexerService
from indexer.embedded import EmbeddedNats
from indexer.index.protocol import ScoreQuery
from kvcore.bus import (
    SCHEMA_VERSION,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Event,
    EventBatch,
    encode_batch,
    msg_id,
    pack_tokens,
)
from kvcore.topology import StreamSettings, resync_subject
from kvsim.mock_engines import (
    BlockPool,
    MockEngine,
    PoolCleared,
    PoolEvent,
    PoolRemoved,
    PoolStored,
    synthetic_prompts,
)
from publisher.nats_sink import header_bytes
from publisher.publisher import KVEventPublisher, RankPublisher
from publisher.zmq_source import EngineSource
from tests.support.capture import CapturingSink
from tests.support.event_path import service_config
from tests.support.polling import eventually
from tests.support.reference import ReferenceIndex

pytestmark = pytest.mark.integration

MODEL = "field/model-70b"
WORKER = "10.0.0.7:8000"
BS = 16
PARTITIONS = 2
KIB = 1024
LIMITS = [pytest.param(None, id="max_payload-1MiB-default"),
          pytest.param(256 * KIB, id="max_payload-256KiB")]


# --- helpers ------------------------------------------------------------------------------


def bus_event(event: PoolEvent) -> Event:
    if isinstance(event, PoolStored):
        return BlockStored(block_hashes=list(event.block_hashes), parent_hash=event.parent_hash,
                           token_ids=pack_tokens(event.token_ids) if event.token_ids else b"",
                           block_size=event.block_size if event.token_ids else 0,
                           medium=event.medium)
    if isinstance(event, PoolRemoved):
        return BlockRemoved(block_hashes=list(event.block_hashes), medium=event.medium)
    assert isinstance(event, PoolCleared)
    return AllBlocksCleared()


def engine_steps(held: int, *, seed: int, evictions: int = 600) -> Iterator[list[Event]]:
    """A rank's engine steps: shared-prefix prompts until its GPU pool holds `held` blocks
    and has evicted `evictions` (offloading them to a CPU tier, which evicts too)."""
    pool = BlockPool(capacity_blocks=held, block_size=BS, cpu_capacity_blocks=400, seed=seed)
    prompts = synthetic_prompts(seed=seed, n_prefixes=32, prefix_tokens=1024, max_suffix=4096)
    evicted = 0
    while len(pool.gpu) < held or evicted < evictions:
        _, events = pool.serve(next(prompts))
        evicted += sum(len(e.block_hashes) for e in events
                       if isinstance(e, PoolRemoved) and e.medium == "gpu")
        yield [bus_event(e) for e in events]


def capture(pub: KVEventPublisher) -> list[EventBatch]:
    """Every batch the publisher's sink accepts, in order."""
    published: list[EventBatch] = []
    CapturingSink(pub, published)
    return published


def reference_presence(batches: list[EventBatch]) -> dict[int, Any]:
    reference = ReferenceIndex(65_536)
    for batch in batches:
        reference.apply(batch)
    return reference.presence(MODEL)


def as_batch(rank: RankPublisher, events: list[Event]) -> EventBatch:
    """The engine's own events as one batch of the rank's epoch: what the rank holds."""
    return EventBatch(schema=SCHEMA_VERSION, model=MODEL, worker_id=WORKER,
                      dp_rank=rank.dp_rank, epoch=rank.epoch, seq=0, events=events)


async def caught_up(service: IndexerService, rank: RankPublisher) -> bool:
    """The index has applied the rank's last batch."""
    assert service.index is not None
    return any(w.worker_id == WORKER and w.dp_rank == rank.dp_rank and w.epoch == rank.epoch
               and w.last_seq == rank.seq - 1 for w in await service.index.workers(MODEL))


async def index_presence(service: IndexerService) -> dict[int, Any]:
    assert service.index is not None
    return await service.index.presence(MODEL)


def publisher(url: str, **kwargs: Any) -> KVEventPublisher:
    return KVEventPublisher(MODEL, WORKER, block_size=BS, nats_url=url,
                            stream=StreamSettings(partitions=PARTITIONS), **kwargs)


@asynccontextmanager
async def indexer(url: str) -> AsyncIterator[IndexerService]:
    service = IndexerService(service_config(url))
    await service.start()
    try:
        yield service
    finally:
        await service.close()


def assert_all_fit(published: list[EventBatch], max_payload: int) -> None:
    for batch in published:
        dedup = msg_id(batch.worker_id, batch.dp_rank, batch.epoch, batch.seq)
        assert len(encode_batch(batch)) + header_bytes(dedup) <= max_payload


# --- (a) a 25,000-block resync --------------------------------------------------------------


class TestLargeResync:
    """A worker holding 25,000 blocks resyncs, whatever the server's max_payload."""

    @pytest.mark.parametrize("max_payload", LIMITS)
    async def test_resync_of_25k_blocks(self, tmp_path: Path, max_payload: int | None) -> None:
        """Asked over NATS like the indexer asks, the rank re-sends 25,000 blocks (several
        MB) in batches under the limit; the index then equals the engine's cache."""
        server = EmbeddedNats(tmp_path / "nats", max_payload=max_payload).start()
        try:
            async with indexer(server.url) as service, publisher(server.url) as pub:
                assert pub.sink is not None
                limit = pub.sink.max_payload
                assert limit == (max_payload or 1024 * KIB)  # read from the server's INFO
                rank = pub.ranks[0]
                engine_events = [e for step in engine_steps(25_000, seed=11) for e in step]
                # The rank holds them; the index has none (say, the stream lost them).
                rank.mirror.apply(engine_events)
                assert len(rank.mirror) >= 25_000  # 25,000 on GPU, and some only on CPU
                published = capture(pub)
                before = msgspec.structs.replace(pub.sink.stats)
                nc = await nats.connect(server.url)
                started = time.perf_counter()
                reply = await nc.request(resync_subject(MODEL, WORKER),
                                         b'{"dp_rank": 0, "reason": "test"}', timeout=30)
                await nc.close()
                assert msgspec.json.decode(reply.data) == {"ok": True}
                assert await pub.flush(120)
                await eventually(lambda: caught_up(service, rank), timeout=120)
                seconds = time.perf_counter() - started
                stats = pub.sink.stats
                sent_bytes = stats.bytes - before.bytes
                batches = stats.published - before.published
                largest = max(len(encode_batch(b)) for b in published)
                print(f"\nresync through max_payload={limit}: blocks={len(rank.mirror)} "
                      f"events={sum(len(b.events) for b in published)} batches={batches} "
                      f"bytes={sent_bytes} largest_batch={largest} seconds={seconds:.2f}")

                assert rank.resyncs == 1
                assert batches == len(published) > sent_bytes // limit  # cut by bytes
                assert sent_bytes > limit  # the resync cannot be one message
                assert_all_fit(published, limit)
                assert stats.dropped_batches == {} and stats.dropped_blocks == {}
                got = await index_presence(service)
                assert got == reference_presence(published)
                assert got == reference_presence([as_batch(rank, engine_events)])
                assert len(got) == len(rank.mirror)
        finally:
            server.stop()


# --- (b) a 320k-token engine step -----------------------------------------------------------


@asynccontextmanager
async def bridge(url: str, engine: MockEngine) -> AsyncIterator[tuple[KVEventPublisher,
                                                                       EngineSource]]:
    """The bridge in miniature: KVEventPublisher + EngineSource of rank 0."""
    pub = publisher(url)
    await pub.start()
    ctx = zmq.asyncio.Context()
    source = EngineSource(ctx, pub.ranks[0], engine.endpoint,
                          replay_endpoint=engine.replay_endpoint, replay_timeout_s=5.0)
    stop = asyncio.Event()
    task = asyncio.create_task(source.run(stop))
    await asyncio.sleep(0.2)  # let SUB connect (PUB drops until then; replay covers it)
    try:
        yield pub, source
    finally:
        stop.set()
        await task
        await pub.close()
        ctx.term()


class TestLongPrefill:
    """One engine step of 320k tokens: 20,000 blocks in one BlockStored, 1.5 MB."""

    @pytest.mark.parametrize("max_payload", LIMITS)
    async def test_320k_token_step(self, tmp_path: Path, max_payload: int | None) -> None:
        """From the engine's ZMQ socket to the index: all 20,000 blocks match."""
        server = EmbeddedNats(tmp_path / "nats", max_payload=max_payload).start()
        engine = MockEngine(capacity_blocks=20_000, block_size=BS,
                            endpoint="tcp://127.0.0.1:*",
                            replay_endpoint="tcp://127.0.0.1:*").start()
        tokens = next(synthetic_prompts(seed=5, n_prefixes=1, prefix_tokens=320_000,
                                        max_suffix=1))[:320_000]
        try:
            async with indexer(server.url) as service, \
                    bridge(server.url, engine) as (pub, source):
                assert pub.sink is not None
                published = capture(pub)
                started = time.perf_counter()
                engine.serve(tokens)

                async def indexed() -> bool:
                    assert service.index is not None
                    result = await service.index.score(ScoreQuery(
                        model=MODEL, token_ids=tokens, block_size=BS))
                    return any(s.matched_blocks == 20_000 for s in result.scores)

                await eventually(indexed, timeout=120)
                seconds = time.perf_counter() - started
                stored = [e for b in published for e in b.events if isinstance(e, BlockStored)]
                print(f"\n320k-token step through max_payload={pub.sink.max_payload}: "
                      f"blocks={sum(len(e.block_hashes) for e in stored)} "
                      f"batches={len(published)} bytes={pub.sink.stats.bytes} "
                      f"seconds={seconds:.2f}")
                assert source.stats.batches == 1 and source.stats.gaps == 0
                assert len(published) >= 2 and pub.sink.stats.split_events == 1
                assert [b.seq for b in published] == list(range(len(published)))
                for previous, piece in itertools.pairwise(stored):
                    assert piece.parent_hash == previous.block_hashes[-1]
                assert_all_fit(published, pub.sink.max_payload)
                assert await index_presence(service) == reference_presence(published)
        finally:
            engine.close()
            server.stop()


# --- (c) what cannot fit --------------------------------------------------------------------


def chain(hashes: list[int], parent: int | None, *, block_size: int = BS,
          seed: int = 0) -> BlockStored:
    tokens = [(seed * 7919 + i) % 50_000 for i in range(len(hashes) * block_size)]
    return BlockStored(block_hashes=hashes, parent_hash=parent, token_ids=pack_tokens(tokens),
                       block_size=block_size)


class TestCannotFit:
    """A server limit (1 KiB) smaller than one block: dropped, counted, resynced, no wedge."""

    async def test_block_larger_than_max_payload(self, tmp_path: Path) -> None:
        """A 256-token block (1 KiB of tokens) cannot be published; its descendants are
        left out too; a resync follows; later batches that fit are indexed."""
        server = EmbeddedNats(tmp_path / "nats", max_payload=KIB).start()
        try:
            async with indexer(server.url) as service, publisher(server.url) as pub:
                assert pub.sink is not None and pub.sink.max_payload == KIB
                rank = pub.ranks[0]
                published = capture(pub)
                first = chain(list(range(1, 13)), None, seed=1)
                rank.publish([first])  # fits, cut in two
                assert await pub.flush(30)
                await eventually(lambda: caught_up(service, rank), timeout=30)
                with capture_logs() as logs:
                    rank.publish([chain([100], 3, block_size=256, seed=2),  # too large
                                  chain([101], 100, seed=3)])  # its child: fits, unsendable
                    rank.publish([chain([102], 101, seed=4)])  # a later grandchild
                drops = [e for e in logs if e["event"] == "blocks_dropped"]
                assert [(e["reason"], e["blocks"]) for e in drops] == [
                    ("block_too_large", 1), ("unsendable_chain", 1), ("unsendable_chain", 1)]
                assert drops[0]["max_payload"] == KIB
                assert rank.resyncs == 1  # asked for by the drop, queued at once
                rank.publish([chain([200, 201], None, seed=5)])  # later batches still go
                assert await pub.flush(30)
                await eventually(lambda: caught_up(service, rank), timeout=30)

                stats = pub.sink.stats
                assert stats.dropped_blocks == {"block_too_large": 1, "unsendable_chain": 2}
                assert stats.dropped_batches == {} and stats.refused == 0
                assert pub.sink.pending == 0 and pub.health()[0]
                assert_all_fit(published, KIB)
                assert stats.splits >= 2  # the first step and the resync: cut to 1 KiB
                assert 100 not in rank.mirror.blocks and 101 not in rank.mirror.blocks
                want = reference_presence([as_batch(rank, [
                    first, chain([200, 201], None, seed=5)])])
                got = await index_presence(service)
                assert got == want == reference_presence(published)
                assert len(got) == 14
        finally:
            server.stop()

    async def test_uncut_batch_is_replaced_not_retried(self, tmp_path: Path) -> None:
        """A batch offered uncut (over the limit) is never sent: the sink puts
        AllBlocksCleared under its seq, counts it, and the rank re-sends itself cut."""
        server = EmbeddedNats(tmp_path / "nats", max_payload=4 * KIB).start()
        try:
            async with indexer(server.url) as service, publisher(server.url) as pub:
                assert pub.sink is not None
                rank = pub.ranks[0]
                rank.publish([chain([1, 2], None, seed=1)])
                big = chain(list(range(10, 210)), 2, seed=2)  # 200 blocks: ~15 KB
                rank.mirror.apply([big])
                oversized = EventBatch(schema=SCHEMA_VERSION, model=MODEL, worker_id=WORKER,
                                       epoch=rank.epoch, seq=rank.seq, events=[big])
                assert pub.sink.offer(oversized)  # as a caller that did not cut it would
                rank.seq += 1
                rank.publish([chain([300], None, seed=3)])
                assert await pub.flush(30)
                await eventually(lambda: _is(rank.resyncs == 1))
                assert await pub.flush(30)
                await eventually(lambda: caught_up(service, rank), timeout=30)
                stats = pub.sink.stats
                assert stats.dropped_batches == {"exceeds_max_payload": 1}
                assert stats.dropped_blocks == {"exceeds_max_payload": 200}
                assert service.stats.gaps == 0  # the seq stayed gapless
                want = reference_presence([as_batch(rank, [
                    chain([1, 2], None, seed=1), big, chain([300], None, seed=3)])])
                assert await index_presence(service) == want
                assert len(want) == 203
        finally:
            server.stop()


# --- a server that comes back with a smaller limit ----------------------------------------


class TestLimitChanges:
    """The client reconnects to a server with a smaller max_payload."""

    async def test_reconnect_to_smaller_limit(self, tmp_path: Path) -> None:
        """Batches cut for 1 MiB and queued while NATS was down no longer fit 256 KiB
        after the restart: each is replaced, one resync re-sends the rank cut to the new
        limit, and the index ends equal to the engine's cache."""
        server = EmbeddedNats(tmp_path / "nats").start()
        try:
            async with indexer(server.url) as service, publisher(server.url) as pub:
                assert pub.sink is not None and pub.sink.max_payload == 1024 * KIB
                rank = pub.ranks[0]
                steps = engine_long_prompts(4, blocks=8_000)
                rank.publish(steps[0])
                assert await pub.flush(30)
                await eventually(lambda: caught_up(service, rank), timeout=60)
                server.kill()
                await eventually(lambda: _is(not pub.connected))
                for step in steps[1:]:
                    rank.publish(step)  # one ~600 KB batch each, queued
                assert pub.sink.pending == 3
                server.max_payload = 256 * KIB
                server.start()
                assert await pub.flush(120)
                await eventually(lambda: caught_up(service, rank), timeout=120)
                assert pub.sink.max_payload == 256 * KIB
                stats = pub.sink.stats
                assert stats.dropped_batches == {"exceeds_max_payload": 3}
                assert rank.resyncs == 1  # one resync covers the three
                want = reference_presence([as_batch(rank, [e for s in steps for e in s])])
                assert await index_presence(service) == want
                assert len(want) == 32_000
        finally:
            server.stop()


def engine_long_prompts(n: int, *, blocks: int) -> list[list[Event]]:
    """n steps of one long prompt each (`blocks` full blocks, unrelated prompts)."""
    pool = BlockPool(capacity_blocks=n * blocks, block_size=BS, seed=3)
    prompts = synthetic_prompts(seed=3, n_prefixes=n, prefix_tokens=blocks * BS, max_suffix=1)
    steps: list[list[Event]] = []
    seen: set[int] = set()
    while len(steps) < n:
        tokens = next(prompts)[: blocks * BS]
        first = pool.block_hashes(tokens)[0]
        if first in seen:
            continue
        seen.add(first)
        _, events = pool.serve(tokens)
        steps.append([bus_event(e) for e in events])
    return steps


async def _is(value: bool) -> bool:
    return value
