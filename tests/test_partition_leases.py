"""Partition leases on a real JetStream KV bucket: each process takes its fair share, and a
member listing that comes back incomplete (nats-py's watcher can say "no more keys" before
its first delivery arrives) does not make a process take more than its share."""

from __future__ import annotations

import asyncio
from typing import Any

import nats
import pytest
from nats.js.kv import KeyValue

from indexer.ingest.partitions import LEASE_BUCKET, PartitionLeases
from tests.support.polling import eventually, is_true

pytestmark = pytest.mark.integration

PARTITIONS = 4


class EndedAtOnce:
    """A watcher whose "no more keys" comes before its deliveries, as in the race."""

    async def updates(self, timeout: float) -> None:
        return None

    async def stop(self) -> None:
        return None


class Hanging:
    """A watcher whose "no more keys" never comes."""

    async def updates(self, timeout: float) -> None:
        await asyncio.sleep(timeout)
        raise nats.errors.TimeoutError

    async def stop(self) -> None:
        return None


class FlakyListing:
    """A real KeyValue whose first `misses` listings go wrong as `watcher` does."""

    def __init__(self, kv: KeyValue, misses: int, watcher: Any = None) -> None:
        self._kv = kv
        self.misses = misses
        self.listings = 0
        self._watcher = watcher or EndedAtOnce()

    async def watchall(self, **kwargs: Any) -> Any:
        self.listings += 1
        if self.misses:
            self.misses -= 1
            return self._watcher
        return await self._kv.watchall(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._kv, name)


class Member:
    """One process's leases, recording which partitions it runs consumers for."""

    def __init__(self, js: Any, member_id: str) -> None:
        self.running: set[int] = set()
        self.doubled: list[int] = []  # partitions started while a consumer of it ran
        self.batch_done = asyncio.Event()  # a consumer being stopped finishes its batch
        self.batch_done.set()
        self.leases = PartitionLeases(js, PARTITIONS, start=self._start, stop=self._stop,
                                      member_id=member_id)

    async def _start(self, partition: int) -> None:
        if partition in self.running:
            self.doubled.append(partition)  # an assert here would only fail the tick
        self.running.add(partition)

    async def _stop(self, partition: int) -> None:
        await self.batch_done.wait()
        self.running.discard(partition)

    async def tick(self) -> None:
        await self.leases._tick_or_wait_out()


async def test_members_split_the_partitions(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        first, second = Member(nc.jetstream(), "a"), Member(nc.jetstream(), "b")
        await first.tick()  # alone: it takes every partition
        assert first.running == set(range(PARTITIONS))
        await second.tick()  # none free; its announcement lowers the first's share
        await first.tick()  # stops two consumers
        await first.tick()  # their leases handed back
        await second.tick()
        assert (len(first.running), len(second.running)) == (2, 2)
        assert first.running.isdisjoint(second.running)
    finally:
        await nc.close()


@pytest.mark.parametrize("misses", [1, 2])
async def test_an_incomplete_member_listing_is_asked_again(nats_url: str,
                                                           misses: int) -> None:
    nc = await nats.connect(nats_url)
    try:
        first, second = Member(nc.jetstream(), "a"), Member(nc.jetstream(), "b")
        await second.tick()  # makes the bucket; "b" is a member, alone it holds all four
        await second.leases.release_all()
        await second.leases._kv.put("m.b", b"1")  # type: ignore[union-attr]  # still one
        flaky = FlakyListing(await nc.jetstream().key_value(LEASE_BUCKET), misses)
        first.leases._kv = flaky  # type: ignore[assignment]
        await first.leases.tick()
        # Trusting the empty listing, it would count itself alone and take all four.
        assert first.leases.share == 2 and len(first.running) == 2
        assert flaky.listings == misses + 1
    finally:
        await nc.close()


async def test_a_listing_never_complete_counts_this_process(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        member = Member(nc.jetstream(), "a")
        await member.tick()  # makes the bucket
        flaky = FlakyListing(await nc.jetstream().key_value(LEASE_BUCKET), misses=10)
        member.leases._kv = flaky  # type: ignore[assignment]
        await member.leases.tick()
        assert member.leases.share == PARTITIONS and flaky.listings == 3
    finally:
        await nc.close()


async def test_a_listing_that_never_ends_fails_the_tick(nats_url: str) -> None:
    """The tick ends (failed, counted, tried again) instead of waiting for good; the
    leases were renewed first, so the consumers run on."""
    nc = await nats.connect(nats_url)
    try:
        member = Member(nc.jetstream(), "a")
        await member.tick()
        assert member.running == set(range(PARTITIONS))
        flaky = FlakyListing(await nc.jetstream().key_value(LEASE_BUCKET), misses=10,
                             watcher=Hanging())
        member.leases._kv = flaky  # type: ignore[assignment]
        for failures in (1, 2, 3):  # 3 x 2 s: past the TTL of 6 s
            renewed = member.leases.last_renewed
            await asyncio.wait_for(member.tick(), member.leases.ttl_s)
            assert member.leases.tick_failures == failures
            assert member.leases.last_renewed > renewed
        assert sorted(member.leases.held) == list(range(PARTITIONS))
        assert member.running == set(range(PARTITIONS))
    finally:
        await nc.close()


async def test_a_slow_stop_holds_the_lease_and_not_the_tick(nats_url: str) -> None:
    """A consumer finishing a long batch as its lease is handed back: ticks go on (every
    lease renewed: none expires under the consumers still running), the lease stays this
    process's until the consumer has stopped, and only then can another take it."""
    nc = await nats.connect(nats_url)
    try:
        first, second = Member(nc.jetstream(), "a"), Member(nc.jetstream(), "b")
        first.leases.ttl_s = second.leases.ttl_s = 1.0
        await first.tick()
        await second.tick()
        first.batch_done.clear()
        await asyncio.wait_for(first.tick(), 5)  # hands two back; their consumers stop
        assert sorted(first.leases.handing_back) == [2, 3]
        assert first.running == set(range(PARTITIONS))
        for _ in range(3):  # three TTLs: each lease is renewed, none is free to take
            await asyncio.sleep(first.leases.ttl_s / 2)
            await asyncio.wait_for(first.tick(), 5)
            await second.tick()
            assert not second.running and first.leases.tick_failures == 0
        first.batch_done.set()
        await eventually(lambda: is_true(first.running == {0, 1}))
        await first.tick()
        assert not first.leases.handing_back
        await second.tick()
        assert second.running == {2, 3}
        assert not first.doubled and not second.doubled
    finally:
        await nc.close()


async def test_a_lost_lease_is_not_taken_again_while_its_consumer_stops(
        nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        member = Member(nc.jetstream(), "a")
        await member.tick()
        kv = await nc.jetstream().key_value(LEASE_BUCKET)
        await kv.delete("p.0")  # gone from under it (an operator, a NATS restore)
        member.batch_done.clear()
        # lost, its consumer stopping; the free lease not taken yet
        await asyncio.wait_for(member.tick(), 5)
        assert 0 not in member.leases.held and 0 in member.running
        member.batch_done.set()
        await eventually(lambda: is_true(0 not in member.running))
        await member.tick()
        assert 0 in member.leases.held and 0 in member.running and not member.doubled
    finally:
        await nc.close()


async def test_shutdown_renews_leases_while_consumers_finish(nats_url: str) -> None:
    """release_all waits for each consumer's batch in hand; its leases stay renewed
    meanwhile (no other process starts on a partition still being consumed), then are
    handed back."""
    nc = await nats.connect(nats_url)
    try:
        first, second = Member(nc.jetstream(), "a"), Member(nc.jetstream(), "b")
        first.leases.ttl_s = second.leases.ttl_s = 1.0
        await first.tick()
        first.batch_done.clear()
        closing = asyncio.ensure_future(first.leases.release_all())
        for _ in range(6):  # three TTLs
            await asyncio.sleep(0.5)
            await second.tick()
            assert not second.running and not closing.done()
        first.batch_done.set()
        await asyncio.wait_for(closing, 5)
        assert not first.running
        await second.tick()
        assert second.running == set(range(PARTITIONS))
    finally:
        await nc.close()


async def test_unrenewed_leases_stop_their_consumers_before_the_ttl(nats_url: str) -> None:
    """Ticks failing for half a TTL: every consumer is told to stop, those handed back
    too, while the leases may still be ours (they expire only at a whole TTL)."""
    nc = await nats.connect(nats_url)
    try:
        member = Member(nc.jetstream(), "a")
        await member.tick()
        member.leases.handing_back[3] = member.leases.held.pop(3)
        member.leases._stopping(3)
        member.leases._kv = FlakyListing(  # type: ignore[assignment]
            await nc.jetstream().key_value(LEASE_BUCKET), misses=10, watcher=Hanging())
        member.leases.last_renewed -= member.leases.ttl_s / 2
        member.leases._renew = _failing  # type: ignore[method-assign]
        await member.tick()
        assert not member.leases.held and not member.leases.handing_back
        assert not member.leases.all_taken
        await eventually(lambda: is_true(not member.running))
        assert not member.doubled
    finally:
        await nc.close()


async def _failing(_kv: object) -> None:
    raise nats.errors.TimeoutError
