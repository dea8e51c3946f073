"""`kv-indexer bench stream`: drive FindBestWorker decisions at a running indexer and print
decisions/s and latency percentiles.

    kv-indexer bench stream --model M [--tokens-file F] [--in-flight 32 | --rate 2000]
                            [--duration 10] [--unary] [--target HOST:PORT] [--json]

Decisions go over one FindBestWorkerStream (the async client's `decision_stream()`), or
as unary FindBestWorker calls with `--unary`. Closed loop: `--in-flight` decisions
outstanding, each followed by the next as it is answered; open loop: `--rate` decisions/s
on a fixed schedule, latency counted from the scheduled time. Prompts: `--tokens-file`
(a JSON list of prompts, each a list of token ids, or one prompt), else random prompts of
`--prompt-tokens` tokens (misses: the decision is still made over every candidate).

This client runs in Python on the router's side and spends CPU of its own per decision;
on a host it shares with the server the figures are the pair's. The server's own ceiling
is measured with the C load generator: `make bench-decisions` (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Final

import msgspec

from indexer.cli import CLIENT_SETTINGS, TARGET_ENV, TLS_ENV, read_token
from indexer.client import (
    DEFAULT_TARGET,
    AsyncIndexerClient,
    Decision,
    IndexerClientError,
    Query,
)
from kvcore.helpfmt import DefaultsArgumentParser

__all__ = ["LoadReport", "main", "run_load"]

DEFAULT_PROMPT_TOKENS: Final = 8_192
DEFAULT_MAX_CANDIDATES: Final = 8


class LoadReport(msgspec.Struct, frozen=True):
    """What one run measured (latencies in milliseconds)."""

    path: str  # "stream" or "unary"
    load: str
    decisions: int
    seconds: float
    decisions_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: dict[str, int]


def _quantile(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3 if ordered else 0.0


def _report(path: str, load: str, latencies: list[float], seconds: float,
            errors: dict[str, int]) -> LoadReport:
    ordered = sorted(latencies)
    return LoadReport(path, load, len(ordered), seconds, len(ordered) / seconds if seconds else 0,
                      _quantile(ordered, 0.5), _quantile(ordered, 0.9),
                      _quantile(ordered, 0.99), ordered[-1] * 1e3 if ordered else 0.0, errors)


Decide = Callable[[Decision], Awaitable[object]]


async def run_load(decide: Decide, decisions: Sequence[Decision], *, path: str,
                   in_flight: int = 32, rate: float = 0.0,
                   duration: float = 10.0) -> LoadReport:
    """Closed loop of `in_flight` decisions for `duration` s, or open loop at `rate`/s."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    loop = asyncio.get_running_loop()
    started = loop.time()
    end = started + duration

    async def one(decision: Decision, since: float) -> None:
        try:
            await decide(decision)
        except IndexerClientError as exc:
            errors[exc.code.name] = errors.get(exc.code.name, 0) + 1
            return
        latencies.append(loop.time() - since)

    if rate > 0:
        period, sent, tasks = 1.0 / rate, 0, set()
        while (due := started + sent * period) < end:
            await asyncio.sleep(max(due - loop.time(), 0.0))
            task = asyncio.create_task(one(decisions[sent % len(decisions)], due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        await asyncio.gather(*tasks)
        load = f"open loop, {rate:g}/s"
    else:
        counter = iter(range(1 << 62))

        async def caller() -> None:
            while loop.time() < end:
                await one(decisions[next(counter) % len(decisions)], loop.time())

        await asyncio.gather(*(caller() for _ in range(in_flight)))
        load = f"closed loop, {in_flight} in flight"
    return _report(path, load, latencies, loop.time() - started, errors)


def _prompts(args: argparse.Namespace) -> list[list[int]]:
    if args.tokens_file:
        data = json.loads(Path(args.tokens_file).read_text())
        prompts = data if data and isinstance(data[0], list) else [data]
        if not all(isinstance(t, int) for p in prompts for t in p):
            raise SystemExit("kv-indexer bench stream: --tokens-file holds no token id lists")
        return prompts
    rng = random.Random(args.seed)
    return [[rng.randrange(65_536) for _ in range(args.prompt_tokens)] for _ in range(64)]


def _parser() -> argparse.ArgumentParser:
    parser = DefaultsArgumentParser(
        prog="kv-indexer bench stream",
        description="FindBestWorker decisions/s and latency against a running indexer.")
    parser.add_argument("--model", required=True, help="served model name")
    parser.add_argument("--tokens-file", default="",
                        help="JSON: a list of prompts (lists of token ids), or one prompt")
    parser.add_argument("--prompt-tokens", type=int, default=DEFAULT_PROMPT_TOKENS,
                        help="tokens of each random prompt (without --tokens-file)")
    parser.add_argument("--seed", type=int, default=18, help="seed of the random prompts")
    parser.add_argument("--max-candidates", type=int, default=DEFAULT_MAX_CANDIDATES,
                        help="candidates per answer (0: every one)")
    parser.add_argument("--in-flight", type=int, default=32,
                        help="closed loop: decisions outstanding")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="open loop: decisions per second (0: closed loop)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load")
    parser.add_argument("--unary", action="store_true",
                        help="unary FindBestWorker calls instead of the stream")
    parser.add_argument("--target", default=os.environ.get(TARGET_ENV, DEFAULT_TARGET),
                        help=f"indexer gRPC address (env {TARGET_ENV})")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per decision")
    parser.add_argument("--tls", action="store_true",
                        default=os.environ.get(TLS_ENV, "") in ("1", "on", "true", "yes"),
                        help=f"connect with TLS, trusting the system's CAs (env {TLS_ENV}=1)")
    for flag, env, help_text in CLIENT_SETTINGS:
        parser.add_argument(flag, default=os.environ.get(env), help=f"{help_text} (env {env})")
    parser.add_argument("--json", action="store_true", help="print JSON")
    return parser


async def _run(args: argparse.Namespace) -> LoadReport:
    decisions = [Decision(query=Query(model=args.model, token_ids=p),
                          max_candidates=args.max_candidates) for p in _prompts(args)]
    token = read_token(args.token_file) if args.token_file else None
    async with AsyncIndexerClient(args.target, timeout=args.timeout, tls=args.tls,
                                  root_certificates=args.tls_ca or None,
                                  client_cert=args.tls_cert or None,
                                  client_key=args.tls_key or None, token=token,
                                  tls_server_name=args.tls_server_name or None) as client:
        if args.unary:
            async def unary(d: Decision) -> object:
                return await client.find_best_worker(d.query, d.loads,
                                                     max_candidates=d.max_candidates)

            return await run_load(unary, decisions, path="unary", in_flight=args.in_flight,
                                  rate=args.rate, duration=args.duration)
        async with client.decision_stream() as stream:
            return await run_load(stream.find_best_worker, decisions, path="stream",
                                  in_flight=args.in_flight, rate=args.rate,
                                  duration=args.duration)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    started = time.process_time()
    try:
        report = asyncio.run(_run(args))
    except IndexerClientError as exc:
        print(f"kv-indexer bench stream: {exc.code.name}: {exc.details}", file=sys.stderr)
        return 1
    client_cpu = time.process_time() - started
    if args.json:
        print(msgspec.json.encode(report).decode())
        return 0 if report.decisions else 1
    errors = ", ".join(f"{k} {v}" for k, v in sorted(report.errors.items())) or "none"
    print(f"{report.path}, {report.load}: {report.decisions:,} decisions in "
          f"{report.seconds:.1f} s = {report.decisions_per_s:,.0f}/s\n"
          f"latency ms: p50 {report.p50_ms:.2f}  p90 {report.p90_ms:.2f}  "
          f"p99 {report.p99_ms:.2f}  max {report.max_ms:.2f}\n"
          f"errors: {errors}; this client's CPU: {client_cpu:.1f} s")
    return 0 if report.decisions else 1
