"""`kv-indexer`: query a running indexer over gRPC, or run one (`serve`).

    kv-indexer score --target HOST:PORT --model M --tokens-file F   (F: JSON list of ids)
    kv-indexer workers [--model M] [--role prefill|decode|both]
    kv-indexer stats
    kv-indexer health [--service NAME]                              (grpc.health.v1 Check)
    kv-indexer doctor [--model M]                  (why routing gets no hits; exit 3: errors)
    kv-indexer serve ...                                            (see `serve --help`)
    kv-indexer migrate-layout --redis-url URL --redis-subslots S    (move the Redis index)
    kv-indexer nats-auth --worker MODEL WORKER ... --password-dir D (NATS users: README)
    kv-indexer --version                                            (and the C extension)

Tables for people by default, `--json` for scripts. `--target` defaults to
$KV_INDEXER_TARGET, else 127.0.0.1:50051. Against a TLS server: `--tls-ca` (or `--tls`
for the system's CAs), `--tls-cert` / `--tls-key` for mTLS, `--token-file` for a bearer
token; each has a KV_INDEXER_* variable (CLIENT_SETTINGS). Exit status: 0 on success,
1 when the call failed (the gRPC status and message go to stderr), 2 on a usage error;
`health` exits 0 only when the answer is SERVING (a container HEALTHCHECK).

The query commands need only the base install (`pip install kv-indexer`); `serve` needs
the `server` extra.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Final, cast

import grpc
import msgspec
from grpc_health.v1 import health_pb2, health_pb2_grpc

from indexer.client import (
    DEFAULT_TARGET,
    IndexerClient,
    IndexerClientError,
    IndexerStats,
    Query,
    ScoreAnswer,
    WorkerStatus,
    error_from_rpc,
)
from indexer.doctor import add_doctor_command
from kvcore.about import version_line
from kvcore.bus import TIERS
from kvcore.connect import NATS_SECURITY_FLAGS, NatsSecurity, NatsSetupError
from kvcore.helpfmt import DefaultsArgumentParser, DefaultsHelpFormatter
from kvcore.pools import KINDS
from kvcore.roles import ROLES

__all__ = ["health", "main", "parse_health_args"]

TARGET_ENV: Final = "KV_INDEXER_TARGET"
# (flag, environment variable, help) of the query commands' TLS and token settings
CLIENT_SETTINGS: Final[tuple[tuple[str, str, str], ...]] = (
    ("--tls-ca", "KV_INDEXER_TLS_CA",
     "PEM CA(s) of the server's certificate: connect with TLS"),
    ("--tls-cert", "KV_INDEXER_TLS_CERT", "PEM client certificate, for mTLS (with --tls-key)"),
    ("--tls-key", "KV_INDEXER_TLS_KEY", "PEM private key of --tls-cert"),
    ("--tls-server-name", "KV_INDEXER_TLS_SERVER_NAME",
     "name to expect in the server's certificate (default: the --target host)"),
    ("--token-file", "KV_INDEXER_TOKEN_FILE",
     "file whose first line is the bearer token to send"),
)
TLS_ENV: Final = "KV_INDEXER_TLS"
DEFAULT_CLI_TIMEOUT: Final = 5.0
_MAX_TOKEN: Final = 2**32 - 1


class UsageError(Exception):
    """Bad input the user can fix (exit status 2)."""


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell; numbers right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], int | float) for row in rows) and bool(rows)
               for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w)
                 for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), *(line(r) for r in cells)])


def _tier_cells(blocks_by_tier: dict[str, int]) -> list[int]:
    return [blocks_by_tier.get(tier, 0) for tier in TIERS]


def read_tokens(path: str) -> list[int]:
    """Token ids from a JSON list in `path` ("-" = stdin)."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
        tokens = json.loads(text)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise UsageError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(tokens, list) or not all(
        type(t) is int and 0 <= t <= _MAX_TOKEN for t in tokens
    ):
        raise UsageError(f"{path} must hold a JSON list of token ids (integers in "
                         f"[0, {_MAX_TOKEN}])")
    return tokens


def read_token(path: str) -> str:
    """The first token line of a token file (as `--grpc-token-file` writes them)."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--token-file: cannot read {path}: {exc}") from exc
    for line in lines:
        token = line.strip()
        if token and not token.startswith("#"):
            return token
    raise UsageError(f"--token-file: {path} holds no token")


def open_client(args: argparse.Namespace) -> IndexerClient:
    """The client the common options describe (UsageError for a bad TLS or token file)."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    token = read_token(args.token_file) if args.token_file else None
    try:
        return IndexerClient(args.target, timeout=args.timeout, tls=args.tls,
                             root_certificates=args.tls_ca or None,
                             client_cert=args.tls_cert or None, client_key=args.tls_key or None,
                             token=token, tls_server_name=args.tls_server_name or None)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _print_json(value: object) -> None:
    print(msgspec.json.encode(value).decode())


def event_age(seconds: float) -> str:
    """Freshness for people: the wire's 0 means no event seen yet (indexer.proto)."""
    return f"last event {seconds:.1f} s ago" if seconds > 0 else "no events yet"


def _show_score(answer: ScoreAnswer) -> None:
    fresh = answer.freshness
    degraded = ", ".join(fresh.degraded_workers) or "none"
    print(f"query: {answer.query_blocks} blocks; {event_age(fresh.last_event_age_seconds)}; "
          f"degraded: {degraded}" + ("; index REBUILDING" if fresh.rebuilding else "")
          + (f"; read replica {fresh.read_replica}, at most "
             f"{fresh.index_staleness_seconds:.3f} s behind" if fresh.read_replica else ""))
    if not answer.scores:
        print("no worker holds any block of the query")
        return
    print(_table(
        ["WORKER", "RANK", "MATCHED", "WEIGHTED", *(t.upper() for t in TIERS)],
        [[s.worker_id, s.dp_rank, s.matched_blocks, round(s.weighted_score, 2),
          *_tier_cells(s.blocks_by_tier)] for s in answer.scores],
    ))


def _show_workers(workers: list[WorkerStatus]) -> None:
    if not workers:
        print("no workers")
        return
    print(_table(
        ["MODEL", "WORKER", "RANK", "EPOCH", "SEQ", "DEGRADED", *(t.upper() for t in TIERS),
         "AGE_S", "KIND", "POOLS", "ROLE"],
        [[w.model, w.worker_id, w.dp_rank, w.epoch, w.last_seq, "yes" if w.degraded else "no",
          *_tier_cells(w.blocks_by_tier),
          round(w.last_event_age_seconds, 1) if w.last_event_age_seconds > 0 else "-", w.kind,
          ",".join(w.storage_pools) or "-", w.role or "-"]
         for w in workers],
    ))


def _show_stats(stats: IndexerStats) -> None:
    rows: list[list[object]] = [
        [name, getattr(stats, name)] for name in IndexerStats.__struct_fields__
        if name not in ("dropped", "lag_seconds")
    ]
    rows.append(["lag_seconds", round(stats.lag_seconds, 3)])
    rows.extend([f"dropped[{reason}]", count] for reason, count in sorted(stats.dropped.items()))
    print(_table(["COUNTER", "VALUE"], rows))


def _cmd_score(client: IndexerClient, args: argparse.Namespace) -> int:
    query = Query(model=args.model, token_ids=read_tokens(args.tokens_file),
                  lora_name=args.lora_name, cache_salt=args.cache_salt,
                  workers=args.worker or (), include_zero=args.include_zero,
                  block_size=args.block_size, role=args.role)
    answer = client.score(query)
    if args.json:
        _print_json(answer)
        return 0
    _show_score(answer)
    if not answer.scores:
        hint = _unknown_model_hint(client, args.model)
        if hint:
            print(hint)
    return 0


def _unknown_model_hint(client: IndexerClient, model: str) -> str | None:
    """Why an empty answer may be no miss at all: the index holds no worker of `model`."""
    known = sorted({w.model for w in client.list_workers()})
    if model in known:
        return None
    names = ", ".join(known[:8]) + (", ..." if len(known) > 8 else "") if known else "none"
    return (f"the index holds no worker of model {model!r} (models it holds: {names}); "
            "check the model name, or run `kv-indexer doctor`")


def _cmd_workers(client: IndexerClient, args: argparse.Namespace) -> int:
    workers = client.list_workers(args.model, role=args.role, kind=args.kind)
    if args.json:
        _print_json(workers)
    else:
        _show_workers(workers)
    return 0


def _cmd_stats(client: IndexerClient, args: argparse.Namespace) -> int:
    stats = client.stats()
    if args.json:
        _print_json(stats)
    else:
        _show_stats(stats)
    return 0


def health(target: str, service: str = "", timeout: float = DEFAULT_CLI_TIMEOUT) -> str:
    """grpc.health.v1 Check of `service` ("" = the whole server): the status name
    ("SERVING", "NOT_SERVING", ...). A failed call (no server, deadline, unknown service:
    NOT_FOUND) raises IndexerClientError."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            answer = stub.Check(health_pb2.HealthCheckRequest(service=service),
                                timeout=timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))


def parse_health_args(argv: Sequence[str]) -> argparse.Namespace:
    """`kv-indexer health`'s arguments (exit 2 on a bad one)."""
    parser = argparse.ArgumentParser(prog="kv-indexer health", description=(
        "Ask a running indexer's gRPC health service (grpc.health.v1 Check). Exit status 0 "
        "when it answers SERVING, 1 otherwise (NOT_SERVING, unreachable, unknown service)."),
        formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--target", default=os.environ.get(TARGET_ENV, DEFAULT_TARGET),
                        help=f"indexer gRPC address HOST:PORT (env {TARGET_ENV}; "
                             f"default %(default)s)")
    parser.add_argument("--service", default="",
                        help="service name to check (default: the whole server)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_CLI_TIMEOUT,
                        help="seconds to wait for the answer (default %(default)s)")
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout must be > 0")
    return args


def _health(argv: list[str]) -> int:
    """`kv-indexer health`: prints the status; exit 0 when SERVING, 1 otherwise."""
    args = parse_health_args(argv)
    try:
        status = health(args.target, args.service, args.timeout)
    except IndexerClientError as exc:
        print(f"kv-indexer health: {exc.code.name}: {exc.details}", file=sys.stderr)
        return 1
    print(status)
    return 0 if status == "SERVING" else 1


def _parser() -> argparse.ArgumentParser:
    common = DefaultsArgumentParser(add_help=False)
    common.add_argument("--target", default=os.environ.get(TARGET_ENV, DEFAULT_TARGET),
                        help=f"indexer gRPC address HOST:PORT (env {TARGET_ENV}; "
                             f"default %(default)s)")
    common.add_argument("--timeout", type=float, default=DEFAULT_CLI_TIMEOUT,
                        help="seconds per call, retries included (default %(default)s)")
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")
    common.add_argument("--tls", action="store_true",
                        default=os.environ.get(TLS_ENV, "") in ("1", "on", "true", "yes"),
                        help=f"connect with TLS, trusting the system's CAs (env {TLS_ENV}=1)")
    for flag, env, help_text in CLIENT_SETTINGS:
        common.add_argument(flag, default=os.environ.get(env), help=f"{help_text} (env {env})")

    parser = argparse.ArgumentParser(
        prog="kv-indexer", description="Query a running KV-cache indexer, or run one.",
        formatter_class=DefaultsHelpFormatter)
    parser.add_argument("-V", "--version", action="version", version=version_line("kv-indexer"),
                        help="print the version and whether the C extension is in use")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND",
                                parser_class=DefaultsArgumentParser)
    score = sub.add_parser("score", parents=[common], help="score a prompt against the index")
    score.add_argument("--model", required=True, help="served model name")
    score.add_argument("--tokens-file", required=True,
                       help="JSON list of prompt token ids ('-' = stdin)")
    score.add_argument("--lora-name", default="", help="LoRA adapter (default: base model)")
    score.add_argument("--cache-salt", default="", help="cache salt (default: none)")
    score.add_argument("--worker", action="append",
                       help="only consider this worker id (repeatable)")
    score.add_argument("--block-size", type=int, default=0,
                       help="tokens per block (default: the model's, as the index knows it)")
    score.add_argument("--include-zero", action="store_true",
                       help="also list workers with no matched block")
    score.add_argument("--role", choices=ROLES, default="",
                       help="only workers of this prefill/decode role (prefill and decode "
                       "include workers of role both; default: every role)")
    score.set_defaults(run=_cmd_score)
    workers = sub.add_parser("workers", parents=[common], help="list the workers of the index")
    workers.add_argument("--model", default=None, help="only this model's workers")
    workers.add_argument("--role", choices=ROLES, default="",
                         help="only workers of this role (prefill and decode include "
                         "workers of role both; default: every role)")
    workers.add_argument("--kind", choices=KINDS, default="",
                         help="only workers, or only shared storage pools (default: both)")
    workers.set_defaults(run=_cmd_workers)
    stats = sub.add_parser("stats", parents=[common], help="event pipeline and index counters")
    stats.set_defaults(run=_cmd_stats)
    add_doctor_command(sub, common)
    sub.add_parser("health", help="grpc.health.v1 check: exit 0 when SERVING "
                   "(kv-indexer health --help)", add_help=False)
    sub.add_parser("serve", help="run the indexer service (kv-indexer serve --help)",
                   add_help=False)
    sub.add_parser("rebuild", help="make every indexer rebuild from snapshots + stream "
                   "(kv-indexer rebuild --help)", add_help=False)
    sub.add_parser("migrate-layout", help="move a Redis index to another --redis-subslots "
                   "(kv-indexer migrate-layout --help)", add_help=False)
    sub.add_parser("bench", help="benchmarks: kv-indexer bench routing --help",
                   add_help=False)
    sub.add_parser("nats-auth", help="print a nats-server authorization block with one user "
                   "per worker (kv-indexer nats-auth --help)", add_help=False)
    return parser


def _rebuild(argv: list[str]) -> int:
    """`kv-indexer rebuild`: every indexer on this NATS rebuilds every partition."""
    parser = argparse.ArgumentParser(prog="kv-indexer rebuild", description=(
        "Ask every running indexer (and any started later) to rebuild each partition from "
        "its newest snapshot and the stream after it."), formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--nats-url", default=os.environ.get("KV_INDEXER_NATS_URL"),
                        help="NATS the indexers use (env KV_INDEXER_NATS_URL)")
    parser.add_argument("--partitions", type=int,
                        default=int(os.environ.get("KV_INDEXER_PARTITIONS", "8")),
                        help="stream partitions (env KV_INDEXER_PARTITIONS; default 8)")
    for flag, field, help_text in NATS_SECURITY_FLAGS:  # as `kv-indexer serve` has them
        env = f"KV_INDEXER_{field.upper()}"
        parser.add_argument(flag, dest=field, default=os.environ.get(env),
                            help=f"{help_text} (env {env})")
    args = parser.parse_args(argv)
    if not args.nats_url:
        parser.error("--nats-url is required (or KV_INDEXER_NATS_URL)")
    recovery = importlib.import_module("indexer.ingest.recovery")
    security = NatsSecurity.from_values(vars(args))
    try:
        asyncio.run(recovery.request_rebuild(args.nats_url, args.partitions, security))
    except NatsSetupError as exc:
        print(f"kv-indexer rebuild: {exc}", file=sys.stderr)
        return 1
    print(f"rebuild requested for {args.partitions} partitions")
    return 0


def _migrate_layout(argv: list[str]) -> int:
    """`kv-indexer migrate-layout`: move the Redis index to another sub-slot layout."""
    parser = argparse.ArgumentParser(prog="kv-indexer migrate-layout", description=(
        "Move a Redis index to --redis-subslots S (1: one hash slot per model): delete the "
        "keys of every model in another layout (and only theirs) and the partition markers, "
        "so the indexers, restarted with the new --redis-subslots first, rebuild them from "
        "snapshots and the stream. Safe to run again, also after being stopped halfway."),
        formatter_class=DefaultsHelpFormatter)
    env = os.environ.get
    parser.add_argument("--redis-url", default=env("KV_INDEXER_REDIS_URL"),
                        help="the indexers' Redis (env KV_INDEXER_REDIS_URL; "
                        "redis+cluster:// or any node of a cluster)")
    parser.add_argument("--redis-subslots", type=int, required=env(
        "KV_INDEXER_REDIS_SUBSLOTS") is None, default=env("KV_INDEXER_REDIS_SUBSLOTS"),
                        help="the layout to move to: the --redis-subslots the indexers now "
                        "run with (env KV_INDEXER_REDIS_SUBSLOTS)")
    parser.add_argument("--model", help="move only this model")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the models that would move; change nothing")
    for flag in ("--redis-tls-ca", "--redis-tls-cert", "--redis-tls-key",
                 "--redis-password-file"):
        name = flag[2:].replace("-", "_")
        parser.add_argument(flag, dest=name, default=env(f"KV_INDEXER_{name.upper()}"),
                            help=f"as `kv-indexer serve {flag}`")
    args = parser.parse_args(argv)
    if not args.redis_url:
        parser.error("--redis-url is required (or KV_INDEXER_REDIS_URL)")
    if not 1 <= int(args.redis_subslots) <= 1024:
        parser.error("--redis-subslots must be 1 to 1024")
    layouts = importlib.import_module("indexer.index.layouts")
    factory = importlib.import_module("indexer.index.factory")
    errors = importlib.import_module("indexer.errors")
    security = factory.RedisSecurity(tls_ca=args.redis_tls_ca, tls_cert=args.redis_tls_cert,
                                     tls_key=args.redis_tls_key,
                                     password_file=args.redis_password_file)
    try:
        asyncio.run(layouts.run_migration(args.redis_url, int(args.redis_subslots),
                                          model=args.model, dry_run=args.dry_run,
                                          options=security.client_options()))
    except (errors.BackendError, errors.ConfigError, OSError) as exc:
        print(f"kv-indexer migrate-layout: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - redis-py's errors: one line, status 1
        print(f"kv-indexer migrate-layout: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


BENCH_ENTRY_POINTS: Final = "kv_indexer.bench"


def _bench(argv: list[str]) -> int:
    """`kv-indexer bench NAME`: benchmarks are tools outside the service (`kvsim`), found
    through the `kv_indexer.bench` entry points of whatever is installed."""
    found = {ep.name: ep for ep in entry_points(group=BENCH_ENTRY_POINTS)}
    if argv[:1] == [] or argv[0] not in found:
        names = ", ".join(sorted(found)) or "none installed"
        print(f"usage: kv-indexer bench NAME [options]  (NAME: {names})", file=sys.stderr)
        return 2
    bench_main = cast(Callable[[list[str]], int], found[argv[0]].load())
    return bench_main(argv[1:])


def _serve(argv: list[str]) -> int:
    """`kv-indexer serve ...`: every argument goes to the service's own parser."""
    serve_main = cast(Callable[[list[str]], int],
                      importlib.import_module("indexer.app").main)
    return serve_main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list in (["-V"], ["--version"]):  # one line, unwrapped (argparse's would wrap)
        print(version_line("kv-indexer"))
        return 0
    if args_list[:1] == ["serve"]:
        return _serve(args_list[1:])
    if args_list[:1] == ["rebuild"]:
        return _rebuild(args_list[1:])
    if args_list[:1] == ["health"]:
        return _health(args_list[1:])
    if args_list[:1] == ["migrate-layout"]:
        return _migrate_layout(args_list[1:])
    if args_list[:1] == ["bench"]:
        return _bench(args_list[1:])
    if args_list[:1] == ["nats-auth"]:
        nats_auth = cast(Callable[[list[str]], int],
                         importlib.import_module("indexer.nats_auth").main)
        return nats_auth(args_list[1:])
    parser = _parser()
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    run = cast(Callable[[IndexerClient, argparse.Namespace], int], args.run)
    try:
        with open_client(args) as client:
            return run(client, args)
    except UsageError as exc:
        print(f"kv-indexer {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except IndexerClientError as exc:
        print(f"kv-indexer {args.command}: {exc.code.name}: {exc.details}", file=sys.stderr)
        return 1
