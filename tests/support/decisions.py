"""FindBestWorker test helpers shared by the fast-decision suites (test_fast_decisions,
test_tally_decisions, test_block_key_bytes): a 1,024-rank field index, random candidate
sets and loads, requests, and raw stream calls."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import grpc
import pytest

from bench.workload import make_workload, worker_name
from indexer._proto.kvindex.v1 import indexer_pb2 as pb
from indexer.index.memory import MemoryIndex
from indexer.index.protocol import IndexConfig, WorkerInfo
from indexer.serve.directory import CandidateSet
from indexer.serve.grpc_handlers import SERVICE_NAME
from kvcore.bus import pack_tokens

FIELD_MODEL = "fast/model"
OK, INVALID_ARGUMENT, FAILED_PRECONDITION = 0, 3, 9
STREAM_PATH = f"/{SERVICE_NAME}/FindBestWorkerStream"
UNARY_PATH = f"/{SERVICE_NAME}/FindBestWorker"


def candidate_set(ranks: int, rng: random.Random) -> CandidateSet:
    """`ranks` live (worker, dp_rank)s, some workers with several ranks, in random order."""
    refs = {(worker_name(rng.randrange(ranks * 2)), rng.choice([0, 0, 0, 1, 3]))
            for _ in range(ranks * 3)}
    chosen = rng.sample(sorted(refs), ranks)
    return CandidateSet([WorkerInfo(FIELD_MODEL, w, r, 1, 0, False, {}, 0.0) for w, r in chosen])


def random_loads(candidates: CandidateSet, rng: random.Random) -> list[pb.WorkerLoad]:
    refs = sorted(candidates.refs)
    loads = [pb.WorkerLoad(worker_id=w, dp_rank=r, active_blocks=rng.choice([0, 0, 3, 4096]),
                           waiting_requests=rng.randrange(3))
             for w, r in rng.sample(refs, rng.randrange(min(len(refs), 40) + 1))]
    loads.append(pb.WorkerLoad(worker_id="stranger", active_blocks=1))
    if loads[:-1] and rng.random() < 0.3:  # a ref given twice: the last entry wins
        again = loads[0]
        loads.append(pb.WorkerLoad(worker_id=again.worker_id, dp_rank=again.dp_rank,
                                   active_blocks=rng.randrange(100)))
    return loads


@pytest.fixture(scope="module")
def field_index() -> tuple[MemoryIndex, list[list[int]]]:
    """1,024 worker ranks holding 100,000 blocks of shared-prefix conversations, and
    8,192-token prompts over them (bench/workload.py)."""
    workload = make_workload(1_024, 100_000, seed=7, n_queries=40)
    index = MemoryIndex(IndexConfig())
    index.sync.apply(workload.batches(FIELD_MODEL))
    index.sync.apply(workload.idle_rank_batches(FIELD_MODEL))
    return index, workload.queries


def request_of(prompt: list[int], rng: random.Random, *, packed: bool
               ) -> pb.FindBestWorkerRequest:
    score = (pb.ScoreRequest(model=FIELD_MODEL, token_bytes=pack_tokens(prompt)) if packed
             else pb.ScoreRequest(model=FIELD_MODEL, token_ids=prompt))
    request = pb.FindBestWorkerRequest(score=score, max_candidates=rng.choice([1, 8, 50]))
    for rank in rng.sample(range(1_024), rng.choice([0, 8, 40])):
        request.loads.add(worker_id=worker_name(rank), active_blocks=rng.randrange(4096),
                          waiting_requests=rng.randrange(4))
    return request


def without_age(answer: pb.FindBestWorkerResponse) -> pb.FindBestWorkerResponse:
    answer.freshness.last_event_age_seconds = 0.0
    return answer


async def stream_raw(port: int, bodies: list[bytes]) -> list[pb.StreamedDecision]:
    """The answers to stream messages given as bytes, in order."""
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        call = channel.stream_stream(STREAM_PATH)

        async def feed() -> AsyncIterator[bytes]:
            for body in bodies:
                yield body

        raw = [answer async for answer in call(feed(), timeout=30)]
    finally:
        await channel.close()
    return [a for body in raw for a in pb.FindBestWorkerStreamResponse.FromString(body).answers]


def stream_message(*requests: pb.FindBestWorkerRequest) -> bytes:
    return pb.FindBestWorkerStreamRequest(requests=requests).SerializeToString()
