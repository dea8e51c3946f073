"""Engine wire forms -> bus events: every vLLM release (0.9 to 0.33) and SGLang.

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
    MEDIUM_TIERS,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Event,
    engine_hash_to_u64,
    pack_tokens,
)

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
    }
)

_U64: Final = 0xFFFF_FFFF_FFFF_FFFF
_MAX_DETAIL: Final = 64

# Positional field names after the tag. vLLM appends newer fields at the end (group_idx,
# kv_cache_spec_*: ignored); SGLang's layout is shared up to `medium` only.
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
    ),
    "sglang": ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium"),
}
_REMOVED_FIELDS: Final = ("block_hashes", "medium")

_decoder: Final = msgspec.msgpack.Decoder()
_encoder: Final = msgspec.msgpack.Encoder()


class EngineDecodeError(Exception):
    """The frames or payload are not an engine KV event batch; the message says why."""


class EngineBatch(msgspec.Struct, kw_only=True):
    """The usable bus events of one engine batch, and why the others were left out."""

    ts: float
    events: list[Event]
    dp_rank: int | None = None
    skipped: list[str] = msgspec.field(default_factory=list)


class _SkipEventError(Exception):
    """Internal: this event cannot be used; args[0] is the skip reason."""


# --- payload --------------------------------------------------------------------------


def decode_engine_payload(
    payload: bytes | bytearray | memoryview, *, flavor: Flavor = "vllm"
) -> EngineBatch:
    """Decode one engine batch (msgpack) into bus events; raise EngineDecodeError if it is none."""
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
    for raw in raw_events:
        try:
            events.append(_decode_event(raw, stored_fields))
        except _SkipEventError as skip:
            skipped.append(str(skip.args[0]))
    return EngineBatch(ts=ts, events=events, dp_rank=dp_rank, skipped=skipped)


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


def _decode_event(raw: object, stored_fields: tuple[str, ...]) -> Event:
    if type(raw) is dict:
        return _event_from_fields(raw.get("type"), raw)
    if type(raw) is list and raw:
        tag = raw[0]
        names = (
            stored_fields
            if tag == "BlockStored"
            else _REMOVED_FIELDS
            if tag == "BlockRemoved"
            else ()
        )
        # Positional fields by name; missing trailing fields stay absent, extra ones ignored.
        return _event_from_fields(tag, dict(zip(names, raw[1:], strict=False)))
    raise _SkipEventError(f"malformed_event:event is a {_kind(raw)}")


def _event_from_fields(tag: object, fields: dict[Any, Any]) -> Event:
    if tag == "BlockStored":
        return _stored(fields)
    if tag == "BlockRemoved":
        return _removed(fields)
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    if type(tag) is str:
        raise _SkipEventError(f"unknown_event_type:{tag[:_MAX_DETAIL]}")
    raise _SkipEventError(f"malformed_event:event tag {_detail(tag)}")


def _stored(fields: dict[Any, Any]) -> BlockStored:
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
    return BlockStored(
        block_hashes=hashes,
        parent_hash=_parent(fields.get("parent_block_hash")),
        token_ids=packed,
        block_size=block_size,
        medium=_medium(fields.get("medium"), "BlockStored"),
        lora_name=(lora := _lora_name(fields.get("lora_name"), fields.get("lora_id"))),
        extra_keys=_extra_keys(fields.get("extra_keys"), len(hashes), lora),
    )


def _removed(fields: dict[Any, Any]) -> BlockRemoved:
    return BlockRemoved(
        block_hashes=_hashes(fields.get("block_hashes"), "BlockRemoved"),
        medium=_medium(fields.get("medium"), "BlockRemoved"),
    )


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


def _extra_keys(raw: object, n_blocks: int, lora_name: str | None) -> list[bytes] | None:
    """Per block: msgpack of the block's extra-key tuple, b"" for none; None when all are none.

    vLLM puts the LoRA name into every block's extra keys; block keys already root in the
    LoRA name (so routers can match adapter prompts by tokens), so it is left out here.
    """
    if raw is None:
        return None
    if type(raw) is not list or len(raw) != n_blocks:
        raise _SkipEventError(
            f"malformed_event:BlockStored.extra_keys {_detail(raw)} for {n_blocks} blocks"
        )
    out: list[bytes] = []
    for entry in raw:
        kept = entry
        if isinstance(entry, list | tuple) and lora_name is not None:
            kept = [key for key in entry if key != lora_name]
        out.append(b"" if kept is None or kept == [] else _encoder.encode(kept))
    return out if any(out) else None


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
