"""Mock vLLM engines that speak the real ZMQ wire, and a fleet driver (`kv-sim engines`).

Three layers, each usable alone:

- `BlockPool`: one worker rank's prefix cache (pure, no I/O). An LRU of GPU blocks, an
  optional CPU offload LRU, engine block hashes (the `kvcore.keys` chain, started from a
  per-process seed rather than a model's root) and the KV events each request causes.
- `MockEngine`: a `BlockPool` behind vLLM's transport. A PUB socket sends
  `[topic, seq (8-byte big-endian), payload]`, where the payload is the msgpack batch
  `[ts, events, dp_rank]` encoded with msgspec like the engine does (`wire="map"`: vLLM >= 0.24,
  `"positional"`: <= 0.23, `"sglang"`). An optional ROUTER socket answers replay requests from
  a buffer of the last `buffer_steps` batches. `drop_next(n)` makes gaps, `restart()` behaves
  like a new engine process (seq back to 0, new hash seed, empty cache, no AllBlocksCleared).
- `MockFleet` / `run_fleet` / `main`: several workers (times DP ranks, rank r on port + r like
  vLLM) fed from a Mooncake trace (`trace_tokens`) or synthetic shared-prefix prompts.

The replay socket is served by a thread, so an engine works from sync and async code alike;
the PUB socket belongs to the thread that calls `serve` / `clear` / `restart`.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import random
import sys
import threading
import time
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Self
from urllib.parse import urlsplit

import msgspec
import xxhash
import zmq

from kvcore.bus import engine_hash_to_u64
from kvcore.helpfmt import DefaultsHelpFormatter
from kvcore.keys import block_keys
from publisher.engines import END_MARKER_SEQ

__all__ = [
    "DEFAULT_BASE_PORT",
    "TRACE_BLOCK_TOKENS",
    "BlockPool",
    "EngineStats",
    "FleetStats",
    "HashForm",
    "MockEngine",
    "MockFleet",
    "PoolCleared",
    "PoolEvent",
    "PoolRemoved",
    "PoolStored",
    "ReplayForm",
    "TraceRecord",
    "WireForm",
    "encode_wire_batch",
    "load_trace",
    "main",
    "offset_endpoint",
    "run_fleet",
    "synthetic_prompts",
    "trace_tokens",
]

WireForm = Literal["map", "positional", "sglang"]
ReplayForm = Literal["topic", "seq"]  # [topic, seq, payload] (vLLM >= 0.26) or [seq, payload]
HashForm = Literal["u64", "bytes"]  # ints (vLLM default) or raw digests (INT_BLOCK_HASHES=0)

DEFAULT_BASE_PORT: Final = 5557
TRACE_BLOCK_TOKENS: Final = 512
# Tag of the SHAKE-128 stream a trace hash id expands into token ids (`trace_tokens`): a
# token generator, not a block key (block keys are `kvcore.keys`).
_TRACE_TOKENS_SCHEME: Final = b"kv-indexer/trace-block/v1"
_U64: Final = 0xFFFF_FFFF_FFFF_FFFF
_POLL_MS: Final = 50


# --- the pool ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PoolStored:
    """Blocks entered a tier; `token_ids` is empty for offloaded (token-less) copies."""

    block_hashes: list[int]
    parent_hash: int | None
    token_ids: list[int]
    block_size: int
    medium: Literal["gpu", "cpu"]


@dataclass(frozen=True, slots=True)
class PoolRemoved:
    block_hashes: list[int]
    medium: Literal["gpu", "cpu"]


@dataclass(frozen=True, slots=True)
class PoolCleared:
    pass


PoolEvent = PoolStored | PoolRemoved | PoolCleared


class BlockPool:
    """One worker rank's prefix cache: GPU LRU, optional CPU offload LRU, chained hashes.

    A request's blocks are touched last block first, so the tail of a sequence is evicted
    before its head (like vLLM, which frees a request's blocks in reverse order). A prompt
    with more full blocks than the GPU holds caches only its first `capacity_blocks`.
    """

    def __init__(
        self,
        *,
        capacity_blocks: int,
        block_size: int = 16,
        cpu_capacity_blocks: int = 0,
        seed: int = 0,
    ) -> None:
        if capacity_blocks <= 0 or block_size <= 0 or cpu_capacity_blocks < 0:
            raise ValueError("capacity_blocks and block_size must be > 0, cpu capacity >= 0")
        self.capacity_blocks = capacity_blocks
        self.block_size = block_size
        self.cpu_capacity_blocks = cpu_capacity_blocks
        self.seed = seed
        self.gpu: OrderedDict[int, None] = OrderedDict()  # first = least recently used
        self.cpu: OrderedDict[int, None] = OrderedDict()

    def block_hashes(self, tokens: Sequence[int]) -> list[int]:
        """Engine hashes of the prompt's full blocks (at most `capacity_blocks`): the block-key
        chain (`kvcore.keys.block_keys`) started from this process's seed instead of a model's
        root, so they are opaque to the index like vLLM's."""
        bs = self.block_size
        n_blocks = min(len(tokens) // bs, self.capacity_blocks)
        return block_keys(tokens[: n_blocks * bs], bs, self.seed)

    def matched_blocks(self, packed: bytes, query_blocks: int) -> int:
        """Leading blocks of a packed prompt (u32 little-endian) that either tier holds."""
        n = min(query_blocks, self.capacity_blocks)
        keys = block_keys(memoryview(packed)[: n * self.block_size * 4], self.block_size,
                          self.seed)
        gpu, cpu = self.gpu, self.cpu
        matched = 0
        for h in keys:
            if h not in gpu and h not in cpu:
                break
            matched += 1
        return matched

    def serve(self, tokens: Sequence[int]) -> tuple[int, list[PoolEvent]]:
        """Cache the prompt's full blocks; return (cached prefix tokens, events in order)."""
        hashes = self.block_hashes(tokens)
        hit = 0
        for h in hashes:
            if h not in self.gpu and h not in self.cpu:
                break
            hit += 1
        protected = set(hashes)
        missing = [i for i, h in enumerate(hashes) if h not in self.gpu]
        events: list[PoolEvent] = []
        overflow = len(self.gpu) + len(missing) - self.capacity_blocks
        if overflow > 0:
            self._evict_gpu(overflow, protected, events)
        for run in _runs(missing):
            first, last = run[0], run[-1]
            events.append(
                PoolStored(
                    block_hashes=[hashes[i] for i in run],
                    parent_hash=hashes[first - 1] if first > 0 else None,
                    token_ids=list(tokens[first * self.block_size : (last + 1) * self.block_size]),
                    block_size=self.block_size,
                    medium="gpu",
                )
            )
        for h in reversed(hashes):
            if h in self.gpu:
                self.gpu.move_to_end(h)
            else:
                self.gpu[h] = None
            if h in self.cpu:
                self.cpu.move_to_end(h)
        return hit * self.block_size, events

    def clear(self) -> list[PoolEvent]:
        """Drop both tiers (one AllBlocksCleared for the rank)."""
        self.gpu.clear()
        self.cpu.clear()
        return [PoolCleared()]

    def reset(self, seed: int) -> None:
        """A new engine process: empty tiers and a new hash seed, no events."""
        self.gpu.clear()
        self.cpu.clear()
        self.seed = seed

    def _evict_gpu(self, count: int, protected: set[int], events: list[PoolEvent]) -> None:
        victims: list[int] = []
        for h in self.gpu:
            if h not in protected:
                victims.append(h)
                if len(victims) == count:
                    break
        for h in victims:
            del self.gpu[h]
        events.append(PoolRemoved(victims, "gpu"))
        if self.cpu_capacity_blocks > 0:
            self._offload(victims, protected, events)

    def _offload(self, blocks: list[int], protected: set[int], events: list[PoolEvent]) -> None:
        """Copy GPU victims to the CPU LRU: one CPU removal event, then one token-less store."""
        removed: dict[int, None] = {}
        stored: dict[int, None] = {}
        for h in blocks:
            if h in self.cpu:
                self.cpu.move_to_end(h)
                continue
            if len(self.cpu) >= self.cpu_capacity_blocks:
                victim = next((v for v in self.cpu if v not in protected), None)
                if victim is None:
                    continue  # every CPU block belongs to the request being served
                del self.cpu[victim]
                if victim in stored:
                    del stored[victim]  # came and went in this step: never announced
                else:
                    removed[victim] = None
            self.cpu[h] = None
            stored[h] = None
        if removed:
            events.append(PoolRemoved(list(removed), "cpu"))
        if stored:
            events.append(PoolStored(list(stored), None, [], 0, "cpu"))


def _runs(indices: list[int]) -> list[list[int]]:
    """Split sorted indices into runs of consecutive values."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


# --- the engine wire (msgspec structs shaped like the engines' own) ----------------------


class _MapEvent(msgspec.Struct, omit_defaults=True, gc=False, tag_field="type", tag=True):
    """vLLM >= 0.24: maps tagged by "type", default fields omitted."""


class _MapStored(_MapEvent, tag="BlockStored"):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = "GPU"
    lora_name: str | None = None


class _MapRemoved(_MapEvent, tag="BlockRemoved"):
    block_hashes: list[int | bytes]
    medium: str | None = "GPU"


class _MapCleared(_MapEvent, tag="AllBlocksCleared"):
    pass


class _PosEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    """vLLM <= 0.23 and SGLang: arrays whose first element is the tag."""


class _PosStored(_PosEvent, tag="BlockStored"):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None = None


class _PosRemoved(_PosEvent, tag="BlockRemoved"):
    block_hashes: list[int | bytes]
    medium: str | None


class _PosCleared(_PosEvent, tag="AllBlocksCleared"):
    pass


class _SGLangStored(_PosEvent, tag="BlockStored"):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None = None


class _SGLangRemoved(_PosEvent, tag="BlockRemoved"):
    block_hashes: list[int | bytes]
    medium: str | None = None


class _WireBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


_MEDIUM_NAMES: Final[dict[WireForm, dict[str, str]]] = {
    "map": {"gpu": "GPU", "cpu": "CPU"},
    "positional": {"gpu": "GPU", "cpu": "CPU"},
    "sglang": {"gpu": "GPU", "cpu": "CPU_PINNED"},
}

_wire_encoder: Final = msgspec.msgpack.Encoder()


def _wire_hash(h: int, form: HashForm) -> int | bytes:
    return h if form == "u64" else h.to_bytes(8, "big") * 4


def _wire_event(event: PoolEvent, wire: WireForm, form: HashForm) -> msgspec.Struct:
    if isinstance(event, PoolCleared):
        return _MapCleared() if wire == "map" else _PosCleared()
    hashes: list[int | bytes] = (
        list(event.block_hashes)
        if form == "u64"
        else [_wire_hash(h, form) for h in event.block_hashes]
    )
    medium = _MEDIUM_NAMES[wire][event.medium]
    if isinstance(event, PoolRemoved):
        if wire == "map":
            return _MapRemoved(hashes, medium)
        return (
            _PosRemoved(hashes, medium) if wire == "positional" else _SGLangRemoved(hashes, medium)
        )
    parent = None if event.parent_hash is None else _wire_hash(event.parent_hash, form)
    args = (hashes, parent, event.token_ids, event.block_size)
    if wire == "map":
        return _MapStored(*args, medium=medium)
    if wire == "positional":
        return _PosStored(*args, None, medium)
    return _SGLangStored(*args, None, medium)


def encode_wire_batch(
    events: Sequence[PoolEvent],
    *,
    wire: WireForm = "map",
    hash_form: HashForm = "u64",
    dp_rank: int | None = 0,
    ts: float | None = None,
) -> bytes:
    """The msgpack payload an engine would send for these events."""
    batch = _WireBatch(
        time.time() if ts is None else ts,
        [_wire_event(e, wire, hash_form) for e in events],
        dp_rank,
    )
    return _wire_encoder.encode(batch)


# --- one engine -------------------------------------------------------------------------


@dataclass(slots=True)
class EngineStats:
    requests: int = 0
    prompt_tokens: int = 0
    hit_tokens: int = 0
    batches: int = 0
    dropped_batches: int = 0
    events: int = 0
    stored_blocks: int = 0
    removed_blocks: int = 0

    def add(self, other: EngineStats) -> None:
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.hit_tokens += other.hit_tokens
        self.batches += other.batches
        self.dropped_batches += other.dropped_batches
        self.events += other.events
        self.stored_blocks += other.stored_blocks
        self.removed_blocks += other.removed_blocks

    def minus(self, earlier: EngineStats) -> EngineStats:
        """What these counters gained since `earlier`."""
        out = EngineStats()
        for f in fields(out):
            setattr(out, f.name, getattr(self, f.name) - getattr(earlier, f.name))
        return out


class MockEngine:
    """One vLLM worker rank: a `BlockPool` publishing its KV events over ZMQ like vLLM.

    Endpoints may use port `*` (e.g. "tcp://127.0.0.1:*"); after `start()`, `endpoint` and
    `replay_endpoint` hold the bound addresses. Batches made before `start()` or while a
    drop is pending are buffered for replay but not published.
    """

    def __init__(
        self,
        *,
        capacity_blocks: int,
        block_size: int = 16,
        cpu_capacity_blocks: int = 0,
        endpoint: str = f"tcp://127.0.0.1:{DEFAULT_BASE_PORT}",
        replay_endpoint: str | None = None,
        topic: str = "",
        wire: WireForm = "map",
        replay_form: ReplayForm | None = None,
        hash_form: HashForm = "u64",
        dp_rank: int = 0,
        buffer_steps: int = 10_000,
        max_events_per_batch: int | None = None,
        seed: int = 0,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        if buffer_steps <= 0 or (max_events_per_batch is not None and max_events_per_batch <= 0):
            raise ValueError("buffer_steps and max_events_per_batch must be > 0")
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic.encode()
        self.wire: WireForm = wire
        self.replay_form: ReplayForm = replay_form or ("topic" if wire == "map" else "seq")
        self.hash_form: HashForm = hash_form
        self.dp_rank = dp_rank
        self.max_events_per_batch = max_events_per_batch
        self.base_seed = seed
        self.generation = 0  # bumped by restart(): a new process, a new hash seed
        self.pool = BlockPool(
            capacity_blocks=capacity_blocks,
            block_size=block_size,
            cpu_capacity_blocks=cpu_capacity_blocks,
            seed=self._process_seed(),
        )
        self.stats = EngineStats()
        self.seq = 0  # seq of the next batch
        self._drop = 0
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._lock = threading.Lock()
        self._owns_context = context is None
        self._context: zmq.Context[Any] | None = context
        self._pub: zmq.Socket[bytes] | None = None
        self._replay_thread: threading.Thread | None = None
        self._stop = threading.Event()

    # lifecycle

    def start(self) -> Self:
        """Bind the PUB (and ROUTER) sockets and start answering replay requests."""
        if self._pub is not None:
            return self
        if self._context is None:
            self._context = zmq.Context()
        pub = self._context.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.bind(self.endpoint)
        self.endpoint = _last_endpoint(pub)
        self._pub = pub
        if self.replay_endpoint is not None:
            router = self._context.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            router.bind(self.replay_endpoint)
            self.replay_endpoint = _last_endpoint(router)
            self._stop.clear()
            self._replay_thread = threading.Thread(
                target=self._serve_replay,
                args=(router,),
                name=f"mock-engine-replay-{self.dp_rank}",
                daemon=True,
            )
            self._replay_thread.start()
        return self

    def close(self) -> None:
        """Stop the replay thread and close the sockets (and the context if it is ours)."""
        self._stop.set()
        if self._replay_thread is not None:
            self._replay_thread.join()
            self._replay_thread = None
        if self._pub is not None:
            self._pub.close(linger=0)
            self._pub = None
        if self._owns_context and self._context is not None:
            self._context.term()
            self._context = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.close)

    # engine behaviour

    def serve(self, tokens: Sequence[int]) -> int:
        """Run one request: publish its KV events as one batch; return its cached tokens."""
        hit, events = self.pool.serve(tokens)
        self.stats.requests += 1
        self.stats.prompt_tokens += len(tokens)
        self.stats.hit_tokens += hit
        self._emit(events)
        return hit

    def clear(self) -> None:
        """Reset the prefix cache (vLLM's reset_prefix_cache): one AllBlocksCleared."""
        self._emit(self.pool.clear())

    def restart(self) -> None:
        """Behave like a new engine process: seq 0, new hash seed, empty cache and buffer."""
        self.generation += 1
        self.pool.reset(self._process_seed())
        with self._lock:
            self._buffer.clear()
            self.seq = 0
        self._drop = 0

    def drop_next(self, n: int = 1) -> None:
        """Produce and buffer the next `n` batches without publishing them (a live gap)."""
        self._drop += n

    def publish_raw(self, frames: Sequence[bytes]) -> None:
        """Send arbitrary frames on the PUB socket (tests: probes, malformed messages).

        Nothing is buffered and seq does not move.
        """
        if self._pub is None:
            raise RuntimeError("engine not started")
        self._pub.send_multipart(list(frames))

    def cached(self) -> dict[str, set[int]]:
        """The blocks each tier holds, as the bus names them (u64 of the wire hash)."""
        return {
            "gpu": {engine_hash_to_u64(_wire_hash(h, self.hash_form)) for h in self.pool.gpu},
            "cpu": {engine_hash_to_u64(_wire_hash(h, self.hash_form)) for h in self.pool.cpu},
        }

    # internals

    def _process_seed(self) -> int:
        return xxhash.xxh3_64_intdigest(
            f"mock-engine/{self.base_seed}/{self.dp_rank}/{self.generation}".encode()
        )

    def _emit(self, events: list[PoolEvent]) -> None:
        if not events:
            return  # vLLM publishes nothing for a step without events
        size = self.max_events_per_batch or len(events)
        for start in range(0, len(events), size):
            chunk = events[start : start + size]
            payload = encode_wire_batch(
                chunk, wire=self.wire, hash_form=self.hash_form, dp_rank=self.dp_rank
            )
            self._count(chunk)
            self._publish(payload)

    def _count(self, events: list[PoolEvent]) -> None:
        self.stats.events += len(events)
        for event in events:
            if isinstance(event, PoolStored):
                self.stats.stored_blocks += len(event.block_hashes)
            elif isinstance(event, PoolRemoved):
                self.stats.removed_blocks += len(event.block_hashes)

    def _publish(self, payload: bytes) -> None:
        with self._lock:
            seq = self.seq
            self.seq += 1
            self._buffer.append((seq, payload))
        self.stats.batches += 1
        if self._drop > 0:
            self._drop -= 1
            self.stats.dropped_batches += 1
            return
        if self._pub is not None:
            self._pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload])

    def _serve_replay(self, router: zmq.Socket[bytes]) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if poller.poll(_POLL_MS):
                    self._answer_replay(router, router.recv_multipart())
        finally:
            router.close(linger=0)

    def _answer_replay(self, router: zmq.Socket[bytes], frames: list[bytes]) -> None:
        if len(frames) != 3 or frames[1] != b"" or len(frames[2]) != 8:
            return  # vLLM ignores malformed requests too
        identity = frames[0]
        start_seq = int.from_bytes(frames[2], "big")
        with self._lock:
            batches = [(seq, payload) for seq, payload in self._buffer if seq >= start_seq]
        head = [identity, b""] if self.replay_form == "seq" else [identity, b"", self.topic]
        for seq, payload in batches:
            router.send_multipart([*head, seq.to_bytes(8, "big"), payload])
        router.send_multipart([*head, END_MARKER_SEQ, b""])


def _last_endpoint(sock: zmq.Socket[bytes]) -> str:
    endpoint = sock.getsockopt(zmq.LAST_ENDPOINT)
    return endpoint.decode() if isinstance(endpoint, bytes) else str(endpoint)


def offset_endpoint(endpoint: str, offset: int) -> str:
    """The endpoint of DP rank `offset`: vLLM adds the rank to the TCP port."""
    if offset == 0:
        return endpoint
    parts = urlsplit(endpoint)
    if parts.scheme != "tcp" or parts.port is None:
        raise ValueError(f"cannot offset {endpoint!r}: only tcp endpoints with a port")
    host = parts.netloc.rsplit(":", 1)[0]
    return f"tcp://{host}:{parts.port + offset}"


# --- a fleet ----------------------------------------------------------------------------


class MockFleet:
    """`n_workers` engines of `dp_size` ranks each, on consecutive ports like vLLM.

    Worker w owns ports from `base_port + 2 * dp_size * w`: its DP ranks publish on that
    port + r and answer replay on that port + dp_size + r (one worker of one rank: 5557 and
    5558, vLLM's defaults). `base_port=0` binds every socket to a free port instead.
    """

    def __init__(
        self,
        *,
        n_workers: int,
        capacity_blocks: int,
        block_size: int = 16,
        dp_size: int = 1,
        base_port: int = DEFAULT_BASE_PORT,
        host: str = "127.0.0.1",
        replay: bool = True,
        **engine_options: Any,
    ) -> None:
        if n_workers <= 0 or dp_size <= 0:
            raise ValueError("n_workers and dp_size must be > 0")
        self.context: zmq.Context[Any] = zmq.Context()
        self.engines: list[list[MockEngine]] = []
        for w in range(n_workers):
            ranks: list[MockEngine] = []
            for r in range(dp_size):
                pub, rep = _fleet_endpoints(host, base_port, w, r, dp_size)
                ranks.append(
                    MockEngine(
                        capacity_blocks=capacity_blocks,
                        block_size=block_size,
                        endpoint=pub,
                        replay_endpoint=rep if replay else None,
                        dp_rank=r,
                        seed=w,
                        context=self.context,
                        **engine_options,
                    )
                )
            self.engines.append(ranks)
        self._next_rank = [0] * n_workers

    def start(self) -> Self:
        for engine in self.all_engines():
            engine.start()
        return self

    def close(self) -> None:
        for engine in self.all_engines():
            engine.close()
        self.context.term()

    async def __aenter__(self) -> Self:
        return self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.close)

    def all_engines(self) -> list[MockEngine]:
        return [engine for ranks in self.engines for engine in ranks]

    def serve(self, worker: int, tokens: Sequence[int]) -> int:
        """Send a request to `worker`; its DP ranks take turns."""
        ranks = self.engines[worker]
        rank = self._next_rank[worker]
        self._next_rank[worker] = (rank + 1) % len(ranks)
        return ranks[rank].serve(tokens)

    def stats(self) -> EngineStats:
        total = EngineStats()
        for engine in self.all_engines():
            total.add(engine.stats)
        return total


def _fleet_endpoints(host: str, base_port: int, worker: int, rank: int, dp: int) -> tuple[str, str]:
    if base_port == 0:
        return f"tcp://{host}:*", f"tcp://{host}:*"
    first = base_port + 2 * dp * worker
    return f"tcp://{host}:{first + rank}", f"tcp://{host}:{first + dp + rank}"


# --- traces and prompts -----------------------------------------------------------------


class TraceRecord(msgspec.Struct):
    """One Mooncake trace line: `hash_ids` name 512-token prompt blocks."""

    timestamp: int  # ms since the start of the trace
    input_length: int
    hash_ids: list[int]
    output_length: int = 0


def load_trace(path: str | Path) -> Iterator[TraceRecord]:
    """The records of a Mooncake JSONL trace, in file order."""
    decoder = msgspec.json.Decoder(TraceRecord)
    with Path(path).open("rb") as lines:
        for line in lines:
            if line.strip():
                yield decoder.decode(line)


def trace_tokens(record: TraceRecord) -> list[int]:
    """The prompt token ids of a trace record; shared hash ids give shared prefixes.

    Hash id `h` expands into 512 tokens: token j is the little-endian u16 at byte 2j of
    SHAKE-128("kv-indexer/trace-block/v1" ‖ u64_le(h)) (so ids are in [0, 65536)). The
    prompt is the expansions in order, cut to `input_length` tokens.
    """
    tokens: array[int] = array("H")
    for hash_id in record.hash_ids:
        tokens.frombytes(_trace_block_tokens(hash_id))
    if _BIG_ENDIAN:
        tokens.byteswap()
    return tokens[: record.input_length].tolist()


@functools.lru_cache(maxsize=16_384)
def _trace_block_tokens(hash_id: int) -> bytes:
    """The 512 token ids of trace hash id `hash_id`, as little-endian u16."""
    data = _TRACE_TOKENS_SCHEME + hash_id.to_bytes(8, "little")
    return hashlib.shake_128(data).digest(2 * TRACE_BLOCK_TOKENS)


_BIG_ENDIAN: Final = sys.byteorder == "big"


def synthetic_prompts(
    *, seed: int = 0, n_prefixes: int = 32, prefix_tokens: int = 1_024, max_suffix: int = 1_024
) -> Iterator[list[int]]:
    """Endless prompts: one of `n_prefixes` shared system prompts (Zipf-ish), then fresh tokens."""
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:  # uniform in 0..65535, without a Python call per token
        ids = array("H", rng.randbytes(2 * n))
        if _BIG_ENDIAN:
            ids.byteswap()
        return ids.tolist()

    prefixes = [tokens(prefix_tokens) for _ in range(n_prefixes)]
    weights = [1.0 / (i + 1) for i in range(n_prefixes)]
    while True:
        prefix = rng.choices(prefixes, weights)[0]
        yield prefix + tokens(rng.randrange(1, max_suffix + 1))


# --- the driver -------------------------------------------------------------------------


@dataclass(slots=True)
class FleetStats:
    """Counters of a fleet run: totals and the last one-second window."""

    elapsed: float = 0.0
    total: EngineStats = field(default_factory=EngineStats)
    window: EngineStats = field(default_factory=EngineStats)

    def line(self) -> str:
        w = self.window
        hit = w.hit_tokens / w.prompt_tokens if w.prompt_tokens else 0.0
        return (
            f"t={self.elapsed:.1f}s requests={w.requests} hit_rate={hit:.2f} "
            f"batches={w.batches} events={w.events} stored_blocks={w.stored_blocks} "
            f"removed_blocks={w.removed_blocks}"
        )


def _schedule(
    prompts: Iterable[list[int]] | None,
    trace: str | Path | None,
    rate: float | None,
) -> Iterator[tuple[float | None, list[int]]]:
    """(due second or None = now, tokens): trace timestamps unless a rate is given."""
    if trace is not None:
        records = load_trace(trace)
        source: Iterable[tuple[float, list[int]]] = (
            (r.timestamp / 1000.0, trace_tokens(r)) for r in records
        )
    else:
        source = ((0.0, p) for p in (prompts if prompts is not None else synthetic_prompts()))
    first: float | None = None
    for i, (stamp, tokens) in enumerate(source):
        if rate is not None:
            yield i / rate, tokens
        elif trace is not None:
            first = stamp if first is None else first
            yield stamp - first, tokens
        else:
            yield None, tokens


async def run_fleet(
    n_workers: int,
    capacity_blocks: int,
    block_size: int = 16,
    *,
    prompts: Iterable[list[int]] | None = None,
    trace: str | Path | None = None,
    rate: float | None = None,
    duration: float | None = None,
    max_requests: int | None = None,
    dp_size: int = 1,
    base_port: int = DEFAULT_BASE_PORT,
    host: str = "127.0.0.1",
    on_start: Callable[[MockFleet], None] | None = None,
    on_tick: Callable[[FleetStats], None] | None = None,
    **engine_options: Any,
) -> FleetStats:
    """Serve prompts (or a trace) round-robin over a fleet of mock engines; return the counts.

    Pacing: `rate` requests per second if given, else the trace's timestamps, else as fast
    as possible. Stops at `duration` seconds, after `max_requests`, or when prompts run out.
    Without prompts or a trace it serves `synthetic_prompts()` (endless: set a limit).
    """
    fleet = MockFleet(
        n_workers=n_workers,
        capacity_blocks=capacity_blocks,
        block_size=block_size,
        dp_size=dp_size,
        base_port=base_port,
        host=host,
        **engine_options,
    )
    loop = asyncio.get_running_loop()
    stats = FleetStats()
    async with fleet:
        if on_start is not None:
            on_start(fleet)
        start = last_tick = loop.time()
        previous = EngineStats()

        def tick(now: float) -> None:
            nonlocal last_tick, previous
            current = fleet.stats()
            stats.elapsed, stats.total = now - start, current
            stats.window = current.minus(previous)
            previous, last_tick = current, now
            if on_tick is not None:
                on_tick(stats)

        for i, (due, tokens) in enumerate(_schedule(prompts, trace, rate)):
            if max_requests is not None and i >= max_requests:
                break
            if duration is not None and due is not None and due > duration:
                break
            while True:
                now = loop.time()
                if now - last_tick >= 1.0:
                    tick(now)
                if duration is not None and now - start >= duration:
                    break
                wait = (start + due - now) if due is not None else 0.0
                if wait <= 0:
                    break
                await asyncio.sleep(min(wait, last_tick + 1.0 - now))
            if duration is not None and loop.time() - start >= duration:
                break
            fleet.serve(i % n_workers, tokens)
            if due is None and i % 64 == 63:
                await asyncio.sleep(0)
        tick(loop.time())
    return stats


# --- command line -----------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kv-sim engines", formatter_class=DefaultsHelpFormatter,
        description="Mock vLLM engines publishing KV events over ZMQ (PUB + replay ROUTER).",
    )
    parser.add_argument("--workers", type=int, default=1, help="engines (workers)")
    parser.add_argument("--dp-size", type=int, default=1, help="DP ranks per worker")
    parser.add_argument("--capacity-blocks", type=int, default=4_096, help="GPU blocks per rank")
    parser.add_argument("--cpu-capacity-blocks", type=int, default=0, help="CPU offload blocks")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    parser.add_argument("--host", default="127.0.0.1", help="address the sockets bind")
    parser.add_argument(
        "--base-port", type=int, default=DEFAULT_BASE_PORT, help="0: any free ports"
    )
    parser.add_argument("--topic", default="", help="ZMQ topic of the events (default: none)")
    parser.add_argument("--wire", choices=["map", "positional", "sglang"], default="map",
                        help="event encoding: vLLM >= 0.24 maps, older positional arrays, "
                        "or SGLang's")
    parser.add_argument("--no-replay", action="store_true", help="no replay ROUTER sockets")
    parser.add_argument("--trace", type=Path, help="Mooncake JSONL trace to replay")
    parser.add_argument("--rate", type=float, help="requests per second (default: trace times)")
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    parser.add_argument("--max-events-per-batch", type=int,
                        help="split larger batches (default: no limit)")
    return parser


def main(argv: list[str]) -> int:
    """`kv-sim engines ...`: serve until the trace ends, --duration, or Ctrl-C."""
    args = _parser().parse_args(argv)
    rate = args.rate if args.rate is not None or args.trace is not None else 20.0

    def show(fleet: MockFleet) -> None:
        for w, ranks in enumerate(fleet.engines):
            for engine in ranks:
                replay = engine.replay_endpoint or "-"
                print(
                    f"worker {w} rank {engine.dp_rank}: pub {engine.endpoint} replay {replay}",
                    flush=True,
                )

    try:
        stats = asyncio.run(
            run_fleet(
                args.workers,
                args.capacity_blocks,
                args.block_size,
                trace=args.trace,
                rate=rate,
                duration=args.duration,
                dp_size=args.dp_size,
                base_port=args.base_port,
                host=args.host,
                replay=not args.no_replay,
                cpu_capacity_blocks=args.cpu_capacity_blocks,
                topic=args.topic,
                wire=args.wire,
                max_events_per_batch=args.max_events_per_batch,
                on_start=show,
                on_tick=lambda s: print(s.line(), flush=True),
            )
        )
    except KeyboardInterrupt:
        return 130
    total = stats.total
    print(
        f"done: requests={total.requests} batches={total.batches} "
        f"stored_blocks={total.stored_blocks} removed_blocks={total.removed_blocks}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
