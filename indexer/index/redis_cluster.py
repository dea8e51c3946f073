"""The Redis index on Redis Cluster: the same layout and scripts as `RedisIndex`. The slot
map and the admin paths are redis-py's cluster client's (redis.asyncio.cluster); apply
and Score pipeline their calls on one connection per master, as `RedisIndex` does on one
node.

Every key of a model carries the hash tag `{m:<model>}`, so a model is one hash slot and
each script call goes whole to the master serving it; models spread over the masters.
Scripts declare every key they write, so while a slot migrates Redis answers ASK or
TRYAGAIN instead of letting a call see half a model; the cluster client follows MOVED and
ASK, retries TRYAGAIN and CLUSTERDOWN, and refreshes its slot map when a node fails.

Exactly-once across redirections: a record applies only if the rank's stored position
is the one its ledger started from (apply.lua), so a call resent after a lost reply
changes nothing twice. Across a failover: replication is asynchronous, so a promoted
replica may lack the last calls its master acknowledged (and whose stream messages were
acknowledged in turn). This index remembers the position each rank had when its last
call was confirmed; when the cluster's masters change (or an apply fails), it reads every
remembered rank's stored position back and, for each one found behind (or a removal
found undone), clears the rank, so it claims no block it may have dropped meanwhile,
and asks the rank's publisher for a resync (`redis_lost_writes`).

Index markers are kept on every master (indexer/index/redis_markers.py), so a master
restored from an older dump, or a lagging replica promoted, shows in the markers the
consumers check, whichever master it is: its partitions rebuild.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, cast
from urllib.parse import urlsplit, urlunsplit

import redis
import structlog
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ConnectionError,
    MovedError,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
    TimeoutError,
    TryAgainError,
)

from indexer.errors import BackendError
from indexer.index.layouts import model_prefix
from indexer.index.ledger import WorkerLedger
from indexer.index.protocol import ApplyOutcome, RankState, ResyncRequest, WorkerRef
from indexer.index.redis import _POSITION, RedisIndex, _read_reply, score_keys
from indexer.index.redis_markers import ClusterMarkers
from indexer.index.redis_pipe import RedisPipe
from kvcore.bus import EventBatch

__all__ = ["CLUSTER_SCHEMES", "RedisClusterIndex", "cluster_url", "is_cluster_node"]

log = structlog.get_logger("indexer.redis_cluster")

CLUSTER_SCHEMES: Final = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
LOST_WRITES_REASON: Final = "redis_lost_writes"
_REMOVED: Final = None  # the confirmed "position" of a rank this index removed
_REDIRECT_ATTEMPTS: Final = 5
_REDIRECTED: Final = (MovedError, AskError, TryAgainError, ClusterDownError, SlotNotCoveredError)
_RETRIED: Final = (*_REDIRECTED, ConnectionError, TimeoutError)

Position = tuple[int, int] | None


def cluster_url(url: str) -> str | None:
    """The plain redis:// (rediss://) URL of a `redis+cluster://` (`rediss+cluster://`)
    one, or None for any other URL."""
    parts = urlsplit(url)
    scheme = CLUSTER_SCHEMES.get(parts.scheme)
    return urlunsplit(parts._replace(scheme=scheme)) if scheme is not None else None


def is_cluster_node(url: str, options: Mapping[str, Any], timeout_s: float = 5.0) -> bool:
    """Whether the Redis at `url` runs in cluster mode (INFO cluster: cluster_enabled:1);
    False when it cannot be asked (the single-node index then reports the failure)."""
    if urlsplit(url).scheme == "unix":
        return False
    kwargs = {"socket_connect_timeout": timeout_s, "socket_timeout": timeout_s, **options}
    client = redis.Redis.from_url(url, **kwargs)
    try:
        return int(client.info("cluster").get("cluster_enabled", 0)) == 1
    except RedisError as exc:
        log.warning("redis_cluster_probe_failed", error=str(exc))
        return False
    finally:
        client.close()


class RedisClusterIndex(RedisIndex):
    """The Index on Redis Cluster; apply() of one worker from one process at a time."""

    def __init__(self, client: RedisCluster, **kwargs: Any) -> None:
        super().__init__(cast(Any, client), pipelined_queries=False, **kwargs)
        self._cluster = client
        self._masters = self._master_names()
        # (model, rank) -> position Redis confirmed for it last (None: removed by us).
        self._confirmed: dict[tuple[str, WorkerRef], Position] = {}
        self._suspect = False  # an apply failed: check the confirmed positions again
        self._checking = asyncio.Lock()
        self.retried_calls = 0  # apply calls tried again after a redirection or lost node
        self._pipes: dict[str, RedisPipe] = {}  # Score's pipelined connection per master
        self._fast_queries = True
        self._probe_buckets = True  # a slot migrating moves buckets under apply.lua
        self.markers = ClusterMarkers(client)  # a copy per master (redis_markers.py)

    @classmethod
    def from_url(cls, url: str, *, redis_options: Mapping[str, Any] | None = None,
                 **kwargs: Any) -> RedisClusterIndex:
        """The index on the cluster one of whose nodes is at `url` (redis://, rediss://
        or the same with `+cluster`); the client finds the other nodes."""
        client = RedisCluster.from_url(cluster_url(url) or url, decode_responses=False,
                                       **(redis_options or {}))
        return cls(client, **kwargs)

    async def close(self) -> None:
        for pipe in self._pipes.values():
            await pipe.close()
        await super().close()

    def _master_names(self) -> frozenset[str]:
        return frozenset(node.name for node in self._cluster.get_primaries())

    # --- ingest ------------------------------------------------------------------------

    async def apply(
        self, batches: Sequence[EventBatch], *, validated: bool = False
    ) -> list[ApplyOutcome]:
        """As `RedisIndex.apply`; a call redirected (MOVED, ASK, TRYAGAIN: a slot moving)
        or cut (a node lost) is tried again a few times, after the slot map is refreshed,
        before BackendError. Nothing applies twice: ledgers are reloaded first."""
        for attempt in range(_REDIRECT_ATTEMPTS):
            await self.check_lost_writes()
            try:
                return await super().apply(batches, validated=validated)
            except BackendError as exc:
                self._suspect = True
                if (attempt == _REDIRECT_ATTEMPTS - 1
                        or not isinstance(exc.__cause__, _RETRIED)):
                    raise
                self.retried_calls += 1
                log.info("redis_cluster_apply_retried", error=str(exc.__cause__)[:200],
                         attempt=attempt + 1)
                await self._refresh_slots({batch.model for batch in batches})
                await asyncio.sleep(0.05 * (attempt + 1))
            except BaseException:
                self._suspect = True
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _refresh_slots(self, models: set[str]) -> None:
        """One plain command per model through the cluster client, which follows MOVED
        and refreshes its slot map on a lost node: the next pipelined call is routed
        right."""
        for model in models:
            try:
                await self._cluster.exists(model_prefix(model) + "slots")
            except RedisError:
                log.debug("redis_cluster_refresh_failed", model=model, exc_info=True)

    async def _apply(self, batches: Sequence[EventBatch]) -> list[ApplyOutcome]:
        """As `RedisIndex._apply`, one pipelined connection per master: each call goes
        out as soon as it is built, to the master of its model's slot, so the masters
        run calls while Python builds the next; replies are read in order per master."""
        sha = await self._script_sha()
        await self._cluster.initialize()  # the slot map, on first use
        outcomes: dict[int, ApplyOutcome] = {}
        step = max(8, -(-len(batches) // 8))
        conns: dict[str, tuple[ClusterNode, Any]] = {}
        pending: list[tuple[str, list[bytes], list[WorkerLedger], Any]] = []
        try:
            for start in range(0, len(batches), step):
                group = list(enumerate(batches[start : start + step], start))
                records, sent = await self._build_records(group, outcomes)
                for model, recs in records.items():
                    keys = self._apply_keys(model, sent[model])
                    conn = self._connection_for(keys[0], conns)
                    # The KV-cache group specs first (the `groups` hash, same slot), so
                    # a group's hash is listed before it is written (gc.lua finds it).
                    for command in self._group_commands(model):
                        await conn.send_command(*command)
                        pending.append((model, [], [], conn))
                    await conn.send_command("EVALSHA", sha, len(keys), *keys, *recs)
                    pending.append((model, recs, sent[model], conn))
            replies = [await _read_reply(conn) for *_, conn in pending]
        except BaseException:
            for _, conn in conns.values():
                await conn.disconnect()
            raise
        finally:
            for node, conn in conns.values():
                node.release(conn)
        for (model, recs, ledgers, _), reply in zip(pending, replies, strict=True):
            if isinstance(reply, _REDIRECTED):
                raise reply  # nothing of this call ran: the slot is elsewhere, or moving
            if not recs:  # a `groups` write
                if isinstance(reply, Exception):
                    raise BackendError(f"redis groups write failed: {reply}")
                continue
            self._check_statuses(model, recs, ledgers, reply)
        await self._register_models(batches)
        self._confirm(batches)
        return [outcomes[i] for i in range(len(batches))]

    def _connection_for(self, key: str, conns: dict[str, tuple[ClusterNode, Any]]) -> Any:
        """This apply's connection to the master serving `key`'s slot."""
        node = self._cluster.get_node_from_key(key)
        if node is None:  # pragma: no cover - a primary is always asked for
            raise SlotNotCoveredError(f"no master serves {key}")
        if node.name not in conns:
            conns[node.name] = (node, node.acquire_connection())
        return conns[node.name][1]

    def _confirm(self, batches: Sequence[EventBatch]) -> None:
        """Every call of an apply succeeded: its ranks' ledgers are what Redis holds."""
        for batch in batches:
            key = (batch.model, WorkerRef(batch.worker_id, batch.dp_rank))
            ledger = self._ledgers.get(key)
            if ledger is not None:
                self._confirmed[key] = (ledger.epoch, ledger.last_seq)

    # --- queries -----------------------------------------------------------------------

    async def _masks(self, prefix: str, packed_keys: bytes) -> list[Any]:
        """score.lua's reply: over a pipelined connection to the master of the model's
        slot (as a single node's queries are); redirected, cut or unloaded, the call goes
        through the cluster client instead, which follows MOVED and ASK, refreshes its
        slot map and loads the script, so the next call finds the right master."""
        keys = score_keys(prefix)
        node_pipe = self._pipe_for(keys[0])
        if node_pipe is not None:
            name, pipe = node_pipe
            try:
                reply: list[Any] = await pipe.call("EVALSHA", str(self._score_script.sha),
                                                   len(keys), *keys, packed_keys)
                return reply
            except (ConnectionError, TimeoutError):
                await self._pipes.pop(name, pipe).close()
            except ResponseError:  # MOVED, ASK, TRYAGAIN, NOSCRIPT, CLUSTERDOWN
                pass
        reply = await self._score_script(keys=keys, args=[packed_keys])
        return reply

    def _pipe_for(self, key: str) -> tuple[str, RedisPipe] | None:
        """The query pipe to the master serving `key`, as the cluster client knows it;
        None before the client has a slot map, or for connections only redis-py speaks."""
        if not self._fast_queries:
            return None
        try:
            node = self._cluster.get_node_from_key(key)
        except RedisError:
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
        return node.name, pipe

    async def _reset_after_failure(self, exc: Exception) -> None:
        # The cluster client drops dead connections and refreshes its slot map itself.
        self._forget_all()

    async def _drop_idle_sockets(self) -> None:
        return None

    async def _drop(self, model: str, worker_id: str, dp_rank: int | None, remove: bool) -> int:
        dropped = await super()._drop(model, worker_id, dp_rank, remove)
        for key in [k for k in self._confirmed if k[0] == model and k[1].worker_id == worker_id
                    and (dp_rank is None or k[1].dp_rank == dp_rank)]:
            if remove:
                self._confirmed[key] = _REMOVED
            elif (ledger := self._ledgers.get(key)) is not None:
                self._confirmed[key] = (ledger.epoch, ledger.last_seq)
        return dropped

    async def _run_records(self, records: dict[str, list[bytes]],
                           sent: dict[str, list[WorkerLedger]]) -> list[str]:
        # Admin calls (clear, remove, import) go through a cluster pipeline, which does
        # not load scripts: load apply.lua on every master first (a promoted replica
        # lacks it).
        if records:
            await self._cluster.script_load(self._apply_script.script)
        return await super()._run_records(records, sent)

    async def _load_ledgers(self, ranks: Iterable[tuple[str, str, int]]) -> None:
        """Nothing ahead: ledgers load one at a time as they are needed (`_ledger`), each
        from its model's master (no one connection reaches every rank's keys)."""

    async def import_ranks(self, states: Sequence[RankState]) -> None:
        await super().import_ranks(states)
        for state in states:
            key = (state.model, WorkerRef(state.worker_id, state.dp_rank))
            ledger = self._ledgers.get(key)
            if ledger is not None:
                self._confirmed[key] = (ledger.epoch, ledger.last_seq)

    async def _collect_models(self, models: list[str]) -> list[str]:
        collected = await super()._collect_models(models)
        gone = set(collected)
        for key in [k for k in self._confirmed if k[0] in gone]:
            del self._confirmed[key]
        return collected

    async def get_marker(self, name: str) -> str | None:
        return await self.markers.get(name)

    async def set_marker(self, name: str, value: str | None) -> None:
        await self.markers.set(name, value)

    # --- failover: writes a promoted replica never got ----------------------------------

    async def check_lost_writes(self) -> int:
        """If the masters changed (a failover) or an apply failed since the last check:
        the ranks whose confirmed writes Redis no longer holds are cleared and asked for
        a resync. Returns how many; raises BackendError while the cluster cannot say."""
        if self._master_names() == self._masters and not self._suspect:
            return 0
        async with self._checking:
            masters = self._master_names()
            if masters == self._masters and not self._suspect:
                return 0  # another caller checked meanwhile
            try:
                lost = await self._ranks_behind()
                for (model, ref), confirmed in lost:
                    await self._repair(model, ref, confirmed)
            except RedisError as exc:
                raise BackendError(f"redis lost-writes check failed: {exc}") from exc
            self._masters = masters
            self._suspect = False
            return len(lost)

    async def ping(self) -> None:
        """Every master answers; a failover seen meanwhile gets its lost-writes check
        here too (health probes ping every second), not only at the next apply."""
        try:
            await self._cluster.ping(target_nodes=RedisCluster.PRIMARIES)
        except RedisError as exc:
            self._suspect = True
            raise BackendError(f"redis ping failed: {exc}") from exc
        await self.check_lost_writes()
        try:
            await self._check_layout()  # as on one node
        except RedisError as exc:
            raise BackendError(f"redis layout check failed: {exc}") from exc

    async def _ranks_behind(self) -> list[tuple[tuple[str, WorkerRef], Position]]:
        """The remembered ranks whose stored position is behind the confirmed one, or
        that still exist though this index removed them."""
        ranks = list(self._confirmed.items())
        if not ranks:
            return []
        pipe = self._cluster.pipeline(transaction=False)
        for (model, ref), _ in ranks:
            pipe.hget(model_prefix(model) + "slots", f"{ref.worker_id}\n{ref.dp_rank}")
        slots = await pipe.execute()
        pipe = self._cluster.pipeline(transaction=False)
        for ((model, _), _), slot in zip(ranks, slots, strict=True):
            pipe.hget(f"{model_prefix(model)}w:{int(slot or 0)}:meta", "pos")
        stored = await pipe.execute()
        behind = []
        for (key, confirmed), slot, pos in zip(ranks, slots, stored, strict=True):
            now = _POSITION.unpack(pos) if slot is not None and pos else None
            if (confirmed is _REMOVED and slot is not None) or (
                    confirmed is not _REMOVED and (now is None or now < confirmed)):
                behind.append((key, confirmed))
        return behind

    async def _repair(self, model: str, ref: WorkerRef, confirmed: Position) -> None:
        log.warning(LOST_WRITES_REASON, model=model, worker=ref.worker_id,
                    dp_rank=ref.dp_rank, confirmed=confirmed)
        async with self._lock:
            self._forget_all()
        await self._drop(model, ref.worker_id, ref.dp_rank, remove=confirmed is _REMOVED)
        if confirmed is _REMOVED:
            return
        self._stats.resyncs_requested += 1
        if self.on_resync is not None:
            self.on_resync(ResyncRequest(model, ref.worker_id, ref.dp_rank, confirmed[0],
                                         LOST_WRITES_REASON))
