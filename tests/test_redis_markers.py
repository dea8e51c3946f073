"""Index markers on a real Redis Cluster (3 masters, a replica each): a copy on every
master (indexer/index/redis_markers.py), combined on read, so one master restored from an
older dump or promoted from a lagging replica shows whichever master it is; and copies
that stay consistent when a tag's slot moves to another master or a master is added."""

from __future__ import annotations

import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio.cluster import RedisCluster as ClusterClient

from indexer.index.redis_cluster import RedisClusterIndex
from indexer.index.redis_markers import (
    ClusterMarkers,
    combine_copies,
    marker_key,
    marker_tags,
    tag_slot,
)
from indexer.index.redis_sharded import ShardedRedisIndex
from tests.support.redis_cluster import ClusterNode, RedisCluster, cluster_ports

pytestmark = pytest.mark.redis_cluster

NAME = "position.3"


def test_combine_copies() -> None:
    assert combine_copies(["7", "7", "7"]) == "7"
    assert combine_copies(["9", "7", "12"]) == "7"
    assert combine_copies(["abc", "abc"]) == "abc"
    assert combine_copies(["abc", "abd"]) is None
    assert combine_copies(["7", None, "7"]) is None
    assert combine_copies(["7", "x7"]) is None
    assert combine_copies([]) is None


@pytest.fixture
async def client(redis_cluster: RedisCluster) -> AsyncIterator[ClusterClient]:
    found = ClusterClient.from_url(redis_cluster.url)
    await found.flushall(target_nodes=ClusterClient.PRIMARIES)
    yield found
    await found.aclose()


async def copies(client: ClusterClient, cluster: RedisCluster,
                 name: str = NAME) -> dict[int, list[bytes]]:
    """Master port -> the values of `name`'s copies it holds (every copy of every tag)."""
    held: dict[int, list[bytes]] = {}
    for port, info in cluster.topology().items():
        if info["master"] and info["slots"] and not info["fail"]:
            node = cluster.by_port(port)
            keys = node.cli("KEYS", f"kvi:marker:*:{name}").split()
            held[port] = sorted(node.cli("GET", key).strip().encode() for key in keys)
    return held


async def current_tags(client: ClusterClient) -> dict[str, str]:
    await client.nodes_manager.initialize()
    return marker_tags(client.nodes_manager.slots_cache)


class TestCopies:
    async def test_a_copy_on_every_master(self, client: ClusterClient,
                                          redis_cluster: RedisCluster) -> None:
        markers = ClusterMarkers(client)
        assert await markers.get(NAME) is None
        await markers.set(NAME, "41")
        await markers.set(NAME, "42")
        held = await copies(client, redis_cluster)
        assert len(held) == 3 and all(values == [b"42"] for values in held.values())
        tags = await current_tags(client)
        assert len(set(tags.values())) == 3
        for master, tag in tags.items():
            port = int(master.rsplit(":", 1)[1])
            assert redis_cluster.node_of_slot(tag_slot(tag)).port == port
        assert await markers.get(NAME) == "42"
        await markers.set(NAME, None)
        assert await copies(client, redis_cluster) == {p: [] for p in held}
        assert await markers.get(NAME) is None

    async def test_an_older_or_missing_copy(self, client: ClusterClient) -> None:
        """One master's position copy older: the smallest is read (the index reflects no
        more than its oldest master); a marker copy different or missing: None."""
        markers = ClusterMarkers(client)
        await markers.set(NAME, "500")
        tags = sorted((await current_tags(client)).values())
        await client.set(marker_key(tags[1], NAME), "320")
        assert await markers.get(NAME) == "320"
        await client.delete(marker_key(tags[2], NAME))
        assert await markers.get(NAME) is None
        await markers.set(NAME, "501")
        assert await markers.get(NAME) == "501"
        await markers.set("partition.3", "snap-a")
        await client.set(marker_key(tags[0], "partition.3"), "snap-older")
        assert await markers.get("partition.3") is None

    @pytest.mark.parametrize("layout", ["cluster", "subslots"])
    async def test_the_indexes_keep_their_markers_so(self, layout: str, client: ClusterClient,
                                                     redis_cluster: RedisCluster) -> None:
        index: RedisClusterIndex | ShardedRedisIndex
        if layout == "cluster":
            index = RedisClusterIndex.from_url(redis_cluster.url)
        else:
            index = ShardedRedisIndex.from_url(redis_cluster.url, subslots=3, cluster=True)
        try:
            await index.set_marker(NAME, "77")
            held = await copies(client, redis_cluster)
            assert len(held) == 3 and all(values == [b"77"] for values in held.values())
            tags = sorted((await current_tags(client)).values())
            await client.set(marker_key(tags[2], NAME), "70")
            assert await index.get_marker(NAME) == "70"
        finally:
            await index.close()

    async def test_a_tag_slot_moved_to_another_master(self, client: ClusterClient,
                                                      redis_cluster: RedisCluster) -> None:
        """The slot of a master's tag moves: the copy moves with it (two on the target,
        none on the source); the source gets a new tag, written from the others' copies.
        No read in between says None, and an older copy still shows afterwards."""
        markers = ClusterMarkers(client)
        await markers.set(NAME, "900")
        await markers.set("partition.3", "snap-a")
        tags = await current_tags(client)
        moved_tag = sorted(tags.values())[0]
        slot = tag_slot(moved_tag)
        source = redis_cluster.node_of_slot(slot)
        target = next(redis_cluster.by_port(p) for p, i in redis_cluster.topology().items()
                      if i["master"] and i["slots"] and p != source.port)
        try:
            redis_cluster.move_slot(slot, target)
            for _ in range(3):  # the first read meets MOVED: the client learns the slot
                assert await markers.get(NAME) == "900"
                assert await markers.get("partition.3") == "snap-a"
            assert markers.copies_extended > 0
            new_tags = await current_tags(client)
            assert len(set(new_tags.values())) == 3
            assert new_tags[f"127.0.0.1:{source.port}"] != moved_tag
            held = await copies(client, redis_cluster)
            assert held[source.port] == [b"900"]
            assert held[target.port] == [b"900", b"900"]
            await client.set(marker_key(new_tags[f"127.0.0.1:{source.port}"], NAME), "850")
            assert await markers.get(NAME) == "850"
            await markers.set(NAME, "901")
        finally:
            redis_cluster.move_slot(slot, source)
        for _ in range(3):
            assert await markers.get(NAME) == "901"
            assert await markers.get("partition.3") == "snap-a"



async def test_a_master_added(own_cluster: RedisCluster, tmp_path: Path) -> None:
    """A fourth master joins and gets a slot: its copy is written from the other three,
    no read says None meanwhile, and its copy is checked from then on."""
    client = ClusterClient.from_url(own_cluster.url)
    markers = ClusterMarkers(client)
    [port] = cluster_ports(1)
    node = ClusterNode(tmp_path / f"node-{port}", port)
    node.start()
    try:
        await markers.set(NAME, "1200")
        subprocess.run(["redis-cli", "--cluster", "add-node", f"127.0.0.1:{port}",
                        f"127.0.0.1:{own_cluster.nodes[0].port}"],
                       capture_output=True, text=True, timeout=60, check=True)
        own_cluster.nodes.append(node)
        own_cluster.masters += 1
        # Any slot will do; the slot of a tag nobody uses keeps the tag search short.
        slot = tag_slot("kvi:mk.1000")
        own_cluster.wait_ok(replicated=False)
        own_cluster.move_slot(slot, node)
        await client.nodes_manager.initialize()
        assert await markers.get(NAME) == "1200"
        tags = await current_tags(client)
        assert len(tags) == 4 and f"127.0.0.1:{port}" in tags
        held = await copies(client, own_cluster)
        assert held[port] == [b"1200"] and len(held) == 4
        await client.set(marker_key(tags[f"127.0.0.1:{port}"], NAME), "1100")
        assert await markers.get(NAME) == "1100"
    finally:
        await client.aclose()


async def test_a_promoted_replica_keeps_its_tag(own_cluster: RedisCluster) -> None:
    """A replica taking over (CLUSTER FAILOVER) serves the same slots, so it has the same
    tag: its copy is what it received, never written over from the others."""
    client = ClusterClient.from_url(own_cluster.url)
    markers = ClusterMarkers(client)
    try:
        await markers.set(NAME, "300")
        tags = await current_tags(client)
        tag = sorted(tags.values())[1]
        master = own_cluster.node_of_slot(tag_slot(tag))
        replica = own_cluster.wait_replica_synced(master)
        replica.cli("CLUSTER", "FAILOVER")
        for _ in range(300):
            if own_cluster.node_of_slot(tag_slot(tag)) is replica:
                break
            time.sleep(0.1)
        own_cluster.wait_ok(replicated=False)
        await client.nodes_manager.initialize()
        assert await markers.get(NAME) == "300"
        assert sorted((await current_tags(client)).values()) == sorted(tags.values())
        assert markers.copies_extended == 0
        replica.cli("SET", marker_key(tag, NAME), "250")
        assert await markers.get(NAME) == "250"
    finally:
        await client.aclose()
