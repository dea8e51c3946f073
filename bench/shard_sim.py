"""One model larger than a shard: memory and Redis work per shard for 10,000 ranks x
100,000 blocks, today's single-slot layout against the sub-slot layout of
docs/large-models.md, over N = 1, 3, 6, 12, 24 shards (`make bench-shards`).

    python -m bench.shard_sim [--ranks 10000] [--blocks-per-rank 100000] [--no-write]

How it is computed (a billion (block, rank) entries are never materialised):

1. Prefix sharing comes from a Mooncake trace (512-token hash ids). An id held by at
   least `--global-min` requests is *global* (a system prompt or shared document: the
   fleet has one copy of it, used by the same share of requests); the others are
   *session* content, which a larger fleet has more of: the fleet's cache window holds
   F independent copies of the trace's sessions, F chosen so that the fleet's entries
   come to ranks x blocks-per-rank.
2. Holders per block follow the routing: `affinity` (KV-aware: a session stays on one
   rank, a global prefix used by a share p of requests spreads over p x ranks, the ranks
   its load needs) or `random` (every request on a random rank).
3. Memory: a block class (holders h, count n) costs n fields; a field's bytes are
   measured on a private redis-server by value length (`bench/shard_calibration.py`).
   Today a value is a bitmask up to the highest holder's slot (4 bits per slot; the
   highest of h random slots is sampled); proposed it is a holder list of 4 bytes per
   holder, or the bitmask where shorter. Ledger logs: 18 bytes per mapped engine hash
   (held blocks and ghosts) plus 9 per ghost, at 1.5x the live size on average
   (compaction at 2x). Blocks spread over shards by key: per shard a binomial share.
4. Score: `--queries` trace requests of >= 8,192 tokens, cut to 8,192 (512 blocks of 16
   tokens); a query's fleet-wide match is its leading ids seen earlier in the trace.
   Each query's keys are placed on shards at random (they are hashes); a shard looks up
   its keys in chunks until its own first unheld key, and returns one mask per run of
   equal masks. CPU = measured per call + per key + per reply byte.
5. Apply: every rank stores and evicts `--store-rate` blocks/s in `--batches-per-s`
   batches; a store or evict is one field write in the block's shard, each batch adds
   its position checks (per touched sub-slot) and a ledger append (in the rank's home);
   an apply chunk is three script calls per shard (clears, sets, ledgers).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from redis.crc import key_slot

from bench.shard_calibration import Calibration, calibrate
from kvsim.report import write_section
from tests.support.servers import RedisServer

TRACES = Path("/work/shared/traces")
TRACE_BLOCK_TOKENS = 512
BLOCK_TOKENS = 16
BLOCKS_PER_ID = TRACE_BLOCK_TOKENS // BLOCK_TOKENS
QUERY_TOKENS = 8_192
QUERY_BLOCKS = QUERY_TOKENS // BLOCK_TOKENS
SHARD_COUNTS = (1, 3, 6, 12, 24)
TIER_BITS = 4
HOLDER_BYTES = 4  # u32: slot id (28 bits, never reused) << 4 | tier bits
# A ledger log (indexer/index/ledger.py): 16 B a mapped hash in N runs (a 4 B header per
# tier mask and 65,535 hashes), 9 B a ghost's G record; a list of segments in Redis costs
# ~1.07x its bytes (docs/benchmarks.md, fleet-scale run note; strings grown by APPEND,
# before it, 1.5x).
LOG_RUN_ENTRY_BYTES, LOG_RUN_HEADER_BYTES, LOG_HASH_BYTES = 16, 4, 9
LOG_RUN_MAX = 65_535
LOG_AVERAGE_SLACK = 1.07
TODAY_CHUNK = 64  # score.lua's HMGET chunk
SUBSLOT_FIRST_CHUNK = 4  # proposed: chunks of 4, 8, 16, ... per sub-slot
TODAY_RECORD_OPS = 4  # slots check, position check, log APPEND, meta HSET
GB = 1e9
CLUSTER_SLOTS = 16_384


@dataclass(frozen=True)
class Trace:
    name: str
    requests: list[tuple[int, list[int]]]  # (input tokens, hash ids), in time order
    uses: Counter[int]  # hash id -> requests containing it


@dataclass(frozen=True)
class Fleet:
    """Distinct blocks by holder count, and who holds each trace id."""

    ranks: int
    blocks_per_rank: int
    routing: str
    global_min: int
    session_copies: float  # F
    classes: dict[int, float] = field(default_factory=dict)  # holders -> distinct blocks
    id_holders: dict[int, int] = field(default_factory=dict)
    global_ids: set[int] = field(default_factory=set)

    @property
    def entries(self) -> float:
        return sum(h * n for h, n in self.classes.items())

    @property
    def distinct_blocks(self) -> float:
        return sum(self.classes.values())


@dataclass
class ShardLoad:
    """One layout over one shard count: per-shard figures (lists indexed by shard)."""

    layout: str
    shards: int
    entries: list[float]
    presence_bytes: list[float]
    ledger_bytes: list[float]
    score_calls: list[float]  # per Score
    score_lookups: list[float]  # per Score
    score_reply_bytes: list[float]  # per Score
    hmget_keys: list[float]  # per Score, plain-HMGET variant
    hmget_reply_bytes: list[float]
    apply_ops: list[float]  # per second
    apply_calls: list[float]  # per second
    apply_cpu: list[float]  # cores
    score_cpu: list[float] = field(default_factory=list)  # cores, at the fleet's Score rate
    hmget_cpu: list[float] = field(default_factory=list)

    def hottest(self) -> int:
        loads = [s + a for s, a in zip(self.score_cpu, self.apply_cpu, strict=True)]
        return max(range(self.shards), key=lambda k: loads[k])


def read_trace(path: Path) -> Trace:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows.sort(key=lambda row: row["timestamp"])
    requests = [(int(row["input_length"]), [int(h) for h in row["hash_ids"]]) for row in rows]
    uses: Counter[int] = Counter()
    for _, ids in requests:
        uses.update(set(ids))
    return Trace(path.name, requests, uses)


def id_blocks(trace: Trace) -> dict[int, int]:
    """16-token blocks in each id: 32, fewer for a prompt's partial last id (the most
    tokens any request has in it)."""
    blocks: dict[int, int] = {}
    for tokens, ids in trace.requests:
        for i, h in enumerate(ids):
            in_id = min(TRACE_BLOCK_TOKENS, tokens - i * TRACE_BLOCK_TOKENS)
            count = max(1, math.ceil(in_id / BLOCK_TOKENS))
            blocks[h] = max(blocks.get(h, 0), count)
    return blocks


def distinct_ranks(picks: float, ranks: int) -> int:
    """Expected distinct ranks among `picks` uniform picks."""
    return max(1, min(ranks, round(ranks * -math.expm1(picks * math.log1p(-1 / ranks)))))


def holders_of(uses: int, is_global: bool, *, requests_in_window: float, trace_requests: int,
               ranks: int, routing: str) -> int:
    if not is_global:
        return 1 if routing == "affinity" else distinct_ranks(uses, ranks)
    share = uses / trace_requests
    if routing == "affinity":
        return max(1, min(ranks, math.ceil(share * ranks)))
    return distinct_ranks(share * requests_in_window, ranks)


def build_fleet(trace: Trace, ranks: int, blocks_per_rank: int, routing: str,
                global_min: int) -> Fleet:
    """Solve for the session copies F that fill every rank's cache (bisection: with
    random routing a global id's holders grow with the window)."""
    blocks, n = id_blocks(trace), len(trace.requests)
    target = ranks * blocks_per_rank

    def fleet_for(copies: float) -> Fleet:
        fleet = Fleet(ranks, blocks_per_rank, routing, global_min, copies)
        for h, uses in trace.uses.items():
            is_global = uses >= global_min
            held = holders_of(uses, is_global, requests_in_window=copies * n, trace_requests=n,
                              ranks=ranks, routing=routing)
            fleet.id_holders[h] = held
            if is_global:
                fleet.global_ids.add(h)
            weight = blocks[h] * (1.0 if is_global else copies)
            fleet.classes[held] = fleet.classes.get(held, 0.0) + weight
        return fleet

    low, high = 0.0, 1.0
    while fleet_for(high).entries < target:
        low, high = high, high * 2
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if fleet_for(mid).entries < target else (low, mid)
    return fleet_for(high)


def bitmask_bytes(top_slot: int) -> int:
    """Today's mask: bit slot*4 + tier, no trailing zero bytes (gpu tier)."""
    return (top_slot * TIER_BITS) // 8 + 1


def top_slot(rng: random.Random, holders: int, ranks: int) -> int:
    """The highest of `holders` distinct random slots below `ranks`."""
    return min(ranks - 1, int(ranks * rng.random() ** (1 / holders)))


def value_bytes(layout: str, holders: int, slot: int) -> int:
    mask = bitmask_bytes(slot)
    return mask if layout == "today" else 1 + min(HOLDER_BYTES * holders, mask)


def mean_field_bytes(cal: Calibration, layout: str, holders: int, *, ranks: int,
                     rng: random.Random, samples: int = 2_000) -> tuple[float, float]:
    """(bytes per field, value length) averaged over sampled top slots."""
    lengths = [value_bytes(layout, holders, top_slot(rng, holders, ranks))
               for _ in range(samples)]
    return (sum(cal.bytes_per_field(v) for v in lengths) / samples, sum(lengths) / samples)


def ledger_bytes_per_rank(blocks_per_rank: int, ghosts: int) -> float:
    """A snapshot's bytes (held blocks in one tier, then ghosts) times the list's slack."""
    runs = sum(-(-n // LOG_RUN_MAX) for n in (blocks_per_rank, ghosts))
    live = (LOG_RUN_ENTRY_BYTES * (blocks_per_rank + ghosts) + LOG_RUN_HEADER_BYTES * runs
            + LOG_HASH_BYTES * ghosts)
    return live * LOG_AVERAGE_SLACK


def binomial_shares(rng: random.Random, total: float, shards: int) -> list[float]:
    """A binomial split of `total` items over `shards` equal parts (normal approximation,
    renormalised so the parts sum to the total)."""
    if shards == 1:
        return [total]
    p = 1 / shards
    sigma = math.sqrt(total * p * (1 - p))
    parts = [max(0.0, total * p + sigma * rng.gauss(0, 1)) for _ in range(shards)]
    scale = total / sum(parts) if sum(parts) else 0.0
    return [part * scale for part in parts]


@dataclass(frozen=True)
class Query:
    matched_blocks: int
    runs: list[tuple[int, int, int]]  # (first block, blocks, holders) of equal-mask runs


def sample_queries(trace: Trace, fleet: Fleet, count: int, rng: random.Random) -> list[Query]:
    """Trace requests of >= 8,192 tokens cut to 8,192; matched = leading ids seen before."""
    seen: set[int] = set()
    queries: list[Query] = []
    for tokens, ids in trace.requests:
        if tokens >= QUERY_TOKENS:
            head = ids[:QUERY_TOKENS // TRACE_BLOCK_TOKENS]
            matched = next((i for i, h in enumerate(head) if h not in seen), len(head))
            queries.append(query_runs(head[:matched], fleet))
        seen.update(ids)
    return rng.sample(queries, min(count, len(queries)))


def query_runs(matched_ids: Sequence[int], fleet: Fleet) -> Query:
    """Consecutive ids of one kind (global, or session) with the same holder count are one
    run of equal masks: a turn's ids are held by the ranks that served it, and under
    affinity a session's ids sit on one rank."""
    runs: list[tuple[int, int, int]] = []
    previous: tuple[int, bool] | None = None
    for i, h in enumerate(matched_ids):
        kind = (fleet.id_holders[h], h in fleet.global_ids)
        if runs and kind == previous:
            first, length, holders = runs[-1]
            runs[-1] = (first, length + BLOCKS_PER_ID, holders)
        else:
            runs.append((i * BLOCKS_PER_ID, BLOCKS_PER_ID, kind[0]))
        previous = kind
    return Query(len(matched_ids) * BLOCKS_PER_ID, runs)


def score_load(queries: Sequence[Query], shards: int, layout: str, ranks: int,
               rng: random.Random) -> list[list[float]]:
    """Per shard, means per Score: calls, keys looked up, reply bytes; then keys and reply
    bytes of the plain-HMGET variant (today's layout: the same as its script)."""
    sums = [[0.0] * shards for _ in range(5)]
    for query in queries:
        if layout == "today":
            looked = min(QUERY_BLOCKS, chunked(query.matched_blocks + 1, TODAY_CHUNK))
            reply = sum(value_bytes(layout, h, top_slot(rng, h, ranks)) for _, _, h in query.runs)
            for figure, value in zip(sums, (1, looked, reply, looked, reply), strict=True):
                figure[0] += value
            continue
        placed = [rng.randrange(shards) for _ in range(QUERY_BLOCKS)]
        for k, values in enumerate(shard_score(query, placed, shards=shards, layout=layout,
                                                        ranks=ranks, rng=rng)):
            for figure, value in zip(sums, values, strict=True):
                figure[k] += value
    return [[value / len(queries) for value in figure] for figure in sums]


def chunked(keys: int, chunk: int) -> int:
    return math.ceil(keys / chunk) * chunk


def doubling_chunks(keys: int, first: int = SUBSLOT_FIRST_CHUNK) -> int:
    """Keys read when HMGET chunks double from `first` (4, 8, 16, ...) up to `keys`."""
    read, chunk = 0, first
    while read < keys:
        read += chunk
        chunk *= 2
    return read


def shard_score(query: Query, placed: list[int], *, shards: int, layout: str, ranks: int,
                rng: random.Random) -> Iterable[tuple[int, int, int, int, int]]:
    """Per shard, for one query: calls, keys looked up and reply bytes of a sub-slot script
    that reads its keys in order until its own first unheld one (at or past the
    fleet-wide match); then keys and reply bytes of a plain HMGET of all its keys."""
    run_of = [0] * query.matched_blocks
    for r, (first, length, _) in enumerate(query.runs):
        run_of[first:first + length] = [r] * length
    sizes = [value_bytes(layout, h, top_slot(rng, h, ranks)) for _, _, h in query.runs]
    for k in range(shards):
        mine = [i for i, s in enumerate(placed) if s == k]
        if not mine:
            yield (0, 0, 0, 0, 0)
            continue
        held = [run_of[i] for i in mine if i < query.matched_blocks]
        looked = min(len(mine), doubling_chunks(len(held) + 1))
        yield (1, looked, sum(sizes[r] for r in set(held)),
               len(mine), sum(sizes[r] for r in held))


@dataclass(frozen=True)
class Rates:
    scores_per_s: float
    store_per_rank_s: float  # blocks stored per rank per second (as many evicted)
    batches_per_rank_s: float
    apply_chunk: int  # batches per apply call (--apply-chunk)


def apply_load(fleet: Fleet, shards: int, layout: str, *, rates: Rates, cal: Calibration,
               mean_mask: float, rng: random.Random,
               ) -> tuple[list[float], list[float], list[float]]:
    """Field writes and script calls per second per shard, and the CPU (cores) they cost."""
    writes = fleet.ranks * 2 * rates.store_per_rank_s
    batches = fleet.ranks * rates.batches_per_rank_s
    chunks = batches / rates.apply_chunk
    if layout == "today":
        ops = writes + batches * TODAY_RECORD_OPS
        one_slot_cpu = (writes * cal.write_op_us_at(mean_mask) + batches * TODAY_RECORD_OPS
                        * cal.write_op_us + chunks * cal.apply_call_us) / 1e6
        rest = [0.0] * (shards - 1)
        return [ops, *rest], [chunks, *rest], [one_slot_cpu, *rest]
    per_batch = 2 * rates.store_per_rank_s / rates.batches_per_rank_s
    touched = shards * -math.expm1(per_batch * math.log1p(-1 / shards)) if shards > 1 else 1.0
    position_ops = batches * touched * 2  # read and write the (rank, sub-slot) position
    ledger_ops = batches * 2  # log APPEND and meta HSET in the rank's home sub-slot
    parts = binomial_shares(rng, writes + position_ops + ledger_ops, shards)
    calls = [chunks * 3 for _ in range(shards)]  # clears wave, sets wave, ledger wave
    cpu = [(part * cal.entry_write_us_at(mean_mask) + c * cal.apply_call_us) / 1e6
           for part, c in zip(parts, calls, strict=True)]
    return parts, calls, cpu


def memory_load(fleet: Fleet, shards: int, layout: str, *, cal: Calibration, ghosts: int,
                rng: random.Random) -> tuple[list[float], list[float], list[float], float]:
    """Per shard: entries, presence bytes, ledger bytes; and the entry-weighted mean value
    length (what a presence write rewrites)."""
    entries, presence = [0.0] * shards, [0.0] * shards
    weighted_length = 0.0
    for holders, blocks in fleet.classes.items():
        per_field, length = mean_field_bytes(cal, layout, holders, ranks=fleet.ranks, rng=rng)
        weighted_length += length * holders * blocks
        targets = [0] if layout == "today" else range(shards)
        parts = [blocks] if layout == "today" else binomial_shares(rng, blocks, shards)
        for k, part in zip(targets, parts, strict=True):
            entries[k] += part * holders
            presence[k] += part * per_field
    per_rank = ledger_bytes_per_rank(fleet.blocks_per_rank, ghosts)
    ranks = [float(fleet.ranks)] + [0.0] * (shards - 1) if layout == "today" \
        else binomial_shares(rng, fleet.ranks, shards)
    return entries, presence, [r * per_rank for r in ranks], weighted_length / fleet.entries


def simulate(fleet: Fleet, queries: Sequence[Query], shards: int, layout: str, *,
             cal: Calibration, rates: Rates, ghosts: int, seed: int) -> ShardLoad:
    rng = random.Random(f"{seed}/{layout}/{shards}")
    entries, presence, ledgers, mean_mask = memory_load(fleet, shards, layout, cal=cal,
                                                          ghosts=ghosts, rng=rng)
    calls, lookups, reply, hmget_keys, hmget_reply = score_load(
        queries, shards, layout, fleet.ranks, rng)
    ops, apply_calls, apply_cpu = apply_load(fleet, shards, layout, rates=rates, cal=cal,
                                            mean_mask=mean_mask, rng=rng)
    load = ShardLoad(layout, shards, entries, presence, ledgers, calls, lookups, reply,
                     hmget_keys, hmget_reply, ops, apply_calls, apply_cpu)
    load.score_cpu = [rates.scores_per_s * (c * cal.score_call_us + x * cal.score_lookup_us
                                            + b * cal.reply_byte_us) / 1e6
                      for c, x, b in zip(calls, lookups, reply, strict=True)]
    load.hmget_cpu = [rates.scores_per_s * (c * cal.hmget_call_us
                                            + max(0.0, x - c) * cal.hmget_key_us
                                            + b * cal.reply_byte_us) / 1e6
                      for c, x, b in zip(calls, hmget_keys, hmget_reply, strict=True)]
    return load


def shard_of_slot(slot: int, shards: int) -> int:
    """The shard owning a hash slot when the cluster's slots are split evenly in order
    (what `redis-cli --cluster create` does)."""
    return slot * shards // CLUSTER_SLOTS


def naive_tags(model: str, shards: int) -> list[str]:
    return [f"m:{model}:{k}" for k in range(shards)]


def placed_tags(model: str, shards: int) -> list[str]:
    """One sub-slot tag per shard: for shard k, the first suffix whose hash slot it owns."""
    tags: list[str] = []
    for k in range(shards):
        suffix = 0
        while shard_of_slot(key_slot(f"m:{model}:{k}.{suffix}".encode()), shards) != k:
            suffix += 1
        tags.append(f"m:{model}:{k}.{suffix}")
    return tags


def placement_rows(model: str) -> str:
    rows = ["| shards | tags `m:<model>:<k>`: most sub-slots on one shard | shards left without "
            "one | searched tags `m:<model>:<k>.<suffix>`: sub-slots per shard |",
            "|---:|---:|---:|---:|"]
    for shards in SHARD_COUNTS:
        owners = Counter(shard_of_slot(key_slot(tag.encode()), shards)
                         for tag in naive_tags(model, shards))
        placed = Counter(shard_of_slot(key_slot(tag.encode()), shards)
                         for tag in placed_tags(model, shards))
        assert sorted(placed) == list(range(shards))
        rows.append(f"| {shards} | {max(owners.values())} | {shards - len(owners)} "
                    f"| {max(placed.values())} |")
    return "\n".join(rows)


# --- report ----------------------------------------------------------------------------

LOAD_HEADER = (
    "| layout | shards | entries, largest shard | presence GB | ledgers GB | total GB "
    "| Score calls/s | Score keys/s | Score reply MB/s | Score CPU | same, plain HMGET "
    "| apply writes/s | apply CPU | within one shard's budget? |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")


@dataclass(frozen=True)
class Budget:
    memory_gb: float
    cpu_cores: float


def load_row(load: ShardLoad, rates: Rates, budget: Budget) -> str:
    """The largest shard's memory and the hottest shard's work (cores of redis-server)."""
    big = max(range(load.shards), key=lambda k: load.presence_bytes[k] + load.ledger_bytes[k])
    hot = load.hottest()
    total_gb = (load.presence_bytes[big] + load.ledger_bytes[big]) / GB
    cpu = load.score_cpu[hot] + load.apply_cpu[hot]
    fits = total_gb <= budget.memory_gb and cpu <= budget.cpu_cores
    why = [] if fits else (
        (["memory"] if total_gb > budget.memory_gb else [])
        + ([f"CPU {cpu:.2f} cores"] if cpu > budget.cpu_cores else []))
    verdict = "yes" if fits else "no: " + ", ".join(why)
    hmget = "-" if load.layout == "today" else f"{load.hmget_cpu[hot]:.2f}"
    return (f"| {load.layout} | {load.shards} | {load.entries[big]:,.0f} "
            f"| {load.presence_bytes[big] / GB:,.1f} | {load.ledger_bytes[big] / GB:,.1f} "
            f"| {total_gb:,.1f} | {rates.scores_per_s * load.score_calls[hot]:,.0f} "
            f"| {rates.scores_per_s * load.score_lookups[hot]:,.0f} "
            f"| {rates.scores_per_s * load.score_reply_bytes[hot] / 1e6:,.1f} "
            f"| {load.score_cpu[hot]:.2f} | {hmget} | {load.apply_ops[hot]:,.0f} "
            f"| {load.apply_cpu[hot]:.2f} | {verdict} |")


def holder_shares(fleet: Fleet) -> str:
    bands = ((1, 1), (2, 10), (11, 100), (101, 1000), (1001, fleet.ranks))
    cells = []
    for low, high in bands:
        share = sum(h * n for h, n in fleet.classes.items() if low <= h <= high) / fleet.entries
        label = f"{low}" if low == high else f"{low:,}-{high:,}"
        cells.append(f"{label}: {share:.2%}")
    return ", ".join(cells)


def fleet_rows(fleet: Fleet, queries: Sequence[Query], cal: Calibration,
               rng: random.Random) -> str:
    matched = sorted(q.matched_blocks for q in queries)
    per_entry = {layout: sum(mean_field_bytes(cal, layout, h, ranks=fleet.ranks, rng=rng)[0] * n
                             for h, n in fleet.classes.items()) / fleet.entries
                 for layout in ("today", "proposed")}
    return "\n".join([
        "| fleet model | |", "|---|---|",
        f"| ranks x blocks per rank | {fleet.ranks:,} x {fleet.blocks_per_rank:,} "
        f"= {fleet.entries:,.0f} entries |",
        f"| routing | {fleet.routing} |",
        f"| session copies F (global ids: used by >= {fleet.global_min} requests) "
        f"| {fleet.session_copies:,.1f} ({len(fleet.global_ids):,} global ids) |",
        f"| distinct blocks | {fleet.distinct_blocks:,.0f} |",
        f"| entries by holders of their block | {holder_shares(fleet)} |",
        f"| presence bytes per entry, today / proposed | {per_entry['today']:,.1f} / "
        f"{per_entry['proposed']:,.1f} |",
        f"| queries (8,192 tokens) | {len(queries):,}; matched blocks p50 "
        f"{matched[len(matched) // 2]}, p90 {matched[int(len(matched) * 0.9)]}, "
        f"mean {sum(matched) / len(matched):.0f} of {QUERY_BLOCKS} |",
    ])


def calibration_rows(cal: Calibration) -> str:
    sizes = ", ".join(f"{length}: {size:.0f}" for length, size in sorted(cal.field_bytes.items()))
    return "\n".join([
        "| measured on a private redis-server | |", "|---|---|",
        f"| bytes per HASH field (8-byte field) by value length | {sizes} |",
        "| Score script (subslot_score.lua) CPU: per call / per key / per reply KB | "
        f"{cal.score_call_us:.1f} us / "
        f"{cal.score_lookup_us:.2f} us / {cal.reply_byte_us * 1024:.2f} us |",
        "| presence write CPU: a holder entry alone / in a 100-holder list / a bit in a "
        "2,500-byte mask (apply.lua's code) / per call "
        f"| {cal.write_op_us:.2f} / {cal.list_write_op_us:.2f} / {cal.wide_write_op_us:.2f} / "
        f"{cal.apply_call_us:.1f} us |",
        f"| plain HMGET CPU: per call / per further key | {cal.hmget_call_us:.1f} us / "
        f"{cal.hmget_key_us:.2f} us |",
    ])


def report(fleets: Sequence[tuple[Fleet, list[Query]]], *, cal: Calibration, rates: Rates,
           budget: Budget, ghosts: int, seed: int) -> str:
    parts = [calibration_rows(cal), "Sub-slot placement on a Redis Cluster (model "
             "`deepseek-ai/DeepSeek-V3`): tags left to CRC16 pile up; tags searched per "
             "shard put one sub-slot on each.\n\n" + placement_rows("deepseek-ai/DeepSeek-V3")]
    for fleet, queries in fleets:
        rng = random.Random(seed)
        parts.append(f"### Routing: {fleet.routing}\n\n" + fleet_rows(fleet, queries, cal, rng))
        rows = [load_row(simulate(fleet, queries, n, layout, cal=cal, rates=rates,
                                  ghosts=ghosts, seed=seed),
                         rates, budget)
                for layout in ("today", "proposed") for n in SHARD_COUNTS]
        parts.append(LOAD_HEADER + "\n" + "\n".join(rows))
    return "\n\n".join(parts)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=10_000)
    parser.add_argument("--blocks-per-rank", type=int, default=100_000)
    parser.add_argument("--ghosts", type=int, default=65_536, help="ledger ghosts per rank")
    parser.add_argument("--trace", type=Path,
                        default=TRACES / "mooncake_conversation_trace.jsonl")
    parser.add_argument("--global-min", type=int, default=32,
                        help="requests using an id for it to be a global (shared) prefix")
    parser.add_argument("--routing", choices=("affinity", "random", "both"), default="both")
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--scores-per-s", type=float, default=10_000)
    parser.add_argument("--store-rate", type=float, default=250,
                        help="blocks each rank stores per second (and evicts as many)")
    parser.add_argument("--batches-per-s", type=float, default=20,
                        help="event batches each rank publishes per second")
    parser.add_argument("--apply-chunk", type=int, default=256)
    parser.add_argument("--shard-memory-gb", type=float, default=25.0)
    parser.add_argument("--shard-cpu", type=float, default=0.7,
                        help="cores of one redis-server's main thread a shard may use")
    parser.add_argument("--seed", type=int, default=20261205)
    parser.add_argument("--no-write", action="store_true", help="print only")
    return parser.parse_args()


def preamble(args: argparse.Namespace, rates: Rates, trace: Trace) -> str:
    return (
        f"One model of {args.ranks:,} ranks x {args.blocks_per_rank:,} blocks (16 tokens), "
        f"prefix sharing from `{trace.name}` ({len(trace.requests):,} requests), "
        f"{rates.scores_per_s:,.0f} Scores/s of 8,192-token queries, each rank storing and "
        f"evicting {rates.store_per_rank_s:,.0f} blocks/s in {rates.batches_per_rank_s:,.0f} "
        f"batches/s (apply chunks of {rates.apply_chunk}); a shard is one redis-server of at "
        f"most {args.shard_memory_gb:,.0f} GB and {args.shard_cpu} of a core. Layouts: "
        "`today` (one hash slot per model, bitmask values) and `proposed` (one sub-slot per "
        "shard by block key, holder-list values, ledgers by rank; docs/large-models.md). "
        "Figures: the largest shard's memory, the hottest shard's work; CPU is redis-server "
        "time from the measured costs below.\n\n" + METHOD)


METHOD = """How it is computed (no billion-entry index is built; `bench/shard_sim.py`'s
docstring has the details). The trace's ids used by at least `--global-min` requests are
global prefixes (one copy in the fleet); the rest is session content, copied F times, F
solved so that the fleet holds exactly ranks x blocks entries. Holders per block follow the
routing: `affinity` keeps a session on one rank and spreads a global prefix over the share
of ranks its load needs; `random` puts each request on a random rank. A block class
(holders, count) costs count fields at the bytes measured for its value length, the
highest holder's slot being sampled for bitmasks; blocks split over shards binomially.
Score: trace requests of at least 8,192 tokens, cut to 8,192, matched up to their first id
not seen earlier; keys placed on shards at random per query; each shard reads its keys in
chunks until its own first unheld key. Apply: stated rates times the measured write costs,
plus position checks and ledger appends per batch."""


def main() -> None:
    args = parse_args()
    rates = Rates(args.scores_per_s, args.store_rate, args.batches_per_s, args.apply_chunk)
    budget = Budget(args.shard_memory_gb, args.shard_cpu)
    server = RedisServer(Path(tempfile.mkdtemp(prefix="bench-shards-"))).start()
    try:
        assert server.proc is not None
        cal = asyncio.run(calibrate(server.url, server.proc.pid, args.seed))
    finally:
        server.stop()
    trace = read_trace(args.trace)
    routings = ("affinity", "random") if args.routing == "both" else (args.routing,)
    fleets = []
    for routing in routings:
        fleet = build_fleet(trace, args.ranks, args.blocks_per_rank, routing, args.global_min)
        fleets.append((fleet, sample_queries(trace, fleet, args.queries,
                                             random.Random(args.seed))))
    body = preamble(args, rates, trace) + "\n\n" + report(
        fleets, cal=cal, rates=rates, budget=budget, ghosts=args.ghosts, seed=args.seed)
    print(body)
    if not args.no_write:
        write_section("shards", "One model larger than a shard: simulation",
                      "make bench-shards", body)


if __name__ == "__main__":
    main()
