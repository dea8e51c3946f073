"""Block-key throughput: keys for one 8,192-token prompt (512 blocks of 16).

    python -m bench.keys            (make bench-keys)

Measures kvcore.keys.block_keys from packed u32 bytes (the bus form, what the indexer
does per BlockStored event) and block_keys_for_tokens from a Python list (what a Score
request with token ids costs), plus Dynamo's compute_block_hash_for_seq when the
ai-dynamo-runtime package is importable, for contrast. Writes its section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

from kvcore.bus import pack_tokens
from kvcore.keys import NATIVE, block_keys, block_keys_for_tokens, block_keys_python, root_seed
from kvsim.report import verdict, write_section

N_TOKENS = 8_192
BLOCK_SIZE = 16
MODEL = "meta-llama/Llama-3.1-8B"
TARGET_US = 100.0  # median, packed bytes


def measure(fn: Callable[[], Any], runs: int, warmup: int = 200) -> list[float]:
    """Wall time of each of `runs` calls, in microseconds (GC paused while timing)."""
    for _ in range(warmup):
        fn()
    timings: list[float] = []
    clock = time.perf_counter_ns
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(runs):
            start = clock()
            fn()
            timings.append((clock() - start) / 1_000)
    finally:
        if gc_was_enabled:
            gc.enable()
    return timings


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def dynamo_hasher() -> Callable[[list[int], int], Any] | None:
    try:
        from dynamo._core import compute_block_hash_for_seq
    except ImportError:
        return None
    return compute_block_hash_for_seq


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3_000, help="timed calls per row (>= 2000)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    runs = max(args.runs, 2_000)

    load_before = os.getloadavg()[0]
    rng = random.Random(0)
    tokens = [rng.randrange(0, 151_936) for _ in range(N_TOKENS)]
    packed = pack_tokens(tokens)
    seed = root_seed(MODEL)
    n_blocks = N_TOKENS // BLOCK_SIZE
    assert len(block_keys(packed, BLOCK_SIZE, seed)) == n_blocks
    assert block_keys(packed, BLOCK_SIZE, seed) == block_keys_for_tokens(tokens, BLOCK_SIZE, MODEL)

    assert block_keys_python(packed, BLOCK_SIZE, seed) == block_keys(packed, BLOCK_SIZE, seed)
    loop = "C loop" if NATIVE else "Python loop: C extension not built"
    rows: list[tuple[str, list[float], float | None]] = [
        (f"`block_keys` (packed u32 bytes; {loop})",
         measure(lambda: block_keys(packed, BLOCK_SIZE, seed), runs), TARGET_US),
        (f"`block_keys_for_tokens` (Python list; {loop})",
         measure(lambda: block_keys_for_tokens(tokens, BLOCK_SIZE, MODEL), runs), None),
        ("`block_keys_python` (packed u32 bytes; the pure-Python fallback)",
         measure(lambda: block_keys_python(packed, BLOCK_SIZE, seed), runs), TARGET_US),
    ]
    dynamo = dynamo_hasher()
    if dynamo is not None:
        assert len(dynamo(tokens, BLOCK_SIZE)) == n_blocks
        rows.append(("Dynamo `compute_block_hash_for_seq` (list; per-block, not chained)",
                     measure(lambda: dynamo(tokens, BLOCK_SIZE), runs), None))

    lines = [
        f"{N_TOKENS:,} tokens = {n_blocks} blocks of {BLOCK_SIZE}; {runs:,} timed calls per row "
        f"after 200 warm-up calls, GC paused. 1-minute load average {load_before:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after, on {os.cpu_count()} cores (p99 is sensitive to it).",
        "",
        "| path | median µs | p99 µs | per block ns | target | result |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    met = True
    for label, timings, target in rows:
        median = statistics.median(timings)
        ok = target is None or median <= target
        met = met and ok
        target_cell = f"median ≤ {target:.0f} µs" if target is not None else "—"
        result_cell = verdict(ok) if target is not None else "—"
        lines.append(f"| {label} | {median:.1f} | {p99(timings):.1f} | "
                     f"{median * 1_000 / n_blocks:.0f} | {target_cell} | {result_cell} |")
    if dynamo is None:
        lines += ["", "Dynamo row skipped: `dynamo._core` is not importable "
                      "(install the `bench` extra)."]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("keys", "Block keys: 8,192 tokens", "make bench-keys", body)
    if not met:
        print(f"target missed: median from packed bytes above {TARGET_US:.0f} µs")


if __name__ == "__main__":
    main()
