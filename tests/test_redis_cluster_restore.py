"""One master of a Redis Cluster comes back from an older dump under a serving indexer,
end to end (real NATS, publishers, a 3-master cluster): 16 workers holding 5,000 blocks
each, the master SAVEd, 2,000 blocks per worker removed and 1,000 stored, then the master
SIGKILLed and started again from the dump (same nodes.conf, its replica told not to take
over). The master picked holds none of the keys where a single-key marker of the
partitions would live, so only the marker copies on every master
(indexer/index/redis_markers.py) can show it: the partitions rebuild and the index ends
exact, no block evicted after the dump reported. Both cluster layouts: sub-slots
(`--redis-subslots 3`, one per master) and one hash slot per model (the model on the
restored master). Sub-slots also: a rank the restored directory maps again is removed by
the rebuild, and slot ids given out after the dump are never given out again (16 ranks x
5,000 blocks; the id counter's copies in every sub-slot)."""

from __future__ import annotations

import shutil
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from redis.asyncio.cluster import RedisCluster as ClusterClient
from redis.crc import key_slot

from indexer.app import IndexerService
from indexer.errors import BackendError
from indexer.index.layouts import directory_prefix, model_prefix
from indexer.index.protocol import ScoreQuery
from indexer.index.redis_sharded import ShardedRedisIndex
from indexer.ingest.consumer import marker_is_rebuilding, marker_name, position_marker_name
from kvcore.bus import SCHEMA_VERSION, BlockStored, EventBatch, pack_tokens
from kvcore.keys import block_keys_for_tokens
from kvcore.topology import StreamSettings
from tests.support.capture import caught_up, mismatches
from tests.support.chain_fleet import ChainFleet
from tests.support.event_path import running_service, service_config
from tests.support.polling import eventually, is_true
from tests.support.redis_cluster import ClusterNode, RedisCluster

pytestmark = [pytest.mark.redis_cluster, pytest.mark.chaos, pytest.mark.integration]

WORKERS = 16
PARTITIONS = 2
BS = 16
CHAIN = 50  # blocks per stored chain: one bus batch
CHAINS = 100  # 5,000 blocks per worker


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    found = RedisCluster(tmp_path / "cluster").start()
    yield found
    found.stop()


def master_without_single_markers(cluster: RedisCluster) -> ClusterNode:
    """The master serving none of the slots where `kvi:marker:<name>` (one key per
    marker, as a single node keeps them) would live: the one a single copy never saw."""
    held = {cluster.node_of_slot(key_slot(f"kvi:marker:{name}".encode())).port
            for p in range(PARTITIONS) for name in (marker_name(p), position_marker_name(p))}
    masters = [cluster.by_port(port) for port, info in cluster.topology().items()
               if info["master"] and info["slots"]]
    free = [node for node in masters if node.port not in held]
    assert free, "every master holds a single-key marker: pick other partitions"
    return free[0]


def model_on(cluster: RedisCluster, node: ClusterNode) -> str:
    """A model name whose hash slot (one slot per model) `node` serves."""
    for i in range(10_000):
        name = f"field/model-{i}"
        if cluster.node_of_slot(key_slot(model_prefix(name).encode())) is node:
            return name
    raise LookupError(f"no model name lands on {node.port}")


async def trusted(service: IndexerService) -> bool:
    """Every partition's first rebuild has finished."""
    assert service.index is not None
    return not any([marker_is_rebuilding(await service.index.get_marker(marker_name(p)))
                    for p in range(PARTITIONS)])


def restore(node: ClusterNode, dump: Path) -> None:
    """The node SIGKILLed and started again from `dump` (its nodes.conf kept)."""
    node.kill()
    shutil.copy(dump, node.workdir / "dump.rdb")
    node.start()


@pytest.mark.parametrize("layout", ["subslots", "slot-per-model"])
async def test_one_master_restored_from_an_older_dump_invents_nothing(
        layout: str, cluster: RedisCluster, nats_url: str, tmp_path: Path) -> None:
    restored = master_without_single_markers(cluster)
    model = "field/model" if layout == "subslots" else model_on(cluster, restored)
    subslots = 3 if layout == "subslots" else 1
    replica = cluster.replica_of(restored)
    replica.cli("CONFIG", "SET", "cluster-replica-no-failover", "yes")
    fleet = ChainFleet(nats_url, model, workers=WORKERS, block_size=BS, chain=CHAIN, shared=0,
                       stream=StreamSettings(partitions=PARTITIONS, liveness_ttl_s=3.0))
    config = service_config(nats_url, redis_url=cluster.url, grpc_listen="127.0.0.1:0",
                            partitions=PARTITIONS, liveness_grace_s=3600.0,
                            redis_subslots=subslots)
    try:
        async with running_service(config) as service:
            index = service.index
            assert index is not None
            await fleet.start()
            fleet.store(range(CHAINS))
            await fleet.flush()
            await eventually(lambda: caught_up(index, fleet.published, model), 120)
            await eventually(lambda: trusted(service), 30)
            restored.cli("SAVE")
            dump = tmp_path / "old-dump.rdb"
            shutil.copy(restored.workdir / "dump.rdb", dump)

            fleet.remove(range(40))
            fleet.store(range(CHAINS, CHAINS + 20))
            await fleet.flush()
            await eventually(lambda: caught_up(index, fleet.published, model), 120)
            assert await mismatches(index, fleet.published, model) == (0, 0, 0)
            rebuilds = service.stats.rebuilds
            back_at = time.monotonic()
            restore(restored, dump)

            await eventually(lambda: is_true(service.stats.rebuilds > rebuilds), 60)
            await eventually(lambda: caught_up(index, fleet.published, model), 120)
            await eventually(lambda: is_true(not service.rebuilding), 60)
            counts = await mismatches(index, fleet.published, model)
            blocks = sum(sum(w.blocks_by_tier.values()) for w in await index.workers(model))
            print(f"\n{layout}: master {restored.port} restored from an older dump: "
                  f"{service.stats.rebuilds - rebuilds} partition rebuild(s), exact "
                  f"{time.monotonic() - back_at:.1f} s after the restore, {blocks} (block, "
                  f"worker) entries, phantom, missing, differing = {counts}")
            assert blocks == WORKERS * (CHAINS - 40 + 20) * CHAIN
            assert counts == (0, 0, 0)
    finally:
        await fleet.close()


def stored(model: str, worker: str, base: int) -> EventBatch:
    tokens = list(range(base, base + CHAIN * BS))
    return EventBatch(schema=SCHEMA_VERSION, model=model, worker_id=worker, dp_rank=0,
                      epoch=1, seq=0, ts=1.0,
                      events=[BlockStored(block_hashes=list(range(1, CHAIN + 1)),
                                          parent_hash=None, token_ids=pack_tokens(tokens),
                                          block_size=BS, medium="gpu")])


def model_with_directory_off(cluster: RedisCluster, home: ClusterNode) -> str:
    """A model name whose sub-slot directory `home` does not serve."""
    for i in range(1_000):
        name = f"field/dir-{i}"
        slot = key_slot((directory_prefix(name) + "slots").encode())
        if cluster.node_of_slot(slot) is not home:
            return name
    raise LookupError("every directory lands on one master")


async def test_a_rank_the_restored_directory_maps_again_is_removed(
        cluster: RedisCluster, tmp_path: Path) -> None:
    """Sub-slots: the master holding a model's directory comes back from a dump taken
    before a rank was removed. The directory maps the rank again and that master's
    sub-slot holds its old entries, while its ledger (home sub-slot on another master)
    stays gone. The rank is listed (nothing counted), so the partition's rebuild, which
    removes the ranks `workers()` lists, removes it: none of its entries is credited."""
    # Sub-slot k sits on the (k mod 3)-th master by name; the first rank's id is 0.
    names = sorted(f"127.0.0.1:{port}" for port, info in cluster.topology().items()
                   if info["master"] and info["slots"])
    model = model_with_directory_off(cluster, cluster.by_port(int(names[0].split(":")[1])))
    index = ShardedRedisIndex.from_url(cluster.url, subslots=3, cluster=True)
    try:
        await index.apply([stored(model, "gone", 1_000), stored(model, "kept", 90_000)])
        [gone_id] = [i for i, ref in (await index._refs_by_id(model)).items()
                     if ref.worker_id == "gone"]
        info = await index._model(model)
        assert info is not None
        home = cluster.node_of_slot(key_slot(f"{info.home(gone_id)}w".encode()))
        directory = cluster.node_of_slot(
            key_slot((directory_prefix(model) + "slots").encode()))
        assert home is not directory, "pick a model whose rank's ledger is elsewhere"
        cluster.replica_of(directory).cli("CONFIG", "SET", "cluster-replica-no-failover",
                                          "yes")
        directory.cli("SAVE")
        dump = tmp_path / "old-dump.rdb"
        shutil.copy(directory.workdir / "dump.rdb", dump)
        assert await index.remove_worker(model, "gone") == 1
    finally:
        await index.close()
    restore(directory, dump)
    cluster.wait_ok(replicated=False, timeout=60)
    index = ShardedRedisIndex.from_url(cluster.url, subslots=3, cluster=True)
    try:
        credited = {ref.worker_id for entry in (await index.presence(model)).values()
                    for ref in entry}
        assert credited == {"gone", "kept"}  # the restored sub-slot's old entries
        listed = {w.worker_id: w for w in await index.workers(model)}
        assert "gone" in listed and listed["gone"].blocks_by_tier == {}
        await index.remove_worker(model, "gone")
        holders = {ref.worker_id for entry in (await index.presence(model)).values()
                   for ref in entry}
        assert holders == {"kept"}
    finally:
        await index.close()


RANK_CHAINS = 5  # chains of 1,000 blocks: 5,000 blocks per rank
RANK_CHAIN = 1_000


def rank_tokens(worker: str, chain: int) -> list[int]:
    kind, _, number = worker.rpartition("-")
    seed = (("old", "late", "new").index(kind) * 100 + int(number) + 1) * 1_000_000
    start = seed + chain * RANK_CHAIN * BS
    return list(range(start, start + RANK_CHAIN * BS))


def rank_batch(model: str, worker: str, chains: range, seq: int = 0) -> EventBatch:
    return EventBatch(schema=SCHEMA_VERSION, model=model, worker_id=worker, dp_rank=0,
                      epoch=1, seq=seq, ts=float(seq),
                      events=[BlockStored(block_hashes=[chain * 100_000 + i + 1
                                                        for i in range(RANK_CHAIN)],
                                          parent_hash=None,
                                          token_ids=pack_tokens(rank_tokens(worker, chain)),
                                          block_size=BS, medium="gpu")
                              for chain in chains])


async def named_ids(cluster: RedisCluster) -> set[int]:
    """Every slot id some holder entry names, in any sub-slot of any master (a test-only
    scan)."""
    client = ClusterClient.from_url(cluster.url)
    try:
        ids: set[int] = set()
        for key in await client.keys("kvi:*:blk*", target_nodes=ClusterClient.PRIMARIES):
            for value in (await client.hgetall(key)).values():
                ids.update(entry >> 4 for (entry,) in struct.iter_unpack("<I", cast(bytes, value)))
        return ids
    finally:
        await client.aclose()


class _StoppedError(Exception):
    """A writer stopped between waves."""


async def test_ids_given_out_after_the_dump_are_not_given_again(
        cluster: RedisCluster, tmp_path: Path) -> None:
    """Sub-slots: the master holding a model's directory comes back from a dump taken
    before 8 of its 16 ranks (5,000 blocks each) were created and one was re-slotted.
    Their entries stay in the sub-slots on the other masters, under ids the restored
    directory's counter has not reached. Ranks created afterwards get ids no entry
    names, hold exactly their own blocks, and Score never credits them with the
    forgotten ranks' blocks. (With the directory's counter alone, the new ranks took
    those ids and were credited with the forgotten ranks' blocks.)"""
    model = "field/ids"
    directory = cluster.node_of_slot(key_slot((directory_prefix(model) + "slots").encode()))
    cluster.replica_of(directory).cli("CONFIG", "SET", "cluster-replica-no-failover", "yes")
    index = ShardedRedisIndex.from_url(cluster.url, subslots=3, cluster=True)
    try:
        for w in range(8):
            await index.apply([rank_batch(model, f"old-{w}", range(RANK_CHAINS))])
        directory.cli("SAVE")
        dump = tmp_path / "old-dump.rdb"
        shutil.copy(directory.workdir / "dump.rdb", dump)
        for w in range(8):
            await index.apply([rank_batch(model, f"late-{w}", range(RANK_CHAINS))])

        async def stop(wave: int) -> None:
            if wave == 2:
                raise _StoppedError

        index.wave_hook = stop
        torn = rank_batch(model, "old-0", range(RANK_CHAINS, RANK_CHAINS + 1), seq=1)
        with pytest.raises(_StoppedError):
            await index.apply([torn])
    finally:
        await index.close()
    index = ShardedRedisIndex.from_url(cluster.url, subslots=3, cluster=True)
    try:
        await index.apply([torn])  # the next owner re-slots old-0
        assert index.reslots == 1
        forgotten = {ref.worker_id: slot for slot, ref in (await index._refs_by_id(model)).items()
                     if ref.worker_id.startswith("late-") or ref.worker_id == "old-0"}
    finally:
        await index.close()
    restore(directory, dump)
    cluster.wait_ok(replicated=False, timeout=60)
    named = await named_ids(cluster)
    assert set(forgotten.values()) & named, "the other masters kept no forgotten id"

    index = ShardedRedisIndex.from_url(cluster.url, subslots=3, cluster=True)
    try:
        errors = []
        for w in range(8):
            try:
                await index.apply([rank_batch(model, f"new-{w}", range(1))])
            except BackendError as exc:  # the old holder's positions, met by a reused id
                errors.append(exc)
        new = {ref.worker_id: slot for slot, ref in (await index._refs_by_id(model)).items()
               if ref.worker_id.startswith("new-")}
        reused = {worker: slot for worker, slot in new.items() if slot in named}
        print(f"\nforgotten ids {sorted(forgotten.values())}, named after the restore "
              f"{len(named)}, new ids {sorted(new.values())}, reused {reused}")
        assert reused == {}
        credited: dict[str, set[int]] = {}
        for key, holders in (await index.presence(model)).items():
            for ref in holders:
                credited.setdefault(ref.worker_id, set()).add(key)
        for w in range(8):
            own = set(block_keys_for_tokens(rank_tokens(f"new-{w}", 0), BS, model))
            assert credited.get(f"new-{w}") == own
        for worker in forgotten:
            for chain in range(RANK_CHAINS):
                result = await index.score(ScoreQuery(model=model, token_ids=rank_tokens(
                    worker, chain), block_size=BS))
                assert not [s.worker_id for s in result.scores
                            if s.worker_id.startswith("new-")]
        assert errors == []
    finally:
        await index.close()
