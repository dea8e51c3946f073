"""JetStream objects both sides rely on: the event stream, its partitions, the worker
registry (liveness) bucket, the dead-letter stream and the resync subjects.

Publishers publish to `kv.events.<model>.<worker>` (see `kvcore.bus.subject_for`). The
stream stores each message under `kv.part.<p>.<model>.<worker>`, where the server picks
`p = partition(N, model, worker)` (a deterministic hash of the two tokens): all events of a
worker land in one partition, in order, and publishers need not know N. Each partition has
one durable pull consumer, owned by one indexer process at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
from typing import Final

import msgspec
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import BadRequestError, BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from kvcore.bus import (
    DEAD_LETTER_SUBJECT,
    STREAM_NAME,
    STREAM_SUBJECTS,
    SUBJECT_PREFIX,
    escape_token,
    unescape_token,
)
from kvcore.roles import DEFAULT_ROLE

__all__ = [
    "DEAD_LETTER_STREAM",
    "DEFAULT_PARTITIONS",
    "LIVENESS_BUCKET",
    "PARTITION_PREFIX",
    "RESYNC_PREFIX",
    "WORKER_INBOX_PREFIX",
    "StreamSettings",
    "WorkerRecord",
    "consumer_name",
    "ensure_dead_letter_stream",
    "ensure_liveness_bucket",
    "ensure_stream",
    "kv_stream",
    "liveness_key",
    "object_store_stream",
    "parse_liveness_key",
    "partition_filter",
    "reconcile_replicas",
    "resync_subject",
    "server_max_payload",
    "stored_subject_identity",
    "worker_inbox_prefix",
    "worker_publish_subjects",
    "worker_subscribe_subjects",
]

PARTITION_PREFIX: Final = "kv.part"
DEFAULT_PARTITIONS: Final = 8
DEAD_LETTER_STREAM: Final = "KV_DEADLETTER"
LIVENESS_BUCKET: Final = "kv_workers"
RESYNC_PREFIX: Final = "kv.resync"
CONSUMER_PREFIX: Final = "kvidx-p"
# A publisher's replies (JetStream acks, API answers) come to an inbox of its own, under
# `_INBOX.kvw.<model>.<worker>`: NATS permissions can then let a worker read its replies
# and nobody else's.
WORKER_INBOX_PREFIX: Final = "_INBOX.kvw"


class StreamSettings(msgspec.Struct, frozen=True, kw_only=True):
    partitions: int = DEFAULT_PARTITIONS
    max_age_s: float = 3600.0
    max_bytes: int = 1 << 30
    duplicate_window_s: float = 120.0
    liveness_ttl_s: float = 10.0
    # Copies JetStream keeps of every stream, bucket and object store we create: 1 on one
    # server, 3 on a cluster (one node's loss then loses nothing).
    replicas: int = 1


def partition_filter(partition: int) -> str:
    return f"{PARTITION_PREFIX}.{partition}.>"


@functools.lru_cache(maxsize=65_536)
def stored_subject_identity(subject: str) -> tuple[str, str] | None:
    """(model, worker_id) a stored message's subject `kv.part.<p>.<model>.<worker>` names:
    the identity its publisher was allowed to publish as; None if it is not one."""
    parts = subject.split(".")
    if len(parts) != 5 or f"{parts[0]}.{parts[1]}" != PARTITION_PREFIX:
        return None
    try:
        return unescape_token(parts[3]), unescape_token(parts[4])
    except ValueError:
        return None


DEFAULT_MAX_PAYLOAD: Final = 1 << 20


def server_max_payload(js: JetStreamContext) -> int:
    """The largest message (headers included) the connected server accepts."""
    nc = getattr(js, "_nc", None)  # nats-py keeps the client there; no public accessor
    value = getattr(nc, "max_payload", 0) if nc is not None else 0
    return int(value) if value else DEFAULT_MAX_PAYLOAD


def consumer_name(partition: int) -> str:
    return f"{CONSUMER_PREFIX}{partition}"


def resync_subject(model: str, worker_id: str) -> str:
    return f"{RESYNC_PREFIX}.{escape_token(model)}.{escape_token(worker_id)}"


def worker_inbox_prefix(model: str, worker_id: str) -> str:
    """The inbox prefix a worker's publisher connects with (nats-py `inbox_prefix`)."""
    return f"{WORKER_INBOX_PREFIX}.{escape_token(model)}.{escape_token(worker_id)}"


def worker_publish_subjects(model: str, worker_id: str) -> list[str]:
    """Every subject a worker's publisher publishes on, and nothing more: its events, its
    liveness entry, and the one JetStream API call it makes (looking the bucket up).
    Replies to the indexer's resync requests need `allow_responses`, not a subject."""
    return [
        f"{SUBJECT_PREFIX}.{escape_token(model)}.{escape_token(worker_id)}",
        f"$KV.{LIVENESS_BUCKET}.{liveness_key(model, worker_id)}",
        f"$JS.API.STREAM.INFO.KV_{LIVENESS_BUCKET}",
    ]


def worker_subscribe_subjects(model: str, worker_id: str) -> list[str]:
    """What a worker's publisher subscribes to: its resync requests and its own inbox."""
    return [resync_subject(model, worker_id), f"{worker_inbox_prefix(model, worker_id)}.>"]


def liveness_key(model: str, worker_id: str) -> str:
    """KV keys allow [-/_=.A-Za-z0-9]: the subject-token escape, with `=` for `~`."""
    return f"{escape_token(model)}.{escape_token(worker_id)}".replace("~", "=")


def parse_liveness_key(key: str) -> tuple[str, str]:
    model, _, worker = key.replace("=", "~").partition(".")
    return unescape_token(model), unescape_token(worker)


class WorkerRecord(msgspec.Struct, kw_only=True):
    """A publisher's entry in the liveness bucket (JSON), refreshed every TTL / 3."""

    model: str
    worker_id: str
    block_size: int
    dp_size: int = 1
    tiers: list[str] = msgspec.field(default_factory=lambda: ["gpu"])
    epoch: int = 0
    last_seq: dict[str, int] = msgspec.field(default_factory=dict)  # dp rank -> bus seq
    version: str = ""
    # Prefill/decode disaggregation (kvcore/roles.py): records of publishers older than
    # roles carry none and decode as "both".
    role: str = DEFAULT_ROLE
    # Shared storage pools the worker mounts (kvcore/pools.py): it is credited with their
    # blocks and may write into them. Records older than pools carry none.
    storage_pools: list[str] = msgspec.field(default_factory=list)


def stream_config(settings: StreamSettings) -> js_api.StreamConfig:
    transform = js_api.SubjectTransform(
        src=f"{SUBJECT_PREFIX}.*.*",
        dest=f"{PARTITION_PREFIX}.{{{{partition({settings.partitions},1,2)}}}}"
        f".{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}",
    )
    return js_api.StreamConfig(
        name=STREAM_NAME,
        subjects=[STREAM_SUBJECTS],
        subject_transform=transform,
        storage=js_api.StorageType.FILE,
        retention=js_api.RetentionPolicy.LIMITS,
        max_age=settings.max_age_s,
        max_bytes=settings.max_bytes,
        duplicate_window=settings.duplicate_window_s,
        discard=js_api.DiscardPolicy.OLD,
        num_replicas=settings.replicas,
    )


async def ensure_stream(js: JetStreamContext, settings: StreamSettings) -> js_api.StreamInfo:
    """Create the event stream, or check an existing one has our partition count."""
    wanted = stream_config(settings)
    try:
        info = await js.stream_info(STREAM_NAME)
    except NotFoundError:
        try:
            return await js.add_stream(wanted)
        except BadRequestError:  # created concurrently by another process
            info = await js.stream_info(STREAM_NAME)
    current = info.config.subject_transform
    if current is None or current.dest != wanted.subject_transform.dest:  # type: ignore[union-attr]
        raise RuntimeError(
            f"stream {STREAM_NAME} exists with subject transform "
            f"{current.dest if current else None!r}; this process expects "
            f"{settings.partitions} partitions ({wanted.subject_transform.dest!r})"  # type: ignore[union-attr]
        )
    return info


async def ensure_dead_letter_stream(js: JetStreamContext, replicas: int = 1) -> None:
    config = js_api.StreamConfig(
        name=DEAD_LETTER_STREAM, subjects=[f"{DEAD_LETTER_SUBJECT}.>"],
        storage=js_api.StorageType.FILE, max_msgs=100_000, max_age=7 * 24 * 3600.0,
        num_replicas=replicas,
    )
    try:
        await js.stream_info(DEAD_LETTER_STREAM)
    except NotFoundError:
        with contextlib.suppress(BadRequestError):
            await js.add_stream(config)


async def ensure_liveness_bucket(js: JetStreamContext, ttl_s: float,
                                 replicas: int = 1) -> KeyValue:
    """The worker registry bucket; created with `replicas` if missing (an existing one is
    left as it is: `reconcile_replicas` is the indexer's)."""
    try:
        return await js.key_value(LIVENESS_BUCKET)
    except (BucketNotFoundError, NotFoundError):
        try:
            return await js.create_key_value(js_api.KeyValueConfig(
                bucket=LIVENESS_BUCKET, ttl=ttl_s, history=1,
                storage=js_api.StorageType.FILE, replicas=replicas))
        except BadRequestError:
            return await js.key_value(LIVENESS_BUCKET)


def kv_stream(bucket: str) -> str:
    """The stream behind a KV bucket."""
    return f"KV_{bucket}"


def object_store_stream(bucket: str) -> str:
    """The stream behind an object store."""
    return f"OBJ_{bucket}"


async def reconcile_replicas(js: JetStreamContext, streams: list[str],
                             replicas: int) -> list[tuple[str, int]]:
    """Give each existing stream of `streams` (KV buckets and object stores are streams:
    `kv_stream`, `object_store_stream`) `replicas` copies, and their durable consumers
    with them; returns (stream or stream/consumer, old count) of those changed. The server
    moves the data itself: scaling up copies it to new peers (the stream stays readable),
    scaling down drops peers. A stream that is missing is
    skipped; a cluster with fewer JetStream servers than `replicas` refuses the update
    (BadRequestError, raised)."""
    changed: list[tuple[str, int]] = []
    for name in streams:
        try:
            info = await js.stream_info(name)
        except NotFoundError:
            continue
        current = info.config.num_replicas or 1
        if current != replicas:
            await js.update_stream(dataclasses.replace(info.config, num_replicas=replicas))
            changed.append((name, current))
        changed.extend(await _reconcile_consumer_replicas(js, name, replicas))
    return changed


async def _reconcile_consumer_replicas(js: JetStreamContext, stream: str,
                                       replicas: int) -> list[tuple[str, int]]:
    """Durable consumers made without a replica count (ours) follow their stream's when
    it changes; one made with an explicit other count would stay where it is, and with
    one copy a lost node takes it away: it is given `replicas` too."""
    changed: list[tuple[str, int]] = []
    for info in await js.consumers_info(stream):
        config = info.config
        if not config.durable_name or config.num_replicas in (None, 0, replicas):
            continue
        old = config.num_replicas or 1
        await _update_consumer(js, stream, dataclasses.replace(config, num_replicas=replicas))
        changed.append((f"{stream}/{config.durable_name}", old))
    return changed


_CONSUMER_EXCEEDS_STREAM: Final = 10126  # the stream's new peers are not placed yet
_STREAM_SCALING_WAIT_S: Final = 30.0


async def _update_consumer(js: JetStreamContext, stream: str,
                           config: js_api.ConsumerConfig) -> None:
    """Update a consumer's config; one given more copies than its stream has yet (the
    stream's own scaling, just asked for, is still under way) is retried meanwhile."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _STREAM_SCALING_WAIT_S
    while True:
        try:
            await js.add_consumer(stream, config)
            return
        except BadRequestError as exc:
            if exc.err_code != _CONSUMER_EXCEEDS_STREAM or loop.time() > deadline:
                raise
        await asyncio.sleep(0.25)
