"""kv-indexer: a global index of which inference worker holds which KV-cache blocks.

The public API: block keys (`kvcore.keys`), the `Index` interface with its in-memory
backend (`MemoryIndex`, `SyncMemoryIndex`) and Redis backend (`indexer.index.redis`).
"""

from indexer.errors import (
    BackendError,
    ConfigError,
    IndexerError,
    InvalidQueryError,
    QueryTooLargeError,
)
from indexer.index import (
    ApplyOutcome,
    Index,
    IndexConfig,
    MemoryIndex,
    ScoreQuery,
    ScoreResult,
    SyncMemoryIndex,
    TierWeights,
    WorkerRef,
    WorkerScore,
)
from kvcore.keys import block_keys, block_keys_for_tokens, root_seed

__all__ = [
    "ApplyOutcome",
    "BackendError",
    "ConfigError",
    "Index",
    "IndexConfig",
    "IndexerError",
    "InvalidQueryError",
    "MemoryIndex",
    "QueryTooLargeError",
    "ScoreQuery",
    "ScoreResult",
    "SyncMemoryIndex",
    "TierWeights",
    "WorkerRef",
    "WorkerScore",
    "block_keys",
    "block_keys_for_tokens",
    "root_seed",
]
