"""Identity end to end: recorded engine frames (vLLM 0.34, SGLang 0.5.23) through the bridge's
EngineSource and NATS into an IndexerService, then routers' queries. A query in the namespace
the engine stored the blocks in (salt, adapter, media) matches every block; a query in any
other namespace matches none. Frames are handed to `EngineSource.on_frames`, as its SUB loop
does with each message (the ZMQ transport itself is tests/test_bridge.py's)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import zmq.asyncio
from structlog.testing import capture_logs

from indexer.app import IndexerService
from indexer.index.protocol import ScoreQuery, WorkerInfo
from kvcore.keys import MultimodalItem, block_keys_for_tokens, multimodal_extra_keys
from kvcore.topology import StreamSettings
from publisher.engines import Flavor
from publisher.publisher import KVEventPublisher
from publisher.zmq_source import EngineSource
from tests.support.event_path import service_config
from tests.support.polling import eventually

pytestmark = pytest.mark.integration

FRAMES = Path(__file__).resolve().parent / "fixtures" / "engine_frames"
MODEL = "org/vision-chat-7b"
BS = 4
PROMPT = list(range(101, 113))  # make_frames.PROMPT: three blocks
SALT, ADAPTER = "tenant-a", "sql-adapter"
IMAGE, AUDIO = MultimodalItem("img-5f0c", 2, 5), MultimodalItem("aud-77aa", 9, 2)
MIXED_IMAGE = MultimodalItem("img-5f0c", 5, 2)
DIGESTS = [bytes([0xE0 + i]) * 32 for i in range(3)]  # make_frames.MIXED's embeddings


class Namespace(NamedTuple):
    """What a router's query carries besides the tokens."""

    lora_name: str | None = None
    cache_salt: str | None = None
    media: tuple[MultimodalItem, ...] = ()
    embeds: list[bytes] | None = None

    def query(self, worker: str) -> ScoreQuery:
        """Token ids when there are no extras (the router sends its prompt), else the
        block keys a router computes (docs/block-keys.md: extra keys)."""
        base: dict[str, Any] = {"model": MODEL, "lora_name": self.lora_name,
                                "cache_salt": self.cache_salt, "workers": frozenset({worker})}
        if not self.media and self.embeds is None:
            return ScoreQuery(token_ids=PROMPT, block_size=BS, **base)
        extra = multimodal_extra_keys(self.media, len(PROMPT), BS, self.embeds)
        keys = block_keys_for_tokens(PROMPT, BS, MODEL, lora_name=self.lora_name,
                                     cache_salt=self.cache_salt, extra_keys=extra)
        return ScoreQuery(block_keys=keys, **base)


class Case(NamedTuple):
    flavor: Flavor
    frames: tuple[str, ...]  # fixtures, one engine batch each (seq 0, 1, ...)
    same: Namespace
    others: tuple[tuple[Namespace, int], ...]  # (query, blocks it may match)


SALTED, LORA = Namespace(cache_salt=SALT), Namespace(lora_name=ADAPTER)
MEDIA = Namespace(media=(IMAGE, AUDIO))
MIXED = Namespace(lora_name=ADAPTER, cache_salt=SALT, media=(MIXED_IMAGE,), embeds=DIGESTS)
PLAIN = Namespace()

SALT_OTHERS = ((PLAIN, 0), (Namespace(cache_salt="tenant-b"), 0),
               (Namespace(cache_salt=SALT + " "), 0), (Namespace(ADAPTER, SALT), 0),
               (Namespace(cache_salt=SALT, media=(IMAGE,)), 0))
LORA_OTHERS = ((PLAIN, 0), (Namespace(lora_name="sql-adapter-v2"), 0),
               (Namespace(ADAPTER, SALT), 0), (Namespace(cache_salt=ADAPTER), 0))

CASES: dict[str, Case] = {
    "sglang_salt": Case("sglang", ("sglang_0_5_23_salt", "sglang_0_5_23_salt_child"),
                        SALTED, SALT_OTHERS),
    "sglang_lora": Case("sglang", ("sglang_0_5_23_lora", "sglang_0_5_23_lora_child"),
                        LORA, LORA_OTHERS),
    "vllm_salt": Case("vllm", ("vllm_0_34_salt", "vllm_0_34_salt_child"), SALTED, SALT_OTHERS),
    "vllm_lora": Case("vllm", ("vllm_0_34_lora", "vllm_0_34_lora_child"), LORA, LORA_OTHERS),
    "vllm_media": Case(
        "vllm", ("vllm_0_34_media", "vllm_0_34_media_child"), MEDIA,
        (
            (PLAIN, 0),  # the placeholder tokens alone
            (Namespace(media=(IMAGE._replace(identifier="img-0000"), AUDIO)), 0),  # other image
            (Namespace(media=(IMAGE._replace(offset=3, length=4), AUDIO)), 0),  # moved image
            (Namespace(cache_salt=SALT, media=(IMAGE, AUDIO)), 0),
            (Namespace(lora_name=ADAPTER, media=(IMAGE, AUDIO)), 0),
            # the same image, another audio clip: blocks 0-1 are the same content
            (Namespace(media=(IMAGE, AUDIO._replace(identifier="aud-0000"))), 2),
        ),
    ),
    "vllm_mixed": Case(
        "vllm", ("vllm_0_34_mixed", "vllm_0_34_mixed_child"), MIXED,
        (
            (PLAIN, 0), (SALTED, 0), (LORA, 0),
            (MIXED._replace(cache_salt=None), 0), (MIXED._replace(lora_name=None), 0),
            (MIXED._replace(media=()), 1),  # the image is in block 1: block 0 is shared
            (MIXED._replace(embeds=None), 0),
            (MIXED._replace(embeds=[DIGESTS[0], DIGESTS[1], b"\x00" * 32]), 2),
        ),
    ),
}


def frames(name: str, seq: int) -> list[bytes]:
    """A live engine message: [topic, seq (8 bytes big-endian), payload]."""
    return [b"kv-events", seq.to_bytes(8, "big"), (FRAMES / f"{name}.bin").read_bytes()]


@asynccontextmanager
async def bridged(nats_url: str, worker: str, flavor: Flavor) -> AsyncIterator[
        tuple[IndexerService, EngineSource]]:
    """An IndexerService and one bridge rank (KVEventPublisher + EngineSource) for `worker`."""
    service = IndexerService(service_config(nats_url))
    await service.start()
    pub = KVEventPublisher(MODEL, worker, block_size=BS, nats_url=nats_url,
                           stream=StreamSettings(partitions=2))
    await pub.start()
    ctx = zmq.asyncio.Context()
    source = EngineSource(ctx, pub.ranks[0], "tcp://127.0.0.1:1", flavor=flavor)
    try:
        yield service, source
    finally:
        await pub.close()
        ctx.term()
        await service.close()


async def matched(service: IndexerService, query: ScoreQuery) -> int:
    assert service.index is not None
    result = await service.index.score(query)
    return max((s.matched_blocks for s in result.scores), default=0)


async def worker_info(service: IndexerService, worker: str) -> WorkerInfo | None:
    assert service.index is not None
    return next((w for w in await service.index.workers(MODEL) if w.worker_id == worker), None)


async def last_seq_is(service: IndexerService, worker: str, seq: int) -> bool:
    info = await worker_info(service, worker)
    return info is not None and info.last_seq == seq


@pytest.mark.parametrize("name", sorted(CASES))
async def test_same_namespace_matches_fully_others_match_nothing(nats_url: str,
                                                                 name: str) -> None:
    """Blocks an engine stored under a salt / adapter / media (and a child stored in a
    later batch, which carries none of it itself) match a query in that namespace fully,
    and a query in another namespace only where the engine's own blocks would be shared."""
    case = CASES[name]
    async with bridged(nats_url, name, case.flavor) as (service, source):
        for seq, fixture in enumerate(case.frames):
            await source.on_frames(frames(fixture, seq))
        await eventually(lambda: last_seq_is(service, name, len(case.frames) - 1))
        assert source.stats.skipped_events == {}
        assert await matched(service, case.same.query(name)) == 3
        for other, blocks in case.others:
            assert await matched(service, other.query(name)) == blocks, other


async def test_offloaded_salted_blocks_keep_their_salt(nats_url: str) -> None:
    """vLLM's offloading connector stores a salted request's blocks on CPU with their tokens
    but without the salt: the index keys them through the GPU store's (salted) keys, so an
    unsalted query still matches nothing. REMOTE stores and removals are not this worker's
    copies: left out and counted, the local CPU copies stay."""
    async with bridged(nats_url, "w-offload", "vllm") as (service, source):
        for seq, fixture in enumerate(("vllm_0_34_salt", "vllm_0_34_salt_child",
                                       "vllm_0_34_offload")):
            await source.on_frames(frames(fixture, seq))
        await eventually(lambda: last_seq_is(service, "w-offload", 2))
        info = await worker_info(service, "w-offload")
        assert info is not None and info.blocks_by_tier == {"gpu": 3, "cpu": 2}
        assert await matched(service, SALTED.query("w-offload")) == 3
        for other in (PLAIN, Namespace(cache_salt="tenant-b")):
            assert await matched(service, other.query("w-offload")) == 0
        assert source.stats.skipped_events == {"remote_block": 2}


async def test_secondary_tier_removal_keeps_the_primary_copy(nats_url: str) -> None:
    """A block on CPU for vLLM's primary offloading tier and for a secondary one ("kvcr"):
    the secondary's eviction leaves the CPU copy indexed; the primary's removes it."""
    async with bridged(nats_url, "w-owners", "vllm") as (service, source):
        await source.on_frames(frames("vllm_0_34_salt", 0))
        await source.on_frames(frames("vllm_0_34_owners", 1))
        await eventually(lambda: last_seq_is(service, "w-owners", 1))
        info = await worker_info(service, "w-owners")
        assert info is not None and info.blocks_by_tier == {"gpu": 2, "cpu": 1}
        assert source.stats.removals_held_back == 1
        await source.on_frames(frames("vllm_0_34_owners_removed", 2))
        await eventually(lambda: last_seq_is(service, "w-owners", 2))
        info = await worker_info(service, "w-owners")
        assert info is not None and info.blocks_by_tier == {"gpu": 2}


async def test_unplaceable_identity_is_dropped_counted_and_logged(nats_url: str) -> None:
    """A store whose extra keys the bridge cannot place (here: the adapter's slot holds
    something else) never reaches the index; it is counted and logged."""
    async with bridged(nats_url, "w-bad", "vllm") as (service, source):
        with capture_logs() as logs:
            await source.on_frames(frames("vllm_0_34_salt", 0))
            await source.on_frames(frames("vllm_0_33_lookahead", 1))
        await eventually(lambda: last_seq_is(service, "w-bad", 1))
        assert source.stats.skipped_events == {"unplaceable_identity": 1}
        skipped = [e for e in logs if e["event"] == "engine_event_skipped"]
        assert [(e["reason"], e["count"]) for e in skipped] == [("unplaceable_identity", 1)]
        info = await worker_info(service, "w-bad")
        assert info is not None and info.blocks_by_tier == {"gpu": 2}  # the salted two only
        assert await matched(service, PLAIN.query("w-bad")) == 0
        assert await matched(service, SALTED.query("w-bad")) == 2


async def test_hash_lookahead_stores_are_skipped_not_false_hits(nats_url: str) -> None:
    """A vLLM worker with hash lookahead (EAGLE) stores PROMPT's blocks 0-1, each engine
    hash covering the two tokens after the block, which a block key cannot. A prompt that
    differs from PROMPT only in block 0's lookahead tokens (4-5) would not reuse block 0 in
    the engine: it gets no hit from this worker (keyed by block 0's own tokens, the store
    gave it one). The store is left out and counted, said once (not per event); the removal
    of a block never indexed is a quiet unknown_block: the rank is not degraded and no
    resync is asked. The worker's stores without lookahead stay indexed."""
    async with bridged(nats_url, "w-eagle", "vllm") as (service, source):
        with capture_logs() as logs:
            await source.on_frames(frames("vllm_0_34_salt", 0))
            await source.on_frames(frames("vllm_0_34_lookahead", 1))
            await source.on_frames(frames("vllm_0_34_lookahead", 2))
        await eventually(lambda: last_seq_is(service, "w-eagle", 2))
        for prompt in ([*PROMPT[:4], 7, 7, *PROMPT[6:]], PROMPT[:8], PROMPT):
            query = ScoreQuery(token_ids=prompt, block_size=BS, model=MODEL,
                               workers=frozenset({"w-eagle"}))
            assert await matched(service, query) == 0, prompt
        assert await matched(service, SALTED.query("w-eagle")) == 2
        assert source.stats.skipped_events == {"hash_lookahead": 2}
        said = [e for e in logs if e["event"] == "engine_hash_lookahead"]
        assert len(said) == 1 and said[0]["log_level"] == "warning"
        assert "no prefix hits" in said[0]["hint"]
        info = await worker_info(service, "w-eagle")
        assert info is not None and info.blocks_by_tier == {"gpu": 2}  # the salted two only
        assert not info.degraded
        assert service.index is not None
        stats = await service.index.stats()
        assert stats.dropped == {"unknown_block": 2}  # the removals of LA2, never indexed
        assert (stats.resyncs_requested, service.stats.resyncs_requested) == (0, 0)
