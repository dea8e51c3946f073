"""Diagnose's checks, one by one, over snapshots of what a service knows: each check names
the misconfiguration it is for, and stays quiet on the healthy snapshot next to it. The
per-rank activity is fed real bus batches at field scale; the query outcomes are recorded
as the Score path records them. End to end (NATS, gRPC, the CLI): tests/test_doctor.py."""

from __future__ import annotations

import time

import pytest

from indexer.findings import CODES, ERROR, INFO, WARNING, Finding
from indexer.index.memory import MemoryIndex
from indexer.index.protocol import WorkerInfo
from indexer.ingest.activity import EventActivity
from indexer.serve.diagnose import (
    CHECKS,
    DoctorSettings,
    EventPathView,
    QueryOutcomes,
    ServiceSnapshot,
    check_block_size,
    check_clock_skew,
    check_dead_letters,
    check_degraded,
    check_first_block_misses,
    check_native_missing,
    check_rebuilding,
    check_silent_workers,
    check_stores_without_removals,
    check_unknown_model,
    check_unregistered_workers,
    diagnose,
    take_snapshot,
)
from kvcore.bus import SCHEMA_VERSION, AllBlocksCleared, BlockRemoved, BlockStored, EventBatch
from kvcore.topology import WorkerRecord

MODEL = "org/model-7b"
BS = 16
NOW = time.time()
STARTED = int((NOW - 600) * 1e9)  # the epoch of the workers' publishers (their start)


def rank(worker: str, blocks: int = 2000, *, model: str = MODEL, dp_rank: int = 0,
         tier: str = "gpu", degraded: bool = False, age_s: float = 1.0,
         epoch: int = STARTED) -> WorkerInfo:
    return WorkerInfo(model, worker, dp_rank, epoch, 10, degraded, {tier: blocks},
                      NOW - age_s)


def record(worker: str, *, model: str = MODEL, block_size: int = BS,
           up_for_s: float = 600.0) -> WorkerRecord:
    return WorkerRecord(model=model, worker_id=worker, block_size=block_size,
                        epoch=int((NOW - up_for_s) * 1e9))


def snapshot(ranks: list[WorkerInfo], **kwargs: object) -> ServiceSnapshot:
    values: dict[str, object] = {
        "now": NOW, "ranks": ranks,
        "block_sizes": {w.model: BS for w in ranks},
        "registered": {(w.model, w.worker_id): record(w.worker_id, model=w.model)
                       for w in ranks},
        "activity": {}, "dead_letters": {}}
    values.update(kwargs)
    return ServiceSnapshot(**values)  # type: ignore[arg-type]


def healthy() -> ServiceSnapshot:
    return snapshot([rank("w-a"), rank("w-b")])


def codes(findings: list[Finding]) -> list[str]:
    return [f.code for f in findings]


def outcomes(*queries: tuple[bool, int, bool, int]) -> QueryOutcomes:
    """(by tokens, block size asked, hit, how many) recorded as Score records them."""
    recorded = QueryOutcomes()
    for by_tokens, block_size, hit, count in queries:
        for _ in range(count):
            recorded.record(MODEL, by_tokens, block_size, hit)
    return recorded


def with_queries(snap: ServiceSnapshot, recorded: QueryOutcomes) -> ServiceSnapshot:
    queries, orphans = recorded.snapshot()
    return ServiceSnapshot(**{**snap.__dict__, "queries": queries, "no_candidates": orphans})


def test_every_code_has_a_check_and_the_healthy_snapshot_has_no_finding() -> None:
    assert set(CHECKS) == set(CODES)
    diagnosis = diagnose(with_queries(healthy(), outcomes((True, 0, True, 50))))
    assert diagnosis.findings == []
    assert diagnosis.limitations == []
    assert not diagnosis.has_errors


def test_unknown_model_asked_or_queried() -> None:
    recorded = outcomes()
    for _ in range(7):
        recorded.no_candidates("org/model-7B")
    found = check_unknown_model(with_queries(healthy(), recorded))
    assert codes(found) == ["unknown_model"]
    assert found[0].severity == ERROR and found[0].model == "org/model-7B"
    assert "7 recent queries" in found[0].summary and "'org/model-7b'" in found[0].fix
    # asked by name, never queried
    asked = check_unknown_model(snapshot([rank("w-a")], model="other"))
    assert [(f.code, f.model) for f in asked] == [("unknown_model", "other")]
    # a known model that had no candidate for a while (its workers left) is not unknown
    recorded.no_candidates(MODEL)
    assert check_unknown_model(with_queries(healthy(), recorded))[0].model == "org/model-7B"
    assert len(check_unknown_model(with_queries(healthy(), recorded))) == 1


def test_unknown_model_with_no_worker_anywhere_points_at_nats() -> None:
    """Bridges publishing to another NATS than the indexer's: nothing is known at all."""
    recorded = outcomes()
    recorded.no_candidates(MODEL)
    found = check_unknown_model(with_queries(snapshot([], registered={}), recorded))
    assert [(f.code, f.model) for f in found] == [("unknown_model", MODEL)]
    assert "no worker at all" in found[0].summary and "--nats-url" in found[0].fix


def test_silent_worker() -> None:
    base = healthy()
    registered = dict(base.registered or {})
    registered[(MODEL, "w-quiet")] = record("w-quiet", up_for_s=120)
    registered[(MODEL, "w-new")] = record("w-new", up_for_s=5)  # just started: not yet
    found = check_silent_workers(snapshot(base.ranks, registered=registered))
    assert [(f.code, f.worker_id, f.severity) for f in found] == [
        ("silent_worker", "w-quiet", WARNING)]
    # an idle model (no blocks, no queries): a note, not a warning
    idle = snapshot([], registered={(MODEL, "w-quiet"): record("w-quiet")},
                    block_sizes={})
    assert [f.severity for f in check_silent_workers(idle)] == [INFO]
    # a rank of an older epoch does not count: the worker restarted and went quiet
    restarted = snapshot([rank("w-a", epoch=STARTED - 10**12)],
                         registered={(MODEL, "w-a"): record("w-a", up_for_s=120)})
    assert codes(check_silent_workers(restarted)) == ["silent_worker"]
    assert check_silent_workers(snapshot(base.ranks, registered=None)) == []


def test_unregistered_worker() -> None:
    ranks = [rank("w-a"), rank("w-rogue"), rank("w-old", age_s=3600)]
    registered = {(MODEL, "w-a"): record("w-a")}
    found = check_unregistered_workers(snapshot(ranks, registered=registered))
    assert [(f.code, f.worker_id, f.severity) for f in found] == [
        ("unregistered_worker", "w-rogue", ERROR)]
    left = check_unregistered_workers(snapshot(ranks, registered=registered,
                                               departed=frozenset({(MODEL, "w-rogue")})))
    assert [(f.worker_id, f.severity) for f in left] == [("w-rogue", INFO)]
    assert check_unregistered_workers(snapshot(ranks, registered=None)) == []


def test_block_size_of_queries_and_registrations() -> None:
    recorded = outcomes((True, 0, True, 30), (True, BS, True, 5), (True, 32, False, 12),
                        (False, 0, True, 3))
    found = check_block_size(with_queries(healthy(), recorded))
    assert [(f.code, f.severity) for f in found] == [("block_size_mismatch", ERROR)]
    assert "12 recent queries" in found[0].summary and "block_size 32" in found[0].summary
    base = healthy()
    registered = {**(base.registered or {}), (MODEL, "w-b"): record("w-b", block_size=32)}
    found = check_block_size(snapshot(base.ranks, registered=registered))
    assert [(f.worker_id, f.severity) for f in found] == [("w-b", WARNING)]
    assert check_block_size(with_queries(healthy(), outcomes((True, BS, False, 40)))) == []


def test_first_block_misses_by_query_kind() -> None:
    settings = DoctorSettings()
    all_miss = outcomes((True, 0, False, settings.min_queries))
    found = check_first_block_misses(with_queries(healthy(), all_miss))
    assert [(f.code, f.severity) for f in found] == [("first_block_misses", ERROR)]
    assert "token-id" in found[0].summary and "4000 blocks" in found[0].summary
    # keys miss while tokens hit: the router's hash scheme
    keys = outcomes((True, 0, True, 40), (False, 0, False, 30))
    found = check_first_block_misses(with_queries(healthy(), keys))
    assert len(found) == 1 and "block-key" in found[0].summary
    # mostly misses: a warning; few queries, a small model or a usual miss rate: nothing
    mostly = outcomes((True, 0, False, 95), (True, 0, True, 5))
    assert [f.severity for f in check_first_block_misses(with_queries(healthy(), mostly))] \
        == [WARNING]
    few = outcomes((True, 0, False, settings.min_queries - 1))
    assert check_first_block_misses(with_queries(healthy(), few)) == []
    small = snapshot([rank("w-a", blocks=settings.min_model_blocks - 1)])
    assert check_first_block_misses(with_queries(small, all_miss)) == []
    usual = outcomes((True, 0, False, 60), (True, 0, True, 40))
    assert check_first_block_misses(with_queries(healthy(), usual)) == []


def batches(worker: str, events: list[BlockStored | BlockRemoved | AllBlocksCleared],
            *, ts: float | None = None, seq: int = 0) -> EventBatch:
    return EventBatch(schema=SCHEMA_VERSION, model=MODEL, worker_id=worker, dp_rank=0,
                      epoch=1, seq=seq, events=events, ts=NOW if ts is None else ts)


def stores(first: int, count: int, medium: str) -> BlockStored:
    return BlockStored(block_hashes=list(range(first, first + count)), medium=medium)


@pytest.mark.parametrize("blocks", [20_000, 100_000])
def test_stores_without_removals_at_field_scale(blocks: int) -> None:
    """An LMCache-like cpu tier that stores and never removes, next to a gpu tier that
    evicts, and a rank that evicts on both: only the first tier is named."""
    activity = EventActivity()
    settings = DoctorSettings(no_removal_blocks=blocks // 2)
    step = 512
    for seq, first in enumerate(range(0, blocks, step)):
        count = min(step, blocks - first)
        activity.observe(batches("w-lmc", [stores(first, count, "gpu"),
                                           stores(first, count, "cpu"),
                                           BlockRemoved(block_hashes=list(range(first, first
                                                                                + count // 2)))],
                                 seq=seq), NOW)
        activity.observe(batches("w-ok", [stores(first, count, "cpu"),
                                          BlockRemoved(block_hashes=[first], medium="cpu")],
                                 seq=seq), NOW)
    ranks = [WorkerInfo(MODEL, "w-lmc", 0, 1, 10, False, {"gpu": blocks // 2, "cpu": blocks},
                        NOW),
             WorkerInfo(MODEL, "w-ok", 0, 1, 10, False, {"cpu": blocks - blocks // step}, NOW)]
    found = check_stores_without_removals(snapshot(ranks, activity=activity.ranks,
                                                   settings=settings))
    assert [(f.code, f.worker_id, f.dp_rank) for f in found] == [
        ("stores_without_removals", "w-lmc", 0)]
    assert f"holds {blocks} cpu blocks" in found[0].summary
    # a clear counts as a removal of everything
    activity.observe(batches("w-lmc", [AllBlocksCleared()], seq=10_000), NOW)
    assert check_stores_without_removals(snapshot(ranks, activity=activity.ranks,
                                                  settings=settings)) == []


def test_clock_skew_from_the_smallest_recent_lag() -> None:
    activity = EventActivity(lag_window_s=60.0)
    for seq in range(20):
        activity.observe(batches("w-ahead", [AllBlocksCleared()], ts=NOW + 30 + seq, seq=seq),
                         NOW + seq)
        activity.observe(batches("w-behind", [AllBlocksCleared()], ts=NOW - 40, seq=seq),
                         NOW)
        # a backlog drained: old batches, then fresh ones: no skew
        activity.observe(batches("w-backlog", [AllBlocksCleared()],
                                 ts=NOW - (100 if seq < 10 else 0.01), seq=seq), NOW)
        activity.observe(batches("w-ok", [AllBlocksCleared()], ts=NOW - 0.005, seq=seq), NOW)
        # a rebuild's replay: old batches, not timed
        activity.observe(batches("w-replayed", [AllBlocksCleared()], ts=NOW - 3600, seq=seq),
                         NOW, timed=False)
    found = check_clock_skew(snapshot([], activity=activity.ranks))
    assert [(f.worker_id, f.severity) for f in found] == [("w-ahead", WARNING),
                                                          ("w-behind", WARNING)]
    assert "30.0 s in this indexer's future" in found[0].summary
    assert "40.0 s after" in found[1].summary
    # two windows later with no batch timed since, nothing is recent enough to judge
    later = snapshot([], activity=activity.ranks, now=NOW + 121)
    assert check_clock_skew(later) == []


def test_degraded_worker_with_why() -> None:
    activity = EventActivity()
    activity.gap(batches("w-b", [], seq=7))
    ranks = [rank("w-a"), rank("w-b", degraded=True)]
    found = check_degraded(snapshot(ranks, activity=activity.ranks,
                                    index_drops={"unknown_parent": 3}))
    assert [(f.code, f.worker_id, f.dp_rank) for f in found] == [("degraded_worker", "w-b", 0)]
    assert "1 sequence gap" in found[0].summary and "3 stored block" in found[0].summary


def test_dead_letters_and_rebuilding() -> None:
    found = check_dead_letters(snapshot([], dead_letters={"apply_failed": 2}))
    assert [(f.code, f.severity) for f in found] == [("dead_letters", WARNING)]
    forged = check_dead_letters(snapshot([], dead_letters={"identity_mismatch": 1}))
    assert [f.severity for f in forged] == [ERROR]
    assert check_rebuilding(snapshot([], rebuilding=True))[0].code == "rebuilding"
    assert check_rebuilding(snapshot([])) == []


def test_native_missing_is_said() -> None:
    """A process on the pure-Python path is named (issue 19: a compiler-less install was
    silently slow); one with the extension, or a question about one model, is not."""
    found = check_native_missing(snapshot([], native=False))
    assert [(f.code, f.severity) for f in found] == [("native_missing", WARNING)]
    assert check_native_missing(snapshot([], native=True)) == []
    assert check_native_missing(snapshot([], native=False, model=MODEL)) == []
    assert "native_missing" not in [f.code for f in diagnose(healthy()).findings]


def test_a_model_filter_keeps_other_models_out() -> None:
    ranks = [rank("w-a", degraded=True), rank("w-x", model="other/m", degraded=True)]
    found = diagnose(snapshot(ranks, model="other/m")).findings
    assert [(f.code, f.model) for f in found] == [("degraded_worker", "other/m")]


async def test_a_view_without_a_settled_registry_checks_none_of_it() -> None:
    """A process whose liveness watcher is missing, or has watched less than a TTL, gives
    no registry: a worker it has not heard from yet is not called unregistered."""
    index = MemoryIndex()
    await index.apply([batches("w-rogue", [stores(1, 4, "gpu")])])
    for view in (EventPathView.watching(lambda: None),
                 EventPathView.watching(lambda: _Watcher(settled=False))):
        snap = await take_snapshot(index, QueryOutcomes(), view, rebuilding=False)
        assert snap.registered is None
        assert diagnose(snap).findings == []
    snap = await take_snapshot(index, QueryOutcomes(), EventPathView.watching(
        lambda: _Watcher(settled=True)), rebuilding=False)
    assert codes(diagnose(snap).findings) == ["unregistered_worker"]


class _Watcher:
    """The part of a LivenessWatcher a view reads: nobody registered."""

    def __init__(self, *, settled: bool) -> None:
        self.settled = settled
        self.live: dict[tuple[str, str], WorkerRecord] = {}
        self.registered_once: set[tuple[str, str]] = set()


def test_reader_view_says_what_it_cannot_see() -> None:
    diagnosis = diagnose(snapshot([rank("w-a")], registered=None, activity=None,
                                  dead_letters=None))
    assert diagnosis.findings == [] and len(diagnosis.limitations) == 2


def test_query_outcomes_are_bounded_and_rotate(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    recorded = QueryOutcomes(window_s=10.0, max_models=2, max_unknown=1)
    for model in ("a", "b", "c"):
        recorded.record(model, True, 0, False)
    for block_size in range(1, 20):  # more block sizes than kept per model
        recorded.record("a", True, block_size, True)
    recorded.no_candidates("x")
    recorded.no_candidates("y")
    queries, orphans = recorded.snapshot()
    assert set(queries) == {"a", "b"} and orphans == {"x": 1}
    assert sum(c[0] for c in queries["a"].by_kind.values()) == 20
    assert len(queries["a"].by_kind) <= 9
    clock[0] += 11  # one rotation: still there (previous window)
    recorded.record("b", True, 0, True)
    assert queries != recorded.snapshot()[0] and "a" in recorded.snapshot()[0]
    clock[0] += 11  # two: gone
    recorded.record("b", True, 0, True)
    assert set(recorded.snapshot()[0]) == {"b"}
    clock[0] += 25  # idle for two windows: nothing is recent any more, even unasked
    assert recorded.snapshot() == ({}, {})


def test_a_fleet_of_a_thousand_workers_with_three_faults() -> None:
    """1,000 workers of 8 DP ranks, 25,000 blocks each, on 4 models: exactly the planted
    faults come out (a silent worker, an unregistered one, a degraded rank)."""
    models = [f"org/model-{m}" for m in range(4)]
    ranks = [rank(f"w-{w}", 25_000, model=models[w % 4], dp_rank=r,
                  degraded=(w, r) == (500, 7))
             for w in range(1_000) for r in range(8) if w != 7]
    registered = {(models[w % 4], f"w-{w}"): record(f"w-{w}", model=models[w % 4])
                  for w in range(1_000) if w != 3}
    found = diagnose(snapshot(ranks, registered=registered)).findings
    assert sorted((f.code, f.worker_id, f.dp_rank) for f in found) == [
        ("degraded_worker", "w-500", 7), ("silent_worker", "w-7", None),
        ("unregistered_worker", "w-3", None)]
