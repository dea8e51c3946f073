"""Engine wire forms -> bus events (publisher.engines): recorded frames per release, bad input."""

from __future__ import annotations

import contextlib
import importlib.util
import struct
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcore.bus import (
    MAX_BLOCKS_PER_EVENT,
    MAX_EVENTS_PER_BATCH,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Event,
)
from publisher.engines import (
    END_MARKER_SEQ,
    MAX_ENGINE_PAYLOAD_BYTES,
    SKIP_REASONS,
    EngineBatch,
    EngineDecodeError,
    canonical_medium,
    decode_engine_payload,
    encode_replay_request,
    parse_live_frames,
    parse_replay_frames,
)

FRAMES = Path(__file__).resolve().parent / "fixtures" / "engine_frames"
TS = 1_763_800_000.25
U64_MAX = 2**64 - 1
fast = settings(max_examples=300, deadline=None)

# The fixtures' hashes folded into u64 (see make_frames.py for the engine spellings).
S0, S1, S2 = 2**64 - 4_611_686_018_427_387_904, 1_234_567_890_123, U64_MAX  # signed ints
U0, U1, U2 = U64_MAX, 2**63, 42  # unsigned ints
D0, D1, D2 = (xxhash.xxh3_64_intdigest(bytes([i]) * 32) for i in (1, 2, 3))  # digests


def toks(*ids: int) -> bytes:
    """Token ids as the bus packs them: little-endian u32."""
    return struct.pack(f"<{len(ids)}I", *ids)


def load(name: str) -> bytes:
    return (FRAMES / f"{name}.bin").read_bytes()


def batch(*items: Any, ts: float = 0.0, dp_rank: int | None = 0) -> bytes:
    """A hand-built engine batch [ts, events, dp_rank] (events as plain lists/dicts)."""
    return msgspec.msgpack.encode([ts, list(items), dp_rank])


def one_event(event: Any, *, flavor: Any = "vllm") -> EngineBatch:
    return decode_engine_payload(batch(event), flavor=flavor)


def make_frames_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_frames", FRAMES / "make_frames.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# fixture name -> (flavor, dp_rank, events, skipped)
EXPECTED: dict[str, tuple[str, int | None, list[Event], list[str]]] = {
    "vllm_0_9_0": (
        "vllm",
        None,
        [
            BlockStored([S0, S1], None, toks(1, 2, 3, 4, 5, 6, 7, 8), 4),
            BlockStored([S2], S1, toks(9, 10, 11, 12), 4),
            BlockRemoved([S0]),
            AllBlocksCleared(),
        ],
        [],
    ),
    "vllm_0_9_1": (
        "vllm",
        1,
        [
            BlockStored([S0], None, toks(1, 2, 3, 4), 4, lora_name="lora_id:7"),
            BlockRemoved([S1, S2]),
        ],
        [],
    ),
    "vllm_0_10_0_signed": (
        "vllm",
        0,
        [BlockStored([S0, S1, S2], None, toks(*range(100, 112)), 4)],
        [],
    ),
    "vllm_0_10_2_unsigned": (
        "vllm",
        0,
        [
            BlockStored([U0, U1], None, toks(*range(8)), 4),
            BlockStored([U2], U1, toks(8, 9, 10, 11), 4),
            BlockRemoved([U0]),
        ],
        [],
    ),
    "vllm_0_10_2_bytes": (
        "vllm",
        0,
        [BlockStored([D1, D2], D0, toks(*range(8)), 4), BlockRemoved([D2])],
        [],
    ),
    "vllm_0_14_lora_name": (
        "vllm",
        0,
        [
            BlockStored([U0], None, toks(5, 6, 7, 8), 4, lora_name="sql-adapter"),
            BlockStored([U1], None, toks(5, 6, 7, 8), 4),
        ],
        [],
    ),
    "vllm_0_17_extra_keys": (
        "vllm",
        0,
        [
            BlockStored(
                [U0, U1, U2],
                None,
                toks(*range(12)),
                4,
                extra_keys=[
                    b"\x92\xacmm-hash-a1b2\x00",  # ["mm-hash-a1b2", 0]
                    b"",  # None
                    b"\x93\xc4\x02\x00\xff\xa4salt\xfb",  # [b"\x00\xff", "salt", -5]
                ],
            ),
            BlockStored([U0], None, toks(1, 2, 3, 4), 4),  # [None]: no extras at all
        ],
        [],
    ),
    "vllm_0_20_offload_positional": (
        "vllm",
        0,
        [
            BlockStored([U0], medium="cpu"),
            BlockStored([U0], medium="storage"),
            BlockStored([U1], medium="storage"),
            BlockRemoved([U0], medium="storage"),
        ],
        [],
    ),
    "vllm_0_22_hybrid": (
        "vllm",
        0,
        [BlockStored([U0], None, toks(1, 2, 3, 4), 4), BlockRemoved([U0])],
        [],
    ),
    "vllm_0_24_map": (
        "vllm",
        0,
        [
            BlockStored([U0, U1], None, toks(*range(8)), 4),
            BlockStored([U2], U1, toks(8, 9, 10, 11), 4),
            BlockRemoved([U0]),
            AllBlocksCleared(),
        ],
        [],
    ),
    "vllm_0_24_unknown_event": (
        "vllm",
        0,
        [BlockRemoved([U0])],
        ["unknown_event_type:BlockPinned"],
    ),
    "vllm_0_26_map_locality": (
        "vllm",
        3,
        [BlockStored([U0], None, toks(1, 2, 3, 4), 4)],
        [],
    ),
    "vllm_0_28_offload": (
        "vllm",
        0,
        [
            BlockStored([U0, U1], None, toks(*range(8)), 4),
            BlockStored([U0, U1], medium="cpu"),
            BlockStored([U0], medium="storage"),
            BlockRemoved([U1], medium="cpu"),
        ],
        [],
    ),
    "vllm_0_33_lookahead": (
        "vllm",
        0,
        [
            BlockStored(
                [U0],
                U2,
                toks(1, 2, 3, 4),
                4,
                lora_name="chat-adapter",
                extra_keys=[b"\x91\xa6img-9f"],
            ),
            BlockRemoved([U0]),
        ],
        [],
    ),
    "sglang": (
        "sglang",
        2,
        [
            BlockStored([11, 2**64 - 12], None, toks(1, 2, 3, 4, 5, 6, 7, 8), 4),
            BlockStored([13], 2**64 - 12, toks(9, 10, 11, 12), 4),
            BlockStored([11], medium="cpu"),
            BlockStored([11], medium="storage"),
            BlockStored([13], medium="storage"),
            BlockRemoved([11], medium="cpu"),
            BlockRemoved([13]),
        ],
        [],
    ),
}


class TestRecordedFrames:
    @pytest.mark.parametrize("name", sorted(EXPECTED))
    def test_fixture_decodes_to_exact_bus_events(self, name: str) -> None:
        """Each recorded release payload decodes to exactly the hand-written bus events."""
        flavor, dp_rank, events, skipped = EXPECTED[name]
        decoded = decode_engine_payload(load(name), flavor=flavor)  # type: ignore[arg-type]
        assert decoded == EngineBatch(ts=TS, events=events, dp_rank=dp_rank, skipped=skipped)

    def test_every_fixture_file_is_checked(self) -> None:
        """Every committed .bin has expectations here (no fixture goes untested)."""
        assert {p.stem for p in FRAMES.glob("*.bin")} == set(EXPECTED)

    def test_fixtures_match_their_generator(self) -> None:
        """make_frames.py reproduces the committed bytes exactly."""
        module = make_frames_module()
        for name, make in module.FIXTURES.items():
            assert make() == load(name), name

    def test_memoryview_and_bytearray(self) -> None:
        """Payloads given as memoryview or bytearray decode like bytes."""
        payload = load("vllm_0_24_map")
        expected = decode_engine_payload(payload)
        assert decode_engine_payload(memoryview(payload)) == expected
        assert decode_engine_payload(bytearray(payload)) == expected

    def test_sglang_flavor_decodes_vllm_positional_prefix(self) -> None:
        """The sglang flavor reads vLLM positional events up to medium and ignores the rest."""
        decoded = decode_engine_payload(load("vllm_0_14_lora_name"), flavor="sglang")
        assert decoded.events == [
            BlockStored([U0], None, toks(5, 6, 7, 8), 4, lora_name="lora_id:3"),
            BlockStored([U1], None, toks(5, 6, 7, 8), 4),
        ]


class TestPositionalEvents:
    def test_trailing_fields_dropped(self) -> None:
        """Arrays cut after any field decode with the defaults for the missing ones."""
        assert one_event(["BlockStored", [1]]).events == [BlockStored([1])]
        assert one_event(["BlockStored", [1], 5]).events == [BlockStored([1], 5)]
        assert one_event(["BlockRemoved", [1]]).events == [BlockRemoved([1])]
        assert one_event(["BlockStored", [1], None, [1, 2], 2]).events == [
            BlockStored([1], None, toks(1, 2), 2)
        ]

    def test_extra_trailing_fields_ignored(self) -> None:
        """Fields after the known ones (newer releases) are ignored."""
        event = ["BlockStored", [1], None, [1, 2], 2, None, "GPU", None, None, 0, "full", None]
        assert one_event([*event, "future", [1, 2, 3]]).events == [
            BlockStored([1], None, toks(1, 2), 2)
        ]
        removed = ["BlockRemoved", [1], "CPU", 0, "future"]
        assert one_event(removed).events == [BlockRemoved([1], medium="cpu")]
        assert one_event(["AllBlocksCleared", "future"]).events == [AllBlocksCleared()]

    def test_sglang_ignores_fields_after_medium(self) -> None:
        """SGLang shares the layout up to medium only: later fields are not read as lora/extras."""
        event = ["BlockStored", [1], None, [1, 2], 2, None, "GPU", "not-a-lora", "x"]
        assert one_event(event, flavor="sglang").events == [BlockStored([1], None, toks(1, 2), 2)]
        assert one_event(event).skipped == [
            "malformed_event:BlockStored.extra_keys 'x' for 1 blocks"
        ]


class TestMapEvents:
    def test_defaults_and_unknown_fields(self) -> None:
        """Omitted fields take their defaults; unknown fields are ignored."""
        event = {"type": "BlockStored", "block_hashes": [7], "future": {"a": [1]}, "x": None}
        assert one_event(event).events == [BlockStored([7])]
        assert one_event({"type": "BlockRemoved", "block_hashes": [7], "group_idx": 3}).events == [
            BlockRemoved([7])
        ]
        assert one_event({"type": "AllBlocksCleared", "medium": "GPU"}).events == [
            AllBlocksCleared()
        ]

    def test_lora_name_wins_over_lora_id(self) -> None:
        """lora_name is used when given; lora_id alone becomes `lora_id:<n>`; neither is None."""
        base = {"type": "BlockStored", "block_hashes": [7]}
        assert one_event({**base, "lora_id": 3, "lora_name": "a"}).events[0] == BlockStored(
            [7], lora_name="a"
        )
        assert one_event({**base, "lora_id": 3}).events[0] == BlockStored(
            [7], lora_name="lora_id:3"
        )
        assert one_event({**base, "lora_id": None, "lora_name": ""}).events[0] == BlockStored([7])

    def test_signed_and_unsigned_spellings_agree(self) -> None:
        """A hash sent as a negative int and as its unsigned value is the same bus hash."""
        signed = one_event({"type": "BlockRemoved", "block_hashes": [-(2**63), -1]})
        unsigned = one_event({"type": "BlockRemoved", "block_hashes": [2**63, U64_MAX]})
        assert signed.events == unsigned.events == [BlockRemoved([2**63, U64_MAX])]

    def test_mixed_int_and_bytes_hashes(self) -> None:
        """A list mixing int and bytes hashes folds each one on its own."""
        event = {"type": "BlockRemoved", "block_hashes": [-1, b"\x01" * 32]}
        assert one_event(event).events == [BlockRemoved([U64_MAX, D0])]

    def test_offload_store_without_tokens(self) -> None:
        """An offload store (no tokens, block_size 0, no parent) keeps its block size and tier."""
        event = {"type": "BlockStored", "block_hashes": [1, 2], "parent_block_hash": None}
        for medium, tier in (("CPU", "cpu"), ("STORAGE", "storage"), ("OBJ", "storage")):
            stored = one_event({**event, "token_ids": [], "block_size": 0, "medium": medium})
            assert stored.events == [BlockStored([1, 2], medium=tier)]
        tokenless_sized = one_event({**event, "token_ids": [], "block_size": 16})
        assert tokenless_sized.events == [BlockStored([1, 2], block_size=16)]


class TestMedia:
    @pytest.mark.parametrize(
        ("medium", "canonical"),
        [
            (None, "gpu"),
            ("", "gpu"),
            ("GPU", "gpu"),
            ("gpu", "gpu"),
            ("CUDA", "gpu"),
            ("CPU", "cpu"),
            ("CPU_PINNED", "cpu"),
            ("STORAGE", "storage"),
            ("FS", "storage"),
            ("OBJ", "storage"),
            ("DISK", "storage"),
            ("EXTERNAL", "storage"),
            ("NVMe-oF", "nvme-of"),
        ],
    )
    def test_canonical_names(self, medium: str | None, canonical: str) -> None:
        """Engine media map to the bus names; unknown media are lower-cased as is."""
        assert canonical_medium(medium) == canonical
        assert one_event(["BlockRemoved", [1], medium]).events == [BlockRemoved([1], canonical)]


class TestExtraKeys:
    def test_canonical_bytes_per_block(self) -> None:
        """Each block's extras become the msgpack of its tuple; none is b""."""
        event = {
            "type": "BlockStored",
            "block_hashes": [1, 2, 3],
            "token_ids": [1, 2, 3],
            "block_size": 1,
            "extra_keys": [["a", 1], None, [b"\x00"]],
        }
        stored = one_event(event).events[0]
        assert isinstance(stored, BlockStored)
        assert stored.extra_keys == [
            msgspec.msgpack.encode(("a", 1)),
            b"",
            msgspec.msgpack.encode((b"\x00",)),
        ]

    def test_no_extras_is_none(self) -> None:
        """All-None (or empty) per-block extras collapse to extra_keys=None."""
        event = {"type": "BlockStored", "block_hashes": [1, 2], "extra_keys": [None, []]}
        assert one_event(event).events == [BlockStored([1, 2])]

    def test_wrong_length_skipped(self) -> None:
        """extra_keys with a different length than block_hashes skip the event."""
        event = {"type": "BlockStored", "block_hashes": [1, 2], "extra_keys": [["a"]]}
        decoded = one_event(event)
        assert decoded.events == []
        assert decoded.skipped[0].startswith("malformed_event:BlockStored.extra_keys")


class TestSkippedEvents:
    def test_unknown_type_skipped_others_kept(self) -> None:
        """Unknown event types (positional or map) are skipped with a reason; the rest decode."""
        decoded = decode_engine_payload(
            batch(
                ["BlockPinned", [1]],
                {"type": "KVCacheCompacted", "ranges": [[1, 2]]},
                ["BlockRemoved", [1]],
            )
        )
        assert decoded.events == [BlockRemoved([1])]
        assert decoded.skipped == [
            "unknown_event_type:BlockPinned",
            "unknown_event_type:KVCacheCompacted",
        ]

    def test_token_count_mismatch(self) -> None:
        """block_size * n_blocks != len(token_ids) skips the store with token_count_mismatch."""
        decoded = one_event(["BlockStored", [1, 2], None, [1, 2, 3], 2, None, "GPU"])
        assert decoded.events == []
        assert decoded.skipped == ["token_count_mismatch:3 tokens for 2 blocks of 2"]
        zero = one_event(["BlockStored", [1], None, [1, 2], 0])
        assert zero.skipped[0].startswith("token_count_mismatch")

    @pytest.mark.parametrize(
        ("event", "reason"),
        [
            (["BlockStored", "abc"], "malformed_event:BlockStored.block_hashes is a str"),
            (["BlockStored", [1.5]], "malformed_event:BlockStored.block_hashes holds"),
            (["BlockStored", [True]], "malformed_event:BlockStored.block_hashes holds"),
            (["BlockStored", [None]], "malformed_event:BlockStored.block_hashes holds"),
            (["BlockStored", [1], 1.5], "malformed_event:BlockStored.parent_block_hash"),
            (["BlockStored", [1], None, "abcd", 4], "malformed_event:BlockStored.token_ids"),
            (["BlockStored", [1], None, [1, -2], 2], "malformed_event:BlockStored.token_ids"),
            (["BlockStored", [1], None, [1, 2**32], 2], "malformed_event:BlockStored.token_ids"),
            (["BlockStored", [1], None, [1, 2.0], 2], "malformed_event:BlockStored.token_ids"),
            (["BlockStored", [1], None, [], -1], "malformed_event:BlockStored.block_size"),
            (["BlockStored", [1], None, [], "16"], "malformed_event:BlockStored.block_size"),
            (["BlockStored", [1], None, [], 0, None, 3], "malformed_event:BlockStored.medium"),
            (["BlockStored", [1], None, [], 0, "x"], "malformed_event:BlockStored.lora_id"),
            (["BlockStored", [1], None, [], 0, None, None, 5], "malformed_event:BlockStored.lora"),
            (["BlockStored", [1], None, [], 0, None, None, None, "ab"], "malformed_event:"),
            (["BlockRemoved"], "malformed_event:BlockRemoved.block_hashes is a NoneType"),
            (["BlockRemoved", [1], b"GPU"], "malformed_event:BlockRemoved.medium"),
            (["BlockStored", []], "empty_event:BlockStored"),
            ({"type": "BlockRemoved", "block_hashes": []}, "empty_event:BlockRemoved"),
            ([], "malformed_event:event is a list"),
            ("BlockStored", "malformed_event:event is a str"),
            (7, "malformed_event:event is a int"),
            ([7, [1]], "malformed_event:event tag 7"),
            ({"block_hashes": [1]}, "malformed_event:event tag None"),
        ],
    )
    def test_wrong_field_types(self, event: Any, reason: str) -> None:
        """A field of the wrong type skips only that event, with a reason naming the field."""
        decoded = decode_engine_payload(batch(event, ["AllBlocksCleared"]))
        assert decoded.events == [AllBlocksCleared()]
        assert len(decoded.skipped) == 1
        assert decoded.skipped[0].startswith(reason)

    def test_reason_codes_are_a_fixed_set(self) -> None:
        """The code before ':' is always one of SKIP_REASONS; details are short."""
        decoded = decode_engine_payload(
            batch(["X" * 500], ["BlockStored", [1], None, [1], 2], 5, ["BlockRemoved", []])
        )
        assert {r.split(":", 1)[0] for r in decoded.skipped} <= SKIP_REASONS
        assert len(decoded.skipped) == 4
        assert all(len(r) < 120 for r in decoded.skipped)


class TestBadPayload:
    @pytest.mark.parametrize("name", sorted(EXPECTED))
    def test_every_prefix_raises(self, name: str) -> None:
        """Every strict prefix of a valid payload raises EngineDecodeError, nothing else."""
        payload = load(name)
        for end in range(len(payload)):
            with pytest.raises(EngineDecodeError):
                decode_engine_payload(payload[:end])

    def test_trailing_garbage(self) -> None:
        """Bytes after the batch are an error."""
        with pytest.raises(EngineDecodeError, match="invalid msgpack"):
            decode_engine_payload(load("vllm_0_24_map") + b"\x00")

    @pytest.mark.parametrize(
        ("doc", "match"),
        [
            ({"ts": 1.0, "events": []}, "batch is a dict"),
            (5, "batch is a int"),
            ("batch", "batch is a str"),
            ([1.0], "1 elements"),
            ([], "0 elements"),
            (["now", []], "ts is a str"),
            ([None, []], "ts is a NoneType"),
            ([1.0, {"events": []}], "events is a dict"),
            ([1.0, "events"], "events is a str"),
            ([1.0, [], "0"], "dp_rank '0'"),
            ([1.0, [], -1], "dp_rank -1"),
            ([1.0, [], True], "dp_rank True"),
            ([1.0, [], 1.0], "dp_rank 1.0"),
        ],
    )
    def test_wrong_top_level_types(self, doc: Any, match: str) -> None:
        """A batch that is not [number, array(, int|None)] raises naming what is wrong."""
        with pytest.raises(EngineDecodeError, match=match):
            decode_engine_payload(msgspec.msgpack.encode(doc))

    def test_unknown_flavor(self) -> None:
        """An unknown flavor is a programming error (ValueError), not a decode error."""
        with pytest.raises(ValueError, match="unknown engine flavor"):
            decode_engine_payload(load("sglang"), flavor="trtllm")  # type: ignore[arg-type]

    def test_extra_batch_fields_ignored(self) -> None:
        """A batch with more than 3 elements (a future field) still decodes."""
        decoded = decode_engine_payload(msgspec.msgpack.encode([2, [["AllBlocksCleared"]], 1, "x"]))
        assert decoded == EngineBatch(ts=2.0, events=[AllBlocksCleared()], dp_rank=1)

    def test_absurd_sizes(self) -> None:
        """Oversized payloads, event counts and block counts raise EngineDecodeError."""
        with pytest.raises(EngineDecodeError, match="exceeds"):
            decode_engine_payload(b"\x00" * (MAX_ENGINE_PAYLOAD_BYTES + 1))
        too_many_events = [["AllBlocksCleared"]] * (MAX_EVENTS_PER_BATCH + 1)
        with pytest.raises(EngineDecodeError, match="events exceed"):
            decode_engine_payload(msgspec.msgpack.encode([1.0, too_many_events, 0]))
        too_many_blocks = ["BlockRemoved", list(range(MAX_BLOCKS_PER_EVENT + 1))]
        with pytest.raises(EngineDecodeError, match="blocks exceeds"):
            decode_engine_payload(batch(too_many_blocks))

    @fast
    @given(garbage=st.binary(max_size=256))
    def test_random_bytes_only_raise_engine_decode_error(self, garbage: bytes) -> None:
        """Random bytes either decode or raise EngineDecodeError, never another exception."""
        with contextlib.suppress(EngineDecodeError):
            decode_engine_payload(garbage)

    @fast
    @given(
        doc=st.recursive(
            st.none()
            | st.booleans()
            | st.integers(-(2**63), 2**64 - 1)
            | st.floats()
            | st.text(max_size=8)
            | st.binary(max_size=8)
            | st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared", "GPU"]),
            lambda inner: (
                st.lists(inner, max_size=6)
                | st.dictionaries(
                    st.sampled_from(["type", "block_hashes", "token_ids", "block_size", "medium"]),
                    inner,
                    max_size=5,
                )
            ),
            max_leaves=30,
        ),
        flavor=st.sampled_from(["vllm", "sglang"]),
    )
    def test_random_structures_only_raise_engine_decode_error(self, doc: Any, flavor: Any) -> None:
        """Random msgpack structures, wrapped as a batch or not, never raise anything else."""
        for payload in (msgspec.msgpack.encode(doc), batch(doc), batch(*[doc] * 2)):
            with contextlib.suppress(EngineDecodeError):
                decoded = decode_engine_payload(payload, flavor=flavor)
                assert {r.split(":", 1)[0] for r in decoded.skipped} <= SKIP_REASONS


class TestLiveFrames:
    def test_three_frames(self) -> None:
        """[topic, seq, payload] gives (seq, payload); seq is big-endian unsigned."""
        assert parse_live_frames([b"kv", (2**63 + 5).to_bytes(8, "big"), b"p"]) == (2**63 + 5, b"p")
        assert parse_live_frames([b"", bytes(8), b""]) == (0, b"")

    @pytest.mark.parametrize(
        ("frames", "match"),
        [
            ([b"\x00" * 8, b"p"], "2 frames"),
            ([b"t", b"\x00" * 8, b"p", b"x"], "4 frames"),
            ([b"t", b"\x00" * 4, b"p"], "seq frame has 4 bytes"),
            ([b"t", b"\x00" * 9, b"p"], "seq frame has 9 bytes"),
        ],
    )
    def test_bad_frames(self, frames: list[bytes], match: str) -> None:
        """A wrong frame count or seq length raises EngineDecodeError."""
        with pytest.raises(EngineDecodeError, match=match):
            parse_live_frames(frames)


class TestReplayFrames:
    def test_old_form(self) -> None:
        """[b"", seq, payload] (vLLM <= 0.25, SGLang) gives (seq, payload)."""
        assert parse_replay_frames([b"", (7).to_bytes(8, "big"), b"p"]) == (7, b"p")

    def test_new_form(self) -> None:
        """[b"", topic, seq, payload] (vLLM >= 0.26) gives (seq, payload), also with topic ""."""
        assert parse_replay_frames([b"", b"kv-events", (7).to_bytes(8, "big"), b"p"]) == (7, b"p")
        assert parse_replay_frames([b"", b"", (8).to_bytes(8, "big"), b"q"]) == (8, b"q")

    def test_end_marker(self) -> None:
        """The end marker (seq 0xFF*8, empty payload) returns None in both forms."""
        assert parse_replay_frames([b"", END_MARKER_SEQ, b""]) is None
        assert parse_replay_frames([b"", b"kv-events", END_MARKER_SEQ, b""]) is None

    @pytest.mark.parametrize(
        ("frames", "match"),
        [
            ([b"", b"\x00" * 8], "2 frames"),
            ([b"", b"t", b"x", b"\x00" * 8, b"p"], "5 frames"),
            ([b"id", b"\x00" * 8, b"p"], "empty delimiter"),
            ([b"", b"\x00" * 7, b"p"], "seq frame has 7 bytes"),
            ([b"", END_MARKER_SEQ, b"p"], "end marker carries a payload"),
        ],
    )
    def test_bad_frames(self, frames: list[bytes], match: str) -> None:
        """Malformed replay answers raise EngineDecodeError."""
        with pytest.raises(EngineDecodeError, match=match):
            parse_replay_frames(frames)

    def test_request(self) -> None:
        """A replay request is [b"", start_seq as 8-byte big-endian]; out of range is an error."""
        assert encode_replay_request(0) == [b"", bytes(8)]
        assert encode_replay_request(258) == [b"", b"\x00" * 6 + b"\x01\x02"]
        with pytest.raises(ValueError, match="unsigned 64-bit"):
            encode_replay_request(-1)
        with pytest.raises(ValueError, match="unsigned 64-bit"):
            encode_replay_request(2**64)


class TestLoraInExtraKeys:
    """vLLM's per-block extra keys repeat the LoRA name; block keys root in it instead."""

    def test_lora_name_is_left_out_of_extra_keys(self) -> None:
        """extra_keys [[lora], [lora, mm]] become [b"", msgpack([mm])] with lora_name kept."""
        import msgspec as _msgspec

        from publisher.engines import decode_engine_payload as _decode

        event = {"type": "BlockStored", "block_hashes": [1, 2], "parent_block_hash": None,
                 "token_ids": list(range(8)), "block_size": 4, "lora_name": "ad",
                 "extra_keys": [["ad"], ["ad", "mm-1"]]}
        batch = _decode(_msgspec.msgpack.encode([0.5, [event], 0]))
        (stored,) = batch.events
        assert stored.lora_name == "ad"  # type: ignore[union-attr]
        assert stored.extra_keys == [b"", _msgspec.msgpack.encode(["mm-1"])]  # type: ignore[union-attr]
