"""In-memory index: the embedded default, and a library a router may embed.

Per model: `blocks` (a `BlockMasks` table) maps a block key to its presence mask (an int,
one nibble per worker slot), and one `WorkerLedger` per (worker, dp_rank) holds the
engine-hash map.
The async methods do no I/O; `MemoryIndex.sync` gives the same calls without a loop.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from indexer.index import scoring
from indexer.index.block_table import BlockMasks, new_block_table
from indexer.index.hybrid import (
    FULL,
    GroupRule,
    group_rule,
    hybrid_matches,
    learn_specs,
    merged_spec,
    prefix_limits,
    runs_to_masks,
    with_specs,
)
from indexer.index.ledger import WorkerLedger, cached_root_seed, stored_block_size
from indexer.index.pools import (
    NO_POOLS,
    POOL_RANK,
    PoolPlan,
    PoolState,
    apply_pool_events,
    credit_masks,
    credit_runs,
    pool_credit,
    split_pool_events,
)
from indexer.index.protocol import (
    TIER_BITS,
    ApplyOutcome,
    IndexConfig,
    IndexStats,
    RankState,
    ResyncHook,
    ScoreQuery,
    ScoreResult,
    WorkerInfo,
    WorkerRef,
)
from indexer.index.scoring import (
    QueryTally,
    SlotMatch,
    SlotTable,
    prefix_match,
    prefix_match_runs,
    query_keys_packed,
    query_tally,
    score_query,
    slot_bits,
    slot_table,
    validate_query,
    worker_scores,
)
from kvcore.bus import Event, EventBatch, validate_batch
from kvcore.keys import NATIVE, pack_keys
from kvcore.pools import KIND_POOL

if NATIVE:
    from kvcore._native import BlockTable

__all__ = ["MemoryIndex", "SyncMemoryIndex"]


class _GroupTable:
    """The PresenceSink of one KV-cache group (> 0) of a hybrid model."""

    __slots__ = ("blocks", "space")

    def __init__(self, space: _ModelSpace) -> None:
        self.space = space
        self.blocks = new_block_table()

    def set_bits(self, keys: list[int], bitpos: int) -> None:
        self.blocks.set_bit_at(keys, bitpos)

    def clear_bits(self, keys: list[int], bitpos: int) -> None:
        self.blocks.clear_bit_at(keys, bitpos)

    def group_sink(self, group: int) -> _GroupTable:
        return self.space.group_sink(group)

    def learn_group(self, group: int, kind: str | None, sliding_window: int) -> None:
        self.space.learn_group(group, kind, sliding_window)


class _ModelSpace:
    """One model's blocks and workers; it is the PresenceSink of its ledgers.

    `blocks` holds KV-cache group 0, the only one of most models; a hybrid model's other
    groups each have a table in `groups`, and `group_specs` what their events said.
    """

    def __init__(self, model: str, ghost_capacity: int) -> None:
        self.model = model
        self.ghost_capacity = ghost_capacity
        self.blocks = new_block_table()
        self.ledgers: dict[WorkerRef, WorkerLedger] = {}
        self.by_slot: dict[int, WorkerLedger] = {}
        self.refs: dict[int, WorkerRef] = {}  # slot -> its rank (Score's answers)
        self.all_slots = 0  # slot_bits(by_slot), kept current
        self.slots_of_worker: dict[str, int] = {}  # worker id -> slot_bits of its ranks
        self.block_size: int | None = None
        self.pools: dict[str, PoolState] = {}  # shared storage pools (indexer/index/pools.py)
        self.pool_writes: dict[WorkerRef, set[str]] = {}  # pools each rank has written into
        self.slot_version = 0  # bumped when a slot is taken or freed
        self.pool_floor = 0.0  # pools ignore writes older than this (snapshot imports)
        # the last pool plan: ((id(mounts), id(workers), candidates, slot_version), mounts,
        # plan); `mounts` kept so its id is not reused meanwhile
        self.plan_cache: tuple[tuple[int, int, int, int], object, PoolPlan] | None = None
        # slot_table of the refs Score names: (slot_version, cold refs or None, table)
        self.table_cache: tuple[int, object, SlotTable] | None = None
        # the refs with a plan's cold ones: (slot_version, cold refs, refs)
        self.refs_cache: tuple[int, object, dict[int, WorkerRef]] | None = None
        self._free: list[int] = []
        self._next_slot = 0
        # The last `candidates` answer: (workers, mask). A router's candidate set is one
        # frozenset reused for a while (the worker directory's cache), and OR-ing a
        # thousand ranks' bits per query costs more than the walk. Cleared when slots change.
        self._candidates_memo: tuple[frozenset[str], int] | None = None
        self.groups: dict[int, _GroupTable] = {}
        self.group_specs: dict[int, tuple[str | None, int]] = {}

    def group_sink(self, group: int) -> _GroupTable:
        found = self.groups.get(group)
        if found is None:
            found = self.groups[group] = _GroupTable(self)
        return found

    def learn_group(self, group: int, kind: str | None, sliding_window: int) -> None:
        self.group_specs[group] = merged_spec(group, self.group_specs.get(group),
                                              (kind, sliding_window))

    def group_tables(self, block_size: int | None) -> tuple[list[BlockMasks], list[GroupRule]]:
        """Every group's table and reuse rule, group 0 first (hybrid models only); windows
        counted in blocks of `block_size` (the query's, as the Redis layouts count them:
        not the last size a store named, which any worker of the model sets)."""
        groups = sorted(self.groups)
        tables = [self.blocks, *(self.groups[g].blocks for g in groups)]
        rules = [group_rule(*self.group_specs.get(g, (None, 0)), block_size)
                 for g in (0, *groups)]
        return tables, rules

    def set_bits(self, keys: list[int], bitpos: int) -> None:
        self.blocks.set_bit_at(keys, bitpos)

    def clear_bits(self, keys: list[int], bitpos: int) -> None:
        self.blocks.clear_bit_at(keys, bitpos)

    @property
    def presence_target(self) -> BlockMasks | None:
        """What the ledger's C store loop sets bits in as `set_bits` does: group 0's table
        when it is the C one (None: the loop calls `set_bits`)."""
        return self.blocks if NATIVE and type(self.blocks) is BlockTable else None

    def ledger(self, ref: WorkerRef) -> WorkerLedger:
        found = self.ledgers.get(ref)
        if found is not None:
            return found
        slot = self._take_slot()
        ledger = WorkerLedger(self.model, ref.worker_id, ref.dp_rank, slot, self.ghost_capacity)
        self.ledgers[ref] = ledger
        self.by_slot[slot] = ledger
        self.refs[slot] = ref
        bits = slot_bits([slot])
        self.all_slots |= bits
        self.slots_of_worker[ref.worker_id] = self.slots_of_worker.get(ref.worker_id, 0) | bits
        self._candidates_memo = None
        return ledger

    @property
    def next_slot(self) -> int:
        """A slot number above every slot in use."""
        return self._next_slot

    def _take_slot(self) -> int:
        slot = heapq.heappop(self._free) if self._free else self._next_slot
        self._next_slot = max(self._next_slot, slot + 1)
        self.slot_version += 1
        return slot

    def _free_slot(self, slot: int) -> None:
        heapq.heappush(self._free, slot)
        self.slot_version += 1

    def pool(self, name: str) -> PoolState:
        found = self.pools.get(name)
        if found is None:
            found = self.pools[name] = PoolState(name, self._take_slot())
            found.floor = self.pool_floor
        return found

    def raise_pool_floor(self, ts: float) -> None:
        """A snapshot up to `ts` was imported: the pool writes it covered (evictions among
        them) are not replayed, so no pool may take a write older than it."""
        if ts > self.pool_floor:
            self.pool_floor = ts
            for pool in self.pools.values():
                pool.floor = max(pool.floor, ts)

    def drop_pool(self, name: str) -> bool:
        pool = self.pools.pop(name, None)
        if pool is None:
            return False
        pool.drop(self)
        self._free_slot(pool.slot)
        return True

    def apply_pool_writes(self, ref: WorkerRef, ledger: WorkerLedger, pooled: list[Event],
                          outcome: ApplyOutcome, *, ts: float, stats: IndexStats) -> None:
        """The pool events of a writer's batch, once the batch itself was applied. After a
        gap in the writer's batches its lost pool writes (evictions among them) are unknown:
        the pools it wrote into are wiped rather than left claiming blocks."""
        if outcome is ApplyOutcome.APPLIED_AFTER_GAP:
            for name in self.pool_writes.pop(ref, ()):
                if name in self.pools:
                    self.pools[name].wipe(ts, self)
        if not pooled or not outcome.applied:
            return
        written = apply_pool_events(pooled, ledger, self.pool, self, stats=stats, ts=ts)
        self.pool_writes.setdefault(ref, set()).update(written)

    def drop_ledger(self, ledger: WorkerLedger) -> None:
        ledger.clear(self)
        del self.ledgers[WorkerRef(ledger.worker_id, ledger.dp_rank)]
        self.pool_writes.pop(WorkerRef(ledger.worker_id, ledger.dp_rank), None)
        del self.by_slot[ledger.slot]
        del self.refs[ledger.slot]
        bits = slot_bits([ledger.slot])
        self.all_slots &= ~bits
        remaining = self.slots_of_worker[ledger.worker_id] & ~bits
        if remaining:
            self.slots_of_worker[ledger.worker_id] = remaining
        else:
            del self.slots_of_worker[ledger.worker_id]
        self._free_slot(ledger.slot)
        self._candidates_memo = None

    def ref_of_slot(self, slot: int) -> WorkerRef:
        return self.refs[slot]

    def score_refs(self, cold: dict[int, WorkerRef]) -> dict[int, WorkerRef]:
        """The refs a Score names: every slot's, and a pool plan's cold slots'; kept
        while the slots and the cold refs are the same objects (thousands of cold
        mounters would cost a merge per query)."""
        if not cold:
            return self.refs
        cached = self.refs_cache
        if cached is not None and cached[0] == self.slot_version and cached[1] is cold:
            return cached[2]
        refs = {**self.refs, **cold}
        self.refs_cache = (self.slot_version, cold, refs)
        return refs

    def slot_table(self, refs: dict[int, WorkerRef], cold: object) -> SlotTable:
        """`scoring.slot_table(refs)`, kept while the slots and the cold refs (a pool
        plan's, None without) are the same objects."""
        cached = self.table_cache
        if cached is not None and cached[0] == self.slot_version and cached[1] is cold:
            return cached[2]
        table = slot_table(refs)
        self.table_cache = (self.slot_version, cold, table)
        return table

    def candidates(self, workers: frozenset[str] | None) -> int:
        if workers is None:
            return self.all_slots
        memo = self._candidates_memo
        if memo is not None and memo[0] is workers:
            return memo[1]
        mask = 0
        for worker_id in workers:
            mask |= self.slots_of_worker.get(worker_id, 0)
        self._candidates_memo = (workers, mask)
        return mask


class SyncMemoryIndex:
    """The in-memory index without an event loop: for routers that embed it."""

    def __init__(self, config: IndexConfig | None = None, on_resync: ResyncHook | None = None):
        self.config = config or IndexConfig()
        self.config.validate()
        self.on_resync = on_resync
        self._models: dict[str, _ModelSpace] = {}
        self._stats = IndexStats()
        self.markers: dict[str, str] = {}

    def apply(
        self, batches: Sequence[EventBatch], *, validated: bool = False
    ) -> list[ApplyOutcome]:
        """Apply in order; a batch that fails validation raises before anything changes."""
        if not validated:
            for batch in batches:
                validate_batch(batch)
        outcomes: list[ApplyOutcome] = []
        for batch in batches:
            space = self._models.get(batch.model)
            if space is None:
                space = self._models[batch.model] = _ModelSpace(
                    batch.model, self.config.ghost_capacity
                )
            ref = WorkerRef(batch.worker_id, batch.dp_rank)
            ledger = space.ledger(ref)
            own, pooled = split_pool_events(batch)
            outcome = ledger.apply(own, space, self._stats, self.on_resync)
            if pooled or outcome is ApplyOutcome.APPLIED_AFTER_GAP:
                space.apply_pool_writes(ref, ledger, pooled, outcome, ts=batch.ts,
                                        stats=self._stats)
            outcomes.append(outcome)
            space.block_size = stored_block_size(batch) or space.block_size
        return outcomes

    def score(self, query: ScoreQuery) -> ScoreResult:
        validate_query(query, self.config)
        space = self._models.get(query.model)
        if space is None:
            return ScoreResult(query.query_blocks, [])
        candidates = space.candidates(query.workers)
        plan = _pool_plan(space, query, candidates)
        cold = plan.cold_refs or None
        refs = space.score_refs(plan.cold_refs)
        if space.groups:
            matches = self._hybrid_matches(query, space, candidates, plan)
            return ScoreResult(query.query_blocks, worker_scores(matches, refs.__getitem__))
        scores = score_query(query, space.blocks, candidates, self.config, refs,
                             table=lambda: space.slot_table(refs, cold), plan=plan)
        return ScoreResult(query.query_blocks, scores)

    def score_tally(self, query: ScoreQuery) -> QueryTally | None:
        """`score` stopped at the tally (`scoring.query_tally`): no WorkerScore per
        matched rank. None when only `score` can answer (hybrid KV-cache groups, or no C
        extension)."""
        if not scoring.USE_NATIVE_TALLY:
            return None
        validate_query(query, self.config)
        space = self._models.get(query.model)
        if space is None:
            return QueryTally(query.query_blocks, b"", [])
        if space.groups:
            return None
        candidates = space.candidates(query.workers)
        plan = _pool_plan(space, query, candidates)
        cold = plan.cold_refs or None
        refs = space.score_refs(plan.cold_refs)
        tally = query_tally(query, space.blocks, candidates, self.config, plan=plan)
        names = space.slot_table(refs, cold).refs if tally else []
        return QueryTally(query.query_blocks, tally, names)

    def _hybrid_matches(self, query: ScoreQuery, space: _ModelSpace,
                        candidates: int, plan: PoolPlan = NO_POOLS) -> list[SlotMatch]:
        """vLLM's hybrid rule over the model's KV-cache groups (indexer/index/hybrid.py).

        With group 0 under the full-attention rule, its prefix walk (hashing only as far
        as a candidate matches) bounds every hit, so the other groups are looked up only
        that far. A pool's presence lives in group 0: its credit (`plan`) goes to group 0's
        masks only, so a mounter's hit still needs what the other groups' rules ask of
        its own cache."""
        tables, rules = space.group_tables(query.block_size or space.block_size)
        weights = query.tier_weights or self.config.tier_weights
        candidates |= plan.cold
        if rules[0].rule != FULL:
            packed = query_keys_packed(query)
            limits = {len(packed) // 8: candidates} if candidates else {}
            present = [table.get_present(packed) for table in tables]
            if plan.credits:
                present[0] = dict(zip(present[0], credit_masks(present[0].values(),
                                                               plan.credits), strict=True))
            return hybrid_matches(rules, present, limits, weights=weights,
                                  include_zero=query.include_zero)
        if query.token_ids is not None:
            seed = cached_root_seed(query.model, query.lora_name, query.cache_salt)
            keys = bytearray()
            runs = space.blocks.mask_runs(query.token_ids, query.block_size, seed,
                                          (candidates | plan.pool_bits) * 15, keys)
            if plan.credits:
                runs = credit_runs(runs, plan.credits)
            reference = prefix_match_runs(runs, candidates, weights)
            group0 = runs_to_masks(runs)
        else:
            keys = bytearray(pack_keys(query.block_keys or ()))
            group0 = space.blocks.get_many(keys)
            if plan.credits:
                group0 = list(credit_masks(group0, plan.credits))
            reference = prefix_match(group0, candidates, weights)
        limits = prefix_limits(reference, candidates if query.include_zero else 0)
        del keys[max(limits, default=0) * 8 :]
        # Group 0's prefix walk is done (`reference`): its map is not read.
        present = [{}, *(table.get_present(keys) for table in tables[1:])]
        return hybrid_matches(rules, present, limits, weights=weights,
                              include_zero=query.include_zero, reference=reference,
                              reference_masks=group0)

    def clear_worker(self, model: str, worker_id: str, dp_rank: int | None = None) -> int:
        ledgers = self._ledgers_of(model, worker_id, dp_rank)
        space = self._models.get(model)
        for ledger in ledgers:
            assert space is not None
            ledger.clear(space)
        return len(ledgers)

    def remove_worker(self, model: str, worker_id: str) -> int:
        ledgers = self._ledgers_of(model, worker_id, None)
        space = self._models.get(model)
        for ledger in ledgers:
            assert space is not None
            space.drop_ledger(ledger)
        if space is not None and not space.ledgers and not space.pools:
            del self._models[model]  # its pools go when liveness removes them
        return len(ledgers)

    def remove_pool(self, model: str, pool: str) -> bool:
        space = self._models.get(model)
        if space is None or not space.drop_pool(pool):
            return False
        if not space.ledgers and not space.pools:
            del self._models[model]
        return True

    def drop_empty_models(self) -> list[str]:
        """Model spaces without a rank (remove_worker already drops the one it empties)."""
        empty = [name for name, space in self._models.items()
                 if not space.ledgers and not space.pools]
        for name in empty:
            del self._models[name]
        return empty

    def workers(self, model: str | None = None) -> list[WorkerInfo]:
        spaces = [self._models[model]] if model in self._models else []
        if model is None:
            spaces = list(self._models.values())
        infos = [
            WorkerInfo(space.model, ledger.worker_id, ledger.dp_rank, ledger.epoch,
                       ledger.last_seq, ledger.degraded, ledger.blocks_by_tier(),
                       ledger.last_ts)
            for space in spaces
            for ledger in space.ledgers.values()
        ]
        infos.extend(_pool_info(space.model, pool) for space in spaces
                     for pool in space.pools.values())
        infos.sort(key=lambda w: (w.model, w.worker_id, w.dp_rank))
        return infos

    def block_size(self, model: str) -> int | None:
        space = self._models.get(model)
        return space.block_size if space is not None else None

    def stats(self) -> IndexStats:
        return self._stats.snapshot(sum(len(space.ledgers) for space in self._models.values()))

    def export_ranks(self, ranks: Sequence[tuple[str, WorkerRef]]) -> list[RankState]:
        states = []
        for model, ref in ranks:
            space = self._models.get(model)
            ledger = space.ledgers.get(ref) if space is not None else None
            if space is not None and ledger is not None:
                states.append(with_specs(ledger.export(), (
                    (group, kind, window)
                    for group, (kind, window) in sorted(space.group_specs.items()))))
        return states

    def import_ranks(self, states: Sequence[RankState]) -> None:
        for state in states:
            space = self._models.get(state.model)
            if space is None:
                space = self._models[state.model] = _ModelSpace(state.model,
                                                                self.config.ghost_capacity)
            ledger = space.ledger(WorkerRef(state.worker_id, state.dp_rank))
            ledger.restore(state, space)
            learn_specs(state, space.learn_group, hybrid_on_gpu=ledger.hybrid_on_gpu)
            space.raise_pool_floor(state.last_ts)

    def presence(self, model: str) -> dict[int, dict[WorkerRef, int]]:
        """Every block key of a model -> {worker: tier mask}; for tests and snapshots."""
        space = self._models.get(model)
        if space is None:
            return {}
        return {key: _split_mask(mask, space) for key, mask in space.blocks.items()}

    def _ledgers_of(self, model: str, worker_id: str, dp_rank: int | None) -> list[WorkerLedger]:
        space = self._models.get(model)
        if space is None:
            return []
        return [
            ledger
            for ref, ledger in space.ledgers.items()
            if ref.worker_id == worker_id and (dp_rank is None or ref.dp_rank == dp_rank)
        ]


def _pool_plan(space: _ModelSpace, query: ScoreQuery, candidates: int) -> PoolPlan:
    """The query's pool plan; the last one is reused while the slots, the candidates and
    the (unchanged) mounts and worker-id objects are the same: a router's queries come
    with the live-worker directory's cached sets."""
    mounts = query.mounts
    if not mounts or not space.pools:
        return NO_POOLS
    key = (id(mounts), id(query.workers), candidates, space.slot_version)
    cached = space.plan_cache
    if cached is not None and cached[0] == key and cached[1] is mounts:
        return cached[2]
    pool_slots = {pool.name: pool.slot for pool in space.pools.values()}
    plan = pool_credit(pool_slots, mounts, space.slots_of_worker, candidates,
                       workers=query.workers, next_slot=space.next_slot)
    space.plan_cache = (key, mounts, plan)
    return plan


def _pool_info(model: str, pool: PoolState) -> WorkerInfo:
    held = {"storage": len(pool)} if len(pool) else {}
    return WorkerInfo(model, pool.name, 0, pool.epoch, -1, False, held, pool.last_ts,
                      kind=KIND_POOL)


def _split_mask(mask: int, space: _ModelSpace) -> dict[WorkerRef, int]:
    out: dict[WorkerRef, int] = {}
    pool_of_slot = {pool.slot: pool.name for pool in space.pools.values()}
    while mask:
        # from one set bit to the next: a mask with a slot near 2**20 holds 4M bits
        slot = ((mask & -mask).bit_length() - 1) // TIER_BITS
        nibble = mask >> (slot * TIER_BITS) & 15
        mask ^= nibble << (slot * TIER_BITS)
        if slot in pool_of_slot:
            out[WorkerRef(pool_of_slot[slot], POOL_RANK)] = nibble
        else:
            ledger = space.by_slot[slot]
            out[WorkerRef(ledger.worker_id, ledger.dp_rank)] = nibble
    return out


class MemoryIndex:
    """The async face of the in-memory index (the `Index` protocol)."""

    def __init__(self, config: IndexConfig | None = None, on_resync: ResyncHook | None = None):
        self.sync = SyncMemoryIndex(config, on_resync)

    @property
    def config(self) -> IndexConfig:
        return self.sync.config

    async def apply(
        self, batches: Sequence[EventBatch], *, validated: bool = False
    ) -> list[ApplyOutcome]:
        return self.sync.apply(batches, validated=validated)

    async def score(self, query: ScoreQuery) -> ScoreResult:
        return self.sync.score(query)

    async def score_tally(self, query: ScoreQuery) -> QueryTally | None:
        return self.sync.score_tally(query)

    async def ping(self) -> None:
        return None

    async def clear_worker(self, model: str, worker_id: str, dp_rank: int | None = None) -> int:
        return self.sync.clear_worker(model, worker_id, dp_rank)

    async def remove_worker(self, model: str, worker_id: str) -> int:
        return self.sync.remove_worker(model, worker_id)

    async def remove_pool(self, model: str, pool: str) -> bool:
        return self.sync.remove_pool(model, pool)

    async def drop_empty_models(self) -> list[str]:
        return self.sync.drop_empty_models()

    async def workers(self, model: str | None = None) -> list[WorkerInfo]:
        return self.sync.workers(model)

    async def stats(self) -> IndexStats:
        return self.sync.stats()

    async def block_size(self, model: str) -> int | None:
        return self.sync.block_size(model)

    async def presence(self, model: str) -> dict[int, dict[WorkerRef, int]]:
        return self.sync.presence(model)

    async def export_ranks(self, ranks: Sequence[tuple[str, WorkerRef]]) -> list[RankState]:
        return self.sync.export_ranks(ranks)

    async def import_ranks(self, states: Sequence[RankState]) -> None:
        self.sync.import_ranks(states)

    async def reset_caches(self) -> None:
        return None  # nothing is cached: the memory is the index

    async def get_marker(self, name: str) -> str | None:
        return self.sync.markers.get(name)

    async def set_marker(self, name: str, value: str | None) -> None:
        if value is None:
            self.sync.markers.pop(name, None)
        else:
            self.sync.markers[name] = value

    async def close(self) -> None:
        return None
