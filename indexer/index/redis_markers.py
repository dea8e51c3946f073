"""Index markers on Redis Cluster: one copy per master, so a master restored from an
older dump (or a lagging replica promoted) shows, whichever master it is.

A single marker key lives on one master; a restore of any other master went unseen, and
its models (or sub-slots) then served blocks evicted since the dump. So each marker is
kept on every master that serves slots, under a hash tag `{kvi:mk.<n>}` whose slot that
master serves: for each master the smallest such n, searched in the client's slot map.
The choice depends only on which slots a master serves, so every process picks the same
tags, and a promoted replica (same slots) keeps its master's tag: its copy is whatever
it had received, which is what detection needs.

Reading combines the copies: all equal -> that value; all decimal but different -> the
smallest (a `position.<p>` marker: the oldest master bounds what the index reflects);
any copy missing, or other values differing -> None, which the consumer answers with a
rebuild.

When the slot map changes, tags change with it: a master that gains its first slots (or
whose tag's slot moved away) gets a new tag whose key it does not hold. Such a master
holds only data migrated from the others, so its copy is written from the copies under
the tags kept, combined as a read would combine them (and deleted if they do not
combine). A tag that left while its slot went unserved in the client's slot map (a
failover under way) is not written so when it comes back: its copy is read as it is, or
a promoted replica's lag would be papered over. A process only knows the changes it
saw; one that starts after a slot move finds a copy missing and rebuilds
(conservative).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Final

import structlog
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisError

from indexer.errors import BackendError

__all__ = ["ClusterMarkers", "combine_copies", "marker_tags"]

log = structlog.get_logger("indexer.redis_markers")

_MAX_TAG_SEARCH: Final = 1 << 20


def marker_key(tag: str, name: str) -> str:
    return f"kvi:marker:{{{tag}}}:{name}"


def tag_slot(tag: str) -> int:
    return int(key_slot(f"{{{tag}}}".encode()))


def marker_tags(slot_masters: Any) -> dict[str, str]:
    """Master name -> its marker tag: the smallest `kvi:mk.<n>` whose slot it serves, in
    `slot_masters` (slot -> nodes, the primary first: redis-py's slots cache)."""
    masters = {nodes[0].name for nodes in slot_masters.values() if nodes}
    tags: dict[str, str] = {}
    for n in range(_MAX_TAG_SEARCH):
        if len(tags) == len(masters):
            break
        tag = f"kvi:mk.{n}"
        nodes = slot_masters.get(tag_slot(tag))
        if nodes and nodes[0].name not in tags:
            tags[nodes[0].name] = tag
    return tags


def combine_copies(values: Sequence[str | None]) -> str | None:
    """One marker from its copies: the common value, the smallest of decimal values, or
    None when a copy is missing or the values cannot be ordered."""
    if not values or any(v is None for v in values):
        return None
    present = [v for v in values if v is not None]
    if len(set(present)) == 1:
        return present[0]
    if all(v.isdigit() for v in present):
        return str(min(int(v) for v in present))
    return None


def _text(raw: Any) -> str | None:
    return None if raw is None else raw.decode() if isinstance(raw, bytes) else str(raw)


class ClusterMarkers:
    """get_marker / set_marker of an index on Redis Cluster, one copy per master."""

    def __init__(self, client: RedisCluster) -> None:
        self._client = client
        self._tags: frozenset[str] = frozenset()  # the tags of the last call
        # Tags that left while their slot was unserved: read as they are if they return.
        self._protected: set[str] = set()
        self._names: set[str] = set()  # markers this process read or wrote
        self._searched: dict[str, str] = {}  # master name -> tag, as last searched
        self._searched_in: object = None  # the client's slot map they were searched in
        self._lock = asyncio.Lock()
        self.copies_extended = 0  # marker copies written to a master that gained a tag

    async def get(self, name: str) -> str | None:
        try:
            tags = await self._current_tags(name)
            values = await self._read(tags, name)
        except RedisError as exc:
            raise BackendError(f"redis get_marker failed: {exc}") from exc
        found = combine_copies(values)
        if found is None and any(v is not None for v in values):
            log.warning("redis_marker_copies_differ", marker=name,
                        copies=dict(zip(tags, values, strict=True)))
        return found

    async def set(self, name: str, value: str | None) -> None:
        try:
            tags = await self._current_tags(name)
            await self._write(tags, name, value)
        except RedisError as exc:
            raise BackendError(f"redis set_marker failed: {exc}") from exc

    async def _current_tags(self, name: str) -> list[str]:
        """The tags of the client's slot map now; copies extended first to the tags
        that came with a change this process saw."""
        self._names.add(name)
        await self._client.initialize()  # a no-op once the client has a slot map
        tags = self._searched_tags()
        if not tags:
            raise BackendError("redis cluster: no master serves a slot")
        if frozenset(tags) != self._tags:
            async with self._lock:
                if frozenset(tags) != self._tags:
                    await self._extend(tags)
        return tags

    def _searched_tags(self) -> list[str]:
        """The tags searched in the client's slot map, searched again (a walk over every
        slot) only when the client replaced its map or a tag's slot changed master;
        a slot moved in place (MOVED) that would only change which tag is smallest
        keeps the earlier choice: at worst another process reads a copy missing."""
        slots = self._client.nodes_manager.slots_cache
        if slots is not self._searched_in or any(
                (nodes := slots.get(tag_slot(tag))) is None or nodes[0].name != master
                for master, tag in self._searched.items()):
            self._searched = marker_tags(slots)
            self._searched_in = slots
        return sorted(self._searched.values())

    async def _extend(self, tags: list[str]) -> None:
        slots = self._client.nodes_manager.slots_cache
        for tag in self._tags - set(tags):
            if slots.get(tag_slot(tag)):
                self._protected.discard(tag)  # its slot (and copy) moved to another master
            else:
                self._protected.add(tag)
        kept = sorted(self._tags & set(tags))
        added = sorted(set(tags) - self._tags - self._protected)
        if kept and added:
            names = sorted(self._names)
            for name in names:
                value = combine_copies(await self._read(kept, name))
                await self._write(added, name, value)
            self.copies_extended += len(added) * len(names)
            log.info("redis_marker_copies_extended", tags=added, from_tags=kept,
                     markers=len(names))
        self._tags = frozenset(tags)
        self._protected -= self._tags

    async def _read(self, tags: Sequence[str], name: str) -> list[str | None]:
        pipe = self._client.pipeline(transaction=False)
        for tag in tags:
            pipe.get(marker_key(tag, name))
        return [_text(raw) for raw in await pipe.execute()]

    async def _write(self, tags: Sequence[str], name: str, value: str | None) -> None:
        pipe = self._client.pipeline(transaction=False)
        for tag in tags:
            if value is None:
                pipe.delete(marker_key(tag, name))
            else:
                pipe.set(marker_key(tag, name), value)
        await pipe.execute()
