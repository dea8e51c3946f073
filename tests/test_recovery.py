"""Recovery: snapshots, rebuilds from snapshot + stream tail, corrupt snapshots, and an
index that loses its data while running."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest
import redis.asyncio as aioredis

from indexer.app import IndexerService
from indexer.index.protocol import RankState
from indexer.index.redis_sharded import ShardedRedisIndex
from indexer.ingest.recovery import (
    SNAPSHOT_BUCKET,
    Snapshot,
    SnapshotCorruptError,
    decode_snapshot,
    encode_snapshot,
    partition_of,
)
from kvcore.bus import STREAM_NAME, subject_for
from kvcore.topology import partition_filter
from tests.support.event_path import PARTITIONS, matched, publisher, service_config, store
from tests.support.polling import equals, eventually, is_true
from tests.support.servers import RedisServer

pytestmark = pytest.mark.integration


class TestSnapshotCodec:
    """Snapshots carry a checksum: any damage is detected, never loaded."""

    def snapshot(self) -> bytes:
        rank = RankState("m", "w", 0, 7, 41, 1.5, False, b"")
        return encode_snapshot(Snapshot(1, 0, 2, 1234, 99.0, [rank]))

    def test_round_trip(self) -> None:
        """Encode then decode gives the snapshot back."""
        snap = decode_snapshot(self.snapshot())
        assert (snap.stream_seq, snap.ranks[0].last_seq) == (1234, 41)

    @pytest.mark.parametrize("damage", ["flip", "truncate", "magic", "empty", "version"])
    def test_damage_is_detected(self, damage: str) -> None:
        """A flipped byte, a cut, a wrong header or an unknown version raise."""
        data = bytearray(self.snapshot())
        if damage == "flip":
            data[-3] ^= 0x40
        elif damage == "truncate":
            del data[-5:]
        elif damage == "magic":
            data[0:4] = b"XXXX"
        elif damage == "empty":
            data = bytearray()
        else:
            data = bytearray(encode_snapshot(Snapshot(99, 0, 2, 1, 0.0, [])))
        with pytest.raises(SnapshotCorruptError):
            decode_snapshot(bytes(data))


class TestPartitionFunction:
    """Our partition_of agrees with nats-server's subject transform."""

    async def test_matches_server(self, nats_url: str) -> None:
        """Messages of many workers land in the partition partition_of predicts."""
        svc = IndexerService(service_config(nats_url))
        await svc.start()
        await svc.close()  # leaves the stream with its transform
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        workers = [f"w-{i}:80{i}" for i in range(24)]
        for w in workers:
            await js.publish(subject_for("org/m.1", w), b"x")
        for p in range(PARTITIONS):
            info = await js.stream_info(STREAM_NAME, subjects_filter=partition_filter(p))
            subjects = info.state.subjects or {}
            expected = {w for w in workers if partition_of("org/m.1", w, PARTITIONS) == p}
            assert len(subjects) == len(expected)
        await nc.close()


class TestRebuild:
    """A restarted index is rebuilt from the newest valid snapshot and the stream tail."""

    async def test_snapshot_then_tail(self, nats_url: str) -> None:
        """Snapshots are taken, the stream purged below them, and a new process rebuilds."""
        config = service_config(nats_url, snapshot_every_batches=2)
        async with publisher(nats_url) as pub:
            first = IndexerService(config)
            await first.start()
            for block in range(1, 7):
                store(pub, block, block)
                await pub.flush()
                if block in (3, 6):  # two rounds, a snapshot after each
                    await eventually(lambda b=block: equals(matched(first), b))
                    await eventually(lambda b=block: is_true(first.stats.snapshots >= b // 3))
            await first.close()
            nc = await nats.connect(nats_url)
            info = await nc.jetstream().stream_info(STREAM_NAME)
            assert info.state.first_seq > 1  # purged below the oldest snapshot kept
            await nc.close()
            store(pub, 7, 8)  # the tail after the last snapshot
            await pub.flush()
            second = IndexerService(config)
            await second.start()
            try:
                await eventually(lambda: equals(matched(second), 8))
                assert second.stats.rebuilds == PARTITIONS
                await eventually(lambda: is_true(not second.rebuilding))
            finally:
                await second.close()

    async def test_corrupt_newest_snapshot_falls_back(self, nats_url: str) -> None:
        """A damaged newest snapshot is reported and skipped; an older one is used."""
        config = service_config(nats_url, snapshot_every_batches=1)
        async with publisher(nats_url) as pub:
            first = IndexerService(config)
            await first.start()
            for block in range(1, 5):
                store(pub, block, block)
                await pub.flush()
                await eventually(lambda b=block: equals(matched(first), b))
                await eventually(lambda b=block: is_true(first.stats.snapshots >= b))
            await first.close()
            nc = await nats.connect(nats_url)
            bucket = await nc.jetstream().object_store(SNAPSHOT_BUCKET)
            names = sorted(i.name for i in await bucket.list(ignore_deletes=True))
            newest = names[-1]
            await bucket.put(newest, b"KVIS" + b"\x00" * 8 + b"garbage")
            await nc.close()
            second = IndexerService(config)
            await second.start()
            try:
                await eventually(lambda: equals(matched(second), 4))
                assert second.snapshots is not None and second.snapshots.corrupt_found >= 1
            finally:
                await second.close()


class TestIndexLosesData:
    """Redis emptied under a running indexer: the partition is rebuilt in place."""

    @pytest.mark.parametrize("subslots", [1, 4])
    async def test_redis_flushed(self, nats_url: str, tmp_path: Path, subslots: int) -> None:
        """FLUSHALL while running: markers vanish, partitions rebuild, blocks come back
        (one hash slot per model, and 4 sub-slots: `--redis-subslots 4`)."""
        redis_server = RedisServer(tmp_path / "redis").start()
        svc = IndexerService(service_config(nats_url, redis_url=redis_server.url,
                                            snapshot_every_batches=3,
                                            redis_subslots=subslots))
        await svc.start()
        assert isinstance(svc.index, ShardedRedisIndex) == (subslots > 1)
        try:
            async with publisher(nats_url) as pub:
                for block in range(1, 7):
                    store(pub, block, block)
                    await pub.flush()
                await eventually(lambda: equals(matched(svc), 6))
                client = aioredis.Redis.from_url(redis_server.url)
                await client.flushall()
                await client.aclose()
                assert await matched(svc) == 0
                await eventually(lambda: equals(matched(svc), 6), timeout=15)
                assert svc.stats.rebuilds >= PARTITIONS + 1  # the start, then the flush
                store(pub, 7, 8)
                await pub.flush()
                await eventually(lambda: equals(matched(svc), 8))
        finally:
            await svc.close()
            redis_server.stop()
        await asyncio.sleep(0)


class TestForcedRebuild:
    """`kv-indexer rebuild` makes running indexers rebuild every partition."""

    async def test_request_rebuild(self, nats_url: str) -> None:
        """After request_rebuild every partition rebuilds once, and the index is whole."""
        from indexer.ingest.recovery import request_rebuild

        svc = IndexerService(service_config(nats_url, snapshot_every_batches=2))
        await svc.start()
        try:
            async with publisher(nats_url) as pub:
                store(pub, 1, 4)
                await pub.flush()
                await eventually(lambda: equals(matched(svc), 4))
                await eventually(lambda: is_true(not svc.rebuilding))
                before = svc.stats.rebuilds
                await request_rebuild(nats_url, PARTITIONS)
                await eventually(lambda: is_true(svc.stats.rebuilds == before + PARTITIONS))
                await eventually(lambda: is_true(not svc.rebuilding))
                assert await matched(svc) == 4
                await asyncio.sleep(1.5)  # settled: no further rebuilds
                assert svc.stats.rebuilds == before + PARTITIONS
        finally:
            await svc.close()


class TestRebuildCommand:
    """`kv-indexer rebuild` reaches a running indexer through NATS."""

    async def test_cli(self, nats_url: str) -> None:
        """The command exits 0 and the service rebuilds every partition."""
        from indexer.cli import main as cli_main

        svc = IndexerService(service_config(nats_url))
        await svc.start()
        try:
            await eventually(lambda: is_true(not svc.rebuilding))
            before = svc.stats.rebuilds
            code = await asyncio.to_thread(
                cli_main, ["rebuild", "--nats-url", nats_url,
                           "--partitions", str(PARTITIONS)])
            assert code == 0
            await eventually(lambda: is_true(svc.stats.rebuilds == before + PARTITIONS))
        finally:
            await svc.close()

    def test_cli_needs_nats(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without --nats-url (or its variable) the command fails naming the flag."""
        from indexer.cli import main as cli_main

        monkeypatch.delenv("KV_INDEXER_NATS_URL", raising=False)
        with pytest.raises(SystemExit) as exc:
            cli_main(["rebuild"])
        assert exc.value.code == 2
