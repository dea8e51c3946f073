"""Hybrid-attention models: Score is what vLLM would reuse, group by group.

The reference is tests/support/vllm_hybrid.py, transcribed from vLLM 0.34's coordinator
and managers. Hand vectors pin the reference itself; property tests drive random per-group
store / evict histories at field sizes (chains of thousands of blocks per group, windows
of 8+ blocks, prompts of hundreds of blocks) through bus batches into both backends and
compare every worker's Score with the reference.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from indexer.index.hybrid import (
    FULL,
    MAMBA,
    WINDOW,
    GroupRule,
    group_rule,
    hybrid_hits,
    merged_spec,
)
from indexer.index.memory import MemoryIndex
from indexer.index.protocol import Index, IndexConfig, ScoreQuery, WorkerRef
from indexer.index.redis import RedisIndex
from kvcore.bus import BlockRemoved, BlockStored, Event, EventBatch, pack_tokens
from tests.support.servers import RedisServer
from tests.support.vllm_hybrid import Spec, find_longest_cache_hit

MODEL = "google/gemma-3-27b"
BS = 4
FULL_SPEC = Spec("full_attention")
CONFIG = IndexConfig(max_query_tokens=1 << 16)


def swa(blocks: int) -> Spec:
    """A sliding window of `blocks` blocks: cdiv(window - 1, BS) == blocks."""
    return Spec("sliding_window", blocks * BS)


# --- the reference, by hand ------------------------------------------------------------


class TestReferenceVectors:
    """vLLM's rule on hand-worked cases (the issue's, and one per manager)."""

    @pytest.mark.parametrize(("specs", "cached", "n", "hit"), [
        # window of 2 blocks: full holds 0..5, the window group 4..5 (the example)
        ([FULL_SPEC, swa(2)], [set(range(6)), {4, 5}], 6, 6),
        ([FULL_SPEC, swa(2)], [set(range(6)), {4, 5}], 4, 0),
        # a prompt shorter than the window: the run from block 0 is a hit
        ([FULL_SPEC, swa(8)], [set(range(5)), set(range(5))], 5, 5),
        # Mamba: the last cached block at or before the limit
        ([FULL_SPEC, Spec("mamba")], [set(range(10)), {3, 7}], 10, 8),
        ([FULL_SPEC, Spec("mamba")], [set(range(10)), {3, 7}], 7, 4),
        # two groups of one spec: a block counts only where both hold it
        ([FULL_SPEC, swa(2), swa(2)], [set(range(10)), set(range(10)) - {8},
                                       set(range(10)) - {5}], 10, 8),
        # three kinds: the window and Mamba lower each other to the fixed point
        ([FULL_SPEC, swa(4), Spec("mamba")],
         [set(range(20)), {0, 1, 2, 3, 12, 13, 14, 15}, {5, 14}], 20, 0),
        ([FULL_SPEC, swa(4), Spec("mamba")],
         [set(range(20)), {0, 1, 2, 3, 4, 5, 12, 13, 14, 15}, {5, 14}], 20, 6),
        # the full-attention prefix bounds everything
        ([FULL_SPEC, swa(2)], [{0, 1, 2}, set(range(10))], 10, 3),
    ])
    def test_vectors(self, specs: list[Spec], cached: list[set[int]], n: int, hit: int) -> None:
        assert find_longest_cache_hit(specs, cached, n, BS) == hit

    def test_group_rules(self) -> None:
        """Kinds map to managers; unknown kinds (and a window without a block size) take
        the full-attention rule, which never claims more than the engine reuses."""
        assert group_rule("sliding_window", 4096, 16) == GroupRule(WINDOW, 256)
        assert group_rule("sliding_window", 4097, 16) == GroupRule(WINDOW, 256)
        assert group_rule("sliding_window", 4098, 16) == GroupRule(WINDOW, 257)
        assert group_rule("sliding_window_mla", 32, 16) == GroupRule(WINDOW, 2)
        assert group_rule("mamba", 0, 16) == GroupRule(MAMBA)
        for kind in ("full_attention", "mla_attention", "chunked_local_attention", None, "x"):
            assert group_rule(kind, 0, 16) == GroupRule(FULL)
        assert group_rule("sliding_window", 4096, None) == GroupRule(FULL)
        assert group_rule("sliding_window", 0, 16) == GroupRule(FULL)


def _rule(spec: Spec) -> GroupRule:
    return group_rule(spec.kind, spec.sliding_window, BS)


@st.composite
def group_layouts(draw: st.DrawFn) -> tuple[list[Spec], list[list[set[int]]], int]:
    """Specs of 2-4 groups (full first or not), per slot per group cached positions."""
    extra = draw(st.lists(st.sampled_from(["sliding_window", "mamba", "full_attention"]),
                          min_size=1, max_size=3))
    specs = [FULL_SPEC if draw(st.booleans()) else swa(draw(st.integers(8, 24)))]
    specs += [swa(draw(st.integers(8, 24))) if kind == "sliding_window" else Spec(kind)
              for kind in extra]
    n = draw(st.integers(0, 600))
    rng = random.Random(draw(st.integers(0, 2**32)))
    slots = []
    for _ in range(draw(st.integers(1, 6))):
        groups = []
        for spec in specs:
            density = rng.choice((0.02, 0.5, 0.9, 0.99, 1.0))
            reach = rng.randint(0, n)
            cached = {i for i in range(reach) if rng.random() < density}
            if spec.kind == "sliding_window" and reach and rng.random() < 0.7:
                cached |= set(range(max(0, reach - 30), reach))  # a window at the end
            groups.append(cached)
        slots.append(groups)
    return specs, slots, n


class TestRuleAgainstReference:
    @settings(max_examples=150, deadline=None)
    @given(layout=group_layouts())
    def test_hybrid_hits_equal_vllm(self, layout: tuple[list[Spec], list[list[set[int]]], int]
                                    ) -> None:
        """Bit-parallel over slots, `hybrid_hits` gives every slot vLLM's hit."""
        specs, slots, n = layout
        present: list[dict[int, int]] = [{} for _ in specs]
        for slot, groups in enumerate(slots):
            for g, cached in enumerate(groups):
                for i in cached:
                    present[g][i] = present[g].get(i, 0) | 1 << (slot * 4)
        candidates = sum(1 << (slot * 4) for slot in range(len(slots)))
        hits = hybrid_hits([_rule(s) for s in specs], present, {n: candidates})
        got = {slot: length for length, bits in hits.items()
               for slot in range(len(slots)) if bits >> (slot * 4) & 1}
        want = {slot: find_longest_cache_hit(specs, groups, n, BS)
                for slot, groups in enumerate(slots)}
        assert got == want


# --- histories through the bus into both backends --------------------------------------


@dataclass
class History:
    specs: list[Spec]
    batches: list[EventBatch]
    chains: dict[str, list[int]]  # worker -> its chain's tokens
    cached: dict[str, list[set[int]]]  # worker -> per group, block positions held
    prompts: list[tuple[str, int]]  # (worker whose chain the prompt follows, blocks)


def _chain_tokens(rng: random.Random, shared: list[int], length: int) -> list[int]:
    own = [rng.randrange(1 << 31) for _ in range((length - len(shared) // BS) * BS)]
    return shared + own


def make_history(seed: int, n_workers: int = 3) -> History:
    """Workers store chains of 1,000-2,500 blocks (a shared prefix, then their own) in every
    group (full attention, a window, maybe a second window or Mamba, in either order),
    then each group evicts on its own: the window groups most of each chain (LRU runs,
    scattered blocks), Mamba all but scattered states, full attention a tail."""
    rng = random.Random(seed)
    specs = [FULL_SPEC, swa(rng.randint(8, 16))]
    if rng.random() < 0.4:
        specs.append(rng.choice([swa(rng.randint(8, 32)), Spec("mamba")]))
    if rng.random() < 0.3:  # vLLM numbers groups by layer order: full attention may not be 0
        specs.reverse()
    shared = [rng.randrange(1 << 31) for _ in range(rng.randint(100, 400) * BS)]
    batches: list[EventBatch] = []
    chains: dict[str, list[int]] = {}
    cached: dict[str, list[set[int]]] = {}
    for w in range(n_workers):
        worker = f"w{w}"
        length = rng.randint(1_000, 2_500)
        tokens = chains[worker] = _chain_tokens(rng, shared, length)
        hashes = [(w << 32) + i for i in range(length)]  # engine hashes: opaque, per worker
        events: list[Event] = []
        for g, spec in enumerate(specs):
            for start in range(0, length, 500):
                end = min(length, start + 500)
                events.append(BlockStored(
                    hashes[start:end], hashes[start - 1] if start else None,
                    pack_tokens(tokens[start * BS : end * BS]), BS, group=g,
                    group_kind=spec.kind, sliding_window=spec.sliding_window))
        held = [set(range(length)) for _ in specs]
        removals = _evictions(rng, specs, length)
        for g, gone in enumerate(removals):
            if gone:
                events.append(BlockRemoved([hashes[i] for i in sorted(gone)], group=g))
                held[g] -= gone
        cached[worker] = held
        half = len(events) // 2
        batches += [EventBatch(schema=2, model=MODEL, worker_id=worker, epoch=1, seq=s,
                               events=part)
                    for s, part in enumerate((events[:half], events[half:]))]
    prompts = [(rng.choice(list(chains)), rng.randint(1, 700)) for _ in range(12)]
    return History(specs, batches, chains, cached, prompts)


def _evictions(rng: random.Random, specs: Sequence[Spec], length: int) -> list[set[int]]:
    out: list[set[int]] = []
    for spec in specs:
        if spec.kind == "full_attention":
            cut = rng.choice((length, length, rng.randint(0, length)))
            out.append(set(range(cut, length)))
            continue
        keep: set[int] = set()
        for _ in range(rng.randint(0, 12)):  # windows left by finished requests
            end = rng.randint(1, length)
            keep |= set(range(max(0, end - rng.randint(1, 40)), end))
        keep |= {i for i in range(length) if rng.random() < 0.05}
        if spec.kind == "mamba":
            keep = {i for i in keep if rng.random() < 0.3}
        out.append(set(range(length)) - keep)
    return out


def expected_scores(history: History, prompt_worker: str, n: int) -> dict[str, int]:
    """Per worker, vLLM's hit for the first n blocks of prompt_worker's chain."""
    prompt = history.chains[prompt_worker][: n * BS]
    out: dict[str, int] = {}
    for worker, groups in history.cached.items():
        common = 0
        chain = history.chains[worker]
        while common < n and chain[common * BS : (common + 1) * BS] == \
                prompt[common * BS : (common + 1) * BS]:
            common += 1
        # Past the shared part the worker's blocks are other content: not this prompt's.
        limited = [{i for i in cached if i < common} for cached in groups]
        hit = find_longest_cache_hit(history.specs, limited, n, BS)
        if hit:
            out[worker] = hit
    return out


async def check_history(index: Index, history: History) -> None:
    await index.apply(history.batches)
    for worker, n in history.prompts:
        query = ScoreQuery(model=MODEL, token_ids=history.chains[worker][: n * BS],
                           block_size=BS)
        result = await index.score(query)
        got = {s.worker_id: s.matched_blocks for s in result.scores}
        assert got == expected_scores(history, worker, n), (worker, n)
        for score in result.scores:
            assert score.blocks_by_tier == {"gpu": score.matched_blocks}


class TestIndexAgainstReference:
    @settings(max_examples=30, deadline=None)
    @given(seed=st.integers(0, 2**32))
    def test_memory(self, seed: int) -> None:
        asyncio.run(check_history(MemoryIndex(CONFIG), make_history(seed)))

    @settings(max_examples=10, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(seed=st.integers(0, 2**32))
    def test_redis(self, redis_server: RedisServer, seed: int) -> None:
        async def run() -> None:
            client = aioredis.Redis.from_url(redis_server.url)
            await client.flushall()
            index = RedisIndex(client, config=CONFIG)
            try:
                await check_history(index, make_history(seed))
            finally:
                await index.close()

        asyncio.run(run())


# --- a Redis ledger reloaded ------------------------------------------------------------

TOKENS = list(range(300, 300 + 6 * BS))
HASHES = [0xA0 + i for i in range(6)]


def batch(seq: int, events: list[Event], worker: str = "w") -> EventBatch:
    return EventBatch(schema=2, model=MODEL, worker_id=worker, epoch=1, seq=seq, events=events)


def stores(*groups: tuple[int, str | None, int]) -> list[Event]:
    return [BlockStored(HASHES, None, pack_tokens(TOKENS), BS, group=g, group_kind=kind,
                        sliding_window=window) for g, kind, window in groups]


HYBRID = stores((0, None, 0), (1, "sliding_window", 2 * BS))


async def hits(index: Index, n: int) -> int:
    result = await index.score(ScoreQuery(model=MODEL, token_ids=TOKENS[: n * BS], block_size=BS))
    return max((s.matched_blocks for s in result.scores), default=0)


async def test_redis_ledger_reload_keeps_groups(redis_server: RedisServer) -> None:
    """A second Redis index (another process, or a restart) reloads each group's ledger
    from its log: a window-group removal after the reload applies to that group."""
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushall()
    first = RedisIndex(client, config=CONFIG)
    await first.apply([batch(0, HYBRID)])
    await first.close()
    second = RedisIndex(aioredis.Redis.from_url(redis_server.url), config=CONFIG)
    try:
        await second.apply([batch(1, [BlockRemoved(HASHES[:4], group=1)])])
        assert (await second.stats()).dropped == {}
        assert [await hits(second, n) for n in (6, 4)] == [6, 0]
        [state] = await second.export_ranks([(MODEL, WorkerRef("w", 0))])
        memory = MemoryIndex(CONFIG)
        await memory.import_ranks([state])
        await memory.apply([batch(2, stores((1, "sliding_window", 2 * BS)))])
        assert [await hits(memory, n) for n in (6, 4)] == [6, 4]
        assert await second.remove_worker(MODEL, "w") == 1
        assert await second._redis.keys("kvi:{*") == []
    finally:
        await second.close()


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_find_best_worker_costs_what_vllm_reuses(kind: str,
                                                       request: pytest.FixtureRequest) -> None:
    """Over gRPC, FindBestWorker's prefill cost counts the hybrid hit: the worker whose
    window group freed only blocks outside the prompt's last window (it reuses all six)
    beats the one whose window group lost the blocks the hit needs (it reuses three)."""
    from indexer._proto.kvindex.v1 import indexer_pb2 as pb
    from tests.support.grpc_scenario import make_index, serving

    index = await make_index(kind, request)
    window = stores((0, None, 0), (1, "sliding_window", 2 * BS))
    await index.apply([
        batch(0, [*window, BlockRemoved(HASHES[:4], group=1)], worker="kept-window"),
        batch(0, [*window, BlockRemoved(HASHES[3:], group=1)], worker="lost-window"),
    ])
    try:
        async with serving(index) as (stub, _port):
            response = await stub.FindBestWorker(pb.FindBestWorkerRequest(
                score=pb.ScoreRequest(model=MODEL, token_ids=TOKENS, block_size=BS),
                overlap_weight=1.0))
    finally:
        await index.close()
    assert (response.worker_id, response.matched_blocks) == ("kept-window", 6)
    assert {(c.worker_id, c.prefill_blocks) for c in response.candidates} == {
        ("kept-window", 0), ("lost-window", 3)}


# --- one worker cannot loosen a group's rule for the others -----------------------------


def naming_mamba(group: int) -> EventBatch:
    """Another worker's batch naming KV-cache group `group` Mamba (under which a group's
    last block alone is a hit), one block of its own."""
    return batch(0, [BlockStored([0xF0], None, pack_tokens([9] * BS), BS, group=group,
                                 group_kind="mamba")], worker="attacker")


async def victim_hit(index: Index) -> int:
    result = await index.score(ScoreQuery(model=MODEL, token_ids=TOKENS, block_size=BS))
    return {s.worker_id: s.matched_blocks for s in result.scores}.get("victim", 0)


@pytest.mark.parametrize(("known", "named", "kept"), [
    (None, (None, 0), (None, 0)),  # a bare group is listed
    ((None, 0), ("mamba", 0), ("mamba", 0)),  # a named spec replaces a bare one
    (("mamba", 0), (None, 0), ("mamba", 0)),
    (("sliding_window", 8), ("mamba", 0), ("sliding_window", 8)),  # never looser
    (("sliding_window", 8), ("sliding_window", 4), ("sliding_window", 8)),
    (("sliding_window", 8), ("sliding_window", 16), ("sliding_window", 16)),  # stricter
    (("mamba", 0), ("full_attention", 0), ("full_attention", 0)),
    (("sliding_window", 8), ("mystery_kind", 0), ("mystery_kind", 0)),  # as strict as full
    (("full_attention", 0), ("sliding_window", 8), ("full_attention", 0)),
    (("", 0), ("mamba", 0), ("mamba", 0)),  # "" is no kind, as the bus reads it
    (("sliding_window", 8), ("", 8), ("", 8)),  # a window without a kind: full
])
def test_merged_spec(known: tuple[str | None, int] | None, named: tuple[str | None, int],
                     kept: tuple[str | None, int]) -> None:
    assert merged_spec(1, known, named) == kept


@pytest.mark.parametrize(("known", "named", "kept"), [
    ((None, 0), ("mamba", 0), (None, 0)),  # a bare group 0 is full attention
    (("mamba", 0), (None, 0), (None, 0)),
    (("sliding_window", 8), (None, 0), (None, 0)),
    (None, ("sliding_window", 8), ("sliding_window", 8)),
])
def test_merged_spec_of_group_0(known: tuple[str | None, int] | None,
                                named: tuple[str | None, int],
                                kept: tuple[str | None, int]) -> None:
    assert merged_spec(0, known, named) == kept


@pytest.mark.parametrize("kind", ["memory", "redis", "redis-subslots"])
@pytest.mark.parametrize("attacker_first", [False, True])
async def test_a_worker_cannot_loosen_another_workers_group_rule(
        kind: str, attacker_first: bool, request: pytest.FixtureRequest) -> None:
    """The victim's window group (2 blocks) kept only the last of its six blocks, so vLLM
    reuses none of them. Another worker of the model names that group Mamba (under which
    the last block alone would be a six-block hit), before or after the victim, from
    another process: the victim still scores 0 (the stricter rule stays)."""
    from tests.support.grpc_scenario import make_index

    index = await make_index(kind, request)
    other = index if kind == "memory" else type(index).from_url(  # type: ignore[attr-defined]
        request.getfixturevalue("redis_server").url, config=CONFIG,
        **({"subslots": 4} if kind == "redis-subslots" else {}))
    victim = batch(0, [*stores((0, None, 0), (1, "sliding_window", 2 * BS)),
                       BlockRemoved(HASHES[:5], group=1)], worker="victim")
    attacker = naming_mamba(1)
    try:
        for idx, one in ((other, attacker), (index, victim))[:: 1 if attacker_first else -1]:
            await idx.apply([one])
        assert await victim_hit(index) == 0
    finally:
        if other is not index:
            await other.close()
        await index.close()


async def test_the_lua_merge_orders_specs_as_python_does(redis_server: RedisServer) -> None:
    """lua/group_spec.lua keeps, of every pair of specs, what merged_spec keeps."""
    from indexer.index.hybrid import group_specs
    from indexer.index.redis import group_spec_command

    specs: list[tuple[str | None, int]] = [
        (None, 0), ("", 0), ("", 8), ("mamba", 0), ("mamba", 8), ("sliding_window", 0),
        ("sliding_window", 4), ("sliding_window", 8), ("sliding_window_mla", 6),
        ("full_attention", 0), ("mla_attention", 0), ("x y", 3), (None, 5)]
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        for group in (0, 1):
            for known in specs:
                for named in specs:
                    await client.delete("t:groups")
                    for spec in (known, named):
                        await client.execute_command(
                            *group_spec_command("t:groups", group, spec))
                    [(_, stored)] = (await client.hgetall("t:groups")).items()
                    kept = group_specs([(str(group).encode(), stored)])[group]
                    expected = merged_spec(group, merged_spec(group, None, known), named)
                    assert kept == (expected[0] or None, expected[1]), (group, known, named)
    finally:
        await client.aclose()


def test_a_kind_with_a_newline_is_undecodable() -> None:
    """Redis stores a spec as "kind\nwindow": a kind holding a newline could read as
    another kind there, so the bus refuses it."""
    from kvcore.bus import BusDecodeError, decode_batch, encode_batch

    bad = batch(0, [BlockStored([1], None, pack_tokens(TOKENS[:BS]), BS, group=1,
                                group_kind="mamba\n")])
    with pytest.raises(BusDecodeError, match="unprintable"):
        decode_batch(encode_batch(bad))


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_another_workers_block_size_does_not_shorten_a_window(
        kind: str, request: pytest.FixtureRequest) -> None:
    """A window counts in the query's blocks: another worker naming a larger block size
    (the model's last-named size) would make the victim's 2-block window 1 block, and
    its last block alone a six-block hit."""
    from tests.support.grpc_scenario import make_index

    index = await make_index(kind, request)
    try:
        await index.apply([
            batch(0, [*stores((0, None, 0), (1, "sliding_window", 2 * BS)),
                      BlockRemoved(HASHES[:5], group=1)], worker="victim"),
            batch(0, [BlockStored([0xF0], None, pack_tokens([9] * 2 * BS), 2 * BS)],
                  worker="attacker")])
        assert await victim_hit(index) == 0
    finally:
        await index.close()


@pytest.mark.parametrize("kind", ["memory", "redis", "redis-subslots"])
@pytest.mark.parametrize("attacker_first", [False, True])
async def test_a_worker_cannot_loosen_group_0_of_a_hybrid_model(
        kind: str, attacker_first: bool, request: pytest.FixtureRequest) -> None:
    """Group 0 of a hybrid model is full attention, which the bridge leaves unnamed. The
    victim holds its six blocks in its window group but evicted group-0 blocks 0..3, so
    vLLM reuses none; another worker naming group 0 Mamba (the last block alone a hit)
    leaves it at 0."""
    from tests.support.grpc_scenario import make_index

    index = await make_index(kind, request)
    victim = batch(0, [*stores((0, None, 0), (1, "sliding_window", 2 * BS)),
                       BlockRemoved(HASHES[:4])], worker="victim")
    attacker = naming_mamba(0)
    try:
        for one in (attacker, victim)[:: 1 if attacker_first else -1]:
            await index.apply([one])
        assert await victim_hit(index) == 0
    finally:
        await index.close()


@pytest.mark.parametrize("kind", ["memory", "redis", "redis-subslots"])
async def test_group_0_learnt_when_the_rank_turns_hybrid_later(
        kind: str, request: pytest.FixtureRequest) -> None:
    """The victim's group-0 stores come in a batch of their own, its window group's in the
    next (a long prompt's events cut into batches): group 0 is still learnt as full
    attention, so another worker naming it Mamba later gains the victim nothing."""
    from tests.support.grpc_scenario import make_index

    index = await make_index(kind, request)
    group0, group1 = stores((0, None, 0), (1, "sliding_window", 2 * BS))
    try:
        await index.apply([batch(0, [group0], worker="victim")])
        await index.apply([batch(1, [group1], worker="victim")])
        await index.apply([batch(2, [BlockRemoved(HASHES[:4])], worker="victim")])
        await index.apply([naming_mamba(0)])
        assert await victim_hit(index) == 0
    finally:
        await index.close()


@pytest.mark.parametrize(("source", "target"), [
    ("memory", "memory"), ("redis", "redis"), ("redis-subslots", "redis-subslots"),
    ("memory", "redis")])
@pytest.mark.parametrize("loosened", [0, 1])
async def test_imported_ranks_keep_their_group_rules(
        source: str, target: str, loosened: int, request: pytest.FixtureRequest) -> None:
    """A rebuild imports ranks from a snapshot: the model's group specs come with them, so
    another worker naming a group Mamba afterwards (before the victim's next batch names
    its groups again) gains the victim nothing. The victim's true hit is 0 either way:
    group 0 lost blocks 0..3 (loosened 0), or its window group kept only block 5 (1)."""
    from tests.support.grpc_scenario import make_index

    evicted = [BlockRemoved(HASHES[:4])] if loosened == 0 else [
        BlockRemoved(HASHES[:5], group=1)]
    exporter = await make_index(source, request)
    await exporter.apply([batch(0, [*stores((0, None, 0), (1, "sliding_window", 2 * BS)),
                                    *evicted], worker="victim")])
    states = await exporter.export_ranks([(MODEL, WorkerRef("victim", 0))])
    await exporter.close()
    assert states[0].group_specs
    index = await make_index(target, request)
    try:
        await index.import_ranks(states)
        await index.apply([naming_mamba(loosened)])
        assert await victim_hit(index) == 0
    finally:
        await index.close()


@pytest.mark.parametrize("kind", ["memory", "redis", "redis-subslots"])
async def test_a_snapshot_without_specs_imports_group_0_as_full(
        kind: str, request: pytest.FixtureRequest) -> None:
    """A snapshot written before group specs were kept: a rank restored with groups > 0
    and group-0 GPU blocks still says group 0 is full attention."""
    import msgspec

    from tests.support.grpc_scenario import make_index

    exporter = MemoryIndex(CONFIG)
    await exporter.apply([batch(0, [*stores((0, None, 0), (1, "sliding_window", 2 * BS)),
                                    BlockRemoved(HASHES[:4])], worker="victim")])
    [state] = await exporter.export_ranks([(MODEL, WorkerRef("victim", 0))])
    index = await make_index(kind, request)
    try:
        await index.import_ranks([msgspec.structs.replace(state, group_specs=())])
        await index.apply([naming_mamba(0)])
        assert await victim_hit(index) == 0
    finally:
        await index.close()
