"""Prefill/decode disaggregation roles, end to end: publishers declare a role in their
registry entry on a real nats-server, the IndexerService learns it through its liveness
watcher, and Score / FindBestWorker / ScoreBatch / ListWorkers filter on it over gRPC (both
client faces and the CLI). A worker whose entry has no role (a publisher older than roles)
counts as `both`; a filter that is not a role is INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import msgspec
import pytest

from indexer import cli
from indexer.app import IndexerService
from indexer.client import (
    AsyncIndexerClient,
    FailedPreconditionError,
    IndexerClient,
    InvalidArgumentError,
    Query,
    WorkerLoad,
)
from indexer.index.protocol import WorkerInfo
from indexer.serve.directory import CandidateSet
from kvcore.roles import check_role, role_matches
from kvcore.topology import WorkerRecord
from publisher.cli import parse_bridge_args
from publisher.publisher import KVEventPublisher
from tests.support.event_path import BS, MODEL, TOKENS, matched, publisher, service_config, store
from tests.support.polling import eventually, is_true

pytestmark = pytest.mark.integration

ROLE_OF = {"w-p": "prefill", "w-d": "decode", "w-b": "both"}
OLD = "w-old"  # its publisher writes registry entries without a role
EVERY = {*ROLE_OF, OLD}


class OldRecord(msgspec.Struct, kw_only=True):
    """A registry entry as publishers wrote it before roles."""

    model: str
    worker_id: str
    block_size: int
    dp_size: int = 1
    tiers: list[str] = msgspec.field(default_factory=lambda: ["gpu"])
    epoch: int = 0
    last_seq: dict[str, int] = msgspec.field(default_factory=dict)
    version: str = ""


def old_publisher(url: str) -> KVEventPublisher:
    pub = publisher(url, OLD)

    def record() -> OldRecord:
        new = KVEventPublisher.record(pub)
        return OldRecord(**{f: getattr(new, f) for f in OldRecord.__struct_fields__})

    pub.record = record  # type: ignore[assignment,method-assign]
    return pub


@pytest.fixture
async def fleet(nats_url: str) -> AsyncIterator[tuple[IndexerService, str]]:
    """An IndexerService with gRPC on, and four workers holding the same eight blocks."""
    service = IndexerService(service_config(nats_url, grpc_listen="127.0.0.1:0"))
    await service.start()
    pubs = [publisher(nats_url, w, role=r) for w, r in ROLE_OF.items()]
    pubs.append(old_publisher(nats_url))
    try:
        for pub in pubs:
            await pub.start()
            store(pub, 1, 8)
            pub.end_step()
            assert await pub.flush(10.0)
        liveness = service.liveness
        assert liveness is not None
        for worker in EVERY:
            await eventually(lambda w=worker: matched_all(service, w), 20.0)  # type: ignore[misc]
        await eventually(lambda: is_true(all((MODEL, w) in liveness.live for w in EVERY)), 20.0)
        yield service, f"127.0.0.1:{service.grpc_port}"
    finally:
        for pub in pubs:
            await pub.close()
        await service.close()


async def matched_all(service: IndexerService, worker: str) -> bool:
    return await matched(service, worker) == 8


def query(role: str = "", **kwargs: object) -> Query:
    return Query(model=MODEL, token_ids=TOKENS, role=role, **kwargs)  # type: ignore[arg-type]


# --- the registry and the filter ---------------------------------------------------------


def test_record_without_role_decodes_as_both() -> None:
    """A registry entry written before roles existed decodes with role `both`."""
    old = msgspec.json.encode(OldRecord(model=MODEL, worker_id=OLD, block_size=BS))
    assert b"role" not in old
    assert msgspec.json.decode(old, type=WorkerRecord).role == "both"
    new = WorkerRecord(model=MODEL, worker_id="w", block_size=BS, role="decode")
    assert msgspec.json.decode(msgspec.json.encode(new), type=WorkerRecord).role == "decode"


def test_role_filter_semantics() -> None:
    """prefill admits prefill and both, decode admits decode and both, both only both,
    the empty filter everything; anything else is refused naming the field."""
    admitted = {wanted: {r for r in ("prefill", "decode", "both") if role_matches(r, wanted)}
                for wanted in ("", "prefill", "decode", "both")}
    assert admitted == {"": {"prefill", "decode", "both"}, "prefill": {"prefill", "both"},
                        "decode": {"decode", "both"}, "both": {"both"}}
    with pytest.raises(ValueError, match=r"^score\.role: 'Prefill' is not a worker role"):
        check_role("Prefill", "score.role", allow_empty=True)
    with pytest.raises(ValueError, match="role"):
        check_role("")
    infos = [WorkerInfo(MODEL, w, 0, 1, 0, False, {}, 0.0, role=r) for w, r in ROLE_OF.items()]
    candidates = CandidateSet(infos)
    assert candidates.with_role("") is candidates
    assert candidates.with_role("decode").ids == {"w-d", "w-b"}
    assert candidates.with_role("decode") is candidates.with_role("decode")  # kept


def test_publisher_and_bridge_take_a_role(monkeypatch: pytest.MonkeyPatch) -> None:
    """KVEventPublisher(role=) and `kv-publisher bridge --role` (or KV_PUBLISHER_ROLE)
    accept prefill / decode / both, default both, and refuse anything else."""
    base = ["--zmq-endpoint", "tcp://127.0.0.1:5557", "--model", MODEL, "--worker-id", "w"]
    assert parse_bridge_args(base).role == "both"
    assert parse_bridge_args([*base, "--role", "prefill"]).role == "prefill"
    monkeypatch.setenv("KV_PUBLISHER_ROLE", "decode")
    assert parse_bridge_args(base).role == "decode"
    with pytest.raises(SystemExit) as exited:
        parse_bridge_args([*base, "--role", "prefil"])
    assert exited.value.code == 2
    assert KVEventPublisher(MODEL, "w", block_size=BS, role="decode").record().role == "decode"
    assert KVEventPublisher(MODEL, "w", block_size=BS).record().role == "both"
    with pytest.raises(ValueError, match="role: 'router'"):
        KVEventPublisher(MODEL, "w", block_size=BS, role="router")


# --- end to end ---------------------------------------------------------------------------


async def test_score_filters_by_role(fleet: tuple[IndexerService, str]) -> None:
    """Three workers (prefill, decode, both) and an old one hold the same prefix: Score
    with role=prefill answers the prefill, both and old workers only; decode the decode,
    both and old; both the both and old; no role all four. ScoreBatch filters per query."""
    _, target = fleet
    async with AsyncIndexerClient(target) as client:
        found = {role: {s.worker_id: s.matched_blocks for s in (await client.score(
            query(role))).scores} for role in ("", "prefill", "decode", "both")}
        batch = await client.score_batch([query("decode"), query("prefill"), query()])
    assert found[""] == dict.fromkeys(EVERY, 8)
    assert found["prefill"] == {"w-p": 8, "w-b": 8, OLD: 8}
    assert found["decode"] == {"w-d": 8, "w-b": 8, OLD: 8}
    assert found["both"] == {"w-b": 8, OLD: 8}
    assert [{s.worker_id for s in answer.scores} for answer in batch] == [
        {"w-d", "w-b", OLD}, {"w-p", "w-b", OLD}, EVERY]


async def test_find_best_worker_by_role(fleet: tuple[IndexerService, str]) -> None:
    """A disaggregated router asks twice: the best prefill worker (KV-aware) and the best
    decode worker (here by load: every candidate holds the prompt). Each choice is made
    among the workers of that role and `both` only; `workers` narrows further."""
    _, target = fleet
    busy = [WorkerLoad("w-b", active_blocks=500), WorkerLoad(OLD, active_blocks=400),
            WorkerLoad("w-p", active_blocks=100)]
    async with AsyncIndexerClient(target) as client:
        decode = await client.find_best_worker(query("decode"), busy)
        prefill = await client.find_best_worker(query("prefill"), busy)
        only_both = await client.find_best_worker(query("prefill", workers=["w-b", "w-d"]),
                                                  busy)
        with pytest.raises(FailedPreconditionError,
                           match=f"no live workers for model '{MODEL}' of role 'decode' among"):
            await client.find_best_worker(query("decode", workers=["w-p"]))
    assert decode.worker_id == "w-d" and decode.matched_blocks == 8
    assert [c.worker_id for c in decode.candidates] == ["w-d", OLD, "w-b"]
    assert prefill.worker_id == "w-p"
    assert {c.worker_id for c in prefill.candidates} == {"w-p", "w-b", OLD}
    assert only_both.worker_id == "w-b" and len(only_both.candidates) == 1


async def test_list_workers_shows_and_filters_roles(fleet: tuple[IndexerService, str],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """ListWorkers carries each worker's role (the old one's: both) and filters on it,
    through both client faces and `kv-indexer workers --role`."""
    _, target = fleet
    async with AsyncIndexerClient(target) as client:
        listed = {w.worker_id: w.role for w in await client.list_workers(MODEL)}
        prefill = {w.worker_id for w in await client.list_workers(role="prefill")}
    assert listed == {**ROLE_OF, OLD: "both"}
    assert prefill == {"w-p", "w-b", OLD}

    def sync_calls() -> tuple[set[str], set[str]]:
        with IndexerClient(target) as client:
            decode = {w.worker_id for w in client.list_workers(MODEL, role="decode")}
            scored = {s.worker_id for s in client.score(query("both")).scores}
        return decode, scored

    assert await asyncio.to_thread(sync_calls) == ({"w-d", "w-b", OLD}, {"w-b", OLD})

    assert await asyncio.to_thread(cli.main, ["workers", "--target", target, "--json",
                                              "--role", "decode"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {(w["worker_id"], w["role"]) for w in doc} == {
        ("w-d", "decode"), ("w-b", "both"), (OLD, "both")}
    assert await asyncio.to_thread(cli.main, ["workers", "--target", target]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[-1] == "ROLE"
    assert {line.split()[1]: line.split()[-1] for line in table[1:]} == {**ROLE_OF, OLD: "both"}


async def test_cli_score_role(fleet: tuple[IndexerService, str], tmp_path: object,
                              capsys: pytest.CaptureFixture[str]) -> None:
    """`kv-indexer score --role prefill` scores prefill and both workers only; a role that
    is none is a usage error (exit 2)."""
    _, target = fleet
    tokens = f"{tmp_path}/tokens.json"
    with open(tokens, "w") as f:
        json.dump(TOKENS, f)
    argv = ["score", "--target", target, "--model", MODEL, "--tokens-file", tokens, "--json"]
    assert await asyncio.to_thread(cli.main, [*argv, "--role", "prefill"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {s["worker_id"] for s in doc["scores"]} == {"w-p", "w-b", OLD}
    with pytest.raises(SystemExit) as exited:
        await asyncio.to_thread(cli.main, [*argv, "--role", "router"])
    assert exited.value.code == 2


async def test_bad_role_is_invalid_argument(fleet: tuple[IndexerService, str]) -> None:
    """A role filter that is not a role is INVALID_ARGUMENT naming the field, in every
    RPC that takes one."""
    _, target = fleet
    bad = InvalidArgumentError
    async with AsyncIndexerClient(target) as client:
        with pytest.raises(bad, match=r"^INVALID_ARGUMENT: role: 'router' is not a worker role"):
            await client.score(query("router"))
        with pytest.raises(bad, match=r"^INVALID_ARGUMENT: score\.role: 'Decode' is not"):
            await client.find_best_worker(query("Decode"))
        with pytest.raises(bad, match=r"^INVALID_ARGUMENT: requests\[1\]\.role: 'both ' is"):
            await client.score_batch([query("both"), query("both ")])
        with pytest.raises(bad, match=r"^INVALID_ARGUMENT: role: 'x' is not a worker role"):
            await client.list_workers(role="x")


async def test_role_change_and_removal_followed(nats_url: str) -> None:
    """A worker restarted with another role is known by its new one; the watcher forgets
    the role of a worker whose entry was deleted (a clean stop)."""
    service = IndexerService(service_config(nats_url))
    await service.start()
    try:
        liveness = service.liveness
        assert liveness is not None
        first = publisher(nats_url, "w-x", role="prefill")
        await first.start()
        await eventually(lambda: is_true(liveness.role_of(MODEL, "w-x") == "prefill"), 10.0)
        await first.close()  # deletes its entry
        await eventually(lambda: is_true((MODEL, "w-x") not in liveness.roles), 10.0)
        assert liveness.role_of(MODEL, "w-x") == "both"
        second = publisher(nats_url, "w-x", role="decode")
        await second.start()
        await eventually(lambda: is_true(liveness.role_of(MODEL, "w-x") == "decode"), 10.0)
        await second.close()
    finally:
        await service.close()
