"""The routers the tools compare, one definition each: the demo and the routing bench both
route with these.

A router sends request `index` (its position in the stream) to a worker of a fleet, given
the loads the router attributes to each worker (`WorkerLoad`, in fleet order, ids from
`kvsim.bridges.worker_id`):

- `RoundRobinRouter`: request i to worker i mod n.
- `RandomRouter`: a seeded uniform draw.
- `OracleRouter`: FindBestWorker's cost function (`indexer.scheduling.choose_worker`) over
  overlaps read from the engines' own pools: an index that is never stale.
- `KvRouter`: FindBestWorker over gRPC against the real index; workers the index has not
  heard from yet (or all of them, when the call fails) are weighed locally with zero
  overlap by the same cost function.
"""

from __future__ import annotations

import random
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from indexer.client import AsyncIndexerClient, IndexerClientError, Query, WorkerLoad
from indexer.scheduling import Candidate, choose_worker
from kvcore.bus import pack_tokens
from kvsim.bridges import worker_number
from kvsim.mock_engines import BlockPool

__all__ = [
    "FALLBACK_REASONS",
    "Decision",
    "KvRouter",
    "OracleRouter",
    "RandomRouter",
    "RoundRobinRouter",
    "Router",
    "describe_fallbacks",
    "request_seed",
]


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a request goes, what the router expected there, and why it decided alone."""

    worker: int
    predicted_blocks: int | None = None  # leading blocks the router expected there
    fallback: str | None = None  # why FindBestWorker's answer was not used, if it was not


class Router(Protocol):
    async def route(self, index: int, tokens: list[int], loads: list[WorkerLoad]) -> Decision:
        ...


class RoundRobinRouter:
    """Request i goes to worker i mod n (no index, no load)."""

    def __init__(self, workers: int) -> None:
        self._workers = workers

    async def route(self, index: int, tokens: list[int], loads: list[WorkerLoad]) -> Decision:
        return Decision(index % self._workers)


class RandomRouter:
    """A uniform draw from a generator seeded once (no index, no load)."""

    def __init__(self, workers: int, seed: int) -> None:
        self._workers = workers
        self._rng = random.Random(seed)

    async def route(self, index: int, tokens: list[int], loads: list[WorkerLoad]) -> Decision:
        return Decision(self._rng.randrange(self._workers))


# Why the KV router decided locally instead of taking FindBestWorker's answer, by the key
# `KvRouter.fallbacks` counts: the gRPC status code of a refused call, or a reason of its own.
FALLBACK_REASONS: Final[dict[str, str]] = {
    "FAILED_PRECONDITION": "no worker of the model indexed yet (the first requests, before "
                           "any engine's events reached the index)",
    "unindexed_workers": "some workers not indexed yet: decided over all of them locally",
    "UNAVAILABLE": "indexer unreachable",
    "DEADLINE_EXCEEDED": "indexer too slow to answer",
}


def describe_fallbacks(counts: dict[str, int]) -> str:
    """`6 no worker of the model indexed yet (...)`, one reason per key; "none" for none."""
    return "; ".join(f"{n} {FALLBACK_REASONS.get(key, key)}"
                     for key, n in sorted(counts.items())) or "none"


def request_seed(seed: int, index: int) -> int:
    """The sampling seed of request `index` (used at temperature > 0)."""
    return (seed * 1_000_003 + index) & 0xFFFF_FFFF_FFFF_FFFF


def _choose(index: int, matched: Sequence[int], loads: Sequence[WorkerLoad], query_blocks: int,
            *, overlap_weight: float, temperature: float, seed: int,
            fallback: str | None = None) -> Decision:
    """FindBestWorker's choice, made here over the given overlaps (in fleet order)."""
    candidates = [Candidate(load.worker_id, load.dp_rank, m, load.active_blocks,
                            load.waiting_requests)
                  for m, load in zip(matched, loads, strict=True)]
    chosen, _ = choose_worker(candidates, query_blocks, overlap_weight=overlap_weight,
                              temperature=temperature,
                              rng=random.Random(request_seed(seed, index)))
    return Decision(worker_number(chosen.worker_id), chosen.matched_blocks, fallback)


class OracleRouter:
    """The cost function over the engines' own pools (no index, no staleness)."""

    def __init__(self, pools: Sequence[BlockPool], *, block_size: int, overlap_weight: float,
                 temperature: float, seed: int) -> None:
        self._pools = pools
        self._block_size = block_size
        self._overlap_weight = overlap_weight
        self._temperature = temperature
        self._seed = seed

    async def route(self, index: int, tokens: list[int], loads: list[WorkerLoad]) -> Decision:
        packed = pack_tokens(tokens)
        query_blocks = len(tokens) // self._block_size
        matched = [pool.matched_blocks(packed, query_blocks) for pool in self._pools]
        return _choose(index, matched, loads, query_blocks, overlap_weight=self._overlap_weight,
                       temperature=self._temperature, seed=self._seed)


class KvRouter:
    """FindBestWorker over gRPC with the router's loads; the index's answer unless some
    worker is unknown to it (or the call fails), then the same choice made here with zero
    overlap for the workers it does not know.

    `latencies_ms` keeps the last `latency_samples` successful calls (all when None);
    `fallbacks` counts the requests decided here, by reason.
    """

    def __init__(self, client: AsyncIndexerClient, model: str, *, block_size: int,
                 overlap_weight: float, temperature: float, seed: int = 0,
                 timeout: float | None = None, latency_samples: int | None = None) -> None:
        self._client = client
        self._model = model
        self._block_size = block_size
        self._overlap_weight = overlap_weight
        self._temperature = temperature
        self._seed = seed
        self._timeout = timeout
        self.latencies_ms: deque[float] = deque(maxlen=latency_samples)
        self.fallbacks: Counter[str] = Counter()

    async def route(self, index: int, tokens: list[int], loads: list[WorkerLoad]) -> Decision:
        seed = request_seed(self._seed, index) if self._temperature > 0 else None
        started = time.perf_counter()
        try:
            choice = await self._client.find_best_worker(
                Query(model=self._model, token_ids=tokens), loads,
                overlap_weight=self._overlap_weight, temperature=self._temperature, seed=seed,
                timeout=self._timeout)
        except IndexerClientError as exc:
            # No worker indexed yet (start-up) or the indexer is away: every worker is empty.
            self.fallbacks[exc.code.name] += 1
            return self._local(index, tokens, loads, {}, exc.code.name)
        self.latencies_ms.append((time.perf_counter() - started) * 1000.0)
        known = {c.worker_id: c.matched_blocks for c in choice.candidates}
        if len(known) < len(loads):
            # Workers the index has not heard from yet hold nothing as far as it knows:
            # decide over every worker, as the server would with all of them live.
            self.fallbacks["unindexed_workers"] += 1
            return self._local(index, tokens, loads, known, None)
        return Decision(worker_number(choice.worker_id), choice.matched_blocks)

    def _local(self, index: int, tokens: list[int], loads: list[WorkerLoad],
               known: dict[str, int], fallback: str | None) -> Decision:
        matched = [known.get(load.worker_id, 0) for load in loads]
        return _choose(index, matched, loads, len(tokens) // self._block_size,
                       overlap_weight=self._overlap_weight, temperature=self._temperature,
                       seed=self._seed, fallback=fallback)
