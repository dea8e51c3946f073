"""Write tests/vectors/block_keys.json: block-key test vectors for other languages.

This is a second, deliberately naive implementation of docs/block-keys.md. It does not
import `kvcore.keys`: it packs bytes with `struct` and calls xxh3_64 directly, so the
vectors check the canonical implementation instead of echoing it.

    .venv/bin/python tests/vectors/make_block_keys.py
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path
from typing import Any

import xxhash

SCHEME = b"kv-indexer/block-keys/v1"
OUT = Path(__file__).resolve().parent / "block_keys.json"


def length_prefixed(text: str | None) -> bytes:
    """u32 little-endian byte length, then the UTF-8 bytes; None is the empty string."""
    raw = b"" if text is None else text.encode("utf-8")
    return struct.pack("<I", len(raw)) + raw


def reference_root_seed(model: str, lora_name: str | None, cache_salt: str | None) -> int:
    data = SCHEME + length_prefixed(model) + length_prefixed(lora_name)
    data += length_prefixed(cache_salt)
    return xxhash.xxh3_64_intdigest(data, 0)


def reference_keys(
    tokens: list[int], block_size: int, root: int, extra_keys: list[bytes] | None
) -> list[int]:
    keys: list[int] = []
    previous = root
    for i in range(len(tokens) // block_size):  # a partial trailing block gets no key
        block = tokens[i * block_size : (i + 1) * block_size]
        data = struct.pack(f"<{block_size}I", *block)
        if extra_keys is not None:
            data += extra_keys[i]
        previous = xxhash.xxh3_64_intdigest(data, previous)
        keys.append(previous)
    return keys


def reference_extra_keys(
    tokens: list[int], block_size: int, mm_items: list[list[Any]] | None,
    embeds_digests: list[str] | None,
) -> list[str] | None:
    """The spec's "Multimodal items and prompt embeddings", as hex strings per full block:
    each item overlapping the block, in prompt order, as b"m" + u32 length + UTF-8
    identifier + i64 offset from the block's first token; then b"e" + u32 length + the
    block's embeddings digest. None when no block has any."""
    if mm_items is None and embeds_digests is None:
        return None
    out: list[str] = []
    for i in range(len(tokens) // block_size):
        start, end = i * block_size, (i + 1) * block_size
        data = b""
        for identifier, offset, length in sorted(mm_items or [], key=lambda item: item[1]):
            if offset < end and offset + length > start:
                raw = identifier.encode("utf-8")
                data += b"m" + struct.pack("<I", len(raw)) + raw + struct.pack("<q", offset - start)
        if embeds_digests is not None:
            digest = bytes.fromhex(embeds_digests[i])
            data += b"e" + struct.pack("<I", len(digest)) + digest
        out.append(data.hex())
    return out if any(out) else None


def _tokens(seed: int, n: int, high: int = 151_935) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(0, high) for _ in range(n)]


# (name, model, lora_name, cache_salt, block_size, tokens, extra_keys as hex or None)
_CASES: list[tuple[str, str, str | None, str | None, int, list[int], list[str] | None]] = [
    ("worked_example", "meta-llama/Llama-3.1-8B", None, None, 16, list(range(32)), None),
    ("empty_model", "", None, None, 16, _tokens(1, 32), None),
    ("unicode_model", "Qwen/Qwen2.5-7B-Instruct.ünïcødé/日本語", None, None, 16, _tokens(2, 48),
     None),
    ("lora", "meta-llama/Llama-3.1-8B", "sql-adapter", None, 16, list(range(32)), None),
    ("lora_empty_equals_none", "meta-llama/Llama-3.1-8B", "", "", 16, list(range(32)), None),
    ("cache_salt", "meta-llama/Llama-3.1-8B", None, "tenant-42", 16, list(range(32)), None),
    ("lora_and_salt", "meta-llama/Llama-3.1-8B", "sql-adapter", "tenant-42", 16, list(range(32)),
     None),
    ("block_size_1", "m", None, None, 1, [7, 0, 4_294_967_295, 1, 7], None),
    ("block_size_32_partial_tail", "meta-llama/Llama-3.1-8B", None, None, 32, _tokens(3, 64 + 10),
     None),
    ("zero_full_blocks", "meta-llama/Llama-3.1-8B", None, None, 16, _tokens(4, 15), None),
    ("no_tokens", "meta-llama/Llama-3.1-8B", None, None, 16, [], None),
    ("extra_keys_some_blocks", "llava-hf/llava-1.5-7b-hf", None, None, 16, _tokens(5, 48 + 3),
     ["", "00112233445566778899aabbccddeeff", ""]),
    ("extra_keys_all_blocks_lora", "llava-hf/llava-1.5-7b-hf", "vision-lora", "s", 16,
     _tokens(6, 32), ["deadbeef", "01"]),
    ("large_token_ids", "meta-llama/Llama-3.1-8B", None, None, 16,
     [4_294_967_295, 4_294_967_294, 2_147_483_648, 2_147_483_647, 65_536, 65_535, 256, 0,
      *_tokens(7, 24, high=4_294_967_295)], None),
]

# Multimodal prompts: (name, model, lora_name, cache_salt, block_size, tokens, mm_items as
# [identifier, offset, length], prompt-embedding digests as hex, one per full block, or None)
_MM_CASES: list[tuple[str, str, str | None, str | None, int, list[int], list[list[Any]] | None,
                      list[str] | None]] = [
    # an image over tokens 5..24 of 48: block 0 at offset 5, block 1 at offset -11
    ("mm_image_spanning_blocks", "llava-hf/llava-1.5-7b-hf", None, None, 16, _tokens(8, 48),
     [["0f1e2d3c4b5a69788796a5b4c3d2e1f0", 5, 20]], None),
    # two items in one block, listed by position whatever the order given; block 2 has none
    ("mm_two_items_one_block", "Qwen/Qwen2-VL-7B-Instruct", None, None, 16, _tokens(9, 48 + 5),
     [["audio-b", 20, 4], ["image-a", 16, 3]], None),
    # an item ending exactly at a block boundary does not reach the next block
    ("mm_item_ends_at_boundary", "m", None, None, 4, _tokens(10, 12), [["x", 2, 2]], None),
    # a LoRA-prefixed identifier (vLLM prefixes the adapter name), adapter and salt roots
    ("mm_with_lora_and_salt", "llava-hf/llava-1.5-7b-hf", "vision-lora", "tenant-42", 16,
     _tokens(11, 32), [["vision-lora:9a8b", 0, 32]], None),
    # prompt embeddings: one sha256 digest per block
    ("prompt_embeds", "meta-llama/Llama-3.1-8B", None, None, 16, [0] * 32, None,
     ["aa" * 32, "bb" * 32]),
    ("mm_and_prompt_embeds", "m", None, "s", 4, _tokens(12, 8), [["ü-image", 1, 2]],
     ["01" * 32, "02" * 32]),
]


def build() -> dict[str, Any]:
    cases = []
    all_cases = [(*case, None, None) for case in _CASES] + [
        (name, model, lora, salt, bs, tokens, reference_extra_keys(tokens, bs, mm, digests), mm,
         digests)
        for name, model, lora, salt, bs, tokens, mm, digests in _MM_CASES
    ]
    for name, model, lora, salt, block_size, tokens, extra_hex, mm, digests in all_cases:
        extra = None if extra_hex is None else [bytes.fromhex(x) for x in extra_hex]
        root = reference_root_seed(model, lora, salt)
        cases.append({
            "name": name,
            "model": model,
            "lora_name": lora,
            "cache_salt": salt,
            "block_size": block_size,
            "tokens": tokens,
            "mm_items": mm,
            "embeds_digests": digests,
            "extra_keys": extra_hex,
            "root_seed": root,
            "keys": reference_keys(tokens, block_size, root, extra),
        })
    return {
        "scheme": SCHEME.decode(),
        "spec": "docs/block-keys.md",
        "generator": "tests/vectors/make_block_keys.py",
        "notes": "root_seed and keys are unsigned 64-bit decimal ints; extra_keys are hex "
                 "strings, one per full block ('' = none), or null; where mm_items "
                 "([identifier, offset, length]) or embeds_digests (hex, one per full block) "
                 "are given, extra_keys are derived from them",
        "cases": cases,
    }


def render(doc: dict[str, Any]) -> str:
    """JSON with one field per line and each list on one line (diff-friendly, compact)."""
    head = {k: v for k, v in doc.items() if k != "cases"}
    lines = ["{"]
    lines += [f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}," for k, v in head.items()]
    lines.append('  "cases": [')
    for i, case in enumerate(doc["cases"]):
        fields = [f"      {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}"
                  for k, v in case.items()]
        tail = "," if i < len(doc["cases"]) - 1 else ""
        lines += ["    {", ",\n".join(fields), f"    }}{tail}"]
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    text = render(build())
    assert json.loads(text) == build()
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {len(_CASES) + len(_MM_CASES)} cases to {OUT}")


if __name__ == "__main__":
    main()
