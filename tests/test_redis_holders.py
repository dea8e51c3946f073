"""Redis layout 2: holder lists in bucketed hashes, slot ids never reused, older layouts
refused (lua/holders.lua, docs/architecture.md "Redis")."""

from __future__ import annotations

import asyncio
import struct

import pytest
import redis.asyncio as aioredis

from bench.workload import make_workload
from indexer.config import parse_service_config
from indexer.errors import BackendError, ConfigError
from indexer.index.factory import build_index
from indexer.index.memory import MemoryIndex
from indexer.index.protocol import IndexConfig, ScoreQuery
from indexer.index.redis import (
    COMPACT_BUCKET_LOAD,
    DEFAULT_BUCKET_LOAD,
    MODELS_KEY,
    RedisIndex,
    model_prefix,
)
from kvcore.bus import BlockRemoved
from kvcore.keys import block_keys_for_tokens
from tests.support.ledger_batches import BS, MODEL, TOKENS, batch, stored
from tests.support.servers import RedisServer

pytestmark = pytest.mark.integration

FIELD_MODEL = "field/model"
HIGH_SLOT_ID = 70_000  # past u16: the old record layout could not name it


async def start_ids_at(client: aioredis.Redis, model: str, first: int) -> None:
    """Make a model's next rank take slot id `first`, as if `first` ranks came and went."""
    await client.set(model_prefix(model) + "nextslot", first)


async def scored(index: RedisIndex | MemoryIndex, model: str,
                 tokens: list[int]) -> list[tuple[str, int, int]]:
    result = await index.score(ScoreQuery(model=model, block_keys=block_keys_for_tokens(
        tokens, 16, model)))
    return sorted((s.worker_id, s.dp_rank, s.matched_blocks) for s in result.scores)


async def slot_ids(client: aioredis.Redis, model: str) -> dict[str, int]:
    raw = await client.hgetall(model_prefix(model) + "slots")
    return {ref.decode(): int(slot) for ref, slot in raw.items()}


class TestFieldScale:
    """Tens of thousands of blocks per rank, slot ids past 65,535: exact against the
    in-memory index, and bytes per entry that do not depend on slot ids."""

    @pytest.mark.parametrize("bucket_load", [COMPACT_BUCKET_LOAD, 0])
    async def test_high_slot_ids_index_exactly(self, redis_client: aioredis.Redis,
                                               bucket_load: int) -> None:
        """8 ranks x ~20,000 blocks each with slot ids from 70,000, in buckets or in one
        hash (load 0): presence and every Score answer equal the in-memory index's; a
        removed rank's entries are gone."""
        workload = make_workload(8, 160_000, n_queries=60)
        batches = workload.batches(FIELD_MODEL)
        await start_ids_at(redis_client, FIELD_MODEL, HIGH_SLOT_ID)
        index = RedisIndex(redis_client, bucket_load=bucket_load)
        memory = MemoryIndex(IndexConfig())
        for i in range(0, len(batches), 256):
            await index.apply(batches[i : i + 256])
        await memory.apply(batches)
        ids = await slot_ids(redis_client, FIELD_MODEL)
        assert len(ids) == 8 and min(ids.values()) >= HIGH_SLOT_ID
        level = await redis_client.hget(model_prefix(FIELD_MODEL) + "bk", "level")
        assert (int(level) == 0) == (bucket_load == 0)
        entries = sum(sum(w.blocks_by_tier.values()) for w in await index.workers(FIELD_MODEL))
        assert entries / 8 >= 20_000
        assert await index.presence(FIELD_MODEL) == await memory.presence(FIELD_MODEL)
        for tokens in workload.queries:
            assert await scored(index, FIELD_MODEL, tokens) == await scored(
                memory, FIELD_MODEL, tokens)
        gone = sorted(ids)[0].partition("\n")[0]
        await index.remove_worker(FIELD_MODEL, gone)
        await memory.remove_worker(FIELD_MODEL, gone)
        assert await index.presence(FIELD_MODEL) == await memory.presence(FIELD_MODEL)
        for tokens in workload.queries[:20]:
            found = await scored(index, FIELD_MODEL, tokens)
            assert found == await scored(memory, FIELD_MODEL, tokens)
            assert gone not in {worker for worker, _, _ in found}
        await index.close()

    async def test_bytes_per_entry_do_not_depend_on_slot_ids(
            self, redis_client: aioredis.Redis) -> None:
        """The same 64-rank workload at slot ids from 0 and from 1,000,000 (past 2^20
        ranks' worth): the presence values have the same size to the byte, and Redis
        memory grows by the same amount within 5% (client buffers and the allocator move
        it; a bitmask layout would need ~500 KB per block at those ids)."""
        workload = make_workload(64, 60_000, n_queries=1)
        batches = workload.batches(FIELD_MODEL)
        grown, data = [], []
        warm = RedisIndex(redis_client)  # scripts loaded before: their cache is not counted
        await warm.apply([batch(0, stored(1, 6))])
        await warm.close()
        for first in (0, 1_000_000):
            await redis_client.flushdb()
            await start_ids_at(redis_client, FIELD_MODEL, first)
            before = int((await redis_client.info("memory"))["used_memory"])
            index = RedisIndex(redis_client)
            for i in range(0, len(batches), 256):
                await index.apply(batches[i : i + 256])
            grown.append(int((await redis_client.info("memory"))["used_memory"]) - before)
            data.append(await presence_bytes(redis_client, FIELD_MODEL))
            await index.close()
        assert data[0] == data[1] > 0
        assert abs(grown[0] - grown[1]) <= grown[0] // 20, grown


async def presence_bytes(client: aioredis.Redis, model: str) -> int:
    """The bytes of a model's presence values: its buckets' and `bx`'s."""
    prefix = model_prefix(model)
    level, split = await client.hmget(prefix + "bk", "level", "split")
    total = 0
    for bucket in (*range(2 ** int(level) + int(split)), "x"):
        name = f"{prefix}b:{bucket}" if bucket != "x" else prefix + "bx"
        total += sum(len(value) for value in (await client.hgetall(name)).values())
    return total


class TestHolderLists:
    """Values hold one u32 per holder; buckets stay compact; long lists move to `bx` in a
    model that splits, and stay in the one bucket at load 0."""

    async def test_buckets_split_and_stay_listpack(self, redis_client: aioredis.Redis) -> None:
        """Thousands of blocks spread over buckets of at most 128 fields, each encoded
        as a listpack; the block count in `bk` is exact."""
        workload = make_workload(4, 20_000, n_queries=1)
        index = RedisIndex(redis_client, bucket_load=COMPACT_BUCKET_LOAD)
        batches = workload.batches(FIELD_MODEL)
        for i in range(0, len(batches), 256):
            await index.apply(batches[i : i + 256])
        prefix = model_prefix(FIELD_MODEL)
        level, split, count = await redis_client.hmget(prefix + "bk", "level", "split",
                                                       "count")
        n_buckets = 2 ** int(level) + int(split)
        assert n_buckets >= 100
        sizes = [await redis_client.hlen(f"{prefix}b:{b}") for b in range(n_buckets)]
        assert sum(sizes) == int(count) == len(await index.presence(FIELD_MODEL))
        assert max(sizes) <= 128
        encodings = {await redis_client.object("encoding", f"{prefix}b:{b}")
                     for b in range(n_buckets) if sizes[b]}
        assert encodings == {b"listpack"}
        await index.close()

    async def test_a_block_many_ranks_hold_moves_to_bx_and_back(
            self, redis_client: aioredis.Redis) -> None:
        """At a load > 0, 20 ranks hold the prompt: its values (3 holders or more) live
        in `bx`, the bucket keeps ''; as ranks drop to 2 they come back; answers stay
        exact."""
        index = RedisIndex(redis_client, bucket_load=COMPACT_BUCKET_LOAD)
        memory = MemoryIndex(IndexConfig())
        for w in range(20):
            one = [batch(0, stored(1, 6), worker=f"w{w:02d}")]
            await index.apply(one)
            await memory.apply(one)
        prefix = model_prefix(MODEL)
        assert await redis_client.hlen(prefix + "bx") == 6
        keys = block_keys_for_tokens(TOKENS, BS, MODEL)
        value = await redis_client.hget(prefix + "bx", struct.pack("<Q", keys[0]))
        assert value is not None and len(value) == 4 * 20
        entries = struct.unpack("<20I", value)
        assert list(entries) == sorted(entries) and {e & 15 for e in entries} == {1}
        assert await index.presence(MODEL) == await memory.presence(MODEL)
        for w in range(18):
            await index.remove_worker(MODEL, f"w{w:02d}")
            await memory.remove_worker(MODEL, f"w{w:02d}")
        assert await redis_client.hlen(prefix + "bx") == 0
        assert await index.presence(MODEL) == await memory.presence(MODEL)
        query = ScoreQuery(model=MODEL, block_keys=keys)
        got = (await index.score(query)).scores
        want = (await memory.score(query)).scores
        assert sorted((s.worker_id, s.matched_blocks) for s in got) == sorted(
            (s.worker_id, s.matched_blocks) for s in want)
        assert len(got) == 2
        await index.close()


    async def test_load_0_keeps_long_lists_in_its_one_hash(
            self, redis_client: aioredis.Redis) -> None:
        """At load 0 the values of a prompt 20 ranks hold stay in the model's one hash
        (Score reads them with one HMGET): no `bx`, answers exact."""
        index = RedisIndex(redis_client, bucket_load=0)
        memory = MemoryIndex(IndexConfig())
        for w in range(20):
            one = [batch(0, stored(1, 6), worker=f"w{w:02d}")]
            await index.apply(one)
            await memory.apply(one)
        prefix = model_prefix(MODEL)
        assert not await redis_client.exists(prefix + "bx")
        keys = block_keys_for_tokens(TOKENS, BS, MODEL)
        values = await redis_client.hmget(prefix + "b:0", [struct.pack("<Q", k) for k in keys])
        assert [len(v or b"") for v in values] == [4 * 20] * 6
        assert await scored(index, MODEL, TOKENS) == await scored(memory, MODEL, TOKENS)
        await index.close()

    async def test_load_0_reads_lists_earlier_versions_left_in_bx(
            self, redis_client: aioredis.Redis) -> None:
        """A load-0 model as earlier versions wrote it (lists of 3 holders or more in
        `bx`, '' in the bucket) scores and lists presence exactly; a write of such a key
        moves its list back into the bucket."""
        index = RedisIndex(redis_client, bucket_load=0)
        memory = MemoryIndex(IndexConfig())
        for w in range(5):
            one = [batch(0, stored(1, 6), worker=f"w{w}")]
            await index.apply(one)
            await memory.apply(one)
        prefix = model_prefix(MODEL)
        bucket = prefix + "b:0"
        for field, value in (await redis_client.hgetall(bucket)).items():
            await redis_client.hset(prefix + "bx", field, value)
            await redis_client.hset(bucket, field, b"")
        assert await scored(index, MODEL, TOKENS) == await scored(memory, MODEL, TOKENS)
        assert await index.presence(MODEL) == await memory.presence(MODEL)
        gone = [batch(1, BlockRemoved(block_hashes=[5, 6]), worker="w0")]
        await index.apply(gone)
        await memory.apply(gone)
        keys = [struct.pack("<Q", k) for k in block_keys_for_tokens(TOKENS, BS, MODEL)]
        assert await redis_client.hmget(prefix + "bx", keys[4:]) == [None, None]
        assert [len(v) for v in await redis_client.hmget(bucket, keys)] == [0] * 4 + [16] * 2
        for query in (TOKENS, TOKENS[: 5 * BS]):
            assert await scored(index, MODEL, query) == await scored(memory, MODEL, query)
        assert await index.presence(MODEL) == await memory.presence(MODEL)
        await index.close()


class TestSlotIdsNeverReused:
    """A removed rank's id is never given out again, so its entries can name no one else."""

    async def test_a_new_rank_takes_a_new_id(self, redis_client: aioredis.Redis) -> None:
        """a (id 0) and b (id 1); a goes, c comes: c takes id 2, not 0."""
        index = RedisIndex(redis_client)
        await index.apply([batch(0, stored(1, 3), worker="a"), batch(0, stored(1, 2), worker="b")])
        await index.remove_worker(MODEL, "a")
        await index.apply([batch(0, stored(1, 1), worker="c")])
        assert await slot_ids(redis_client, MODEL) == {"b\n0": 1, "c\n0": 2}
        await index.close()

    async def test_an_uncollected_entry_of_a_removed_id_is_no_ones(
            self, redis_client: aioredis.Redis) -> None:
        """An entry of id 0 left behind (as by a crash mid-collection, in a layout that
        collects later) after rank a (id 0) was removed: Score ignores it, even once c
        exists; c answers for its own blocks only."""
        index = RedisIndex(redis_client)
        await index.apply([batch(0, stored(1, 6), worker="a"), batch(0, stored(1, 2), worker="b")])
        keys = block_keys_for_tokens(TOKENS, BS, MODEL)
        prefix = model_prefix(MODEL)
        level, split = await redis_client.hmget(prefix + "bk", "level", "split")
        assert (int(level), int(split)) == (0, 0)  # one bucket: b:0
        await index.remove_worker(MODEL, "a")
        await index.apply([batch(0, stored(1, 1), worker="c")])
        # Forge a's leftovers: id 0 holding every block of the prompt, beside b and c.
        for i, key in enumerate(keys):
            field = struct.pack("<Q", key)
            value = await redis_client.hget(prefix + "b:0", field) or b""
            forged = sorted([*struct.unpack(f"<{len(value) // 4}I", value), 0 * 16 + 1])
            await redis_client.hset(prefix + "b:0", field, struct.pack(f"<{len(forged)}I",
                                                                         *forged))
            assert i < 6
        result = await index.score(ScoreQuery(model=MODEL, block_keys=keys))
        assert sorted((s.worker_id, s.matched_blocks) for s in result.scores) == [
            ("b", 2), ("c", 1)]
        await index.close()


class TestOlderLayoutRefused:
    """A Redis holding a model in the bitmask layout is refused with a clear error."""

    async def seed_old_model(self, client: aioredis.Redis) -> None:
        prefix = model_prefix(MODEL)
        keys = block_keys_for_tokens(TOKENS, BS, MODEL)
        pipe = client.pipeline(transaction=False)
        pipe.sadd(MODELS_KEY, MODEL)
        pipe.hset(prefix + "slots", "w\n0", 0)
        pipe.set(prefix + "slotver", 3)
        pipe.set(prefix + "nextslot", 1)
        pipe.hset(prefix + "w:0:meta", mapping={"pos": b"\x00" * 15 + b"\x01"})
        for key in keys:
            pipe.hset(prefix + "blk", struct.pack("<Q", key), b"\x01")  # slot 0 on GPU
        await pipe.execute()

    async def test_ping_score_and_apply_refuse(self, redis_client: aioredis.Redis) -> None:
        """ping() names the layout and the fix; Score and apply answer BackendError and
        write nothing; the old keys are left as they were."""
        await self.seed_old_model(redis_client)
        before = sorted(await redis_client.keys("*"))
        index = RedisIndex(redis_client)
        with pytest.raises(BackendError, match=r"older index layout.*migrate-layout"):
            await index.ping()
        query = ScoreQuery(model=MODEL, block_keys=block_keys_for_tokens(TOKENS, BS, MODEL))
        with pytest.raises(BackendError, match="older presence layout"):
            await index.score(query)
        with pytest.raises(BackendError, match="older index layout"):
            await index.apply([batch(1, stored(1, 6), worker="w")])
        with pytest.raises(BackendError, match="older index layout"):
            await index.apply([batch(0, stored(1, 6), worker="new")])
        assert sorted(await redis_client.keys("*")) == before
        await index.close()

    async def test_a_rankless_leftover_is_collected_not_refused(
            self, redis_client: aioredis.Redis) -> None:
        """An old model without ranks does not fail ping(); drop_empty_models deletes it."""
        await self.seed_old_model(redis_client)
        await redis_client.delete(model_prefix(MODEL) + "slots")
        index = RedisIndex(redis_client)
        await index.ping()
        assert await index.drop_empty_models() == [MODEL]
        assert await redis_client.keys("*") == []
        await index.apply([batch(0, stored(1, 6))])
        assert len((await index.score(ScoreQuery(
            model=MODEL, block_keys=block_keys_for_tokens(TOKENS, BS, MODEL)))).scores) == 1
        await index.close()


async def test_removed_blocks_leave_no_bucket_entry(redis_client: aioredis.Redis) -> None:
    """Stores then evictions of every block: the buckets empty (no field with no
    holder), and the block count in `bk` is back to 0."""
    index = RedisIndex(redis_client)
    await index.apply([batch(0, stored(1, 6), worker=f"w{w}") for w in range(3)])
    await index.apply([batch(1, BlockRemoved(block_hashes=[1, 2, 3, 4, 5, 6]), worker=f"w{w}")
                       for w in range(3)])
    prefix = model_prefix(MODEL)
    assert await redis_client.hget(prefix + "bk", "count") == b"0"
    assert [k for k in await redis_client.keys("*") if b":b:" in k] == []
    assert await index.presence(MODEL) == {}
    assert {w.worker_id for w in await index.workers(MODEL)} == {"w0", "w1", "w2"}
    await index.close()


class TestBucketLoadSetting:
    """`--redis-bucket-load` reaches the index, within the range a bucket stays compact."""

    def test_range_and_default(self) -> None:
        """Default 40; 0 and 60 taken; -1 and 61 refused naming the flag."""
        assert parse_service_config([]).redis_bucket_load == DEFAULT_BUCKET_LOAD == 0
        for value in ("0", "60"):
            assert parse_service_config(["--redis-bucket-load", value]).redis_bucket_load == int(
                value)
        for value in ("-1", "61"):
            with pytest.raises(ConfigError, match="--redis-bucket-load"):
                parse_service_config(["--redis-bucket-load", value])

    async def test_the_factory_passes_it(self, redis_server: RedisServer,
                                         redis_client: aioredis.Redis) -> None:
        """build_index gives the RedisIndex the load; a model it creates records it."""
        index = build_index(IndexConfig(), redis_url=redis_server.url, redis_bucket_load=0)
        assert isinstance(index, RedisIndex) and index.bucket_load == 0
        await index.apply([batch(0, stored(1, 6))])
        assert await redis_client.hget(model_prefix(MODEL) + "bk", "load") == b"0"
        await index.close()


async def test_readers_during_removals_never_credit_a_rank_with_anothers_blocks(
        redis_client: aioredis.Redis) -> None:
    """A reader scores without pause while a writer removes a (6 blocks) and adds c
    (1 block) and the reverse, 25 times over: every answer names b with its 3 blocks,
    a with 6 or nothing, c with 1 or nothing; c, created right after a's removal, is
    never credited a's blocks, whatever slot map the reader holds."""
    writer, reader = RedisIndex(redis_client), RedisIndex(redis_client)
    await writer.apply([batch(0, stored(1, 3), worker="b"), batch(0, stored(1, 6), worker="a")])
    query = ScoreQuery(model=MODEL, block_keys=block_keys_for_tokens(TOKENS, BS, MODEL))
    seen: list[dict[str, int]] = []
    done = False

    async def read() -> None:
        while not done:
            result = await reader.score(query)
            seen.append({s.worker_id: s.matched_blocks for s in result.scores})

    task = asyncio.create_task(read())
    for epoch in range(1, 26):
        await writer.remove_worker(MODEL, "a")
        await writer.apply([batch(0, stored(1, 1), epoch=epoch, worker="c")])
        await writer.remove_worker(MODEL, "c")
        await writer.apply([batch(0, stored(1, 6), epoch=epoch, worker="a")])
        await asyncio.sleep(0)
    done = True
    await task
    assert len(seen) >= 25
    for answer in seen:
        assert answer.get("b") == 3, answer
        assert answer.get("a", 6) == 6 and answer.get("c", 1) == 1, answer
    ids = await slot_ids(redis_client, MODEL)
    assert ids["a\n0"] >= 50  # every re-creation took a new id
    await writer.close()
    await reader.close()


async def _stored_state(client: aioredis.Redis) -> dict[bytes, object]:
    """Every key's content, bar the random slot map version and the ledger logs (a
    call's log segment folds what its batches changed)."""
    state: dict[bytes, object] = {}
    for key in await client.keys("*"):
        kind = await client.type(key)
        if key.endswith((b":slotver", b":log")):
            continue
        if kind == b"hash":
            state[key] = await client.hgetall(key)
        elif kind == b"set":
            state[key] = await client.smembers(key)
        else:
            state[key] = await client.get(key)
    return state


@pytest.mark.parametrize("bucket_load", [0, COMPACT_BUCKET_LOAD])
async def test_one_call_stores_what_one_call_per_batch_does(
        redis_client: aioredis.Redis, bucket_load: int) -> None:
    """apply.lua writes presence back once per call (and before a bucket split): blocks
    going to `bx` and back, stored then evicted, split over buckets within one call end
    exactly as when each batch is its own call, and as the in-memory index says."""
    shared = [batch(0, stored(1, 3), worker=f"w{w}") for w in range(5)]
    shared += [batch(1, BlockRemoved(block_hashes=[3]), worker=f"w{w}") for w in range(4)]
    shared += [batch(0, stored(1, 6), worker="w9"),
               batch(1, BlockRemoved(block_hashes=[4, 5, 6]), worker="w9")]
    batches = shared + make_workload(8, 3_000, n_queries=1).batches(MODEL)
    states = []
    for calls in ([batches], [[one] for one in batches]):
        await redis_client.flushall()
        index = RedisIndex(redis_client, bucket_load=bucket_load)
        for call in calls:
            await index.apply(call)
        memory = MemoryIndex(IndexConfig())
        await memory.apply(batches)
        assert await index.presence(MODEL) == await memory.presence(MODEL)
        states.append(await _stored_state(redis_client))
        await index.close()
    one_call, per_batch = states
    assert one_call == per_batch
    prefix = model_prefix(MODEL).encode()
    if bucket_load:
        assert len(one_call[prefix + b"bx"]) == 2  # type: ignore[arg-type]  # blocks 1, 2
        assert int(one_call[prefix + b"bk"][b"level"]) >= 5  # type: ignore[index]
    else:  # load 0: every list in the one bucket
        assert prefix + b"bx" not in one_call
