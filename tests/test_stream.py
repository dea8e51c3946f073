"""FindBestWorkerStream: answers in request order and equal to the unary call's, errors per
answer, cancellation, the in-flight window and size limit, bearer tokens, the client's
two stream faces; and the bounded-answer fields (max_candidates, max_scores)."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bench.workload import make_workload, worker_name
from indexer import cli, loadtest
from indexer._proto.kvindex.v1 import indexer_pb2 as pb
from indexer._proto.kvindex.v1 import indexer_pb2_grpc as pb_grpc
from indexer.client import (
    AsyncIndexerClient,
    Decision,
    FailedPreconditionError,
    IndexerClient,
    InvalidArgumentError,
    Query,
    StreamClosedError,
    WorkerLoad,
)
from indexer.errors import BackendError
from indexer.index.memory import MemoryIndex
from indexer.index.protocol import Index, IndexConfig, ScoreQuery, ScoreResult
from indexer.scheduling import Candidate, rank_costs, top_costs
from indexer.serve.auth import GrpcSecurity
from indexer.serve.grpc_handlers import SERVICE_NAME
from indexer.serve.service import ServiceSettings
from tests.support.grpc_scenario import CONFIG, MODEL, TOKENS, scenario, serving
from tests.support.protobuf_wire import varint

FIELD_MODEL = "field/model"
FIELD_RANKS = 1_024
STREAM_PATH = f"/{SERVICE_NAME}/FindBestWorkerStream"
OK, INVALID_ARGUMENT, FAILED_PRECONDITION, UNAVAILABLE = 0, 3, 9, 14
FAILING_ADAPTER = "fails"


@pytest.fixture(scope="module")
def field_index() -> tuple[MemoryIndex, list[list[int]]]:
    """1,024 worker ranks (every one live) holding 150,000 blocks of shared-prefix
    conversations, and 8,192-token prompts over them (bench/workload.py)."""
    workload = make_workload(FIELD_RANKS, 150_000, seed=18, n_queries=120)
    index = MemoryIndex(IndexConfig())
    index.sync.apply(workload.batches(FIELD_MODEL))
    index.sync.apply(workload.idle_rank_batches(FIELD_MODEL))
    return index, workload.queries


def random_request(rng: random.Random, prompt: list[int]) -> pb.FindBestWorkerRequest:
    """A FindBestWorker request with random loads, knobs, answer size and filters."""
    request = pb.FindBestWorkerRequest(score=pb.ScoreRequest(model=FIELD_MODEL,
                                                             token_ids=prompt))
    for _ in range(rng.choice([0, 0, 3, 40, 300])):
        request.loads.add(worker_id=worker_name(rng.randrange(FIELD_RANKS + 8)), dp_rank=0,
                          active_blocks=rng.choice([0, 1, 7, 300, 5000]),
                          waiting_requests=rng.randrange(3))
    if rng.random() < 0.2:
        request.score.workers.extend(worker_name(rng.randrange(FIELD_RANKS))
                                     for _ in range(rng.randrange(1, 200)))
    choice = rng.choice([None, 0, 1, 3, 8, 2000])
    if choice is not None:
        request.max_candidates = choice
    weight = rng.choice([None, 0.0, 1.0, 32.0])
    if weight is not None:
        request.overlap_weight = weight
    if rng.random() < 0.15:
        request.temperature = 0.7
        request.seed = rng.randrange(1 << 32)
    if rng.random() < 0.2:
        request.storage_load_weight = rng.choice([0.0, 0.5, 1.0])
    return request


def comparable(response: pb.FindBestWorkerResponse) -> bytes:
    """The answer without its event age (it grows between two calls)."""
    copy = pb.FindBestWorkerResponse()
    copy.CopyFrom(response)
    copy.freshness.last_event_age_seconds = 0.0
    return copy.SerializeToString(deterministic=True)


def message(*requests: pb.FindBestWorkerRequest) -> pb.FindBestWorkerStreamRequest:
    return pb.FindBestWorkerStreamRequest(requests=requests)


async def stream_all(stub: pb_grpc.KvIndexerStub, requests: list[Any], batch: int = 1,
                     **kwargs: Any) -> list[pb.StreamedDecision]:
    """Every answer to `requests` sent `batch` to a message, in order."""
    async def feed() -> AsyncIterator[pb.FindBestWorkerStreamRequest]:
        for start in range(0, len(requests), batch):
            yield message(*requests[start : start + batch])

    return [answer async for response in stub.FindBestWorkerStream(feed(), **kwargs)
            for answer in response.answers]


async def unary_answer(stub: pb_grpc.KvIndexerStub, request: pb.FindBestWorkerRequest
                       ) -> pb.FindBestWorkerResponse | grpc.aio.AioRpcError:
    try:
        response: pb.FindBestWorkerResponse = await stub.FindBestWorker(request, timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc
    return response


class JitteryScores:
    """A real index whose score() first sleeps a random 0-2 ms, so that decisions run
    concurrently within a stream's window finish out of order."""

    def __init__(self, inner: Index, seed: int) -> None:
        self.inner = inner
        self.rng = random.Random(seed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def score(self, query: ScoreQuery) -> ScoreResult:
        await asyncio.sleep(self.rng.random() * 0.002)
        return await self.inner.score(query)


class GatedScores:
    """A real index whose score() waits for `gate` to open; counts calls started and
    cancelled, and the most in progress at once."""

    def __init__(self, inner: Index) -> None:
        self.inner = inner
        self.gate = asyncio.Event()
        self.started = 0
        self.cancelled = 0
        self.running = 0
        self.most_running = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def score(self, query: ScoreQuery) -> ScoreResult:
        self.started += 1
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1
        return await self.inner.score(query)


class FailingForAdapter:
    """A real index whose score() raises BackendError for queries of LoRA adapter
    `FAILING_ADAPTER` (as if the backend went away for that one query)."""

    def __init__(self, inner: Index) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def score(self, query: ScoreQuery) -> ScoreResult:
        if query.lora_name == FAILING_ADAPTER:
            raise BackendError("redis went away")
        return await self.inner.score(query)


async def scenario_index() -> MemoryIndex:
    index = MemoryIndex(CONFIG)
    await index.apply(scenario())
    return index


def scenario_request(**fields: Any) -> pb.FindBestWorkerRequest:
    return pb.FindBestWorkerRequest(score=pb.ScoreRequest(model=MODEL, token_ids=TOKENS),
                                    **fields)


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


class TestStreamEqualsUnary:
    """Streamed answers are the unary call's, in request order, on 1,024 ranks."""

    @pytest.mark.parametrize(("window", "batch"), [(1, 1), (16, 1), (4, 7)])
    async def test_random_requests_answer_like_unary_calls(
        self, field_index: tuple[MemoryIndex, list[list[int]]], window: int, batch: int
    ) -> None:
        """300 random requests (loads, filters, knobs, answer sizes, seeded sampling) over
        8k-token prompts, one or 7 to a message: each streamed answer equals the unary
        answer to the same request; with a window above 1 over a jittery index, messages
        finish out of order but answers keep request order."""
        index, prompts = field_index
        rng = random.Random(window)
        requests = [random_request(rng, rng.choice(prompts)) for _ in range(300)]
        served = JitteryScores(index, seed=window) if window > 1 else index
        settings = ServiceSettings(stream_window=window)
        async with serving(served, settings) as (stub, _):
            streamed = await stream_all(stub, requests, batch, timeout=60)
            unary = [await unary_answer(stub, r) for r in requests]
        assert len(streamed) == len(requests)
        for request, answer, single in zip(requests, streamed, unary, strict=True):
            if isinstance(single, grpc.aio.AioRpcError):
                assert (answer.code, answer.message) == (single.code().value[0],
                                                         single.details())
                continue
            assert answer.code == OK, answer.message
            if not request.HasField("max_candidates"):  # the stream's default is 8
                assert len(answer.answer.candidates) == min(8, answer.answer.candidate_count)
                assert list(answer.answer.candidates) == list(single.candidates)[:8]
                single.ClearField("candidates")
                answer.answer.ClearField("candidates")
            assert comparable(answer.answer) == comparable(single)
        hits = sum(1 for a in streamed if a.answer.matched_blocks)
        assert hits > 100  # the prompts do hit: the comparison is not of empty answers

    async def test_top_candidates_are_those_of_the_full_ranking(
        self, field_index: tuple[MemoryIndex, list[list[int]]]
    ) -> None:
        """At temperature 0 the cheapest-k answer is the head of every candidate ranked
        by `rank_costs` (the reference: every candidate's matched blocks from Score with
        include_zero), for loads on a few ranks and on every rank."""
        index, prompts = field_index
        rng = random.Random(5)
        ranks = [(w.worker_id, w.dp_rank) for w in await index.workers(FIELD_MODEL)]
        assert len(ranks) == FIELD_RANKS
        async with serving(index) as (stub, _):
            for i in range(40):
                prompt = rng.choice(prompts)
                loaded = ranks if i % 4 == 0 else rng.sample(ranks, 20)
                loads = {ref: (rng.randrange(2000), rng.randrange(4)) for ref in loaded}
                request = pb.FindBestWorkerRequest(
                    score=pb.ScoreRequest(model=FIELD_MODEL, token_ids=prompt),
                    max_candidates=10, overlap_weight=rng.choice([1.0, 32.0]))
                for (worker, rank), (active, waiting) in loads.items():
                    request.loads.add(worker_id=worker, dp_rank=rank, active_blocks=active,
                                      waiting_requests=waiting)
                answer = await stub.FindBestWorker(request, timeout=10)
                every = await stub.Score(pb.ScoreRequest(model=FIELD_MODEL, token_ids=prompt,
                                                         include_zero=True), timeout=10)
                reference = rank_costs(
                    [Candidate(s.worker_id, s.dp_rank, s.matched_blocks,
                               *loads.get((s.worker_id, s.dp_rank), (0, 0)))
                     for s in every.scores],
                    every.query_blocks, request.overlap_weight)
                got = [(c.worker_id, c.dp_rank, c.matched_blocks, c.cost)
                       for c in answer.candidates]
                assert got == [(c.worker_id, c.dp_rank, c.matched_blocks, c.cost)
                               for c in reference[:10]]
                assert (answer.worker_id, answer.dp_rank) == got[0][:2]
                assert answer.candidate_count == FIELD_RANKS

    async def test_unset_max_candidates_keeps_every_candidate_on_unary(
        self, field_index: tuple[MemoryIndex, list[list[int]]]
    ) -> None:
        """FindBestWorker without max_candidates answers every candidate, as before the
        field; 0 means every candidate too."""
        index, prompts = field_index
        async with serving(index) as (stub, _):
            for fields in ({}, {"max_candidates": 0}):
                request = pb.FindBestWorkerRequest(
                    score=pb.ScoreRequest(model=FIELD_MODEL, token_ids=prompts[0]), **fields)
                answer = await stub.FindBestWorker(request, timeout=10)
                assert len(answer.candidates) == answer.candidate_count == FIELD_RANKS


class TestMaxScores:
    """Score's max_scores keeps the best entries and says how many there were."""

    async def test_max_scores_cuts_the_best_first_list(self, index: Index) -> None:
        async with serving(index) as (stub, _):
            every = await stub.Score(pb.ScoreRequest(model=MODEL, token_ids=TOKENS))
            top = await stub.Score(pb.ScoreRequest(model=MODEL, token_ids=TOKENS,
                                                   max_scores=2))
        assert len(every.scores) == every.score_count == 3
        assert list(top.scores) == list(every.scores)[:2]
        assert top.score_count == 3


class TestStreamErrors:
    """A failing request is answered with its status; the stream goes on."""

    async def test_each_bad_request_gets_its_own_status(self) -> None:
        index = FailingForAdapter(await scenario_index())
        settings = ServiceSettings(worker_cache_seconds=0, max_request_loads=2)
        too_many_loads = scenario_request()
        for worker in ("w-a", "w-b", "w-c"):
            too_many_loads.loads.add(worker_id=worker)
        requests = [
            scenario_request(),
            pb.FindBestWorkerRequest(score=pb.ScoreRequest(token_ids=TOKENS)),  # no model
            pb.FindBestWorkerRequest(score=pb.ScoreRequest(model="other", token_ids=TOKENS)),
            too_many_loads,
            scenario_request(overlap_weight=-1.0),
            pb.FindBestWorkerRequest(score=pb.ScoreRequest(
                model=MODEL, token_ids=TOKENS, lora_name=FAILING_ADAPTER)),
            scenario_request(),
        ]
        inner = [r.SerializeToString() for r in requests]
        inner.insert(3, b"\x0a\xff\xff")  # a length past the end: not a request
        first = b"".join(b"\x0a" + varint(len(body)) + body for body in inner)
        not_a_message = b"\x0a\xff"  # cannot even be split into requests
        last = message(scenario_request()).SerializeToString()
        async with serving(index, settings) as (_, port):
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            try:
                call = channel.stream_stream(STREAM_PATH)

                async def feed() -> AsyncIterator[bytes]:
                    for body in (first, not_a_message, last):
                        yield body

                raw = [answer async for answer in call(feed(), timeout=10)]
            finally:
                await channel.close()
        responses = [pb.FindBestWorkerStreamResponse.FromString(body) for body in raw]
        assert [len(r.answers) for r in responses] == [len(inner), 1, 1]
        assert responses[1].answers[0].code == INVALID_ARGUMENT
        assert "not a valid kvindex.v1.FindBestWorkerStreamRequest" in \
            responses[1].answers[0].message
        answers = [*responses[0].answers, responses[2].answers[0]]
        assert [a.code for a in answers] == [OK, INVALID_ARGUMENT, FAILED_PRECONDITION,
                                             INVALID_ARGUMENT, INVALID_ARGUMENT,
                                             INVALID_ARGUMENT, UNAVAILABLE, OK, OK]
        assert answers[0].answer.worker_id == answers[-1].answer.worker_id == "w-a"
        assert "score.model" in answers[1].message
        assert "no live workers for model 'other'" in answers[2].message
        assert "not a valid kvindex.v1.FindBestWorkerRequest" in answers[3].message
        assert "loads: 3 entries exceed the limit of 2" in answers[4].message
        assert "overlap_weight" in answers[5].message
        assert not answers[1].HasField("answer")


class TestStreamLifecycle:
    """Cancellation, the in-flight window, the size limit and bearer tokens."""

    async def test_window_bounds_requests_read_and_answers_keep_order(self) -> None:
        """With a window of 4 and the index holding every decision, the server starts 4
        decisions out of 20 written and reads no more; opened, all 20 come in order."""
        index = GatedScores(await scenario_index())
        settings = ServiceSettings(worker_cache_seconds=0, stream_window=4)
        requests = [scenario_request(max_candidates=1 + i % 3) for i in range(20)]
        async with serving(index, settings) as (stub, _):
            call = stub.FindBestWorkerStream(timeout=20)
            for request in requests:
                await call.write(message(request))
            await call.done_writing()
            await eventually(lambda: index.started == 4)
            await asyncio.sleep(0.2)
            assert index.started == 4 and index.most_running == 4
            index.gate.set()
            answers = [answer async for response in call for answer in response.answers]
        assert [len(a.answer.candidates) for a in answers] == [1 + i % 3 for i in range(20)]
        assert index.most_running == 4

    async def test_cancelling_the_stream_stops_its_work_and_the_server_goes_on(self) -> None:
        index = GatedScores(await scenario_index())
        settings = ServiceSettings(worker_cache_seconds=0, stream_window=8)
        async with serving(index, settings) as (stub, _):
            call = stub.FindBestWorkerStream(timeout=20)
            for _ in range(3):
                await call.write(message(scenario_request()))
            await eventually(lambda: index.started == 3)
            call.cancel()
            await eventually(lambda: index.cancelled == 3)
            index.gate.set()
            answers = await stream_all(stub, [scenario_request()], timeout=10)
        assert [a.answer.worker_id for a in answers] == ["w-a"]

    async def test_message_over_the_size_limit_ends_the_stream(self) -> None:
        index = await scenario_index()
        settings = ServiceSettings(worker_cache_seconds=0, max_message_bytes=4096)
        big = pb.FindBestWorkerRequest(score=pb.ScoreRequest(model=MODEL,
                                                             token_ids=[70_000] * 2048))
        async with serving(index, settings) as (stub, _):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stream_all(stub, [scenario_request(), big], timeout=10)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            answers = await stream_all(stub, [scenario_request()], timeout=10)
        assert answers[0].answer.worker_id == "w-a"

    async def test_bearer_token_is_checked_on_the_stream(self) -> None:
        index = await scenario_index()
        security = GrpcSecurity(tokens=(b"s3cret",))
        async with serving(index, security=security) as (stub, _):
            # Refused streams are opened without a request: the refusal comes from the
            # call's metadata, and a request written while the server ends the call can
            # fail in the client first (INTERNAL, "Failed execute_batch") and hide it.
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stream_all(stub, [], timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            wrong = (("authorization", "Bearer nope"),)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stream_all(stub, [], timeout=10, metadata=wrong)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            right = (("authorization", "Bearer s3cret"),)
            answers = await stream_all(stub, [scenario_request()] * 3, timeout=10,
                                       metadata=right)
        assert [a.answer.worker_id for a in answers] == ["w-a"] * 3


class TestClientStreams:
    """The client's decision streams, sync and async, answer like find_best_worker."""

    async def test_sync_face_pipelines_and_raises_per_answer(
        self, field_index: tuple[MemoryIndex, list[list[int]]]
    ) -> None:
        index, prompts = field_index
        loads = [WorkerLoad(worker_name(i), active_blocks=i * 10) for i in range(0, 64, 3)]
        decisions = [Decision(query=Query(model=FIELD_MODEL, token_ids=p), loads=loads,
                              max_candidates=4) for p in prompts[:40]]
        bad = Decision(query=Query(model="nobody", token_ids=prompts[0]))
        async with serving(index) as (_, port):
            def run() -> tuple[list[Any], list[Any], Any]:
                with IndexerClient(f"127.0.0.1:{port}", timeout=10) as client:
                    unary = [client.find_best_worker(d.query, d.loads, max_candidates=4)
                             for d in decisions]
                    with client.decision_stream() as stream:
                        futures = [stream.submit(d) for d in decisions[:20]]
                        failed = stream.submit(bad)
                        futures += [stream.submit(d) for d in decisions[20:]]
                        streamed = [f.result(10) for f in futures]
                        with pytest.raises(FailedPreconditionError):
                            failed.result(10)
                        one = stream.find_best_worker(decisions[0])
                    with pytest.raises(StreamClosedError):
                        stream.submit(decisions[0])
                    return unary, streamed, one

            unary, streamed, one = await asyncio.to_thread(run)
        strip = [(c.worker_id, c.dp_rank, c.candidates, c.candidate_count) for c in unary]
        assert [(c.worker_id, c.dp_rank, c.candidates, c.candidate_count)
                for c in streamed] == strip
        assert (one.worker_id, one.candidates) == (unary[0].worker_id, unary[0].candidates)
        assert all(len(c.candidates) == 4 and c.candidate_count == FIELD_RANKS
                   for c in streamed)

    async def test_async_face_serves_concurrent_callers_in_order(
        self, field_index: tuple[MemoryIndex, list[list[int]]]
    ) -> None:
        index, prompts = field_index
        decisions = [Decision(query=Query(model=FIELD_MODEL, token_ids=p))
                     for p in prompts[:50]]
        async with serving(index) as (_, port), \
                AsyncIndexerClient(f"127.0.0.1:{port}", timeout=10) as client:
            unary = [await client.find_best_worker(d.query, max_candidates=8)
                     for d in decisions]
            async with client.decision_stream() as stream:
                streamed = await asyncio.gather(*(stream.find_best_worker(d)
                                                  for d in decisions))
                with pytest.raises(InvalidArgumentError):
                    await stream.find_best_worker(
                        Decision(query=Query(model=FIELD_MODEL, token_ids=prompts[0]),
                                 overlap_weight=float("nan")))
                after = await stream.find_best_worker(decisions[1])
            with pytest.raises(StreamClosedError):
                await stream.find_best_worker(decisions[0])
        assert [(c.worker_id, c.dp_rank, c.candidates) for c in streamed] == \
            [(c.worker_id, c.dp_rank, c.candidates) for c in unary]
        assert after.candidates == unary[1].candidates


class TestBenchCommand:
    """`kv-indexer bench stream` drives a real server and reports what it measured."""

    @pytest.mark.parametrize("path", ["stream", "unary"])
    async def test_reports_decisions_and_latency(
        self, path: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        index = await scenario_index()
        prompts = tmp_path / "prompts.json"
        prompts.write_text(json.dumps([TOKENS, TOKENS[:8]]))
        async with serving(index) as (_, port):
            argv = ["stream", "--model", MODEL, "--tokens-file", str(prompts),
                    "--target", f"127.0.0.1:{port}", "--duration", "0.5", "--in-flight", "4",
                    "--json", *(["--unary"] if path == "unary" else [])]
            status = await asyncio.to_thread(cli.main, ["bench", *argv])
        assert status == 0
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert report["path"] == path and report["errors"] == {}
        assert report["decisions"] > 20 and report["decisions_per_s"] > 0
        assert 0 < report["p50_ms"] <= report["p99_ms"] <= report["max_ms"]

    async def test_errors_are_counted_by_code(self, capsys: pytest.CaptureFixture[str]) -> None:
        index = await scenario_index()
        async with serving(index) as (_, port):
            status = await asyncio.to_thread(
                loadtest.main, ["--model", "nobody", "--prompt-tokens", "16", "--json",
                                "--target", f"127.0.0.1:{port}", "--duration", "0.3"])
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert status == 1 and report["decisions"] == 0
        assert report["errors"]["FAILED_PRECONDITION"] > 0


class TestStreamMetrics:
    """The metrics interceptor counts each streamed answer by its code."""

    async def test_answers_and_refusals_are_counted(self) -> None:
        index = await scenario_index()
        registry = CollectorRegistry()
        security = GrpcSecurity(tokens=(b"s3cret",))
        right = (("authorization", "Bearer s3cret"),)
        requests = [scenario_request(), scenario_request(overlap_weight=-1.0),
                    scenario_request(), pb.FindBestWorkerRequest(
                        score=pb.ScoreRequest(model="other", token_ids=TOKENS))]
        async with serving(index, security=security, registry=registry) as (stub, _):
            answers = await stream_all(stub, requests, timeout=10, metadata=right)
            with pytest.raises(grpc.aio.AioRpcError):
                await stream_all(stub, requests, timeout=10)
        assert [a.code for a in answers] == [OK, INVALID_ARGUMENT, OK, FAILED_PRECONDITION]
        counts = {s.labels["code"]: s.value
                  for family in text_string_to_metric_families(
                      generate_latest(registry).decode())
                  for s in family.samples
                  if s.name == "kv_indexer_grpc_requests_total"
                  and s.labels["method"] == "FindBestWorkerStream"}
        assert counts == {"OK": 2, "INVALID_ARGUMENT": 1, "FAILED_PRECONDITION": 1,
                          "UNAUTHENTICATED": 1}


class TestTopCosts:
    """`top_costs` ranks exactly as `rank_costs` over every candidate, cut to the limit."""

    def test_random_candidate_sets(self) -> None:
        rng = random.Random(11)
        for _ in range(400):
            refs = sorted({(f"w-{rng.randrange(60):02d}", rng.randrange(3))
                           for _ in range(rng.randrange(1, 120))})
            query_blocks = rng.choice([0, 1, 5, 512])
            matched: dict[tuple[str, int], tuple[int, int]] = {}
            for ref in rng.sample(refs, rng.randrange(len(refs) + 1)):
                held = rng.randrange(1, query_blocks + 2)
                matched[ref] = (held, rng.choice([0, 0, held // 2, held]))
            loaded = [*rng.sample(refs, rng.randrange(len(refs) + 1)), ("stranger", 0)]
            loads = {ref: (rng.choice([0, 0, 3, 40]), rng.randrange(3)) for ref in loaded}
            weight = rng.choice([0.0, 0.5, 1.0, 32.0])
            on_storage = rng.choice([0.0, 0.25, 1.0])
            limit = rng.choice([1, 2, 8, len(refs), len(refs) + 5])
            reference = rank_costs(
                [Candidate(w, r, matched.get((w, r), (0, 0))[0],
                           *loads.get((w, r), (0, 0)), matched.get((w, r), (0, 0))[1])
                 for w, r in refs], query_blocks, weight, on_storage)
            got = top_costs(refs, frozenset(refs), matched, loads, query_blocks=query_blocks,
                            overlap_weight=weight, limit=limit, storage_load_weight=on_storage)
            assert got == reference[:limit]
