"""Shared storage pools end to end on a real nats-server: publishers declare pools in their
registry entries, write into them through their own batches, and Score over gRPC credits
the workers mounting a pool; a write into an undeclared pool is refused and counted."""

from __future__ import annotations

import pytest

from indexer.app import IndexerService
from indexer.client import AsyncIndexerClient, Query
from kvcore.bus import BlockRemoved, BlockStored
from kvcore.pools import KIND_POOL
from tests.support.event_path import MODEL, TOKENS, publisher, service_config, store
from tests.support.polling import eventually, is_true

pytestmark = pytest.mark.integration


async def _scores(client: AsyncIndexerClient) -> dict[str, tuple[int, dict[str, int]]]:
    answer = await client.score(Query(model=MODEL, token_ids=TOKENS))
    return {s.worker_id: (s.matched_blocks, dict(s.blocks_by_tier)) for s in answer.scores}


async def test_pool_credit_eviction_and_refusal_end_to_end(nats_url: str) -> None:
    service = IndexerService(service_config(nats_url, grpc_listen="127.0.0.1:0"))
    await service.start()
    a = publisher(nats_url, "A", storage_pools=["P"])
    b = publisher(nats_url, "B", storage_pools=["P"])
    c = publisher(nats_url, "C")
    x = publisher(nats_url, "X", storage_pools=["Q"])
    pubs = [a, b, c, x]
    try:
        for pub in pubs:
            await pub.start()
        liveness = service.liveness
        assert liveness is not None
        await eventually(lambda: is_true(all((MODEL, w) in liveness.live for w in "ABCX")),
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
                    "C": (2, {"gpu": 2}), "X": (2, {"gpu": 2})}

            async def credited() -> bool:
                return await _scores(client) == want

            await eventually(credited, 20.0)
            assert service.stats.dropped.get("pool_not_declared", 0) >= 1
            # B evicts blocks 7..8 from P (A wrote them): both mounting workers lose them.
            b.removed([7, 8], pool="P")
            b.end_step()
            assert await b.flush(10.0)
            want["A"] = want["B"] = (6, {"gpu": 2, "storage": 4})
            await eventually(credited, 20.0)
            pools = await client.list_workers(MODEL, kind=KIND_POOL)
            assert [(p.worker_id, p.kind, p.blocks_by_tier) for p in pools] == [
                ("P", KIND_POOL, {"storage": 6})]
            listed = await client.list_workers(MODEL, kind="worker")
            assert {w.worker_id: w.storage_pools for w in listed} == {
                "A": ("P",), "B": ("P",), "C": (), "X": ("Q",)}
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
