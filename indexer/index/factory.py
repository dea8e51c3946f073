"""The one place backends are chosen and wrapped: `build_index`, `served_index`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from prometheus_client import CollectorRegistry

from indexer.errors import ConfigError
from indexer.index.instrumented import InstrumentedIndex
from indexer.index.memory import MemoryIndex
from indexer.index.protocol import Index, IndexConfig, ResyncHook
from indexer.index.read_replicas import DEFAULT_MAX_STALENESS_S, ReplicaReadIndex
from indexer.index.redis import DEFAULT_BUCKET_LOAD, RedisIndex
from indexer.index.redis_cluster import RedisClusterIndex, cluster_url, is_cluster_node
from indexer.index.redis_sharded import ShardedRedisIndex
from indexer.index.replica_metrics import ReadReplicaCollector

if TYPE_CHECKING:
    from indexer.config import ServiceConfig

__all__ = ["RedisSecurity", "build_index", "served_index"]


class RedisSecurity(msgspec.Struct, frozen=True, kw_only=True):
    """TLS files and a password file for Redis (`--redis-tls-*`, `--redis-password-file`);
    the user, if not `default`, is the URL's (rediss://USER@host:port/0)."""

    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    password_file: str | None = None

    @classmethod
    def from_config(cls, config: ServiceConfig) -> RedisSecurity:
        return cls(tls_ca=config.redis_tls_ca, tls_cert=config.redis_tls_cert,
                   tls_key=config.redis_tls_key, password_file=config.redis_password_file)

    def client_options(self) -> dict[str, Any]:
        """redis-py client keyword arguments (they reach the pipelined query connection
        too: `RedisPipe.for_client` takes its TLS context from the client's)."""
        options: dict[str, Any] = {}
        if self.tls_ca:
            options["ssl_ca_certs"] = self.tls_ca
        if self.tls_cert:
            options["ssl_certfile"] = self.tls_cert
            options["ssl_keyfile"] = self.tls_key
        if self.password_file:
            try:
                text = Path(self.password_file).read_text()
            except OSError as exc:
                raise ConfigError(f"--redis-password-file: cannot read {self.password_file}: "
                                  f"{exc.strerror or exc}") from exc
            options["password"] = text.rstrip("\r\n")
        return options


def build_index(
    config: IndexConfig, *, redis_url: str | None = None, on_resync: ResyncHook | None = None,
    redis_security: RedisSecurity | None = None, redis_read_urls: Sequence[str] = (),
    max_staleness_s: float = DEFAULT_MAX_STALENESS_S, redis_bucket_load: int = DEFAULT_BUCKET_LOAD,
    redis_subslots: int = 1,
) -> Index:
    """The Redis index at `redis_url` (with `redis_security`; Score from the read replicas
    `redis_read_urls` while they are within `max_staleness_s`; models it creates keep
    `redis_bucket_load` blocks per presence bucket), else the in-memory one. A
    `redis+cluster://` URL, or one whose node runs in cluster mode, gets the cluster index.
    `redis_subslots` >= 2: every model spread over that many hash slots (ShardedRedisIndex),
    read from `redis_read_urls` (on a cluster: replica nodes, each for its master) too."""
    if redis_url:
        options = redis_security.client_options() if redis_security is not None else {}
        if redis_subslots >= 2:
            cluster = cluster_url(redis_url) is not None or is_cluster_node(redis_url, options)
            sharded = ShardedRedisIndex.from_url(redis_url, subslots=redis_subslots,
                                                 cluster=cluster, config=config,
                                                 on_resync=on_resync, redis_options=options)
            if not redis_read_urls:
                return sharded
            return ReplicaReadIndex.from_urls(redis_url, redis_read_urls, config=config,
                                              redis_options=options, primary=sharded,
                                              cluster=cluster, max_staleness_s=max_staleness_s)
        if cluster_url(redis_url) is not None or is_cluster_node(redis_url, options):
            if redis_read_urls:
                raise ConfigError("--redis-read-url on a Redis Cluster needs "
                                  "--redis-subslots >= 2 (the single-slot cluster layout "
                                  "reads from its masters)")
            return RedisClusterIndex.from_url(redis_url, config=config, on_resync=on_resync,
                                              redis_options=options,
                                              bucket_load=redis_bucket_load)
        if redis_read_urls:
            primary = RedisIndex.from_url(redis_url, config=config, on_resync=on_resync,
                                          redis_options=options, bucket_load=redis_bucket_load)
            return ReplicaReadIndex.from_urls(redis_url, redis_read_urls, config=config,
                                              redis_options=options, primary=primary,
                                              max_staleness_s=max_staleness_s)
        return RedisIndex.from_url(redis_url, config=config, on_resync=on_resync,
                                   redis_options=options, bucket_load=redis_bucket_load)
    return MemoryIndex(config, on_resync=on_resync)


def served_index(index: Index, registry: CollectorRegistry | None) -> Index:
    """What a process serves to routers: `index`, its Score calls timed into `registry`
    when metrics are on (with its read replicas' state, if it has any). Consumer and
    reader processes alike serve through this; ingest and in-process callers use the bare
    index."""
    if registry is None:
        return index
    if isinstance(index, ReplicaReadIndex):
        registry.register(ReadReplicaCollector(index))
    return InstrumentedIndex(index, registry)
