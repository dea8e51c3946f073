"""The C ingest paths do what the Python ones do, at field size.

`WorkerLedger.apply` hands plain stores to `kvcore._native.store_plain`, `_OpsSink` packs
its keys ops with `OpsWriter`, and `validate_batch` passes the usual stores with
`check_plain_stores`. Each has a module flag that turns it off; these tests run the same
seeded histories (tests/support/mixed_history.py: every event shape, most of them plain)
both ways and require the same ledgers, presence changes, journals, ops, Redis records
and stats, batch by batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

import indexer.index.ledger as ledger_module
import indexer.index.redis as redis_module
from indexer.index.ledger import Journal, WorkerLedger
from indexer.index.memory import SyncMemoryIndex
from indexer.index.protocol import ApplyOutcome, IndexConfig, IndexStats, ResyncRequest
from indexer.index.redis import RedisIndex, _OpsSink
from kvcore import bus
from kvcore.bus import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    pack_tokens,
    validate_batch,
)
from kvcore.keys import NATIVE

if NATIVE:
    from kvcore._native import LedgerMap
from tests.support.mixed_history import MixedHistory

pytestmark = pytest.mark.skipif(not NATIVE, reason="the C paths need the C extension")

GHOSTS = 16  # small, so ghosts are trimmed and their children become unknown parents


@pytest.fixture(autouse=True)
def same_map_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ledger map keyed by one secret, so a clear lists held keys in the same order
    on both sides (the order of a map's table follows its secret)."""
    monkeypatch.setattr(ledger_module, "new_ledger_map", lambda: LedgerMap(secret=0x5EC2E7))


@contextmanager
def python_paths() -> Iterator[None]:
    """Every C ingest path off: the pure-Python reference."""
    saved = (ledger_module.FAST_STORES, redis_module.NATIVE_OPS, bus.NATIVE_CHECKS)
    ledger_module.FAST_STORES = redis_module.NATIVE_OPS = bus.NATIVE_CHECKS = False
    try:
        yield
    finally:
        ledger_module.FAST_STORES, redis_module.NATIVE_OPS, bus.NATIVE_CHECKS = saved


def test_c_paths_are_on() -> None:
    """What the comparisons below compare against the Python paths is the C one."""
    assert ledger_module.FAST_STORES and redis_module.NATIVE_OPS and bus.NATIVE_CHECKS
    assert _OpsSink().presence_target is not None


class RecordingSink:
    """A PresenceSink that notes every call, in order, group sinks included."""

    def __init__(self, calls: list[tuple[Any, ...]] | None = None, group: int = 0) -> None:
        self.calls: list[tuple[Any, ...]] = [] if calls is None else calls
        self.group = group

    def set_bits(self, keys: list[int], bitpos: int) -> None:
        self.calls.append(("set", self.group, bitpos, list(keys)))

    def clear_bits(self, keys: list[int], bitpos: int) -> None:
        self.calls.append(("clear", self.group, bitpos, list(keys)))

    def group_sink(self, group: int) -> RecordingSink:
        return RecordingSink(self.calls, group)

    def learn_group(self, group: int, kind: str | None, sliding_window: int) -> None:
        self.calls.append(("learn", group, kind, sliding_window))


def journal_state(journal: Journal | None) -> tuple[Any, ...] | None:
    if journal is None:
        return None
    # the dirty set's iteration order too: it orders the Redis log's records
    return (journal.reset, list(journal.dirty), journal.ghost_pushed, list(journal.unghosted))


def ledger_state(ledger: WorkerLedger, whole: bool = False) -> tuple[Any, ...]:
    """What a batch may change of a ledger (its groups' too); `whole`: with the whole
    map (compared at the end: reading it per batch makes a run quadratic)."""
    groups = {g: ledger_state(one, whole) for g, one in sorted(ledger.groups.items())}
    return (sorted(ledger.keys.items()) if whole else len(ledger.keys), list(ledger.ghosts),
            ledger.counts, ledger.epoch, ledger.last_seq, ledger.last_ts, ledger.degraded,
            ledger.warned, journal_state(ledger.journal), groups)


class Side:
    """One way of applying: its ledgers, stats and resync requests."""

    def __init__(self) -> None:
        self.ledgers: dict[tuple[str, int], WorkerLedger] = {}
        self.stats = IndexStats()
        self.resyncs: list[ResyncRequest] = []

    def apply(self, batch: EventBatch) -> tuple[ApplyOutcome, list[tuple[Any, ...]], Any]:
        ledger = self.ledgers.get((batch.worker_id, batch.dp_rank))
        if ledger is None:
            ledger = self.ledgers[(batch.worker_id, batch.dp_rank)] = WorkerLedger(
                batch.model, batch.worker_id, batch.dp_rank, len(self.ledgers), GHOSTS)
        sink = RecordingSink()
        ledger.start_journal()
        outcome = ledger.apply(batch, sink, self.stats, self.resyncs.append)
        state = ledger_state(ledger)
        ledger.end_journal()
        return outcome, sink.calls, state


@pytest.mark.parametrize(("ranks", "blocks"), [(64, 1_300_000), (1_024, 1_000_000)])
def test_ledger_paths_agree(ranks: int, blocks: int) -> None:
    """Batch by batch: the same outcome, presence calls, ledger, journal; then stats."""
    fast, slow = Side(), Side()
    plain_events = 0
    for batch in MixedHistory(ranks, blocks).batches():
        expected = None
        with python_paths():
            expected = slow.apply(batch)
        assert fast.apply(batch) == expected, (batch.worker_id, batch.epoch, batch.seq)
        plain_events += sum(1 for e in batch.events if isinstance(e, BlockStored)
                            and e.token_ids and e.group == 0)
    assert fast.stats == slow.stats
    assert fast.resyncs == slow.resyncs
    assert fast.ledgers.keys() == slow.ledgers.keys()
    for ref, ledger in fast.ledgers.items():
        assert ledger_state(ledger, whole=True) == ledger_state(slow.ledgers[ref], whole=True)
    assert slow.stats.blocks_stored >= blocks // 2 and plain_events > 0
    assert slow.stats.dropped.keys() >= {"unknown_parent", "unknown_block"}


def test_ops_sinks_agree() -> None:
    """The Redis sink's ops (OpsWriter and C stores vs Python) are the same bytes."""
    fast: dict[tuple[str, int], WorkerLedger] = {}
    slow: dict[tuple[str, int], WorkerLedger] = {}
    stats = (IndexStats(), IndexStats())
    for batch in MixedHistory(64, 300_000, seed=11).batches():
        ops = []
        for ledgers, side_stats, python in ((slow, stats[1], True), (fast, stats[0], False)):
            ref = (batch.worker_id, batch.dp_rank)
            ledger = ledgers.get(ref) or ledgers.setdefault(
                ref, WorkerLedger(batch.model, ref[0], ref[1], len(ledgers), GHOSTS))
            with python_paths() if python else _no_change():
                sink = _OpsSink()
                ledger.apply(batch, sink, side_stats, None)
                sink.pool_wipe((3, b"pool"), 1.0)  # raw ops end the last keys op
                sink.set_bits([1, 2], 5)
            ops.append((bytes(sink.ops), sink.learned))
        assert ops[0] == ops[1]
    assert stats[0] == stats[1]


@contextmanager
def _no_change() -> Iterator[None]:
    yield


def test_memory_index_paths_agree() -> None:
    """The in-memory index ends with the same presence, ranks and stats."""
    history = list(MixedHistory(64, 200_000, seed=5).batches())
    fast = SyncMemoryIndex(IndexConfig(ghost_capacity=GHOSTS))
    outcomes = fast.apply(history)
    slow = SyncMemoryIndex(IndexConfig(ghost_capacity=GHOSTS))
    with python_paths():
        assert slow.apply(history) == outcomes
    model = history[0].model
    assert fast.presence(model) == slow.presence(model)
    assert fast.workers() == slow.workers()
    assert fast.stats() == slow.stats()


class RecordedRedisIndex(RedisIndex):
    """A RedisIndex that keeps the records it sends (the real ones, to a real Redis)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent_records: list[bytes] = []

    async def _build_records(self, *args: Any) -> Any:
        records, sent = await super()._build_records(*args)
        for model_records in records.values():
            self.sent_records += model_records
        return records, sent


async def redis_contents(client: aioredis.Redis) -> dict[bytes, Any]:
    """Every key's value, but `slotver`'s (a random stamp each slot change draws)."""
    out: dict[bytes, Any] = {}
    for key in sorted(await client.keys("*")):
        if key.endswith(b":slotver"):
            continue
        kind = await client.type(key)
        if kind == b"hash":
            out[key] = sorted((await client.hgetall(key)).items())
        elif kind == b"list":
            out[key] = await client.lrange(key, 0, -1)
        elif kind == b"set":
            out[key] = sorted(await client.smembers(key))
        else:
            out[key] = await client.get(key)
    return out


@pytest.mark.integration
async def test_redis_records_agree(redis_client: aioredis.Redis) -> None:
    """The same records, call by call, and the same Redis afterwards, as with Python."""
    history = list(MixedHistory(64, 300_000, seed=3).batches())
    runs = []
    for python in (True, False):
        await redis_client.flushall()
        index = RecordedRedisIndex(redis_client, config=IndexConfig(ghost_capacity=GHOSTS))
        outcomes = []
        with python_paths() if python else _no_change():
            for start in range(0, len(history), 256):
                outcomes += await index.apply(history[start : start + 256])
        runs.append((outcomes, index.sent_records, await index.stats(),
                     await redis_contents(redis_client)))
    assert runs[0][0] == runs[1][0]
    assert len(runs[0][1]) == len(runs[1][1]) > 1_000
    for number, (slow, fast) in enumerate(zip(runs[0][1], runs[1][1], strict=True)):
        assert slow == fast, f"record {number} differs"
    assert runs[0][2] == runs[1][2]
    assert runs[0][3] == runs[1][3]


def test_fallback_leaves_no_event_half_applied() -> None:
    """A batch whose plain stores surround ones the C loop stops at (a hash repeated
    within a store, a hash already held): each is applied once, by one path."""
    fast, slow = Side(), Side()
    tokens = pack_tokens(range(16))
    events = [
        BlockStored(block_hashes=[1, 2], token_ids=tokens[:32], block_size=4),
        BlockStored(block_hashes=[3, 3], parent_hash=2, token_ids=tokens[32:], block_size=4),
        BlockStored(block_hashes=[4], parent_hash=2, token_ids=tokens[32:48], block_size=4),
        BlockStored(block_hashes=[4, 5], parent_hash=2, token_ids=tokens[32:], block_size=4),
        BlockStored(block_hashes=[6], parent_hash=5, token_ids=tokens[:16], block_size=4),
    ]
    batch = EventBatch(schema=2, model="m", worker_id="w", epoch=1, seq=0, events=events)
    with python_paths():
        expected = slow.apply(batch)
    assert fast.apply(batch) == expected
    assert fast.stats.blocks_stored == slow.stats.blocks_stored == 7  # 3 and 4 twice


_LONG_NAMES = ["", "x" * 64, "x" * 65, "é" * 128, "é" * 129]
# Values at and past each bound validate_batch checks; a store gets a few of them.
_EDGES: dict[str, list[Any]] = {
    "block_hashes": [[], [-1], [2**64], [2**64 - 1, 0], [1] * 65_537, [True]],
    "parent_hash": [None, -1, 0, 2**64 - 1, 2**64],
    "token_ids": [b"", b"\x01" * 4, b"\x01" * 12],
    "block_size": [0, -1, 1, 3],
    "medium": ["cpu", *_LONG_NAMES[1:]],
    "lora_name": [None, *_LONG_NAMES],
    "cache_salt": [None, *_LONG_NAMES],
    "group_kind": [None, "full_attention", *_LONG_NAMES],
    "extra_keys": [None, [b""] * 2, [b"x" * 4_096] * 2, [b"x" * 4_097] * 2, [b""]],
    "group": [-1, 0, 1, 63, 64, True],
    "sliding_window": [-1, 0, 2**24, 2**24 + 1],
    "pool": [None, "", "p", "x" * 65],
}


@st.composite
def stored_events(draw: st.DrawFn) -> BlockStored:
    """A valid two-block store with a few of its fields at or past a bound."""
    fields: dict[str, Any] = {"block_hashes": [7, 2**64 - 1], "parent_hash": 3,
                              "token_ids": b"\x01" * 32, "block_size": 4}
    for name in draw(st.lists(st.sampled_from(sorted(_EDGES)), max_size=2)):
        fields[name] = draw(st.sampled_from(_EDGES[name]))
    return BlockStored(**fields)


def _verdict(batch: EventBatch) -> str:
    try:
        validate_batch(batch)
    except bus.BusError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "accepted"


_BATCH_EDGES: dict[str, list[Any]] = {
    "schema": [1, 2, 3, True],
    "model": ["", "x" * 63, "x" * 64, "é" * 100],
    "worker_id": ["", "w" * 63, "é" * 100],
    "epoch": [-1, 0, 2**63 - 1, 2**63],
    "seq": [-1, 0, 2**63 - 1, 2**63],
    "dp_rank": [-1, 65_535, 65_536],
    "ts": [0.0, float("inf"), float("nan"), 3],
    "events": [[], [AllBlocksCleared()], [BlockRemoved(block_hashes=[1])]],
}


@st.composite
def batches(draw: st.DrawFn) -> EventBatch:
    """A batch of stores (stored_events) with a few of its own fields at or past a bound."""
    fields: dict[str, Any] = {"schema": draw(st.sampled_from([1, 2])), "model": "m",
                              "worker_id": "w", "epoch": 0, "seq": 0, "ts": 1.0,
                              "events": draw(st.lists(stored_events(), min_size=1, max_size=2))}
    for name in draw(st.lists(st.sampled_from(sorted(_BATCH_EDGES)), max_size=2)):
        fields[name] = draw(st.sampled_from(_BATCH_EDGES[name]))
    return EventBatch(**fields)


@settings(max_examples=2_000, deadline=None)
@given(batch=batches())
def test_validation_paths_agree(batch: EventBatch) -> None:
    """validate_batch accepts and refuses the same batches, with the same error, in C."""
    with python_paths():
        expected = _verdict(batch)
    assert _verdict(batch) == expected


def test_validation_passes_field_batches_in_c() -> None:
    """The usual stores are passed by the C checks (the Python ones never run)."""
    history = list(MixedHistory(8, 2_000).batches())
    plain = [b for b in history if all(isinstance(e, BlockStored) and e.extra_keys is None
                                       for e in b.events)]
    assert plain
    assert all(bus._check_plain_stores is not None
               and bus._check_plain_stores(b.events, BlockStored, False) for b in plain)
    odd = msgspec.structs.replace(plain[0].events[0], block_hashes=[-1])
    assert bus._check_plain_stores is not None
    assert not bus._check_plain_stores([odd], BlockStored, False)
    assert bus._check_plain_batch is not None
    assert all(bus._check_plain_batch(b, EventBatch, BlockStored) for b in plain)
    assert not bus._check_plain_batch(msgspec.structs.replace(plain[0], events=[odd]),
                                      EventBatch, BlockStored)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
    st.tuples(st.sampled_from([b"S", b"C", b"T", b"K"]), st.integers(0, 3), st.integers(0, 9),
              st.lists(st.integers(0, 2**64 - 1), max_size=4)),
    st.binary(min_size=1, max_size=5),
), max_size=12))
def test_ops_writer_matches_python(steps: list[Any]) -> None:
    """OpsWriter's keys ops (merging included) are the bytes _OpsSink packs in Python."""
    sinks = []
    for python in (True, False):
        with python_paths() if python else _no_change():
            sink = _OpsSink()
        for step in steps:
            if isinstance(step, bytes):
                sink.ops += step
            else:
                kind, group, bitpos, keys = step
                sink.keys_op(kind, group if kind in (b"T", b"K") else 0, bitpos, keys)
        sinks.append(bytes(sink.ops))
    assert sinks[0] == sinks[1]
