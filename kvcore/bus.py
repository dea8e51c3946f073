"""The bus contract: what publishers put on NATS JetStream and indexers read back.

This module is the single definition both packages import. It is deliberately light
(msgspec only) so the indexer can import it without pulling in ZMQ or the publisher.

Wire format: msgpack maps (field names on the wire), one `EventBatch` per NATS message.
Schema evolution follows msgspec's rules: new fields are added with defaults at the end,
unknown fields are ignored, and a change that old readers cannot ignore bumps
`SCHEMA_VERSION`; readers reject a version they do not know with `UnsupportedSchemaError`.

Schema 2 adds KV-cache groups (hybrid-attention models): `group`, `group_kind` and
`sliding_window` on BlockStored, `group` on BlockRemoved; and shared storage pools:
`pool` on BlockStored, BlockRemoved and AllBlocksCleared. Readers accept 1 and 2; a
publisher writes 1 when no event of the batch uses a schema-2 field (`schema_for`), so
workers of plain models keep working with readers that know only schema 1. A schema-1
batch carrying group fields is refused; one carrying `pool` is accepted (publishers built
before the schema bump wrote pool fields under schema 1).

Engine block hashes travel as unsigned 64-bit ints: the publisher folds every engine
form (signed ints, unsigned ints, raw digest bytes) into u64 with `engine_hash_to_u64`.
Token ids travel packed as little-endian u32 (`pack_tokens`), four bytes per token.
"""

from __future__ import annotations

import functools
import math
import re
from array import array
from collections.abc import Callable, Sequence
from typing import Any, Final

import msgspec
import xxhash

_check_plain_stores: Callable[[list[Any], type, bool], bool] | None
_check_plain_batch: Callable[[object, type, type], bool] | None
try:
    from kvcore._native import check_plain_batch as _check_plain_batch
    from kvcore._native import check_plain_stores as _check_plain_stores
except ImportError:  # installed without a C compiler: the Python checks alone
    _check_plain_stores = _check_plain_batch = None

__all__ = [
    "DEAD_LETTER_SUBJECT",
    "MAX_BLOCKS_PER_EVENT",
    "MAX_DP_RANK",
    "MAX_EVENTS_PER_BATCH",
    "MAX_EXTRA_KEY_BYTES",
    "MAX_GROUP",
    "MAX_MESSAGE_BYTES",
    "MAX_NAME_BYTES",
    "MAX_POSITION",
    "MAX_SLIDING_WINDOW",
    "MEDIUM_TIERS",
    "SCHEMA_V1",
    "SCHEMA_VERSION",
    "STREAM_NAME",
    "STREAM_SUBJECTS",
    "SUBJECT_PREFIX",
    "TIERS",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "BusDecodeError",
    "BusError",
    "Event",
    "EventBatch",
    "UnsupportedSchemaError",
    "block_count",
    "check_identity",
    "decode_batch",
    "encode_batch",
    "engine_hash_to_u64",
    "escape_token",
    "msg_id",
    "pack_tokens",
    "parse_subject",
    "schema_for",
    "subject_for",
    "tier_index",
    "unescape_token",
    "unpack_tokens",
    "uses_groups",
    "uses_pool",
    "uses_schema2",
    "validate_batch",
    "validate_event",
]

SCHEMA_VERSION: Final = 2  # the newest schema this module reads and writes
SCHEMA_V1: Final = 1  # one KV-cache group per worker: no group fields
_KNOWN_SCHEMAS: Final = frozenset({SCHEMA_V1, SCHEMA_VERSION})

STREAM_NAME: Final = "KV_EVENTS"
SUBJECT_PREFIX: Final = "kv.events"
STREAM_SUBJECTS: Final = f"{SUBJECT_PREFIX}.>"
DEAD_LETTER_SUBJECT: Final = "kv.deadletter"

# Limits a reader enforces before touching the index ("absurd sizes").
MAX_MESSAGE_BYTES: Final = 8 * 1024 * 1024
MAX_EVENTS_PER_BATCH: Final = 65_536
MAX_BLOCKS_PER_EVENT: Final = 65_536
# Every field bounded by what every backend can store (the Redis record packs the rank as
# u16 and (epoch, seq) as signed 64-bit); anything beyond is refused at the bus.
MAX_NAME_BYTES: Final = 256  # model, worker_id, lora_name, cache_salt, medium (UTF-8)
MAX_DP_RANK: Final = 65_535
MAX_POSITION: Final = 2**63 - 1  # epoch and seq
MAX_EXTRA_KEY_BYTES: Final = 4_096  # one block's extra keys
MAX_GROUP: Final = 63  # KV-cache group index (hybrid models have a handful)
MAX_SLIDING_WINDOW: Final = 1 << 24  # tokens

# Storage tiers, in the index's bit order, and the engine medium names (any case) that
# mean each. A medium not named here belongs to "other".
TIERS: Final = ("gpu", "cpu", "storage", "other")
MEDIUM_TIERS: Final = {
    "gpu": "gpu",
    "cuda": "gpu",
    "hbm": "gpu",
    "cpu": "cpu",
    "cpu_pinned": "cpu",
    "host": "cpu",
    "storage": "storage",
    "disk": "storage",
    "fs": "storage",
    "obj": "storage",
    "external": "storage",
}

_TIER_SLOTS: Final = {medium: TIERS.index(tier) for medium, tier in MEDIUM_TIERS.items()}
_OTHER_SLOT: Final = TIERS.index("other")

_U64: Final = 0xFFFF_FFFF_FFFF_FFFF

# Whether validate_batch lets the C extension pass the usual batches and stores
# (check_plain_batch, check_plain_stores: they accept only what the Python checks
# accept); tests turn it off to compare.
NATIVE_CHECKS = True


def tier_index(medium: str) -> int:
    """Position in TIERS (the index's bit order) of the tier an event's medium names."""
    slot = _TIER_SLOTS.get(medium)  # the usual lower-case name, without a lower() copy
    return slot if slot is not None else _TIER_SLOTS.get(medium.lower(), _OTHER_SLOT)


class BusError(Exception):
    """Root of the bus errors.

    BusError
    ├── BusDecodeError          bytes are not a valid EventBatch (truncated, wrong types, too big)
    └── UnsupportedSchemaError  a well-formed batch of a schema version this reader does not know
    """


class BusDecodeError(BusError):
    """The payload is not a valid EventBatch."""


class UnsupportedSchemaError(BusError):
    """The batch declares a schema version this reader does not understand."""

    def __init__(self, version: object) -> None:
        super().__init__(
            f"unsupported bus schema version {version!r} (reader knows {SCHEMA_V1} and "
            f"{SCHEMA_VERSION})"
        )
        self.version = version


class BlockStored(msgspec.Struct, tag="stored", omit_defaults=True, gc=False):
    """Blocks became full and cached on a worker, in sequence order.

    `token_ids` holds `block_size` little-endian u32 tokens per block. Offload events
    (a copy moved to CPU or storage) may carry no tokens and `block_size == 0`: the
    blocks are then known only by engine hash.
    """

    block_hashes: list[int]
    parent_hash: int | None = None
    token_ids: bytes = b""
    block_size: int = 0
    medium: str = "gpu"
    lora_name: str | None = None
    cache_salt: str | None = None
    # One entry per block (b"" = none): canonical bytes of the block's extra keys
    # (multimodal hashes and the like), mixed into that block's key.
    extra_keys: list[bytes] | None = None
    # Schema 2: the KV-cache group holding the blocks (vLLM's group_idx), the group's
    # attention kind as the engine names it ("full_attention", "sliding_window",
    # "mamba", ...) and its sliding window in tokens (0: none).
    group: int = 0
    group_kind: str | None = None
    sliding_window: int = 0
    # Schema 2: the shared storage pool the blocks were written to (None: the worker's
    # own cache). A pool write names blocks the writer's ledger resolves (docs/architecture.md,
    # "Shared storage pools"). A pool's presence lives in group 0.
    pool: str | None = None


class BlockRemoved(msgspec.Struct, tag="removed", omit_defaults=True, gc=False):
    """Blocks left a tier of a worker's cache (of one KV-cache group, schema 2)."""

    block_hashes: list[int]
    medium: str = "gpu"
    group: int = 0
    pool: str | None = None  # schema 2: the blocks left this shared storage pool


class AllBlocksCleared(msgspec.Struct, tag="cleared", omit_defaults=True, gc=False):
    """The worker (this DP rank) dropped its whole cache; with `pool`, that pool was wiped."""

    pool: str | None = None  # schema v2


Event = BlockStored | BlockRemoved | AllBlocksCleared


class EventBatch(msgspec.Struct, omit_defaults=True, gc=False):
    """One NATS message: the events of one engine step of one (worker, dp_rank).

    `epoch` is unique per publisher start (and grows with time); `seq` is gapless per
    (worker_id, dp_rank, epoch), starting at 0.
    """

    schema: int
    model: str
    worker_id: str
    epoch: int
    seq: int
    events: list[Event]
    dp_rank: int = 0
    ts: float = 0.0


class _SchemaProbe(msgspec.Struct):
    schema: int | str | float | None = None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(EventBatch)
_probe_decoder = msgspec.msgpack.Decoder(_SchemaProbe)


def encode_batch(batch: EventBatch) -> bytes:
    return _encoder.encode(batch)


def decode_batch(payload: bytes | memoryview) -> EventBatch:
    """Decode and validate one batch; raise a BusError subclass naming what is wrong."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise BusDecodeError(f"message of {len(payload)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        batch = _decoder.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        _raise_if_other_schema(payload)
        raise BusDecodeError(f"invalid EventBatch: {exc}") from exc
    validate_batch(batch)
    return batch


def _raise_if_other_schema(payload: bytes | memoryview) -> None:
    try:
        probe = _probe_decoder.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return
    if probe.schema is not None and probe.schema not in _KNOWN_SCHEMAS:
        raise UnsupportedSchemaError(probe.schema)


def uses_groups(event: Event) -> bool:
    """Whether the event carries a schema-2 KV-cache group field."""
    if isinstance(event, BlockStored):
        return bool(event.group or event.group_kind is not None or event.sliding_window)
    return isinstance(event, BlockRemoved) and event.group != 0


def uses_pool(event: Event) -> bool:
    """Whether the event names a shared storage pool (a schema-2 field)."""
    return event.pool is not None


def uses_schema2(event: Event) -> bool:
    """Whether the event carries any schema-2 field (a KV-cache group or a pool)."""
    return uses_groups(event) or uses_pool(event)


def schema_for(events: Sequence[Event]) -> int:
    """The oldest schema that carries these events: 1 unless one uses a group or pool field."""
    return SCHEMA_VERSION if any(uses_schema2(e) for e in events) else SCHEMA_V1


def validate_batch(batch: EventBatch) -> None:
    """Raise a BusError unless `batch` is one an index may apply (decode_batch calls it)."""
    if (NATIVE_CHECKS and _check_plain_batch is not None
            and _check_plain_batch(batch, EventBatch, BlockStored)):
        return  # the usual batch of usual stores, which the checks below accept
    if batch.schema not in _KNOWN_SCHEMAS:
        raise UnsupportedSchemaError(batch.schema)
    model, worker_id = batch.model, batch.worker_id
    if not (model and worker_id and (len(model) + len(worker_id)) * 4 <= MAX_NAME_BYTES):
        check_identity(model, worker_id)  # its short-name test inlined: one call less
    if batch.seq < 0 or batch.epoch < 0 or batch.dp_rank < 0:
        raise BusDecodeError("seq, epoch and dp_rank must be >= 0")
    if batch.seq > MAX_POSITION or batch.epoch > MAX_POSITION:
        raise BusDecodeError(f"seq and epoch must be <= {MAX_POSITION}")
    if batch.dp_rank > MAX_DP_RANK:
        raise BusDecodeError(f"dp_rank {batch.dp_rank} exceeds {MAX_DP_RANK}")
    if not math.isfinite(batch.ts):
        raise BusDecodeError(f"ts {batch.ts!r} is not a finite number")
    if len(batch.events) > MAX_EVENTS_PER_BATCH:
        raise BusDecodeError(f"{len(batch.events)} events exceed {MAX_EVENTS_PER_BATCH}")
    schema1 = batch.schema == SCHEMA_V1
    if (NATIVE_CHECKS and _check_plain_stores is not None
            and _check_plain_stores(batch.events, BlockStored, schema1)):
        return  # every event a usual store that the checks below accept
    for event in batch.events:
        # validate_event's dispatch inlined: this loop runs once per event on ingest
        if type(event) is BlockStored:
            _check_stored(event, MAX_BLOCKS_PER_EVENT)
            if schema1 and (event.group or event.group_kind is not None
                            or event.sliding_window):
                raise BusDecodeError("a schema 1 batch carries KV-cache group fields")
        else:
            validate_event(event)
            if schema1 and uses_groups(event):
                raise BusDecodeError("a schema 1 batch carries KV-cache group fields")


def validate_event(event: Event, *, max_blocks: int | None = MAX_BLOCKS_PER_EVENT) -> None:
    """Raise a BusDecodeError unless `event` is one `validate_batch` accepts.

    A publisher checks events with `max_blocks=None` before it cuts them to the bus limits.
    """
    if isinstance(event, BlockStored):
        _check_stored(event, max_blocks)
    elif isinstance(event, BlockRemoved):
        _check_hashes(event.block_hashes, max_blocks)
        _check_name("medium", event.medium)
        _check_group(event.group)
        _check_pool(event.pool)
    else:
        _check_pool(event.pool)


def _check_pool(pool: str | None) -> None:
    if pool is not None:
        if not pool:
            raise BusDecodeError("empty pool name")
        _check_name("pool", pool)


def check_identity(model: str, worker_id: str) -> None:
    """Raise a BusDecodeError unless (model, worker_id) may name a worker on the bus."""
    if model and worker_id and (len(model) + len(worker_id)) * 4 <= MAX_NAME_BYTES:
        return  # the usual short names: both within the limit whatever their encoding
    for field, value in (("model", model), ("worker_id", worker_id)):
        if not value:
            raise BusDecodeError(f"empty {field}")
        _check_name(field, value)


def _check_name(field: str, value: str | None) -> None:
    if value is not None and len(value) * 4 > MAX_NAME_BYTES \
            and len(value.encode()) > MAX_NAME_BYTES:
        raise BusDecodeError(f"{field} of {len(value.encode())} bytes exceeds {MAX_NAME_BYTES}")


def _check_hashes(hashes: list[int], max_blocks: int | None) -> None:
    if max_blocks is not None and len(hashes) > max_blocks:
        raise BusDecodeError(f"{len(hashes)} blocks exceed {max_blocks}")
    if hashes and (min(hashes) < 0 or max(hashes) > _U64):
        bad = next(h for h in hashes if not 0 <= h <= _U64)
        raise BusDecodeError(f"block hash {bad} is not an unsigned 64-bit int")


def _check_group(group: int) -> None:
    if not 0 <= group <= MAX_GROUP:
        raise BusDecodeError(f"group {group} is not in 0..{MAX_GROUP}")


def _check_stored(event: BlockStored, max_blocks: int | None) -> None:
    hashes = event.block_hashes
    # _check_hashes inlined for the hot path: its exact checks when any bound is crossed
    if ((max_blocks is not None and len(hashes) > max_blocks)
            or (hashes and (min(hashes) < 0 or max(hashes) > _U64))):
        _check_hashes(hashes, max_blocks)
    if not 0 <= event.group <= MAX_GROUP:
        _check_group(event.group)
    if not 0 <= event.sliding_window <= MAX_SLIDING_WINDOW:
        raise BusDecodeError(f"sliding_window {event.sliding_window} is not in "
                             f"0..{MAX_SLIDING_WINDOW}")
    kind, lora, salt = event.group_kind, event.lora_name, event.cache_salt
    if kind is not None and not kind.isprintable():
        # Stored as "kind\nwindow" in Redis: a newline would let a kind read as another.
        raise BusDecodeError(f"group_kind {kind[:64]!r} holds unprintable characters")
    # One test for the usual short names (the hot path), the exact checks past it.
    if (len(event.medium) * 4 > MAX_NAME_BYTES
            or (kind is not None and len(kind) * 4 > MAX_NAME_BYTES)
            or (lora is not None and len(lora) * 4 > MAX_NAME_BYTES)
            or (salt is not None and len(salt) * 4 > MAX_NAME_BYTES)):
        for field, value in (("group_kind", kind), ("medium", event.medium),
                             ("lora_name", lora), ("cache_salt", salt)):
            _check_name(field, value)
    if event.pool is not None:
        _check_pool(event.pool)
    if event.parent_hash is not None and not 0 <= event.parent_hash <= _U64:
        raise BusDecodeError(f"parent hash {event.parent_hash} is not an unsigned 64-bit int")
    n_blocks = len(event.block_hashes)
    if event.token_ids:
        if event.block_size <= 0:
            raise BusDecodeError("token_ids given with block_size <= 0")
        expected = n_blocks * event.block_size * 4
        if len(event.token_ids) != expected:
            raise BusDecodeError(
                f"token_ids hold {len(event.token_ids)} bytes; {n_blocks} blocks of "
                f"{event.block_size} u32 tokens need {expected}"
            )
    if event.extra_keys is not None:
        if len(event.extra_keys) != n_blocks:
            raise BusDecodeError(
                f"extra_keys has {len(event.extra_keys)} entries for {n_blocks} blocks"
            )
        if any(len(extra) > MAX_EXTRA_KEY_BYTES for extra in event.extra_keys):
            raise BusDecodeError(f"an extra_keys entry exceeds {MAX_EXTRA_KEY_BYTES} bytes")


def block_count(batch: EventBatch) -> int:
    """Blocks named by the batch's stored and removed events."""
    return sum(len(e.block_hashes) for e in batch.events if not isinstance(e, AllBlocksCleared))


def pack_tokens(tokens: Sequence[int] | array[int]) -> bytes:
    """Token ids as packed little-endian u32 (the bus and block-key form)."""
    packed = tokens if isinstance(tokens, array) and tokens.typecode == "I" else array("I", tokens)
    if _BIG_ENDIAN:
        packed = array("I", packed)
        packed.byteswap()
    return packed.tobytes()


def unpack_tokens(data: bytes) -> list[int]:
    tokens = array("I")
    tokens.frombytes(data)
    if _BIG_ENDIAN:
        tokens.byteswap()
    return tokens.tolist()


_BIG_ENDIAN: Final = array("I", [1]).tobytes()[0] == 0
assert array("I").itemsize == 4, "array('I') must be 32-bit on this platform"


def engine_hash_to_u64(value: int | bytes) -> int:
    """Fold an engine block hash (signed int, unsigned int or digest bytes) into u64.

    Ints keep their low 64 bits (two's complement for negatives), so signed and unsigned
    spellings of one hash agree. Bytes are hashed with xxh3_64: they are opaque ids.
    """
    if isinstance(value, bytes):
        return int(xxhash.xxh3_64_intdigest(value))
    return value & _U64


# --- subjects -------------------------------------------------------------------------

_SAFE_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_-]")
_ESCAPE = re.compile(r"~[0-9A-F]{2}")


def escape_token(text: str) -> str:
    """Reversibly escape any string into one valid NATS subject token.

    Characters outside [A-Za-z0-9_-] become `~XX` per UTF-8 byte (upper-case hex); `~`
    itself is escaped, so the mapping is injective. The empty string becomes `~`.
    """
    if not text:
        return "~"
    out: list[str] = []
    for ch in text:
        if _SAFE_TOKEN_CHARS.fullmatch(ch):
            out.append(ch)
        else:
            out.extend(f"~{b:02X}" for b in ch.encode())
    return "".join(out)


def unescape_token(token: str) -> str:
    if token == "~":
        return ""
    raw = bytearray()
    i = 0
    while i < len(token):
        ch = token[i]
        if ch == "~":
            if not _ESCAPE.fullmatch(token, i, i + 3):
                raise ValueError(f"bad escape in subject token {token!r}")
            raw.append(int(token[i + 1 : i + 3], 16))
            i += 3
        else:
            if not _SAFE_TOKEN_CHARS.fullmatch(ch):
                raise ValueError(f"unescaped {ch!r} in subject token {token!r}")
            raw.extend(ch.encode())
            i += 1
    try:
        return raw.decode()
    except UnicodeDecodeError as exc:
        raise ValueError(f"subject token {token!r} is not escaped UTF-8") from exc


@functools.lru_cache(maxsize=4096)  # one subject per (model, worker), asked once per batch
def subject_for(model: str, worker_id: str) -> str:
    return f"{SUBJECT_PREFIX}.{escape_token(model)}.{escape_token(worker_id)}"


def parse_subject(subject: str) -> tuple[str, str]:
    """Inverse of `subject_for`: (model, worker_id)."""
    prefix = SUBJECT_PREFIX + "."
    if not subject.startswith(prefix):
        raise ValueError(f"not a KV event subject: {subject!r}")
    parts = subject[len(prefix) :].split(".")
    if len(parts) != 2:
        raise ValueError(f"not a KV event subject: {subject!r}")
    return unescape_token(parts[0]), unescape_token(parts[1])


def msg_id(worker_id: str, dp_rank: int, epoch: int, seq: int) -> str:
    """The Nats-Msg-Id of a batch: JetStream drops a re-publish within its duplicate window."""
    return f"{worker_id}|{dp_rank}|{epoch}|{seq}"
