"""The one place backends are chosen and wrapped: `build_index`, `served_index`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from indexer.index.instrumented import InstrumentedIndex
from indexer.index.memory import MemoryIndex
from indexer.index.protocol import Index, IndexConfig, ResyncHook
from indexer.index.redis import RedisIndex

__all__ = ["build_index", "served_index"]


def build_index(
    config: IndexConfig, *, redis_url: str | None = None, on_resync: ResyncHook | None = None
) -> Index:
    """The Redis index at `redis_url`, else the in-memory one."""
    if redis_url:
        return RedisIndex.from_url(redis_url, config=config, on_resync=on_resync)
    return MemoryIndex(config, on_resync=on_resync)


def served_index(index: Index, registry: CollectorRegistry | None) -> Index:
    """What a process serves to routers: `index`, its Score calls timed into `registry`
    when metrics are on. Consumer and reader processes alike serve through this; ingest
    and in-process callers use the bare index."""
    return InstrumentedIndex(index, registry) if registry is not None else index
