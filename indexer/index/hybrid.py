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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from indexer.index.protocol import TIER_BITS, TierWeights
from indexer.index.scoring import SlotMatch, prefix_match

__all__ = [
    "FULL",
    "MAMBA",
    "WINDOW",
    "GroupRule",
    "any_tier",
    "group_rule",
    "hybrid_hits",
    "hybrid_matches",
    "prefix_limits",
    "runs_to_masks",
]

Rule = Literal["full", "window", "mamba"]
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
    masks: Sequence[Sequence[int]],
    limits: dict[int, int],
    applied: Iterable[int] = (),
) -> dict[int, int]:
    """Hit length -> the slots (slot_bits form) it is for.

    `limits` maps each candidate slot's upper bound (the prompt's blocks) to the slots;
    `masks[g][i]` is the presence mask (nibble form) of block i in group g, a list that
    may stop early (blocks past its end are held by no candidate). Groups in `applied`
    are full-attention groups `limits` is already cut to.
    """
    done = set(applied)
    for g, rule in enumerate(rules):
        if rule.rule == FULL and g not in done:
            # A cached prefix is downward closed: one cut is final.
            limits = _full_limits(masks[g], limits)
    others = [g for g, rule in enumerate(rules) if rule.rule != FULL]
    while True:
        before = limits
        for g in others:
            rule = rules[g]
            if rule.rule == WINDOW:
                limits = _window_limits(masks[g], limits, rule.window_blocks)
            else:
                limits = _mamba_limits(masks[g], limits)
        if limits == before:
            return limits


def _add(out: dict[int, int], length: int, slots: int) -> None:
    if slots:
        out[length] = out.get(length, 0) | slots


def _full_limits(masks: Sequence[int], limits: dict[int, int]) -> dict[int, int]:
    """Each slot's limit cut to its cached prefix."""
    out: dict[int, int] = {}
    for limit, slots in limits.items():
        alive = slots
        i = 0
        end = min(limit, len(masks))
        while i < end and alive:
            held = any_tier(masks[i], alive)
            _add(out, i, alive & ~held)
            alive = held
            i += 1
        _add(out, i if alive else 0, alive)
    return out


def _window_limits(masks: Sequence[int], limits: dict[int, int], window: int) -> dict[int, int]:
    """Each slot's longest L <= its limit whose `window` blocks ending at L are cached.

    Right to left like vLLM's manager; after a window fails, the next end tried is the
    highest block some slot lacked (a window ending above it holds it)."""
    out: dict[int, int] = {}
    for limit, slots in limits.items():
        left = slots
        end = min(limit, len(masks))
        while end > 0 and left:
            m = masks[end - 1]
            ok = (m | m >> 1 | m >> 2 | m >> 3) & left if m else 0
            if not ok:
                end -= 1
                continue
            lacked = end - 1 if ok != left else -1  # the highest block some slot lacks
            i = end - 2
            low = max(0, end - window)
            while i >= low and ok:
                m = masks[i]
                held = (m | m >> 1 | m >> 2 | m >> 3) & ok if m else 0
                if held != ok and lacked < 0:
                    lacked = i
                ok = held
                i -= 1
            if ok:
                _add(out, end, ok)
                left &= ~ok
            end = lacked if lacked >= 0 else end - 1
        _add(out, 0, left)
    return out


def _mamba_limits(masks: Sequence[int], limits: dict[int, int]) -> dict[int, int]:
    """Each slot's longest L <= its limit whose block L-1 is cached."""
    out: dict[int, int] = {}
    n = len(masks)
    for limit, slots in limits.items():
        left = slots
        for end in range(min(limit, n), 0, -1):
            ok = any_tier(masks[end - 1], left)
            if ok:
                _add(out, end, ok)
                left &= ~ok
                if not left:
                    break
        _add(out, 0, left)
    return out


def hybrid_matches(
    rules: Sequence[GroupRule],
    masks: Sequence[Sequence[int]],
    limits: dict[int, int],
    *,
    weights: TierWeights,
    include_zero: bool,
    reference: Sequence[SlotMatch] | None = None,
) -> list[SlotMatch]:
    """Matches of the candidate slots by vLLM's hybrid rule.

    The tiers of a hit come from the first full-attention group (group 0 when there is
    none): each block counts at the best tier that group holds it in; blocks it does not
    hold (no group needs them) count as GPU, since nothing is loaded. `reference` may
    hold that group's prefix matches already walked (`limits` then cut to them): a slot
    whose prefix is all on GPU needs no second walk.
    """
    fulls = [g for g, rule in enumerate(rules) if rule.rule == FULL]
    applied = fulls[:1] if reference is not None else []
    hits = hybrid_hits(rules, masks, limits, applied)
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
            out.extend(_stretched(match, length, weights)
                       for match in prefix_match(masks[ref][:length], rest, weights, True))
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
