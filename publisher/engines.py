"""Engine wire forms -> bus events: every vLLM release (0.9 to 0.34) and SGLang.

Pure functions, no I/O. `decode_engine_payload` turns one engine batch (the third frame
of a live message, or of a replay answer) into bus events; the frame helpers split the
ZMQ multipart messages of the live and replay protocols. The wire forms are described in
`/work/shared/reference/vllm-kv-events.md`; in short:

- the batch is a msgpack array `[ts, events]` (vLLM 0.9.0) or `[ts, events, dp_rank]`;
- events are positional arrays `["BlockStored", field, ...]` with trailing default fields
  dropped (vLLM <= 0.23, SGLang) or maps tagged by `"type"` with default fields omitted
  (vLLM >= 0.24); unknown map fields and extra trailing array fields are ignored;
- block hashes are signed ints, unsigned 64-bit ints or raw digest bytes; all of them are
  folded into u64 with `kvcore.bus.engine_hash_to_u64`.

Identity. Everything an engine mixes into its own block hash besides the tokens must
reach the block key in the place a router's query puts it, or the event is left out
(`unplaceable_identity`): a block keyed without its tenant, adapter or media would match
another tenant's query.

- SGLang sends `cache_salt` and `lora_name` as fields: they become the event's
  `cache_salt` / `lora_name`, which root the chain (`kvcore.keys.root_seed`).
- vLLM (0.17+) sends them untagged in `extra_keys`, one tuple per block, in the order of
  `generate_block_hash_extra_keys` / `to_event_extra_keys` (vllm/v1/core/kv_cache_utils.py):
  the LoRA name (every block of an adapter request; equal to `lora_name`), the
  `(mm identifier, offset in the block)` pairs, the cache salt (a bare string, on the
  block that starts the sequence only), then the prompt-embedding digests (bytes). The
  salt becomes `cache_salt`, the LoRA name is the event's `lora_name`, and the multimodal
  items and digests become the block's canonical extra key (`kvcore.keys.block_extra_key`).
  Any other shape (a bare string on a later block, a LoRA slot that does not hold the
  adapter name, a value of another type, two salts that disagree) is unplaceable.
- vLLM's offloading connectors (CPU / STORAGE stores with tokens) publish no extra keys
  even when the request had them: such a store keeps only its engine hashes, so the
  index resolves it through the keys the GPU store of the same blocks gave them.

Hash lookahead. With vLLM's hash lookahead (0.33+; on by default with EAGLE speculative
decoding and prefix caching) each block's engine hash also covers the next L tokens after
the block (and the media over them), which the store lists in `lookahead_token_ids`, one
list per block. A block key covers the block's own tokens and its parent only, so keying
such a block would claim it for a prompt that differs only in those next tokens, which the
engine would not reuse: a false hit. Such a store is left out (`hash_lookahead`): the
worker gets no prefix hits instead of false ones. Folding the lookahead tokens into the
key would need L on the router's query side too.

Locality. A store or removal the engine marks `locality: REMOTE` (vLLM 0.26+), or on
SGLang's `EXTERNAL` medium (a shared pool), is not a block this worker holds. When the
worker declared shared storage pools (`pools`), it is a write into a pool: the event gets
`pool` (the pool its `ownership` names, else the first declared pool) and the storage
medium; an event whose `ownership` names a declared pool is one too, whatever its
locality. Without declared pools such events are left out (`remote_block`). vLLM's
`ownership` (0.29+: which secondary offloading tier made the event) is returned in
`EngineBatch.owners`, for `publisher.residency.TierOwners` to keep one owner's removal
from clearing another's copy.

Errors:

    EngineDecodeError   the frames or the payload are not a KV event batch at all
                        (truncated msgpack, wrong top-level types, absurd sizes)

An event that cannot be used (unknown type, bad field, token count mismatch) does not fail
the batch: it is left out and `EngineBatch.skipped` says why. A skip reason is a code from
`SKIP_REASONS`, optionally followed by `:` and a short detail (`unknown_event_type:Foo`);
label metrics with the code only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, Literal

import msgspec

from kvcore.bus import (
    MAX_BLOCKS_PER_EVENT,
    MAX_EVENTS_PER_BATCH,
    MAX_GROUP,
    MAX_NAME_BYTES,
    MAX_SLIDING_WINDOW,
    MEDIUM_TIERS,
    TIERS,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Event,
    engine_hash_to_u64,
    pack_tokens,
    tier_index,
)
from kvcore.keys import block_extra_key

__all__ = [
    "END_MARKER_SEQ",
    "MAX_ENGINE_PAYLOAD_BYTES",
    "SKIP_REASONS",
    "EngineBatch",
    "EngineDecodeError",
    "Flavor",
    "canonical_medium",
    "decode_engine_payload",
    "encode_replay_request",
    "parse_live_frames",
    "parse_replay_frames",
]

Flavor = Literal["vllm", "sglang"]

# Larger than any real engine step (a 1M-token prefill is ~5 MiB of msgpack).
MAX_ENGINE_PAYLOAD_BYTES: Final = 64 * 1024 * 1024
# The seq frame of the replay end marker: 8 bytes of 0xFF (-1 as a signed int64).
END_MARKER_SEQ: Final = b"\xff" * 8

SKIP_REASONS: Final = frozenset(
    {
        "unknown_event_type",  # a tag this decoder does not know (detail: the tag)
        "malformed_event",  # not an array/map, no tag, or a field of the wrong type
        "token_count_mismatch",  # block_size * len(block_hashes) != len(token_ids)
        "empty_event",  # a store or removal that lists no blocks
        # an identity input of the engine's hash (salt, LoRA, multimodal, prompt
        # embeddings) that cannot be placed into the block key unambiguously
        "unplaceable_identity",
        # locality REMOTE or a shared pool (EXTERNAL), and the worker declared no pool
        "remote_block",
        # a shared-pool store or removal of a KV-cache group other than 0: a pool's
        # presence lives in group 0 (docs/architecture.md, "Shared storage pools")
        "pool_group",
        # a vLLM store with `lookahead_token_ids` (hash lookahead, EAGLE): the engine's
        # hash also covers tokens after the block, which the block key cannot
        "hash_lookahead",
    }
)

_U64: Final = 0xFFFF_FFFF_FFFF_FFFF
_I64_MIN: Final = -(2**63)
_I64_MAX: Final = 2**63 - 1
_MAX_DETAIL: Final = 64
_GPU_TIER: Final = TIERS.index("gpu")
# Media that are not the worker's own memory (SGLang's L4: a shared / remote pool).
_SHARED_MEDIA: Final = frozenset({"external"})

# Positional field names after the tag. vLLM appends newer fields at the end (the KV-cache
# group of hybrid models from 0.20); SGLang's layout is shared up to `medium`, then follows
# its BlockStored struct (cache_salt, session_id, lora_name; no groups in 0.5.23). Reading
# a field of an unknown layout as a salt or an adapter can only isolate blocks, never merge
# them.
# Fields newer than the positional form (locality, ownership, session_id,
# lookahead_token_ids: vLLM 0.26+) only come in the map form and are read by name.
_STORED_FIELDS: Final[dict[Flavor, tuple[str, ...]]] = {
    "vllm": (
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "lora_name",
        "extra_keys",
        "group_idx",
        "kv_cache_spec_kind",
        "kv_cache_spec_sliding_window",
    ),
    "sglang": (
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "cache_salt",
        "session_id",
        "lora_name",
    ),
}
_REMOVED_FIELDS: Final[dict[Flavor, tuple[str, ...]]] = {
    "vllm": ("block_hashes", "medium", "group_idx"),
    "sglang": ("block_hashes", "medium"),
}

_decoder: Final = msgspec.msgpack.Decoder()


class EngineDecodeError(Exception):
    """The frames or payload are not an engine KV event batch; the message says why."""


class EngineBatch(msgspec.Struct, kw_only=True):
    """The usable bus events of one engine batch, and why the others were left out."""

    ts: float
    events: list[Event]
    dp_rank: int | None = None
    skipped: list[str] = msgspec.field(default_factory=list)
    # index in `events` -> the store's or removal's `ownership` (events naming one only)
    owners: dict[int, str] = msgspec.field(default_factory=dict)


class _SkipEventError(Exception):
    """Internal: this event cannot be used; args[0] is the skip reason."""


# --- payload --------------------------------------------------------------------------


def decode_engine_payload(
    payload: bytes | bytearray | memoryview, *, flavor: Flavor = "vllm",
    pools: Sequence[str] = (),
) -> EngineBatch:
    """Decode one engine batch (msgpack) into bus events; raise EngineDecodeError if it is none.

    `pools`: the shared storage pools the worker declared (shared-tier events go there).
    """
    stored_fields = _STORED_FIELDS.get(flavor)
    if stored_fields is None:
        raise ValueError(f"unknown engine flavor {flavor!r} (vllm or sglang)")
    if len(payload) > MAX_ENGINE_PAYLOAD_BYTES:
        raise EngineDecodeError(
            f"payload of {len(payload)} bytes exceeds {MAX_ENGINE_PAYLOAD_BYTES}"
        )
    try:
        batch = _decoder.decode(payload)
    except (msgspec.DecodeError, RecursionError, TypeError, ValueError) as exc:
        raise EngineDecodeError(f"invalid msgpack payload: {exc}") from exc
    ts, raw_events, dp_rank = _split_batch(batch)
    events: list[Event] = []
    skipped: list[str] = []
    owners: dict[int, str] = {}
    for raw in raw_events:
        try:
            event, owner = _decode_event(raw, stored_fields, flavor, pools)
        except _SkipEventError as skip:
            skipped.append(str(skip.args[0]))
            continue
        if owner is not None:
            owners[len(events)] = owner
        events.append(event)
    return EngineBatch(ts=ts, events=events, dp_rank=dp_rank, skipped=skipped, owners=owners)


def _split_batch(batch: object) -> tuple[float, list[Any], int | None]:
    """Check the batch array `[ts, events(, dp_rank)]`; extra trailing fields are ignored."""
    if type(batch) is not list:
        raise EngineDecodeError(f"batch is a {_kind(batch)}, not an array")
    if len(batch) < 2:
        raise EngineDecodeError(f"batch array has {len(batch)} elements, needs [ts, events]")
    ts, raw_events = batch[0], batch[1]
    if type(ts) is not float and type(ts) is not int:
        raise EngineDecodeError(f"batch ts is a {_kind(ts)}, not a number")
    if type(raw_events) is not list:
        raise EngineDecodeError(f"batch events is a {_kind(raw_events)}, not an array")
    if len(raw_events) > MAX_EVENTS_PER_BATCH:
        raise EngineDecodeError(f"{len(raw_events)} events exceed {MAX_EVENTS_PER_BATCH}")
    dp_rank = batch[2] if len(batch) > 2 else None
    if dp_rank is not None and (type(dp_rank) is not int or dp_rank < 0):
        raise EngineDecodeError(f"batch dp_rank {_detail(dp_rank)} is not an int >= 0")
    return float(ts), raw_events, dp_rank


def _decode_event(
    raw: object, stored_fields: tuple[str, ...], flavor: Flavor, pools: Sequence[str] = ()
) -> tuple[Event, str | None]:
    if type(raw) is dict:
        return _event_from_fields(raw.get("type"), raw, flavor, pools)
    if type(raw) is list and raw:
        tag = raw[0]
        names = (
            stored_fields
            if tag == "BlockStored"
            else _REMOVED_FIELDS[flavor]
            if tag == "BlockRemoved"
            else ()
        )
        # Positional fields by name; missing trailing fields stay absent, extra ones ignored.
        return _event_from_fields(tag, dict(zip(names, raw[1:], strict=False)), flavor,
                                  pools)
    raise _SkipEventError(f"malformed_event:event is a {_kind(raw)}")


def _event_from_fields(
    tag: object, fields: dict[Any, Any], flavor: Flavor, pools: Sequence[str] = ()
) -> tuple[Event, str | None]:
    if tag == "AllBlocksCleared":
        return AllBlocksCleared(), None
    if tag not in ("BlockStored", "BlockRemoved"):
        if type(tag) is str:
            raise _SkipEventError(f"unknown_event_type:{tag[:_MAX_DETAIL]}")
        raise _SkipEventError(f"malformed_event:event tag {_detail(tag)}")
    owner = _name(fields.get("ownership"), f"{tag}.ownership")
    pool = _pool_of(fields, str(tag), owner, pools)
    if tag == "BlockStored":
        event: Event = _stored(fields, flavor, local=pool is None)
    else:
        event = _removed(fields, local=pool is None)
    if pool is not None:
        # A write into (or eviction from) a shared pool: not a copy of the worker's own,
        # so not subject to TierOwners (no owner returned). A pool's presence lives in
        # group 0 (the full-attention group of a hybrid model): another group's pool
        # event is left out, so it can neither add nor take away group 0's presence.
        assert isinstance(event, BlockStored | BlockRemoved)
        if event.group != 0:
            raise _SkipEventError(f"pool_group:{tag} group {event.group} pool {pool}")
        if isinstance(event, BlockStored):
            event = msgspec.structs.replace(event, group_kind=None, sliding_window=0)
        return msgspec.structs.replace(event, pool=pool, medium="storage"), None
    return event, owner


def _pool_of(
    fields: dict[Any, Any], event: str, owner: str | None, pools: Sequence[str]
) -> str | None:
    """The declared pool a shared-tier event goes to, or None (then `_check_local` decides)."""
    if not pools:
        return None
    if owner is not None and owner in pools:
        return owner
    locality = fields.get("locality")
    medium = fields.get("medium")
    remote = type(locality) is str and locality.upper() == "REMOTE"
    shared = type(medium) is str and medium.lower() in _SHARED_MEDIA
    if not (remote or shared):
        return None
    if locality is not None and type(locality) is not str:
        raise _SkipEventError(f"malformed_event:{event}.locality is a {_kind(locality)}")
    return pools[0]


def _stored(fields: dict[Any, Any], flavor: Flavor, *, local: bool = True) -> BlockStored:
    hashes = _hashes(fields.get("block_hashes"), "BlockStored")
    tokens = fields.get("token_ids")
    block_size = fields.get("block_size", 0)
    if type(block_size) is not int or block_size < 0:
        raise _SkipEventError(f"malformed_event:BlockStored.block_size {_detail(block_size)}")
    if tokens is None:
        tokens = []
    elif type(tokens) is not list:
        raise _SkipEventError(f"malformed_event:BlockStored.token_ids is a {_kind(tokens)}")
    packed = b""
    if tokens:
        if block_size * len(hashes) != len(tokens):
            raise _SkipEventError(
                f"token_count_mismatch:{len(tokens)} tokens for {len(hashes)} blocks "
                f"of {block_size}"
            )
        try:
            packed = pack_tokens(tokens)
        except (OverflowError, TypeError) as exc:
            raise _SkipEventError("malformed_event:BlockStored.token_ids not u32") from exc
    parent = _parent(fields.get("parent_block_hash"))
    medium = _medium(fields.get("medium"), "BlockStored")
    if local:
        _check_local(fields, "BlockStored")
    raw_lora = fields.get("lora_name")
    lora = _lora_name(raw_lora, fields.get("lora_id"))
    salt = _name(fields.get("cache_salt"), "BlockStored.cache_salt")
    raw_extra = fields.get("extra_keys")
    if flavor == "vllm" and packed and raw_extra is None and tier_index(medium) != _GPU_TIER:
        # An offloading connector's store: vLLM's connectors leave out the extra keys
        # (and some the LoRA name) whatever the request had, so the tokens cannot say
        # whose blocks these are. Known by engine hash only, like a token-less store.
        group, kind, window = _group_spec(fields)
        _check_lookahead(fields.get("lookahead_token_ids"))
        return BlockStored(block_hashes=hashes, medium=medium, group=group, group_kind=kind,
                           sliding_window=window)
    extra_salt, extra_keys = _identity_keys(
        raw_extra, len(hashes), raw_lora if type(raw_lora) is str and raw_lora else None,
        starts_sequence=parent is None,
    )
    group, kind, window = _group_spec(fields)
    if extra_salt is not None:
        if salt is not None and salt != extra_salt:
            raise _SkipEventError("unplaceable_identity:cache_salt and the salt in extra_keys "
                                  "differ")
        salt = extra_salt
    _check_lookahead(fields.get("lookahead_token_ids"))
    return BlockStored(
        block_hashes=hashes,
        parent_hash=parent,
        token_ids=packed,
        block_size=block_size,
        medium=medium,
        lora_name=lora,
        cache_salt=salt,
        extra_keys=extra_keys,
        group=group,
        group_kind=kind,
        sliding_window=window,
    )


def _check_lookahead(raw: object) -> None:
    """Skip a store whose engine hashes cover tokens after their blocks (hash lookahead).

    vLLM (0.33+) sends one list of lookahead tokens per block, or None when lookahead
    hashing is off (vllm/v1/core/block_pool.py: a list whenever it is on, so even an empty
    entry, a block whose lookahead tokens had not come yet, was hashed the lookahead way).
    Checked after the identity inputs, so an event wrong in both ways keeps its identity
    reason.
    """
    if raw is None:
        return
    if type(raw) is not list:
        raise _SkipEventError(f"malformed_event:BlockStored.lookahead_token_ids is a "
                              f"{_kind(raw)}")
    tokens = max((len(entry) if type(entry) is list else 1 for entry in raw), default=0)
    raise _SkipEventError(f"hash_lookahead:up to {tokens} lookahead tokens per block")


def _removed(fields: dict[Any, Any], *, local: bool = True) -> BlockRemoved:
    hashes = _hashes(fields.get("block_hashes"), "BlockRemoved")
    medium = _medium(fields.get("medium"), "BlockRemoved")
    if local:
        _check_local(fields, "BlockRemoved")
    return BlockRemoved(block_hashes=hashes, medium=medium,
                        group=_group_idx(fields.get("group_idx"), "BlockRemoved"))


def _group_idx(raw: object, event: str) -> int:
    if raw is None:
        return 0
    if type(raw) is not int or not 0 <= raw <= MAX_GROUP:
        raise _SkipEventError(f"malformed_event:{event}.group_idx {_detail(raw)}")
    return raw


def _group_spec(fields: dict[Any, Any]) -> tuple[int, str | None, int]:
    """vLLM's KV-cache group of a store (0.20+), its kind and window in tokens (0.22+)."""
    group = _group_idx(fields.get("group_idx"), "BlockStored")
    kind = fields.get("kv_cache_spec_kind")
    if kind is not None and (type(kind) is not str or len(kind) > MAX_NAME_BYTES
                             or not kind.isprintable()):
        raise _SkipEventError(f"malformed_event:BlockStored.kv_cache_spec_kind {_detail(kind)}")
    window = fields.get("kv_cache_spec_sliding_window")
    if window is None:
        window = 0
    if type(window) is not int or not 0 <= window <= MAX_SLIDING_WINDOW:
        raise _SkipEventError(
            f"malformed_event:BlockStored.kv_cache_spec_sliding_window {_detail(window)}")
    if group == 0 and kind == "full_attention" and not window:
        # What every group-0 store of a plain model says: the default, left out so the
        # batch stays bus schema 1 (readable by indexers that predate groups).
        kind = None
    return group, kind or None, window


def _hashes(raw: object, event: str) -> list[int]:
    if type(raw) is not list:
        raise _SkipEventError(f"malformed_event:{event}.block_hashes is a {_kind(raw)}")
    if not raw:
        raise _SkipEventError(f"empty_event:{event}")
    if len(raw) > MAX_BLOCKS_PER_EVENT:
        raise EngineDecodeError(f"{event} with {len(raw)} blocks exceeds {MAX_BLOCKS_PER_EVENT}")
    if all(type(h) is int for h in raw):
        return [h & _U64 for h in raw]
    if all(type(h) is int or type(h) is bytes for h in raw):
        return [engine_hash_to_u64(h) for h in raw]
    raise _SkipEventError(f"malformed_event:{event}.block_hashes holds a non-int, non-bytes hash")


def _parent(raw: object) -> int | None:
    if raw is None:
        return None
    if type(raw) is int:
        return raw & _U64
    if type(raw) is bytes:
        return engine_hash_to_u64(raw)
    raise _SkipEventError(f"malformed_event:BlockStored.parent_block_hash is a {_kind(raw)}")


def canonical_medium(medium: str | None) -> str:
    """The bus name of an engine medium: "gpu", "cpu", "storage", else lower-cased as is."""
    if not medium:
        return "gpu"
    lowered = medium.lower()
    return MEDIUM_TIERS.get(lowered, lowered)


def _medium(raw: object, event: str) -> str:
    if raw is None or type(raw) is str:
        return canonical_medium(raw)
    raise _SkipEventError(f"malformed_event:{event}.medium is a {_kind(raw)}")


def _lora_name(name: object, lora_id: object) -> str | None:
    """The adapter name; before 0.14 only `lora_id` is sent, kept as `lora_id:<n>`."""
    if type(name) is str and name:
        return name
    if name is not None and type(name) is not str:
        raise _SkipEventError(f"malformed_event:BlockStored.lora_name is a {_kind(name)}")
    if lora_id is None:
        return None
    if type(lora_id) is not int:
        raise _SkipEventError(f"malformed_event:BlockStored.lora_id is a {_kind(lora_id)}")
    return f"lora_id:{lora_id}"


def _name(raw: object, field: str) -> str | None:
    """An optional name field (salt): a string, "" meaning none."""
    if raw is None or raw == "":
        return None
    if type(raw) is not str:
        raise _SkipEventError(f"malformed_event:{field} is a {_kind(raw)}")
    return raw


def _check_local(fields: dict[Any, Any], event: str) -> None:
    """Skip events about blocks this worker does not hold itself (see the module doc).
    The medium has been checked to be None or a string."""
    locality = fields.get("locality")
    if locality is not None:
        if type(locality) is not str:
            raise _SkipEventError(f"malformed_event:{event}.locality is a {_kind(locality)}")
        if locality.upper() != "LOCAL":
            raise _SkipEventError(f"remote_block:{event} locality {_detail(locality)}")
    medium = fields.get("medium")
    if medium is not None and medium.lower() in _SHARED_MEDIA:
        raise _SkipEventError(f"remote_block:{event} medium {medium.lower()}")


def _identity_keys(
    raw: object, n_blocks: int, lora_name: str | None, *, starts_sequence: bool
) -> tuple[str | None, list[bytes] | None]:
    """vLLM's per-block extra keys -> (cache salt, canonical extra key per block).

    Each entry is None or a tuple, in this order: the LoRA name (when the event names an
    adapter), (mm identifier, offset) pairs, the cache salt (first block of a sequence
    only), prompt-embedding digests (bytes). Anything else is unplaceable.
    """
    if raw is None:
        return None, None
    # Details name types and positions, never values: a salt may be in there.
    if type(raw) is not list:
        raise _SkipEventError(f"malformed_event:BlockStored.extra_keys is a {_kind(raw)}")
    if len(raw) != n_blocks:
        raise _SkipEventError(f"malformed_event:BlockStored.extra_keys has {len(raw)} entries "
                              f"for {n_blocks} blocks")
    salt: str | None = None
    out: list[bytes] = []
    for i, entry in enumerate(raw):
        if entry is None or entry == []:
            out.append(b"")
            continue
        if type(entry) is not list:
            raise _SkipEventError(f"malformed_event:BlockStored.extra_keys[{i}] is a "
                                  f"{_kind(entry)}")
        pos, n = 0, len(entry)
        if lora_name is not None:
            if entry[0] != lora_name:
                raise _SkipEventError(f"unplaceable_identity:extra_keys[{i}] does not start "
                                      "with the LoRA name")
            pos = 1
        mm: list[tuple[str, int]] = []
        while pos < n and _is_mm_pair(entry[pos]):
            mm.append((entry[pos][0], entry[pos][1]))
            pos += 1
        if pos < n and type(entry[pos]) is str:
            if i != 0 or not starts_sequence:
                raise _SkipEventError(f"unplaceable_identity:bare string in extra_keys[{i}] "
                                      "of a block that does not start a sequence")
            salt = entry[pos] or None
            pos += 1
        digests: list[bytes] = []
        while pos < n and type(entry[pos]) is bytes:
            digests.append(entry[pos])
            pos += 1
        if pos < n:
            raise _SkipEventError(f"unplaceable_identity:extra_keys[{i}][{pos}] is a "
                                  f"{_kind(entry[pos])} out of place")
        out.append(block_extra_key(mm, digests))
    return salt, out if any(out) else None


def _is_mm_pair(value: object) -> bool:
    """(mm identifier, offset in the block): vLLM's `("mm", id, offset)` without the tag."""
    return (type(value) is list and len(value) == 2 and type(value[0]) is str
            and type(value[1]) is int and _I64_MIN <= value[1] <= _I64_MAX)


def _kind(value: object) -> str:
    return type(value).__name__


def _detail(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."


# --- frames ---------------------------------------------------------------------------


def parse_live_frames(frames: Sequence[bytes]) -> tuple[int, bytes]:
    """A live PUB message `[topic, seq (8-byte big-endian), payload]` -> (seq, payload)."""
    if len(frames) != 3:
        raise EngineDecodeError(f"live message has {len(frames)} frames, expected 3")
    return _seq(frames[1]), frames[2]


def parse_replay_frames(frames: Sequence[bytes]) -> tuple[int, bytes] | None:
    """One replay answer as a DEALER receives it -> (seq, payload), or None at the end marker.

    Both forms start with the empty delimiter frame: `[b"", seq, payload]` (vLLM <= 0.25
    and SGLang) and `[b"", topic, seq, payload]` (vLLM >= 0.26). The end marker has the
    seq `END_MARKER_SEQ` and an empty payload.
    """
    if len(frames) not in (3, 4):
        raise EngineDecodeError(f"replay answer has {len(frames)} frames, expected 3 or 4")
    if len(frames[0]) != 0:
        raise EngineDecodeError("replay answer does not start with the empty delimiter frame")
    seq_frame, payload = frames[-2], frames[-1]
    if seq_frame == END_MARKER_SEQ:
        if len(payload) != 0:
            raise EngineDecodeError("replay end marker carries a payload")
        return None
    return _seq(seq_frame), payload


def encode_replay_request(start_seq: int) -> list[bytes]:
    """The frames a DEALER sends to ask for every buffered batch with seq >= start_seq."""
    if not 0 <= start_seq <= _U64:
        raise ValueError(f"start_seq {start_seq} is not an unsigned 64-bit int")
    return [b"", start_seq.to_bytes(8, "big")]


def _seq(frame: bytes) -> int:
    if len(frame) != 8:
        raise EngineDecodeError(f"seq frame has {len(frame)} bytes, expected 8")
    return int.from_bytes(frame, "big")
