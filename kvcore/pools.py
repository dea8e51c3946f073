"""Shared storage pools: what a worker declares in the registry, and the names it may use.

A pool is a store many workers mount (a shared filesystem, an LMCache / Mooncake remote
store): a block any of them wrote there can be loaded by every worker that mounts it. A
worker declares the pools it mounts (`kv-publisher bridge --storage-pool NAME`); it may
write only into those. Light (no imports beyond the bus) so every part can check a name.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from kvcore.bus import MAX_NAME_BYTES

__all__ = ["KINDS", "KIND_POOL", "KIND_WORKER", "MAX_POOLS_PER_WORKER", "check_pools"]

KIND_WORKER: Final = "worker"
KIND_POOL: Final = "pool"
KINDS: Final = (KIND_WORKER, KIND_POOL)
MAX_POOLS_PER_WORKER: Final = 64


def check_pools(names: Iterable[str], field: str = "storage_pools") -> list[str]:
    """The pool names, each once in first-given order; ValueError naming `field` when one
    is empty, too long or there are too many."""
    out: list[str] = []
    for name in names:
        if not name or len(name.encode()) > MAX_NAME_BYTES:
            raise ValueError(f"{field}: a pool name must be 1 to {MAX_NAME_BYTES} bytes, "
                             f"got {name!r}")
        if name not in out:
            out.append(name)
    if len(out) > MAX_POOLS_PER_WORKER:
        raise ValueError(f"{field}: {len(out)} pools exceed {MAX_POOLS_PER_WORKER}")
    return out
