"""`kv-sim fleet` (`make sim`): mock vLLM engines and their bridges feeding a running
`kv-indexer serve`, so a local service has workers, blocks and hits to show.

Each engine is a `MockEngine` on the real ZMQ wire (free ports); its bridge is what
`kv-publisher bridge` runs (`EngineSource` + `KVEventPublisher`), publishing as worker
`engine-NNN` of `--model`. Prompts share a few long system prompts, so the engines' caches
and the index fill with common prefixes; they go to the engines round robin.

Without `--nats-url` the fleet reads the run file of the service started from the same
directory (`<data dir>/endpoints.json`, indexer.runfile), so it publishes where the service
really listens. A NATS it cannot reach, or one without the service's event stream, ends
it at once with one line and exit status 1: it never publishes somewhere nobody reads.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nats.js.errors import NotFoundError

from indexer.config import ServiceConfig
from indexer.runfile import StaleRunFileError, read_endpoints, run_file
from kvcore.bus import STREAM_NAME
from kvcore.connect import NatsSetupError, connect_nats
from kvcore.helpfmt import DefaultsHelpFormatter
from kvcore.redact import redact_url
from kvcore.runtime import scoped_logging
from kvcore.topology import StreamSettings
from kvsim.bridges import bridges, worker_id
from kvsim.mock_engines import EngineStats, MockFleet, synthetic_prompts

__all__ = ["FleetSettings", "FleetSetupError", "feed", "main", "parse_args"]

STATUS_EVERY_S = 5.0


class FleetSetupError(Exception):
    """The fleet cannot feed a service: one line saying what to do."""


@dataclass(frozen=True, slots=True)
class FleetSettings:
    nats_url: str
    engines: int
    model: str
    block_size: int
    capacity_blocks: int
    rate: float
    duration: float | None
    prefixes: int
    prefix_tokens: int
    max_suffix: int
    seed: int
    nats_start_timeout_s: float


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kv-sim fleet", formatter_class=DefaultsHelpFormatter,
        description="Mock vLLM engines and their bridges feeding a running kv-indexer serve.")
    parser.add_argument("--nats-url", help="the service's NATS (default: the one the "
                        "service started from --data-dir wrote in its run file)")
    parser.add_argument("--data-dir", type=Path, default=ServiceConfig().data_dir,
                        help="the service's --data-dir, where it writes endpoints.json")
    parser.add_argument("--engines", type=int, default=4, help="mock engines (workers)")
    parser.add_argument("--model", default="sim/model", help="model the workers serve")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    parser.add_argument("--capacity-blocks", type=int, default=20_000,
                        help="GPU KV blocks per engine (LRU beyond)")
    parser.add_argument("--rate", type=float, default=20.0, help="prompts per second")
    parser.add_argument("--duration", type=float, help="seconds to run (default: until Ctrl-C)")
    parser.add_argument("--prefixes", type=int, default=8, help="shared system prompts")
    parser.add_argument("--prefix-tokens", type=int, default=1_024,
                        help="tokens of each shared system prompt")
    parser.add_argument("--max-suffix", type=int, default=512,
                        help="most fresh tokens after the system prompt")
    parser.add_argument("--seed", type=int, default=0, help="prompt generator seed")
    parser.add_argument("--nats-start-timeout", type=float, default=10.0,
                        help="seconds to try reaching NATS before giving up")
    return parser


def parse_args(argv: Sequence[str]) -> FleetSettings:
    """Settings from the command line; FleetSetupError when no NATS URL can be found."""
    parser = _parser()
    args = parser.parse_args(argv)
    for flag in ("engines", "block_size", "capacity_blocks", "prefixes", "prefix_tokens",
                 "max_suffix"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.rate <= 0 or args.nats_start_timeout <= 0:
        parser.error("--rate and --nats-start-timeout must be > 0")
    nats_url = args.nats_url or _service_nats_url(args.data_dir)
    return FleetSettings(nats_url, args.engines, args.model, args.block_size,
                         args.capacity_blocks, args.rate, args.duration, args.prefixes,
                         args.prefix_tokens, args.max_suffix, args.seed,
                         args.nats_start_timeout)


def _service_nats_url(data_dir: Path) -> str:
    try:
        endpoints = read_endpoints(data_dir)
    except (StaleRunFileError, ValueError) as exc:
        raise FleetSetupError(f"{exc}: start the service (make run), or pass --nats-url") from exc
    if endpoints is None:
        raise FleetSetupError(f"no running kv-indexer serve found ({run_file(data_dir)} is "
                              "missing): start one (make run) from this directory, or pass "
                              "--nats-url")
    return endpoints.nats_url


async def check_service_nats(url: str, timeout_s: float) -> None:
    """NATS answers at `url` and holds the service's event stream, or FleetSetupError."""
    try:
        nc = await connect_nats(url, name="kv-sim fleet", start_timeout_s=timeout_s,
                                max_reconnect_attempts=0)
    except NatsSetupError as exc:
        raise FleetSetupError(str(exc)) from exc
    try:
        await nc.jetstream().stream_info(STREAM_NAME)
    except NotFoundError as exc:
        raise FleetSetupError(
            f"NATS at {redact_url(url)} has no {STREAM_NAME} stream: no kv-indexer serve "
            "uses this server (give the URL its banner prints)") from exc
    finally:
        await nc.close()


async def feed(settings: FleetSettings, stop: asyncio.Event) -> EngineStats:
    """Serve prompts to the fleet until `settings.duration` or `stop`; the engines' totals."""
    with scoped_logging("error"):  # a refused attempt is said once, in FleetSetupError
        await check_service_nats(settings.nats_url, settings.nats_start_timeout_s)
    fleet = MockFleet(n_workers=settings.engines, capacity_blocks=settings.capacity_blocks,
                      block_size=settings.block_size, base_port=0)
    async with fleet, bridges(fleet, settings.nats_url, settings.model, settings.block_size,
                              StreamSettings().liveness_ttl_s,
                              start_timeout_s=settings.nats_start_timeout_s):
        print(f"kv-sim fleet: {settings.engines} mock vLLM engines ({worker_id(0)} .. "
              f"{worker_id(settings.engines - 1)}, model {settings.model}) -> "
              f"{redact_url(settings.nats_url)}, {settings.rate:g} prompts/s; Ctrl-C stops",
              flush=True)
        await _drive(fleet, settings, stop)
        await asyncio.sleep(0.5)  # the last batches leave
    return fleet.stats()


async def _drive(fleet: MockFleet, settings: FleetSettings, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    prompts = synthetic_prompts(seed=settings.seed, n_prefixes=settings.prefixes,
                                prefix_tokens=settings.prefix_tokens,
                                max_suffix=settings.max_suffix)
    start = next_status = loop.time()
    for i, tokens in enumerate(prompts):
        due = start + i / settings.rate
        if settings.duration is not None and due - start >= settings.duration:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, due - loop.time()))
        if stop.is_set():
            return
        fleet.serve(i % settings.engines, tokens)
        if loop.time() >= next_status:
            next_status += STATUS_EVERY_S
            print(_status(fleet.stats(), loop.time() - start), flush=True)


def _status(stats: EngineStats, elapsed: float) -> str:
    hit = stats.hit_tokens / stats.prompt_tokens if stats.prompt_tokens else 0.0
    return (f"t={elapsed:.0f}s prompts={stats.requests} engine prefix hit rate={hit:.0%} "
            f"blocks stored={stats.stored_blocks} removed={stats.removed_blocks}")


async def _main(settings: FleetSettings) -> EngineStats:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    return await feed(settings, stop)


def main(argv: Sequence[str] | None = None) -> int:
    """`kv-sim fleet [--nats-url URL] [--engines N] ...`: 0 when it ran, 1 when it could not
    reach the service's NATS."""
    try:
        settings = parse_args(sys.argv[1:] if argv is None else argv)
        with scoped_logging("warning"):
            stats = asyncio.run(_main(settings))
    except FleetSetupError as exc:
        print(f"kv-sim fleet: {exc}", file=sys.stderr)
        return 1
    print(_status(stats, 0.0).replace("t=0s ", "done: "), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
