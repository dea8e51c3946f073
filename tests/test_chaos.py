"""Chaos: a deterministic simulated fleet publishes while the indexer is SIGKILLed again
and again, nats-server restarts, redis-server restarts empty, and duplicate and poison
messages are injected. At the end the index equals, block key by block key, what a
reference model computes from the events that were published."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import nats
import pytest
import zmq.asyncio

from indexer.embedded import EmbeddedNats
from indexer.index.redis import RedisIndex
from kvcore.bus import EventBatch, encode_batch, subject_for
from kvcore.topology import StreamSettings
from kvsim.mock_engines import MockFleet, synthetic_prompts
from publisher.publisher import KVEventPublisher
from publisher.zmq_source import EngineSource
from tests.support.capture import CapturingSink
from tests.support.processes import IndexerProcess
from tests.support.reference import ReferenceIndex
from tests.support.servers import RedisServer

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

MODEL = "chaos/model"
WORKERS = 4
REQUESTS = 240
PARTITIONS = 2
SEED = 20261122


async def converged(index: RedisIndex, published: list[EventBatch]) -> bool:
    last: dict[tuple[str, int], tuple[int, int]] = {}
    for batch in published:
        last[(batch.worker_id, batch.dp_rank)] = (batch.epoch, batch.seq)
    try:
        seen = {(w.worker_id, w.dp_rank): (w.epoch, w.last_seq)
                for w in await index.workers(MODEL)}
    except Exception:  # noqa: BLE001 - Redis may be restarting
        return False
    return seen == last


class TestChaos:
    """The index survives crashes, restarts and bad input exactly."""

    async def test_index_equals_reference(self, tmp_path: Path) -> None:
        """SIGKILLs, a NATS restart, an empty Redis, duplicates, poison: 0 mismatches."""
        rng = random.Random(SEED)
        nats_server = EmbeddedNats(tmp_path / "nats").start()
        redis_server = RedisServer(tmp_path / "redis").start()
        indexer = IndexerProcess(nats_server.url, redis_server.url, tmp_path,
                                 partitions=PARTITIONS, snapshot_every_batches=40)
        indexer.start()
        fleet = MockFleet(n_workers=WORKERS, capacity_blocks=48, block_size=16,
                          base_port=0).start()
        published: list[EventBatch] = []
        pubs = [KVEventPublisher(MODEL, f"worker-{w}", block_size=16, nats_url=nats_server.url,
                                 stream=StreamSettings(partitions=PARTITIONS),
                                 max_pending=100_000) for w in range(WORKERS)]
        ctx = zmq.asyncio.Context()
        stop = asyncio.Event()
        counts = {"kills": 0, "nats_restarts": 0, "redis_restarts": 0, "duplicates": 0,
                  "poison": 0}
        try:
            for pub in pubs:
                await pub.start()
                CapturingSink(pub, published)
            sources = [EngineSource(ctx, pub.ranks[0], engine.endpoint,
                                    replay_endpoint=engine.replay_endpoint)
                       for pub, engine in zip(pubs, fleet.all_engines(), strict=True)]
            tasks = [asyncio.create_task(s.run(stop)) for s in sources]
            await asyncio.sleep(0.5)
            # every kill before the Redis restart: the empty Redis is found by a running
            # indexer (in place), not by one starting up
            kill_at = set(rng.sample(range(20, 2 * REQUESTS // 3 - 10), 6))
            prompts = synthetic_prompts(seed=SEED, n_prefixes=6, prefix_tokens=128,
                                        max_suffix=256)
            nc = await nats.connect(nats_server.url, max_reconnect_attempts=-1,
                                    reconnect_time_wait=0.2)
            js = nc.jetstream()
            for i in range(REQUESTS):
                fleet.serve(i % WORKERS, next(prompts))
                await asyncio.sleep(0.01)
                if i in kill_at:
                    indexer.kill()
                    counts["kills"] += 1
                    await asyncio.sleep(rng.uniform(0.05, 0.3))
                    indexer.start()
                if i == REQUESTS // 3:
                    nats_server.kill()
                    counts["nats_restarts"] += 1
                    await asyncio.sleep(0.3)
                    nats_server.start()
                if i == 2 * REQUESTS // 3:
                    redis_server.kill()
                    counts["redis_restarts"] += 1
                    redis_server.start()  # empty: no persistence
                if i % 20 == 10 and published:
                    await self._inject(js, rng, published, counts)
            for pub in pubs:
                assert pub.sink is not None
                assert await pub.sink.flush(60)
            await nc.close()

            index = RedisIndex.from_url(redis_server.url)
            deadline = time.monotonic() + 90
            while not await converged(index, published) and time.monotonic() < deadline:
                await asyncio.sleep(0.25)
            reference = ReferenceIndex(65_536)
            for batch in published:
                reference.apply(batch)
            got = await index.presence(MODEL)
            want = reference.presence(MODEL)
            mismatches = len(set(got) ^ set(want)) + sum(
                1 for key in set(got) & set(want) if got[key] != want[key])
            await index.close()
            rebuilds = indexer.count("partition_rebuild")
            print(f"\nchaos: events={sum(len(b.events) for b in published)} "
                  f"batches={len(published)} blocks={len(want)} kills={counts['kills']} "
                  f"nats_restarts={counts['nats_restarts']} "
                  f"redis_restarts={counts['redis_restarts']} rebuilds={rebuilds} "
                  f"duplicates={counts['duplicates']} poison={counts['poison']} "
                  f"mismatches={mismatches}")
            assert counts["kills"] >= 5
            assert len(want) > 50  # the fleet really holds blocks
            assert mismatches == 0
            assert rebuilds >= 1  # the empty Redis was rebuilt, not trusted
            stop.set()
            await asyncio.gather(*tasks)
        finally:
            stop.set()
            for pub in pubs:
                await pub.close()
            ctx.term()
            fleet.close()
            indexer.stop()
            redis_server.stop()
            nats_server.stop()

    @staticmethod
    async def _inject(js: object, rng: random.Random, published: list[EventBatch],
                      counts: dict[str, int]) -> None:
        """Re-publish an old batch (a duplicate delivery) and a poison message."""
        batch = rng.choice(published)
        subject = subject_for(batch.model, batch.worker_id)
        try:
            await js.publish(subject, encode_batch(batch),  # type: ignore[attr-defined]
                             headers={"Nats-Msg-Id": f"dup-{counts['duplicates']}"})
            counts["duplicates"] += 1
            await js.publish(subject, b"\xc1 not msgpack",  # type: ignore[attr-defined]
                             headers={"Nats-Msg-Id": f"poison-{counts['poison']}"})
            counts["poison"] += 1
        except Exception:  # noqa: BLE001 - NATS may be restarting: inject next time
            pass
