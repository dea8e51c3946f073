"""Score's walk and answer in C (native/tally.c) against the pure-Python walk, on random
masks and on memory indexes of thousands of ranks, and both against the holdings."""

from __future__ import annotations

import random
from array import array
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from indexer.index import scoring
from indexer.index.memory import SyncMemoryIndex
from indexer.index.protocol import TIER_BITS, TIERS, ScoreQuery, TierWeights, WorkerRef, WorkerScore
from indexer.index.scoring import (
    prefix_match,
    prefix_match_runs,
    slot_bits,
    slot_table,
    worker_scores,
)
from kvcore.bus import SCHEMA_VERSION, BlockStored, EventBatch
from kvcore.keys import NATIVE, pack_keys
from tests.support.mask_runs import as_runs

if NATIVE:
    from kvcore._native import scores_from_tally, tally_runs

pytestmark = pytest.mark.skipif(not NATIVE, reason="the C extension is not built")

WEIGHT_SETS = (
    TierWeights(),
    TierWeights(gpu=0.3, cpu=0.9, storage=0.9, other=0.1),  # gpu is not always best
    TierWeights(gpu=1.0, cpu=1.0, storage=0.0, other=0.0),  # ties go to the lower tier
)


@st.composite
def walks(draw: st.DrawFn) -> tuple[list[int], int, dict[int, WorkerRef]]:
    """Per-block masks where each slot holds a prefix in random tiers (holes allowed), a
    candidate set, and refs whose names and ranks collide so ties need the order."""
    n_slots = draw(st.integers(1, 260))  # up to 1,040 mask bits: many digits and words
    n_blocks = draw(st.integers(0, 40))
    rng = random.Random(draw(st.integers(0, 2**32)))
    masks = [0] * n_blocks
    for slot in range(n_slots):
        for depth in range(rng.choice((0, n_blocks, rng.randint(0, n_blocks)))):
            nibble = rng.choice((1, 1, 1, 2, 3, 4, 5, 8, 15, rng.randint(1, 15)))
            masks[depth] |= nibble << (slot * TIER_BITS)
    if masks and draw(st.booleans()):
        masks[rng.randrange(n_blocks)] &= rng.getrandbits(n_slots * TIER_BITS)
    chosen = [s for s in range(n_slots) if rng.random() < draw(st.floats(0.05, 1.0))]
    refs = {s: WorkerRef(f"w{rng.randrange(n_slots // 3 + 1):03}", rng.randrange(8))
            for s in range(n_slots)}
    refs = {s: WorkerRef(ref.worker_id, s) for s, ref in refs.items()}  # unique refs
    return masks, slot_bits(chosen), refs



def native_scores(runs: list[int], candidates: int, weights: TierWeights,
                  include_zero: bool, refs: dict[int, WorkerRef]) -> list[WorkerScore]:
    tally = tally_runs(runs, candidates, weights.as_tuple(), include_zero)
    table = slot_table(refs)
    return scores_from_tally(tally, table.refs, table.order, weights.as_tuple(), TIERS,
                             WorkerScore)


class TestTallyTwins:
    @settings(max_examples=300, deadline=None)
    @given(case=walks(), weights=st.sampled_from(WEIGHT_SETS), include_zero=st.booleans())
    def test_same_answer_as_python_walk(
            self, case: tuple[list[int], int, dict[int, WorkerRef]], weights: TierWeights,
            include_zero: bool) -> None:
        """Same scores, same floats, same order as the Python run walk and the per-block
        walk, whatever the width of the masks."""
        masks, candidates, refs = case
        runs = as_runs(masks, candidates * 15)
        expected = worker_scores(prefix_match_runs(runs, candidates, weights, include_zero),
                                 refs.__getitem__)
        assert native_scores(runs, candidates, weights, include_zero, refs) == expected
        per_block = worker_scores(prefix_match(masks, candidates, weights, include_zero),
                                  refs.__getitem__)
        assert expected == per_block

    def test_slots_far_apart_in_one_long_mask(self) -> None:
        """Slots 3 and 4,000 (bits 12 and 16,000): only words holding a candidate count."""
        refs = {3: WorkerRef("a", 0), 4000: WorkerRef("b", 0), 7: WorkerRef("c", 0)}
        runs = [1 << 12 | 1 << 16_000 | 1 << 28, 5, 1 << 16_001, 2, 1 << 28, 9]
        got = native_scores(runs, slot_bits([3, 4000]), WEIGHT_SETS[0], False, refs)
        assert got == [WorkerScore("b", 0, 7, 5 + 2 * 0.8, {"gpu": 5, "cpu": 2}),
                       WorkerScore("a", 0, 5, 5.0, {"gpu": 5})]

    def test_no_match_is_empty_or_zero(self) -> None:
        refs = {0: WorkerRef("a", 0), 1: WorkerRef("b", 1)}
        assert native_scores([], 0b1_0001, WEIGHT_SETS[0], False, refs) == []
        assert native_scores([], 0b1_0001, WEIGHT_SETS[0], True, refs) == [
            WorkerScore("a", 0, 0, 0.0, {}), WorkerScore("b", 1, 0, 0.0, {})]

    @pytest.mark.parametrize("args", [
        ([1, 0], 1, (1.0, 0.8, 0.5, 0.5), False),        # a run of no blocks
        ([1], 1, (1.0, 0.8, 0.5, 0.5), False),           # odd length
        ([-1, 1], 1, (1.0, 0.8, 0.5, 0.5), False),       # negative mask
        ([1.0, 1], 1, (1.0, 0.8, 0.5, 0.5), False),      # not an int
        ([1, 1], -1, (1.0, 0.8, 0.5, 0.5), False),       # negative candidates
        ([1, 1], 1, (1.0, 0.8), False),                  # three tiers missing
        ([1, 2**33], 1, (1.0, 0.8, 0.5, 0.5), False),    # past u32 blocks
    ])
    def test_bad_arguments_raise(self, args: tuple[object, ...]) -> None:
        with pytest.raises((TypeError, ValueError, OverflowError)):
            tally_runs(*args)

    @settings(max_examples=60, deadline=None)
    @given(n=st.sampled_from((255, 256, 3_000)), pairs=st.sampled_from((1, 3, 32, 33, 400)),
           spare=st.sampled_from((0, 7, 30_000)), seed=st.integers(0, 2**32))
    def test_large_answers_rank_as_the_python_sort(self, n: int, pairs: int, spare: int,
                                                    seed: int) -> None:
        """Answers of thousands of records with few (matched, weighted) pairs (a widely
        mounted pool) are ranked without qsort: same order as `worker_scores`, whatever
        the number of pairs and of slots without a record."""
        rng = random.Random(seed)
        slots = rng.sample(range(n + spare), n)
        refs = {s: WorkerRef(f"w{rng.randrange(n):05}", s) for s in range(n + spare)}
        kinds = [(rng.randint(1, 50), rng.randint(0, 1)) for _ in range(pairs)]
        tally = array("I")
        for slot in slots:
            matched, storage = rng.choice(kinds)
            tally.extend([slot, matched, 0, storage, 0])
        table = slot_table(refs)
        weights = WEIGHT_SETS[0].as_tuple()
        got = scores_from_tally(tally.tobytes(), table.refs, table.order, weights, TIERS,
                                WorkerScore)
        assert got == sorted(got, key=lambda s: (-s.matched_blocks, -s.weighted_score,
                                                 s.worker_id, s.dp_rank))
        assert len(got) == n

    def test_large_answers_with_odd_orders_are_still_ranked(self) -> None:
        """Orders repeated or out of range (not a slot table's) fall back to the sort."""
        tally = array("I", [v for s in range(300) for v in (s, 1 + s % 2, 0, 0, 0)])
        refs = [("w", s) for s in range(300)]
        weights = WEIGHT_SETS[0].as_tuple()
        for order in (array("I", [7] * 300), array("I", [2**31 + s for s in range(300)])):
            got = scores_from_tally(tally.tobytes(), refs, order.tobytes(), weights, TIERS,
                                    WorkerScore)
            assert [s.matched_blocks for s in got] == [2] * 150 + [1] * 150

    def test_large_answers_with_nan_weights_do_not_read_past_the_pairs(self) -> None:
        """A NaN weight (refused upstream; the C call does not rely on it) makes weighted
        scores that equal nothing: the ranking falls back to the sort instead of looking
        for the record's pair past the end."""
        # one record with a storage block: its weighted score alone is NaN
        tally = array("I", [v for s in range(300) for v in (s, 1 + s % 2, 0, int(s == 1), 0)])
        table = slot_table({s: WorkerRef(f"w{s:03}", 0) for s in range(300)})
        weights = (1.0, float("nan"), 1.0, 1.0)
        got = scores_from_tally(tally.tobytes(), table.refs, table.order, weights, TIERS,
                                WorkerScore)
        assert sorted(s.matched_blocks for s in got) == [1] * 150 + [2] * 150

    def test_bad_records_raise(self) -> None:
        table = slot_table({0: WorkerRef("a", 0)})
        weights = WEIGHT_SETS[0].as_tuple()
        good = array("I", [0, 3, 1, 0, 0]).tobytes()
        assert scores_from_tally(good, table.refs, table.order, weights, TIERS,
                                 WorkerScore) == [WorkerScore("a", 0, 3, 2.8, {"gpu": 2,
                                                                              "cpu": 1})]
        with pytest.raises(ValueError):  # tier counts above matched
            scores_from_tally(array("I", [0, 1, 1, 1, 0]).tobytes(), table.refs, table.order,
                              weights, TIERS, WorkerScore)
        with pytest.raises(ValueError):  # a slot the order does not cover
            scores_from_tally(good, table.refs, b"", weights, TIERS, WorkerScore)
        with pytest.raises(ValueError):  # a slot without a ref
            scores_from_tally(good, [], table.order, weights, TIERS, WorkerScore)
        with pytest.raises(TypeError):  # a hole in the refs
            scores_from_tally(good, [None], table.order, weights, TIERS, WorkerScore)


# --- memory indexes at thousands of ranks ---------------------------------------------

BLOCK = 4
MODEL = "m"


@dataclass
class Rank:
    worker: str
    dp_rank: int
    segments: list[tuple[int, int]]  # (sequence id, blocks): block i of sequence s
    cpu_prefix: int = 0  # leading blocks also offloaded to cpu

    def blocks(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for seq, n in self.segments:
            start = len(out)
            out += [(seq, start + i) for i in range(n)]
        return out


def block_tokens(blocks: list[tuple[int, int]]) -> bytes:
    return array("I", [t for seq, i in blocks for t in (seq, i, 7, 7)]).tobytes()


def apply_ranks(index: SyncMemoryIndex, ranks: list[Rank]) -> None:
    batches = []
    for n, rank in enumerate(ranks):
        blocks = rank.blocks()
        hashes = [n * 1_000_000 + i for i in range(len(blocks))]
        events = [BlockStored(hashes, None, block_tokens(blocks), BLOCK)]
        if rank.cpu_prefix:
            events.append(BlockStored(hashes[: rank.cpu_prefix], medium="cpu"))
        batches.append(EventBatch(schema=SCHEMA_VERSION, model=MODEL, worker_id=rank.worker,
                                  dp_rank=rank.dp_rank, epoch=1, seq=1, events=events))
    index.apply(batches)


def held_prefix(rank: Rank, query: list[tuple[int, int]]) -> int:
    held = rank.blocks()
    n = 0
    while n < min(len(held), len(query)) and held[n] == query[n]:
        n += 1
    return n


def check_queries(index: SyncMemoryIndex, ranks: list[Rank], queries: list[ScoreQuery],
                  prompts: list[list[tuple[int, int]]], monkeypatch: pytest.MonkeyPatch
                  ) -> int:
    """C answers == Python answers, and each rank's matched blocks are what it holds.
    Returns how many (query, rank) matches were seen."""
    seen = 0
    for query, prompt in zip(queries, prompts, strict=True):
        fast = index.score(query).scores
        monkeypatch.setattr(scoring, "USE_NATIVE_TALLY", False)
        slow = index.score(query).scores
        monkeypatch.setattr(scoring, "USE_NATIVE_TALLY", True)
        assert fast == slow
        wanted = query.workers
        expected = {(r.worker, r.dp_rank): held_prefix(r, prompt) for r in ranks
                    if wanted is None or r.worker in wanted}
        got = {(s.worker_id, s.dp_rank): s.matched_blocks for s in fast}
        assert got == {k: v for k, v in expected.items() if v or query.include_zero}
        for s in fast:
            assert sum(s.blocks_by_tier.values()) == s.matched_blocks
        seen += len(fast)
    return seen


def fleet(n_ranks: int, system_blocks: int, sharing: float, tail: int,
          rng: random.Random) -> list[Rank]:
    """Ranks (4 per worker) of which a `sharing` part hold some or all of one system
    prompt (sequence 0) before their own tail; the rest hold a private chain."""
    ranks = []
    for n in range(n_ranks):
        worker, dp = f"worker-{n // 4:05}", n % 4
        if rng.random() < sharing:
            kept = rng.choice((system_blocks, system_blocks, rng.randint(1, system_blocks)))
            segments = [(0, kept)] + ([(n + 1, tail)] if kept == system_blocks else [])
            cpu = rng.choice((0, 0, kept, rng.randint(1, kept)))
            ranks.append(Rank(worker, dp, segments, cpu))
        else:
            ranks.append(Rank(worker, dp, [(n + 1, tail)]))
    return ranks


def prompts_for(ranks: list[Rank], system_blocks: int, n: int, rng: random.Random
                ) -> list[list[tuple[int, int]]]:
    out = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.6:  # a rank's own conversation (system prompt, its tail, then new)
            rank = rng.choice(ranks)
            out.append(rank.blocks() + [(10**8 + len(out), i) for i in range(5)])
        elif kind < 0.9:  # the system prompt, then a new question
            out.append([(0, i) for i in range(system_blocks)] + [(10**8 + len(out), 0)])
        else:
            out.append([(10**8 + len(out), i) for i in range(8)])
    return out


def queries_for(prompts: list[list[tuple[int, int]]], ranks: list[Rank], rng: random.Random
                ) -> list[ScoreQuery]:
    workers = sorted({r.worker for r in ranks})
    out = []
    for prompt in prompts:
        subset = rng.random() < 0.2
        out.append(ScoreQuery(
            model=MODEL, token_ids=block_tokens(prompt), block_size=BLOCK,
            tier_weights=rng.choice(WEIGHT_SETS),
            include_zero=rng.random() < 0.1,
            workers=frozenset(rng.sample(workers, len(workers) // 3)) if subset else None))
    return out


class TestManyRanks:
    @pytest.mark.parametrize("n_ranks", [1_024, 4_096])
    def test_thousands_of_ranks_sharing_a_system_prompt(
            self, n_ranks: int, monkeypatch: pytest.MonkeyPatch) -> None:
        """~7% of the ranks hold a 64-block system prompt (~290 at 4,096): every query's
        answer is the same from C and Python and names exactly what each rank holds."""
        rng = random.Random(n_ranks)
        ranks = fleet(n_ranks, 64, 0.07, 12, rng)
        index = SyncMemoryIndex()
        apply_ranks(index, ranks)
        prompts = prompts_for(ranks, 64, 60, rng)
        seen = check_queries(index, ranks, queries_for(prompts, ranks, rng), prompts,
                             monkeypatch)
        assert seen > 60 * n_ranks * 0.07 * 0.2  # the system prompt matched many ranks

    def test_field_scale_caches(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """64 ranks of 20,000 blocks each, in groups of 8 sharing their first 10,000."""
        rng = random.Random(64)
        ranks = [Rank(f"worker-{n:03}", 0, [(10**6 + n // 8, 10_000), (n + 1, 10_000)],
                      rng.choice((0, 0, 5_000))) for n in range(64)]
        index = SyncMemoryIndex()
        apply_ranks(index, ranks)
        prompts = [[*rng.choice(ranks).blocks()[: rng.randint(1, 20_000)], (10**8, 0)]
                   for _ in range(12)]
        queries = [ScoreQuery(model=MODEL, token_ids=block_tokens(p), block_size=BLOCK,
                              tier_weights=rng.choice(WEIGHT_SETS)) for p in prompts]
        assert check_queries(index, ranks, queries, prompts, monkeypatch) >= 12 * 8


class TestSharedMasks:
    def test_equal_presences_give_one_mask_object_and_values_stay_their_own(self) -> None:
        """The C table stores holders and builds masks on demand: consecutive equal
        presences in one get_many share one int, and every value is still its own."""
        from kvcore._native import BlockTable

        table = BlockTable(secret=5)
        table.set_bits(list(range(10)), 1)
        table.set_bits(list(range(6)), 1 << 16_000)
        table.set_bits([3, 4, 5, 6], 1 << 4)
        masks = table.get_many(pack_keys([3, 4, 5, 6]))
        assert masks[0] is masks[1] is masks[2] and masks[2] != masks[3]
        expected = {k: 1 | (1 << 16_000 if k < 6 else 0) | (16 if 3 <= k <= 6 else 0)
                    for k in range(10)}
        assert dict(table.items()) == expected
        table.clear_bits([0, 1, 2, 3, 4, 5, 6], ~1)
        assert dict(table.items()) == {k: v & ~1 for k, v in expected.items() if v & ~1} | {
            k: v for k, v in expected.items() if k >= 7}
