"""A small, obviously-correct model of the index semantics, for the contract suite.

Written plainly from the documented rules (docs/architecture.md, "Consistency model"),
with no masks, slots or shared code paths beyond block-key hashing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from indexer.index.protocol import MAX_SEQ_JUMP, TIERS, TierWeights, WorkerRef, tier_index
from kvcore.bus import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch
from kvcore.keys import block_keys, root_seed


@dataclass
class RefWorker:
    epoch: int = -1
    last_seq: int = -1
    key_of: dict[int, int] = field(default_factory=dict)  # engine hash -> key
    held: dict[int, set[int]] = field(default_factory=dict)  # engine hash -> tiers
    ghosts: list[int] = field(default_factory=list)  # evicted, oldest first
    degraded: bool = False

    def clear(self) -> None:
        self.key_of.clear()
        self.held.clear()
        self.ghosts.clear()
        self.degraded = False


@dataclass
class ReferenceIndex:
    ghost_capacity: int
    workers: dict[tuple[str, WorkerRef], RefWorker] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    resyncs: int = 0

    def _drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def apply(self, batch: EventBatch) -> str:
        ref = WorkerRef(batch.worker_id, batch.dp_rank)
        worker = self.workers.setdefault((batch.model, ref), RefWorker())
        if batch.epoch < worker.epoch:
            return "stale_epoch"
        if batch.epoch == worker.epoch and batch.seq <= worker.last_seq:
            return "duplicate"
        expected = worker.last_seq + 1 if batch.epoch == worker.epoch else 0
        resync = bool(batch.events) and isinstance(batch.events[0], AllBlocksCleared)
        if batch.seq - expected > MAX_SEQ_JUMP and not resync:
            self._drop("seq_jump")
            return "seq_jump"
        outcome = "applied" if batch.seq == expected else "applied_after_gap"
        if batch.epoch != worker.epoch:
            worker.clear()
            worker.epoch = batch.epoch
        for event in batch.events:
            if isinstance(event, BlockStored):
                self._store(batch.model, worker, event)
            elif isinstance(event, BlockRemoved):
                self._remove(worker, event)
            elif isinstance(event, AllBlocksCleared):
                worker.clear()
        worker.last_seq = batch.seq
        while len(worker.ghosts) > self.ghost_capacity:
            h = worker.ghosts.pop(0)
            assert h not in worker.held
            del worker.key_of[h]
        return outcome

    def _store(self, model: str, worker: RefWorker, event: BlockStored) -> None:
        tier = tier_index(event.medium)
        if event.token_ids:
            if event.parent_hash is None:
                seed = root_seed(model, event.lora_name, event.cache_salt)
            elif event.parent_hash in worker.key_of:
                seed = worker.key_of[event.parent_hash]
            else:
                self._drop("unknown_parent")
                if not worker.degraded:
                    worker.degraded = True
                    self.resyncs += 1
                return
            keys = block_keys(event.token_ids, event.block_size, seed, event.extra_keys)
            pairs = list(zip(event.block_hashes, keys, strict=True))
        else:
            pairs = []
            for h in event.block_hashes:
                if h in worker.key_of:
                    pairs.append((h, worker.key_of[h]))
                else:
                    self._drop("unknown_block")
        for h, key in pairs:
            if h in worker.ghosts:
                worker.ghosts.remove(h)
            if worker.key_of.get(h, key) != key:
                worker.held.pop(h, None)
            worker.key_of[h] = key
            worker.held.setdefault(h, set()).add(tier)

    def _remove(self, worker: RefWorker, event: BlockRemoved) -> None:
        tier = tier_index(event.medium)
        for h in event.block_hashes:
            tiers = worker.held.get(h)
            if tiers is None or tier not in tiers:
                if h not in worker.key_of:
                    self._drop("unknown_block")
                continue
            tiers.discard(tier)
            if not tiers:
                del worker.held[h]
                worker.ghosts.append(h)

    # --- views -------------------------------------------------------------------------

    def tiers_at(self, worker: RefWorker, key: int) -> set[int]:
        found: set[int] = set()
        for h, tiers in worker.held.items():
            if worker.key_of[h] == key:
                found |= tiers
        return found

    def presence(self, model: str) -> dict[int, dict[WorkerRef, int]]:
        out: dict[int, dict[WorkerRef, int]] = {}
        for (m, ref), worker in self.workers.items():
            if m != model:
                continue
            for h, tiers in worker.held.items():
                mask = sum(1 << t for t in tiers)
                holders = out.setdefault(worker.key_of[h], {})
                holders[ref] = holders.get(ref, 0) | mask
        return out

    def score(
        self,
        model: str,
        keys: list[int],
        workers: frozenset[str] | None,
        weights: TierWeights,
        include_zero: bool,
    ) -> list[tuple[str, int, int, float, dict[str, int]]]:
        w = weights.as_tuple()
        rows = []
        for (m, ref), worker in self.workers.items():
            if m != model or (workers is not None and ref.worker_id not in workers):
                continue
            counts = [0] * len(TIERS)
            matched = 0
            for key in keys:
                tiers = self.tiers_at(worker, key)
                if not tiers:
                    break
                best = max(tiers, key=lambda t: (w[t], -t))
                counts[best] += 1
                matched += 1
            if matched or include_zero:
                by_tier = {TIERS[t]: c for t, c in enumerate(counts) if c}
                weighted = sum(w[t] * c for t, c in enumerate(counts))
                rows.append((ref.worker_id, ref.dp_rank, matched, weighted, by_tier))
        rows.sort(key=lambda r: (-r[2], -r[3], r[0], r[1]))
        return rows

    def blocks_by_tier(self, model: str, ref: WorkerRef) -> dict[str, int]:
        worker = self.workers[(model, ref)]
        counts = [0] * len(TIERS)
        for tiers in worker.held.values():
            for t in tiers:
                counts[t] += 1
        return {TIERS[t]: c for t, c in enumerate(counts) if c}
