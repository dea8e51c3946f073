"""Redis index backend (redis.asyncio + hiredis). Layout in docs/architecture.md.

Every key of a model shares the hash tag `{m:<model>}`, so one model's index lives in one
hash slot and each batch is one atomic Lua call even on Redis Cluster:

    kvi:{m:M}:bk                 HASH  layout (2), bucket state: load, level, split, count
    kvi:{m:M}:b:<n>              HASH  group 0's buckets: key (8 B, LE) -> holder list
    kvi:{m:M}:bx                 HASH  key -> holder list of a block 3 or more ranks hold
                                       (load > 0; at load 0 all lists are in `b:0`)
    kvi:{m:M}:slots              HASH  "worker\\nrank" -> slot id (never reused)
    kvi:{m:M}:slotver            STR   bumped whenever a slot id is allocated or freed
    kvi:{m:M}:nextslot           STR   the slot id counter
    kvi:{m:M}:w:<slot>:meta      HASH  pos (epoch, seq), ts, n0..n3, degraded, worker, rank
    kvi:{m:M}:w:<slot>:log       LIST  the rank's ledger as an append-only log (below),
                                       in segments (a STR in earlier versions)
    kvi:{m:M}:block_size         STR   block size the model's workers store with
    kvi:{m:M}:groups             HASH  KV-cache group > 0 -> "kind\nwindow" (hybrid models)
    kvi:{m:M}:blk<g>             HASH  the holder lists of KV-cache group g > 0
    kvi:models                   SET   model names (for listing only)

A presence value is the sorted list of its holders, u32 `slot id << 4 | tier bits` each
(lua/holders.lua): its size follows the number of holders, not their slot ids. Group 0's
values are spread over small hashes by the key's low bits (linear hashing, the model's
`load` blocks per bucket, 40 by default), which Redis keeps listpack-encoded; load 0
keeps one hash. A model whose keys predate this layout (no
`layout` in `bk`) is refused, never read (`ping()` says so, the scripts answer an error).

The scripts declare every key they write or read as KEYS (Redis Cluster routes and guards a
call by them, answering TRYAGAIN while a slot is half migrated instead of letting a script
miss keys already moved), except group 0's bucket hashes and `bx` (named in the scripts
from `bk`, which is declared) and the pool keys: `apply.lua` the `blk<g>` hash of every
KV-cache group its records write (`apply_keys`), `gc.lua` the `groups` hash and each
group's `blk<g>` (`_gc_keys`, named from `groups` read first), `score.lua` the `groups`
hash and `score_groups.lua` the group stores it reads. A shared storage pool's presence
lives in group 0.

A model lives while it has a rank: removing its last rank (`remove_worker`, which is also
how liveness expiry removes workers) deletes all its keys in one `gc.lua` call, which
names each key from the model's own structures (no scan), and unlists it. Models listed
without a rank (left by older versions or a crash) go at `drop_empty_models`.

A ledger log is a sequence of records, replayed in order on reload:
    b"N" tier mask u8, count u16, count x (engine hash u64, key u64)
                                                  each mapping now is (key, tiers)
    b"M" engine hash u64, key u64, tier mask u8   one mapping (earlier versions; still read)
    b"D" engine hash u64                          the mapping is gone
    b"U" engine hash u64                          no longer a ghost
    b"G" engine hash u64                          now the most recently evicted ghost
    b"Y" group u64                                what follows is of KV-cache group g
Each call appends one segment per changed rank; when a log grows past twice its live
size (and `log_compact_min_bytes`) or the rank is reset, the owner replaces it by a snapshot.

The consumer that owns a worker's partition keeps that worker's `WorkerLedger` in memory
(loaded from Redis on first use) and ships each batch's changes to `apply.lua`, which
refuses them unless Redis still holds the (epoch, seq) the ledger started from.
"""

from __future__ import annotations

import asyncio
import functools
import random
import struct
import sys
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import resources
from itertools import groupby
from typing import Any, Final, cast

import redis.asyncio as aioredis
import structlog
from redis.commands.core import AsyncScript
from redis.exceptions import (
    ConnectionError,
    NoScriptError,
    RedisError,
    ResponseError,
    TimeoutError,
)

from indexer.errors import BackendError
from indexer.index.hybrid import (
    group_specs,
    hybrid_run_matches,
    learn_specs,
    merged_spec,
    stored_specs,
    with_specs,
)
from indexer.index.layouts import (
    HOLDER_LAYOUT,
    LAYOUT_KEY,
    SINGLE_MODELS,
    SUBSLOT_MODELS,
    LayoutGate,
    declared_refusal,
    migrate_command,
    model_prefix,
)
from indexer.index.ledger import (
    LOG_HASH,
    LOG_RUN_ENTRY,
    Journal,
    WorkerLedger,
    stored_block_size,
)
from indexer.index.pools import (
    NO_POOLS,
    POOL_RANK,
    PoolPlan,
    credit_masks,
    credit_runs,
    pool_credit,
    resolve_pool_store,
    split_pool_events,
)
from indexer.index.protocol import (
    TIER_BITS,
    TIERS,
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
from indexer.index.redis_pipe import RedisPipe, pack
from indexer.index.scoring import (
    SlotMatch,
    SlotTable,
    query_keys_packed,
    score_runs,
    slot_bits,
    slot_table,
    validate_query,
    worker_scores,
)
from kvcore.bus import BlockRemoved, BlockStored, Event, EventBatch, validate_batch
from kvcore.keys import NATIVE, pack_keys
from kvcore.pools import KIND_POOL

if NATIVE:
    from kvcore._native import OpsWriter

_hiredis_pack: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # redis-py packs commands itself
    _hiredis_pack = None

__all__ = [
    "COMPACT_BUCKET_LOAD", "DEFAULT_BUCKET_LOAD", "DEFAULT_LOG_COMPACT_MIN_BYTES", "RedisIndex",
]

log = structlog.get_logger("indexer.redis")

MODELS_KEY: Final = SINGLE_MODELS
DEFAULT_LOG_COMPACT_MIN_BYTES: Final = 64 * 1024
# 0: one presence hash per model. COMPACT_BUCKET_LOAD (--redis-bucket-load 40) stores an
# entry in ~30 B less but costs ~1.6x the Redis time per write and per Score (measured:
# docs/benchmarks.md), and Redis time is what a model's one hash slot runs out of first.
DEFAULT_BUCKET_LOAD: Final = 0
COMPACT_BUCKET_LOAD: Final = 40
_RANKS_READ_AT_ONCE: Final = 64  # ledgers restored per round trip (their logs come back at once)
_MAX_CALLS: Final = 8  # script calls one apply() is split into, so Python and Redis overlap
_OP_HEADER: Final = struct.Struct("<cII")
_GROUP_OP_HEADER: Final = struct.Struct("<cBII")
_OP_COUNT: Final = struct.Struct("<I")  # the last field of both op headers
_LITTLE_ENDIAN: Final = sys.byteorder == "little"
_RECORD_HEADER: Final = struct.Struct("<I16s16sdBIIIIIHIII")
_POSITION: Final = struct.Struct(">qq")
_NAME_LEN: Final = struct.Struct("<H")
# KEYS[1] a number; ARGV[1] a candidate: the key keeps the larger of the two.
_RAISE_FLOOR: Final = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > current then redis.call('SET', KEYS[1], ARGV[1]) end
"""
_TS: Final = struct.Struct("<d")
# Whether `_OpsSink` packs its keys ops in C (tests turn it off to compare the two).
NATIVE_OPS = NATIVE


_APPLY_MODEL_KEYS: Final = ("bk", "bx", "slots", "slotver", "block_size")
_GC_MODEL_KEYS: Final = ("slots", "nextslot", "bk", "bx", "slotver", "block_size", "groups",
                         "pool_floor", "blk", "free")
_SLOT_MODEL_KEYS: Final = ("slots", "nextslot", "slotver", "bk")
LAYOUT: Final = HOLDER_LAYOUT
_KEY_FRAME: Final = b"$8\r\n12345678\r\n"  # 14 bytes a key in `_hmget_packed`
_DECODED_CACHE: Final = 65536  # holder lists decoded per slot map, kept for the next query
_ENTRIES: Final = {4 * n: struct.Struct(f"<{n}I").unpack for n in range(1, 17)}


def apply_keys(model: str, slots: Sequence[int], groups: Iterable[int] = ()) -> list[str]:
    """The keys `apply.lua` declares for records of ranks in `slots` (in record order),
    then the `blk<g>` hash of each KV-cache group > 0 the records write: every key it
    touches (a pool's keys aside), so Redis Cluster can route and guard the call by them."""
    prefix = model_prefix(model)
    keys = [prefix + name for name in _APPLY_MODEL_KEYS]
    for slot in slots:
        keys += (f"{prefix}w:{slot}:meta", f"{prefix}w:{slot}:log")
    keys += group_hash_keys(prefix, sorted(groups))
    return keys


def group_hash_keys(prefix: str, groups: Iterable[int]) -> list[str]:
    """The presence store of each KV-cache group: `bk` (group 0's bucket state, its
    buckets named from it) for group 0, the hash `blk<g>` past it."""
    return [prefix + ("blk" + str(group) if group else "bk") for group in groups]


def score_keys(prefix: str) -> tuple[str, str, str, str]:
    """The keys `score.lua` declares."""
    return (prefix + "bk", prefix + "slotver", prefix + "groups", prefix + "bx")


def _gc_keys(model: str, next_slot: int, groups: Sequence[int] = ()) -> list[str]:
    """gc.lua's keys: the model's, each slot's below `next_slot` (0 for a model in
    layout 2, whose ranks' keys go with the ranks), each group's hash."""
    prefix = model_prefix(model)
    keys = [prefix + name for name in _GC_MODEL_KEYS]
    for slot in range(next_slot):
        keys += (f"{prefix}w:{slot}:meta", f"{prefix}w:{slot}:log")
    keys += group_hash_keys(prefix, groups)
    return keys


async def get_marker(client: Any, name: str) -> str | None:
    """The index marker `name` (Index.get_marker) as the Redis indexes keep it."""
    try:
        raw = await client.get(f"kvi:marker:{name}")
    except RedisError as exc:
        raise BackendError(f"redis get_marker failed: {exc}") from exc
    return None if raw is None else raw.decode() if isinstance(raw, bytes) else str(raw)


async def set_marker(client: Any, name: str, value: str | None) -> None:
    """Set (or with None delete) the index marker `name`."""
    try:
        if value is None:
            await client.delete(f"kvi:marker:{name}")
        else:
            await client.set(f"kvi:marker:{name}", value)
    except RedisError as exc:
        raise BackendError(f"redis set_marker failed: {exc}") from exc


async def read_block_size(client: Any, key: str, model: str,
                          known: dict[str, int]) -> int | None:
    """A model's block size from `key`, remembered in `known` once stored."""
    cached = known.get(model)
    if cached is not None:
        return cached
    try:
        raw = await client.get(key)
    except RedisError as exc:
        raise BackendError(f"redis block_size failed: {exc}") from exc
    if raw is None:
        return None
    known[model] = int(raw)
    return int(raw)


class _ScriptMissingError(Exception):
    """Redis answered NOSCRIPT: it lost the script, so nothing of the call ran."""


async def _read_reply(conn: Any) -> Any:
    """One pipelined reply; an error reply is returned, not raised, like the others."""
    try:
        return await conn.read_response(disconnect_on_error=True)
    except ResponseError as exc:
        return exc


def _pack_command(conn: Any, args: tuple[str | int | bytes, ...]) -> bytes | list[bytes]:
    """One command in RESP, as `conn.send_command` would send it: by hiredis in one C call
    when it is installed (redis-py checks and encodes each argument in Python first)."""
    if _hiredis_pack is not None:
        return _hiredis_pack(args)
    return cast(list[bytes], conn.pack_command(*args))


def _rank_prefix(ledger: WorkerLedger) -> str:
    """The prefix of a rank's `meta` and `log` keys."""
    return f"{model_prefix(ledger.model)}w:{ledger.slot}:"


def _position(epoch: int, seq: int) -> bytes:
    return _POSITION.pack(epoch, seq)


def _lua(name: str) -> str:
    return resources.files("indexer.index").joinpath(f"lua/{name}").read_text()


_GROUP_SPEC_LUA: Final = _lua("group_spec.lua")


def group_spec_command(key: str, group: int, spec: tuple[str | None, int],
                       ) -> tuple[str | int, ...]:
    """The command that merges a group's spec into a model's `groups` hash (a bare group
    only lists it; a named spec replaces a looser one, never a stricter one)."""
    kind, window = spec
    return ("EVAL", _GROUP_SPEC_LUA, 1, key, str(group), f"{kind or ''}\n{window}")


async def stored_group_specs(client: Any, key: str) -> tuple[tuple[int, str | None, int], ...]:
    """The specs a model's `groups` hash holds (written by `group_spec_command`)."""
    return stored_specs(cast(dict[bytes, bytes], await client.hgetall(key)).items())


def _lua_with_holders(name: str) -> str:
    """A script that reads or writes presence, after the holder-list layout's functions."""
    return _lua("holders.lua") + "\n" + _lua(name)


class _OpsSink:
    """Collects a ledger's presence changes as the packed ops `apply.lua` reads. A keys op
    following one of the same kind, group and bit position extends it (same keys in the
    same order, fewer ops for apply.lua to read and prefetch). With the C extension the
    keys ops are packed by `presence_target` (kvcore._native.OpsWriter, the same bytes),
    into which the ledger's C store loop writes too."""

    __slots__ = ("_groups", "_last_bitpos", "_last_count", "_last_count_at", "_last_end",
                 "_last_group", "_last_kind", "learned", "ops", "presence_target")

    def __init__(self) -> None:
        self.ops = bytearray()
        self.presence_target = OpsWriter(self.ops) if NATIVE_OPS else None
        self.learned: dict[int, tuple[str | None, int]] = {}  # group -> (kind, window)
        self._groups: dict[int, _GroupOpsSink] = {}
        # the last keys op: kind, group, bit position and key count
        self._last_kind, self._last_group, self._last_bitpos = b"", -1, -1
        self._last_count = 0
        self._last_count_at = 0  # where its count is in `ops`
        self._last_end = -1  # len(ops) just after it: anything written since ends it

    def set_bits(self, keys: list[int], bitpos: int) -> None:
        self.keys_op(b"S", 0, bitpos, keys)

    def clear_bits(self, keys: list[int], bitpos: int) -> None:
        self.keys_op(b"C", 0, bitpos, keys)

    def keys_op(self, kind: bytes, group: int, bitpos: int, keys: list[int]) -> None:
        """Add an S / C op (group 0) or a T / K op of `group`, or extend the last op."""
        if self.presence_target is not None:
            self.presence_target.keys_op(kind, group, bitpos, keys)
            return
        ops = self.ops
        if (len(ops) == self._last_end and bitpos == self._last_bitpos
                and kind == self._last_kind and group == self._last_group):
            self._last_count += len(keys)
            _OP_COUNT.pack_into(ops, self._last_count_at, self._last_count)
        else:
            if kind in (b"S", b"C"):
                ops += _OP_HEADER.pack(kind, bitpos, len(keys))
            else:
                ops += _GROUP_OP_HEADER.pack(kind, group, bitpos, len(keys))
            self._last_kind, self._last_group, self._last_bitpos = kind, group, bitpos
            self._last_count = len(keys)
            self._last_count_at = len(ops) - _OP_COUNT.size
        if _LITTLE_ENDIAN:
            ops += array("Q", keys)  # the buffer as is: no bytes copy (OverflowError as pack_keys)
        else:
            ops += pack_keys(keys)
        self._last_end = len(ops)

    def group_sink(self, group: int) -> _GroupOpsSink:
        found = self._groups.get(group)
        if found is None:
            found = self._groups[group] = _GroupOpsSink(self, group)
        return found

    def learn_group(self, group: int, kind: str | None, sliding_window: int) -> None:
        self.learned[group] = merged_spec(group, self.learned.get(group),
                                          (kind, sliding_window))

    def groups_written(self) -> list[int]:
        """The KV-cache groups > 0 whose hashes these ops write (apply.lua declares them)."""
        return list(self._groups)

    # Shared storage pools (layout in apply.lua): the pool's slot and name, checked there,
    # and the batch's ts, by which the newest write wins (indexer/index/pools.py).

    def pool_store(self, pool: tuple[int, bytes], ts: float, hashes: list[int],
                   keys: list[int]) -> None:
        self._pool_op(b"P", pool, ts, len(hashes))
        self.ops += pack_keys([v for pair in zip(hashes, keys, strict=True) for v in pair])

    def pool_remove(self, pool: tuple[int, bytes], ts: float, hashes: list[int]) -> None:
        self._pool_op(b"R", pool, ts, len(hashes))
        self.ops += pack_keys(hashes)

    def pool_wipe(self, pool: tuple[int, bytes], ts: float) -> None:
        self._pool_op(b"W", pool, ts, 0)

    def wipe_written_pools(self, ts: float) -> None:
        self.ops += _OP_HEADER.pack(b"X", 0, 0)
        self.ops += _TS.pack(ts)

    def _pool_op(self, kind: bytes, pool: tuple[int, bytes], ts: float, count: int) -> None:
        slot, name = pool
        self.ops += _OP_HEADER.pack(kind, slot, count)
        self.ops += _NAME_LEN.pack(len(name))
        self.ops += name
        self.ops += _TS.pack(ts)


class _GroupOpsSink:
    """The ops of one KV-cache group (> 0), into its owner's ops."""

    __slots__ = ("group", "owner")

    def __init__(self, owner: _OpsSink, group: int) -> None:
        self.owner = owner
        self.group = group

    def set_bits(self, keys: list[int], bitpos: int) -> None:
        self.owner.keys_op(b"T", self.group, bitpos, keys)

    def clear_bits(self, keys: list[int], bitpos: int) -> None:
        self.owner.keys_op(b"K", self.group, bitpos, keys)

    def group_sink(self, group: int) -> _GroupOpsSink:
        return self.owner.group_sink(group)

    def learn_group(self, group: int, kind: str | None, sliding_window: int) -> None:
        self.owner.learn_group(group, kind, sliding_window)


def _changes(ledger: WorkerLedger, journal: Journal) -> bytes:
    """The log records of what one batch changed in one ledger (of a rank or a group)."""
    if not journal.unghosted and not journal.ghost_pushed:  # stores only, the usual
        return ledger.pack_log(journal.dirty)
    keys = ledger.keys
    pack_hash = LOG_HASH.pack
    parts = [ledger.pack_log(journal.dirty)]
    ghosts = ledger.ghosts
    # A ghost stored again; a trimmed one is gone from the map, and its D record says so.
    parts.extend(pack_hash(b"U", h) for h in journal.unghosted if h not in ghosts and h in keys)
    last_pushes = dict.fromkeys(reversed(journal.ghost_pushed))
    parts.extend(pack_hash(b"G", h) for h in reversed(last_pushes) if h in ghosts)
    return b"".join(parts)


def _block_size(batches: list[EventBatch]) -> int:
    """The block size the last of these batches that stores tokens stores with, or 0."""
    for batch in reversed(batches):
        size = stored_block_size(batch)
        if size:
            return size
    return 0


def _live_log_bytes(ledger: WorkerLedger) -> int:
    """The size of a snapshot of one ledger's own log (of a rank or a group)."""
    return LOG_RUN_ENTRY.size * len(ledger.keys) + LOG_HASH.size * (len(ledger.ghosts) + 1)


def _worker_infos(model: str, reply: list[Any]) -> list[WorkerInfo]:
    """The ranks of one `workers.lua` reply that have metadata (a batch applied)."""
    infos = []
    for i in range(1, len(reply), 9):
        ref_raw, _slot, pos, ts, *counts, degraded = reply[i : i + 9]
        if pos is None:
            continue
        worker_id, _, rank = ref_raw.decode().rpartition("\n")
        epoch, seq = _POSITION.unpack(pos)
        held = {name: int(n) for name, n in zip(TIERS, counts, strict=True) if int(n)}
        if int(rank) == POOL_RANK:
            infos.append(WorkerInfo(model, worker_id, 0, epoch, -1, False, held, float(ts),
                                    kind=KIND_POOL))
            continue
        infos.append(WorkerInfo(
            model, worker_id, int(rank), epoch, seq, degraded == b"1", held, float(ts),
        ))
    return infos


def _hmget_packed(hash_name: str, packed_keys: bytes) -> bytes:
    """`HMGET hash_name key...` of u64 keys packed 8 bytes each, as the pipe sends it:
    each key framed `$8\\r\\n<key>\\r\\n` by strided copies (no object per key)."""
    n = len(packed_keys) // 8
    name = hash_name.encode()
    head = b"*%d\r\n$5\r\nHMGET\r\n$%d\r\n%s\r\n" % (n + 2, len(name), name)
    body = bytearray(_KEY_FRAME * n)
    for i in range(8):
        body[4 + i :: 14] = packed_keys[i::8]
    return head + body


def _runs_of_values(version: bytes | None, groups: list[Any],
                    values: list[bytes | None]) -> list[Any] | None:
    """score.lua's reply from every key's value: runs of equal values up to the first
    key nobody holds; None if a list up to there is in `bx` ('')."""
    end = values.index(None) if None in values else len(values)
    out: list[Any] = [version, groups]
    for value, run in groupby(values[:end]):
        if not value:
            return None
        out += (value, len(list(run)))
    return out


class _SlotMap:
    """A model's ranks as of `version`, numbered for the walk.

    Redis names a rank by its slot id (never reused, up to 2^28); the walk's masks (one
    nibble per rank, indexer/index/scoring.py) number the ranks densely instead, in slot
    id order, so a mask's size follows the number of ranks, not the ids. `by_slot`,
    `slots_of_worker` and `pools` are in that dense numbering; `mask()` turns a holder
    list from Redis into it. An entry of an id the map does not know (a rank created or
    removed since) is left out: a miss at worst, never another rank's claim."""

    __slots__ = ("_cold", "_dense", "_masks", "_plan", "_table", "all_slots", "by_slot",
                 "pools", "slots_of_worker", "version")

    def __init__(self, version: bytes | None, slots: dict[bytes, bytes]) -> None:
        self.version = version
        self.by_slot: dict[int, WorkerRef] = {}  # pools too, as (name, POOL_RANK)
        self.slots_of_worker: dict[str, int] = {}
        self.pools: dict[str, int] = {}  # shared storage pool -> its walk slot
        ids = sorted((int(slot_raw), ref_raw) for ref_raw, slot_raw in slots.items())
        self._dense: dict[int, int] = {}  # slot id -> walk slot
        self._masks: dict[bytes, int] = {}
        for dense, (slot_id, ref_raw) in enumerate(ids):
            self._dense[slot_id] = dense
            worker_id, _, rank = ref_raw.decode().rpartition("\n")
            self.by_slot[dense] = WorkerRef(worker_id, int(rank))
            if int(rank) == POOL_RANK:
                self.pools[worker_id] = dense
                continue
            self.slots_of_worker[worker_id] = (
                self.slots_of_worker.get(worker_id, 0) | slot_bits([dense])
            )
        self.all_slots = slot_bits(s for s, ref in self.by_slot.items()
                                   if ref.dp_rank != POOL_RANK)
        self._table: SlotTable | None = None
        # The last pool plan: (mounts, workers, candidates, plan), and the refs and slot
        # table of its cold mounters: (cold refs, refs, table or None).
        self._plan: tuple[object, object, int, PoolPlan] | None = None
        self._cold: tuple[object, dict[int, WorkerRef], SlotTable | None] | None = None

    def table(self) -> SlotTable:
        """`slot_table(by_slot)`, made at the first query that needs it."""
        if self._table is None:
            self._table = slot_table(self.by_slot)
        return self._table

    def pool_plan(self, query: ScoreQuery, candidates: int) -> PoolPlan:
        """The query's pool plan; the last one is reused while the (unchanged) mounts and
        worker-id objects and the candidates are the same: a router's queries come with
        the live-worker directory's cached sets, and thousands of mounters cost a plan
        more than the walk."""
        mounts, workers = query.mounts, query.workers
        if not mounts or not self.pools:
            return NO_POOLS
        cached = self._plan
        if (cached is not None and cached[0] is mounts and cached[1] is workers
                and cached[2] == candidates):
            return cached[3]
        plan = pool_credit(self.pools, mounts, self.slots_of_worker, candidates,
                           workers=workers, next_slot=max(self.by_slot, default=-1) + 1)
        self._plan = (mounts, workers, candidates, plan)
        return plan

    def refs_with(self, cold: dict[int, WorkerRef]) -> dict[int, WorkerRef]:
        """The refs a Score names: every slot's, and a pool plan's cold slots'."""
        if not cold:
            return self.by_slot
        cached = self._cold
        if cached is None or cached[0] is not cold:
            cached = self._cold = (cold, {**self.by_slot, **cold}, None)
        return cached[1]

    def table_with(self, cold: dict[int, WorkerRef]) -> SlotTable:
        """`table()` with a pool plan's cold slots (`refs_with`)."""
        refs = self.refs_with(cold)
        if refs is self.by_slot:
            return self.table()
        assert self._cold is not None
        cold_refs, _, table = self._cold
        if table is None:
            table = slot_table(refs)
            self._cold = (cold_refs, refs, table)
        return table

    def candidates(self, workers: frozenset[str] | None) -> int:
        if workers is None:
            return self.all_slots
        mask = 0
        for worker_id in workers:
            mask |= self.slots_of_worker.get(worker_id, 0)
        return mask

    def mask(self, value: bytes) -> int:
        """A holder list (holders.lua) as a walk mask: bit `walk slot * 4 + tier`."""
        found = self._masks.get(value)
        if found is not None:
            return found
        dense = self._dense
        unpack = _ENTRIES.get(len(value)) or struct.Struct(f"<{len(value) // 4}I").unpack
        entries = unpack(value)
        mask = 0
        if len(entries) <= 16:
            for entry in entries:
                slot = dense.get(entry >> 4)
                if slot is not None:
                    mask |= (entry & 15) << (slot * TIER_BITS)
        else:  # a block many ranks hold: one nibble array, then one int
            nibbles = bytearray((len(dense) + 1) // 2)
            for entry in entries:
                slot = dense.get(entry >> 4)
                if slot is not None:
                    nibbles[slot >> 1] |= (entry & 15) << ((slot & 1) * TIER_BITS)
            mask = int.from_bytes(nibbles, "little")
        if len(self._masks) < _DECODED_CACHE:
            self._masks[value] = mask
        return mask


class RedisIndex:
    """The Index on Redis; apply() of one worker must come from one process at a time."""

    def __init__(
        self,
        client: aioredis.Redis,
        config: IndexConfig | None = None,
        on_resync: ResyncHook | None = None,
        log_compact_min_bytes: int = DEFAULT_LOG_COMPACT_MIN_BYTES,
        pipelined_queries: bool = True,
        *,
        read_only: bool = False,
        bucket_load: int = DEFAULT_BUCKET_LOAD,
    ) -> None:
        self.log_compact_min_bytes = log_compact_min_bytes
        # Blocks per bucket of the models this index creates (lua/holders.lua): 0 keeps
        # one hash per model, faster to read and write, ~30 B more per block.
        self.bucket_load = bucket_load
        # A read replica's index: Score runs score.lua with EVALSHA_RO, which a replica
        # accepts and which can never write.
        self._score_command = "EVALSHA_RO" if read_only else "EVALSHA"
        self.config = config or IndexConfig()
        self.config.validate()
        self.on_resync = on_resync
        self._redis = client
        self._apply_script = client.register_script(_lua_with_holders("apply.lua"))
        self._apply_sha: str | None = None
        self._slot_script = client.register_script(_lua_with_holders("slot.lua"))
        self._score_script = client.register_script(_lua_with_holders("score.lua"))
        self._score_groups_script = client.register_script(_lua_with_holders("score_groups.lua"))
        self._workers_script = client.register_script(_lua("workers.lua"))
        self._gc_script = client.register_script(_lua_with_holders("gc.lua"))
        # None: queries stay on redis-py (asked for, or a URL the pipe does not speak).
        self._queries = RedisPipe.for_client(client) if pipelined_queries else None
        self._ledgers: dict[tuple[str, WorkerRef], WorkerLedger] = {}
        self._pool_slots: dict[tuple[str, str], int] = {}  # (model, pool) -> slot
        self._pool_drop_script = client.register_script(_lua_with_holders("pool_drop.lua"))
        self._floor_script = client.register_script(_RAISE_FLOOR)
        self._log_bytes: dict[WorkerLedger, int] = {}  # size of each ledger's log in Redis
        self._string_logs: set[WorkerLedger] = set()  # loaded from a string log: replace it
        self._slot_maps: dict[str, _SlotMap] = {}
        self._many_buckets: set[str] = set()  # models Score reads with score.lua
        self._known_models: set[str] = set()
        self._block_sizes: dict[str, int] = {}
        # model -> KV-cache group -> (kind, window) learned, to write with the records
        self._unwritten_groups: dict[str, dict[int, tuple[str | None, int]]] = {}
        # model -> KV-cache groups > 0 the records built last write (apply.lua's keys)
        self._record_groups: dict[str, set[int]] = {}
        self._stats = IndexStats()
        self._lock = asyncio.Lock()
        self._layout_checked = False  # the Redis's models were found in this layout
        self._layout_refusal: str | None = None  # why the Redis's declared layout is refused
        self._layout_gate = LayoutGate()
        self._probe_buckets = False  # Redis Cluster: apply.lua probes buckets first

    @classmethod
    def from_url(cls, url: str, *, redis_options: Mapping[str, Any] | None = None,
                 **kwargs: Any) -> RedisIndex:
        """The index on the Redis at `url`; `redis_options` go to redis-py's client (TLS
        files, a password), `kwargs` to the index."""
        client = aioredis.Redis.from_url(url, decode_responses=False, **(redis_options or {}))
        return cls(client, **kwargs)

    async def close(self) -> None:
        if self._queries is not None:
            await self._queries.close()
        await self._redis.aclose()

    # --- ingest ------------------------------------------------------------------------

    async def apply(
        self, batches: Sequence[EventBatch], *, validated: bool = False
    ) -> list[ApplyOutcome]:
        if not validated:
            for batch in batches:
                validate_batch(batch)
        async with self._lock:
            await self._require_layout()
            try:
                try:
                    return await self._apply(batches)
                except _ScriptMissingError:
                    # Redis restarted and lost its scripts; none ran, so every cached ledger
                    # may be ahead of Redis: reload them all and run the call again.
                    self._ledgers.clear()
                    self._pool_slots.clear()
                    self._log_bytes.clear()
                    return await self._apply(batches)
            except (RedisError, _ScriptMissingError) as exc:
                await self._reset_after_failure(exc)
                raise BackendError(f"redis apply failed: {exc}") from exc
            except BaseException:
                # A refused record (conflict, an error reply) or anything else: ledgers of
                # every model in this call may be ahead of Redis, not only the failing
                # one's. Reload them all from Redis before the next call.
                self._forget_all()
                raise

    async def _reset_after_failure(self, exc: Exception) -> None:
        """Redis holds the truth: forget what was cached; drop sockets a restart killed."""
        self._forget_all()
        if isinstance(exc, ConnectionError | TimeoutError | OSError):
            await self._redis.connection_pool.disconnect()

    async def _apply(self, batches: Sequence[EventBatch]) -> list[ApplyOutcome]:
        sha = await self._script_sha()
        await self._load_ledgers((b.model, b.worker_id, b.dp_rank) for b in batches)
        outcomes: dict[int, ApplyOutcome] = {}
        step = max(8, -(-len(batches) // _MAX_CALLS))
        conn = await self._redis.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            # RESP pipelining on one connection: each call goes out as soon as it is built,
            # so Redis runs it while Python builds the next; replies come back in order.
            pending: list[tuple[str, list[bytes], list[WorkerLedger]] | None] = []
            for start in range(0, len(batches), step):
                group = list(enumerate(batches[start : start + step], start))
                records, sent = await self._build_records(group, outcomes)
                for model, model_records in records.items():
                    for command in self._group_commands(model):
                        await conn.send_command(*command)
                        pending.append(None)
                    keys = self._apply_keys(model, sent[model])
                    await conn.send_packed_command(
                        _pack_command(conn, ("EVALSHA", sha, len(keys), *keys, *model_records)))
                    pending.append((model, model_records, sent[model]))
            replies = [await _read_reply(conn) for _ in pending]
        except BaseException:
            await conn.disconnect()
            raise
        finally:
            await self._redis.connection_pool.release(conn)
        for sent_record, reply in zip(pending, replies, strict=True):
            if sent_record is None:
                if isinstance(reply, Exception):
                    raise BackendError(f"redis groups write failed: {reply}")
                continue
            model, model_records, ledgers = sent_record
            self._check_statuses(model, model_records, ledgers, reply)
        await self._register_models(batches)
        return [outcomes[i] for i in range(len(batches))]

    async def _script_sha(self) -> str:
        if self._apply_sha is None:
            self._apply_sha = str(await self._redis.script_load(self._apply_script.script))
        return self._apply_sha

    def _check_statuses(
        self, model: str, records: list[bytes], ledgers: list[WorkerLedger], reply: Any
    ) -> None:
        """Raise unless every record of a call applied; forget the ledgers if not."""
        ok = (isinstance(reply, list) and len(reply) == len(records)
              and (not reply or reply[-1] != b"conflict"))
        if ok:
            return
        for ledger in ledgers:
            self._forget(ledger)
        if isinstance(reply, ResponseError):
            if isinstance(reply, NoScriptError):  # redis-py strips "NOSCRIPT" off the text
                self._apply_sha = None
                raise _ScriptMissingError(str(reply))
            raise BackendError(f"redis apply failed for {model}: {reply}")
        applied = len(reply) - 1 if isinstance(reply, list) else 0
        failed = ledgers[applied]
        log.warning("ledger_conflict", model=model, worker=failed.worker_id,
                    dp_rank=failed.dp_rank, applied=applied)
        raise BackendError(
            f"worker {failed.worker_id}/{failed.dp_rank} of {model} was written or removed by "
            f"another process; {applied} of {len(ledgers)} records were applied"
        )

    async def _build_records(
        self, group: list[tuple[int, EventBatch]], outcomes: dict[int, ApplyOutcome]
    ) -> tuple[dict[str, list[bytes]], dict[str, list[WorkerLedger]]]:
        """Run the group's batches through their ledgers: one record per changed rank."""
        sinks: dict[WorkerLedger, tuple[bytes, _OpsSink]] = {}
        changed: dict[WorkerLedger, list[EventBatch]] = {}  # -> its batches applied
        # keyed by (model, WorkerRef) as the cache is: a WorkerRef equals its plain tuple
        ledgers: dict[Any, WorkerLedger] = self._ledgers
        stats, on_resync = self._stats, self.on_resync
        for i, batch in group:
            # the cached ledger without a coroutine or a WorkerRef per batch; loaded when
            # missing
            ledger = (ledgers.get((batch.model, (batch.worker_id, batch.dp_rank)))
                      or await self._ledger(batch.model,
                                            WorkerRef(batch.worker_id, batch.dp_rank)))
            entry = sinks.get(ledger)
            if entry is None:
                entry = sinks[ledger] = (_position(ledger.epoch, ledger.last_seq), _OpsSink())
                ledger.start_journal()
            own, pooled = split_pool_events(batch)
            sink = entry[1]
            outcome = ledger.apply(own, sink, stats, on_resync)
            outcomes[i] = outcome
            if outcome is ApplyOutcome.APPLIED or outcome is ApplyOutcome.APPLIED_AFTER_GAP:
                if outcome is ApplyOutcome.APPLIED_AFTER_GAP:
                    sink.wipe_written_pools(batch.ts)
                if pooled:
                    await self._pool_ops(batch, ledger, pooled, sink)
                changed.setdefault(ledger, []).append(batch)
        records: dict[str, list[bytes]] = {}
        sent: dict[str, list[WorkerLedger]] = {}
        for ledger, (expected, sink) in sinks.items():
            applied = changed.get(ledger)
            if applied is not None:
                records.setdefault(ledger.model, []).append(
                    self._record(ledger, expected, sink, block_size=_block_size(applied)))
                sent.setdefault(ledger.model, []).append(ledger)
                self._learn_groups(ledger.model, sink.learned)
            ledger.end_journal()
        return records, sent

    def _apply_keys(self, model: str, ledgers: Sequence[WorkerLedger]) -> list[str]:
        """apply.lua's keys for a call of these ledgers' records (built last for `model`):
        with the `blk<g>` hash of every KV-cache group the records write."""
        return apply_keys(model, [ledger.slot for ledger in ledgers],
                          self._record_groups.pop(model, ()))

    async def _pool_ops(self, batch: EventBatch, writer: WorkerLedger, events: list[Event],
                        sink: _OpsSink) -> None:
        """A writer's pool events as pool ops of its record (indexer/index/pools.py)."""
        for event in events:
            assert event.pool is not None
            pool = (await self._pool_slot(batch.model, event.pool), event.pool.encode())
            if isinstance(event, BlockStored):
                hashes, keys = resolve_pool_store(event, writer, self._stats)
                sink.pool_store(pool, batch.ts, hashes, keys)  # even empty: pool listed
            elif isinstance(event, BlockRemoved):
                sink.pool_remove(pool, batch.ts, event.block_hashes)
            else:
                sink.pool_wipe(pool, batch.ts)

    async def _pool_slot(self, model: str, pool: str) -> int:
        slot = self._pool_slots.get((model, pool))
        if slot is None:
            prefix = model_prefix(model)
            slot_raw, created = await self._slot_script(
                keys=[prefix + name for name in _SLOT_MODEL_KEYS],
                args=[pool, POOL_RANK, random.getrandbits(62), self.bucket_load])
            slot = self._pool_slots[(model, pool)] = int(slot_raw)
            if created:
                await self._redis.sadd(MODELS_KEY, model)
                self._known_models.add(model)
        return slot

    def _learn_groups(self, model: str, learned: dict[int, tuple[str | None, int]]) -> None:
        """Queue the KV-cache group specs of these records, written in the same pipeline
        before them, so a group's hash is always listed in `groups` (gc.lua finds it)."""
        unwritten = self._unwritten_groups.setdefault(model, {})
        for group, spec in learned.items():
            unwritten[group] = merged_spec(group, unwritten.get(group), spec)

    def _group_commands(self, model: str) -> list[tuple[str | int, ...]]:
        """The writes of the KV-cache group specs learned for `model` since the last."""
        return [group_spec_command(model_prefix(model) + "groups", group, spec)
                for group, spec in self._unwritten_groups.pop(model, {}).items()]

    async def _run_records(
        self, records: dict[str, list[bytes]], sent: dict[str, list[WorkerLedger]]
    ) -> list[str]:
        """One atomic script call per model, in a pipeline; returns the models whose last
        rank these records removed."""
        if not records:
            return []
        pipe = self._redis.pipeline(transaction=False)
        models = list(records)
        at: list[int] = []  # where each model's script reply is in the pipeline's
        for model in models:
            for command in self._group_commands(model):
                pipe.execute_command(*command)
            at.append(len(pipe))
            await self._apply_script(keys=self._apply_keys(model, sent[model]),
                                     args=records[model], client=pipe)
        results = await pipe.execute(raise_on_error=False)
        emptied = []
        for model, reply in zip(models, (results[i] for i in at), strict=True):
            self._check_statuses(model, records[model], sent[model], reply)
            if b"emptied" in reply:
                emptied.append(model)
        return emptied

    def _forget(self, ledger: WorkerLedger) -> None:
        self._ledgers.pop((ledger.model, WorkerRef(ledger.worker_id, ledger.dp_rank)), None)
        self._log_bytes.pop(ledger, None)
        self._string_logs.discard(ledger)

    def _record(
        self, ledger: WorkerLedger, expected: bytes, sink: _OpsSink, remove: bool = False,
        block_size: int = 0,
    ) -> bytes:
        """The packed record apply.lua reads for one rank (layout in apply.lua); a
        `block_size` is stored as the model's, in the same atomic call. The KV-cache
        groups its ops write are noted for the call's keys (`_apply_keys`)."""
        groups = sink.groups_written()
        if groups:
            self._record_groups.setdefault(ledger.model, set()).update(groups)
        journal = ledger.journal
        assert journal is not None
        worker = ledger.worker_id.encode()
        log_segment = b""
        replace = False
        if not remove:
            log_segment, replace = self._log_segment(ledger, journal)
        flags = ((1 if replace else 0) | (2 if ledger.degraded else 0) | (4 if remove else 0)
                 | (8 if self._probe_buckets else 0))
        header = _RECORD_HEADER.pack(
            ledger.slot, expected, _position(ledger.epoch, ledger.last_seq), ledger.last_ts,
            flags, *ledger.counts, ledger.dp_rank, len(worker), len(sink.ops),
            len(log_segment), block_size,
        )
        return b"".join((header, worker, sink.ops, log_segment))

    def _log_segment(self, ledger: WorkerLedger, journal: Journal) -> tuple[bytes, bool]:
        """What to append to the ledger's log, or a snapshot to replace it (True).

        A hybrid rank's groups follow their `Y` records, and the segment switches back to
        group 0 at its end."""
        groups = sorted(ledger.groups.items()) if ledger.groups else []
        if ledger in self._string_logs:  # loaded from a string log: a list replaces it
            self._string_logs.discard(ledger)
        elif not journal.reset and (not groups or not any(
                g.journal is not None and g.journal.reset for _, g in groups)):
            segment = _changes(ledger, journal)
            if groups:
                parts = [segment]
                for group, group_ledger in groups:
                    if group_ledger.journal is not None:
                        parts += [LOG_HASH.pack(b"Y", group),
                                  _changes(group_ledger, group_ledger.journal)]
                parts.append(LOG_HASH.pack(b"Y", 0))
                segment = b"".join(parts)
            size = self._log_bytes.get(ledger, 0) + len(segment)
            live = _live_log_bytes(ledger)
            for _, group_ledger in groups:
                live += _live_log_bytes(group_ledger)
            # A window group stores and frees nearly every block: its churn is most of a
            # hybrid rank's log, so that log is compacted sooner (memory per entry).
            limit = live + live // 4 if groups else 2 * live
            if size <= max(self.log_compact_min_bytes, limit):
                self._log_bytes[ledger] = size
                return segment, False
        snapshot = ledger.to_log()
        self._log_bytes[ledger] = len(snapshot)
        return snapshot, True

    async def _register_models(self, batches: Sequence[EventBatch]) -> None:
        """List the models this process had not seen yet (idempotent: a rank created
        lists its model anyway); cache the block sizes the records stored."""
        last_of_model = {b.model: b for b in batches}
        await self._register_models_named(set(last_of_model))
        for model, batch in last_of_model.items():
            size = stored_block_size(batch)
            if size is not None:
                self._block_sizes[model] = size

    async def _register_models_named(self, models: set[str]) -> None:
        new = models - self._known_models
        if new:
            await self._redis.sadd(MODELS_KEY, *sorted(new))
            self._known_models |= new

    async def block_size(self, model: str) -> int | None:
        return await read_block_size(self._redis, model_prefix(model) + "block_size", model,
                                     self._block_sizes)

    async def _ledger(self, model: str, ref: WorkerRef) -> WorkerLedger:
        ledger = self._ledgers.get((model, ref))
        if ledger is None:
            ledger = await self._load_ledger(model, ref)
            self._ledgers[(model, ref)] = ledger
        return ledger

    async def _load_ledgers(self, ranks: Iterable[tuple[str, str, int]]) -> None:
        """Load the ledgers of these (model, worker id, dp rank) that are not cached, their
        slots in one round trip: a rank's first batches cost no round trip of their own."""
        cached: dict[Any, WorkerLedger] = self._ledgers  # a WorkerRef equals its tuple
        missing: dict[tuple[str, WorkerRef], None] = {}
        for model, worker_id, dp_rank in ranks:
            rank = (model, (worker_id, dp_rank))
            if rank not in cached and rank not in missing:
                missing[(model, WorkerRef(worker_id, dp_rank))] = None
        if len(missing) < 2:
            return  # one is loaded as it comes
        replies = await self._slot_replies(list(missing))
        if any(isinstance(reply, NoScriptError) for reply in replies):
            # Not loaded yet (or Redis lost it): no slot was taken, so all again.
            await self._redis.script_load(self._slot_script.script)
            replies = await self._slot_replies(list(missing))
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        created: dict[tuple[str, WorkerRef], WorkerLedger] = {}
        existing: list[WorkerLedger] = []
        for (model, ref), (slot_raw, is_new) in zip(missing, replies, strict=True):
            if is_new:
                created[(model, ref)] = self._new_ledger(model, ref, int(slot_raw))
            else:
                existing.append(self._new_ledger(model, ref, int(slot_raw)))
        for start in range(0, len(existing), _RANKS_READ_AT_ONCE):
            await self._read_ranks(existing[start : start + _RANKS_READ_AT_ONCE])
        for ledger in existing:
            self._ledgers[(ledger.model, WorkerRef(ledger.worker_id, ledger.dp_rank))] = ledger
        if created:
            # Listed after their ranks exist, as `_load_ledger` does.
            models = {model for model, _ in created}
            await self._redis.sadd(MODELS_KEY, *sorted(models))
            self._known_models |= models
            self._ledgers.update(created)

    async def _slot_replies(self, ranks: list[tuple[str, WorkerRef]]) -> list[Any]:
        """slot.lua's reply for each rank, its calls sent at once on one connection (no
        pipeline object, no SCRIPT EXISTS first: a NOSCRIPT reply is returned)."""
        commands = []
        for model, ref in ranks:
            keys, args = self._slot_call(model, ref)
            commands.append(("EVALSHA", self._slot_script.sha, len(keys), *keys, *args))
        return await self._sent_at_once(commands)

    async def _sent_at_once(self, commands: Sequence[tuple[str | int | bytes, ...]]) -> list[Any]:
        """Each command's reply (an error reply returned, not raised), the commands sent
        together on one connection of the pool, packed by hiredis."""
        conn = await self._redis.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            packed: list[bytes] = []
            for command in commands:
                one = _pack_command(conn, command)
                packed += [one] if isinstance(one, bytes) else one
            await conn.send_packed_command(packed)
            return [await _read_reply(conn) for _ in commands]
        except BaseException:
            await conn.disconnect()
            raise
        finally:
            await self._redis.connection_pool.release(conn)

    def _slot_call(self, model: str, ref: WorkerRef) -> tuple[list[str], list[Any]]:
        """slot.lua's keys and arguments for the slot of a rank (taken when it has none)."""
        prefix = model_prefix(model)
        return ([prefix + name for name in _SLOT_MODEL_KEYS],
                [ref.worker_id, ref.dp_rank, random.getrandbits(62), self.bucket_load])

    def _new_ledger(self, model: str, ref: WorkerRef, slot: int) -> WorkerLedger:
        return WorkerLedger(model, ref.worker_id, ref.dp_rank, slot, self.config.ghost_capacity)

    async def _load_ledger(self, model: str, ref: WorkerRef) -> WorkerLedger:
        keys, args = self._slot_call(model, ref)
        slot_raw, created = await self._slot_script(keys=keys, args=args)
        slot = int(slot_raw)
        if created:
            ledger = self._new_ledger(model, ref, slot)
            # Listed after its rank exists, whatever this process cached: a collection
            # running meanwhile unlists before it looks for ranks (`_collect_models`),
            # so a model with a rank is never left unlisted.
            await self._redis.sadd(MODELS_KEY, model)
            self._known_models.add(model)
            return ledger
        return await self._existing_ledger(model, ref, slot)

    async def _existing_ledger(self, model: str, ref: WorkerRef, slot: int) -> WorkerLedger:
        """The ledger of a rank Redis has (its metadata and log read back)."""
        ledger = self._new_ledger(model, ref, slot)
        meta, log_bytes = await self._read_rank(_rank_prefix(ledger), ledger)
        self._restore(ledger, meta, log_bytes)
        return ledger

    async def _read_ranks(self, ledgers: list[WorkerLedger]) -> None:
        """Restore these ranks' ledgers from Redis in one round trip: each rank's metadata
        and log read by a MULTI / EXEC of its own, all sent at once on one connection. A
        rank whose log is a string (an earlier version's) is read again on its own."""
        commands: list[tuple[str | int | bytes, ...]] = []
        for ledger in ledgers:
            wp = _rank_prefix(ledger)
            commands += [("MULTI",), ("HGETALL", wp + "meta"), ("LRANGE", wp + "log", 0, -1),
                         ("EXEC",)]
        replies = await self._sent_at_once(commands)
        for ledger, executed in zip(ledgers, replies[3::4], strict=True):
            if isinstance(executed, Exception):
                raise executed
            flat_meta, segments = executed
            if isinstance(flat_meta, Exception):
                raise flat_meta
            if isinstance(segments, ResponseError):  # WRONGTYPE: a string log
                meta, log_bytes = await self._read_rank(_rank_prefix(ledger), ledger)
            else:
                meta = (flat_meta if isinstance(flat_meta, dict)  # RESP3; RESP2 gives a flat list
                        else dict(zip(flat_meta[::2], flat_meta[1::2], strict=True)))
                log_bytes = b"".join(segments)
            self._restore(ledger, meta, log_bytes)

    def _restore(self, ledger: WorkerLedger, meta: dict[bytes, bytes], log_bytes: bytes) -> None:
        """A new ledger set to the rank's stored metadata and log."""
        if meta:
            ledger.epoch, ledger.last_seq = _POSITION.unpack(meta[b"pos"])
            ledger.last_ts = float(meta[b"ts"])
            ledger.counts = [int(meta[f"n{t}".encode()]) for t in range(len(TIERS))]
            ledger.degraded = ledger.warned = meta[b"degraded"] == b"1"
        if log_bytes:
            ledger.load_log(log_bytes)
            self._log_bytes[ledger] = len(log_bytes)

    async def _read_rank(self, wp: str, ledger: WorkerLedger) -> tuple[dict[bytes, bytes], bytes]:
        """A rank's metadata and its log, read at once: the log's segments joined (a list),
        or a string an earlier version wrote, which the ledger's next write replaces."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.hgetall(wp + "meta")
        pipe.lrange(wp + "log", 0, -1)
        meta, segments = await pipe.execute(raise_on_error=False)
        if not isinstance(segments, ResponseError):
            if isinstance(meta, Exception):
                raise meta
            return meta, b"".join(segments)
        pipe = self._redis.pipeline(transaction=True)  # WRONGTYPE: a string log
        pipe.hgetall(wp + "meta")
        pipe.get(wp + "log")
        meta, log_bytes = await pipe.execute()
        self._string_logs.add(ledger)
        return meta, log_bytes or b""

    # --- queries -----------------------------------------------------------------------

    async def score(self, query: ScoreQuery) -> ScoreResult:
        validate_query(query, self.config)
        packed_keys = query_keys_packed(query)
        if not packed_keys:
            return ScoreResult(0, [])
        prefix = model_prefix(query.model)
        try:
            # One round trip, one packed argument: the masks up to the first unheld block.
            version, groups, *values = await self._masks(prefix, packed_keys)
            slot_map = await self._slot_map(query.model, version or None)
        except RedisError as exc:
            if isinstance(exc, ConnectionError | TimeoutError):
                await self._drop_idle_sockets()
            raise BackendError(f"redis score failed: {exc}") from exc
        candidates = slot_map.candidates(query.workers)
        # Runs of equal holder lists, flat: [value, count, ...] (see lua/score.lua), as
        # walk masks.
        mask_of = slot_map.mask
        runs: list[int] = [mask_of(v) if i % 2 == 0 else v for i, v in enumerate(values)]
        weights = query.tier_weights or self.config.tier_weights
        plan = slot_map.pool_plan(query, candidates)
        refs = slot_map.refs_with(plan.cold_refs)
        if any(group != b"0" for group in groups[::2]):
            # A pool's presence lives in group 0: its credit goes to group 0's masks.
            matches = await self._hybrid_matches(query, packed_keys, groups, runs,
                                                 candidates, slot_map=slot_map, plan=plan)
            scores = worker_scores(matches, refs.__getitem__)
        else:
            scores = score_runs(runs, candidates, weights, query.include_zero, refs,
                                table=functools.partial(slot_map.table_with, plan.cold_refs),
                                plan=plan)
        return ScoreResult(len(packed_keys) // 8, scores)

    async def _hybrid_matches(self, query: ScoreQuery, packed_keys: bytes, groups: list[bytes],
                              runs: list[int], candidates: int, *, slot_map: _SlotMap,
                              plan: PoolPlan = NO_POOLS) -> list[SlotMatch]:
        """vLLM's hybrid rule (`hybrid_run_matches`) over the model's KV-cache groups:
        group 0's runs came with the query; the others' masks take a second call (lua/
        score_groups.lua). Pools (`plan`) are credited in group 0 only (where a pool's
        presence lives)."""
        if plan.credits:
            runs = credit_runs(runs, plan.credits)
        block_size = query.block_size if query.token_ids is not None else None

        async def group_masks(n_blocks: int, numbers: list[int]) -> list[dict[int, int]]:
            try:
                replies = await self._group_masks(model_prefix(query.model),
                                                  packed_keys[: n_blocks * 8], numbers)
            except RedisError as exc:
                if isinstance(exc, ConnectionError | TimeoutError):
                    await self._drop_idle_sockets()
                raise BackendError(f"redis score failed: {exc}") from exc
            present = [{i: slot_map.mask(v) for i, v in enumerate(reply) if v}
                       for reply in replies]
            if numbers[0] == 0 and plan.credits:
                present[0] = dict(zip(present[0], credit_masks(present[0].values(),
                                                               plan.credits), strict=True))
            return present

        return await hybrid_run_matches(
            group_specs(zip(groups[::2], groups[1::2], strict=True)), runs,
            candidates | plan.cold, len(packed_keys) // 8,
            block_size=block_size or await self.block_size(query.model),
            weights=query.tier_weights or self.config.tier_weights,
            include_zero=query.include_zero, group_masks=group_masks)

    async def _drop_idle_sockets(self) -> None:
        """After a query lost its connection: the next query reconnects the pipe, and
        redis-py's idle pooled sockets are likely as dead (a restart); busy ones are left
        to their users."""
        try:
            await self._redis.connection_pool.disconnect(inuse_connections=False)
        except RedisError:
            log.debug("redis_pool_disconnect_failed", exc_info=True)

    async def _masks(self, prefix: str, packed_keys: bytes) -> list[Any]:
        """score.lua's reply, or the same read without Lua where it can be (a model in
        one bucket, over the shared query pipe: `_one_bucket_masks`)."""
        if self._queries is not None and prefix not in self._many_buckets:
            reply = await self._one_bucket_masks(self._queries, prefix, packed_keys)
            if reply is not None:
                return reply
        return await self._score_lua(prefix, packed_keys)

    async def _one_bucket_masks(self, queries: RedisPipe, prefix: str,
                                packed_keys: bytes) -> list[Any] | None:
        """score.lua's reply for a model whose presence is one hash (load 0, or a model
        not split yet), read by one MULTI / EXEC: the bucket state, `slotver`, `groups`
        and one HMGET of every key, atomic as the script is. Redis spends less than in
        score.lua, where each value becomes a Lua string (hashed byte by byte). None
        when the script must answer: another layout, many buckets (remembered: a model
        never goes back to one), or a key whose list is in `bx` (a '' entry)."""
        state, version, groups, values = await queries.transaction(
            pack("HMGET", prefix + "bk", "layout", "level", "split"),
            pack("GET", prefix + "slotver"), pack("HGETALL", prefix + "groups"),
            _hmget_packed(prefix + "b:0", packed_keys))
        layout, level, split = state
        if layout != LAYOUT:
            return None
        if level not in (None, b"0") or split not in (None, b"0"):
            self._many_buckets.add(prefix)
            return None
        return _runs_of_values(version, groups, values)

    async def _score_lua(self, prefix: str, packed_keys: bytes) -> list[Any]:
        """score.lua's reply; over the shared query pipe when there is one."""
        keys = score_keys(prefix)
        reply: list[Any]
        sha = str(self._score_script.sha)  # SHA1 of the script text, known before loading
        call = (self._queries.call if self._queries is not None
                else self._redis.execute_command)
        try:
            reply = await call(self._score_command, sha, len(keys), *keys, packed_keys)
        except NoScriptError:  # first use, or Redis restarted and lost its scripts
            await call("SCRIPT", "LOAD", str(self._score_script.script))
            reply = await call(self._score_command, sha, len(keys), *keys, packed_keys)
        return reply

    async def _group_masks(self, prefix: str, packed_keys: bytes,
                           groups: Sequence[int]) -> list[Any]:
        """score_groups.lua's reply (read-only: EVALSHA_RO on a replica), over the shared
        query pipe when there is one. It declares the group hashes it reads."""
        keys = group_hash_keys(prefix, groups)
        script = self._score_groups_script
        sha = str(script.sha)
        reply: list[Any]
        if self._queries is None and self._score_command == "EVALSHA":
            reply = await script(keys=keys, args=[packed_keys])
            return reply
        call = (self._queries.call if self._queries is not None
                else self._redis.execute_command)
        try:
            reply = await call(self._score_command, sha, len(keys), *keys, packed_keys)
        except NoScriptError:
            await call("SCRIPT", "LOAD", str(script.script))
            reply = await call(self._score_command, sha, len(keys), *keys, packed_keys)
        return reply

    async def _slot_map(self, model: str, version: bytes | None = None,
                        fresh: bool = False) -> _SlotMap:
        """The slot map; reloaded when Redis says it changed or `fresh` is asked for."""
        cached = self._slot_maps.get(model)
        if cached is not None and not fresh and cached.version == version:
            return cached
        prefix = model_prefix(model)
        pipe = self._redis.pipeline(transaction=True)
        pipe.get(prefix + "slotver")
        pipe.hgetall(prefix + "slots")
        version, slots = await pipe.execute()
        slot_map = _SlotMap(version, slots)
        if cached is not None and cached.version != version:
            # Ranks came or went (or the model was collected and started again, maybe
            # with another block size): read the block size afresh too.
            self._block_sizes.pop(model, None)
        self._slot_maps[model] = slot_map
        return slot_map

    # --- administration ----------------------------------------------------------------

    async def clear_worker(self, model: str, worker_id: str, dp_rank: int | None = None) -> int:
        return await self._drop(model, worker_id, dp_rank, remove=False)

    async def remove_pool(self, model: str, pool: str) -> bool:
        async with self._lock:
            try:
                [dropped] = await self._eval_each(
                    self._pool_drop_script, [([model_prefix(model) + "slots"], [pool])])
                self._pool_slots.pop((model, pool), None)
                if dropped == 2:
                    await self._collect_models([model])
                return bool(dropped)
            except RedisError as exc:
                raise BackendError(f"redis remove_pool failed: {exc}") from exc

    async def remove_worker(self, model: str, worker_id: str) -> int:
        return await self._drop(model, worker_id, None, remove=True)

    async def _drop(self, model: str, worker_id: str, dp_rank: int | None, remove: bool) -> int:
        async with self._lock:
            try:
                slot_map = await self._slot_map(model, fresh=True)
                refs = [
                    ref for ref in slot_map.by_slot.values()
                    if ref.worker_id == worker_id and ref.dp_rank != POOL_RANK
                    and (dp_rank is None or ref.dp_rank == dp_rank)
                ]
                records: list[bytes] = []
                sent: list[WorkerLedger] = []
                for ref in refs:
                    ledger = await self._ledger(model, ref)
                    expected = _position(ledger.epoch, ledger.last_seq)
                    sink = _OpsSink()
                    ledger.start_journal()
                    ledger.clear(sink)
                    records.append(self._record(ledger, expected, sink, remove=remove))
                    ledger.end_journal()
                    sent.append(ledger)
                emptied = await self._run_records({model: records} if records else {},
                                                  {model: sent})
                if remove:
                    for ledger in sent:
                        self._forget(ledger)
                if emptied:
                    await self._collect_models(emptied)
                return len(refs)
            except RedisError as exc:
                self._ledgers.clear()
                self._log_bytes.clear()
                raise BackendError(f"redis clear failed: {exc}") from exc

    async def workers(self, model: str | None = None) -> list[WorkerInfo]:
        """One `workers.lua` call per model, all in one pipeline: after the model list,
        one round trip however many models there are."""
        try:
            models = [model] if model else await self._listed_models()
            replies = await self._eval_each(
                self._workers_script, [([model_prefix(m) + "slots"], []) for m in models])
        except RedisError as exc:
            raise BackendError(f"redis workers failed: {exc}") from exc
        infos: list[WorkerInfo] = []
        for name, reply in zip(models, replies, strict=True):
            infos.extend(_worker_infos(name, reply))
        infos.sort(key=lambda w: (w.model, w.worker_id, w.dp_rank))
        return infos

    async def drop_empty_models(self) -> list[str]:
        async with self._lock:
            try:
                return await self._collect_models(await self._listed_models())
            except RedisError as exc:
                raise BackendError(f"redis drop_empty_models failed: {exc}") from exc

    async def _listed_models(self) -> list[str]:
        return sorted(m.decode() if isinstance(m, bytes) else str(m)
                      for m in await self._redis.smembers(MODELS_KEY))

    async def _collect_models(self, models: list[str]) -> list[str]:
        """Delete the keys of those `models` that have no rank and unlist them; returns
        the ones collected. Constant round trips, whatever the number of models.

        gc.lua checks a model has no rank and deletes its keys, atomically. A rank may be
        created right after (another process): its creator lists the model once the rank
        exists (`_load_ledger`), so the model is unlisted first, then checked again, and
        listed again if it has a rank by then. A crash midway leaves a model listed
        without keys (collected at the next call), or, with a rank created in that very
        moment, unlisted until its writer restarts and lists it on first use.
        """
        ranks = await self._gc_each(models)
        empty = [m for m, n in zip(models, ranks, strict=True) if not n]
        if not empty:
            return []
        await self._redis.srem(MODELS_KEY, *empty)
        again = await self._gc_each(empty)
        revived = [m for m, n in zip(empty, again, strict=True) if n]
        if revived:
            await self._redis.sadd(MODELS_KEY, *revived)
        collected = [m for m, n in zip(empty, again, strict=True) if not n]
        for model in collected:
            self._slot_maps.pop(model, None)
            self._block_sizes.pop(model, None)
            self._known_models.discard(model)
        if collected:
            log.info("models_collected", count=len(collected), models=collected[:8])
        return collected

    async def _gc_each(self, models: Sequence[str]) -> list[int]:
        """`gc.lua` once per model, pipelined: each model's rank count, 0 for one whose
        keys it deleted. It declares every key it may delete, named from the model's
        `nextslot` (an older layout's rank keys; none in layout 2, whose ranks' keys go
        with the ranks) and `groups` (its KV-cache groups' hashes), read first; a model whose
        `nextslot` grew (or that gained a group) meanwhile got a rank: its count is read
        again, and after three tries it is taken as having one."""
        ranks: list[int] = [-1] * len(models)
        for _ in range(3):
            todo = [i for i, n in enumerate(ranks) if n < 0]
            if not todo:
                break
            pipe = self._redis.pipeline(transaction=False)
            for i in todo:
                pipe.get(model_prefix(models[i]) + "nextslot")
                pipe.hkeys(model_prefix(models[i]) + "groups")
                pipe.hget(model_prefix(models[i]) + "bk", "layout")
            read = await pipe.execute()
            next_slots = [0 if layout == LAYOUT else int(raw or 0)
                          for raw, layout in zip(read[0::3], read[2::3], strict=True)]
            groups = [sorted(int(g) for g in raw) for raw in read[1::3]]
            replies = await self._eval_each(self._gc_script, [
                (_gc_keys(models[i], n, g), [n, *g])
                for i, n, g in zip(todo, next_slots, groups, strict=True)])
            for i, reply in zip(todo, replies, strict=True):
                ranks[i] = int(reply)
        return [1 if n < 0 else n for n in ranks]

    async def _eval_each(self, script: AsyncScript,
                         calls: Sequence[tuple[list[str], list[Any]]]) -> list[Any]:
        """`script` once per (keys, args) call, pipelined: one round trip. The script is
        loaded if Redis does not have it (first use, or a restart)."""
        if not calls:
            return []
        sha = str(script.sha)
        for attempt in range(2):
            pipe = self._redis.pipeline(transaction=False)
            for keys, args in calls:
                pipe.evalsha(sha, len(keys), *keys, *args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in replies):
                await self._redis.script_load(str(script.script))
                continue
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            return replies
        raise AssertionError("unreachable")  # pragma: no cover

    async def stats(self) -> IndexStats:
        return self._stats.snapshot(
            sum(1 for w in await self.workers() if w.kind != KIND_POOL))

    async def export_ranks(self, ranks: Sequence[tuple[str, WorkerRef]]) -> list[RankState]:
        await self._require_layout()
        async with self._lock:
            try:
                specs = {model: await stored_group_specs(self._redis,
                                                         model_prefix(model) + "groups")
                         for model in {m for m, _ in ranks}}
                return [with_specs((await self._ledger(model, ref)).export(), specs[model])
                        for model, ref in ranks]
            except RedisError as exc:
                raise BackendError(f"redis export failed: {exc}") from exc

    async def import_ranks(self, states: Sequence[RankState]) -> None:
        async with self._lock:
            await self._require_layout()
            try:
                records: dict[str, list[bytes]] = {}
                sent: dict[str, list[WorkerLedger]] = {}
                await self._load_ledgers((s.model, s.worker_id, s.dp_rank) for s in states)
                for state in states:
                    ledger = await self._ledger(state.model,
                                                WorkerRef(state.worker_id, state.dp_rank))
                    expected = _position(ledger.epoch, ledger.last_seq)
                    sink = _OpsSink()
                    ledger.start_journal()
                    ledger.restore(state, sink)
                    for group in ledger.groups:
                        sink.learn_group(group, None, 0)
                    learn_specs(state, sink.learn_group, hybrid_on_gpu=ledger.hybrid_on_gpu)
                    records.setdefault(state.model, []).append(
                        self._record(ledger, expected, sink))
                    sent.setdefault(state.model, []).append(ledger)
                    self._learn_groups(state.model, sink.learned)
                    ledger.end_journal()
                await self._register_models_named({s.model for s in states})
                await self._run_records(records, sent)
                await self._raise_pool_floors(states)
            except RedisError as exc:
                await self._reset_after_failure(exc)
                raise BackendError(f"redis import failed: {exc}") from exc

    async def _raise_pool_floors(self, states: Sequence[RankState]) -> None:
        """Imported snapshots cover pool writes (evictions among them) that will not be
        replayed: pools take no write older than the newest imported rank's last batch
        (`pool_floor`, read by apply.lua)."""
        floors: dict[str, float] = {}
        for state in states:
            floors[state.model] = max(floors.get(state.model, 0.0), state.last_ts)
        for model, floor in floors.items():
            await self._floor_script(keys=[model_prefix(model) + "pool_floor"],
                                     args=[repr(floor)])

    async def reset_caches(self) -> None:
        async with self._lock:
            self._forget_all()

    def _forget_all(self) -> None:
        self._unwritten_groups.clear()
        self._record_groups.clear()
        self._ledgers.clear()
        self._pool_slots.clear()
        self._log_bytes.clear()
        self._string_logs.clear()
        self._slot_maps.clear()
        self._known_models.clear()
        self._block_sizes.clear()
        self._apply_sha = None

    async def ping(self) -> None:
        try:
            await self._redis.ping()
            await self._check_layout()
        except RedisError as exc:
            raise BackendError(f"redis ping failed: {exc}") from exc

    async def _require_layout(self) -> None:
        await self._layout_gate.require(
            self._layout_checked and self._layout_refusal is None, self._check_layout)

    async def _check_layout(self) -> None:
        """Refuse a Redis declared in another layout by `kv-indexer migrate-layout`
        (checked at every ping), or whose models (with ranks) are in an older presence
        layout (read as holder lists, their bitmasks would name the wrong ranks) or spread
        over sub-slots (which this index would not see). Models without a rank are
        collected by liveness whatever their layout."""
        self._layout_refusal = declared_refusal(await self._redis.get(LAYOUT_KEY), 1)
        if self._layout_refusal is not None:
            raise BackendError(self._layout_refusal)
        if self._layout_checked:
            return
        models = await self._listed_models()
        pipe = self._redis.pipeline(transaction=False)
        for model in models:
            pipe.exists(model_prefix(model) + "slots")
            pipe.hget(model_prefix(model) + "bk", "layout")
        read = await pipe.execute()
        old = [model for model, ranks, layout in zip(models, read[0::2], read[1::2],
                                                      strict=True)
               if ranks and layout != LAYOUT]
        if old:
            raise BackendError(
                f"Redis holds {len(old)} model(s) in an older index layout "
                f"(e.g. {', '.join(old[:3])}); this version stores presence as holder lists "
                f"(layout {LAYOUT.decode()}) and will not read them. Move them with "
                f"`{migrate_command(1)}`: the index is rebuilt from snapshots and the stream.")
        sub_slot = await self._redis.scard(SUBSLOT_MODELS)
        if sub_slot:
            raise BackendError(
                f"Redis holds {sub_slot} model(s) spread over sub-slots (--redis-subslots), "
                "which this index would not see: start with the same --redis-subslots, or "
                f"move them to one slot each with `{migrate_command(1)}`")
        self._layout_checked = True

    async def get_marker(self, name: str) -> str | None:
        return await get_marker(self._redis, name)

    async def set_marker(self, name: str, value: str | None) -> None:
        await set_marker(self._redis, name, value)

    async def presence(self, model: str) -> dict[int, dict[WorkerRef, int]]:
        slot_map = await self._slot_map(model, fresh=True)
        prefix = model_prefix(model)
        level, split = await self._redis.hmget(prefix + "bk", "level", "split")
        n_buckets = 2 ** int(level or 0) + int(split or 0)
        out: dict[int, dict[WorkerRef, int]] = {}
        big = cast("dict[bytes, bytes]", await self._redis.hgetall(prefix + "bx"))
        for bucket in range(n_buckets):
            async for field, value in self._redis.hscan_iter(f"{prefix}b:{bucket}",
                                                             count=1000):
                mask = slot_map.mask(big[field] if value == b"" else bytes(value))
                holders: dict[WorkerRef, int] = {}
                slot = 0
                while mask:
                    if mask & 15:
                        holders[slot_map.by_slot[slot]] = mask & 15
                    mask >>= TIER_BITS
                    slot += 1
                out[int.from_bytes(field, "little")] = holders
        return out
