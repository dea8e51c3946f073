"""kv-indexer: a global index of which inference worker holds which KV-cache blocks.

The public API: block keys (`kvcore.keys`), the `Index` interface with its in-memory
backend (`MemoryIndex`, `SyncMemoryIndex`) and Redis backend (`indexer.index.redis`),
and the gRPC client (`indexer.client`).

The names below are loaded on first use, so that `import indexer.client` (all a router
needs) does not import the index package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
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

# name -> the module it comes from
_EXPORTS: Final = {
    **dict.fromkeys(["BackendError", "ConfigError", "IndexerError", "InvalidQueryError",
                     "QueryTooLargeError"], "indexer.errors"),
    **dict.fromkeys(["ApplyOutcome", "Index", "IndexConfig", "MemoryIndex", "ScoreQuery",
                     "ScoreResult", "SyncMemoryIndex", "TierWeights", "WorkerRef",
                     "WorkerScore"], "indexer.index"),
    **dict.fromkeys(["block_keys", "block_keys_for_tokens", "root_seed"], "kvcore.keys"),
}

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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'indexer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
