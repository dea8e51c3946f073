"""Replaying a trace: one policy on a fresh fleet (`run_policy`; for kv, with the indexer,
the bridges and the wait for the event path after each step), and every policy on one
trace (`run_trace`)."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from indexer.app import IndexerService
from indexer.client import AsyncIndexerClient, IndexerClientError
from indexer.config import ServiceConfig, validate
from kvsim.bridges import Bridge, bridges
from kvsim.mock_engines import MockFleet, trace_tokens
from kvsim.report import pct
from kvsim.routers import KvRouter, OracleRouter, RandomRouter, RoundRobinRouter, Router
from kvsim.routing.clock import EngineClock, PinnedPool, pin_pools
from kvsim.routing.results import CatchUp, PolicyResult, TraceReport, latency
from kvsim.routing.settings import RoutingSettings
from kvsim.routing.traces import Trace, reference_hits, shared_prefix_blocks

__all__ = ["EventPathCatchUp", "Series", "TraceRun", "run_policy", "run_trace"]

_ENGINE_BUFFER_STEPS: Final = 512  # replay buffer per engine (kv); 1 elsewhere (no sockets)
_POLL_S: Final = 0.001


@dataclass(slots=True)
class Series:
    """Per-request outcomes of one policy run (for the plot; not in the JSON)."""

    hit_tokens: list[int] = field(default_factory=list)


class EventPathCatchUp:
    """After each step of the kv policy, wait (wall time, at most `timeout_s`) until every
    bridge has read every batch its engine sent, every publisher's buffer is in JetStream,
    and ListWorkers shows each worker's last published seq applied."""

    def __init__(self, client: AsyncIndexerClient, bridges: Sequence[Bridge], model: str,
                 timeout_s: float) -> None:
        self._client = client
        self._bridges = bridges
        self._model = model
        self._timeout_s = timeout_s
        self.waits_ms: list[float] = []
        self.timeouts = 0

    async def wait(self) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self._timeout_s
        while not await self._caught_up():
            if loop.time() >= deadline:
                self.timeouts += 1
                break
            await asyncio.sleep(_POLL_S)
        self.waits_ms.append((loop.time() - started) * 1000.0)

    async def _caught_up(self) -> bool:
        for b in self._bridges:
            if (b.source.next_seq or 0) != b.engine.seq:
                return False  # the bridge has not read every batch yet
            if b.publisher.sink is not None and b.publisher.sink.pending:
                return False  # not yet stored in JetStream
        try:
            workers = await self._client.list_workers(self._model, timeout=5.0)
        except IndexerClientError:
            return False
        applied = {(w.worker_id, w.dp_rank): (w.epoch, w.last_seq) for w in workers}
        for b in self._bridges:
            for rank in b.publisher.ranks:
                if rank.seq == 0:
                    continue
                if applied.get((b.publisher.worker_id, rank.dp_rank)) != (rank.epoch,
                                                                          rank.seq - 1):
                    return False
        return True

    def stats(self) -> CatchUp:
        sources = [b.source.stats for b in self._bridges]
        return CatchUp(
            steps=len(self.waits_ms), timeouts=self.timeouts, wait=latency(self.waits_ms),
            gaps=sum(s.gaps for s in sources), gaps_unfilled=sum(s.gaps_unfilled for s in sources),
            resyncs=sum(r.resyncs for b in self._bridges for r in b.publisher.ranks))


def _fleet(settings: RoutingSettings, buffer_steps: int) -> MockFleet:
    return MockFleet(n_workers=settings.workers, capacity_blocks=settings.capacity_blocks,
                     block_size=settings.block_size, base_port=0, buffer_steps=buffer_steps)


class _Progress:
    def __init__(self, enabled: bool, label: str, total: int) -> None:
        self._enabled = enabled
        self._label = label
        self._total = total
        self._started = time.perf_counter()
        self._last = self._started

    def tick(self, done: int, hit: int, prompt: int) -> None:
        now = time.perf_counter()
        if self._enabled and (now - self._last >= 10.0 or done == self._total):
            self._last = now
            ratio = hit / prompt if prompt else 0.0
            print(f"  {self._label}: {done}/{self._total} requests, hit ratio {ratio:.3f}, "
                  f"{now - self._started:.0f} s", file=sys.stderr, flush=True)


@dataclass(slots=True)
class _Outcome:
    """What one replay produced, per request and per worker."""

    clock: EngineClock
    series: Series = field(default_factory=Series)
    ttfts: list[float] = field(default_factory=list)
    predicted: list[int | None] = field(default_factory=list)  # router's expected blocks


async def _replay(trace: Trace, fleet: MockFleet, router: Router, *, pools: list[PinnedPool],
                  settings: RoutingSettings, label: str,
                  after_step: Callable[[], Awaitable[None]] | None = None) -> _Outcome:
    """Replay the trace through `router` on `fleet` (whose pools are `pools`), awaiting
    `after_step` after each step."""
    out = _Outcome(EngineClock(pools, settings.prefill_rate, settings.decode_rate))
    clock, series, ttfts, predicted = out.clock, out.series, out.ttfts, out.predicted
    progress = _Progress(settings.progress, label, len(trace.records))
    hit_total = prompt_total = 0
    for now, indices in trace.steps():
        clock.advance(now)
        for i in indices:
            record = trace.records[i]
            tokens = trace_tokens(record)
            decision = await router.route(i, tokens, clock.loads())
            w = decision.worker
            hit = fleet.serve(w, tokens)
            ttfts.append(clock.start(w, now, record, hit_tokens=hit,
                                     hashes=pools[w].last_hashes,
                                     block_size=settings.block_size))
            series.hit_tokens.append(hit)
            predicted.append(decision.predicted_blocks)
            hit_total += hit
            prompt_total += record.input_length
            progress.tick(len(series.hit_tokens), hit_total, prompt_total)
        if after_step is not None:
            await after_step()
    return out


def _result(policy: str, trace: Trace, out: _Outcome, *, block_size: int, wall_s: float,
            **extra: Any) -> PolicyResult:
    clock, series, ttfts, predicted = out.clock, out.series, out.ttfts, out.predicted
    prompt = trace.prompt_tokens
    hit = sum(series.hit_tokens)
    prefill = [w.prefill_tokens for w in clock.workers]
    mean_prefill = statistics.fmean(prefill) if prefill else 0.0
    ordered = sorted(ttfts)
    known = [(p, h) for p, h in zip(predicted, series.hit_tokens, strict=True) if p is not None]
    return PolicyResult(
        policy=policy, requests=len(series.hit_tokens), prompt_tokens=prompt, hit_tokens=hit,
        hit_ratio=hit / prompt if prompt else 0.0,
        load_balance=max(prefill) / mean_prefill if mean_prefill else 1.0,
        prefill_tokens_per_worker=prefill,
        requests_per_worker=[w.requests for w in clock.workers],
        ttft_p50_s=pct(ordered, 0.5), ttft_p99_s=pct(ordered, 0.99),
        evicted_blocks=sum(p.evicted for p in clock.pools),
        overcommitted_serves=sum(p.overcommits for p in clock.pools),
        predicted_hit_ratio=(sum(p * block_size for p, _ in known) / prompt
                             if known and prompt else None),
        mispredicted_requests=(sum(1 for p, h in known if p != h // block_size)
                               if known else None),
        wall_s=wall_s, **extra)


async def run_policy(policy: str, trace: Trace,
                     settings: RoutingSettings) -> tuple[PolicyResult, Series]:
    """Replay `trace` with `policy` on a fresh fleet."""
    started = time.perf_counter()
    label = f"{trace.name} {policy}"
    if policy == "kv":
        return await _run_kv(trace, settings, label, started)
    fleet = _fleet(settings, buffer_steps=1)  # never started: no sockets, nothing to replay
    try:
        pools = pin_pools(fleet)
        router: Router
        if policy == "oracle":
            router = OracleRouter(pools, block_size=settings.block_size,
                                  overlap_weight=settings.overlap_weight,
                                  temperature=settings.temperature, seed=settings.seed)
        elif policy == "round-robin":
            router = RoundRobinRouter(settings.workers)
        elif policy == "random":
            router = RandomRouter(settings.workers, settings.seed)
        else:
            raise ValueError(f"unknown policy {policy!r}")
        out = await _replay(trace, fleet, router, pools=pools, settings=settings, label=label)
    finally:
        fleet.close()
    result = _result(policy, trace, out, block_size=settings.block_size,
                     wall_s=time.perf_counter() - started)
    return result, out.series


async def _run_kv(trace: Trace, settings: RoutingSettings, label: str,
                  started: float) -> tuple[PolicyResult, Series]:
    model = f"bench-routing/{time.time_ns():x}"  # a fresh namespace (matters with Redis)
    with tempfile.TemporaryDirectory(prefix="kv-indexer-bench-routing-") as tmp:
        config = ServiceConfig(data_dir=Path(tmp), redis_url=settings.redis_url,
                               grpc_listen="127.0.0.1:0", metrics_listen="",
                               log_format="console", log_level=settings.log_level)
        validate(config)
        service = IndexerService(config)
        try:
            await service.start()
            async with contextlib.AsyncExitStack() as stack:
                fleet = await stack.enter_async_context(
                    _fleet(settings, buffer_steps=_ENGINE_BUFFER_STEPS))
                pools = pin_pools(fleet)
                client = await stack.enter_async_context(
                    AsyncIndexerClient(f"127.0.0.1:{service.grpc_port}", timeout=5.0))
                running = await stack.enter_async_context(
                    bridges(fleet, service.nats_url, model, settings.block_size,
                            config.liveness_ttl_s))
                router = KvRouter(client, model, block_size=settings.block_size,
                                  overlap_weight=settings.overlap_weight,
                                  temperature=settings.temperature, seed=settings.seed,
                                  timeout=10.0)
                catch_up = EventPathCatchUp(client, running, model, settings.catch_up_timeout_s)
                out = await _replay(trace, fleet, router, pools=pools, settings=settings,
                                    label=label, after_step=catch_up.wait)
                result = _result(
                    "kv", trace, out, block_size=settings.block_size,
                    wall_s=time.perf_counter() - started,
                    find_best_worker=latency(router.latencies_ms),
                    fallbacks=dict(router.fallbacks), catch_up=catch_up.stats())
        finally:
            await service.close()
    return result, out.series


@dataclass(slots=True)
class TraceRun:
    """Every policy on one trace: the report, and per request what the plot draws."""

    trace: Trace
    bound_hits: list[int]
    pooled_hits: list[int]
    series: dict[str, Series]
    report: TraceReport


async def run_trace(path: Path, settings: RoutingSettings, policies: Sequence[str]) -> TraceRun:
    """The reference hits, then each policy in turn, on the trace at `path`."""
    trace = Trace.load(path, settings.max_requests, settings.speedup)
    if settings.progress:
        print(f"{trace.name}: {len(trace.records)} requests, {trace.prompt_tokens:,} prompt "
              f"tokens; single-cache bound...", file=sys.stderr, flush=True)
    bound_hits, pooled_hits = reference_hits(trace.records, settings.block_size,
                                             settings.workers * settings.capacity_blocks)
    bound = sum(bound_hits) / trace.prompt_tokens
    results: dict[str, PolicyResult] = {}
    series: dict[str, Series] = {}
    for policy in policies:
        result, s = await run_policy(policy, trace, settings)
        results[policy], series[policy] = result, s
        if settings.progress:
            print(f"{trace.name} {policy}: hit ratio {result.hit_ratio:.4f} "
                  f"(bound {bound:.4f}), load balance {result.load_balance:.3f}, "
                  f"{result.wall_s:.0f} s", file=sys.stderr, flush=True)
    report = TraceReport(trace=trace.name, requests=len(trace.records),
                         prompt_tokens=trace.prompt_tokens,
                         duration_s=trace.arrivals[-1],
                         shared_prefix_blocks=shared_prefix_blocks(trace, settings.block_size),
                         bound_hit_ratio=bound,
                         pooled_lru_hit_ratio=sum(pooled_hits) / trace.prompt_tokens,
                         policies=results)
    return TraceRun(trace, bound_hits, pooled_hits, series, report)
