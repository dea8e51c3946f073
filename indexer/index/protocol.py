"""The Index interface every backend implements, and the types it speaks.

Presence of a block on a worker is one bit per (worker slot, tier): bit `slot * 4 + tier`
of the block's presence mask. Both backends store exactly these masks (a Python int in
memory, little-endian bytes in Redis), so scoring is one shared function.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Final, NamedTuple, Protocol, runtime_checkable

import msgspec

from indexer.errors import ConfigError
from kvcore.bus import TIERS, EventBatch, tier_index
from kvcore.pools import KIND_WORKER
from kvcore.roles import DEFAULT_ROLE

__all__ = [
    "DEFAULT_GHOST_CAPACITY",
    "DEFAULT_MAX_QUERY_TOKENS",
    "TIERS",
    "TIER_BITS",
    "ApplyOutcome",
    "Index",
    "IndexConfig",
    "IndexReader",
    "IndexStats",
    "RankState",
    "ResyncHook",
    "ResyncRequest",
    "ScoreQuery",
    "ScoreResult",
    "TierWeights",
    "WorkerInfo",
    "WorkerRef",
    "WorkerScore",
    "tier_index",
]

# Tier slots inside a worker's nibble; order is the bit position.
TIER_BITS: Final = 4
GPU, CPU, STORAGE, OTHER = range(4)

DEFAULT_MAX_QUERY_TOKENS: Final = 1_048_576
DEFAULT_GHOST_CAPACITY: Final = 65_536


MAX_TIER_WEIGHT: Final = 1e6


class TierWeights(msgspec.Struct, frozen=True, kw_only=True):
    """Weight of one matched block by the best tier it sits in on that worker."""

    gpu: float = 1.0
    cpu: float = 0.8
    storage: float = 0.5
    other: float = 0.5  # explicit weight for media the index does not know

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.gpu, self.cpu, self.storage, self.other)

    def validate(self, field: str = "") -> None:
        """Every weight finite and in [0, MAX_TIER_WEIGHT]; `field` prefixes the name."""
        for name, value in zip(TIERS, self.as_tuple(), strict=True):
            if not (math.isfinite(value) and 0.0 <= value <= MAX_TIER_WEIGHT):
                raise ConfigError(f"tier weight {name} ({field}tier_weights.{name}) must be a "
                                  f"finite number in [0, {MAX_TIER_WEIGHT:g}], got {value!r}")


class IndexConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Settings shared by every backend."""

    tier_weights: TierWeights = TierWeights()
    max_query_tokens: int = DEFAULT_MAX_QUERY_TOKENS
    # Smallest block size the limit is counted in when a query arrives as keys.
    min_block_size: int = 16
    # Engine hashes of evicted blocks kept per worker so later children still resolve.
    ghost_capacity: int = DEFAULT_GHOST_CAPACITY

    @property
    def max_query_blocks(self) -> int:
        return self.max_query_tokens // self.min_block_size

    def validate(self) -> None:
        self.tier_weights.validate()
        if self.max_query_tokens <= 0:
            raise ConfigError("max_query_tokens must be > 0")
        if self.min_block_size <= 0:
            raise ConfigError("min_block_size must be > 0")
        if self.ghost_capacity < 0:
            raise ConfigError("ghost_capacity must be >= 0")


class WorkerRef(NamedTuple):
    worker_id: str
    dp_rank: int


MAX_SEQ_JUMP: Final = 1 << 20


class ApplyOutcome(enum.Enum):
    """What applying one batch did. The index's ledger of a rank is the one owner of its
    stream position (epoch, last seq); the consumer acts on these outcomes."""

    APPLIED = "applied"
    # Applied, but batches are missing before it (a seq past the next one, or a new epoch
    # or a rank first seen at seq > 0): the rank's state needs a resync.
    APPLIED_AFTER_GAP = "applied_after_gap"
    DUPLICATE = "duplicate"  # (epoch, seq) already applied: nothing changed
    STALE_EPOCH = "stale_epoch"  # from an epoch older than the worker's current one
    # More than MAX_SEQ_JUMP past the next seq and not a resync (which starts by clearing):
    # not applied, so one wild seq cannot become a high-water mark that blinds the rank.
    SEQ_JUMP = "seq_jump"

    @property
    def applied(self) -> bool:
        return self is ApplyOutcome.APPLIED or self is ApplyOutcome.APPLIED_AFTER_GAP


class ResyncRequest(NamedTuple):
    model: str
    worker_id: str
    dp_rank: int
    epoch: int
    reason: str


ResyncHook = Callable[[ResyncRequest], None]


class ScoreQuery(msgspec.Struct, frozen=True, kw_only=True):
    """A prompt to match, as block keys or as token ids (exactly one of the two).

    Token ids are keyed with `block_size` from the root of (model, lora_name, cache_salt),
    lazily: blocks after the point where no candidate matches are never hashed.
    """

    model: str
    block_keys: Sequence[int] | None = None
    token_ids: Sequence[int] | bytes | None = None  # ids, or packed little-endian u32
    block_size: int = 0
    lora_name: str | None = None
    cache_salt: str | None = None
    workers: frozenset[str] | None = None  # candidate worker ids; None = every worker
    tier_weights: TierWeights | None = None
    include_zero: bool = False
    # Shared storage pools each candidate mounts (worker id -> pool names; from the
    # registry): a worker is credited with its pools' blocks at the storage tier.
    mounts: Mapping[str, frozenset[str]] | None = None

    @property
    def query_blocks(self) -> int:
        if self.block_keys is not None:
            return len(self.block_keys)
        assert self.token_ids is not None and self.block_size > 0
        width = 4 if isinstance(self.token_ids, bytes) else 1
        return len(self.token_ids) // width // self.block_size


# Not tracked by the cyclic GC (it holds a str, numbers and a dict of str -> int: no
# cycle): an answer names every matching rank, thousands when a pool is widely mounted,
# and tracked objects by the thousand per query set off collections inside Score.
class WorkerScore(msgspec.Struct, frozen=True, gc=False):
    """One rank's match. Read-only, `blocks_by_tier` included: the scores of one answer
    with the same tier counts may share one dict (the thousands of pool mounters holding
    none of the query themselves share one `{"storage": n}`); copy it to change it."""

    worker_id: str
    dp_rank: int
    matched_blocks: int
    weighted_score: float
    blocks_by_tier: dict[str, int]


class ScoreResult(msgspec.Struct, frozen=True):
    query_blocks: int
    scores: list[WorkerScore]  # by matched_blocks desc, then worker_id, dp_rank
    # Answered by a Redis read replica (its host:port): at most `staleness_s` behind the
    # primary. The primary and the in-memory index answer with 0 and "".
    staleness_s: float = 0.0
    replica: str = ""


class WorkerInfo(msgspec.Struct, frozen=True):
    model: str
    worker_id: str
    dp_rank: int
    epoch: int
    last_seq: int
    degraded: bool
    blocks_by_tier: dict[str, int]
    last_event_ts: float
    # Prefill/decode role from the worker's registry entry (kvcore/roles.py); the index
    # itself does not know it, the live-worker source fills it in.
    role: str = DEFAULT_ROLE
    # "worker", or "pool" for a shared storage pool (kvcore/pools.py: an owner of blocks,
    # never a candidate; dp_rank 0, epoch its wipes so far, last_seq -1).
    kind: str = KIND_WORKER
    # The pools a worker mounts (registry); filled in by the live-worker source.
    storage_pools: tuple[str, ...] = ()


class RankState(msgspec.Struct, frozen=True):
    """Everything the index knows of one worker rank (snapshots, rebuilds)."""

    model: str
    worker_id: str
    dp_rank: int
    epoch: int
    last_seq: int
    last_ts: float
    degraded: bool
    log: bytes  # the rank's ledger as a log (indexer/index/ledger.py)
    # The model's KV-cache group specs (group, kind, sliding window) as the exporting
    # index knew them, merged again on import (a snapshot's ranks are scored by them).
    group_specs: tuple[tuple[int, str | None, int], ...] = ()


class IndexStats(msgspec.Struct):
    batches_applied: int = 0
    events_applied: int = 0
    blocks_stored: int = 0
    blocks_removed: int = 0
    duplicates: int = 0
    stale: int = 0
    resyncs_requested: int = 0
    dropped: dict[str, int] = msgspec.field(default_factory=dict)
    workers: int = 0

    def drop(self, reason: str, count: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + count

    def snapshot(self, workers: int) -> IndexStats:
        """A copy to hand out (the live counters keep moving), with the worker count."""
        copy = msgspec.structs.replace(self, dropped=dict(self.dropped))
        copy.workers = workers
        return copy


@runtime_checkable
class IndexReader(Protocol):
    """What answering routers needs of an index: the query side. Reader processes and the
    gRPC servicer hold only this."""

    @property
    def config(self) -> IndexConfig:
        """The settings it was built with (query limits, tier weights)."""
        ...

    async def score(self, query: ScoreQuery) -> ScoreResult:
        """Per (worker, dp_rank): consecutive leading query blocks cached in any tier."""
        ...

    async def ping(self) -> None:
        """Return when the backend answers; raise BackendError when it does not."""
        ...

    async def workers(self, model: str | None = None) -> list[WorkerInfo]:
        ...

    async def block_size(self, model: str) -> int | None:
        """The block size the model's workers store with (from their events), if known."""
        ...

    async def stats(self) -> IndexStats:
        ...

    async def get_marker(self, name: str) -> str | None:
        """A small named value stored with the index (e.g. which rebuild it reflects)."""
        ...


@runtime_checkable
class Index(IndexReader, Protocol):
    """Block key -> workers, fed by bus batches, queried by prompt prefix: the query side
    and the write / recovery side the consumer uses."""

    async def apply(
        self, batches: Sequence[EventBatch], *, validated: bool = False
    ) -> list[ApplyOutcome]:
        """Apply batches in order; each is applied exactly once in effect.

        Every batch is checked first (`kvcore.bus.validate_batch`) and nothing is applied
        if one fails, unless the caller says they were `validated` (`decode_batch` does).
        """
        ...

    async def clear_worker(self, model: str, worker_id: str, dp_rank: int | None = None) -> int:
        """Drop every block of the worker (one DP rank or all); returns ranks cleared."""
        ...

    async def remove_worker(self, model: str, worker_id: str) -> int:
        """Forget the worker entirely (all DP ranks); returns ranks removed. A model whose
        last rank goes is forgotten with it (blocks, block size, everything it stored)."""
        ...

    async def remove_pool(self, model: str, pool: str) -> bool:
        """Forget a shared storage pool of the model (its blocks); True if it was there.
        Liveness calls it when no live worker declares the pool any more."""
        ...

    async def drop_empty_models(self) -> list[str]:
        """Forget models the index lists without any worker rank (left by an older
        version, or a crash between a model's last removal and its clean-up); returns
        their names. Cheap when there are none: liveness calls it periodically."""
        ...

    async def presence(self, model: str) -> dict[int, dict[WorkerRef, int]]:
        """Every block key of a model -> {worker: tier mask} (tests, snapshots, audits)."""
        ...

    async def export_ranks(self, ranks: Sequence[tuple[str, WorkerRef]]) -> list[RankState]:
        """The state of these (model, worker rank)s, for a snapshot."""
        ...

    async def import_ranks(self, states: Sequence[RankState]) -> None:
        """Replace each rank's state (blocks included) by the given one."""
        ...

    async def reset_caches(self) -> None:
        """Forget whatever was cached from the backend (it changed underneath, e.g. Redis
        was flushed): the next call reads the backend afresh."""
        ...

    async def set_marker(self, name: str, value: str | None) -> None:
        """Set a marker; None deletes it."""
        ...

    async def close(self) -> None:
        ...
