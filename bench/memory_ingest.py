"""In-memory ingest alone: blocks/s of `SyncMemoryIndex.apply`, timed as
bench/memory_vs_dynamo.py times ours (a fresh index fed prebuilt bus batches, GC collected
and frozen first), without Dynamo installed. Best of `--rounds`.

For a same-load A/B of two checkouts, run it from each in turn (it imports the checkout
in the current directory), e.g.
    (cd /tmp/base && .venv/bin/python /path/to/bench/memory_ingest.py --workers 1024)
`--cache DIR` shares bench/redis_ingest.py's pickled batches.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())  # the checkout the command runs from

from bench.redis_ingest import batches_of
from indexer.index.memory import SyncMemoryIndex
from kvcore.bus import EventBatch


def timed_apply(batches: list[EventBatch]) -> tuple[SyncMemoryIndex, float]:
    """bench/memory_vs_dynamo.py's: a fresh index fed `batches`, and the seconds it took
    (collected, then frozen: the run pays GC only for what it creates)."""
    gc.collect()
    gc.freeze()
    try:
        start = time.perf_counter_ns()
        index = SyncMemoryIndex()
        index.apply(batches)
        return index, (time.perf_counter_ns() - start) / 1e9
    finally:
        gc.unfreeze()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=1024)
    parser.add_argument("--blocks", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=None,
                        help="a directory keeping the generated batches between runs")
    args = parser.parse_args()
    batches, blocks = batches_of(args.workers, args.blocks, args.cache)
    best = 0.0
    for _ in range(args.rounds):
        index, seconds = timed_apply(batches)
        if index.stats().blocks_stored != blocks:
            raise SystemExit(f"stored {index.stats().blocks_stored} of {blocks} blocks")
        best = max(best, blocks / seconds)
        del index
    print(f"{args.workers:,} ranks, {blocks:,} blocks: memory ingest {best:,.0f} blocks/s "
          f"(best of {args.rounds})")


if __name__ == "__main__":
    main()
