"""`kv-publisher bridge`: engine ZMQ -> JetStream.

Every bridge flag has a KV_PUBLISHER_* environment variable.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn
from urllib.parse import urlsplit

import structlog
import zmq.asyncio
from nats.errors import Error as NatsError

from kvcore.about import version_line
from kvcore.bus import STREAM_NAME
from kvcore.connect import (
    DEFAULT_START_TIMEOUT_S,
    NATS_SECURITY_FLAGS,
    NatsSecurity,
    NatsSetupError,
)
from kvcore.helpfmt import DefaultsHelpFormatter
from kvcore.pools import check_pools
from kvcore.redact import redact_text, redact_url
from kvcore.roles import check_role
from kvcore.runtime import configure_logging, settle_gc, warn_if_pure_python
from kvcore.topology import StreamSettings
from publisher.publisher import KVEventPublisher
from publisher.zmq_source import EngineSource

__all__ = ["BRIDGE_SETTINGS", "main"]

log = structlog.get_logger("publisher.cli")

# (flag, env suffix, default, help)
BRIDGE_SETTINGS: tuple[tuple[str, str, str | None, str], ...] = (
    ("--zmq-endpoint", "ZMQ_ENDPOINT", None, "engine KV events endpoint, tcp://HOST:5557"),
    ("--replay-endpoint", "REPLAY_ENDPOINT", None, "engine replay endpoint, tcp://HOST:5558"),
    ("--model", "MODEL", None, "model name the worker serves"),
    ("--worker-id", "WORKER_ID", None, "this worker's id (unique in the fleet)"),
    ("--dp-size", "DP_SIZE", "1", "data-parallel ranks (ports offset by rank)"),
    ("--topic", "TOPIC", "", "ZMQ topic the engine publishes on"),
    ("--nats-url", "NATS_URL", "nats://127.0.0.1:4222",
     "NATS server URL, or the URLs of a cluster's nodes separated by commas"),
    ("--stream-replicas", "STREAM_REPLICAS", "1",
     "copies of the worker registry bucket when this bridge creates it (3 on a NATS "
     "cluster; the indexer's --stream-replicas governs it once it runs)"),
    ("--block-size", "BLOCK_SIZE", "16", "engine block size in tokens"),
    ("--flavor", "FLAVOR", "vllm", "vllm or sglang"),
    ("--role", "ROLE", "both",
     "prefill, decode or both: the worker's part in prefill/decode disaggregation"),
    ("--max-pending", "MAX_PENDING", "10000", "batches buffered while NATS is slow or away"),
    ("--metrics-listen", "METRICS_LISTEN", "",
     "HOST:PORT serving Prometheus /metrics and /healthz (empty: off)"),
    ("--log-format", "LOG_FORMAT", "auto", "auto (console on a TTY, else JSON), json, console"),
    *((flag, field.upper(), None, help_text) for flag, field, help_text in NATS_SECURITY_FLAGS),
    ("--nats-start-timeout", "NATS_START_TIMEOUT", f"{DEFAULT_START_TIMEOUT_S:g}",
     "seconds to keep trying to reach NATS at start-up before exiting with an error"),
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # a misplaced URL is echoed redacted
        super().error(redact_text(message))


def _bridge_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kv-publisher bridge", formatter_class=DefaultsHelpFormatter,
                     description="Bridge an engine's ZMQ KV events to NATS.")
    for flag, env, default, help_text in BRIDGE_SETTINGS:
        env_var = f"KV_PUBLISHER_{env}"
        parser.add_argument(flag, default=os.environ.get(env_var, default),
                            help=f"{help_text} (env {env_var})")
    parser.add_argument("--storage-pool", action="append", dest="storage_pools",
                        default=None, metavar="NAME",
                        help="a shared storage pool the worker mounts (repeatable; the first "
                             "takes its shared-tier offloads) (env KV_PUBLISHER_STORAGE_POOLS, "
                             "comma-separated)")
    return parser


def parse_bridge_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = _bridge_parser()
    args = parser.parse_args(argv)
    for flag in ("--zmq-endpoint", "--model", "--worker-id"):
        name = flag[2:].replace("-", "_")
        if not getattr(args, name):
            parser.error(f"{flag} is required (or KV_PUBLISHER_{name.upper()})")
    if args.stream_replicas not in ("1", "2", "3", "4", "5"):
        parser.error(f"--stream-replicas must be 1 to 5, got {args.stream_replicas!r}")
    for flag in ("--dp-size", "--block-size", "--max-pending"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if not str(value).isdigit() or int(value) < 1:
            parser.error(f"{flag} must be a positive integer, got {value!r}")
    if args.log_format not in ("auto", "json", "console"):
        parser.error(f"--log-format must be auto, json or console, got {args.log_format!r}")
    if args.flavor not in ("vllm", "sglang"):
        parser.error(f"--flavor must be vllm or sglang, got {args.flavor!r}")
    try:
        check_role(args.role, "--role")
    except ValueError as exc:
        parser.error(str(exc))
    if args.storage_pools is None:
        env_pools = os.environ.get("KV_PUBLISHER_STORAGE_POOLS", "")
        args.storage_pools = [p.strip() for p in env_pools.split(",") if p.strip()]
    try:
        args.storage_pools = check_pools(args.storage_pools, "--storage-pool")
    except ValueError as exc:
        parser.error(str(exc))
    if args.metrics_listen:
        try:
            parse_listen(args.metrics_listen)
        except ValueError as exc:
            parser.error(f"--metrics-listen: {exc}")
    try:
        if float(args.nats_start_timeout) <= 0:
            raise ValueError
    except ValueError:
        parser.error(f"--nats-start-timeout must be a number > 0, got {args.nats_start_timeout!r}")
    try:
        nats_security(args).check()
    except NatsSetupError as exc:
        parser.error(str(exc))
    return args


def nats_security(args: argparse.Namespace) -> NatsSecurity:
    return NatsSecurity.from_values(vars(args))


def parse_listen(value: str) -> tuple[str, int]:
    """`host:port` (port 0: any free one) -> (host, port); ValueError if it is not one."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)  # a bare ":port" listens on all


async def run_bridge(args: argparse.Namespace) -> None:
    publisher = KVEventPublisher(args.model, args.worker_id, block_size=int(args.block_size),
                                 nats_url=args.nats_url, dp_size=int(args.dp_size),
                                 stream=StreamSettings(replicas=int(args.stream_replicas)),
                                 max_pending=int(args.max_pending),
                                 nats_security=nats_security(args),
                                 start_timeout_s=float(args.nats_start_timeout),
                                 role=args.role, storage_pools=args.storage_pools)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # A signal while NATS is not reached yet ends the start-up too.
    starting = asyncio.ensure_future(publisher.start())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        log.warning("stopped_before_publishing")
        await publisher.close()
        return
    starting.result()  # NatsSetupError: main() prints it
    await _warn_without_event_stream(publisher, args)
    ctx = zmq.asyncio.Context()
    sources = [EngineSource(ctx, rank, args.zmq_endpoint, replay_endpoint=args.replay_endpoint,
                            topic=args.topic, flavor=args.flavor, pools=args.storage_pools)
               for rank in publisher.ranks]
    http = None
    served = ""
    if args.metrics_listen:
        # prometheus_client only when asked for: the sidecar stays small without it.
        from publisher.metrics import BridgeHttpServer  # noqa: PLC0415

        http = BridgeHttpServer(publisher, sources)
        host, port = parse_listen(args.metrics_listen)
        port = await http.start(host, port)
        served = f"; /metrics and /healthz on {host}:{port}"
    settle_gc()
    print(f"kv-publisher bridge: {args.zmq_endpoint} ({args.dp_size} rank(s)) -> "
          f"{redact_url(args.nats_url)} as {args.model} / {args.worker_id} ({args.role}){served}",
          flush=True)
    try:
        await asyncio.gather(*(source.run(stop) for source in sources))
    finally:
        if http is not None:
            await http.close()
        await publisher.close()
        ctx.term()


async def _warn_without_event_stream(publisher: KVEventPublisher,
                                     args: argparse.Namespace) -> None:
    """A NATS without the indexer's stream (another server on the default port, say):
    said once at start. Batches still wait in the bounded buffer, since the indexer may
    start after its bridges. Per-worker users may not look the stream up: not asked."""
    if urlsplit(args.nats_url).username or nats_security(args).has_credentials:
        return
    with contextlib.suppress(TimeoutError, NatsError):
        if not await publisher.event_stream_exists():
            log.warning("no_event_stream", url=redact_url(args.nats_url), stream=STREAM_NAME,
                        detail="no kv-indexer serve uses this NATS (yet): batches wait in "
                               "the buffer (--max-pending) until one creates the stream; "
                               "check --nats-url against the URL the service prints")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: kv-publisher bridge [options]  (--help for them); kv-publisher --version")
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(version_line("kv-publisher"))
        return 0
    command, rest = argv[0], argv[1:]
    if command == "bridge":
        args = parse_bridge_args(rest)
        configure_logging(args.log_format)
        warn_if_pure_python()
        try:
            asyncio.run(run_bridge(args))
        except NatsSetupError as exc:
            print(f"kv-publisher bridge: {redact_text(str(exc))}", file=sys.stderr)
            return 1
        except Exception:  # the traceback goes through the redacting log processors
            log.exception("bridge_failed")
            return 1
        return 0
    print(f"kv-publisher: unknown command {command!r} (bridge; mock engines: kv-sim engines)",
          file=sys.stderr)
    return 2
