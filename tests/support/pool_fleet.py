"""A memory index at fleet scale with shared storage pools: 4,096 ranks (the first 512
workers with two dp ranks), four pools written through the first ranks' batches, mounts
and queries drawn from a seeded rng. Shared by tests/test_pool_walk.py and
tests/test_score_answer.py."""

from __future__ import annotations

import random
from array import array
from collections.abc import Mapping

from indexer.index import scoring
from indexer.index.protocol import ScoreQuery, TierWeights
from kvcore.bus import SCHEMA_VERSION, BlockStored, EventBatch

WEIGHT_SETS = (
    TierWeights(),
    TierWeights(gpu=0.3, cpu=0.9, storage=0.9, other=0.1),  # gpu is not always best
    TierWeights(gpu=1.0, cpu=1.0, storage=0.0, other=0.0),  # ties go to the lower tier
)

BLOCK = 4
MODEL = "m"
RANKS = 4_096
PROMPTS = 48
PROMPT_BLOCKS = 640
POOLS = ("pool-a", "pool-b", "pool-c", "pool-d")


def prompt_tokens(prompt: int, n_blocks: int) -> list[int]:
    return [t for i in range(n_blocks) for t in (prompt, i, 7, 7)]


def store(hashes: list[int], tokens: list[int], *, medium: str = "gpu",
          pool: str | None = None) -> BlockStored:
    return BlockStored(hashes, None, array("I", tokens).tobytes(), BLOCK, medium=medium,
                       pool=pool)


def worker_of_rank(n: int) -> str:
    """The first 512 ranks are workers of two ranks (dp 0 and 1), the others of one."""
    return f"worker-{n // 2 if n < 512 else n - 256:04}"


def fleet_batches(rng: random.Random, ranks: int = RANKS) -> tuple[list[EventBatch], int]:
    """`ranks` ranks (`worker_of_rank`) each holding a random prefix of a prompt
    (mostly short, some whole), some offloaded to cpu or storage; and the pools, written
    through the ranks' batches, each holding a random prefix of most prompts. Returns
    the batches and the pool blocks."""
    batches: list[EventBatch] = []
    pool_blocks = 0
    for n in range(ranks):
        prompt = rng.randrange(PROMPTS)
        held = rng.choice((0, rng.randint(1, 24), rng.randint(1, 96), rng.randint(1, 96),
                           rng.randint(1, 96), PROMPT_BLOCKS))
        tokens = prompt_tokens(prompt, held)
        hashes = [n * 10_000 + i for i in range(held)]
        events = [store(hashes, tokens)] if held else []
        if held and rng.random() < 0.3:
            events.append(BlockStored(hashes[: rng.randint(1, held)],
                                      medium=rng.choice(("cpu", "storage"))))
        if n < len(POOLS) * PROMPTS:  # the first ranks write the pools
            pool, prompt = POOLS[n % len(POOLS)], n // len(POOLS)
            kept = rng.choice((PROMPT_BLOCKS, rng.randint(PROMPT_BLOCKS // 2, PROMPT_BLOCKS)))
            pool_hashes = [10**9 + n * 10_000 + i for i in range(kept)]
            events.append(store(pool_hashes, prompt_tokens(prompt, kept), medium="storage",
                                pool=pool))
            pool_blocks += kept
        batches.append(EventBatch(schema=SCHEMA_VERSION, model=MODEL,
                                  worker_id=worker_of_rank(n), dp_rank=n % 2, epoch=1,
                                  seq=1, events=events))
    return batches, pool_blocks


def fleet_mounts(rng: random.Random, ranks: int = RANKS) -> dict[str, frozenset[str]]:
    """Most workers mount one pool, some several, some none; the last 256 workers the
    index never saw (cold) mount pools too, and some mount a pool that does not exist."""
    mounts: dict[str, frozenset[str]] = {}
    for worker in range(ranks):
        draw = rng.random()
        if draw < 0.2:
            continue
        names = ({rng.choice(POOLS)} if draw < 0.7
                 else set(rng.sample((*POOLS, "no-such-pool"), rng.randint(2, 4))))
        mounts[f"worker-{worker:04}"] = frozenset(names)
    return mounts


def fleet_queries(rng: random.Random, mounts: Mapping[str, frozenset[str]],
                  ranks: int = RANKS) -> list[ScoreQuery]:
    queries = []
    for n in range(60):
        prompt = rng.randrange(PROMPTS + 4)  # a few prompts nobody holds
        tokens = prompt_tokens(prompt, rng.randint(1, PROMPT_BLOCKS + 40))
        if rng.random() < 0.3:  # diverges somewhere
            cut = rng.randrange(len(tokens))
            tokens[cut] = 99_999
        workers = None
        if n % 3 == 1:
            workers = frozenset(f"worker-{w:04}" for w in range(ranks + 40)
                                if rng.random() < 0.6)
        weights = rng.choice(WEIGHT_SETS) if n % 4 == 3 else None
        include_zero = n % 5 == 4
        if n % 2:
            keys = scoring.query_keys_packed(ScoreQuery(model=MODEL, token_ids=tokens,
                                                        block_size=BLOCK))
            queries.append(ScoreQuery(model=MODEL, block_keys=list(array("Q", keys)),
                                      mounts=mounts, workers=workers, tier_weights=weights,
                                      include_zero=include_zero))
        else:
            queries.append(ScoreQuery(model=MODEL, token_ids=tokens, block_size=BLOCK,
                                      mounts=mounts, workers=workers, tier_weights=weights,
                                      include_zero=include_zero))
    return queries
