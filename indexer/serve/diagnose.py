"""`Diagnose`: why routing gets no hits, from what the running service knows.

Each check is a plain function over one `ServiceSnapshot` (the index's ranks and block
sizes, the liveness registry, what the consumers saw of each rank, recent query outcomes,
dead letters, the rebuild flag) returning findings, each with a verdict and a fix. The
servicer takes the snapshot (`take_snapshot`) and runs every check (`diagnose`).

Recent query outcomes are the one thing gathered on the query path: `QueryOutcomes.record`
counts, per model and query kind (token ids with the model's block size, token ids with a
block size of their own, block keys), how many queries were answered and how many matched
not even their first block, in two rotating windows of `window_s`; queries for which the
model had no candidate at all are counted per model name. Both are bounded.

What a process cannot see is said in the answer's `limitations`: a reader process
(`--grpc-processes`) has no event path, and each process counts only its own queries and
the batches of the partitions it consumes.
"""

from __future__ import annotations

import difflib
import functools
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

import msgspec

from indexer._proto.kvindex.v1 import indexer_pb2 as pb
from indexer.findings import CODES, ERROR, INFO, WARNING, Diagnosis, Finding, severity_rank
from indexer.index.protocol import IndexReader, WorkerInfo
from indexer.ingest.activity import DEFAULT_LAG_WINDOW_S, EventActivity, RankActivity, RankKey
from indexer.ingest.liveness import LivenessWatcher
from kvcore.bus import TIERS
from kvcore.keys import NATIVE
from kvcore.topology import WorkerRecord

__all__ = [
    "CHECKS",
    "DoctorSettings",
    "EventPathView",
    "ModelQueries",
    "QueryOutcomes",
    "ServiceSnapshot",
    "diagnose",
    "take_snapshot",
    "to_proto",
]

WorkerKey = tuple[str, str]  # model, worker id

# QueryOutcomes kinds: (by token ids?, block size the query asked for; 0 = the model's).
QueryKind = tuple[bool, int]
KEYS_KIND: Final[QueryKind] = (False, 0)
_MAX_KINDS_PER_MODEL: Final = 8
_OTHER_BLOCK_SIZE: Final = -1  # token queries of block sizes past the per-model bound


class DoctorSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Thresholds of the checks."""

    # A registered worker with no event for this long after its (re)start is silent.
    silent_after_s: float = 60.0
    # An unregistered worker counts as publishing if its last event is this recent.
    recent_event_s: float = 300.0
    # first_block_misses: at least this many recent queries, this share of them missing
    # their first block, while the model's ranks hold at least this many blocks.
    min_queries: int = 20
    miss_ratio: float = 0.9
    min_model_blocks: int = 1000
    # stores_without_removals: a rank holding and having stored at least this many blocks
    # of one tier, with not one removal (or clear) of that tier seen.
    no_removal_blocks: int = 50_000
    # clock_skew: the smallest lag of a rank's batches over EventActivity's last one or two
    # windows beyond this many seconds either way.
    max_skew_s: float = 2.0
    # QueryOutcomes windows.
    window_s: float = 300.0


# --- recent query outcomes (the Score path) ----------------------------------------------


class ModelQueries(msgspec.Struct, frozen=True):
    """Recent queries of one model, per kind: [answered, missed the first block]."""

    by_kind: dict[QueryKind, tuple[int, int]]

    def of(self, kinds: Iterable[QueryKind]) -> tuple[int, int]:
        wanted = set(kinds)
        answered = sum(c[0] for k, c in self.by_kind.items() if k in wanted)
        missed = sum(c[1] for k, c in self.by_kind.items() if k in wanted)
        return answered, missed


class QueryOutcomes:
    """Bounded counters of recent query outcomes per model (two windows of `window_s`)."""

    def __init__(self, *, window_s: float = 300.0, max_models: int = 1024,
                 max_unknown: int = 64) -> None:
        self.window_s = window_s
        self.max_models = max_models
        self.max_unknown = max_unknown
        self._current: dict[str, dict[QueryKind, list[int]]] = {}
        self._previous: dict[str, dict[QueryKind, list[int]]] = {}
        self._no_candidates: dict[str, int] = {}
        self._prev_no_candidates: dict[str, int] = {}
        self._window_start = time.monotonic()

    def _catch_up(self, now: float) -> None:
        """Start a new window when the current one is over; forget both after two."""
        elapsed = now - self._window_start
        if elapsed < self.window_s:
            return
        if elapsed >= 2 * self.window_s:
            self._current, self._no_candidates = {}, {}
        self._previous, self._current = self._current, {}
        self._prev_no_candidates, self._no_candidates = self._no_candidates, {}
        self._window_start = now

    def record(self, model: str, by_tokens: bool, block_size: int, hit: bool) -> None:
        """One answered query (with at least one full block): did any candidate hold its
        first block? `block_size`: what the query asked for (0: the model's own)."""
        now = time.monotonic()
        if now - self._window_start >= self.window_s:
            self._catch_up(now)
        kinds = self._current.get(model)
        if kinds is None:
            if len(self._current) >= self.max_models:
                return
            kinds = self._current[model] = {}
        kind = (by_tokens, block_size if by_tokens else 0)
        counts = kinds.get(kind)
        if counts is None:
            if len(kinds) >= _MAX_KINDS_PER_MODEL:
                kind = (by_tokens, _OTHER_BLOCK_SIZE)
            counts = kinds.setdefault(kind, [0, 0])
        counts[0] += 1
        if not hit:
            counts[1] += 1

    def no_candidates(self, model: str) -> None:
        """A query for which the model had no live worker at all (filters aside)."""
        self._catch_up(time.monotonic())
        count = self._no_candidates.get(model)
        if count is None and len(self._no_candidates) >= self.max_unknown:
            return
        self._no_candidates[model] = (count or 0) + 1

    def snapshot(self) -> tuple[dict[str, ModelQueries], dict[str, int]]:
        """Both windows summed: per model its kinds' counts; per model without candidates
        its query count."""
        self._catch_up(time.monotonic())
        merged: dict[str, dict[QueryKind, tuple[int, int]]] = {}
        for window in (self._previous, self._current):
            for model, kinds in window.items():
                into = merged.setdefault(model, {})
                for kind, (answered, missed) in kinds.items():
                    a, m = into.get(kind, (0, 0))
                    into[kind] = (a + answered, m + missed)
        orphans: dict[str, int] = {}
        for window_counts in (self._prev_no_candidates, self._no_candidates):
            for model, count in window_counts.items():
                orphans[model] = orphans.get(model, 0) + count
        return {m: ModelQueries(k) for m, k in merged.items()}, orphans


# --- what the service knows ------------------------------------------------------------


@dataclass(frozen=True)
class EventPathView:
    """What a process knows beyond the index: the liveness registry, and where it consumes,
    the consumers' per rank activity and dead letters (a reader process has the registry
    only)."""

    # None from the callable: no settled view yet (the watcher started less than a TTL ago).
    registered: Callable[[], Mapping[WorkerKey, WorkerRecord] | None] | None = None
    departed: Callable[[], Iterable[WorkerKey]] | None = None
    activity: EventActivity | None = None
    dead_letters: Callable[[], Mapping[str, int]] | None = None

    @classmethod
    def watching(cls, liveness: Callable[[], LivenessWatcher | None], *,
                 activity: EventActivity | None = None,
                 dead_letters: Callable[[], Mapping[str, int]] | None = None) -> EventPathView:
        """The view of a process whose liveness watcher `liveness()` returns (None while
        it has none yet)."""

        def registered() -> Mapping[WorkerKey, WorkerRecord] | None:
            watcher = liveness()
            return watcher.live if watcher is not None and watcher.settled else None

        def departed() -> Iterable[WorkerKey]:
            watcher = liveness()
            return () if watcher is None else watcher.registered_once - watcher.live.keys()

        return cls(registered=registered, departed=departed, activity=activity,
                   dead_letters=dead_letters)


@dataclass(frozen=True)
class ServiceSnapshot:
    """Everything the checks look at, taken at one moment (`now`, wall clock)."""

    now: float
    ranks: list[WorkerInfo]
    block_sizes: dict[str, int | None]  # model -> block size its events store with
    queries: dict[str, ModelQueries] = field(default_factory=dict)
    no_candidates: dict[str, int] = field(default_factory=dict)
    # None: no settled view of the registry (no watcher, or one younger than a TTL).
    registered: dict[WorkerKey, WorkerRecord] | None = None
    departed: frozenset[WorkerKey] = frozenset()
    activity: dict[RankKey, RankActivity] | None = None
    lag_window_s: float = DEFAULT_LAG_WINDOW_S  # EventActivity's
    index_drops: dict[str, int] = field(default_factory=dict)
    dead_letters: dict[str, int] | None = None
    rebuilding: bool = False
    native: bool = NATIVE  # this process runs the C extension (kvcore._native)
    model: str = ""  # the model asked about; "" = all
    settings: DoctorSettings = field(default_factory=DoctorSettings)

    @property
    def models(self) -> set[str]:
        """Models the index or the registry knows."""
        known = {w.model for w in self.ranks}
        if self.registered:
            known |= {model for model, _ in self.registered}
        return known

    @functools.cached_property
    def _blocks_by_model(self) -> dict[str, int]:
        blocks: dict[str, int] = {}
        for w in self.ranks:
            blocks[w.model] = blocks.get(w.model, 0) + sum(w.blocks_by_tier.values())
        return blocks

    @functools.cached_property
    def newest_epochs(self) -> dict[WorkerKey, int]:
        """Per worker, the newest epoch of its ranks in the index."""
        epochs: dict[WorkerKey, int] = {}
        for w in self.ranks:
            key = (w.model, w.worker_id)
            epochs[key] = max(epochs.get(key, w.epoch), w.epoch)
        return epochs

    def blocks_of(self, model: str) -> int:
        """Blocks the model's ranks hold, all tiers."""
        return self._blocks_by_model.get(model, 0)

    def concerns(self, model: str) -> bool:
        return not self.model or model == self.model


async def take_snapshot(index: IndexReader, outcomes: QueryOutcomes, view: EventPathView, *,
                        rebuilding: bool, model: str = "",
                        settings: DoctorSettings | None = None) -> ServiceSnapshot:
    """Read what the checks need from the index and the service's own records."""
    ranks = await index.workers(None)
    queries, no_candidates = outcomes.snapshot()
    found = view.registered() if view.registered is not None else None
    registered = dict(found) if found is not None else None
    departed = frozenset(view.departed()) if view.departed is not None else frozenset()
    models = {w.model for w in ranks} | set(queries)
    if registered:
        models |= {m for m, _ in registered}
    block_sizes = {m: await index.block_size(m) for m in sorted(models)}
    stats = await index.stats()
    return ServiceSnapshot(
        now=time.time(), ranks=ranks, block_sizes=block_sizes, queries=queries,
        no_candidates=no_candidates, registered=registered, departed=departed,
        activity=dict(view.activity.ranks) if view.activity is not None else None,
        lag_window_s=(view.activity.lag_window_s if view.activity is not None
                      else DEFAULT_LAG_WINDOW_S),
        index_drops=dict(stats.dropped),
        dead_letters=dict(view.dead_letters()) if view.dead_letters is not None else None,
        rebuilding=rebuilding, model=model, settings=settings or DoctorSettings())


# --- the checks --------------------------------------------------------------------------


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "0%"


def check_unknown_model(snap: ServiceSnapshot) -> list[Finding]:
    """The model asked about, or models queried without any worker, that nobody publishes."""
    known = snap.models
    asked: dict[str, int] = {m: n for m, n in snap.no_candidates.items()
                             if m not in known and snap.concerns(m)}
    if snap.model and snap.model not in known:
        asked.setdefault(snap.model, 0)
    findings = []
    names = ", ".join(repr(m) for m in sorted(known)[:8]) or "none"
    for model, count in sorted(asked.items()):
        queried = f"{count} recent queries asked for it, and each" if count else "Each query"
        summary = (f"no worker publishes model {model!r}: {queried} reads as a plain cache "
                   f"miss (known models: {names}).")
        if not known:
            findings.append(Finding(
                severity=ERROR, code="unknown_model", model=model,
                summary=summary[:-1] + ": no worker at all has registered or published here.",
                fix=("Point the bridges' --nats-url (KV_PUBLISHER_NATS_URL) at the NATS this "
                     "indexer uses (its start-up banner prints it), and check they run.")))
            continue
        close = difflib.get_close_matches(model, sorted(known), n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        findings.append(Finding(
            severity=ERROR, code="unknown_model", model=model, summary=summary,
            fix=("Send the served model name exactly as the workers publish it (the bridge's "
                 "--model, the engine's served model name)." + hint)))
    return findings


def check_silent_workers(snap: ServiceSnapshot) -> list[Finding]:
    """Registered (heartbeats) for a while, yet no batch of this epoch in the index."""
    if snap.registered is None:
        return []
    findings = []
    for (model, worker), record in sorted(snap.registered.items()):
        if not snap.concerns(model) or record.epoch <= 0:
            continue
        up_for = snap.now - record.epoch / 1e9
        if up_for < snap.settings.silent_after_s:
            continue
        if snap.newest_epochs.get((model, worker), -1) >= record.epoch:
            continue
        busy = bool(snap.queries.get(model)) or snap.blocks_of(model) > 0
        findings.append(Finding(
            severity=WARNING if busy else INFO, code="silent_worker", model=model,
            worker_id=worker,
            summary=(f"worker {worker!r} has been registered for {up_for:.0f} s (block size "
                     f"{record.block_size}, {record.dp_size} DP rank(s)) and not one event of "
                     "it has reached the index" +
                     ("" if busy else "; the model is idle, so it may just have had no "
                      "request yet") + "."),
            fix=("Make the engine publish KV events where the bridge listens: vLLM needs "
                 "--kv-events-config with enable_kv_cache_events true, publisher zmq and an "
                 "endpoint the bridge's --zmq-endpoint reaches (same host and port, same "
                 "--topic; with DP, ports offset by rank); the bridge's "
                 "kv_publisher_engine_batches_total stays 0 while nothing arrives.")))
    return findings


def check_unregistered_workers(snap: ServiceSnapshot) -> list[Finding]:
    """Ranks with recent events whose worker has no registry entry."""
    if snap.registered is None:
        return []
    newest: dict[WorkerKey, float] = {}
    for w in snap.ranks:
        key = (w.model, w.worker_id)
        newest[key] = max(newest.get(key, 0.0), w.last_event_ts)
    findings = []
    for (model, worker), ts in sorted(newest.items()):
        if not snap.concerns(model) or (model, worker) in snap.registered:
            continue
        if ts <= 0 or snap.now - ts > snap.settings.recent_event_s:
            continue
        if (model, worker) in snap.departed:
            findings.append(Finding(
                severity=INFO, code="unregistered_worker", model=model, worker_id=worker,
                summary=(f"worker {worker!r} left the registry (stopped, or its entry "
                         f"expired); its blocks leave the index after the liveness grace."),
                fix="Nothing, if it was stopped; else see why its bridge stopped refreshing "
                    "its entry (its log: liveness_put_failed)."))
            continue
        findings.append(Finding(
            severity=ERROR, code="unregistered_worker", model=model, worker_id=worker,
            summary=(f"worker {worker!r} publishes events (the last {snap.now - ts:.0f} s ago) "
                     "but has no entry in the worker registry (kv_workers): routers never see "
                     "it as live, and its blocks are removed after the liveness grace."),
            fix=("Let its publisher write its liveness entry: the bridge does on its own; a "
                 "library publisher must be started with KVEventPublisher.start(); with NATS "
                 "authorization the worker's user needs $KV.kv_workers.<model>.<worker> "
                 "(kv-indexer nats-auth writes it).")))
    return findings


def check_block_size(snap: ServiceSnapshot) -> list[Finding]:
    """Queries asking with another block size; registry entries declaring another one."""
    findings = []
    for model, size in sorted(snap.block_sizes.items()):
        if not snap.concerns(model) or not size:
            continue
        queries = snap.queries.get(model)
        for (by_tokens, asked), (answered, _) in sorted(
                queries.by_kind.items() if queries else ()):
            if not by_tokens or asked in (0, size):
                continue
            what = f"block_size {asked}" if asked > 0 else "block sizes of their own"
            findings.append(Finding(
                severity=ERROR, code="block_size_mismatch", model=model,
                summary=(f"{answered} recent queries of {model!r} asked with {what}, but its "
                         f"workers store blocks of {size} tokens: those queries can never "
                         "match."),
                fix=(f"Send block_size 0 (the model's own) or {size} in ScoreRequest; a router "
                     "hashing block keys itself must chunk by the engine's --block-size.")))
        for (rec_model, worker), record in sorted((snap.registered or {}).items()):
            if rec_model == model and record.block_size != size:
                findings.append(Finding(
                    severity=WARNING, code="block_size_mismatch", model=model,
                    worker_id=worker,
                    summary=(f"worker {worker!r} registers block size {record.block_size}, "
                             f"but the model's events store blocks of {size} tokens."),
                    fix=("Start its bridge with --block-size equal to the engine's "
                         "--block-size (KV_PUBLISHER_BLOCK_SIZE).")))
    return findings


def check_first_block_misses(snap: ServiceSnapshot) -> list[Finding]:
    """Most recent queries miss their first block while the model holds many blocks."""
    settings = snap.settings
    findings = []
    for model, queries in sorted(snap.queries.items()):
        size = snap.block_sizes.get(model)
        held = snap.blocks_of(model)
        if not snap.concerns(model) or held < settings.min_model_blocks:
            continue
        token_kinds = [k for k in queries.by_kind if k[0] and k[1] in (0, size)]
        for kinds, how, cause in (
            (token_kinds, "token-id", "routers and workers tokenize differently (another "
             "tokenizer, chat template or special tokens), or name another LoRA adapter or "
             "cache salt than the engine does"),
            ([KEYS_KIND], "block-key", "the router hashes blocks with another scheme or seed "
             "than the index (xxh3_64 chained from the model/LoRA/salt root, docs/"
             "block-keys.md), or with another block size"),
        ):
            answered, missed = queries.of(kinds)
            if answered < settings.min_queries or missed < settings.miss_ratio * answered:
                continue
            findings.append(Finding(
                severity=ERROR if missed == answered else WARNING,
                code="first_block_misses", model=model,
                summary=(f"{missed} of {answered} recent {how} queries of {model!r} "
                         f"({_pct(missed, answered)}) matched not even their first block, "
                         f"while its workers hold {held} blocks: {cause}."),
                fix=("Compare one prompt's keys with a worker's: kv-indexer score --model M "
                     "--tokens-file F on a prompt the engine has just served must match; use "
                     "the engine's tokenizer and the same lora_name / cache_salt, or "
                     "kvcore.keys for block keys.")))
    return findings


def check_stores_without_removals(snap: ServiceSnapshot) -> list[Finding]:
    """A rank holding many blocks of a tier that has stored but never removed any."""
    if snap.activity is None:
        return []
    limit = snap.settings.no_removal_blocks
    findings = []
    for w in snap.ranks:
        rank = snap.activity.get((w.model, w.worker_id, w.dp_rank))
        if rank is None or rank.clears or not snap.concerns(w.model):
            continue
        for tier_pos, tier in enumerate(TIERS):
            held = w.blocks_by_tier.get(tier, 0)
            if held < limit or rank.stored[tier_pos] < limit or rank.removed[tier_pos]:
                continue
            findings.append(Finding(
                severity=WARNING, code="stores_without_removals", model=w.model,
                worker_id=w.worker_id, dp_rank=w.dp_rank,
                summary=(f"rank {w.dp_rank} of {w.worker_id!r} holds {held} {tier} blocks; "
                         f"{rank.stored[tier_pos]} were stored and not one removed since this "
                         "process started: its publisher does not report evictions, so the "
                         "index claims blocks the worker no longer has."),
                fix=("Make the engine (or its offloading connector, e.g. LMCache) publish "
                     "BlockRemoved events for evictions; until it does, lower its weight "
                     "(tier_weights) or keep it out of KV-aware routing.")))
    return findings


def check_clock_skew(snap: ServiceSnapshot) -> list[Finding]:
    """Batch timestamps ahead of this clock, or steadily far behind it."""
    if snap.activity is None:
        return []
    limit = snap.settings.max_skew_s
    window = snap.lag_window_s
    findings = []
    for (model, worker, rank_no), rank in sorted(snap.activity.items()):
        floor = rank.lag_floor(snap.now, window)
        if floor is None or not snap.concerns(model) or abs(floor) <= limit:
            continue
        if floor < 0:
            summary = (f"rank {rank_no} of {worker!r} stamps its batches {-floor:.1f} s in "
                       "this indexer's future: its clock runs ahead (lag metrics and "
                       "freshness read wrong; beyond 300 s its batches are dead-lettered as "
                       "epoch_in_future or ts_in_future).")
        else:
            summary = (f"even the freshest batches of rank {rank_no} of {worker!r} arrive "
                       f"{floor:.1f} s after their timestamp: its clock runs behind this "
                       "indexer's, or its batches wait that long on the way.")
        fix = "Synchronise the clocks of the worker's host and the indexer's (NTP / chrony)"
        if floor > 0:
            fix += ("; if they agree, look for a backlog: kv_indexer_consumer_pending, the "
                    "bridge's kv_publisher_buffered_batches")
        findings.append(Finding(
            severity=WARNING, code="clock_skew", model=model, worker_id=worker,
            dp_rank=rank_no, summary=summary, fix=fix + "."))
    return findings


def check_degraded(snap: ServiceSnapshot) -> list[Finding]:
    """Ranks whose state is known to be incomplete, and what the service saw of why."""
    findings = []
    unknown_parents = snap.index_drops.get("unknown_parent", 0)
    for w in snap.ranks:
        if not w.degraded or not snap.concerns(w.model):
            continue
        rank = (snap.activity or {}).get((w.model, w.worker_id, w.dp_rank))
        why = []
        if rank is not None and rank.gaps:
            why.append(f"{rank.gaps} sequence gap(s) of this rank")
        if unknown_parents:
            why.append(f"{unknown_parents} stored block(s) whose parent the index never saw "
                       "(unknown_parent, all ranks)")
        reason = "; ".join(why) or "events it could not place (unknown parent block)"
        findings.append(Finding(
            severity=WARNING, code="degraded_worker", model=w.model, worker_id=w.worker_id,
            dp_rank=w.dp_rank,
            summary=(f"rank {w.dp_rank} of {w.worker_id!r} is degraded (its hits are "
                     f"under-counted until it resyncs): {reason}."),
            fix=("It heals when its publisher answers the resync the indexer asked for: check "
                 "the bridge runs and reaches NATS (its log: resync; indexer log: "
                 "resync_unanswered), and give the bridge --replay-endpoint so engine gaps "
                 "are filled instead of clearing the rank.")))
    return findings


def check_dead_letters(snap: ServiceSnapshot) -> list[Finding]:
    """Batches the consumers refused, by reason."""
    if not snap.dead_letters or snap.model:
        return []
    counts = ", ".join(f"{reason} {count}" for reason, count in sorted(snap.dead_letters.items()))
    severe = any(r in snap.dead_letters for r in ("identity_mismatch", "epoch_in_future",
                                                  "ts_in_future", "unsupported_schema"))
    return [Finding(
        severity=ERROR if severe else WARNING, code="dead_letters",
        summary=(f"batches were refused and dead-lettered since this process started ({counts}): "
                 "their blocks are missing from the index."),
        fix=("Read them from the KV_DEADLETTER stream (headers Kv-Reason, Kv-Error, "
             "Kv-Subject): identity_mismatch = a publisher names another worker than its "
             "subject; epoch_in_future, ts_in_future = its clock runs ahead; "
             "unsupported_schema = a "
             "publisher newer than this indexer."))]


def check_rebuilding(snap: ServiceSnapshot) -> list[Finding]:
    if not snap.rebuilding:
        return []
    return [Finding(
        severity=WARNING, code="rebuilding",
        summary=("the index is being rebuilt from snapshots and the stream: answers may miss "
                 "blocks of every worker meanwhile (Score says freshness.rebuilding)."),
        fix="Wait for it to finish (log partition_rebuilt); nothing to change.")]


def check_native_missing(snap: ServiceSnapshot) -> list[Finding]:
    """A process without its C extension answers right, only several times slower."""
    if snap.native or snap.model:
        return []
    return [Finding(
        severity=WARNING, code="native_missing",
        summary=("this indexer process runs without its C extension (kvcore._native): block "
                 "keys, ingest and Score take the pure-Python path, several times slower "
                 "(docs/benchmarks.md, bench-keys)."),
        fix=("Install a wheel built with the extension, or reinstall from source where a C "
             "compiler and the Python headers are present (`kv-indexer --version` says which "
             "path runs)."))]


CHECKS: Final[dict[str, Callable[[ServiceSnapshot], list[Finding]]]] = {
    "unknown_model": check_unknown_model,
    "silent_worker": check_silent_workers,
    "unregistered_worker": check_unregistered_workers,
    "block_size_mismatch": check_block_size,
    "first_block_misses": check_first_block_misses,
    "stores_without_removals": check_stores_without_removals,
    "clock_skew": check_clock_skew,
    "degraded_worker": check_degraded,
    "dead_letters": check_dead_letters,
    "rebuilding": check_rebuilding,
    "native_missing": check_native_missing,
}
assert set(CHECKS) == set(CODES)


def diagnose(snap: ServiceSnapshot) -> Diagnosis:
    """Every check over the snapshot; findings worst first."""
    findings = [finding for check in CHECKS.values() for finding in check(snap)]
    findings.sort(key=lambda f: (-severity_rank(f.severity), f.model, f.worker_id, f.code,
                                 f.dp_rank or 0))
    limitations = []
    if snap.registered is None:
        limitations.append("no settled view of the worker registry (this process started "
                           "watching it less than a liveness TTL ago, or has none): silent "
                           "and unregistered workers are not checked")
    if snap.activity is None:
        limitations.append("no view of the event path (a reader process): removals, clock "
                           "skew and dead letters are checked by the consuming process")
    return Diagnosis(findings=findings, checks=list(CHECKS), limitations=limitations)


_SEVERITY_PB: Final = {INFO: pb.SEVERITY_INFO, WARNING: pb.SEVERITY_WARNING,
                       ERROR: pb.SEVERITY_ERROR}


def to_proto(diagnosis: Diagnosis) -> pb.DiagnoseResponse:
    response = pb.DiagnoseResponse(checks=diagnosis.checks,
                                   limitations=diagnosis.limitations)
    for f in diagnosis.findings:
        found = response.findings.add(severity=_SEVERITY_PB[f.severity], code=f.code,
                                      summary=f.summary, fix=f.fix, model=f.model,
                                      worker_id=f.worker_id)
        if f.dp_rank is not None:
            found.dp_rank = f.dp_rank
    return response
