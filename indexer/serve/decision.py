"""FindBestWorker's decision over a scored query: the winner, the cheapest candidates, and
the answer's bytes.

At temperature 0 only the candidates that matched or carry a load are costed one by one
(`scheduling.top_costs`); the others all cost the same and are taken in (worker_id,
dp_rank) order, so a decision over 1,024 ranks builds a few dozen costs, not 1,024.
Sampling (temperature > 0) needs every cost and ranks them all (`choose_worker`).

With the C extension the temperature-0 ranking runs in C straight from the Score answer
and the request's loads, and the answer is serialised there from the cost rows
(native/decision.c), with no dict, tuple or message object per candidate; with the
in-memory index it starts from the Score walk's tally (`decide_from_tally`), with no
WorkerScore per matched rank either;
`scheduling.top_costs` and protobuf's serialiser are the pure-Python twins, and tests
check the two paths equal.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Final

import msgspec

from indexer._proto.kvindex.v1 import indexer_pb2 as pb
from indexer.index.protocol import ScoreResult
from indexer.index.scoring import QueryTally
from indexer.scheduling import (
    Candidate,
    CandidateCost,
    choose_worker,
    top_costs,
    validate_knobs,
    validate_storage_load_weight,
)
from indexer.serve.directory import CandidateSet
from indexer.serve.stream import varint
from kvcore.keys import NATIVE

if NATIVE:
    from kvcore._native import decision_tally_top_costs, decision_top_costs, encode_decision

__all__ = ["USE_NATIVE_DECISION", "CostRow", "EncodedAnswer", "decide", "decide_from_tally",
           "encode_answer", "tally_decides"]

USE_NATIVE_DECISION = NATIVE  # tests turn it off to run the pure-Python twins

# CandidateCost's fields as a tuple: worker_id, dp_rank, matched_blocks, prefill_blocks,
# active_blocks, cost, waiting_requests, storage_blocks.
CostRow = tuple[str, int, int, int, int, float, int, int]


class EncodedAnswer:
    """A FindBestWorkerResponse already serialised (what grpc's serialiser calls
    `SerializeToString` on, unary and streamed)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def SerializeToString(self) -> bytes:  # noqa: N802 - the protobuf message method
        return self.data


def decide(
    candidates: CandidateSet,
    result: ScoreResult,
    loads: Sequence[pb.WorkerLoad],
    *,
    overlap_weight: float,
    temperature: float,
    limit: int,
    rng: random.Random,
    storage_load_weight: float = 0.0,
) -> tuple[CostRow, list[CostRow]]:
    """The chosen candidate and the `limit` cheapest (best first), as `choose_worker` over
    every candidate would give them. `candidates` is not empty; `result` scored them."""
    validate_knobs(overlap_weight, temperature)
    validate_storage_load_weight(storage_load_weight)
    deterministic = temperature <= 0.0 or len(candidates) == 1
    if USE_NATIVE_DECISION and deterministic:
        rows = decision_top_costs(result.scores, loads, candidates.ordered_refs,
                                  candidates.positions, result.query_blocks, overlap_weight,
                                  storage_load_weight, max(limit, 1))
        return rows[0], rows[:limit]
    # (matched blocks, of them at the storage tier: a shared pool's or the worker's disk)
    matched = {(s.worker_id, s.dp_rank): (s.matched_blocks, s.blocks_by_tier.get("storage", 0))
               for s in result.scores}
    # The last entry of a (worker, dp_rank) wins.
    load_of = {(load.worker_id, load.dp_rank): (load.active_blocks, load.waiting_requests)
               for load in loads}
    if deterministic:
        ranked = top_costs(candidates.ordered_refs, candidates.refs, matched, load_of,
                           query_blocks=result.query_blocks, overlap_weight=overlap_weight,
                           limit=max(limit, 1), storage_load_weight=storage_load_weight)
        return _row(ranked[0]), [_row(c) for c in ranked[:limit]]
    options = []
    for w in candidates.workers:
        ref = (w.worker_id, w.dp_rank)
        active, waiting = load_of.get(ref, (0, 0))
        held, stored = matched.get(ref, (0, 0))
        options.append(Candidate(w.worker_id, w.dp_rank, held, active, waiting, stored))
    chosen, ranked = choose_worker(options, result.query_blocks, overlap_weight=overlap_weight,
                                   temperature=temperature, rng=rng,
                                   storage_load_weight=storage_load_weight)
    return _row(chosen), [_row(c) for c in ranked[:limit]]


def tally_decides(candidates: CandidateSet, temperature: float) -> bool:
    """Can `decide_from_tally` make this decision (temperature 0, or one candidate, with
    the C extension)?"""
    return USE_NATIVE_DECISION and (temperature <= 0.0 or len(candidates) == 1)


def decide_from_tally(
    candidates: CandidateSet,
    tally: QueryTally,
    loads: Sequence[pb.WorkerLoad],
    *,
    overlap_weight: float,
    temperature: float,
    limit: int,
    storage_load_weight: float = 0.0,
) -> tuple[CostRow, list[CostRow], bool]:
    """`decide` at temperature 0 from the index's tally (`SyncMemoryIndex.score_tally`)
    rather than its Score answer; also whether any candidate matched a block. Only when
    `tally_decides`."""
    validate_knobs(overlap_weight, temperature)
    validate_storage_load_weight(storage_load_weight)
    rows, hits = decision_tally_top_costs(
        tally.tally, tally.refs, loads, candidates.ordered_refs, candidates.positions,
        tally.query_blocks, overlap_weight, storage_load_weight, max(limit, 1))
    return rows[0], rows[:limit], hits > 0


# FindBestWorkerResponse.block_size's key: field number, wire type 0 (varint).
_BLOCK_SIZE_TAG: Final = bytes(
    (pb.FindBestWorkerResponse.DESCRIPTOR.fields_by_name["block_size"].number << 3,))


def _row(cost: CandidateCost) -> CostRow:
    row: CostRow = msgspec.structs.astuple(cost)
    return row


def encode_answer(chosen: CostRow, ranked: Sequence[CostRow], freshness: pb.Freshness,
                  candidate_count: int, block_size: int = 0) -> EncodedAnswer:
    """The FindBestWorkerResponse of a decision, serialised; `block_size`: the model's
    (0: unknown, not written)."""
    if USE_NATIVE_DECISION:
        data = encode_decision(chosen, ranked, freshness.SerializeToString(), candidate_count)
        # A field may follow the others in any order: appended, not encoded in C.
        return EncodedAnswer(data + _BLOCK_SIZE_TAG + varint(block_size) if block_size
                             else data)
    response = pb.FindBestWorkerResponse(worker_id=chosen[0], dp_rank=chosen[1],
                                         matched_blocks=chosen[2], freshness=freshness,
                                         candidate_count=candidate_count,
                                         block_size=block_size)
    add = response.candidates.add
    for worker, rank, held, prefill, active, cost, waiting, stored in ranked:
        add(worker_id=worker, dp_rank=rank, matched_blocks=held, prefill_blocks=prefill,
            active_blocks=active, cost=cost, waiting_requests=waiting, storage_blocks=stored)
    return EncodedAnswer(response.SerializeToString())
