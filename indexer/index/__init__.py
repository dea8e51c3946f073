"""Index backends behind one interface (`Index`): in-memory and Redis."""

from indexer.index.memory import MemoryIndex, SyncMemoryIndex
from indexer.index.protocol import (
    TIERS,
    ApplyOutcome,
    Index,
    IndexConfig,
    IndexStats,
    ResyncRequest,
    ScoreQuery,
    ScoreResult,
    TierWeights,
    WorkerInfo,
    WorkerRef,
    WorkerScore,
)

__all__ = [
    "TIERS",
    "ApplyOutcome",
    "Index",
    "IndexConfig",
    "IndexStats",
    "MemoryIndex",
    "ResyncRequest",
    "ScoreQuery",
    "ScoreResult",
    "SyncMemoryIndex",
    "TierWeights",
    "WorkerInfo",
    "WorkerRef",
    "WorkerScore",
]
