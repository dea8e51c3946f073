"""FindBestWorker's choice: cache overlap traded against router-reported load (pure).

For each candidate (worker, dp_rank) of a query of `query_blocks` full blocks:

    prefill_blocks = query_blocks - matched_blocks        blocks it would still compute
    cost           = overlap_weight * prefill_blocks + active_blocks

Both terms count KV-cache blocks; at `overlap_weight` 1.0 a block of prompt the candidate
must prefill and a block its running requests already hold weigh the same. The default is
32, tuned on the Mooncake conversation trace (`kv-indexer bench routing`; the tuning grid and
hit ratios are in docs/benchmarks.md): recomputing a prompt block costs far more than
holding one, while much larger weights starve workers that lack a long shared prefix.
Lower it (down to 0, pure load balancing) to favour idle workers.

At temperature 0 the lowest cost wins; ties go to more matched blocks, then fewer waiting
requests, then the smaller (worker_id, dp_rank), so the answer is deterministic. Above 0
the choice is sampled from a softmax over the costs, min-max normalised first so the
temperature does not depend on the prompt length or the load scale:

    p_i ∝ exp(-(cost_i - min_cost) / (max_cost - min_cost) / temperature)

At temperature 1 the cheapest candidate is e (≈ 2.7) times as likely as the most expensive
one; all costs equal means a uniform choice.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Collection, Iterable, Mapping, Sequence
from itertools import islice
from typing import Final, NamedTuple

import msgspec

from indexer.errors import InvalidQueryError

__all__ = [
    "DEFAULT_OVERLAP_WEIGHT",
    "DEFAULT_TEMPERATURE",
    "Candidate",
    "CandidateCost",
    "choose",
    "choose_worker",
    "rank_costs",
    "softmax_probabilities",
    "top_costs",
    "validate_knobs",
    "validate_storage_load_weight",
]

DEFAULT_OVERLAP_WEIGHT: Final = 32.0  # tuned on the conversation trace (see module doc)
DEFAULT_TEMPERATURE: Final = 0.0
MAX_KNOB: Final = 1e9  # overlap_weight and temperature above this are refused
_IDLE: Final = (0, 0)  # (active_blocks, waiting_requests) of a candidate without a load


class Candidate(NamedTuple):
    """A (worker, dp_rank) the query may go to, with its overlap and reported load."""

    worker_id: str
    dp_rank: int
    matched_blocks: int
    active_blocks: int = 0
    waiting_requests: int = 0
    storage_blocks: int = 0  # of matched_blocks, those at the storage tier (pools too)


class CandidateCost(msgspec.Struct, frozen=True):
    """One candidate's cost breakdown (lower cost is better): what FindBestWorker ranks and
    answers (the client library hands out the same type)."""

    worker_id: str
    dp_rank: int
    matched_blocks: int
    prefill_blocks: int
    active_blocks: int
    cost: float
    waiting_requests: int = 0
    storage_blocks: int = 0


def validate_knobs(overlap_weight: float, temperature: float) -> None:
    """Both knobs must be finite numbers in [0, 1e9]; raise InvalidQueryError naming one."""
    for name, value in (("overlap_weight", overlap_weight), ("temperature", temperature)):
        if not (math.isfinite(value) and 0.0 <= value <= MAX_KNOB):
            raise InvalidQueryError(f"{name} must be a finite number in [0, {MAX_KNOB:g}], "
                                    f"got {value!r}")


def validate_storage_load_weight(storage_load_weight: float) -> None:
    """A finite number in [0, 1]; raise InvalidQueryError naming it."""
    if not (math.isfinite(storage_load_weight) and 0.0 <= storage_load_weight <= 1.0):
        raise InvalidQueryError("storage_load_weight must be a finite number in [0, 1], "
                                f"got {storage_load_weight!r}")


def _rank_key(cost: CandidateCost) -> tuple[float, int, int, str, int]:
    return (cost.cost, -cost.matched_blocks, cost.waiting_requests, cost.worker_id, cost.dp_rank)


def rank_costs(
    candidates: Iterable[Candidate], query_blocks: int, overlap_weight: float = 1.0,
    storage_load_weight: float = 0.0,
) -> list[CandidateCost]:
    """Every candidate's cost, best first (cost, then the documented tie-breaks). A block
    matched at the storage tier (a shared pool's) costs `storage_load_weight` of a
    prefilled one."""
    costs = []
    for c in candidates:
        prefill = max(query_blocks - c.matched_blocks, 0)
        load = prefill + storage_load_weight * c.storage_blocks
        costs.append(CandidateCost(c.worker_id, c.dp_rank, c.matched_blocks, prefill,
                                   c.active_blocks, overlap_weight * load + c.active_blocks,
                                   c.waiting_requests, c.storage_blocks))
    costs.sort(key=_rank_key)
    return costs


def softmax_probabilities(costs: Sequence[float], temperature: float) -> list[float]:
    """Selection probability of each cost at `temperature` > 0 (min-max normalised)."""
    if not costs:
        return []
    low, high = min(costs), max(costs)
    if high == low:
        return [1.0 / len(costs)] * len(costs)
    scale = (high - low) * temperature
    weights = [math.exp(-(c - low) / scale) for c in costs]
    total = math.fsum(weights)
    return [w / total for w in weights]


def choose(
    ranked: Sequence[CandidateCost], temperature: float = 0.0, rng: random.Random | None = None
) -> CandidateCost:
    """The winner among costs ranked by `rank_costs`: the first at temperature 0, else a
    softmax draw with `rng` (a fresh system-seeded generator when None)."""
    if not ranked:
        raise ValueError("no candidates to choose from")
    if temperature <= 0.0 or len(ranked) == 1:
        return ranked[0]
    probabilities = softmax_probabilities([c.cost for c in ranked], temperature)
    draw = (rng or random.Random()).random()
    cumulative = 0.0
    for cost, p in zip(ranked, probabilities, strict=True):
        cumulative += p
        if draw < cumulative:
            return cost
    return ranked[-1]  # rounding left the draw just above the last cumulative sum


def choose_worker(
    candidates: Iterable[Candidate],
    query_blocks: int,
    *,
    overlap_weight: float = DEFAULT_OVERLAP_WEIGHT,
    temperature: float = DEFAULT_TEMPERATURE,
    rng: random.Random | None = None,
    storage_load_weight: float = 0.0,
) -> tuple[CandidateCost, list[CandidateCost]]:
    """The chosen candidate and every candidate's cost (best first)."""
    validate_knobs(overlap_weight, temperature)
    validate_storage_load_weight(storage_load_weight)
    ranked = rank_costs(candidates, query_blocks, overlap_weight, storage_load_weight)
    return choose(ranked, temperature, rng), ranked


def top_costs(
    ordered: Sequence[tuple[str, int]],
    members: Collection[tuple[str, int]],
    matched: Mapping[tuple[str, int], tuple[int, int]],
    loads: Mapping[tuple[str, int], tuple[int, int]],
    *,
    query_blocks: int,
    overlap_weight: float,
    limit: int,
    storage_load_weight: float = 0.0,
) -> list[CandidateCost]:
    """The `limit` cheapest candidates, ranked exactly as `rank_costs` ranks them all, in
    time linear in the candidates that matched or carry a load plus `limit`.

    `ordered`: every candidate (worker_id, dp_rank), sorted; `members`: the same as a set.
    `matched`: (matched blocks, of them on the storage tier) and `loads`: (active_blocks,
    waiting_requests) of those that have any (entries of other refs are ignored). Every
    other candidate costs `overlap_weight * query_blocks` and ties with its peers on every
    key but (worker_id, dp_rank), so they come in `ordered`'s order and only the first
    `limit` are built.
    """
    if limit <= 0:
        return []
    special = {ref for ref in (*matched, *loads) if ref in members}
    # Rank keys as tuples, (cost, -matched, waiting, worker_id, dp_rank, prefill, active,
    # storage): unique per candidate, so the trailing fields never decide; structs only
    # for the head.
    keyed = []
    for ref in special:
        held, stored = matched.get(ref, _IDLE)
        active, waiting = loads.get(ref, _IDLE)
        prefill = query_blocks - held if query_blocks > held else 0
        cost = overlap_weight * (prefill + storage_load_weight * stored) + active
        keyed.append((cost, -held, waiting, ref[0], ref[1], prefill, active, stored))
    head = heapq.nsmallest(limit, keyed) if len(keyed) > limit else sorted(keyed)
    if len(special) < len(ordered):
        idle_cost = overlap_weight * query_blocks
        idle = []
        for ref in ordered:
            if ref not in special:
                idle.append((idle_cost, 0, 0, ref[0], ref[1], query_blocks, 0, 0))
                if len(idle) == limit:
                    break
        head = list(islice(heapq.merge(head, idle), limit))
    return [CandidateCost(worker, rank, -negative_held, prefill, active, cost, waiting, stored)
            for cost, negative_held, waiting, worker, rank, prefill, active, stored in head]
