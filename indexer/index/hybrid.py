"""Hybrid-attention models: what a worker would reuse when its KV-cache groups differ.

vLLM keeps one KV-cache group per attention kind and each evicts on its own, so a block
can be cached in the full-attention group and gone from a sliding-window group. The hit
is vLLM's (`HybridKVCacheCoordinator.find_longest_cache_hit`, 0.34): the longest L up to
the prompt's length that every group accepts, each by its manager's rule:

- full attention (and any kind not named below): blocks 0..L-1 all cached;
- sliding window of w blocks (`cdiv(sliding_window - 1, block_size)`): the w blocks
  ending at L are cached (blocks 0..L-1 when L < w; L = 0 always qualifies);
- Mamba: block L-1 is cached (L = 0 always qualifies).

Each rule gives the longest qualifying L up to a limit; applying them in turn until none
lowers the limit reaches that fixed point. The walk is bit-parallel over the worker
slots: slots that share a limit move together (presence in `slot_bits` form, one bit
per slot).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

import msgspec

from indexer.index.protocol import TIER_BITS, RankState, TierWeights
from indexer.index.scoring import SlotMatch, prefix_match, prefix_match_runs

__all__ = [
    "FULL",
    "MAMBA",
    "WINDOW",
    "GroupRule",
    "any_tier",
    "group_rule",
    "group_specs",
    "hybrid_hits",
    "hybrid_matches",
    "hybrid_run_matches",
    "learn_specs",
    "merged_spec",
    "prefix_limits",
    "runs_to_masks",
    "spec_strictness",
    "stored_specs",
    "with_specs",
]

Rule = Literal["full", "window", "mamba"]
# (blocks, groups) -> per group, query position -> walk mask of its first `blocks` keys
GroupMasks = Callable[[int, list[int]], Awaitable[list[dict[int, int]]]]
FULL: Final[Rule] = "full"
WINDOW: Final[Rule] = "window"
MAMBA: Final[Rule] = "mamba"

_WINDOW_KINDS: Final = frozenset({"sliding_window", "sliding_window_mla"})
_MAMBA_KINDS: Final = frozenset({"mamba"})


@dataclass(frozen=True, slots=True)
class GroupRule:
    rule: Rule
    window_blocks: int = 0  # WINDOW: blocks that must be cached at the hit's end


@functools.lru_cache(maxsize=256)
def group_rule(kind: str | None, sliding_window: int, block_size: int | None) -> GroupRule:
    """The reuse rule of a group from what its events said.

    Kinds this module does not know (and a window without a block size to count it in)
    get the full-attention rule: it needs every block, so it never claims more than the
    engine reuses.
    """
    if kind in _MAMBA_KINDS:
        return GroupRule(MAMBA)
    if kind in _WINDOW_KINDS and sliding_window > 0 and block_size:
        return GroupRule(WINDOW, max(1, -(-(sliding_window - 1) // block_size)))
    return GroupRule(FULL)


def spec_strictness(group: int, kind: str | None, sliding_window: int) -> tuple[int, int]:
    """How much a group's spec demands of a cache, for merging what workers named: a bare
    group > 0 (listed, nothing named yet) least, then Mamba, sliding windows (larger ones
    more), then full attention and every other kind. A bare group 0 is full attention: a
    hybrid rank's GPU stores say so by naming no kind there (ledger._names_full_group0).
    lua/group_spec.lua repeats this order."""
    if not kind and not sliding_window:  # the bus reads "" as no kind too
        return (2, 0) if group == 0 else (-1, 0)
    if kind in _MAMBA_KINDS:
        return (0, 0)
    if kind in _WINDOW_KINDS and sliding_window > 0:
        return (1, sliding_window)
    return (2, 0)


def merged_spec(group: int, known: tuple[str | None, int] | None,
                named: tuple[str | None, int]) -> tuple[str | None, int]:
    """Group `group`'s spec after a worker names `named`: the stricter of the two. A
    model's groups are shared by all its workers, so a worker may make a rule stricter
    (fewer hits for the others) but not looser than what another named (hits the others'
    caches do not hold)."""
    if known is None or spec_strictness(group, *named) > spec_strictness(group, *known):
        return named
    return known


def with_specs(state: RankState, specs: Iterable[tuple[int, str | None, int]]) -> RankState:
    """`state` carrying its model's group specs (snapshots keep them with the ranks)."""
    found = tuple(specs)
    return msgspec.structs.replace(state, group_specs=found) if found else state


def learn_specs(state: RankState, learn: Callable[[int, str | None, int], None], *,
                hybrid_on_gpu: bool) -> None:
    """Merge an imported rank's group specs where the index learns them. A snapshot from
    before they were kept names none: a rank restored with groups > 0 and group-0 GPU
    blocks (`hybrid_on_gpu`) then says group 0 is full attention (the ledger's rule,
    which its next batches would not apply: the rank is hybrid already)."""
    for group, kind, window in state.group_specs:
        learn(group, kind, window)
    if not state.group_specs and hybrid_on_gpu:
        learn(0, None, 0)


def prefix_limits(reference: Iterable[SlotMatch], others: int = 0) -> dict[int, int]:
    """Hit length -> slots (slot_bits form) of prefix matches; `others` (slots that match
    nothing) go under 0."""
    limits: dict[int, int] = {}
    for match in reference:
        bit = 1 << (match.slot * TIER_BITS)
        limits[match.matched_blocks] = limits.get(match.matched_blocks, 0) | bit
        others &= ~bit
    if others:
        limits[0] = limits.get(0, 0) | others
    return limits


def any_tier(mask: int, slots: int) -> int:
    """The `slot_bits` form of the slots among `slots` that hold a block in some tier."""
    return (mask | mask >> 1 | mask >> 2 | mask >> 3) & slots


def hybrid_hits(
    rules: Sequence[GroupRule],
    present: Sequence[Mapping[int, int]],
    limits: dict[int, int],
    applied: Iterable[int] = (),
) -> dict[int, int]:
    """Hit length -> the slots (slot_bits form) it is for.

    `limits` maps each candidate slot's upper bound (the prompt's blocks) to the slots;
    `present[g]` maps the position of each block group g holds (for some candidate) to
    its presence mask (nibble form). Groups in `applied` are full-attention groups
    `limits` is already cut to (their maps are not read).
    """
    done = set(applied)
    for g, rule in enumerate(rules):
        if rule.rule == FULL and g not in done:
            # A cached prefix is downward closed: one cut is final.
            limits = _full_limits(present[g], limits)
    others = [g for g, rule in enumerate(rules) if rule.rule != FULL]
    descending = {g: sorted(present[g], reverse=True) for g in others}
    while True:
        before = limits
        for g in others:
            window = rules[g].window_blocks if rules[g].rule == WINDOW else 1
            limits = _window_limits(present[g], descending[g], limits, window)
        if limits == before:
            return limits


def _add(out: dict[int, int], length: int, slots: int) -> None:
    if slots:
        out[length] = out.get(length, 0) | slots


def _full_limits(present: Mapping[int, int], limits: dict[int, int]) -> dict[int, int]:
    """Each slot's limit cut to its cached prefix."""
    out: dict[int, int] = {}
    get = present.get
    for limit, slots in limits.items():
        alive = slots
        i = 0
        while i < limit and alive:
            held = any_tier(get(i, 0), alive)
            _add(out, i, alive & ~held)
            alive = held
            i += 1
        _add(out, i, alive)
    return out


def _window_limits(present: Mapping[int, int], descending: Sequence[int],
                   limits: dict[int, int], window: int) -> dict[int, int]:
    """Each slot's longest L <= its limit whose `window` blocks ending at L (from block 0
    when L is shorter) are cached; Mamba is a window of 1.

    Right to left like vLLM's managers, over the held blocks only (`descending`: the
    positions of `present`, highest first)."""
    out: dict[int, int] = {}
    get = present.get
    for limit, slots in limits.items():
        left = slots
        for last in descending:
            if last >= limit:
                continue
            m = present[last]
            ok = (m | m >> 1 | m >> 2 | m >> 3) & left
            i = last - 1
            low = last + 1 - window
            while ok and i >= low and i >= 0:
                m = get(i, 0)
                ok = (m | m >> 1 | m >> 2 | m >> 3) & ok
                i -= 1
            if ok:
                _add(out, last + 1, ok)
                left &= ~ok
                if not left:
                    break
        _add(out, 0, left)
    return out


def hybrid_matches(
    rules: Sequence[GroupRule],
    present: Sequence[Mapping[int, int]],
    limits: dict[int, int],
    *,
    weights: TierWeights,
    include_zero: bool,
    reference: Sequence[SlotMatch] | None = None,
    reference_masks: Sequence[int] | None = None,
) -> list[SlotMatch]:
    """Matches of the candidate slots by vLLM's hybrid rule.

    The tiers of a hit come from the first full-attention group (group 0 when there is
    none): each block counts at the best tier that group holds it in; blocks it does not
    hold (no group needs them) count as GPU, since nothing is loaded. `reference` may
    hold group 0's prefix matches already walked when it is that group (`limits` then cut
    to them, and `reference_masks` its masks block by block): a slot whose prefix is all
    on GPU needs no second walk.
    """
    fulls = [g for g, rule in enumerate(rules) if rule.rule == FULL]
    applied = fulls[:1] if reference is not None else []
    hits = hybrid_hits(rules, present, limits, applied)
    ref = fulls[0] if fulls else 0
    all_gpu = 0
    for match in reference or ():
        if match.blocks_by_tier.keys() <= {"gpu"}:
            all_gpu |= 1 << (match.slot * TIER_BITS)
    gpu_weight = weights.gpu
    out: list[SlotMatch] = []
    for length, slots in hits.items():
        if not length:
            if include_zero:
                out.extend(SlotMatch(slot, 0, 0.0, {}) for slot in _slots(slots))
            continue
        out.extend(SlotMatch(slot, length, gpu_weight * length, {"gpu": length})
                   for slot in _slots(slots & all_gpu))
        rest = slots & ~all_gpu
        if rest:
            if reference_masks is None:
                get = present[ref].get
                reference_masks = [get(i, 0) for i in range(max(hits))]
            out.extend(_stretched(match, length, weights) for match in
                       prefix_match(reference_masks[:length], rest, weights, True))
    return out


def _stretched(match: SlotMatch, length: int, weights: TierWeights) -> SlotMatch:
    """A reference-group match made `length` long: the blocks past it count as GPU."""
    missing = length - match.matched_blocks
    if not missing:
        return match
    by_tier = dict(match.blocks_by_tier)
    by_tier["gpu"] = by_tier.get("gpu", 0) + missing
    return SlotMatch(match.slot, length, match.weighted_score + weights.gpu * missing, by_tier)


def runs_to_masks(runs: Sequence[int]) -> list[int]:
    """Flat runs [mask, count, ...] as one mask per block."""
    out: list[int] = []
    for i in range(0, len(runs), 2):
        out += [runs[i]] * runs[i + 1]
    return out


def _slots(bits: int) -> Iterable[int]:
    while bits:
        low = bits & -bits
        yield (low.bit_length() - 1) // TIER_BITS
        bits ^= low


def group_specs(stored: Iterable[tuple[bytes, bytes]]) -> dict[int, tuple[str | None, int]]:
    """A model's KV-cache groups as the Redis layouts store them (group -> "kind\\nwindow"),
    group 0 included: group -> (kind, sliding window)."""
    specs: dict[int, tuple[str | None, int]] = {0: (None, 0)}
    for group, kind, window in stored_specs(stored):
        specs[group] = (kind, window)
    return specs


def stored_specs(stored: Iterable[tuple[bytes, bytes]]) -> tuple[tuple[int, str | None, int], ...]:
    """The (group, kind, window) of each stored "kind\\nwindow", by group."""
    found = []
    for group, spec in stored:
        kind, _, window = spec.decode().rpartition("\n")
        found.append((int(group), kind or None, int(window or 0)))
    return tuple(sorted(found, key=lambda spec: spec[0]))


async def hybrid_run_matches(
    specs: Mapping[int, tuple[str | None, int]], runs: list[int], candidates: int,
    n_blocks: int, *, block_size: int | None, weights: TierWeights, include_zero: bool,
    group_masks: GroupMasks,
) -> list[SlotMatch]:
    """vLLM's hybrid rule over group 0's runs (walk masks and counts, as
    `prefix_match_runs` takes them) and the other groups' masks, which `group_masks`
    reads (the Redis layouts: a second round trip) only as far as group 0's prefix reaches
    when group 0 is under the full-attention rule; group 0's masks too when it is not."""
    numbers = sorted(specs)
    rules = [group_rule(*specs[g], block_size) for g in numbers]
    reference: list[SlotMatch] | None = None
    if rules[0].rule == FULL:
        reference = prefix_match_runs(runs, candidates, weights)
        limits = prefix_limits(reference, candidates if include_zero else 0)
        n_blocks = max(limits, default=0)
    else:
        limits = {n_blocks: candidates} if candidates else {}
    if not n_blocks:
        return hybrid_matches(rules, [{} for _ in numbers], limits, weights=weights,
                              include_zero=include_zero, reference=reference)
    present = await group_masks(n_blocks, numbers[1:] if reference is not None else numbers)
    if reference is None:
        return hybrid_matches(rules, present, limits, weights=weights,
                              include_zero=include_zero)
    # Group 0's prefix walk is done (`reference`): its map is not read.
    return hybrid_matches(rules, [{}, *present], limits, weights=weights,
                          include_zero=include_zero, reference=reference,
                          reference_masks=runs_to_masks(runs)[:n_blocks])
