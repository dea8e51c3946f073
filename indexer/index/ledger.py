"""Per-worker ingest state: engine block hashes -> canonical keys, shared by every backend.

A `WorkerLedger` belongs to one (model, worker_id, dp_rank). It turns bus events into
presence changes (set or clear the bit `slot * 4 + tier` of some block keys) that a
`PresenceSink` applies, so the in-memory and Redis backends differ only in their sink.

Engine hashes name content within an epoch, so the mapping of a block that left every
tier is kept as a "ghost": a child stored later still resolves its parent. Ghosts form an
LRU of evicted blocks (most recently evicted last; a ghost stored again leaves it), trimmed
to `ghost_capacity` at the end of each batch.

Hybrid-attention models (bus schema 2) store the same engine hashes once per KV-cache
group, and each group evicts on its own. Group 0 is the ledger itself; every other group
has a ledger of its own in `groups` (same slot, same sequence position), whose presence
goes to the sink's `group_sink(group)`. A worker whose events never name a group is
indexed exactly as before.
"""

from __future__ import annotations

import functools
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Final, Protocol

import structlog

from indexer.index.ledger_map import EngineHashMap, new_ledger_map
from indexer.index.protocol import (
    MAX_SEQ_JUMP,
    TIER_BITS,
    TIERS,
    ApplyOutcome,
    IndexStats,
    RankState,
    ResyncHook,
    ResyncRequest,
    tier_index,
)
from kvcore.bus import (
    _TIER_SLOTS,
    MAX_GROUP,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Event,
    EventBatch,
)
from kvcore.keys import NATIVE, block_keys, root_seed

if NATIVE:
    from kvcore._native import LedgerMap, store_plain
    from kvcore._native import pack_log_entries as _pack_log_entries

# Whether `WorkerLedger.apply` hands its plain stores to the C loop (kvcore._native
# store_plain, which does what `_store` does for them); tests turn it off to compare.
FAST_STORES = NATIVE

__all__ = [
    "LOG_HASH",
    "LOG_MAP",
    "LOG_RUN",
    "LOG_RUN_ENTRY",
    "Journal",
    "LedgerLogError",
    "PresenceSink",
    "WorkerLedger",
    "pack_log_entries",
    "pack_log_entries_python",
    "stored_block_size",
]

# A ledger as a log (Redis persistence and snapshots), records replayed in order:
#   b"N" tier mask u8, count u16, count x (engine hash u64, key u64)
#                                                 each mapping now is (key, tiers)
#   b"M" engine hash u64, key u64, tier mask u8   the same for one hash (written by earlier
#                                                 versions: still read)
#   b"D" engine hash u64                          the mapping is gone
#   b"U" engine hash u64                          no longer a ghost
#   b"G" engine hash u64                          now the most recently evicted ghost
#   b"Y" group u64                                the records that follow are of this
#                                                 KV-cache group's ledger (0 at the start)
LOG_MAP: Final = struct.Struct("<cQQB")
LOG_HASH: Final = struct.Struct("<cQ")
LOG_RUN: Final = struct.Struct("<cBH")
LOG_RUN_ENTRY: Final = struct.Struct("<QQ")


def pack_log_entries(hashes: Iterable[int], keys: dict[int, int], tiers: dict[int, int]) -> bytes:
    """An M record for each hash `keys` maps (tiers from `tiers`), a D record for the rest."""
    if NATIVE:
        return _pack_log_entries(hashes, keys, tiers)
    return pack_log_entries_python(hashes, keys, tiers)


def pack_log_entries_python(
    hashes: Iterable[int], keys: dict[int, int], tiers: dict[int, int]
) -> bytes:
    """`pack_log_entries` without the C extension."""
    pack_map, pack_hash = LOG_MAP.pack, LOG_HASH.pack
    return b"".join([
        pack_map(b"M", h, key, tiers.get(h, 0)) if (key := keys.get(h)) is not None
        else pack_hash(b"D", h)
        for h in hashes
    ])


def starts_with_clear(batch: EventBatch) -> bool:
    """A batch that replaces the rank's whole state (a resync begins this way)."""
    return bool(batch.events) and isinstance(batch.events[0], AllBlocksCleared)


class LedgerLogError(ValueError):
    """A ledger log that does not parse (corrupt or truncated)."""


def _load_run(entries: EngineHashMap, view: memoryview, pos: int) -> int:
    """Map the hashes of the N record at `pos`; the position after it."""
    try:
        return entries.load_run(view, pos)
    except ValueError as exc:
        raise LedgerLogError(str(exc)) from exc


log = structlog.get_logger("indexer.ingest")

cached_root_seed: Callable[[str, str | None, str | None], int] = functools.lru_cache(4096)(
    root_seed
)


def stored_block_size(batch: EventBatch) -> int | None:
    """The block size of the batch's last token-carrying store, if any."""
    for event in reversed(batch.events):
        if isinstance(event, BlockStored) and event.token_ids:
            return event.block_size
    return None


def _names_full_group0(events: list[Event]) -> bool:
    """Whether a hybrid rank's batch says its group 0 is full attention: a GPU store of
    group 0 with tokens and no kind (the bridge leaves out `full_attention` there, so the
    batch stays bus schema 1 on plain models). Offload stores may omit the kind of any
    group, so only the engine's own GPU stores count."""
    return any(type(e) is BlockStored and not e.group and e.group_kind is None
               and not e.sliding_window and e.token_ids and e.medium == "gpu"
               for e in events)


class PresenceSink(Protocol):
    """Where a ledger's presence changes go (one bit position for many keys). A sink may
    also have a `presence_target`, a C object (kvcore._native.OpsWriter or BlockTable)
    whose bits the C store loop sets as the sink's `set_bits` would."""

    def set_bits(self, keys: list[int], bitpos: int) -> None: ...

    def clear_bits(self, keys: list[int], bitpos: int) -> None: ...

    def group_sink(self, group: int) -> PresenceSink:
        """The sink of KV-cache group `group` (> 0) of the same model."""
        ...

    def learn_group(self, group: int, kind: str | None, sliding_window: int) -> None:
        """A store named its KV-cache group, maybe with the group's attention kind and
        window (tokens); a group named without them keeps what was learned before."""
        ...


class Journal:
    """What one batch changed in a ledger, for backends that persist ledgers."""

    __slots__ = ("dirty", "ghost_pushed", "reset", "unghosted")

    def __init__(self) -> None:
        self.reset = False  # the ledger was emptied before the rest of the changes
        self.dirty: set[int] = set()  # engine hashes whose mapping or tiers changed
        self.ghost_pushed: list[int] = []  # became (most recent) ghosts, in order
        self.unghosted: set[int] = set()  # stopped being ghosts (stored again or trimmed)


class WorkerLedger:
    """Engine-hash map, held tiers, sequence position and health of one worker rank."""

    __slots__ = (
        "counts",
        "degraded",
        "dp_rank",
        "epoch",
        "ghost_capacity",
        "ghosts",
        "groups",
        "journal",
        "keys",
        "last_seq",
        "last_ts",
        "model",
        "named_group0",
        "owner",
        "root",
        "slot",
        "warned",
        "worker_id",
    )

    def __init__(
        self, model: str, worker_id: str, dp_rank: int, slot: int, ghost_capacity: int
    ) -> None:
        self.model = model
        self.worker_id = worker_id
        self.dp_rank = dp_rank
        self.slot = slot
        self.ghost_capacity = ghost_capacity
        # engine hash -> (key, mask of tiers holding it), held blocks and ghosts (mask 0)
        self.keys: EngineHashMap = new_ledger_map()
        self.ghosts: OrderedDict[int, None] = OrderedDict()  # oldest eviction first
        self.counts = [0] * len(TIERS)  # held blocks per tier
        self.epoch = -1
        self.last_seq = -1
        self.last_ts = 0.0
        self.degraded = False
        self.warned = False
        self.journal: Journal | None = None
        self.groups: dict[int, WorkerLedger] = {}  # KV-cache group > 0 -> its ledger
        self.owner: WorkerLedger | None = None  # of a group's ledger: the rank's (group 0)
        # This process applied a group-0 store of the rank naming a kind (in memory only).
        self.named_group0 = False
        self.root = cached_root_seed(model, None, None)  # the key before a plain root store

    def start_journal(self) -> None:
        """Record what the next changes do, for this rank and each of its groups."""
        self.journal = Journal()
        for ledger in self.groups.values():
            ledger.journal = Journal()

    def end_journal(self) -> None:
        self.journal = None
        for ledger in self.groups.values():
            ledger.journal = None

    @property
    def hybrid_on_gpu(self) -> bool:
        """Whether the rank has groups > 0 and holds group-0 blocks on the GPU."""
        return bool(self.groups) and self.counts[0] > 0

    def group_ledger(self, group: int) -> WorkerLedger:
        found = self.groups.get(group)
        if found is None:
            # No ghosts of its own: a group's child resolves an evicted parent through
            # the rank's other groups (group 0 keeps its ghosts).
            found = WorkerLedger(self.model, self.worker_id, self.dp_rank, self.slot, 0)
            found.owner = self
            if self.journal is not None:
                found.journal = Journal()
            self.groups[group] = found
        return found

    # --- batches -----------------------------------------------------------------------

    def check(self, batch: EventBatch) -> ApplyOutcome:
        """Whether `batch` would be applied, without changing anything."""
        if batch.epoch < self.epoch:
            return ApplyOutcome.STALE_EPOCH
        if batch.epoch == self.epoch and batch.seq <= self.last_seq:
            return ApplyOutcome.DUPLICATE
        return ApplyOutcome.APPLIED

    def apply(
        self,
        batch: EventBatch,
        sink: PresenceSink,
        stats: IndexStats,
        on_resync: ResyncHook | None,
    ) -> ApplyOutcome:
        was_hybrid = bool(self.groups)
        if batch.epoch == self.epoch and batch.seq == self.last_seq + 1:
            outcome = ApplyOutcome.APPLIED  # the usual batch: the next of its epoch
        else:
            outcome = self._start(batch, sink, stats, on_resync)
            if not outcome.applied:
                return outcome
        events, keys = batch.events, self.keys
        if FAST_STORES and type(keys) is LedgerMap:
            # The plain stores in C (store_plain: what `_store` does for them), up to the
            # first other event; `_apply_rest` takes it from there.
            journal = self.journal
            i, added = store_plain(keys, events, 0, self.root, self.slot,
                                   getattr(sink, "presence_target", None) or sink, self.counts,
                                   journal.dirty if journal is not None else None,
                                   BlockStored, _TIER_SLOTS)
            stats.blocks_stored += added
            if i < len(events):
                self._apply_rest(events, i, sink, stats, on_resync)
        else:
            for event in events:
                self._apply_event(event, sink, stats, on_resync)
        self.last_seq = batch.seq
        self.last_ts = batch.ts
        if len(self.ghosts) > self.ghost_capacity:
            self._trim_ghosts()
        if self.groups:
            for group_ledger in self.groups.values():
                group_ledger._trim_ghosts()
            # Group 0 is full attention when its GPU stores name no kind: said by this
            # batch's, or (the first batch of groups > 0 may come after them) by the
            # group-0 GPU blocks held when the rank turns hybrid, none of them named.
            if ((not was_hybrid and self.hybrid_on_gpu and not self.named_group0)
                    or _names_full_group0(events)):
                sink.learn_group(0, None, 0)
        stats.batches_applied += 1
        stats.events_applied += len(batch.events)
        return outcome

    def _start(
        self,
        batch: EventBatch,
        sink: PresenceSink,
        stats: IndexStats,
        on_resync: ResyncHook | None,
    ) -> ApplyOutcome:
        """The outcome of a batch that is not the next of the current epoch; one to apply
        (after a gap, or the first of an epoch) finds the ledger ready for its events."""
        outcome = self.check(batch)
        if outcome is ApplyOutcome.STALE_EPOCH:
            stats.stale += 1
            return outcome
        if outcome is ApplyOutcome.DUPLICATE:
            stats.duplicates += 1
            return outcome
        # A new epoch (or a rank seen for the first time) starts at seq 0.
        expected = self.last_seq + 1 if batch.epoch == self.epoch else 0
        if batch.seq - expected > MAX_SEQ_JUMP and not starts_with_clear(batch):
            stats.drop("seq_jump")
            self._ask_resync(batch, on_resync, "seq_jump")
            return ApplyOutcome.SEQ_JUMP
        if batch.seq != expected:
            outcome = ApplyOutcome.APPLIED_AFTER_GAP
            # Asked here, not only by whoever reads the outcome: a call that fails after
            # Redis committed this batch makes its retry see a duplicate, not the gap.
            self._ask_resync(batch, on_resync, "sequence_gap")
        if batch.epoch != self.epoch:
            if self.epoch >= 0:
                log.info("worker_new_epoch", worker=self.worker_id, dp_rank=self.dp_rank,
                         old_epoch=self.epoch, epoch=batch.epoch)
            if self.epoch >= 0:
                self.clear(sink)
            self.epoch = batch.epoch
            self.last_seq = -1
        return outcome

    def _apply_event(
        self, event: Event, sink: PresenceSink, stats: IndexStats, on_resync: ResyncHook | None
    ) -> None:
        if isinstance(event, BlockStored):
            group = event.group
            if group or event.group_kind is not None or event.sliding_window:
                sink.learn_group(group, event.group_kind, event.sliding_window)
                self.named_group0 = self.named_group0 or not group
            if group:
                self.group_ledger(group)._store(event, sink.group_sink(group), stats,
                                                on_resync)
            else:
                self._store(event, sink, stats, on_resync)
        elif isinstance(event, BlockRemoved):
            if event.group:
                self.group_ledger(event.group)._remove(
                    event, sink.group_sink(event.group), stats)
            else:
                self._remove(event, sink, stats)
        elif isinstance(event, AllBlocksCleared):
            self.clear(sink)

    def _apply_rest(
        self, events: list[Event], start: int, sink: PresenceSink, stats: IndexStats,
        on_resync: ResyncHook | None,
    ) -> None:
        """`_apply_event` of events[start], an event store_plain stopped before (untouched),
        then store_plain again after it, and so on to the end."""
        keys = self.keys
        assert type(keys) is LedgerMap  # as `apply` found it
        target = getattr(sink, "presence_target", None) or sink
        journal = self.journal
        dirty = journal.dirty if journal is not None else None
        i, n = start, len(events)
        while i < n:
            self._apply_event(events[i], sink, stats, on_resync)
            i, added = store_plain(keys, events, i + 1, self.root, self.slot, target,
                                   self.counts, dirty, BlockStored, _TIER_SLOTS)
            stats.blocks_stored += added

    def clear(self, sink: PresenceSink) -> None:
        """Drop every held block and the whole engine-hash map; health starts afresh.

        Group ledgers are emptied but kept: the rank stays hybrid (scored by its groups)."""
        for group, group_ledger in self.groups.items():
            group_ledger.clear(sink.group_sink(group))
        for tier in range(len(TIERS)):
            if self.counts[tier]:
                held = self.keys.held_keys(1 << tier)
                sink.clear_bits(held, self.slot * TIER_BITS + tier)
        self.keys.clear()
        self.ghosts.clear()
        self.counts = [0] * len(TIERS)
        self.degraded = False
        self.warned = False
        if self.journal is not None:
            self.journal.reset = True
            self.journal.dirty.clear()
            self.journal.ghost_pushed.clear()
            self.journal.unghosted.clear()

    # --- events ------------------------------------------------------------------------

    def _store(
        self,
        event: BlockStored,
        sink: PresenceSink,
        stats: IndexStats,
        on_resync: ResyncHook | None,
    ) -> None:
        tier = tier_index(event.medium)
        hashes = event.block_hashes
        if event.token_ids:
            if event.parent_hash is None:
                seed = cached_root_seed(self.model, event.lora_name, event.cache_salt)
            else:
                parent = self.keys.get(event.parent_hash)  # the usual case, inlined
                if parent is None:
                    parent = self._parent_key(event.parent_hash)
                if parent is None:
                    (self.owner or self)._unknown_parent(event, stats, on_resync)
                    return
                seed = parent
            new_keys = block_keys(event.token_ids, event.block_size, seed, event.extra_keys)
        else:
            hashes, new_keys = self._resolve_known(hashes, stats)
        bit = 1 << tier
        if len(hashes) == len(new_keys) and self.keys.add_new(hashes, new_keys, bit):
            # The usual store: every block is new to this rank (neither held nor a ghost),
            # so each one is simply added.
            added = new_keys
        else:
            added = self._store_each(hashes, new_keys, bit, sink)
        if added:
            sink.set_bits(added, self.slot * TIER_BITS + tier)
            self.counts[tier] += len(added)
            stats.blocks_stored += len(added)
        if self.journal is not None:
            self.journal.dirty.update(hashes)

    def _parent_key(self, engine_hash: int) -> int | None:
        """The key of a parent block: engine hashes name the same content in every group
        of a rank, so a group that evicted the parent resolves it through another."""
        key = self.keys.get(engine_hash)
        if key is not None:
            return key
        rank = self.owner or self
        for ledger in (rank, *rank.groups.values()):
            key = ledger.keys.get(engine_hash)
            if key is not None:
                return key
        return None

    def _store_each(
        self, hashes: list[int], new_keys: list[int], bit: int, sink: PresenceSink
    ) -> list[int]:
        """Store block by block (re-stores, ghosts, changed content); returns keys added."""
        entries = self.keys
        added: list[int] = []
        for h, key in zip(hashes, new_keys, strict=True):
            old = entries.get(h)
            mask = entries.tiers_of(h)
            if old is not None:
                if not mask:
                    self._unghost(h)
                elif old != key:
                    self._forget(old, mask, sink)
                    mask = 0
            if not mask & bit:
                entries.put(h, key, mask | bit)
                added.append(key)
        return added

    def _resolve_known(self, hashes: list[int], stats: IndexStats) -> tuple[list[int], list[int]]:
        """Token-less (offload) stores name blocks by engine hash only."""
        known_hashes: list[int] = []
        known_keys: list[int] = []
        lookup = self._parent_key if self.owner is not None else self.keys.get
        for h in hashes:
            key = lookup(h)
            if key is None:
                stats.drop("unknown_block")
            else:
                known_hashes.append(h)
                known_keys.append(key)
        return known_hashes, known_keys

    def _remove(self, event: BlockRemoved, sink: PresenceSink, stats: IndexStats) -> None:
        tier = tier_index(event.medium)
        removed, touched, ghosted, unknown = self.keys.drop_tier(event.block_hashes, 1 << tier)
        if unknown:
            stats.drop("unknown_block", unknown)
        ghosts = self.ghosts
        for h in ghosted:
            ghosts[h] = None
        journal = self.journal
        if journal is not None:
            journal.ghost_pushed += ghosted
            journal.dirty.update(touched)
        if removed:
            sink.clear_bits(removed, self.slot * TIER_BITS + tier)
            self.counts[tier] -= len(removed)
            stats.blocks_removed += len(removed)

    def _forget(self, key: int, mask: int, sink: PresenceSink) -> None:
        """An engine hash now names other content: the old key's presence (`mask`) goes."""
        for tier in range(len(TIERS)):
            if mask & (1 << tier):
                sink.clear_bits([key], self.slot * TIER_BITS + tier)
                self.counts[tier] -= 1

    def _unghost(self, engine_hash: int) -> None:
        """A ghost is stored again: it is live, no longer an eviction to remember."""
        if self.ghosts.pop(engine_hash, 0) is None and self.journal is not None:
            self.journal.unghosted.add(engine_hash)

    def _trim_ghosts(self) -> None:
        ghosts, entries = self.ghosts, self.keys
        journal = self.journal
        while len(ghosts) > self.ghost_capacity:
            h, _ = ghosts.popitem(last=False)
            entries.discard(h)
            if journal is not None:
                journal.unghosted.add(h)
                journal.dirty.add(h)

    def _unknown_parent(
        self, event: BlockStored, stats: IndexStats, on_resync: ResyncHook | None
    ) -> None:
        stats.drop("unknown_parent")
        if not self.warned:
            self.warned = True
            log.warning("unknown_parent", model=self.model, worker=self.worker_id,
                        dp_rank=self.dp_rank, epoch=self.epoch, parent=event.parent_hash,
                        blocks=len(event.block_hashes))
        if not self.degraded:
            self.degraded = True
            stats.resyncs_requested += 1
            if on_resync is not None:
                on_resync(ResyncRequest(self.model, self.worker_id, self.dp_rank, self.epoch,
                                        "unknown_parent"))

    def _ask_resync(self, batch: EventBatch, on_resync: ResyncHook | None, reason: str) -> None:
        if on_resync is not None:
            on_resync(ResyncRequest(batch.model, batch.worker_id, batch.dp_rank, batch.epoch,
                                    reason))

    # --- persistence -------------------------------------------------------------------

    def to_log(self) -> bytes:
        """The whole map and ghost order as a log snapshot, then each group's."""
        parts = [self._own_log()]
        for group, ledger in sorted(self.groups.items()):
            parts += [LOG_HASH.pack(b"Y", group), ledger._own_log()]
        if self.groups:
            parts.append(LOG_HASH.pack(b"Y", 0))
        return b"".join(parts)

    def _own_log(self) -> bytes:
        return b"".join([self.keys.log_records(), *[LOG_HASH.pack(b"G", h) for h in self.ghosts]])

    def pack_log(self, hashes: Iterable[int]) -> bytes:
        """The log records of these engine hashes: M (mapped, with tiers) or D (gone)."""
        return self.keys.pack_log(hashes)

    def load_log(self, data: bytes) -> None:
        """Replay a log into the map and ghosts (raises LedgerLogError if corrupt)."""
        target = self
        entries, ghosts = self.keys, self.ghosts
        view = memoryview(data)
        pos, end = 0, len(view)
        try:
            while pos < end:
                tag = view[pos]
                if tag == 0x59:  # Y
                    _, group = LOG_HASH.unpack_from(view, pos)
                    if group > MAX_GROUP:
                        raise LedgerLogError(f"group {group} out of range at byte {pos}")
                    target = self.group_ledger(group) if group else self
                    entries, ghosts = target.keys, target.ghosts
                    pos += LOG_HASH.size
                    continue
                if tag == 0x4E:  # N
                    pos = _load_run(entries, view, pos)
                    continue
                if tag == 0x4D:  # M
                    _, h, key, mask = LOG_MAP.unpack_from(view, pos)
                    if mask > 0xF:
                        raise LedgerLogError(f"tier mask {mask} out of range at byte {pos}")
                    entries.put(h, key, mask)
                    pos += LOG_MAP.size
                    continue
                _, h = LOG_HASH.unpack_from(view, pos)
                if tag == 0x44:  # D
                    entries.discard(h)
                    ghosts.pop(h, None)
                elif tag == 0x55:  # U
                    ghosts.pop(h, None)
                elif tag == 0x47:  # G
                    ghosts[h] = None
                    ghosts.move_to_end(h)
                else:
                    raise LedgerLogError(f"unknown ledger log tag {tag} at byte {pos}")
                pos += LOG_HASH.size
        except struct.error as exc:
            raise LedgerLogError(f"truncated ledger log at byte {pos}") from exc

    def export(self) -> RankState:
        return RankState(self.model, self.worker_id, self.dp_rank, self.epoch, self.last_seq,
                         self.last_ts, self.degraded, self.to_log())

    def restore(self, state: RankState, sink: PresenceSink) -> None:
        """Replace this rank's state by a snapshot of it, presence included."""
        self.clear(sink)
        self.load_log(state.log)
        self.epoch, self.last_seq, self.last_ts = state.epoch, state.last_seq, state.last_ts
        self.degraded = self.warned = state.degraded
        self._set_held(sink)
        for group, ledger in self.groups.items():
            ledger._set_held(sink.group_sink(group))

    def _set_held(self, sink: PresenceSink) -> None:
        """Presence of every held block, and the counts, from the map (after a load)."""
        for tier in range(len(TIERS)):
            held = self.keys.held_keys(1 << tier)
            self.counts[tier] = len(held)
            if held:
                sink.set_bits(held, self.slot * TIER_BITS + tier)

    # --- views -------------------------------------------------------------------------

    def blocks_by_tier(self) -> dict[str, int]:
        return {name: n for name, n in zip(TIERS, self.counts, strict=True) if n}
