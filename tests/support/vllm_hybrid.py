"""vLLM's hybrid-model cache hit, transcribed from vLLM 0.34 (not from our index).

`HybridKVCacheCoordinator.find_longest_cache_hit` (vllm/v1/core/kv_cache_coordinator.py)
over the managers' `find_longest_cache_hit` (vllm/v1/core/single_type_kv_cache_manager.py):
FullAttentionManager, SlidingWindowManager, MambaManager. Specs that are equal share one
lookup (`SpecGroup`): a block counts only when every group of the spec holds it
(`BlockPool.get_cached_block(hash, group_ids)`). No EAGLE, no DCP/PCP, one block size for
every group (the alignment checks are then no-ops), as the index assumes.

A group here is (kind, sliding_window tokens) and the set of block positions it caches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def cdiv(a: int, b: int) -> int:
    return -(a // -b)


@dataclass(frozen=True)
class Spec:
    kind: str  # "full_attention", "sliding_window", "mamba"
    sliding_window: int = 0  # tokens


FULL_KINDS = {"full_attention", "mla_attention", "sink_full_attention"}


def _full_hit(cached: list[set[int]], max_length: int, block_size: int) -> int:
    """FullAttentionManager: the longest run of cached blocks from the start."""
    hit = 0
    for i in range(max_length // block_size):
        if all(i in group for group in cached):
            hit += 1
        else:
            break
    return hit * block_size


def _sliding_hit(cached: list[set[int]], max_length: int, block_size: int,
                 sliding_window: int) -> int:
    """SlidingWindowManager: right to left, the first run of
    cdiv(sliding_window - 1, block_size) cached blocks; else the run from block 0."""
    contiguous_needed = cdiv(sliding_window - 1, block_size)
    max_num_blocks = max_length // block_size
    computed = [False] * max_num_blocks
    num_contiguous_blocks = 0
    match_found = False
    for i in range(max_num_blocks - 1, -1, -1):
        if all(i in group for group in cached):
            computed[i] = True
            num_contiguous_blocks += 1
            if num_contiguous_blocks >= contiguous_needed:
                del computed[i + num_contiguous_blocks:]
                match_found = True
                break
        else:
            num_contiguous_blocks = 0
    if not match_found:
        del computed[num_contiguous_blocks:]
    return len(computed) * block_size


def _mamba_hit(cached: list[set[int]], max_length: int, block_size: int) -> int:
    """MambaManager: the last cached block, right to left."""
    for i in range(max_length // block_size - 1, -1, -1):
        if all(i in group for group in cached):
            return (i + 1) * block_size
    return 0


def _manager_hit(spec: Spec, cached: list[set[int]], max_length: int, block_size: int) -> int:
    if spec.kind == "sliding_window":
        return _sliding_hit(cached, max_length, block_size, spec.sliding_window)
    if spec.kind == "mamba":
        return _mamba_hit(cached, max_length, block_size)
    return _full_hit(cached, max_length, block_size)


def find_longest_cache_hit(specs: Sequence[Spec], cached: Sequence[set[int]],
                           n_blocks: int, block_size: int = 16) -> int:
    """Blocks of an `n_blocks`-block prompt vLLM reuses, `cached[g]` the block positions
    group g holds. One group: the UnitaryKVCacheCoordinator (that group's manager)."""
    max_cache_hit_length = n_blocks * block_size
    if len(specs) == 1:
        return _manager_hit(specs[0], [cached[0]], max_cache_hit_length, block_size) \
            // block_size
    # attention_groups: one per distinct spec, full attention first.
    by_spec: dict[Spec, list[int]] = {}
    for g, spec in enumerate(specs):
        by_spec.setdefault(spec, []).append(g)
    attention_groups = sorted(by_spec.items(), key=lambda item: item[0].kind not in FULL_KINDS)
    is_simple_hybrid = len(attention_groups) == 2 and attention_groups[0][0].kind in FULL_KINDS
    hit_length = max_cache_hit_length
    full_hit_by_group: dict[int, int] = {}
    while True:
        curr_hit_length = hit_length
        for spec, group_ids in attention_groups:
            groups = [set(cached[g]) for g in group_ids]
            if spec.kind in FULL_KINDS and group_ids[0] in full_hit_by_group:
                curr_hit_length = min(curr_hit_length, full_hit_by_group[group_ids[0]])
                continue
            curr_hit_length = _manager_hit(spec, groups, curr_hit_length, block_size)
            if spec.kind in FULL_KINDS:
                full_hit_by_group[group_ids[0]] = curr_hit_length
        if curr_hit_length >= hit_length:
            break
        hit_length = curr_hit_length
        if is_simple_hybrid:
            break
    return hit_length // block_size
