"""The Redis index of models spread over several hash slots (`--redis-subslots S`, S >= 2).

Design and the reasons for it: docs/large-models.md. A model's directory lives in one
slot, its presence in S sub-slots by block key (a block in sub-slot `key mod S`), each
rank's ledger in its home sub-slot (`slot id mod S`):

    kvi:{s:M}:slots, nextslot, slotver, subslots, retired, pending, state, block_size,
            groups                  the directory (lua/subslot_dir.lua); `groups`: KV-cache
                                    group -> "kind\nwindow" (hybrid models)
    kvi:{T_k}:blk                   HASH  block key (8 B, LE) -> holder list (group 0)
    kvi:{T_k}:blk<g>                HASH  the same, of KV-cache group g > 0
    kvi:{T_k}:pos                   HASH  slot id -> token (16 B) + phase ('c' | 'd'); and
                                    `q<pool id>` -> the last pool entry applied here
                                    ('x': the pool is being collected or re-slotted,
                                    or is gone: kept for good)
    kvi:{T_k}:p:<id>                STR   keys the id's last part here set (collection)
    kvi:{T_k}:nextslot              STR   a copy of the id counter (lua/subslot_claim.lua)
    kvi:{T_h}:w:<id>:meta, :log     the rank's committed token, position, counts, log,
                                    and the pools it wrote since its last gap (JSON)
    kvi:{T_h}:q:<id>:map, gone, st, w, l:<k>
                                    a pool's state in its home (lua/subslot_pool.lua;
                                    `st` names a re-slot's new id, `reslot_to`)
    kvi:smodels                     SET   sub-slot model names (listing)

`T_k` is sub-slot k's tag `s:<model>:<k>.<suffix>`, the suffix searched at creation so
that on Redis Cluster the k-th tag's hash slot is on the (k mod masters)-th master.

Apply runs in three waves (lua/subslot_part.lua, lua/subslot_ledger.lua): per rank and
sub-slot, the net change of the call is applied iff the sub-slot still holds the token
the writer started from; clears first, sets after every clear, then the rank's ledger,
which records the position each sub-slot must now hold. A token is the rank's call
counter and the writing process's nonce. A writer stopped between waves leaves the rank
torn (a sub-slot holding another position than its ledger records); the next owner sees
it when it loads the rank and re-slots it: the rank's whole presence is written under a
new slot id, the directory switches the rank to it, and the old id is collected from the
keys its ledger and its last parts (`p:<id>`) name. Slot ids are never reused, so a torn
rank, an id not yet collected or a stale slot map can make a reader miss blocks, never
credit one rank with another's. A new id is claimed in every sub-slot (each one's copy
of the counter raised past it) before the directory takes it, so a directory restored
from an older dump cannot give out again an id given out after the dump. On Redis
Cluster, a failover that lost writes Redis had confirmed is found as `RedisClusterIndex`
finds it (`check_lost_writes`): the rank is cleared and asked for a resync; and index
markers are kept on every master (redis_markers.py), so a master restored from an older
dump, or a lagging replica promoted, makes its partitions rebuild whichever master it is.

Hybrid models: a part carries each entry's KV-cache group, applied to that group's hash
in the same script call; Score applies vLLM's rule (indexer/index/hybrid.py) with the
other groups' values read in a second round trip.

Shared storage pools: a pool is mapped like a rank (dp rank -1); every writer's pool ops
are decided in the pool's home sub-slot (lua/subslot_pool.lua), which appends the
presence changes they make, numbered, to a pending list per sub-slot, and each sub-slot
applies its list in number order, each entry once (lua/subslot_pool_apply.lua), before
the writer's waves ("shared storage pools" below; docs/large-models.md, "As built").
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import random
import struct
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Mapping, Sequence
from importlib import resources
from itertools import groupby
from typing import Any, Final, NamedTuple, cast

import redis.asyncio as aioredis
import structlog
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    ConnectionError,
    MovedError,
    NoScriptError,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
    TimeoutError,
    TryAgainError,
)

from indexer.errors import BackendError
from indexer.index.hybrid import (
    group_specs,
    hybrid_run_matches,
    learn_specs,
    merged_spec,
    with_specs,
)
from indexer.index.layouts import (
    LAYOUT_KEY,
    SUBSLOT_MODELS,
    LayoutGate,
    declared_refusal,
    directory_prefix,
    migrate_command,
)
from indexer.index.ledger import LOG_HASH, LOG_MAP, WorkerLedger, stored_block_size
from indexer.index.pools import (
    NO_POOLS,
    POOL_RANK,
    PoolPlan,
    credit_masks,
    credit_runs,
    resolve_pool_store,
    split_pool_events,
)
from indexer.index.protocol import (
    TIERS,
    ApplyOutcome,
    IndexConfig,
    IndexStats,
    RankState,
    ResyncHook,
    ResyncRequest,
    ScoreQuery,
    ScoreResult,
    WorkerInfo,
    WorkerRef,
)
from indexer.index.redis import (
    _POSITION,
    DEFAULT_LOG_COMPACT_MIN_BYTES,
    _changes,
    _SlotMap,
    _worker_infos,
    get_marker,
    group_spec_command,
    read_block_size,
    set_marker,
    stored_group_specs,
)
from indexer.index.redis import (
    MODELS_KEY as SINGLE_SLOT_MODELS,
)
from indexer.index.redis_cluster import LOST_WRITES_REASON, cluster_url
from indexer.index.redis_markers import ClusterMarkers
from indexer.index.redis_pipe import RedisPipe, pack
from indexer.index.scoring import (
    SlotMatch,
    query_keys_packed,
    score_runs,
    validate_query,
    worker_scores,
)
from kvcore.bus import (
    BlockRemoved,
    BlockStored,
    Event,
    EventBatch,
    escape_token,
    validate_batch,
)
from kvcore.keys import NATIVE, pack_keys
from kvcore.pools import KIND_POOL

if NATIVE:
    from kvcore._native import subslot_merge, subslot_split

__all__ = ["MODELS_KEY", "ClaimHook", "PoolHook", "ReplicaReadError", "ShardedRedisIndex",
           "WaveHook"]

log = structlog.get_logger("indexer.redis_sharded")

MODELS_KEY: Final = SUBSLOT_MODELS
ABSENT: Final = b"\0" * 16 + b"-"  # the stored position of a sub-slot a rank never wrote
_COUNTER: Final = struct.Struct(">Q")
_PART_HEADER: Final = struct.Struct("<I17s16s")
_ENTRY: Final = struct.Struct("<QBBB")  # key, KV-cache group, tier bits to clear, to set
_DIR_KEYS: Final = ("slots", "nextslot", "slotver", "subslots", "retired", "pending", "state",
                    "block_size", "groups", "pool_floor")
_POOL_OP: Final = struct.Struct("<cI24sdI")  # kind, writer slot id, writer position, ts, count
_WRITER_POSITION: Final = struct.Struct(">QQQ")  # epoch, seq, op index in the batch
_RAISE_FLOOR: Final = ("if tonumber(ARGV[1]) > tonumber(redis.call('GET', KEYS[1]) or '0') "
                       "then redis.call('SET', KEYS[1], ARGV[1]) end return 1")
_POOL_ATTEMPTS: Final = 3  # a pool found being collected is taken again under a new id
# a pool's state carried to its new id by a re-slot (not its op counter nor lists' ends)
_POOL_STATE_KEPT: Final = frozenset({b"floor", b"gone_max", b"epoch", b"ts"})
_META_FIELDS: Final = ("pos", "ts", "n0", "n1", "n2", "n3", "degraded")
_MAX_TAG_SEARCH: Final = 1 << 20
_ATTEMPTS: Final = 5  # tries of a command meeting a moving slot or a lost node
_CLAIMS: Final = 100  # claims of an id before giving up (each lost to a concurrent one)
_MAX_SLOT_ID: Final = (1 << 28) - 1
# ClusterError: redis-py's cluster pipeline gave up following redirections (TTL).
_RETRIED: Final = (MovedError, AskError, TryAgainError, ClusterDownError, SlotNotCoveredError,
                   ClusterError, ConnectionError, TimeoutError)

# Called after wave 1 and after wave 2 of each apply with the wave's number (tests stop a
# writer between waves by raising from it).
WaveHook = Callable[[int], Awaitable[None]]
# Called with the id claimed in every sub-slot, before the directory is asked to take it
# (tests stop an allocation between its two steps by raising from it).
ClaimHook = Callable[[int], Awaitable[None]]
# Called after a call's pool ops were decided in the pools' home sub-slots, before their
# presence changes are applied in the sub-slots (tests stop a writer there).
PoolHook = Callable[[], Awaitable[None]]


class ReplicaReadError(BackendError):
    """A read replica named in a Score's `read_from` did not give its share of the reads
    (down, too slow, no longer serving those slots); `node`: the master it stood for."""

    def __init__(self, node: str, cause: object) -> None:
        super().__init__(f"read replica for {node or 'the primary'} failed: {cause!r}")
        self.node = node


def _lua(name: str) -> str:
    return resources.files("indexer.index").joinpath(f"lua/{name}").read_text()


def _with_holders(name: str) -> str:
    return _lua("subslot_holders.lua") + "\n" + _lua(name)


class _Script:
    __slots__ = ("sha", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()


class _NetSink:
    """A rank's presence changes over one call, netted per block key: the tier bits to
    clear and to set (the last change of a bit wins); each KV-cache group > 0 in a sink
    of its own (`groups`), the groups' specs learned in the call's (`learned`)."""

    __slots__ = ("changes", "groups", "learned", "root")

    def __init__(self, root: _NetSink | None = None) -> None:
        self.changes: dict[int, list[int]] = {}  # key -> [clear bits, set bits]
        self.groups: dict[int, _NetSink] = {}  # of the call's sink: group > 0 -> its sink
        self.learned: dict[int, tuple[str | None, int]] = {}  # group -> (kind, window)
        self.root = root or self

    def set_bits(self, keys: list[int], bitpos: int) -> None:
        bit = 1 << (bitpos & 3)
        changes = self.changes
        for key in keys:
            change = changes.get(key)
            if change is None:
                changes[key] = [0, bit]
            else:
                change[0] &= ~bit
                change[1] |= bit

    def clear_bits(self, keys: list[int], bitpos: int) -> None:
        bit = 1 << (bitpos & 3)
        changes = self.changes
        for key in keys:
            change = changes.get(key)
            if change is None:
                changes[key] = [bit, 0]
            else:
                change[0] |= bit
                change[1] &= ~bit

    def group_sink(self, group: int) -> _NetSink:
        root = self.root
        if not group:
            return root
        found = root.groups.get(group)
        if found is None:
            found = root.groups[group] = _NetSink(root)
        return found

    def learn_group(self, group: int, kind: str | None, sliding_window: int) -> None:
        learned = self.root.learned
        learned[group] = merged_spec(group, learned.get(group), (kind, sliding_window))

    def by_group(self) -> list[tuple[int, dict[int, list[int]]]]:
        """(group, its changes) for group 0 and each group > 0 the call changed."""
        return [(0, self.changes), *sorted((g, sink.changes) for g, sink in self.groups.items())]


class _Model:
    """A model's sub-slot tags and their key prefixes."""

    __slots__ = ("dir", "prefixes", "tags")

    def __init__(self, model: str, tags: list[str]) -> None:
        self.dir = directory_prefix(model)
        self.tags = tags
        self.prefixes = [f"kvi:{{{tag}}}:" for tag in tags]

    @property
    def subslots(self) -> int:
        return len(self.tags)

    def home(self, slot_id: int) -> str:
        return self.prefixes[slot_id % len(self.prefixes)]


class _Rank:
    """A rank's ledger and, per sub-slot, the position stored there; its committed token
    and call counter; a re-slot in progress (the slot id it leaves)."""

    __slots__ = ("committed", "counter", "ledger", "log_bytes", "pools_written", "positions",
                 "reslot_from")

    def __init__(self, ledger: WorkerLedger, subslots: int) -> None:
        self.ledger = ledger
        self.positions = [ABSENT] * subslots
        self.committed = b""
        self.counter = 0
        self.log_bytes = 0
        self.reslot_from: int | None = None  # the slot id a re-slot leaves
        # pools written since the rank's last gap (a gap wipes them), committed with the
        # ledger
        self.pools_written: set[str] = set()

    @property
    def mapped_slot(self) -> int:
        """The id the directory maps the rank to (the old one while a re-slot runs): the
        rank's name as a pool writer."""
        return self.ledger.slot if self.reslot_from is None else self.reslot_from


class _PoolOp(NamedTuple):
    """One pool op of a writer's batch, packed for lua/subslot_pool.lua (after its
    header, `_POOL_OP`): `create` says whether the op may create the pool (a gap's wipe
    of a pool gone meanwhile is not made)."""

    model: str
    pool: str
    kind: bytes
    writer: int
    position: bytes
    ts: float
    blocks: int
    payload: bytes
    create: bool

    def packed(self) -> bytes:
        return _POOL_OP.pack(self.kind, self.writer, self.position, self.ts,
                             self.blocks) + self.payload


class _Part:
    """One rank's net change in one sub-slot, packed for lua/subslot_part.lua, and the
    KV-cache groups > 0 it changes."""

    __slots__ = ("groups", "has_clears", "packed", "rank", "subslot", "token")

    def __init__(self, rank: _Rank, subslot: int, token: bytes, *, has_clears: bool,
                 packed: bytes, groups: set[int]) -> None:
        self.rank = rank
        self.subslot = subslot
        self.token = token
        self.has_clears = has_clears
        self.packed = packed
        self.groups = groups


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def group_hash(group: int) -> str:
    """A sub-slot's presence hash of KV-cache group `group` (after its key prefix)."""
    return f"blk{group}" if group else "blk"


def _held_keys(ledger: WorkerLedger) -> list[int]:
    """The keys the rank holds in any tier of any KV-cache group."""
    keys: set[int] = set()
    for held in (ledger, *ledger.groups.values()):
        for tier in range(len(TIERS)):
            keys.update(held.keys.held_keys(1 << tier))
    return sorted(keys)


def _split_positions(packed: bytes, subslots: int) -> list[bytes]:
    """The per-sub-slot positions a rank's meta records (ABSENT for a rank never
    committed)."""
    if not packed:
        return [ABSENT] * subslots
    size = len(ABSENT)
    return [packed[i : i + size] for i in range(0, len(packed), size)]


def _by_subslot(keys: Sequence[int], subslots: int) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(subslots)]
    for key in keys:
        out[key % subslots].append(key)
    return out


class ShardedRedisIndex:
    """The Index on Redis (one node or a cluster) with every model in `subslots`
    sub-slots; apply() of one rank from one process at a time."""

    def __init__(
        self,
        client: aioredis.Redis | RedisCluster,
        *,
        subslots: int,
        config: IndexConfig | None = None,
        on_resync: ResyncHook | None = None,
        log_compact_min_bytes: int = DEFAULT_LOG_COMPACT_MIN_BYTES,
    ) -> None:
        if subslots < 2:
            raise BackendError("a sub-slot model needs --redis-subslots >= 2")
        self.subslots = subslots
        self.config = config or IndexConfig()
        self.config.validate()
        self.on_resync = on_resync
        self.log_compact_min_bytes = log_compact_min_bytes
        self.wave_hook: WaveHook | None = None
        self.claim_hook: ClaimHook | None = None
        self.reslots = 0  # ranks found torn and re-slotted by this process
        self.retried_calls = 0  # pipelines sent again (a moving slot, a lost node)
        self._redis = client
        self._cluster = isinstance(client, RedisCluster)
        self._nonce = os.urandom(8)
        self._scripts = {name: _Script(_with_holders(f"subslot_{name}.lua"))
                         for name in ("part", "collect", "pool_apply")}
        self._scripts.update({name: _Script(_lua(f"subslot_{name}.lua"))
                              for name in ("score", "ledger", "dir", "claim", "pool")})
        self._models: dict[str, _Model] = {}
        self._slot_maps: dict[str, _SlotMap] = {}
        self._ranks: dict[tuple[str, WorkerRef], _Rank] = {}
        self._block_sizes: dict[str, int] = {}
        self._pool_ids: dict[tuple[str, str], int] = {}  # (model, pool) -> its slot id
        self.pool_hook: PoolHook | None = None
        self.reslot_hook: PoolHook | None = None  # after a pool re-slot's mark (tests stop there)
        self.pool_reslots = 0  # pools found diverged (a failover) and re-slotted
        self._known_models: set[str] = set()
        # model -> KV-cache group -> spec this process wrote to the directory's `groups`
        self._groups_written: dict[str, dict[int, tuple[str | None, int]]] = {}
        self._stats = IndexStats()
        self._lock = asyncio.Lock()
        # Score's pipelined connections: one per master (one in all on a single node).
        self._pipes: dict[str, RedisPipe] = {}
        self._fast_queries = True
        self._layout_checked = False  # the Redis's models were found in this layout
        self._layout_refusal: str | None = None  # why the Redis's declared layout is refused
        self._layout_gate = LayoutGate()
        # Redis Cluster failovers: (model, rank) -> (slot id, committed token or None
        # for a rank this process removed, positions) as Redis last confirmed them.
        self._confirmed: dict[tuple[str, WorkerRef], tuple[int, bytes | None, list[bytes]]] = {}
        # ... and (model, pool id, pool) -> (its home's op counter, each sub-slot's last
        # entry applied) as Redis last confirmed them.
        self._pool_confirmed: dict[tuple[str, int, str], tuple[int, list[int]]] = {}
        self._masters: frozenset[str] = frozenset()
        self._suspect = False  # an apply failed: check the confirmed ranks again
        self._checking = asyncio.Lock()
        self.lost_write_repairs = 0
        # On a cluster, a marker copy per master (redis_markers.py); one key on one node.
        self.markers = ClusterMarkers(client) if isinstance(client, RedisCluster) else None

    @classmethod
    def from_url(cls, url: str, *, subslots: int, cluster: bool = False,
                 redis_options: Mapping[str, Any] | None = None,
                 **kwargs: Any) -> ShardedRedisIndex:
        """The index on the Redis at `url`; a `redis+cluster://` URL (or `cluster`) gets
        the cluster client."""
        options = dict(redis_options or {})
        plain = cluster_url(url)
        client: aioredis.Redis | RedisCluster
        if plain is not None or cluster:
            client = RedisCluster.from_url(plain or url, decode_responses=False, **options)
        else:
            client = aioredis.Redis.from_url(url, decode_responses=False, **options)
        return cls(client, subslots=subslots, **kwargs)

    async def close(self) -> None:
        for pipe in self._pipes.values():
            await pipe.close()
        self._pipes.clear()
        await self._redis.aclose()

    # --- Redis calls -------------------------------------------------------------------

    async def _run(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Commands in one pipeline (on a cluster: one per master, in parallel). Commands
        that met a moving slot, a lost node or a node without the scripts are sent again
        (after loading the scripts, or a short wait while the client refreshes its slot
        map), a few times: every command here may run twice, the scripts skip what an
        earlier try did."""
        if not commands:
            return []
        replies: list[Any] = [None] * len(commands)
        todo = list(range(len(commands)))
        for attempt in range(_ATTEMPTS):
            pipe = self._redis.pipeline(transaction=False)
            for i in todo:
                pipe.execute_command(*commands[i])
            try:
                got: list[Any] = await pipe.execute(raise_on_error=False)
            except _RETRIED as exc:
                got = [exc] * len(todo)
            for i, reply in zip(todo, got, strict=True):
                replies[i] = reply
            todo = [i for i in todo if isinstance(replies[i], (NoScriptError, *_RETRIED))]
            if not todo or attempt == _ATTEMPTS - 1:
                break
            if any(isinstance(replies[i], NoScriptError) for i in todo):
                await self._load_scripts()
            if any(isinstance(replies[i], _RETRIED) for i in todo):
                self.retried_calls += 1
                await asyncio.sleep(0.05 * (attempt + 1))
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    async def _load_scripts(self) -> None:
        for script in self._scripts.values():
            await self._redis.script_load(script.text)

    def _eval(self, name: str, keys: Sequence[str], *args: Any) -> tuple[Any, ...]:
        return ("EVALSHA", self._scripts[name].sha, len(keys), *keys, *args)

    def _dir_call(self, model: str, op: str, *args: Any) -> tuple[Any, ...]:
        prefix = directory_prefix(model)
        return self._eval("dir", [prefix + name for name in _DIR_KEYS], op, *args)

    # --- models and ranks --------------------------------------------------------------

    async def _search_tags(self, model: str) -> list[str]:
        """Sub-slot tags: on a cluster, tag k's hash slot on the (k mod masters)-th master
        (masters by name), so sub-slots spread evenly; on one node any tags."""
        base = f"s:{escape_token(model)}"
        if not isinstance(self._redis, RedisCluster):
            return [f"{base}:{k}.0" for k in range(self.subslots)]
        await self._redis.initialize()
        manager = self._redis.nodes_manager
        masters = sorted(node.name for node in self._redis.get_primaries())
        tags = []
        for k in range(self.subslots):
            want = masters[k % len(masters)]
            for suffix in range(_MAX_TAG_SEARCH):
                tag = f"{base}:{k}.{suffix}"
                node = manager.get_node_from_slot(key_slot(f"{{{tag}}}".encode()))
                if node.name == want:
                    break
            tags.append(tag)
        return tags

    async def _model(self, model: str) -> _Model | None:
        """The model's tags as its directory has them (None: no such model)."""
        found = self._models.get(model)
        if found is not None:
            return found
        raw = await self._redis.get(directory_prefix(model) + "subslots")
        if raw is None:
            return None
        found = self._models[model] = _Model(model, _text(raw).split("\n"))
        return found

    async def _rank(self, model: str, ref: WorkerRef) -> _Rank:
        rank = self._ranks.get((model, ref))
        if rank is None:
            rank = await self._load_rank(model, ref)
            self._ranks[(model, ref)] = rank
        return rank

    async def _allocate(self, model: str, ref: WorkerRef) -> tuple[int, bool, _Model]:
        """The rank's slot id in the directory (a new one claimed first if the rank is
        new), finishing the model's collection first if one is under way."""
        known = self._models.get(model)
        tags = "\n".join(known.tags if known is not None else await self._search_tags(model))
        version_start = random.getrandbits(62)
        claimed: tuple[int, ...] = ()
        for _ in range(_CLAIMS):
            [reply] = await self._run([self._dir_call(
                model, "rank", ref.worker_id, ref.dp_rank, version_start, tags, *claimed)])
            if reply[0] == b"collecting":
                await self._finish_model_gc(model)
                claimed = ()
                continue
            head, value, tags_raw = reply
            info = _Model(model, tags_raw.decode().split("\n"))
            self._models[model] = info
            if head != b"new":
                return int(head), bool(value), info
            claimed = (await self._claim(model, info, int(value)),)
        raise BackendError(f"no slot id could be taken for a rank of {model}")

    async def _new_id(self, model: str, ref: WorkerRef) -> int:
        """A re-slot's new id: claimed in every sub-slot, then taken in the directory
        (listed in `pending`)."""
        info = await self._model(model)
        if info is None:
            raise BackendError(f"model {model} was collected while a rank was re-slotted")
        claimed: tuple[int, ...] = ()
        for _ in range(_CLAIMS):
            [reply] = await self._run([self._dir_call(model, "newid", ref.worker_id,
                                                      ref.dp_rank, *claimed)])
            if reply[0] != b"new":
                return int(reply[0])
            claimed = (await self._claim(model, info, int(reply[1])),)
        raise BackendError(f"no slot id could be taken for a re-slot in {model}")

    async def _claim(self, model: str, info: _Model, start: int) -> int:
        """The lowest id >= `start` claimed in every sub-slot: each sub-slot's copy of the
        id counter raised past it, before the directory takes it and before anything
        names it. An id the directory takes is then above every copy: a directory
        restored from an older dump cannot give out again an id given out after the dump
        while another master keeps its copies. A claim lost to a concurrent one (a copy
        already past it) is retried above that copy; ids claimed and never taken are
        skipped, never reused."""
        want = start
        for _ in range(_CLAIMS):
            if want > _MAX_SLOT_ID:
                raise BackendError(f"model {model} used every slot id (2^28)")
            claimer = os.urandom(8).hex()
            floors = await self._run([self._eval("claim", [prefix + "nextslot"], want, claimer)
                                      for prefix in info.prefixes])
            passed = [int(floor) for floor in floors if int(floor)]
            if not passed:
                if self.claim_hook is not None:
                    await self.claim_hook(want)
                return want
            want = max(passed)
        raise BackendError(f"no slot id could be claimed in {model}")

    async def _load_rank(self, model: str, ref: WorkerRef) -> _Rank:
        slot, created, info = await self._allocate(model, ref)
        ledger = WorkerLedger(model, ref.worker_id, ref.dp_rank, slot,
                              self.config.ghost_capacity)
        rank = _Rank(ledger, info.subslots)
        if created:
            # The model may be new again (collected by another process meanwhile): its
            # `groups` are written afresh.
            self._groups_written.pop(model, None)
            await self._list_model(model, force=True)
            return rank
        home = info.home(slot)
        commands: list[Sequence[Any]] = [("HGETALL", f"{home}w:{slot}:meta"),
                                         ("GET", f"{home}w:{slot}:log")]
        commands += [("HGET", prefix + "pos", slot) for prefix in info.prefixes]
        meta, log_bytes, *positions = await self._run(commands)
        if meta:
            ledger.epoch, ledger.last_seq = _POSITION.unpack(meta[b"pos"])
            ledger.last_ts = float(meta[b"ts"])
            ledger.counts = [int(meta[f"n{t}".encode()]) for t in range(len(TIERS))]
            ledger.degraded = ledger.warned = meta[b"degraded"] == b"1"
            rank.committed = meta[b"tok"]
            rank.counter = _COUNTER.unpack_from(rank.committed)[0]
            rank.pools_written = _unpack_pool_names(meta.get(b"pools", b""))
        if log_bytes:
            ledger.load_log(log_bytes)
            rank.log_bytes = len(log_bytes)
        rank.positions = [p if p is not None else ABSENT for p in positions]
        expected = _split_positions(meta.get(b"subs", b"") if meta else b"", info.subslots)
        if rank.positions != expected:
            # A call not committed to the ledger (a writer stopped between waves, or a
            # second writer), or a part a failed-over master lost: re-slot.
            await self._begin_reslot(model, ref, rank)
        return rank

    async def _begin_reslot(self, model: str, ref: WorkerRef, rank: _Rank) -> None:
        """A torn rank goes to a new slot id: its whole presence is written under it by
        the next call (from absent), then the directory switches and the old id is
        collected (`_finish_reslot`)."""
        new = await self._new_id(model, ref)
        ledger = rank.ledger
        old = ledger.slot
        log.warning("rank_torn_reslot", model=model, worker=ref.worker_id,
                    dp_rank=ref.dp_rank, old_slot=old, new_slot=new)
        rank.reslot_from = old
        ledger.slot = new
        rank.positions = [ABSENT] * len(rank.positions)
        rank.committed = b""
        rank.counter = 0
        rank.log_bytes = 0
        self.reslots += 1

    async def _finish_reslot(self, model: str, rank: _Rank) -> None:
        old = rank.reslot_from
        assert old is not None
        ledger = rank.ledger
        [status] = await self._run([self._dir_call(model, "switch", ledger.worker_id,
                                                   ledger.dp_rank, old, ledger.slot)])
        if status != b"ok":
            raise BackendError(f"worker {ledger.worker_id}/{ledger.dp_rank} of {model} was "
                               "removed or re-slotted by another process")
        rank.reslot_from = None
        await self._collect_retired(model)

    async def _list_model(self, model: str, *, force: bool = False) -> None:
        if force or model not in self._known_models:
            await self._redis.sadd(MODELS_KEY, model)
            self._known_models.add(model)

    # --- ingest ------------------------------------------------------------------------

    async def apply(
        self, batches: Sequence[EventBatch], *, validated: bool = False
    ) -> list[ApplyOutcome]:
        if not validated:
            for batch in batches:
                validate_batch(batch)
        await self.check_lost_writes()
        async with self._lock:
            await self._require_layout()
            try:
                return await self._apply(batches)
            except RedisError as exc:
                self._suspect = True
                await self._reset_after_failure(exc)
                raise BackendError(f"redis apply failed: {exc}") from exc
            except BaseException:
                self._suspect = True
                self._forget_all()
                raise

    async def _reset_after_failure(self, exc: Exception) -> None:
        """Redis holds the truth: forget the cached ranks (a rank left torn is found so
        and re-slotted when loaded again)."""
        self._forget_all()
        if isinstance(exc, ConnectionError | TimeoutError | OSError) and not self._cluster:
            assert isinstance(self._redis, aioredis.Redis)
            await self._redis.connection_pool.disconnect()

    def _forget_all(self) -> None:
        self._groups_written.clear()
        self._pool_ids.clear()
        self._ranks.clear()
        self._slot_maps.clear()
        self._models.clear()
        self._known_models.clear()
        self._block_sizes.clear()

    async def _apply(self, batches: Sequence[EventBatch]) -> list[ApplyOutcome]:
        outcomes: list[ApplyOutcome] = []
        sinks: dict[tuple[str, WorkerRef], _NetSink] = {}
        changed: set[tuple[str, WorkerRef]] = set()
        block_sizes: dict[str, int] = {}
        pool_ops: list[_PoolOp] = []
        for batch in batches:
            ref = WorkerRef(batch.worker_id, batch.dp_rank)
            rank = await self._rank(batch.model, ref)
            own, pooled = split_pool_events(batch)
            sink = sinks.get((batch.model, ref))
            if sink is None:
                sink = sinks[(batch.model, ref)] = self._start_call(rank)
            outcome = rank.ledger.apply(own, sink, self._stats, self.on_resync)
            outcomes.append(outcome)
            if outcome.applied:
                changed.add((batch.model, ref))
                size = stored_block_size(batch)
                if size is not None:
                    block_sizes[batch.model] = size
                pool_ops += self._pool_ops(batch, rank, pooled,
                                           gap=outcome is ApplyOutcome.APPLIED_AFTER_GAP)
        await self._write_calls(sinks, changed, pool_ops)
        await self._store_block_sizes(block_sizes)
        return outcomes

    def _pool_ops(self, batch: EventBatch, rank: _Rank, events: list[Event], *,
                  gap: bool) -> list[_PoolOp]:
        """A writer's pool ops of one applied batch, as the memory index applies them
        (`apply_pool_writes`): after a gap, a wipe of each pool the rank wrote into since
        its last gap (its lost batches may have evicted from them), then the batch's pool
        events in order. Each op is named by the writer's (epoch, seq) and its index in
        the batch, so the pool's home applies it once."""
        names: list[tuple[bytes, str, bool]] = []
        if gap:
            names = [(b"W", name, False) for name in sorted(rank.pools_written)]
            rank.pools_written.clear()
        ops: list[_PoolOp] = []
        ledger = rank.ledger

        def op(kind: bytes, pool: str, count: int, payload: bytes, create: bool) -> None:
            position = _WRITER_POSITION.pack(ledger.epoch, ledger.last_seq, len(ops))
            ops.append(_PoolOp(batch.model, pool, kind, rank.mapped_slot, position,
                               batch.ts, count, payload, create))

        for kind, name, create in names:
            op(kind, name, 0, b"", create)
        for event in events:
            assert event.pool is not None
            rank.pools_written.add(event.pool)
            if isinstance(event, BlockStored):
                hashes, keys = resolve_pool_store(event, ledger, self._stats)
                pairs = [v for pair in zip(hashes, keys, strict=True) for v in pair]
                op(b"P", event.pool, len(hashes), pack_keys(pairs), True)
            elif isinstance(event, BlockRemoved):
                op(b"R", event.pool, len(event.block_hashes), pack_keys(event.block_hashes),
                   True)
            else:
                op(b"W", event.pool, 0, b"", True)
        return ops

    def _start_call(self, rank: _Rank) -> _NetSink:
        sink = _NetSink()
        rank.ledger.start_journal()
        if rank.reslot_from is not None:
            # From absent under the new id: the whole presence first, every group's.
            ledger = rank.ledger
            for group, held_by in ((0, ledger), *ledger.groups.items()):
                group_sink = sink.group_sink(group)
                for tier in range(len(TIERS)):
                    held = held_by.keys.held_keys(1 << tier)
                    if held:
                        group_sink.set_bits(held, tier)
        return sink

    async def _write_calls(self, sinks: Mapping[tuple[str, WorkerRef], _NetSink],
                           changed: set[tuple[str, WorkerRef]] | None,
                           pool_ops: Sequence[_PoolOp] = ()) -> None:
        """The calls' pool ops, then waves 1-3 for each rank the call changed (`changed`;
        None: every rank of `sinks`) or that is being re-slotted, then the re-slots'
        switches. Pool ops go first: a batch whose ledger is committed (wave 3) is never
        redelivered, so its pool ops must be in by then."""
        calls = [(self._ranks[key], sink) for key, sink in sinks.items()
                 if changed is None or key in changed
                 or self._ranks[key].reslot_from is not None]
        try:
            if pool_ops:
                await self._pool_writes(pool_ops)
            if calls:
                await self._write_group_specs(calls)
                await self._waves(calls)
        finally:
            for key in sinks:
                rank = self._ranks.get(key)
                if rank is not None:
                    rank.ledger.end_journal()
        for rank, _ in calls:
            if rank.reslot_from is not None:
                await self._finish_reslot(rank.ledger.model, rank)

    # --- shared storage pools ------------------------------------------------------------
    #
    # A pool is mapped in the directory as a rank with dp rank -1 (its slot id is never
    # reused, as a rank's). Its state lives in its home sub-slot (`id mod S`): `q:<id>:map`,
    # `gone`, `st`, `w` (each writer's last op there), `w:<id>:meta` (its listing), and one
    # pending list per sub-slot, `q:<id>:l:<k>`. lua/subslot_pool.lua decides every op
    # there, one call at a time whichever process sends it, and appends the presence
    # changes it makes, numbered, to the lists; lua/subslot_pool_apply.lua applies a
    # list's entries in its sub-slot in number order, each once. Whoever sends a pool op
    # drains every list it reads (its own entries and any a stopped writer left), then
    # trims what every sub-slot applied.

    def _pool_keys(self, info: _Model, pool_id: int) -> list[str]:
        home = info.home(pool_id)
        q = f"{home}q:{pool_id}:"
        return [q + "map", q + "gone", q + "st", q + "w", f"{home}w:{pool_id}:meta",
                home + "pos", *[f"{q}l:{k}" for k in range(info.subslots)]]

    async def _pool_id(self, model: str, pool: str, *, create: bool) -> int | None:
        """The pool's slot id (a new one if `create` and it has none; else None)."""
        found = self._pool_ids.get((model, pool))
        if found is not None:
            return found
        raw = await self._redis.hget(directory_prefix(model) + "slots", f"{pool}\n{POOL_RANK}")
        if raw is not None:
            found = int(raw)
        elif not create:
            return None
        else:
            found, created, _ = await self._allocate(model, WorkerRef(pool, POOL_RANK))
            if created:
                await self._list_model(model, force=True)
        self._pool_ids[(model, pool)] = found
        return found

    async def _pool_writes(self, ops: Sequence[_PoolOp]) -> None:
        """Decide the ops in each pool's home (in order), then apply every pending
        presence change of those pools in the sub-slots, then trim what was applied."""
        by_pool: dict[tuple[str, str], list[_PoolOp]] = {}
        for op in ops:
            by_pool.setdefault((op.model, op.pool), []).append(op)
        for model in {model for model, _ in by_pool}:
            if await self._model(model) is None:
                raise BackendError(f"model {model} was collected while its pools were written")
        pending: dict[tuple[str, int, str], list[Any]] = {}
        todo = list(by_pool.items())
        for _ in range(_POOL_ATTEMPTS):
            sent = []
            for (model, pool), pool_ops in todo:
                pool_id = await self._pool_id(model, pool,
                                              create=any(op.create for op in pool_ops))
                if pool_id is not None:
                    sent.append(((model, pool), pool_ops, pool_id))
            floors, applied = await self._pool_floors_and_applied(
                [(model, pool_id) for (model, _), _, pool_id in sent])
            replies = await self._run([
                self._pool_call(model, (pool_id, pool), floors[model], "ops",
                                [applied[(model, pool_id)], *[op.packed() for op in pool_ops]])
                for (model, pool), pool_ops, pool_id in sent])
            todo = []
            for (key, pool_ops, pool_id), reply in zip(sent, replies, strict=True):
                if reply == b"dead":
                    await self._pool_gone(key[0], key[1], pool_id)
                    todo.append((key, pool_ops))
                elif reply == b"diverged":
                    self._pool_ids.pop(key, None)
                    await self._reslot_pool(key[0], key[1], pool_id)
                    todo.append((key, pool_ops))
                else:
                    pending[(key[0], pool_id, key[1])] = reply
                    self._confirm_pool((key[0], pool_id, key[1]), int(reply[0]), [])
            if not todo:
                break
        else:
            raise BackendError(f"pools {[pool for (_, pool), _ in todo]} were removed while "
                               "written, again and again")
        if self.pool_hook is not None:
            await self.pool_hook()
        await self._drain_pools(pending)

    async def _pool_floors_and_applied(
        self, pools: Sequence[tuple[str, int]]
    ) -> tuple[dict[str, bytes | None], dict[tuple[str, int], int]]:
        """In one pipeline: each model's pool floor, and per pool the highest number any of
        its sub-slots has applied (its home, deciding, checks it has not lost them)."""
        models = sorted({model for model, _ in pools})
        commands: list[Sequence[Any]] = [("GET", directory_prefix(model) + "pool_floor")
                                         for model in models]
        for model, pool_id in pools:
            commands += [("HGET", prefix + "pos", f"q{pool_id}")
                         for prefix in self._models[model].prefixes]
        replies = iter(await self._run(commands))
        floors = {model: next(replies) for model in models}
        applied = {}
        for model, pool_id in pools:
            numbers = [next(replies) for _ in self._models[model].prefixes]
            applied[(model, pool_id)] = max(
                (int(float(n)) for n in numbers if n is not None and n != b"x"), default=0)
        return floors, applied

    async def _pool_gone(self, model: str, pool: str, pool_id: int) -> None:
        """The pool's home answered `dead`: removed meanwhile (written again under a new
        id), or a re-slot of it was stopped before the directory switched (finished here:
        the directory still maps the dead id)."""
        self._pool_ids.pop((model, pool), None)
        raw = await self._redis.hget(directory_prefix(model) + "slots", f"{pool}\n{POOL_RANK}")
        if raw is not None and int(raw) == pool_id:
            await self._reslot_pool(model, pool, pool_id, dead=True)

    def _pool_call(self, model: str, pool: tuple[int, str], floor: bytes | None, mode: str,
                   args: Sequence[bytes | int]) -> tuple[Any, ...]:
        pool_id, name = pool
        return self._eval("pool", self._pool_keys(self._models[model], pool_id), pool_id,
                          name, floor or b"0", mode, *args)

    async def _drain_pools(self, pending: Mapping[tuple[str, int, str], list[Any]], *,
                           reslot: bool = True) -> None:
        """Apply pools' pending lists (the home's reply: its op counter, then a list per
        sub-slot) in their sub-slots, then trim each list by what its sub-slot has
        applied. A pool whose sub-slots and home disagree (a sub-slot missing entries it
        had applied, or past the home's current counter: a failover lost writes on one
        side) is re-slotted, unless `reslot` is False (the drain of a re-slot's own new
        id, not switched yet: its lists stay untrimmed, and the next write or drain of
        the pool finds the disagreement again, once the directory maps the new id)."""
        # a reply not a list: the pool's home answered `dead` (a concurrent collection)
        targets = [(key, k, entries) for key, reply in pending.items()
                   if isinstance(reply, list) for k, entries in enumerate(reply[1:]) if entries]
        applied = await self._run([
            self._eval("pool_apply", [self._models[model].prefixes[k] + "blk",
                                      self._models[model].prefixes[k] + "pos"],
                       pool_id, *entries)
            for (model, pool_id, _), k, entries in targets])
        done: dict[tuple[str, int, str], list[int]] = {}
        diverged: set[tuple[str, int, str]] = set()
        for (key, k, _), reply in zip(targets, applied, strict=True):
            if reply == b"dead":
                continue  # being collected: the collection names these keys
            if reply == b"gap":
                diverged.add(key)
                continue
            numbers = done.setdefault(key, [0] * self._models[key[0]].subslots)
            numbers[k] = int(float(reply))
        for key, numbers in done.items():
            self._confirm_pool(key, 0, numbers)
        trims = [key for key in done if key not in diverged]
        replies = await self._run([self._pool_call(key[0], (key[1], ""), None, "trim",
                                                   done[key]) for key in trims])
        behind = {key for key, reply in zip(trims, replies, strict=True)
                  if reply == b"diverged"}  # the home is behind a sub-slot
        if not reslot:
            return
        for model, pool_id, name in sorted(diverged | behind):
            await self._reslot_pool(model, name, pool_id)

    def _confirm_pool(self, key: tuple[str, int, str], seq: int, applied: list[int]) -> None:
        """Redis confirmed the pool's home at op counter `seq` and its sub-slots at least
        at the numbers `applied` (for `check_lost_writes`)."""
        was_seq, was_applied = self._pool_confirmed.get(key, (0, []))
        if len(applied) < len(was_applied):
            applied = applied + [0] * (len(was_applied) - len(applied))
        self._pool_confirmed[key] = (max(seq, was_seq), [
            max(n, was_applied[k] if k < len(was_applied) else 0)
            for k, n in enumerate(applied)])

    async def _reslot_pool(self, model: str, pool: str, old: int, *,
                           dead: bool = False) -> None:
        """Move a pool whose presence in some sub-slot no longer follows its home (a
        failover lost writes on one side) to a new id, as a torn rank is: the old id is
        marked collected everywhere (no op or entry lands on it any more), the new id's
        home starts wiped (no presence; the writers' positions kept, the epoch moved, the
        floor at `_reslot_floor`: whatever the lost ops were, no store they would have
        refused is taken), the directory switches, and the old id is collected. Entries
        of the old id stay, credited to nobody (ids are never reused).
        One re-slot per old id: its new id is set once, with the old home's `x` mark
        (`_mark_reslot`); whoever meets the old id dead resumes that re-slot, and each
        step is idempotent. `dead`: the old id was found dead without a re-slot mark
        while the directory maps it (a re-slot stopped by an older version): one is
        started. Returns with the directory switched, or (another process switched or
        removed the pool) for the caller to read it again."""
        info = self._models[model]
        marked = await self._mark_reslot(model, pool, old, dead=dead)
        if marked is None:
            await self._collect_retired(model)  # an id taken for it and abandoned
            return
        new, marked_here = marked
        if self.reslot_hook is not None:
            await self.reslot_hook()
        log.warning("pool_diverged_reslot", model=model, pool=pool, old_slot=old,
                    new_slot=new)
        await self._run([("HSET", prefix + "pos", f"q{old}", "x") for prefix in info.prefixes])
        st, writers = await self._run([("HGETALL", key)
                                       for key in self._pool_keys(info, old)[2:4]])
        state = [{}, {}, _reslot_state(st, await self._reslot_floor(model, st)), writers]
        counts = [len(found) for found in state]
        items = [v for found in state for pair in found.items() for v in pair]
        [reply] = await self._run([self._pool_call(model, (new, pool), None, "build",
                                                   [*counts, *items])])
        await self._drain_pools({(model, new, pool): reply}, reslot=False)
        [status] = await self._run([self._dir_call(model, "switch", pool, POOL_RANK, old,
                                                   new)])
        if status == b"ok":
            self._pool_ids[(model, pool)] = new
            self.pool_reslots += 1
        elif dead and marked_here:  # a mark this call set on an old id already collected
            await self._redis.delete(self._pool_keys(info, old)[2])
        # else: switched by another process, or the pool removed; the new id (the old
        # home's reslot_to, never abandoned here) is retired by the pool's next switch
        # or removal, as any id pending for it
        await self._collect_retired(model)

    async def _mark_reslot(self, model: str, pool: str, old: int, *,
                           dead: bool) -> tuple[int, bool] | None:
        """The old id's re-slot (its new id, and whether this call marked it): the one
        already marked in its home, else one marked now under a new id taken for it (an
        id taken and not used, a concurrent mark having won, is abandoned). None: the old
        id is dead with no re-slot (removed, or re-slotted and collected)."""
        asked = await self._run([self._pool_call(model, (old, pool), None, "mark", [b"", 0])])
        reply = asked[0]
        if isinstance(reply, list):
            return int(reply[0]), False
        if reply == b"gone" and not dead:
            return None
        new = await self._new_id(model, WorkerRef(pool, POOL_RANK))
        [reply] = await self._run([self._pool_call(model, (old, pool), None, "mark",
                                                   [new, int(dead)])])
        if not isinstance(reply, list) or int(reply[0]) != new:
            await self._run([self._dir_call(model, "abandon", pool, POOL_RANK, new)])
        if not isinstance(reply, list):
            return None
        return int(reply[0]), int(reply[0]) == new

    async def _reslot_floor(self, model: str, st: Mapping[bytes, bytes]) -> float:
        """The floor of a re-slot's new id: no store older than an op its old home may
        have lost is taken. Batch times are not monotone per writer, so the newest of
        this process's clock, the times the old home knows and the model's ranks' last
        batch times (writers' clocks are assumed close to each other)."""
        info = self._models[model]
        slots = await self._redis.hgetall(info.dir + "slots")
        ids = [int(slot) for ref, slot in slots.items()
               if not _text(ref).endswith(f"\n{POOL_RANK}")]
        stamps = await self._run([("HGET", f"{info.home(slot)}w:{slot}:meta", "ts")
                                  for slot in ids]) if ids else []
        known = [float(st[f]) for f in (b"floor", b"gone_max", b"ts") if f in st]
        return max([time.time(), *known, *(float(ts) for ts in stamps if ts is not None)])

    async def _write_group_specs(self, calls: list[tuple[_Rank, _NetSink]]) -> None:
        """List every KV-cache group the calls write (and the specs they learned) in the
        directory's `groups` before any presence of theirs, so collection and model GC
        name every group hash. Each spec is merged (hybrid.merged_spec: the stricter
        stays); a bare group > 0 only lists."""
        commands = []
        for rank, sink in calls:
            model = rank.ledger.model
            written = self._groups_written.setdefault(model, {})
            specs = {group: (None, 0) for group in sink.groups} | sink.learned
            for group, spec in specs.items():
                merged = merged_spec(group, written.get(group), spec)
                if written.get(group) == merged:
                    continue  # nothing Redis lacks, as far as this process wrote
                commands.append(group_spec_command(directory_prefix(model) + "groups",
                                                   group, spec))
                written[group] = merged
        await self._run(commands)

    async def _waves(self, calls: list[tuple[_Rank, _NetSink]]) -> None:
        """Clears, then sets, then the ledgers: each wave one pipeline (per master),
        started after every reply of the one before."""
        tokens = [_COUNTER.pack(rank.counter + 1) + self._nonce for rank, _ in calls]
        parts = [part for (rank, sink), token in zip(calls, tokens, strict=True)
                 for part in self._parts(rank, sink, token)]
        await self._wave(1, [p for p in parts if p.has_clears])
        if self.wave_hook is not None:
            await self.wave_hook(1)
        await self._wave(2, parts)
        if self.wave_hook is not None:
            await self.wave_hook(2)
        for part in parts:
            part.rank.positions[part.subslot] = part.token + b"d"
        statuses = await self._run([self._ledger_call(rank, token)
                                    for (rank, _), token in zip(calls, tokens, strict=True)])
        for (rank, _), token, status in zip(calls, tokens, statuses, strict=True):
            if status == b"conflict":
                self._conflict(rank, "its ledger")
            rank.committed = token
            rank.counter += 1
            ledger = rank.ledger
            self._confirmed[(ledger.model, WorkerRef(ledger.worker_id, ledger.dp_rank))] = (
                ledger.slot, token, list(rank.positions))

    @staticmethod
    def _parts(rank: _Rank, sink: _NetSink, token: bytes) -> list[_Part]:
        """The rank's net change, one part per sub-slot it changes."""
        subslots = len(rank.positions)
        entries: list[list[bytes]] = [[] for _ in range(subslots)]
        clears = [False] * subslots
        groups: list[set[int]] = [set() for _ in range(subslots)]
        pack = _ENTRY.pack
        for group, changes in sink.by_group():
            for key, (clear, set_) in changes.items():
                k = key % subslots
                entries[k].append(pack(key, group, clear, set_))
                if clear:
                    clears[k] = True
                if group:
                    groups[k].add(group)
        slot = rank.ledger.slot
        return [_Part(rank, k, token, has_clears=clears[k],
                      packed=_PART_HEADER.pack(slot, rank.positions[k], token)
                      + b"".join(entries[k]), groups=groups[k])
                for k in range(subslots) if entries[k]]

    async def _wave(self, wave: int, parts: list[_Part]) -> None:
        """One script call per (model, sub-slot) with that sub-slot's parts, pipelined."""
        by_target: dict[tuple[str, int], list[_Part]] = {}
        for part in parts:
            by_target.setdefault((part.rank.ledger.model, part.subslot), []).append(part)
        targets = list(by_target.items())
        commands = []
        for (model, k), target_parts in targets:
            prefix = self._models[model].prefixes[k]
            groups = sorted(set().union(*(part.groups for part in target_parts)))
            keys = [prefix + "blk", prefix + "pos",
                    *[f"{prefix}p:{part.rank.ledger.slot}" for part in target_parts],
                    *[prefix + group_hash(group) for group in groups]]
            commands.append(self._eval("part", keys, str(wave),
                                       *[part.packed for part in target_parts]))
        replies = await self._run(commands)
        for (_, target_parts), reply in zip(targets, replies, strict=True):
            for part, status in zip(target_parts, reply, strict=True):
                if status == b"conflict":
                    self._conflict(part.rank, f"a sub-slot (wave {wave})")

    def _conflict(self, rank: _Rank, where: str) -> None:
        ledger = rank.ledger
        log.warning("subslot_conflict", model=ledger.model, worker=ledger.worker_id,
                    dp_rank=ledger.dp_rank, where=where)
        raise BackendError(f"worker {ledger.worker_id}/{ledger.dp_rank} of {ledger.model} "
                           f"was written by another process ({where})")

    def _ledger_call(self, rank: _Rank, token: bytes) -> tuple[Any, ...]:
        ledger = rank.ledger
        info = self._models[ledger.model]
        home = info.home(ledger.slot)
        segment, replace = self._log_segment(rank)
        return self._eval(
            "ledger", [f"{home}w:{ledger.slot}:meta", f"{home}w:{ledger.slot}:log"],
            rank.committed, token, _POSITION.pack(ledger.epoch, ledger.last_seq),
            repr(ledger.last_ts), *ledger.counts, "1" if ledger.degraded else "0",
            ledger.worker_id, ledger.dp_rank, segment, "1" if replace else "0",
            b"".join(rank.positions), _pack_pool_names(rank.pools_written))

    def _log_segment(self, rank: _Rank) -> tuple[bytes, bool]:
        """What to append to the rank's log, or the whole log (True) after a reset, a
        re-slot or when the log grew past twice its live size."""
        ledger = rank.ledger
        journal = ledger.journal
        assert journal is not None
        if not journal.reset and rank.committed:
            segment = _changes(ledger, journal)
            size = rank.log_bytes + len(segment)
            live = LOG_MAP.size * len(ledger.keys) + LOG_HASH.size * (len(ledger.ghosts) + 1)
            if size <= max(self.log_compact_min_bytes, 2 * live):
                rank.log_bytes = size
                return segment, False
        snapshot = ledger.to_log()
        rank.log_bytes = len(snapshot)
        return snapshot, True

    async def _store_block_sizes(self, sizes: dict[str, int]) -> None:
        new = {m: s for m, s in sizes.items() if self._block_sizes.get(m) != s}
        if new:
            await self._run([("SET", directory_prefix(m) + "block_size", s)
                             for m, s in new.items()])
            self._block_sizes.update(new)

    # --- administration ----------------------------------------------------------------

    async def clear_worker(self, model: str, worker_id: str, dp_rank: int | None = None) -> int:
        async with self._lock:
            try:
                refs = await self._refs(model, worker_id, dp_rank)
                sinks: dict[tuple[str, WorkerRef], _NetSink] = {}
                for ref in refs:
                    rank = await self._rank(model, ref)
                    sink = sinks[(model, ref)] = self._start_call(rank)
                    rank.ledger.clear(sink)
                await self._write_calls(sinks, None)
                return len(refs)
            except RedisError as exc:
                await self._reset_after_failure(exc)
                raise BackendError(f"redis clear failed: {exc}") from exc
            except BaseException:
                self._forget_all()
                raise

    async def _refs(self, model: str, worker_id: str, dp_rank: int | None) -> list[WorkerRef]:
        slot_map = await self._slot_map(model, fresh=True)
        if slot_map is None:
            return []
        return [ref for ref in slot_map.by_slot.values()
                if ref.worker_id == worker_id and ref.dp_rank != POOL_RANK
                and (dp_rank is None or ref.dp_rank == dp_rank)]

    async def remove_worker(self, model: str, worker_id: str) -> int:
        async with self._lock:
            try:
                refs = await self._refs(model, worker_id, None)
                await self._remove_refs(model, refs)
                return len(refs)
            except RedisError as exc:
                await self._reset_after_failure(exc)
                raise BackendError(f"redis remove_worker failed: {exc}") from exc

    async def _remove_refs(self, model: str, refs: Sequence[WorkerRef]) -> None:
        """Unmap and retire each rank (directory first), collect its id, then the model
        if it has no rank left."""
        for ref in refs:
            self._ranks.pop((model, ref), None)
            [slot] = await self._run([self._dir_call(model, "remove", ref.worker_id,
                                                     ref.dp_rank)])
            if slot is not None:
                self._confirmed[(model, ref)] = (int(slot), None, [])
        if refs:  # the retired ids are collected, then the model if it has no rank
            await self._collect_model(model)

    async def remove_pool(self, model: str, pool: str) -> bool:
        """Forget a pool: unmapped and retired in the directory, then collected like a
        retired rank (its holder entries named by its map and pending lists), then the
        model if nothing is left of it."""
        async with self._lock:
            try:
                self._pool_ids.pop((model, pool), None)
                [slot] = await self._run([self._dir_call(model, "remove", pool, POOL_RANK)])
                if slot is None:
                    return False
                await self._collect_model(model)
                return True
            except RedisError as exc:
                await self._reset_after_failure(exc)
                raise BackendError(f"redis remove_pool failed: {exc}") from exc

    async def _collect(self, model: str, slot: int, *, pool: bool = False) -> None:
        """Remove a retired id's entries from every sub-slot (the keys its ledger log
        names, plus its last parts' `p:<id>`; a pool's: the keys its map and pending
        lists name), then its ledger and meta (a pool's state), then its `retired`
        entry. Idempotent: whoever finds it retired may finish it. A writer still holding
        the id conflicts once its positions are gone; a pool's are marked collected
        first (`q<id>` 'x' in every sub-slot's `pos`), so no pool op or pending entry
        lands after its keys were read."""
        info = await self._model(model)
        if info is None:
            return
        home = info.home(slot)
        raw, group_names = await self._run([("GET", f"{home}w:{slot}:log"),
                                            ("HKEYS", info.dir + "groups")])
        keys = []
        if raw:
            ledger = WorkerLedger(model, "", 0, slot, self.config.ghost_capacity)
            ledger.load_log(raw)
            keys = _held_keys(ledger)
        pool_keys: list[str] = []
        if pool:
            pool_keys = self._pool_keys(info, slot)
            await self._run([("HSET", prefix + "pos", f"q{slot}", "x")
                             for prefix in info.prefixes])
            keys = sorted({*keys, *await self._pool_held(pool_keys, info.subslots)})
        hashes = [group_hash(group) for group in sorted({0, *map(int, group_names)})]
        commands = [self._eval("collect", [prefix + "pos", f"{prefix}p:{slot}",
                                           *[prefix + name for name in hashes]],
                               slot, pack_keys(part))
                    for prefix, part in zip(info.prefixes, _by_subslot(keys, info.subslots),
                                            strict=True)]
        await self._run(commands)
        await self._run([("DEL", f"{home}w:{slot}:meta", f"{home}w:{slot}:log",
                          *[key for key in pool_keys if not key.endswith(":pos")])])
        await self._run([self._dir_call(model, "collected", slot)])

    async def _pool_held(self, pool_keys: list[str], subslots: int) -> list[int]:
        """Every key a pool's entries may be on: its map's, and its pending lists'."""
        map_values, *lists = await self._run([("HVALS", pool_keys[0]),
                                              *[("LRANGE", key, 0, -1)
                                                for key in pool_keys[-subslots:]]])
        keys = {int.from_bytes(value[:8], "little") for value in map_values}
        for entries in lists:
            for entry in entries:
                body = entry[17:]  # after the entry's numbers and kind
                keys.update(int.from_bytes(body[i : i + 8], "little")
                            for i in range(0, len(body), 8))
        return sorted(keys)

    async def _collect_retired(self, model: str) -> None:
        """Collect every retired id of the model (not the pending ones: a re-slot may be
        writing them; the rank's next re-slot or removal retires them)."""
        retired, mapped = await self._run([("HGETALL", directory_prefix(model) + "retired"),
                                           ("HVALS", directory_prefix(model) + "slots")])
        live = {int(slot) for slot in mapped}  # never collect an id the directory maps
        for raw, ref in sorted((int(r), _text(ref)) for r, ref in retired.items()):
            if raw not in live:
                await self._collect(model, raw, pool=ref.endswith(f"\n{POOL_RANK}"))

    async def _collect_model(self, model: str) -> bool:
        """Collect a model without ranks: its retired ids, then (directory `collecting`)
        its sub-slots' keys, its directory, its listing. True if it went."""
        await self._collect_retired(model)
        [tags] = await self._run([self._dir_call(model, "gc")])
        if tags is None:
            return False
        await self._finish_model_gc(model, tags.decode().split("\n"))
        return True

    async def _finish_model_gc(self, model: str, tags: list[str] | None = None) -> None:
        if tags is None:
            raw = await self._redis.get(directory_prefix(model) + "subslots")
            tags = _text(raw).split("\n") if raw else []
        info = _Model(model, tags)
        if info.prefixes:
            # Empty once every id is collected; UNLINK frees what is left off the
            # main thread.
            groups = await self._redis.hkeys(info.dir + "groups")
            names = ["pos", *[group_hash(g) for g in sorted({0, *map(int, groups)})]]
            await self._run([("UNLINK", *[prefix + name for name in names])
                             for prefix in info.prefixes])
        await self._run([self._dir_call(model, "drop")])
        await self._redis.srem(MODELS_KEY, model)
        # A rank created meanwhile lists the model again after it exists (_load_rank).
        if await self._redis.hlen(directory_prefix(model) + "slots"):
            await self._redis.sadd(MODELS_KEY, model)
        for cache in (self._models, self._slot_maps, self._block_sizes, self._groups_written):
            cache.pop(model, None)
        self._known_models.discard(model)
        for key in [key for key in self._ranks if key[0] == model]:
            del self._ranks[key]
        for key in [key for key in self._confirmed if key[0] == model]:
            del self._confirmed[key]
        for confirmed in [key for key in self._pool_confirmed if key[0] == model]:
            del self._pool_confirmed[confirmed]
        for pool_key in [pool_key for pool_key in self._pool_ids if pool_key[0] == model]:
            del self._pool_ids[pool_key]
        log.info("subslot_model_collected", model=model)

    async def drop_empty_models(self) -> list[str]:
        async with self._lock:
            try:
                dropped = []
                for model in await self._listed_models():
                    if await self._collect_model(model):
                        dropped.append(model)
                return dropped
            except RedisError as exc:
                raise BackendError(f"redis drop_empty_models failed: {exc}") from exc

    async def _listed_models(self) -> list[str]:
        return sorted(_text(m) for m in await self._redis.smembers(MODELS_KEY))

    async def workers(self, model: str | None = None) -> list[WorkerInfo]:
        try:
            models = [model] if model else await self._listed_models()
            infos: list[WorkerInfo] = []
            for name in models:
                infos.extend(await self._model_workers(name))
        except RedisError as exc:
            raise BackendError(f"redis workers failed: {exc}") from exc
        infos.sort(key=lambda w: (w.model, w.worker_id, w.dp_rank))
        return infos

    async def _model_workers(self, model: str) -> list[WorkerInfo]:
        info = await self._model(model)
        if info is None:
            return []
        slots = await self._redis.hgetall(directory_prefix(model) + "slots")
        entries = list(slots.items())
        metas = await self._run([("HMGET", f"{info.home(int(s))}w:{int(s)}:meta",
                                  *_META_FIELDS) for _, s in entries])
        reply: list[Any] = [len(entries)]
        for (ref_raw, slot_raw), meta in zip(entries, metas, strict=True):
            reply += [ref_raw, slot_raw, *meta]
        infos = _worker_infos(model, reply)
        # A rank the directory maps without a ledger: being created, or its directory's
        # master restored from a dump taken before the rank was removed or re-slotted
        # (its ledger, on another master, stays gone while the restored sub-slot holds
        # its old entries). Listed with nothing counted, so a partition's rebuild (and
        # liveness) removes it rather than leave those entries credited.
        for (ref_raw, _), meta in zip(entries, metas, strict=True):
            worker_id, _, rank = _text(ref_raw).rpartition("\n")
            if meta[0] is None and int(rank) != POOL_RANK:
                infos.append(WorkerInfo(model, worker_id, int(rank), 0, -1, False, {}, 0.0))
        return infos

    async def stats(self) -> IndexStats:
        return self._stats.snapshot(
            sum(1 for w in await self.workers() if w.dp_rank != POOL_RANK
                and w.kind != KIND_POOL))

    async def export_ranks(self, ranks: Sequence[tuple[str, WorkerRef]]) -> list[RankState]:
        """The ranks' states; a ref the directory does not map as a rank (a pool, listed by
        `workers()` under dp rank 0, or a rank removed meanwhile) is left out, as the
        memory index leaves out what it has no ledger of: exporting never creates one."""
        await self._require_layout()
        async with self._lock:
            try:
                mapped: dict[str, set[WorkerRef]] = {}
                for model in {model for model, _ in ranks}:
                    slot_map = await self._slot_map(model, fresh=True)
                    mapped[model] = set(slot_map.by_slot.values()) if slot_map else set()
                specs = {model: await stored_group_specs(self._redis,
                                                         directory_prefix(model) + "groups")
                         for model in mapped}
                return [with_specs((await self._rank(model, ref)).ledger.export(), specs[model])
                        for model, ref in ranks
                        if ref in mapped[model] and ref.dp_rank != POOL_RANK]
            except RedisError as exc:
                raise BackendError(f"redis export failed: {exc}") from exc

    async def import_ranks(self, states: Sequence[RankState]) -> None:
        async with self._lock:
            await self._require_layout()
            try:
                sinks: dict[tuple[str, WorkerRef], _NetSink] = {}
                for state in states:
                    ref = WorkerRef(state.worker_id, state.dp_rank)
                    rank = await self._rank(state.model, ref)
                    sink = sinks.get((state.model, ref))
                    if sink is None:
                        sink = sinks[(state.model, ref)] = self._start_call(rank)
                    rank.ledger.restore(state, sink)
                    learn_specs(state, sink.learn_group,
                                hybrid_on_gpu=rank.ledger.hybrid_on_gpu)
                await self._write_calls(sinks, None)
                await self._raise_pool_floors(states)
            except RedisError as exc:
                await self._reset_after_failure(exc)
                raise BackendError(f"redis import failed: {exc}") from exc
            except BaseException:
                self._forget_all()
                raise

    async def _raise_pool_floors(self, states: Sequence[RankState]) -> None:
        """Imported snapshots cover pool writes (evictions among them) that will not be
        replayed: no pool takes a write older than the newest imported rank's last batch.
        The directory's `pool_floor` first (a pool created later starts from it: it reads
        the floor after its id is mapped), then every pool mapped by then, in its home."""
        floors: dict[str, float] = {}
        for state in states:
            floors[state.model] = max(floors.get(state.model, 0.0), state.last_ts)
        for model, floor in floors.items():
            await self._run([("EVAL", _RAISE_FLOOR, 1, directory_prefix(model) + "pool_floor",
                              repr(floor))])
            info = await self._model(model)
            slots = await self._redis.hgetall(directory_prefix(model) + "slots")
            pools = [(_text(ref).rpartition("\n")[0], int(slot)) for ref, slot in slots.items()
                     if _text(ref).endswith(f"\n{POOL_RANK}")]
            if info is None or not pools:
                continue
            replies = await self._run([self._eval("pool", self._pool_keys(info, pool_id),
                                                  pool_id, name, repr(floor), "ops", 0)
                                       for name, pool_id in pools])
            await self._drain_pools({(model, pool_id, name): reply
                                     for (name, pool_id), reply in zip(pools, replies,
                                                                       strict=True)
                                     if reply != b"dead"})

    async def reset_caches(self) -> None:
        async with self._lock:
            self._forget_all()

    async def ping(self) -> None:
        """Redis answers (every master of a cluster), holds no single-slot model, and a
        failover seen meanwhile has had its lost-writes check."""
        try:
            if isinstance(self._redis, RedisCluster):
                await self._redis.ping(target_nodes=RedisCluster.PRIMARIES)
            else:
                await self._redis.ping()
            await self._check_layout()
        except RedisError as exc:
            self._suspect = True
            raise BackendError(f"redis ping failed: {exc}") from exc
        await self.check_lost_writes()

    # --- failovers (Redis Cluster) -----------------------------------------------------

    def master_names(self) -> frozenset[str]:
        """The cluster's masters (host:port) as the client last learned them; none on
        one node."""
        if not isinstance(self._redis, RedisCluster):
            return frozenset()
        return frozenset(node.name for node in self._redis.get_primaries())

    async def check_lost_writes(self) -> int:
        """If the masters changed (a failover) or a call failed since the last check:
        each rank whose writes Redis confirmed to this process but no longer holds
        (replication is asynchronous: a promoted replica may lack a master's last
        writes) is cleared and asked for a resync, and a rank this process removed that
        came back is removed again. Returns how many; BackendError while the cluster
        cannot say."""
        if not isinstance(self._redis, RedisCluster):
            return 0
        if self.master_names() == self._masters and not self._suspect:
            return 0
        async with self._checking:
            masters = self.master_names()
            if masters == self._masters and not self._suspect:
                return 0
            try:
                behind = await self._ranks_behind()
                for (model, ref), removed in behind:
                    await self._repair(model, ref, removed=removed)
                pools = await self._pools_behind()
                for (model, pool_id, pool), lost_ops in pools:
                    await self._repair_pool(model, pool, pool_id, lost_ops=lost_ops)
            except RedisError as exc:
                raise BackendError(f"redis lost-writes check failed: {exc}") from exc
            self._masters = masters
            self._suspect = False
            return len(behind) + len(pools)

    async def _pools_behind(self) -> list[tuple[tuple[str, int, str], bool]]:
        """The confirmed pools Redis holds behind what it confirmed (True: the home's op
        counter is behind, it lost ops; False: a sub-slot lost entries it had applied;
        either way re-slotted). A pool the directory maps to another id, or whose id is being
        re-slotted or collected, is no longer followed."""
        items = list(self._pool_confirmed.items())
        commands: list[Sequence[Any]] = []
        read = []
        for key, confirmed in items:
            model, pool_id, pool = key
            info = await self._model(model)
            if info is None:
                del self._pool_confirmed[key]
                continue
            read.append((key, confirmed, info))
            commands += [("HGET", info.dir + "slots", f"{pool}\n{POOL_RANK}"),
                         ("HGET", self._pool_keys(info, pool_id)[2], "seq")]
            commands += [("HGET", prefix + "pos", f"q{pool_id}") for prefix in info.prefixes]
        replies = iter(await self._run(commands)) if commands else iter([])
        behind: list[tuple[tuple[str, int, str], bool]] = []
        for key, (seq, applied), info in read:
            mapped, home_seq = next(replies), next(replies)
            numbers = [next(replies) for _ in info.prefixes]
            if mapped is None or int(mapped) != key[1] or b"x" in numbers:
                del self._pool_confirmed[key]
            elif int(home_seq or 0) < seq:
                behind.append((key, True))
            elif any(int(float(now or 0)) < was
                     for now, was in zip(numbers, applied, strict=False)):
                behind.append((key, False))
        return behind

    async def _repair_pool(self, model: str, pool: str, pool_id: int, *,
                           lost_ops: bool) -> None:
        log.warning(LOST_WRITES_REASON, model=model, pool=pool, slot=pool_id,
                    lost_ops=lost_ops)
        self.lost_write_repairs += 1
        self._pool_confirmed.pop((model, pool_id, pool), None)
        async with self._lock:
            self._forget_all()
            if await self._model(model) is not None:
                await self._reslot_pool(model, pool, pool_id)

    async def _ranks_behind(self) -> list[tuple[tuple[str, WorkerRef], bool]]:
        """The confirmed ranks Redis holds behind what it confirmed (True: removed by
        this process and mapped again). Slot ids only grow, so a rank at a newer id was
        re-slotted or created again by another owner: its record is dropped."""
        items = list(self._confirmed.items())
        if not items:
            return []
        stored = await self._run([("HGET", directory_prefix(model) + "slots",
                                   f"{ref.worker_id}\n{ref.dp_rank}")
                                  for (model, ref), _ in items])
        behind: list[tuple[tuple[str, WorkerRef], bool]] = []
        same: list[tuple[tuple[str, WorkerRef], int, bytes, list[bytes]]] = []
        for (key, (slot, token, positions)), raw in zip(items, stored, strict=True):
            now = None if raw is None else int(raw)
            if now is None or now > slot:
                del self._confirmed[key]
            elif token is None:
                behind.append((key, True))
            elif now < slot:
                behind.append((key, False))
            else:
                same.append((key, slot, token, positions))
        commands: list[Sequence[Any]] = []
        read = []
        for key, slot, token, positions in same:
            info = await self._model(key[0])
            if info is None:  # collected meanwhile
                del self._confirmed[key]
                continue
            read.append((key, slot, token, positions))
            commands.append(("HGET", f"{info.home(slot)}w:{slot}:meta", "tok"))
            commands += [("HGET", prefix + "pos", slot) for prefix in info.prefixes]
        replies = iter(await self._run(commands))
        for key, _, token, positions in read:
            tok = next(replies) or ABSENT
            now_positions = [next(replies) or ABSENT for _ in positions]
            counters = [_COUNTER.unpack_from(p)[0] for p in (tok, *now_positions)]
            confirmed = [_COUNTER.unpack_from(p)[0] for p in (token, *positions)]
            if any(n < c for n, c in zip(counters, confirmed, strict=True)):
                behind.append((key, False))
        return behind

    async def _repair(self, model: str, ref: WorkerRef, *, removed: bool) -> None:
        log.warning(LOST_WRITES_REASON, model=model, worker=ref.worker_id,
                    dp_rank=ref.dp_rank, removed=removed)
        self.lost_write_repairs += 1
        async with self._lock:
            self._forget_all()
            if removed:
                await self._remove_refs(model, [ref])
                return
        await self.clear_worker(model, ref.worker_id, ref.dp_rank)
        rank = self._ranks.get((model, ref))
        self._stats.resyncs_requested += 1
        if self.on_resync is not None:
            self.on_resync(ResyncRequest(model, ref.worker_id, ref.dp_rank,
                                         rank.ledger.epoch if rank is not None else 0,
                                         LOST_WRITES_REASON))

    async def _require_layout(self) -> None:
        await self._layout_gate.require(
            self._layout_checked and self._layout_refusal is None, self._check_layout)

    async def _check_layout(self) -> None:
        """Refuse a Redis declared in another layout by `kv-indexer migrate-layout`
        (checked at every ping), or holding single-slot models or models over another
        number of sub-slots: this index would not see the first, and would keep writing
        the second beside the models it creates."""
        self._layout_refusal = declared_refusal(await self._redis.get(LAYOUT_KEY),
                                                self.subslots)
        if self._layout_refusal is not None:
            raise BackendError(self._layout_refusal)
        if self._layout_checked:
            return
        fix = (f"`{migrate_command(self.subslots)}`: the index is rebuilt from snapshots "
               "and the stream")
        single = sorted(_text(m) for m in await self._redis.smembers(SINGLE_SLOT_MODELS))
        if single:
            raise BackendError(
                f"Redis holds {len(single)} single-slot model(s) (e.g. {', '.join(single[:3])}) "
                "and --redis-subslots reads only sub-slot models: start without "
                f"--redis-subslots, or move them to {self.subslots} sub-slots with {fix}")
        models = sorted(_text(m) for m in await self._redis.smembers(MODELS_KEY))
        counts = await self._run([("GET", directory_prefix(m) + "subslots") for m in models])
        other = [m for m, raw in zip(models, counts, strict=True)
                 if raw is not None and len(_text(raw).split("\n")) != self.subslots]
        if other:
            raise BackendError(
                f"Redis holds {len(other)} model(s) over another number of sub-slots than "
                f"--redis-subslots {self.subslots} (e.g. {', '.join(other[:3])}): start with "
                f"their --redis-subslots, or move them with {fix}")
        self._layout_checked = True

    async def get_marker(self, name: str) -> str | None:
        if self.markers is not None:
            return await self.markers.get(name)
        return await get_marker(self._redis, name)

    async def set_marker(self, name: str, value: str | None) -> None:
        if self.markers is not None:
            await self.markers.set(name, value)
        else:
            await set_marker(self._redis, name, value)

    async def block_size(self, model: str) -> int | None:
        return await read_block_size(self._redis, directory_prefix(model) + "block_size",
                                     model, self._block_sizes)

    async def presence(self, model: str) -> dict[int, dict[WorkerRef, int]]:
        slot_map = await self._slot_map(model, fresh=True)
        info = await self._model(model)
        if slot_map is None or info is None:
            return {}
        refs = await self._refs_by_id(model)
        hashes = await self._run([("HGETALL", prefix + "blk") for prefix in info.prefixes])
        out: dict[int, dict[WorkerRef, int]] = {}
        for values in hashes:
            for field, value in values.items():
                holders: dict[WorkerRef, int] = {}
                for (entry,) in struct.iter_unpack("<I", value):
                    ref = refs.get(entry >> 4)
                    if ref is not None:
                        holders[ref] = entry & 15
                if holders:
                    out[int.from_bytes(field, "little")] = holders
        return out

    async def _refs_by_id(self, model: str) -> dict[int, WorkerRef]:
        slots = await self._redis.hgetall(directory_prefix(model) + "slots")
        out = {}
        for ref_raw, slot_raw in slots.items():
            worker_id, _, rank = _text(ref_raw).rpartition("\n")
            out[int(slot_raw)] = WorkerRef(worker_id, int(rank))
        return out

    # --- queries -----------------------------------------------------------------------

    async def _slot_map(self, model: str, version: bytes | None = None,
                        fresh: bool = False) -> _SlotMap | None:
        cached = self._slot_maps.get(model)
        if cached is not None and not fresh and cached.version == version:
            return cached
        prefix = directory_prefix(model)
        version, slots, tags = await self._run([("GET", prefix + "slotver"),
                                                ("HGETALL", prefix + "slots"),
                                                ("GET", prefix + "subslots")])
        if tags is None:
            self._models.pop(model, None)
            self._slot_maps.pop(model, None)
            return None
        self._models[model] = _Model(model, tags.decode().split("\n"))
        slot_map = self._slot_maps[model] = _SlotMap(version, slots)
        if cached is not None and cached.version != version:
            self._block_sizes.pop(model, None)
        return slot_map

    async def score(self, query: ScoreQuery, *,
                    read_from: Mapping[str, RedisPipe] | None = None) -> ScoreResult:
        """`read_from`: master name ("" on one node) -> a pipe to one of its replicas, which
        answers that master's share of the reads (EVALSHA_RO); ReplicaReadError if one
        does not. The directory's slot map may come from the master: slot ids are never
        reused, so a map newer or older than a replica's holder lists can lose blocks,
        never give one rank's to another."""
        validate_query(query, self.config)
        packed = query_keys_packed(query)
        n = len(packed) // 8
        if not n:
            return ScoreResult(0, [])
        try:
            info = self._models.get(query.model)
            if info is None:
                await self._slot_map(query.model, fresh=True)
                info = self._models.get(query.model)
                if info is None:
                    return ScoreResult(n, [])
            read = await self._read_runs(info, packed, read_from)
            slot_map = await self._slot_map(query.model, read.version)
            if slot_map is None:
                return ScoreResult(n, [])
            candidates = slot_map.candidates(query.workers)
            mask_of = slot_map.mask
            mask_runs = [mask_of(v) if i % 2 == 0 else v for i, v in enumerate(read.runs)]
            weights = query.tier_weights or self.config.tier_weights
            plan = slot_map.pool_plan(query, candidates)
            refs = slot_map.refs_with(plan.cold_refs)
            if any(group != b"0" for group in read.groups):
                matches = await self._hybrid_matches(query, info, read, mask_runs,
                                                     candidates=candidates, slot_map=slot_map,
                                                     read_from=read_from, plan=plan)
                return ScoreResult(n, worker_scores(matches, refs.__getitem__))
        except RedisError as exc:
            raise BackendError(f"redis score failed: {exc}") from exc
        return ScoreResult(n, score_runs(
            mask_runs, candidates, weights, query.include_zero, refs,
            table=functools.partial(slot_map.table_with, plan.cold_refs), plan=plan))

    async def _hybrid_matches(self, query: ScoreQuery, info: _Model, read: _Read,
                              runs: list[int], *, candidates: int, slot_map: _SlotMap,
                              read_from: Mapping[str, RedisPipe] | None,
                              plan: PoolPlan = NO_POOLS) -> list[SlotMatch]:
        """vLLM's hybrid rule (`hybrid_run_matches`) over the model's KV-cache groups, as
        RedisIndex scores it: group 0's runs came with the query; the other groups'
        values take a second round trip (every sub-slot, in parallel). Pools (`plan`)
        are credited in group 0 only (where a pool's presence lives)."""
        if plan.credits:
            runs = credit_runs(runs, plan.credits)
        block_size = query.block_size if query.token_ids is not None else None

        async def group_masks(n_blocks: int, numbers: list[int]) -> list[dict[int, int]]:
            present = await self._group_masks(info, read.parts, n_blocks, numbers, slot_map,
                                              read_from=read_from)
            if numbers[0] == 0 and plan.credits:
                present[0] = dict(zip(present[0], credit_masks(present[0].values(),
                                                               plan.credits), strict=True))
            return present

        return await hybrid_run_matches(
            group_specs(read.groups.items()), runs, candidates | plan.cold, read.n,
            block_size=block_size or await self.block_size(query.model),
            weights=query.tier_weights or self.config.tier_weights,
            include_zero=query.include_zero, group_masks=group_masks)

    async def _group_masks(self, info: _Model, parts: list[tuple[bytes, bytes]],
                           n_blocks: int, groups: list[int], slot_map: _SlotMap, *,
                           read_from: Mapping[str, RedisPipe] | None) -> list[dict[int, int]]:
        """Per group of `groups`, query position -> walk mask of the first `n_blocks`
        keys each sub-slot holds in that group's hash (one HMGET per sub-slot and group,
        one pipeline per master)."""
        routes: list[str] = []
        commands: list[Sequence[Any]] = []
        where: list[tuple[int, tuple[int, ...]]] = []  # per command: group index, positions
        for k, (packed, packed_positions) in enumerate(parts):
            positions = struct.unpack(f"<{len(packed_positions) // 4}I", packed_positions)
            count = bisect_left(positions, n_blocks)
            if not count:
                continue
            keys = [packed[i * 8 : i * 8 + 8] for i in range(count)]
            for g_index, group in enumerate(groups):
                routes.append(info.prefixes[k])
                commands.append(("HMGET", info.prefixes[k] + group_hash(group), *keys))
                where.append((g_index, positions[:count]))
        replies = await self._query(routes, commands, read_from)
        present: list[dict[int, int]] = [{} for _ in groups]
        mask = slot_map.mask
        for (g_index, positions), values in zip(where, replies, strict=True):
            found = present[g_index]
            for position, value in zip(positions, values, strict=True):
                if value:
                    found[position] = mask(value)
        return present

    async def _query(self, routes: list[str], commands: list[Sequence[Any]],
                     read_from: Mapping[str, RedisPipe] | None = None) -> list[Any]:
        """Read-only commands, each on the pipelined connection to the master serving its
        `routes` key (or to that master's replica in `read_from`): one write per node,
        all nodes in flight at once; redirected, cut or missing a script on a master,
        they go through the client's pipeline instead (which follows MOVED and ASK,
        refreshes the slot map and loads the scripts). A replica that fails its share
        raises ReplicaReadError."""
        by_pipe: dict[RedisPipe, list[int]] = {}
        replica_of: dict[RedisPipe, str] = {}  # replica pipe -> the master it stands for
        for i, route in enumerate(routes):
            node = self._node_name(route)
            replica = read_from.get(node) if read_from and node is not None else None
            if replica is not None:
                replica_of[replica] = cast(str, node)
            pipe = replica or self._pipe_for(route)
            if pipe is None:
                return await self._run(commands)
            by_pipe.setdefault(pipe, []).append(i)
        packed = [pack(*command) for command in commands]
        groups = list(by_pipe.items())

        def share(pipe: RedisPipe, where: list[int]) -> Awaitable[list[Any] | Exception]:
            mine = [packed[i] for i in where]
            node = replica_of.get(pipe)
            if node is None:
                return _replies_or_error(pipe, mine)
            return self._replica_replies(node, pipe, mine)

        if len(groups) == 1:  # one node: no task
            answers: list[Any] = [await share(*groups[0])]
        else:
            answers = await asyncio.gather(*(share(pipe, where) for pipe, where in groups))
        for answer in answers:
            if isinstance(answer, ReplicaReadError):
                raise answer
        failed = [a for a in answers if isinstance(a, BaseException)]
        if not failed:
            replies: list[Any] = [None] * len(commands)
            for (_, where), answer in zip(groups, answers, strict=True):
                for i, reply in zip(where, answer, strict=True):
                    replies[i] = reply
            return replies
        if any(isinstance(a, ConnectionError | TimeoutError) for a in failed):
            await self._close_pipes()
        elif not all(isinstance(a, ResponseError) for a in failed):
            raise failed[0]
        return await self._run(commands)

    async def _replica_replies(self, node: str, pipe: RedisPipe,
                               packed: list[bytes]) -> list[Any] | Exception:
        """A replica's replies (the scripts loaded into it if it lacks them), or the
        ReplicaReadError that says it did not give them."""
        try:
            try:
                return await pipe.pipeline(*packed)
            except NoScriptError:
                for script in self._scripts.values():
                    await pipe.call("SCRIPT", "LOAD", script.text)
                return await pipe.pipeline(*packed)
        except (RedisError, OSError) as exc:
            return ReplicaReadError(node, exc)

    def _node_name(self, key: str) -> str | None:
        """The name of the master serving `key` ("" on one node); None before the cluster
        client has a slot map."""
        if not self._cluster:
            return ""
        try:
            node = cast(RedisCluster, self._redis).get_node_from_key(key)
        except (RedisError, AttributeError, KeyError):
            return None
        return None if node is None else node.name

    def _pipe_for(self, key: str) -> RedisPipe | None:
        """The query pipe to the master serving `key`; None before the cluster client has
        a slot map, or for connections only redis-py speaks (TLS on a cluster, ...)."""
        if not self._fast_queries:
            return None
        if not self._cluster:  # (a plain bool: isinstance of RedisCluster is slow)
            pipe = self._pipes.get("")
            if pipe is None:
                assert not isinstance(self._redis, RedisCluster)
                found = RedisPipe.for_client(self._redis)
                if found is None:
                    self._fast_queries = False
                    return None
                pipe = self._pipes[""] = found
            return pipe
        try:
            node = cast(RedisCluster, self._redis).get_node_from_key(key)
        except (RedisError, AttributeError, KeyError):
            return None
        if node is None:
            return None
        pipe = self._pipes.get(node.name)
        if pipe is None:
            pipe = RedisPipe.for_cluster_node(node)
            if pipe is None:
                self._fast_queries = False  # TLS and the like: redis-py's path only
                return None
            self._pipes[node.name] = pipe
        return pipe

    async def _close_pipes(self) -> None:
        for pipe in self._pipes.values():
            await pipe.close()
        self._pipes.clear()

    async def _read_runs(self, info: _Model, packed: bytes,
                         read_from: Mapping[str, RedisPipe] | None = None) -> _Read:
        """One pipeline (one per master on a cluster): the slot map's version, the
        model's KV-cache groups, and each sub-slot's group-0 values up to its first
        unheld key, merged by query position up to the first position nobody holds, as
        runs [value, count, ...]."""
        parts = _split(packed, info.subslots)
        used = [k for k, (keys, _) in enumerate(parts) if keys]
        commands: list[Sequence[Any]] = [("GET", info.dir + "slotver"),
                                         ("HGETALL", info.dir + "groups")]
        for k in used:
            score = self._eval("score", [info.prefixes[k] + "blk"], parts[k][0])
            # a replica takes EVALSHA_RO only (and the script never writes)
            commands.append(("EVALSHA_RO", *score[1:]) if read_from else score)
        routes = [info.dir + "slotver", info.dir + "groups",
                  *[info.prefixes[k] for k in used]]
        version, groups, *replies = await self._query(routes, commands, read_from)
        n = len(packed) // 8
        if isinstance(groups, list):  # the query pipe's HGETALL: flat [field, value, ...]
            groups = dict(zip(groups[::2], groups[1::2], strict=True))
        return _Read(version, groups, _merge(replies, [parts[k][1] for k in used], n),
                     parts, n)


def _pack_pool_names(names: set[str]) -> str:
    """The pools a rank wrote since its last gap, for its ledger: a JSON list (a pool
    name may hold any character, a line break among them)."""
    return json.dumps(sorted(names)) if names else ""


def _unpack_pool_names(raw: bytes) -> set[str]:
    """`_pack_pool_names`' list; a value not a JSON list is the older form, one name a
    line."""
    text = raw.decode()
    if text.startswith("["):
        try:
            names = json.loads(text)
        except ValueError:
            names = None
        if isinstance(names, list) and all(isinstance(name, str) for name in names):
            return set(names)
    return set(filter(None, text.split("\n")))


def _reslot_state(st: Mapping[bytes, bytes], floor: float) -> dict[bytes, bytes]:
    """A re-slot's new `st`: the old one's kept fields, its epoch moved, its floor at
    `floor` (the new id starts wiped)."""
    kept = {f: v for f, v in st.items() if f in _POOL_STATE_KEPT}
    return {**kept, b"floor": repr(floor).encode(),
            b"epoch": str(int(st.get(b"epoch", b"0")) + 1).encode()}


class _Read(NamedTuple):
    """What a Score read in its first round trip."""

    version: bytes | None
    groups: dict[bytes, bytes]  # KV-cache group -> "kind\nwindow"
    runs: list[Any]  # group 0's values up to the first unheld position, as runs
    parts: list[tuple[bytes, bytes]]  # per sub-slot: its keys, their query positions
    n: int  # the query's keys


async def _replies_or_error(pipe: RedisPipe, packed: list[bytes]) -> list[Any] | Exception:
    try:
        return await pipe.pipeline(*packed)
    except (RedisError, OSError) as exc:
        return exc


def _split_py(packed: bytes, subslots: int) -> list[tuple[bytes, bytes]]:
    """`subslot_split` (native/subslot.c) without the extension: per sub-slot its keys
    (u64 LE, key % subslots) and their query positions (u32 LE)."""
    keys = struct.unpack(f"<{len(packed) // 8}Q", packed)
    positions: list[list[int]] = [[] for _ in range(subslots)]
    for i, key in enumerate(keys):
        positions[key % subslots].append(i)
    return [(b"".join(packed[i * 8 : i * 8 + 8] for i in where),
             struct.pack(f"<{len(where)}I", *where)) for where in positions]


def _merge_py(replies: list[list[Any]], positions: list[bytes], n: int) -> list[Any]:
    """`subslot_merge` (native/subslot.c) without the extension: the sub-slots' runs merged
    by query position up to the first position nobody holds, as runs."""
    wheres = [struct.unpack(f"<{len(p) // 4}I", p) for p in positions]
    expanded: list[list[bytes]] = []
    end = n
    for reply, where in zip(replies, wheres, strict=True):
        values: list[bytes] = []
        for j in range(0, len(reply), 2):
            values += [reply[j]] * int(reply[j + 1])
        if len(values) > len(where):
            raise ValueError("subslot_merge: a run count out of range")
        if len(values) < len(where):
            end = min(end, where[len(values)])
        expanded.append(values)
    merged: list[bytes | None] = [None] * end
    for values, where in zip(expanded, wheres, strict=True):
        for i, value in zip(where, values, strict=False):
            if i >= end:
                break
            merged[i] = value
    if None in merged:
        raise ValueError("subslot_merge: a sub-slot stopped before the first unheld position")
    runs: list[Any] = []
    for found, group in groupby(merged):
        runs += [found, sum(1 for _ in group)]
    return runs


_split: Callable[[bytes, int], list[tuple[bytes, bytes]]] = _split_py
_merge: Callable[[list[list[Any]], list[bytes], int], list[Any]] = _merge_py
if NATIVE:
    _split, _merge = subslot_split, subslot_merge
