"""Longest cached prefix per worker, from per-block presence masks (pure, backend-free).

A presence mask holds one nibble per worker slot (bit `slot * 4 + tier`). The walk keeps
the nibble-bit-0 positions of the slots still matching (`alive`) and stops as soon as no
candidate is left. When every alive slot holds a block on GPU a step is one AND and a
compare; `_Walk.step` does the rest (a slot dropping out, copies in other tiers).

`prefix_match` walks masks already looked up: Redis fetches them in one round trip, the
memory index's table hashes token ids and looks them up in one loop (in C when the
extension is built), so blocks past the last match are never hashed.

`score_query` is the memory index's whole Score: with the C extension the walk and the
answer are built in C (native/tally.c: `tally_runs`, or `tally_pool_runs` with shared
storage pools, then `scores_from_tally`), one object per returned score and none per slot
in between; `_Walk` is its pure-Python twin (pools credited by `pools.pool_runs`).
"""

from __future__ import annotations

import functools
import sys
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import repeat
from typing import NamedTuple

from indexer.errors import ConfigError, InvalidQueryError, QueryTooLargeError
from indexer.index.block_table import BlockMasks
from indexer.index.ledger import cached_root_seed
from indexer.index.pools import NO_POOLS, PoolPlan, credit_masks, pool_runs
from indexer.index.protocol import (
    TIER_BITS,
    TIERS,
    IndexConfig,
    ScoreQuery,
    TierWeights,
    WorkerRef,
    WorkerScore,
)
from kvcore.keys import NATIVE, block_keys_packed, pack_keys

if NATIVE:
    from kvcore._native import (
        scores_from_tally,
        tally_masks,
        tally_pool_masks,
        tally_pool_runs,
        tally_runs,
    )

__all__ = [
    "QueryTally",
    "SlotMatch",
    "SlotTable",
    "check_query_shape",
    "check_tier_weights",
    "expand_replicas",
    "prefix_match",
    "prefix_match_query",
    "prefix_match_runs",
    "query_keys_packed",
    "query_tally",
    "score_query",
    "score_runs",
    "slot_bits",
    "slot_table",
    "validate_query",
    "worker_scores",
]

GPU = 0
USE_NATIVE_TALLY = NATIVE  # tests turn it off to run the pure-Python twin
_RECORD = 5  # u32 per tally_runs record: slot, matched, cpu, storage, other


class SlotMatch(NamedTuple):
    slot: int
    matched_blocks: int
    weighted_score: float
    blocks_by_tier: dict[str, int]


def slot_bits(slots: Iterable[int]) -> int:
    """The walk's `alive` form of a set of slots (bit 0 of each slot's nibble)."""
    mask = 0
    for slot in slots:
        mask |= 1 << (slot * TIER_BITS)
    return mask


def worker_scores(
    matches: Iterable[SlotMatch], ref_of_slot: Callable[[int], WorkerRef]
) -> list[WorkerScore]:
    """Matches as WorkerScores, best first (matched blocks, weighted score, then ids)."""
    scores = [
        WorkerScore((ref := ref_of_slot(m.slot)).worker_id, ref.dp_rank, m.matched_blocks,
                    m.weighted_score, m.blocks_by_tier)
        for m in matches
    ]
    scores.sort(key=lambda s: (-s.matched_blocks, -s.weighted_score, s.worker_id, s.dp_rank))
    return scores


def expand_replicas(matches: list[SlotMatch], replicas: Mapping[int, list[int]]
                    ) -> list[SlotMatch]:
    """The walk's matches with each representative slot's answer copied to the slots
    known to share it (`pools.pool_runs`)."""
    if not replicas:
        return matches
    out = list(matches)
    for match in matches:
        followers = replicas.get(match.slot)
        if followers:
            _, matched, weighted, by_tier = match
            out.extend([SlotMatch(slot, matched, weighted, dict(by_tier)) for slot in followers])
    return out


def check_query_shape(model: str, n_tokens: int | None, n_keys: int | None, *,
                      block_size: int, config: IndexConfig, field: str = "") -> None:
    """The rules every query obeys, wherever it comes from (the gRPC boundary checks them
    before any work, naming fields with the `field` prefix; every backend's score() again).

    `n_tokens` / `n_keys` are None when the query does not give them.
    """
    if not model:
        raise InvalidQueryError(f"{field}model must not be empty")
    if (n_tokens is None) == (n_keys is None):
        state = "both are empty" if n_tokens is None else "got both"
        raise InvalidQueryError(f"exactly one of {field}block_keys and {field}token_ids must "
                                f"be set, {state}")
    limit = config.max_query_tokens
    n_tokens, n_keys = n_tokens or 0, n_keys or 0
    if n_tokens > limit:
        raise QueryTooLargeError(f"{field}token_ids: query of {n_tokens} tokens exceeds the "
                                 f"limit of {limit}")
    max_blocks = limit // max(block_size, config.min_block_size)
    if n_keys > max_blocks:
        raise QueryTooLargeError(f"{field}block_keys: query of {n_keys} blocks exceeds the "
                                 f"limit of {max_blocks} blocks ({limit} tokens)")


def check_tier_weights(weights: TierWeights, field: str = "") -> None:
    try:
        weights.validate(field)
    except ConfigError as exc:
        raise InvalidQueryError(str(exc)) from exc


def validate_query(query: ScoreQuery, config: IndexConfig) -> None:
    tokens = query.token_ids
    if isinstance(tokens, bytes) and len(tokens) % 4:
        raise InvalidQueryError("packed token_ids must be a multiple of 4 bytes")
    n_tokens = None if tokens is None else len(tokens) // (4 if isinstance(tokens, bytes) else 1)
    n_keys = None if query.block_keys is None else len(query.block_keys)
    check_query_shape(query.model, n_tokens, n_keys, block_size=query.block_size, config=config)
    if tokens is not None and query.block_size <= 0:
        raise InvalidQueryError("block_size must be > 0 with token_ids")
    if query.tier_weights is not None:
        check_tier_weights(query.tier_weights)


def query_keys_packed(query: ScoreQuery) -> bytes:
    """All of the query's block keys as u64 little-endian, 8 bytes each (for backends that
    fetch every mask in one go, like Redis)."""
    if query.block_keys is not None:
        return pack_keys(query.block_keys)
    assert query.token_ids is not None
    tokens = query.token_ids
    # Lists convert fastest; protobuf repeated fields are copied to one first.
    ids = tokens if isinstance(tokens, bytes | list) else list(tokens)
    seed = cached_root_seed(query.model, query.lora_name, query.cache_salt)
    return block_keys_packed(ids, query.block_size, seed)


@functools.lru_cache(maxsize=64)
def _best_tier_table(weights: tuple[float, ...]) -> tuple[tuple[int, ...], bool]:
    """Best tier of each nibble value (ties to the lower tier), and whether GPU always wins."""
    table = [GPU] * 16
    for nibble in range(1, 16):
        present = [t for t in range(len(TIERS)) if nibble >> t & 1]
        table[nibble] = max(present, key=lambda t: (weights[t], -t))
    gpu_always_best = all(table[n] == GPU for n in range(1, 16, 2))
    return tuple(table), gpu_always_best


@functools.lru_cache(maxsize=64)
def _tier_preference(weights: tuple[float, ...]) -> tuple[int, ...]:
    """Tiers by preference: the best tier of a copy is the first present in this order
    (higher weight first, ties to the lower tier: as `_best_tier_table`)."""
    return tuple(sorted(range(len(TIERS)), key=lambda t: (-weights[t], t)))


def _bits(mask: int) -> Iterator[int]:
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


class _Walk:
    """State of one prefix walk; drivers inline the all-on-GPU step and call `step`."""

    __slots__ = ("alive", "alive4", "best", "fast", "include_zero", "matched", "mixed",
                 "weights")

    def __init__(self, candidates: int, weights: TierWeights, include_zero: bool) -> None:
        self.weights = weights.as_tuple()
        self.best, gpu_always_best = _best_tier_table(self.weights)
        self.fast = gpu_always_best  # an all-GPU step needs no further look
        self.alive = candidates
        self.alive4 = candidates * 15
        self.include_zero = include_zero
        self.matched: dict[int, int] = {}
        # (present, blocks) of steps where some alive slot lacks a GPU copy
        self.mixed: list[tuple[int, int]] = []

    def step(self, mask: int, depth: int, blocks: int = 1) -> int:
        """Blocks `depth` to `depth + blocks - 1` have presence `mask`; returns the slots
        still matching."""
        alive = self.alive
        present = mask & self.alive4
        anywhere = (present | present >> 1 | present >> 2 | present >> 3) & alive
        if anywhere != alive:
            if depth or self.include_zero:
                for bit in _bits(alive ^ anywhere):
                    self.matched[bit] = depth
            self.alive = alive = anywhere
            if not alive:
                return 0
            self.alive4 = alive * 15
            present &= self.alive4
        if present & alive != alive or not self.fast:
            self.mixed.append((present, blocks))
        return alive

    def finish(self, depth: int, candidates: int) -> list[SlotMatch]:
        if depth or self.include_zero:
            for bit in _bits(self.alive):
                self.matched[bit] = depth
        return self._tally(candidates)

    def _tally(self, candidates: int) -> list[SlotMatch]:
        weights = self.weights
        # Blocks per (tier, slots whose best copy is in that tier), summed over the mixed
        # steps first: many steps share those slot sets (shared prefixes, pool credit), so
        # each set's slots are visited once, not once per step.
        by_set: dict[tuple[int, int], int] = {}
        order = _tier_preference(weights)
        for present, blocks in self.mixed:
            anywhere = (present | present >> 1 | present >> 2 | present >> 3) & candidates
            # With GPU always the best tier only slots lacking a GPU copy need a look.
            left = anywhere & ~present if self.fast else anywhere
            for tier in order:
                chosen = present >> tier & left
                if chosen:
                    left ^= chosen
                    if tier != GPU:
                        key = (tier, chosen)
                        by_set[key] = by_set.get(key, 0) + blocks
                    if not left:
                        break
        # Slots in the same sets have the same counts: split the slots into those regions
        # once, then tally each region (and each matched length) once.
        regions: list[tuple[int, list[int]]] = []
        if by_set:
            every = 0
            for _, chosen in by_set:
                every |= chosen
            regions = [(every, [0] * len(TIERS))]
            for (tier, chosen), blocks in by_set.items():
                split: list[tuple[int, list[int]]] = []
                for bits, counts in regions:
                    if bits & chosen:
                        inside = counts.copy()
                        inside[tier] += blocks
                        split.append((bits & chosen, inside))
                    if bits & ~chosen:
                        split.append((bits & ~chosen, counts))
                regions = split
        region_of = {bit: i for i, (bits, _) in enumerate(regions) for bit in _bits(bits)}
        results: list[SlotMatch] = []
        gpu_weight = weights[GPU]
        tallied: dict[tuple[int, int], tuple[float, dict[str, int]]] = {}
        for bit, n_matched in self.matched.items():
            region = region_of.get(bit)
            if region is None:
                by_gpu = {"gpu": n_matched} if n_matched else {}
                results.append(SlotMatch(bit // TIER_BITS, n_matched, gpu_weight * n_matched,
                                         by_gpu))
                continue
            found = tallied.get((region, n_matched))
            if found is None:
                counts = regions[region][1].copy()
                counts[GPU] = n_matched - sum(counts[1:])
                found = tallied[(region, n_matched)] = (
                    sum(weights[t] * c for t, c in enumerate(counts)),
                    {TIERS[t]: c for t, c in enumerate(counts) if c})
            results.append(SlotMatch(bit // TIER_BITS, n_matched, found[0], dict(found[1])))
        return results


def prefix_match(
    masks: Iterable[int], candidates: int, weights: TierWeights, include_zero: bool = False
) -> list[SlotMatch]:
    """Match every candidate slot (given in `slot_bits` form) against the block masks.

    Slots that match nothing are left out unless `include_zero`.
    """
    walk = _Walk(candidates, weights, include_zero)
    alive, fast, step = candidates, walk.fast, walk.step
    depth = 0
    for mask in masks:
        if not (fast and mask & alive == alive):
            alive = step(mask, depth)
            if not alive:
                break
        depth += 1
    return walk.finish(depth, candidates)


def prefix_match_runs(
    runs: Sequence[int], candidates: int, weights: TierWeights, include_zero: bool = False
) -> list[SlotMatch]:
    """`prefix_match` of masks given as runs of equal masks, flat: [mask, count, ...].

    A run is one step: its first block may end some slots' matches, the rest cannot.
    """
    walk = _Walk(candidates, weights, include_zero)
    alive, fast, step = candidates, walk.fast, walk.step
    depth = 0
    for i in range(0, len(runs), 2):
        mask, blocks = runs[i], runs[i + 1]
        if not (fast and mask & alive == alive):
            alive = step(mask, depth, blocks)
            if not alive:
                break
        depth += blocks
    return walk.finish(depth, candidates)


def prefix_match_query(
    query: ScoreQuery, blocks: BlockMasks, candidates: int, config: IndexConfig, *,
    plan: PoolPlan = NO_POOLS,
) -> list[SlotMatch]:
    """Walk a validated query against `blocks` (key -> mask), whichever form it came in.

    Token ids are hashed and looked up by the table in one loop that stops at the first
    block no candidate holds in any tier (the walk would end there too). With a pool
    `plan` (indexer/index/pools.py) a block a mounted pool holds goes on too, and the
    masks are credited to the pools' mounting candidates before the walk.
    """
    weights = query.tier_weights or config.tier_weights
    candidates |= plan.cold
    if query.block_keys is not None:
        masks: Iterable[int] = map(blocks.get, query.block_keys, repeat(0))
        if plan.credits:
            masks = credit_masks(masks, plan.credits)
        return prefix_match(masks, candidates, weights, query.include_zero)
    assert query.token_ids is not None
    seed = cached_root_seed(query.model, query.lora_name, query.cache_salt)
    runs = blocks.mask_runs(query.token_ids, query.block_size, seed,
                            (candidates | plan.pool_bits) * 15)
    if not plan.credits:
        return prefix_match_runs(runs, candidates, weights, query.include_zero)
    credited = pool_runs(runs, plan, candidates)
    matches = prefix_match_runs(credited.runs, credited.candidates, weights,
                                query.include_zero)
    return expand_replicas(matches, credited.replicas)


class SlotTable(NamedTuple):
    """What `scores_from_tally` names slots with: per slot its ref (None for no rank) and
    the rank of that ref among all (u32 each: ties are broken without string compares)."""

    refs: list[WorkerRef | None]
    order: bytes


class QueryTally(NamedTuple):
    """A query's prefix walk before it becomes WorkerScores: `query_tally`'s records and
    the slot table's refs that name their slots (FindBestWorker ranks from these)."""

    query_blocks: int
    tally: bytes
    refs: list[WorkerRef | None]


def slot_table(refs: Mapping[int, WorkerRef]) -> SlotTable:
    """The table of `refs`, each ref and its worker id made anew in rank order: an answer
    lists scores in that order, so the objects it reads and increfs (thousands when a pool
    is widely mounted) lie one after another in memory rather than where ingest left them."""
    by_slot: list[WorkerRef | None] = [None] * (max(refs, default=-1) + 1)
    order = array("I", bytes(4 * len(by_slot)))
    new_ref = tuple.__new__  # WorkerRef's own __new__ is a Python function: 3x slower
    for rank, slot in enumerate(sorted(refs, key=refs.__getitem__)):
        order[slot] = rank
        worker_id, dp_rank = refs[slot]
        by_slot[slot] = new_ref(WorkerRef, (_fresh_str(worker_id), dp_rank))
    return SlotTable(by_slot, order.tobytes())


def _fresh_str(text: str) -> str:
    """An equal str that is a new object (str() and slicing return `text` itself)."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "surrogatepass")


def score_query(
    query: ScoreQuery, blocks: BlockMasks, candidates: int, config: IndexConfig,
    refs: Mapping[int, WorkerRef], *, table: Callable[[], SlotTable],
    plan: PoolPlan = NO_POOLS,
) -> list[WorkerScore]:
    """`prefix_match_query` then `worker_scores`; in C when the extension is built.

    `refs` names every candidate slot (cold pool mounters too); `table()` gives
    `slot_table(refs)`, called only when the C path needs it (callers cache it).
    """
    if not USE_NATIVE_TALLY:
        matches = prefix_match_query(query, blocks, candidates, config, plan=plan)
        return worker_scores(matches, refs.__getitem__)
    tally = query_tally(query, blocks, candidates, config, plan=plan)
    if not tally:
        return []
    names = table()
    weights = (query.tier_weights or config.tier_weights).as_tuple()
    return scores_from_tally(tally, names.refs, names.order, weights, TIERS, WorkerScore)


def score_runs(
    runs: Sequence[int], candidates: int, weights: TierWeights, include_zero: bool,
    refs: Mapping[int, WorkerRef], *, table: Callable[[], SlotTable],
    plan: PoolPlan = NO_POOLS,
) -> list[WorkerScore]:
    """`prefix_match_runs` of masks given as runs (pools credited by `plan`), then
    `worker_scores`; in C when the extension is built (as `score_query`)."""
    candidates |= plan.cold
    if not USE_NATIVE_TALLY:
        if not plan.credits:
            return worker_scores(prefix_match_runs(runs, candidates, weights, include_zero),
                                 refs.__getitem__)
        credited = pool_runs(runs, plan, candidates)
        matches = prefix_match_runs(credited.runs, credited.candidates, weights, include_zero)
        return worker_scores(expand_replicas(matches, credited.replicas), refs.__getitem__)
    as_tuple = weights.as_tuple()
    if plan.credits:
        tally = tally_pool_runs(runs, candidates, as_tuple, include_zero, plan.credits,
                                plan.groups)
    else:
        tally = tally_runs(runs, candidates, as_tuple, include_zero)
    if not tally:
        return []
    names = table()
    return scores_from_tally(tally, names.refs, names.order, as_tuple, TIERS, WorkerScore)


def query_tally(
    query: ScoreQuery, blocks: BlockMasks, candidates: int, config: IndexConfig, *,
    plan: PoolPlan = NO_POOLS,
) -> bytes:
    """The C prefix walk of a validated query: `tally_runs`'s records (per matched slot:
    slot, matched, cpu, storage, other blocks). With a pool `plan` the walk is
    `tally_pool_runs`: a block a mounted pool holds keeps the pool's mounting candidates
    alive at the storage tier (no mask is credited per block and mounter), and mounters
    holding none of the query's blocks walk as one slot whose record the others copy.
    Needs the C extension (`USE_NATIVE_TALLY`)."""
    weights = (query.tier_weights or config.tier_weights).as_tuple()
    candidates |= plan.cold
    if query.block_keys is not None:
        # Every key is looked up (a few us for 512), the walk stops where matches end.
        masks = _masks_of_keys(blocks, query.block_keys, (candidates | plan.pool_bits) * 15)
        if plan.credits:
            tally = tally_pool_masks(masks, candidates, weights, query.include_zero,
                                     plan.credits, plan.groups)
        else:
            tally = tally_masks(masks, candidates, weights, query.include_zero)
    else:
        assert query.token_ids is not None
        seed = cached_root_seed(query.model, query.lora_name, query.cache_salt)
        runs = blocks.mask_runs(query.token_ids, query.block_size, seed,
                                (candidates | plan.pool_bits) * 15)
        if plan.credits:
            tally = tally_pool_runs(runs, candidates, weights, query.include_zero,
                                    plan.credits, plan.groups)
        else:
            tally = tally_runs(runs, candidates, weights, query.include_zero)
    return tally


# Keys looked up at first; twice as many each time the last mask still has a candidate.
_FIRST_LOOKUPS = 64


def _masks_of_keys(blocks: BlockMasks, keys: Sequence[int], wanted: int) -> list[int]:
    """The masks of the keys from the first up to one without a `wanted` bit (where the
    walk ends) or a little past it, or to the last."""
    packed = (keys.tobytes() if isinstance(keys, array) and keys.typecode == "Q"
              and sys.byteorder == "little" else pack_keys(keys))
    masks: list[int] = []
    end = _FIRST_LOOKUPS * 8
    while True:
        chunk = blocks.get_many(packed[len(masks) * 8 : end])
        masks += chunk
        if end >= len(packed) or not chunk or not chunk[-1] & wanted:
            return masks
        end *= 2
