"""The live event path's test setup: an IndexerService config and KVEventPublishers on a
nats-server, and one prompt of eight blocks (engine hash of block i = i) to store.

Shared by the end-to-end suites (event path, recovery, readers, scale-out, bridge)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from indexer.app import IndexerService
from indexer.config import ServiceConfig
from indexer.index.protocol import ScoreQuery
from kvcore.topology import StreamSettings
from publisher.publisher import KVEventPublisher

MODEL = "org/model-7b"
BS = 4
PARTITIONS = 2
TOKENS = list(range(1000, 1000 + 8 * BS))  # eight blocks; engine hashes 1..8


def service_config(nats_url: str, **overrides: object) -> ServiceConfig:
    """No gRPC or metrics listener, PARTITIONS partitions, 3 s liveness TTL, 60 s grace."""
    values: dict[str, object] = {"nats_url": nats_url, "grpc_listen": "", "metrics_listen": "",
                                 "partitions": PARTITIONS, "liveness_ttl_s": 3.0,
                                 "liveness_grace_s": 60.0}
    values.update(overrides)
    return ServiceConfig(**values)  # type: ignore[arg-type]


@asynccontextmanager
async def running_service(config: ServiceConfig) -> AsyncIterator[IndexerService]:
    """An IndexerService started on `config`, closed at the end."""
    service = IndexerService(config)
    await service.start()
    try:
        yield service
    finally:
        await service.close()


def publisher(url: str, worker: str = "w1", **kwargs: object) -> KVEventPublisher:
    return KVEventPublisher(MODEL, worker, block_size=BS, nats_url=url,
                            stream=StreamSettings(partitions=PARTITIONS, liveness_ttl_s=3.0),
                            **kwargs)  # type: ignore[arg-type]


async def matched(svc: IndexerService, worker: str = "w1") -> int:
    """Blocks of TOKENS the service's index holds for `worker` (0 if not a candidate)."""
    assert svc.index is not None
    result = await svc.index.score(ScoreQuery(model=MODEL, token_ids=TOKENS, block_size=BS))
    return next((s.matched_blocks for s in result.scores if s.worker_id == worker), 0)


def store(pub: KVEventPublisher, first: int, last: int) -> None:
    """Blocks first..last (1-based) of TOKENS, chained, engine hash = position."""
    pub.stored(list(range(first, last + 1)), TOKENS[(first - 1) * BS : last * BS],
               parent_hash=first - 1 if first > 1 else None)
