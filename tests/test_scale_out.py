"""Two indexer processes share one Redis: partitions split between them, one survives the
other's SIGKILL by taking over its partitions, and no event is lost."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats
import pytest

from indexer.index.protocol import ScoreQuery
from indexer.index.redis import RedisIndex
from indexer.ingest.partitions import LEASE_BUCKET
from kvcore.topology import StreamSettings
from publisher.publisher import KVEventPublisher
from tests.support.event_path import BS, MODEL, TOKENS
from tests.support.polling import eventually
from tests.support.servers import RedisServer

pytestmark = pytest.mark.integration

PARTITIONS = 4
WORKERS = [f"worker-{i}" for i in range(12)]


def start_indexer(nats_url: str, redis_url: str, log: Path) -> subprocess.Popen[bytes]:
    code = "import sys; from indexer.app import main; sys.exit(main(sys.argv[1:]))"
    args = ["--nats-url", nats_url, "--redis-url", redis_url, "--grpc-listen", "",
            "--metrics-listen", "",
            "--partitions", str(PARTITIONS), "--liveness-grace", "600", "--log-format", "json"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, env=env)


async def lease_owners(nats_url: str) -> dict[str, str]:
    """Partition -> the member holding its lease."""
    leases = await lease_bucket(nats_url)
    return {key: owner for key, owner in leases.items() if key.startswith("p.")}


async def lease_bucket(nats_url: str) -> dict[str, str]:
    """Every live key of the lease bucket (`m.<member>` and `p.<partition>`)."""
    nc = await nats.connect(nats_url)
    try:
        kv = await nc.jetstream().key_value(LEASE_BUCKET)
        found = {}
        for key in await kv.keys():
            entry = await kv.get(key)
            found[key] = (entry.value or b"").decode()
        return found
    except Exception:  # noqa: BLE001 - bucket or keys not there yet
        return {}
    finally:
        await nc.close()


def explainer(nats_url: str, procs: list[subprocess.Popen[bytes]], logs: list[Path],
              ) -> Callable[[], Awaitable[str]]:
    """What a failed wait reports: the lease bucket, and each indexer's state and log."""
    async def explain() -> str:
        lines = [f"lease bucket: {await lease_bucket(nats_url)}"]
        for proc, log in zip(procs, logs, strict=True):
            tail = log.read_text(errors="replace").splitlines()[-40:]
            lines += [f"--- {log.name}: pid {proc.pid}, exit code {proc.poll()}", *tail]
        return "\n".join(lines)
    return explain


async def publish_round(pubs: list[KVEventPublisher], first: int, last: int) -> None:
    """Every worker stores blocks first..last of the same prompt."""
    for pub in pubs:
        pub.stored(list(range(first, last + 1)), TOKENS[(first - 1) * BS : last * BS],
                   parent_hash=first - 1 if first > 1 else None)
        assert await pub.flush()


async def all_matched(index: RedisIndex, blocks: int) -> bool:
    result = await index.score(ScoreQuery(model=MODEL, token_ids=TOKENS, block_size=BS))
    got = {s.worker_id: s.matched_blocks for s in result.scores}
    return got == dict.fromkeys(WORKERS, blocks)


class TestTwoProcesses:
    """Partition leases keep one consumer per partition across processes."""

    async def test_split_and_failover(self, nats_url: str,
                                      private_redis: RedisServer, tmp_path: Path) -> None:
        """2 processes hold 2 partitions each; after one is SIGKILLed the other holds 4."""
        logs = [tmp_path / f"idx{i}.log" for i in range(2)]
        procs = [start_indexer(nats_url, private_redis.url, log) for log in logs]
        explain = explainer(nats_url, procs, logs)
        index = RedisIndex.from_url(private_redis.url)
        pubs = [KVEventPublisher(MODEL, worker, block_size=BS, nats_url=nats_url,
                                 stream=StreamSettings(partitions=PARTITIONS))
                for worker in WORKERS]
        try:
            for pub in pubs:
                await pub.start()
            async def split() -> bool:
                owners = await lease_owners(nats_url)
                counts = sorted(list(owners.values()).count(o) for o in set(owners.values()))
                return len(owners) == PARTITIONS and counts == [2, 2]

            await eventually(split, timeout=30, explain=explain)
            await publish_round(pubs, 1, 4)
            await eventually(lambda: all_matched(index, 4), timeout=20, explain=explain)

            procs[0].send_signal(signal.SIGKILL)
            procs[0].wait(10)
            started = time.monotonic()

            async def taken_over() -> bool:
                owners = await lease_owners(nats_url)
                return len(owners) == PARTITIONS and len(set(owners.values())) == 1

            await publish_round(pubs, 5, 8)
            await eventually(taken_over, timeout=30, explain=explain)
            await eventually(lambda: all_matched(index, 8), timeout=30, explain=explain)
            print(f"failover took {time.monotonic() - started:.1f}s")
        finally:
            for pub in pubs:
                await pub.close()
            await index.close()
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
        assert procs[1].returncode == 0, (tmp_path / "idx1.log").read_text()[-3000:]
        await asyncio.sleep(0)
