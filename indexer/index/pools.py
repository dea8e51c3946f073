"""Shared storage pools in the index: pools as owner slots, and their credit at Score.

A pool owns blocks like a worker rank: it has a slot, and a block it holds has the
storage bit of that slot in its presence mask (so the per-block presence representation
is the one every backend stores). Pools are written through the batches of the workers
that declared them (bus schema v2: `pool` on stored / removed / cleared events), so each
writer's (epoch, seq) keeps ordering and exactly-once application of its own pool writes:
a pool event is applied exactly when the writer's batch is.

A pool keeps engine hash -> key of what it holds: a block is written under the hash its
writer's engine gave it, and any writer may evict it by that hash. Writers of one pool
therefore share the engine's hash function (the store finds blocks by it, so they must).

Score credits a candidate worker with the blocks of the pools it mounts: the walk
continues the worker's own prefix through the pool and counts those blocks under storage.
The C walk (native/tally.c, `tally_pool_runs`) takes each pool as a wildcard holder for
its mounters (`PoolCredit`: the storage bits of the candidate slots mounting it, OR'ed
into the words it reads of a run the pool holds); without the C extension, and for
hybrid models, each pool-held block's mask gets those bits before the Python walk
(`pool_runs`, `credit_runs`, `credit_masks`). A cold worker (live, mounting a pool, but
never indexed: no slot) walks on a slot of its own for the query (`PoolPlan.cold`). Pools
are never candidates themselves.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from typing import Final, NamedTuple

import msgspec

from indexer.index.ledger import PresenceSink, WorkerLedger, cached_root_seed
from indexer.index.protocol import TIER_BITS, IndexStats, WorkerRef
from kvcore.bus import AllBlocksCleared, BlockRemoved, BlockStored, Event, EventBatch
from kvcore.keys import block_keys

__all__ = [
    "MAX_TOMBSTONES",
    "NO_POOLS",
    "POOL_RANK",
    "PoolCredit",
    "PoolPlan",
    "PoolRuns",
    "PoolState",
    "apply_pool_events",
    "credit_masks",
    "credit_runs",
    "pool_credit",
    "pool_runs",
    "refuse_undeclared",
    "resolve_pool_store",
    "split_pool_events",
]

STORAGE: Final = 2
# The dp_rank pools take in `presence()` refs: no worker rank is negative.
POOL_RANK: Final = -1
_MAX_CACHED_SETS: Final = 256  # PoolPlan.followers
# Removals remembered per pool; past this the pool's floor moves up to the newest one.
MAX_TOMBSTONES: Final = 65_536


class PoolState:
    """Blocks of one shared storage pool (one model), newest write wins.

    Writers' batches reach the index through different partitions, so one writer's store
    may be applied after another's later eviction of the same block. Every pool op
    therefore carries its batch's timestamp, and the newest one wins per engine hash: a
    store older than the block's last removal (a tombstone), older than the pool's
    `floor` (its last wipe, or the newest tombstone forgotten when they exceeded
    `MAX_TOMBSTONES`) is ignored; a removal older than the store holding the block is too
    (a removal is never ignored for the floor: a block stored before it still goes).
    Ignoring a write only ever loses a hit. Writers' clocks are assumed closer than the
    time between a block's store and its eviction.
    """

    __slots__ = ("epoch", "floor", "gone", "gone_max", "holders", "keys", "last_ts", "name",
                 "slot", "stamps")

    def __init__(self, name: str, slot: int) -> None:
        self.name = name
        self.slot = slot
        self.keys: dict[int, int] = {}  # engine hash -> key, blocks the pool holds
        self.stamps: dict[int, float] = {}  # engine hash -> ts of the store holding it
        self.holders: dict[int, int] = {}  # key -> hashes naming it (usually 1)
        self.gone: dict[int, float] = {}  # engine hash -> ts of its removal (tombstones)
        self.gone_max = 0.0  # newest tombstone
        self.floor = 0.0  # stores older than this are ignored
        self.epoch = 0  # bumped each time the pool is wiped
        self.last_ts = 0.0

    @property
    def bitpos(self) -> int:
        return self.slot * TIER_BITS + STORAGE

    def store(self, hashes: Sequence[int], keys: Sequence[int], ts: float,
              sink: PresenceSink) -> int:
        """Hold `keys` under `hashes` as of `ts`; returns how many blocks are new."""
        self.last_ts = max(self.last_ts, ts)
        if ts < self.floor:
            return 0
        added: list[int] = []
        gone, stamps = self.gone, self.stamps
        for h, key in zip(hashes, keys, strict=True):
            if gone.get(h, ts) > ts or stamps.get(h, ts) > ts:
                continue  # removed, or stored again, after this write
            gone.pop(h, None)
            stamps[h] = ts
            old = self.keys.get(h)
            if old == key:
                continue
            if old is not None:
                self._release(h, old, sink)
                stamps[h] = ts
            self.keys[h] = key
            count = self.holders.get(key, 0)
            self.holders[key] = count + 1
            if not count:
                added.append(key)
        if added:
            sink.set_bits(added, self.bitpos)
        return len(added)

    def remove(self, hashes: Iterable[int], ts: float, sink: PresenceSink) -> int:
        """Blocks left the pool as of `ts` (a tombstone each, even for blocks it does not
        hold yet: their store may be applied later)."""
        self.last_ts = max(self.last_ts, ts)
        removed = 0
        gone = self.gone
        # Below the floor no store is taken any more: no tombstone needed (but a block
        # stored before the floor still goes).
        remember = ts >= self.floor
        for h in hashes:
            if self.stamps.get(h, ts) > ts:
                continue  # stored again after this removal
            key = self.keys.get(h)
            if key is not None:
                removed += self._release(h, key, sink)
            if remember and gone.get(h, ts) <= ts:
                gone[h] = ts
        self.gone_max = max(self.gone_max, ts)
        if len(gone) > MAX_TOMBSTONES:
            self.floor = max(self.floor, self.gone_max)
            gone.clear()
        return removed

    def _release(self, engine_hash: int, key: int, sink: PresenceSink) -> int:
        del self.keys[engine_hash]
        del self.stamps[engine_hash]
        count = self.holders[key] - 1
        if count:
            self.holders[key] = count
            return 0
        del self.holders[key]
        sink.clear_bits([key], self.bitpos)
        return 1

    def wipe(self, ts: float, sink: PresenceSink) -> None:
        """The pool was wiped as of `ts`: blocks stored later stay."""
        self.last_ts = max(self.last_ts, ts)
        for h in [h for h, stamp in self.stamps.items() if stamp <= ts]:
            self._release(h, self.keys[h], sink)
        self.floor = max(self.floor, ts)
        self.gone = {h: t for h, t in self.gone.items() if t > self.floor}
        self.epoch += 1

    def drop(self, sink: PresenceSink) -> None:
        """Forget everything (the pool is gone)."""
        if self.holders:
            sink.clear_bits(list(self.holders), self.bitpos)
        self.keys.clear()
        self.stamps.clear()
        self.holders.clear()
        self.gone.clear()

    def __len__(self) -> int:
        return len(self.holders)


def split_pool_events(batch: EventBatch) -> tuple[EventBatch, list[Event]]:
    """The batch with only the writer's own events, and its pool events in order."""
    events = batch.events
    for event in events:  # a plain loop: no generator per batch on the ingest path
        if event.pool is not None:
            break
    else:
        return batch, []
    own = [event for event in events if event.pool is None]
    pooled = [event for event in events if event.pool is not None]
    return msgspec.structs.replace(batch, events=own), pooled


def refuse_undeclared(
    batch: EventBatch, declared: Collection[str] | None
) -> tuple[EventBatch, int]:
    """The batch without the pool events its writer may not make, and how many those were.

    `declared`: the pools the writer's registry entry declares, None while the writer has
    no entry yet. A declared pool takes every event; an undeclared one none. A writer not
    known yet keeps its pool removals (they can only take blocks away, never invent
    one) and loses its stores and wipes.
    """
    def allowed(event: Event) -> bool:
        if event.pool is None:
            return True
        if declared is None:
            return isinstance(event, BlockRemoved)
        return event.pool in declared

    kept = [event for event in batch.events if allowed(event)]
    refused = len(batch.events) - len(kept)
    if not refused:
        return batch, 0
    return msgspec.structs.replace(batch, events=kept), refused


def apply_pool_events(
    events: Sequence[Event],
    writer: WorkerLedger,
    open_pool: Callable[[str], PoolState],
    sink: PresenceSink,
    *,
    stats: IndexStats,
    ts: float,
) -> set[str]:
    """Apply a writer's pool events (its batch was applied); returns the pools written.

    A pool's presence lives in KV-cache group 0 (the full-attention group of a hybrid
    model): an event's `group` is not read (bridges send pool events of group 0 only).
    """
    written: set[str] = set()
    for event in events:
        assert event.pool is not None
        pool = open_pool(event.pool)
        written.add(pool.name)
        if isinstance(event, BlockStored):
            hashes, keys = resolve_pool_store(event, writer, stats)
            pool.store(hashes, keys, ts, sink)
        elif isinstance(event, BlockRemoved):
            pool.remove(event.block_hashes, ts, sink)
        elif isinstance(event, AllBlocksCleared):
            pool.wipe(ts, sink)
    return written


def resolve_pool_store(
    event: BlockStored, writer: WorkerLedger, stats: IndexStats
) -> tuple[list[int], list[int]]:
    """(hashes, keys) of a pool write: from its tokens (chained from the root, or from a
    parent the writer's ledger knows), else each hash through the writer's ledger. What
    the writer cannot name is dropped, counted: a pool holds only blocks a writer keyed."""
    if event.token_ids:
        if event.parent_hash is None:
            seed = cached_root_seed(writer.model, event.lora_name, event.cache_salt)
        else:
            parent = writer.keys.get(event.parent_hash)
            if parent is None:
                stats.drop("pool_unknown_parent", len(event.block_hashes))
                return [], []
            seed = parent
        keys = block_keys(event.token_ids, event.block_size, seed, event.extra_keys)
        return list(event.block_hashes), list(keys)
    hashes: list[int] = []
    keys = []
    writer_keys = writer.keys
    for h in event.block_hashes:
        key = writer_keys.get(h)
        if key is None:
            stats.drop("pool_unknown_block")
            continue
        hashes.append(h)
        keys.append(key)
    return hashes, keys


# --- Score: crediting mounting workers ---------------------------------------------------


class PoolCredit(NamedTuple):
    """One pool as the walk sees it: its slot's nibble shift, and the storage bits of the
    candidate slots that mount it."""

    shift: int
    mounters: int


class PoolPlan(NamedTuple):
    """What Score adds for pools: the credits, the mounted pools' slots (`slot_bits`
    form: the table's walk goes on while one of them holds a block), and cold workers
    (mounting, but holding nothing the index knows: no slot) as extra candidates on
    slots of their own past every real one, with the refs those slots stand for."""

    credits: list[PoolCredit]
    pool_bits: int
    cold: int
    cold_refs: dict[int, WorkerRef]
    # candidate slots (`slot_bits` form) mounting the same pools, groups of two or more:
    # those that hold none of a query's blocks themselves all get the same answer
    groups: list[int]
    # slots of such a set (`slot_bits` form) -> the slot numbers past its first (cache)
    followers: dict[int, list[int]]


NO_POOLS: Final = PoolPlan([], 0, 0, {}, [], {})


def pool_credit(
    pool_slots: Mapping[str, int],
    mounts: Mapping[str, frozenset[str]],
    slots_of_worker: Mapping[str, int],
    candidates: int,
    *,
    workers: frozenset[str] | None,
    next_slot: int,
) -> PoolPlan:
    """The pool plan of one query.

    `pool_slots`: pool name -> its slot; `mounts`: worker id -> pools it mounts;
    `slots_of_worker`: worker id -> its slots in `slot_bits` form; `candidates`: the
    query's candidate slots, in that form; `workers`: the query's candidate ids (None:
    all); `next_slot`: a slot number above every slot in use.
    """
    mounters: dict[str, int] = {}
    cold = 0
    cold_refs: dict[int, WorkerRef] = {}
    by_mount: dict[frozenset[str], int] = {}
    for worker_id, mounted in mounts.items():
        names = frozenset(mounted & pool_slots.keys())
        if not names:
            continue
        alive = slots_of_worker.get(worker_id, 0) & candidates
        if not alive and worker_id not in slots_of_worker and (
                workers is None or worker_id in workers):
            slot = next_slot + len(cold_refs)
            cold_refs[slot] = WorkerRef(worker_id, 0)
            alive = 1 << (slot * TIER_BITS)
            cold |= alive
        by_mount[names] = by_mount.get(names, 0) | alive
        for name in names:
            mounters[name] = mounters.get(name, 0) | alive
    if not mounters:
        return NO_POOLS
    groups = [bits for bits in by_mount.values() if bits & (bits - 1)]
    credits: list[PoolCredit] = []
    pool_bits = 0
    for name, alive in mounters.items():
        if alive:
            slot = pool_slots[name]
            credits.append(PoolCredit(slot * TIER_BITS, alive << STORAGE))
            pool_bits |= 1 << (slot * TIER_BITS)
    return PoolPlan(credits, pool_bits, cold, cold_refs, groups, {})


class PoolRuns(NamedTuple):
    """One query's runs credited, and what the walk then needs: its candidates, and the
    slots whose answer is another's (`replicas`: representative slot -> the others)."""

    runs: list[int]
    candidates: int
    replicas: dict[int, list[int]]


def pool_runs(runs: Sequence[int], plan: PoolPlan, candidates: int) -> PoolRuns:
    """Credit a query's runs `[mask, count, ...]` (candidates in `slot_bits` form, cold
    ones included) to the pools' mounters.

    Mounters of the same pools that hold none of the query's blocks themselves have the
    same answer (the pools' own prefix, all storage): one of each group walks, the others
    copy its answer (`scoring.expand_replicas`), so a pool mounted by many workers costs the walk
    one slot, not one per worker.
    """
    held = functools.reduce(operator.or_, runs[0::2], 0)
    held = (held | held >> 1 | held >> 2 | held >> 3) & candidates
    replicas: dict[int, list[int]] = {}
    dropped = 0
    for group in plan.groups:
        pure = group & candidates & ~held
        if pure & (pure - 1):  # two or more
            first = pure & -pure
            others = pure ^ first
            dropped |= others
            followers = plan.followers.get(pure)
            if followers is None:
                if len(plan.followers) >= _MAX_CACHED_SETS:
                    plan.followers.clear()
                followers = plan.followers[pure] = [bit // TIER_BITS
                                                    for bit in _set_bits(others)]
            replicas[first.bit_length() // TIER_BITS] = followers
    credits = plan.credits
    if dropped:
        credits = [PoolCredit(c.shift, c.mounters & ~(dropped << STORAGE)) for c in credits]
    return PoolRuns(credit_runs(runs, credits), candidates & ~dropped, replicas)


def _set_bits(mask: int) -> Iterator[int]:
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


def _credited(mask: int, credits: Sequence[PoolCredit]) -> int:
    for credit in credits:
        if mask >> credit.shift & 15:
            mask |= credit.mounters
    return mask


def credit_runs(runs: Sequence[int], credits: Sequence[PoolCredit]) -> list[int]:
    """Runs `[mask, count, ...]` with each pool-held run credited to the pool's mounters."""
    out = list(runs)
    for shift, mounters in credits:
        out[0::2] = [mask | mounters if mask >> shift & 15 else mask for mask in out[0::2]]
    return out


def credit_masks(masks: Iterable[int], credits: Sequence[PoolCredit]) -> Iterator[int]:
    for mask in masks:
        yield _credited(mask, credits)
