"""Prompts for tests that drive mock engines through bridges."""

from __future__ import annotations

import random

BRIDGE_BS = 16  # the block size the bridge tests' engines use


def prompts(n: int, seed: int = 7, block_size: int = BRIDGE_BS) -> list[list[int]]:
    """Prompts sharing a few system prefixes, so the LRU pool both hits and evicts."""
    rng = random.Random(seed)
    systems = [[rng.randrange(50_000) for _ in range(block_size * 4)] for _ in range(3)]
    return [rng.choice(systems)
            + [rng.randrange(50_000) for _ in range(block_size * rng.randint(1, 6))]
            for _ in range(n)]
