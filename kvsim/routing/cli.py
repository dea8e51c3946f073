"""`kv-indexer bench routing` / `kv-sim bench routing`: tune (if asked), replay every policy
on the trace and the check trace, then print, write the JSON, the plot and the section of
docs/benchmarks.md."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

import msgspec

from kvcore.runtime import scoped_logging
from kvsim import report as bench_report
from kvsim.routing.markdown import report_body
from kvsim.routing.plot import plot
from kvsim.routing.replay import TraceRun, run_trace
from kvsim.routing.results import RoutingReport
from kvsim.routing.settings import RoutingSettings, parse_args
from kvsim.routing.tuning import tune

__all__ = ["main", "run_routing"]


async def run_routing(settings: RoutingSettings) -> tuple[RoutingReport, list[TraceRun]]:
    """Tune (if asked), then every policy on the trace and on the check trace."""
    tuning = await tune(settings)
    runs = [await run_trace(settings.trace, settings, settings.policies)]
    if settings.check_trace is not None:
        runs.append(await run_trace(settings.check_trace, settings, settings.policies))
    report = RoutingReport(
        workers=settings.workers, capacity_blocks=settings.capacity_blocks,
        block_size=settings.block_size, speedup=settings.speedup,
        max_requests=settings.max_requests, overlap_weight=settings.overlap_weight,
        temperature=settings.temperature, prefill_rate=settings.prefill_rate,
        decode_rate=settings.decode_rate, catch_up_timeout_s=settings.catch_up_timeout_s,
        index="redis" if settings.redis_url else "memory",
        traces=[run.report for run in runs], tuning=tuning)
    return report, runs


def _command(argv: Sequence[str]) -> str:
    return " ".join(["kv-indexer bench routing", *argv])


def _print_summary(report: RoutingReport) -> None:
    for trace in report.traces:
        print(f"{trace.trace}: {trace.requests} requests, single-cache bound "
              f"{trace.bound_hit_ratio:.4f}")
        for name, r in trace.policies.items():
            latency = (f" find_best_worker_p50_ms={r.find_best_worker.p50_ms:.2f} "
                       f"p99_ms={r.find_best_worker.p99_ms:.2f}" if r.find_best_worker else "")
            print(f"  {name}: hit_ratio={r.hit_ratio:.4f} "
                  f"bound_ratio={r.hit_ratio / trace.bound_hit_ratio:.3f} "
                  f"load_balance={r.load_balance:.3f} ttft_p50_s={r.ttft_p50_s:.2f} "
                  f"ttft_p99_s={r.ttft_p99_s:.2f}{latency}")
    for row in report.tuning:
        print(f"  tune overlap_weight={row.overlap_weight:g} temperature={row.temperature:g} "
              f"speedup={row.speedup:g}: "
              f"hit_ratio={row.hit_ratio:.4f} bound_ratio={row.bound_ratio:.3f} "
              f"load_balance={row.load_balance:.3f}")


def main(argv: list[str]) -> int:
    """`kv-indexer bench routing ...`: 0 when the run completed (targets met or not)."""
    settings = parse_args(argv)
    for path in (settings.trace, settings.check_trace):
        if path is not None and not path.is_file():
            print(f"kv-indexer bench routing: no trace at {path}", file=sys.stderr)
            return 2
    with scoped_logging(settings.log_level):
        report, runs = asyncio.run(run_routing(settings))
    _print_summary(report)
    if settings.json_out is not None:
        settings.json_out.write_bytes(msgspec.json.format(msgspec.json.encode(report)))
    if settings.plot is not None:
        plot(runs, settings.plot)
    if settings.write_doc:
        bench_report.write_section(
            "routing", "Routing quality on Mooncake traces", _command(argv),
            report_body(report, settings.plot))
    return 0

