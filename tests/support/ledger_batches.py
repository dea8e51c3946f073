"""Hand-built EventBatches over one six-block prompt, for the ingest-rule and Redis
ledger suites: engine hash of block i = i, so histories read like the rules they pin."""

from __future__ import annotations

from kvcore.bus import SCHEMA_VERSION, BlockStored, Event, EventBatch, pack_tokens

MODEL = "m"
BS = 4
TOKENS = list(range(100, 100 + 6 * BS))  # six blocks: engine hashes 1..6


def batch(seq: int, *events: Event, epoch: int = 1, worker: str = "w", rank: int = 0) -> EventBatch:
    return EventBatch(schema=SCHEMA_VERSION, model=MODEL, worker_id=worker, dp_rank=rank,
                      epoch=epoch, seq=seq, events=list(events))


def stored(first: int, last: int, parent: int | None = None, medium: str = "gpu") -> BlockStored:
    """Blocks first..last (1-based) of TOKENS, engine hashes equal to their position."""
    return BlockStored(block_hashes=list(range(first, last + 1)), parent_hash=parent,
                       token_ids=pack_tokens(TOKENS[(first - 1) * BS : last * BS]),
                       block_size=BS, medium=medium)
