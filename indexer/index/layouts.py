"""Which layout a Redis index is in, and moving it to another (`kv-indexer migrate-layout`).

A Redis holds the index in one layout: every model in one hash slot (`--redis-subslots 1`,
indexer/index/redis.py) or every model spread over S sub-slots (ShardedRedisIndex). An
index started with one flag refuses a Redis holding models of another layout (ping fails:
NOT_SERVING with the reason), and refuses to write into it (apply, import and export
raise BackendError, so its consumers retry and store no snapshot of a half-empty index).

`migrate_layout` moves a Redis to a target layout. In order, each step idempotent:

1. classify every listed model (or only `--model M`, which must be listed: otherwise
   nothing is written): in the target layout (left alone), in another layout (to move),
   listed in another layout with nothing of it left but id counters (to unlist), or
   listed without its layout key (`bk`'s layout, `subslots`) holding keys of no provable
   other layout (skipped and reported: a writer may be creating it);
2. declare the target in `kvi:layout`: indexers started with another flag, even those
   that passed their check before, stop writing within LAYOUT_RECHECK_S (each write
   reads it again when its last read is older) and refuse from their next ping; then
   wait `settle_s` (2 s) for writes already under way to end;
3. classify again; if a model is to move, delete the partition markers (`partition.<p>`,
   `position.<p>`): every indexer rebuilds its partitions from snapshots and the stream
   once nothing refuses it. A rerun on a Redis already in the target layout deletes none;
4. for each model, classified once more just before (never one in the target layout by
   then): delete its keys, found by SCAN of its exact hash tags on every master, the
   ones the layout checks read last (a single-slot model's `bk` and `slots`, a sub-slot
   model's `subslots` and `slots`) at the end, then unlist it (listed again if a writer
   created it meanwhile, as a collection does).

A run stopped anywhere leaves the model listed, so indexers keep refusing, and the next
run starts over from step 1. Only keys under the model's own hash tags, and markers, are
deleted; a model's id counters (`nextslot`: a single-slot model's, a sub-slot model's in
its directory and each sub-slot) are kept, and a model created again continues from them
(slot.lua, subslot_dir.lua), so a late write of an old-flag indexer left behind never
names a rank of the new model.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisError

from indexer.errors import BackendError
from kvcore.bus import escape_token

__all__ = [
    "HOLDER_LAYOUT",
    "LAYOUT_KEY",
    "LAYOUT_RECHECK_S",
    "SINGLE_MODELS",
    "SUBSLOT_MODELS",
    "LayoutGate",
    "MigrationReport",
    "declared_refusal",
    "directory_prefix",
    "migrate_command",
    "migrate_layout",
    "model_prefix",
]

LAYOUT_KEY: Final = "kvi:layout"  # the sub-slot count migrate-layout last moved to
# A writing index reads `kvi:layout` again when its last read is older than this: what
# bounds how long after `migrate-layout` declared a layout an index on another flag
# may still write (`settle_s` waits longer).
LAYOUT_RECHECK_S: Final = 0.25
SINGLE_MODELS: Final = "kvi:models"  # the single-slot models (redis.MODELS_KEY)
SUBSLOT_MODELS: Final = "kvi:smodels"  # the sub-slot models (redis_sharded.MODELS_KEY)
HOLDER_LAYOUT: Final = b"2"  # holders.lua: holder lists in buckets, slot ids never reused
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


MOVE: Final = "move"  # another layout's keys: deleted, then unlisted
KEEP: Final = "keep"  # in the target layout (or listed there with nothing of it yet)
UNLIST: Final = "unlist"  # listed in another layout, nothing of it left but id counters
SKIP: Final = "skip"  # listed without its layout key, holding keys of no provable layout


class LayoutGate:
    """When a writing index reads the declared layout again: under its write lock, when
    its last check is older than LAYOUT_RECHECK_S, so a write starts at most that long
    after `migrate-layout` declared another layout (which waits longer before deleting
    anything). Writes wait while the index refuses the Redis's layout (BackendError, which
    the consumers retry): nothing is written beside another layout's models, and no
    snapshot is taken of an index that does not hold them."""

    __slots__ = ("_fresh_until",)

    def __init__(self) -> None:
        self._fresh_until = 0.0  # monotonic

    async def require(self, passed: bool, check: Callable[[], Awaitable[None]]) -> None:
        """`passed`: the index's last check found nothing to refuse; `check()` checks
        again (raising BackendError or RedisError to refuse)."""
        now = time.monotonic()
        if passed and now < self._fresh_until:
            return
        try:
            await check()
        except RedisError as exc:
            raise BackendError(f"redis layout check failed: {exc}") from exc
        self._fresh_until = now + LAYOUT_RECHECK_S


@dataclass
class ModelMove:
    model: str
    listing: str  # SINGLE_MODELS or SUBSLOT_MODELS: the set it is listed in
    layout: str  # what was found: "single-slot", "single-slot (older layout)", "S sub-slots"
    action: str = MOVE
    keys: int = 0


@dataclass
class MigrationReport:
    target: int
    moved: list[ModelMove] = field(default_factory=list)
    kept: int = 0  # models already in the target layout
    markers: int = 0
    unlisted: list[str] = field(default_factory=list)
    skipped: list[ModelMove] = field(default_factory=list)


@functools.lru_cache(maxsize=1024)  # on every Redis call path
def model_prefix(model: str) -> str:
    """The keys of a single-slot model (indexer/index/redis.py), one hash tag."""
    return f"kvi:{{m:{escape_token(model)}}}:"


def directory_prefix(model: str) -> str:
    """The directory keys of a sub-slot model (indexer/index/redis_sharded.py)."""
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

    async def holds(self, pattern: str) -> bool:
        """Whether a key matching `pattern` exists, id counters aside."""
        async for key in self.scan(pattern):
            if not _keeps_counter(key):
                return True
        return False

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


async def _listed(client: Any) -> list[tuple[str, str]]:
    """(listing, model) of every listed model, single-slot ones first."""
    return [(listing, _text(model)) for listing in (SINGLE_MODELS, SUBSLOT_MODELS)
            for model in sorted(await client.smembers(listing))]


async def _classify(keys: _Keys, listing: str, model: str, target: int) -> ModelMove:
    if listing == SINGLE_MODELS:
        return await _classify_single(keys, model, target)
    return await _classify_subslot(keys, model, target)


async def _classify_single(keys: _Keys, model: str, target: int) -> ModelMove:
    prefix = model_prefix(model)
    if await keys.client.hget(prefix + "bk", "layout") == HOLDER_LAYOUT:
        return ModelMove(model, SINGLE_MODELS, "single-slot", KEEP if target == 1 else MOVE)
    # holders.lua's old_layout: ranks or pool presence without the layout in `bk`
    if await keys.client.exists(prefix + "slots") or await keys.client.exists(prefix + "blk"):
        return ModelMove(model, SINGLE_MODELS, "single-slot (older layout)")
    if not await keys.holds(prefix + "*"):
        # Listed before its first rank exists (a writer creating it), or left listed.
        return ModelMove(model, SINGLE_MODELS, "single-slot, empty",
                         KEEP if target == 1 else UNLIST)
    # Keys under its single-slot tag are another layout's for a sub-slot target; for a
    # single-slot one, neither this layout's nor provably an older one's.
    return ModelMove(model, SINGLE_MODELS, "single-slot without `bk`",
                     SKIP if target == 1 else MOVE)


async def _classify_subslot(keys: _Keys, model: str, target: int) -> ModelMove:
    raw = await keys.client.get(directory_prefix(model) + "subslots")
    if raw:
        count = len(_text(raw).split("\n"))
        return ModelMove(model, SUBSLOT_MODELS, f"{count} sub-slots",
                         KEEP if count == target else MOVE)
    held = (await keys.holds(directory_prefix(model) + "*")
            or await keys.holds(_subslot_pattern(model)))
    if not held:
        # Between a collection's drop and its SREM (redis_sharded._finish_model_gc).
        return ModelMove(model, SUBSLOT_MODELS, "sub-slots, empty",
                         KEEP if target > 1 else UNLIST)
    # Sub-slot keys are another layout's for a single-slot target; for a sub-slot one,
    # their number of sub-slots is unknown without `subslots`.
    return ModelMove(model, SUBSLOT_MODELS, "sub-slots without `subslots`",
                     MOVE if target == 1 else SKIP)


async def _delete_markers(keys: _Keys) -> int:
    found = []
    async for key in keys.scan("kvi:marker:*"):
        name = _text(key).rpartition(":")[2]
        if name.startswith(_MARKER_NAMES):
            found.append(key)
    await keys.unlink(found)
    return len(found)


async def _delete_model(keys: _Keys, move: ModelMove) -> None:
    """Its keys but the id counters, the ones the layout checks read last at the end."""
    model = move.model
    if move.listing == SINGLE_MODELS:
        prefix = model_prefix(model)
        move.keys = await keys.delete_matching(
            prefix + "*", _keeps_counter,
            last=[(prefix + "bk").encode(), (prefix + "slots").encode()])
        return
    prefix = directory_prefix(model)
    move.keys = await keys.delete_matching(_subslot_pattern(model), _keeps_counter)
    move.keys += await keys.delete_matching(
        prefix + "*", _keeps_counter,
        last=[(prefix + "subslots").encode(), (prefix + "slots").encode()])


async def _unlist(client: Any, move: ModelMove) -> bool:
    """Unlist the model; list it again if a writer created it meanwhile (as a
    collection does), so its keys never go unseen by the layout checks. True if it
    stays unlisted."""
    await client.srem(move.listing, move.model)
    if move.listing == SINGLE_MODELS:
        created = await client.exists(model_prefix(move.model) + "slots")
    else:
        created = await client.exists(directory_prefix(move.model) + "subslots")
    if created:
        await client.sadd(move.listing, move.model)
    return not created


def _plan_line(move: ModelMove, target: int, dry_run: bool) -> str:
    if move.action == MOVE:
        return (f"{'would move' if dry_run else 'moving'} {move.model!r}: {move.layout} -> "
                f"{_layout_name(target)}")
    if move.action == UNLIST:
        return (f"{'would unlist' if dry_run else 'unlisting'} {move.model!r} "
                f"({move.layout}): nothing of it left in {move.listing} but id counters")
    return (f"{'would skip' if dry_run else 'skipping'} {move.model!r}: listed in "
            f"{move.listing} ({move.layout}) but holding keys of no known layout; left as "
            "it is: check it, then run again")


async def _carry_out(keys: _Keys, move: ModelMove, report: MigrationReport,
                     say: Callable[[str], None]) -> None:
    if move.action == KEEP:
        report.kept += 1
        say(f"left {move.model!r}: {move.layout}, in {_layout_name(report.target)} by now")
    elif move.action == SKIP:
        report.skipped.append(move)
        say(_plan_line(move, report.target, dry_run=False))
    elif move.action == UNLIST:
        if await _unlist(keys.client, move):
            report.unlisted.append(move.model)
            say(f"unlisted {move.model!r} ({move.layout})")
    else:
        await _delete_model(keys, move)
        stays_unlisted = await _unlist(keys.client, move)
        report.moved.append(move)
        say(f"deleted {move.keys} key(s) of {move.model!r} ({move.layout})"
            + ("" if stays_unlisted else "; created again meanwhile, listed again"))


async def migrate_layout(client: Any, target: int, *, model: str | None = None,
                         dry_run: bool = False, settle_s: float = 2.0,
                         say: Callable[[str], None] = print) -> MigrationReport:
    """Move the Redis behind `client` to `target` sub-slots (1: one slot per model); only
    `model` when given. See the module's docstring for the steps."""
    if target < 1:
        raise BackendError("--redis-subslots must be at least 1")
    keys = _Keys(client)
    listed = await _listed(client)
    if model is not None:
        listed = [(listing, name) for listing, name in listed if name == model]
        if not listed:
            raise BackendError(f"model {model!r} is not listed in {SINGLE_MODELS} or "
                               f"{SUBSLOT_MODELS}: nothing to move, nothing changed")
    plan = [await _classify(keys, listing, name, target) for listing, name in listed]
    report = MigrationReport(target, kept=sum(move.action == KEEP for move in plan))
    todo = [move for move in plan if move.action != KEEP]
    for move in todo:
        say(_plan_line(move, target, dry_run))
    if dry_run:
        report.moved = [move for move in todo if move.action == MOVE]
        report.unlisted = [move.model for move in todo if move.action == UNLIST]
        report.skipped = [move for move in todo if move.action == SKIP]
        return report
    await client.set(LAYOUT_KEY, str(target))
    say(f"declared layout: {_layout_name(target)} ({LAYOUT_KEY}); indexers started with "
        "another --redis-subslots now refuse")
    if not todo:
        say(f"nothing to move: {report.kept} model(s) already in this layout")
        return report
    await asyncio.sleep(settle_s)  # writes begun before the declaration end
    todo = [await _classify(keys, move.listing, move.model, target) for move in todo]
    if any(move.action == MOVE for move in todo):
        report.markers = await _delete_markers(keys)
        say(f"deleted {report.markers} partition marker(s): every indexer rebuilds its "
            "partitions from snapshots and the stream")
    for move in todo:
        # Again just before: never delete a model a target-layout writer created since.
        await _carry_out(keys, await _classify(keys, move.listing, move.model, target),
                         report, say)
    say(f"done: {len(report.moved)} model(s) moved to {_layout_name(target)}, "
        f"{len(report.unlisted)} unlisted, {len(report.skipped)} skipped, {report.kept} "
        "already there")
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
