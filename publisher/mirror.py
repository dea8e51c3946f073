"""What one engine rank holds, mirrored from its own events, so a resync can re-send it.

A resync (the indexer saw a gap or an unknown parent, or the sink overflowed) publishes
AllBlocksCleared followed by the mirror as BlockStored events: the index rebuilds this
rank exactly. Blocks a live block still chains from, but which were evicted themselves,
are kept as bounded "ghosts" and re-sent as stored-then-removed, so children resolve.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from publisher.bus import AllBlocksCleared, BlockRemoved, BlockStored, Event

__all__ = ["BlockMirror"]

_DEFAULT_GHOSTS = 65_536


@dataclass(slots=True)
class _Block:
    parent: int | None
    tokens: bytes
    block_size: int
    lora_name: str | None
    cache_salt: str | None
    extra: bytes
    tiers: set[str] = field(default_factory=set)


class BlockMirror:
    """Engine hash -> block content and tiers, in store order (parents before children)."""

    def __init__(self, ghost_capacity: int = _DEFAULT_GHOSTS) -> None:
        self.blocks: dict[int, _Block] = {}  # insertion order: parents before children
        self.ghosts: OrderedDict[int, _Block] = OrderedDict()
        self._ghost_capacity = ghost_capacity

    def __len__(self) -> int:
        return len(self.blocks)

    def apply(self, events: Sequence[Event]) -> None:
        for event in events:
            if isinstance(event, BlockStored):
                self._store(event)
            elif isinstance(event, BlockRemoved):
                self._remove(event)
            elif isinstance(event, AllBlocksCleared):
                self.clear()

    def clear(self) -> None:
        self.blocks.clear()
        self.ghosts.clear()

    def _store(self, event: BlockStored) -> None:
        if not event.token_ids:
            for h in event.block_hashes:
                block = self.blocks.get(h) or self._revive(h)
                if block is not None:
                    block.tiers.add(event.medium)
            return
        stride = event.block_size * 4
        parent = event.parent_hash
        for i, h in enumerate(event.block_hashes):
            block = self.blocks.get(h)
            if block is None:
                self.ghosts.pop(h, None)
                extra = event.extra_keys[i] if event.extra_keys else b""
                block = _Block(parent, event.token_ids[i * stride : (i + 1) * stride],
                               event.block_size, event.lora_name, event.cache_salt, extra)
                self.blocks[h] = block
            block.tiers.add(event.medium)
            parent = h

    def _revive(self, h: int) -> _Block | None:
        block = self.ghosts.pop(h, None)
        if block is not None:
            self.blocks[h] = block
        return block

    def _remove(self, event: BlockRemoved) -> None:
        for h in event.block_hashes:
            block = self.blocks.get(h)
            if block is None:
                continue
            block.tiers.discard(event.medium)
            if not block.tiers:
                del self.blocks[h]
                self.ghosts[h] = block
                while len(self.ghosts) > self._ghost_capacity:
                    self.ghosts.popitem(last=False)

    def snapshot(self, max_blocks_per_event: int = 256) -> Iterator[Event]:
        """AllBlocksCleared, then events that rebuild every held block on every tier.

        Consecutive blocks of one chain (same tier, adapter and salt) share one event.
        """
        yield AllBlocksCleared()
        sent: set[int] = set()
        run: BlockStored | None = None
        for h, block in self.blocks.items():
            for event in self._ancestors(block.parent, sent):
                if run is not None:
                    yield run
                    run = None
                yield event
            for tier in sorted(block.tiers):
                if run is not None and _extends(run, h, block, tier, max_blocks_per_event):
                    run.block_hashes.append(h)
                    run.token_ids += block.tokens
                    continue
                if run is not None:
                    yield run
                run = self._stored(h, block, tier)
            sent.add(h)
        if run is not None:
            yield run

    def _ancestors(self, parent: int | None, sent: set[int]) -> Iterator[Event]:
        """Evicted ancestors a live block chains from: stored, then removed again."""
        chain: list[int] = []
        while parent is not None and parent not in sent and parent not in self.blocks:
            ghost = self.ghosts.get(parent)
            if ghost is None:
                break
            chain.append(parent)
            parent = ghost.parent
        for h in reversed(chain):
            ghost = self.ghosts[h]
            yield self._stored(h, ghost, "gpu")
            yield BlockRemoved(block_hashes=[h], medium="gpu")
            sent.add(h)

    @staticmethod
    def _stored(h: int, block: _Block, tier: str) -> BlockStored:
        return BlockStored(block_hashes=[h], parent_hash=block.parent, token_ids=block.tokens,
                           block_size=block.block_size, medium=tier, lora_name=block.lora_name,
                           cache_salt=block.cache_salt,
                           extra_keys=[block.extra] if block.extra else None)


def _extends(run: BlockStored, h: int, block: _Block, tier: str, limit: int) -> bool:
    return (run.medium == tier and block.parent == run.block_hashes[-1]
            and run.block_size == block.block_size and run.lora_name == block.lora_name
            and run.cache_salt == block.cache_salt and not block.extra
            and run.extra_keys is None and len(run.block_hashes) < limit)
