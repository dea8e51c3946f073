"""A deterministic shared-prefix workload: what W engines store, and prompts to score.

The model is a chat service behind a prefix-aware router:

- a pool of system prompts (1-4k tokens, picked with a Zipf-like skew);
- conversations = system prompt + turns (user message, then the engine's response);
  some first messages are long documents, so conversations grow past the query length;
- a new conversation goes, most of the time, to a worker that already holds its system
  prompt; a follow-up turn goes back to the worker of the previous turn most of the time;
- an engine stores only what it does not hold yet: the prompt blocks after its longest
  cached prefix (events of at most `max_event_blocks` blocks, like a chunked prefill),
  then one single-block event per response block filled while decoding. One engine step
  (one bus batch) holds a few events.

Everything comes from one seeded `random.Random`, so a seed names a workload. Engine block
hashes are chained xxh3 over the blocks' tokens under an engine-only seed: unique per
content and opaque to the index, like vLLM's. Nothing is ever evicted, so a block a worker
holds always comes with its whole prefix (which makes every index agree on the scores).

Query prompts share prefixes with what was stored: `full` (the first `query_tokens` of a
stored conversation), `partial` (a stored prefix, then fresh tokens) and `miss` (fresh).
"""

from __future__ import annotations

import bisect
import random
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Final, Literal

from kvcore.bus import (
    SCHEMA_VERSION,
    BlockRemoved,
    BlockStored,
    Event,
    EventBatch,
    pack_tokens,
    unpack_tokens,
)
from kvcore.keys import block_keys

__all__ = [
    "DEFAULT_SEED",
    "EngineStep",
    "Query",
    "QueryKind",
    "StoreOp",
    "Workload",
    "WorkloadParams",
    "check_prefix_closed",
    "dynamo_tokens",
    "make_workload",
    "pool_expected",
    "pool_mounts",
    "worker_name",
]

ENGINE_SEED: Final = 0x5EED_0F_E5_61_4E_00_01  # roots the engine hashes (not the index keys)
DEFAULT_SEED: Final = 20_261_101

QueryKind = Literal["full", "partial", "miss"]


def worker_name(worker: int) -> str:
    """The bus `worker_id` of worker number `worker` (Dynamo gets the number itself)."""
    return f"worker-{worker:03d}"


@dataclass(frozen=True, slots=True)
class WorkloadParams:
    n_workers: int = 64
    total_blocks: int = 300_000  # stop once at least this many blocks were stored
    seed: int = DEFAULT_SEED
    block_size: int = 16
    n_queries: int = 500
    query_tokens: int = 8_192
    n_system_prompts: int = 64
    system_tokens: tuple[int, int] = (1_024, 4_096)
    max_event_blocks: int = 32  # prefill events are chunked to this many blocks
    max_events_per_step: int = 4
    p_new_conversation: float = 0.3
    p_route_to_holder: float = 0.75  # new conversation -> a worker holding its system prompt
    p_sticky: float = 0.85  # follow-up turn -> the worker of the previous turn
    p_document: float = 0.25  # first message is a long document
    max_conversation_tokens: int = 16_384
    query_mix: tuple[float, float, float] = (0.3, 0.5, 0.2)  # full, partial, miss


@dataclass(frozen=True, slots=True)
class StoreOp:
    """One BlockStored event: consecutive new blocks of one sequence on one worker."""

    parent_hash: int | None
    block_hashes: list[int]
    token_ids: bytes  # block_size little-endian u32 tokens per block


@dataclass(frozen=True, slots=True)
class EngineStep:
    """The events one engine step of one worker produced (one bus batch)."""

    worker: int
    events: list[StoreOp]


@dataclass(frozen=True, slots=True)
class Query:
    kind: QueryKind  # token ids are drawn from [0, 65536)
    tokens: list[int]


@dataclass(frozen=True)
class Workload:
    params: WorkloadParams
    steps: list[EngineStep]  # global order; per worker in engine order
    query_set: list[Query]
    conversations: int = 0
    requests: int = 0
    blocks: int = field(init=False)
    events: int = field(init=False)

    def __post_init__(self) -> None:
        events = [op for step in self.steps for op in step.events]
        object.__setattr__(self, "events", len(events))
        object.__setattr__(self, "blocks", sum(len(op.block_hashes) for op in events))

    @property
    def queries(self) -> list[list[int]]:
        return [q.tokens for q in self.query_set]

    def batches(self, model: str, epoch: int = 1) -> list[EventBatch]:
        """The bus batches of every step: gapless `seq` per worker from 0, one `epoch`."""
        seqs = [0] * self.params.n_workers
        names = [worker_name(w) for w in range(self.params.n_workers)]
        block_size = self.params.block_size
        out: list[EventBatch] = []
        for n, step in enumerate(self.steps):
            w = step.worker
            events: list[Event] = [
                BlockStored(block_hashes=op.block_hashes, parent_hash=op.parent_hash,
                            token_ids=op.token_ids, block_size=block_size)
                for op in step.events
            ]
            out.append(EventBatch(schema=SCHEMA_VERSION, model=model, worker_id=names[w],
                                  epoch=epoch, seq=seqs[w], events=events, ts=float(n)))
            seqs[w] += 1
        return out

    def idle_rank_batches(self, model: str, epoch: int = 1) -> list[EventBatch]:
        """One batch for each worker the steps never served: a block of tokens of its own,
        so that every one of `n_workers` is a live rank of the index (apply after
        `batches`)."""
        served = {step.worker for step in self.steps}
        size = self.params.block_size
        out: list[EventBatch] = []
        for w in range(self.params.n_workers):
            if w in served:
                continue
            tokens = pack_tokens([70_000 + w] * size)  # outside the prompts' [0, 65536)
            event = BlockStored(block_hashes=[w + 1], token_ids=tokens, block_size=size)
            out.append(EventBatch(schema=SCHEMA_VERSION, model=model, worker_id=worker_name(w),
                                  epoch=epoch, seq=0, events=[event], ts=0.0))
        return out

    def pool_batches(self, model: str, pool: str, epoch: int = 1) -> list[EventBatch]:
        """`batches`, each also offloading the blocks it stores into the shared storage
        pool `pool` (a write-through store, as LMCache's): the pool ends up holding every
        block any worker stored."""
        out = self.batches(model, epoch)
        for batch in out:
            hashes = [h for event in batch.events if isinstance(event, BlockStored)
                      for h in event.block_hashes]
            batch.events.append(BlockStored(block_hashes=hashes, medium="storage", pool=pool))
        return out

    def hybrid_batches(self, model: str, window_blocks: int = 8,
                       epoch: int = 1) -> list[EventBatch]:
        """`batches` of a hybrid-attention model: every store is also stored in KV-cache
        group 1, a sliding window of `window_blocks` blocks, which frees a chain's blocks
        once they left the window of the blocks that extend the chain (a window group
        under memory pressure). Group 0 is full attention, as in `batches`."""
        seqs = [0] * self.params.n_workers
        names = [worker_name(w) for w in range(self.params.n_workers)]
        block_size = self.params.block_size
        window_tokens = window_blocks * block_size
        # per worker: chain tip -> the window of blocks ending there; group 1's blocks
        windows: list[dict[int, tuple[int, ...]]] = [{} for _ in names]
        held: list[set[int]] = [set() for _ in names]
        out: list[EventBatch] = []
        for n, step in enumerate(self.steps):
            w = step.worker
            events: list[Event] = []
            for op in step.events:
                for group in (0, 1):
                    events.append(BlockStored(
                        block_hashes=op.block_hashes, parent_hash=op.parent_hash,
                        token_ids=op.token_ids, block_size=block_size, group=group,
                        group_kind="sliding_window" if group else None,
                        sliding_window=window_tokens if group else 0))
                parent = () if op.parent_hash is None else windows[w].get(op.parent_hash, ())
                window = [*parent, *op.block_hashes]
                windows[w][op.block_hashes[-1]] = tuple(window[-window_blocks:])
                held[w].update(op.block_hashes)
                gone = [h for h in window[:-window_blocks] if h in held[w]]
                if gone:
                    held[w].difference_update(gone)
                    events.append(BlockRemoved(block_hashes=gone, group=1))
            out.append(EventBatch(schema=SCHEMA_VERSION, model=model, worker_id=names[w],
                                  epoch=epoch, seq=seqs[w], events=events, ts=float(n)))
            seqs[w] += 1
        return out

    def describe(self) -> dict[str, str]:
        p = self.params
        kinds = {k: sum(1 for q in self.query_set if q.kind == k) for k in ("full", "partial",
                                                                            "miss")}
        return {
            "workers": str(p.n_workers),
            "block size": f"{p.block_size} tokens",
            "seed": str(p.seed),
            "system prompts": f"{p.n_system_prompts} of {p.system_tokens[0]:,}-"
                              f"{p.system_tokens[1]:,} tokens",
            "conversations / requests": f"{self.conversations:,} / {self.requests:,}",
            "blocks stored": f"{self.blocks:,}",
            "events / batches": f"{self.events:,} / {len(self.steps):,} "
                                f"({self.blocks / max(self.events, 1):.1f} blocks per event, "
                                f"prefill events <= {p.max_event_blocks} blocks, "
                                f"decode events 1 block)",
            "queries": f"{len(self.query_set)} of {p.query_tokens:,} tokens "
                       f"({kinds['full']} full, {kinds['partial']} partial, "
                       f"{kinds['miss']} miss)",
        }


class _Conversation:
    __slots__ = ("hashes", "system", "tokens", "turns", "worker")

    def __init__(self, system: int, tokens: array[int], hashes: list[int], worker: int):
        self.system = system
        self.tokens = tokens
        self.hashes = hashes  # engine hashes of the full blocks
        self.worker = worker
        self.turns = 0


class _Generator:
    def __init__(self, params: WorkloadParams) -> None:
        if params.n_workers <= 0 or params.total_blocks <= 0 or params.block_size <= 0:
            raise ValueError("n_workers, total_blocks and block_size must be > 0")
        self.p = params
        self.rng = random.Random(params.seed)
        self.held: list[set[int]] = [set() for _ in range(params.n_workers)]
        self.holders: list[list[int]] = [[] for _ in range(params.n_system_prompts)]
        self.steps: list[EngineStep] = []
        self.live: list[_Conversation] = []
        self.done: list[_Conversation] = []
        self.stored = 0
        self.requests = 0
        self.conversations = 0
        lo, hi = params.system_tokens
        self.systems = [self.fresh(self.rng.randint(lo, hi))
                        for _ in range(params.n_system_prompts)]
        self.system_weights = [1.0 / (i + 1) ** 0.8 for i in range(params.n_system_prompts)]

    # --- tokens and hashes -------------------------------------------------------------

    def fresh(self, n: int) -> array[int]:
        raw = array("H")
        raw.frombytes(self.rng.randbytes(n * 2))
        return array("I", raw)

    def extend(self, conv: _Conversation, new: array[int]) -> None:
        conv.tokens.extend(new)
        bs = self.p.block_size
        start, end = len(conv.hashes), len(conv.tokens) // bs
        if end > start:
            seed = conv.hashes[-1] if conv.hashes else ENGINE_SEED
            conv.hashes.extend(block_keys(pack_tokens(conv.tokens[start * bs:end * bs]), bs, seed))

    # --- the engine --------------------------------------------------------------------

    def store(self, worker: int, conv: _Conversation, upto: int, *, decode: bool) -> None:
        """Worker `worker` caches blocks [0, upto) of `conv`: emit what it lacks."""
        held = self.held[worker]
        hashes = conv.hashes
        # Held blocks form a prefix of every sequence (no eviction): binary search its end.
        first = bisect.bisect_left(range(upto), True, key=lambda i: hashes[i] not in held)
        if first >= upto:
            return
        chunk = 1 if decode else self.p.max_event_blocks
        bs = self.p.block_size
        ops: list[StoreOp] = []
        for lo in range(first, upto, chunk):
            hi = min(lo + chunk, upto)
            ops.append(StoreOp(parent_hash=hashes[lo - 1] if lo else None,
                               block_hashes=hashes[lo:hi],
                               token_ids=pack_tokens(conv.tokens[lo * bs:hi * bs])))
        held.update(hashes[first:upto])
        self.stored += upto - first
        i = 0
        while i < len(ops):
            n = self.rng.randint(1, self.p.max_events_per_step)
            self.steps.append(EngineStep(worker, ops[i:i + n]))
            i += n

    def serve(self, conv: _Conversation, worker: int, message: array[int]) -> None:
        """One turn: prefill the prompt (conversation + message), then decode a response."""
        bs = self.p.block_size
        conv.worker = worker
        self.extend(conv, message)
        self.store(worker, conv, len(conv.tokens) // bs, decode=False)
        self.extend(conv, self.fresh(self.rng.randint(32, 512)))
        self.store(worker, conv, len(conv.tokens) // bs, decode=True)
        conv.turns += 1
        self.requests += 1

    def new_conversation(self) -> None:
        rng, p = self.rng, self.p
        system = rng.choices(range(p.n_system_prompts), self.system_weights)[0]
        holders = self.holders[system]
        if holders and rng.random() < p.p_route_to_holder:
            worker = rng.choice(holders)
        else:
            worker = rng.randrange(p.n_workers)
        conv = _Conversation(system, array("I"), [], worker)
        self.extend(conv, self.systems[system])
        if rng.random() < p.p_document:
            message = self.fresh(rng.randint(2_048, 6_144))
        else:
            message = self.fresh(rng.randint(32, 1_024))
        self.serve(conv, worker, message)
        if worker not in holders:
            holders.append(worker)
        self.live.append(conv)
        self.conversations += 1

    def follow_up(self) -> None:
        rng, p = self.rng, self.p
        i = rng.randrange(len(self.live))
        conv = self.live[i]
        worker = conv.worker if rng.random() < p.p_sticky else rng.randrange(p.n_workers)
        self.serve(conv, worker, self.fresh(rng.randint(16, 512)))
        if len(conv.tokens) >= p.max_conversation_tokens:
            self.live[i] = self.live[-1]
            self.live.pop()
            self.done.append(conv)

    def run(self) -> None:
        while self.stored < self.p.total_blocks:
            if not self.live or self.rng.random() < self.p.p_new_conversation:
                self.new_conversation()
            else:
                self.follow_up()

    # --- queries -----------------------------------------------------------------------

    def queries(self) -> list[Query]:
        rng, p = self.rng, self.p
        n_tokens = p.query_tokens
        convs = self.live + self.done
        long = [c for c in convs if len(c.tokens) >= n_tokens]
        out: list[Query] = []
        for _ in range(p.n_queries):
            kind: QueryKind = rng.choices(("full", "partial", "miss"), p.query_mix)[0]
            if kind == "full" and not long:
                kind = "partial"
            if kind == "full":
                tokens = rng.choice(long).tokens[:n_tokens]
            elif kind == "partial":
                conv = rng.choice(convs)
                stop = min(len(conv.tokens), n_tokens - p.block_size)
                # Half are a new turn of a stored conversation, half cut it anywhere.
                cut = stop if rng.random() < 0.5 else rng.randint(1, stop)
                tokens = conv.tokens[:cut] + self.fresh(n_tokens - cut)
            else:
                tokens = self.fresh(n_tokens)
            out.append(Query(kind, tokens.tolist()))
        return out


def make_workload(
    n_workers: int = 64,
    total_blocks: int = 300_000,
    seed: int = DEFAULT_SEED,
    *,
    n_queries: int = 500,
    params: WorkloadParams | None = None,
) -> Workload:
    """Build the workload; `params` (if given) sets the other knobs."""
    params = replace(params or WorkloadParams(), n_workers=n_workers,
                     total_blocks=total_blocks, seed=seed, n_queries=n_queries)
    gen = _Generator(params)
    gen.run()
    return Workload(params, gen.steps, gen.queries(), conversations=gen.conversations,
                    requests=gen.requests)


def pool_mounts(n_workers: int, pool: str) -> dict[str, frozenset[str]]:
    """The pool workload's mounts: every other worker (even numbers) mounts `pool`."""
    return {worker_name(w): frozenset({pool}) for w in range(0, n_workers, 2)}


def pool_expected(plain: dict[str, int], mounts: dict[str, frozenset[str]]) -> dict[str, int]:
    """Per worker, what Score must answer on the pool workload, from the plain answer: the
    pool holds every stored block (each worker's blocks are prefix-closed, so their union
    is too), so a mounting worker matches the longest prefix any worker holds."""
    best = max(plain.values(), default=0)
    out = dict(plain)
    if best:
        out.update(dict.fromkeys(mounts, best))
    return out


def dynamo_tokens(op: StoreOp) -> list[int]:
    """An event's tokens as the list of ints Dynamo's hashing takes."""
    return unpack_tokens(op.token_ids)


def check_prefix_closed(steps: Sequence[EngineStep]) -> None:
    """Every event's parent was stored before on the same worker (a self-test)."""
    seen: dict[int, set[int]] = {}
    for step in steps:
        held = seen.setdefault(step.worker, set())
        for op in step.events:
            if op.parent_hash is not None and op.parent_hash not in held:
                raise AssertionError(f"worker {step.worker}: unknown parent {op.parent_hash}")
            held.update(op.block_hashes)
