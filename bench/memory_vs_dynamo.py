"""In-memory index vs Dynamo's RadixTree, in one process, on one workload.

    python -m bench.memory_vs_dynamo [--workers 64 1024 4096 --blocks 300000 1000000]

Ingest: ours is `SyncMemoryIndex.apply` on bus batches built up front but not keyed (the
ledger hashes the token bytes into chained keys during apply). Dynamo's is, per event,
`compute_block_hash_for_seq` on the event's tokens (prebuilt lists), the KvCacheEvent
JSON (msgspec, the fastest encoder measured here) and `RadixTree.apply_event`; its clock
stops after one `find_matches` has gone through the tree's queue, so queued work is paid.

Score: per 8,192-token prompt, ours is `SyncMemoryIndex.score` on the token ids (lazy hashing);
Dynamo's is `compute_block_hash_for_seq` + `find_matches`. Every query's per-worker matched
block counts must agree between the two, or the run fails (exit 1): the guard that both
sides did the same work.

It runs 300,000 then 1,000,000 blocks at the first `--workers` count, then the last
`--blocks` at each other count (64, 1,024 and 4,096 worker ranks by default; the workload's
64 shared system prompts make a query match ~60-290 ranks at 4,096); the first scale is
the headline, and a rank-scale table puts the counts side by side against the targets
(Score p50 <= 0.5x Dynamo's, ingest >= 1.5x).

Memory per (block, rank) entry: RSS growth over `--memory-entries` stored entries (2M),
each side in a fresh process (`--rss-probe`), at 64, 1,024 and 4,096 ranks.

Pool workload (shared storage pools): the same engine steps, each batch also offloading
the blocks it stores into one shared pool (which ends up holding every stored block), and
every other worker mounting it; ours scores with the mounts (`ScoreQuery.mounts`), and its
Score p50 there is held against Dynamo's p50 on the plain workload of the same run. Every
answer is checked against what the plain answers imply (a mounting worker matches the
longest prefix any worker holds).

Hybrid model (on the headline scale): the same workload as a hybrid-attention model, each
store also in a sliding-window group of 8 blocks that frees what left each chain's window
(`Workload.hybrid_batches`); ours scores by vLLM's rule over both groups, with no Dynamo
counterpart, so its Score p50 is held against Dynamo's p50 on the plain workload of the
same run. `--no-hybrid` leaves it out.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import msgspec
from dynamo._core import RadixTree, compute_block_hash_for_seq

from bench.workload import (
    DEFAULT_SEED,
    Workload,
    check_prefix_closed,
    dynamo_tokens,
    make_workload,
    pool_expected,
    pool_mounts,
    worker_name,
)
from indexer.index.memory import SyncMemoryIndex
from indexer.index.protocol import ScoreQuery
from kvcore.bus import EventBatch
from kvcore.keys import block_keys_for_tokens
from kvcore.pools import KIND_POOL
from kvsim.report import verdict, write_section

MODEL = "bench/model"
POOL = "shared-fs"
BLOCK_SIZE = 16
WARMUP_QUERIES = 50

_json = msgspec.json.encode


class _DynamoBlock(msgspec.Struct):
    """One block of Dynamo's KvCacheEvent JSON (encodes faster than a dict)."""

    block_hash: int
    tokens_hash: int


# worker, event id, parent hash, block hashes, tokens
DynamoEvent = tuple[int, int, int | None, list[int], list[int]]
Counts = dict[tuple[int, int], int]  # (worker, dp_rank) -> matched blocks


@dataclass
class Latencies:
    total_ns: list[int]
    hash_ns: list[int]

    def p(self, q: float, part: str = "total") -> float:
        values = sorted(self.total_ns if part == "total" else self.hash_ns)
        return values[min(len(values) - 1, int(q * len(values)))] / 1e3


@dataclass
class PoolResult:
    """Ours on the pool workload."""

    ingest_s: float
    blocks: int  # worker blocks and pool blocks applied
    pool_blocks: int
    mounting: int
    lat: Latencies
    mismatches: int


@dataclass
class ScaleResult:
    workload: Workload
    ours_ingest_s: list[float]
    dyn_ingest_s: list[float]
    ours_lat: Latencies
    dyn_lat: Latencies
    kinds: list[str]
    mismatches: int
    examples: list[str]
    gen_s: float
    pool: PoolResult
    counts: list[Counts]
    matching: float  # ranks matching per query, mean

    @property
    def ours_rate(self) -> float:
        """Best round: Dynamo's rounds vary a lot, so both sides get their best."""
        return self.workload.blocks / min(self.ours_ingest_s)

    @property
    def dyn_rate(self) -> float:
        return self.workload.blocks / min(self.dyn_ingest_s)

    @property
    def ingest_ratio(self) -> float:
        return self.ours_rate / self.dyn_rate

    @property
    def score_ratio(self) -> float:
        return self.ours_lat.p(0.5) / self.dyn_lat.p(0.5)

    @property
    def pool_score_ratio(self) -> float:
        """Ours on the pool workload against Dynamo on the plain one."""
        return self.pool.lat.p(0.5) / self.dyn_lat.p(0.5)


@contextmanager
def quiet_gc() -> Iterator[None]:
    """Collect, then freeze what exists: a timed phase pays GC only for what it creates.

    Without this the cyclic GC rescans the benchmark's own scaffolding (workload, batches,
    Dynamo's prebuilt inputs: millions of objects) at random points of either side.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


# --- ingest ----------------------------------------------------------------------------


def dynamo_events(workload: Workload) -> list[DynamoEvent]:
    """Dynamo's inputs, prebuilt like ours: per event its tokens as a list of ints."""
    next_id = [0] * workload.params.n_workers
    out: list[DynamoEvent] = []
    for step in workload.steps:
        w = step.worker
        for op in step.events:
            out.append((w, next_id[w], op.parent_hash, op.block_hashes, dynamo_tokens(op)))
            next_id[w] += 1
    return out


def timed_apply(batches: list[EventBatch]) -> tuple[SyncMemoryIndex, float]:
    """A fresh index fed `batches`, and the seconds it took (GC quiet)."""
    with quiet_gc():
        t0 = time.perf_counter_ns()
        index = SyncMemoryIndex()
        index.apply(batches)
        return index, (time.perf_counter_ns() - t0) / 1e9


def ingest_ours(workload: Workload) -> tuple[SyncMemoryIndex, float]:
    index, elapsed = timed_apply(workload.batches(MODEL))
    stats = index.stats()
    if stats.blocks_stored != workload.blocks or stats.dropped:
        raise SystemExit(f"our index stored {stats.blocks_stored} of {workload.blocks} blocks, "
                         f"dropped {stats.dropped}")
    return index, elapsed


def ingest_dynamo(events: Sequence[DynamoEvent]) -> tuple[Any, float]:
    hash_seq, enc, block = compute_block_hash_for_seq, _json, _DynamoBlock
    with quiet_gc():
        t0 = time.perf_counter_ns()
        tree = RadixTree()
        apply = tree.apply_event
        for worker, event_id, parent, hashes, tokens in events:
            blocks = list(map(block, hashes, hash_seq(tokens, BLOCK_SIZE)))
            apply(worker, enc({"event_id": event_id,
                               "data": {"stored": {"parent_hash": parent, "blocks": blocks}}}))
        tree.find_matches([0])  # through the tree's queue: everything before it is applied
        elapsed = (time.perf_counter_ns() - t0) / 1e9
    return tree, elapsed


# --- score -----------------------------------------------------------------------------


def score_ours(
    index: SyncMemoryIndex, numbers: dict[str, int], tokens: list[int]
) -> tuple[Counts, int, int]:
    t0 = time.perf_counter_ns()
    # Token ids straight in: the index hashes lazily, only while some worker still matches.
    result = index.score(ScoreQuery(model=MODEL, token_ids=tokens, block_size=BLOCK_SIZE))
    t1 = time.perf_counter_ns()
    counts = {(numbers[s.worker_id], s.dp_rank): s.matched_blocks for s in result.scores}
    # Hashing cost on our side, measured apart (all 512 blocks, eagerly), for the table only.
    t2 = time.perf_counter_ns()
    block_keys_for_tokens(tokens, BLOCK_SIZE, MODEL)
    t3 = time.perf_counter_ns()
    return counts, t1 - t0, t3 - t2


def score_dynamo(tree: Any, tokens: list[int]) -> tuple[Counts, int, int]:
    t0 = time.perf_counter_ns()
    hashes = compute_block_hash_for_seq(tokens, BLOCK_SIZE)
    t1 = time.perf_counter_ns()
    scores = tree.find_matches(hashes).scores
    t2 = time.perf_counter_ns()
    return {k: v for k, v in scores.items() if v}, t2 - t0, t1 - t0


def run_queries(
    fn: Callable[[list[int]], tuple[Counts, int, int]], queries: list[list[int]]
) -> tuple[list[Counts], Latencies]:
    for tokens in queries[:WARMUP_QUERIES]:
        fn(tokens)
    results: list[Counts] = []
    lat = Latencies([], [])
    with quiet_gc():
        for tokens in queries:
            counts, total, hashing = fn(tokens)
            results.append(counts)
            lat.total_ns.append(total)
            lat.hash_ns.append(hashing)
    return results, lat


# --- the pool workload ------------------------------------------------------------------


def run_pool_workload(workload: Workload, numbers: dict[str, int],
                      plain: list[Counts]) -> PoolResult:
    """Ingest the pool workload, score it with the mounts, check every answer."""
    index, ingest_s = timed_apply(workload.pool_batches(MODEL, POOL))
    stats = index.stats()
    if stats.dropped:
        raise SystemExit(f"pool workload: our index dropped {stats.dropped}")
    pool_blocks = sum(w.blocks_by_tier.get("storage", 0) for w in index.workers(MODEL)
                      if w.kind == KIND_POOL)
    mounts = pool_mounts(workload.params.n_workers, POOL)
    names = {number: name for name, number in numbers.items()}

    def score(tokens: list[int]) -> tuple[Counts, int, int]:
        t0 = time.perf_counter_ns()
        result = index.score(ScoreQuery(model=MODEL, token_ids=tokens, block_size=BLOCK_SIZE,
                                        mounts=mounts))
        t1 = time.perf_counter_ns()
        return ({(numbers[s.worker_id], s.dp_rank): s.matched_blocks for s in result.scores},
                t1 - t0, 0)

    counts, lat = run_queries(score, workload.queries)
    mismatches = 0
    for got, base in zip(counts, plain, strict=True):
        expected = pool_expected({names[w]: n for (w, _), n in base.items()}, mounts)
        if {names[w]: n for (w, _), n in got.items()} != {k: v for k, v in expected.items()
                                                            if v}:
            mismatches += 1
    print(f"  pool workload: ingest {ingest_s:.2f} s, pool of {pool_blocks:,} blocks, "
          f"{len(mounts)} of {workload.params.n_workers} workers mount it; score p50 "
          f"{lat.p(0.5):,.0f} us, p99 {lat.p(0.99):,.0f} us; mismatches {mismatches}")
    return PoolResult(ingest_s, workload.blocks + pool_blocks, pool_blocks, len(mounts), lat,
                      mismatches)


# --- one scale -------------------------------------------------------------------------


def run_scale(n_workers: int, blocks: int, n_queries: int, seed: int, rounds: int) -> ScaleResult:
    print(f"\n== {n_workers} workers, >= {blocks:,} blocks, {n_queries} queries, seed {seed}")
    t0 = time.perf_counter()
    workload = make_workload(n_workers, blocks, seed, n_queries=n_queries)
    check_prefix_closed(workload.steps)
    gen_s = time.perf_counter() - t0
    for key, value in workload.describe().items():
        print(f"  {key:26} {value}")
    print(f"  (generated in {gen_s:.1f} s)")
    numbers = {worker_name(w): w for w in range(n_workers)}  # ours -> Dynamo's worker id

    events = dynamo_events(workload)
    ours_s: list[float] = []
    dyn_s: list[float] = []
    index: SyncMemoryIndex | None = None
    tree: Any = None
    for r in range(rounds):
        # Alternate who goes first; keep only the last index/tree of each side.
        order = ("ours", "dynamo") if r % 2 == 0 else ("dynamo", "ours")
        for side in order:
            if side == "ours":
                index = None
                index, s = ingest_ours(workload)
                ours_s.append(s)
            else:
                tree = None
                tree, s = ingest_dynamo(events)
                dyn_s.append(s)
            print(f"  ingest round {r + 1} {side:6} {s:7.3f} s  "
                  f"{workload.blocks / s / 1e6:6.3f} M blocks/s")
    assert index is not None
    del events
    gc.collect()

    queries = workload.queries
    live_tree = tree
    ours_counts, ours_lat = run_queries(functools.partial(score_ours, index, numbers), queries)
    dyn_counts, dyn_lat = run_queries(lambda q: score_dynamo(live_tree, q), queries)

    mismatches = 0
    examples: list[str] = []
    for i, (a, b) in enumerate(zip(ours_counts, dyn_counts, strict=True)):
        if a != b:
            mismatches += 1
            if len(examples) < 5:
                diff = {k: (a.get(k), b.get(k))
                        for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
                examples.append(f"query {i} ({workload.query_set[i].kind}): "
                                f"(worker, rank): (ours, dynamo) {dict(list(diff.items())[:4])}")
    matched = [max(c.values(), default=0) for c in ours_counts]
    print(f"  queries: best match mean {statistics.mean(matched):.0f} blocks of "
          f"{workload.params.query_tokens // BLOCK_SIZE}; workers matching per query mean "
          f"{statistics.mean(len(c) for c in ours_counts):.1f}")
    print(f"  score mismatches: {mismatches} of {len(queries)}")
    for line in examples:
        print(f"    {line}")
    index = None  # the plain index goes before the pool workload's is built
    gc.collect()
    pool = run_pool_workload(workload, numbers, ours_counts)
    return ScaleResult(workload, ours_s, dyn_s, ours_lat, dyn_lat,
                       [q.kind for q in workload.query_set], mismatches, examples, gen_s, pool,
                       ours_counts, statistics.mean(len(c) for c in ours_counts))


# --- hybrid model ----------------------------------------------------------------------

HYBRID_WINDOW_BLOCKS = 8


@dataclass
class HybridResult:
    ingest_s: float
    blocks_removed: int
    lat: Latencies
    kinds: list[str]
    best: list[int]
    plain_best: list[int]


def run_hybrid(workload: Workload, plain_counts: list[Counts]) -> HybridResult:
    """Ingest the hybrid form of `workload` and score its queries (timed like ours)."""
    index, ingest_s = timed_apply(workload.hybrid_batches(MODEL, HYBRID_WINDOW_BLOCKS))
    stats = index.stats()
    if stats.dropped:
        raise SystemExit(f"the hybrid ingest dropped {stats.dropped}")
    gc.collect()
    numbers = {worker_name(w): w for w in range(workload.params.n_workers)}
    counts, lat = run_queries(lambda q: score_ours(index, numbers, q), workload.queries)
    return HybridResult(ingest_s, stats.blocks_removed, lat,
                        [q.kind for q in workload.query_set],
                        [max(c.values(), default=0) for c in counts],
                        [max(c.values(), default=0) for c in plain_counts])


def hybrid_table(res: HybridResult, plain: ScaleResult) -> str:
    dyn_p50 = plain.dyn_lat.p(0.5)
    ok = res.lat.p(0.5) <= dyn_p50
    rows = [
        ("Ingest, blocks/s (both groups' stores)",
         f"{2 * plain.workload.blocks / res.ingest_s:,.0f}", ""),
        ("Blocks the window group freed", f"{res.blocks_removed:,}", ""),
        ("Score p50, us (ours, hybrid) / Dynamo plain p50", f"{res.lat.p(0.5):,.0f} / "
         f"{dyn_p50:,.0f}", "hybrid <= Dynamo plain: " + verdict(ok)),
        ("Score p99, us", f"{res.lat.p(0.99):,.0f}", ""),
    ]
    rows += [(f"  p50 of `{k}` queries, us", _kind_p50(res.lat, res.kinds, k), "")
             for k in ("full", "partial", "miss")]
    rows.append(("Best match per query, mean blocks (hybrid / plain)",
                 f"{statistics.mean(res.best):.0f} / {statistics.mean(res.plain_best):.0f}", ""))
    head = "| | value | target |\n|---|---:|---|\n"
    body = "".join(f"| {' | '.join(r)} |\n" for r in rows)
    return (f"### Hybrid model: {plain.workload.blocks:,} blocks, 2 KV-cache groups, "
            f"window of {HYBRID_WINDOW_BLOCKS} blocks\n\n"
            "The headline workload with every store also in a sliding-window group "
            f"(`sliding_window` = {HYBRID_WINDOW_BLOCKS} blocks) that frees each chain's "
            "blocks once they left the window; Score is vLLM's hybrid rule over both groups "
            "(docs/architecture.md, hybrid models). Dynamo has no hybrid model: the target is "
            "its p50 on the plain workload in the same run.\n\n"
            f"{head}{body}")


# --- memory per entry ------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_probe(side: str, n_workers: int, entries: int, seed: int) -> float:
    """Bytes of RSS growth per stored (block, rank) entry, for one side, in this process:
    inputs are built (and kept) before the first reading."""
    workload = make_workload(n_workers, entries, seed, n_queries=1)
    inputs: Any = workload.batches(MODEL) if side == "ours" else dynamo_events(workload)
    gc.collect()
    before = rss_bytes()
    if side == "ours":
        index = SyncMemoryIndex()
        index.apply(inputs)
    else:
        index, _ = ingest_dynamo(inputs)
    gc.collect()
    grown = rss_bytes() - before
    del inputs
    return grown / workload.blocks


def memory_per_entry(n_workers: int, entries: int, seed: int) -> dict[str, float]:
    """Each side's bytes per entry, measured in a fresh process each."""
    out = {}
    for side in ("ours", "dynamo"):
        cmd = [sys.executable, "-m", "bench.memory_vs_dynamo", "--rss-probe", side,
               "--workers", str(n_workers), "--memory-entries", str(entries),
               "--seed", str(seed)]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        out[side] = float(line.split()[-1])
        print(f"  memory per entry, {n_workers} ranks, {side}: {out[side]:.1f} B")
    return out


# --- report ----------------------------------------------------------------------------


def rank_scale_table(results: list[ScaleResult], memory: dict[int, dict[str, float]],
                     entries: int) -> str:
    head = ("| worker ranks | blocks | ingest ours/Dynamo (best round) | target >= 1.5 | "
            "Score p50 ours / Dynamo, us | ratio | target <= 0.5 | ranks matching per "
            "query (mean) |\n|---:|---:|---:|---|---:|---:|---|---:|\n")
    rows = ""
    for res in results:
        rows += (f"| {res.workload.params.n_workers:,} | {res.workload.blocks:,} | "
                 f"{res.ingest_ratio:.2f} | {verdict(res.ingest_ratio >= 1.5)} | "
                 f"{res.ours_lat.p(0.5):,.0f} / {res.dyn_lat.p(0.5):,.0f} | "
                 f"{res.score_ratio:.2f} | {verdict(res.score_ratio <= 0.5)} | "
                 f"{res.matching:.1f} |\n")
    text = "### Rank scale\n\n" + head + rows + _rank_scale_notes(results)
    if memory:
        text += (f"\nMemory per (block, rank) entry: RSS growth over {entries:,} stored "
                 "entries, each side in a fresh process (inputs built first), target <= 64 B "
                 "for ours.\n\n| worker ranks | ours, B | Dynamo RadixTree, B | target |\n"
                 "|---:|---:|---:|---|\n")
        text += "".join(f"| {n:,} | {m['ours']:.1f} | {m['dynamo']:.1f} | "
                        f"{verdict(m['ours'] <= 64)} |\n" for n, m in memory.items())
        if any(m["ours"] > 64 for m in memory.values()):
            text += ("\nWhy missed: an entry is its rank's ledger slot (`LedgerMap`, 17 B at "
                     "53-80% load, plus the ghost LRU of evicted blocks) and its share of the "
                     "block's table entry (16 B at <= 5/8 load) and holders (4 B each past "
                     "two); a size above the target has more blocks per entry than these "
                     "leave room for.\n")
        text += ("\nThe C table stores a block's holders (u32 slot << 4 | tiers), not a "
                 "mask, so these figures do not depend on slot numbers; "
                 "tests/test_presence_tables.py holds a rank near slot 2**20 to a low "
                 "slot's table bytes.\n")
    return text


def _rank_scale_notes(results: list[ScaleResult]) -> str:
    """Why a rank-scale target was missed (the parts of the work that did not change)."""
    notes = []
    if any(r.ingest_ratio < 1.5 for r in results):
        notes.append("ingest: our apply is the per-event Python ledger work (engine-hash "
                     "maps, checks, one table call per event) around C hashing, and Dynamo's "
                     "rate varies several-fold between rounds and runs (the rounds rows "
                     "below); a steady 1.5x needs the ledger in C")
    if any(r.score_ratio > 0.5 for r in results):
        notes.append("Score: the walk and the answer are C; what remains is hashing and "
                     "probing each matched block (mask_runs) and one WorkerScore per matched "
                     "rank, which the answer returns in full")
    return "".join(f"\nWhy missed, {n}.\n" for n in notes)




def _kind_p50(lat: Latencies, kinds: list[str], kind: str) -> str:
    values = [t for t, k in zip(lat.total_ns, kinds, strict=True) if k == kind]
    return f"{statistics.median(values) / 1e3:,.0f}" if values else "-"


def scale_table(res: ScaleResult, headline: bool) -> str:
    ok_ingest = res.ingest_ratio >= 1.0
    ok_score = res.score_ratio <= 1.0
    ours, dyn = res.ours_lat, res.dyn_lat
    rows = [
        ("Ingest, blocks/s (best round)", f"{res.ours_rate:,.0f}", f"{res.dyn_rate:,.0f}",
         f"{res.ingest_ratio:.2f}", "ours/Dynamo >= 1.0: " + verdict(ok_ingest)),
        ("Ingest, blocks/s (median round)",
         f"{res.workload.blocks / statistics.median(res.ours_ingest_s):,.0f}",
         f"{res.workload.blocks / statistics.median(res.dyn_ingest_s):,.0f}",
         f"{statistics.median(res.dyn_ingest_s) / statistics.median(res.ours_ingest_s):.2f}",
         ""),
        ("Ingest rounds, s", " / ".join(f"{s:.2f}" for s in res.ours_ingest_s),
         " / ".join(f"{s:.2f}" for s in res.dyn_ingest_s), "", ""),
        ("Score p50, us (hash + lookup)", f"{ours.p(0.5):,.0f}", f"{dyn.p(0.5):,.0f}",
         f"{res.score_ratio:.2f}", "ours/Dynamo <= 1.0: " + verdict(ok_score)),
        ("Score p99, us", f"{ours.p(0.99):,.0f}", f"{dyn.p(0.99):,.0f}",
         f"{ours.p(0.99) / dyn.p(0.99):.2f}", ""),
        ("  of which hashing p50, us", f"{ours.p(0.5, 'hash'):,.0f}",
         f"{dyn.p(0.5, 'hash'):,.0f}", "", ""),
    ]
    rows += [(f"  p50 of `{k}` queries, us", _kind_p50(ours, res.kinds, k),
              _kind_p50(dyn, res.kinds, k), "", "") for k in ("full", "partial", "miss")]
    rows.append(("Queries whose per-worker counts differ", str(res.mismatches), "", "",
                 "must be 0: " + verdict(res.mismatches == 0)))
    pool = res.pool
    rows += [
        (f"Pool workload: Score p50, us (ours with {pool.mounting} workers mounting a pool of "
         f"{pool.pool_blocks:,} blocks; Dynamo on the plain workload)",
         f"{pool.lat.p(0.5):,.0f}", f"{dyn.p(0.5):,.0f}", f"{res.pool_score_ratio:.2f}",
         "ours/Dynamo <= 1.0: " + verdict(res.pool_score_ratio <= 1.0)),
        ("Pool workload: Score p99, us", f"{pool.lat.p(0.99):,.0f}", f"{dyn.p(0.99):,.0f}",
         f"{pool.lat.p(0.99) / dyn.p(0.99):.2f}", ""),
        ("Pool workload: ingest, blocks/s (worker + pool blocks, one round)",
         f"{pool.blocks / pool.ingest_s:,.0f}", "", "", ""),
        ("Pool workload: answers differing from the plain answers' implication",
         str(pool.mismatches), "", "", "must be 0: " + verdict(pool.mismatches == 0)),
    ]
    head = ("| | ours (SyncMemoryIndex) | Dynamo RadixTree | ratio | target |\n"
            "|---|---:|---:|---:|---|\n")
    body = "".join(f"| {' | '.join(r)} |\n" for r in rows)
    title = (f"### {res.workload.blocks:,} blocks indexed, {res.workload.params.n_workers:,} "
             "worker ranks" + (" (headline)" if headline else ""))
    params = "".join(f"- {k}: {v}\n" for k, v in res.workload.describe().items())
    return f"{title}\n\n{params}\n{head}{body}"


def print_table(res: ScaleResult) -> None:
    print(f"\n  {'':34} {'ours':>12} {'Dynamo':>12} {'ratio':>7}")
    line = "  {:34} {:>12} {:>12} {:>7}"
    print(line.format("ingest blocks/s (best round)", f"{res.ours_rate:,.0f}",
                      f"{res.dyn_rate:,.0f}", f"{res.ingest_ratio:.2f}"))
    for name, q in (("score p50 us", 0.5), ("score p99 us", 0.99)):
        print(line.format(name, f"{res.ours_lat.p(q):,.0f}", f"{res.dyn_lat.p(q):,.0f}",
                          f"{res.ours_lat.p(q) / res.dyn_lat.p(q):.2f}"))
    print(line.format("  hashing p50 us", f"{res.ours_lat.p(0.5, 'hash'):,.0f}",
                      f"{res.dyn_lat.p(0.5, 'hash'):,.0f}", ""))
    print(line.format("pool workload score p50 us", f"{res.pool.lat.p(0.5):,.0f}",
                      f"{res.dyn_lat.p(0.5):,.0f}", f"{res.pool_score_ratio:.2f}"))
    for k in ("full", "partial", "miss"):
        print(line.format(f"  p50 {k} us", _kind_p50(res.ours_lat, res.kinds, k),
                          _kind_p50(res.dyn_lat, res.kinds, k), ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--workers", type=int, nargs="+", default=[64, 1_024, 4_096],
                        help="worker ranks; counts after the first run the last --blocks")
    parser.add_argument("--blocks", type=int, nargs="+", default=[300_000, 1_000_000],
                        help="blocks to store; several values run several scales")
    parser.add_argument("--memory-entries", type=int, default=2_000_000,
                        help="entries stored by the memory-per-entry probes (0: skip)")
    parser.add_argument("--memory-workers", type=int, nargs="*", default=[64, 1_024, 4_096])
    parser.add_argument("--rss-probe", choices=("ours", "dynamo"), help=argparse.SUPPRESS)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3, help="ingest rounds per side")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--no-write", action="store_true", help="do not update the docs")
    parser.add_argument("--no-hybrid", action="store_true",
                        help="leave out the hybrid-model workload")
    parser.add_argument("--pool-only", action="store_true",
                        help="each --workers count at the last --blocks, one ingest round "
                             "per side, then its tables printed: no hybrid workload, memory "
                             "probes or docs")
    args = parser.parse_args(argv)
    if args.rss_probe:
        per_entry = rss_probe(args.rss_probe, args.workers[0], args.memory_entries, args.seed)
        print(f"bytes per entry {per_entry:.1f}")
        return 0

    load_at_start = os.getloadavg()
    scales = [(args.workers[0], b) for b in args.blocks]
    scales += [(w, args.blocks[-1]) for w in args.workers[1:]]
    if args.pool_only:
        scales = [(w, args.blocks[-1]) for w in args.workers]
    results: list[ScaleResult] = []
    for workers, blocks in scales:
        res = run_scale(workers, blocks, args.queries, args.seed,
                        1 if args.pool_only else args.rounds)
        print_table(res)
        results.append(res)
        if res.mismatches:
            print(f"FAIL: {res.mismatches} queries score differently in the two indexes; "
                  "the comparison is void", file=sys.stderr)
            return 1
        if res.pool.mismatches:
            print(f"FAIL: {res.pool.mismatches} pool-workload answers are wrong",
                  file=sys.stderr)
            return 1
    if args.pool_only:
        return 0
    hybrid: HybridResult | None = None
    if not args.no_hybrid:
        hybrid = run_hybrid(results[0].workload, results[0].counts)
        print(f"\n  hybrid model: score p50 {hybrid.lat.p(0.5):,.0f} us, p99 "
              f"{hybrid.lat.p(0.99):,.0f} us (Dynamo plain p50 {results[0].dyn_lat.p(0.5):,.0f}"
              f" us); best match mean {statistics.mean(hybrid.best):.0f} blocks")

    body = (
        "Same process, same workload (`bench/workload.py`: shared system prompts, multi-turn "
        "conversations, prefix-aware routing; prefill events of up to 32 blocks, one-block "
        "decode events, 1-4 events per bus batch).\n\n"
        "- Ingest counts hashing on both sides: ours applies unkeyed bus batches (the ledger "
        "computes chained keys from the token bytes); Dynamo's, per event, runs "
        "`compute_block_hash_for_seq`, builds the KvCacheEvent JSON (msgspec) and calls "
        "`apply_event`; its clock stops once a `find_matches` has passed the tree's queue.\n"
        "- Ingest rounds alternate sides and the verdict compares each side's best round: "
        "Dynamo's `apply_event` costs about 6-15 us or about 55-70 us per call from one round "
        "to the next (whatever the event size; isolated probes show it too), so its rate "
        "varies several-fold between rounds.\n"
        "- Scoring counts hashing on both sides: ours is `score` on the token ids (it hashes "
        "lazily, only as far as some worker still matches; the 'hashing' row is an eager "
        "`block_keys_for_tokens` of all blocks, timed apart) vs "
        f"`compute_block_hash_for_seq` + `find_matches`, after {WARMUP_QUERIES} warm-up "
        "queries.\n"
        "- Timed phases run after `gc.collect()` + `gc.freeze()`: neither side pays GC for "
        "the benchmark's own inputs.\n"
        "- Every query's per-(worker, dp_rank) matched block counts agree between the two "
        "indexes (checked; the run fails otherwise).\n"
        "- Pool workload (shared storage pools): the same steps, each bus batch also "
        f"offloading its blocks into one pool (`{POOL}`, which ends up holding every stored "
        "block), every other worker mounting it; ours scores with the mounts and is held "
        "against Dynamo's p50 on the plain workload of the same run (Dynamo has no pools). "
        "Every answer is checked: a mounting worker matches the longest prefix any worker "
        "holds, the others what they hold.\n"
        f"- Machine load (1-minute average, {os.cpu_count()} cores): "
        f"{load_at_start[0]:.1f} at the start, {os.getloadavg()[0]:.1f} before the memory "
        "probes. Latencies and rates move with it (other jobs share the cores); the memory "
        "rows (bytes of RSS per entry) do not.\n\n"
    )
    memory = {}
    if args.memory_entries:
        memory = {n: memory_per_entry(n, args.memory_entries, args.seed)
                  for n in args.memory_workers}
    rank_rows = [r for r in results if r.workload.params.total_blocks == args.blocks[-1]]
    body += rank_scale_table(rank_rows, memory, args.memory_entries) + "\n"
    body += "\n".join(scale_table(r, i == 0) for i, r in enumerate(results))
    if hybrid is not None:
        body += "\n" + hybrid_table(hybrid, results[0])
    if not args.no_write:
        write_section("memory-vs-dynamo", "In-memory index vs Dynamo RadixTree",
                      "make bench-memory", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
