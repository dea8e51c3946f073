"""A Mooncake trace as the bench replays it (arrival steps), and what a cache could hit on
it without routing: one infinite cache (the single-cache bound) and one LRU of the fleet's
pooled capacity."""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvcore.keys import block_keys
from kvsim.mock_engines import TRACE_BLOCK_TOKENS, TraceRecord, load_trace, trace_tokens

__all__ = ["Trace", "reference_hits", "shared_prefix_blocks", "single_cache_hits"]


@dataclass(frozen=True, slots=True)
class Trace:
    """A trace's requests and their simulated arrival times."""

    name: str
    records: list[TraceRecord]
    arrivals: list[float]  # simulated seconds

    @classmethod
    def load(cls, path: Path, max_requests: int | None, speedup: float) -> Trace:
        """The first `max_requests` records (all when None), arriving at their timestamps
        divided by `speedup`, the first at 0."""
        records = list(itertools.islice(load_trace(path), max_requests))
        if not records:
            raise ValueError(f"{path}: no requests")
        first = records[0].timestamp
        arrivals = [(r.timestamp - first) / 1000.0 / speedup for r in records]
        if any(b < a for a, b in itertools.pairwise(arrivals)):
            raise ValueError(f"{path}: timestamps must not decrease")
        return cls(path.name, records, arrivals)

    @property
    def prompt_tokens(self) -> int:
        return sum(r.input_length for r in self.records)

    def steps(self) -> Iterator[tuple[float, list[int]]]:
        """(arrival, request indices): requests arriving at the same instant form a step."""
        for arrival, group in itertools.groupby(range(len(self.records)),
                                                key=self.arrivals.__getitem__):
            yield arrival, list(group)


def shared_prefix_blocks(trace: Trace, block_size: int) -> int:
    """Leading whole blocks every request of the trace has in common."""
    records = trace.records
    common = 0
    first = records[0].hash_ids
    while common < len(first) and all(len(r.hash_ids) > common
                                      and r.hash_ids[common] == first[common] for r in records):
        common += 1
    shortest = min(r.input_length for r in records)
    return min(common * TRACE_BLOCK_TOKENS, shortest) // block_size


def single_cache_hits(records: Sequence[TraceRecord], block_size: int) -> list[int]:
    """Hit tokens per request of one infinite cache: the longest prefix, in whole blocks,
    that an earlier request had."""
    return reference_hits(records, block_size, 0)[0]


def reference_hits(records: Sequence[TraceRecord], block_size: int,
                   pooled_capacity: int) -> tuple[list[int], list[int]]:
    """Hit tokens per request of one infinite cache (the bound) and of one LRU cache of
    `pooled_capacity` blocks (the fleet's memory pooled, no routing; 0 = skip it)."""
    seen: set[int] = set()
    lru: OrderedDict[int, None] = OrderedDict()
    bound_hits: list[int] = []
    lru_hits: list[int] = []
    for record in records:
        tokens = trace_tokens(record)
        chain = block_keys(tokens, block_size, 0)  # the chain under any fixed seed
        bound_hits.append(_leading(chain, seen) * block_size)
        seen.update(chain)
        if pooled_capacity:
            lru_hits.append(_leading(chain, lru) * block_size)
            for h in reversed(chain[:pooled_capacity]):  # tail first, like BlockPool
                lru[h] = None
                lru.move_to_end(h)
            while len(lru) > pooled_capacity:
                lru.popitem(last=False)
    return bound_hits, lru_hits


def _leading(chain: Sequence[int], cache: set[int] | OrderedDict[int, None]) -> int:
    hit = 0
    for h in chain:
        if h not in cache:
            break
        hit += 1
    return hit
