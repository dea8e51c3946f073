"""The report of a run, as `--json-out` writes it (msgspec structs), and its latency summary."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import msgspec

from kvsim.report import pct

__all__ = [
    "CatchUp",
    "Latency",
    "PolicyResult",
    "RoutingReport",
    "TraceReport",
    "TuningRow",
    "latency",
]


class Latency(msgspec.Struct, frozen=True):
    """Wall-clock milliseconds of a repeated operation."""

    count: int
    mean_ms: float
    p50_ms: float
    p99_ms: float
    max_ms: float


class CatchUp(msgspec.Struct, frozen=True):
    """The kv policy's per-step waits for the event path (wall time)."""

    steps: int
    timeouts: int
    wait: Latency
    gaps: int  # sequence gaps the bridges saw (filled from the replay socket or not)
    gaps_unfilled: int
    resyncs: int  # resyncs the publishers performed


class PolicyResult(msgspec.Struct, frozen=True, kw_only=True):
    policy: str
    requests: int
    prompt_tokens: int
    hit_tokens: int
    hit_ratio: float
    load_balance: float  # max / mean prefill (uncached) tokens per worker
    prefill_tokens_per_worker: list[int]
    requests_per_worker: list[int]
    ttft_p50_s: float
    ttft_p99_s: float
    evicted_blocks: int
    overcommitted_serves: int  # serves that found too few unpinned blocks to evict
    predicted_hit_ratio: float | None = None  # what the router expected (kv, oracle)
    mispredicted_requests: int | None = None  # predicted matched blocks != engine's hit
    find_best_worker: Latency | None = None  # kv: the gRPC call, as the router sees it
    fallbacks: dict[str, int] = msgspec.field(default_factory=dict)
    catch_up: CatchUp | None = None
    wall_s: float = 0.0


class TraceReport(msgspec.Struct, frozen=True, kw_only=True):
    trace: str
    requests: int
    prompt_tokens: int
    duration_s: float  # simulated (trace span / speedup)
    shared_prefix_blocks: int  # leading blocks every request of the trace has in common
    bound_hit_ratio: float
    pooled_lru_hit_ratio: float  # one LRU of workers x capacity blocks (no routing)
    policies: dict[str, PolicyResult]


class TuningRow(msgspec.Struct, frozen=True, kw_only=True):
    overlap_weight: float
    temperature: float
    speedup: float
    policy: str
    hit_ratio: float
    bound_ratio: float
    load_balance: float
    workers_used: int  # workers that served at least one request
    ttft_p50_s: float
    ttft_p99_s: float


class RoutingReport(msgspec.Struct, frozen=True, kw_only=True):
    workers: int
    capacity_blocks: int
    block_size: int
    speedup: float
    max_requests: int | None
    overlap_weight: float
    temperature: float
    prefill_rate: float
    decode_rate: float
    catch_up_timeout_s: float
    index: str
    traces: list[TraceReport]
    tuning: list[TuningRow] = msgspec.field(default_factory=list)


def latency(samples: Sequence[float]) -> Latency:
    """Count, mean and nearest-rank quantiles of wall-clock samples in milliseconds."""
    if not samples:
        return Latency(0, 0.0, 0.0, 0.0, 0.0)
    ordered = sorted(samples)
    return Latency(len(ordered), statistics.fmean(ordered), pct(ordered, 0.5),
                   pct(ordered, 0.99), ordered[-1])
