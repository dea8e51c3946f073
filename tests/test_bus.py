"""The bus contract (kvcore.bus): encoding, validation, subjects, engine hashes."""

from __future__ import annotations

import contextlib
import re
from typing import Any

import msgspec
import pytest
import xxhash
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kvcore.bus import (
    MAX_BLOCKS_PER_EVENT,
    MAX_EVENTS_PER_BATCH,
    MAX_MESSAGE_BYTES,
    SCHEMA_VERSION,
    SUBJECT_PREFIX,
    TIERS,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    BusDecodeError,
    BusError,
    EventBatch,
    UnsupportedSchemaError,
    decode_batch,
    encode_batch,
    engine_hash_to_u64,
    escape_token,
    pack_tokens,
    parse_subject,
    schema_for,
    subject_for,
    tier_index,
    unescape_token,
    unpack_tokens,
    validate_batch,
)

U64_MAX = 2**64 - 1
NATS_TOKEN = re.compile(r"^[A-Za-z0-9_~-]+$")
fast = settings(max_examples=200, deadline=None)



def decode_or_bus_error(payload: bytes) -> None:
    """Decode; a BusError is fine, any other exception (but the known leaks) fails the test."""
    with contextlib.suppress(BusError):
        decode_batch(payload)


def full_stored() -> BlockStored:
    """A BlockStored with every field set to a non-default value."""
    return BlockStored(
        block_hashes=[0, 2**63, U64_MAX],
        parent_hash=12345,
        token_ids=pack_tokens(range(3 * 4)),
        block_size=4,
        medium="cpu",
        lora_name="sql-adapter",
        cache_salt="tenant-1",
        extra_keys=[b"", b"\x00\x01", b"mm"],
    )


def batch_of(*events: Any, **fields: Any) -> EventBatch:
    base: dict[str, Any] = {"schema": SCHEMA_VERSION, "model": "meta-llama/Llama-3.1-8B",
                            "worker_id": "10.0.0.5:8000", "epoch": 1_700_000_000, "seq": 7}
    base.update(fields)
    return EventBatch(events=list(events), **base)


def wire_dict(**overrides: Any) -> dict[str, Any]:
    """A valid batch as a plain msgpack-able dict (wire field names), with overrides."""
    doc: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "model": "m",
        "worker_id": "w",
        "epoch": 1,
        "seq": 0,
        "events": [{"type": "stored", "block_hashes": [1, 2], "token_ids": pack_tokens(range(4)),
                    "block_size": 2}],
    }
    doc.update(overrides)
    return doc


def stored_dict(**overrides: Any) -> bytes:
    """A batch whose single stored event has `overrides`, encoded."""
    event: dict[str, Any] = {"type": "stored", "block_hashes": [1, 2]}
    event.update(overrides)
    return msgspec.msgpack.encode(wire_dict(events=[event]))


def first_event(payload: bytes) -> Any:
    """Decode `payload` and return its first event (typed Any: tests know which kind it is)."""
    return decode_batch(payload).events[0]


def valid_payload() -> bytes:
    return encode_batch(batch_of(full_stored(), BlockRemoved([1, U64_MAX], medium="disk"),
                                 AllBlocksCleared(), BlockStored([5]), dp_rank=3, ts=1.5))


# --- round trip -----------------------------------------------------------------------

class TestRoundTrip:
    @pytest.mark.parametrize("event", [
        full_stored(),
        BlockStored(block_hashes=[9, 10]),  # offload: no tokens, block_size 0
        BlockStored(block_hashes=[]),
        BlockRemoved(block_hashes=[1, 2, U64_MAX]),
        BlockRemoved(block_hashes=[3], medium="cpu"),
        AllBlocksCleared(),
    ], ids=["stored-full", "stored-offload", "stored-empty", "removed", "removed-cpu",
            "cleared"])
    def test_each_event_type(self, event: Any) -> None:
        """Each event type (all fields set or defaulted) survives encode_batch/decode_batch."""
        batch = batch_of(event)
        decoded = decode_batch(encode_batch(batch))
        assert decoded == batch
        assert type(decoded.events[0]) is type(event)

    def test_mixed_batch_and_batch_fields(self) -> None:
        """A batch mixing all event types, with dp_rank and ts, round-trips in order."""
        payload = valid_payload()
        decoded = decode_batch(payload)
        assert decoded == msgspec.msgpack.Decoder(EventBatch).decode(payload)
        assert [type(e) for e in decoded.events] == [BlockStored, BlockRemoved, AllBlocksCleared,
                                                     BlockStored]
        assert (decoded.dp_rank, decoded.ts) == (3, 1.5)
        assert decode_batch(memoryview(payload)) == decoded

    def test_wire_names(self) -> None:
        """Events are tagged maps ("type": stored/removed/cleared) with defaults omitted."""
        raw = msgspec.msgpack.decode(encode_batch(batch_of(BlockStored([1]), BlockRemoved([2]),
                                                           AllBlocksCleared())))
        assert raw["events"] == [{"type": "stored", "block_hashes": [1]},
                                 {"type": "removed", "block_hashes": [2]}, {"type": "cleared"}]
        assert raw["schema"] == SCHEMA_VERSION
        assert "dp_rank" not in raw and "ts" not in raw

    @fast
    @given(tokens=st.lists(st.integers(0, 2**32 - 1), max_size=64))
    def test_pack_tokens_round_trip(self, tokens: list[int]) -> None:
        """pack_tokens writes 4 little-endian bytes per token and unpack_tokens inverts it."""
        packed = pack_tokens(tokens)
        assert packed == b"".join(t.to_bytes(4, "little") for t in tokens)
        assert unpack_tokens(packed) == tokens

    def test_unknown_fields_ignored(self) -> None:
        """Fields a newer writer adds (batch level and event level) are ignored by this reader."""
        doc = wire_dict(future_field={"x": [1, 2]}, another=b"\x00")
        doc["events"] = [
            {"type": "stored", "block_hashes": [1], "new_event_field": "v", "priority": 3.5},
            {"type": "removed", "block_hashes": [2], "reason": "evicted"},
            {"type": "cleared", "why": None},
        ]
        decoded = decode_batch(msgspec.msgpack.encode(doc))
        assert decoded == EventBatch(schema=SCHEMA_VERSION, model="m", worker_id="w", epoch=1,
                                     seq=0, events=[BlockStored([1]), BlockRemoved([2]),
                                                    AllBlocksCleared()])


# --- schema versions ------------------------------------------------------------------

class TestSchemaVersion:
    @pytest.mark.parametrize("version", [0, 3, 99])
    def test_unknown_version_same_shape(self, version: int) -> None:
        """A well-formed batch declaring another schema version raises UnsupportedSchemaError."""
        payload = encode_batch(batch_of(BlockRemoved([1]), schema=version))
        with pytest.raises(UnsupportedSchemaError) as info:
            decode_batch(payload)
        assert info.value.version == version
        assert not isinstance(info.value, BusDecodeError)
        assert isinstance(info.value, BusError)

    @pytest.mark.parametrize("doc", [
        {"schema": 3, "model": ["m"], "events": {"stored": 1}},
        {"schema": 3, "payload": b"\x00\x01"},
        {"schema": 3, "model": "m", "worker_id": "w", "epoch": 1, "seq": 0,
         "events": [{"type": "compacted", "ranges": [[1, 2]]}]},
    ], ids=["wrong-types", "other-fields", "new-event-type"])
    def test_unknown_version_incompatible_shape(self, doc: dict[str, Any]) -> None:
        """A schema-3 batch that this reader cannot decode still reports the version."""
        with pytest.raises(UnsupportedSchemaError) as info:
            decode_batch(msgspec.msgpack.encode(doc))
        assert info.value.version == 3

    def test_v1_and_v2_both_read(self) -> None:
        """Readers accept schema 1 (no group fields: one KV-cache group) and schema 2."""
        v1 = decode_batch(encode_batch(batch_of(BlockStored([1]), BlockRemoved([1]), schema=1)))
        assert v1.schema == 1 and v1.events == [BlockStored([1]), BlockRemoved([1])]
        hybrid = [BlockStored([1], group=1, group_kind="sliding_window", sliding_window=4096),
                  BlockRemoved([1], group=1)]
        v2 = decode_batch(encode_batch(batch_of(*hybrid, schema=2)))
        assert v2.schema == 2 and v2.events == hybrid

    def test_v1_payload_of_an_old_publisher_decodes(self) -> None:
        """The bytes a schema-1 publisher wrote (no group keys at all) decode to group 0."""
        doc = wire_dict()
        doc["schema"] = 1
        doc["events"] = [{"type": "stored", "block_hashes": [5]},
                         {"type": "removed", "block_hashes": [5]}]
        batch = decode_batch(msgspec.msgpack.encode(doc))
        assert [e.group for e in batch.events] == [0, 0]  # type: ignore[union-attr]

    def test_schema_for_writes_v1_unless_a_group_field_is_used(self) -> None:
        """A publisher writes schema 1 for plain models, so old readers keep reading them."""
        assert schema_for([BlockStored([1]), BlockRemoved([1]), AllBlocksCleared()]) == 1
        assert schema_for([BlockStored([1], group_kind="full_attention")]) == 2
        assert schema_for([BlockStored([1], sliding_window=8)]) == 2
        assert schema_for([BlockRemoved([1], group=1)]) == 2
        plain = encode_batch(batch_of(BlockStored([1]), schema=1))
        assert b"group" not in plain and b"sliding_window" not in plain

    def test_v1_batch_with_group_fields_is_refused(self) -> None:
        """A batch declaring schema 1 cannot carry what only schema 2 defines."""
        with pytest.raises(BusDecodeError, match="schema 1"):
            decode_batch(encode_batch(batch_of(BlockRemoved([1], group=2), schema=1)))

    @pytest.mark.parametrize("event", [
        BlockStored([1], group=64), BlockStored([1], group=-1), BlockRemoved([1], group=64),
        BlockStored([1], sliding_window=-1), BlockStored([1], sliding_window=(1 << 24) + 1),
        BlockStored([1], group_kind="k" * 257),
    ], ids=["group-64", "group-neg", "removed-group-64", "window-neg", "window-huge",
            "kind-long"])
    def test_group_fields_bounded(self, event: Any) -> None:
        """Group index < 64, window <= 2**24 tokens, kind a bounded name."""
        with pytest.raises(BusDecodeError):
            decode_batch(encode_batch(batch_of(event, schema=2)))

    @pytest.mark.parametrize("event", [
        BlockStored([1], pool=""), BlockRemoved([1], pool=""), AllBlocksCleared(pool=""),
        BlockStored([1], pool="p" * 257), BlockRemoved([1], pool="p" * 257),
        AllBlocksCleared(pool="p" * 257),
    ], ids=["stored-empty", "removed-empty", "cleared-empty", "stored-long", "removed-long",
            "cleared-long"])
    def test_pool_names_bounded(self, event: Any) -> None:
        """A pool is named by 1 to MAX_NAME_BYTES bytes on every event that can carry one."""
        with pytest.raises(BusDecodeError, match="pool"):
            decode_batch(encode_batch(batch_of(event, schema=2)))

    def test_v1_with_incompatible_shape_is_decode_error(self) -> None:
        """A schema-1 batch that does not decode is a BusDecodeError (not a version problem)."""
        with pytest.raises(BusDecodeError):
            decode_batch(msgspec.msgpack.encode({"schema": 1, "events": {"stored": 1}}))

    def test_missing_schema_is_decode_error(self) -> None:
        """A map without a schema field is a BusDecodeError."""
        doc = wire_dict()
        del doc["schema"]
        with pytest.raises(BusDecodeError, match="schema"):
            decode_batch(msgspec.msgpack.encode(doc))


# --- malformed payloads ---------------------------------------------------------------

class TestMalformed:
    def test_every_truncation(self) -> None:
        """Every strict prefix of a valid payload raises BusDecodeError, never another type."""
        payload = valid_payload()
        assert len(payload) > 50
        for n in range(len(payload)):
            with pytest.raises(BusDecodeError):
                decode_batch(payload[:n])
        decode_batch(payload)  # the whole payload is fine

    @fast
    @given(data=st.data())
    def test_corruption_only_raises_bus_errors(self, data: st.DataObject) -> None:
        """Flipping bytes of a valid payload either still decodes or raises a BusError."""
        payload = bytearray(valid_payload())
        for _ in range(data.draw(st.integers(1, 3))):
            i = data.draw(st.integers(0, len(payload) - 1))
            payload[i] = data.draw(st.integers(0, 255))
        decode_or_bus_error(bytes(payload))

    @fast
    @given(garbage=st.binary(max_size=64))
    def test_garbage_only_raises_bus_errors(self, garbage: bytes) -> None:
        """Arbitrary bytes raise a BusError subclass (mostly BusDecodeError), nothing else."""
        with pytest.raises(BusError):
            decode_batch(garbage)

    def test_not_a_map(self) -> None:
        """Valid msgpack that is not a map (array, int, nil) is a BusDecodeError."""
        for obj in ([1, "m", "w", 1, 0, []], 1, None, "schema"):
            with pytest.raises(BusDecodeError):
                decode_batch(msgspec.msgpack.encode(obj))

    @pytest.mark.parametrize(("overrides", "field"), [
        ({"seq": "3"}, "seq"),
        ({"epoch": 1.0}, "epoch"),
        ({"model": ["m"]}, "model"),
        ({"worker_id": 5}, "worker_id"),
        ({"events": "nope"}, "events"),
        ({"dp_rank": None}, "dp_rank"),
    ])
    def test_wrong_batch_field_types(self, overrides: dict[str, Any], field: str) -> None:
        """Batch fields of the wrong type raise BusDecodeError naming the field."""
        with pytest.raises(BusDecodeError, match=re.escape(field)):
            decode_batch(msgspec.msgpack.encode(wire_dict(**overrides)))

    @pytest.mark.parametrize(("overrides", "field"), [
        ({"block_hashes": [1.0, 2.0]}, "block_hashes"),
        ({"block_hashes": [2.0**64, 1]}, "block_hashes"),
        ({"block_hashes": ["1", 2]}, "block_hashes"),
        ({"block_hashes": 1}, "block_hashes"),
        ({"token_ids": [1, 2, 3, 4], "block_size": 2}, "token_ids"),
        ({"token_ids": "abcdabcd", "block_size": 1}, "token_ids"),
        ({"parent_hash": 1.5}, "parent_hash"),
        ({"extra_keys": ["aa", "bb"]}, "extra_keys"),
        ({"medium": 0}, "medium"),
    ])
    def test_wrong_event_field_types(self, overrides: dict[str, Any], field: str) -> None:
        """Event fields of the wrong type (float/str hash, list tokens) raise BusDecodeError."""
        with pytest.raises(BusDecodeError, match=re.escape(field)):
            decode_batch(stored_dict(**overrides))

    def test_unknown_event_tag(self) -> None:
        """An event with an unknown "type" tag in a schema-1 batch is a BusDecodeError."""
        with pytest.raises(BusDecodeError):
            decode_batch(msgspec.msgpack.encode(wire_dict(events=[{"type": "moved"}])))

    @pytest.mark.parametrize("event", [
        {"type": "stored", "block_hashes": [1, -1]},
        {"type": "stored", "block_hashes": [1], "parent_hash": -5},
        {"type": "removed", "block_hashes": [-(2**63)]},
    ])
    def test_negative_hash(self, event: dict[str, Any]) -> None:
        """A negative block or parent hash is rejected: hashes are unsigned 64-bit on the bus."""
        with pytest.raises(BusDecodeError, match="unsigned 64-bit"):
            decode_batch(msgspec.msgpack.encode(wire_dict(events=[event])))

    def test_hash_above_u64(self) -> None:
        """A hash > 2**64-1 cannot be encoded, and validate_batch rejects one built in memory."""
        assert first_event(stored_dict(block_hashes=[U64_MAX])).block_hashes == [U64_MAX]
        with pytest.raises(OverflowError):
            msgspec.msgpack.encode(wire_dict(events=[{"type": "removed", "block_hashes": [2**64]}]))
        for event in (BlockRemoved([1, 2**64]), BlockStored([2**64]),
                      BlockStored([1], parent_hash=2**64)):
            with pytest.raises(BusDecodeError, match="unsigned 64-bit"):
                validate_batch(batch_of(event))

    @pytest.mark.parametrize(("n_bytes", "n_blocks", "block_size"), [
        (12, 2, 2), (20, 2, 2), (4, 1, 16), (64, 2, 16), (3, 1, 1)])
    def test_token_bytes_mismatch(self, n_bytes: int, n_blocks: int, block_size: int) -> None:
        """token_ids not n_blocks*block_size*4 bytes long raise BusDecodeError naming the counts."""
        payload = stored_dict(block_hashes=list(range(1, n_blocks + 1)),
                              token_ids=b"\x01" * n_bytes, block_size=block_size)
        need = n_blocks * block_size * 4
        msg = (f"token_ids hold {n_bytes} bytes; {n_blocks} blocks of {block_size} u32 tokens "
               f"need {need}")
        with pytest.raises(BusDecodeError, match=re.escape(msg)):
            decode_batch(payload)

    def test_tokens_without_blocks(self) -> None:
        """Tokens with no block hashes are a mismatch (0 blocks need 0 bytes)."""
        with pytest.raises(BusDecodeError, match="0 blocks"):
            decode_batch(stored_dict(block_hashes=[], token_ids=b"\x00" * 8, block_size=2))

    @pytest.mark.parametrize("block_size", [0, -4])
    def test_tokens_need_block_size(self, block_size: int) -> None:
        """token_ids with block_size <= 0 raise BusDecodeError; without tokens it is an offload."""
        with pytest.raises(BusDecodeError, match="block_size"):
            decode_batch(stored_dict(token_ids=b"\x00" * 8, block_size=block_size))
        assert first_event(stored_dict(block_size=block_size)).token_ids == b""

    @pytest.mark.parametrize("extra", [[], [b""], [b"a", b"b", b"c"]])
    def test_extra_keys_count_mismatch(self, extra: list[bytes]) -> None:
        """extra_keys with an entry count other than the number of blocks raises BusDecodeError."""
        with pytest.raises(BusDecodeError, match=f"extra_keys has {len(extra)} entries for 2"):
            decode_batch(stored_dict(extra_keys=extra))
        assert first_event(stored_dict(extra_keys=[b"", b"x"])).extra_keys == [b"", b"x"]

    @pytest.mark.parametrize(("field", "msg"), [("model", "empty model"),
                                                ("worker_id", "empty worker_id")])
    def test_empty_identity(self, field: str, msg: str) -> None:
        """An empty model or worker_id raises BusDecodeError."""
        with pytest.raises(BusDecodeError, match=msg):
            decode_batch(msgspec.msgpack.encode(wire_dict(**{field: ""})))

    @pytest.mark.parametrize("field", ["seq", "epoch", "dp_rank"])
    def test_negative_counters(self, field: str) -> None:
        """A negative seq, epoch or dp_rank raises BusDecodeError."""
        with pytest.raises(BusDecodeError, match=">= 0"):
            decode_batch(msgspec.msgpack.encode(wire_dict(**{field: -1})))


class TestOnlyBusErrors:
    """decode_batch raises only BusError subclasses, whatever the bytes."""

    @pytest.mark.parametrize("field", ["model", "worker_id", "schema"])
    def test_invalid_utf8_is_decode_error(self, field: str) -> None:
        """Invalid UTF-8 in a string field raises BusDecodeError, not UnicodeDecodeError."""
        payload = msgspec.msgpack.encode(wire_dict(**{field: "\x00"}))
        payload = payload.replace(b"\xa1\x00", b"\xa1\x80")  # fixstr(1) "\x00" -> byte 0x80
        with pytest.raises(BusDecodeError):
            decode_batch(payload)

    def test_deep_nesting_is_decode_error(self) -> None:
        """An unknown field nested ~1000 deep (a 1 KB payload) raises BusDecodeError."""
        valid = msgspec.msgpack.encode(wire_dict())
        assert valid[0] == 0x86  # fixmap with 6 entries: add a 7th, unknown and deep
        payload = bytes([0x87]) + valid[1:] + b"\xa3foo" + b"\x91" * 1000 + b"\x01"
        assert len(payload) < 1200
        with pytest.raises(BusDecodeError):
            decode_batch(payload)


class TestLimits:
    def test_message_too_big(self) -> None:
        """A payload over MAX_MESSAGE_BYTES is rejected by size, before decoding."""
        block_size = 32_768
        n_blocks = MAX_MESSAGE_BYTES // (block_size * 4) + 1
        tokens = bytes(n_blocks * block_size * 4)
        big = batch_of(BlockStored(list(range(n_blocks)), token_ids=tokens, block_size=block_size))
        payload = encode_batch(big)
        assert len(payload) > MAX_MESSAGE_BYTES
        with pytest.raises(BusDecodeError, match=f"{len(payload)} bytes exceeds"):
            decode_batch(payload)
        with pytest.raises(BusDecodeError, match="exceeds"):
            decode_batch(memoryview(payload))

    def test_message_at_limit_is_decoded(self) -> None:
        """A payload of exactly MAX_MESSAGE_BYTES is decoded (it fails as msgpack, not by size)."""
        with pytest.raises(BusDecodeError) as info:
            decode_batch(b"\xc0" * MAX_MESSAGE_BYTES)
        assert "exceeds" not in str(info.value)

    def test_too_many_events(self) -> None:
        """More than MAX_EVENTS_PER_BATCH events raise BusDecodeError; exactly the limit is fine."""
        at_limit = encode_batch(batch_of(*[AllBlocksCleared()] * MAX_EVENTS_PER_BATCH))
        assert len(decode_batch(at_limit).events) == MAX_EVENTS_PER_BATCH
        over = encode_batch(batch_of(*[AllBlocksCleared()] * (MAX_EVENTS_PER_BATCH + 1)))
        with pytest.raises(BusDecodeError, match=f"{MAX_EVENTS_PER_BATCH + 1} events exceed"):
            decode_batch(over)

    @pytest.mark.parametrize("kind", [BlockStored, BlockRemoved])
    def test_too_many_blocks(self, kind: Any) -> None:
        """More than MAX_BLOCKS_PER_EVENT hashes in one event raise; exactly the limit is fine."""
        ok = encode_batch(batch_of(kind(list(range(MAX_BLOCKS_PER_EVENT)))))
        assert len(first_event(ok).block_hashes) == MAX_BLOCKS_PER_EVENT
        over = encode_batch(batch_of(kind(list(range(MAX_BLOCKS_PER_EVENT + 1)))))
        with pytest.raises(BusDecodeError, match=f"{MAX_BLOCKS_PER_EVENT + 1} blocks exceed"):
            decode_batch(over)


    @pytest.mark.parametrize(("model", "worker_id", "bad"), [
        ("m" * 256, "w", None), ("m" * 257, "w", "model of 257 bytes"),
        ("m", "é" * 128, None), ("m", "é" * 129, "worker_id of 258 bytes"),
        ("m" * 200, "w" * 200, None),  # past the short-name test, each name within the limit
    ])
    def test_identity_name_bytes(self, model: str, worker_id: str, bad: str | None) -> None:
        """model and worker_id are bounded in UTF-8 bytes, each on its own, at the limit."""
        batch = batch_of(BlockStored([1]), model=model, worker_id=worker_id)
        if bad is None:
            validate_batch(batch)
        else:
            with pytest.raises(BusDecodeError, match=bad):
                validate_batch(batch)

    def test_tier_index_ignores_case(self) -> None:
        """A medium names its tier in any case; an unknown one is "other"."""
        names = ("gpu", "GPU", "Cpu_Pinned", "tape")
        assert [TIERS[tier_index(m)] for m in names] == ["gpu", "gpu", "cpu", "other"]


# --- subjects -------------------------------------------------------------------------

MODELS = ["meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-7B-Instruct", "deepseek-ai/DeepSeek-V3.1",
          "my.model*v2>", "org/模型 名", "~", "", "a~2Eb"]
WORKERS = ["10.0.0.5:8000", "[fe80::1]:8000", "worker-0", "pod.ns.svc.cluster.local:9000", "~7E"]


class TestSubjects:
    @fast
    @given(text=st.text())
    def test_escape_round_trip(self, text: str) -> None:
        """unescape_token(escape_token(s)) == s for arbitrary text."""
        assert unescape_token(escape_token(text)) == text

    @fast
    @given(text=st.text())
    def test_escaped_is_valid_nats_token(self, text: str) -> None:
        """Escaped tokens use only [A-Za-z0-9_~-]: no '.', '*', '>' or whitespace, never empty."""
        assert NATS_TOKEN.fullmatch(escape_token(text))

    @fast
    @given(a=st.text(max_size=6), b=st.text(max_size=6))
    def test_escape_injective(self, a: str, b: str) -> None:
        """Different strings never escape to the same token."""
        assume(a != b)
        assert escape_token(a) != escape_token(b)

    def test_escape_injective_on_tricky_sample(self) -> None:
        """Strings that look like each other's escapes stay distinct ('~', '~7E', '.', '~2E')."""
        sample = ["", "~", "~~", "~7E", "~7e", ".", "~2E", "a.b", "a~2Eb", "a_b", "a-b", " ",
                  "~20", "*", ">", "\t", "é", "~C3~A9", "\x00", "0"]
        escaped = [escape_token(s) for s in sample]
        assert len(set(escaped)) == len(sample)
        assert escape_token("") == "~"
        assert escape_token("a.b") == "a~2Eb"
        assert escape_token("Llama-3_1") == "Llama-3_1"

    @pytest.mark.parametrize("model", MODELS)
    @pytest.mark.parametrize("worker", WORKERS)
    def test_subject_round_trip(self, model: str, worker: str) -> None:
        """parse_subject(subject_for(m, w)) == (m, w); the subject has exactly 4 safe tokens."""
        subject = subject_for(model, worker)
        assert parse_subject(subject) == (model, worker)
        tokens = subject.split(".")
        assert tokens[:2] == SUBJECT_PREFIX.split(".")
        assert len(tokens) == 4
        assert all(NATS_TOKEN.fullmatch(t) for t in tokens[2:])

    @fast
    @given(model=st.text(), worker=st.text())
    def test_subject_round_trip_arbitrary(self, model: str, worker: str) -> None:
        """parse_subject inverts subject_for for arbitrary model and worker strings."""
        assert parse_subject(subject_for(model, worker)) == (model, worker)

    @pytest.mark.parametrize("subject", ["kv.events.m", "kv.events.m.w.x", "other.m.w",
                                         "kv.eventsX.m.w", "kv.deadletter"])
    def test_parse_subject_rejects(self, subject: str) -> None:
        """Subjects outside kv.events.<model>.<worker> raise ValueError."""
        with pytest.raises(ValueError, match="not a KV event subject"):
            parse_subject(subject)

    def test_bad_escape_rejected(self) -> None:
        """A '~' not followed by hex raises ValueError."""
        with pytest.raises(ValueError, match="bad escape"):
            unescape_token("a~zz")


# --- engine hashes --------------------------------------------------------------------

class TestEngineHash:
    @pytest.mark.parametrize(("value", "expected"), [
        (-1, U64_MAX), (-2, U64_MAX - 1), (-(2**63), 2**63), (-(2**63) + 1, 2**63 + 1)])
    def test_negative_is_twos_complement(self, value: int, expected: int) -> None:
        """Negative ints map to their 64-bit two's complement."""
        assert engine_hash_to_u64(value) == expected

    @pytest.mark.parametrize("value", [0, 1, 2**32, 2**63 - 1, 2**63, U64_MAX])
    def test_u64_unchanged(self, value: int) -> None:
        """Ints already in 0..2**64-1 are returned unchanged."""
        assert engine_hash_to_u64(value) == value

    @fast
    @given(value=st.integers(0, U64_MAX))
    def test_signed_and_unsigned_agree(self, value: int) -> None:
        """The signed (int64) and unsigned spellings of one 64-bit value give the same u64."""
        signed = value - 2**64 if value >= 2**63 else value
        assert engine_hash_to_u64(signed) == engine_hash_to_u64(value) == value

    def test_bytes_hashed_deterministically(self) -> None:
        """Digest bytes map to xxh3_64 of the bytes: stable, in u64, distinct for distinct bytes."""
        digest = bytes(range(32))
        h = engine_hash_to_u64(digest)
        assert h == engine_hash_to_u64(bytes(range(32))) == xxhash.xxh3_64_intdigest(digest)
        assert 0 <= h <= U64_MAX
        assert engine_hash_to_u64(b"") == xxhash.xxh3_64_intdigest(b"")
        assert engine_hash_to_u64(b"\x00" * 32) != h
        assert engine_hash_to_u64(b"\x01") != engine_hash_to_u64(1)


class TestStrictUnescape:
    """Only tokens that escape_token produces are accepted back."""

    @pytest.mark.parametrize("token", ["~2e", "a~4", "~+F", "a.b", "a b", "~C3"])
    def test_rejects_foreign_spellings(self, token: str) -> None:
        """Lower-case hex, cut-off escapes, unsafe characters and broken UTF-8 raise ValueError."""
        with pytest.raises(ValueError):
            unescape_token(token)


class TestLivenessKeys:
    """Worker registry keys are valid JetStream KV keys and map back to (model, worker)."""

    @given(model=st.text(min_size=1, max_size=30), worker=st.text(min_size=1, max_size=30))
    @settings(max_examples=200, deadline=None)
    def test_round_trip_and_valid(self, model: str, worker: str) -> None:
        """Any model and worker id give a key of KV-legal characters that parses back."""
        from kvcore.topology import liveness_key, parse_liveness_key

        key = liveness_key(model, worker)
        assert re.fullmatch(r"[-/_=.A-Za-z0-9]+", key)
        assert parse_liveness_key(key) == (model, worker)
