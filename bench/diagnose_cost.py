"""What Diagnose's bookkeeping costs the hot paths (`python -m bench.diagnose_cost`,
`make bench-diagnose`).

- Score: the servicer (parse, `KvIndexerService.Score`, serialise; the "servicer" step of
  bench.grpc_score) over the bench workload's 8,192-token queries on the in-memory index,
  with the recent-outcome counters (`QueryOutcomes.record`) on and, as the baseline, off
  (the same servicer with `record` replaced by a no-op), in alternating rounds so machine
  noise falls on both alike; and `record` alone in a tight loop.
- Ingest: `EventActivity.observe` per applied batch over the workload's batches, beside
  the in-memory index's own `apply` of the same batches.

Prints the figures and writes the "Diagnose: cost on the hot paths" section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from bench.workload import make_workload
from indexer._proto.kvindex.v1 import indexer_pb2 as pb
from indexer.index.memory import MemoryIndex
from indexer.ingest.activity import EventActivity
from indexer.serve.diagnose import QueryOutcomes
from indexer.serve.grpc_handlers import score_request_parser
from indexer.serve.service import KvIndexerService
from kvsim.report import write_section

MODEL = "bench/model"


class _NoDeadline:
    def time_remaining(self) -> None:
        return None


def _skip(*_: Any) -> None:
    return None


async def servicer_rounds(index: MemoryIndex, requests: list[bytes],
                          rounds: int) -> dict[str, list[float]]:
    """Seconds per Score through the servicer, per call, with recording on and off."""
    servicer = KvIndexerService(index)
    parse = score_request_parser()
    context: Any = _NoDeadline()
    recording = servicer.outcomes.record
    times: dict[str, list[float]] = {"on": [], "off": []}
    for round_no in range(rounds * 2 + 1):
        mode = "on" if round_no % 2 else "off"
        servicer.outcomes.record = recording if mode == "on" else _skip  # type: ignore[method-assign]
        for raw in requests:
            started = time.perf_counter()
            response = await servicer.Score(parse(raw), context)
            response.SerializeToString()
            if round_no:  # the first round warms up
                times[mode].append(time.perf_counter() - started)
    return times


def record_alone(calls: int) -> float:
    """Seconds per `QueryOutcomes.record` call (best of five)."""
    outcomes = QueryOutcomes()
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for i in range(calls):
            outcomes.record(MODEL, True, 0, i & 1 == 0)
        best = min(best, (time.perf_counter() - started) / calls)
    return best


async def ingest_cost(batches: list[Any]) -> tuple[float, float, int]:
    """Seconds for `observe` over every batch, for the index's apply of them, and blocks."""
    index = MemoryIndex()
    started = time.perf_counter()
    for start in range(0, len(batches), 256):
        await index.apply(batches[start : start + 256])
    applied = time.perf_counter() - started
    activity = EventActivity()
    now = time.time()
    best = float("inf")
    for _ in range(3):
        activity.ranks.clear()
        started = time.perf_counter()
        for batch in batches:
            activity.observe(batch, now)
        best = min(best, time.perf_counter() - started)
    blocks = sum(sum(r.stored) for r in activity.ranks.values())
    return best, applied, blocks


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(args: argparse.Namespace) -> str:
    workload = make_workload(args.workers, args.blocks, n_queries=args.queries)
    batches = workload.batches(MODEL)
    observe_s, apply_s, blocks = await ingest_cost(batches)
    index = MemoryIndex()
    for start in range(0, len(batches), 256):
        await index.apply(batches[start : start + 256])
    requests = [pb.ScoreRequest(model=MODEL, token_ids=q).SerializeToString()
                for q in workload.queries]
    times = await servicer_rounds(index, requests, args.rounds)
    record_s = record_alone(args.record_calls)
    rows = []
    for mode in ("off", "on"):
        values = times[mode]
        rows.append(f"| {'recording' if mode == 'on' else 'no-op record (baseline)'} | "
                    f"{len(values):,} | {statistics.mean(values) * 1e3:.4f} | "
                    f"{pct(values, 0.5) * 1e3:.4f} | {pct(values, 0.99) * 1e3:.4f} |")
    mean_on, mean_off = statistics.mean(times["on"]), statistics.mean(times["off"])
    body = "\n".join([
        f"Workload: {args.workers} workers, {workload.blocks:,} blocks stored, "
        f"{len(requests)} queries of 8,192 tokens (bench/workload.py), in-memory index.",
        "",
        "Score through the servicer (parse, `KvIndexerService.Score`, serialise; no "
        f"transport), {args.rounds} alternating rounds per mode over every query:",
        "",
        "| mode | calls | mean ms | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|",
        *rows,
        "",
        f"Difference of the means: {(mean_on - mean_off) * 1e6:+.2f} µs per call "
        f"({(mean_on - mean_off) / mean_off * 100:+.2f}%). `QueryOutcomes.record` alone: "
        f"{record_s * 1e9:.0f} ns per call (best of five loops of {args.record_calls:,}), "
        f"{record_s / mean_off * 100:.2f}% of the baseline's mean Score: below what "
        "alternating rounds on a shared machine can resolve.",
        "",
        f"Ingest: `EventActivity.observe` over the workload's {len(batches):,} batches "
        f"({blocks:,} blocks): {observe_s / len(batches) * 1e6:.2f} µs per batch, "
        f"{observe_s / apply_s * 100:.1f}% of the in-memory index's own apply of them "
        f"({apply_s / len(batches) * 1e6:.1f} µs per batch).",
    ])
    return body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=300_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--record-calls", type=int, default=1_000_000)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    body = asyncio.run(run(args))
    print(body)
    if not args.no_write:
        write_section("diagnose", "Diagnose: cost on the hot paths",
                      "python -m bench.diagnose_cost", body)


if __name__ == "__main__":
    main()
