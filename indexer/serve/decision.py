"""FindBestWorker's decision over a scored query: the winner and the cheapest candidates.

At temperature 0 only the candidates that matched or carry a load are costed one by one
(`scheduling.top_costs`); the others all cost the same and are taken in (worker_id,
dp_rank) order, so a decision over 1,024 ranks builds a few dozen costs, not 1,024.
Sampling (temperature > 0) needs every cost and ranks them all (`choose_worker`).

With the C extension the temperature-0 ranking runs in C straight from the Score answer
and the request's loads (native/decision.c), with no dict or tuple per candidate;
`scheduling.top_costs` is its pure-Python twin, and tests check the two equal.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from indexer._proto.kvindex.v1 import indexer_pb2 as pb
from indexer.index.protocol import ScoreResult
from indexer.scheduling import (
    Candidate,
    CandidateCost,
    choose_worker,
    top_costs,
    validate_knobs,
    validate_storage_load_weight,
)
from indexer.serve.directory import CandidateSet
from kvcore.keys import NATIVE

if NATIVE:
    from kvcore._native import decision_top_costs

__all__ = ["USE_NATIVE_DECISION", "decide"]

USE_NATIVE_DECISION = NATIVE  # tests turn it off to run the pure-Python twin


def decide(
    candidates: CandidateSet,
    result: ScoreResult,
    loads: Iterable[pb.WorkerLoad],
    *,
    overlap_weight: float,
    temperature: float,
    limit: int,
    rng: random.Random,
    storage_load_weight: float = 0.0,
) -> tuple[CandidateCost, list[CandidateCost]]:
    """The chosen candidate and the `limit` cheapest (best first), as `choose_worker` over
    every candidate would give them. `candidates` is not empty; `result` scored them."""
    validate_knobs(overlap_weight, temperature)
    validate_storage_load_weight(storage_load_weight)
    if USE_NATIVE_DECISION and (temperature <= 0.0 or len(candidates) == 1):
        rows = decision_top_costs(result.scores, loads, candidates.ordered_refs,
                                  candidates.positions, result.query_blocks, overlap_weight,
                                  storage_load_weight, max(limit, 1))
        ranked = [CandidateCost(*row) for row in rows]
        return ranked[0], ranked[:limit]
    # (matched blocks, of them at the storage tier: a shared pool's or the worker's disk)
    matched = {(s.worker_id, s.dp_rank): (s.matched_blocks, s.blocks_by_tier.get("storage", 0))
               for s in result.scores}
    # The last entry of a (worker, dp_rank) wins.
    load_of = {(load.worker_id, load.dp_rank): (load.active_blocks, load.waiting_requests)
               for load in loads}
    if temperature <= 0.0 or len(candidates) == 1:
        ranked = top_costs(candidates.ordered_refs, candidates.refs, matched, load_of,
                           query_blocks=result.query_blocks, overlap_weight=overlap_weight,
                           limit=max(limit, 1), storage_load_weight=storage_load_weight)
        return ranked[0], ranked[:limit]
    options = []
    for w in candidates.workers:
        ref = (w.worker_id, w.dp_rank)
        active, waiting = load_of.get(ref, (0, 0))
        held, stored = matched.get(ref, (0, 0))
        options.append(Candidate(w.worker_id, w.dp_rank, held, active, waiting, stored))
    chosen, ranked = choose_worker(options, result.query_blocks, overlap_weight=overlap_weight,
                                   temperature=temperature, rng=rng,
                                   storage_load_weight=storage_load_weight)
    return chosen, ranked[:limit]
