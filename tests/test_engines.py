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
    TIERS,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Event,
    tier_index,
)
from kvcore.keys import (
    MultimodalItem,
    block_keys,
    block_keys_for_tokens,
    multimodal_extra_keys,
    root_seed,
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


def mm(identifier: str, offset: int) -> bytes:
    """A multimodal item's canonical extra-key bytes, from docs/block-keys.md."""
    raw = identifier.encode()
    return b"m" + struct.pack("<I", len(raw)) + raw + struct.pack("<q", offset)


def embeds(digest: bytes) -> bytes:
    """A prompt-embeddings digest's canonical extra-key bytes, from docs/block-keys.md."""
    return b"e" + struct.pack("<I", len(digest)) + digest


# The identity fixtures (make_frames.py: PROMPT, H1..H3).
PROMPT = toks(*range(101, 113))
H1, H2, H3 = 0x1111_0000_0000_0001, 0x2222_0000_0000_0002, 0xF333_0000_0000_0003
LA2 = 0x5555_0000_0000_0005  # make_frames.LA2
HYBRID = [0xA000_0000_0000_0000 + i for i in range(6)]  # make_frames.HYBRID_HASHES
SG1, SG2, SG3 = 2**64 - 11, 12, 13  # SGLang's signed hashes -11, 12, 13


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
        # Entries shaped like no vLLM release's: ("mm-hash-a1b2", 0) reads as a salt and
        # then a bare int, which has no place in a block key: the store is left out.
        [BlockStored([U0], None, toks(1, 2, 3, 4), 4)],  # [None]: no extras at all
        ["unplaceable_identity:extra_keys[0][1] is a int out of place"],
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
        [BlockStored([U0], None, toks(1, 2, 3, 4), 4, group=1, group_kind="sliding_window",
                     sliding_window=4096),
         BlockRemoved([U0], group=1)],
        [],
    ),
    "vllm_0_34_hybrid": (
        "vllm",
        0,
        [BlockStored(HYBRID, None, toks(*range(300, 324)), 4),  # group 0, full: the default
         BlockStored(HYBRID, None, toks(*range(300, 324)), 4, group=1,
                     group_kind="sliding_window", sliding_window=8)],
        [],
    ),
    "vllm_0_34_hybrid_evict": ("vllm", 0, [BlockRemoved(HYBRID[:4], group=1)], []),
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
        [],  # a REMOTE block is not held by this worker
        ["remote_block:BlockStored locality 'remote'"],
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
        # vLLM lists the adapter's name first in every block's extra keys; this entry
        # holds something else in that place, so the store cannot be keyed safely.
        [BlockRemoved([U0])],
        ["unplaceable_identity:extra_keys[0] does not start with the LoRA name"],
    ),
    "sglang": (
        "sglang",
        2,
        [
            BlockStored([11, 2**64 - 12], None, toks(1, 2, 3, 4, 5, 6, 7, 8), 4),
            BlockStored([13], 2**64 - 12, toks(9, 10, 11, 12), 4),
            BlockStored([11], medium="cpu"),
            BlockStored([11], medium="storage"),
            BlockRemoved([11], medium="cpu"),
            BlockRemoved([13]),
        ],
        ["remote_block:BlockStored medium external"],  # EXTERNAL: a shared pool
    ),
    # vLLM 0.34, encoded as the 0.34 wheel's own structs and extra-key functions do.
    "vllm_0_34_salt": (
        "vllm",
        0,
        # extra_keys [("tenant-a",), None]: the salt, on the first block only, roots the chain.
        [BlockStored([H1, H2], None, PROMPT[:32], 4, cache_salt="tenant-a")],
        [],
    ),
    "vllm_0_34_salt_child": (
        "vllm",
        0,
        [BlockStored([H3], H2, PROMPT[32:], 4)],  # chains from its (salted) parent
        [],
    ),
    "vllm_0_34_lora": (
        "vllm",
        0,
        # extra_keys [("sql-adapter",), ("sql-adapter",)]: the adapter roots the chain.
        [BlockStored([H1, H2], None, PROMPT[:32], 4, lora_name="sql-adapter")],
        [],
    ),
    "vllm_0_34_lora_child": (
        "vllm",
        0,
        [BlockStored([H3], H2, PROMPT[32:], 4, lora_name="sql-adapter")],
        [],
    ),
    "vllm_0_34_media": (
        "vllm",
        0,
        # The image fills tokens 2..6: offset 2 in block 0, -2 in block 1.
        [BlockStored([H1, H2], None, PROMPT[:32], 4,
                     extra_keys=[mm("img-5f0c", 2), mm("img-5f0c", -2)])],
        [],
    ),
    "vllm_0_34_media_child": (
        "vllm",
        0,
        [BlockStored([H3], H2, PROMPT[32:], 4, extra_keys=[mm("aud-77aa", 1)])],
        [],
    ),
    "vllm_0_34_mixed": (
        "vllm",
        0,
        [BlockStored([H1, H2], None, PROMPT[:32], 4, lora_name="sql-adapter",
                     cache_salt="tenant-a",
                     extra_keys=[embeds(b"\xe0" * 32),
                                 mm("img-5f0c", 1) + embeds(b"\xe1" * 32)])],
        [],
    ),
    "vllm_0_34_mixed_child": (
        "vllm",
        0,
        [BlockStored([H3], H2, PROMPT[32:], 4, lora_name="sql-adapter",
                     extra_keys=[embeds(b"\xe2" * 32)])],
        [],
    ),
    "vllm_0_34_offload": (
        "vllm",
        0,
        # The connector's CPU store has tokens but no extra keys: kept by engine hash only.
        [BlockStored([H1, H2], medium="cpu")],
        ["remote_block:BlockStored locality 'REMOTE'",
         "remote_block:BlockRemoved locality 'REMOTE'"],
    ),
    "vllm_0_34_owners": (
        "vllm",
        0,
        [BlockStored([H1], medium="cpu"), BlockStored([H1], medium="cpu"),
         BlockRemoved([H1], medium="cpu")],
        [],
    ),
    "vllm_0_34_owners_removed": ("vllm", 0, [BlockRemoved([H1], medium="cpu")], []),
    # hash lookahead: the engine's hashes cover the 2 tokens after each block, the key
    # could not, so the store is left out; the removal of a block never indexed passes on
    # (the index counts it unknown_block).
    "vllm_0_34_lookahead": (
        "vllm", 0, [BlockRemoved([LA2])], ["hash_lookahead:up to 2 lookahead tokens per block"],
    ),
    # SGLang 0.5.23, encoded as the 0.5.23 wheel's own structs do.
    "sglang_0_5_23_salt": (
        "sglang",
        0,
        [
            BlockStored([SG1, SG2], None, PROMPT[:32], 4, cache_salt="tenant-a"),
            BlockStored([SG1, SG2], None, PROMPT[:32], 4, medium="cpu", cache_salt="tenant-a"),
        ],
        [],
    ),
    "sglang_0_5_23_salt_child": (
        "sglang",
        0,
        [BlockStored([SG3], SG2, PROMPT[32:], 4, cache_salt="tenant-a")],
        [],
    ),
    "sglang_0_5_23_lora": (
        "sglang",
        0,
        [
            BlockStored([SG1, SG2], None, PROMPT[:32], 4, lora_name="sql-adapter"),
            BlockStored([SG1, SG2], None, PROMPT[:32], 4, medium="cpu", lora_name="sql-adapter"),
        ],
        [],
    ),
    "sglang_0_5_23_lora_child": (
        "sglang",
        0,
        [BlockStored([SG3], SG2, PROMPT[32:], 4, lora_name="sql-adapter")],
        [],
    ),
    "sglang_0_5_23_media": (
        "sglang",
        None,
        [
            BlockStored([SG1], None, PROMPT[:16], 4),
            BlockStored([SG1], None, PROMPT[:16], 4, medium="cpu"),  # CPU_PINNED
            BlockStored([SG1], None, PROMPT[:16], 4, medium="storage"),  # DISK
            BlockRemoved([SG1], medium="storage"),
        ],
        ["remote_block:BlockStored medium external", "remote_block:BlockRemoved medium external"],
    ),
}


# fixture name -> the `ownership` of its events (by index in the decoded events)
OWNERS: dict[str, dict[int, str]] = {"vllm_0_34_owners": {1: "kvcr", 2: "kvcr"}}


class TestRecordedFrames:
    @pytest.mark.parametrize("name", sorted(EXPECTED))
    def test_fixture_decodes_to_exact_bus_events(self, name: str) -> None:
        """Each recorded release payload decodes to exactly the hand-written bus events."""
        flavor, dp_rank, events, skipped = EXPECTED[name]
        decoded = decode_engine_payload(load(name), flavor=flavor)  # type: ignore[arg-type]
        assert decoded == EngineBatch(ts=TS, events=events, dp_rank=dp_rank, skipped=skipped,
                                      owners=OWNERS.get(name, {}))

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

    def test_sglang_flavor_reads_its_own_layout_past_medium(self) -> None:
        """A vLLM positional frame read with the sglang flavor: field 7 is SGLang's cache_salt,
        so vLLM's lora_name there becomes a salt. Misreading a name can only isolate blocks
        (no query without that salt matches them), never merge two namespaces."""
        decoded = decode_engine_payload(load("vllm_0_14_lora_name"), flavor="sglang")
        assert decoded.events == [
            BlockStored([U0], None, toks(5, 6, 7, 8), 4, lora_name="lora_id:3",
                        cache_salt="sql-adapter"),
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
            BlockStored([1], None, toks(1, 2), 2, group_kind="full")
        ]
        removed = ["BlockRemoved", [1], "CPU", 0, "future"]
        assert one_event(removed).events == [BlockRemoved([1], medium="cpu")]
        assert one_event(["AllBlocksCleared", "future"]).events == [AllBlocksCleared()]

    def test_sglang_positional_layout(self) -> None:
        """SGLang's positional fields after medium are cache_salt, session_id, lora_name (its
        BlockStored struct); vLLM's are lora_name, extra_keys."""
        event = ["BlockStored", [1], None, [1, 2], 2, None, "GPU", "salt-1", "sess", "ad"]
        assert one_event(event, flavor="sglang").events == [
            BlockStored([1], None, toks(1, 2), 2, lora_name="ad", cache_salt="salt-1")
        ]
        assert one_event(event).skipped == ["malformed_event:BlockStored.extra_keys is a str"]


class TestMapEvents:
    def test_defaults_and_unknown_fields(self) -> None:
        """Omitted fields take their defaults; unknown fields are ignored."""
        event = {"type": "BlockStored", "block_hashes": [7], "future": {"a": [1]}, "x": None}
        assert one_event(event).events == [BlockStored([7])]
        assert one_event({"type": "BlockRemoved", "block_hashes": [7], "group_idx": 3}).events == [
            BlockRemoved([7], group=3)
        ]
        assert one_event({"type": "AllBlocksCleared", "medium": "GPU"}).events == [
            AllBlocksCleared()
        ]

    def test_group_fields_out_of_bounds_are_skipped(self) -> None:
        """A group index or window beyond the bus bounds, or of the wrong type, leaves the
        event out with a reason; it is never folded into group 0."""
        base = {"type": "BlockStored", "block_hashes": [7]}
        for bad in ({"group_idx": 64}, {"group_idx": -1}, {"group_idx": "1"},
                    {"kv_cache_spec_sliding_window": -4},
                    {"kv_cache_spec_sliding_window": (1 << 24) + 1},
                    {"kv_cache_spec_kind": 3}):
            batch = one_event({**base, **bad})
            assert batch.events == [], bad
            assert batch.skipped[0].startswith("malformed_event:BlockStored."), bad
        removed = one_event({"type": "BlockRemoved", "block_hashes": [7], "group_idx": 99})
        assert removed.events == []
        assert removed.skipped == ["malformed_event:BlockRemoved.group_idx 99"]
        assert one_event({**base, "group_idx": 63, "kv_cache_spec_kind": "mamba"}).events == [
            BlockStored([7], group=63, group_kind="mamba")]

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
            ("EXTERNAL", "storage"),  # the name's tier; the decoder leaves such events out
            ("NVMe-oF", "nvme-of"),
        ],
    )
    def test_canonical_names(self, medium: str | None, canonical: str) -> None:
        """Engine media map to the bus names; unknown media are lower-cased as is."""
        assert canonical_medium(medium) == canonical
        if medium != "EXTERNAL":  # a shared pool: see test_shared_pool_is_not_held_locally
            assert one_event(["BlockRemoved", [1], medium]).events == [
                BlockRemoved([1], canonical)
            ]

    @pytest.mark.parametrize(
        ("medium", "tier"),
        [("GPU", "gpu"), ("CPU", "cpu"), ("STORAGE", "storage"), ("FS", "storage"),
         ("OBJ", "storage"), ("cpu", "cpu"),  # vLLM's media (Mooncake's store says "cpu")
         ("CPU_PINNED", "cpu"), ("DISK", "storage"),  # SGLang's
         ("NVMe-oF", "other")],
    )
    def test_every_engine_medium_has_its_tier(self, medium: str, tier: str) -> None:
        """Each medium either engine sends lands in the tier the index counts it in."""
        (event,) = one_event({"type": "BlockStored", "block_hashes": [1],
                              "medium": medium}).events
        assert isinstance(event, BlockStored)
        assert TIERS[tier_index(event.medium)] == tier

    @pytest.mark.parametrize("flavor", ["vllm", "sglang"])
    def test_shared_pool_is_not_held_locally(self, flavor: Any) -> None:
        """SGLang's EXTERNAL (a shared / remote pool such as Mooncake) is no copy of this
        worker's: stores and removals there are left out, counted as remote_block."""
        decoded = decode_engine_payload(batch(
            {"type": "BlockStored", "block_hashes": [1], "token_ids": [1, 2], "block_size": 2,
             "medium": "EXTERNAL"},
            {"type": "BlockRemoved", "block_hashes": [1], "medium": "external"},
        ), flavor=flavor)
        assert decoded.events == []
        assert decoded.skipped == ["remote_block:BlockStored medium external",
                                   "remote_block:BlockRemoved medium external"]

    @pytest.mark.parametrize(("locality", "kept"), [
        (None, True), ("LOCAL", True), ("local", True),
        ("REMOTE", False), ("remote", False), ("PEER", False),  # unknown: not known local
    ])
    def test_locality(self, locality: str | None, kept: bool) -> None:
        """vLLM's locality: LOCAL (or none) is this worker's; REMOTE, or a value this
        decoder does not know, is never counted as held here (stores and removals)."""
        for event in ({"type": "BlockStored", "block_hashes": [1], "medium": "CPU"},
                      {"type": "BlockRemoved", "block_hashes": [1], "medium": "CPU"}):
            decoded = one_event({**event, "locality": locality})
            assert bool(decoded.events) is kept
            assert [r.split(":")[0] for r in decoded.skipped] == ([] if kept else ["remote_block"])

    def test_locality_of_wrong_type(self) -> None:
        decoded = one_event({"type": "BlockStored", "block_hashes": [1], "locality": 1})
        assert decoded.skipped == ["malformed_event:BlockStored.locality is a int"]


class TestExtraKeys:
    """vLLM's untagged per-block extra keys -> salt, adapter and canonical extra keys."""

    @staticmethod
    def stored(extra_keys: Any, *, n: int = 2, parent: int | None = None,
               **fields: Any) -> EngineBatch:
        return one_event({"type": "BlockStored", "block_hashes": list(range(1, n + 1)),
                          "parent_block_hash": parent, "token_ids": list(range(4 * n)),
                          "block_size": 4, "extra_keys": extra_keys, **fields})

    def test_mm_pairs_and_digests_become_canonical_bytes(self) -> None:
        """(identifier, offset) pairs and digest bytes become the block's canonical bytes,
        in the order sent; a block without extras has b""."""
        decoded = self.stored([[["img", 3], ["aud", -1], b"\x01\x02"], None])
        assert decoded.events[0] == BlockStored(
            [1, 2], None, toks(*range(8)), 4,
            extra_keys=[mm("img", 3) + mm("aud", -1) + embeds(b"\x01\x02"), b""])

    def test_salt_on_first_block_roots_the_chain(self) -> None:
        """A bare string after the mm pairs of a sequence's first block is the cache salt."""
        decoded = self.stored([[["img", 0], "tenant", b"\x09"], None])
        assert decoded.events[0] == BlockStored(
            [1, 2], None, toks(*range(8)), 4, cache_salt="tenant",
            extra_keys=[mm("img", 0) + embeds(b"\x09"), b""])

    def test_lora_name_leads_every_entry(self) -> None:
        """With lora_name set, each entry starts with it; it roots the chain instead. A salt
        equal to the adapter name is still a salt (positions, not values, decide)."""
        decoded = self.stored([["ad", "ad"], ["ad", ["mm-1", 0]]], lora_name="ad", lora_id=3)
        assert decoded.events[0] == BlockStored(
            [1, 2], None, toks(*range(8)), 4, lora_name="ad", cache_salt="ad",
            extra_keys=[b"", mm("mm-1", 0)])

    def test_no_extras_is_none(self) -> None:
        """All-None (or empty) per-block extras collapse to extra_keys=None."""
        event = {"type": "BlockStored", "block_hashes": [1, 2], "extra_keys": [None, []]}
        assert one_event(event).events == [BlockStored([1, 2])]

    def test_wrong_length_skipped(self) -> None:
        """extra_keys with a different length than block_hashes skip the event."""
        event = {"type": "BlockStored", "block_hashes": [1, 2], "extra_keys": [["a"]]}
        decoded = one_event(event)
        assert decoded.events == []
        assert decoded.skipped == ["malformed_event:BlockStored.extra_keys has 1 entries for "
                                   "2 blocks"]

    @pytest.mark.parametrize(
        ("extra_keys", "fields", "reason"),
        [
            # a bare string on a later block (a salt is only on block 0; an old-style mm id?)
            ([None, ["x"]], {}, "bare string in extra_keys[1]"),
            # a bare string on the first block of an event that continues a sequence
            ([["x"], None], {"parent_block_hash": 9}, "bare string in extra_keys[0]"),
            # two salts
            ([["x", "y"], None], {}, "extra_keys[0][1] is a str out of place"),
            # the order is lora, mm, salt, digests: an mm pair after the salt is not vLLM's
            ([["x", ["img", 0]], None], {}, "extra_keys[0][1] is a list out of place"),
            ([[b"\x01", ["img", 0]], None], {}, "extra_keys[0][1] is a list out of place"),
            # shapes that are no mm pair
            ([[["img", "0"]], None], {}, "extra_keys[0][0] is a list out of place"),
            ([[["img", 0, 1]], None], {}, "extra_keys[0][0] is a list out of place"),
            ([[["img", 2**63]], None], {}, "extra_keys[0][0] is a list out of place"),
            ([[7], None], {}, "extra_keys[0][0] is a int out of place"),
            ([[1.5], None], {}, "extra_keys[0][0] is a float out of place"),
            ([[None], None], {}, "extra_keys[0][0] is a NoneType out of place"),
            # the adapter's slot holds something else
            ([["other"], ["ad"]], {"lora_name": "ad"}, "extra_keys[0] does not start with"),
            ([[["img", 0]], ["ad"]], {"lora_name": "ad"}, "extra_keys[0] does not start with"),
            # the salt field and the salt in extra_keys disagree
            ([["a"], None], {"cache_salt": "b"}, "cache_salt and the salt in extra_keys"),
        ],
    )
    def test_unplaceable_identity_is_skipped(
        self, extra_keys: Any, fields: dict[str, Any], reason: str
    ) -> None:
        """An identity input the bridge cannot place skips the store (never keyed without it),
        with a detail that names positions and types, never the values (salts are secrets)."""
        decoded = self.stored(extra_keys, **fields)
        assert decoded.events == []
        (skipped,) = decoded.skipped
        assert skipped.startswith("unplaceable_identity:" + reason)
        assert "tenant" not in skipped and "'x'" not in skipped

    def test_agreeing_salts(self) -> None:
        """A cache_salt field equal to the salt in extra_keys is one salt."""
        decoded = self.stored([["a"], None], cache_salt="a")
        assert decoded.events[0] == BlockStored([1, 2], None, toks(*range(8)), 4,
                                                cache_salt="a")

    def test_entry_of_wrong_type(self) -> None:
        decoded = self.stored(["a", None])
        assert decoded.skipped == ["malformed_event:BlockStored.extra_keys[0] is a str"]

    def test_salt_of_wrong_type(self) -> None:
        decoded = self.stored(None, cache_salt=5)
        assert decoded.skipped == ["malformed_event:BlockStored.cache_salt is a int"]

    def test_offload_store_without_extra_keys_keeps_only_hashes(self) -> None:
        """vLLM's offloading connectors send tokens but no extra keys (nor, for some, the
        LoRA name) whatever the request had: such a store names its blocks by engine hash
        only, so the index takes their keys from the GPU store it saw."""
        for medium in ("CPU", "cpu", "STORAGE"):
            decoded = one_event({"type": "BlockStored", "block_hashes": [1], "token_ids": [1, 2],
                                 "block_size": 2, "medium": medium})
            assert decoded.events == [BlockStored([1], medium=canonical_medium(medium))]
        gpu = one_event({"type": "BlockStored", "block_hashes": [1], "token_ids": [1, 2],
                         "block_size": 2, "medium": "GPU"})
        assert gpu.events == [BlockStored([1], None, toks(1, 2), 2)]
        with_extras = one_event({"type": "BlockStored", "block_hashes": [1], "token_ids": [1, 2],
                                 "block_size": 2, "medium": "CPU", "extra_keys": [["s"]]})
        assert with_extras.events == [BlockStored([1], None, toks(1, 2), 2, medium="cpu",
                                                  cache_salt="s")]
        # SGLang's host-cache stores carry their salt and adapter as fields: kept whole.
        sglang = one_event({"type": "BlockStored", "block_hashes": [1], "token_ids": [1, 2],
                            "block_size": 2, "medium": "CPU_PINNED", "cache_salt": "s"},
                           flavor="sglang")
        assert sglang.events == [BlockStored([1], None, toks(1, 2), 2, medium="cpu",
                                             cache_salt="s")]


class TestHashLookahead:
    """vLLM's hash lookahead (`lookahead_token_ids`, 0.33+): a store whose engine hashes
    cover tokens after their blocks is never keyed by its own tokens and parent alone."""

    @staticmethod
    def stored(lookahead: Any, **fields: Any) -> EngineBatch:
        return one_event({"type": "BlockStored", "block_hashes": [1, 2], "token_ids":
                          list(range(8)), "block_size": 4, "lookahead_token_ids": lookahead,
                          **fields})

    @pytest.mark.parametrize("lookahead", [[[8, 9], [10, 11]], [[], [10]], [[8], []],
                                           [5, 6, 7], [None, None], [[], "x"], [], [[], []]])
    def test_any_lookahead_list_skips_the_store(self, lookahead: Any) -> None:
        """A list, even of empty entries, skips the store: vLLM sends one whenever its
        hashes are computed the lookahead way (an entry is empty for a block whose
        lookahead tokens had not come yet, hashed so all the same)."""
        decoded = self.stored(lookahead)
        assert decoded.events == []
        assert [r.split(":", 1)[0] for r in decoded.skipped] == ["hash_lookahead"]

    def test_no_lookahead_list_is_keyed(self) -> None:
        """None: lookahead hashing off, an ordinary store."""
        decoded = self.stored(None)
        assert decoded.skipped == []
        assert decoded.events == [BlockStored([1, 2], None, toks(*range(8)), 4)]

    def test_offload_and_pool_stores_are_skipped_too(self) -> None:
        """A hash-only offload store and a shared-pool store with lookahead are left out."""
        assert self.stored([[8]], medium="CPU", token_ids=[], block_size=0).skipped[0] \
            .startswith("hash_lookahead:")
        pooled = decode_engine_payload(batch({
            "type": "BlockStored", "block_hashes": [1], "token_ids": [1, 2, 3, 4],
            "block_size": 4, "locality": "REMOTE", "lookahead_token_ids": [[5]]}),
            pools=["nfs"])
        assert pooled.events == []
        assert pooled.skipped == ["hash_lookahead:up to 1 lookahead tokens per block"]

    def test_wrong_type_is_malformed(self) -> None:
        assert self.stored(7).skipped == ["malformed_event:BlockStored.lookahead_token_ids "
                                          "is a int"]

    def test_identity_reason_comes_first(self) -> None:
        """A store both unplaceable and with lookahead keeps the identity reason."""
        decoded = self.stored([[8], [9]], extra_keys=[["x"], ["x"]])
        assert [r.split(":", 1)[0] for r in decoded.skipped] == ["unplaceable_identity"]


class TestRouterAgreement:
    """What the bridge makes of vLLM's published extra keys is what a router computes from the
    same prompt (kvcore.keys), for any media layout, adapter, salt and event split."""

    @fast
    @given(
        n_blocks=st.integers(1, 6),
        block_size=st.sampled_from([1, 2, 4, 16]),
        gaps=st.lists(st.tuples(st.integers(0, 9), st.integers(1, 20),
                                st.sampled_from(["img-a", "img-b", "aud-ç"])), max_size=4),
        lora=st.booleans(),
        salt=st.one_of(st.none(), st.sampled_from(["tenant-a", "sql-adapter"])),
        embeds=st.booleans(),
        split=st.integers(0, 6),
    )
    def test_bridge_keys_equal_router_keys(
        self, *, n_blocks: int, block_size: int, gaps: list[tuple[int, int, str]], lora: bool,
        salt: str | None, embeds: bool, split: int,
    ) -> None:
        """Blocks published in two events (the second a child of the first) get the keys a
        router derives from tokens + adapter + salt + media items + embedding digests."""
        frames_module = make_frames_module()
        n_tokens = n_blocks * block_size
        items, pos = [], 0
        for gap, length, identifier in gaps:  # non-overlapping, by position (as vLLM's)
            items.append(frames_module.MMFeature(identifier, pos + gap, length))
            pos += gap + length
        digests = [bytes([i]) * 32 for i in range(n_blocks)] if embeds else None
        req = frames_module.VllmRequest(
            list(range(500, 500 + n_tokens)), lora=("sql-adapter", 1, "/a") if lora else None,
            cache_salt=salt, mm_features=items, embeds_digests=digests)
        hashes = list(range(1, n_blocks + 1))
        cut = min(split, n_blocks)
        events = []
        if cut:
            events.append(frames_module.vllm_stored(req, hashes[:cut], 0, block_size))
        if cut < n_blocks:
            events.append(frames_module.vllm_stored(req, hashes[cut:], cut, block_size,
                                                    parent_block_hash=hashes[cut - 1]
                                                    if cut else None))
        decoded = decode_engine_payload(msgspec.msgpack.encode([TS, events, 0]))
        assert decoded.skipped == []
        keys: list[int] = []
        for event in decoded.events:
            assert isinstance(event, BlockStored)
            seed = (root_seed("m", event.lora_name, event.cache_salt)
                    if event.parent_hash is None else keys[-1])
            keys += block_keys(event.token_ids, block_size, seed, event.extra_keys)
        router_items = [MultimodalItem(f.identifier, f.offset, f.length) for f in items]
        assert keys == block_keys_for_tokens(
            req.tokens, block_size, "m", lora_name="sql-adapter" if lora else None,
            cache_salt=salt,
            extra_keys=multimodal_extra_keys(router_items, n_tokens, block_size, digests))


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
