"""The gRPC service through a real grpc.aio server on a free port, on both backends.

Every test that takes `index` runs twice: on the in-memory index and on the Redis index
(the private redis-server), loaded with the scenario of tests/support/grpc_scenario.py:

    w-a rank 0   the whole prompt on GPU          matched 4
    w-c rank 0   its first 3 blocks on CPU        matched 3
    w-b rank 0   its first 2 blocks on GPU        matched 2
    w-b rank 1   another prefix                   matched 0
"""

from __future__ import annotations

import asyncio
import random
import resource
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from structlog.testing import capture_logs

from indexer._proto.kvindex.v1 import indexer_pb2 as pb
from indexer._proto.kvindex.v1 import indexer_pb2_grpc as pb_grpc
from indexer.index.memory import MemoryIndex
from indexer.index.protocol import Index, IndexConfig, ScoreQuery, ScoreResult, WorkerInfo
from indexer.index.redis import RedisIndex
from indexer.ingest.consumer import ConsumerStats
from indexer.serve.directory import CandidateSet, WorkerDirectory
from indexer.serve.grpc_handlers import TOKEN_PATHS, add_kv_indexer_service
from indexer.serve.service import (
    FD_RESERVE,
    SERVICE_NAME,
    KvIndexerService,
    ServiceSettings,
    connection_cap,
    server_options,
)
from kvcore.bus import AllBlocksCleared, BlockStored, EventBatch
from kvcore.bus import pack_tokens as pack
from kvcore.keys import block_keys_for_tokens
from tests.support.grpc_scenario import (
    AGE,
    CONFIG,
    PROMPT,
    TOKENS,
    SlowScores,
    batch,
    scenario,
    serving,
    store,
)
from tests.support.prompt_tree import BLOCK, MODEL, make_event, path_tokens
from tests.support.protobuf_wire import unpacked_tokens, varint
from tests.support.servers import RedisServer


@pytest.fixture
async def stub(index: Index) -> AsyncIterator[pb_grpc.KvIndexerStub]:
    async with serving(index) as (s, _):
        yield s


def rows(response: pb.ScoreResponse) -> list[tuple[str, int, int]]:
    return [(s.worker_id, s.dp_rank, s.matched_blocks) for s in response.scores]


async def status_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details() or ""


class CountingScores:
    """A real index that records how many score() calls overlap (each takes `delay`)."""

    def __init__(self, inner: Index, delay: float) -> None:
        self.inner = inner
        self.delay = delay
        self.in_flight = 0
        self.most = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def score(self, query: ScoreQuery) -> ScoreResult:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            return await self.inner.score(query)
        finally:
            self.in_flight -= 1


class FailingScores:
    """A real index whose score() hits a bug."""

    def __init__(self, inner: Index) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def score(self, query: ScoreQuery) -> ScoreResult:
        raise RuntimeError("secret internals")


class TestScore:
    """Score answers per (worker, dp_rank) overlap, with freshness."""

    async def test_token_ids_score_every_matching_worker(
            self, stub: pb_grpc.KvIndexerStub) -> None:
        """Matched blocks, order, tiers and weights; unmatched ranks are left out."""
        response = await stub.Score(pb.ScoreRequest(model=MODEL, token_ids=TOKENS))
        assert response.query_blocks == 4
        assert rows(response) == [("w-a", 0, 4), ("w-c", 0, 3), ("w-b", 0, 2)]
        by_worker = {s.worker_id: s for s in response.scores}
        assert dict(by_worker["w-c"].blocks_by_tier) == {"cpu": 3}
        assert by_worker["w-c"].weighted_score == pytest.approx(3 * 0.8)
        assert dict(by_worker["w-a"].blocks_by_tier) == {"gpu": 4}

    async def test_block_keys_give_the_same_answer(self, stub: pb_grpc.KvIndexerStub) -> None:
        """A router that hashes itself gets the answer of the token query."""
        keys = block_keys_for_tokens(TOKENS, BLOCK, MODEL)
        by_keys = await stub.Score(pb.ScoreRequest(model=MODEL, block_keys=keys))
        by_tokens = await stub.Score(pb.ScoreRequest(model=MODEL, token_ids=TOKENS))
        assert by_keys.query_blocks == 4
        assert list(by_keys.scores) == list(by_tokens.scores)

    async def test_trailing_partial_block_is_ignored(self, stub: pb_grpc.KvIndexerStub) -> None:
        """Tokens past the last full block change nothing."""
        response = await stub.Score(pb.ScoreRequest(model=MODEL, token_ids=[*TOKENS, 9, 9]))
        assert response.query_blocks == 4
        assert rows(response)[0] == ("w-a", 0, 4)

    async def test_include_zero_lists_unmatched_candidates(
            self, stub: pb_grpc.KvIndexerStub) -> None:
        """include_zero adds the candidates with no matched block."""
        response = await stub.Score(pb.ScoreRequest(model=MODEL, token_ids=TOKENS,
                                                    include_zero=True))
        assert rows(response)[-1] == ("w-b", 1, 0)
        assert len(response.scores) == 4

    async def test_workers_filter_restricts_candidates(
            self, stub: pb_grpc.KvIndexerStub) -> None:
        """Only the named workers (all their ranks) are scored."""
        response = await stub.Score(pb.ScoreRequest(model=MODEL, token_ids=TOKENS,
                                                    workers=["w-b", "nobody"], include_zero=True))
        assert rows(response) == [("w-b", 0, 2), ("w-b", 1, 0)]

    async def test_tier_weights_override_per_tier(self, stub: pb_grpc.KvIndexerStub) -> None:
        """A set weight replaces the server's; unset ones keep the defaults."""
        response = await stub.Score(pb.ScoreRequest(
            model=MODEL, token_ids=TOKENS, tier_weights=pb.TierWeights(cpu=0.25)))
        by_worker = {s.worker_id: s.weighted_score for s in response.scores}
        assert by_worker["w-c"] == pytest.approx(0.75)
        assert by_worker["w-a"] == pytest.approx(4.0)

    async def test_lora_name_is_its_own_namespace(self, stub: pb_grpc.KvIndexerStub) -> None:
        """Blocks of the base model do not match a query for an adapter."""
        response = await stub.Score(pb.ScoreRequest(model=MODEL, token_ids=TOKENS,
                                                    lora_name="adapter"))
        assert response.query_blocks == 4
        assert list(response.scores) == []

    async def test_explicit_block_size_chunks_the_tokens(
            self, stub: pb_grpc.KvIndexerStub) -> None:
        """block_size overrides the model's: other blocks, so other keys."""
        response = await stub.Score(pb.ScoreRequest(model=MODEL, token_ids=TOKENS,
                                                    block_size=8))
        assert response.query_blocks == 2
        assert list(response.scores) == []

    async def test_model_without_live_workers_has_no_scores(
            self, stub: pb_grpc.KvIndexerStub) -> None:
        """An unknown model is not an error: Score returns no scores."""
        by_tokens = await stub.Score(pb.ScoreRequest(model="nobody/model", token_ids=TOKENS))
        assert (by_tokens.query_blocks, list(by_tokens.scores)) == (0, [])
        by_keys = await stub.Score(pb.ScoreRequest(model="nobody/model", block_keys=[1, 2, 3]))
        assert (by_keys.query_blocks, list(by_keys.scores)) == (3, [])

    async def test_freshness_reports_age_and_degraded_candidates(
            self, index: Index, stub: pb_grpc.KvIndexerStub) -> None:
        """Age of the newest event among the candidates; degraded ones by id."""
        response = await stub.Score(pb.ScoreRequest(model=MODEL, token_ids=TOKENS))
        assert response.freshness.last_event_age_seconds == pytest.approx(AGE, abs=2.0)
        assert list(response.freshness.degraded_workers) == []
        assert not response.freshness.rebuilding
        orphan = make_event("orphan", (0, 1), 1)  # unknown parent: w-b/0 is degraded
        await index.apply([batch("w-b", 0, 1, [orphan], ts=time.time())])
        fresh = (await stub.Score(pb.ScoreRequest(model=MODEL, token_ids=TOKENS))).freshness
        assert list(fresh.degraded_workers) == ["w-b"]
        assert fresh.last_event_age_seconds < 2.0
        only_a = await stub.Score(pb.ScoreRequest(model=MODEL, token_ids=TOKENS,
                                                  workers=["w-a"]))
        assert list(only_a.freshness.degraded_workers) == []
        assert only_a.freshness.last_event_age_seconds == pytest.approx(AGE, abs=2.0)

    async def test_rebuilding_hook_is_reported(self, index: Index) -> None:
        """The `rebuilding` hook's answer reaches every response's freshness."""
        async with serving(index, rebuilding=lambda: True) as (s, _):
            response = await s.Score(pb.ScoreRequest(model=MODEL, token_ids=TOKENS))
        assert response.freshness.rebuilding


class TestWireTokens:
    """Score and FindBestWorker read token ids off the wire (grpc_handlers.WireTokens)."""

    def test_every_rpc_is_registered(self) -> None:
        """The hand-built handler table serves every method of the service."""
        handlers: dict[str, Any] = {}

        class Capture:
            def add_generic_rpc_handlers(self, _: Any) -> None:
                pass

            def add_registered_method_handlers(self, _: str, table: Any) -> None:
                handlers.update(table)

        add_kv_indexer_service(KvIndexerService(MemoryIndex()), Capture())  # type: ignore[arg-type]
        service = pb.DESCRIPTOR.services_by_name["KvIndexer"]
        assert set(handlers) == {m.name for m in service.methods}
        assert set(TOKEN_PATHS) <= set(handlers)

    async def test_malformed_request_fails_and_the_server_goes_on(self, index: Index) -> None:
        """Undecodable bytes fail that call only; the next good call is answered."""
        async with serving(index) as (stub, port):
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            try:
                call = channel.unary_unary(f"/{SERVICE_NAME}/Score")
                for raw in (varint(10 << 3 | 2) + varint(9) + b"\x01", b"\x52\x80"):
                    with pytest.raises(grpc.aio.AioRpcError) as failed:
                        await call(raw)
                    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            finally:
                await channel.close()
            response = await stub.Score(pb.ScoreRequest(model=MODEL, token_ids=TOKENS))
            assert rows(response)[0] == ("w-a", 0, 4)

    @pytest.mark.parametrize("rpc", ["Score", "FindBestWorker"])
    async def test_unpacked_encoding_scores_like_packed(self, index: Index, rpc: str) -> None:
        """A client that sends token_ids unpacked (legal protobuf) gets the same answer."""
        packed_request: Any = pb.ScoreRequest(model=MODEL, token_ids=TOKENS)
        unpacked = pb.ScoreRequest(model=MODEL).SerializeToString() + unpacked_tokens(10, TOKENS)
        assert list(pb.ScoreRequest.FromString(unpacked).token_ids) == TOKENS
        if rpc == "FindBestWorker":
            packed_request = pb.FindBestWorkerRequest(score=packed_request)
            unpacked = varint(1 << 3 | 2) + varint(len(unpacked)) + unpacked
        response_type = pb.ScoreResponse if rpc == "Score" else pb.FindBestWorkerResponse
        async with serving(index) as (_, port):
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            try:
                call = channel.unary_unary(f"/{SERVICE_NAME}/{rpc}")
                from_packed = await call(packed_request.SerializeToString())
                from_unpacked = await call(unpacked)
            finally:
                await channel.close()
        answer, other = response_type.FromString(from_packed), response_type.FromString(
            from_unpacked)
        answer.ClearField("freshness")  # its event age moves between the calls
        other.ClearField("freshness")
        assert answer == other
        matched = answer.scores[0].matched_blocks if rpc == "Score" else answer.matched_blocks
        assert matched == 4


class TestScoreErrors:
    """Refused queries: status codes and messages that name the field or the model."""

    @pytest.mark.parametrize(("request_kwargs", "words"), [
        ({"model": "", "token_ids": TOKENS}, ["model must not be empty"]),
        ({"model": MODEL}, ["token_ids", "block_keys", "both are empty"]),
        ({"model": MODEL, "token_ids": TOKENS, "block_keys": [1]},
         ["token_ids", "block_keys", "got both"]),
        ({"model": MODEL, "token_ids": [1] * 5000},
         ["token_ids", "5000 tokens exceeds the limit of 4096"]),
        ({"model": MODEL, "block_keys": list(range(1025))},
         ["block_keys", "1025 blocks exceeds the limit of 1024"]),
        ({"model": MODEL, "token_ids": TOKENS, "tier_weights": pb.TierWeights(cpu=-1.0)},
         ["tier_weights.cpu"]),
        ({"model": MODEL, "token_ids": TOKENS, "tier_weights": pb.TierWeights(gpu=float("nan"))},
         ["tier_weights.gpu"]),
    ])
    async def test_invalid_argument_names_the_field(
        self, stub: pb_grpc.KvIndexerStub, request_kwargs: dict[str, Any], words: list[str]
    ) -> None:
        """Malformed queries are INVALID_ARGUMENT with the field in the message."""
        code, details = await status_of(stub.Score(pb.ScoreRequest(**request_kwargs)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        for word in words:
            assert word in details

    async def test_unknown_block_size_is_failed_precondition(
            self, index: Index, stub: pb_grpc.KvIndexerStub) -> None:
        """Token ids for a live model that never published tokens: FAILED_PRECONDITION."""
        await index.apply([batch("w-z", 0, 0, [AllBlocksCleared()], model="tokenless")])
        code, details = await status_of(stub.Score(pb.ScoreRequest(model="tokenless",
                                                                   token_ids=TOKENS)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "'tokenless'" in details and "block size unknown" in details
        given = await stub.Score(pb.ScoreRequest(model="tokenless", token_ids=TOKENS,
                                                 block_size=BLOCK))
        assert given.query_blocks == 4

    async def test_message_over_the_size_limit_is_refused(self, index: Index) -> None:
        """A request above max_message_bytes is RESOURCE_EXHAUSTED, not parsed."""
        settings = ServiceSettings(worker_cache_seconds=0, max_message_bytes=64 * 1024)
        async with serving(index, settings) as (s, _):
            code, _ = await status_of(s.Score(pb.ScoreRequest(model=MODEL,
                                                              token_ids=[70_000] * 40_000)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED

    async def test_deadline_is_honoured_and_work_stops(self, index: Index) -> None:
        """A call past its deadline ends DEADLINE_EXCEEDED and the server stops its work."""
        slow = SlowScores(index, delay=5.0)
        async with serving(slow) as (s, _):
            started = time.monotonic()
            code, _ = await status_of(s.Score(pb.ScoreRequest(model=MODEL, token_ids=TOKENS),
                                              timeout=0.3))
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 2.0
            await asyncio.wait_for(slow.cancelled.wait(), 2.0)

    async def test_unexpected_error_is_internal_and_logged(self, index: Index) -> None:
        """A bug becomes INTERNAL without leaking its message; the traceback is logged."""
        async with serving(FailingScores(index)) as (s, _):
            with capture_logs() as logs:
                code, details = await status_of(
                    s.Score(pb.ScoreRequest(model=MODEL, token_ids=TOKENS)))
        assert code == grpc.StatusCode.INTERNAL
        assert "Score" in details and "RuntimeError" in details
        assert "secret" not in details
        [entry] = [e for e in logs if e["event"] == "rpc_failed"]
        assert entry["log_level"] == "error" and entry["rpc"] == "Score"
        assert isinstance(entry["exc_info"], RuntimeError)

    async def test_backend_down_is_unavailable(self, tmp_path: Path) -> None:
        """Redis gone: every RPC that needs it answers UNAVAILABLE."""
        redis = RedisServer(tmp_path).start()
        idx = RedisIndex.from_url(redis.url, config=CONFIG)
        try:
            await idx.apply(scenario())
            async with serving(idx) as (s, _):
                assert rows(await s.Score(pb.ScoreRequest(model=MODEL, token_ids=TOKENS)))
                redis.kill()
                for call in (s.Score(pb.ScoreRequest(model=MODEL, token_ids=TOKENS)),
                             s.ListWorkers(pb.ListWorkersRequest()),
                             s.GetStats(pb.GetStatsRequest()),
                             s.Diagnose(pb.DiagnoseRequest())):
                    code, details = await status_of(call)
                    assert code == grpc.StatusCode.UNAVAILABLE
                    assert "backend" in details
        finally:
            redis.kill()
            await idx.close()


class TestFindBestWorker:
    """FindBestWorker: cost = overlap_weight * prefill_blocks + active_blocks."""

    @staticmethod
    def find(tokens: Sequence[int] = TOKENS, **kwargs: Any) -> pb.FindBestWorkerRequest:
        """A request; the hand-built cases below use overlap_weight 1 unless they say."""
        kwargs.setdefault("overlap_weight", 1.0)
        workers = kwargs.pop("workers", ())
        return pb.FindBestWorkerRequest(
            score=pb.ScoreRequest(model=MODEL, token_ids=tokens, workers=workers), **kwargs)

    async def test_idle_workers_cache_hit_wins(self, stub: pb_grpc.KvIndexerStub) -> None:
        """Without load the longest overlap wins; every candidate's cost is returned."""
        response = await stub.FindBestWorker(self.find())
        assert (response.worker_id, response.dp_rank, response.matched_blocks) == ("w-a", 0, 4)
        assert [(c.worker_id, c.dp_rank, c.prefill_blocks, c.cost)
                for c in response.candidates] == [
            ("w-a", 0, 0, 0.0), ("w-c", 0, 1, 1.0), ("w-b", 0, 2, 2.0), ("w-b", 1, 4, 4.0)]
        assert response.freshness.last_event_age_seconds == pytest.approx(AGE, abs=2.0)

    async def test_cache_hit_outweighed_by_load(self, stub: pb_grpc.KvIndexerStub) -> None:
        """The full hit loses once its active blocks exceed what the others must prefill."""
        response = await stub.FindBestWorker(self.find(loads=[
            pb.WorkerLoad(worker_id="w-a", dp_rank=0, active_blocks=10)]))
        assert (response.worker_id, response.dp_rank, response.matched_blocks) == ("w-c", 0, 3)
        costs = {(c.worker_id, c.dp_rank): (c.active_blocks, c.cost) for c in response.candidates}
        assert costs[("w-a", 0)] == (10, 10.0)
        assert costs[("w-b", 1)] == (0, 4.0)  # no load entry: idle

    async def test_unset_overlap_weight_is_the_tuned_default(
            self, stub: pb_grpc.KvIndexerStub) -> None:
        """Without overlap_weight the server uses DEFAULT_OVERLAP_WEIGHT (32)."""
        request = self.find(loads=[pb.WorkerLoad(worker_id="w-a", dp_rank=0, active_blocks=10)])
        request.ClearField("overlap_weight")
        response = await stub.FindBestWorker(request)
        costs = {(c.worker_id, c.dp_rank): c.cost for c in response.candidates}
        assert costs[("w-a", 0)] == 10.0  # a full hit: only its load
        assert costs[("w-c", 0)] == 32.0  # one block still to prefill, times 32
        assert response.worker_id == "w-a"

    async def test_overlap_weight_scales_the_prefill_term(
            self, stub: pb_grpc.KvIndexerStub) -> None:
        """A higher overlap_weight lets the hit win back despite its load."""
        response = await stub.FindBestWorker(self.find(
            loads=[pb.WorkerLoad(worker_id="w-a", dp_rank=0, active_blocks=10)],
            overlap_weight=12.0))
        costs = {(c.worker_id, c.dp_rank): c.cost for c in response.candidates}
        assert costs == {("w-a", 0): 10.0, ("w-c", 0): 12.0, ("w-b", 0): 24.0,
                         ("w-b", 1): 48.0}
        assert response.worker_id == "w-a"

    async def test_ties_go_to_more_matched_blocks(self, stub: pb_grpc.KvIndexerStub) -> None:
        """Equal cost: the candidate with more matched blocks wins."""
        response = await stub.FindBestWorker(self.find(loads=[
            pb.WorkerLoad(worker_id="w-a", dp_rank=0, active_blocks=2)]))
        costs = {(c.worker_id, c.dp_rank): c.cost for c in response.candidates}
        assert costs[("w-a", 0)] == costs[("w-b", 0)] == 2.0
        assert costs[("w-c", 0)] == 1.0
        assert response.worker_id == "w-c"
        tied = await stub.FindBestWorker(self.find(workers=["w-a", "w-b"], loads=[
            pb.WorkerLoad(worker_id="w-a", dp_rank=0, active_blocks=2)]))
        assert (tied.worker_id, tied.dp_rank) == ("w-a", 0)

    async def test_ties_then_waiting_requests_then_worker_id(
            self, stub: pb_grpc.KvIndexerStub) -> None:
        """A prompt nobody holds: all costs equal; fewer waiting, then the smaller id."""
        miss = path_tokens((2, 2))
        response = await stub.FindBestWorker(self.find(miss, loads=[
            pb.WorkerLoad(worker_id="w-a", dp_rank=0, waiting_requests=3)]))
        assert {c.cost for c in response.candidates} == {2.0}
        assert (response.worker_id, response.dp_rank) == ("w-b", 0)
        assert response.candidates[-1].worker_id == "w-a"

    async def test_seeded_sampling_is_reproducible(self, stub: pb_grpc.KvIndexerStub) -> None:
        """temperature > 0 samples; the same seed gives the same choice."""
        picks = set()
        for seed in range(20):
            first = await stub.FindBestWorker(self.find(temperature=2.0, seed=seed))
            again = await stub.FindBestWorker(self.find(temperature=2.0, seed=seed))
            assert (first.worker_id, first.dp_rank) == (again.worker_id, again.dp_rank)
            picks.add((first.worker_id, first.dp_rank))
        assert len(picks) > 1

    async def test_workers_filter_limits_candidates(self, stub: pb_grpc.KvIndexerStub) -> None:
        """score.workers restricts the candidates to those workers' ranks."""
        response = await stub.FindBestWorker(self.find(workers=["w-b"]))
        assert {(c.worker_id, c.dp_rank) for c in response.candidates} == {("w-b", 0),
                                                                           ("w-b", 1)}
        assert (response.worker_id, response.dp_rank) == ("w-b", 0)

    async def test_no_live_workers_is_failed_precondition(
            self, stub: pb_grpc.KvIndexerStub) -> None:
        """No candidate: FAILED_PRECONDITION naming the model."""
        request = pb.FindBestWorkerRequest(score=pb.ScoreRequest(model="nobody/m",
                                                                 token_ids=TOKENS))
        code, details = await status_of(stub.FindBestWorker(request))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "'nobody/m'" in details
        code, details = await status_of(stub.FindBestWorker(self.find(workers=["gone"])))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert MODEL in details

    @pytest.mark.parametrize(("kwargs", "word"), [
        ({"overlap_weight": -1.0}, "overlap_weight"),
        ({"temperature": float("inf")}, "temperature"),
    ])
    async def test_bad_knobs_are_invalid_argument(
        self, stub: pb_grpc.KvIndexerStub, kwargs: dict[str, float], word: str
    ) -> None:
        """A negative or infinite knob: INVALID_ARGUMENT naming it."""
        code, details = await status_of(stub.FindBestWorker(self.find(**kwargs)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert word in details

    async def test_query_errors_name_the_nested_field(
            self, stub: pb_grpc.KvIndexerStub) -> None:
        """The query's fields are named under `score.`."""
        code, details = await status_of(stub.FindBestWorker(pb.FindBestWorkerRequest(
            score=pb.ScoreRequest(model=""))))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "score.model must not be empty" in details


class TestScoreBatch:
    """ScoreBatch: Score answers in request order; one bad query refuses the batch."""

    async def test_answers_in_order_equal_single_scores(
            self, stub: pb_grpc.KvIndexerStub) -> None:
        """Each answer equals the Score of the same request."""
        requests = [pb.ScoreRequest(model=MODEL, token_ids=path_tokens(p))
                    for p in ((0, 0), (1,), PROMPT, (2,))]
        requests.append(pb.ScoreRequest(model="nobody", block_keys=[5]))
        batched = await stub.ScoreBatch(pb.ScoreBatchRequest(requests=requests))
        assert len(batched.responses) == len(requests)
        for request, response in zip(requests, batched.responses, strict=True):
            single = await stub.Score(request)
            assert rows(response) == rows(single)
            assert response.query_blocks == single.query_blocks

    async def test_empty_batch_is_empty(self, stub: pb_grpc.KvIndexerStub) -> None:
        """No requests, no responses."""
        assert list((await stub.ScoreBatch(pb.ScoreBatchRequest())).responses) == []

    async def test_invalid_item_is_named_by_position(self, stub: pb_grpc.KvIndexerStub) -> None:
        """The message names requests[i] and the field."""
        requests = [pb.ScoreRequest(model=MODEL, token_ids=TOKENS), pb.ScoreRequest(model=MODEL)]
        code, details = await status_of(stub.ScoreBatch(pb.ScoreBatchRequest(requests=requests)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "requests[1].token_ids" in details

    async def test_too_many_requests_are_refused(self, index: Index) -> None:
        """More than max_batch_requests queries: INVALID_ARGUMENT."""
        settings = ServiceSettings(worker_cache_seconds=0, max_batch_requests=3)
        request = pb.ScoreBatchRequest(requests=[pb.ScoreRequest(model=MODEL, token_ids=TOKENS)]
                                       * 4)
        async with serving(index, settings) as (s, _):
            code, details = await status_of(s.ScoreBatch(request))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "4 queries exceed the limit of 3" in details


class TestListWorkers:
    """ListWorkers: every worker rank with epoch, position, health, tiers and age."""

    async def test_lists_every_rank_with_its_state(self, stub: pb_grpc.KvIndexerStub) -> None:
        """Fields come from the index; order is model, worker_id, dp_rank."""
        response = await stub.ListWorkers(pb.ListWorkersRequest(model=MODEL))
        assert [(w.worker_id, w.dp_rank) for w in response.workers] == [
            ("w-a", 0), ("w-b", 0), ("w-b", 1), ("w-c", 0)]
        w_c = response.workers[3]
        assert (w_c.model, w_c.epoch, w_c.last_seq, w_c.degraded) == (MODEL, 1, 0, False)
        assert dict(w_c.blocks_by_tier) == {"cpu": 3}
        assert w_c.last_event_age_seconds == pytest.approx(AGE, abs=2.0)

    async def test_empty_model_lists_every_model(
            self, index: Index, stub: pb_grpc.KvIndexerStub) -> None:
        """model "" lists all models; a model filters."""
        await index.apply([batch("w-x", 0, 0, [store((1, 1))], model="other")])
        everything = await stub.ListWorkers(pb.ListWorkersRequest())
        assert [w.model for w in everything.workers] == [MODEL] * 4 + ["other"]
        other = await stub.ListWorkers(pb.ListWorkersRequest(model="other"))
        assert [(w.worker_id, w.last_seq) for w in other.workers] == [("w-x", 0)]

    async def test_live_worker_source_filters_everything(self, index: Index) -> None:
        """A liveness source that hides a worker (or one rank) hides it from every RPC."""

        async def live(model: str | None) -> list[WorkerInfo]:
            return [w for w in await index.workers(model)
                    if w.worker_id != "w-a" and (w.worker_id, w.dp_rank) != ("w-b", 1)]

        async with serving(index, live_workers=live) as (s, _):
            listed = await s.ListWorkers(pb.ListWorkersRequest())
            scored = await s.Score(pb.ScoreRequest(model=MODEL, token_ids=TOKENS,
                                                   include_zero=True))
            best = await s.FindBestWorker(pb.FindBestWorkerRequest(
                score=pb.ScoreRequest(model=MODEL, token_ids=TOKENS)))
        assert {(w.worker_id, w.dp_rank) for w in listed.workers} == {("w-b", 0), ("w-c", 0)}
        assert rows(scored) == [("w-c", 0, 3), ("w-b", 0, 2)]  # a dead rank of a live worker too
        assert best.worker_id == "w-c"
        assert {(c.worker_id, c.dp_rank) for c in best.candidates} == {("w-b", 0), ("w-c", 0)}


class TestGetStats:
    """GetStats: index counters, merged with the consumer's when it has them."""

    async def test_index_counters(self, index: Index, stub: pb_grpc.KvIndexerStub) -> None:
        """Applied batches, stored blocks, drops by reason, workers and lag."""
        await index.apply([batch("w-b", 0, 1, [make_event("orphan", (0, 1), 1)])])
        stats = await stub.GetStats(pb.GetStatsRequest())
        assert (stats.batches_applied, stats.events_applied) == (5, 5)
        assert stats.blocks_stored == 4 + 2 + 1 + 3
        assert dict(stats.dropped) == {"unknown_parent": 1}
        assert stats.resyncs_requested == 1
        assert stats.workers == 4
        assert stats.lag_seconds == pytest.approx(AGE, abs=2.0)

    async def test_consumer_counters_are_merged(self, index: Index) -> None:
        """Gaps, dead letters, resyncs sent and the newest batch come from the consumer;
        duplicates and stale batches from the index (the ledger judges them)."""
        consumer = ConsumerStats(gaps=3, resyncs_requested=4,
                                 dead_letters={"undecodable": 5}, last_applied_ts=time.time(),
                                 dropped={"pool_not_declared": 2})
        async with serving(index, consumer_stats=consumer) as (s, _):
            stats = await s.GetStats(pb.GetStatsRequest())
            consumer.gaps += 1  # read live, not copied at start
            later = await s.GetStats(pb.GetStatsRequest())
        assert (stats.duplicates, stats.stale, stats.gaps, stats.resyncs_requested) == (0, 0, 3, 4)
        assert dict(stats.dropped) == {"undecodable": 5, "pool_not_declared": 2}
        assert stats.lag_seconds < 2.0
        assert later.gaps == 4


class TestHealthAndReflection:
    """The standard health service and server reflection are registered."""

    async def test_health_is_serving(self, stub: pb_grpc.KvIndexerStub, index: Index) -> None:
        """SERVING for the server and for kvindex.v1.KvIndexer; NOT_FOUND for others."""
        async with serving(index) as (_, port), grpc.aio.insecure_channel(
                f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", SERVICE_NAME):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            code, _ = await status_of(health.Check(health_pb2.HealthCheckRequest(service="x")))
            assert code == grpc.StatusCode.NOT_FOUND

    async def test_reflection_lists_the_services(self, index: Index) -> None:
        """A reflection client finds KvIndexer and its methods."""

        def discover(port: int) -> tuple[list[str], list[str]]:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                db = ProtoReflectionDescriptorDatabase(channel)
                services = list(db.get_services())
                file = db.FindFileContainingSymbol(SERVICE_NAME)
                return services, [m.name for m in file.service[0].method]

        async with serving(index) as (_, port):
            services, methods = await asyncio.to_thread(discover, port)
        assert SERVICE_NAME in services and "grpc.health.v1.Health" in services
        assert methods == ["Score", "FindBestWorker", "FindBestWorkerStream", "ScoreBatch",
                           "ListWorkers", "GetStats", "Diagnose"]


class TestWorkerDirectory:
    """Live workers are asked of one source, cached for worker_cache_seconds."""

    async def test_cached_list_is_fetched_once(self, index: Index) -> None:
        """Concurrent Score calls within the TTL share one fetch."""
        calls: list[str | None] = []

        async def source(model: str | None) -> list[WorkerInfo]:
            calls.append(model)
            await asyncio.sleep(0.01)
            return await index.workers(model)

        settings = ServiceSettings(worker_cache_seconds=60)
        async with serving(index, settings, live_workers=source) as (s, _):
            replies = await asyncio.gather(*(
                s.Score(pb.ScoreRequest(model=MODEL, token_ids=TOKENS)) for _ in range(20)))
        assert all(rows(r)[0] == ("w-a", 0, 4) for r in replies)
        assert calls == [MODEL]

    async def test_no_cache_asks_every_time(self, index: Index) -> None:
        """worker_cache_seconds 0: one fetch per call."""
        calls: list[str | None] = []

        async def source(model: str | None) -> list[WorkerInfo]:
            calls.append(model)
            return await index.workers(model)

        async with serving(index, live_workers=source) as (s, _):
            for _ in range(3):
                await s.Score(pb.ScoreRequest(model=MODEL, token_ids=TOKENS))
        assert calls == [MODEL] * 3

    async def test_expired_list_is_served_while_it_refreshes(self) -> None:
        """Past the TTL the old list answers at once and a background refresh replaces it."""
        versions = iter(range(100))
        gate = asyncio.Event()

        async def source(model: str | None) -> list[WorkerInfo]:
            version = next(versions)
            if version:
                await gate.wait()
            return [WorkerInfo(model or "", f"w{version}", 0, 1, 0, False, {}, 0.0)]

        directory = WorkerDirectory(source, ttl=0.05)
        first = await directory.candidates("m")
        await asyncio.sleep(0.06)
        stale = await directory.candidates("m")  # expired: answered from the cache
        assert stale is first
        gate.set()
        await asyncio.sleep(0.01)
        assert (await directory.candidates("m")).ids == frozenset({"w1"})

    async def test_an_empty_list_is_not_kept_while_workers_register(self) -> None:
        """No workers yet: asked again after 50 ms (not the TTL), and never served stale."""
        workers: list[WorkerInfo] = []
        calls = 0

        async def source(model: str | None) -> list[WorkerInfo]:
            nonlocal calls
            calls += 1
            return list(workers)

        directory = WorkerDirectory(source, ttl=60)
        assert not await directory.candidates("m")
        assert not await directory.candidates("m") and calls == 1  # briefly cached
        workers.append(WorkerInfo("m", "w0", 0, 1, 0, False, {}, 0.0))
        await asyncio.sleep(0.06)
        assert (await directory.candidates("m")).ids == frozenset({"w0"})
        assert calls == 2
        workers.clear()  # a non-empty list is kept for the TTL
        assert (await directory.candidates("m")).ids == frozenset({"w0"})

    async def test_restrict_keeps_named_workers(self) -> None:
        """CandidateSet.restrict narrows by worker id and recomputes freshness inputs."""
        infos = [WorkerInfo("m", w, r, 1, 0, w == "b", {}, ts)
                 for w, r, ts in (("a", 0, 10.0), ("b", 0, 20.0), ("b", 1, 5.0))]
        only_a = CandidateSet(infos).restrict({"a"})
        assert (only_a.refs, only_a.degraded, only_a.newest_ts) == ({("a", 0)}, [], 10.0)


class TestLoadLimits:
    """Bounded backend concurrency and load shedding."""

    async def test_index_queries_in_flight_are_bounded(self, index: Index) -> None:
        """Beyond max_concurrent_queries, Score calls wait their turn and still succeed."""
        counting = CountingScores(index, delay=0.05)
        settings = ServiceSettings(worker_cache_seconds=0, max_concurrent_queries=2)
        async with serving(counting, settings) as (s, _):
            replies = await asyncio.gather(*(
                s.Score(pb.ScoreRequest(model=MODEL, token_ids=TOKENS)) for _ in range(8)))
        assert all(rows(r)[0] == ("w-a", 0, 4) for r in replies)
        assert counting.most == 2

    async def test_rpcs_beyond_the_limit_are_shed(self, index: Index) -> None:
        """More RPCs than max_concurrent_rpcs at once: the excess is RESOURCE_EXHAUSTED."""
        settings = ServiceSettings(worker_cache_seconds=0, max_concurrent_rpcs=2)
        async with serving(SlowScores(index, delay=0.3), settings) as (s, _):
            outcomes = await asyncio.gather(*(
                s.Score(pb.ScoreRequest(model=MODEL, token_ids=TOKENS)) for _ in range(6)),
                return_exceptions=True)
        codes = [o.code() if isinstance(o, grpc.aio.AioRpcError) else grpc.StatusCode.OK
                 for o in outcomes]
        assert codes.count(grpc.StatusCode.OK) == 2
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 4


METHODS = pb.DESCRIPTOR.services_by_name["KvIndexer"].methods
UNARY_METHODS = [m for m in METHODS if not m.client_streaming]
MESSAGE_TYPES = {m.name: getattr(pb, m.input_type.name) for m in METHODS}


def undecodable(method: str, count: int = 40) -> list[bytes]:
    """Bodies the method's request type does not parse: fixed cases (truncated varint,
    length past the end, a field of wire type 7, invalid UTF-8 in a string field), then
    seeded random bytes the parser rejects."""
    message_type = MESSAGE_TYPES[method]
    fixed = [b"\x08\x80", b"\x0a\xff\xff\xff\xff\x0f", b"\x0f", b"\x0a\x02\xff\xfe"]
    rng = random.Random(f"{method}-bodies")
    found: list[bytes] = []
    for body in fixed + [rng.randbytes(rng.randint(1, 64)) for _ in range(20 * count)]:
        try:
            message_type.FromString(body)
        except Exception:  # noqa: BLE001 - DecodeError: exactly what is wanted
            found.append(body)
        if len(found) == count:
            break
    return found


class TestHardening:
    """Undecodable requests, oversized lists and idle or excess connections."""

    @pytest.mark.parametrize("method", [m.name for m in UNARY_METHODS])
    async def test_undecodable_request_is_invalid_argument(self, method: str) -> None:
        """Bytes that are no valid request: INVALID_ARGUMENT naming the message type
        (gRPC's own answer to a deserialiser's exception is UNKNOWN); the server goes on."""
        index = MemoryIndex(CONFIG)
        await index.apply(scenario())
        bodies = undecodable(method)
        assert len(bodies) == 40
        async with serving(index) as (stub, port):
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            try:
                call = channel.unary_unary(f"/{SERVICE_NAME}/{method}")
                for body in bodies:
                    code, details = await status_of(call(body, timeout=10))
                    assert code == grpc.StatusCode.INVALID_ARGUMENT, body
                    assert f"not a valid {MESSAGE_TYPES[method].DESCRIPTOR.full_name}" in details
            finally:
                await channel.close()
            response = await stub.Score(pb.ScoreRequest(model=MODEL, token_ids=TOKENS))
            assert rows(response)[0] == ("w-a", 0, 4)

    async def test_workers_and_loads_over_the_default_caps(self, index: Index) -> None:
        """65,537 worker ids or load entries: INVALID_ARGUMENT naming the field and the
        cap, in every RPC that carries them; 65,536 are served."""
        at_cap = [f"w-{i}" for i in range(65_535)] + ["w-a"]
        over = [*at_cap, "one-more"]
        loads = [pb.WorkerLoad(worker_id=w) for w in at_cap]
        query = pb.ScoreRequest(model=MODEL, token_ids=TOKENS)
        async with serving(index) as (stub, _):
            answer = await stub.Score(pb.ScoreRequest(model=MODEL, token_ids=TOKENS,
                                                      workers=at_cap))
            assert rows(answer) == [("w-a", 0, 4)]
            best = await stub.FindBestWorker(pb.FindBestWorkerRequest(
                score=pb.ScoreRequest(model=MODEL, token_ids=TOKENS, workers=at_cap),
                loads=loads))
            assert best.worker_id == "w-a"
            refused = [
                (stub.Score(pb.ScoreRequest(model=MODEL, token_ids=TOKENS, workers=over)),
                 "workers: 65537 worker ids exceed the limit of 65536"),
                (stub.FindBestWorker(pb.FindBestWorkerRequest(score=pb.ScoreRequest(
                    model=MODEL, token_ids=TOKENS, workers=over))),
                 "score.workers: 65537 worker ids exceed the limit of 65536"),
                (stub.FindBestWorker(pb.FindBestWorkerRequest(
                    score=query, loads=[*loads, pb.WorkerLoad(worker_id="x")])),
                 "loads: 65537 entries exceed the limit of 65536"),
                (stub.ScoreBatch(pb.ScoreBatchRequest(requests=[query, pb.ScoreRequest(
                    model=MODEL, token_ids=TOKENS, workers=over)])),
                 "requests[1].workers: 65537 worker ids exceed the limit of 65536"),
            ]
            for call, message in refused:
                code, details = await status_of(call)
                assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, message)

    async def test_caps_are_settings(self, index: Index) -> None:
        """max_request_workers and max_request_loads set the caps."""
        settings = ServiceSettings(worker_cache_seconds=0, max_request_workers=2,
                                   max_request_loads=1)
        loads = [pb.WorkerLoad(worker_id="w-a"), pb.WorkerLoad(worker_id="w-b")]
        async with serving(index, settings) as (stub, _):
            code, details = await status_of(stub.Score(pb.ScoreRequest(
                model=MODEL, token_ids=TOKENS, workers=["w-a", "w-b", "w-c"])))
            assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT,
                                       "workers: 3 worker ids exceed the limit of 2")
            code, details = await status_of(stub.FindBestWorker(pb.FindBestWorkerRequest(
                score=pb.ScoreRequest(model=MODEL, token_ids=TOKENS), loads=loads)))
            assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT,
                                       "loads: 2 entries exceed the limit of 1")
            answer = await stub.Score(pb.ScoreRequest(model=MODEL, token_ids=TOKENS,
                                                      workers=["w-a", "w-b"]))
            assert [r[0] for r in rows(answer)] == ["w-a", "w-b"]

    async def test_idle_connection_is_closed(self) -> None:
        """A connection without a call for connection_idle_s is closed by the server (the
        client's channel goes IDLE) and the next call reconnects."""
        index = MemoryIndex(CONFIG)
        await index.apply(scenario())
        settings = ServiceSettings(worker_cache_seconds=0, connection_idle_s=0.5)
        async with serving(index, settings) as (_, port):
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                                options=[("grpc.use_local_subchannel_pool", 1)])
            try:
                stub = pb_grpc.KvIndexerStub(channel)
                await stub.GetStats(pb.GetStatsRequest(), timeout=10)
                assert channel.get_state() == grpc.ChannelConnectivity.READY
                deadline = time.monotonic() + 20
                while (channel.get_state() == grpc.ChannelConnectivity.READY
                       and time.monotonic() < deadline):
                    await asyncio.sleep(0.05)
                assert channel.get_state() == grpc.ChannelConnectivity.IDLE
                answer = await stub.Score(pb.ScoreRequest(model=MODEL, token_ids=TOKENS),
                                          timeout=10)
                assert rows(answer)[0] == ("w-a", 0, 4)
            finally:
                await channel.close()

    async def test_connections_beyond_the_cap_are_refused(self) -> None:
        """With max_connections 2, a third connection is closed at once (UNAVAILABLE);
        once one of the two closes, a new one is accepted."""
        index = MemoryIndex(CONFIG)
        settings = ServiceSettings(worker_cache_seconds=0, connection_idle_s=0,
                                   max_connections=2)
        async with serving(index, settings) as (_, port):
            # A refused channel reconnects in the background after its backoff. Long
            # backoffs: a refused channel is closed before it tries again. With short
            # ones, a reconnect in flight while the channel closed could complete after
            # the close, orphaned, and hold the freed slot (this test turns the idle
            # timeout off, which would reclaim it): under load it did, and every fresh
            # channel after it was refused.
            options = [("grpc.use_local_subchannel_pool", 1),
                       ("grpc.initial_reconnect_backoff_ms", 30_000),
                       ("grpc.min_reconnect_backoff_ms", 30_000),
                       ("grpc.max_reconnect_backoff_ms", 30_000)]
            channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)
                        for _ in range(4)]
            try:
                stubs = [pb_grpc.KvIndexerStub(c) for c in channels]
                for stub in stubs[:2]:
                    await stub.GetStats(pb.GetStatsRequest(), timeout=10)
                code, _ = await status_of(stubs[2].GetStats(pb.GetStatsRequest(), timeout=10))
                assert code == grpc.StatusCode.UNAVAILABLE
                # The refused channel would keep reconnecting in the background and could
                # take the slot freed next before the fourth does.
                await channels[2].close()
                await channels[0].close()
                deadline = time.monotonic() + 60
                while True:  # the server notices the close by itself
                    # a fresh channel each try: a refused one's own reconnect backoff
                    # would otherwise decide when it tries again
                    fresh = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)
                    try:
                        await pb_grpc.KvIndexerStub(fresh).GetStats(pb.GetStatsRequest(),
                                                                    timeout=10)
                        break
                    except grpc.aio.AioRpcError:
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.1)
                    finally:
                        await fresh.close()
            finally:
                for channel in channels:
                    await channel.close()

    def test_server_options(self) -> None:
        """Idle timeout and connection cap become grpc channel arguments; 0 / None: none."""
        options = dict(server_options(ServiceSettings(connection_idle_s=1.5,
                                                      max_connections=100)))
        assert options["grpc.max_connection_idle_ms"] == 1500
        assert options["grpc.max_allowed_incoming_connections"] == 100
        off = dict(server_options(ServiceSettings(connection_idle_s=0, max_connections=None)))
        assert "grpc.max_connection_idle_ms" not in off
        assert "grpc.max_allowed_incoming_connections" not in off

    def test_connection_cap_fits_the_descriptor_limit(self) -> None:
        """A cap above RLIMIT_NOFILE less FD_RESERVE is lowered to it, with a warning."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            pytest.skip("no descriptor limit")
        with capture_logs() as logs:
            cap = connection_cap(ServiceSettings(max_connections=soft))
        assert cap == max(1, soft - FD_RESERVE)
        assert [e["event"] for e in logs] == ["grpc_connection_cap_lowered"]
        assert connection_cap(ServiceSettings(max_connections=1)) == 1


class TestConcurrency:
    """Reads run while ingest runs: neither waits for the other to finish."""

    async def test_scores_interleave_with_ingest(
            self, index: Index, stub: pb_grpc.KvIndexerStub) -> None:
        """Score calls complete while ingest runs, and ingest progresses between them.

        Ingest keeps applying chunks until the reads are done (capped far above what the
        reads need), so the outcome depends on scheduling fairness, not on how fast one
        machine applies a fixed amount of work.
        """
        events: list[str] = []
        reads_done = asyncio.Event()
        max_chunks, chunk = 20_000, 20

        def ingest_chunk(first_seq: int) -> list[EventBatch]:
            return [batch("w-ingest", 0, seq, [BlockStored(
                block_hashes=[10_000 + seq], token_ids=pack([seq, seq, seq, seq]),
                block_size=BLOCK)]) for seq in range(first_seq, first_seq + chunk)]

        async def apply_until_reads_done() -> None:
            for n in range(max_chunks):
                if reads_done.is_set():
                    return
                await index.apply(ingest_chunk(n * chunk))
                events.append("apply")
                await asyncio.sleep(0)

        async def read() -> None:
            for _ in range(30):
                response = await stub.Score(pb.ScoreRequest(model=MODEL, token_ids=TOKENS))
                assert rows(response)[0] == ("w-a", 0, 4)
                events.append("score")
            reads_done.set()

        await asyncio.gather(apply_until_reads_done(), read())
        assert events.count("score") == 30
        assert events.count("apply") < max_chunks, "no Score completed while ingest was running"
        first_score = events.index("score")
        last_score = len(events) - 1 - events[::-1].index("score")
        assert "apply" in events[first_score:last_score], "ingest stalled behind the reads"


class TestServedIndexConfig:
    def test_limits_come_from_the_index_behind_the_metrics_wrapper(self) -> None:
        """The servicer's own size check uses the served index's config, also when that
        index is wrapped for metrics (it fell back to IndexConfig() defaults before)."""
        from prometheus_client import CollectorRegistry

        from indexer.index.factory import served_index

        config = IndexConfig(max_query_tokens=64)
        wrapped = served_index(MemoryIndex(config), CollectorRegistry())
        assert KvIndexerService(wrapped).config.max_query_tokens == 64
