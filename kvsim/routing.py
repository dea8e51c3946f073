"""`kv-indexer bench routing`: routing quality on a real trace, through the whole system.

    kv-indexer bench routing --trace ../shared/traces/mooncake_conversation_trace.jsonl \\
        --workers 16 --capacity-blocks 65536 --block-size 16 --policy all \\
        [--check-trace ../shared/traces/mooncake_synthetic_trace.jsonl] [--speedup X] \\
        [--max-requests N] [--redis-url URL] [--tune-overlap-weights 1,2,4 ...]

A Mooncake trace is replayed against simulated engines, once per policy, each time on a fresh
fleet of the `kv-sim engines` engines (`MockEngine`: an LRU pool of `--capacity-blocks`
GPU blocks per worker publishing real vLLM ZMQ events):

- `kv`: the router calls FindBestWorker over gRPC with the engines' current loads, against a
  real `IndexerService` on its embedded default (nats-server from the wheel, in-memory index,
  or Redis with `--redis-url`) fed by one bridge per engine (`EngineSource` +
  `KVEventPublisher`): engine ZMQ events -> bridge -> JetStream -> consumer -> index -> gRPC.
- `oracle`: the same cost function (`indexer.scheduling.choose_worker`, same overlap weight,
  temperature, seed and loads) over overlaps read from the engines' pools directly, no index
  in between: the gap between `kv` and `oracle` is what index staleness / inaccuracy costs.
- `round-robin` and `random` (seeded): no index, for contrast.

Requests: trace record i becomes `trace_tokens(record)` (each 512-token hash id expands into
deterministic token ids), the engine caches its full 16-token blocks. Every policy's hit ratio
is counted by the engines themselves (cached prompt tokens / prompt tokens). The single-cache
bound is one infinite cache over the trace: each request hits the longest prefix, in whole
blocks, that any earlier request had.

Time is simulated, never slept: request i arrives at its trace timestamp divided by
`--speedup` (a load multiplier: 2 replays the trace at twice its rate). Requests with the
same arrival time form one step. Per worker, prompts are prefilled one at a time (FIFO) at
`--prefill-rate` uncached tokens/s, then decode at `--decode-rate` tokens/s per request (no
batching slowdown); a request is active from arrival to its last token, and its prompt blocks
are pinned in the pool (never evicted) while it is. The router reports per worker, in
FindBestWorker's loads: active_blocks = prompt blocks of its unfinished requests,
waiting_requests = requests whose prefill has not started, prefill_tokens_in_flight =
uncached tokens not yet prefilled.

Index staleness (kv): after each step the event path is allowed to catch up: the run waits
(wall time, up to `--catch-up-timeout` s) until every bridge has read every batch its engine
sent, every publisher's buffer is in JetStream, and ListWorkers shows each worker's last
published seq applied. So the index is at most one step behind: requests of the same step do
not see each other's blocks (the oracle does). Steps that time out are counted.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import heapq
import itertools
import math
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import msgspec
import structlog

from indexer.app import IndexerService
from indexer.client import AsyncIndexerClient, IndexerClientError, WorkerLoad
from indexer.config import ServiceConfig, validate
from indexer.scheduling import DEFAULT_OVERLAP_WEIGHT as SERVER_OVERLAP_WEIGHT
from indexer.scheduling import DEFAULT_TEMPERATURE as SERVER_TEMPERATURE
from kvcore.keys import block_keys
from kvcore.runtime import scoped_logging
from kvsim import report as bench_report
from kvsim.bridges import Bridge, bridges, worker_id
from kvsim.mock_engines import (
    TRACE_BLOCK_TOKENS,
    BlockPool,
    MockFleet,
    PoolEvent,
    PoolRemoved,
    TraceRecord,
    load_trace,
    trace_tokens,
)
from kvsim.routers import KvRouter, OracleRouter, RandomRouter, RoundRobinRouter, Router

__all__ = [
    "DEFAULT_DECODE_RATE",
    "DEFAULT_OVERLAP_WEIGHT",
    "DEFAULT_PREFILL_RATE",
    "DEFAULT_TEMPERATURE",
    "POLICIES",
    "PinnedPool",
    "PolicyResult",
    "RoutingReport",
    "RoutingSettings",
    "TraceReport",
    "TuningRow",
    "main",
    "parse_args",
    "reference_hits",
    "run_routing",
    "single_cache_hits",
]

POLICIES: Final = ("kv", "oracle", "round-robin", "random")
# Tuned on the conversation trace (docs/benchmarks.md, section "routing"); sent explicitly
# with every FindBestWorker call, so the run does not depend on the server's defaults.
DEFAULT_OVERLAP_WEIGHT: Final = 32.0
DEFAULT_TEMPERATURE: Final = 0.0
# One worker ~ an 8xH100 node serving a 70B-class model (TP8): ~20k prompt tokens/s of
# prefill (about 40% MFU at 140 GFLOP/token), 40 tokens/s per request of decode (25 ms ITL).
DEFAULT_PREFILL_RATE: Final = 20_000.0
DEFAULT_DECODE_RATE: Final = 40.0
DEFAULT_CATCH_UP_TIMEOUT_S: Final = 2.0
DEFAULT_PLOT: Final = Path(__file__).resolve().parent.parent / "docs" / "routing-hit-ratio.png"
TARGET_SHAPE: Final = (16, 65_536, 16)  # workers, capacity blocks, block size of the targets
TARGET_BOUND_RATIO: Final = 0.85
STRETCH_BOUND_RATIO: Final = 0.90
TARGET_ORACLE_RATIO: Final = 0.98  # "within 2% of the oracle router" (relative)
TARGET_LOAD_BALANCE: Final = 1.3
_ENGINE_BUFFER_STEPS: Final = 512  # replay buffer per engine (kv); 1 elsewhere (no sockets)
_POLL_S: Final = 0.001
_PLOT_WINDOWS: Final = 40
_TUNE_PROCESSES: Final = 2

log = structlog.get_logger("kvsim.routing")


# --- settings ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RoutingSettings:
    """One `kv-indexer bench routing` run."""

    trace: Path
    check_trace: Path | None = None
    workers: int = 16
    capacity_blocks: int = 65_536
    block_size: int = 16
    policies: tuple[str, ...] = POLICIES
    speedup: float = 1.0
    max_requests: int | None = None
    overlap_weight: float = DEFAULT_OVERLAP_WEIGHT
    temperature: float = DEFAULT_TEMPERATURE
    prefill_rate: float = DEFAULT_PREFILL_RATE
    decode_rate: float = DEFAULT_DECODE_RATE
    catch_up_timeout_s: float = DEFAULT_CATCH_UP_TIMEOUT_S
    redis_url: str | None = None
    seed: int = 0
    tune_overlap_weights: tuple[float, ...] = ()
    tune_temperatures: tuple[float, ...] = (0.0,)
    tune_speedups: tuple[float, ...] = (1.0,)
    tune_policy: str = "oracle"
    plot: Path | None = DEFAULT_PLOT
    write_doc: bool = True
    json_out: Path | None = None
    log_level: str = "error"
    progress: bool = True


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") \
            from exc
    if not values or not all(math.isfinite(v) and v >= 0 for v in values):
        raise argparse.ArgumentTypeError(f"need finite numbers >= 0: {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    d = RoutingSettings(trace=Path())
    parser = argparse.ArgumentParser(
        prog="kv-indexer bench routing",
        description="Replay a Mooncake trace through simulated engines, bridges, JetStream, the "
                    "index and FindBestWorker; report prefix hit ratios per routing policy.")
    parser.add_argument("--trace", type=Path, required=True, help="Mooncake JSONL trace")
    parser.add_argument("--check-trace", type=Path, default=None,
                        help="a second trace run with the same settings (no tuning on it)")
    parser.add_argument("--workers", type=int, default=d.workers)
    parser.add_argument("--capacity-blocks", type=int, default=d.capacity_blocks,
                        help="GPU blocks per engine")
    parser.add_argument("--block-size", type=int, default=d.block_size)
    parser.add_argument("--policy", choices=[*POLICIES, "all"], default="all",
                        help="routing policy (all: kv, oracle, round-robin and random)")
    parser.add_argument("--speedup", type=float, default=d.speedup,
                        help="divide trace timestamps by this (a load multiplier)")
    parser.add_argument("--max-requests", type=int, default=None,
                        help="replay only the first N requests of each trace")
    parser.add_argument("--redis-url", default=None,
                        help="index in Redis (default: the in-memory index)")
    parser.add_argument("--overlap-weight", type=float, default=d.overlap_weight,
                        help="FindBestWorker overlap_weight (kv and oracle)")
    parser.add_argument("--temperature", type=float, default=d.temperature,
                        help="FindBestWorker temperature (kv and oracle)")
    parser.add_argument("--prefill-rate", type=float, default=d.prefill_rate,
                        help="uncached prompt tokens per second per worker (FIFO prefill)")
    parser.add_argument("--decode-rate", type=float, default=d.decode_rate,
                        help="output tokens per second per request")
    parser.add_argument("--catch-up-timeout", type=float, default=d.catch_up_timeout_s,
                        help="most wall seconds to wait per step for the index to catch up")
    parser.add_argument("--seed", type=int, default=d.seed,
                        help="seed of the random policy and of FindBestWorker sampling")
    parser.add_argument("--tune-overlap-weights", type=_floats, default=(),
                        help="grid of overlap weights to replay --trace with first, e.g. 1,2,4")
    parser.add_argument("--tune-temperatures", type=_floats, default=(0.0,),
                        help="grid of temperatures (with --tune-overlap-weights)")
    parser.add_argument("--tune-speedups", type=_floats, default=(1.0,),
                        help="grid of speedups (load levels; with --tune-overlap-weights)")
    parser.add_argument("--tune-policy", choices=["oracle", "kv"], default=d.tune_policy,
                        help="policy the grid runs (oracle: same cost function, no event path)")
    parser.add_argument("--plot", type=Path, default=d.plot, help="PNG of hit ratio over time")
    parser.add_argument("--no-doc", action="store_true",
                        help="do not write docs/benchmarks.md nor the plot")
    parser.add_argument("--json-out", type=Path, default=None, help="write the report as JSON")
    parser.add_argument("--log-level", default=d.log_level,
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def parse_args(argv: Sequence[str]) -> RoutingSettings:
    """Settings from the command line; argparse exits with status 2 on a bad value."""
    parser = _parser()
    args = parser.parse_args(argv)
    for name in ("workers", "capacity_blocks", "block_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_requests is not None and args.max_requests < 1:
        parser.error("--max-requests must be >= 1")
    positive = {"speedup": args.speedup, "prefill-rate": args.prefill_rate,
                "decode-rate": args.decode_rate, "catch-up-timeout": args.catch_up_timeout}
    for name, value in positive.items():
        if not (math.isfinite(value) and value > 0):
            parser.error(f"--{name} must be a finite number > 0")
    for name, value in (("overlap-weight", args.overlap_weight),
                        ("temperature", args.temperature)):
        if not (math.isfinite(value) and value >= 0):
            parser.error(f"--{name} must be a finite number >= 0")
    if not all(x > 0 for x in args.tune_speedups):
        parser.error("--tune-speedups must be > 0")
    policies = POLICIES if args.policy == "all" else (args.policy,)
    plot = None if args.no_doc else args.plot
    return RoutingSettings(
        trace=args.trace, check_trace=args.check_trace, workers=args.workers,
        capacity_blocks=args.capacity_blocks, block_size=args.block_size, policies=policies,
        speedup=args.speedup, max_requests=args.max_requests, overlap_weight=args.overlap_weight,
        temperature=args.temperature, prefill_rate=args.prefill_rate,
        decode_rate=args.decode_rate, catch_up_timeout_s=args.catch_up_timeout,
        redis_url=args.redis_url, seed=args.seed,
        tune_overlap_weights=args.tune_overlap_weights,
        tune_temperatures=args.tune_temperatures, tune_speedups=args.tune_speedups,
        tune_policy=args.tune_policy, plot=plot,
        write_doc=not args.no_doc, json_out=args.json_out, log_level=args.log_level,
        progress=not args.quiet)


# --- results -------------------------------------------------------------------------------


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


@dataclass(slots=True)
class _Series:
    """Per-request outcomes of one policy run (for the plot; not in the JSON)."""

    hit_tokens: list[int] = field(default_factory=list)


# --- the trace -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Trace:
    name: str
    records: list[TraceRecord]
    arrivals: list[float]  # simulated seconds

    @property
    def prompt_tokens(self) -> int:
        return sum(r.input_length for r in self.records)

    def steps(self) -> Iterator[tuple[float, list[int]]]:
        """(arrival, request indices): requests arriving at the same instant form a step."""
        for arrival, group in itertools.groupby(range(len(self.records)),
                                                key=self.arrivals.__getitem__):
            yield arrival, list(group)


def _load(path: Path, max_requests: int | None, speedup: float) -> _Trace:
    records = list(itertools.islice(load_trace(path), max_requests))
    if not records:
        raise ValueError(f"{path}: no requests")
    first = records[0].timestamp
    arrivals = [(r.timestamp - first) / 1000.0 / speedup for r in records]
    if any(b < a for a, b in itertools.pairwise(arrivals)):
        raise ValueError(f"{path}: timestamps must not decrease")
    return _Trace(path.name, records, arrivals)


def _shared_prefix_blocks(trace: _Trace, block_size: int) -> int:
    """Leading whole blocks every request of the trace has in common."""
    records = trace.records
    common = 0
    first = records[0].hash_ids
    while common < len(first) and all(len(r.hash_ids) > common
                                      and r.hash_ids[common] == first[common] for r in records):
        common += 1
    shortest = min(r.input_length for r in records)
    return min(common * TRACE_BLOCK_TOKENS, shortest) // block_size


def single_cache_hits(records: Sequence[TraceRecord], block_size: int) -> list[int]:
    """Hit tokens per request of one infinite cache: the longest prefix, in whole blocks,
    that an earlier request had."""
    return reference_hits(records, block_size, 0)[0]


def reference_hits(records: Sequence[TraceRecord], block_size: int,
                   pooled_capacity: int) -> tuple[list[int], list[int]]:
    """Hit tokens per request of one infinite cache (the bound) and of one LRU cache of
    `pooled_capacity` blocks (the fleet's memory pooled, no routing; 0 = skip it)."""
    seen: set[int] = set()
    lru: OrderedDict[int, None] = OrderedDict()
    bound_hits: list[int] = []
    lru_hits: list[int] = []
    for record in records:
        tokens = trace_tokens(record)
        chain = block_keys(tokens, block_size, 0)  # the chain under any fixed seed
        bound_hits.append(_leading(chain, seen) * block_size)
        seen.update(chain)
        if pooled_capacity:
            lru_hits.append(_leading(chain, lru) * block_size)
            for h in reversed(chain[:pooled_capacity]):  # tail first, like BlockPool
                lru[h] = None
                lru.move_to_end(h)
            while len(lru) > pooled_capacity:
                lru.popitem(last=False)
    return bound_hits, lru_hits


def _leading(chain: Sequence[int], cache: set[int] | OrderedDict[int, None]) -> int:
    hit = 0
    for h in chain:
        if h not in cache:
            break
        hit += 1
    return hit


# --- engines: pinned pools and the time model ----------------------------------------------


class PinnedPool(BlockPool):
    """A `BlockPool` whose blocks can be pinned by running requests (never evicted then).

    When every block is pinned the pool holds more than its capacity for a while (counted as
    an overcommitted serve), as an engine would have to preempt or queue instead.
    """

    def __init__(self, *, capacity_blocks: int, block_size: int = 16,
                 cpu_capacity_blocks: int = 0, seed: int = 0) -> None:
        super().__init__(capacity_blocks=capacity_blocks, block_size=block_size,
                         cpu_capacity_blocks=cpu_capacity_blocks, seed=seed)
        self.pinned: dict[int, int] = {}
        self.last_hashes: list[int] = []
        self.evicted = 0
        self.overcommits = 0

    def block_hashes(self, tokens: Sequence[int]) -> list[int]:
        hashes = super().block_hashes(tokens)
        self.last_hashes = hashes  # serve() hashes the prompt once: keep them for pinning
        return hashes

    def pin(self, hashes: Sequence[int]) -> None:
        pinned = self.pinned
        for h in hashes:
            pinned[h] = pinned.get(h, 0) + 1

    def unpin(self, hashes: Sequence[int]) -> None:
        pinned = self.pinned
        for h in hashes:
            left = pinned[h] - 1
            if left:
                pinned[h] = left
            else:
                del pinned[h]

    def _evict_gpu(self, count: int, protected: set[int], events: list[PoolEvent]) -> None:
        pinned = self.pinned
        victims: list[int] = []
        for h in self.gpu:
            if h not in protected and h not in pinned:
                victims.append(h)
                if len(victims) == count:
                    break
        if len(victims) < count:
            self.overcommits += 1
        if not victims:
            return
        for h in victims:
            del self.gpu[h]
        self.evicted += len(victims)
        events.append(PoolRemoved(victims, "gpu"))
        if self.cpu_capacity_blocks > 0:
            self._offload(victims, protected, events)


def _pin_pools(fleet: MockFleet) -> list[PinnedPool]:
    pools = []
    for engine in fleet.all_engines():
        old = engine.pool
        pool = PinnedPool(capacity_blocks=old.capacity_blocks, block_size=old.block_size,
                          cpu_capacity_blocks=old.cpu_capacity_blocks, seed=old.seed)
        engine.pool = pool
        pools.append(pool)
    return pools


@dataclass(slots=True)
class _Worker:
    active_blocks: int = 0
    prefill_free_at: float = 0.0
    waiting: deque[float] = field(default_factory=deque)  # prefill start times
    prefilling: deque[tuple[float, int]] = field(default_factory=deque)  # (end, tokens)
    in_flight_tokens: int = 0
    prefill_tokens: int = 0  # uncached tokens computed over the run
    requests: int = 0


class EngineClock:
    """The simulated-time model of a fleet: FIFO prefill, per-request decode, pinned blocks."""

    def __init__(self, pools: Sequence[PinnedPool], prefill_rate: float,
                 decode_rate: float) -> None:
        self.pools = pools
        self.workers = [_Worker() for _ in pools]
        self.prefill_rate = prefill_rate
        self.decode_rate = decode_rate
        self._finishing: list[tuple[float, int, int, int, list[int]]] = []  # heap
        self._serial = 0

    def advance(self, now: float) -> None:
        """Requests finish, prefills start and end, up to simulated time `now`."""
        finishing = self._finishing
        while finishing and finishing[0][0] <= now:
            _, _, w, blocks, hashes = heapq.heappop(finishing)
            self.workers[w].active_blocks -= blocks
            self.pools[w].unpin(hashes)
        for worker in self.workers:
            while worker.waiting and worker.waiting[0] <= now:
                worker.waiting.popleft()
            while worker.prefilling and worker.prefilling[0][0] <= now:
                worker.in_flight_tokens -= worker.prefilling.popleft()[1]

    def loads(self) -> list[WorkerLoad]:
        return [WorkerLoad(worker_id(w), 0, s.active_blocks, len(s.waiting), s.in_flight_tokens)
                for w, s in enumerate(self.workers)]

    def start(self, w: int, now: float, record: TraceRecord, *, hit_tokens: int,
              hashes: list[int], block_size: int) -> float:
        """A request starts on worker `w` at `now`; returns its time to first token."""
        worker = self.workers[w]
        uncached = record.input_length - hit_tokens
        begin = max(now, worker.prefill_free_at)
        end = begin + uncached / self.prefill_rate
        worker.prefill_free_at = end
        if begin > now:
            worker.waiting.append(begin)
        if end > now:
            worker.prefilling.append((end, uncached))
            worker.in_flight_tokens += uncached
        worker.prefill_tokens += uncached
        worker.requests += 1
        blocks = -(-record.input_length // block_size)
        worker.active_blocks += blocks
        self.pools[w].pin(hashes)
        self._serial += 1
        finish = end + record.output_length / self.decode_rate
        heapq.heappush(self._finishing, (finish, self._serial, w, blocks, hashes))
        return end - now


# --- the kv policy's wait for the event path ----------------------------------------------


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
            steps=len(self.waits_ms), timeouts=self.timeouts, wait=_latency(self.waits_ms),
            gaps=sum(s.gaps for s in sources), gaps_unfilled=sum(s.gaps_unfilled for s in sources),
            resyncs=sum(r.resyncs for b in self._bridges for r in b.publisher.ranks))


# --- running one policy --------------------------------------------------------------------


def _latency(samples: Sequence[float]) -> Latency:
    if not samples:
        return Latency(0, 0.0, 0.0, 0.0, 0.0)
    ordered = sorted(samples)
    return Latency(len(ordered), statistics.fmean(ordered), _quantile(ordered, 0.5),
                   _quantile(ordered, 0.99), ordered[-1])


def _quantile(ordered: Sequence[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


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
    series: _Series = field(default_factory=_Series)
    ttfts: list[float] = field(default_factory=list)
    predicted: list[int | None] = field(default_factory=list)  # router's expected blocks


async def _replay(trace: _Trace, fleet: MockFleet, router: Router, *, pools: list[PinnedPool],
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


def _result(policy: str, trace: _Trace, out: _Outcome, *, block_size: int, wall_s: float,
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
        ttft_p50_s=_quantile(ordered, 0.5), ttft_p99_s=_quantile(ordered, 0.99),
        evicted_blocks=sum(p.evicted for p in clock.pools),
        overcommitted_serves=sum(p.overcommits for p in clock.pools),
        predicted_hit_ratio=(sum(p * block_size for p, _ in known) / prompt
                             if known and prompt else None),
        mispredicted_requests=(sum(1 for p, h in known if p != h // block_size)
                               if known else None),
        wall_s=wall_s, **extra)


async def _run_policy(policy: str, trace: _Trace,
                      settings: RoutingSettings) -> tuple[PolicyResult, _Series]:
    started = time.perf_counter()
    label = f"{trace.name} {policy}"
    if policy == "kv":
        return await _run_kv(trace, settings, label, started)
    fleet = _fleet(settings, buffer_steps=1)  # never started: no sockets, nothing to replay
    try:
        pools = _pin_pools(fleet)
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


async def _run_kv(trace: _Trace, settings: RoutingSettings, label: str,
                  started: float) -> tuple[PolicyResult, _Series]:
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
                pools = _pin_pools(fleet)
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
                    find_best_worker=_latency(router.latencies_ms),
                    fallbacks=dict(router.fallbacks), catch_up=catch_up.stats())
        finally:
            await service.close()
    return result, out.series


# --- the whole run -------------------------------------------------------------------------


@dataclass(slots=True)
class _TraceRun:
    trace: _Trace
    bound_hits: list[int]
    pooled_hits: list[int]
    series: dict[str, _Series]
    report: TraceReport


async def _run_trace(path: Path, settings: RoutingSettings, policies: Sequence[str],
                     ) -> _TraceRun:
    trace = _load(path, settings.max_requests, settings.speedup)
    if settings.progress:
        print(f"{trace.name}: {len(trace.records)} requests, {trace.prompt_tokens:,} prompt "
              f"tokens; single-cache bound...", file=sys.stderr, flush=True)
    bound_hits, pooled_hits = reference_hits(trace.records, settings.block_size,
                                             settings.workers * settings.capacity_blocks)
    bound = sum(bound_hits) / trace.prompt_tokens
    results: dict[str, PolicyResult] = {}
    series: dict[str, _Series] = {}
    for policy in policies:
        result, s = await _run_policy(policy, trace, settings)
        results[policy], series[policy] = result, s
        if settings.progress:
            print(f"{trace.name} {policy}: hit ratio {result.hit_ratio:.4f} "
                  f"(bound {bound:.4f}), load balance {result.load_balance:.3f}, "
                  f"{result.wall_s:.0f} s", file=sys.stderr, flush=True)
    report = TraceReport(trace=trace.name, requests=len(trace.records),
                         prompt_tokens=trace.prompt_tokens,
                         duration_s=trace.arrivals[-1],
                         shared_prefix_blocks=_shared_prefix_blocks(trace, settings.block_size),
                         bound_hit_ratio=bound,
                         pooled_lru_hit_ratio=sum(pooled_hits) / trace.prompt_tokens,
                         policies=results)
    return _TraceRun(trace, bound_hits, pooled_hits, series, report)


def _tuning_row(settings: RoutingSettings, result: PolicyResult, bound: float) -> TuningRow:
    return TuningRow(overlap_weight=settings.overlap_weight, temperature=settings.temperature,
                     speedup=settings.speedup, policy=result.policy, hit_ratio=result.hit_ratio,
                     bound_ratio=result.hit_ratio / bound if bound else 0.0,
                     load_balance=result.load_balance,
                     workers_used=sum(1 for n in result.requests_per_worker if n),
                     ttft_p50_s=result.ttft_p50_s, ttft_p99_s=result.ttft_p99_s)


def _tune_point(point: RoutingSettings, bound: float) -> TuningRow:
    """One grid point in a worker process (the oracle needs no service)."""
    trace = _load(point.trace, point.max_requests, point.speedup)
    result, _ = asyncio.run(_run_policy(point.tune_policy, trace, point))
    return _tuning_row(point, result, bound)


async def _tune(settings: RoutingSettings) -> list[TuningRow]:
    """The grid on --trace: oracle points two processes at a time, kv points one by one."""
    if not settings.tune_overlap_weights:
        return []
    trace = _load(settings.trace, settings.max_requests, 1.0)
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
            result, _ = await _run_policy("kv", _load(point.trace, point.max_requests,
                                                      point.speedup), point)
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


async def run_routing(settings: RoutingSettings) -> tuple[RoutingReport, list[_TraceRun]]:
    """Tune (if asked), then every policy on the trace and on the check trace."""
    tuning = await _tune(settings)
    runs = [await _run_trace(settings.trace, settings, settings.policies)]
    if settings.check_trace is not None:
        runs.append(await _run_trace(settings.check_trace, settings, settings.policies))
    report = RoutingReport(
        workers=settings.workers, capacity_blocks=settings.capacity_blocks,
        block_size=settings.block_size, speedup=settings.speedup,
        max_requests=settings.max_requests, overlap_weight=settings.overlap_weight,
        temperature=settings.temperature, prefill_rate=settings.prefill_rate,
        decode_rate=settings.decode_rate, catch_up_timeout_s=settings.catch_up_timeout_s,
        index="redis" if settings.redis_url else "memory",
        traces=[run.report for run in runs], tuning=tuning)
    return report, runs


# --- output --------------------------------------------------------------------------------


_LABELS: Final = {"kv": "KV-aware (FindBestWorker)", "oracle": "oracle (reads the pools)",
                  "round-robin": "round robin", "random": "random"}
_COLORS: Final = {"kv": "tab:blue", "oracle": "tab:orange", "round-robin": "tab:green",
                  "random": "tab:red"}


def plot(runs: Sequence[_TraceRun], path: Path) -> None:
    """Cumulative and windowed hit ratio over each trace, per policy, with the bound."""
    import matplotlib  # noqa: PLC0415 - the `bench` extra, only needed here

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(2, len(runs), figsize=(7.0 * len(runs), 8.0), squeeze=False)
    for col, run in enumerate(runs):
        trace = run.trace
        minutes = [a / 60.0 for a in trace.arrivals]
        prompts = [r.input_length for r in trace.records]
        lines: list[tuple[str, list[int], str | None, str]] = [
            ("single-cache bound", run.bound_hits, "k", "--"),
            ("one LRU of the fleet's capacity", run.pooled_hits, "0.55", "-.")]
        lines += [(_LABELS[p], s.hit_tokens, _COLORS[p], ":" if p == "oracle" else "-")
                  for p, s in run.series.items()]
        span = max(trace.arrivals[-1], 1e-9)
        for label, hits, color, style in lines:
            cum = list(itertools.accumulate(hits))
            total = list(itertools.accumulate(prompts))
            width = 2.0 if style == ":" else 1.2
            axes[0][col].plot(minutes, [h / t for h, t in zip(cum, total, strict=True)],
                              label=label, color=color, linestyle=style, linewidth=width)
            xs, ys = [], []
            for k in range(_PLOT_WINDOWS):
                lo, hi = span * k / _PLOT_WINDOWS, span * (k + 1) / _PLOT_WINDOWS
                idx = [i for i, a in enumerate(trace.arrivals)
                       if lo <= a < hi or (k == _PLOT_WINDOWS - 1 and a == hi)]
                p = sum(prompts[i] for i in idx)
                if p:
                    xs.append((lo + hi) / 2 / 60.0)
                    ys.append(sum(hits[i] for i in idx) / p)
            axes[1][col].plot(xs, ys, label=label, color=color, linestyle=style,
                              linewidth=width, marker=".")
        axes[0][col].set_title(f"{trace.name}: cumulative prefix hit ratio")
        axes[1][col].set_title(f"{trace.name}: hit ratio per {span / _PLOT_WINDOWS / 60:.1f} "
                               "min window")
        for row in (0, 1):
            axes[row][col].set_xlabel("trace time (simulated minutes)")
            axes[row][col].set_ylabel("cached prompt tokens / prompt tokens")
            axes[row][col].set_ylim(0.0, 1.0)
            axes[row][col].grid(alpha=0.3)
        axes[0][col].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ratio(x: float, of: float) -> str:
    return f"{x / of:.3f}" if of else ""


def _pct(x: float) -> str:
    return f"{x:.1%}"


def _policy_table(trace: TraceReport) -> str:
    oracle = trace.policies.get("oracle")
    rows = [
        "| policy | hit ratio | / bound | / oracle | load balance (max/mean prefill) | "
        "FindBestWorker p50 / p99 ms | TTFT p50 / p99 s | predicted hit ratio | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| single-cache bound | {_pct(trace.bound_hit_ratio)} | 1.000 | | | | | | |",
        f"| one LRU of the fleet's capacity (no routing) | {_pct(trace.pooled_lru_hit_ratio)} "
        f"| {_ratio(trace.pooled_lru_hit_ratio, trace.bound_hit_ratio)} | | | | | | |",
    ]
    for name, r in trace.policies.items():
        vs_oracle = (f"{r.hit_ratio / oracle.hit_ratio:.3f}"
                     if oracle is not None and oracle.hit_ratio else "")
        latency = (f"{r.find_best_worker.p50_ms:.2f} / {r.find_best_worker.p99_ms:.2f}"
                   if r.find_best_worker else "—")
        predicted = _pct(r.predicted_hit_ratio) if r.predicted_hit_ratio is not None else "—"
        bound = r.hit_ratio / trace.bound_hit_ratio if trace.bound_hit_ratio else 0.0
        rows.append(f"| {_LABELS[name]} | {_pct(r.hit_ratio)} | {bound:.3f} | {vs_oracle} | "
                    f"{r.load_balance:.3f} | {latency} | {r.ttft_p50_s:.2f} / "
                    f"{r.ttft_p99_s:.2f} | {predicted} | {r.wall_s:.0f} |")
    return "\n".join(rows)


def _details(trace: TraceReport) -> list[str]:
    lines = []
    kv = trace.policies.get("kv")
    if kv is not None and kv.catch_up is not None:
        c = kv.catch_up
        lines.append(
            f"- kv event path: {c.steps:,} steps, catch-up wait per step p50 "
            f"{c.wait.p50_ms:.1f} ms / p99 {c.wait.p99_ms:.1f} ms / max {c.wait.max_ms:.0f} ms, "
            f"{c.timeouts} timeouts; bridge gaps {c.gaps} ({c.gaps_unfilled} unfilled), "
            f"publisher resyncs {c.resyncs}; requests routed without FindBestWorker's answer: "
            f"{_fallbacks(kv.fallbacks)}.")
        if kv.mispredicted_requests is not None:
            lines.append(f"- kv: the index's matched blocks for the chosen worker differed from "
                         f"the engine's hit on {kv.mispredicted_requests:,} of "
                         f"{kv.requests:,} requests.")
    for name, r in trace.policies.items():
        lines.append(f"- {_LABELS[name]}: requests per worker {min(r.requests_per_worker)}-"
                     f"{max(r.requests_per_worker)}, evicted blocks {r.evicted_blocks:,}, "
                     f"serves over capacity (all blocks pinned) {r.overcommitted_serves}.")
    return lines


def _fallbacks(counts: dict[str, int]) -> str:
    why = {"FAILED_PRECONDITION": "no worker indexed yet: the first step",
           "unindexed_workers": "some workers not indexed yet, decided locally over all"}
    return ", ".join(f"{n} ({why.get(k, k)})" for k, n in sorted(counts.items())) or "none"


def _targets(report: RoutingReport, trace: TraceReport) -> str:
    kv, oracle = trace.policies.get("kv"), trace.policies.get("oracle")
    if kv is None:
        return "Targets need the kv policy."
    bound_ratio = kv.hit_ratio / trace.bound_hit_ratio if trace.bound_hit_ratio else 0.0
    rows = ["| target | measured | result |", "|---|---:|---|",
            f"| kv hit ratio >= {TARGET_BOUND_RATIO} x single-cache bound | {bound_ratio:.3f} | "
            f"{_verdict(bound_ratio >= TARGET_BOUND_RATIO)} |",
            f"| stretch: >= {STRETCH_BOUND_RATIO} x bound | {bound_ratio:.3f} | "
            f"{_verdict(bound_ratio >= STRETCH_BOUND_RATIO)} |"]
    if oracle is not None and oracle.hit_ratio:
        ratio = kv.hit_ratio / oracle.hit_ratio
        rows.append(f"| kv within 2% of the oracle router (kv / oracle >= "
                    f"{TARGET_ORACLE_RATIO}) | {ratio:.4f} ({kv.hit_ratio - oracle.hit_ratio:+.2%}"
                    f" points) | {_verdict(ratio >= TARGET_ORACLE_RATIO)} |")
    rows.append(f"| kv load balance <= {TARGET_LOAD_BALANCE} | {kv.load_balance:.3f} | "
                f"{_verdict(kv.load_balance <= TARGET_LOAD_BALANCE)} |")
    shape = (report.workers, report.capacity_blocks, report.block_size)
    if shape != TARGET_SHAPE or report.max_requests is not None or report.speedup != 1.0:
        rows.append("\nThe targets are set for 16 workers x 65,536 blocks of 16 tokens on the "
                    "whole trace at its own rate; this run differs, so they are indicative.")
    return "\n".join(rows)


def _verdict(ok: bool) -> str:
    return bench_report.verdict(ok)


def _tuning_table(rows: Sequence[TuningRow], chosen: tuple[float, float]) -> str:
    lines = ["| speedup | overlap_weight | temperature | hit ratio | / bound | load balance | "
             "workers used | TTFT p50 / p99 s |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mark = "**" if (r.overlap_weight, r.temperature) == chosen else ""
        lines.append(f"| {r.speedup:g} | {mark}{r.overlap_weight:g}{mark} | {r.temperature:g} | "
                     f"{_pct(r.hit_ratio)} | {r.bound_ratio:.3f} | {r.load_balance:.3f} | "
                     f"{r.workers_used} | {r.ttft_p50_s:.2f} / {r.ttft_p99_s:.2f} |")
    return "\n".join(lines)


def _why(report: RoutingReport) -> list[str]:
    """The defaults, and what the grid says about them (computed, so it stays true)."""
    rows = report.tuning
    chosen = (report.overlap_weight, report.temperature)
    out = [f"Defaults: overlap_weight **{report.overlap_weight:g}**, temperature "
           f"**{report.temperature:g}** (bold rows), chosen on the conversation trace only; the "
           f"synthetic trace ran with them unchanged. The server's own default "
           f"(`indexer/scheduling.py`) is overlap_weight {SERVER_OVERLAP_WEIGHT:g}, temperature "
           f"{SERVER_TEMPERATURE:g}; this benchmark sends its values with every call.", ""]
    edges = []
    for speedup in sorted({r.speedup for r in rows}):
        at = [r for r in rows if r.speedup == speedup]
        best = max(at, key=lambda r: r.hit_ratio)
        mine = next((r for r in at if (r.overlap_weight, r.temperature) == chosen), None)
        near = sorted({r.overlap_weight for r in at if r.temperature == 0.0
                       and r.bound_ratio >= best.bound_ratio - 0.01})
        line = (f"- speedup {speedup:g}: best overlap_weight {best.overlap_weight:g} / "
                f"temperature {best.temperature:g} ({best.bound_ratio:.3f} of the bound, load "
                f"balance {best.load_balance:.3f}); at temperature 0, weights "
                f"{', '.join(f'{w:g}' for w in near)} are within 0.01 of it")
        if mine is not None:
            line += (f"; the defaults reach {mine.bound_ratio:.3f} (load balance "
                     f"{mine.load_balance:.3f})")
        out.append(line + ".")
        idle = [r.overlap_weight for r in at if r.temperature == 0.0 and r.workers_used <
                report.workers]
        if idle:
            edges.append(f"{min(idle):g} at speedup {speedup:g}")
    shared = report.traces[0].shared_prefix_blocks
    sampled = [(r, next((z for z in rows if z.temperature == 0.0
                         and (z.overlap_weight, z.speedup) == (r.overlap_weight, r.speedup)),
                        None)) for r in rows if r.temperature > 0]
    pairs = [(r, z) for r, z in sampled if z is not None]
    better = [(r, z) for r, z in pairs if r.hit_ratio > z.hit_ratio + 0.005]
    where = ", ".join(f"{r.overlap_weight:g} at speedup {r.speedup:g}" for r, _ in better)
    idle_there = all(z.workers_used < report.workers for _, z in better)
    edge = (f" (argmin first leaves workers idle at overlap_weight {', '.join(edges)})"
            if edges else "")
    out += [
        "",
        "Why: the cost is overlap_weight x blocks to prefill + active blocks. A follow-up "
        "turn's cached prefix is hundreds of blocks, so at low weights one or two running "
        "requests on the worker that holds it send the turn elsewhere, where it misses: the hit "
        "ratio climbs with the weight. New conversations match only the prefix every request "
        f"shares ({shared} blocks on this trace), which every warm worker holds, so they still "
        "go to the least loaded worker. But the weight also prices that shared prefix: a worker "
        f"that does not hold it (empty at start, or restarted) costs overlap_weight x {shared} "
        "blocks more and gets traffic only once the others carry that many more active "
        "blocks. At the highest weights some workers never serve ('workers used'), the others' "
        "pools thrash, load balance goes up and the hit ratio down. The default sits inside "
        f"the plateau, below that edge{edge}.",
        "",
        "Temperature: sampling from the min-max normalised softmax beat argmin by more than 0.5 "
        f"points at {len(better)} of {len(pairs)} grid points"
        + (f" (overlap_weight {where})" if better else "")
        + (", all of them points where argmin leaves workers idle: sampling only rescues a "
           "weight that is too high" if better and idle_there else "")
        + ". Temperature 0 also keeps routing deterministic.",
    ]
    return out


def report_body(report: RoutingReport, plot_path: Path | None) -> str:
    """The markdown of the docs/benchmarks.md section."""
    index = "Redis" if report.index == "redis" else "in-memory"
    parts = [
        f"{report.workers} simulated engines (`MockEngine`, LRU pools of "
        f"{report.capacity_blocks:,} GPU blocks of {report.block_size} tokens, real vLLM ZMQ "
        f"events), a fresh fleet per policy. Each request is `trace_tokens(record)` (every "
        f"512-token hash id expands into deterministic token ids). Hit ratio = cached prompt "
        f"tokens / prompt tokens, as the engines count them.",
        "",
        f"- **kv**: FindBestWorker over gRPC with the engines' loads, against `IndexerService` "
        f"on its embedded default (nats-server, {index} index) fed by one bridge per engine: "
        f"engine ZMQ -> `EngineSource` + `KVEventPublisher` -> JetStream -> consumer -> index. "
        f"overlap_weight {report.overlap_weight:g}, temperature {report.temperature:g}, sent "
        f"with every call.",
        "- **oracle**: the same cost function (`indexer.scheduling.choose_worker`, same knobs, "
        "loads and sampling seed) over overlaps read from the engines' pools directly; kv vs "
        "oracle is what index staleness costs.",
        "- **round robin**, **random** (seeded): no index.",
        "- **single-cache bound**: one infinite cache over the trace (each request hits the "
        "longest prefix, in whole blocks, any earlier request had); for reference, one LRU "
        "cache of the whole fleet's capacity (what the fleet would hit if its memory were "
        "pooled).",
        "",
        f"Time is simulated (never slept): arrivals at the trace timestamps divided by the "
        f"speedup ({report.speedup:g}; above 1 it multiplies the offered load); "
        f"requests with the same timestamp form one step. Per worker, prompts prefill one at a "
        f"time at {report.prefill_rate:,.0f} uncached tokens/s, then decode at "
        f"{report.decode_rate:g} tokens/s per request (an 8xH100 node serving a 70B-class "
        f"model, TP8: ~40% MFU prefill, 25 ms inter-token latency). A request's prompt blocks "
        f"are pinned from arrival to its last token. Loads sent to FindBestWorker per worker: "
        f"active_blocks = prompt blocks of unfinished requests, waiting_requests = prefills not "
        f"started, prefill_tokens_in_flight. Load balance = max / mean uncached prompt tokens "
        f"prefilled per worker. Index staleness: after each step the run waits (wall time, "
        f"at most {report.catch_up_timeout_s:g} s) until every bridge has read its engine's "
        f"batches, JetStream has them and ListWorkers shows every worker's last seq applied: "
        f"the index is at most one step behind (requests of one step do not see each other's "
        f"blocks; the oracle does). FindBestWorker latency is the router's wall time per "
        f"call, with bridges, consumer and gRPC server on the same event loop and 2 cores.",
    ]
    if report.max_requests is not None:
        parts.append(f"\nOnly the first {report.max_requests:,} requests of each trace.")
    for i, trace in enumerate(report.traces):
        role = "tuned on" if i == 0 else "check, no tuning"
        parts += ["", f"### {trace.trace} ({role}): {trace.requests:,} requests, "
                      f"{trace.prompt_tokens:,} prompt tokens, {trace.duration_s / 60:.1f} "
                      "simulated minutes", "", _policy_table(trace), "", *_details(trace)]
        if i == 0:
            parts += ["", _targets(report, trace)]
    if plot_path is not None:
        parts += ["", f"![prefix hit ratio over the trace per policy]({plot_path.name})"]
    if report.tuning:
        policy = report.tuning[0].policy
        parts += ["", f"### Tuning on {report.traces[0].trace} ({policy} policy: the same "
                      "cost function as kv without the event path, so a grid point takes "
                      "seconds, not minutes)", "",
                  _tuning_table(report.tuning, (report.overlap_weight, report.temperature)),
                  "", *_why(report)]
    return "\n".join(parts)


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


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
