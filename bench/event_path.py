"""Event path: simulated vLLM fleet -> bridges -> JetStream -> consumer -> Redis.

    python -m bench.event_path [--workers 16 --duration 10]

A child process runs the mock engines (real ZMQ wire) and one bridge per engine
(`EngineSource` + `KVEventPublisher`); this process runs the indexer service (Redis index,
private redis-server and nats-server). Phases:
1. bridge only: the fleet publishes as fast as it can with no indexer running;
2. consumer only: the indexer starts and drains that backlog;
3. end to end: fleet and indexer together, fleet as fast as it can;
4. lag: one fleet starts, then runs paced at 10k and at 50k blocks/s;
   lag = engine batch timestamp -> applied.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from indexer.app import IndexerService
from indexer.config import ServiceConfig
from indexer.embedded import EmbeddedNats
from kvcore.runtime import configure_logging, settle_gc
from kvsim.report import pct, verdict, write_section
from tests.support.servers import RedisServer

MODEL = "bench/event-path"
BLOCK_SIZE = 16
START_S = 2.0  # the paced fleet's first phase: engines start, the indexer clears old epochs
LAG_RATES = (10_000, 50_000)


# --- the fleet (child process) ------------------------------------------------------------


Phase = tuple[float | None, float]  # (blocks/s, None = as fast as it goes; seconds)


def fleet_main(nats_url: str, worker_ids: list[str], phases: list[Phase], start_at: float,
               conn: Connection) -> None:
    configure_logging("json", "warning")
    conn.send(asyncio.run(_fleet(nats_url, worker_ids, phases, start_at)))


async def _fleet(nats_url: str, worker_ids: list[str], phases: list[Phase],
                 start_at: float) -> dict[str, Any]:
    """Engines + bridges for `worker_ids`; phases start at wall time `start_at`."""
    import zmq.asyncio

    from kvcore.topology import StreamSettings
    from kvsim.mock_engines import MockFleet, synthetic_prompts
    from publisher.publisher import KVEventPublisher
    from publisher.zmq_source import EngineSource

    workers = len(worker_ids)
    fleet = MockFleet(n_workers=workers, capacity_blocks=8192, block_size=BLOCK_SIZE,
                      base_port=0).start()
    pubs = [KVEventPublisher(MODEL, worker_id, block_size=BLOCK_SIZE, nats_url=nats_url,
                             stream=StreamSettings(), max_pending=100_000)
            for worker_id in worker_ids]
    for pub in pubs:
        await pub.start()
    ctx = zmq.asyncio.Context()
    stop = asyncio.Event()
    sources = [EngineSource(ctx, pub.ranks[0], engine.endpoint,
                            replay_endpoint=engine.replay_endpoint)
               for pub, engine in zip(pubs, fleet.all_engines(), strict=True)]
    tasks = [asyncio.create_task(s.run(stop)) for s in sources]
    settle_gc()  # as `kv-publisher bridge` does once it is up
    await asyncio.sleep(max(0.5, start_at - time.time()))  # SUB sockets connect
    prompts = synthetic_prompts(prefix_tokens=512, max_suffix=1024)
    started_wall = time.time()
    started = time.perf_counter()
    phase_walls: list[float] = []
    worker = 0
    phase_blocks: list[int] = []
    for rate, duration in phases:
        phase_walls.append(time.time())
        phase_start = time.perf_counter()
        base = _blocks(fleet)
        while (elapsed := time.perf_counter() - phase_start) < duration:
            if rate is not None and _blocks(fleet) - base > rate * elapsed:
                await asyncio.sleep(0.002)
                continue
            fleet.serve(worker, next(prompts))
            worker = (worker + 1) % workers
            await asyncio.sleep(0)
        phase_blocks.append(_blocks(fleet) - base)
    produced = time.perf_counter() - started
    for pub in pubs:
        pub.end_step()
    await asyncio.gather(*(pub.sink.flush(60) for pub in pubs if pub.sink))
    published_at = time.perf_counter() - started
    stop.set()
    await asyncio.gather(*tasks)
    blocks = sum(pub.sink.stats.blocks for pub in pubs if pub.sink)
    for pub in pubs:
        await pub.close()
    ctx.term()
    stats = fleet.stats()
    fleet.close()
    return {"engine_blocks": float(stats.stored_blocks + stats.removed_blocks),
            "published_blocks": float(blocks), "produce_s": produced,
            "publish_s": published_at, "started_wall": started_wall,
            "phase_walls": phase_walls, "phase_blocks": phase_blocks,
            "gaps": float(sum(s.stats.gaps for s in sources)),
            "unfilled": float(sum(s.stats.gaps_unfilled for s in sources))}


def _blocks(fleet: Any) -> int:
    """Blocks the engines named in events so far (stored + removed, as the indexer counts)."""
    stats = fleet.stats()
    return int(stats.stored_blocks + stats.removed_blocks)


FLEET_START_S = 3.0  # spawned fleet processes import and connect within this


def run_fleet(nats_url: str, workers: int, procs: int,
              phases: list[Phase]) -> list[tuple[mp.Process, Connection]]:
    """`procs` fleet processes, engines dealt round-robin, each paced at its share."""
    start_at = time.time() + FLEET_START_S
    share = [(None if rate is None else rate / procs, duration) for rate, duration in phases]
    running = []
    for k in range(procs):
        parent, child = mp.get_context("spawn").Pipe(duplex=False)
        ids = [f"sim-{w}" for w in range(k, workers, procs)]
        proc = mp.get_context("spawn").Process(target=fleet_main,
                                               args=(nats_url, ids, share, start_at, child))
        proc.start()
        child.close()  # so a fleet process that dies shows as EOF, not a silent hang
        running.append((proc, parent))
    return running


async def wait_fleet(running: list[tuple[mp.Process, Connection]]) -> dict[str, Any]:
    """The fleet processes' results, merged."""
    results = [await wait_result(conn, proc) for proc, conn in running]
    merged: dict[str, Any] = {
        key: sum(r[key] for r in results)
        for key in ("engine_blocks", "published_blocks", "gaps", "unfilled")}
    for key in ("produce_s", "publish_s"):
        merged[key] = max(r[key] for r in results)
    merged["started_wall"] = min(r["started_wall"] for r in results)
    merged["phase_walls"] = [min(walls) for walls in zip(*(r["phase_walls"] for r in results),
                                                          strict=True)]
    merged["phase_blocks"] = [sum(b) for b in zip(*(r["phase_blocks"] for r in results),
                                                  strict=True)]
    return merged


# --- the measurement (this process) -------------------------------------------------------


async def wait_result(conn: Connection, proc: mp.Process) -> dict[str, Any]:
    while not conn.poll():
        await asyncio.sleep(0.1)
    result: dict[str, Any] = conn.recv()
    proc.join(30)
    return result


async def measure(args: argparse.Namespace, procs: int, nats_url: str,
                  redis_url: str) -> dict[str, Any]:
    config = ServiceConfig(nats_url=nats_url, redis_url=redis_url, grpc_listen="",
                           metrics_listen="",
                           partitions=args.partitions, liveness_grace_s=3600.0)
    out: dict[str, Any] = {}

    # 1. bridge only (the stream fills; nobody consumes)
    from nats import connect

    from kvcore.topology import StreamSettings, ensure_stream

    nc = await connect(nats_url)
    await ensure_stream(nc.jetstream(), StreamSettings(partitions=args.partitions))
    await nc.close()
    bridge = await wait_fleet(run_fleet(nats_url, args.workers, procs,
                                        [(None, args.duration)]))
    out["bridge"] = bridge
    print(f"bridge only: {bridge['published_blocks'] / bridge['publish_s']:,.0f} blocks/s "
          f"({bridge['published_blocks']:,.0f} blocks)")

    # 2. consumer only: drain the backlog
    service = IndexerService(config)
    started = time.perf_counter()
    await service.start()
    target = bridge["published_blocks"]
    while service.stats.blocks_seen < target:
        await asyncio.sleep(0.05)
    drain_s = time.perf_counter() - started
    out["consumer"] = {"blocks": target, "seconds": drain_s}
    print(f"consumer only: {target / drain_s:,.0f} blocks/s")

    # 3. end to end, as fast as the fleet goes
    [e2e] = await _window(service, nats_url, args, procs, [(None, args.duration)])
    out["e2e"] = e2e
    print(f"end to end: {e2e['rate']:,.0f} blocks/s, lag p50 {e2e['p50'] * 1e3:.1f} ms "
          f"p99 {e2e['p99'] * 1e3:.1f} ms")

    # 4. lag at fixed rates: one fleet, which starts (16 engines with new epochs: the
    # indexer clears their previous blocks), then runs at 10k and at 50k blocks/s.
    phases: list[Phase] = [(float(LAG_RATES[0]), START_S)]
    phases += [(float(rate), args.duration) for rate in LAG_RATES]
    start, *paced = await _window(service, nats_url, args, procs, phases)
    out["start"] = start
    for rate, r in zip(LAG_RATES, paced, strict=True):
        out[f"lag{rate}"] = r
    for label, r in [("fleet start", start), *zip(map(str, LAG_RATES), paced, strict=True)]:
        print(f"{label}: {r['rate']:,.0f} blocks/s, lag p50 {r['p50'] * 1e3:.1f} ms "
              f"p99 {r['p99'] * 1e3:.1f} ms")
    await service.close()
    return out


async def _window(service: IndexerService, nats_url: str, args: argparse.Namespace,
                  procs: int, phases: list[Phase]) -> list[dict[str, float]]:
    """Run a fresh fleet through `phases`; lag and rate of each phase once all is applied."""
    stats = service.stats
    before_blocks = stats.blocks_seen
    stats.lag_samples.clear()
    stats.lag_sample_ts.clear()
    running = run_fleet(nats_url, args.workers, procs, phases)
    started = time.perf_counter()
    result = await wait_fleet(running)
    target = before_blocks + result["published_blocks"]
    while stats.blocks_seen < target and time.perf_counter() - started < 120:
        await asyncio.sleep(0.05)
    if stats.blocks_seen < target:
        raise SystemExit(f"the indexer applied {stats.blocks_seen - before_blocks:,} of "
                         f"{result['published_blocks']:,.0f} blocks within 120 s")
    samples = list(zip(stats.lag_samples, stats.lag_sample_ts, strict=True))
    bounds = [*result["phase_walls"], float("inf")]
    out = []
    for i, (_, duration) in enumerate(phases):
        lags = [lag for lag, ts in samples if bounds[i] <= ts < bounds[i + 1]]
        out.append({"rate": result["phase_blocks"][i] / duration,
                    "p50": statistics.median(lags) if lags else float("nan"),
                    "p99": pct(lags, 0.99), "batches": float(len(lags))})
    if len(phases) == 1:  # as fast as it goes: the rate is what reached the index
        window = max(stats.last_applied_at - result["started_wall"], result["publish_s"])
        out[0]["rate"] = (stats.blocks_seen - before_blocks) / window
    return out


def report(outs: dict[int, dict[str, Any]], args: argparse.Namespace) -> str:
    layouts = list(outs)

    def row(label: str, cells: list[str], target: str = "", oks: list[bool] | None = None) -> str:
        verdicts = ", ".join(verdict(ok) for ok in oks) if oks else ""
        return f"| {label} | {' | '.join(cells)} | {target} | {verdicts} |"

    def lag(r: dict[str, float]) -> str:
        return f"p50 {r['p50'] * 1e3:.1f} ms, p99 {r['p99'] * 1e3:.1f} ms"

    bridge = [o["bridge"]["published_blocks"] / o["bridge"]["publish_s"] for o in outs.values()]
    consumer = [o["consumer"]["blocks"] / o["consumer"]["seconds"] for o in outs.values()]
    e2e = [o["e2e"]["rate"] for o in outs.values()]
    rows = [
        "| figure | " + " | ".join(f"{p} fleet process{'es' if p > 1 else ''}"
                                   for p in layouts) + " | target | |",
        "|---|" + "---|" * len(layouts) + "---|---|",
        row("bridge only (engines + bridges)", [f"{r:,.0f} blocks/s" for r in bridge]),
        row("consumer only (JetStream -> Redis, backlog drain)",
            [f"{r:,.0f} blocks/s" for r in consumer]),
        row("end to end, sustained", [f"{r:,.0f} blocks/s" for r in e2e], ">= 100,000",
            [r >= 100_000 for r in e2e]),
        row(f"lag while the fleet starts (first {START_S:g} s at {LAG_RATES[0]:,} blocks/s)",
            [lag(o["start"]) for o in outs.values()]),
    ]
    for rate in LAG_RATES:
        paced = [o[f"lag{rate}"] for o in outs.values()]
        achieved = "/".join(f"{r['rate']:,.0f}" for r in paced)
        target = "p99 <= 50 ms" if rate == 50_000 else ""
        oks = [r["p99"] <= 0.05 and r["rate"] >= 0.9 * rate for r in paced] if target else None
        rows.append(row(f"lag at {rate:,} blocks/s (achieved {achieved})",
                        [lag(r) for r in paced], target, oks))
    table = "\n".join(rows)
    return f"""{args.workers} mock vLLM engines (LRU pools of 8,192 blocks, map wire form,
synthetic prompts sharing 512-token prefixes) with one bridge each (`EngineSource` +
`KVEventPublisher`, as `kv-publisher bridge` runs them) in child processes: all in one
process, and spread over two (in production each bridge is its own process beside its
engine; here more processes means more contention for the two cores, see the lag rows);
the indexer (Redis backend, {args.partitions} partitions) in the bench process; private
nats-server and redis-server; all on the same 2 cores. Blocks count stored and removed
blocks named by events. Lag is from the engine's batch timestamp to the batch being applied
to the index (after which Score sees it); a batch counts in the phase its timestamp falls
in. The end-to-end run and the paced run each start a fresh fleet: {args.workers} engines
come up at once with new epochs, so the indexer clears their previous blocks (about
{args.workers} x 8,192) while the first batches arrive. The paced fleet spends its first
{START_S:g} s at {LAG_RATES[0]:,} blocks/s (that restart storm, reported on its own row),
then {args.duration:g} s at each paced rate without restarting.

{table}

The bottleneck is visible from the first two rows: the end-to-end rate is bounded by the
slower of the fleet processes and the consumer, which share the machine's two cores with
nats-server and redis-server.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--fleet-procs", type=int, nargs="+", default=[1, 2],
                        help="fleet layouts: processes the engines and bridges are spread over")
    args = parser.parse_args()
    if not all(1 <= procs <= args.workers for procs in args.fleet_procs):
        parser.error("--fleet-procs must be between 1 and --workers")
    configure_logging("json", "warning")
    outs: dict[int, dict[str, Any]] = {}
    for procs in args.fleet_procs:  # each layout on fresh servers
        print(f"-- {procs} fleet process(es)")
        tmp = Path(tempfile.mkdtemp(prefix="bench-event-path-"))
        nats_server = EmbeddedNats(tmp / "nats").start()
        redis_server = RedisServer(tmp / "redis").start()
        try:
            outs[procs] = asyncio.run(measure(args, procs, nats_server.url, redis_server.url))
        finally:
            nats_server.stop()
            redis_server.stop()
    write_section("event-path", "Event path: fleet -> bridge -> JetStream -> Redis",
                  "make bench-events", report(outs, args))


if __name__ == "__main__":
    main()
