"""What one engine rank holds, mirrored from its own events, so a resync can re-send it.

A resync (the indexer saw a gap or an unknown parent, or the sink overflowed) publishes
AllBlocksCleared followed by the mirror as BlockStored events: the index rebuilds this
rank exactly. Blocks a live block still chains from, but which were evicted themselves,
are kept as bounded "ghosts" and re-sent as stored-then-removed, so children resolve.

Hybrid-attention models keep one KV-cache group per attention kind, each evicting on its
own: every group other than 0 has a mirror of its own (`BlockMirror.groups`), re-sent
after group 0 with its group, kind and window.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from typing import Final

import msgspec

from kvcore.bus import TIERS, AllBlocksCleared, BlockRemoved, BlockStored, Event, tier_index

__all__ = ["BlockMirror"]

_DEFAULT_GHOSTS = 65_536

# A held block is a plain tuple: (parent, tokens, context, extra, tier mask), where the
# mask has bit i for TIERS[i] (media are mapped to tiers as the index maps them), context
# is (block_size, lora_name, cache_salt), shared by the blocks of one event. Plain tuples of
# ints, bytes and str leave the garbage collector's tracking after its first pass; with a
# mirror of ~10^5 blocks per rank, GC-tracked block objects cost the bridge more than the
# mirror's own work.
_Context = tuple[int, str | None, str | None]
_Held = tuple[int | None, bytes, _Context, bytes, int]
_PARENT: Final = 0
_TOKENS: Final = 1
_CONTEXT: Final = 2
_EXTRA: Final = 3
_TIERS: Final = 4


class BlockMirror:
    """Engine hash -> block content and tiers, plus recently evicted blocks (ghosts)."""

    def __init__(self, ghost_capacity: int = _DEFAULT_GHOSTS) -> None:
        self.blocks: dict[int, _Held] = {}
        self.ghosts: OrderedDict[int, _Held] = OrderedDict()
        self._ghost_capacity = ghost_capacity
        self.groups: dict[int, BlockMirror] = {}  # KV-cache group > 0 -> its mirror
        self.group_specs: dict[int, tuple[str | None, int]] = {}  # group -> (kind, window)

    def __len__(self) -> int:
        return len(self.blocks) + sum(len(group) for group in self.groups.values())

    def apply(self, events: Sequence[Event]) -> None:
        """Apply the rank's own events; writes into shared pools are not its cache."""
        for event in events:
            if event.pool is not None:
                continue
            if isinstance(event, AllBlocksCleared):
                self.clear()
                continue
            if isinstance(event, BlockStored) and (event.group_kind or event.sliding_window):
                self.group_specs[event.group] = (event.group_kind, event.sliding_window)
            target = self._group(event.group) if event.group else self
            if isinstance(event, BlockStored):
                target._store(event)
            else:
                target._remove(event)

    def _group(self, group: int) -> BlockMirror:
        found = self.groups.get(group)
        if found is None:
            found = self.groups[group] = BlockMirror(self._ghost_capacity)
        return found

    def clear(self) -> None:
        self.blocks.clear()
        self.ghosts.clear()
        self.groups.clear()

    def holds(self, engine_hash: int, tier: int) -> bool:
        """Whether the block is held on `tier` (an index into TIERS)."""
        held = self.blocks.get(engine_hash)
        return held is not None and bool(held[_TIERS] >> tier & 1)

    def forget(self, hashes: Iterable[int]) -> None:
        """Drop blocks entirely (held or ghost): ones that cannot be published. A block
        chaining from a forgotten one reaches no root, so snapshots leave it out too."""
        blocks, ghosts = self.blocks, self.ghosts
        hashes = list(hashes)
        for h in hashes:
            blocks.pop(h, None)
            ghosts.pop(h, None)
        for group in self.groups.values():
            group.forget(hashes)

    def _store(self, event: BlockStored) -> None:
        bit = 1 << tier_index(event.medium)
        blocks = self.blocks
        if not event.token_ids:
            for h in event.block_hashes:
                held = blocks.get(h) or self._revive(h)
                if held is not None and not held[_TIERS] & bit:
                    blocks[h] = (*held[:_TIERS], held[_TIERS] | bit)
            return
        ghosts = self.ghosts
        tokens, stride = event.token_ids, event.block_size * 4
        context = (event.block_size, event.lora_name, event.cache_salt)
        extra_keys = event.extra_keys
        parent = event.parent_hash
        for i, h in enumerate(event.block_hashes):
            held = blocks.get(h)
            if held is None:
                if ghosts:
                    ghosts.pop(h, None)
                extra = extra_keys[i] if extra_keys else b""
                blocks[h] = (parent, tokens[i * stride : (i + 1) * stride], context, extra, bit)
            elif not held[_TIERS] & bit:
                blocks[h] = (*held[:_TIERS], held[_TIERS] | bit)
            parent = h

    def _revive(self, h: int) -> _Held | None:
        held = self.ghosts.pop(h, None)
        if held is not None:
            self.blocks[h] = held
        return held

    def _remove(self, event: BlockRemoved) -> None:
        bit = 1 << tier_index(event.medium)
        blocks, ghosts = self.blocks, self.ghosts
        for h in event.block_hashes:
            held = blocks.get(h)
            if held is None or not held[_TIERS] & bit:
                continue
            tiers = held[_TIERS] & ~bit
            if tiers:
                blocks[h] = (*held[:_TIERS], tiers)
                continue
            del blocks[h]
            ghosts[h] = (*held[:_TIERS], 0)
            if len(ghosts) > self._ghost_capacity:
                ghosts.popitem(last=False)

    def snapshot(self, max_blocks_per_event: int = 256) -> Iterator[Event]:
        """AllBlocksCleared, then events that rebuild every held block on every tier, of
        group 0 then of each other KV-cache group.

        Consecutive blocks of one chain (same tier, adapter and salt) share one event.
        """
        yield AllBlocksCleared()
        yield from self._in_group(0, self._blocks_snapshot(max_blocks_per_event))
        for group in sorted(self.groups):
            yield from self._in_group(group,
                                      self.groups[group]._blocks_snapshot(max_blocks_per_event))

    def _in_group(self, group: int,
                  events: Iterator[BlockStored | BlockRemoved]) -> Iterator[Event]:
        """Events of one KV-cache group's snapshot, with the group's fields."""
        kind, window = self.group_specs.get(group, (None, 0))
        if not (group or kind or window):
            yield from events
            return
        for event in events:
            if isinstance(event, BlockStored):
                yield msgspec.structs.replace(event, group=group, group_kind=kind,
                                              sliding_window=window)
            else:
                yield msgspec.structs.replace(event, group=group)

    def _blocks_snapshot(self, max_blocks_per_event: int) -> Iterator[BlockStored | BlockRemoved]:
        tier_bits = [(tier, 1 << i) for i, tier in enumerate(TIERS)]
        run: BlockStored | None = None
        for h, held, live in self._parents_first():
            if not live:  # an evicted ancestor: stored, then removed again
                if run is not None:
                    yield run
                    run = None
                yield _stored(h, held, "gpu")
                yield BlockRemoved(block_hashes=[h], medium="gpu")
                continue
            for tier, bit in tier_bits:
                if not held[_TIERS] & bit:
                    continue
                if run is not None and _extends(run, h, held, tier, max_blocks_per_event):
                    run.block_hashes.append(h)
                    run.token_ids += held[_TOKENS]
                    continue
                if run is not None:
                    yield run
                run = _stored(h, held, tier)
        if run is not None:
            yield run

    def _parents_first(self) -> Iterator[tuple[int, _Held, bool]]:
        """Held blocks with the ancestors they chain from (held or ghost), parents first.

        Store order is not enough: a block stored while its parent was unknown is older
        than the parent that arrived later. A chain that does not reach a root (its top
        parent is neither held nor a ghost: never seen, or a ghost already trimmed) is left
        out: the index could not resolve it, and re-sending it would only mark the worker
        degraded and ask for another resync.
        """
        blocks, ghosts = self.blocks, self.ghosts
        sent: set[int] = set()
        unresolvable: set[int] = set()
        for h, held in blocks.items():
            if h in sent or h in unresolvable:
                continue
            chain = [(h, held)]
            on_chain = {h}
            parent = held[_PARENT]
            while parent is not None and parent not in sent:
                ancestor = blocks.get(parent) or ghosts.get(parent)
                if ancestor is None or parent in on_chain or parent in unresolvable:
                    unresolvable.update(on_chain)
                    break
                chain.append((parent, ancestor))
                on_chain.add(parent)
                parent = ancestor[_PARENT]
            else:
                for ancestor_hash, ancestor in reversed(chain):
                    sent.add(ancestor_hash)
                    yield ancestor_hash, ancestor, ancestor_hash in blocks


def _stored(h: int, held: _Held, tier: str) -> BlockStored:
    block_size, lora_name, cache_salt = held[_CONTEXT]
    extra = held[_EXTRA]
    return BlockStored(block_hashes=[h], parent_hash=held[_PARENT], token_ids=held[_TOKENS],
                       block_size=block_size, medium=tier, lora_name=lora_name,
                       cache_salt=cache_salt, extra_keys=[extra] if extra else None)


def _extends(run: BlockStored, h: int, held: _Held, tier: str, limit: int) -> bool:
    block_size, lora_name, cache_salt = held[_CONTEXT]
    return (run.medium == tier and held[_PARENT] == run.block_hashes[-1]
            and run.block_size == block_size and run.lora_name == lora_name
            and run.cache_salt == cache_salt and not held[_EXTRA]
            and run.extra_keys is None and len(run.block_hashes) < limit)
