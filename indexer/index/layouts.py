"""Which layout a Redis index is in, and moving it to another (`kv-indexer migrate-layout`).

A Redis holds the index in one layout: every model in one hash slot (`--redis-subslots 1`,
indexer/index/redis.py) or every model spread over S sub-slots (ShardedRedisIndex). An
index started with one flag refuses a Redis holding models of another layout (ping fails:
NOT_SERVING with the reason), and refuses to write into it (apply, import and export
raise BackendError, so its consumers retry and store no snapshot of a half-empty index).

`migrate_layout` moves a Redis to a target layout. In order, each step idempotent:

1. declare the target in `kvi:layout`: indexers started with another flag, even those
   that passed their check before, stop writing within LAYOUT_RECHECK_S (each write
   reads it again when its last read is older) and refuse from their next ping; then
   wait `settle_s` (2 s) for writes already under way to end;
2. delete the partition markers (`partition.<p>`, `position.<p>`): every indexer
   rebuilds its partitions from snapshots and the stream once nothing refuses it;
3. for each model in another layout: delete its keys, found by SCAN of its exact hash
   tags on every master, the ones the layout checks read last (a single-slot model's
   `bk` and `slots`, a sub-slot model's `subslots` and `slots`), then unlist it.

A run stopped anywhere leaves the model listed, so indexers keep refusing, and the next
run starts over from step 1. Only keys under the model's own hash tags, and markers, are
deleted; a sub-slot model's id counters (`nextslot`, in its directory and each sub-slot)
are kept, so the ids a rebuilt model gives out never name a leftover entry.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from indexer.errors import BackendError
from kvcore.bus import escape_token

__all__ = [
    "LAYOUT_KEY",
    "LAYOUT_RECHECK_S",
    "MigrationReport",
    "declared_refusal",
    "migrate_command",
    "migrate_layout",
]

LAYOUT_KEY: Final = "kvi:layout"  # the sub-slot count migrate-layout last moved to
# A writing index reads `kvi:layout` again when its last read is older than this: what
# bounds how long after `migrate-layout` declared a layout an index on another flag
# may still write (`settle_s` waits longer).
LAYOUT_RECHECK_S: Final = 0.25
SINGLE_MODELS: Final = "kvi:models"  # redis.MODELS_KEY
SUBSLOT_MODELS: Final = "kvi:smodels"  # redis_sharded.MODELS_KEY
HOLDER_LAYOUT: Final = b"2"  # redis.LAYOUT
_MARKER_NAMES: Final = ("partition.", "position.")
_SCAN_COUNT: Final = 1000
_UNLINK_BATCH: Final = 500


def migrate_command(subslots: int) -> str:
    return f"kv-indexer migrate-layout --redis-url URL --redis-subslots {subslots}"


def declared_refusal(declared: bytes | str | None, subslots: int) -> str | None:
    """Why an index on `subslots` refuses a Redis whose `kvi:layout` is `declared`."""
    if declared is None:
        return None
    text = _text(declared)
    if not text.isdigit():
        return (f"Redis's {LAYOUT_KEY} holds {text[:40]!r}, not a --redis-subslots: set it "
                f"again with `{migrate_command(subslots)}`")
    if int(text) == subslots:
        return None
    return (f"Redis was moved to --redis-subslots {int(text)} (kv-indexer migrate-layout); "
            f"this indexer runs with --redis-subslots {subslots}: restart it with "
            f"--redis-subslots {int(text)}, or move the Redis with "
            f"`{migrate_command(subslots)}`")


@dataclass
class ModelMove:
    model: str
    layout: str  # "single-slot", "single-slot (older layout)", "S sub-slots"
    keys: int = 0


@dataclass
class MigrationReport:
    target: int
    moved: list[ModelMove] = field(default_factory=list)
    kept: int = 0  # models already in the target layout
    markers: int = 0


def _single_prefix(model: str) -> str:
    return f"kvi:{{m:{escape_token(model)}}}:"


def _directory_prefix(model: str) -> str:
    return f"kvi:{{s:{escape_token(model)}}}:"


def _subslot_pattern(model: str) -> str:
    # escape_token leaves only [A-Za-z0-9_~-]: no glob character, `:` or `}`, so this
    # matches the sub-slot tags `s:<model>:<k>.<suffix>` of this model and no other.
    return f"kvi:{{s:{escape_token(model)}:*"


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


class _Keys:
    """SCAN and UNLINK on one node or every master of a cluster."""

    def __init__(self, client: Any) -> None:
        self.client = client

    async def scan(self, pattern: str) -> AsyncIterator[bytes]:
        # On a cluster redis-py's scan_iter walks every master, a cursor each.
        async for key in self.client.scan_iter(match=pattern, count=_SCAN_COUNT):
            yield key

    async def unlink(self, keys: Sequence[bytes]) -> None:
        """UNLINK in batches, one command per hash slot."""
        by_slot: dict[int, list[bytes]] = {}
        for key in keys:
            by_slot.setdefault(key_slot(key), []).append(key)
        for group in by_slot.values():
            for start in range(0, len(group), _UNLINK_BATCH):
                await self.client.unlink(*group[start:start + _UNLINK_BATCH])

    async def delete_matching(self, pattern: str, keep: Callable[[bytes], bool],
                              last: Sequence[bytes] = ()) -> int:
        """Delete the keys matching `pattern` but those `keep` holds, `last` at the end
        (in one command: they share a slot); returns how many were found."""
        found = [key async for key in self.scan(pattern)]
        first = [key for key in found if key not in last and not keep(key)]
        await self.unlink(first)
        final = [key for key in last if key in found]
        if final:
            await self.client.unlink(*final)
        return len(first) + len(final)


def _keeps_counter(key: bytes) -> bool:
    return key.endswith(b"}:nextslot")


async def _listed(client: Any, name: str) -> list[str]:
    return sorted(_text(m) for m in await client.smembers(name))


async def _foreign_models(client: Any, target: int) -> tuple[list[ModelMove], int]:
    """The models not in the target layout, and how many are."""
    moves: list[ModelMove] = []
    kept = 0
    for model in await _listed(client, SINGLE_MODELS):
        layout = await client.hget(_single_prefix(model) + "bk", "layout")
        if target == 1 and layout == HOLDER_LAYOUT:
            kept += 1
        else:
            older = "" if layout == HOLDER_LAYOUT else " (older layout)"
            moves.append(ModelMove(model, f"single-slot{older}"))
    for model in await _listed(client, SUBSLOT_MODELS):
        raw = await client.get(_directory_prefix(model) + "subslots")
        count = len(_text(raw).split("\n")) if raw else 0
        if count == target:
            kept += 1
        else:
            moves.append(ModelMove(model, f"{count} sub-slots"))
    return moves, kept


async def _delete_markers(keys: _Keys) -> int:
    found = []
    async for key in keys.scan("kvi:marker:*"):
        name = _text(key).rpartition(":")[2]
        if name.startswith(_MARKER_NAMES):
            found.append(key)
    await keys.unlink(found)
    return len(found)


async def _delete_model(keys: _Keys, move: ModelMove) -> None:
    model = move.model
    if move.layout.startswith("single-slot"):
        prefix = _single_prefix(model)
        move.keys = await keys.delete_matching(
            prefix + "*", lambda _key: False,
            last=[(prefix + "bk").encode(), (prefix + "slots").encode()])
        await keys.client.srem(SINGLE_MODELS, model)
        return
    prefix = _directory_prefix(model)
    move.keys = await keys.delete_matching(_subslot_pattern(model), _keeps_counter)
    move.keys += await keys.delete_matching(
        prefix + "*", _keeps_counter,
        last=[(prefix + "subslots").encode(), (prefix + "slots").encode()])
    await keys.client.srem(SUBSLOT_MODELS, model)


async def migrate_layout(client: Any, target: int, *, model: str | None = None,
                         dry_run: bool = False, settle_s: float = 2.0,
                         say: Callable[[str], None] = print) -> MigrationReport:
    """Move the Redis behind `client` to `target` sub-slots (1: one slot per model); only
    `model` when given. See the module's docstring for the steps."""
    if target < 1:
        raise BackendError("--redis-subslots must be at least 1")
    keys = _Keys(client)
    moves, kept = await _foreign_models(client, target)
    if model is not None:
        moves = [move for move in moves if move.model == model]
    report = MigrationReport(target, moves, kept)
    for move in moves:
        say(f"{'would move' if dry_run else 'moving'} {move.model!r}: {move.layout} -> "
            f"{_layout_name(target)}")
    if dry_run:
        return report
    await client.set(LAYOUT_KEY, str(target))
    say(f"declared layout: {_layout_name(target)} ({LAYOUT_KEY}); indexers started with "
        "another --redis-subslots now refuse")
    if not moves:
        say(f"nothing to move: {kept} model(s) already in this layout")
        return report
    await asyncio.sleep(settle_s)  # writes begun before the declaration end
    report.markers = await _delete_markers(keys)
    say(f"deleted {report.markers} partition marker(s): every indexer rebuilds its "
        "partitions from snapshots and the stream")
    for move in moves:
        await _delete_model(keys, move)
        say(f"deleted {move.keys} key(s) of {move.model!r} ({move.layout})")
    say(f"done: {len(moves)} model(s) moved to {_layout_name(target)}, {kept} already there")
    return report


def _layout_name(subslots: int) -> str:
    return "single-slot" if subslots == 1 else f"{subslots} sub-slots"


async def run_migration(url: str, target: int, *, model: str | None = None,
                        dry_run: bool = False, options: dict[str, Any] | None = None,
                        settle_s: float = 2.0) -> MigrationReport:
    """`kv-indexer migrate-layout`: `migrate_layout` on the Redis (or Redis Cluster) at
    `url`, with redis-py client `options` (TLS files, a password)."""
    import redis.asyncio as aioredis  # noqa: PLC0415 - the server extra

    from indexer.index.redis_cluster import cluster_url, is_cluster_node  # noqa: PLC0415

    options = options or {}
    plain = cluster_url(url)
    client: Any
    if plain is not None or await asyncio.to_thread(is_cluster_node, url, options):
        client = RedisCluster.from_url(plain or url, **options)
    else:
        client = aioredis.Redis.from_url(url, **options)
    try:
        return await migrate_layout(client, target, model=model, dry_run=dry_run,
                                    settle_s=settle_s)
    finally:
        await client.aclose()
