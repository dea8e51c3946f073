"""Shared storage pools end to end on a real nats-server: publishers declare pools in their
registry entries, write into them through their own batches (from the library, and from
engines' vLLM events through the bridge's decoding), and Score / FindBestWorker /
ListWorkers over gRPC credit the workers mounting a pool; a write into an undeclared pool
is refused and counted. The service on the memory index, and on a sub-slot Redis model
(`--redis-subslots 4`) where the pool's ops are decided in its home sub-slot."""

from __future__ import annotations

from collections.abc import Awaitable

import msgspec
import pytest
import redis.asyncio as aioredis
import zmq.asyncio

from indexer.app import IndexerService
from indexer.client import AsyncIndexerClient, Query, WorkerLoad
from indexer.index.protocol import Index
from kvcore.bus import BlockRemoved, BlockStored
from kvcore.pools import KIND_POOL
from kvcore.roles import STORE
from publisher.cli import parse_bridge_args
from publisher.zmq_source import EngineSource
from tests.support.event_path import BS, MODEL, TOKENS, publisher, service_config, store
from tests.support.polling import eventually, is_true
from tests.support.servers import RedisServer

pytestmark = pytest.mark.integration


@pytest.fixture(params=["memory", "redis-subslots"])
async def index_options(request: pytest.FixtureRequest) -> dict[str, object]:
    """The service's index: in memory, or 4 sub-slots on a flushed private redis-server."""
    if request.param == "memory":
        return {}
    server: RedisServer = request.getfixturevalue("redis_server")
    client = aioredis.Redis.from_url(server.url)
    await client.flushall()
    await client.aclose()
    return {"redis_url": server.url, "redis_subslots": 4}


async def _scores(client: AsyncIndexerClient) -> dict[str, tuple[int, dict[str, int]]]:
    answer = await client.score(Query(model=MODEL, token_ids=TOKENS, block_size=BS))
    return {s.worker_id: (s.matched_blocks, dict(s.blocks_by_tier)) for s in answer.scores}


async def test_pool_credit_eviction_and_refusal_end_to_end(
        nats_url: str, index_options: dict[str, object]) -> None:
    service = IndexerService(service_config(nats_url, grpc_listen="127.0.0.1:0",
                                            **index_options))
    await service.start()
    a = publisher(nats_url, "A", storage_pools=["P"])
    b = publisher(nats_url, "B", storage_pools=["P"])
    c = publisher(nats_url, "C")
    x = publisher(nats_url, "X", storage_pools=["Q"])
    d = publisher(nats_url, "D", storage_pools=["P"])  # registered, publishes nothing
    pubs = [a, b, c, x, d]
    try:
        for pub in pubs:
            await pub.start()
        liveness = service.liveness
        assert liveness is not None
        await eventually(lambda: is_true(all((MODEL, w) in liveness.live for w in "ABCXD")),
                         20.0)
        store(a, 1, 8)
        a.stored(list(range(1, 9)), b"", pool="P")  # offloaded to the shared pool
        a.removed(list(range(3, 9)))  # and evicted from its GPU
        for pub in (b, c, x):
            store(pub, 1, 2)
        # X forges an eviction from P, which it did not declare: refused, counted.
        x._pending[0].append(BlockRemoved(block_hashes=list(range(5, 9)), medium="storage",
                                          pool="P"))
        x._pending[0].append(BlockStored(block_hashes=[1], medium="storage", pool="P"))
        for pub in pubs:
            pub.end_step()
            assert await pub.flush(10.0)
        async with AsyncIndexerClient(f"127.0.0.1:{service.grpc_port}") as client:
            want = {"A": (8, {"gpu": 2, "storage": 6}), "B": (8, {"gpu": 2, "storage": 6}),
                    "C": (2, {"gpu": 2}), "X": (2, {"gpu": 2}), "D": (8, {"storage": 8})}

            async def credited() -> bool:
                return await _scores(client) == want

            await eventually(credited, 20.0)
            assert service.stats.dropped.get("pool_not_declared", 0) >= 1
            # B evicts blocks 7..8 from P (A wrote them): both mounting workers lose them.
            b.removed([7, 8], pool="P")
            b.end_step()
            assert await b.flush(10.0)
            want["A"] = want["B"] = (6, {"gpu": 2, "storage": 4})
            want["D"] = (6, {"storage": 6})
            await eventually(credited, 20.0)
            pools = await client.list_workers(MODEL, kind=KIND_POOL)
            assert [(p.worker_id, p.kind, p.blocks_by_tier) for p in pools] == [
                ("P", KIND_POOL, {"storage": 6})]
            listed = await client.list_workers(MODEL, kind="worker")
            assert {w.worker_id: w.storage_pools for w in listed} == {
                "A": ("P",), "B": ("P",), "C": (), "X": ("Q",), "D": ("P",)}
            # FindBestWorker: the pool's blocks cost what loading them is said to cost.
            query = Query(model=MODEL, token_ids=TOKENS, workers=("B", "C"))
            free = await client.find_best_worker(query, storage_load_weight=0.0,
                                                 overlap_weight=1.0)
            assert (free.worker_id, free.matched_blocks) == ("B", 6)
            costs = {c.worker_id: (c.cost, c.storage_blocks) for c in free.candidates}
            assert costs == {"B": (2.0, 4), "C": (6.0, 0)}
            dear = await client.find_best_worker(query, storage_load_weight=1.0,
                                                 overlap_weight=1.0)
            assert {c.worker_id: c.cost for c in dear.candidates} == {"B": 6.0, "C": 6.0}
    finally:
        for pub in pubs:
            await pub.close()
        await service.close()


async def test_pool_writers_allow_list(nats_url: str) -> None:
    """`--pool-writers store-*`: a GPU worker that declares pool P may mount it but not
    write into it (counted as pool_not_declared); the store's own publisher, whose id
    matches, writes, and every mounting worker is credited with what it wrote. The store
    declares role `store`: it is listed, but never scored or chosen (it serves no
    requests), even with no load reported for it while the workers are busy."""
    service = IndexerService(service_config(nats_url, grpc_listen="127.0.0.1:0",
                                            pool_writers="store-*"))
    await service.start()
    a = publisher(nats_url, "A", storage_pools=["P"])
    b = publisher(nats_url, "B", storage_pools=["P"])  # mounts P, publishes nothing
    keeper = publisher(nats_url, "store-1", storage_pools=["P"], role=STORE)
    pubs = [a, b, keeper]
    try:
        for pub in pubs:
            await pub.start()
        liveness = service.liveness
        assert liveness is not None
        await eventually(lambda: is_true(all(
            (MODEL, w) in liveness.live for w in ("A", "B", "store-1"))), 20.0)
        store(a, 1, 2)
        a.stored(list(range(1, 9)), b"", pool="P")  # not a trusted writer: refused
        a.end_step()
        assert await a.flush(10.0)
        await eventually(lambda: is_true(
            service.stats.dropped.get("pool_not_declared", 0) >= 1), 20.0)
        async with AsyncIndexerClient(f"127.0.0.1:{service.grpc_port}") as client:
            async def scores_are(want: dict[str, tuple[int, dict[str, int]]]) -> bool:
                return await _scores(client) == want

            await eventually(lambda: scores_are({"A": (2, {"gpu": 2})}), 20.0)
            keeper.stored(list(range(101, 109)), TOKENS[: 8 * BS], pool="P")
            keeper.end_step()
            assert await keeper.flush(10.0)
            await eventually(lambda: scores_are({"A": (8, {"gpu": 2, "storage": 6}),
                                                 "B": (8, {"storage": 8})}), 20.0)
            busy = [WorkerLoad(w, active_blocks=10_000, waiting_requests=50)
                    for w in ("A", "B")]
            choice = await client.find_best_worker(
                Query(model=MODEL, token_ids=TOKENS, block_size=BS), busy)
            assert choice.worker_id in ("A", "B")
            assert {c.worker_id for c in choice.candidates} == {"A", "B"}
            listed = {w.worker_id: w.role for w in await client.list_workers(MODEL)}
            assert listed["store-1"] == STORE
            assert listed["A"] == "both"
    finally:
        for pub in pubs:
            await pub.close()
        await service.close()


def _engine_frames(seq: int, *events: dict[str, object]) -> list[bytes]:
    """One live vLLM 0.34 message (map-form events) as the bridge's SUB socket gets it."""
    return [b"kv-events", seq.to_bytes(8, "big"),
            msgspec.msgpack.encode([float(1000 + seq), list(events), 0])]


def _gpu_stored(first: int, last: int) -> dict[str, object]:
    return {"type": "BlockStored", "block_hashes": list(range(first, last + 1)),
            "parent_block_hash": first - 1 if first > 1 else None,
            "token_ids": TOKENS[(first - 1) * BS : last * BS], "block_size": BS,
            "medium": "GPU"}


def _remote(kind: str, hashes: list[int]) -> dict[str, object]:
    """An offload into (or eviction from) shared storage: vLLM's locality REMOTE."""
    event: dict[str, object] = {"type": kind, "block_hashes": hashes, "medium": "STORAGE",
                                "locality": "REMOTE"}
    if kind == "BlockStored":
        event.update(parent_block_hash=None, token_ids=[], block_size=0)
    return event


def test_bridge_flag_declares_pools(monkeypatch: pytest.MonkeyPatch) -> None:
    base = ["--zmq-endpoint", "tcp://127.0.0.1:5557", "--model", MODEL, "--worker-id", "w"]
    args = parse_bridge_args([*base, "--storage-pool", "P", "--storage-pool", "Q",
                              "--storage-pool", "P"])
    assert args.storage_pools == ["P", "Q"]
    monkeypatch.setenv("KV_PUBLISHER_STORAGE_POOLS", "fs-a, fs-b")
    assert parse_bridge_args(base).storage_pools == ["fs-a", "fs-b"]
    assert parse_bridge_args([*base, "--storage-pool", "X"]).storage_pools == ["X"]
    monkeypatch.delenv("KV_PUBLISHER_STORAGE_POOLS")
    assert parse_bridge_args(base).storage_pools == []
    with pytest.raises(SystemExit):
        parse_bridge_args([*base, "--storage-pool", ""])


async def test_engine_offloads_through_the_bridge_credit_mounting_workers(
    nats_url: str,
) -> None:
    """Engines' own events (vLLM wire) through the bridge's decoding, TierOwners and
    publisher: A's REMOTE offload lands in pool P, which B mounts; C declared no pool, so
    its REMOTE events stay out (remote_block) and it gets no credit."""
    service = IndexerService(service_config(nats_url, grpc_listen="127.0.0.1:0"))
    await service.start()
    pools = {"A": ["P"], "B": ["P"], "C": []}
    pubs = {w: publisher(nats_url, w, storage_pools=p) for w, p in pools.items()}
    ctx = zmq.asyncio.Context()
    try:
        for pub in pubs.values():
            await pub.start()
        sources = {w: EngineSource(ctx, pub.ranks[0], "tcp://127.0.0.1:1", pools=pools[w])
                   for w, pub in pubs.items()}
        liveness = service.liveness
        assert liveness is not None
        await eventually(lambda: is_true(all((MODEL, w) in liveness.live for w in pools)),
                         20.0)
        await sources["A"].on_frames(_engine_frames(
            0, _gpu_stored(1, 8), _remote("BlockStored", list(range(1, 9))),
            {"type": "BlockRemoved", "block_hashes": list(range(3, 9)), "medium": "GPU"}))
        await sources["B"].on_frames(_engine_frames(0, _gpu_stored(1, 2)))
        await sources["C"].on_frames(_engine_frames(
            0, _gpu_stored(1, 2), _remote("BlockStored", [1, 2])))
        assert sources["C"].stats.skipped_events == {"remote_block": 1}
        assert sources["A"].stats.skipped_events == {}
        async with AsyncIndexerClient(f"127.0.0.1:{service.grpc_port}") as client:
            want = {"A": (8, {"gpu": 2, "storage": 6}), "B": (8, {"gpu": 2, "storage": 6}),
                    "C": (2, {"gpu": 2})}

            async def credited() -> bool:
                return await _scores(client) == want

            await eventually(credited, 20.0)
            # B's engine evicts blocks 7..8 from the shared store (A offloaded them).
            await sources["B"].on_frames(_engine_frames(1, _remote("BlockRemoved", [7, 8])))
            want["A"] = want["B"] = (6, {"gpu": 2, "storage": 4})
            await eventually(credited, 20.0)
        # A resync re-sends A's own cache only: the pool keeps what it holds.
        assert all(e.pool is None for e in pubs["A"].ranks[0].mirror.snapshot())
    finally:
        for pub in pubs.values():
            await pub.close()
        ctx.term()
        await service.close()


async def test_a_pool_goes_when_no_live_worker_declares_it(
        nats_url: str, index_options: dict[str, object]) -> None:
    """The writer leaving does not take the pool while a reader still mounts it; the last
    worker declaring it leaving does, after the grace period."""
    service = IndexerService(service_config(nats_url, liveness_grace_s=1.0, **index_options))
    await service.start()
    a = publisher(nats_url, "A", storage_pools=["P"])
    b = publisher(nats_url, "B", storage_pools=["P"])
    try:
        for pub in (a, b):
            await pub.start()
        store(a, 1, 8)
        a.stored(list(range(1, 9)), b"", pool="P")
        store(b, 1, 1)
        for pub in (a, b):
            pub.end_step()
            assert await pub.flush(10.0)
        assert service.index is not None
        index = service.index

        async def pool_blocks() -> int:
            listed = await index.workers(MODEL)
            return sum(w.blocks_by_tier.get("storage", 0) for w in listed
                       if w.kind == KIND_POOL)

        await eventually(lambda: _equals(pool_blocks(), 8), 20.0)
        await a.close()  # deletes A's registry entry
        await eventually(lambda: _gone(index, "A"), 20.0)
        assert await pool_blocks() == 8  # B still mounts P
        await b.close()
        await eventually(lambda: _equals(pool_blocks(), 0), 20.0)
        assert not [w for w in await index.workers(MODEL) if w.kind == KIND_POOL]
    finally:
        for pub in (a, b):
            await pub.close()
        await service.close()


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def _gone(index: Index, worker: str) -> bool:
    return all(w.worker_id != worker for w in await index.workers(MODEL))
