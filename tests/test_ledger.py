"""Ingest rules pinned on hand-built histories (the contract suite covers the space)."""

from __future__ import annotations

from indexer.index.memory import SyncMemoryIndex
from indexer.index.protocol import ApplyOutcome, IndexConfig, ResyncRequest, ScoreQuery
from kvcore.bus import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
)
from kvcore.keys import block_keys_for_tokens
from tests.support.ledger_batches import BS, MODEL, TOKENS, batch, stored


def matched(index: SyncMemoryIndex, worker: str = "w") -> int:
    keys = block_keys_for_tokens(TOKENS, BS, MODEL)
    scores = index.score(ScoreQuery(model=MODEL, block_keys=keys)).scores
    return next((s.matched_blocks for s in scores if s.worker_id == worker), 0)


class TestGhosts:
    """Evicted blocks keep their engine-hash mapping, up to ghost_capacity, oldest out first."""

    def test_child_of_evicted_parent_resolves_within_capacity(self) -> None:
        """A child stored after its parent was evicted chains from the remembered key."""
        index = SyncMemoryIndex(IndexConfig(ghost_capacity=2))
        index.apply([batch(0, stored(1, 2)), batch(1, BlockRemoved(block_hashes=[2, 1]))])
        index.apply([batch(2, stored(1, 1), stored(3, 3, parent=2))])
        assert index.stats().dropped == {}
        assert matched(index) == 1  # block 2 is gone, so the prefix stops after block 1
        assert index.presence(MODEL).keys() == {
            *block_keys_for_tokens(TOKENS[: 1 * BS], BS, MODEL),
            block_keys_for_tokens(TOKENS[: 3 * BS], BS, MODEL)[2],
        }

    def test_capacity_is_exact(self) -> None:
        """With capacity 1 the older of two ghosts is forgotten: its child is an unknown parent."""
        index = SyncMemoryIndex(IndexConfig(ghost_capacity=1))
        index.apply([batch(0, stored(1, 2)), batch(1, BlockRemoved(block_hashes=[2, 1]))])
        index.apply([batch(2, stored(3, 3, parent=2))])
        assert index.stats().dropped == {"unknown_parent": 1}
        index.apply([batch(3, stored(2, 2, parent=1))])  # hash 1 is the newest ghost: kept
        assert index.stats().dropped == {"unknown_parent": 1}

    def test_restored_ghost_is_not_forgotten(self) -> None:
        """A ghost stored again is live: trimming the FIFO does not drop its mapping."""
        index = SyncMemoryIndex(IndexConfig(ghost_capacity=0))
        index.apply([batch(0, stored(1, 1), BlockRemoved(block_hashes=[1]), stored(1, 1))])
        index.apply([batch(1, stored(2, 2, parent=1))])
        assert index.stats().dropped == {}
        assert matched(index) == 2


class TestUnknownParent:
    """An unknown parent is counted, logged once per epoch, degrades the worker, asks resync."""

    def test_counted_degraded_and_resync_once(self) -> None:
        """Two orphans: two drops, one resync request, worker degraded until cleared."""
        requests: list[ResyncRequest] = []
        index = SyncMemoryIndex(on_resync=requests.append)
        index.apply([batch(0, stored(3, 3, parent=2)), batch(1, stored(4, 4, parent=3))])
        assert index.stats().dropped == {"unknown_parent": 2}
        assert requests == [ResyncRequest(MODEL, "w", 0, 1, "unknown_parent")]
        assert index.workers()[0].degraded
        index.apply([batch(2, AllBlocksCleared())])
        assert not index.workers()[0].degraded
        index.apply([batch(3, stored(5, 5, parent=4))])
        assert len(requests) == 2


class TestEpochsAndSequence:
    """(epoch, seq) decides what is applied: once each, newest epoch wins."""

    def test_duplicate_and_stale_change_nothing(self) -> None:
        """A replayed seq and an older epoch are skipped and counted."""
        index = SyncMemoryIndex()
        first = batch(0, stored(1, 3))
        assert index.apply([first, first]) == [ApplyOutcome.APPLIED, ApplyOutcome.DUPLICATE]
        assert index.apply([batch(0, stored(1, 6), epoch=2)]) == [ApplyOutcome.APPLIED]
        assert index.apply([batch(9, AllBlocksCleared(), epoch=1)]) == [ApplyOutcome.STALE_EPOCH]
        assert matched(index) == 6
        stats = index.stats()
        assert (stats.duplicates, stats.stale) == (1, 1)

    def test_new_epoch_forgets_old_blocks_and_hashes(self) -> None:
        """After an engine restart old blocks are gone and old engine hashes do not resolve."""
        index = SyncMemoryIndex()
        index.apply([batch(0, stored(1, 3))])
        index.apply([batch(0, stored(4, 4, parent=3), epoch=2)])
        assert matched(index) == 0
        assert index.stats().dropped == {"unknown_parent": 1}

    def test_dp_ranks_are_independent(self) -> None:
        """Rank 1's clear leaves rank 0's blocks alone."""
        index = SyncMemoryIndex()
        index.apply([batch(0, stored(1, 2), rank=0), batch(0, stored(1, 4), rank=1)])
        index.apply([batch(1, AllBlocksCleared(), rank=1)])
        scores = index.score(ScoreQuery(model=MODEL, block_keys=block_keys_for_tokens(
            TOKENS, BS, MODEL))).scores
        assert [(s.dp_rank, s.matched_blocks) for s in scores] == [(0, 2)]


class TestTiers:
    """Offload events move copies between tiers by engine hash; weights follow the best tier."""

    def test_offload_then_gpu_eviction_keeps_cpu_copy(self) -> None:
        """GPU copy removed, CPU copy stays: still matched, weighted 0.8 per block."""
        index = SyncMemoryIndex()
        index.apply([batch(0, stored(1, 2), BlockStored(block_hashes=[1, 2], medium="CPU"),
                           BlockRemoved(block_hashes=[1, 2], medium="GPU"))])
        keys = block_keys_for_tokens(TOKENS, BS, MODEL)
        (score,) = index.score(ScoreQuery(model=MODEL, block_keys=keys)).scores
        assert (score.matched_blocks, score.blocks_by_tier) == (2, {"cpu": 2})
        assert abs(score.weighted_score - 1.6) < 1e-9

    def test_offload_of_unknown_hash_is_counted(self) -> None:
        """A token-less store naming a hash the worker never stored is a counted drop."""
        index = SyncMemoryIndex()
        index.apply([batch(0, BlockStored(block_hashes=[77], medium="cpu"))])
        assert index.stats().dropped == {"unknown_block": 1}
        assert index.presence(MODEL) == {}


class TestIdentityChains:
    """The salt and adapter root a chain; children inherit them through the parent's key."""

    def test_child_inherits_the_root_of_its_parent(self) -> None:
        """A child stored in a later batch, naming no salt (vLLM sends it on the first block
        only) or repeating it (SGLang), chains from its salted parent: the whole prompt
        matches a query with that salt, nothing matches one without."""
        for child_salt in (None, "tenant-a"):
            index = SyncMemoryIndex(IndexConfig())
            root = stored(1, 2)
            root.cache_salt, root.lora_name = "tenant-a", "ad"
            child = stored(3, 3, parent=2)
            child.cache_salt, child.lora_name = child_salt, "ad"
            index.apply([batch(0, root)])
            index.apply([batch(1, child)])
            salted = block_keys_for_tokens(TOKENS[: 3 * BS], BS, MODEL, lora_name="ad",
                                           cache_salt="tenant-a")
            assert index.presence(MODEL).keys() == set(salted)
            for lora, salt, blocks in (("ad", "tenant-a", 3), ("ad", None, 0),
                                       (None, "tenant-a", 0), ("ad", "tenant-b", 0)):
                query = ScoreQuery(model=MODEL, token_ids=TOKENS[: 3 * BS], block_size=BS,
                                   lora_name=lora, cache_salt=salt)
                scores = index.score(query).scores
                assert next((s.matched_blocks for s in scores), 0) == blocks, (lora, salt)
