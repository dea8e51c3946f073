"""Recovery: partition snapshots in a JetStream object store, and rebuilds from them.

A snapshot of partition p holds the state of every worker rank that lives in p (ledger,
position, health: presence follows from the ledger) and the stream sequence S it reflects.
A rebuild loads the newest snapshot that checks out (checksum, version, partition) and
replays the stream from S + 1; a corrupt snapshot is reported and skipped (an older one,
or a full replay from the start of the stream, takes its place). After a snapshot is
stored the partition's stream subjects may be purged below the oldest snapshot kept.

Which rebuild an index reflects is recorded as a marker per partition (`partition.<p>`),
mirrored in the `kv_indexer_state` KV bucket. A marker that is missing (Redis empty,
flushed or restarted without data) or that differs from the bucket's (Redis replaced)
means the partition must be rebuilt before it is trusted again.
"""

from __future__ import annotations

import time
import uuid
from typing import Final

import msgspec
import structlog
import xxhash
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import (
    BadRequestError,
    BucketNotFoundError,
    KeyNotFoundError,
    NotFoundError,
    ObjectNotFoundError,
)
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from indexer.index.protocol import Index, RankState, WorkerRef
from kvcore.bus import STREAM_NAME, escape_token
from kvcore.connect import NatsSecurity
from kvcore.topology import partition_filter

__all__ = [
    "SNAPSHOT_BUCKET",
    "STATE_BUCKET",
    "Snapshot",
    "SnapshotCorruptError",
    "SnapshotStore",
    "decode_snapshot",
    "encode_snapshot",
    "partition_of",
]

log = structlog.get_logger("indexer.ingest.recovery")

SNAPSHOT_BUCKET: Final = "kv_indexer_snapshots"
STATE_BUCKET: Final = "kv_indexer_state"
SNAPSHOT_VERSION: Final = 1
_MAGIC: Final = b"KVIS"


def partition_of(model: str, worker_id: str, partitions: int) -> int:
    """The stream partition of a worker: nats-server's `partition(N, 1, 2)` (FNV-1a 32 of
    the two subject tokens, concatenated, modulo N)."""
    h = 0x811C9DC5
    for byte in (escape_token(model) + escape_token(worker_id)).encode():
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h % partitions


class Snapshot(msgspec.Struct, frozen=True):
    version: int
    partition: int
    partitions: int
    stream_seq: int  # the last stream sequence the snapshot reflects
    created: float
    ranks: list[RankState]


class SnapshotCorruptError(ValueError):
    """A snapshot that fails its checksum, version or shape checks."""


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Snapshot)


def encode_snapshot(snapshot: Snapshot) -> bytes:
    """MAGIC, xxh3_64 of the body (8 bytes LE), body (msgpack)."""
    body = _encoder.encode(snapshot)
    return _MAGIC + xxhash.xxh3_64_intdigest(body).to_bytes(8, "little") + body


def decode_snapshot(data: bytes) -> Snapshot:
    if len(data) < 12 or data[:4] != _MAGIC:
        raise SnapshotCorruptError("not a snapshot (bad magic or too short)")
    body = data[12:]
    if xxhash.xxh3_64_intdigest(body).to_bytes(8, "little") != data[4:12]:
        raise SnapshotCorruptError("checksum mismatch")
    try:
        snapshot = _decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise SnapshotCorruptError(f"undecodable: {exc}") from exc
    if snapshot.version != SNAPSHOT_VERSION:
        raise SnapshotCorruptError(f"unsupported snapshot version {snapshot.version}")
    return snapshot


def _name(partition: int, stream_seq: int) -> str:
    return f"p{partition}/{stream_seq:020d}"


class SnapshotStore:
    """Snapshots per partition in an object store bucket; the newest `keep` are kept."""

    def __init__(self, js: JetStreamContext, partitions: int, keep: int = 3,
                 replicas: int = 1) -> None:
        self.partitions = partitions
        self.keep = keep
        self.replicas = replicas  # of the object store and state bucket, if created here
        self.corrupt_found = 0
        self._js = js
        self._store: ObjectStore | None = None
        self._state: KeyValue | None = None

    async def open(self) -> None:
        try:
            self._store = await self._js.object_store(SNAPSHOT_BUCKET)
        except (BucketNotFoundError, NotFoundError):
            try:
                self._store = await self._js.create_object_store(
                    SNAPSHOT_BUCKET, config=js_api.ObjectStoreConfig(
                        bucket=SNAPSHOT_BUCKET, storage=js_api.StorageType.FILE,
                        replicas=self.replicas))
            except BadRequestError:
                self._store = await self._js.object_store(SNAPSHOT_BUCKET)
        try:
            self._state = await self._js.key_value(STATE_BUCKET)
        except (BucketNotFoundError, NotFoundError):
            try:
                self._state = await self._js.create_key_value(js_api.KeyValueConfig(
                    bucket=STATE_BUCKET, history=1, storage=js_api.StorageType.FILE,
                    replicas=self.replicas))
            except BadRequestError:
                self._state = await self._js.key_value(STATE_BUCKET)

    # --- snapshots ---------------------------------------------------------------------

    async def save(self, partition: int, stream_seq: int, ranks: list[RankState]) -> int:
        """Store a snapshot; returns its size in bytes. Older ones beyond `keep` go."""
        assert self._store is not None
        data = encode_snapshot(Snapshot(SNAPSHOT_VERSION, partition, self.partitions,
                                        stream_seq, time.time(), ranks))
        await self._store.put(_name(partition, stream_seq), data)
        names = await self._names(partition)
        for name in names[: max(0, len(names) - self.keep)]:
            await self._store.delete(name)
        log.info("snapshot_saved", partition=partition, stream_seq=stream_seq,
                 ranks=len(ranks), bytes=len(data))
        return len(data)

    async def _names(self, partition: int) -> list[str]:
        """Snapshot names of a partition, oldest first."""
        assert self._store is not None
        try:
            infos = await self._store.list(ignore_deletes=True)
        except NotFoundError:  # an empty bucket answers "no objects"
            return []
        prefix = f"p{partition}/"
        return sorted(i.name for i in infos if i.name.startswith(prefix) and not i.deleted)

    async def load_newest(self, partition: int) -> Snapshot | None:
        """The newest snapshot that checks out; corrupt ones are reported and skipped."""
        assert self._store is not None
        for name in reversed(await self._names(partition)):
            try:
                result = await self._store.get(name)
                snapshot = decode_snapshot(result.data or b"")
                if snapshot.partition != partition or snapshot.partitions != self.partitions:
                    raise SnapshotCorruptError(
                        f"snapshot of partition {snapshot.partition}/{snapshot.partitions}, "
                        f"expected {partition}/{self.partitions}")
                return snapshot
            except (SnapshotCorruptError, ObjectNotFoundError) as exc:
                self.corrupt_found += 1
                log.error("snapshot_corrupt", partition=partition, name=name, error=str(exc))
        return None

    async def oldest_kept_seq(self, partition: int) -> int | None:
        names = await self._names(partition)
        return int(names[0].split("/")[1]) if names else None

    async def purge_below(self, partition: int, stream_seq: int) -> None:
        """Drop the partition's events up to and including `stream_seq` from the stream."""
        await self._js.purge_stream(STREAM_NAME, seq=stream_seq + 1,
                                    subject=partition_filter(partition))

    # --- rebuild markers ---------------------------------------------------------------

    async def expected_marker(self, partition: int) -> str | None:
        assert self._state is not None
        try:
            entry = await self._state.get(f"partition.{partition}")
        except KeyNotFoundError:
            return None
        return (entry.value or b"").decode() or None

    async def request_rebuild(self) -> None:
        """Make every partition's recorded marker stale: all indexers rebuild (running ones
        within a second, others when they start)."""
        assert self._state is not None
        for partition in range(self.partitions):
            await self._state.put(f"partition.{partition}", f"forced-{uuid.uuid4().hex}".encode())

    async def new_marker(self, partition: int) -> str:
        assert self._state is not None
        marker = uuid.uuid4().hex
        await self._state.put(f"partition.{partition}", marker.encode())
        return marker


async def request_rebuild(nats_url: str, partitions: int,
                          security: NatsSecurity | None = None) -> None:
    """`kv-indexer rebuild`: ask every indexer to rebuild every partition."""
    from kvcore.connect import connect_nats  # noqa: PLC0415 - only this command connects

    nc = await connect_nats(nats_url, security, name="kv-indexer-rebuild",
                            start_timeout_s=30.0)
    try:
        store = SnapshotStore(nc.jetstream(), partitions)
        await store.open()
        await store.request_rebuild()
    finally:
        await nc.close()


async def partition_ranks(index: Index, partition: int,
                          partitions: int) -> list[tuple[str, WorkerRef]]:
    """The (model, worker rank)s of the index that live in `partition`."""
    return [
        (w.model, WorkerRef(w.worker_id, w.dp_rank))
        for w in await index.workers()
        if partition_of(w.model, w.worker_id, partitions) == partition
    ]
