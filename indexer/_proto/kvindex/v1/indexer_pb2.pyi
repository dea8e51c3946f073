from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Severity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEVERITY_UNSPECIFIED: _ClassVar[Severity]
    SEVERITY_INFO: _ClassVar[Severity]
    SEVERITY_WARNING: _ClassVar[Severity]
    SEVERITY_ERROR: _ClassVar[Severity]
SEVERITY_UNSPECIFIED: Severity
SEVERITY_INFO: Severity
SEVERITY_WARNING: Severity
SEVERITY_ERROR: Severity

class ScoreRequest(_message.Message):
    __slots__ = ("model", "lora_name", "cache_salt", "token_ids", "block_keys", "token_bytes", "block_key_bytes", "workers", "tier_weights", "include_zero", "block_size", "role", "keys_block_size", "max_scores")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LORA_NAME_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_KEYS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_BYTES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_KEY_BYTES_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    TIER_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_ZERO_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    KEYS_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_SCORES_FIELD_NUMBER: _ClassVar[int]
    model: str
    lora_name: str
    cache_salt: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    block_keys: _containers.RepeatedScalarFieldContainer[int]
    token_bytes: bytes
    block_key_bytes: bytes
    workers: _containers.RepeatedScalarFieldContainer[str]
    tier_weights: TierWeights
    include_zero: bool
    block_size: int
    role: str
    keys_block_size: int
    max_scores: int
    def __init__(self, model: _Optional[str] = ..., lora_name: _Optional[str] = ..., cache_salt: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., block_keys: _Optional[_Iterable[int]] = ..., token_bytes: _Optional[bytes] = ..., block_key_bytes: _Optional[bytes] = ..., workers: _Optional[_Iterable[str]] = ..., tier_weights: _Optional[_Union[TierWeights, _Mapping]] = ..., include_zero: _Optional[bool] = ..., block_size: _Optional[int] = ..., role: _Optional[str] = ..., keys_block_size: _Optional[int] = ..., max_scores: _Optional[int] = ...) -> None: ...

class TierWeights(_message.Message):
    __slots__ = ("gpu", "cpu", "storage", "other")
    GPU_FIELD_NUMBER: _ClassVar[int]
    CPU_FIELD_NUMBER: _ClassVar[int]
    STORAGE_FIELD_NUMBER: _ClassVar[int]
    OTHER_FIELD_NUMBER: _ClassVar[int]
    gpu: float
    cpu: float
    storage: float
    other: float
    def __init__(self, gpu: _Optional[float] = ..., cpu: _Optional[float] = ..., storage: _Optional[float] = ..., other: _Optional[float] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("query_blocks", "scores", "freshness", "score_count", "block_size")
    QUERY_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    FRESHNESS_FIELD_NUMBER: _ClassVar[int]
    SCORE_COUNT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    query_blocks: int
    scores: _containers.RepeatedCompositeFieldContainer[WorkerScore]
    freshness: Freshness
    score_count: int
    block_size: int
    def __init__(self, query_blocks: _Optional[int] = ..., scores: _Optional[_Iterable[_Union[WorkerScore, _Mapping]]] = ..., freshness: _Optional[_Union[Freshness, _Mapping]] = ..., score_count: _Optional[int] = ..., block_size: _Optional[int] = ...) -> None: ...

class WorkerScore(_message.Message):
    __slots__ = ("worker_id", "dp_rank", "matched_blocks", "weighted_score", "blocks_by_tier")
    class BlocksByTierEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    DP_RANK_FIELD_NUMBER: _ClassVar[int]
    MATCHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTED_SCORE_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_BY_TIER_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    dp_rank: int
    matched_blocks: int
    weighted_score: float
    blocks_by_tier: _containers.ScalarMap[str, int]
    def __init__(self, worker_id: _Optional[str] = ..., dp_rank: _Optional[int] = ..., matched_blocks: _Optional[int] = ..., weighted_score: _Optional[float] = ..., blocks_by_tier: _Optional[_Mapping[str, int]] = ...) -> None: ...

class Freshness(_message.Message):
    __slots__ = ("last_event_age_seconds", "degraded_workers", "rebuilding", "index_staleness_seconds", "read_replica")
    LAST_EVENT_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_WORKERS_FIELD_NUMBER: _ClassVar[int]
    REBUILDING_FIELD_NUMBER: _ClassVar[int]
    INDEX_STALENESS_SECONDS_FIELD_NUMBER: _ClassVar[int]
    READ_REPLICA_FIELD_NUMBER: _ClassVar[int]
    last_event_age_seconds: float
    degraded_workers: _containers.RepeatedScalarFieldContainer[str]
    rebuilding: bool
    index_staleness_seconds: float
    read_replica: str
    def __init__(self, last_event_age_seconds: _Optional[float] = ..., degraded_workers: _Optional[_Iterable[str]] = ..., rebuilding: _Optional[bool] = ..., index_staleness_seconds: _Optional[float] = ..., read_replica: _Optional[str] = ...) -> None: ...

class FindBestWorkerRequest(_message.Message):
    __slots__ = ("score", "loads", "overlap_weight", "temperature", "seed", "storage_load_weight", "max_candidates")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    LOADS_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STORAGE_LOAD_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    score: ScoreRequest
    loads: _containers.RepeatedCompositeFieldContainer[WorkerLoad]
    overlap_weight: float
    temperature: float
    seed: int
    storage_load_weight: float
    max_candidates: int
    def __init__(self, score: _Optional[_Union[ScoreRequest, _Mapping]] = ..., loads: _Optional[_Iterable[_Union[WorkerLoad, _Mapping]]] = ..., overlap_weight: _Optional[float] = ..., temperature: _Optional[float] = ..., seed: _Optional[int] = ..., storage_load_weight: _Optional[float] = ..., max_candidates: _Optional[int] = ...) -> None: ...

class WorkerLoad(_message.Message):
    __slots__ = ("worker_id", "dp_rank", "active_blocks", "waiting_requests", "prefill_tokens_in_flight")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    DP_RANK_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    WAITING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    dp_rank: int
    active_blocks: int
    waiting_requests: int
    prefill_tokens_in_flight: int
    def __init__(self, worker_id: _Optional[str] = ..., dp_rank: _Optional[int] = ..., active_blocks: _Optional[int] = ..., waiting_requests: _Optional[int] = ..., prefill_tokens_in_flight: _Optional[int] = ...) -> None: ...

class FindBestWorkerResponse(_message.Message):
    __slots__ = ("worker_id", "dp_rank", "matched_blocks", "candidates", "freshness", "candidate_count", "block_size")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    DP_RANK_FIELD_NUMBER: _ClassVar[int]
    MATCHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    FRESHNESS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_COUNT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    dp_rank: int
    matched_blocks: int
    candidates: _containers.RepeatedCompositeFieldContainer[CandidateCost]
    freshness: Freshness
    candidate_count: int
    block_size: int
    def __init__(self, worker_id: _Optional[str] = ..., dp_rank: _Optional[int] = ..., matched_blocks: _Optional[int] = ..., candidates: _Optional[_Iterable[_Union[CandidateCost, _Mapping]]] = ..., freshness: _Optional[_Union[Freshness, _Mapping]] = ..., candidate_count: _Optional[int] = ..., block_size: _Optional[int] = ...) -> None: ...

class FindBestWorkerStreamRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[FindBestWorkerRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[FindBestWorkerRequest, _Mapping]]] = ...) -> None: ...

class FindBestWorkerStreamResponse(_message.Message):
    __slots__ = ("answers",)
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    answers: _containers.RepeatedCompositeFieldContainer[StreamedDecision]
    def __init__(self, answers: _Optional[_Iterable[_Union[StreamedDecision, _Mapping]]] = ...) -> None: ...

class StreamedDecision(_message.Message):
    __slots__ = ("answer", "code", "message")
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    answer: FindBestWorkerResponse
    code: int
    message: str
    def __init__(self, answer: _Optional[_Union[FindBestWorkerResponse, _Mapping]] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class CandidateCost(_message.Message):
    __slots__ = ("worker_id", "dp_rank", "matched_blocks", "prefill_blocks", "active_blocks", "cost", "waiting_requests", "storage_blocks")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    DP_RANK_FIELD_NUMBER: _ClassVar[int]
    MATCHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    WAITING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    STORAGE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    dp_rank: int
    matched_blocks: int
    prefill_blocks: int
    active_blocks: int
    cost: float
    waiting_requests: int
    storage_blocks: int
    def __init__(self, worker_id: _Optional[str] = ..., dp_rank: _Optional[int] = ..., matched_blocks: _Optional[int] = ..., prefill_blocks: _Optional[int] = ..., active_blocks: _Optional[int] = ..., cost: _Optional[float] = ..., waiting_requests: _Optional[int] = ..., storage_blocks: _Optional[int] = ...) -> None: ...

class ScoreBatchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[ScoreRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[ScoreRequest, _Mapping]]] = ...) -> None: ...

class ScoreBatchResponse(_message.Message):
    __slots__ = ("responses",)
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[ScoreResponse]
    def __init__(self, responses: _Optional[_Iterable[_Union[ScoreResponse, _Mapping]]] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ("model", "role", "kind", "page_size", "page_token")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    model: str
    role: str
    kind: str
    page_size: int
    page_token: str
    def __init__(self, model: _Optional[str] = ..., role: _Optional[str] = ..., kind: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers", "next_page_token")
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    next_page_token: str
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("model", "worker_id", "dp_rank", "epoch", "last_seq", "degraded", "blocks_by_tier", "last_event_age_seconds", "role", "kind", "storage_pools")
    class BlocksByTierEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    DP_RANK_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_BY_TIER_FIELD_NUMBER: _ClassVar[int]
    LAST_EVENT_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STORAGE_POOLS_FIELD_NUMBER: _ClassVar[int]
    model: str
    worker_id: str
    dp_rank: int
    epoch: int
    last_seq: int
    degraded: bool
    blocks_by_tier: _containers.ScalarMap[str, int]
    last_event_age_seconds: float
    role: str
    kind: str
    storage_pools: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., worker_id: _Optional[str] = ..., dp_rank: _Optional[int] = ..., epoch: _Optional[int] = ..., last_seq: _Optional[int] = ..., degraded: _Optional[bool] = ..., blocks_by_tier: _Optional[_Mapping[str, int]] = ..., last_event_age_seconds: _Optional[float] = ..., role: _Optional[str] = ..., kind: _Optional[str] = ..., storage_pools: _Optional[_Iterable[str]] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("batches_applied", "events_applied", "blocks_stored", "blocks_removed", "duplicates", "stale", "gaps", "resyncs_requested", "dropped", "workers", "lag_seconds")
    class DroppedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    BATCHES_APPLIED_FIELD_NUMBER: _ClassVar[int]
    EVENTS_APPLIED_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_STORED_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_REMOVED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    GAPS_FIELD_NUMBER: _ClassVar[int]
    RESYNCS_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    LAG_SECONDS_FIELD_NUMBER: _ClassVar[int]
    batches_applied: int
    events_applied: int
    blocks_stored: int
    blocks_removed: int
    duplicates: int
    stale: int
    gaps: int
    resyncs_requested: int
    dropped: _containers.ScalarMap[str, int]
    workers: int
    lag_seconds: float
    def __init__(self, batches_applied: _Optional[int] = ..., events_applied: _Optional[int] = ..., blocks_stored: _Optional[int] = ..., blocks_removed: _Optional[int] = ..., duplicates: _Optional[int] = ..., stale: _Optional[int] = ..., gaps: _Optional[int] = ..., resyncs_requested: _Optional[int] = ..., dropped: _Optional[_Mapping[str, int]] = ..., workers: _Optional[int] = ..., lag_seconds: _Optional[float] = ...) -> None: ...

class DiagnoseRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class Finding(_message.Message):
    __slots__ = ("severity", "code", "summary", "fix", "model", "worker_id", "dp_rank")
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    FIX_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    DP_RANK_FIELD_NUMBER: _ClassVar[int]
    severity: Severity
    code: str
    summary: str
    fix: str
    model: str
    worker_id: str
    dp_rank: int
    def __init__(self, severity: _Optional[_Union[Severity, str]] = ..., code: _Optional[str] = ..., summary: _Optional[str] = ..., fix: _Optional[str] = ..., model: _Optional[str] = ..., worker_id: _Optional[str] = ..., dp_rank: _Optional[int] = ...) -> None: ...

class DiagnoseResponse(_message.Message):
    __slots__ = ("findings", "checks", "limitations")
    FINDINGS_FIELD_NUMBER: _ClassVar[int]
    CHECKS_FIELD_NUMBER: _ClassVar[int]
    LIMITATIONS_FIELD_NUMBER: _ClassVar[int]
    findings: _containers.RepeatedCompositeFieldContainer[Finding]
    checks: _containers.RepeatedScalarFieldContainer[str]
    limitations: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, findings: _Optional[_Iterable[_Union[Finding, _Mapping]]] = ..., checks: _Optional[_Iterable[str]] = ..., limitations: _Optional[_Iterable[str]] = ...) -> None: ...
