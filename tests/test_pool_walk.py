"""Score's walk with shared storage pools as wildcard holders (native/tally.c:
`tally_pool_runs`, `tally_pool_masks`) against the credit path it replaced, kept here as
the reference: each pool-held run's mask OR'ed with its mounters' storage bits
(`pools.pool_runs` / `pools.credit_masks`), then `tally_runs` / `tally_masks` and the
replicas' records copied. Small random cases (hypothesis), then a memory index of 4,096
ranks with more than 2,000 mounters of pools holding more than 100,000 blocks."""

from __future__ import annotations

import random
from array import array

import msgspec
import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from indexer.index import memory, scoring
from indexer.index.ledger import cached_root_seed
from indexer.index.memory import MemoryIndex, SyncMemoryIndex
from indexer.index.pools import PoolPlan, credit_masks, pool_credit, pool_runs
from indexer.index.protocol import (
    TIER_BITS,
    TIERS,
    Index,
    ScoreQuery,
    TierWeights,
    WorkerScore,
)
from indexer.index.redis import RedisIndex
from indexer.index.scoring import slot_bits
from kvcore.keys import NATIVE
from tests.support.mask_runs import as_runs
from tests.support.pool_fleet import (
    BLOCK,
    MODEL,
    RANKS,
    WEIGHT_SETS,
    fleet_batches,
    fleet_mounts,
    fleet_queries,
    worker_of_rank,
)
from tests.support.servers import RedisServer

if NATIVE:
    from kvcore._native import (
        scores_from_tally,
        tally_masks,
        tally_pool_masks,
        tally_pool_runs,
        tally_runs,
    )

pytestmark = pytest.mark.skipif(not NATIVE, reason="the C extension is not built")

STORAGE_BIT = 1 << 2


def reference_runs(runs: list[int], plan: PoolPlan, candidates: int,
                   weights: tuple[float, ...], include_zero: bool) -> bytes:
    """The credit path before the wildcard walk (scoring.query_tally's, native)."""
    credited = pool_runs(runs, plan, candidates)
    tally = tally_runs(credited.runs, credited.candidates, weights, include_zero)
    return expanded(tally, credited.replicas)


def expanded(tally: bytes, replicas: dict[int, list[int]]) -> bytes:
    """The records with each representative slot's copied to its followers, after all
    the walk's records (the order tally_pool_runs gives them)."""
    records = array("I", tally)
    out = array("I", records)
    for i in range(0, len(records), 5):
        for follower in replicas.get(records[i], ()):
            out.extend([follower, *records[i + 1 : i + 5]])
    return out.tobytes()


def reference_masks(masks: list[int], plan: PoolPlan, candidates: int,
                    weights: tuple[float, ...], include_zero: bool) -> bytes:
    return tally_masks(list(credit_masks(masks, plan.credits)), candidates, weights,
                       include_zero)


def records(tally: bytes) -> list[tuple[int, ...]]:
    values = array("I", tally)
    return sorted(tuple(values[i : i + 5]) for i in range(0, len(values), 5))



# --- small random cases ----------------------------------------------------------------


@st.composite
def pooled_walks(draw: st.DrawFn) -> tuple[list[int], PoolPlan, int]:
    """Masks of worker slots (random tiers, holes) and pool slots (storage bit, random
    prefixes), the plan of random mounts (several pools, cold workers, workers mounting
    pools that do not exist) under a random `workers` filter, and the candidates."""
    rng = random.Random(draw(st.integers(0, 2**32)))
    n_workers = draw(st.integers(1, 40))
    n_pools = draw(st.integers(1, 4))
    n_blocks = draw(st.integers(0, 30))
    ranks = [(f"w{rng.randrange(n_workers)}", slot) for slot in range(draw(st.integers(0, 50)))]
    slots = list(range(len(ranks) + n_pools))
    rng.shuffle(slots)  # pool slots among worker slots
    pool_slots = {f"p{i}": slots[len(ranks) + i] for i in range(n_pools)}
    slots_of_worker: dict[str, int] = {}
    masks = [0] * n_blocks
    for (worker, _), slot in zip(ranks, slots, strict=False):
        slots_of_worker[worker] = slots_of_worker.get(worker, 0) | slot_bits([slot])
        for depth in range(rng.choice((0, n_blocks, rng.randint(0, n_blocks)))):
            nibble = rng.choice((1, 1, 2, 3, 4, 5, 8, 15, rng.randint(1, 15)))
            masks[depth] |= nibble << (slot * TIER_BITS)
    for slot in pool_slots.values():
        for depth in range(rng.choice((0, n_blocks, rng.randint(0, n_blocks)))):
            if rng.random() < 0.9:
                masks[depth] |= STORAGE_BIT << (slot * TIER_BITS)
    names = [*pool_slots, "gone"]
    mounts = {f"w{w}": frozenset(rng.sample(names, rng.randint(0, len(names))))
              for w in range(n_workers + 5) if rng.random() < 0.7}  # w >= n_workers: cold
    workers = None
    if draw(st.booleans()):
        workers = frozenset(f"w{w}" for w in range(n_workers + 5) if rng.random() < 0.5)
    candidates = 0
    for worker, bits in slots_of_worker.items():
        if workers is None or worker in workers:
            candidates |= bits
    plan = pool_credit(pool_slots, mounts, slots_of_worker, candidates, workers=workers,
                       next_slot=len(slots))
    return masks, plan, candidates | plan.cold


class TestSmall:
    @settings(max_examples=400, deadline=None)
    @given(case=pooled_walks(), weights=st.sampled_from(WEIGHT_SETS),
           include_zero=st.booleans())
    def test_same_records_as_the_credit_path(
            self, case: tuple[list[int], PoolPlan, int], weights: TierWeights,
            include_zero: bool) -> None:
        masks, plan, candidates = case
        as_tuple = weights.as_tuple()
        runs = as_runs(masks, (candidates | plan.pool_bits) * 15)
        got = tally_pool_runs(runs, candidates, as_tuple, include_zero, plan.credits,
                              plan.groups)
        assert got == reference_runs(runs, plan, candidates, as_tuple, include_zero)
        got = tally_pool_masks(masks, candidates, as_tuple, include_zero, plan.credits,
                               plan.groups)
        # the masks' reference walks every mounter (no replicas): same records, in slot order
        assert records(got) == records(reference_masks(masks, plan, candidates, as_tuple,
                                                       include_zero))

    def test_a_pool_holding_a_run_keeps_only_its_mounters_alive(self) -> None:
        """Slots 0, 1 mount the pool on slot 3 (0 holds block 0 on gpu, 1 nothing); slot
        2 mounts nothing. The pool holds blocks 0..5: 0 matches 6 (1 gpu, 5 storage),
        1 matches 6 at storage, 2 (holding block 0 on gpu) 1."""
        pool = STORAGE_BIT << 12
        runs = [1 | 1 << 8 | pool, 1, pool, 5]
        plan = pool_credit({"p": 3}, {"a": frozenset({"p"}), "b": frozenset({"p"})},
                           {"a": slot_bits([0]), "b": slot_bits([1]), "c": slot_bits([2])},
                           slot_bits([0, 1, 2]), workers=None, next_slot=4)
        got = records(tally_pool_runs(runs, slot_bits([0, 1, 2]), WEIGHT_SETS[0].as_tuple(),
                                      False, plan.credits, plan.groups))
        assert got == [(0, 6, 0, 5, 0), (1, 6, 0, 6, 0), (2, 1, 0, 0, 0)]

    @pytest.mark.parametrize("credits", [
        [(1, 1)],           # a shift that is no slot's
        [(-4, 1)],          # negative
        [(4,)],             # not (shift, mounters)
        [(4, -1)],          # negative mounters
        3,                  # not a sequence
    ])
    def test_bad_credits_raise(self, credits: object) -> None:
        with pytest.raises((TypeError, ValueError)):
            tally_pool_runs([1, 1], 1, (1.0, 0.8, 0.5, 0.5), False, credits, [])

    def test_bad_groups_and_runs_raise(self) -> None:
        weights = (1.0, 0.8, 0.5, 0.5)
        with pytest.raises(ValueError):
            tally_pool_runs([1, 1], 1, weights, False, [], [-1])
        with pytest.raises(ValueError):
            tally_pool_runs([1, 0], 1, weights, False, [], [])
        with pytest.raises(ValueError):
            tally_pool_runs([1], 1, weights, False, [], [])


# --- a memory index at fleet scale (tests/support/pool_fleet.py) ----------------------


def reference_scores(index: SyncMemoryIndex, query: ScoreQuery) -> list[WorkerScore]:
    """SyncMemoryIndex.score of a query on the credit path (C tally, no hybrid groups)."""
    space = index._models[MODEL]
    candidates = space.candidates(query.workers)
    plan = memory._pool_plan(space, query, candidates)
    refs = {**space.refs, **plan.cold_refs}
    weights = (query.tier_weights or index.config.tier_weights).as_tuple()
    candidates |= plan.cold
    wanted = (candidates | plan.pool_bits) * 15
    if query.block_keys is not None:
        masks = space.blocks.get_many(array("Q", query.block_keys).tobytes())
        tally = reference_masks(masks, plan, candidates, weights, query.include_zero)
    else:
        assert query.token_ids is not None
        seed = cached_root_seed(MODEL, None, None)
        runs = space.blocks.mask_runs(query.token_ids, BLOCK, seed, wanted)
        tally = reference_runs(runs, plan, candidates, weights, query.include_zero)
    table = scoring.slot_table(refs)
    return scores_from_tally(tally, table.refs, table.order, weights, TIERS, WorkerScore)


def test_fleet_answers_equal_the_credit_paths() -> None:
    """4,096 ranks, more than 2,000 mounters (cold ones among them), pools of more than
    100,000 blocks: every answer (token ids and block keys, `workers` filters, tier
    weights, include_zero) is the credit path's, score for score."""
    rng = random.Random(18)
    batches, pool_blocks = fleet_batches(rng)
    index = SyncMemoryIndex()
    index.apply(batches)
    assert not index.stats().dropped
    mounts = fleet_mounts(rng)
    assert pool_blocks >= 100_000
    mounters = sum(1 for n in range(RANKS) if worker_of_rank(n) in mounts)
    assert mounters >= 2_000
    credited = 0
    for query in fleet_queries(rng, mounts):
        got = index.score(query).scores
        assert got == reference_scores(index, query)
        credited = max(credited, sum(1 for s in got if s.blocks_by_tier.get("storage")))
    assert credited >= 2_000  # some query credits most mounters through their pools


async def test_redis_answers_equal_the_memory_indexs(redis_server: RedisServer) -> None:
    """RedisIndex walks the same way (`score_runs`): on a private redis-server, 768 ranks
    and pools of 100,000+ blocks, every answer is the memory index's (itself the credit
    path's, above), asked twice (the second time from the kept plan), and again with the
    mounts in a new object."""
    rng = random.Random(17)
    batches, pool_blocks = fleet_batches(rng, ranks=768)
    assert pool_blocks >= 100_000
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushall()
    redis_index = RedisIndex(client)
    memory_index = MemoryIndex()
    try:
        indexes: tuple[Index, ...] = (memory_index, redis_index)
        for index in indexes:
            for start in range(0, len(batches), 64):
                await index.apply(batches[start : start + 64])
        mounts = fleet_mounts(rng, ranks=768)
        queries = fleet_queries(rng, mounts, ranks=768)
        credited = 0
        for query in [*queries, *queries[:10]]:
            want = (await memory_index.score(query)).scores
            assert (await redis_index.score(query)).scores == want
            credited = max(credited, sum(1 for s in want if s.blocks_by_tier.get("storage")))
        assert credited >= 300
        moved = dict(mounts)
        for query in queries[:10]:
            again = msgspec.structs.replace(query, mounts=moved)
            assert ((await redis_index.score(again)).scores
                    == (await memory_index.score(again)).scores)
    finally:
        await redis_index.close()
