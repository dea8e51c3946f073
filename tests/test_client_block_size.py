"""The client learns each model's block size from the server's answers and then sends
prompts as block keys: the same answers as token queries across models, LoRA adapters and
cache salts, on every face (sync and async, unary, Score, ScoreBatch and streamed); a model
restarted with another block size gets its keys refused (`keys_block_size`) and the
client resends the token ids and learns the new size, never answering from stale keys."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from typing import Any

import grpc
import msgspec
import pytest

from indexer._proto.kvindex.v1 import indexer_pb2 as pb
from indexer.client import (
    AsyncIndexerClient,
    BlockSizes,
    Decision,
    IndexerClient,
    Query,
    WorkerLoad,
)
from indexer.index.memory import MemoryIndex
from indexer.index.protocol import IndexConfig, ScoreQuery, ScoreResult
from indexer.index.scoring import QueryTally
from kvcore.bus import SCHEMA_VERSION, BlockStored, EventBatch, pack_tokens
from kvcore.keys import block_keys_packed, root_seed
from tests.support.grpc_scenario import serving

SMALL, LARGE = 4, 8  # block sizes: as first served, after the model's restart
CONFIG = IndexConfig(max_query_tokens=4096, min_block_size=SMALL)
PROMPT = list(range(100, 132))  # 8 blocks of 4, 4 of 8
NAMESPACES = [("m-1", "", ""), ("m-1", "adapter-a", ""), ("m-1", "", "tenant-b"),
              ("m-2", "", ""), ("m-2", "adapter-a", "tenant-b")]
_hashes = itertools.count(1)


class RecordedIndex(MemoryIndex):
    """The in-memory index, noting the prompt form of every query it scores."""

    def __init__(self) -> None:
        super().__init__(CONFIG)
        self.forms: list[str] = []

    def _note(self, query: ScoreQuery) -> None:
        self.forms.append("keys" if query.block_keys is not None else "tokens")

    async def score(self, query: ScoreQuery) -> ScoreResult:
        self._note(query)
        return await super().score(query)

    async def score_tally(self, query: ScoreQuery) -> QueryTally | None:
        self._note(query)
        return await super().score_tally(query)


def stored(namespace: tuple[str, str, str], worker: str, blocks: int,
           block_size: int) -> EventBatch:
    """`worker` holds the first `blocks` blocks of PROMPT in `namespace`."""
    model, lora, salt = namespace
    event = BlockStored(block_hashes=[next(_hashes) for _ in range(blocks)],
                        token_ids=pack_tokens(PROMPT[: blocks * block_size]),
                        block_size=block_size, lora_name=lora or None, cache_salt=salt or None)
    return EventBatch(schema=SCHEMA_VERSION, model=model, worker_id=worker, dp_rank=0,
                      epoch=1, seq=next(_hashes), events=[event])


def load_namespaces(index: MemoryIndex) -> None:
    """In each namespace another worker holds the most: a key rooted in the wrong model,
    adapter or salt answers differently."""
    for i, namespace in enumerate(NAMESPACES):
        for j, worker in enumerate(("w-a", "w-b", "w-c")):
            index.sync.apply([stored(namespace, worker, 1 + (i + j) % 3 * 3, SMALL)])


def queries() -> list[Query]:
    return [Query(model=m, token_ids=PROMPT, lora_name=lora, cache_salt=salt)
            for m, lora, salt in NAMESPACES]


def aged(answer: Any) -> Any:
    """The answer without its event age (it moves between calls)."""
    fresh = msgspec.structs.replace(answer.freshness, last_event_age_seconds=0.0)
    return msgspec.structs.replace(answer, freshness=fresh)


LOADS = [WorkerLoad("w-b", active_blocks=1)]


def sync_answers(client: IndexerClient, qs: Sequence[Query]) -> list[Any]:
    """Every face of the sync client, twice over the queries (the first pass teaches it)."""
    out: list[Any] = []
    for _ in range(2):
        out += [client.find_best_worker(q, LOADS) for q in qs]
        out += [client.score(q) for q in qs]
        out += client.score_batch(qs)
        with client.decision_stream() as stream:
            out += [stream.find_best_worker(Decision(query=q, loads=LOADS)) for q in qs]
    return [aged(a) for a in out]


async def async_answers(client: AsyncIndexerClient, qs: Sequence[Query]) -> list[Any]:
    out: list[Any] = []
    for _ in range(2):
        out += [await client.find_best_worker(q, LOADS) for q in qs]
        out += [await client.score(q) for q in qs]
        out += await client.score_batch(qs)
        async with client.decision_stream() as stream:
            out += await asyncio.gather(*(stream.find_best_worker(Decision(query=q, loads=LOADS))
                                          for q in qs))
    return [aged(a) for a in out]


async def both_faces(port: int, qs: Sequence[Query], *, learn: bool) -> list[Any]:
    target = f"127.0.0.1:{port}"
    async with AsyncIndexerClient(target, learn_block_size=learn) as client:
        answers = await async_answers(client, qs)
    sync = IndexerClient(target, learn_block_size=learn)
    try:
        return answers + await asyncio.to_thread(sync_answers, sync, qs)
    finally:
        sync.close()


class TestLearntKeys:
    async def test_keys_answer_as_tokens_across_namespaces(self) -> None:
        index = RecordedIndex()
        load_namespaces(index)
        async with serving(index) as (_, port):
            as_tokens = await both_faces(port, queries(), learn=False)
            assert set(index.forms) == {"tokens"}
            index.forms.clear()
            learnt = await both_faces(port, queries(), learn=True)
        assert learnt == as_tokens
        # Per face, the first FindBestWorker of each model goes as tokens; the rest as keys.
        assert index.forms.count("tokens") == 2 * 2  # two models, two faces
        assert index.forms.count("keys") == len(learnt) - 4
        best = {a.worker_id for a in as_tokens[: len(NAMESPACES)]}
        assert len(best) == 3  # the namespaces answer differently: roots matter

    async def test_a_restarted_model_is_relearnt(self) -> None:
        """Keys at the old block size are refused and resent as token ids (the same answer
        as a token query), then keys at the new size are sent."""
        index = RecordedIndex()
        load_namespaces(index)
        qs = [q for q in queries() if q.model == "m-1"]
        async with serving(index) as (_, port):
            target = f"127.0.0.1:{port}"
            async with AsyncIndexerClient(target) as client:
                sync = IndexerClient(target)
                try:
                    await async_answers(client, qs)
                    await asyncio.to_thread(sync_answers, sync, qs)
                    assert client.block_sizes.get("m-1") == sync.block_sizes.get("m-1") == SMALL
                    for namespace in NAMESPACES[:3]:  # m-1 restarts with 8-token blocks
                        index.sync.apply([stored(namespace, "w-new", 3, LARGE)])
                    index.forms.clear()
                    learnt = await async_answers(client, qs)
                    learnt += await asyncio.to_thread(sync_answers, sync, qs)
                    assert client.block_sizes.get("m-1") == sync.block_sizes.get("m-1") == LARGE
                finally:
                    sync.close()
            # Each face's first query: refused as keys (never scored), resent as tokens.
            assert index.forms.count("tokens") == 2
            index.forms.clear()
            as_tokens = await both_faces(port, qs, learn=False)
        assert learnt == as_tokens
        assert all(a.worker_id == "w-new" for a in learnt[: len(qs)])

    async def test_a_stream_resends_refused_keys(self) -> None:
        """Decisions queued as keys before the restart are answered as token queries."""
        index = RecordedIndex()
        load_namespaces(index)
        qs = [q for q in queries() if q.model == "m-1"]
        async with serving(index) as (_, port):
            target = f"127.0.0.1:{port}"
            async with AsyncIndexerClient(target) as client:
                await client.find_best_worker(qs[0])  # learns 4
                for namespace in NAMESPACES[:3]:
                    index.sync.apply([stored(namespace, "w-new", 3, LARGE)])
                async with client.decision_stream() as stream:
                    streamed = await asyncio.gather(*(
                        stream.find_best_worker(Decision(query=q, loads=LOADS)) for q in qs))
            async with AsyncIndexerClient(target, learn_block_size=False) as client:
                expected = [await client.find_best_worker(q, LOADS, max_candidates=8)
                            for q in qs]
        assert [aged(a) for a in streamed] == [aged(a) for a in expected]


class TestServer:
    async def test_answers_report_the_block_size(self) -> None:
        index = RecordedIndex()
        load_namespaces(index)
        async with serving(index) as (stub, _):
            score = pb.ScoreRequest(model="m-1", token_bytes=pack_tokens(PROMPT))
            assert (await stub.Score(score)).block_size == SMALL
            answer = await stub.FindBestWorker(pb.FindBestWorkerRequest(score=score))
            assert answer.block_size == SMALL
            unknown = pb.ScoreRequest(model="nobody", block_key_bytes=bytes(8))
            assert (await stub.Score(unknown)).block_size == 0

    @pytest.mark.parametrize("stated", [SMALL, LARGE])
    async def test_keys_at_another_block_size_are_refused(self, stated: int) -> None:
        index = RecordedIndex()
        load_namespaces(index)
        keys = block_keys_packed(pack_tokens(PROMPT), stated, root_seed("m-1"))
        score = pb.ScoreRequest(model="m-1", block_key_bytes=keys, keys_block_size=stated)
        async with serving(index) as (stub, _):
            request = pb.FindBestWorkerRequest(score=score)
            if stated == SMALL:
                assert (await stub.FindBestWorker(request)).matched_blocks > 0
                return
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.FindBestWorker(request)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert (refused.value.details() or "").startswith("score.keys_block_size: ")
        assert index.forms == []  # refused before any walk


class TestBlockSizes:
    def test_what_goes_as_keys(self) -> None:
        sizes = BlockSizes(learn=True, keys_from_tokens=False, packed_tokens=True)
        query = Query(model="m", token_ids=PROMPT)
        assert sizes.for_keys(query) == 0  # nothing learnt: token ids
        sizes.update("m", 16)
        assert sizes.for_keys(query) == 16
        assert sizes.for_keys(msgspec.structs.replace(query, block_size=16)) == 16
        assert sizes.for_keys(msgspec.structs.replace(query, block_size=32)) == 0
        assert sizes.for_keys(Query(model="m", block_keys=[1])) == 0
        sizes.update("m", 0)  # an answer without a block size (an older server)
        assert sizes.for_keys(query) == 0

    def test_older_servers_and_options(self) -> None:
        query = Query(model="m", token_ids=PROMPT, block_size=16)
        off = BlockSizes(learn=False, keys_from_tokens=False, packed_tokens=True)
        off.update("m", 16)
        assert off.for_keys(query) == 0
        explicit = BlockSizes(learn=True, keys_from_tokens=True, packed_tokens=True)
        assert explicit.for_keys(query) == 16
        unpacked = BlockSizes(learn=True, keys_from_tokens=True, packed_tokens=False)
        unpacked.update("m", 16)
        assert unpacked.for_keys(query) == 0
