"""`Diagnose` and `kv-indexer doctor` end to end: publishers on a real nats-server, each
misconfigured in one way (registered but silent, publishing unregistered, a clock 30 s
ahead, an LMCache-like tier of 25,000 blocks that never removes, a rank left degraded, a
batch forged on another worker's subject), routers querying with another tokenizer, another
block size, block keys of another hash seed and a misspelt model, through gRPC; the service
must name each of them, with the worker it concerns, and nothing on the healthy model
beside them. The CLI prints the verdicts (exit 3 on errors) and "no problems found" (exit
0) on a healthy service. Each check's unit test: tests/test_diagnose.py."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest

from indexer import cli
from indexer.app import IndexerService
from indexer.client import AsyncIndexerClient, IndexerClient, Query
from indexer.doctor import ERRORS_FOUND
from indexer.findings import ERROR, WARNING, Diagnosis
from indexer.serve.diagnose import DoctorSettings
from kvcore.bus import (
    SCHEMA_VERSION,
    AllBlocksCleared,
    BlockStored,
    EventBatch,
    encode_batch,
    pack_tokens,
    subject_for,
)
from kvcore.keys import block_keys, block_keys_for_tokens
from kvcore.topology import StreamSettings
from publisher.publisher import KVEventPublisher
from tests.support.event_path import BS, PARTITIONS, service_config
from tests.support.polling import eventually, is_true

pytestmark = pytest.mark.integration

MODEL = "org/model-7b"
HEALTHY = "org/healthy-1b"
LMC_BLOCKS = 25_000  # the never-removing tier: a rank's cache at field scale
MAIN_BLOCKS = 1_200  # the model's other cache, above DoctorSettings.min_model_blocks
SETTINGS = DoctorSettings(silent_after_s=1.0, no_removal_blocks=20_000)


def tokens(blocks: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 50_000) for _ in range(blocks * BS)]


def make_publisher(url: str, worker: str, model: str = MODEL) -> KVEventPublisher:
    return KVEventPublisher(model, worker, block_size=BS, nats_url=url,
                            stream=StreamSettings(partitions=PARTITIONS, liveness_ttl_s=3.0))


def store_chain(pub: KVEventPublisher, ids: Sequence[int], *, first_hash: int = 1,
                medium: str = "gpu") -> None:
    blocks = len(ids) // BS
    pub.stored(list(range(first_hash, first_hash + blocks)), ids, medium=medium)


async def noop(*_: object) -> None:
    return None


class Fleet:
    """Publishers of the two models, each with its one fault (or none)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.pubs: list[KVEventPublisher] = []
        self.main_tokens = tokens(MAIN_BLOCKS, 1)
        self.healthy_tokens = tokens(64, 2)

    async def add(self, worker: str, model: str = MODEL, *, registered: bool = True,
                  answers_resyncs: bool = True) -> KVEventPublisher:
        pub = make_publisher(self.url, worker, model)
        if not registered:
            pub._keep_alive = noop  # type: ignore[method-assign]
        if not answers_resyncs:
            pub._on_resync = noop  # type: ignore[method-assign]
        await pub.start()
        self.pubs.append(pub)
        return pub

    async def start_faulty(self) -> None:
        main = await self.add("w-a")
        store_chain(main, self.main_tokens)
        await self.add("w-quiet")  # heartbeats, never an event
        rogue = await self.add("w-rogue", registered=False)
        store_chain(rogue, self.main_tokens[: 8 * BS])
        skewed = await self.add("w-skew")
        skewed.ranks[0].publish([BlockStored(block_hashes=[1], block_size=BS,
                                             token_ids=pack_tokens(self.main_tokens[:BS]))],
                                ts=time.time() + 30)
        lmcache = await self.add("w-lmc")
        store_chain(lmcache, tokens(LMC_BLOCKS, 3), medium="cpu")
        broken = await self.add("w-broken", answers_resyncs=False)
        broken.stored([500], self.main_tokens[:BS], parent_hash=499)  # a parent never seen
        for pub in self.pubs:
            assert await pub.flush(30.0)
        await self.forge(main)

    async def forge(self, pub: KVEventPublisher) -> None:
        """A batch naming w-a published on w-rogue's subject: dead-lettered."""
        assert pub._nc is not None
        forged = EventBatch(schema=SCHEMA_VERSION, model=MODEL, worker_id="w-a", epoch=1,
                            seq=0, events=[AllBlocksCleared()], ts=time.time())
        await pub._nc.jetstream().publish(subject_for(MODEL, "w-rogue"), encode_batch(forged))

    async def start_healthy(self) -> None:
        for worker in ("h-1", "h-2"):
            pub = await self.add(worker, HEALTHY)
            store_chain(pub, self.healthy_tokens)
            pub.removed([64])  # evictions are published
            assert await pub.flush(10.0)

    async def close(self) -> None:
        for pub in self.pubs:
            await pub.close()


@pytest.fixture(params=["memory", "redis"])
async def service(nats_url: str, request: pytest.FixtureRequest) -> AsyncIterator[IndexerService]:
    """An IndexerService with gRPC on, over each index backend (a private redis-server)."""
    redis_url = request.getfixturevalue("private_redis").url if request.param == "redis" else None
    svc = IndexerService(service_config(nats_url, grpc_listen="127.0.0.1:0", redis_url=redis_url),
                         doctor=SETTINGS)
    await svc.start()
    try:
        yield svc
    finally:
        await svc.close()


def pairs(diagnosis: Diagnosis, model: str = MODEL) -> set[tuple[str, str]]:
    return {(f.code, f.worker_id) for f in diagnosis.findings if f.model == model}


async def query_like_misconfigured_routers(client: AsyncIndexerClient,
                                           fleet: Fleet) -> None:
    other_tokenizer = tokens(16, 99)
    for _ in range(SETTINGS.min_queries + 5):
        answer = await client.score(Query(model=MODEL, token_ids=other_tokenizer))
        assert answer.scores == []
    for _ in range(12):
        await client.score(Query(model=MODEL, token_ids=fleet.main_tokens[: 16 * BS],
                                 block_size=2 * BS))
    for _ in range(5):
        answer = await client.score(Query(model="org/model-7B", token_ids=other_tokenizer,
                                          block_size=BS))
        assert answer.scores == []
    seeded_1337 = block_keys(fleet.main_tokens[: 16 * BS], BS, 1337)  # another hash scheme
    for _ in range(SETTINGS.min_queries):
        answer = await client.score(Query(model=MODEL, block_keys=seeded_1337))
        assert answer.scores == []
    right_keys = block_keys_for_tokens(fleet.healthy_tokens, BS, HEALTHY)
    for _ in range(30):  # the healthy model's routers: hits, by token ids and by keys
        for query in (Query(model=HEALTHY, token_ids=fleet.healthy_tokens),
                      Query(model=HEALTHY, block_keys=right_keys)):
            answer = await client.score(query)
            assert {s.matched_blocks for s in answer.scores} == {63}  # the 64th was evicted


async def test_each_misconfiguration_is_named(service: IndexerService, nats_url: str) -> None:
    fleet = Fleet(nats_url)
    target = f"127.0.0.1:{service.grpc_port}"
    try:
        # caught up first: batches applied during the start-up replay are not timed
        await eventually(lambda: is_true(len(service.consumers()) == PARTITIONS
                                         and not service.rebuilding), 30.0)
        await fleet.start_faulty()
        await fleet.start_healthy()
        async with AsyncIndexerClient(target, timeout=10.0) as client:
            async def indexed() -> bool:
                workers = await client.list_workers()
                blocks = {w.worker_id: sum(w.blocks_by_tier.values()) for w in workers}
                return (blocks.get("w-lmc") == LMC_BLOCKS and blocks.get("h-2") == 63
                        and blocks.get("w-a") == MAIN_BLOCKS and "w-skew" in blocks
                        and any(w.degraded for w in workers))

            await eventually(indexed, 60.0)
            await query_like_misconfigured_routers(client, fleet)
            expected = {("silent_worker", "w-quiet"), ("unregistered_worker", "w-rogue"),
                        ("clock_skew", "w-skew"), ("stores_without_removals", "w-lmc"),
                        ("degraded_worker", "w-broken"), ("first_block_misses", ""),
                        ("block_size_mismatch", "")}
            service_wide = {("dead_letters", "")}

            async def named() -> bool:
                diagnosis = await client.diagnose()
                return (pairs(diagnosis) == expected
                        and pairs(diagnosis, "") == service_wide)

            await eventually(named, 30.0)
            diagnosis = await client.diagnose()
        assert diagnosis.has_errors and diagnosis.limitations == []
        assert pairs(diagnosis, "org/model-7B") == {("unknown_model", "")}
        assert "Did you mean 'org/model-7b'" in next(
            f.fix for f in diagnosis.findings if f.code == "unknown_model")
        assert pairs(diagnosis, HEALTHY) == set()
        severities = [f.severity for f in diagnosis.findings]
        assert severities == sorted(severities, key=[ERROR, WARNING, "info"].index)
        by_code = {f.code: f for f in diagnosis.findings}
        misses = sorted(f.summary for f in diagnosis.findings if f.code == "first_block_misses")
        assert len(misses) == 2
        assert misses[0].startswith(f"{SETTINGS.min_queries} of {SETTINGS.min_queries} recent "
                                    "block-key") and "another scheme or seed" in misses[0]
        assert misses[1].startswith(f"{SETTINGS.min_queries + 5} of {SETTINGS.min_queries + 5} "
                                    "recent token-id") and "tokenize differently" in misses[1]
        assert "12 recent queries" in by_code["block_size_mismatch"].summary
        assert f"holds {LMC_BLOCKS} cpu blocks" in by_code["stores_without_removals"].summary
        assert "identity_mismatch 1" in by_code["dead_letters"].summary
        assert by_code["dead_letters"].severity == ERROR
        assert by_code["stores_without_removals"].dp_rank == 0

        # one model at a time; the sync face agrees with the async one
        with IndexerClient(target, timeout=10.0) as sync_client:
            healthy = await asyncio.to_thread(sync_client.diagnose, HEALTHY)
            asked = await asyncio.to_thread(sync_client.diagnose, "org/nobody")
        assert healthy.findings == [] and not healthy.has_errors
        assert [(f.code, f.model) for f in asked.findings] == [("unknown_model", "org/nobody")]

        # the CLI: verdicts and fixes, exit 3 on errors; --json for scripts
        assert await asyncio.to_thread(cli.main, ["doctor", "--target", target]) == ERRORS_FOUND
        assert await asyncio.to_thread(
            cli.main, ["doctor", "--target", target, "--model", HEALTHY]) == 0
    finally:
        await fleet.close()


def printed_json(capsys: pytest.CaptureFixture[str]) -> Any:
    """The JSON document the CLI printed (the service's log lines share stdout here)."""
    [line] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    return json.loads(line)


async def test_cli_prints_verdicts(service: IndexerService, nats_url: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    fleet = Fleet(nats_url)
    target = f"127.0.0.1:{service.grpc_port}"
    try:
        # nothing has reached this service yet: as if the bridges used another NATS
        code = await asyncio.to_thread(cli.main, ["doctor", "--target", target, "--json",
                                                  "--model", HEALTHY])
        assert code == ERRORS_FOUND
        [finding] = [f for f in printed_json(capsys)["findings"] if f["code"] == "unknown_model"]
        assert "--nats-url" in finding["fix"]
        await fleet.start_healthy()
        await eventually(lambda: is_true(
            service.liveness is not None and len(service.liveness.live) == 2
            and service.liveness.settled
            and len(service.consumers()) == PARTITIONS and not service.rebuilding), 30.0)
        assert await asyncio.to_thread(cli.main, ["doctor", "--target", target]) == 0
        assert "no problems found (11 checks passed)" in capsys.readouterr().out
        # a worker goes quiet after registering
        await fleet.add("h-quiet", HEALTHY)
        await asyncio.sleep(SETTINGS.silent_after_s + 0.5)
        assert await asyncio.to_thread(cli.main, ["doctor", "--target", target]) == 0
        out = capsys.readouterr().out
        assert f"\nWARNING silent_worker (model {HEALTHY}, worker h-quiet)\n" in out
        assert "fix:" in out and "--kv-events-config" in out and "1 warning(s)" in out
        code = await asyncio.to_thread(cli.main, ["doctor", "--target", target, "--json",
                                                  "--model", "org/healthy-1B"])
        assert code == ERRORS_FOUND
        printed = printed_json(capsys)
        assert printed["ok"] is False
        assert [(f["severity"], f["code"]) for f in printed["findings"]] == [
            ("error", "unknown_model")]
    finally:
        await fleet.close()


async def test_an_indexer_without_diagnose_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    """A server that predates the RPC (here: one with no KvIndexer at all) answers
    UNIMPLEMENTED; doctor says so in one line, exit 1."""
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        code = await asyncio.to_thread(cli.main, ["doctor", "--target", f"127.0.0.1:{port}"])
    finally:
        await server.stop(0)
    assert code == 1
    assert "has no Diagnose RPC" in capsys.readouterr().err
