"""The optional Redis module (native/redis_module/kvi.c): apply.lua's presence writes
through KVI.HOLDERS leave exactly what its Lua path leaves, on a real redis-server with
`--loadmodule`; the module refuses malformed input with an error reply; a server that
loses the module keeps working on the Lua path."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot
from redis.exceptions import ResponseError

from bench.workload import Workload, make_workload, worker_name
from indexer.index.layouts import model_prefix
from indexer.index.memory import MemoryIndex
from indexer.index.protocol import IndexConfig
from indexer.index.redis import COMPACT_BUCKET_LOAD, RedisIndex
from indexer.index.redis_cluster import RedisClusterIndex
from kvcore.bus import (
    SCHEMA_VERSION,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Event,
    EventBatch,
)
from tests.support.redis_cluster import RedisCluster
from tests.support.servers import RedisServer, kvi_module

pytestmark = pytest.mark.integration

ONE_HASH = "eq/one-hash"  # bucket load 0: group 0 through the module
HYBRID = "eq/hybrid"  # load 0, and KV-cache group 1's plain hash
BUCKETED = "eq/buckets"  # load 40: the Lua path either way
RANKS = 64
BLOCKS_PER_RANK = 20_000
CHUNK = 256  # batches per apply() call: each script call interleaves many ranks' ops


class Phases:
    """What follows a workload's stores, rank by rank and interleaved across ranks:
    removals, re-stores of what was removed, copies to other tiers (some removed again),
    a pool's copies, a rank cleared and refilled."""

    def __init__(self, workload: Workload, model: str) -> None:
        self.model = model
        self.events: dict[int, list[BlockStored]] = {}
        self.seq: dict[int, int] = {}
        for batch in workload.batches(model):
            w = int(batch.worker_id.rsplit("-", 1)[1])
            self.events.setdefault(w, []).extend(
                e for e in batch.events if isinstance(e, BlockStored))
            self.seq[w] = batch.seq + 1

    def batch(self, w: int, events: list[Event]) -> EventBatch:
        seq = self.seq[w]
        self.seq[w] = seq + 1
        return EventBatch(schema=SCHEMA_VERSION, model=self.model, worker_id=worker_name(w),
                          epoch=1, seq=seq, events=events, ts=1e6 + seq)

    def hashes(self, w: int, every: int, start: int = 0) -> list[int]:
        return [h for e in self.events[w][start::every] for h in e.block_hashes]

    def all(self) -> list[EventBatch]:
        ranks = sorted(self.events)
        out: list[EventBatch] = []
        phases = (
            lambda w: [BlockRemoved(block_hashes=self.hashes(w, 3))],
            lambda w: list(self.events[w][::3]),  # re-stored as they were
            lambda w: [BlockStored(block_hashes=self.hashes(w, 5), medium="cpu"),
                       BlockStored(block_hashes=self.hashes(w, 7, 1), medium="disk")],
            lambda w: [BlockRemoved(block_hashes=self.hashes(w, 10), medium="cpu"),
                       BlockStored(block_hashes=self.hashes(w, 4, 2), medium="storage",
                                   pool="shared")],
            lambda w: [BlockRemoved(block_hashes=self.hashes(w, 8, 2), medium="storage",
                                    pool="shared"),
                       BlockRemoved(block_hashes=self.hashes(w, 2, 1))],
        )
        for phase in phases:
            out += [self.batch(w, phase(w)) for w in ranks]
            if phase is phases[1]:
                out += [self.batch(w, [AllBlocksCleared()]) for w in ranks[3:6]]
                out += [self.batch(w, list(self.events[w][::2])) for w in ranks[4:6]]
        return out


async def apply_all(index: RedisIndex, batches: Sequence[EventBatch]) -> None:
    for i in range(0, len(batches), CHUNK):
        await index.apply(batches[i : i + CHUNK])


async def hide_in_bx(client: aioredis.Redis, model: str) -> int:
    """Write some of the one bucket's values as earlier versions did ('' in the bucket,
    the list in `bx`), and one '' with no list in `bx` at all: the same fields on any
    server holding the same bucket. Returns how many."""
    prefix = model_prefix(model)
    fields = sorted(await client.hkeys(prefix + "b:0"))[::97]
    for field in fields[1:]:
        await client.hset(prefix + "bx", field, await client.hget(prefix + "b:0", field))
    await client.hset(prefix + "b:0", mapping=dict.fromkeys(fields, b""))
    return len(fields)


async def run_workload(url: str, main: Workload, hybrid: Workload,
                       bucketed: Workload) -> int:
    """The same calls, in the same order, on the Redis at `url`; returns how many values
    were put in `bx`."""
    client = aioredis.Redis.from_url(url)
    await client.flushall()
    one_hash, buckets = RedisIndex(client), RedisIndex(client, bucket_load=COMPACT_BUCKET_LOAD)
    await apply_all(one_hash, main.batches(ONE_HASH))
    hidden = await hide_in_bx(client, ONE_HASH)
    await apply_all(one_hash, Phases(main, ONE_HASH).all())
    await one_hash.remove_worker(ONE_HASH, worker_name(7))
    await one_hash.clear_worker(ONE_HASH, worker_name(8))
    await apply_all(one_hash, hybrid.hybrid_batches(HYBRID))
    await apply_all(one_hash, Phases(hybrid, HYBRID).all())
    await apply_all(buckets, bucketed.batches(BUCKETED))
    await apply_all(buckets, Phases(bucketed, BUCKETED).all())
    await one_hash.close()
    await buckets.close()
    return hidden


async def stored_state(url: str) -> dict[bytes, Any]:
    """Every key: its content (a hash's fields and values and its encoding, a log's
    size), bar the random slot map versions."""
    client = aioredis.Redis.from_url(url)
    state: dict[bytes, Any] = {}
    for key in await client.keys("*"):
        if key.endswith(b":slotver"):
            continue
        kind = await client.type(key)
        if kind == b"hash":
            state[key] = (await client.object("encoding", key), await client.hgetall(key))
        elif kind == b"list":
            # A ledger log: a snapshot lists the ledger's entries in its map's order,
            # which differs between two runs in one process (the module never writes a
            # log): compared by size.
            state[key] = sum(len(chunk) for chunk in await client.lrange(key, 0, -1))
        elif kind == b"set":
            state[key] = await client.smembers(key)
        else:
            state[key] = await client.get(key)
    await client.aclose()
    return state


async def holders_calls(url: str) -> int:
    client = aioredis.Redis.from_url(url)
    stats = await client.info("commandstats")
    await client.aclose()
    return int(stats.get("cmdstat_kvi.holders", {}).get("calls", 0))


async def error_replies(client: aioredis.Redis) -> int:
    """Redis's count of error replies (asked on an open connection: opening one costs
    errors, redis-py's CLIENT SETINFO on Redis 7.0)."""
    return int((await client.info("stats"))["total_error_replies"])


async def test_module_stores_exactly_what_lua_stores(
        redis_server: RedisServer, module_redis_server: RedisServer) -> None:
    """64 ranks x >= 20,000 blocks with shared prefixes, then removals, re-stores, other
    tiers, a pool, cleared ranks, a removed rank, values left in `bx` by earlier
    versions; a hybrid model (group 1's hash) and a bucketed model (load 40, Lua either
    way): every key ends the same with and without the module."""
    main = make_workload(RANKS, RANKS * BLOCKS_PER_RANK, n_queries=1)
    assert main.blocks >= RANKS * BLOCKS_PER_RANK
    hybrid = make_workload(8, 40_000, seed=7, n_queries=1)
    bucketed = make_workload(8, 20_000, seed=11, n_queries=1)
    states = []
    for server in (redis_server, module_redis_server):
        calls = await holders_calls(server.url)
        hidden = await run_workload(server.url, main, hybrid, bucketed)
        states.append(await stored_state(server.url))
        used = await holders_calls(server.url) - calls
        assert (used > 0) == (server is module_redis_server)
    lua, module = states
    assert lua.keys() == module.keys()
    assert [key for key in lua if lua[key] != module[key]] == []
    one_hash, hybrid_p, bucketed_p = (model_prefix(m).encode()
                                      for m in (ONE_HASH, HYBRID, BUCKETED))
    fields = lua[one_hash + b"b:0"][1]
    assert len(fields) > 500_000
    # the values in `bx` the later ops touched moved back to the bucket
    in_bx = sum(1 for value in fields.values() if value == b"")
    assert hidden > 1_000 and 0 < in_bx < hidden / 2
    assert len(lua[one_hash + b"bx"][1]) in (in_bx - 1, in_bx)
    assert len(lua[hybrid_p + b"blk1"][1]) > 0
    assert int(lua[bucketed_p + b"bk"][1][b"level"]) > 3


async def test_asking_for_the_module_is_no_error(redis_server: RedisServer) -> None:
    """A server without the module: the script's question (once a call) is no error
    reply in Redis's error counts (which operators watch)."""
    batches = make_workload(8, 6_000, n_queries=1).batches(ONE_HASH)
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushall()
    index = RedisIndex(client)
    await index.apply(batches[:16])
    errors = await error_replies(client)
    for i in range(16, len(batches), 16):
        await index.apply(batches[i : i + 16])
    assert len(batches) > 16 * 10
    assert await error_replies(client) == errors
    await index.close()


async def test_lua_path_after_a_restart_without_the_module(tmp_path: Path) -> None:
    """A server restarted (from its snapshot) without the module: the next calls run the
    Lua path, on what the module wrote, and the index stays exact."""
    workdir = tmp_path / "redis"
    server = RedisServer(workdir, modules=(kvi_module(),)).start()
    try:
        workload = make_workload(8, 6_000, n_queries=1)
        batches = workload.batches(ONE_HASH) + Phases(workload, ONE_HASH).all()
        half = len(batches) // 2
        index = RedisIndex.from_url(server.url)
        await apply_all(index, batches[:half])
        await index.close()
        assert await holders_calls(server.url) > 0
        client = aioredis.Redis.from_url(server.url)
        await client.save()
        await client.aclose()
        server.stop()
        server = RedisServer(workdir, server.port).start()
        index = RedisIndex.from_url(server.url)
        await apply_all(index, batches[half:])
        assert await holders_calls(server.url) == 0
        memory = MemoryIndex(IndexConfig())
        await memory.apply(batches)
        assert await index.presence(ONE_HASH) == await memory.presence(ONE_HASH)
        await index.close()
    finally:
        server.stop()


@pytest.mark.redis_cluster
async def test_on_a_cluster_and_its_replicas(tmp_path: Path) -> None:
    """On a Redis Cluster whose nodes load the module: the script calls KVI.HOLDERS on the
    model's master (the keys it declares route there), the index is exact, and the
    replica holds the same presence hash (the module replicates HSET / HDEL)."""
    cluster = RedisCluster(tmp_path / "cluster", modules=(kvi_module(),)).start()
    try:
        workload = make_workload(8, 6_000, n_queries=1)
        batches = workload.batches(ONE_HASH) + Phases(workload, ONE_HASH).all()
        index = RedisClusterIndex.from_url(cluster.url, bucket_load=0)
        await apply_all(index, batches)
        memory = MemoryIndex(IndexConfig())
        await memory.apply(batches)
        assert await index.presence(ONE_HASH) == await memory.presence(ONE_HASH)
        await index.close()
        bucket = model_prefix(ONE_HASH) + "b:0"
        master = cluster.node_of_slot(key_slot(bucket.encode()))
        assert await holders_calls(master.url) > 0
        replica = cluster.wait_replica_synced(master)
        on_master, on_replica = (aioredis.Redis.from_url(node.url) for node in (master, replica))
        await on_replica.execute_command("READONLY")
        stored = await on_master.hgetall(bucket)
        assert len(stored) > 1_000
        assert await on_replica.hgetall(bucket) == stored
        await on_master.aclose()
        await on_replica.aclose()
    finally:
        cluster.stop()


KEY = b"\x01\x02\x03\x04\x05\x06\x07\x08"


class TestMalformedInput:
    """KVI.HOLDERS answers malformed input with an error reply; the server lives on."""

    @pytest.mark.parametrize("args", [
        (),
        ("h",),
        ("h", "bx", "S", "5"),
        ("h", "bx", "S", "5", KEY, "extra"),
    ])
    async def test_wrong_arity(self, module_redis_server: RedisServer,
                               args: tuple[Any, ...]) -> None:
        await self.refused(module_redis_server, args, "wrong number of arguments")

    @pytest.mark.parametrize("keys", [b"1234567", KEY + b"9", b"x"])
    async def test_keys_not_a_run_of_8_bytes(self, module_redis_server: RedisServer,
                                             keys: bytes) -> None:
        await self.refused(module_redis_server, ("h", "bx", "S", "5", keys), "8-byte keys")

    @pytest.mark.parametrize(("op", "bit"), [
        ("X", "5"), ("SS", "5"), ("", "5"), ("S", "-1"), ("S", "4294967296"), ("S", "1.5"),
        ("C", "five"),
    ])
    async def test_bad_op_or_bit(self, module_redis_server: RedisServer, op: str,
                                 bit: str) -> None:
        await self.refused(module_redis_server, ("h", "bx", op, bit, KEY), "wants op")

    @pytest.mark.parametrize("op", ["S", "C"])
    async def test_bucket_and_bx_the_same_key(self, module_redis_server: RedisServer,
                                              op: str) -> None:
        await self.refused(module_redis_server, ("h", "h", op, "5", KEY), "apart")

    @pytest.mark.parametrize("args", [
        ("str", "bx", "S", "5", KEY),  # the hash is a string
        ("h", "str", "C", "5", KEY),  # bx is a string (read by S / C)
        ("lst", "bx", "T", "5", KEY),
    ])
    async def test_not_a_hash(self, module_redis_server: RedisServer,
                              args: tuple[Any, ...]) -> None:
        client = aioredis.Redis.from_url(module_redis_server.url)
        await client.flushall()
        await client.set("str", "x")
        await client.rpush("lst", "x")
        await client.aclose()
        await self.refused(module_redis_server, args, "WRONGTYPE", flush=False)

    async def test_malformed_value_is_left_alone(self,
                                                 module_redis_server: RedisServer) -> None:
        """A stored value that is not a list of 4-byte entries is not touched."""
        client = aioredis.Redis.from_url(module_redis_server.url)
        await client.flushall()
        await client.hset("h", KEY, b"abcdef")
        assert await client.execute_command("KVI.HOLDERS", "h", "bx", "S", 5, KEY) == [0, 0]
        assert await client.execute_command("KVI.HOLDERS", "h", "bx", "C", 5, KEY) == [0, 0]
        assert await client.hgetall("h") == {KEY: b"abcdef"}
        await client.aclose()

    async def test_holder_lists(self, module_redis_server: RedisServer) -> None:
        """Sorted u32 entries slot * 16 + tier bits; the field goes with its last holder;
        the reply counts the fields added and deleted."""
        client = aioredis.Redis.from_url(module_redis_server.url)
        await client.flushall()
        other = b"\x09" * 8

        async def holders(op: str, bit: int, keys: bytes) -> list[int]:
            reply: list[int] = await client.execute_command("KVI.HOLDERS", "h", "bx", op, bit,
                                                             keys)
            return reply

        assert await holders("S", 5 * 4 + 1, KEY + other) == [2, 0]
        assert await holders("S", 2 * 4 + 0, KEY) == [0, 0]
        assert await holders("S", 5 * 4 + 3, KEY) == [0, 0]
        assert await holders("S", 5 * 4 + 3, KEY) == [0, 0]  # set already
        value = await client.hget("h", KEY)
        assert struct.unpack(f"<{len(value) // 4}I", value) == (2 * 16 + 1, 5 * 16 + 2 + 8)
        assert await holders("C", 5 * 4 + 1, KEY + KEY) == [0, 0]
        assert await holders("C", 2 * 4 + 0, KEY) == [0, 0]
        assert await holders("C", 5 * 4 + 3, KEY + other) == [0, 1]
        assert await client.hgetall("h") == {other: struct.pack("<I", 5 * 16 + 2)}
        assert await holders("C", 5 * 4 + 1, other) == [0, 1]
        assert await client.exists("h") == 0
        await client.aclose()

    @staticmethod
    async def refused(server: RedisServer, args: tuple[Any, ...], message: str, *,
                      flush: bool = True) -> None:
        client = aioredis.Redis.from_url(server.url)
        if flush:
            await client.flushall()
        with pytest.raises(ResponseError, match=message):
            await client.execute_command("KVI.HOLDERS", *args)
        assert await client.ping()
        assert sorted(await client.keys("*")) == ([] if flush else [b"lst", b"str"])
        await client.aclose()
