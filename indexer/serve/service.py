"""The router-facing gRPC server: a grpc.aio servicer of `kvindex.v1.KvIndexer` over an Index.

`start_grpc_server` registers three services on one port: `kvindex.v1.KvIndexer`, the
standard `grpc.health.v1.Health` (SERVING for "" and "kvindex.v1.KvIndexer") and server
reflection (unless turned off), over plaintext, TLS or mTLS, with or without bearer tokens
(indexer/serve/auth.py: a missing or wrong token is UNAUTHENTICATED). Requests become
`Index` calls; errors are converted here, at the boundary:

    InvalidQueryError (and request checks)  INVALID_ARGUMENT   message names the field
    no live worker (FindBestWorker)         FAILED_PRECONDITION message names the model
    block size unknown (token_ids query)    FAILED_PRECONDITION message names the model
    keys at another block size than the     FAILED_PRECONDITION message starts with the
      model's (`keys_block_size`)                               field, `score.keys_block_size:`
    BackendError                            UNAVAILABLE
    deadline passed before / during work    DEADLINE_EXCEEDED
    anything else                           INTERNAL (traceback logged as `rpc_failed`)

"Live workers of a model" are asked of one `WorkerDirectory` (by default the index's own
worker list, cached for `worker_cache_seconds`); a liveness registry plugs in there as its
`source`. Handlers hold no lock across an await, so reads interleave with ingest; the
in-memory index scores synchronously on the loop (well under a millisecond for 8k tokens).
"""

from __future__ import annotations

import asyncio
import math
import operator
import random
import resource
import sys
import time
from array import array
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Mapping,
    Sequence,
)
from typing import TYPE_CHECKING, Final, NamedTuple, Protocol, TypeVar

import grpc
import msgspec
import structlog
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from indexer._proto.kvindex.v1 import indexer_pb2 as pb
from indexer._proto.kvindex.v1 import indexer_pb2_grpc as pb_grpc
from indexer.config import ServiceConfig
from indexer.errors import BackendError, ConfigError, InvalidQueryError
from indexer.index.protocol import (
    TIERS,
    IndexReader,
    ScoreQuery,
    ScoreResult,
    TierWeights,
    WorkerInfo,
    WorkerScore,
)
from indexer.index.scoring import QueryTally, check_query_shape, check_tier_weights
from indexer.scheduling import DEFAULT_OVERLAP_WEIGHT, DEFAULT_TEMPERATURE
from indexer.serve.auth import GrpcSecurity
from indexer.serve.decision import (
    EncodedAnswer,
    decide,
    decide_from_tally,
    encode_answer,
    tally_decides,
)
from indexer.serve.diagnose import (
    DoctorSettings,
    EventPathView,
    QueryOutcomes,
    diagnose,
    take_snapshot,
    to_proto,
)
from indexer.serve.directory import CandidateSet, LiveWorkerSource, WorkerDirectory
from indexer.serve.grpc_handlers import (
    SERVICE_NAME,
    WireTokens,
    add_kv_indexer_service,
    find_best_worker_parser,
    unwrap,
)
from indexer.serve.limits import (
    DEFAULT_CONNECTION_IDLE_S,
    DEFAULT_MAX_BATCH_REQUESTS,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_REQUEST_LOADS,
    DEFAULT_MAX_REQUEST_WORKERS,
    DEFAULT_STREAM_WINDOW,
)
from indexer.serve.listing import ListingCache, page_of
from indexer.serve.stream import (
    DEFAULT_STREAM_CANDIDATES,
    StreamedAnswers,
    answer_in_order,
    split_requests,
)
from kvcore.pools import KIND_POOL, KINDS
from kvcore.roles import check_role, role_matches

__all__ = [
    "DEFAULT_CONNECTION_IDLE_S",
    "DEFAULT_LISTEN",
    "DEFAULT_MAX_BATCH_REQUESTS",
    "DEFAULT_MAX_CONCURRENT_QUERIES",
    "DEFAULT_MAX_CONCURRENT_RPCS",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_MAX_REQUEST_LOADS",
    "DEFAULT_MAX_REQUEST_WORKERS",
    "DEFAULT_STREAM_WINDOW",
    "DEFAULT_WORKER_CACHE_SECONDS",
    "SERVICE_NAME",
    "KvIndexerService",
    "PipelineStats",
    "ServiceSettings",
    "server_options",
    "service_settings",
    "start_grpc_server",
]

log = structlog.get_logger("indexer.serve.service")

HEALTH_SERVICE_NAME: Final = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
DEFAULT_LISTEN: Final = "127.0.0.1:50051"
# A 1M-token ScoreRequest is ~3-5 MB of varints; 16 MiB leaves room for ScoreBatch.
DEFAULT_MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024
DEFAULT_BATCH_CONCURRENCY: Final = 8
DEFAULT_WORKER_CACHE_SECONDS: Final = 0.5
# Index queries in flight at once (redis-py's asyncio pool allows 100 connections); the
# rest wait their turn within their deadline.
DEFAULT_MAX_CONCURRENT_QUERIES: Final = 64
# RPCs the server accepts at once; more are refused with RESOURCE_EXHAUSTED (load shedding).
DEFAULT_MAX_CONCURRENT_RPCS: Final = 1024
# Descriptors a server process keeps for everything but gRPC connections (Redis, NATS,
# files, the metrics server) when its connection cap is fitted under RLIMIT_NOFILE.
FD_RESERVE: Final = 256

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

T = TypeVar("T")


class ServiceSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Settings of the gRPC server (limits documented in docs/grpc.md)."""

    # grpc.max_receive_message_length and grpc.max_send_message_length.
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # Most queries one ScoreBatch may carry.
    max_batch_requests: int = DEFAULT_MAX_BATCH_REQUESTS
    # Most entries of a query's `workers` (ScoreRequest.workers, in every RPC that has one).
    max_request_workers: int = DEFAULT_MAX_REQUEST_WORKERS
    # Most entries of FindBestWorkerRequest.loads.
    max_request_loads: int = DEFAULT_MAX_REQUEST_LOADS
    # Messages of one FindBestWorkerStream decided or waiting to be sent at once; the
    # stream reads no further message meanwhile (gRPC flow control holds the client back).
    stream_window: int = DEFAULT_STREAM_WINDOW
    # ScoreBatch queries scored at the same time (overlaps backend round trips).
    batch_concurrency: int = DEFAULT_BATCH_CONCURRENCY
    # How long a model's live-worker list is reused; 0 = ask the source on every call.
    worker_cache_seconds: float = DEFAULT_WORKER_CACHE_SECONDS
    # Index queries in flight at once; further Score calls wait for a slot.
    max_concurrent_queries: int = DEFAULT_MAX_CONCURRENT_QUERIES
    # RPCs in progress at once (grpc maximum_concurrent_rpcs); None = unbounded.
    max_concurrent_rpcs: int | None = DEFAULT_MAX_CONCURRENT_RPCS
    # Let other processes bind the same address (SO_REUSEPORT; the kernel spreads
    # connections over them). Off by default: a second server on a port is a mistake.
    share_port: bool = False
    # A connection without a call in progress for this long is closed (grpc
    # max_connection_idle_ms); 0 = never.
    connection_idle_s: float = DEFAULT_CONNECTION_IDLE_S
    # Connections accepted at once on the address (grpc max_allowed_incoming_connections),
    # lowered to fit RLIMIT_NOFILE less FD_RESERVE; None = no cap.
    max_connections: int | None = DEFAULT_MAX_CONNECTIONS
    # Register the server reflection service (`--grpc-reflection on|off`).
    reflection: bool = True

    def validate(self) -> None:
        if self.max_message_bytes < 4096:
            raise ConfigError("max_message_bytes must be >= 4096")
        if self.max_batch_requests <= 0:
            raise ConfigError("max_batch_requests must be > 0")
        if self.max_request_workers <= 0:
            raise ConfigError("max_request_workers must be > 0")
        if self.max_request_loads <= 0:
            raise ConfigError("max_request_loads must be > 0")
        if self.stream_window <= 0:
            raise ConfigError("stream_window must be > 0")
        if not (math.isfinite(self.connection_idle_s) and self.connection_idle_s >= 0):
            raise ConfigError("connection_idle_s must be a finite number >= 0")
        if self.max_connections is not None and self.max_connections <= 0:
            raise ConfigError("max_connections must be > 0 (or None)")
        if self.batch_concurrency <= 0:
            raise ConfigError("batch_concurrency must be > 0")
        if not (math.isfinite(self.worker_cache_seconds) and self.worker_cache_seconds >= 0):
            raise ConfigError("worker_cache_seconds must be a finite number >= 0")
        if self.max_concurrent_queries <= 0:
            raise ConfigError("max_concurrent_queries must be > 0")
        if self.max_concurrent_rpcs is not None and self.max_concurrent_rpcs <= 0:
            raise ConfigError("max_concurrent_rpcs must be > 0 (or None)")


class PipelineStats(Protocol):
    """Counters the event consumer keeps outside the index (`ConsumerStats`), read live
    by GetStats: gaps, resyncs sent, dead letters, the newest batch applied."""

    @property
    def gaps(self) -> int: ...

    @property
    def resyncs_requested(self) -> int: ...

    @property
    def dead_letters(self) -> Mapping[str, int]: ...

    @property
    def dropped(self) -> Mapping[str, int]: ...  # refused before the index (pool writes)

    @property
    def last_applied_ts(self) -> float: ...


def service_settings(config: ServiceConfig, *, share_port: bool = False) -> ServiceSettings:
    """The gRPC settings `kv-indexer serve` runs with, in its main and reader processes."""
    return ServiceSettings(
        max_batch_requests=config.max_batch_requests,
        max_request_workers=config.max_request_workers,
        max_request_loads=config.max_request_loads,
        stream_window=config.grpc_stream_window,
        connection_idle_s=config.grpc_idle_timeout_s,
        max_connections=config.grpc_max_connections or None,
        share_port=share_port,
        reflection=config.grpc_reflection == "on",
    )


def connection_cap(settings: ServiceSettings) -> int | None:
    """The connection cap the server runs with: the configured one, lowered (with a
    warning) to what RLIMIT_NOFILE leaves after FD_RESERVE descriptors."""
    cap = settings.max_connections
    if cap is None:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and cap > soft - FD_RESERVE:
        fitted = max(1, soft - FD_RESERVE)
        log.warning("grpc_connection_cap_lowered", configured=cap, cap=fitted,
                    rlimit_nofile=soft, hint="raise `ulimit -n` to allow more connections")
        return fitted
    return cap


def server_options(settings: ServiceSettings) -> list[tuple[str, int]]:
    """Channel arguments of the server: message size limits, port sharing, connection
    idle timeout and cap."""
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", int(settings.share_port)),
    ]
    if settings.connection_idle_s > 0:
        options.append(("grpc.max_connection_idle_ms",
                        max(1, round(settings.connection_idle_s * 1000))))
    cap = connection_cap(settings)
    if cap is not None:
        options.append(("grpc.max_allowed_incoming_connections", cap))
    return options


# --- errors --------------------------------------------------------------------------


class _StatusError(Exception):
    """A request the servicer refuses with a specific status code."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def _precondition(details: str) -> _StatusError:
    return _StatusError(grpc.StatusCode.FAILED_PRECONDITION, details)


def _status_of(rpc: str, exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status code and details an exception becomes on the wire."""
    if isinstance(exc, _StatusError):
        return exc.code, exc.details
    if isinstance(exc, InvalidQueryError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, BackendError):
        return grpc.StatusCode.UNAVAILABLE, f"index backend unavailable: {exc}"
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
    log.error("rpc_failed", rpc=rpc, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error in {rpc} ({type(exc).__name__})"


def _check_length(field: str, length: int, limit: int, what: str) -> None:
    """Refuse a repeated field longer than its limit (before anything walks it)."""
    if length > limit:
        raise InvalidQueryError(f"{field}: {length} {what} exceed the limit of {limit}")


def _check_role(role: str, field: str) -> None:
    """Refuse a role filter that is not a role (kvcore/roles.py), naming the field."""
    try:
        check_role(role, field, allow_empty=True)
    except ValueError as exc:
        raise InvalidQueryError(str(exc)) from None


# `MemoryIndex.score_tally`: Score's walk without its answer (None: use `score`).
TallyScorer = Callable[[ScoreQuery], Awaitable[QueryTally | None]]
QueryTokens = bytes | Sequence[int]  # packed u32 little-endian, or the parsed ids
_FORMS = ("token_ids", "token_bytes", "block_keys", "block_key_bytes")


class QueryForm(NamedTuple):
    """The query's prompt: token ids (`_query_tokens`) or block keys (`_query_keys`); the
    other is empty."""

    tokens: QueryTokens
    keys: Sequence[int]


def _query_tokens(request: pb.ScoreRequest, wire_tokens: bytes | None,
                  field: str) -> QueryTokens:
    """The query's token ids, packed when they came packed (`token_bytes`, or `token_ids`
    read off the wire: `grpc_handlers.WireTokens`); empty when it has none."""
    packed = request.token_bytes
    listed = wire_tokens if wire_tokens is not None else request.token_ids
    if not packed:
        return listed
    if listed:
        raise _not_one_form(field, ("token_ids", "token_bytes"))
    if len(packed) % 4:
        raise InvalidQueryError(f"{field}token_bytes: {len(packed)} bytes is not a multiple "
                                "of 4 (token ids as packed u32)")
    return packed


def _query_keys(request: pb.ScoreRequest, tokens: QueryTokens, field: str) -> Sequence[int]:
    """The query's block keys: `block_keys`, or `block_key_bytes` (packed u64
    little-endian) as an array; empty when it has none."""
    packed, listed = request.block_key_bytes, request.block_keys
    if not packed:
        return listed  # with token ids too: check_query_shape says so
    if tokens or listed:
        given = ["token_bytes" if request.token_bytes else "token_ids"] if tokens else []
        given += ["block_keys"] if listed else []
        raise _not_one_form(field, (*given, "block_key_bytes"))
    if len(packed) % 8:
        raise InvalidQueryError(f"{field}block_key_bytes: {len(packed)} bytes is not a "
                                "multiple of 8 (block keys as packed u64)")
    keys = array("Q", packed)
    if sys.byteorder == "big":
        keys.byteswap()
    return keys


def _check_keys_block_size(request: pb.ScoreRequest, form: QueryForm, known: int,
                           field: str) -> None:
    """Refuse block keys computed at another block size than the model's (a client that
    learnt the size before the model restarted with another): they cannot match."""
    stated = request.keys_block_size
    if form.keys and stated and known and stated != known:
        raise _precondition(f"{field}keys_block_size: the block keys were computed at "
                            f"{stated}-token blocks, model {request.model!r} has {known}-token "
                            "blocks; send the token ids (or keys at its block size)")


def _from_tokens(request: pb.ScoreRequest, form: QueryForm) -> bool:
    """Did the query come from token ids, for Diagnose: token ids, or keys the client
    computed from them (`keys_block_size`: the client library's, learnt), whose misses
    mean another tokenizer rather than another hash scheme."""
    return bool(form.tokens) or bool(request.keys_block_size)


def _not_one_form(field: str, given: Sequence[str]) -> InvalidQueryError:
    forms = ", ".join(f"{field}{name}" for name in _FORMS)
    return InvalidQueryError(f"exactly one of {forms} must be set, got "
                             + " and ".join(f"{field}{name}" for name in given))


def tally_scorer(index: object) -> TallyScorer | None:
    """The index's `score_tally` when its class has one (a wrapper that only forwards
    attributes overrides `score` and is asked with `score` alone)."""
    if not hasattr(type(index), "score_tally"):
        return None
    scorer: TallyScorer = getattr(index, "score_tally")  # noqa: B009 - checked on the type
    return scorer


def _token_count(tokens: QueryTokens) -> int:
    return len(tokens) // 4 if isinstance(tokens, bytes) else len(tokens)


_WORKER_ID = operator.attrgetter("worker_id")
_DP_RANK = operator.attrgetter("dp_rank")


def _refs_of(scores: list[WorkerScore]) -> Iterator[tuple[str, int]]:
    """Each score's (worker_id, dp_rank), with no Python frame per score."""
    return zip(map(_WORKER_ID, scores), map(_DP_RANK, scores), strict=True)


def _age(now: float, ts: float) -> float:
    return max(now - ts, 0.0) if ts > 0 else 0.0


# --- the servicer ------------------------------------------------------------------------


class KvIndexerService(pb_grpc.KvIndexerServicer):
    """`kvindex.v1.KvIndexer` over an `IndexReader` (the index's query side)."""

    def __init__(
        self,
        index: IndexReader,
        *,
        settings: ServiceSettings | None = None,
        live_workers: LiveWorkerSource | None = None,
        rebuilding: Callable[[], bool] | None = None,
        consumer_stats: PipelineStats | None = None,
        event_path: EventPathView | None = None,
        doctor: DoctorSettings | None = None,
    ) -> None:
        self.index = index
        self.settings = settings or ServiceSettings()
        self.settings.validate()
        self.config = index.config
        self.directory = WorkerDirectory(live_workers or index.workers,
                                         self.settings.worker_cache_seconds)
        self._listings = ListingCache()  # ListWorkers' pages after the first
        # Is the index rebuilding (from the bus or a snapshot)? Set by the recovery stage.
        self.rebuilding: Callable[[], bool] = rebuilding or (lambda: False)
        self.consumer_stats = consumer_stats
        self._rng = random.Random()
        self._query_slots = asyncio.Semaphore(self.settings.max_concurrent_queries)
        # Diagnose: what this process knows beyond the index; recent query outcomes.
        self.event_path = event_path or EventPathView()
        self.doctor = doctor or DoctorSettings()
        self.outcomes = QueryOutcomes(window_s=self.doctor.window_s)
        self._parse_streamed = find_best_worker_parser()
        # FindBestWorker's tally path (indexer/serve/decision.py), when the index has one.
        self._score_tally = tally_scorer(index)

    # --- RPCs (names fixed by the proto) -------------------------------------------------

    async def Score(  # noqa: N802
        self, request: pb.ScoreRequest | WireTokens[pb.ScoreRequest],
        context: grpc.aio.ServicerContext,
    ) -> pb.ScoreResponse:
        message, tokens = unwrap(request)
        return await self._guarded("Score", context, lambda: self._score(message, "", tokens))

    async def FindBestWorker(  # noqa: N802
        self, request: pb.FindBestWorkerRequest | WireTokens[pb.FindBestWorkerRequest],
        context: grpc.aio.ServicerContext,
    ) -> EncodedAnswer:
        message, tokens = unwrap(request)
        return await self._guarded("FindBestWorker", context,
                                   lambda: self._find_best_worker(message, tokens))

    async def FindBestWorkerStream(  # noqa: N802
        self, request_iterator: AsyncIterable[bytes | pb.FindBestWorkerStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[StreamedAnswers]:
        async def answer(item: bytes | pb.FindBestWorkerStreamRequest) -> StreamedAnswers:
            return await self._streamed_decisions(item, context)

        async for response in answer_in_order(request_iterator, answer,
                                              self.settings.stream_window):
            yield response

    async def ScoreBatch(  # noqa: N802
        self, request: pb.ScoreBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.ScoreBatchResponse:
        return await self._guarded("ScoreBatch", context, lambda: self._score_batch(request))

    async def ListWorkers(  # noqa: N802
        self, request: pb.ListWorkersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListWorkersResponse:
        return await self._guarded("ListWorkers", context, lambda: self._list_workers(request))

    async def GetStats(  # noqa: N802
        self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetStatsResponse:
        return await self._guarded("GetStats", context, self._get_stats)

    async def Diagnose(  # noqa: N802
        self, request: pb.DiagnoseRequest, context: grpc.aio.ServicerContext
    ) -> pb.DiagnoseResponse:
        return await self._guarded("Diagnose", context, lambda: self._diagnose(request))

    # --- the boundary ------------------------------------------------------------------

    async def _guarded(
        self, rpc: str, context: grpc.aio.ServicerContext, work: Callable[[], Awaitable[T]]
    ) -> T:
        """Run `work()` unless the deadline has passed; convert what it raises to a status.

        grpc.aio cancels the handler's task when the deadline passes mid-call (and the
        client sees DEADLINE_EXCEEDED), so backend calls in flight stop there too.
        """
        try:
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                raise TimeoutError
            return await work()
        except Exception as exc:  # noqa: BLE001 - the boundary: every error becomes a status
            code, details = _status_of(rpc, exc)
        await context.abort(code, details)
        raise AssertionError("context.abort returned")  # pragma: no cover

    # --- Score -------------------------------------------------------------------------

    async def _score(self, request: pb.ScoreRequest, field: str,
                     wire_tokens: bytes | None = None) -> pb.ScoreResponse:
        form = self._check_query(request, field, wire_tokens)
        block_size = await self._model_block_size(request, form, field)
        candidates = await self._candidates(request)
        result = await self._run_query(request, candidates, field, request.include_zero, form,
                                       model_block_size=block_size)
        response = pb.ScoreResponse(query_blocks=result.query_blocks,
                                    freshness=self._freshness(candidates, result),
                                    score_count=len(result.scores), block_size=block_size)
        add = response.scores.add  # much faster than building WorkerScore(...) with a map
        for s in result.scores[:request.max_scores or None]:
            by_tier = add(worker_id=s.worker_id, dp_rank=s.dp_rank,
                          matched_blocks=s.matched_blocks,
                          weighted_score=s.weighted_score).blocks_by_tier
            for tier, count in s.blocks_by_tier.items():
                by_tier[tier] = count
        return response

    def _check_query(self, request: pb.ScoreRequest, field: str,
                     wire_tokens: bytes | None = None) -> QueryForm:
        """Refuse a malformed query, naming the field (`field` prefixes nested names);
        returns its prompt (`_query_tokens`, `_query_keys`)."""
        tokens = _query_tokens(request, wire_tokens, field)
        keys = _query_keys(request, tokens, field)
        check_query_shape(request.model, _token_count(tokens) or None,
                          len(keys) or None, block_size=request.block_size,
                          config=self.config, field=field)
        _check_length(f"{field}workers", len(request.workers),
                      self.settings.max_request_workers, "worker ids")
        _check_role(request.role, f"{field}role")
        return QueryForm(tokens, keys)

    async def _model_block_size(self, request: pb.ScoreRequest, form: QueryForm,
                                field: str) -> int:
        """The model's block size as the index knows it (0: not yet), which answers report;
        refuses keys computed at another (`_check_keys_block_size`)."""
        known = await self.index.block_size(request.model) or 0
        _check_keys_block_size(request, form, known, field)
        return known

    def _tier_weights(self, request: pb.ScoreRequest, field: str) -> TierWeights | None:
        """The request's weights over the configured ones; None when it sets none."""
        if not request.HasField("tier_weights"):
            return None
        given, base = request.tier_weights, self.config.tier_weights
        values: dict[str, float] = {}
        for name in TIERS:
            values[name] = getattr(given, name) if given.HasField(name) else getattr(base, name)
        weights = TierWeights(**values)
        check_tier_weights(weights, field)
        return weights

    async def _candidates(self, request: pb.ScoreRequest) -> CandidateSet:
        """The live workers of the request's model, narrowed to `role` and `workers` if
        given."""
        candidates = (await self.directory.candidates(request.model)).with_role(request.role)
        if request.workers:
            return candidates.restrict(frozenset(request.workers))
        return candidates

    async def _run_query(
        self, request: pb.ScoreRequest, candidates: CandidateSet, field: str, include_zero: bool,
        form: QueryForm, *, model_block_size: int,
    ) -> ScoreResult:
        """Score the request, whose prompt is `form` (`_check_query`)."""
        query = self._index_query(request, candidates, field, include_zero, form,
                                  model_block_size=model_block_size)
        if isinstance(query, ScoreResult):
            return query
        async with self._query_slots:
            result = await self.index.score(query)
        refs = candidates.refs
        if not refs.issuperset(_refs_of(result.scores)):
            result = ScoreResult(result.query_blocks, [
                s for s in result.scores if (s.worker_id, s.dp_rank) in refs],
                staleness_s=result.staleness_s, replica=result.replica)
        if result.query_blocks:  # for Diagnose: did any candidate hold the first block?
            hit = bool(result.scores) and (not include_zero or any(
                s.matched_blocks for s in result.scores))
            self.outcomes.record(request.model, _from_tokens(request, form), request.block_size,
                                 hit)
        return result

    def _index_query(
        self, request: pb.ScoreRequest, candidates: CandidateSet, field: str, include_zero: bool,
        form: QueryForm, *, model_block_size: int,
    ) -> ScoreQuery | ScoreResult:
        """The index's query for the request, or the empty answer when there are no
        candidates."""
        tokens = form.tokens
        weights = self._tier_weights(request, field)
        n_tokens = _token_count(tokens)
        block_size = request.block_size or (model_block_size if tokens else 0)
        if not candidates:
            if not (request.workers or request.role):
                self.outcomes.no_candidates(request.model)
            blocks = n_tokens // block_size if tokens and block_size else len(form.keys)
            return ScoreResult(blocks, [])
        if tokens and not block_size:
            raise _precondition(f"block size unknown: no worker of model {request.model!r} has "
                                f"published tokens yet; set {field}block_size")
        return ScoreQuery(
            model=request.model,
            token_ids=tokens if tokens else None,
            block_keys=None if tokens else form.keys,
            block_size=block_size,
            lora_name=request.lora_name or None,
            cache_salt=request.cache_salt or None,
            workers=candidates.ids,
            tier_weights=weights,
            include_zero=include_zero,
            mounts=candidates.mounts or None,
        )

    def _freshness(self, candidates: CandidateSet, result: ScoreResult | None) -> pb.Freshness:
        """`result` None: the in-memory index's tally (staleness 0, no replica)."""
        return pb.Freshness(last_event_age_seconds=_age(time.time(), candidates.newest_ts),
                            degraded_workers=candidates.degraded, rebuilding=self.rebuilding(),
                            index_staleness_seconds=0.0 if result is None else result.staleness_s,
                            read_replica="" if result is None else result.replica)

    # --- FindBestWorker ----------------------------------------------------------------

    async def _find_best_worker(
        self, request: pb.FindBestWorkerRequest, wire_tokens: bytes | None = None,
        default_limit: int = 0,
    ) -> EncodedAnswer:
        """`default_limit`: most candidates answered when the request sets no
        `max_candidates` (0: every one)."""
        query = request.score
        form = self._check_query(query, "score.", wire_tokens)
        _check_length("loads", len(request.loads), self.settings.max_request_loads, "entries")
        overlap_weight = (request.overlap_weight if request.HasField("overlap_weight")
                          else DEFAULT_OVERLAP_WEIGHT)
        temperature = (request.temperature if request.HasField("temperature")
                       else DEFAULT_TEMPERATURE)
        block_size = await self._model_block_size(query, form, "score.")
        candidates = await self._candidates(query)
        if not candidates:
            if not (query.workers or query.role):
                self.outcomes.no_candidates(query.model)
            scopes = [f"of role {query.role!r}"] if query.role else []
            if query.workers:
                scopes.append("among the requested workers")
            scope = "".join(f" {part}" for part in scopes)
            raise _precondition(f"no live workers for model {query.model!r}{scope}")
        limit = (request.max_candidates if request.HasField("max_candidates")
                 else default_limit) or len(candidates)
        if self._score_tally is not None and tally_decides(candidates, temperature):
            answer = await self._tally_decision(request, candidates, form, block_size,
                                                overlap_weight=overlap_weight,
                                                temperature=temperature, limit=limit)
            if answer is not None:
                return answer
        result = await self._run_query(query, candidates, "score.", False, form,
                                       model_block_size=block_size)
        rng = random.Random(request.seed) if request.HasField("seed") else self._rng
        chosen, ranked = decide(candidates, result, request.loads, overlap_weight=overlap_weight,
                                temperature=temperature, limit=limit, rng=rng,
                                storage_load_weight=request.storage_load_weight)
        return encode_answer(chosen, ranked, self._freshness(candidates, result),
                             len(candidates), block_size)

    async def _tally_decision(
        self, request: pb.FindBestWorkerRequest, candidates: CandidateSet, form: QueryForm,
        model_block_size: int, *, overlap_weight: float, temperature: float, limit: int,
    ) -> EncodedAnswer | None:
        """The temperature-0 decision from the index's tally (`decide_from_tally`); None
        when the index answers this query only with `score`."""
        assert self._score_tally is not None
        query = self._index_query(request.score, candidates, "score.", False, form,
                                  model_block_size=model_block_size)
        if isinstance(query, ScoreResult):  # pragma: no cover - candidates is not empty
            return None
        async with self._query_slots:
            tally = await self._score_tally(query)
        if tally is None:
            return None
        chosen, ranked, hit = decide_from_tally(
            candidates, tally, request.loads, overlap_weight=overlap_weight,
            temperature=temperature, limit=limit,
            storage_load_weight=request.storage_load_weight)
        if tally.query_blocks:  # for Diagnose, as _run_query
            self.outcomes.record(query.model, _from_tokens(request.score, form),
                                 request.score.block_size, hit)
        return encode_answer(chosen, ranked, self._freshness(candidates, None),
                             len(candidates), model_block_size)

    async def _streamed_decisions(
        self, item: bytes | pb.FindBestWorkerStreamRequest, context: grpc.aio.ServicerContext
    ) -> StreamedAnswers:
        """The answers to one FindBestWorkerStream message, in request order."""
        answers = StreamedAnswers()
        raw = item if isinstance(item, bytes) else item.SerializeToString()
        try:
            parts = split_requests(raw)
        except ValueError as exc:
            answers.add_error(grpc.StatusCode.INVALID_ARGUMENT.value[0], "message is not a "
                              f"valid kvindex.v1.FindBestWorkerStreamRequest: {exc}")
            return answers
        for part in parts:
            try:
                answer = await self._streamed_decision(part, context)
            except Exception as exc:  # noqa: BLE001 - the boundary: every error becomes a status
                code, details = _status_of("FindBestWorkerStream", exc)
                answers.add_error(code.value[0], details)
            else:
                answers.add_answer(answer.data)
        return answers

    async def _streamed_decision(self, part: memoryview, context: grpc.aio.ServicerContext
                                 ) -> EncodedAnswer:
        try:
            message, tokens = unwrap(self._parse_streamed(part))
        except (DecodeError, ValueError) as exc:
            raise InvalidQueryError("request is not a valid "
                                    f"kvindex.v1.FindBestWorkerRequest: {exc}") from exc
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise TimeoutError
        return await self._find_best_worker(message, tokens,
                                            default_limit=DEFAULT_STREAM_CANDIDATES)

    # --- ScoreBatch --------------------------------------------------------------------

    async def _score_batch(self, request: pb.ScoreBatchRequest) -> pb.ScoreBatchResponse:
        queries = request.requests
        limit = self.settings.max_batch_requests
        if len(queries) > limit:
            raise InvalidQueryError(f"requests: {len(queries)} queries exceed the limit of "
                                    f"{limit} per ScoreBatch")
        fields = [f"requests[{i}]." for i in range(len(queries))]
        for query, field in zip(queries, fields, strict=True):
            self._check_query(query, field)  # refuse the whole batch before any work
        responses: list[pb.ScoreResponse] = []
        step = self.settings.batch_concurrency
        for start in range(0, len(queries), step):
            group = zip(queries[start : start + step], fields[start : start + step], strict=True)
            responses.extend(await asyncio.gather(*(self._score(q, f) for q, f in group)))
        return pb.ScoreBatchResponse(responses=responses)

    # --- ListWorkers, GetStats -----------------------------------------------------------

    async def _list_workers(self, request: pb.ListWorkersRequest) -> pb.ListWorkersResponse:
        _check_role(request.role, "role")
        if request.kind not in ("", *KINDS):
            raise InvalidQueryError(f"kind: {request.kind!r} is not one of {', '.join(KINDS)} "
                                    "(or empty: both)")

        async def matching() -> list[WorkerInfo]:
            infos = await self.directory.listing(request.model or None)
            return [w for w in infos if (not request.kind or w.kind == request.kind)
                    and (w.kind == KIND_POOL or role_matches(w.role, request.role))]

        listing = await self._listings.sorted_listing(
            (request.model, request.role, request.kind), bool(request.page_token), matching)
        page = page_of(listing, model=request.model, role=request.role, kind=request.kind,
                       page_size=request.page_size, page_token=request.page_token)
        now = time.time()
        response = pb.ListWorkersResponse(next_page_token=page.next_page_token)
        add = response.workers.add
        for w in page.entries:
            entry = add(model=w.model, worker_id=w.worker_id, dp_rank=w.dp_rank,
                        epoch=max(w.epoch, 0), last_seq=w.last_seq, degraded=w.degraded,
                        last_event_age_seconds=_age(now, w.last_event_ts),
                        role="" if w.kind == KIND_POOL else w.role, kind=w.kind,
                        storage_pools=w.storage_pools)
            by_tier = entry.blocks_by_tier
            for tier, count in w.blocks_by_tier.items():
                by_tier[tier] = count
        if not request.page_size and response.ByteSize() > self.settings.max_message_bytes:
            raise _StatusError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{len(page.entries):,} workers do not fit one answer of at most "
                f"{self.settings.max_message_bytes:,} bytes: ask pages (page_size)")
        return response

    async def _get_stats(self) -> pb.GetStatsResponse:
        stats = await self.index.stats()
        infos = await self.directory.listing(None)
        newest = max((w.last_event_ts for w in infos), default=0.0)
        response = pb.GetStatsResponse(
            batches_applied=stats.batches_applied,
            events_applied=stats.events_applied,
            blocks_stored=stats.blocks_stored,
            blocks_removed=stats.blocks_removed,
            duplicates=stats.duplicates,
            stale=stats.stale,
            resyncs_requested=stats.resyncs_requested,
            dropped=stats.dropped,
            workers=stats.workers,
        )
        consumer = self.consumer_stats
        if consumer is not None:
            # Its resync count is of requests actually sent (the index's, rate-limited).
            response.gaps = consumer.gaps
            response.resyncs_requested = consumer.resyncs_requested
            for reason, count in consumer.dead_letters.items():
                response.dropped[reason] += count
            for reason, count in consumer.dropped.items():  # pool_not_declared
                response.dropped[reason] += count
            newest = max(newest, consumer.last_applied_ts)
        response.lag_seconds = _age(time.time(), newest)
        return response

    # --- Diagnose ---------------------------------------------------------------------

    async def _diagnose(self, request: pb.DiagnoseRequest) -> pb.DiagnoseResponse:
        snapshot = await take_snapshot(self.index, self.outcomes, self.event_path,
                                       rebuilding=self.rebuilding(), model=request.model,
                                       settings=self.doctor)
        return to_proto(diagnose(snapshot))


# --- the server --------------------------------------------------------------------------


async def start_grpc_server(
    index: IndexReader,
    listen: str = DEFAULT_LISTEN,
    *,
    settings: ServiceSettings | None = None,
    live_workers: LiveWorkerSource | None = None,
    rebuilding: Callable[[], bool] | None = None,
    consumer_stats: PipelineStats | None = None,
    health_servicer: health.aio.HealthServicer | None = None,
    security: GrpcSecurity | None = None,
    registry: CollectorRegistry | None = None,
    event_path: EventPathView | None = None,
    doctor: DoctorSettings | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Start a grpc.aio server for `index` on `listen` ("host:0" picks a free port).

    Registers KvIndexer, health and (unless `settings.reflection` is off) reflection;
    returns the server and the bound port. Health is `health_servicer`, whose status its
    owner keeps true (`ServingHealth`); without one, a servicer that always answers
    SERVING. `security`: TLS / mTLS credentials and bearer tokens (indexer/serve/auth.py);
    None serves plaintext to anyone. `registry`: where per-method request counts and
    latencies go (indexer/serve/grpc_metrics.py); None measures nothing. Stop it with
    `await server.stop(grace)`. `event_path` and `doctor`: what Diagnose sees beyond the
    index, and its thresholds (indexer/serve/diagnose.py).
    """
    settings = settings or ServiceSettings()
    settings.validate()
    security = security or GrpcSecurity()
    credentials = security.credentials() if security.tls else None
    servicer = KvIndexerService(index, settings=settings, live_workers=live_workers,
                                rebuilding=rebuilding, consumer_stats=consumer_stats,
                                event_path=event_path, doctor=doctor)
    interceptors = security.interceptors()
    if registry is not None:  # first, so that it also counts the token check's refusals
        from indexer.serve.grpc_metrics import GrpcMetrics  # noqa: PLC0415 - server extra

        interceptors.insert(0, GrpcMetrics(registry))
    server = grpc.aio.server(options=server_options(settings),
                             maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
                             interceptors=interceptors or None)
    add_kv_indexer_service(servicer, server)
    if health_servicer is None:  # nobody watches this server's parts: always SERVING
        health_servicer = health.aio.HealthServicer()
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if settings.reflection:
        reflection.enable_server_reflection(
            (SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        port = int(server.add_insecure_port(listen) if credentials is None
                   else server.add_secure_port(listen, credentials))
    except RuntimeError as exc:  # gRPC says only "Failed to bind"
        raise ConfigError(f"--grpc-listen {listen}: cannot listen on {listen} (in use, or "
                          "not an address of this host)") from exc
    if port == 0:
        raise ConfigError(f"--grpc-listen {listen}: cannot listen on {listen}")
    await server.start()
    log.info("grpc_listening", listen=listen, port=port, security=security.describe())
    return server, port
