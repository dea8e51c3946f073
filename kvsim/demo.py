"""`make demo`: KV-aware routing through the indexer against round robin, live in a terminal.

Everything runs in one process:

```
                    ┌─▶ InFlightKvRouter ─FindBestWorker─▶ IndexerService (gRPC, memory index)
 synthetic prompts ─┤        │                                 ▲ JetStream (embedded NATS)
 (one stream)       │        │                              bridges (one per engine)
                    │        │                                 ▲ ZMQ (vLLM wire)
                    │        └──── serve on the chosen engine ─▶ fleet A
                    └─▶ RoundRobinRouter ── serve on i mod n ──▶ fleet B (identical, no bridges)
```

- `IndexerService` on its embedded default: nats-server from the wheel (JetStream in a
  temporary directory), the in-memory index, gRPC on a free port.
- Fleet A: a `MockFleet` of mock vLLM engines (small GPU LRU plus CPU offload) speaking the
  real ZMQ wire, each with its own bridge (`EngineSource` + `KVEventPublisher`, what
  `kv-publisher bridge` runs).
- Fleet B: an identical fleet without bridges.
- Every prompt of one synthetic stream (shared system prompts, Zipf-ish, then fresh tokens)
  goes to both fleets: on fleet A to the worker FindBestWorker picks, on fleet B round robin.

The hit rates shown are the engines' own counts (cached prompt tokens / prompt tokens, as
`MockEngine.serve` returns them), never the index's prediction, which is shown beside them.

Both routers are the routing bench's (`kvsim.routers`: `KvRouter`, `RoundRobinRouter`). The
KV-aware one reports its own load, as a router in front of real engines would: each request
holds its prompt's blocks on its worker for `--request-lifetime` router steps (the requests in
flight), so FindBestWorker trades cache overlap against load (`--overlap-weight`). Workers
the index has not heard from yet hold nothing as far as it knows; the router weighs them with
zero overlap itself (counted as `unindexed_workers` fallbacks).

    python -m kvsim.demo                          # live view until Ctrl-C
    python -m kvsim.demo --duration 10 --no-tty   # one plain line per second, then a summary
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

from indexer.app import IndexerService
from indexer.client import (
    AsyncIndexerClient,
    IndexerClientError,
    WorkerLoad,
)
from indexer.config import ServiceConfig, validate
from indexer.index.protocol import TIERS
from indexer.scheduling import DEFAULT_TEMPERATURE
from kvcore.helpfmt import DefaultsHelpFormatter
from kvcore.runtime import scoped_logging
from kvsim.bridges import bridges, worker_id
from kvsim.mock_engines import EngineStats, MockFleet, synthetic_prompts
from kvsim.report import pct
from kvsim.routers import Decision, KvRouter, RoundRobinRouter, describe_fallbacks

__all__ = [
    "DemoSettings",
    "InFlight",
    "InFlightKvRouter",
    "Snapshot",
    "main",
    "parse_args",
    "run_demo",
]

MODEL: Final = "demo/llama-3.1-8b"
_LATENCY_SAMPLES: Final = 2_000
_LAG_SAMPLES: Final = 2_000


@dataclass(frozen=True, kw_only=True)
class DemoSettings:
    """What one demo run does (from the command line)."""

    workers: int = 8
    capacity_blocks: int = 256
    cpu_capacity_blocks: int = 256
    block_size: int = 16
    prefixes: int = 32
    prefix_tokens: int = 1_024
    max_suffix: int = 512
    rate: float = 100.0  # requests per second; 0 = as fast as possible
    duration: float | None = None  # None: until Ctrl-C
    overlap_weight: float = 2.0
    request_lifetime: int | None = None  # router steps a request stays in flight; None: 4 x workers
    seed: int = 0
    tty: bool = True
    refresh_s: float = 0.5
    metrics_listen: str = ""
    log_level: str = "error"

    @property
    def lifetime(self) -> int:
        return self.request_lifetime if self.request_lifetime is not None else 4 * self.workers


def _parser() -> argparse.ArgumentParser:
    d = DemoSettings()
    parser = argparse.ArgumentParser(
        prog="kv-sim demo", formatter_class=DefaultsHelpFormatter,
        description="The indexer, a simulated fleet with bridges, and KV-aware routing "
                    "(FindBestWorker) against round robin on an identical fleet.")
    parser.add_argument("--workers", type=int, default=d.workers, help="engines per fleet")
    parser.add_argument("--capacity-blocks", type=int, default=d.capacity_blocks,
                        help="GPU blocks per engine")
    parser.add_argument("--cpu-capacity-blocks", type=int, default=d.cpu_capacity_blocks,
                        help="CPU offload blocks per engine (0: no offload)")
    parser.add_argument("--block-size", type=int, default=d.block_size,
                        help="tokens per KV block")
    parser.add_argument("--prefixes", type=int, default=d.prefixes,
                        help="shared system prompts in the stream")
    parser.add_argument("--prefix-tokens", type=int, default=d.prefix_tokens,
                        help="tokens of each shared system prompt")
    parser.add_argument("--max-suffix", type=int, default=d.max_suffix,
                        help="most fresh tokens after the shared prefix")
    parser.add_argument("--rate", type=float, default=d.rate,
                        help="requests per second (0: as fast as possible)")
    parser.add_argument("--duration", type=float, default=None,
                        help="stop after this many seconds (default: Ctrl-C)")
    parser.add_argument("--overlap-weight", type=float, default=d.overlap_weight,
                        help="FindBestWorker: weight of prefill blocks against active blocks")
    parser.add_argument("--request-lifetime", type=int, default=None,
                        help="router steps a request stays in flight (default: 4 x workers)")
    parser.add_argument("--seed", type=int, default=d.seed, help="prompt stream seed")
    parser.add_argument("--no-tty", action="store_true",
                        help="plain lines (one per second and a summary) instead of the live view")
    parser.add_argument("--metrics-listen", default=d.metrics_listen,
                        help="serve the indexer's Prometheus /metrics here, e.g. 127.0.0.1:9400")
    parser.add_argument("--log-level", default=d.log_level,
                        choices=["debug", "info", "warning", "error"], help="log level")
    return parser


def parse_args(argv: Sequence[str]) -> DemoSettings:
    """Settings from the command line; argparse exits with status 2 on a bad value."""
    parser = _parser()
    args = parser.parse_args(argv)
    positive = ("workers", "capacity_blocks", "block_size", "prefixes", "prefix_tokens",
                "max_suffix")
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.cpu_capacity_blocks < 0 or args.rate < 0 or args.overlap_weight < 0:
        parser.error("--cpu-capacity-blocks, --rate and --overlap-weight must be >= 0")
    if args.duration is not None and args.duration <= 0:
        parser.error("--duration must be > 0")
    if args.request_lifetime is not None and args.request_lifetime < 1:
        parser.error("--request-lifetime must be >= 1")
    tty = not args.no_tty and sys.stdout.isatty()
    return DemoSettings(
        workers=args.workers, capacity_blocks=args.capacity_blocks,
        cpu_capacity_blocks=args.cpu_capacity_blocks, block_size=args.block_size,
        prefixes=args.prefixes, prefix_tokens=args.prefix_tokens, max_suffix=args.max_suffix,
        rate=args.rate, duration=args.duration, overlap_weight=args.overlap_weight,
        request_lifetime=args.request_lifetime, seed=args.seed,
        tty=tty, refresh_s=0.5 if tty else 1.0,
        metrics_listen=args.metrics_listen, log_level=args.log_level,
    )


# --- routers ----------------------------------------------------------------------------


class InFlight:
    """Blocks held per worker by requests in flight; a request lasts `lifetime` router steps."""

    def __init__(self, workers: int, lifetime: int) -> None:
        self.active_blocks = [0] * workers
        self._lifetime = lifetime
        self._step = 0
        self._running: deque[tuple[int, int, int]] = deque()  # (ends at step, worker, blocks)

    def step(self) -> None:
        """One router step: requests whose time is up finish."""
        self._step += 1
        while self._running and self._running[0][0] <= self._step:
            _, worker, blocks = self._running.popleft()
            self.active_blocks[worker] -= blocks

    def start(self, worker: int, blocks: int) -> None:
        self.active_blocks[worker] += blocks
        self._running.append((self._step + self._lifetime, worker, blocks))


class InFlightKvRouter:
    """`KvRouter` (FindBestWorker) fed with the demo's own load: each request holds its
    prompt's blocks on its worker for `lifetime` router steps (`InFlight`)."""

    def __init__(self, client: AsyncIndexerClient, settings: DemoSettings) -> None:
        self.kv = KvRouter(client, MODEL, block_size=settings.block_size,
                           overlap_weight=settings.overlap_weight,
                           temperature=DEFAULT_TEMPERATURE, seed=settings.seed,
                           latency_samples=_LATENCY_SAMPLES)
        self.load = InFlight(settings.workers, settings.lifetime)
        self.predicted_tokens = 0
        self._block_size = settings.block_size

    async def route(self, index: int, tokens: list[int]) -> Decision:
        self.load.step()
        loads = [WorkerLoad(worker_id(w), active_blocks=active)
                 for w, active in enumerate(self.load.active_blocks)]
        decision = await self.kv.route(index, tokens, loads)
        self.load.start(decision.worker, len(tokens) // self._block_size)
        self.predicted_tokens += (decision.predicted_blocks or 0) * self._block_size
        return decision


# --- what is shown ----------------------------------------------------------------------


@dataclass(slots=True)
class WorkerRow:
    worker_id: str
    kv_requests: int
    kv_hit_rate: float
    rr_hit_rate: float
    engine_gpu: int  # blocks the engine holds (fleet A)
    engine_cpu: int
    index_blocks: dict[str, int] = field(default_factory=dict)  # per tier, as indexed
    indexed: bool = False
    degraded: bool = False
    last_event_age_s: float = 0.0


@dataclass(slots=True)
class Snapshot:
    """One refresh of the view: routing results, the indexer's pipeline, the workers."""

    elapsed_s: float = 0.0
    requests: int = 0
    kv_hit_rate: float = 0.0
    rr_hit_rate: float = 0.0
    kv_window_hit_rate: float = 0.0
    rr_window_hit_rate: float = 0.0
    kv_predicted_hit_rate: float = 0.0
    route_p50_ms: float = 0.0
    route_p99_ms: float = 0.0
    fallbacks: dict[str, int] = field(default_factory=dict)
    events_per_s: float = 0.0
    events_applied: int = 0
    lag_p50_ms: float = 0.0
    lag_p99_ms: float = 0.0
    gaps: int = 0
    resyncs: int = 0
    dropped: int = 0
    indexed_workers: int = 0
    blocks_by_tier: dict[str, int] = field(default_factory=dict)
    stats_error: str = ""
    workers: list[WorkerRow] = field(default_factory=list)

    def line(self) -> str:
        """The plain one-line form (`--no-tty`)."""
        tiers = " ".join(f"{t}_blocks={self.blocks_by_tier.get(t, 0)}" for t in ("gpu", "cpu"))
        error = f" stats_error={self.stats_error!r}" if self.stats_error else ""
        return (f"t={self.elapsed_s:.1f}s requests={self.requests} "
                f"kv_aware_hit_rate={self.kv_hit_rate:.3f} "
                f"round_robin_hit_rate={self.rr_hit_rate:.3f} "
                f"events_per_s={self.events_per_s:.0f} lag_p50_ms={self.lag_p50_ms:.1f} "
                f"lag_p99_ms={self.lag_p99_ms:.1f} workers={self.indexed_workers} {tiers} "
                f"find_best_worker_p50_ms={self.route_p50_ms:.2f} "
                f"fallbacks={sum(self.fallbacks.values())}{error}")

    def summary(self) -> str:
        return (f"result: requests={self.requests} kv_aware_hit_rate={self.kv_hit_rate:.3f} "
                f"round_robin_hit_rate={self.rr_hit_rate:.3f} "
                f"kv_aware_predicted_hit_rate={self.kv_predicted_hit_rate:.3f} "
                f"(cached prompt tokens / prompt tokens, counted by the engines); "
                f"fallbacks: {describe_fallbacks(self.fallbacks)}")


def _hit_rate(stats: EngineStats) -> float:
    return stats.hit_tokens / stats.prompt_tokens if stats.prompt_tokens else 0.0


class Monitor:
    """Builds snapshots: engine counters, the router's own counts, and the indexer over gRPC."""

    def __init__(self, service: IndexerService, client: AsyncIndexerClient,
                 kv_fleet: MockFleet, rr_fleet: MockFleet, router: InFlightKvRouter) -> None:
        self._service = service
        self._client = client
        self._kv_fleet = kv_fleet
        self._rr_fleet = rr_fleet
        self._router = router
        self._started = time.monotonic()
        self._last_at = self._started
        self._last_events = 0
        self._last_kv = EngineStats()
        self._last_rr = EngineStats()

    async def snapshot(self) -> Snapshot:
        now = time.monotonic()
        kv, rr = self._kv_fleet.stats(), self._rr_fleet.stats()
        snap = Snapshot(
            elapsed_s=now - self._started, requests=kv.requests,
            kv_hit_rate=_hit_rate(kv), rr_hit_rate=_hit_rate(rr),
            kv_window_hit_rate=_hit_rate(kv.minus(self._last_kv)),
            rr_window_hit_rate=_hit_rate(rr.minus(self._last_rr)),
            kv_predicted_hit_rate=(self._router.predicted_tokens / kv.prompt_tokens
                                   if kv.prompt_tokens else 0.0),
            fallbacks=dict(self._router.kv.fallbacks),
        )
        latencies = list(self._router.kv.latencies_ms)
        snap.route_p50_ms = statistics.median(latencies) if latencies else 0.0
        snap.route_p99_ms = pct(latencies, 0.99) if latencies else 0.0
        consumer = self._service.stats
        lags = list(itertools.islice(reversed(consumer.lag_samples), _LAG_SAMPLES))
        snap.lag_p50_ms = (statistics.median(lags) * 1000.0) if lags else 0.0
        snap.lag_p99_ms = (pct(lags, 0.99) * 1000.0) if lags else 0.0
        snap.workers = self._engine_rows()
        await self._add_index(snap, now)
        self._last_kv, self._last_rr = kv, rr
        return snap

    def _engine_rows(self) -> list[WorkerRow]:
        rows = []
        for w, (ranks_a, ranks_b) in enumerate(zip(self._kv_fleet.engines, self._rr_fleet.engines,
                                                   strict=True)):
            a, b = ranks_a[0], ranks_b[0]
            rows.append(WorkerRow(worker_id(w), a.stats.requests, _hit_rate(a.stats),
                                  _hit_rate(b.stats), len(a.pool.gpu), len(a.pool.cpu)))
        return rows

    async def _add_index(self, snap: Snapshot, now: float) -> None:
        """What the indexer says, asked over gRPC like a router would."""
        try:
            stats = await self._client.stats(timeout=2.0)
            workers = await self._client.list_workers(MODEL, timeout=2.0)
        except IndexerClientError as exc:
            snap.stats_error = str(exc)
            return
        elapsed = now - self._last_at
        snap.events_applied = stats.events_applied
        snap.events_per_s = ((stats.events_applied - self._last_events) / elapsed
                             if elapsed > 0 else 0.0)
        self._last_at, self._last_events = now, stats.events_applied
        snap.gaps, snap.resyncs = stats.gaps, stats.resyncs_requested
        snap.dropped = sum(stats.dropped.values())
        snap.indexed_workers = len(workers)
        totals: Counter[str] = Counter()
        rows = {row.worker_id: row for row in snap.workers}
        for status in workers:
            totals.update(status.blocks_by_tier)
            row = rows.get(status.worker_id)
            if row is not None:
                row.indexed = True
                row.index_blocks = dict(status.blocks_by_tier)
                row.degraded = status.degraded
                row.last_event_age_s = status.last_event_age_seconds
        snap.blocks_by_tier = {tier: totals.get(tier, 0) for tier in TIERS}


class View(Protocol):
    def show(self, snap: Snapshot) -> None: ...

    def finish(self, snap: Snapshot) -> None: ...


class PlainView:
    """`--no-tty`: a header, one line per refresh, the workers and a result line at the end."""

    def __init__(self, header: str) -> None:
        print(header, flush=True)

    def show(self, snap: Snapshot) -> None:
        print(snap.line(), flush=True)

    def finish(self, snap: Snapshot) -> None:
        for row in snap.workers:
            tiers = " ".join(f"index_{t}={row.index_blocks.get(t, 0)}" for t in ("gpu", "cpu"))
            print(f"worker {row.worker_id}: kv_aware_requests={row.kv_requests} "
                  f"kv_aware_hit_rate={row.kv_hit_rate:.3f} "
                  f"round_robin_hit_rate={row.rr_hit_rate:.3f} engine_gpu={row.engine_gpu} "
                  f"engine_cpu={row.engine_cpu} {tiers}", flush=True)
        print(snap.summary(), flush=True)


class RichView:
    """The live terminal view (rich)."""

    def __init__(self, header: str, settings: DemoSettings) -> None:
        from rich.console import Console  # noqa: PLC0415 - rich is the `demo` extra
        from rich.live import Live  # noqa: PLC0415

        self._header = header
        self._settings = settings
        self._console = Console()
        self._live = Live(console=self._console, auto_refresh=False, transient=False)
        self._live.start()

    def show(self, snap: Snapshot) -> None:
        self._live.update(self._render(snap), refresh=True)

    def finish(self, snap: Snapshot) -> None:
        self._live.update(self._render(snap), refresh=True)
        self._live.stop()
        self._console.print(snap.summary())

    def _render(self, snap: Snapshot) -> Any:
        from rich.console import Group  # noqa: PLC0415
        from rich.panel import Panel  # noqa: PLC0415
        from rich.table import Table  # noqa: PLC0415
        from rich.text import Text  # noqa: PLC0415

        s = self._settings
        routing = Table(title="Routing (hit rate = cached prompt tokens / prompt tokens, "
                              "counted by the engines)", expand=True)
        for column in ("router", "hit rate", "last interval", "requests",
                       "FindBestWorker p50 / p99", "fallbacks"):
            routing.add_column(column, justify="left" if column == "router" else "right")
        fallbacks = str(sum(snap.fallbacks.values()))
        routing.add_row("KV-aware (FindBestWorker)", _pct(snap.kv_hit_rate, "green"),
                        _pct(snap.kv_window_hit_rate), str(snap.requests),
                        f"{snap.route_p50_ms:.2f} / {snap.route_p99_ms:.2f} ms", fallbacks)
        routing.add_row("round robin", _pct(snap.rr_hit_rate, "yellow"),
                        _pct(snap.rr_window_hit_rate), str(snap.requests), "-", "-")
        routing.caption = (f"index-predicted hit rate of the KV-aware choices: "
                           f"{snap.kv_predicted_hit_rate:.1%}   overlap weight "
                           f"{s.overlap_weight:g}, requests in flight for {s.lifetime} steps"
                           f"\nfallbacks (routed without the index's answer): "
                           f"{describe_fallbacks(snap.fallbacks)}")

        pipeline = Text.assemble(
            ("Indexer  ", "bold"),
            f"events/s {snap.events_per_s:,.0f}   applied {snap.events_applied:,}   "
            f"lag p50 {snap.lag_p50_ms:.1f} ms  p99 {snap.lag_p99_ms:.1f} ms   "
            f"workers {snap.indexed_workers}   "
            + "   ".join(f"{t} {n:,}" for t, n in snap.blocks_by_tier.items() if n)
            + f"   gaps {snap.gaps}  resyncs {snap.resyncs}  dropped {snap.dropped}",
        )
        if snap.stats_error:
            pipeline.append(f"   ({snap.stats_error})", style="red")

        workers = Table(title="Workers (fleet A: index vs engine; fleet B: round robin)",
                        expand=True)
        for column in ("worker", "KV-aware reqs", "KV-aware hit", "round-robin hit",
                       "index gpu", "engine gpu", "index cpu", "engine cpu", "last event",
                       "state"):
            workers.add_column(column, justify="left" if column == "worker" else "right")
        for row in snap.workers:
            state = ("[red]degraded[/]" if row.degraded else
                     "[green]ok[/]" if row.indexed else "[dim]not indexed[/]")
            workers.add_row(row.worker_id, str(row.kv_requests), f"{row.kv_hit_rate:.1%}",
                            f"{row.rr_hit_rate:.1%}", str(row.index_blocks.get("gpu", 0)),
                            str(row.engine_gpu), str(row.index_blocks.get("cpu", 0)),
                            str(row.engine_cpu),
                            f"{row.last_event_age_s:.1f} s" if row.indexed else "-", state)
        title = (f"kv-indexer demo   t={snap.elapsed_s:.0f}s   {s.workers} workers x "
                 f"{s.capacity_blocks} GPU + {s.cpu_capacity_blocks} CPU blocks   "
                 f"{s.rate:g} req/s   Ctrl-C stops")
        return Panel(Group(Text(self._header, style="dim"), routing, pipeline, workers),
                     title=title)


def _pct(value: float, style: str = "") -> str:
    text = f"{value:.1%}"
    return f"[bold {style}]{text}[/]" if style else text


# --- running it -------------------------------------------------------------------------


def _service_config(data_dir: Path, settings: DemoSettings) -> ServiceConfig:
    config = ServiceConfig(data_dir=data_dir, grpc_listen="127.0.0.1:0",
                           metrics_listen=settings.metrics_listen,
                           log_format="console", log_level=settings.log_level)
    validate(config)
    return config


def _fleet(settings: DemoSettings) -> MockFleet:
    return MockFleet(n_workers=settings.workers, capacity_blocks=settings.capacity_blocks,
                     block_size=settings.block_size, base_port=0,
                     cpu_capacity_blocks=settings.cpu_capacity_blocks)


def _header(service: IndexerService, settings: DemoSettings) -> str:
    metrics = (f", metrics 127.0.0.1:{service.metrics_port}" if service.metrics else "")
    return (f"indexer: gRPC 127.0.0.1:{service.grpc_port}, NATS {service.nats_url} (embedded), "
            f"in-memory index{metrics}; model {MODEL}; {settings.workers} workers per fleet, "
            f"{settings.prefixes} shared prefixes of {settings.prefix_tokens} tokens")


async def run_demo(settings: DemoSettings, stop: asyncio.Event | None = None) -> Snapshot:
    """Run until `settings.duration` or `stop`; return the last snapshot."""
    stop = stop or asyncio.Event()
    with tempfile.TemporaryDirectory(prefix="kv-indexer-demo-") as tmp:
        service = IndexerService(_service_config(Path(tmp), settings))
        try:
            await service.start()
            async with contextlib.AsyncExitStack() as stack:
                kv_fleet = await stack.enter_async_context(_fleet(settings))
                rr_fleet = await stack.enter_async_context(_fleet(settings))
                client = await stack.enter_async_context(
                    AsyncIndexerClient(f"127.0.0.1:{service.grpc_port}", timeout=1.0))
                await stack.enter_async_context(
                    bridges(kv_fleet, service.nats_url, MODEL, settings.block_size,
                            service.config.liveness_ttl_s))
                router = InFlightKvRouter(client, settings)
                monitor = Monitor(service, client, kv_fleet, rr_fleet, router)
                header = _header(service, settings)
                view = _view(header, settings)
                refresher = asyncio.create_task(_refresh(monitor, view, settings, stop))
                try:
                    await _drive(settings, router, kv_fleet, rr_fleet, stop)
                finally:
                    stop.set()
                    await refresher
                    await asyncio.sleep(0.2)  # the last events reach the index
                    last = await monitor.snapshot()
                    view.finish(last)
                return last
        finally:
            await service.close()


def _view(header: str, settings: DemoSettings) -> View:
    if settings.tty:
        try:
            return RichView(header, settings)
        except ImportError:
            print("rich is not installed (pip install 'kv-indexer[demo]'): plain output",
                  file=sys.stderr)
    return PlainView(header)


async def _drive(settings: DemoSettings, router: InFlightKvRouter, kv_fleet: MockFleet,
                 rr_fleet: MockFleet, stop: asyncio.Event) -> None:
    """The prompt stream, paced at `rate`; each prompt goes to both fleets."""
    loop = asyncio.get_running_loop()
    round_robin = RoundRobinRouter(settings.workers)
    prompts = synthetic_prompts(seed=settings.seed, n_prefixes=settings.prefixes,
                                prefix_tokens=settings.prefix_tokens,
                                max_suffix=settings.max_suffix)
    start = loop.time()
    for i, tokens in enumerate(prompts):
        now = loop.time()
        if settings.duration is not None and now - start >= settings.duration:
            return
        due = start + i / settings.rate if settings.rate > 0 else now
        if due > now:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), due - now)
        else:
            await asyncio.sleep(0)  # bridges and consumers run between requests
        if stop.is_set():
            return
        decision = await router.route(i, tokens)
        kv_fleet.serve(decision.worker, tokens)
        rr_fleet.serve((await round_robin.route(i, tokens, [])).worker, tokens)


async def _refresh(monitor: Monitor, view: View, settings: DemoSettings,
                   stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.refresh_s)
        if not stop.is_set():
            view.show(await monitor.snapshot())


async def _main(settings: DemoSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    await run_demo(settings, stop)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m kvsim.demo [--duration S] [--no-tty] ...`; 0 when it ran."""
    settings = parse_args(sys.argv[1:] if argv is None else argv)
    with scoped_logging(settings.log_level):
        asyncio.run(_main(settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
