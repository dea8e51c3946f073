"""FindBestWorker decisions per second from one server process, unary vs FindBestWorkerStream
(`python -m bench.decisions`, `make bench-decisions`).

1,024 worker ranks (every one live) hold the shared-prefix workload (bench/workload.py);
each decision is a FindBestWorker of one 8,192-token prompt as `token_bytes` (packed u32,
what the client library sends until it knows the model's block size), or as
`block_key_bytes` (what it sends once an answer told it the block size: the bench's client
learns it from the server first), with the loads of 8 ranks and `max_candidates` 8 (the
same request bytes on both paths). The real server
(`start_grpc_server`, in-memory index, uvloop, GC tuned as `kv-indexer serve` runs it)
runs in a spawned process of its own; the load comes from bench/grpcload.c (C,
libnghttp2): unary calls, or messages on one bidirectional stream per connection. For
each path: a closed loop (decisions in flight, for the most decisions/s) and an open loop
at fixed rates (latency from the scheduled send). Before timing, streamed answers are
checked equal to unary ones over the same requests, and in this process the fast path's
answers (token_bytes, the decision in C) equal to the pure-Python path's (token_ids,
`scheduling.top_costs`, protobuf's serialiser) over every request.

Targets (issue 18): >= 10,000 decisions/s from one process; p99 <= 5 ms at 5,000/s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc

from bench import grpcload
from bench.grpc_score import SpawnedServers, answer_parent
from bench.workload import make_workload, worker_name
from indexer._proto.kvindex.v1 import indexer_pb2 as pb
from indexer._proto.kvindex.v1 import indexer_pb2_grpc as pb_grpc
from indexer.client import AsyncIndexerClient, Decision, Query
from kvcore.bus import pack_tokens
from kvsim.report import pct, verdict, write_section

MODEL = "bench/model"
UNARY = "/kvindex.v1.KvIndexer/FindBestWorker"
STREAM = "/kvindex.v1.KvIndexer/FindBestWorkerStream"
RATE_TARGET = 10_000
P99_RATE = 5_000
P99_TARGET_MS = 5.0
LOADED_RANKS = 8
# Open-loop rates above this multiple of the path's closed-loop rate are not run: the
# server cannot keep up, latency only grows with the run's length.
OVERLOAD = 1.5
CANDIDATES = 8
BLOCK_SIZE = 16  # the workload's (bench/workload.py)
TOKEN_BYTES, TOKEN_IDS, KEY_BYTES = "token_bytes", "token_ids", "block_key_bytes"


@dataclass(frozen=True)
class ServerSpec:
    ranks: int
    blocks: int
    queries: int
    stream_window: int


def _serve(spec: ServerSpec, conn: Connection) -> None:
    """Child: build the index, serve it; answer 'cpu' and 'stop' on `conn`."""
    from indexer.index.memory import MemoryIndex
    from kvcore.runtime import SERVER_GC_THRESHOLDS, run_event_loop, settle_gc

    index = MemoryIndex()
    workload = make_workload(spec.ranks, spec.blocks, n_queries=spec.queries)
    index.sync.apply(workload.batches(MODEL))
    index.sync.apply(workload.idle_rank_batches(MODEL))
    del workload
    settle_gc(SERVER_GC_THRESHOLDS)
    run_event_loop(_serve_async(index, spec, conn))


async def _serve_async(index: Any, spec: ServerSpec, conn: Connection) -> None:
    from indexer.serve.service import ServiceSettings, start_grpc_server

    settings = ServiceSettings(stream_window=spec.stream_window)
    server, port = await start_grpc_server(index, "127.0.0.1:0", settings=settings)
    await answer_parent(conn, port)
    await server.stop(0.5)


def start_server(spec: ServerSpec) -> SpawnedServers:
    return SpawnedServers(_serve, lambda _: (spec,), start_timeout_s=600)


def requests(queries: list[list[int]], ranks: int, seed: int = 18,
             form: str = TOKEN_BYTES, block_size: int = BLOCK_SIZE
             ) -> list[pb.FindBestWorkerRequest]:
    """The bench's requests, the prompts in `form`: `token_bytes` (what the client library
    sends while it does not know the model's block size), `token_ids`, or
    `block_key_bytes` (what it sends once it learnt `block_size`: its own request)."""
    rng = random.Random(seed)
    out = []
    for tokens in queries:
        packed = pack_tokens(tokens)
        if form == KEY_BYTES:
            query = Decision(query=Query(model=MODEL, token_ids=tokens)).request(
                key_block_size=block_size).score
        elif form == TOKEN_BYTES:
            query = pb.ScoreRequest(model=MODEL, token_bytes=packed)
        else:
            query = pb.ScoreRequest(model=MODEL, token_ids=tokens)
        request = pb.FindBestWorkerRequest(score=query, max_candidates=CANDIDATES)
        for rank in rng.sample(range(ranks), LOADED_RANKS):
            request.loads.add(worker_id=worker_name(rank), active_blocks=rng.randrange(4096),
                              waiting_requests=rng.randrange(4))
        out.append(request)
    return out


def messages(reqs: list[pb.FindBestWorkerRequest], batch: int) -> list[bytes]:
    """Request bodies: unary requests (`batch` 0), or stream messages of `batch`."""
    if not batch:
        return [r.SerializeToString() for r in reqs]
    return [pb.FindBestWorkerStreamRequest(requests=reqs[i : i + batch]).SerializeToString()
            for i in range(0, len(reqs) - batch + 1, batch)]


async def learnt_block_size(port: int, prompt: list[int]) -> int:
    """The model's block size as the client library learns it: from a Score answer."""
    async with AsyncIndexerClient(f"127.0.0.1:{port}", timeout=30) as client:
        await client.score(Query(model=MODEL, token_ids=prompt), max_scores=1)
        return client.block_sizes.get(MODEL)


async def check_answers(port: int, sample: list[pb.FindBestWorkerRequest]) -> int:
    """Streamed answers equal the unary ones (event age aside); returns the hits."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.KvIndexerStub(channel)
        unary = [await stub.FindBestWorker(r, timeout=30) for r in sample]

        async def feed() -> Any:
            for start in range(0, len(sample), 4):  # 4 to a message
                yield pb.FindBestWorkerStreamRequest(requests=sample[start : start + 4])

        streamed = [a async for m in stub.FindBestWorkerStream(feed(), timeout=60)
                    for a in m.answers]
    hits = 0
    for one, many in zip(unary, streamed, strict=True):
        one.freshness.last_event_age_seconds = 0.0
        many.answer.freshness.last_event_age_seconds = 0.0
        if many.code or one != many.answer:
            raise AssertionError(f"streamed answer differs: {many} vs {one}")
        hits += one.matched_blocks > 0
    return hits


async def fast_path_check(servicer: Any, reqs: list[pb.FindBestWorkerRequest],
                          listed: list[pb.FindBestWorkerRequest],
                          keyed: list[pb.FindBestWorkerRequest]) -> int:
    """Every request's answer on the fast path (token_bytes, the decision from the index's
    tally and its answer in C) equals the pure-Python path's (token_ids, the Score answer,
    `scheduling.top_costs`, protobuf's serialiser) and the block-key path's
    (block_key_bytes); returns how many were compared."""
    from indexer.serve import decision

    def answer(data: bytes) -> pb.FindBestWorkerResponse:
        response = pb.FindBestWorkerResponse.FromString(data)
        response.freshness.last_event_age_seconds = 0.0
        return response

    fast = [answer((await servicer._find_best_worker(r, None, CANDIDATES)).data) for r in reqs]
    by_keys = [answer((await servicer._find_best_worker(r, None, CANDIDATES)).data)
               for r in keyed]
    native = decision.USE_NATIVE_DECISION
    decision.USE_NATIVE_DECISION = False
    try:
        slow = [answer((await servicer._find_best_worker(r, None, CANDIDATES)).data)
                for r in listed]
    finally:
        decision.USE_NATIVE_DECISION = native
    for one, other, keys in zip(fast, slow, by_keys, strict=True):
        if one != other:
            raise AssertionError(f"fast path answer differs: {one} vs {other}")
        if keys != one:
            raise AssertionError(f"block-key answer differs: {keys} vs {one}")
    return len(fast)


async def breakdown(args: argparse.Namespace, reqs: list[pb.FindBestWorkerRequest],
                    listed: list[pb.FindBestWorkerRequest],
                    keyed: list[pb.FindBestWorkerRequest]) -> tuple[dict[str, float], int]:
    """Seconds per decision in this process, without transport (median of 5 passes): the
    request parse (each prompt form), `index.score` and `index.score_tally`, the
    servicer's decision (parse excluded; token_bytes and block_key_bytes), and a stream
    message of the largest `--batches` end to end (split, parse, decide, answer bytes);
    and how many answers `fast_path_check` compared."""
    import statistics

    from indexer.index.memory import MemoryIndex
    from indexer.index.protocol import ScoreQuery
    from indexer.serve.grpc_handlers import find_best_worker_parser
    from indexer.serve.service import KvIndexerService

    index = MemoryIndex()
    workload = make_workload(args.ranks, args.blocks, n_queries=args.queries)
    index.sync.apply(workload.batches(MODEL))
    index.sync.apply(workload.idle_rank_batches(MODEL))
    servicer = KvIndexerService(index)
    compared = await fast_path_check(servicer, reqs, listed, keyed)
    parse = find_best_worker_parser()
    raws = {form: [r.SerializeToString() for r in rs]
            for form, rs in ((TOKEN_BYTES, reqs), (TOKEN_IDS, listed), (KEY_BYTES, keyed))}
    batch = max(args.batches)
    batched = {form: messages(rs, batch) for form, rs in ((TOKEN_BYTES, reqs),
                                                          (KEY_BYTES, keyed))}
    candidates = await servicer._candidates(reqs[0].score)
    block_size = await index.block_size(MODEL) or 0
    context = _NoDeadline()
    steps: dict[str, list[float]] = {}

    def timed(step: str, started: float, count: int) -> float:
        now = time.perf_counter()
        steps.setdefault(step, []).append((now - started) / count)
        return now

    for _ in range(5):
        t = time.perf_counter()
        parsed = {form: [parse(raw) for raw in raws[form]] for form in (TOKEN_BYTES,)}
        t = timed("request parse (token_bytes)", t, len(reqs))
        parsed[KEY_BYTES] = [parse(raw) for raw in raws[KEY_BYTES]]
        t = timed("request parse (block_key_bytes)", t, len(reqs))
        for raw in raws[TOKEN_IDS]:
            parse(raw)
        t = timed("request parse (token_ids, for comparison)", t, len(reqs))
        queries = [ScoreQuery(model=MODEL, token_ids=p.message.score.token_bytes,
                              block_size=block_size, workers=candidates.ids)
                   for p in parsed[TOKEN_BYTES]]
        t = time.perf_counter()
        for query in queries:
            await index.score(query)
        t = timed("index.score (the Score RPC's)", t, len(reqs))
        for query in queries:
            await index.score_tally(query)
        t = timed("index.score_tally (FindBestWorker's)", t, len(reqs))
        for form in (TOKEN_BYTES, KEY_BYTES):
            for p in parsed[form]:
                await servicer._find_best_worker(p.message, p.tokens,
                                                 default_limit=CANDIDATES)
            t = timed(f"decision (servicer, parsed, {form})", t, len(reqs))
        for form in (TOKEN_BYTES, KEY_BYTES):
            for m in batched[form]:
                (await servicer._streamed_decisions(m, context)).SerializeToString()
            t = timed(f"stream message of {batch} ({form}), per decision", t,
                      len(batched[form]) * batch)
    return {step: statistics.median(times) for step, times in steps.items()}, compared


class _NoDeadline:
    def time_remaining(self) -> None:
        return None


@dataclass
class Row:
    path: str  # "unary", or "stream, N per message"
    load: str
    rate: float
    p50_ms: float
    p99_ms: float
    errors: dict[str, int]
    server_cpu: float  # share of one core
    cpu_per_decision_us: float
    request_bytes: float  # per decision, as sent (message bodies)


def run_load(server: SpawnedServers, load: grpcload.GrpcLoad, *, batch: int, form: str,
             request_bytes: float, mode: str, amount: float, connections: int, warmup: float,
             duration: float) -> Row:
    """`batch` 0: unary calls; else stream messages of `batch` decisions, prompts in
    `form`. `amount`: calls or messages in flight (closed), decisions/s (open)."""
    streaming = batch > 0
    method = STREAM if streaming else UNARY
    path = f"stream, {batch} per message" if streaming else "unary"
    path += ", block keys" if form == KEY_BYTES else ""
    if streaming and mode == "open":
        amount /= batch
    with tempfile.TemporaryDirectory() as tmp:
        latencies = Path(tmp) / "latencies"
        cpu0, t0 = server.cpu(), time.perf_counter()
        proc = grpcload.start(load, latencies, port=server.port, method=method,
                              mode=("s" if streaming else "") + mode, amount=amount,
                              connections=connections, warmup=warmup, duration=duration)
        run = grpcload.finish(proc, latencies, timeout=warmup + duration + 90)
        cpu, elapsed = server.cpu() - cpu0, time.perf_counter() - t0
    closed = mode == "closed"
    samples = run.latencies if closed else run.from_schedule
    # Open loop: answered calls scheduled in the window, however late (see the p99).
    rate = len(run.latencies) / duration
    label = (f"closed, {amount:g} in flight" if closed
             else f"open, {amount * max(batch, 1):,.0f}/s")
    label += f", {connections} conn"
    per_decision = cpu / max(len(run.latencies) * elapsed / duration, 1) * 1e6
    return Row(path, label, rate, pct(samples, 0.5) * 1e3, pct(samples, 0.99) * 1e3,
               run.errors, cpu / elapsed, per_decision, request_bytes)


def background_load() -> str:
    load1, load5, _ = os.getloadavg()
    return f"load average {load1:.1f} (1 min), {load5:.1f} (5 min) at the start"


def report(args: argparse.Namespace, rows: list[Row], *, hits: int, checked: int,
           compared: int, before: str, steps: dict[str, float]) -> str:
    lines = [
        f"One server process (`start_grpc_server`, in-memory index, uvloop), {args.ranks:,} "
        f"worker ranks holding >= {args.blocks:,} blocks of the shared-prefix workload (every "
        f"rank live), {args.queries} prompts of 8,192 tokens (16-token blocks) sent as "
        f"token_bytes (packed u32) in turn, or on the 'block keys' rows as block_key_bytes "
        f"(the prompt's 512 block keys, packed u64, with keys_block_size: the client "
        f"library's request once it learnt the model's block size from a Score answer, "
        f"as the bench's client did first), each with the loads of {LOADED_RANKS} ranks and "
        f"max_candidates {CANDIDATES}. Load from bench/grpcload.c on the same host: unary "
        "FindBestWorker calls, or messages on one FindBestWorkerStream per connection, of "
        f"{' or '.join(str(b) for b in (1, *args.batches))} decisions each (server stream "
        f"window {args.stream_window}; 'in "
        "flight' counts calls or messages, rates count decisions). Closed loop "
        f"{args.duration:g} s after "
        f"{args.warmup:g} s of warm-up; open loop latency from the scheduled send, at half "
        "the slowest path's closed-loop rate for all three, then at the target rates "
        f"(those above {OVERLOAD:g}x a path's closed-loop rate are not run: latency there "
        "only grows with the run). Before "
        f"timing, {checked} streamed answers equalled the unary answers ({hits} with a "
        f"cache hit), and in the bench's process the fast path's answers (token_bytes, the "
        f"decision from the index's tally and its answer in C) equalled the pure-Python "
        f"path's (token_ids, the Score answer, scheduling.top_costs, protobuf's serialiser) "
        f"and the block-key path's (block_key_bytes) on all {compared} requests. "
        "The machine has 2 cores shared with other engineers' work "
        f"({before}; also the load generator): figures are preliminary.",
        "",
        "| path | load | decisions/s | p50 ms | p99 ms | errors | server CPU | "
        "server CPU per decision | request bytes per decision |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        errors = ", ".join(f"{k} {v}" for k, v in sorted(r.errors.items())) or "0"
        lines.append(f"| {r.path} | {r.load} | {r.rate:,.0f} | {r.p50_ms:.2f} | "
                     f"{r.p99_ms:.2f} | {errors} | {r.server_cpu:.2f} | "
                     f"{r.cpu_per_decision_us:.0f} us | {r.request_bytes:,.0f} |")
    streamed = [r for r in rows if r.path.startswith("stream")]
    closed = [r for r in streamed if r.load.startswith("closed")]
    best_row = max(closed, key=lambda r: r.rate, default=None)
    best = best_row.rate if best_row else 0.0
    at_rate = [r for r in streamed if f"{P99_RATE:,}/s" in r.load]
    best_p99 = min(at_rate, key=lambda r: r.p99_ms, default=None)
    p99 = best_p99.p99_ms if best_p99 else float("nan")
    p99_line = (f"{verdict(p99 <= P99_TARGET_MS)} ({p99:.2f} ms on the stream, the best of "
                f"the message sizes and forms: {best_p99.path})" if best_p99 else
                f"**not measured** (the stream's closed-loop rate on this run, {best:,.0f}/s, "
                f"is below {P99_RATE:,}/s: the open loop was not run)")
    lines += [
        "",
        f"- >= {RATE_TARGET:,} decisions/s from one process: {verdict(best >= RATE_TARGET)} "
        f"({best:,.0f}/s on the stream, closed loop"
        f"{f': {best_row.path}' if best_row else ''}).",
        f"- p99 <= {P99_TARGET_MS:g} ms at {P99_RATE:,}/s: {p99_line}.",
        "",
        "Where a decision's time goes: the same requests in one process without transport, "
        "one at a time (median of 5 passes; the servicer's decision includes the index's walk, "
        "`index.score_tally` at temperature 0):",
        "",
        "| step | us per decision |",
        "|---|---:|",
        *(f"| {step} | {seconds * 1e6:.0f} |" for step, seconds in steps.items()),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=1_024)
    parser.add_argument("--blocks", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--stream-window", type=int, default=1)
    parser.add_argument("--connections", type=int, default=2)
    parser.add_argument("--in-flight", type=int, default=64,
                        help="closed loop: decisions in flight")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32],
                        help="decisions per stream message in the batched rows")
    parser.add_argument("--rates", type=int, nargs="+", default=[5_000, 10_000])
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--no-write", action="store_true", help="print, do not write the doc")
    args = parser.parse_args()
    binary = grpcload.build()
    if binary is None:
        raise SystemExit("bench-decisions needs bench/grpcload.c (libnghttp2-dev)")
    before = background_load()
    print(f"building {args.ranks} ranks x {args.blocks:,} blocks ({before})", flush=True)
    queries = make_workload(args.ranks, args.blocks, n_queries=args.queries).queries
    reqs = requests(queries, args.ranks)
    listed = requests(queries, args.ranks, form=TOKEN_IDS)
    spec = ServerSpec(args.ranks, args.blocks, args.queries, args.stream_window)
    server = start_server(spec)
    rows: list[Row] = []
    try:
        learnt = asyncio.run(learnt_block_size(server.port, queries[0]))
        if learnt != BLOCK_SIZE:
            raise SystemExit(f"the client learnt block size {learnt}, not {BLOCK_SIZE}")
        keyed = requests(queries, args.ranks, form=KEY_BYTES, block_size=learnt)
        by_form = {TOKEN_BYTES: reqs, KEY_BYTES: keyed}
        checked = min(60, len(reqs))
        hits = asyncio.run(check_answers(server.port, reqs[:checked]))
        with tempfile.TemporaryDirectory() as tmp:
            loads = {}
            sizes: dict[tuple[int, str], float] = {}
            # Prompts as token_bytes on every path; as block keys on the batched streams.
            paths = [(b, TOKEN_BYTES) for b in (0, 1, *args.batches)]
            paths += [(b, KEY_BYTES) for b in args.batches]
            for batch, form in paths:
                bodies = Path(tmp) / f"bodies-{batch}-{form}"
                written = messages(by_form[form], batch)
                grpcload.write_bodies(written, bodies)
                loads[batch, form] = grpcload.GrpcLoad(binary, bodies)
                sizes[batch, form] = (sum(map(len, written))
                                      / (len(written) * max(batch, 1)))
            runs: list[tuple[tuple[int, str], str, float]] = [
                (path, "closed", max(args.in_flight / max(path[0], 1), 2 * args.connections))
                for path in paths]
            # Latency where every path keeps up: the same rate for all, half the slowest
            # path's closed-loop rate (rounded down to 100/s), filled in once it is known.
            runs += [(path, "open", 0.0) for path in paths]
            # Unary calls past the closed loop's rate would only queue up: one open-loop rate.
            runs += [(path, "open", rate) for rate in args.rates for path in paths
                     if path[0] or rate <= P99_RATE]
            closed_rate: dict[tuple[int, str], float] = {}
            for path, mode, planned in runs:
                batch, form = path
                amount = planned or max(100.0, min(closed_rate.values(), default=0.0) // 200 * 100)
                if mode == "open" and amount > OVERLOAD * closed_rate.get(path, 0.0):
                    print(f"skipped: {amount:,.0f}/s open loop, batch {batch} {form}: above "
                          f"{OVERLOAD:g}x the closed loop's rate", flush=True)
                    continue
                try:
                    row = run_load(server, loads[path], batch=batch, form=form,
                                   request_bytes=sizes[path], mode=mode, amount=amount,
                                   connections=args.connections, warmup=args.warmup,
                                   duration=args.duration)
                except RuntimeError as exc:  # grpcload gave up: calls unanswered long after
                    print(f"failed: {mode} {amount:g}, batch {batch} {form}: {exc}", flush=True)
                    continue
                if mode == "closed":
                    closed_rate[path] = row.rate
                print(f"{row.path:22} {row.load:28} {row.rate:8,.0f}/s p50 {row.p50_ms:6.2f} "
                      f"p99 {row.p99_ms:7.2f} ms errors {row.errors} server CPU "
                      f"{row.server_cpu:.2f} ({row.cpu_per_decision_us:.0f} us/decision)",
                      flush=True)
                rows.append(row)
    finally:
        server.stop()
    steps, compared = asyncio.run(breakdown(args, reqs, listed, keyed))
    body = report(args, rows, hits=hits, checked=checked, compared=compared, before=before,
                  steps=steps)
    print(body)
    if not args.no_write:
        write_section("decisions", "FindBestWorker decisions/s: unary vs stream (issue 18)",
                      "make bench-decisions", body)


if __name__ == "__main__":
    main()
