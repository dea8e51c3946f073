"""What TLS costs on the query path (`make bench-tls`, `python -m bench.tls`).

1. gRPC Score on loopback, plaintext against TLS and mTLS + bearer token: a real server
   (`start_grpc_server`, in-memory index of a few workers, set up as `kv-indexer serve`
   sets it up) runs in a spawned process; the bench process calls Score with 8,192-token
   prompts, one call at a time, the modes taking turns in rounds so drift hits them alike.
   p50 / p99 latency and the server's CPU per call.
2. Redis Score (`RedisIndex.score`, block keys of the same prompts) against one private
   redis-server that listens plain and TLS: redis://, rediss:// on the pipelined
   connection, and rediss:// through redis-py; CPU per call and latency, 1 and 8 calls in
   flight.

Certificates are made for the run (tests/support/certs.py). Figures go to the `tls`
section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc

from bench.grpc_score import SpawnedServers
from bench.workload import make_workload
from indexer._proto.kvindex.v1 import indexer_pb2 as pb
from indexer._proto.kvindex.v1 import indexer_pb2_grpc as pb_grpc
from indexer.index.factory import RedisSecurity
from indexer.index.memory import MemoryIndex
from indexer.index.protocol import ScoreQuery
from indexer.index.redis import RedisIndex
from kvcore.keys import block_keys_for_tokens
from kvsim.report import pct, write_section
from tests.support.certs import Pki, make_pki
from tests.support.servers import TlsRedisServer

MODEL = "bench/model"
TOKEN = "bench-token"
BLOCK_SIZE = 16


# --- gRPC ---------------------------------------------------------------------------------


def _serve(size: tuple[int, int, int], mode: str, pki: Pki, conn: Connection) -> None:
    """Child: an in-memory index of the bench workload (workers, blocks, queries) served
    in `mode`."""
    workers, blocks, queries = size
    from indexer.serve.auth import GrpcSecurity
    from kvcore.runtime import SERVER_GC_THRESHOLDS, run_event_loop, settle_gc

    index = MemoryIndex()
    index.sync.apply(make_workload(workers, blocks, n_queries=queries).batches(MODEL))
    security = GrpcSecurity()
    if mode != "plaintext":
        token_file = Path(pki.ca).parent / "tokens"
        token_file.write_text(TOKEN + "\n")
        security = GrpcSecurity.load(
            cert=str(pki.server_cert), key=str(pki.server_key),
            client_ca=str(pki.ca) if mode == "mtls" else None,
            token_file=str(token_file) if mode == "mtls" else None)
    settle_gc(SERVER_GC_THRESHOLDS)
    run_event_loop(_serve_async(index, security, conn))


async def _serve_async(index: Any, security: Any, conn: Connection) -> None:
    from bench.grpc_score import answer_parent
    from indexer.serve.service import start_grpc_server

    server, port = await start_grpc_server(index, "127.0.0.1:0", security=security)
    await answer_parent(conn, port)
    await server.stop(0.5)


def start_server(args: argparse.Namespace, mode: str, pki: Pki) -> SpawnedServers:
    shape = (args.workers, args.blocks, args.queries)
    return SpawnedServers(_serve, lambda _: (shape, mode, pki), start_timeout_s=300)


def _channel(mode: str, port: int, pki: Pki) -> Any:
    target = f"127.0.0.1:{port}"
    if mode == "plaintext":
        return grpc.insecure_channel(target)
    credentials = grpc.ssl_channel_credentials(
        pki.read("ca"), pki.read("client_key") if mode == "mtls" else None,
        pki.read("client_cert") if mode == "mtls" else None)
    return grpc.secure_channel(target, credentials)


MODES = {"plaintext": "plaintext", "tls": "TLS", "mtls": "mTLS + bearer token"}


def grpc_rows(args: argparse.Namespace, pki: Pki, queries: list[list[int]]) -> str:
    requests = [pb.ScoreRequest(model=MODEL, token_ids=q, block_size=BLOCK_SIZE)
                for q in queries]
    servers = {mode: start_server(args, mode, pki) for mode in MODES}
    latencies: dict[str, list[float]] = {mode: [] for mode in MODES}
    cpu: dict[str, float] = dict.fromkeys(MODES, 0.0)
    matched: dict[str, int] = dict.fromkeys(MODES, 0)
    try:
        channels = {mode: _channel(mode, server.port, pki) for mode, server in servers.items()}
        stubs = {mode: pb_grpc.KvIndexerStub(channel)  # type: ignore[no-untyped-call]
                 for mode, channel in channels.items()}
        metadata = {mode: (("authorization", f"Bearer {TOKEN}"),) if mode == "mtls" else None
                    for mode in MODES}
        per_round = max(1, args.calls // args.rounds)
        order = list(MODES)
        for round_no in range(args.rounds + 1):  # round 0 warms up (connections, caches)
            order = order[1:] + order[:1]  # each mode goes first in turn
            for mode in order:
                stub, server = stubs[mode], servers[mode]
                cpu_before = server.cpu()
                for i in range(per_round):
                    request = requests[(round_no * per_round + i) % len(requests)]
                    started = time.perf_counter()
                    reply = stub.Score(request, timeout=5, metadata=metadata[mode])
                    elapsed = time.perf_counter() - started
                    if round_no:
                        latencies[mode].append(elapsed * 1e3)
                        matched[mode] += bool(reply.scores)
                if round_no:
                    cpu[mode] += server.cpu() - cpu_before
        for channel in channels.values():
            channel.close()
    finally:
        for server in servers.values():
            server.stop()
    rows = []
    for mode, label in MODES.items():
        values = latencies[mode]
        rows.append(f"| {label} | {len(values):,} | {pct(values, 0.5):.3f} | "
                    f"{pct(values, 0.99):.3f} | {cpu[mode] / len(values) * 1e6:.0f} | "
                    f"{matched[mode] / len(values):.0%} |")
        print(rows[-1])
    plain, mtls = latencies["plaintext"], latencies["mtls"]
    cpu_plain = cpu["plaintext"] / len(plain)
    cpu_mtls = cpu["mtls"] / len(mtls)
    summary = (f"mTLS + token against plaintext in this run: p50 "
               f"{(pct(mtls, 0.5) - pct(plain, 0.5)) * 1e3:+.0f} µs, p99 "
               f"{(pct(mtls, 0.99) - pct(plain, 0.99)) * 1e3:+.0f} µs, server CPU "
               f"{(cpu_mtls - cpu_plain) * 1e6:+.0f} µs per call "
               f"({cpu_mtls / cpu_plain - 1:+.0%}). The p99 of 2,000 calls on a shared "
               f"2-core machine is one slow call in a hundred: read it as noise unless it "
               f"repeats across runs.")
    return "\n".join(rows) + "\n\n" + summary


# --- Redis --------------------------------------------------------------------------------


async def _redis_score(url: str, options: dict[str, Any], pipelined: bool,
                       keys: list[list[int]], calls: int) -> dict[int, tuple[float, float, float]]:
    """{in flight: (CPU µs per call, p50 ms, p99 ms)} of RedisIndex.score."""
    index = RedisIndex.from_url(url, redis_options=options, pipelined_queries=pipelined)
    assert (index._queries is not None) == pipelined
    out: dict[int, tuple[float, float, float]] = {}
    try:
        for in_flight in (1, 8, 1, 8):  # the first pass of each warms up
            latencies: list[float] = []

            async def caller(first: int, step: int, latencies: list[float]) -> None:
                for i in range(first, calls, step):
                    started = time.perf_counter()
                    await index.score(ScoreQuery(model=MODEL, block_keys=keys[i % len(keys)]))
                    latencies.append((time.perf_counter() - started) * 1e3)

            cpu = time.process_time()
            await asyncio.gather(*(caller(k, in_flight, latencies) for k in range(in_flight)))
            cpu = time.process_time() - cpu
            out[in_flight] = (cpu / calls * 1e6, pct(latencies, 0.5), pct(latencies, 0.99))
    finally:
        await index.close()
    return out


async def redis_rows(args: argparse.Namespace, pki: Pki, queries: list[list[int]],
                     workdir: Path) -> str:
    server = TlsRedisServer(workdir / "redis", cert=pki.server_cert, key=pki.server_key,
                            ca=pki.ca, client_certs=True, plain_port=True).start()
    try:
        plain_url = f"redis://127.0.0.1:{server.plain_port}/0"
        tls_options = RedisSecurity(tls_ca=str(pki.ca), tls_cert=str(pki.client_cert),
                                    tls_key=str(pki.client_key)).client_options()
        index = RedisIndex.from_url(plain_url)
        batches = make_workload(args.workers, args.blocks,
                                n_queries=args.queries).batches(MODEL)
        for i in range(0, len(batches), 256):
            await index.apply(batches[i : i + 256])
        await index.close()
        keys = [block_keys_for_tokens(tokens, BLOCK_SIZE, MODEL) for tokens in queries]
        setups = (("redis:// (pipelined)", plain_url, {}, True),
                  ("rediss:// mTLS (pipelined)", server.url, tls_options, True),
                  ("rediss:// mTLS (redis-py)", server.url, tls_options, False))
        rows = []
        cpu: list[float] = []
        for label, url, options, pipelined in setups:
            by = await _redis_score(url, options, pipelined, keys, args.redis_calls)
            rows.append(f"| {label} | {by[1][0]:.0f} | {by[1][1]:.3f} | {by[1][2]:.3f} | "
                        f"{by[8][0]:.0f} | {by[8][1]:.3f} | {by[8][2]:.3f} |")
            cpu.append(by[8][0])
            print(rows[-1])
        summary = (f"At 8 in flight, TLS on the pipelined connection cost "
                   f"{cpu[1] - cpu[0]:+.0f} µs of CPU per call over plain TCP; redis-py over "
                   f"TLS cost {cpu[2] - cpu[1]:+.0f} µs more than the pipe over TLS.")
        return "\n".join(rows) + "\n\n" + summary
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--calls", type=int, default=2_000, help="gRPC Score calls per mode")
    parser.add_argument("--rounds", type=int, default=4, help="turns the modes take")
    parser.add_argument("--redis-calls", type=int, default=2_000,
                        help="Redis Score calls per setup and concurrency")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-tls-"))
    pki = make_pki(workdir / "pki")
    workload = make_workload(args.workers, args.blocks, n_queries=args.queries)
    queries = workload.queries
    print(f"workload: {workload.blocks:,} blocks, {args.workers} workers, "
          f"{len(queries)} queries of {len(queries[0]):,} tokens")
    grpc_table = grpc_rows(args, pki, queries)
    redis_table = asyncio.run(redis_rows(args, pki, queries, workdir))
    body = f"""
Workload: {args.workers} workers holding {workload.blocks:,} blocks (bench/workload.py),
{len(queries)} prompts of {len(queries[0]):,} tokens. Certificates: ECDSA P-256, made for
the run (tests/support/certs.py).

**gRPC Score over loopback** (`start_grpc_server`, in-memory index, one server process per
mode, the bench process calling one at a time; {args.calls:,} calls per mode in
{args.rounds} rounds, the modes taking turns; p50 / p99 from the caller, including the
client's own gRPC work; CPU is the server process's):

| transport | calls | p50 ms | p99 ms | server CPU µs / call | answers with a match |
|---|---:|---:|---:|---:|---:|
{grpc_table}

**Redis Score** (`RedisIndex.score` with block keys, from the bench process, against one
redis-server listening plain and TLS with client certificates required; {args.redis_calls:,}
calls per row and concurrency; CPU is the calling process's):

| connection | 1 in flight: CPU µs / call | p50 ms | p99 ms | 8 in flight: CPU µs | p50 | p99 |
|---|---:|---:|---:|---:|---:|---:|
{redis_table}

TLS is set up once per connection; what each call pays is encryption and decryption of
its bytes (a Score request of 8,192 tokens is some 16-24 KB on the wire). Figures from a
shared 2-core machine move by tens of µs between runs; compare rows of one run.
"""
    write_section("tls", "TLS: gRPC Score and Redis Score with and without TLS",
                  "make bench-tls", body)


if __name__ == "__main__":
    main()
