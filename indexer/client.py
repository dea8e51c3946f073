"""Client of the indexer's gRPC API, with a sync face (`IndexerClient`) and an async face
(`AsyncIndexerClient`) over shared request building and response conversion.

    with IndexerClient("127.0.0.1:50051") as client:
        answer = client.score(Query(model="m", token_ids=tokens))
        choice = client.find_best_worker(Query(model="m", token_ids=tokens),
                                         loads=[WorkerLoad("w-1", active_blocks=120)])

TLS and credentials (see README, "TLS"):

    IndexerClient("indexer.internal:50051", root_certificates=Path("ca.pem"),   # TLS
                  client_cert=Path("router.pem"), client_key=Path("router.key"),  # mTLS
                  token=os.environ["KV_INDEXER_TOKEN"])                         # bearer

`tls=True` alone trusts the system's CAs. PEM material is given as bytes or as a path
(str or Path). Without a certificate the channel is plaintext; a token then travels in
clear, so give one only with TLS outside a trusted network.

Every call has a deadline (`timeout`, default 1 s, spanning its retries) and is retried on
UNAVAILABLE with bounded exponential backoff (all RPCs are reads, so retrying is safe).
Results are typed structs, never protobuf messages. gRPC errors become:

    IndexerClientError           any failed call; `code` and `details` from the server
    ├── InvalidArgumentError     the request is malformed (the message names the field)
    ├── FailedPreconditionError  no live worker for the model, block size unknown
    ├── UnavailableError         no server, or its index backend is down (after retries)
    ├── DeadlineExceededError    the call's timeout passed
    ├── ResourceExhaustedError   a message over the size limit
    ├── UnauthenticatedError     the server wants a bearer token and this one is wrong
    ├── InternalError            a bug on the server (it logged the traceback)
    └── StreamClosedError        a decision stream ended before this answer (`code`: how)

Prompts go as block keys (`block_key_bytes`, an eighth of the bytes of the token ids at
16-token blocks) once the client knows the model's block size: each answer reports it
(`block_size`), the client keeps it per model and hashes the next prompts of that model
itself (kvcore/keys.py, rooted in model, LoRA adapter and cache salt as on the server).
Until then, or from a server too old to report it, they go as token ids. The keys carry
the size they were computed at (`keys_block_size`): a server whose model now has another
block size refuses them, and the client resends that query's token ids and learns the new
size from the answer (`learn_block_size=False`: always token ids).

Many decisions per second go over one stream (FindBestWorkerStream), answers in order:

    with client.decision_stream() as stream:                    # async: async with
        choice = stream.find_best_worker(Decision(query=q, loads=loads))
        futures = [stream.submit(Decision(query=q)) for q in queries]  # pipelined (sync)
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, NamedTuple, Self

import grpc
import msgspec

from indexer._proto.kvindex.v1 import indexer_pb2 as pb
from indexer._proto.kvindex.v1 import indexer_pb2_grpc as pb_grpc
from indexer.findings import ERROR, INFO, WARNING, Diagnosis, Finding
from indexer.scheduling import CandidateCost
from kvcore.bus import pack_tokens
from kvcore.keys import block_keys_packed, root_seed

__all__ = [
    "DEFAULT_TARGET",
    "DEFAULT_TIMEOUT",
    "AsyncDecisionStream",
    "AsyncIndexerClient",
    "BlockSizes",
    "CandidateCost",
    "DeadlineExceededError",
    "Decision",
    "DecisionStream",
    "Diagnosis",
    "FailedPreconditionError",
    "Finding",
    "Freshness",
    "IndexerClient",
    "IndexerClientError",
    "IndexerStats",
    "InternalError",
    "InvalidArgumentError",
    "Query",
    "ResourceExhaustedError",
    "RetryPolicy",
    "ScoreAnswer",
    "StreamClosedError",
    "TierWeightOverride",
    "UnauthenticatedError",
    "UnavailableError",
    "WorkerChoice",
    "WorkerLoad",
    "WorkerMatch",
    "WorkerStatus",
]

DEFAULT_TARGET: Final = "127.0.0.1:50051"
DEFAULT_TIMEOUT: Final = 1.0
DEFAULT_MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024  # the server's default limit
# Most requests a decision stream puts in one message (those queued while it sent the last).
DEFAULT_STREAM_BATCH: Final = 16
LIST_PAGE_SIZE: Final = 5_000  # ListWorkers entries per page list_workers asks for


# --- errors ------------------------------------------------------------------------------


class IndexerClientError(Exception):
    """A call that failed; `code` is the gRPC status code, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class InvalidArgumentError(IndexerClientError):
    """The server refused the request as malformed."""


class FailedPreconditionError(IndexerClientError):
    """The index cannot answer yet (no live worker for the model, unknown block size)."""


class UnavailableError(IndexerClientError):
    """The server (or its backend) could not be reached, retries included."""


class DeadlineExceededError(IndexerClientError):
    """The call's timeout passed before an answer."""


class ResourceExhaustedError(IndexerClientError):
    """A message exceeded the size limit (or the server is out of resources)."""


class InternalError(IndexerClientError):
    """The server failed unexpectedly."""


class UnauthenticatedError(IndexerClientError):
    """The server wants a bearer token (`token=`) and this one is missing or wrong."""


_ERRORS: Final[dict[grpc.StatusCode, type[IndexerClientError]]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
}


def error_from_rpc(exc: grpc.RpcError) -> IndexerClientError:
    """The typed error of a failed call."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
    return _ERRORS.get(code, IndexerClientError)(code, details)


_CODES: Final[dict[int, grpc.StatusCode]] = {code.value[0]: code for code in grpc.StatusCode}


def _streamed_error(code: int, message: str) -> IndexerClientError:
    """The typed error of one FindBestWorkerStream answer that carries a status."""
    status = _CODES.get(code, grpc.StatusCode.UNKNOWN)
    return _ERRORS.get(status, IndexerClientError)(status, message)


def _streamed_choice(msg: pb.StreamedDecision) -> WorkerChoice | IndexerClientError:
    if msg.code:
        return _streamed_error(msg.code, msg.message)
    return _worker_choice(msg.answer)


# --- requests and results ----------------------------------------------------------------


class TierWeightOverride(msgspec.Struct, frozen=True, kw_only=True):
    """Per-tier weights for one query; None = the server's configured weight."""

    gpu: float | None = None
    cpu: float | None = None
    storage: float | None = None
    other: float | None = None


class Query(msgspec.Struct, frozen=True, kw_only=True):
    """One prefix-overlap query: exactly one of `token_ids` and `block_keys`."""

    model: str
    token_ids: Sequence[int] | None = None
    block_keys: Sequence[int] | None = None
    lora_name: str = ""
    cache_salt: str = ""
    workers: Sequence[str] = ()  # candidate worker ids; empty = every live worker
    tier_weights: TierWeightOverride | None = None
    include_zero: bool = False
    block_size: int = 0  # 0 = the model's block size as the index learnt it
    # Prefill/decode role filter: "prefill" (prefill or both workers), "decode" (decode or
    # both), "both"; "" = every role. Anything else: the server answers INVALID_ARGUMENT.
    role: str = ""


class WorkerLoad(msgspec.Struct, frozen=True):
    """Load the router attributes to one (worker, dp_rank), for FindBestWorker."""

    worker_id: str
    dp_rank: int = 0
    active_blocks: int = 0
    waiting_requests: int = 0
    prefill_tokens_in_flight: int = 0


class Freshness(msgspec.Struct, frozen=True):
    last_event_age_seconds: float
    degraded_workers: list[str]
    rebuilding: bool
    # bound on how far the Redis read replica that answered was behind; 0: the primary
    index_staleness_seconds: float = 0.0
    read_replica: str = ""  # host:port of that replica (sub-slots: each, by commas); "" primary


class WorkerMatch(msgspec.Struct, frozen=True):
    worker_id: str
    dp_rank: int
    matched_blocks: int
    weighted_score: float
    blocks_by_tier: dict[str, int]


class ScoreAnswer(msgspec.Struct, frozen=True):
    query_blocks: int
    scores: list[WorkerMatch]  # matched_blocks desc, then worker_id, dp_rank
    freshness: Freshness
    score_count: int = 0  # entries before `max_scores` cut `scores` (0: an older server)


class WorkerChoice(msgspec.Struct, frozen=True):
    worker_id: str
    dp_rank: int
    matched_blocks: int
    candidates: list[CandidateCost]  # cost ascending: all, or the cheapest max_candidates
    freshness: Freshness
    candidate_count: int = 0  # candidates considered (0: an older server)


class WorkerStatus(msgspec.Struct, frozen=True):
    model: str
    worker_id: str
    dp_rank: int
    epoch: int
    last_seq: int
    degraded: bool
    blocks_by_tier: dict[str, int]
    last_event_age_seconds: float
    role: str = "both"  # prefill, decode or both (servers older than roles: both); pools ""
    kind: str = "worker"  # or "pool": a shared storage pool, never a routing candidate
    storage_pools: tuple[str, ...] = ()  # the pools a worker mounts


class IndexerStats(msgspec.Struct, frozen=True):
    batches_applied: int
    events_applied: int
    blocks_stored: int
    blocks_removed: int
    duplicates: int
    stale: int
    gaps: int
    resyncs_requested: int
    dropped: dict[str, int]
    workers: int
    lag_seconds: float


def _score_request(query: Query, max_scores: int | None = None, *,
                   packed_tokens: bool = True, keys_from_tokens: bool = False,
                   key_block_size: int = 0) -> pb.ScoreRequest:
    """`packed_tokens`: token ids go as `token_bytes` (packed u32, what the server reads
    fastest), else as `token_ids` (what servers before `token_bytes` read).
    `key_block_size` (a size learnt from the server), or with `keys_from_tokens` the
    query's `block_size`: a query with token ids goes as its block keys at that size
    (`block_key_bytes`, 8 bytes per block: what the server would compute; with
    `keys_block_size`, which the server checks), unless `packed_tokens` is off."""
    if isinstance(query.token_ids, bytes | bytearray | memoryview):
        # A bytes object is a Sequence[int] of bytes, not of token ids: refuse, not guess.
        raise TypeError("Query.token_ids must be a sequence of ints, not bytes "
                        "(unpack packed u32 tokens first)")
    request = pb.ScoreRequest(
        model=query.model, lora_name=query.lora_name, cache_salt=query.cache_salt,
        workers=query.workers, include_zero=query.include_zero, block_size=query.block_size,
        role=query.role,
    )
    key_block_size = key_block_size or (query.block_size if keys_from_tokens else 0)
    if query.token_ids is not None and packed_tokens and key_block_size:
        request.block_key_bytes = _keys_of(query, key_block_size)
        request.keys_block_size = key_block_size
    elif query.token_ids is not None and packed_tokens:
        request.token_bytes = _packed(query.token_ids)
    elif query.token_ids is not None:
        request.token_ids.extend(query.token_ids)
    if query.block_keys is not None:
        request.block_keys.extend(query.block_keys)
    if max_scores is not None:
        request.max_scores = max_scores
    weights = query.tier_weights
    if weights is not None:
        request.tier_weights.SetInParent()
        for name in ("gpu", "cpu", "storage", "other"):
            value = getattr(weights, name)
            if value is not None:
                setattr(request.tier_weights, name, value)
    return request


def _packed(token_ids: Sequence[int]) -> bytes:
    """Token ids as packed u32 little-endian; ValueError for one outside 0..2**32-1."""
    try:
        return pack_tokens(token_ids)
    except (OverflowError, TypeError) as exc:
        raise ValueError(f"Query.token_ids: every token id must be an int in 0..2**32-1 "
                         f"({exc})") from exc


def _keys_of(query: Query, block_size: int) -> bytes:
    """The block keys of a query's token ids at `block_size`, packed u64 (the chained
    hash the server computes: kvcore/keys.py)."""
    assert query.token_ids is not None
    seed = root_seed(query.model, query.lora_name, query.cache_salt)
    return block_keys_packed(_packed(query.token_ids), block_size, seed)


def _batch_request(queries: Sequence[Query], sizes: Sequence[int],
                   packed_tokens: bool) -> pb.ScoreBatchRequest:
    return pb.ScoreBatchRequest(requests=[
        _score_request(q, packed_tokens=packed_tokens, key_block_size=size)
        for q, size in zip(queries, sizes, strict=True)])


def _batch_answers(sizes: BlockSizes, queries: Sequence[Query],
                   response: pb.ScoreBatchResponse) -> list[ScoreAnswer]:
    for query, answer in zip(queries, response.responses, strict=False):
        sizes.update(query.model, answer.block_size)
    return [_score_answer(r) for r in response.responses]


def _forget(sizes: BlockSizes, queries: Sequence[Query]) -> None:
    for query in queries:
        sizes.forget(query.model)


# What the server's refusal of keys at another block size than the model's starts with
# (after the field's prefix): the client then resends the token ids.
_KEYS_REFUSED: Final = "keys_block_size:"


def _keys_refused(exc: IndexerClientError) -> bool:
    return (exc.code == grpc.StatusCode.FAILED_PRECONDITION
            and _KEYS_REFUSED in exc.details.split(" ", 1)[0])


class BlockSizes:
    """The block size of each model as the server's answers last reported it, and the
    size a query's keys are computed at. Shared by a client's calls and streams (a dict
    update is atomic: threads may share it)."""

    def __init__(self, learn: bool, keys_from_tokens: bool, packed_tokens: bool) -> None:
        self.learn = learn and packed_tokens
        self.keys_from_tokens = keys_from_tokens and packed_tokens
        self._sizes: dict[str, int] = {}

    def get(self, model: str) -> int:
        """The learnt block size of `model`; 0: none."""
        return self._sizes.get(model, 0)

    def for_keys(self, query: Query) -> int:
        """The block size to send `query`'s token ids as keys at; 0: send them as they are
        (none learnt, or the query names another block size than the learnt one)."""
        if query.token_ids is None:
            return 0
        learnt = self._sizes.get(query.model, 0) if self.learn else 0
        if learnt:
            return learnt if query.block_size in (0, learnt) else 0
        return query.block_size if self.keys_from_tokens else 0

    def update(self, model: str, block_size: int) -> None:
        """What an answer for `model` reported (0: the server does not know it, or is
        older than the field: nothing learnt)."""
        if not self.learn:
            return
        if block_size:
            self._sizes[model] = block_size
        else:
            self._sizes.pop(model, None)

    def forget(self, model: str) -> None:
        self._sizes.pop(model, None)


def _find_request(
    query: Query,
    loads: Sequence[WorkerLoad],
    overlap_weight: float | None,
    temperature: float | None,
    seed: int | None,
    *,
    max_candidates: int | None = None,
    storage_load_weight: float | None = None,
    packed_tokens: bool = True,
    keys_from_tokens: bool = False,
    key_block_size: int = 0,
) -> pb.FindBestWorkerRequest:
    request = pb.FindBestWorkerRequest(
        score=_score_request(query, packed_tokens=packed_tokens,
                             keys_from_tokens=keys_from_tokens, key_block_size=key_block_size),
        loads=[pb.WorkerLoad(worker_id=w.worker_id, dp_rank=w.dp_rank,
                             active_blocks=w.active_blocks,
                             waiting_requests=w.waiting_requests,
                             prefill_tokens_in_flight=w.prefill_tokens_in_flight)
               for w in loads],
    )
    if overlap_weight is not None:
        request.overlap_weight = overlap_weight
    if temperature is not None:
        request.temperature = temperature
    if seed is not None:
        request.seed = seed
    if max_candidates is not None:
        request.max_candidates = max_candidates
    if storage_load_weight is not None:
        request.storage_load_weight = storage_load_weight
    return request


def _freshness(msg: pb.Freshness) -> Freshness:
    return Freshness(msg.last_event_age_seconds, list(msg.degraded_workers), msg.rebuilding,
                     msg.index_staleness_seconds, msg.read_replica)


def _score_answer(msg: pb.ScoreResponse) -> ScoreAnswer:
    return ScoreAnswer(
        msg.query_blocks,
        [WorkerMatch(s.worker_id, s.dp_rank, s.matched_blocks, s.weighted_score,
                     dict(s.blocks_by_tier)) for s in msg.scores],
        _freshness(msg.freshness),
        msg.score_count,
    )


def _worker_choice(msg: pb.FindBestWorkerResponse) -> WorkerChoice:
    return WorkerChoice(
        msg.worker_id, msg.dp_rank, msg.matched_blocks,
        [CandidateCost(c.worker_id, c.dp_rank, c.matched_blocks, c.prefill_blocks,
                       c.active_blocks, c.cost, c.waiting_requests, c.storage_blocks)
         for c in msg.candidates],
        _freshness(msg.freshness),
        msg.candidate_count,
    )


def _list_request(model: str | None, role: str, kind: str, token: str
                  ) -> pb.ListWorkersRequest:
    return pb.ListWorkersRequest(model=model or "", role=role, kind=kind,
                                 page_size=LIST_PAGE_SIZE, page_token=token)


def _worker_statuses(msg: pb.ListWorkersResponse) -> list[WorkerStatus]:
    return [WorkerStatus(w.model, w.worker_id, w.dp_rank, w.epoch, w.last_seq, w.degraded,
                         dict(w.blocks_by_tier), w.last_event_age_seconds,
                         w.role or ("" if w.kind == "pool" else "both"), w.kind or "worker",
                         tuple(w.storage_pools))
            for w in msg.workers]


def _indexer_stats(msg: pb.GetStatsResponse) -> IndexerStats:
    return IndexerStats(msg.batches_applied, msg.events_applied, msg.blocks_stored,
                        msg.blocks_removed, msg.duplicates, msg.stale, msg.gaps,
                        msg.resyncs_requested, dict(msg.dropped), msg.workers, msg.lag_seconds)


_SEVERITY_NAMES: Final = {pb.SEVERITY_INFO: INFO, pb.SEVERITY_WARNING: WARNING,
                          pb.SEVERITY_ERROR: ERROR}


def _diagnosis(msg: pb.DiagnoseResponse) -> Diagnosis:
    findings = [Finding(severity=_SEVERITY_NAMES.get(f.severity, INFO), code=f.code,
                        summary=f.summary, fix=f.fix, model=f.model, worker_id=f.worker_id,
                        dp_rank=f.dp_rank if f.HasField("dp_rank") else None)
                for f in msg.findings]
    return Diagnosis(findings=findings, checks=list(msg.checks),
                     limitations=list(msg.limitations))


# --- retries -----------------------------------------------------------------------------


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """Retries of UNAVAILABLE calls: exponential backoff with jitter, within the deadline."""

    max_attempts: int = 4
    initial_backoff: float = 0.05
    max_backoff: float = 1.0
    multiplier: float = 2.0
    jitter: float = 0.2  # each delay is scaled by a random factor in [1 - jitter, 1 + jitter]

    def delays(self) -> Iterator[float]:
        """The sleep before each retry (max_attempts - 1 of them)."""
        backoff = self.initial_backoff
        for _ in range(self.max_attempts - 1):
            yield min(backoff, self.max_backoff) * random.uniform(1 - self.jitter,
                                                                  1 + self.jitter)
            backoff *= self.multiplier


class _Attempts:
    """The deadline of one call and what is left of its retries."""

    __slots__ = ("deadline", "delays")

    def __init__(self, timeout: float, retry: RetryPolicy) -> None:
        self.deadline = time.monotonic() + timeout
        self.delays = retry.delays()

    def remaining(self) -> float:
        return max(self.deadline - time.monotonic(), 0.0)

    def retry_delay(self, exc: grpc.RpcError) -> float | None:
        """How long to wait before trying again, or None to give up with `exc`."""
        if not hasattr(exc, "code") or exc.code() != grpc.StatusCode.UNAVAILABLE:
            return None
        delay = next(self.delays, None)
        if delay is None or time.monotonic() + delay >= self.deadline:
            return None
        return delay


# --- decision streams -------------------------------------------------------------------


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    """One FindBestWorker request for a decision stream (the arguments of
    `find_best_worker`). `max_candidates` None: the stream's default, the cheapest 8."""

    query: Query
    loads: Sequence[WorkerLoad] = ()
    overlap_weight: float | None = None
    temperature: float | None = None
    seed: int | None = None
    max_candidates: int | None = None
    storage_load_weight: float | None = None

    def request(self, *, packed_tokens: bool = True, keys_from_tokens: bool = False,
                key_block_size: int = 0) -> pb.FindBestWorkerRequest:
        return _find_request(self.query, self.loads, self.overlap_weight, self.temperature,
                             self.seed, max_candidates=self.max_candidates,
                             storage_load_weight=self.storage_load_weight,
                             packed_tokens=packed_tokens, keys_from_tokens=keys_from_tokens,
                             key_block_size=key_block_size)


class _Pending(NamedTuple):
    """A streamed decision awaiting its answer: what to resend as token ids if the server
    refuses its keys (`key_block_size` > 0: sent as keys at that size)."""

    future: Any  # concurrent.futures.Future or asyncio.Future of a WorkerChoice
    decision: Decision
    key_block_size: int


def _answered(pending: _Pending, entry: pb.StreamedDecision, sizes: BlockSizes
              ) -> WorkerChoice | IndexerClientError | None:
    """A streamed answer, learning the model's block size from it; None when the server
    refused keys computed at a stale block size (resend the token ids)."""
    answer = _streamed_choice(entry)
    model = pending.decision.query.model
    if isinstance(answer, IndexerClientError):
        if pending.key_block_size and _keys_refused(answer):
            sizes.forget(model)
            return None
        return answer
    sizes.update(model, entry.answer.block_size)
    return answer


class StreamClosedError(IndexerClientError):
    """The decision stream ended (closed, or broken: `code` says how) before this answer."""


class DecisionStream:
    """Many FindBestWorker decisions over one FindBestWorkerStream (sync face).

    `submit` queues a request and returns a Future of its answer; `find_best_worker` waits
    for it. Requests queued while the previous message was being sent go together in the
    next one (at most `max_batch`), so a busy router pays the per-message cost once for
    several decisions. Thread-safe; answers come in request order. An answer that carries
    an error raises it (typed as for unary calls) from that Future only; a broken stream
    fails every unanswered Future with its status, and later submits raise
    StreamClosedError: open another stream. No deadline on the stream itself; `timeout`
    bounds each wait.
    """

    def __init__(self, client: IndexerClient, max_batch: int = DEFAULT_STREAM_BATCH) -> None:
        self._timeout = client.timeout
        self._max_batch = max_batch
        self._packed_tokens = client.packed_tokens
        self._sizes = client.block_sizes
        self._lock = threading.Lock()
        self._pending: collections.deque[_Pending] = collections.deque()
        self._outbox: queue.SimpleQueue[pb.FindBestWorkerRequest | None] = queue.SimpleQueue()
        self._ended: IndexerClientError | None = None
        self._call = client._stub.FindBestWorkerStream(self._messages(),
                                                       metadata=client._metadata)
        self._reader = threading.Thread(target=self._read, name="kv-decisions", daemon=True)
        self._reader.start()

    def submit(self, decision: Decision) -> concurrent.futures.Future[WorkerChoice]:
        """Queue one request; its answer arrives in the returned Future."""
        future: concurrent.futures.Future[WorkerChoice] = concurrent.futures.Future()
        with self._lock:
            if self._ended is not None:
                raise self._ended
            self._queue(future, decision, self._sizes.for_keys(decision.query))
        return future

    def _queue(self, future: concurrent.futures.Future[WorkerChoice], decision: Decision,
               key_block_size: int) -> None:
        """Under the lock: the answers' order is the order of the requests in the outbox."""
        self._pending.append(_Pending(future, decision, key_block_size))
        self._outbox.put(decision.request(packed_tokens=self._packed_tokens,
                                          key_block_size=key_block_size))

    def find_best_worker(self, decision: Decision, *,
                         timeout: float | None = None) -> WorkerChoice:
        """Send one request and wait for its answer."""
        future = self.submit(decision)
        try:
            return future.result(self._timeout if timeout is None else timeout)
        except concurrent.futures.TimeoutError as exc:
            raise DeadlineExceededError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                        "no answer on the decision stream in time") from exc

    def _messages(self) -> Iterator[pb.FindBestWorkerStreamRequest]:
        """What the stream sends: every request queued meanwhile, up to `max_batch`."""
        while True:
            first = self._outbox.get()
            if first is None:
                return
            batch = [first]
            ending = False
            while len(batch) < self._max_batch:
                try:
                    item = self._outbox.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    ending = True
                    break
                batch.append(item)
            yield pb.FindBestWorkerStreamRequest(requests=batch)
            if ending:
                return

    def _read(self) -> None:
        ended = StreamClosedError(grpc.StatusCode.CANCELLED, "the decision stream was closed")
        try:
            for response in self._call:
                for entry in response.answers:
                    with self._lock:
                        pending = self._pending.popleft()
                        answer = _answered(pending, entry, self._sizes)
                        if answer is None:  # keys at a stale block size: the token ids
                            self._queue(pending.future, pending.decision, 0)
                            continue
                    if isinstance(answer, IndexerClientError):
                        pending.future.set_exception(answer)
                    else:
                        pending.future.set_result(answer)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                broken = error_from_rpc(exc)
                ended = StreamClosedError(broken.code, broken.details)
        with self._lock:
            self._ended = ended
            unanswered, self._pending = self._pending, collections.deque()
        for entry in unanswered:
            entry.future.set_exception(ended)

    def close(self) -> None:
        """Wait for every answer (a request resent as token ids included), then end the
        stream."""
        with self._lock:
            futures = [entry.future for entry in self._pending]
        concurrent.futures.wait(futures)
        with self._lock:
            if self._ended is None:
                self._outbox.put(None)
        self._reader.join()

    def cancel(self) -> None:
        """End the stream now; unanswered Futures fail with StreamClosedError."""
        self._call.cancel()
        self._reader.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.cancel()


class AsyncDecisionStream:
    """Many FindBestWorker decisions over one FindBestWorkerStream (asyncio face).

    `await find_best_worker(decision)` queues the request and waits for its answer;
    concurrent callers share the stream, and requests queued while a message is being
    written go together in the next one (at most `max_batch`). Answers come in request
    order; errors as in `DecisionStream`. Create and use it on one event loop.
    """

    def __init__(self, client: AsyncIndexerClient,
                 max_batch: int = DEFAULT_STREAM_BATCH) -> None:
        self._timeout = client.timeout
        self._max_batch = max_batch
        self._packed_tokens = client.packed_tokens
        self._sizes = client.block_sizes
        self._pending: collections.deque[_Pending] = collections.deque()
        self._outbox: asyncio.Queue[pb.FindBestWorkerRequest | None] = asyncio.Queue()
        self._ended: IndexerClientError | None = None
        self._call = client._stub.FindBestWorkerStream(metadata=client._metadata)
        self._writer = asyncio.create_task(self._write())
        self._reader = asyncio.create_task(self._read())

    async def find_best_worker(self, decision: Decision, *,
                               timeout: float | None = None) -> WorkerChoice:
        """Send one request and wait for its answer."""
        if self._ended is not None:
            raise self._ended
        future: asyncio.Future[WorkerChoice] = asyncio.get_running_loop().create_future()
        self._queue(future, decision, self._sizes.for_keys(decision.query))
        try:
            return await asyncio.wait_for(asyncio.shield(future),
                                          self._timeout if timeout is None else timeout)
        except TimeoutError as exc:
            raise DeadlineExceededError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                        "no answer on the decision stream in time") from exc

    def _queue(self, future: asyncio.Future[WorkerChoice], decision: Decision,
               key_block_size: int) -> None:
        self._pending.append(_Pending(future, decision, key_block_size))  # the outbox's order
        self._outbox.put_nowait(decision.request(packed_tokens=self._packed_tokens,
                                                 key_block_size=key_block_size))

    async def _write(self) -> None:
        try:
            while (first := await self._outbox.get()) is not None:
                batch = [first]
                ending = False
                while len(batch) < self._max_batch and not self._outbox.empty():
                    item = self._outbox.get_nowait()
                    if item is None:
                        ending = True
                        break
                    batch.append(item)
                await self._call.write(pb.FindBestWorkerStreamRequest(requests=batch))
                if ending:
                    break
            await self._call.done_writing()
        except (grpc.RpcError, asyncio.InvalidStateError):
            return  # the stream ended: the reader fails what is unanswered

    async def _read(self) -> None:
        ended = StreamClosedError(grpc.StatusCode.CANCELLED, "the decision stream was closed")
        try:
            async for response in self._call:
                for entry in response.answers:
                    pending = self._pending.popleft()
                    answer = _answered(pending, entry, self._sizes)
                    future = pending.future
                    if answer is None:  # keys at a stale block size: the token ids
                        self._queue(future, pending.decision, 0)
                    elif future.done():
                        continue
                    elif isinstance(answer, IndexerClientError):
                        future.set_exception(answer)
                    else:
                        future.set_result(answer)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                broken = error_from_rpc(exc)
                ended = StreamClosedError(broken.code, broken.details)
        self._ended = ended
        self._writer.cancel()
        while self._pending:
            future = self._pending.popleft().future
            if not future.done():
                future.set_exception(ended)

    async def close(self) -> None:
        """Wait for every answer (a request resent as token ids included), then end the
        stream."""
        futures = [entry.future for entry in self._pending]
        if futures:
            await asyncio.wait(futures)
        if self._ended is None:
            self._outbox.put_nowait(None)
        await self._reader

    async def cancel(self) -> None:
        """End the stream now; unanswered calls fail with StreamClosedError."""
        self._call.cancel()
        await self._reader

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            await self.close()
        else:
            await self.cancel()


# --- the two faces -----------------------------------------------------------------------

Pem = bytes | str | os.PathLike[str]


def _pem(value: Pem | None, what: str) -> bytes | None:
    """PEM bytes as given, or read from a path."""
    if value is None or isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {value}: {exc.strerror or exc}") from exc


class _BaseClient:
    """Settings, channel options and deadlines shared by both faces."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        options: Sequence[tuple[str, Any]] = (),
        tls: bool = False,
        root_certificates: Pem | None = None,
        client_cert: Pem | None = None,
        client_key: Pem | None = None,
        token: str | None = None,
        tls_server_name: str | None = None,
        packed_tokens: bool = True,
        keys_from_tokens: bool = False,
        learn_block_size: bool = True,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        if (client_cert is None) != (client_key is None):
            raise ValueError("client_cert and client_key go together")
        if token is not None and (not token or any(c.isspace() for c in token)):
            raise ValueError("token must be one non-empty word")
        self.target = target
        self.timeout = timeout
        # Token ids as ScoreRequest.token_bytes; False: as token_ids, for older servers.
        self.packed_tokens = packed_tokens
        # Token ids with an explicit Query.block_size as block_key_bytes (an eighth of the
        # bytes at 16-token blocks); needs a server that reads block_key_bytes.
        self.keys_from_tokens = keys_from_tokens
        # Token ids as block_key_bytes at the block size the server's answers report for
        # the model (learnt per model; a server that reports none gets token ids).
        self.block_sizes = BlockSizes(learn_block_size, keys_from_tokens, packed_tokens)
        self.retry = retry or RetryPolicy()
        self.tls = tls or root_certificates is not None or client_cert is not None
        self._credentials = grpc.ssl_channel_credentials(
            root_certificates=_pem(root_certificates, "root_certificates"),
            private_key=_pem(client_key, "client_key"),
            certificate_chain=_pem(client_cert, "client_cert"),
        ) if self.tls else None
        # Per call, not call credentials: those are sent over TLS channels only, and a
        # plaintext server behind a TLS-terminating proxy may want the token as well.
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # Reconnect quickly after the indexer restarts (gRPC's default starts at 1 s).
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
            *options,
        ]
        if tls_server_name:  # the name the server's certificate holds, if not the target's
            self._options.append(("grpc.ssl_target_name_override", tls_server_name))
        self._channel = self._open_channel()
        self._stub = pb_grpc.KvIndexerStub(self._channel)  # type: ignore[no-untyped-call]

    def _open_channel(self) -> Any:
        raise NotImplementedError

    def _attempts(self, timeout: float | None) -> _Attempts:
        return _Attempts(self.timeout if timeout is None else timeout, self.retry)


class IndexerClient(_BaseClient):
    """Blocking client; one channel, safe to share between threads."""

    def _open_channel(self) -> Any:
        if self._credentials is not None:
            return grpc.secure_channel(self.target, self._credentials, options=self._options)
        return grpc.insecure_channel(self.target, options=self._options)

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        attempts = self._attempts(timeout)
        while True:
            try:
                return method(request, timeout=attempts.remaining(), metadata=self._metadata)
            except grpc.RpcError as exc:
                delay = attempts.retry_delay(exc)
                if delay is None:
                    raise error_from_rpc(exc) from exc
            time.sleep(delay)

    def _prompt_call(self, method: Any, queries: Sequence[Query],
                     make: Callable[[Sequence[int]], Any], timeout: float | None) -> Any:
        """`method` with the request `make(sizes)` builds (`sizes`: per query, the block
        size its keys are computed at, 0 for its token ids); when the server refuses keys
        at a stale block size, the token ids again."""
        sizes = [self.block_sizes.for_keys(q) for q in queries]
        try:
            return self._call(method, make(sizes), timeout)
        except IndexerClientError as exc:
            if not any(sizes) or not _keys_refused(exc):
                raise
        _forget(self.block_sizes, queries)
        return self._call(method, make([0] * len(queries)), timeout)

    def score(self, query: Query, *, max_scores: int | None = None,
              timeout: float | None = None) -> ScoreAnswer:
        """Per (worker, dp_rank), the leading query blocks it holds (the best `max_scores`
        of them; None: every one)."""
        response = self._prompt_call(self._stub.Score, [query], lambda sizes: _score_request(
            query, max_scores, packed_tokens=self.packed_tokens, key_block_size=sizes[0]),
            timeout)
        self.block_sizes.update(query.model, response.block_size)
        return _score_answer(response)

    def find_best_worker(
        self,
        query: Query,
        loads: Sequence[WorkerLoad] = (),
        *,
        overlap_weight: float | None = None,
        temperature: float | None = None,
        seed: int | None = None,
        max_candidates: int | None = None,
        timeout: float | None = None,
        storage_load_weight: float | None = None,
    ) -> WorkerChoice:
        """The worker with the lowest overlap + load cost (see docs/grpc.md); `candidates`
        holds the cheapest `max_candidates` (None or 0: every candidate)."""
        def make(sizes: Sequence[int]) -> pb.FindBestWorkerRequest:
            return _find_request(query, loads, overlap_weight, temperature, seed,
                                 max_candidates=max_candidates,
                                 storage_load_weight=storage_load_weight,
                                 packed_tokens=self.packed_tokens, key_block_size=sizes[0])

        response = self._prompt_call(self._stub.FindBestWorker, [query], make, timeout)
        self.block_sizes.update(query.model, response.block_size)
        return _worker_choice(response)

    def score_batch(
        self, queries: Sequence[Query], *, timeout: float | None = None
    ) -> list[ScoreAnswer]:
        """Several queries in one round trip; answers in query order."""
        response = self._prompt_call(
            self._stub.ScoreBatch, queries,
            lambda sizes: _batch_request(queries, sizes, self.packed_tokens), timeout)
        return _batch_answers(self.block_sizes, queries, response)

    def list_workers(
        self, model: str | None = None, *, role: str = "", timeout: float | None = None,
        kind: str = "",
    ) -> list[WorkerStatus]:
        """The workers the index holds (of one model, or of all; of one role, or all), and
        the shared storage pools (`kind`: "worker", "pool", or "" for both): every page,
        asked one after the other, `timeout` per page."""
        statuses: list[WorkerStatus] = []
        token = ""
        while True:  # page by page: one answer of a large fleet passes the message limit
            response = self._call(self._stub.ListWorkers,
                                  _list_request(model, role, kind, token), timeout)
            statuses += _worker_statuses(response)
            token = response.next_page_token
            if not token:
                return statuses

    def stats(self, *, timeout: float | None = None) -> IndexerStats:
        """Event pipeline and index counters."""
        return _indexer_stats(self._call(self._stub.GetStats, pb.GetStatsRequest(), timeout))

    def diagnose(self, model: str | None = None, *, timeout: float | None = None) -> Diagnosis:
        """Why routing may get no hits (of one model, or of all): findings, worst first."""
        request = pb.DiagnoseRequest(model=model or "")
        return _diagnosis(self._call(self._stub.Diagnose, request, timeout))

    def decision_stream(self, max_batch: int = DEFAULT_STREAM_BATCH) -> DecisionStream:
        """A FindBestWorkerStream for many decisions (`with client.decision_stream() as s:`);
        `max_batch`: most requests per stream message."""
        return DecisionStream(self, max_batch)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncIndexerClient(_BaseClient):
    """asyncio client; create and use it on one event loop."""

    def _open_channel(self) -> Any:
        if self._credentials is not None:
            return grpc.aio.secure_channel(self.target, self._credentials,
                                           options=self._options)
        return grpc.aio.insecure_channel(self.target, options=self._options)

    async def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        attempts = self._attempts(timeout)
        while True:
            try:
                return await method(request, timeout=attempts.remaining(),
                                    metadata=self._metadata)
            except grpc.RpcError as exc:
                delay = attempts.retry_delay(exc)
                if delay is None:
                    raise error_from_rpc(exc) from exc
            await asyncio.sleep(delay)

    async def _prompt_call(self, method: Any, queries: Sequence[Query],
                           make: Callable[[Sequence[int]], Any], timeout: float | None) -> Any:
        """`IndexerClient._prompt_call`, awaited."""
        sizes = [self.block_sizes.for_keys(q) for q in queries]
        try:
            return await self._call(method, make(sizes), timeout)
        except IndexerClientError as exc:
            if not any(sizes) or not _keys_refused(exc):
                raise
        _forget(self.block_sizes, queries)
        return await self._call(method, make([0] * len(queries)), timeout)

    async def score(self, query: Query, *, max_scores: int | None = None,
                    timeout: float | None = None) -> ScoreAnswer:
        """Per (worker, dp_rank), the leading query blocks it holds (the best `max_scores`
        of them; None: every one)."""
        response = await self._prompt_call(
            self._stub.Score, [query], lambda sizes: _score_request(
                query, max_scores, packed_tokens=self.packed_tokens, key_block_size=sizes[0]),
            timeout)
        self.block_sizes.update(query.model, response.block_size)
        return _score_answer(response)

    async def find_best_worker(
        self,
        query: Query,
        loads: Sequence[WorkerLoad] = (),
        *,
        overlap_weight: float | None = None,
        temperature: float | None = None,
        seed: int | None = None,
        max_candidates: int | None = None,
        timeout: float | None = None,
        storage_load_weight: float | None = None,
    ) -> WorkerChoice:
        """The worker with the lowest overlap + load cost (see docs/grpc.md); `candidates`
        holds the cheapest `max_candidates` (None or 0: every candidate)."""
        def make(sizes: Sequence[int]) -> pb.FindBestWorkerRequest:
            return _find_request(query, loads, overlap_weight, temperature, seed,
                                 max_candidates=max_candidates,
                                 storage_load_weight=storage_load_weight,
                                 packed_tokens=self.packed_tokens, key_block_size=sizes[0])

        response = await self._prompt_call(self._stub.FindBestWorker, [query], make, timeout)
        self.block_sizes.update(query.model, response.block_size)
        return _worker_choice(response)

    async def score_batch(
        self, queries: Sequence[Query], *, timeout: float | None = None
    ) -> list[ScoreAnswer]:
        """Several queries in one round trip; answers in query order."""
        response = await self._prompt_call(
            self._stub.ScoreBatch, queries,
            lambda sizes: _batch_request(queries, sizes, self.packed_tokens), timeout)
        return _batch_answers(self.block_sizes, queries, response)

    async def list_workers(
        self, model: str | None = None, *, role: str = "", timeout: float | None = None,
        kind: str = "",
    ) -> list[WorkerStatus]:
        """The workers the index holds (of one model, or of all; of one role, or all), and
        the shared storage pools (`kind`: "worker", "pool", or "" for both): every page,
        asked one after the other, `timeout` per page."""
        statuses: list[WorkerStatus] = []
        token = ""
        while True:  # page by page: one answer of a large fleet passes the message limit
            response = await self._call(self._stub.ListWorkers,
                                        _list_request(model, role, kind, token), timeout)
            statuses += _worker_statuses(response)
            token = response.next_page_token
            if not token:
                return statuses

    async def stats(self, *, timeout: float | None = None) -> IndexerStats:
        """Event pipeline and index counters."""
        response = await self._call(self._stub.GetStats, pb.GetStatsRequest(), timeout)
        return _indexer_stats(response)

    async def diagnose(self, model: str | None = None, *,
                       timeout: float | None = None) -> Diagnosis:
        """Why routing may get no hits (of one model, or of all): findings, worst first."""
        request = pb.DiagnoseRequest(model=model or "")
        return _diagnosis(await self._call(self._stub.Diagnose, request, timeout))

    def decision_stream(self, max_batch: int = DEFAULT_STREAM_BATCH) -> AsyncDecisionStream:
        """A FindBestWorkerStream for many decisions (`async with client.decision_stream()
        as s:`); call it on the event loop that uses it. `max_batch`: most requests per
        stream message."""
        return AsyncDecisionStream(self, max_batch)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
