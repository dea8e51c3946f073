"""Simulated engine time: pools whose blocks running requests pin, and the clock that runs a
fleet's requests (FIFO prefill at a token rate, decode per request, pins until the last
token) and reports each worker's load as a router would."""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from indexer.client import WorkerLoad
from kvsim.bridges import worker_id
from kvsim.mock_engines import BlockPool, MockFleet, PoolEvent, PoolRemoved, TraceRecord

__all__ = ["EngineClock", "PinnedPool", "pin_pools"]


class PinnedPool(BlockPool):
    """A `BlockPool` whose blocks can be pinned by running requests (never evicted then).

    When every block is pinned the pool holds more than its capacity for a while (counted as
    an overcommitted serve), as an engine would have to preempt or queue instead.
    """

    def __init__(self, *, capacity_blocks: int, block_size: int = 16,
                 cpu_capacity_blocks: int = 0, seed: int = 0) -> None:
        super().__init__(capacity_blocks=capacity_blocks, block_size=block_size,
                         cpu_capacity_blocks=cpu_capacity_blocks, seed=seed)
        self.pinned: dict[int, int] = {}
        self.last_hashes: list[int] = []
        self.evicted = 0
        self.overcommits = 0

    def block_hashes(self, tokens: Sequence[int]) -> list[int]:
        hashes = super().block_hashes(tokens)
        self.last_hashes = hashes  # serve() hashes the prompt once: keep them for pinning
        return hashes

    def pin(self, hashes: Sequence[int]) -> None:
        pinned = self.pinned
        for h in hashes:
            pinned[h] = pinned.get(h, 0) + 1

    def unpin(self, hashes: Sequence[int]) -> None:
        pinned = self.pinned
        for h in hashes:
            left = pinned[h] - 1
            if left:
                pinned[h] = left
            else:
                del pinned[h]

    def _evict_gpu(self, count: int, protected: set[int], events: list[PoolEvent]) -> None:
        pinned = self.pinned
        victims: list[int] = []
        for h in self.gpu:
            if h not in protected and h not in pinned:
                victims.append(h)
                if len(victims) == count:
                    break
        if len(victims) < count:
            self.overcommits += 1
        if not victims:
            return
        for h in victims:
            del self.gpu[h]
        self.evicted += len(victims)
        events.append(PoolRemoved(victims, "gpu"))
        if self.cpu_capacity_blocks > 0:
            self._offload(victims, protected, events)


def pin_pools(fleet: MockFleet) -> list[PinnedPool]:
    """Swap every engine's pool of `fleet` (still empty) for a `PinnedPool` like it."""
    pools = []
    for engine in fleet.all_engines():
        old = engine.pool
        pool = PinnedPool(capacity_blocks=old.capacity_blocks, block_size=old.block_size,
                          cpu_capacity_blocks=old.cpu_capacity_blocks, seed=old.seed)
        engine.pool = pool
        pools.append(pool)
    return pools


@dataclass(slots=True)
class _Worker:
    active_blocks: int = 0
    prefill_free_at: float = 0.0
    waiting: deque[float] = field(default_factory=deque)  # prefill start times
    prefilling: deque[tuple[float, int]] = field(default_factory=deque)  # (end, tokens)
    in_flight_tokens: int = 0
    prefill_tokens: int = 0  # uncached tokens computed over the run
    requests: int = 0


class EngineClock:
    """The simulated-time model of a fleet: FIFO prefill, per-request decode, pinned blocks."""

    def __init__(self, pools: Sequence[PinnedPool], prefill_rate: float,
                 decode_rate: float) -> None:
        self.pools = pools
        self.workers = [_Worker() for _ in pools]
        self.prefill_rate = prefill_rate
        self.decode_rate = decode_rate
        self._finishing: list[tuple[float, int, int, int, list[int]]] = []  # heap
        self._serial = 0

    def advance(self, now: float) -> None:
        """Requests finish, prefills start and end, up to simulated time `now`."""
        finishing = self._finishing
        while finishing and finishing[0][0] <= now:
            _, _, w, blocks, hashes = heapq.heappop(finishing)
            self.workers[w].active_blocks -= blocks
            self.pools[w].unpin(hashes)
        for worker in self.workers:
            while worker.waiting and worker.waiting[0] <= now:
                worker.waiting.popleft()
            while worker.prefilling and worker.prefilling[0][0] <= now:
                worker.in_flight_tokens -= worker.prefilling.popleft()[1]

    def loads(self) -> list[WorkerLoad]:
        return [WorkerLoad(worker_id(w), 0, s.active_blocks, len(s.waiting), s.in_flight_tokens)
                for w, s in enumerate(self.workers)]

    def start(self, w: int, now: float, record: TraceRecord, *, hit_tokens: int,
              hashes: list[int], block_size: int) -> float:
        """A request starts on worker `w` at `now`; returns its time to first token."""
        worker = self.workers[w]
        uncached = record.input_length - hit_tokens
        begin = max(now, worker.prefill_free_at)
        end = begin + uncached / self.prefill_rate
        worker.prefill_free_at = end
        if begin > now:
            worker.waiting.append(begin)
        if end > now:
            worker.prefilling.append((end, uncached))
            worker.in_flight_tokens += uncached
        worker.prefill_tokens += uncached
        worker.requests += 1
        blocks = -(-record.input_length // block_size)
        worker.active_blocks += blocks
        self.pools[w].pin(hashes)
        self._serial += 1
        finish = end + record.output_length / self.decode_rate
        heapq.heappush(self._finishing, (finish, self._serial, w, blocks, hashes))
        return end - now
