"""The knob grid (`--tune-overlap-weights`, `--tune-temperatures`, `--tune-speedups`) on
`--trace`: oracle points in worker processes, kv points one by one."""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import multiprocessing
import sys
from dataclasses import replace
from typing import Final

from kvsim.routing.replay import run_policy
from kvsim.routing.results import PolicyResult, TuningRow
from kvsim.routing.settings import RoutingSettings
from kvsim.routing.traces import Trace, single_cache_hits

__all__ = ["tune"]

_TUNE_PROCESSES: Final = 2


def _tuning_row(settings: RoutingSettings, result: PolicyResult, bound: float) -> TuningRow:
    return TuningRow(overlap_weight=settings.overlap_weight, temperature=settings.temperature,
                     speedup=settings.speedup, policy=result.policy, hit_ratio=result.hit_ratio,
                     bound_ratio=result.hit_ratio / bound if bound else 0.0,
                     load_balance=result.load_balance,
                     workers_used=sum(1 for n in result.requests_per_worker if n),
                     ttft_p50_s=result.ttft_p50_s, ttft_p99_s=result.ttft_p99_s)


def _tune_point(point: RoutingSettings, bound: float) -> TuningRow:
    """One grid point in a worker process (the oracle needs no service)."""
    trace = Trace.load(point.trace, point.max_requests, point.speedup)
    result, _ = asyncio.run(run_policy(point.tune_policy, trace, point))
    return _tuning_row(point, result, bound)


async def tune(settings: RoutingSettings) -> list[TuningRow]:
    """The grid on --trace: oracle points two processes at a time, kv points one by one."""
    if not settings.tune_overlap_weights:
        return []
    trace = Trace.load(settings.trace, settings.max_requests, 1.0)
    bound = sum(single_cache_hits(trace.records, settings.block_size)) / trace.prompt_tokens
    points = [replace(settings, overlap_weight=w, temperature=t, speedup=x, progress=False)
              for x, w, t in itertools.product(settings.tune_speedups,
                                               settings.tune_overlap_weights,
                                               settings.tune_temperatures)]
    if settings.progress:
        print(f"tuning: {len(points)} {settings.tune_policy} runs on {trace.name}",
              file=sys.stderr, flush=True)
    rows: list[TuningRow] = []
    if settings.tune_policy == "kv":
        for point in points:
            trace = Trace.load(point.trace, point.max_requests, point.speedup)
            result, _ = await run_policy("kv", trace, point)
            rows.append(_tuning_row(point, result, bound))
            _show_row(settings, rows[-1])
        return rows
    loop = asyncio.get_running_loop()
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=_TUNE_PROCESSES,
                                                mp_context=context) as pool:
        futures = [loop.run_in_executor(pool, _tune_point, point, bound) for point in points]
        for future in futures:
            rows.append(await future)
            _show_row(settings, rows[-1])
    return rows


def _show_row(settings: RoutingSettings, row: TuningRow) -> None:
    if settings.progress:
        print(f"tune overlap_weight={row.overlap_weight:g} temperature={row.temperature:g} "
              f"speedup={row.speedup:g}: hit ratio {row.hit_ratio:.4f} ({row.bound_ratio:.3f} "
              f"of the bound), load balance {row.load_balance:.3f}", file=sys.stderr, flush=True)
