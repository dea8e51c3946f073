"""`migrate_layout` (kv-indexer migrate-layout) on one redis-server, index by index: what
a refusing index does not write, which keys the command deletes and keeps, S -> S', an
older layout, --model and --dry-run, and an indexer left running on the old flag. The
end-to-end runs (publishers, indexers, rebuilds) are in test_layout_migration.py."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator

import msgspec
import pytest
import redis.asyncio as aioredis

from indexer.errors import BackendError
from indexer.index.layouts import LAYOUT_KEY, LAYOUT_RECHECK_S, migrate_layout
from indexer.index.protocol import ScoreQuery, WorkerRef
from indexer.index.redis import RedisIndex
from indexer.index.redis_sharded import ShardedRedisIndex
from kvcore.keys import block_keys_for_tokens
from tests.support.ledger_batches import BS, MODEL, TOKENS, batch, stored
from tests.support.servers import RedisServer

OTHER_APP = {b"app:1": b"one", b"sessions:{m:m}:x": b"two"}
LEFT = {LAYOUT_KEY.encode(), b"kvi:{m:m}:nextslot"}  # the id counter stays


@pytest.fixture
async def client(redis_client: aioredis.Redis) -> AsyncIterator[aioredis.Redis]:
    """The flushed session redis-server, another application's keys in it."""
    for key, value in OTHER_APP.items():
        await redis_client.set(key, value)
    yield redis_client


def of_model(model: str, seq: int, first: int = 1, last: int = 6, worker: str = "w") -> object:
    return msgspec.structs.replace(batch(seq, stored(first, last), worker=worker), model=model)


async def index_keys(client: aioredis.Redis) -> set[bytes]:
    return {key for key in await client.keys("*") if key not in OTHER_APP}


async def held(index: RedisIndex | ShardedRedisIndex, model: str = MODEL) -> int:
    result = await index.score(ScoreQuery(model=model,
                                          block_keys=block_keys_for_tokens(TOKENS, BS, model)))
    return max((s.matched_blocks for s in result.scores), default=0)


async def test_a_refusing_index_writes_nothing_until_the_command_ran(
        redis_server: RedisServer, client: aioredis.Redis) -> None:
    single = RedisIndex.from_url(redis_server.url)
    await single.apply([batch(0, stored(1, 6))])
    before = await index_keys(client)
    sharded = ShardedRedisIndex.from_url(redis_server.url, subslots=4)
    try:
        with pytest.raises(BackendError, match=r"migrate-layout .*--redis-subslots 4"):
            await sharded.ping()
        [state] = await single.export_ranks([(MODEL, WorkerRef("w", 0))])
        for write in (sharded.apply([batch(1, stored(1, 6))]), sharded.import_ranks([state]),
                      sharded.export_ranks([(MODEL, WorkerRef("w", 0))])):
            with pytest.raises(BackendError, match="single-slot model"):
                await write
        assert await index_keys(client) == before
        assert await held(sharded) == 0  # never the other layout's blocks

        lines: list[str] = []
        await migrate_layout(client, 4, settle_s=0, say=lines.append)
        assert any("deleted" in line and "'m' (single-slot)" in line for line in lines)
        assert await index_keys(client) == LEFT
        assert {k: await client.get(k) for k in OTHER_APP} == OTHER_APP
        await sharded.ping()
        await sharded.import_ranks([state])
        assert await held(sharded) == 6
    finally:
        await single.close()
        await sharded.close()


async def test_an_indexer_left_on_the_old_flag_stops_writing(
        redis_server: RedisServer, client: aioredis.Redis) -> None:
    """It passed its layout check before the command ran: the declared layout makes it
    refuse at its next ping, and its writes from then on."""
    single = RedisIndex.from_url(redis_server.url)
    try:
        await single.apply([batch(0, stored(1, 3))])
        await single.ping()
        await migrate_layout(client, 4, settle_s=0, say=lambda _line: None)
        with pytest.raises(BackendError, match="moved to --redis-subslots 4"):
            await single.ping()
        with pytest.raises(BackendError, match="moved to --redis-subslots 4"):
            await single.apply([batch(1, stored(4, 6))])
        assert await index_keys(client) == LEFT
    finally:
        await single.close()


@pytest.mark.parametrize("subslots", [1, 4])
async def test_a_declared_layout_stops_writes_without_a_ping(
        redis_server: RedisServer, client: aioredis.Redis, subslots: int) -> None:
    """An index whose health loop is slow to ping (its probes wait on timeouts) still
    stops writing within LAYOUT_RECHECK_S of the declaration, well inside the command's
    settle time: it never writes after the command started deleting."""
    index: RedisIndex | ShardedRedisIndex = (
        RedisIndex.from_url(redis_server.url) if subslots == 1
        else ShardedRedisIndex.from_url(redis_server.url, subslots=subslots))
    try:
        await index.ping()
        await index.apply([batch(0, stored(1, 3))])
        await client.set(LAYOUT_KEY, "2")  # what migrate-layout declares first
        await asyncio.sleep(LAYOUT_RECHECK_S + 0.05)
        before = await index_keys(client)
        with pytest.raises(BackendError, match="moved to --redis-subslots 2"):
            await index.apply([batch(1, stored(4, 6))])
        with pytest.raises(BackendError, match="moved to --redis-subslots 2"):
            await index.import_ranks([])
        assert await index_keys(client) == before
    finally:
        await index.close()


async def test_subslots_to_other_subslots_keep_the_id_counters(
        redis_server: RedisServer, client: aioredis.Redis) -> None:
    four = ShardedRedisIndex.from_url(redis_server.url, subslots=4)
    await four.apply([batch(0, stored(1, 6), worker=f"w{i}") for i in range(3)])
    old_ids = set((await four._refs_by_id(MODEL)).keys())
    await four.close()
    two = ShardedRedisIndex.from_url(redis_server.url, subslots=2)
    try:
        with pytest.raises(BackendError, match="another number of sub-slots"):
            await two.ping()
        await migrate_layout(client, 2, settle_s=0, say=lambda _line: None)
        left = await index_keys(client)
        assert left - {LAYOUT_KEY.encode()}, "the id counters stay"
        assert all(key.endswith(b"}:nextslot") for key in left - {LAYOUT_KEY.encode()})
        await two.ping()
        await two.apply([batch(0, stored(1, 6), worker="w0")])
        [new_id] = (await two._refs_by_id(MODEL)).keys()
        assert new_id > max(old_ids)  # never an id a leftover entry could name
        assert await held(two) == 6
    finally:
        await two.close()


async def test_an_older_layout_is_moved_out(redis_server: RedisServer,
                                            client: aioredis.Redis) -> None:
    """A model of the bitmask layout (no `layout` in `bk`), which RedisIndex refuses."""
    prefix = "kvi:{m:m}:"
    await client.sadd("kvi:models", MODEL)
    await client.hset(prefix + "slots", "w\n0", 0)
    await client.set(prefix + "nextslot", 1)
    await client.hset(prefix + "w:0:meta", mapping={"pos": b"\x00" * 15 + b"\x01"})
    for key in block_keys_for_tokens(TOKENS, BS, MODEL):
        await client.hset(prefix + "blk", struct.pack("<Q", key), b"\x01")
    index = RedisIndex.from_url(redis_server.url)
    try:
        with pytest.raises(BackendError, match=r"older index layout.*--redis-subslots 1"):
            await index.ping()
        lines: list[str] = []
        await migrate_layout(client, 1, settle_s=0, say=lines.append)
        assert "moving 'm': single-slot (older layout) -> single-slot" in lines
        assert await index_keys(client) == LEFT
        await index.ping()
        assert await held(index) == 0
    finally:
        await index.close()


async def test_dry_run_and_one_model(redis_server: RedisServer,
                                     client: aioredis.Redis) -> None:
    single = RedisIndex.from_url(redis_server.url)
    await single.apply([of_model("a", 0), of_model("b", 0)])  # type: ignore[list-item]
    await single.close()
    before = await index_keys(client)
    lines: list[str] = []
    await migrate_layout(client, 4, dry_run=True, settle_s=0, say=lines.append)
    assert lines == ["would move 'a': single-slot -> 4 sub-slots",
                     "would move 'b': single-slot -> 4 sub-slots"]
    assert await index_keys(client) == before
    await migrate_layout(client, 4, model="a", settle_s=0, say=lines.append)
    assert await client.smembers("kvi:models") == {b"b"}
    assert await index_keys(client) == {
        key for key in before if not key.startswith(b"kvi:{m:a}")} | {
            LAYOUT_KEY.encode(), b"kvi:{m:a}:nextslot"}
    sharded = ShardedRedisIndex.from_url(redis_server.url, subslots=4)
    try:
        with pytest.raises(BackendError, match=r"1 single-slot model\(s\) \(e.g. b\)"):
            await sharded.ping()
        await migrate_layout(client, 4, settle_s=0, say=lines.append)
        await sharded.ping()
    finally:
        await sharded.close()


async def test_a_garbled_declaration_is_refused_not_a_crash(
        redis_server: RedisServer, client: aioredis.Redis) -> None:
    await client.set(LAYOUT_KEY, "four")
    index = RedisIndex.from_url(redis_server.url)
    try:
        with pytest.raises(BackendError, match="not a --redis-subslots"):
            await index.ping()
        await migrate_layout(client, 1, settle_s=0, say=lambda _line: None)
        await index.ping()
    finally:
        await index.close()


async def test_a_late_write_left_behind_never_names_a_new_rank(
        redis_server: RedisServer, client: aioredis.Redis) -> None:
    """An old-flag indexer's write landing after the command deleted the model leaves
    holder entries under its tag; the model created again later must not give their
    slot ids to new ranks (a false hit)."""
    single = RedisIndex.from_url(redis_server.url)
    await single.apply([batch(0, stored(1, 6), worker=f"w{i}") for i in range(3)])
    await single.close()
    buckets = {key: await client.dump(key) for key in await client.keys("kvi:{m:m}:b:*")}
    assert buckets
    await migrate_layout(client, 4, settle_s=0, say=lambda _line: None)
    for key, dumped in buckets.items():  # the late write: holders of slots 0..2 again
        await client.restore(key, 0, dumped, replace=True)
    await migrate_layout(client, 1, settle_s=0, say=lambda _line: None)  # and back
    again = RedisIndex.from_url(redis_server.url)
    try:
        await again.apply([batch(0, stored(1, 1), worker="x")])
        assert await held(again) == 1  # its own block; never the orphans' 2..6
    finally:
        await again.close()


async def put_markers(client: aioredis.Redis) -> dict[bytes, bytes]:
    markers = {f"kvi:marker:{name}.{p}".encode(): b"trusted"
               for name in ("partition", "position") for p in range(2)}
    for key, value in markers.items():
        await client.set(key, value)
    return markers


async def test_a_rerun_in_the_target_layout_deletes_nothing(
        redis_server: RedisServer, client: aioredis.Redis) -> None:
    """Models listed without their layout key: one collected between its drop and its
    SREM (only its counters left), one holding keys of an unknown number of sub-slots, a
    single-slot one being created; none is another layout's, so nothing is deleted, not
    even the partition markers."""
    four = ShardedRedisIndex.from_url(redis_server.url, subslots=4)
    await four.apply([of_model("a", 0)])  # type: ignore[list-item]
    await four.close()
    await client.sadd("kvi:smodels", "dropped", "unknown")
    await client.set("kvi:{s:dropped}:nextslot", 3)
    await client.set("kvi:{s:dropped:0.0}:nextslot", "3 x")
    await client.hset("kvi:{s:unknown:1.0}:pos", "0", b"\x00" * 17)
    markers = await put_markers(client)
    await migrate_layout(client, 4, settle_s=0, say=lambda _line: None)
    before = await index_keys(client)
    lines: list[str] = []
    report = await migrate_layout(client, 4, settle_s=0, say=lines.append)
    assert await index_keys(client) == before
    assert {k: await client.get(k) for k in markers} == markers
    assert await client.smembers("kvi:smodels") == {b"a", b"dropped", b"unknown"}
    assert [move.model for move in report.skipped] == ["unknown"]
    assert any("skipping 'unknown'" in line for line in lines)
    assert (report.moved, report.markers) == ([], 0)

    await client.sadd("kvi:models", "creating")  # listed before its first rank
    await migrate_layout(client, 1, dry_run=True, settle_s=0, say=lines.append)
    assert "would move 'a': 4 sub-slots -> single-slot" in lines
    assert not any("'creating'" in line and "move" in line for line in lines)


async def test_a_model_created_in_the_target_layout_meanwhile_is_kept(
        redis_server: RedisServer, client: aioredis.Redis) -> None:
    """Listed without `subslots` when the command starts; by the end of the settle a
    target-layout indexer has created it: it is left with its blocks, listed."""
    await client.sadd("kvi:smodels", MODEL)
    await client.set("kvi:{s:m:2.0}:p:99", b"left by a collection")
    declared = asyncio.Event()

    def say(line: str) -> None:
        if line.startswith("declared layout"):
            declared.set()

    migration = asyncio.create_task(migrate_layout(client, 4, settle_s=0.5, say=say))
    await declared.wait()
    four = ShardedRedisIndex.from_url(redis_server.url, subslots=4)
    try:
        await four.apply([batch(0, stored(1, 6))])
        report = await migration
        assert (report.kept, report.moved, report.markers) == (1, [], 0)
        assert await client.smembers("kvi:smodels") == {MODEL.encode()}
        assert await held(four) == 6
    finally:
        await four.close()


async def test_an_unlisted_model_is_refused_before_anything_is_written(
        redis_server: RedisServer, client: aioredis.Redis) -> None:
    single = RedisIndex.from_url(redis_server.url)
    await single.apply([batch(0, stored(1, 6))])
    before = await index_keys(client)
    try:
        with pytest.raises(BackendError, match=r"'typo' is not listed .*nothing changed"):
            await migrate_layout(client, 4, model="typo", settle_s=0,
                                 say=lambda _line: None)
        assert await index_keys(client) == before
        assert await client.get(LAYOUT_KEY) is None
        await single.ping()  # still serving
    finally:
        await single.close()


async def test_an_empty_model_of_another_layout_is_only_unlisted(
        redis_server: RedisServer, client: aioredis.Redis) -> None:
    """Listed in kvi:smodels with nothing of it left but its counters: a single-slot
    index would refuse the listing, so it goes; nothing moves, so the markers stay."""
    await client.sadd("kvi:smodels", "dropped")
    await client.set("kvi:{s:dropped}:nextslot", 3)
    markers = await put_markers(client)
    report = await migrate_layout(client, 1, settle_s=0, say=lambda _line: None)
    assert (report.unlisted, report.moved, report.markers) == (["dropped"], [], 0)
    assert await client.scard("kvi:smodels") == 0
    assert {k: await client.get(k) for k in markers} == markers
    assert await client.get("kvi:{s:dropped}:nextslot") == b"3"
    index = RedisIndex.from_url(redis_server.url)
    try:
        await index.ping()
    finally:
        await index.close()
