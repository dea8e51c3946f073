"""What one `kv-indexer bench routing` run does, and the command line that says so."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from kvcore.helpfmt import DefaultsHelpFormatter
from kvsim.report import DOC

__all__ = [
    "DEFAULT_CATCH_UP_TIMEOUT_S",
    "DEFAULT_DECODE_RATE",
    "DEFAULT_OVERLAP_WEIGHT",
    "DEFAULT_PLOT",
    "DEFAULT_PREFILL_RATE",
    "DEFAULT_TEMPERATURE",
    "POLICIES",
    "POLICY_LABELS",
    "RoutingSettings",
    "parse_args",
]

POLICIES: Final = ("kv", "oracle", "round-robin", "random")
POLICY_LABELS: Final = {"kv": "KV-aware (FindBestWorker)", "oracle": "oracle (reads the pools)",
                        "round-robin": "round robin", "random": "random"}
# Tuned on the conversation trace (docs/benchmarks.md, section "routing"); sent explicitly
# with every FindBestWorker call, so the run does not depend on the server's defaults.
DEFAULT_OVERLAP_WEIGHT: Final = 32.0
DEFAULT_TEMPERATURE: Final = 0.0
# One worker ~ an 8xH100 node serving a 70B-class model (TP8): ~20k prompt tokens/s of
# prefill (about 40% MFU at 140 GFLOP/token), 40 tokens/s per request of decode (25 ms ITL).
DEFAULT_PREFILL_RATE: Final = 20_000.0
DEFAULT_DECODE_RATE: Final = 40.0
DEFAULT_CATCH_UP_TIMEOUT_S: Final = 2.0
DEFAULT_PLOT: Final = DOC.parent / "routing-hit-ratio.png"


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
        prog="kv-indexer bench routing", formatter_class=DefaultsHelpFormatter,
        description="Replay a Mooncake trace through simulated engines, bridges, JetStream, the "
                    "index and FindBestWorker; report prefix hit ratios per routing policy.")
    parser.add_argument("--trace", type=Path, required=True, help="Mooncake JSONL trace")
    parser.add_argument("--check-trace", type=Path, default=None,
                        help="a second trace run with the same settings (no tuning on it)")
    parser.add_argument("--workers", type=int, default=d.workers, help="engines")
    parser.add_argument("--capacity-blocks", type=int, default=d.capacity_blocks,
                        help="GPU blocks per engine")
    parser.add_argument("--block-size", type=int, default=d.block_size,
                        help="tokens per KV block")
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
                        choices=["debug", "info", "warning", "error"], help="log level")
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
