"""FindBestWorker from the index's tally (`SyncMemoryIndex.score_tally` and
`decision.decide_from_tally`, native/decision.c `decision_tally_top_costs`): the same
decisions as from the Score answer, on random tallies at 1,024 and 4,096 ranks and end to
end through the server; wrappers and indexes without a tally keep the Score path."""

from __future__ import annotations

import random
from array import array
from typing import Any

import pytest

from bench.workload import worker_name
from indexer._proto.kvindex.v1 import indexer_pb2 as pb
from indexer.index.instrumented import InstrumentedIndex
from indexer.index.memory import MemoryIndex
from indexer.index.protocol import IndexConfig, ScoreQuery, ScoreResult, WorkerRef, WorkerScore
from indexer.index.scoring import QueryTally, slot_table
from indexer.serve import decision
from indexer.serve.directory import CandidateSet
from indexer.serve.service import KvIndexerService, tally_scorer
from kvcore.bus import TIERS
from kvcore.keys import NATIVE
from tests.support.decisions import (
    FIELD_MODEL,
    candidate_set,
    field_index,
    random_loads,
    request_of,
    without_age,
)
from tests.support.grpc_scenario import serving

if NATIVE:
    from kvcore._native import decision_tally_top_costs, scores_from_tally

pytestmark = pytest.mark.skipif(not NATIVE, reason="the C extension is not built")

__all__ = ["field_index"]  # the module fixture (tests/support/decisions.py)


def random_tally(candidates: CandidateSet, rng: random.Random, query_blocks: int
                 ) -> tuple[bytes, dict[int, WorkerRef]]:
    """Records (slot, matched, cpu, storage, other) of some candidates on random slots,
    a shared prefix making many equal, and a few strangers; the slots' refs."""
    refs = sorted(candidates.refs)
    strangers = [("stranger", 0), ("stranger", 1), (worker_name(10**6), 2)]
    named = rng.sample(refs, rng.randrange(min(len(refs), 400) + 1)) + strangers
    slots = rng.sample(range(len(refs) * 2 + 8), len(named))
    shared = rng.randrange(1, query_blocks + 2)
    records = array("I")
    by_slot = {}
    for slot, (worker, rank) in zip(slots, named, strict=True):
        by_slot[slot] = WorkerRef(worker, rank)
        held = rng.choice([shared, shared, rng.randrange(1, query_blocks + 2)])
        cpu = rng.choice([0, 0, held // 4])
        storage = rng.choice([0, 0, (held - cpu) // 2, held - cpu])
        other = rng.choice([0, 0, held - cpu - storage])
        records.extend([slot, held, cpu, storage, other])
    return records.tobytes(), by_slot


def from_scores(candidates: CandidateSet, tally: bytes, by_slot: dict[int, WorkerRef],
                query_blocks: int, loads: list[pb.WorkerLoad], **knobs: Any) -> Any:
    """The Score path's decision: the tally as WorkerScores (as `score_query` makes them)
    filtered to the candidates (as the servicer does), then `decide`."""
    table = slot_table(by_slot)
    weights = IndexConfig().tier_weights.as_tuple()
    scores = scores_from_tally(tally, table.refs, table.order, weights, TIERS, WorkerScore)
    kept = [s for s in scores if (s.worker_id, s.dp_rank) in candidates.refs]
    return decision.decide(candidates, ScoreResult(query_blocks, kept), loads,
                           temperature=0.0, rng=random.Random(0), **knobs), bool(kept)


class TestTallyDecisionEqualsScoreDecision:
    @pytest.mark.parametrize("ranks", [1_024, 4_096])
    @pytest.mark.parametrize("native", [True, False], ids=["c-twin", "python-twin"])
    def test_random_tallies(self, ranks: int, native: bool,
                            monkeypatch: pytest.MonkeyPatch) -> None:
        rng = random.Random(ranks + native)
        candidates = candidate_set(ranks, rng)
        for _ in range(40):
            query_blocks = rng.choice([1, 64, 512])
            tally, by_slot = random_tally(candidates, rng, query_blocks)
            loads = random_loads(candidates, rng)
            knobs = {"overlap_weight": rng.choice([0.0, 1.0, 32.0, 1e9]),
                     "limit": rng.choice([1, 8, 100, ranks]),
                     "storage_load_weight": rng.choice([0.0, 0.25, 1.0])}
            monkeypatch.setattr(decision, "USE_NATIVE_DECISION", native)
            expected, any_hit = from_scores(candidates, tally, by_slot, query_blocks, loads,
                                            **knobs)
            monkeypatch.setattr(decision, "USE_NATIVE_DECISION", True)
            refs = slot_table(by_slot).refs
            chosen, ranked, hit = decision.decide_from_tally(
                candidates, QueryTally(query_blocks, tally, refs), loads, temperature=0.0,
                **knobs)
            assert (chosen, ranked) == expected
            assert hit == any_hit
            assert len(ranked) == min(knobs["limit"], ranks)

    def test_no_records(self) -> None:
        candidates = candidate_set(9, random.Random(1))
        rows, hits = decision_tally_top_costs(b"", [], [], candidates.ordered_refs,
                                              candidates.positions, 10, 32.0, 0.0, 8)
        assert hits == 0
        assert [row[3] for row in rows] == [10] * 8  # everything to prefill
        assert [row[:2] for row in rows] == list(candidates.ordered_refs[:8])

    def test_bad_tallies_raise(self) -> None:
        candidates = candidate_set(4, random.Random(2))
        ordered, positions = candidates.ordered_refs, candidates.positions
        good = [WorkerRef(*ordered[0])]
        cases: list[tuple[bytes, list[Any]]] = [
            (b"\x00" * 19, good),  # not whole records
            (array("I", [1, 5, 0, 0, 0]).tobytes(), good),  # slot past refs
            (array("I", [0, 5, 0, 0, 0]).tobytes(), [None]),  # slot without a ref
            (array("I", [0, 5, 3, 2, 1]).tobytes(), good),  # tiers exceed matched
        ]
        for tally, refs in cases:
            with pytest.raises(ValueError, match="record"):
                decision_tally_top_costs(tally, refs, [], ordered, positions, 10, 1.0, 0.0, 4)
        with pytest.raises(TypeError):
            decision_tally_top_costs(b"", (), [], ordered, positions, 10, 1.0, 0.0, 4)
        with pytest.raises(ValueError, match="positions"):
            decision_tally_top_costs(b"", [], [], ordered, {}, 10, 1.0, 0.0, 4)


class TestIndexTally:
    def test_score_tally_names_what_score_answers(
            self, field_index: tuple[MemoryIndex, list[list[int]]]) -> None:
        """Per prompt, the tally's (ref, matched) equal Score's answer."""
        index, prompts = field_index
        for prompt in prompts[:20]:
            query = ScoreQuery(model=FIELD_MODEL, token_ids=prompt, block_size=16)
            tally = index.sync.score_tally(query)
            assert tally is not None
            records = array("I", tally.tally)
            found = {tally.refs[records[i]]: records[i + 1] for i in range(0, len(records), 5)}
            scores = index.sync.score(query).scores
            assert found == {WorkerRef(s.worker_id, s.dp_rank): s.matched_blocks
                             for s in scores}
            assert tally.query_blocks == len(prompt) // 16
        unknown = ScoreQuery(model="nobody/model", token_ids=prompts[0], block_size=16)
        assert index.sync.score_tally(unknown) == QueryTally(len(prompts[0]) // 16, b"", [])

    def test_wrappers(self, field_index: tuple[MemoryIndex, list[list[int]]]) -> None:
        """InstrumentedIndex forwards score_tally; a forwarding wrapper without one (tests'
        slow or failing indexes) is asked with score alone."""
        index, _ = field_index

        class Forwarding:
            def __getattr__(self, name: str) -> Any:
                return getattr(index, name)

        from prometheus_client import CollectorRegistry
        assert tally_scorer(index) is not None
        assert tally_scorer(InstrumentedIndex(index, CollectorRegistry())) is not None
        assert tally_scorer(Forwarding()) is None
        servicer = KvIndexerService(Forwarding())  # type: ignore[arg-type]
        assert servicer._score_tally is None


class TestServerAnswersAlike:
    async def test_tally_path_equals_score_path(
            self, field_index: tuple[MemoryIndex, list[list[int]]],
            monkeypatch: pytest.MonkeyPatch) -> None:
        """The same requests (loads, limits, worker and role filters) through the server
        with and without the tally path: the same answers, byte for byte."""
        index, prompts = field_index
        rng = random.Random(11)
        requests = [request_of(p, rng, packed=rng.random() < 0.5) for p in prompts]
        for request in requests[::4]:
            request.score.workers.extend(worker_name(rng.randrange(1_024)) for _ in range(300))
        for request in requests[1::5]:
            request.score.role = "decode"
        answers: dict[bool, list[pb.FindBestWorkerResponse]] = {}
        tallies = []
        score_tally = index.sync.score_tally

        def counted(query: ScoreQuery) -> QueryTally | None:
            tallies.append(query)
            return score_tally(query)

        monkeypatch.setattr(index.sync, "score_tally", counted)
        for use_tally in (True, False):
            if not use_tally:
                monkeypatch.setattr(KvIndexerService, "__init__", _without_tally(
                    KvIndexerService.__init__))
            async with serving(index) as (stub, _):
                answers[use_tally] = [without_age(await stub.FindBestWorker(r, timeout=10))
                                      for r in requests]
        assert len(tallies) == len(requests)  # every decision of the first pass
        assert answers[True] == answers[False]
        assert sum(a.matched_blocks > 0 for a in answers[True]) > len(requests) // 2


def _without_tally(init: Any) -> Any:
    def patched(self: KvIndexerService, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self._score_tally = None
    return patched
