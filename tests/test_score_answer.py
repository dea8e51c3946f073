"""Score's answer built in C (native/tally.c `scores_from_tally`): WorkerScores made by
filling their slots, one blocks_by_tier dict per run of equal tier counts. Checked against
the same answer made by calling the type, and the pure-Python answer at 4,096 ranks with a
widely mounted pool; other makes are called; references are balanced; bad input raises."""

from __future__ import annotations

import contextlib
import gc
import random
import sys
import tracemalloc
from array import array

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from indexer.index import scoring
from indexer.index.memory import SyncMemoryIndex
from indexer.index.protocol import TIERS, WorkerRef, WorkerScore
from indexer.index.scoring import slot_table
from kvcore.keys import NATIVE
from tests.support.pool_fleet import fleet_batches, fleet_mounts, fleet_queries

if NATIVE:
    from kvcore._native import score_maker_kind, scores_from_tally

pytestmark = pytest.mark.skipif(not NATIVE, reason="the C extension is not built")

WEIGHTS = (1.0, 0.8, 0.5, 0.5)


def called(*fields: object) -> WorkerScore:
    """WorkerScore made by its constructor (scores_from_tally calls a non-type make)."""
    return WorkerScore(*fields)  # type: ignore[arg-type]


class Posted(msgspec.Struct, frozen=True, gc=False):
    worker_id: str
    dp_rank: int
    matched_blocks: int
    weighted_score: float
    blocks_by_tier: dict[str, int]

    def __post_init__(self) -> None:
        POSTED.append(self.worker_id)


POSTED: list[str] = []


class KeywordOnly(msgspec.Struct, kw_only=True):
    worker_id: str
    dp_rank: int
    matched_blocks: int
    weighted_score: float
    blocks_by_tier: dict[str, int]


class Tracked(msgspec.Struct):  # gc=True: made by allocation, tracked by the GC
    worker_id: str
    dp_rank: int
    matched_blocks: int
    weighted_score: float
    blocks_by_tier: dict[str, int]


@st.composite
def tallies(draw: st.DrawFn) -> tuple[bytes, dict[int, WorkerRef]]:
    """Records of distinct slots with tier counts drawn from a few (so equal counts
    repeat, in and out of runs), and refs naming every slot."""
    n_slots = draw(st.integers(1, 400))
    rng = random.Random(draw(st.integers(0, 2**32)))
    shapes = [(m, *rng.choice(((0, 0, 0), (0, m, 0), (1, m - 1, 0), (0, 0, m)))) if m
              else (0, 0, 0, 0) for m in (rng.randint(0, 30) for _ in range(rng.randint(1, 6)))]
    records = array("I")
    for slot in rng.sample(range(n_slots), rng.randint(0, n_slots)):
        matched, cpu, storage, other = rng.choice(shapes)
        records.extend((slot, matched, cpu, storage, other))
    refs = {s: WorkerRef(f"w{rng.randrange(n_slots // 2 + 1):03}", s) for s in range(n_slots)}
    return records.tobytes(), refs


def answer(tally: bytes, refs: dict[int, WorkerRef], make: object) -> list[WorkerScore]:
    table = slot_table(refs)
    out: list[WorkerScore] = scores_from_tally(tally, table.refs, table.order, WEIGHTS, TIERS,
                                               make)
    return out


def expected_by_tier(record: tuple[int, ...]) -> dict[str, int]:
    _, matched, cpu, storage, other = record
    counts = (matched - cpu - storage - other, cpu, storage, other)
    return {tier: n for tier, n in zip(TIERS, counts, strict=True) if n}


class TestStructsFilledInC:
    @settings(max_examples=200, deadline=None)
    @given(case=tallies())
    def test_same_scores_as_the_constructor(self, case: tuple[bytes, dict[int, WorkerRef]]
                                            ) -> None:
        """Same fields, same types, same order as the scores the constructor makes, and
        each score's tier dict its own record's counts."""
        tally, refs = case
        got = answer(tally, refs, WorkerScore)
        want = answer(tally, refs, called)
        assert got == want
        assert all(type(s) is WorkerScore for s in got)
        assert [tuple(map(type, msgspec.structs.astuple(s))) for s in got] == [
            tuple(map(type, msgspec.structs.astuple(s))) for s in want]
        records = array("I", tally)
        by_ref = {refs[records[i]]: tuple(records[i:i + 5]) for i in range(0, len(records), 5)}
        for score in got:
            record = by_ref[WorkerRef(score.worker_id, score.dp_rank)]
            assert score.blocks_by_tier == expected_by_tier(record)

    def test_equal_tier_counts_in_a_row_share_one_dict(self) -> None:
        records = array("I", [s for slot in range(600) for s in (
            (slot, 40, 0, 40, 0) if slot % 3 else (slot, 40, 0, 30, 0))])
        refs = {s: WorkerRef(f"w{s:04}", 0) for s in range(600)}
        got = answer(records.tobytes(), refs, WorkerScore)
        dicts = {id(s.blocks_by_tier): s.blocks_by_tier for s in got}
        assert sorted(dicts.values(), key=str) == [{"gpu": 10, "storage": 30},
                                                    {"storage": 40}]

    def test_worker_score_takes_the_fast_path(self) -> None:
        """WorkerScore's scores are allocated with their slots filled, not called: a
        msgspec release that changed its Struct layout would fall back to calling the
        type, answers still right but slower; this says so. Other makes are called."""
        assert score_maker_kind(WorkerScore) == "raw"
        assert score_maker_kind(Tracked) == "slots"
        for other in (Posted, called, dict, None):  # (kw_only: found at the first call)
            assert score_maker_kind(other) == "call"

    def test_a_post_init_or_keyword_only_struct_is_called(self) -> None:
        records = array("I", [0, 3, 0, 3, 0, 1, 2, 0, 0, 0]).tobytes()
        refs = {0: WorkerRef("a", 0), 1: WorkerRef("b", 0)}
        POSTED.clear()
        posted = answer(records, refs, Posted)
        assert [type(s) for s in posted] == [Posted, Posted] and POSTED == ["a", "b"]
        with pytest.raises(TypeError):
            answer(records, refs, KeywordOnly)

    def test_a_gc_struct_is_made_tracked(self) -> None:
        records = array("I", [s for slot in range(300) for s in (slot, 5, 0, 5, 0)])
        refs = {s: WorkerRef(f"w{s:04}", 0) for s in range(300)}
        got = answer(records.tobytes(), refs, Tracked)
        assert all(type(s) is Tracked and gc.is_tracked(s) for s in got)
        assert [s.worker_id for s in got] == [f"w{s:04}" for s in range(300)]


class TestReferences:
    def test_made_and_dropped_many_times_holds_nothing(self) -> None:
        """Refcounts of the type, the names and the tiers are back where they were once
        the answers go, and repeated answers leave no memory behind."""
        records = array("I", [s for slot in range(2_000) for s in (
            (slot, 64, 0, 64, 0) if slot % 50 else (slot, 64, slot % 7, 30, 0))]).tobytes()
        refs = {s: WorkerRef(f"w{s:04}", s % 4) for s in range(2_000)}
        table = slot_table(refs)
        name = table.refs[7]
        assert name is not None
        watched = (WorkerScore, name.worker_id, TIERS[2], table.refs)
        before = [sys.getrefcount(obj) for obj in watched]

        def run() -> None:
            for _ in range(50):
                scores_from_tally(records, table.refs, table.order, WEIGHTS, TIERS,
                                  WorkerScore)

        run()  # warm free lists and caches
        gc.collect()
        tracemalloc.start()
        try:
            start = tracemalloc.get_traced_memory()[0]
            run()
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - start
        finally:
            tracemalloc.stop()
        assert grown < 64 * 1024
        assert [sys.getrefcount(obj) for obj in watched] == before

    def test_a_failing_make_leaks_nothing(self) -> None:
        """A make that raises, and an answer failing half-way through after its first
        scores were made by filling slots: nothing of the partial answers stays allocated
        (tracemalloc over 20,000 failures each)."""
        records = array("I", [0, 3, 0, 3, 0, 1, 2, 0, 0, 0]).tobytes()
        table = slot_table({0: WorkerRef("a", 0), 1: WorkerRef("b", 0)})
        half_bad = [table.refs[0], ("b",)]  # slot 1's ref is not a pair: the second fails

        def fail(*fields: object) -> None:
            raise RuntimeError("no")

        def growth(refs: list[object], make: object, error: type[Exception]) -> int:
            for _ in range(200):  # warm: caches, interned ints and floats
                with pytest.raises(error):
                    scores_from_tally(records, refs, table.order, WEIGHTS, TIERS, make)
            gc.collect()
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                for _ in range(20_000):
                    with contextlib.suppress(error):
                        scores_from_tally(records, refs, table.order, WEIGHTS, TIERS, make)
                gc.collect()
                return tracemalloc.get_traced_memory()[0] - before
            finally:
                tracemalloc.stop()

        # one object kept per failure would be >= 320,000 bytes; interpreter caches move
        # a few kilobytes either way
        assert growth(table.refs, fail, RuntimeError) < 65_536
        assert growth(half_bad, WorkerScore, TypeError) < 65_536

    def test_a_make_that_shortens_refs_gets_an_error(self) -> None:
        """A Python make that empties the refs list while the answer is made: a ValueError,
        not a read past the list's end."""
        records = array("I", [0, 3, 0, 3, 0, 1, 2, 0, 0, 0]).tobytes()
        table = slot_table({0: WorkerRef("a", 0), 1: WorkerRef("b", 0)})
        refs = list(table.refs)

        def emptying(*fields: object) -> WorkerScore:
            refs.clear()
            return called(*fields)

        with pytest.raises(ValueError, match="refs changed"):
            scores_from_tally(records, refs, table.order, WEIGHTS, TIERS, emptying)


class TestBadInput:
    @pytest.mark.parametrize("make", [None, 3, WorkerRef, dict])
    def test_a_make_that_cannot_make_raises(self, make: object) -> None:
        """Not callable, or not with five arguments: a TypeError, no score."""
        records = array("I", [0, 3, 0, 3, 0]).tobytes()
        with pytest.raises(TypeError):
            answer(records, {0: WorkerRef("a", 0)}, make)

    def test_refs_that_are_not_pairs_raise(self) -> None:
        records = array("I", [0, 3, 0, 3, 0]).tobytes()
        order = array("I", [0]).tobytes()
        for bad in ([("a",)], [["a", 0]], [("a", 0, 1)]):
            with pytest.raises(TypeError):
                scores_from_tally(records, bad, order, WEIGHTS, TIERS, WorkerScore)


def test_pool_fleet_answers_equal_the_python_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """4,096 ranks, more than 2,000 mounters: every Score (token ids and keys, filters,
    weights, include_zero) equals the pure-Python walk's, WorkerScore for WorkerScore."""
    rng = random.Random(23)
    batches, _ = fleet_batches(rng)
    index = SyncMemoryIndex()
    index.apply(batches)
    mounts = fleet_mounts(rng)
    queries = fleet_queries(rng, mounts)[:30]
    native = [index.score(query).scores for query in queries]
    monkeypatch.setattr(scoring, "USE_NATIVE_TALLY", False)
    python = [index.score(query).scores for query in queries]
    assert native == python
    largest = max(native, key=len)
    assert len(largest) >= 2_000
    assert len({id(s.blocks_by_tier) for s in largest}) < len(largest) // 4  # shared


def test_slot_table_refs_are_equal_and_new() -> None:
    """The table names each slot with an equal ref and worker id made for it (so an
    answer's objects lie in rank order), and ranks them by (worker_id, dp_rank)."""
    refs = {s: WorkerRef(f"worker-{(s * 7919) % 1000:04}", s % 3) for s in range(0, 1000, 2)}
    table = slot_table(refs)
    assert {s: r for s, r in enumerate(table.refs) if r is not None} == refs
    assert all(table.refs[s] is not ref and table.refs[s][0] is not ref.worker_id  # type: ignore[index]
               for s, ref in refs.items())
    order = array("I", table.order)
    assert sorted(refs, key=order.__getitem__) == sorted(refs, key=refs.__getitem__)


class Slotted:
    """Not a msgspec Struct, though laid out as one: its __init__ counts, so it is called
    for every score."""

    __struct_fields__ = ("worker_id", "dp_rank", "matched_blocks", "weighted_score",
                         "blocks_by_tier")
    __slots__ = __struct_fields__
    made = 0

    def __init__(self, *fields: object) -> None:
        for name, value in zip(self.__struct_fields__, fields, strict=True):
            setattr(self, name, value)
        Slotted.made += 1


def test_a_class_laid_out_as_a_struct_is_called() -> None:
    records = array("I", [s for slot in range(300) for s in (slot, 5, 0, 5, 0)]).tobytes()
    refs = {s: WorkerRef(f"w{s:04}", 0) for s in range(300)}
    Slotted.made = 0
    got = answer(records, refs, Slotted)
    assert Slotted.made == 300 and [s.worker_id for s in got] == [f"w{s:04}" for s in range(300)]
