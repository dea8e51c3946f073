"""Prompts as block keys packed u64 (`ScoreRequest.block_key_bytes`): answered exactly as
the same prompt as token_bytes (Score, FindBestWorker unary and streamed), the C walk over
block-key masks (`tally_masks`) equal to the walk over runs, bad input a per-request
error, and the client sending keys when asked to and it knows the block size."""

from __future__ import annotations

import asyncio
import random
from array import array
from typing import Any

import grpc
import pytest

from indexer import client as client_module
from indexer._proto.kvindex.v1 import indexer_pb2 as pb
from indexer.client import AsyncIndexerClient, Decision, IndexerClient, Query, _score_request
from indexer.index.memory import MemoryIndex
from indexer.index.protocol import ScoreQuery
from kvcore.bus import pack_tokens
from kvcore.keys import NATIVE, block_keys_packed, root_seed
from tests.support.decisions import (
    FIELD_MODEL,
    INVALID_ARGUMENT,
    OK,
    field_index,
    request_of,
    stream_message,
    stream_raw,
    without_age,
)
from tests.support.grpc_scenario import serving
from tests.support.mask_runs import as_runs

if NATIVE:
    from kvcore._native import tally_masks, tally_runs

pytestmark = pytest.mark.skipif(not NATIVE, reason="the C extension is not built")

__all__ = ["field_index"]  # the module fixture (tests/support/decisions.py)

BLOCK = 16


def keys_of(prompt: list[int], model: str = FIELD_MODEL) -> bytes:
    return block_keys_packed(pack_tokens(prompt), BLOCK, root_seed(model))


def as_keys(request: pb.FindBestWorkerRequest) -> pb.FindBestWorkerRequest:
    """The request with its prompt as block_key_bytes (block_size set on both)."""
    keyed = pb.FindBestWorkerRequest()
    keyed.CopyFrom(request)
    tokens = array("I", request.score.token_bytes or b"")
    if not request.score.token_bytes:
        tokens = array("I", request.score.token_ids)
    keyed.score.ClearField("token_bytes")
    keyed.score.ClearField("token_ids")
    keyed.score.block_key_bytes = keys_of(list(tokens))
    keyed.score.block_size = BLOCK
    request.score.block_size = BLOCK
    return keyed



class TestTallyMasks:
    @pytest.mark.parametrize("slots", [1_024, 4_096])
    def test_equals_the_walk_over_runs(self, slots: int) -> None:
        """Random masks (shared prefixes ending one candidate at a time, tiers, repeats,
        holes): tally_masks equals tally_runs over the same masks as runs."""
        rng = random.Random(slots)
        for _ in range(30):
            candidates = 0
            for slot in rng.sample(range(slots), rng.randrange(1, 300)):
                candidates |= 1 << (slot * 4)
            holders = [s for s in range(slots) if candidates >> (s * 4) & 1]
            masks = []
            mask = 0
            for slot in holders:
                mask |= rng.choice([1, 1, 2, 4, 8, 3, 5]) << (slot * 4)
            for _ in range(rng.randrange(0, 200)):
                if rng.random() < 0.2 and holders:
                    gone = holders.pop(rng.randrange(len(holders)))
                    mask &= ~(15 << (gone * 4))
                if rng.random() < 0.05:
                    mask |= rng.choice([1, 2, 4]) << (rng.randrange(slots) * 4)  # a stranger
                masks.append(mask if rng.random() > 0.02 else 0)
            weights = rng.choice([(1.0, 0.8, 0.5, 0.3), (0.1, 0.8, 0.5, 2.0)])
            include_zero = rng.random() < 0.3
            expected = tally_runs(as_runs(masks, candidates * 15), candidates, weights,
                                  include_zero)
            assert tally_masks(masks, candidates, weights, include_zero) == expected

    def test_bad_masks_raise(self) -> None:
        with pytest.raises(TypeError):
            tally_masks([1, "x"], 1, (1.0, 0.8, 0.5, 0.3), False)
        with pytest.raises(TypeError):
            tally_masks(5, 1, (1.0, 0.8, 0.5, 0.3), False)


class TestIndexAnswersKeysAsTokens:
    def test_score_and_tally(self, field_index: tuple[MemoryIndex, list[list[int]]]) -> None:
        """1,024 ranks: each prompt's keys (list and array) score as its tokens."""
        index, prompts = field_index
        for prompt in prompts:
            by_tokens = ScoreQuery(model=FIELD_MODEL, token_ids=prompt, block_size=BLOCK)
            keys = array("Q", keys_of(prompt))
            for form in (keys, list(keys)):
                by_keys = ScoreQuery(model=FIELD_MODEL, block_keys=form, block_size=BLOCK)
                assert index.sync.score(by_keys) == index.sync.score(by_tokens)
                assert index.sync.score_tally(by_keys) == index.sync.score_tally(by_tokens)


class TestServerAnswersKeysAsTokens:
    async def test_score_unary_and_streamed(
            self, field_index: tuple[MemoryIndex, list[list[int]]]) -> None:
        index, prompts = field_index
        rng = random.Random(13)
        as_tokens = [request_of(p, rng, packed=rng.random() < 0.7) for p in prompts]
        as_keyed = [as_keys(r) for r in as_tokens]
        async with serving(index) as (stub, port):
            unary_tokens = [without_age(await stub.FindBestWorker(r, timeout=10))
                            for r in as_tokens]
            unary_keys = [without_age(await stub.FindBestWorker(r, timeout=10))
                          for r in as_keyed]
            streamed = await stream_raw(port, [stream_message(*as_keyed[i : i + 8])
                                               for i in range(0, len(as_keyed), 8)])
            scores = [(await stub.Score(r.score, timeout=10),
                       await stub.Score(k.score, timeout=10))
                      for r, k in zip(as_tokens, as_keyed, strict=True)]
        assert unary_keys == unary_tokens
        assert [a.code for a in streamed] == [OK] * len(as_keyed)
        assert [without_age(a.answer) for a in streamed] == unary_tokens
        assert sum(a.matched_blocks > 0 for a in unary_keys) > len(prompts) // 2
        for by_tokens, by_keys in scores:
            by_tokens.freshness.last_event_age_seconds = 0.0
            by_keys.freshness.last_event_age_seconds = 0.0
            assert by_keys == by_tokens

    async def test_each_bad_prompt_gets_its_status(
            self, field_index: tuple[MemoryIndex, list[list[int]]]) -> None:
        index, prompts = field_index
        keys = keys_of(prompts[0])
        good = pb.FindBestWorkerRequest(score=pb.ScoreRequest(
            model=FIELD_MODEL, block_key_bytes=keys, block_size=BLOCK))
        limit = index.config.max_query_tokens // index.config.min_block_size
        score = pb.ScoreRequest
        bad: list[tuple[pb.ScoreRequest, str]] = [
            (score(model=FIELD_MODEL, block_key_bytes=keys[:12]),
             "score.block_key_bytes: 12 bytes is not a multiple of 8"),
            (score(model=FIELD_MODEL, block_key_bytes=keys, token_bytes=b"\0" * 64),
             "got score.token_bytes and score.block_key_bytes"),
            (score(model=FIELD_MODEL, block_key_bytes=keys, token_ids=[1, 2]),
             "got score.token_ids and score.block_key_bytes"),
            (score(model=FIELD_MODEL, block_key_bytes=keys, block_keys=[1]),
             "got score.block_keys and score.block_key_bytes"),
            (score(model=FIELD_MODEL, block_key_bytes=bytes(8 * (limit + 1))),
             f"exceeds the limit of {limit} blocks"),
            (score(model=FIELD_MODEL, block_key_bytes=bytes(8 * (limit + 1) + 3)),
             "not a multiple of 8"),
        ]
        requests = [pb.FindBestWorkerRequest(score=s) for s, _ in bad]
        async with serving(index) as (stub, port):
            for request, (_, text) in zip(requests, bad, strict=True):
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await stub.FindBestWorker(request, timeout=10)
                assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert text in (failed.value.details() or "")
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await stub.Score(request.score, timeout=10)
                assert text.replace("score.", "") in (failed.value.details() or "")
            streamed = await stream_raw(port, [stream_message(good, *requests, good)])
            after = await stub.FindBestWorker(good, timeout=10)
        assert [a.code for a in streamed] == [OK, *[INVALID_ARGUMENT] * len(bad), OK]
        for answer, (_, text) in zip(streamed[1:-1], bad, strict=True):
            assert text in answer.message
        assert streamed[0].answer.worker_id == streamed[-1].answer.worker_id == after.worker_id
        assert after.matched_blocks > 0


class TestClientSendsKeys:
    def test_request_forms(self) -> None:
        prompt = list(range(100))
        query = Query(model="m", token_ids=prompt, block_size=BLOCK, lora_name="a")
        keyed = _score_request(query, keys_from_tokens=True)
        assert keyed.block_key_bytes == block_keys_packed(
            pack_tokens(prompt), BLOCK, root_seed("m", "a"))
        assert len(keyed.block_key_bytes) == 8 * (100 // BLOCK)
        assert not keyed.token_bytes and not keyed.token_ids
        # No block size known: tokens; packed tokens off: token_ids.
        unsized = _score_request(Query(model="m", token_ids=prompt), keys_from_tokens=True)
        assert unsized.token_bytes == pack_tokens(prompt) and not unsized.block_key_bytes
        listed = _score_request(query, packed_tokens=False, keys_from_tokens=True)
        assert list(listed.token_ids) == prompt and not listed.block_key_bytes
        with pytest.raises(ValueError, match="token id"):
            _score_request(Query(model="m", token_ids=[-1] * 16, block_size=BLOCK),
                           keys_from_tokens=True)

    async def test_answers_as_tokens(
            self, field_index: tuple[MemoryIndex, list[list[int]]],
            monkeypatch: pytest.MonkeyPatch) -> None:
        """Both faces, unary, Score and streamed: the same answers with keys_from_tokens,
        and every request of the keyed pass went as keys."""
        index, prompts = field_index
        queries = [Query(model=FIELD_MODEL, token_ids=p, block_size=BLOCK) for p in prompts[:12]]
        answers: dict[bool, list[Any]] = {}
        keyed_requests: list[Query] = []
        keys_of_query = client_module._keys_of

        def counted(query: Query, block_size: int) -> bytes:
            keyed_requests.append(query)
            return keys_of_query(query, block_size)

        monkeypatch.setattr(client_module, "_keys_of", counted)
        async with serving(index) as (_, port):
            for keyed in (False, True):
                client = AsyncIndexerClient(f"127.0.0.1:{port}", keys_from_tokens=keyed,
                                            learn_block_size=False)
                async with client:
                    choices = [await client.find_best_worker(q, max_candidates=4)
                               for q in queries]
                    scores = [await client.score(q) for q in queries]
                    async with client.decision_stream() as stream:
                        streamed = await asyncio.gather(*(
                            stream.find_best_worker(Decision(query=q, max_candidates=4))
                            for q in queries))
                sync = IndexerClient(f"127.0.0.1:{port}", keys_from_tokens=keyed,
                                     learn_block_size=False)
                try:
                    synced = await asyncio.to_thread(_sync_answers, sync, queries)
                finally:
                    sync.close()
                answers[keyed] = [(_aged(c), _aged(s), _aged(d), *map(_aged, t))
                                  for c, s, d, t in zip(choices, scores, streamed, synced,
                                                        strict=True)]
                # five requests a query: unary, Score and streamed (async), unary and
                # streamed (sync)
                assert len(keyed_requests) == (5 * len(queries) if keyed else 0)
        assert answers[True] == answers[False]
        assert any(row[0].matched_blocks for row in answers[True])


def _sync_answers(client: IndexerClient, queries: list[Query]) -> list[tuple[Any, Any]]:
    """The sync face's FindBestWorker and streamed decision per query (run in a thread:
    the server shares the test's loop)."""
    with client.decision_stream() as stream:
        streamed = [stream.find_best_worker(Decision(query=q, max_candidates=4))
                    for q in queries]
    return [(client.find_best_worker(q, max_candidates=4), d)
            for q, d in zip(queries, streamed, strict=True)]


def _aged(answer: Any) -> Any:
    """The answer without its event age (it moves between calls)."""
    import msgspec
    fresh = msgspec.structs.replace(answer.freshness, last_event_age_seconds=0.0)
    return msgspec.structs.replace(answer, freshness=fresh)
