"""Mock engines (kvsim.mock_engines): the pool, the real ZMQ wire, replay, fleets and traces."""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

from kvcore.bus import AllBlocksCleared, BlockRemoved, BlockStored, Event
from kvsim.mock_engines import (
    BlockPool,
    FleetStats,
    MockEngine,
    MockFleet,
    PoolCleared,
    PoolRemoved,
    PoolStored,
    TraceRecord,
    load_trace,
    main,
    offset_endpoint,
    run_fleet,
    trace_tokens,
)
from publisher.engines import (
    EngineBatch,
    decode_engine_payload,
    encode_replay_request,
    parse_live_frames,
    parse_replay_frames,
)

ANY_PORT = "tcp://127.0.0.1:*"
# shared/ sits beside the checkout (CI and sessions alike)
TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
RECV_TIMEOUT = 5.0
PROBE_TOPIC = b"__probe__"
PROBE_INTERVAL = 0.02


# --- helpers --------------------------------------------------------------------------


def prompt(*blocks: int, block_size: int = 4) -> list[int]:
    """A prompt made of distinct blocks: block b is `block_size` copies of token b."""
    return [b for b in blocks for _ in range(block_size)]


def shared_prefix_prompts(n: int, seed: int = 7) -> list[list[int]]:
    """Prompts over a few shared prefixes, so caching, reuse and eviction all happen."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(1000) for _ in range(rng.randrange(8, 40))] for _ in range(5)]
    return [
        rng.choice(prefixes) + [rng.randrange(1000) for _ in range(rng.randrange(0, 30))]
        for _ in range(n)
    ]


class Tiers:
    """What a consumer learns from the bus events: block hashes per tier."""

    def __init__(self) -> None:
        self.tiers: dict[str, set[int]] = {"gpu": set(), "cpu": set()}

    def apply(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, BlockStored):
                self.tiers.setdefault(event.medium, set()).update(event.block_hashes)
            elif isinstance(event, BlockRemoved):
                self.tiers.setdefault(event.medium, set()).difference_update(event.block_hashes)
            else:
                for blocks in self.tiers.values():
                    blocks.clear()


class Subscriber:
    """A real SUB socket on an engine's PUB endpoint, plus a DEALER for replay."""

    def __init__(self, ctx: zmq.asyncio.Context, engine: MockEngine) -> None:
        self.engine = engine
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(engine.endpoint)
        self.dealer = ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        if engine.replay_endpoint is not None:
            self.dealer.connect(engine.replay_endpoint)

    async def settle(self) -> None:
        """Wait until the subscription reached the PUB socket (it drops messages before)."""
        for _ in range(int(RECV_TIMEOUT / PROBE_INTERVAL)):
            self.engine.publish_raw([PROBE_TOPIC])
            if await self.sub.poll(PROBE_INTERVAL * 1000):
                return
        raise TimeoutError("subscription never arrived")

    async def live(self) -> list[bytes]:
        """The next live message (probes skipped)."""
        while True:
            frames: list[bytes] = await asyncio.wait_for(self.sub.recv_multipart(), RECV_TIMEOUT)
            if frames != [PROBE_TOPIC]:
                return frames

    async def live_batch(self) -> tuple[int, EngineBatch]:
        seq, payload = parse_live_frames(await self.live())
        return seq, decode_engine_payload(payload, flavor=flavor_of(self.engine))

    async def replay_raw(self, start_seq: int) -> list[list[bytes]]:
        """Every answer frame list up to and including the end marker."""
        await self.dealer.send_multipart(encode_replay_request(start_seq))
        answers: list[list[bytes]] = []
        while True:
            frames = await asyncio.wait_for(self.dealer.recv_multipart(), RECV_TIMEOUT)
            answers.append(frames)
            if parse_replay_frames(frames) is None:
                return answers

    async def replay(self, start_seq: int) -> list[tuple[int, bytes]]:
        answers = [parse_replay_frames(f) for f in await self.replay_raw(start_seq)]
        return [a for a in answers if a is not None]

    def close(self) -> None:
        self.sub.close()
        self.dealer.close()


def flavor_of(engine: MockEngine) -> Any:
    return "sglang" if engine.wire == "sglang" else "vllm"


@pytest.fixture
def zctx() -> Iterator[zmq.asyncio.Context]:
    ctx = zmq.asyncio.Context()
    yield ctx
    ctx.term()


@pytest.fixture
async def engine() -> AsyncIterator[MockEngine]:
    async with MockEngine(
        capacity_blocks=8,
        block_size=4,
        endpoint=ANY_PORT,
        replay_endpoint=ANY_PORT,
        topic="kv-events",
    ) as started:
        yield started


@pytest.fixture
async def subscriber(zctx: zmq.asyncio.Context, engine: MockEngine) -> AsyncIterator[Subscriber]:
    sub = Subscriber(zctx, engine)
    await sub.settle()
    yield sub
    sub.close()


# --- the pool (no sockets) ------------------------------------------------------------


class TestBlockPool:
    def test_store_then_hit(self) -> None:
        """A new prompt stores its full blocks in one chained event; a repeat is a full hit."""
        pool = BlockPool(capacity_blocks=8, block_size=4)
        tokens = [*prompt(1, 2, 3), 9, 9]  # the partial tail block is never cached
        hit, events = pool.serve(tokens)
        h = pool.block_hashes(tokens)
        assert hit == 0
        assert events == [PoolStored(h, None, prompt(1, 2, 3), 4, "gpu")]
        assert pool.serve(tokens) == (12, [])

    def test_extension_stores_with_parent(self) -> None:
        """Extending a cached prompt stores only the new blocks, parented on the last cached one."""
        pool = BlockPool(capacity_blocks=8, block_size=4)
        pool.serve(prompt(1, 2))
        hit, events = pool.serve(prompt(1, 2, 3, 4))
        h = pool.block_hashes(prompt(1, 2, 3, 4))
        assert hit == 8
        assert events == [PoolStored(h[2:], h[1], prompt(3, 4), 4, "gpu")]

    def test_hashes_are_chained(self) -> None:
        """The same block after different prefixes has different hashes (chained like vLLM)."""
        pool = BlockPool(capacity_blocks=8, block_size=4)
        assert pool.block_hashes(prompt(1, 3))[1] != pool.block_hashes(prompt(2, 3))[1]
        assert pool.block_hashes(prompt(1, 3)) == pool.block_hashes(prompt(1, 3))

    def test_lru_eviction_tail_first(self) -> None:
        """When full, the least recently used blocks go first, a sequence's tail before its head."""
        pool = BlockPool(capacity_blocks=4, block_size=4)
        a = pool.block_hashes(prompt(1, 2, 3, 4))
        pool.serve(prompt(1, 2, 3, 4))
        _, events = pool.serve(prompt(5, 6))
        b = pool.block_hashes(prompt(5, 6))
        assert events == [
            PoolRemoved([a[3], a[2]], "gpu"),
            PoolStored(b, None, prompt(5, 6), 4, "gpu"),
        ]
        assert set(pool.gpu) == {a[0], a[1], *b}

    def test_reuse_refreshes_lru(self) -> None:
        """A reused block is touched: the untouched older prompt is evicted instead."""
        pool = BlockPool(capacity_blocks=4, block_size=4)
        pool.serve(prompt(1, 2))
        pool.serve(prompt(3, 4))
        pool.serve(prompt(1, 2))  # hit: A becomes most recent
        _, events = pool.serve(prompt(5, 6))
        assert events[0] == PoolRemoved(pool_hashes(prompt(3, 4))[::-1], "gpu")

    def test_request_blocks_never_evicted(self) -> None:
        """Blocks of the request being served stay even when they are the oldest."""
        pool = BlockPool(capacity_blocks=4, block_size=4)
        pool.serve(prompt(1, 2))
        pool.serve(prompt(3, 4))
        _, events = pool.serve(prompt(1, 2, 7, 8))  # A is LRU but in use: B must go
        assert events[0] == PoolRemoved(pool_hashes(prompt(3, 4))[::-1], "gpu")
        assert set(pool.gpu) == set(pool_hashes(prompt(1, 2, 7, 8)))

    def test_prompt_longer_than_capacity(self) -> None:
        """Only the first capacity_blocks blocks of an oversized prompt are cached."""
        pool = BlockPool(capacity_blocks=2, block_size=4)
        hit, events = pool.serve(prompt(1, 2, 3))
        assert hit == 0
        assert events == [PoolStored(pool_hashes(prompt(1, 2)), None, prompt(1, 2), 4, "gpu")]
        assert pool.serve(prompt(1, 2, 3))[0] == 8

    def test_cpu_offload_and_reload(self) -> None:
        """Evicted GPU blocks go to CPU token-less; a CPU hit counts and reloads to GPU."""
        pool = BlockPool(capacity_blocks=2, block_size=4, cpu_capacity_blocks=4)
        a = pool.block_hashes(prompt(1, 2))
        b = pool.block_hashes(prompt(3, 4))
        pool.serve(prompt(1, 2))
        _, events = pool.serve(prompt(3, 4))
        assert events == [
            PoolRemoved([a[1], a[0]], "gpu"),
            PoolStored([a[1], a[0]], None, [], 0, "cpu"),
            PoolStored(b, None, prompt(3, 4), 4, "gpu"),
        ]
        hit, events = pool.serve(prompt(1, 2))
        assert hit == 8
        assert events == [
            PoolRemoved([b[1], b[0]], "gpu"),
            PoolStored([b[1], b[0]], None, [], 0, "cpu"),
            PoolStored(a, None, prompt(1, 2), 4, "gpu"),
        ]
        assert set(pool.cpu) == {*a, *b}

    def test_cpu_eviction(self) -> None:
        """A full CPU tier evicts its LRU block with a CPU removal."""
        pool = BlockPool(capacity_blocks=1, block_size=4, cpu_capacity_blocks=1)
        a, b = pool_hashes(prompt(1)), pool_hashes(prompt(2))
        pool.serve(prompt(1))
        pool.serve(prompt(2))  # a -> cpu
        _, events = pool.serve(prompt(3))  # b -> cpu, a leaves cpu
        assert events[:3] == [
            PoolRemoved(b, "gpu"),
            PoolRemoved(a, "cpu"),
            PoolStored(b, None, [], 0, "cpu"),
        ]

    def test_clear(self) -> None:
        """clear() empties both tiers with one AllBlocksCleared."""
        pool = BlockPool(capacity_blocks=2, block_size=4, cpu_capacity_blocks=2)
        pool.serve(prompt(1, 2))
        pool.serve(prompt(3, 4))
        assert pool.clear() == [PoolCleared()]
        assert not pool.gpu and not pool.cpu


def pool_hashes(tokens: list[int]) -> list[int]:
    """Hashes of `tokens` under a default pool (seed 0, block size 4)."""
    return BlockPool(capacity_blocks=64, block_size=4).block_hashes(tokens)


# --- the live wire --------------------------------------------------------------------


class TestLiveWire:
    async def test_batches_in_order_with_frames(
        self, engine: MockEngine, subscriber: Subscriber
    ) -> None:
        """A SUB socket gets [topic, seq, payload] per serve, seq 0, 1, 2, ... in order."""
        for i in range(4):  # 8 blocks: exactly the capacity, no evictions
            engine.serve(prompt(10 * i, 10 * i + 1))
        for i in range(4):
            topic, seq_frame, payload = await subscriber.live()
            assert topic == b"kv-events"
            assert seq_frame == i.to_bytes(8, "big")
            tokens = prompt(10 * i, 10 * i + 1)
            decoded = decode_engine_payload(payload)
            assert decoded == EngineBatch(
                ts=decoded.ts,
                events=[
                    BlockStored(
                        engine.pool.block_hashes(tokens), None, struct.pack("<8I", *tokens), 4
                    )
                ],
                dp_rank=0,
            )

    async def test_full_hit_sends_nothing(self, engine: MockEngine, subscriber: Subscriber) -> None:
        """A request whose blocks are all cached publishes no batch (like vLLM)."""
        engine.serve(prompt(1, 2))
        engine.serve(prompt(1, 2))
        engine.serve(prompt(3))
        assert [(await subscriber.live_batch())[0] for _ in range(2)] == [0, 1]
        assert engine.seq == 2

    @pytest.mark.parametrize(
        ("wire", "hash_form"),
        [("map", "u64"), ("positional", "u64"), ("sglang", "u64"), ("map", "bytes")],
    )
    async def test_decoded_events_reproduce_the_pool(
        self, zctx: zmq.asyncio.Context, wire: Any, hash_form: Any
    ) -> None:
        """Applying every decoded batch to a set per tier ends equal to the engine's pool."""
        async with MockEngine(
            capacity_blocks=12,
            cpu_capacity_blocks=6,
            block_size=4,
            endpoint=ANY_PORT,
            wire=wire,
            hash_form=hash_form,
            max_events_per_batch=2,
        ) as eng:
            sub = Subscriber(zctx, eng)
            await sub.settle()
            tiers = Tiers()
            for tokens in shared_prefix_prompts(150):
                eng.serve(tokens)
            for expected_seq in range(eng.seq):
                seq, batch = await sub.live_batch()
                assert seq == expected_seq
                assert batch.skipped == []
                tiers.apply(batch.events)
            assert tiers.tiers == eng.cached()
            assert eng.stats.removed_blocks > 0  # eviction happened
            assert len(eng.cached()["gpu"]) == 12
            sub.close()

    async def test_clear_sends_all_blocks_cleared(
        self, engine: MockEngine, subscriber: Subscriber
    ) -> None:
        """clear() publishes a batch with AllBlocksCleared and empties the pool."""
        engine.serve(prompt(1, 2))
        engine.clear()
        await subscriber.live_batch()
        assert (await subscriber.live_batch())[1].events == [AllBlocksCleared()]
        assert engine.cached() == {"gpu": set(), "cpu": set()}


# --- replay, restarts and gaps --------------------------------------------------------


class TestReplay:
    @pytest.mark.parametrize(("wire", "n_frames"), [("map", 4), ("positional", 3), ("sglang", 3)])
    async def test_replay_from_seq_then_end_marker(
        self, zctx: zmq.asyncio.Context, wire: Any, n_frames: int
    ) -> None:
        """Replay answers every buffered batch from start_seq, then the end marker, per form."""
        async with MockEngine(
            capacity_blocks=8,
            block_size=4,
            endpoint=ANY_PORT,
            replay_endpoint=ANY_PORT,
            wire=wire,
            topic="kv",
        ) as eng:
            sub = Subscriber(zctx, eng)
            await sub.settle()
            for i in range(5):
                eng.serve(prompt(i))
            live = [parse_live_frames(await sub.live()) for _ in range(5)]
            answers = await sub.replay_raw(2)
            assert [len(a) for a in answers] == [n_frames] * 4
            assert all(a[0] == b"" for a in answers)
            if n_frames == 4:
                assert all(a[1] == b"kv" for a in answers)
            assert answers[-1][-2:] == [b"\xff" * 8, b""]
            assert [parse_replay_frames(a) for a in answers[:-1]] == live[2:]
            assert await sub.replay(0) == live
            assert await sub.replay(99) == []
            sub.close()

    async def test_replay_form_override(self, zctx: zmq.asyncio.Context) -> None:
        """replay_form="seq" gives map-wire engines the pre-0.26 two-frame answers."""
        async with MockEngine(
            capacity_blocks=8, endpoint=ANY_PORT, replay_endpoint=ANY_PORT, replay_form="seq"
        ) as eng:
            sub = Subscriber(zctx, eng)
            eng.serve(list(range(16)))
            answers = await sub.replay_raw(0)
            assert [len(a) for a in answers] == [3, 3]
            sub.close()

    async def test_restart_resets_seq_seed_and_buffer(
        self, engine: MockEngine, subscriber: Subscriber
    ) -> None:
        """restart(): seq back to 0, new hashes for the same prompt, empty cache and buffer."""
        before = engine.pool.block_hashes(prompt(1, 2))
        engine.serve(prompt(1, 2))
        engine.serve(prompt(3, 4))
        engine.restart()
        assert engine.cached() == {"gpu": set(), "cpu": set()}
        assert engine.serve(prompt(1, 2)) == 0  # cache is gone
        seqs = [(await subscriber.live_batch())[0] for _ in range(3)]
        assert seqs == [0, 1, 0]
        assert engine.pool.block_hashes(prompt(1, 2)) != before
        replayed = await subscriber.replay(0)
        assert [seq for seq, _ in replayed] == [0]

    async def test_drop_next_gap_filled_by_replay(
        self, engine: MockEngine, subscriber: Subscriber
    ) -> None:
        """Dropped batches leave a live gap; replay from the gap returns them byte for byte."""
        engine.serve(prompt(1))
        engine.drop_next(2)
        engine.serve(prompt(2))
        engine.serve(prompt(3))
        engine.serve(prompt(4))
        received = [parse_live_frames(await subscriber.live()) for _ in range(2)]
        assert [seq for seq, _ in received] == [0, 3]
        replayed = await subscriber.replay(1)
        assert [seq for seq, _ in replayed] == [1, 2, 3]
        assert replayed[2] == received[1]
        tiers = Tiers()
        for _, payload in [received[0], *replayed]:
            tiers.apply(decode_engine_payload(payload).events)
        assert tiers.tiers == engine.cached()
        assert engine.stats.dropped_batches == 2

    async def test_gap_older_than_buffer(self, zctx: zmq.asyncio.Context) -> None:
        """With buffer_steps=2 replay starts after the gap: the consumer sees it cannot fill it."""
        async with MockEngine(
            capacity_blocks=8,
            block_size=4,
            endpoint=ANY_PORT,
            replay_endpoint=ANY_PORT,
            buffer_steps=2,
        ) as eng:
            sub = Subscriber(zctx, eng)
            eng.drop_next(3)
            for i in range(4):
                eng.serve(prompt(i))
            assert [seq for seq, _ in await sub.replay(0)] == [2, 3]
            sub.close()


# --- fleets, traces, the command line --------------------------------------------------


class TestFleet:
    def test_offset_endpoint(self) -> None:
        """DP rank r adds r to the TCP port; non-TCP endpoints cannot be offset."""
        assert offset_endpoint("tcp://*:5557", 2) == "tcp://*:5559"
        assert offset_endpoint("tcp://10.0.0.5:5557", 1) == "tcp://10.0.0.5:5558"
        assert offset_endpoint("ipc:///tmp/kv", 0) == "ipc:///tmp/kv"
        with pytest.raises(ValueError, match="only tcp"):
            offset_endpoint("ipc:///tmp/kv", 1)

    def test_port_layout(self) -> None:
        """Worker w, rank r publishes on base + 2*dp*w + r and replays dp ports higher."""
        fleet = MockFleet(n_workers=2, capacity_blocks=4, dp_size=2, base_port=6000)
        try:
            ports = [
                (e.endpoint.rsplit(":", 1)[1], (e.replay_endpoint or "").rsplit(":", 1)[1])
                for e in fleet.all_engines()
            ]
            assert ports == [("6000", "6002"), ("6001", "6003"), ("6004", "6006"), ("6005", "6007")]
            assert [e.dp_rank for e in fleet.all_engines()] == [0, 1, 0, 1]
        finally:
            fleet.close()

    async def test_dp_ranks_take_turns(self, zctx: zmq.asyncio.Context) -> None:
        """Requests to one worker alternate over its DP ranks, each with its own seq and rank."""
        async with MockFleet(n_workers=1, capacity_blocks=8, dp_size=2, base_port=0) as fleet:
            ranks = fleet.engines[0]
            subs = [Subscriber(zctx, e) for e in ranks]
            for sub in subs:
                await sub.settle()
            for i in range(4):
                fleet.serve(0, list(range(16 * i, 16 * i + 16)))
            for sub, engine in zip(subs, ranks, strict=True):
                for expected in (0, 1):
                    seq, batch = await sub.live_batch()
                    assert (seq, batch.dp_rank) == (expected, engine.dp_rank)
                sub.close()
            assert fleet.stats().requests == 4

    async def test_run_fleet_round_robin(self) -> None:
        """run_fleet serves prompts round-robin over the workers and reports totals and ticks."""
        ticks: list[FleetStats] = []
        started: list[MockFleet] = []
        stats = await run_fleet(
            3,
            64,
            16,
            prompts=shared_prefix_prompts(30),
            base_port=0,
            on_start=started.append,
            on_tick=ticks.append,
        )
        assert stats.total.requests == 30
        assert [e.stats.requests for e in started[0].all_engines()] == [10, 10, 10]
        assert stats.total.batches > 0 and ticks and ticks[-1] is stats

    async def test_run_fleet_trace_with_rate_and_limit(self) -> None:
        """A trace replays at the given rate up to max_requests."""
        stats = await run_fleet(
            2,
            1024,
            16,
            trace=TRACES / "mooncake_conversation_trace.jsonl",
            rate=2000.0,
            max_requests=40,
            base_port=0,
            replay=False,
        )
        assert stats.total.requests == 40
        assert stats.total.hit_tokens > 0  # conversation turns share prefixes

    def test_main_prints_endpoints_and_counts(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`kv-sim engines` prints its endpoints, per-second lines and totals."""
        code = main(
            [
                "--workers",
                "2",
                "--dp-size",
                "2",
                "--base-port",
                "0",
                "--capacity-blocks",
                "64",
                "--rate",
                "200",
                "--duration",
                "1.2",
            ]
        )
        out = capsys.readouterr().out
        assert code == 0
        assert out.count("pub tcp://127.0.0.1:") == 4
        assert "worker 1 rank 1:" in out
        assert re.search(r"^t=1\.\ds requests=\d+ hit_rate=", out, re.MULTILINE)
        assert "done: requests=" in out


class TestTraceTokens:
    def test_spec_expansion(self) -> None:
        """Hash id h expands to SHAKE-128(scheme ‖ u64_le(h)) read as 512 little-endian u16."""
        record = TraceRecord(timestamp=0, input_length=1024, hash_ids=[7, 0])
        tokens = trace_tokens(record)
        for i, hash_id in enumerate((7, 0)):
            data = b"kv-indexer/trace-block/v1" + struct.pack("<Q", hash_id)
            digest = hashlib.shake_128(data).digest(1024)
            assert tokens[512 * i : 512 * (i + 1)] == list(struct.unpack("<512H", digest))

    def test_shared_ids_share_prefixes_and_partial_tail(self) -> None:
        """Records sharing leading ids share those tokens; input_length cuts the last block."""
        a = trace_tokens(TraceRecord(timestamp=0, input_length=1100, hash_ids=[0, 1, 2]))
        b = trace_tokens(TraceRecord(timestamp=0, input_length=1536, hash_ids=[0, 1, 3]))
        assert len(a) == 1100 and len(b) == 1536
        assert a[:1024] == b[:1024] and a[1024:1100] != b[1024:1100]
        assert all(0 <= t < 65_536 for t in a)

    def test_real_trace(self) -> None:
        """The Mooncake trace loads; its first two records share exactly the first 512 tokens."""
        records = load_trace(TRACES / "mooncake_conversation_trace.jsonl")
        first, second = next(records), next(records)
        a, b = trace_tokens(first), trace_tokens(second)
        assert (len(a), len(b)) == (first.input_length, second.input_length) == (6758, 7322)
        assert a[:512] == b[:512] and a[512:1024] != b[512:1024]


def test_engine_stats_add_sums_every_field() -> None:
    """`EngineStats.add` names its fields one by one: a new field must be summed too."""
    import dataclasses

    from kvsim.mock_engines import EngineStats

    names = [f.name for f in dataclasses.fields(EngineStats)]
    total = EngineStats(**{name: i + 1 for i, name in enumerate(names)})
    total.add(EngineStats(**{name: 10 * (i + 1) for i, name in enumerate(names)}))
    assert [getattr(total, name) for name in names] == [11 * (i + 1) for i in range(len(names))]


def test_synthetic_prompts_are_deterministic_and_in_range() -> None:
    """Same seed, same prompts; ids are in 0..65535; prompts share their prefixes."""
    from itertools import islice

    from kvsim.mock_engines import synthetic_prompts

    first = list(islice(synthetic_prompts(seed=3, n_prefixes=2, prefix_tokens=64), 20))
    again = list(islice(synthetic_prompts(seed=3, n_prefixes=2, prefix_tokens=64), 20))
    assert first == again
    assert all(0 <= t < 65_536 for p in first for t in p)
    assert len({tuple(p[:64]) for p in first}) <= 2
    assert all(65 <= len(p) <= 64 + 1_024 for p in first)
    assert len({t for p in first for t in p}) > 1_000  # not a constant fill
