"""`kv-indexer serve` settings: every flag has a KV_INDEXER_* environment variable.

Built once from flags and environment into a frozen `ServiceConfig`, validated at start-up
(a bad value fails with a message naming the setting), then passed down.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NoReturn

import msgspec

from indexer.errors import ConfigError
from indexer.index.protocol import DEFAULT_MAX_QUERY_TOKENS
from indexer.serve.limits import (
    DEFAULT_CONNECTION_IDLE_S,
    DEFAULT_MAX_BATCH_REQUESTS,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_REQUEST_LOADS,
    DEFAULT_MAX_REQUEST_WORKERS,
    DEFAULT_STREAM_WINDOW,
)
from kvcore.connect import (
    DEFAULT_START_TIMEOUT_S,
    NATS_SECURITY_FLAGS,
    NatsSecurity,
    NatsSetupError,
    nats_servers,
)
from kvcore.helpfmt import shows_default
from kvcore.redact import redact_text
from kvcore.runtime import uvloop_installed
from kvcore.topology import DEFAULT_PARTITIONS

__all__ = ["SETTINGS", "ServiceConfig", "nats_security", "parse_service_config",
           "pool_writer_patterns", "redis_read_urls"]


class ServiceConfig(msgspec.Struct, frozen=True, kw_only=True):
    nats_url: str | None = None  # None: start an embedded nats-server
    data_dir: Path = Path(".kv-indexer")
    redis_url: str | None = None  # None: in-memory index
    redis_read_url: str | None = None  # read replicas for Score, comma-separated
    redis_read_max_staleness_s: float = 1.0  # read_replicas.DEFAULT_MAX_STALENESS_S
    redis_bucket_load: int = 0  # redis.DEFAULT_BUCKET_LOAD: one presence hash per model
    redis_subslots: int = 1  # >= 2: models spread over that many hash slots (redis_sharded)
    pool_writers: str | None = None  # worker id patterns that may write pools, comma-separated
    grpc_listen: str = "127.0.0.1:50051"
    grpc_processes: int = 1  # > 1: extra read-only gRPC server processes (Redis index only)
    grpc_idle_timeout_s: float = DEFAULT_CONNECTION_IDLE_S  # 0: idle connections stay open
    grpc_max_connections: int = DEFAULT_MAX_CONNECTIONS  # per process; 0: no cap
    metrics_listen: str = "127.0.0.1:9400"  # "" disables /metrics
    metrics_max_workers: int = 1_000  # worker ranks with series of their own; the rest: _other
    partitions: int = DEFAULT_PARTITIONS
    liveness_ttl_s: float = 10.0
    liveness_grace_s: float = 30.0
    stream_max_age_s: float = 3600.0
    stream_max_bytes: int = 1 << 30
    stream_replicas: int = 1  # JetStream copies of streams, buckets, snapshots (3: cluster)
    fetch_batch: int = 512
    apply_chunk: int = 256
    max_query_tokens: int = DEFAULT_MAX_QUERY_TOKENS
    max_request_workers: int = DEFAULT_MAX_REQUEST_WORKERS
    max_request_loads: int = DEFAULT_MAX_REQUEST_LOADS
    max_batch_requests: int = DEFAULT_MAX_BATCH_REQUESTS
    grpc_stream_window: int = DEFAULT_STREAM_WINDOW
    snapshot_every_batches: int = 100_000
    snapshot_every_s: float = 300.0
    snapshot_keep: int = 3
    ingest_stall_s: float = 30.0  # health: pending messages without progress this long
    log_format: str = "auto"  # auto | json | console
    log_level: str = "info"
    event_loop: str = "auto"  # auto (uvloop when installed) | uvloop | asyncio
    # gRPC server TLS (cert + key), mTLS (client CA), bearer tokens, reflection
    grpc_tls_cert: str | None = None
    grpc_tls_key: str | None = None
    grpc_tls_client_ca: str | None = None
    grpc_token_file: str | None = None
    grpc_reflection: str = "on"  # on | off
    # NATS TLS and credentials (kvcore.connect.NatsSecurity), start-up bound
    nats_tls_ca: str | None = None
    nats_tls_cert: str | None = None
    nats_tls_key: str | None = None
    nats_creds: str | None = None
    nats_nkey_seed: str | None = None
    nats_user_file: str | None = None
    nats_password_file: str | None = None
    nats_start_timeout_s: float = DEFAULT_START_TIMEOUT_S
    # Redis TLS (rediss:// URLs) and the password of the URL's user, from a file
    redis_tls_ca: str | None = None
    redis_tls_cert: str | None = None
    redis_tls_key: str | None = None
    redis_password_file: str | None = None


# (flag, field, type, help) - the env var is KV_INDEXER_<FIELD upper-case>
SETTINGS: tuple[tuple[str, str, type, str], ...] = (
    ("--nats-url", "nats_url", str, "NATS server URL; unset: start an embedded nats-server"),
    ("--data-dir", "data_dir", Path, "data dir of the embedded nats-server (JetStream files)"),
    ("--redis-url", "redis_url", str, "Redis URL for the index; unset: in-memory index"),
    ("--redis-read-url", "redis_read_url", str,
     "Redis read replicas of --redis-url that Score reads from (URLs separated by commas); "
     "writes stay on the primary. On a Redis Cluster (with --redis-subslots >= 2), replica "
     "nodes of its masters: each serves the reads of the master it follows"),
    ("--redis-read-max-staleness", "redis_read_max_staleness_s", float,
     "seconds a read replica may be behind the primary and still serve Score; beyond, "
     "Score reads another replica or the primary"),
    ("--redis-bucket-load", "redis_bucket_load", int,
     "blocks per presence bucket of each model created in Redis: 0 keeps one hash per "
     "model; ~40 holds a (block, rank) entry in ~30 B less, at ~1.6x the Redis time per "
     "write and per Score"),
    ("--redis-subslots", "redis_subslots", int,
     "hash slots each model is spread over by block key (docs/large-models.md): 1 keeps "
     "one slot per model; S >= 2 lets one model outgrow a Redis shard (on Redis Cluster, "
     "sub-slots on distinct masters); shared storage pools and hybrid KV-cache groups are "
     "refused on such models"),
    ("--pool-writers", "pool_writers", str,
     "worker id patterns (fnmatch, separated by commas) whose writes into shared storage "
     "pools are trusted; unset: any worker whose registry entry declares the pool"),
    ("--grpc-listen", "grpc_listen", str, "gRPC listen address host:port"),
    ("--grpc-processes", "grpc_processes", int,
     "processes serving gRPC on that address (Redis index only; >1 adds read-only servers)"),
    ("--grpc-idle-timeout", "grpc_idle_timeout_s", float,
     "seconds a gRPC connection may stay without a call before the server closes it; 0: never"),
    ("--grpc-max-connections", "grpc_max_connections", int,
     "gRPC connections each serving process accepts at once (more are closed); 0: no cap"),
    ("--metrics-listen", "metrics_listen", str, "Prometheus /metrics address; '' disables"),
    ("--metrics-max-workers", "metrics_max_workers", int,
     "worker ranks with per-worker series of their own; the others are summed into "
     "worker=\"_other\""),
    ("--partitions", "partitions", int, "stream partitions (consumers); same on every process"),
    ("--liveness-ttl", "liveness_ttl_s", float, "seconds a worker entry lives without refresh"),
    ("--liveness-grace", "liveness_grace_s", float,
     "seconds after a worker's entry expires before its blocks are removed"),
    ("--stream-max-age", "stream_max_age_s", float, "seconds events are kept in the stream"),
    ("--stream-max-bytes", "stream_max_bytes", int, "bytes kept in the stream"),
    ("--stream-replicas", "stream_replicas", int,
     "copies JetStream keeps of the streams, KV buckets and snapshot store (1 to 5; 3 on a "
     "NATS cluster); existing ones are changed to it at start"),
    ("--fetch-batch", "fetch_batch", int, "messages fetched per pull"),
    ("--apply-chunk", "apply_chunk", int, "batches per index apply call"),
    ("--max-query-tokens", "max_query_tokens", int, "largest Score query, in tokens"),
    ("--max-request-workers", "max_request_workers", int,
     "most worker ids in a query's `workers` (Score, FindBestWorker, each ScoreBatch query)"),
    ("--max-request-loads", "max_request_loads", int, "most entries in FindBestWorker's `loads`"),
    ("--max-batch-requests", "max_batch_requests", int, "most queries in one ScoreBatch"),
    ("--grpc-stream-window", "grpc_stream_window", int,
     "messages of one FindBestWorkerStream in flight; the stream reads no more meanwhile"),
    ("--snapshot-every-batches", "snapshot_every_batches", int,
     "snapshot a partition after this many batches"),
    ("--snapshot-every", "snapshot_every_s", float, "or after this many seconds"),
    ("--snapshot-keep", "snapshot_keep", int, "snapshots kept per partition"),
    ("--ingest-stall", "ingest_stall_s", float,
     "seconds a partition may have pending messages without progress before health says "
     "NOT_SERVING"),
    ("--log-format", "log_format", str, "auto (console on a TTY, else JSON), json or console"),
    ("--log-level", "log_level", str, "debug, info, warning or error"),
    ("--event-loop", "event_loop", str,
     "auto (uvloop when installed, else asyncio's own), uvloop or asyncio"),
    ("--grpc-tls-cert", "grpc_tls_cert", str,
     "PEM certificate (chain) of the gRPC server; with --grpc-tls-key turns on TLS"),
    ("--grpc-tls-key", "grpc_tls_key", str, "PEM private key of --grpc-tls-cert"),
    ("--grpc-tls-client-ca", "grpc_tls_client_ca", str,
     "PEM CA(s) of router client certificates; given: every client must present one (mTLS)"),
    ("--grpc-token-file", "grpc_token_file", str,
     "file of bearer tokens (one per line); given: calls need 'authorization: Bearer "
     "<token>' (health checks stay open)"),
    ("--grpc-reflection", "grpc_reflection", str, "gRPC server reflection: on or off"),
    *((flag, field, str, help_text) for flag, field, help_text in NATS_SECURITY_FLAGS),
    ("--nats-start-timeout", "nats_start_timeout_s", float,
     "seconds to keep trying to reach NATS at start-up before exiting with an error"),
    ("--redis-tls-ca", "redis_tls_ca", str,
     "PEM CA(s) of the Redis server's certificate (rediss:// URLs)"),
    ("--redis-tls-cert", "redis_tls_cert", str,
     "PEM client certificate for Redis (with --redis-tls-key; rediss:// URLs)"),
    ("--redis-tls-key", "redis_tls_key", str, "PEM private key of --redis-tls-cert"),
    ("--redis-password-file", "redis_password_file", str,
     "file holding the Redis password (of the URL's user, or of 'default')"),
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # a misplaced URL is echoed redacted
        super().error(redact_text(message))


def env_name(field: str) -> str:
    return f"KV_INDEXER_{field.upper()}"


def parse_service_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> ServiceConfig:
    environ = os.environ if environ is None else environ
    parser = _Parser(prog="kv-indexer serve", description="Run the KV-event indexer service.")
    defaults = ServiceConfig()
    for flag, field, _kind, help_text in SETTINGS:
        default = getattr(defaults, field)  # the flag's own default is None: unset
        shown = f"; default: {default}" if shows_default(default) else ""
        parser.add_argument(flag, dest=field, default=None,
                            help=f"{help_text} (env {env_name(field)}{shown})")
    args = parser.parse_args(argv)
    values: dict[str, object] = {}
    for _flag, field, kind, _help in SETTINGS:
        raw = getattr(args, field)
        source = _flag
        if raw is None and env_name(field) in environ:
            raw, source = environ[env_name(field)], env_name(field)
        if raw is None:
            continue
        values[field] = _convert(raw, kind, source)
    config = ServiceConfig(**values)  # type: ignore[arg-type]
    validate(config)
    return config


def _convert(raw: str, kind: type, source: str) -> object:
    if raw == "" and kind is str:
        return ""
    try:
        return kind(raw)
    except ValueError as exc:
        raise ConfigError(f"{source}: {redact_text(repr(raw))} is not a valid "
                          f"{kind.__name__}") from exc


def pool_writer_patterns(config: ServiceConfig) -> list[str]:
    """The worker id patterns of `--pool-writers` (empty: no allow-list)."""
    return [p.strip() for p in (config.pool_writers or "").split(",") if p.strip()]


def redis_read_urls(config: ServiceConfig) -> list[str]:
    """The read replica URLs of `--redis-read-url`, in order."""
    return [url.strip() for url in (config.redis_read_url or "").split(",") if url.strip()]


def nats_security(config: ServiceConfig) -> NatsSecurity:
    """The NATS TLS and credential settings of `config`."""
    return NatsSecurity.from_values(msgspec.structs.asdict(config))


def validate(config: ServiceConfig) -> None:
    tls_redis = any((config.redis_tls_ca, config.redis_tls_cert, config.redis_tls_key))
    checks = (
        (config.partitions >= 1, "--partitions must be >= 1"),
        (config.metrics_max_workers >= 0, "--metrics-max-workers must be >= 0"),
        (config.grpc_processes >= 1, "--grpc-processes must be >= 1"),
        (config.grpc_processes == 1 or config.redis_url is not None,
         "--grpc-processes > 1 needs --redis-url (the in-memory index lives in one process)"),
        (config.grpc_processes == 1 or config.grpc_listen != "",
         "--grpc-processes > 1 needs --grpc-listen"),
        (config.liveness_ttl_s > 0, "--liveness-ttl must be > 0"),
        (config.liveness_grace_s >= 0, "--liveness-grace must be >= 0"),
        (config.fetch_batch >= 1, "--fetch-batch must be >= 1"),
        (config.apply_chunk >= 1, "--apply-chunk must be >= 1"),
        (config.max_query_tokens >= 1, "--max-query-tokens must be >= 1"),
        (config.max_request_workers >= 1, "--max-request-workers must be >= 1"),
        (config.max_request_loads >= 1, "--max-request-loads must be >= 1"),
        (config.max_batch_requests >= 1, "--max-batch-requests must be >= 1"),
        (config.grpc_stream_window >= 1, "--grpc-stream-window must be >= 1"),
        (math.isfinite(config.grpc_idle_timeout_s) and config.grpc_idle_timeout_s >= 0,
         "--grpc-idle-timeout must be a number of seconds >= 0"),
        (config.grpc_max_connections >= 0, "--grpc-max-connections must be >= 0"),
        (config.snapshot_every_batches >= 1, "--snapshot-every-batches must be >= 1"),
        (config.snapshot_every_s > 0, "--snapshot-every must be > 0"),
        (config.ingest_stall_s > 0, "--ingest-stall must be > 0"),
        (config.snapshot_keep >= 1, "--snapshot-keep must be >= 1"),
        (config.stream_max_age_s > 0, "--stream-max-age must be > 0"),
        (config.stream_max_bytes > 0, "--stream-max-bytes must be > 0"),
        (config.log_format in ("auto", "json", "console"),
         "--log-format must be auto, json or console"),
        (config.log_level in ("debug", "info", "warning", "error"),
         "--log-level must be debug, info, warning or error"),
        (config.event_loop in ("auto", "uvloop", "asyncio"),
         "--event-loop must be auto, uvloop or asyncio"),
        (config.event_loop != "uvloop" or uvloop_installed(),
         "--event-loop uvloop: uvloop is not installed"),
        (config.grpc_listen == "" or _is_host_port(config.grpc_listen),
         "--grpc-listen must be host:port (or empty: no gRPC)"),
        (config.metrics_listen == "" or _is_host_port(config.metrics_listen),
         "--metrics-listen must be host:port or empty"),
        (config.nats_url is None or (bool(nats_servers(config.nats_url)) and all(
            "://" in url for url in nats_servers(config.nats_url))),
         "--nats-url must be a URL like nats://host:4222, or several separated by commas"),
        (1 <= config.stream_replicas <= 5, "--stream-replicas must be 1 to 5"),
        (config.stream_replicas == 1 or config.nats_url is not None,
         "--stream-replicas above 1 needs --nats-url (a NATS cluster; the embedded "
         "nats-server is one node)"),
        (config.redis_url is None or config.redis_url.startswith(
            ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")),
         "--redis-url must be a redis://, rediss://, unix://, redis+cluster:// or "
         "rediss+cluster:// URL"),
        (not config.redis_read_url or config.redis_url is None or config.redis_subslots >= 2
         or not config.redis_url.startswith(("redis+cluster://", "rediss+cluster://")),
         "--redis-read-url on a Redis Cluster needs --redis-subslots >= 2"),
        (config.nats_url is not None or nats_security(config) == NatsSecurity(),
         "--nats-tls-*, --nats-creds, --nats-nkey-seed and --nats-user-file need --nats-url "
         "(the embedded nats-server is plain and local)"),
        (config.nats_start_timeout_s > 0, "--nats-start-timeout must be > 0"),
        (config.grpc_reflection in ("on", "off"), "--grpc-reflection must be on or off"),
        (bool(config.grpc_tls_cert) == bool(config.grpc_tls_key),
         "--grpc-tls-cert and --grpc-tls-key go together"),
        (not config.grpc_tls_client_ca or bool(config.grpc_tls_cert),
         "--grpc-tls-client-ca needs --grpc-tls-cert and --grpc-tls-key (mTLS is TLS)"),
        (bool(config.redis_tls_cert) == bool(config.redis_tls_key),
         "--redis-tls-cert and --redis-tls-key go together"),
        (not tls_redis or (config.redis_url or "").startswith(("rediss://", "rediss+cluster://")),
         "--redis-tls-ca/--redis-tls-cert/--redis-tls-key need a rediss:// --redis-url"),
        (not config.redis_password_file or config.redis_url is not None,
         "--redis-password-file needs --redis-url"),
        (not config.redis_read_url or config.redis_url is not None,
         "--redis-read-url needs --redis-url (the primary, which takes the writes)"),
        (all(url.startswith(("redis://", "rediss://", "unix://"))
             for url in redis_read_urls(config)),
         "--redis-read-url must be redis://, rediss:// or unix:// URLs separated by commas"),
        (not tls_redis or all(url.startswith("rediss://") for url in redis_read_urls(config)),
         "--redis-tls-* apply to the read replicas too: --redis-read-url needs rediss:// URLs"),
        (1 <= config.redis_subslots <= 1024, "--redis-subslots must be 1 to 1024"),
        (config.redis_subslots == 1 or config.redis_url is not None,
         "--redis-subslots needs --redis-url"),
        (0 <= config.redis_bucket_load <= 60,
         "--redis-bucket-load must be 0 (one hash) to 60 (a bucket stays a compact listpack)"),
        (math.isfinite(config.redis_read_max_staleness_s)
         and config.redis_read_max_staleness_s > 0,
         "--redis-read-max-staleness must be a number of seconds > 0"),
    )
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    for flag, path in (("--grpc-tls-cert", config.grpc_tls_cert),
                       ("--grpc-tls-key", config.grpc_tls_key),
                       ("--grpc-tls-client-ca", config.grpc_tls_client_ca),
                       ("--grpc-token-file", config.grpc_token_file),
                       ("--redis-tls-ca", config.redis_tls_ca),
                       ("--redis-tls-cert", config.redis_tls_cert),
                       ("--redis-tls-key", config.redis_tls_key),
                       ("--redis-password-file", config.redis_password_file)):
        if path:
            check_readable(flag, path)
    try:
        nats_security(config).check()
    except NatsSetupError as exc:
        raise ConfigError(str(exc)) from exc


def check_readable(flag: str, path: str) -> None:
    """ConfigError naming `flag` unless `path` is a file this process can read."""
    try:
        with Path(path).open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot read {path}: {exc.strerror or exc}") from exc


def _is_host_port(value: str) -> bool:
    host, _, port = value.rpartition(":")
    return bool(host) and port.isdigit() and 0 <= int(port) <= 65535
