"""A fleet of 4,096 ranks (64 workers x 64 DP ranks) end to end: real publishers, a real
nats-server with JetStream, the indexer on each backend (a real redis-server for Redis),
gRPC on top. Every rank holds a 32-block system prompt every rank shares and a 16-block
prompt of its own (196,608 (block, rank) entries), then 512 ranks evict their own. The
index must equal the reference block by block, ListWorkers must list every rank, and
Score / FindBestWorker must find, among 4,096 ranks matching the shared prefix, the one
rank holding a prompt's own blocks."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from indexer.client import AsyncIndexerClient, Query
from indexer.embedded import EmbeddedNats
from kvcore.bus import EventBatch
from kvcore.topology import StreamSettings
from publisher.publisher import KVEventPublisher
from tests.support.capture import CapturingSink, caught_up, mismatches
from tests.support.event_path import running_service, service_config
from tests.support.polling import eventually
from tests.support.servers import RedisServer, free_port

pytestmark = pytest.mark.integration

MODEL = "fleet/scale"
WORKERS = 64
DP = 64
BS = 16
SHARED_BLOCKS = 32
OWN_BLOCKS = 16
PARTITIONS = 4
EVICTING = range(0, DP, 8)  # the DP ranks of every worker that evict their own prompt
# 64 publishers and the indexer share this process's event loop: a registry entry's
# refresh can wait seconds behind ingest, which must not read as the worker gone.
LIVENESS_TTL_S = 30.0


def shared_tokens() -> list[int]:
    return list(range(SHARED_BLOCKS * BS))


def own_tokens(worker: int, rank: int) -> list[int]:
    start = (1 + worker * DP + rank) * 10_000
    return list(range(start, start + OWN_BLOCKS * BS))


def hashes(worker: int, rank: int, first: int, count: int) -> list[int]:
    return [(worker << 40) | (rank << 24) | i for i in range(first, first + count)]


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_a_fleet_of_4096_ranks_is_indexed_exactly(backend: str, tmp_path: Path) -> None:
    nats_server = EmbeddedNats(tmp_path / "nats", port=free_port()).start()
    redis_server = RedisServer(tmp_path / "redis").start() if backend == "redis" else None
    stream = StreamSettings(partitions=PARTITIONS, liveness_ttl_s=LIVENESS_TTL_S)
    pubs = [KVEventPublisher(MODEL, f"w{w}", block_size=BS, nats_url=nats_server.url,
                             dp_size=DP, stream=stream, max_pending=100_000)
            for w in range(WORKERS)]
    published: list[EventBatch] = []
    try:
        async with running_service(service_config(
                nats_server.url, redis_url=redis_server and redis_server.url,
                grpc_listen="127.0.0.1:0", partitions=PARTITIONS,
                liveness_ttl_s=LIVENESS_TTL_S, liveness_grace_s=3600.0)) as service:
            assert service.index is not None
            for pub in pubs:
                await pub.start()
                CapturingSink(pub, published)
            started = time.monotonic()
            for w, pub in enumerate(pubs):
                for r in range(DP):
                    pub.stored(hashes(w, r, 0, SHARED_BLOCKS), shared_tokens(), dp_rank=r)
                    pub.stored(hashes(w, r, SHARED_BLOCKS, OWN_BLOCKS), own_tokens(w, r),
                               parent_hash=hashes(w, r, SHARED_BLOCKS - 1, 1)[0],
                               dp_rank=r)
                pub.end_step()
            for w, pub in enumerate(pubs):
                for r in EVICTING:
                    pub.removed(hashes(w, r, SHARED_BLOCKS, OWN_BLOCKS), dp_rank=r)
                pub.end_step()
            for pub in pubs:
                assert await pub.flush(120)
            await eventually(lambda: caught_up(service.index, published, MODEL), 180)
            ingest_s = time.monotonic() - started
            counts = await mismatches(service.index, published, MODEL)
            assert counts == (0, 0, 0)

            async with AsyncIndexerClient(f"127.0.0.1:{service.grpc_port}",
                                          timeout=30.0) as client:
                statuses = await client.list_workers(MODEL, kind="worker")
                assert len(statuses) == WORKERS * DP
                entries = sum(sum(s.blocks_by_tier.values()) for s in statuses)
                evicted = WORKERS * len(EVICTING) * OWN_BLOCKS
                assert entries == WORKERS * DP * (SHARED_BLOCKS + OWN_BLOCKS) - evicted

                for w, r in [(0, 1), (17, 33), (63, 63), (40, 8)]:  # (40, 8) evicted its own
                    prompt = shared_tokens() + own_tokens(w, r)
                    answer = await client.score(Query(model=MODEL, token_ids=prompt))
                    assert len(answer.scores) == WORKERS * DP
                    best = answer.scores[0]
                    if r in EVICTING:
                        assert {s.matched_blocks for s in answer.scores} == {SHARED_BLOCKS}
                        continue
                    assert (best.worker_id, best.dp_rank, best.matched_blocks) == (
                        f"w{w}", r, SHARED_BLOCKS + OWN_BLOCKS)
                    assert {s.matched_blocks for s in answer.scores[1:]} == {SHARED_BLOCKS}
                    top = await client.score(Query(model=MODEL, token_ids=prompt),
                                             max_scores=4)
                    assert top.scores[0] == best and len(top.scores) == 4
                    assert top.score_count == WORKERS * DP
                    choice = await client.find_best_worker(Query(model=MODEL,
                                                                 token_ids=prompt))
                    assert (choice.worker_id, choice.dp_rank) == (f"w{w}", r)
            print(f"\n4,096 ranks ({backend}): {entries} (block, rank) entries, "
                  f"{len(published)} batches, indexed exactly {ingest_s:.1f} s after the "
                  f"first store")
    finally:
        await asyncio.gather(*(pub.close() for pub in pubs))
        if redis_server is not None:
            redis_server.stop()
        nats_server.stop()
