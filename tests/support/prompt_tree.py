"""Prompts as paths through a small token tree, and the engine events made of them.

A path (c0, c1, ...) picks choice c_d at depth d; block d of its prompt is
`block_tokens(d, c_d)`, so paths sharing a prefix share leading blocks. Engine hashes are
a function of (path, epoch). `event_specs` is the Hypothesis strategy for one event
(store, offload, remove, orphan, clear) and `make_event` turns a spec into the event.
Used by the Index contract suite, the publisher's mirror tests and the gRPC scenario."""

from __future__ import annotations

from typing import Any

import xxhash
from hypothesis import strategies as st

from kvcore.bus import AllBlocksCleared, BlockRemoved, BlockStored, Event, pack_tokens

MODEL = "org/model-1.5"
BLOCK = 4
DEPTH = 5
CHOICES = 3
MEDIA = ("gpu", "GPU", "cpu", "CPU_PINNED", "storage", "FS", "weird-tier")


def block_tokens(depth: int, choice: int) -> list[int]:
    return [choice * 1000 + depth * 10 + j for j in range(BLOCK)]


def path_tokens(path: tuple[int, ...], start: int = 0) -> list[int]:
    return [t for depth in range(start, len(path)) for t in block_tokens(depth, path[depth])]


def engine_hash(path: tuple[int, ...], epoch: int) -> int:
    return int(xxhash.xxh3_64_intdigest(repr(path).encode(), seed=epoch))


paths = st.lists(st.integers(0, CHOICES - 1), min_size=1, max_size=DEPTH).map(tuple)


@st.composite
def event_specs(draw: st.DrawFn) -> tuple[str, Any]:
    kind = draw(st.sampled_from(
        ["store", "store", "store", "store", "offload", "remove", "remove", "orphan", "clear"]
    ))
    path = draw(paths)
    if kind == "store":
        split = draw(st.integers(0, len(path) - 1))
        medium = draw(st.sampled_from(("gpu", "gpu", "GPU", "cpu")))
        lora = draw(st.sampled_from((None, None, None, "adapter")))
        return kind, (path, split, medium, lora)
    if kind in ("offload", "remove"):
        lo = draw(st.integers(0, len(path) - 1))
        return kind, (path, lo, draw(st.sampled_from(MEDIA)))
    return kind, path


def make_event(kind: str, spec: Any, epoch: int) -> Event:
    if kind == "store":
        path, split, medium, lora = spec
        return BlockStored(
            block_hashes=[engine_hash(path[: i + 1], epoch) for i in range(split, len(path))],
            parent_hash=engine_hash(path[:split], epoch) if split else None,
            token_ids=pack_tokens(path_tokens(path, split)),
            block_size=BLOCK,
            medium=medium,
            lora_name=lora,
        )
    if kind == "orphan":
        return BlockStored(block_hashes=[engine_hash(spec, epoch) ^ 0xABC],
                           parent_hash=engine_hash(spec, epoch) ^ 0xDEF,
                           token_ids=pack_tokens(block_tokens(0, 9)), block_size=BLOCK)
    if kind == "offload":
        path, lo, medium = spec
        return BlockStored(block_hashes=[engine_hash(path[: i + 1], epoch)
                                         for i in range(lo, len(path))], medium=medium)
    if kind == "remove":
        path, lo, medium = spec
        return BlockRemoved(block_hashes=[engine_hash(path[: i + 1], epoch)
                                          for i in range(lo, len(path))], medium=medium)
    return AllBlocksCleared()
