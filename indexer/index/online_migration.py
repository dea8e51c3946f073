"""Online per-model layout migration: one model moved between the single-slot layout and
S sub-slots while Score keeps answering it from the old layout until a switch.

A model with a record `kvi:migration:<model>` (listed in `kvi:migrations`) is routed by
it instead of by the process's `--redis-subslots`. The record holds `source` and `target`
(sub-slot counts, one of them 1), `partitions` (the stream's), `phase`, and a field
`copied.<p>` per stream partition whose ranks of the model the target layout holds.

Phases, and what `PerModelLayouts` does for the model in each:

| phase | Score, workers, snapshots | applies, removals, imports |
|---|---|---|
| copy | source | source; the target too for partitions copied |
| switched | target | both |
| retired | target | target only (the source's keys are being deleted) |
| done | target | target only |
| rollback | source | source only (the target's keys are being deleted) |

Copy: the writer of a partition (the process whose consumer holds its lease, the one
writer of its ranks) copies the partition's ranks of the model into the target (export
from the source, import into the target, the target's extra ranks of that partition
removed, repeated until the source did not change under it) before it applies anything
of that partition's ranks there, and records `copied.<p>`: from then on every batch of the
partition goes to both layouts, each keeping its own exactly-once ledger, so the target
holds what the source holds after every apply call. Partitions without traffic are copied
by `tend(partition)`, which the consumer calls between fetches.

Every process reads the records again when its last read is older than RECHECK_S
(`kvi:migrations` and each record), and reads `copied.<p>` afresh before copying a
partition; a consumer starting on a partition (its lease just taken) reads the records
afresh before its first write, so a partition's new writer never misses that its
predecessor copied it. `migrate_model` switches only when every partition is copied,
and waits `settle_s` (many RECHECK_S) between phases, so no reader still reads the
source when writers stop writing it, and no writer still writes it when its keys are
deleted. Interrupted anywhere, it is run again (it
resumes from the record) or rolled back (`rollback_model`, before `retired`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from redis.exceptions import RedisError

from indexer.errors import BackendError
from indexer.index.layouts import (
    MIGRATIONS_KEY,
    SINGLE_MODELS,
    SUBSLOT_MODELS,
    ModelMove,
    _delete_model,
    _Keys,
    _unlist,
    directory_prefix,
)
from indexer.index.protocol import (
    ApplyOutcome,
    Index,
    IndexConfig,
    IndexStats,
    RankState,
    ScoreQuery,
    ScoreResult,
    WorkerInfo,
    WorkerRef,
)
from indexer.ingest.recovery import partition_of
from kvcore.bus import EventBatch, escape_token, validate_batch

__all__ = [
    "COPY",
    "DONE",
    "RECHECK_S",
    "RETIRED",
    "SWITCHED",
    "ModelLayout",
    "PerModelLayouts",
    "migrate_model",
    "read_layout",
    "record_key",
    "rollback_model",
    "run_model_migration",
]

RECHECK_S: Final = 0.25  # longest a process routes by a record older than this
COPY: Final = "copy"
SWITCHED: Final = "switched"
RETIRED: Final = "retired"
DONE: Final = "done"
ROLLBACK: Final = "rollback"
_PHASES: Final = (COPY, SWITCHED, RETIRED, DONE, ROLLBACK)
_COPY_TRIES: Final = 20


def record_key(model: str) -> str:
    return f"kvi:migration:{escape_token(model)}"


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


@dataclass(frozen=True)
class ModelLayout:
    """One model's record."""

    source: int
    target: int
    phase: str
    partitions: int
    copied: frozenset[int]
    ident: str = ""  # one run of migrate_model: copies of another run never count

    @classmethod
    def parse(cls, fields: dict[bytes, bytes]) -> ModelLayout | None:
        text = {_text(k): _text(v) for k, v in fields.items()}
        if text.get("phase") not in _PHASES or not {"source", "target", "partitions"} <= set(text):
            return None
        copied = frozenset(int(name[7:]) for name in text if name.startswith("copied."))
        return cls(int(text["source"]), int(text["target"]), text["phase"],
                   int(text["partitions"]), copied, text.get("id", ""))

    @property
    def read(self) -> int:
        """The layout Score reads."""
        return self.source if self.phase in (COPY, ROLLBACK) else self.target

    def writes(self, partition: int) -> tuple[int, ...]:
        """The layouts a write of a rank in `partition` goes to, the one read first."""
        if self.phase == ROLLBACK:
            return (self.source,)
        if self.phase == COPY:
            return (self.source, self.target) if partition in self.copied else (self.source,)
        if self.phase == SWITCHED:
            return (self.target, self.source)
        return (self.target,)

    def everywhere(self) -> tuple[int, ...]:
        """The layouts a removal goes to (harmless where the rank is not)."""
        if self.phase in (COPY, SWITCHED):
            return (self.read, self.target if self.read == self.source else self.source)
        return (self.read,)


async def read_layout(client: Any, model: str) -> ModelLayout | None:
    return ModelLayout.parse(await client.hgetall(record_key(model)))


class PerModelLayouts:
    """An Index over one Redis routing each model to a layout: its record's, else the
    process's own (`home`). `open_layout(S)` builds the index of layout S (built once,
    its fleet-wide layout checks off unless S is home's)."""

    def __init__(self, client: Any, home: Index, home_subslots: int,
                 open_layout: Callable[[int], Index], partitions: int) -> None:
        self._client = client
        self._home_subslots = home_subslots
        self._open_layout = open_layout
        self._partitions = partitions
        self._indexes: dict[int, Index] = {home_subslots: home}
        self._records: dict[str, ModelLayout] = {}
        self._fresh_until = 0.0
        self._refreshing = asyncio.Lock()
        self._opening = asyncio.Lock()
        self._copy_locks: dict[tuple[str, int], asyncio.Lock] = {}
        # (model, run, partition) known copied here: a refresh that read the record
        # before this process recorded a copy must not make it write the source alone.
        self._copied: set[tuple[str, str, int]] = set()
        self.copies = 0  # partitions this process copied

    @property
    def config(self) -> IndexConfig:
        return self._indexes[self._home_subslots].config

    @property
    def home(self) -> Index:
        return self._indexes[self._home_subslots]

    async def layout(self, subslots: int) -> Index:
        """The index of layout `subslots`, opened (and pinged: a cluster client learns
        its slots) at its first use."""
        index = self._indexes.get(subslots)
        if index is not None:
            return index
        async with self._opening:
            index = self._indexes.get(subslots)
            if index is None:
                index = self._open_layout(subslots)
                index.checks_layout = False  # type: ignore[attr-defined]
                await index.ping()
                self._indexes[subslots] = index
        return index

    # --- records -----------------------------------------------------------------------

    def expire(self) -> None:
        """Read the records again before the next call: a consumer that just took a
        partition's lease over calls it, so it never writes by a view older than its
        lease (its predecessor may have copied the partition a moment before)."""
        self._fresh_until = 0.0

    async def refresh(self, force: bool = False) -> None:
        if not force and time.monotonic() < self._fresh_until:
            return
        async with self._refreshing:
            if not force and time.monotonic() < self._fresh_until:
                return
            started = time.monotonic()
            records: dict[str, ModelLayout] = {}
            try:
                for raw in await self._client.smembers(MIGRATIONS_KEY):
                    model = _text(raw)
                    record = await read_layout(self._client, model)
                    if record is not None:
                        records[model] = record
            except RedisError as exc:
                raise BackendError(f"redis per-model layouts read failed: {exc}") from exc
            self._records = records
            self._fresh_until = started + RECHECK_S

    async def _read_index(self, model: str) -> Index:
        record = self._records.get(model)
        return self.home if record is None else await self.layout(record.read)

    def _check_partitions(self, model: str, record: ModelLayout) -> None:
        """A copy is by the stream's partitions: a record made with another count would
        have this process copy ranks another consumer writes. Refused (the consumers
        retry, health says why) until the move is rolled back and run again."""
        if record.phase == COPY and record.partitions != self._partitions:
            raise BackendError(
                f"model {model!r} is being moved with --partitions {record.partitions}, "
                f"this indexer runs with {self._partitions}: roll it back (`kv-indexer "
                f"migrate-model --model M --rollback`) and run it with --partitions "
                f"{self._partitions}")

    def _is_copied(self, model: str, record: ModelLayout, partition: int) -> bool:
        return partition in record.copied or (model, record.ident, partition) in self._copied

    def _write_layouts(self, model: str, worker_id: str) -> tuple[int, ...]:
        record = self._records.get(model)
        if record is None:
            return (self._home_subslots,)
        self._check_partitions(model, record)
        partition = partition_of(model, worker_id, record.partitions)
        if record.phase == COPY and self._is_copied(model, record, partition):
            return (record.source, record.target)
        return record.writes(partition)

    def _removal_layouts(self, model: str) -> tuple[int, ...]:
        record = self._records.get(model)
        return (self._home_subslots,) if record is None else record.everywhere()

    # --- copy --------------------------------------------------------------------------

    async def tend(self, partition: int) -> None:
        """Copy `partition`'s ranks of every model in its copy phase not copied yet. The
        consumer of the partition calls it between fetches (it is their one writer)."""
        await self.refresh()
        for model, record in list(self._records.items()):
            if record.phase == COPY and not self._is_copied(model, record, partition):
                self._check_partitions(model, record)
                await self._ensure_copied(model, partition)

    async def _ensure_copied(self, model: str, partition: int) -> None:
        lock = self._copy_locks.setdefault((model, partition), asyncio.Lock())
        async with lock:
            record = self._records.get(model)
            if (record is None or record.phase != COPY
                    or self._is_copied(model, record, partition)):
                return
            key = record_key(model)
            try:
                if not await self._client.hexists(key, f"copied.{partition}"):
                    await self._copy(model, record, partition)
                    await self._client.hset(key, f"copied.{partition}", "1")
                    self.copies += 1
            except RedisError as exc:
                raise BackendError(f"redis layout copy failed: {exc}") from exc
            self._copied.add((model, record.ident, partition))

    async def _ranks_of(self, index: Index, model: str, partitions: int,
                        partition: int) -> list[WorkerRef]:
        return sorted(WorkerRef(w.worker_id, w.dp_rank) for w in await index.workers(model)
                      if partition_of(model, w.worker_id, partitions) == partition)

    async def _copy(self, model: str, record: ModelLayout, partition: int) -> None:
        """The source's ranks of the model in `partition` into the target, until the
        source held still (a removal by liveness may run meanwhile; it goes to both)."""
        source, target = await self.layout(record.source), await self.layout(record.target)
        for _ in range(_COPY_TRIES):
            refs = await self._ranks_of(source, model, record.partitions, partition)
            states = await source.export_ranks([(model, ref) for ref in refs])
            extra = {ref.worker_id for ref in
                     await self._ranks_of(target, model, record.partitions, partition)
                     } - {ref.worker_id for ref in refs}
            for worker_id in sorted(extra):
                await target.remove_worker(model, worker_id)
            await target.import_ranks(states)
            again = await self._ranks_of(source, model, record.partitions, partition)
            if again == refs and await source.export_ranks(
                    [(model, ref) for ref in refs]) == states:
                return
        raise BackendError(f"model {model!r} partition {partition}: its ranks kept changing "
                           f"while being copied ({_COPY_TRIES} tries)")

    # --- writes ------------------------------------------------------------------------

    async def apply(self, batches: Sequence[EventBatch], *,
                    validated: bool = False) -> list[ApplyOutcome]:
        await self.refresh()
        if not self._records:
            return await self.home.apply(batches, validated=validated)
        if not validated:
            for batch in batches:
                validate_batch(batch)
        for batch in batches:
            record = self._records.get(batch.model)
            if record is not None and record.phase == COPY:
                self._check_partitions(batch.model, record)
                await self._ensure_copied(
                    batch.model, partition_of(batch.model, batch.worker_id, record.partitions))
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, batch in enumerate(batches):
            groups.setdefault(self._write_layouts(batch.model, batch.worker_id), []).append(i)
        outcomes: list[ApplyOutcome | None] = [None] * len(batches)
        for layouts, members in groups.items():
            part = [batches[i] for i in members]
            answered = await (await self.layout(layouts[0])).apply(part, validated=True)
            for layout in layouts[1:]:
                await (await self.layout(layout)).apply(part, validated=True)
            for i, outcome in zip(members, answered, strict=True):
                outcomes[i] = outcome
        return [outcome for outcome in outcomes if outcome is not None]

    async def _each(self, model: str, call: Callable[[Index], Awaitable[Any]]) -> Any:
        await self.refresh()
        layouts = self._removal_layouts(model)
        first = await call(await self.layout(layouts[0]))
        for layout in layouts[1:]:
            await call(await self.layout(layout))
        return first

    async def clear_worker(self, model: str, worker_id: str, dp_rank: int | None = None) -> int:
        result: int = await self._each(
            model, lambda index: index.clear_worker(model, worker_id, dp_rank))
        return result

    async def remove_worker(self, model: str, worker_id: str) -> int:
        result: int = await self._each(model, lambda index: index.remove_worker(model, worker_id))
        return result

    async def remove_pool(self, model: str, pool: str) -> bool:
        result: bool = await self._each(model, lambda index: index.remove_pool(model, pool))
        return result

    async def drop_empty_models(self) -> list[str]:
        await self.refresh()
        return await self.home.drop_empty_models()

    async def import_ranks(self, states: Sequence[RankState]) -> None:
        await self.refresh()
        groups: dict[tuple[int, ...], list[RankState]] = {}
        for state in states:
            groups.setdefault(self._write_layouts(state.model, state.worker_id),
                              []).append(state)
        for layouts, part in groups.items():
            for layout in layouts:
                await (await self.layout(layout)).import_ranks(part)

    # --- reads -------------------------------------------------------------------------

    async def score(self, query: ScoreQuery) -> ScoreResult:
        await self.refresh()
        return await (await self._read_index(query.model)).score(query)

    async def workers(self, model: str | None = None) -> list[WorkerInfo]:
        await self.refresh()
        if model is not None:
            return await (await self._read_index(model)).workers(model)
        elsewhere = {m for m, record in self._records.items()
                     if record.read != self._home_subslots}
        found = [w for w in await self.home.workers() if w.model not in elsewhere]
        for m in sorted(elsewhere):
            found.extend(await (await self._read_index(m)).workers(m))
        return found

    async def block_size(self, model: str) -> int | None:
        await self.refresh()
        return await (await self._read_index(model)).block_size(model)

    async def presence(self, model: str) -> dict[int, dict[WorkerRef, int]]:
        await self.refresh()
        return await (await self._read_index(model)).presence(model)

    async def export_ranks(self, ranks: Sequence[tuple[str, WorkerRef]]) -> list[RankState]:
        await self.refresh()
        by_index: dict[int, list[tuple[str, WorkerRef]]] = {}
        for model, ref in ranks:
            record = self._records.get(model)
            layout = self._home_subslots if record is None else record.read
            by_index.setdefault(layout, []).append((model, ref))
        states: list[RankState] = []
        for layout, part in by_index.items():
            states.extend(await (await self.layout(layout)).export_ranks(part))
        return states

    async def stats(self) -> IndexStats:
        return await self.home.stats()

    async def ping(self) -> None:
        for index in list(self._indexes.values()):
            await index.ping()
        await self.refresh()
        for model, record in self._records.items():
            self._check_partitions(model, record)

    async def get_marker(self, name: str) -> str | None:
        return await self.home.get_marker(name)

    async def set_marker(self, name: str, value: str | None) -> None:
        await self.home.set_marker(name, value)

    async def reset_caches(self) -> None:
        self._fresh_until = 0.0
        for index in list(self._indexes.values()):
            await index.reset_caches()

    async def close(self) -> None:
        for index in list(self._indexes.values()):
            await index.close()
        await self._client.aclose()


# --- the migration ---------------------------------------------------------------------


async def _current_layout(client: Any, model: str) -> int | None:
    """The layout `model` is in, from its record or its listing; None if not listed."""
    record = await read_layout(client, model)
    if record is not None:
        return record.target if record.phase in (RETIRED, DONE) else None
    if await client.sismember(SINGLE_MODELS, model):
        return 1
    if await client.sismember(SUBSLOT_MODELS, model):
        raw = await client.get(directory_prefix(model) + "subslots")
        if raw:
            return len(_text(raw).split("\n"))
    return None


def _listing(subslots: int) -> str:
    return SINGLE_MODELS if subslots == 1 else SUBSLOT_MODELS


async def _set_phase(client: Any, model: str, phase: str, settle_s: float,
                     say: Callable[[str], None]) -> None:
    await client.hset(record_key(model), "phase", phase)
    say(f"{model!r}: phase {phase}; waiting {settle_s:g} s for every process to see it")
    await asyncio.sleep(settle_s)


async def _delete_layout(client: Any, model: str, subslots: int) -> int:
    move = ModelMove(model, _listing(subslots), f"{subslots} sub-slot(s)")
    keys = _Keys(client)
    await _delete_model(keys, move)
    await _unlist(client, move)
    return move.keys


async def migrate_model(client: Any, model: str, target: int, *, partitions: int,
                        settle_s: float = 2.0, copy_timeout_s: float = 600.0,
                        say: Callable[[str], None] = print) -> None:
    """Move `model` to `target` sub-slots online (see the module's docstring); resumes an
    interrupted run towards the same target."""
    record = await read_layout(client, model)
    if record is not None and record.phase == ROLLBACK:
        raise BackendError(f"{model!r}: a rollback is unfinished: roll it back again first")
    if record is not None and record.phase in (COPY, SWITCHED):
        if record.target != target:
            raise BackendError(f"{model!r} is being moved to {record.target} sub-slot(s): "
                               "run that again, or roll it back first")
        source = record.source
    elif record is not None and record.phase == RETIRED:
        source = record.source
    else:
        current = await _current_layout(client, model)
        if current is None:
            raise BackendError(f"model {model!r} is not listed: nothing to move")
        if current == target:
            say(f"{model!r} is in {target} sub-slot(s) already")
            return
        if 1 not in (current, target):
            raise BackendError("online migration moves between one slot and S sub-slots: "
                               f"{current} -> {target} takes two runs, through 1")
        source = current
        # One transaction on one key: a process never reads a record half replaced.
        pipe = client.pipeline(transaction=True)
        pipe.delete(record_key(model))
        pipe.hset(record_key(model), mapping={
            "source": source, "target": target, "phase": COPY, "partitions": partitions,
            "id": uuid.uuid4().hex})
        await pipe.execute()
        await client.sadd(MIGRATIONS_KEY, model)
        say(f"{model!r}: copying {source} -> {target} sub-slot(s), partition by partition, "
            "by the partitions' writers")
        record = await read_layout(client, model)
    assert record is not None
    if record.phase == COPY:
        await _wait_copied(client, model, record.partitions, copy_timeout_s)
        await _set_phase(client, model, SWITCHED, settle_s, say)
        record = await read_layout(client, model)
    assert record is not None
    if record.phase == SWITCHED:
        await _set_phase(client, model, RETIRED, settle_s, say)
    deleted = await _delete_layout(client, model, source)
    await client.hset(record_key(model), "phase", DONE)
    say(f"{model!r}: in {target} sub-slot(s); deleted {deleted} key(s) of the old layout")


async def _wait_copied(client: Any, model: str, partitions: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        fields = await client.hkeys(record_key(model))
        copied = {_text(name) for name in fields if _text(name).startswith("copied.")}
        if len(copied) >= partitions:
            return
        if time.monotonic() > deadline:
            raise BackendError(f"{model!r}: {partitions - len(copied)} partition(s) not "
                               f"copied after {timeout_s:g} s (are their consumers running, "
                               "every indexer with --redis-model-layouts on?); run again to "
                               "keep waiting, or --rollback")
        await asyncio.sleep(0.1)


async def rollback_model(client: Any, model: str, *, settle_s: float = 2.0,
                         say: Callable[[str], None] = print) -> None:
    """Undo a migration not yet past its switch's settling: readers back on the source,
    the record removed, the target's keys of the model deleted."""
    record = await read_layout(client, model)
    if record is None:
        raise BackendError(f"{model!r} has no migration to roll back")
    if record.phase in (RETIRED, DONE):
        raise BackendError(f"{model!r} is past its switch (phase {record.phase}): migrate "
                           f"it back to {record.source} sub-slot(s) instead")
    if record.phase == SWITCHED:
        await _set_phase(client, model, COPY, settle_s, say)  # both still written
    if record.phase != ROLLBACK:
        await _set_phase(client, model, ROLLBACK, settle_s, say)
    deleted = await _delete_layout(client, model, record.target)
    # Kept, as a finished migration's: processes on either flag route the model by it.
    await client.hset(record_key(model), mapping={
        "source": record.source, "target": record.source, "phase": DONE})
    say(f"{model!r}: rolled back to {record.source} sub-slot(s); deleted {deleted} key(s)")


async def run_model_migration(url: str, model: str, target: int | None, *, partitions: int,
                              rollback: bool = False, settle_s: float = 2.0,
                              options: dict[str, Any] | None = None) -> None:
    """`kv-indexer migrate-model`: `migrate_model` (or `rollback_model`) on the Redis at
    `url`, with redis-py client `options` (TLS files, a password)."""
    import redis.asyncio as aioredis  # noqa: PLC0415 - the server extra
    from redis.asyncio.cluster import RedisCluster  # noqa: PLC0415

    from indexer.index.redis_cluster import cluster_url, is_cluster_node  # noqa: PLC0415

    options = options or {}
    plain = cluster_url(url)
    client: Any
    if plain is not None or await asyncio.to_thread(is_cluster_node, url, options):
        client = RedisCluster.from_url(plain or url, **options)
    else:
        client = aioredis.Redis.from_url(url, **options)
    try:
        if rollback:
            await rollback_model(client, model, settle_s=settle_s)
        else:
            assert target is not None
            await migrate_model(client, model, target, partitions=partitions,
                                settle_s=settle_s)
    finally:
        await client.aclose()
