"""An Index wrapper that times Score calls into a Prometheus histogram.

Applied by `indexer.index.factory.build_index` when metrics are on, so backends carry no
metrics code of their own.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Histogram

from indexer.index.protocol import (
    ApplyOutcome,
    Index,
    IndexConfig,
    IndexStats,
    RankState,
    ScoreQuery,
    ScoreResult,
    WorkerInfo,
    WorkerRef,
)
from indexer.index.scoring import QueryTally
from kvcore.bus import EventBatch

__all__ = ["SCORE_BUCKETS_S", "InstrumentedIndex"]

SCORE_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0015, 0.0025, 0.005, 0.01, 0.025,
                   0.05, 0.1, 0.25)


class InstrumentedIndex:
    """Delegates everything to `inner`; records Score latency and outcome."""

    def __init__(self, inner: Index, registry: CollectorRegistry) -> None:
        self.inner = inner
        self.score_seconds = Histogram(
            "kv_indexer_score_seconds", "Index Score latency (hashing and lookups)",
            ["backend", "outcome"], buckets=SCORE_BUCKETS_S, registry=registry)
        self._backend = type(inner).__name__

    @property
    def config(self) -> IndexConfig:
        return self.inner.config

    async def score(self, query: ScoreQuery) -> ScoreResult:
        started = time.perf_counter()
        outcome = "error"
        try:
            result = await self.inner.score(query)
            outcome = "ok"
            return result
        finally:
            self.score_seconds.labels(self._backend, outcome).observe(
                time.perf_counter() - started)

    async def score_tally(self, query: ScoreQuery) -> QueryTally | None:
        """The inner index's `score_tally` (the in-memory index's), timed as Score; None
        when it has none."""
        if not hasattr(type(self.inner), "score_tally"):
            return None
        inner = getattr(self.inner, "score_tally")  # noqa: B009 - checked on the type
        started = time.perf_counter()
        outcome = "error"
        try:
            tally: QueryTally | None = await inner(query)
            outcome = "ok"
            return tally
        finally:
            self.score_seconds.labels(self._backend, outcome).observe(
                time.perf_counter() - started)

    async def ping(self) -> None:
        await self.inner.ping()

    async def apply(
        self, batches: Sequence[EventBatch], *, validated: bool = False
    ) -> list[ApplyOutcome]:
        return await self.inner.apply(batches, validated=validated)

    async def clear_worker(self, model: str, worker_id: str, dp_rank: int | None = None) -> int:
        return await self.inner.clear_worker(model, worker_id, dp_rank)

    async def remove_worker(self, model: str, worker_id: str) -> int:
        return await self.inner.remove_worker(model, worker_id)

    async def remove_pool(self, model: str, pool: str) -> bool:
        return await self.inner.remove_pool(model, pool)

    async def drop_empty_models(self) -> list[str]:
        return await self.inner.drop_empty_models()

    async def workers(self, model: str | None = None) -> list[WorkerInfo]:
        return await self.inner.workers(model)

    async def block_size(self, model: str) -> int | None:
        return await self.inner.block_size(model)

    async def stats(self) -> IndexStats:
        return await self.inner.stats()

    async def presence(self, model: str) -> dict[int, dict[WorkerRef, int]]:
        return await self.inner.presence(model)

    async def export_ranks(self, ranks: Sequence[tuple[str, WorkerRef]]) -> list[RankState]:
        return await self.inner.export_ranks(ranks)

    async def import_ranks(self, states: Sequence[RankState]) -> None:
        await self.inner.import_ranks(states)

    async def reset_caches(self) -> None:
        await self.inner.reset_caches()

    async def get_marker(self, name: str) -> str | None:
        return await self.inner.get_marker(name)

    async def set_marker(self, name: str, value: str | None) -> None:
        await self.inner.set_marker(name, value)

    async def close(self) -> None:
        await self.inner.close()
