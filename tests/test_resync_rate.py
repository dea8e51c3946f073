"""Resync requests are rate-limited per rank: a publisher answers at most one per
interval with a full resync, counts the others (replies, stats, /metrics) and merges them
into one resync at the end of the interval. With a real nats-server."""

from __future__ import annotations

import asyncio
import types

import msgspec
import nats
import pytest
from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import publisher.publisher as publisher_module
from indexer.index.protocol import ResyncRequest
from indexer.ingest.consumer import ConsumerStats, ResyncRequester
from kvcore.topology import StreamSettings, ensure_stream, resync_subject
from publisher.metrics import BridgeCollector
from publisher.nats_sink import NatsSink
from publisher.publisher import KVEventPublisher, RankPublisher
from tests.support.polling import eventually, is_true

pytestmark = pytest.mark.integration

MODEL = "trust/model"
WORKER_A = "worker-a:8000"
BS = 4


def store(pub: KVEventPublisher, first: int, count: int) -> None:
    pub.stored(list(range(first, first + count)), list(range(first * BS, (first + count) * BS)))
    pub.end_step()


async def test_resync_requests_are_rate_limited_per_rank(nats_url: str) -> None:
    """Ten resync requests in quick succession: the first is answered with a resync, the
    nine others are counted as rate-limited (replies say so, and so do the publisher's
    metrics); the stream holds one resync."""
    nc = await nats.connect(nats_url)
    pub = KVEventPublisher(MODEL, WORKER_A, block_size=BS, nats_url=nats_url,
                           resync_min_interval_s=3600.0)  # the merged one never comes here
    try:
        await ensure_stream(nc.jetstream(), StreamSettings())
        await pub.start()
        store(pub, 0, 5)
        assert await pub.flush(30)
        published = pub.sink.stats.published if pub.sink else 0
        replies = []
        for _ in range(10):
            reply = await nc.request(resync_subject(MODEL, WORKER_A),
                                     msgspec.json.encode({"dp_rank": 0, "reason": "flood"}),
                                     timeout=10.0)
            replies.append(msgspec.json.decode(reply.data))
        assert await pub.flush(30)

        assert replies[0] == {"ok": True}  # a resync is queued
        assert all(r["rate_limited"] and r["resync_in_s"] > 0 for r in replies[1:])
        rank = pub.ranks[0]
        assert (rank.resyncs, rank.resync_requests, rank.resync_requests_limited) == (1, 10, 9)
        assert pub.sink is not None and pub.sink.stats.published == published + 1  # 1 batch
        registry = CollectorRegistry()
        registry.register(BridgeCollector(pub))
        samples = {(s.name, s.labels.get("outcome")): s.value
                   for family in text_string_to_metric_families(
                       generate_latest(registry).decode())
                   for s in family.samples if s.labels.get("worker") == WORKER_A}
        assert samples[("kv_publisher_resync_requests_total", "answered")] == 1
        assert samples[("kv_publisher_resync_requests_total", "rate_limited")] == 9
        assert samples[("kv_publisher_resyncs_total", None)] == 1
    finally:
        await pub.close()
        await nc.close()


class _Clock:
    """time for the publisher module, with a monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def namespace(self) -> types.SimpleNamespace:
        import time as real

        return types.SimpleNamespace(monotonic=lambda: self.now, time=real.time,
                                     perf_counter=real.perf_counter, time_ns=real.time_ns)


async def test_rate_limited_requests_merge_into_one_resync(
        nats_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests within the interval are not lost: however many, they become one resync
    when the interval since the last one is over, and none before."""
    clock = _Clock()
    monkeypatch.setattr(publisher_module, "time", clock.namespace())
    nc = await nats.connect(nats_url)
    try:
        rank = RankPublisher(MODEL, WORKER_A, 0, NatsSink(nc.jetstream(), nc=nc))
        assert rank.resync_requested("gap", 5.0) == 0.0
        assert rank.resyncs == 1
        for i in range(9):
            clock.now = 1000.1 + i * 0.1
            assert rank.resync_requested("gap", 5.0) > 0
        assert (rank.resyncs, rank.resync_requests_limited) == (1, 9)
        clock.now = 1004.99
        rank.tick()
        assert rank.resyncs == 1
        clock.now = 1005.0
        rank.tick()
        assert rank.resyncs == 2  # the nine, merged
        clock.now = 1100.0
        rank.tick()
        assert rank.resyncs == 2
        assert rank.resync_requested("gap", 5.0) == 0.0  # a new window: answered at once
        assert rank.resyncs == 3
    finally:
        await nc.close()


async def test_an_unanswered_resync_request_is_sent_again(nats_url: str) -> None:
    """The indexer asks for a resync while the worker's publisher is not subscribed (it is
    reconnecting): the request is repeated until the publisher, back after ~1.5 s, gets it
    and answers; then no more repeats. A rank nobody ever answers for is given up after
    the last retry and counted."""
    nc = await nats.connect(nats_url)
    try:
        stats = ConsumerStats()
        requester = ResyncRequester(nc, 0.0, stats, retry_delays_s=(0.5,) * 8, timeout_s=0.3)
        requester.request(ResyncRequest(MODEL, WORKER_A, 3, 7, "sequence_gap"))
        await asyncio.sleep(1.5)
        received: list[dict[str, object]] = []

        async def answer(msg: Msg) -> None:
            received.append(msgspec.json.decode(msg.data))
            await msg.respond(b'{"ok": true}')

        sub = await nc.subscribe(resync_subject(MODEL, WORKER_A), cb=answer)
        await eventually(lambda: is_true(bool(received)), 10)
        await asyncio.sleep(1.5)  # a repeat would come within 0.8 s
        await sub.unsubscribe()
        assert received == [{"dp_rank": 3, "epoch": 7, "reason": "sequence_gap"}]
        assert 1 <= stats.resync_retries <= 4
        assert stats.resyncs_unanswered == 0

        nobody = ResyncRequester(nc, 0.0, stats, retry_delays_s=(0.1, 0.1), timeout_s=0.2)
        nobody.request(ResyncRequest(MODEL, "worker-gone:1", 0, 1, "sequence_gap"))
        await eventually(lambda: is_true(stats.resyncs_unanswered == 1), 10)
    finally:
        await nc.close()
