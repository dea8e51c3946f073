"""The fast FindBestWorker path: prompts as packed u32 (`ScoreRequest.token_bytes`), the
decision's ranking and answer in C (native/decision.c) equal to their pure-Python twins,
and bad input of any size answered with a per-request error, never a crash."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from bench.workload import worker_name
from indexer._proto.kvindex.v1 import indexer_pb2 as pb
from indexer.client import (
    AsyncIndexerClient,
    Decision,
    IndexerClient,
    Query,
    WorkerLoad,
    _score_request,
)
from indexer.index.memory import MemoryIndex
from indexer.index.protocol import ScoreResult, WorkerInfo, WorkerScore
from indexer.serve import decision
from indexer.serve.directory import CandidateSet
from indexer.serve.service import ServiceSettings
from kvcore.bus import pack_tokens
from kvcore.keys import NATIVE
from tests.support.decisions import (
    FAILED_PRECONDITION,
    FIELD_MODEL,
    INVALID_ARGUMENT,
    OK,
    candidate_set,
    field_index,
    random_loads,
    request_of,
    stream_message,
    stream_raw,
    without_age,
)
from tests.support.grpc_scenario import serving

needs_native = pytest.mark.skipif(not NATIVE, reason="the C extension is not built")

__all__ = ["field_index"]  # the module fixture (tests/support/decisions.py)



@pytest.fixture
def python_decision(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(decision, "USE_NATIVE_DECISION", False)
    yield


def random_scores(candidates: CandidateSet, rng: random.Random, query_blocks: int
                  ) -> list[WorkerScore]:
    """Scores of some candidates (a shared prefix: many equal), a few strangers too."""
    refs = sorted(candidates.refs)
    shared = rng.randrange(1, query_blocks + 2)
    scores = []
    for worker, rank in rng.sample(refs, rng.randrange(min(len(refs), 400) + 1)):
        held = rng.choice([shared, shared, rng.randrange(1, query_blocks + 2)])
        stored = rng.choice([0, 0, held // 3, held])
        by_tier = {"gpu": held - stored, "storage": stored} if stored else {"gpu": held}
        scores.append(WorkerScore(worker, rank, held, float(held), by_tier))
    scores.append(WorkerScore("stranger", 0, 3, 3.0, {"gpu": 3}))  # not a candidate
    return scores


def both_decisions(monkeypatch: pytest.MonkeyPatch, *args: Any, **knobs: Any
                   ) -> tuple[Any, Any]:
    native = decision.decide(*args, **knobs)
    monkeypatch.setattr(decision, "USE_NATIVE_DECISION", False)
    try:
        twin = decision.decide(*args, **knobs)
    finally:
        monkeypatch.setattr(decision, "USE_NATIVE_DECISION", True)
    return native, twin


@needs_native
class TestNativeDecisionEqualsTwin:
    """decision_top_costs ranks as scheduling.top_costs, encode_decision serialises as
    protobuf, on random inputs."""

    @pytest.mark.parametrize("ranks", [1_024, 4_096])
    def test_random_rankings(self, ranks: int, monkeypatch: pytest.MonkeyPatch) -> None:
        rng = random.Random(ranks)
        candidates = candidate_set(ranks, rng)
        for _ in range(60):
            query_blocks = rng.choice([1, 64, 512])
            result = ScoreResult(query_blocks, random_scores(candidates, rng, query_blocks))
            loads = random_loads(candidates, rng)
            knobs = {"overlap_weight": rng.choice([0.0, 1.0, 32.0, 1e9]), "temperature": 0.0,
                     "limit": rng.choice([1, 8, 100, ranks]), "rng": random.Random(0),
                     "storage_load_weight": rng.choice([0.0, 0.25, 1.0])}
            native, twin = both_decisions(monkeypatch, candidates, result, loads, **knobs)
            assert native == twin
            assert len(native[1]) == min(knobs["limit"], ranks)

    def test_one_candidate_and_no_scores(self, monkeypatch: pytest.MonkeyPatch) -> None:
        rng = random.Random(3)
        for ranks in (1, 2, 9):
            candidates = candidate_set(ranks, rng)
            for temperature in (0.0, 0.5):
                if temperature and ranks > 1:
                    continue  # sampling is Python's either way
                result = ScoreResult(10, [])
                native, twin = both_decisions(
                    monkeypatch, candidates, result, [], overlap_weight=32.0,
                    temperature=temperature, limit=8, rng=random.Random(1))
                assert native == twin
                assert native[1][0][3] == 10  # everything to prefill

    def test_answers_serialise_as_protobuf_does(self, monkeypatch: pytest.MonkeyPatch) -> None:
        rng = random.Random(5)
        candidates = candidate_set(64, rng)
        freshness = pb.Freshness(last_event_age_seconds=1.5, degraded_workers=["w"],
                                 rebuilding=True)
        for _ in range(40):
            result = ScoreResult(64, random_scores(candidates, rng, 64))
            chosen, ranked = decision.decide(candidates, result, random_loads(candidates, rng),
                                              overlap_weight=rng.choice([0.0, 32.0]),
                                              temperature=0.0, limit=rng.choice([1, 8, 64]),
                                              rng=random.Random(0))
            fresh = rng.choice([freshness, pb.Freshness()])
            native = decision.encode_answer(chosen, ranked, fresh, len(candidates)).data
            monkeypatch.setattr(decision, "USE_NATIVE_DECISION", False)
            twin = decision.encode_answer(chosen, ranked, fresh, len(candidates)).data
            monkeypatch.setattr(decision, "USE_NATIVE_DECISION", True)
            assert native == twin
            parsed = pb.FindBestWorkerResponse.FromString(native)
            assert (parsed.worker_id, parsed.dp_rank) == chosen[:2]
            assert [c.cost for c in parsed.candidates] == [row[5] for row in ranked]

    def test_bad_arguments_raise(self) -> None:
        from kvcore._native import decision_top_costs, encode_decision

        ordered = (("a", 0), ("b", 0))
        positions = {("a", 0): 0, ("b", 0): 1}
        score = WorkerScore("a", 0, 2, 2.0, {})
        with pytest.raises(ValueError, match="positions"):
            decision_top_costs([score], [], ordered, {("a", 0): 7, ("b", 0): 1}, 4, 1.0, 0.0, 2)
        with pytest.raises(ValueError, match="positions"):
            decision_top_costs([], [], ordered, {("a", 0): 0}, 4, 1.0, 0.0, 2)
        with pytest.raises(TypeError):
            decision_top_costs([score], [], ordered, list(positions), 4, 1.0, 0.0, 2)
        with pytest.raises(AttributeError):
            decision_top_costs([object()], [], ordered, positions, 4, 1.0, 0.0, 2)
        with pytest.raises(TypeError):
            decision_top_costs([score], [], [["a", 0], ["b", 0]], positions, 4, 1.0, 0.0, 2)
        assert decision_top_costs([score], [], ordered, positions, 4, 1.0, 0.0, 0) == []
        with pytest.raises(TypeError):
            encode_decision(("a", 0), [], b"", 1)
        with pytest.raises(TypeError):
            encode_decision(("a", 0, 1, 1, 1, 1.0, 0, 0), [(1, 2)], b"", 1)
        with pytest.raises(OverflowError):
            encode_decision(("a", -1, 1, 1, 1, 1.0, 0, 0), [], b"", 1)


# --- the wire form, end to end ---------------------------------------------------------


class TestTokenBytesAnswerLikeTokenIds:
    """A prompt as token_bytes is answered exactly as the same prompt as token_ids."""

    @pytest.mark.parametrize("native", [True, False], ids=["c-decision", "python-decision"])
    async def test_unary_and_streamed(self, field_index: tuple[MemoryIndex, list[list[int]]],
                                      native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(decision, "USE_NATIVE_DECISION", native and NATIVE)
        index, prompts = field_index
        rng = random.Random(18)
        seeds = [rng.randrange(1 << 30) for _ in prompts]
        as_ids = [request_of(p, random.Random(s), packed=False) for p, s in zip(prompts, seeds,
                                                                                 strict=True)]
        as_bytes = [request_of(p, random.Random(s), packed=True) for p, s in zip(prompts, seeds,
                                                                                 strict=True)]
        async with serving(index, ServiceSettings()) as (stub, port):
            unary_ids = [without_age(await stub.FindBestWorker(r, timeout=10)) for r in as_ids]
            unary_bytes = [without_age(await stub.FindBestWorker(r, timeout=10))
                           for r in as_bytes]
            streamed = await stream_raw(port, [stream_message(*as_bytes[i : i + 8])
                                               for i in range(0, len(as_bytes), 8)])
        assert unary_bytes == unary_ids
        assert [a.code for a in streamed] == [OK] * len(as_bytes)
        assert [without_age(a.answer) for a in streamed] == unary_ids
        assert sum(a.matched_blocks > 0 for a in unary_ids) > len(prompts) // 2

    async def test_c_and_python_decisions_answer_alike(
            self, field_index: tuple[MemoryIndex, list[list[int]]],
            monkeypatch: pytest.MonkeyPatch) -> None:
        index, prompts = field_index
        rng = random.Random(4)
        requests = [request_of(p, rng, packed=True) for p in prompts]
        answers = {}
        async with serving(index, ServiceSettings()) as (stub, _):
            for native in (True, False):
                monkeypatch.setattr(decision, "USE_NATIVE_DECISION", native and NATIVE)
                answers[native] = [without_age(await stub.FindBestWorker(r, timeout=10))
                                   for r in requests]
        assert answers[True] == answers[False]


class TestBadPromptsArePerRequestErrors:
    """Odd byte counts, both token forms, huge prompts, no block size: each request gets its
    own status, unary or streamed, and the server goes on."""

    async def test_each_bad_prompt_gets_its_status(
            self, field_index: tuple[MemoryIndex, list[list[int]]]) -> None:
        index, prompts = field_index
        good = pb.FindBestWorkerRequest(score=pb.ScoreRequest(
            model=FIELD_MODEL, token_bytes=pack_tokens(prompts[0])))
        limit = index.config.max_query_tokens
        bad = [
            (pb.ScoreRequest(model=FIELD_MODEL, token_bytes=b"\x01\x02\x03"), INVALID_ARGUMENT,
             "score.token_bytes: 3 bytes is not a multiple of 4"),
            (pb.ScoreRequest(model=FIELD_MODEL, token_bytes=pack_tokens(prompts[0]),
                             token_ids=[1, 2]), INVALID_ARGUMENT, "exactly one of"),
            (pb.ScoreRequest(model=FIELD_MODEL, token_bytes=bytes(4 * (limit + 1))),
             INVALID_ARGUMENT, f"exceeds the limit of {limit}"),
            (pb.ScoreRequest(model=FIELD_MODEL, token_bytes=bytes(4 * (limit + 1) + 1)),
             INVALID_ARGUMENT, "not a multiple of 4"),
            (pb.ScoreRequest(model="no/such/model", token_bytes=pack_tokens(prompts[0])),
             FAILED_PRECONDITION, "no live workers"),
            (pb.ScoreRequest(model=FIELD_MODEL, block_keys=[1, 2], token_bytes=b"\0" * 8),
             INVALID_ARGUMENT, "exactly one of"),
        ]
        requests = [pb.FindBestWorkerRequest(score=score) for score, _, _ in bad]
        async with serving(index, ServiceSettings()) as (stub, port):
            for request, (_, code, text) in zip(requests, bad, strict=True):
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await stub.FindBestWorker(request, timeout=10)
                assert failed.value.code().value[0] == code
                assert text in (failed.value.details() or "")
            streamed = await stream_raw(port, [stream_message(good, *requests, good)])
            after = await stub.FindBestWorker(good, timeout=10)
        assert [a.code for a in streamed] == [OK, *(code for _, code, _ in bad), OK]
        for answer, (_, _, text) in zip(streamed[1:-1], bad, strict=True):
            assert text in answer.message
        assert streamed[0].answer.worker_id == streamed[-1].answer.worker_id == after.worker_id

    async def test_a_model_without_a_known_block_size(self) -> None:
        """A prompt for a model whose block size nobody published, with block_size 0:
        FAILED_PRECONDITION naming block_size (live workers come from a source that
        lists one, the index has no blocks)."""

        async def one_worker(model: str | None) -> list[WorkerInfo]:
            return [WorkerInfo("m", "w", 0, 1, 0, False, {}, 0.0)]

        request = pb.FindBestWorkerRequest(score=pb.ScoreRequest(
            model="m", token_bytes=pack_tokens(range(64)), block_size=0))
        async with serving(MemoryIndex(), ServiceSettings(worker_cache_seconds=0),
                           live_workers=one_worker) as (stub, _):
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await stub.FindBestWorker(request, timeout=10)
            assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "block_size" in (failed.value.details() or "")
            request.score.block_size = 16
            answer = await stub.FindBestWorker(request, timeout=10)
        assert (answer.worker_id, answer.matched_blocks) == ("w", 0)


class TestClientSendsTokenBytes:
    """Both client faces send token_bytes by default, token_ids on request; the answers
    are the same."""

    def test_requests_carry_packed_tokens(self) -> None:
        query = Query(model="m", token_ids=[1, 2, 70_000, 2**32 - 1])
        packed = _score_request(query)
        assert packed.token_bytes == pack_tokens([1, 2, 70_000, 2**32 - 1])
        assert not packed.token_ids
        listed = _score_request(query, packed_tokens=False)
        assert list(listed.token_ids) == [1, 2, 70_000, 2**32 - 1] and not listed.token_bytes
        for bad in ([-1], [2**32], ["7"]):
            with pytest.raises(ValueError, match="token id"):
                _score_request(Query(model="m", token_ids=bad))  # type: ignore[arg-type]

    async def test_both_faces_answer_alike_in_both_forms(
            self, field_index: tuple[MemoryIndex, list[list[int]]]) -> None:
        index, prompts = field_index
        loads = [WorkerLoad(worker_name(3), active_blocks=50)]
        queries = [Query(model=FIELD_MODEL, token_ids=p) for p in prompts[:6]]
        async with serving(index, ServiceSettings()) as (_, port):
            target = f"127.0.0.1:{port}"
            answers: dict[str, list[Any]] = {}
            for packed in (True, False):
                async with AsyncIndexerClient(target, timeout=10, packed_tokens=packed) as aio:
                    answers[f"async-{packed}"] = [
                        (await aio.find_best_worker(q, loads, max_candidates=4)).candidates
                        for q in queries]
                    async with aio.decision_stream() as stream:
                        answers[f"async-stream-{packed}"] = [
                            (await stream.find_best_worker(Decision(
                                query=q, loads=loads, max_candidates=4))).candidates
                            for q in queries]
                    answers[f"async-score-{packed}"] = [
                        (await aio.score(q)).scores for q in queries]
                sync = IndexerClient(target, timeout=10, packed_tokens=packed)
                try:
                    answers[f"sync-stream-{packed}"] = await _sync_stream(sync, queries, loads)
                finally:
                    sync.close()
        first = answers["async-True"]
        assert any(c[0].matched_blocks for c in first)
        for key in ("async-False", "async-stream-True", "async-stream-False",
                    "sync-stream-True", "sync-stream-False"):
            assert answers[key] == first, key
        assert answers["async-score-True"] == answers["async-score-False"]


async def _sync_stream(client: IndexerClient, queries: list[Query],
                       loads: list[WorkerLoad]) -> list[Any]:
    """The sync face's stream, run in a thread (the server shares this test's loop)."""
    import asyncio

    def run() -> list[Any]:
        with client.decision_stream() as stream:
            return [stream.find_best_worker(Decision(query=q, loads=loads, max_candidates=4)
                                            ).candidates for q in queries]

    return await asyncio.to_thread(run)


@needs_native
class TestWireTokensWithoutTokenIds:
    """A request without token_ids (token_bytes) is handed back uncopied by
    take_uint32_field, views included, and still parses; malformed bytes still raise."""

    def test_message_itself_comes_back(self) -> None:
        from kvcore._native import take_uint32_field

        request = pb.FindBestWorkerRequest(score=pb.ScoreRequest(
            model="m", token_bytes=pack_tokens(range(4096)))).SerializeToString()
        values, rest = take_uint32_field(request, (1, 10))
        assert values == b"" and rest is request
        view = memoryview(b"xx" + request)[2:]
        values, rest = take_uint32_field(view, (1, 10))
        assert values == b"" and rest is view
        assert pb.FindBestWorkerRequest.FromString(rest).score.token_bytes == \
            pack_tokens(range(4096))
        with pytest.raises(ValueError):
            take_uint32_field(request[:-3], (1, 10))
