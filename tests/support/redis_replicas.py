"""Private redis-server read replicas for tests: `redis-server --replicaof` the test's
primary, on free ports, each killable, detachable (REPLICAOF NO ONE) or put to sleep
(DEBUG SLEEP, allowed from localhost on these servers only)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import redis.asyncio as aioredis

from indexer.index.read_replicas import ReplicaReadIndex
from indexer.index.replica_metrics import ReadReplicaCollector
from tests.support.servers import RedisServer

__all__ = ["RedisReplica", "gauges"]


class RedisReplica(RedisServer):
    """A redis-server replicating `primary`."""

    def __init__(self, workdir: Path, primary: RedisServer) -> None:
        super().__init__(workdir)
        self.primary = primary

    def argv(self) -> list[str]:
        return [*super().argv(), "--replicaof", "127.0.0.1", str(self.primary.port),
                "--enable-debug-command", "local"]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def wait_in_sync(self, timeout: float = 20.0) -> None:
        """Until the link is up and the replica has applied the primary's offset."""
        primary = aioredis.Redis.from_url(self.primary.url)
        replica = aioredis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                wanted = (await primary.info("replication"))["master_repl_offset"]
                info = await replica.info("replication")
                if (info.get("master_link_status") == "up"
                        and int(info.get("slave_repl_offset", -1)) >= int(wanted)):
                    return
                await asyncio.sleep(0.05)
        finally:
            await primary.aclose()
            await replica.aclose()
        raise RuntimeError(f"replica {self.address} not in sync within {timeout}s")

    async def sleep(self, seconds: float) -> None:
        """DEBUG SLEEP: the server does nothing (no replication, no answers) meanwhile."""
        client = aioredis.Redis.from_url(self.url, socket_timeout=seconds + 10)
        try:
            await client.execute_command("DEBUG", "SLEEP", seconds)
        finally:
            await client.aclose()

    async def detach(self) -> None:
        """REPLICAOF NO ONE: it keeps its data, stops following the primary."""
        client = aioredis.Redis.from_url(self.url)
        try:
            await client.execute_command("REPLICAOF", "NO", "ONE")
        finally:
            await client.aclose()


def gauges(index: ReplicaReadIndex) -> dict[tuple[str, str], float]:
    """The collector's per-replica gauges: (usable | staleness, replica) -> value."""
    values = {}
    for family in ReadReplicaCollector(index).collect():
        kind = family.name.removeprefix("kv_indexer_read_replica_").removesuffix("_seconds")
        if kind in ("usable", "staleness"):
            for sample in family.samples:
                values[(kind, sample.labels["replica"])] = sample.value
    return values
