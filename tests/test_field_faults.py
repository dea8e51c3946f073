"""Faults at production sizes, end to end with real servers: a NATS outage of tens of
seconds under a fleet holding ~90,000 blocks, Redis going away, ingest stalling. Each case
ends with the index equal to the reference model block by block, and gRPC health told the
truth while things were broken."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from indexer.app import IndexerService
from indexer.embedded import EmbeddedNats
from indexer.errors import BackendError
from indexer.index.protocol import ApplyOutcome, Index
from indexer.index.redis import RedisIndex
from indexer.ingest.consumer import marker_is_rebuilding, marker_name
from kvcore.bus import EventBatch
from kvcore.topology import StreamSettings
from tests.support.capture import caught_up, mismatches
from tests.support.chain_fleet import ChainFleet
from tests.support.event_path import running_service, service_config
from tests.support.polling import eventually, is_true
from tests.support.processes import IndexerProcess
from tests.support.servers import RedisServer, free_port

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

MODEL = "field/model"
# `make chaos` runs the long variants: KV_CHAOS_OUTAGE_S=60, KV_CHAOS_WORKERS=16
WORKERS = int(os.environ.get("KV_CHAOS_WORKERS", "8"))
PARTITIONS = 4
BS = 16
CHAIN = 50  # blocks per stored chain: one bus batch
SHARED_CHAINS = 10  # chains every worker holds with the same tokens (a common system prompt)
OUTAGE_S = float(os.environ.get("KV_CHAOS_OUTAGE_S", "15"))
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def chain_fleet(nats_url: str) -> ChainFleet:
    """WORKERS library publishers storing and removing whole chains (the first
    SHARED_CHAINS shared by all), every batch recorded."""
    return ChainFleet(nats_url, MODEL, workers=WORKERS, block_size=BS, chain=CHAIN,
                      shared=SHARED_CHAINS,
                      stream=StreamSettings(partitions=PARTITIONS, liveness_ttl_s=3.0))


async def health(port: int) -> int:
    """The status gRPC health answers for the whole server ("")."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=2.0)
        return int(reply.status)


async def health_is(port: int, status: int) -> bool:
    try:
        return await health(port) == status
    except grpc.aio.AioRpcError:
        return False


def indexer(nats_url: str, redis_url: str | None,
            **overrides: object) -> AbstractAsyncContextManager[IndexerService]:
    return running_service(service_config(
        nats_url, redis_url=redis_url, grpc_listen="127.0.0.1:0", partitions=PARTITIONS,
        liveness_grace_s=3600.0, **overrides))


@asynccontextmanager
async def fleet_on_private_servers(
        backend: str, tmp_path: Path) -> AsyncIterator[tuple[EmbeddedNats, str | None, ChainFleet]]:
    """A private nats-server (to kill and restart), a private redis-server for the Redis
    backend, and the fleet on that NATS; all stopped at the end."""
    nats_server = EmbeddedNats(tmp_path / "nats", port=free_port()).start()
    redis_server = RedisServer(tmp_path / "redis").start() if backend == "redis" else None
    fleet = chain_fleet(nats_server.url)
    try:
        yield nats_server, redis_server.url if redis_server else None, fleet
    finally:
        await fleet.close()
        if redis_server is not None:
            redis_server.stop()
        nats_server.stop()


async def ends_exact(service: IndexerService, fleet: ChainFleet, back_at: float, what: str) -> None:
    """The index catches up with everything the fleet published, health says SERVING, and
    the index equals the reference block by block (more than 10,000 blocks a worker)."""
    assert service.index is not None
    await eventually(lambda: caught_up(service.index, fleet.published, MODEL), 120)
    caught_up_s = time.monotonic() - back_at
    await eventually(lambda: health_is(service.grpc_port, SERVING), 30)

    # A rank whose batches all arrived may still wait for the resync its gap asked for
    # (positions equal, blocks missing until the publisher's answer is applied).
    async def exact() -> bool:
        assert service.index is not None
        return (await caught_up(service.index, fleet.published, MODEL)
                and await mismatches(service.index, fleet.published, MODEL) == (0, 0, 0))

    with suppress(AssertionError):
        await eventually(exact, 60)
    phantom, missing, differing = await mismatches(service.index, fleet.published, MODEL)
    blocks = sum(sum(w.blocks_by_tier.values()) for w in await service.index.workers(MODEL))
    print(f"\n{what}: {len(fleet.published)} batches, {blocks} (block, worker) entries, "
          f"caught up {caught_up_s:.1f} s after NATS returned, "
          f"phantom={phantom} missing={missing} differing={differing}")
    assert blocks > 10_000 * WORKERS
    assert (phantom, missing, differing) == (0, 0, 0)


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_a_long_nats_outage_ends_exact(backend: str, tmp_path: Path) -> None:
    """NATS SIGKILLed for 15 s while 8 workers holding ~10,000 blocks each keep storing
    and removing: health says NOT_SERVING during the outage, ingest resumes when NATS is
    back (the lease loop survives with Redis), and the index ends equal to the reference
    with 0 phantom and 0 missing blocks."""
    async with (fleet_on_private_servers(backend, tmp_path) as (nats_server, redis_url, fleet),
                indexer(nats_server.url, redis_url) as service):
        assert service.index is not None
        await fleet.start()
        fleet.store(range(200))
        fleet.remove(range(150, 170))
        await fleet.flush()
        await eventually(lambda: caught_up(service.index, fleet.published, MODEL), 120)
        assert await health(service.grpc_port) == SERVING

        nats_server.kill()
        down_at = time.monotonic()
        fleet.store(range(200, 260))  # buffered by the publishers meanwhile
        fleet.remove(range(5), workers=range(0, WORKERS, 2))
        await eventually(lambda: health_is(service.grpc_port, NOT_SERVING), OUTAGE_S)
        await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))
        nats_server.start()
        back_at = time.monotonic()
        await fleet.flush()
        await ends_exact(service, fleet, back_at,
                         f"nats outage ({backend}): {OUTAGE_S:.0f} s down")
        if service.leases is not None:
            assert service.leases.held  # taken again after the outage


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_nats_back_without_its_data_ends_exact(backend: str, tmp_path: Path) -> None:
    """NATS SIGKILLed and started again on an empty store (a fresh volume): no event
    stream, no buckets, no consumers. 8 workers holding 10,000 blocks each keep storing
    and removing. The indexer re-creates the topology, its partitions rebuild from the new
    stream, the gaps there ask every worker for a resync, and the index ends exact. Before
    this, publishers and consumers waited for a stream nobody made again, for good."""
    async with (fleet_on_private_servers(backend, tmp_path) as (nats_server, redis_url, fleet),
                indexer(nats_server.url, redis_url) as service):
        assert service.index is not None
        await fleet.start()
        fleet.store(range(200))
        await fleet.flush()
        await eventually(lambda: caught_up(service.index, fleet.published, MODEL), 120)

        nats_server.kill()
        shutil.rmtree(nats_server.data_dir / "jetstream")
        fleet.store(range(200, 230))  # buffered by the publishers meanwhile
        fleet.remove(range(10), workers=range(0, WORKERS, 2))
        await asyncio.sleep(3)
        nats_server.start()
        back_at = time.monotonic()
        await fleet.flush()
        fleet.store(range(230, 240))
        await fleet.flush()
        await ends_exact(service, fleet, back_at, f"nats back without its data ({backend})")
        assert service.stats.topology_restores >= 1


async def test_health_follows_the_redis_backend(nats_url: str, tmp_path: Path) -> None:
    """Redis gone: NOT_SERVING (every query would fail); back: SERVING again."""
    redis_server = RedisServer(tmp_path / "redis").start()
    try:
        async with indexer(nats_url, redis_server.url) as service:
            await eventually(lambda: health_is(service.grpc_port, SERVING), 20)
            redis_server.kill()
            await eventually(lambda: health_is(service.grpc_port, NOT_SERVING), 20)
            assert service.probes is not None and not service.probes.backend_up
            redis_server.start()
            await eventually(lambda: health_is(service.grpc_port, SERVING), 30)
    finally:
        redis_server.stop()


async def test_health_says_when_ingest_stalls(nats_url: str, tmp_path: Path) -> None:
    """Writes paused in Redis (CLIENT PAUSE WRITE) while batches wait in the stream: after
    --ingest-stall seconds without progress health says NOT_SERVING and names the
    partition; once writes resume the batches are applied and health is SERVING again."""
    redis_server = RedisServer(tmp_path / "redis").start()
    fleet = chain_fleet(nats_url)
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        async with indexer(nats_url, redis_server.url, ingest_stall_s=2.0) as service:
            assert service.index is not None
            await fleet.start()
            fleet.store(range(2))
            await fleet.flush()
            await eventually(lambda: caught_up(service.index, fleet.published, MODEL), 60)
            await eventually(lambda: health_is(service.grpc_port, SERVING), 20)
            await client.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")
            fleet.store(range(2, 40))
            await fleet.flush()
            await eventually(lambda: health_is(service.grpc_port, NOT_SERVING), 9)
            assert service.health is not None
            assert any("ingest stalled" in r for r in service.health.reasons)
            await client.execute_command("CLIENT", "UNPAUSE")
            await eventually(lambda: caught_up(service.index, fleet.published, MODEL), 60)
            await eventually(lambda: health_is(service.grpc_port, SERVING), 20)
            assert await mismatches(service.index, fleet.published, MODEL) == (0, 0, 0)
    finally:
        await client.aclose()
        await fleet.close()
        redis_server.stop()


def forged(model: str, worker: str, **fields: object) -> bytes:
    """A batch payload as an attacker or a broken publisher would send it: msgpack of any
    field values, not limited by EventBatch's types."""
    import msgspec

    body: dict[str, object] = {"schema": 1, "model": model, "worker_id": worker, "epoch": 1,
                               "seq": 0, "events": [{"type": "cleared"}], "dp_rank": 0}
    body.update(fields)
    return msgspec.msgpack.encode(body)


# (subject's worker, payload, dead-letter reason): each is refused, counted, and costs
# nobody else anything
FORGERIES: list[tuple[str, bytes, str]] = [
    ("mallory", forged(MODEL, "m" * 100_000), "undecodable"),
    ("mallory", forged(MODEL, "mallory", dp_rank=2**40), "undecodable"),
    ("mallory", forged(MODEL, "mallory", seq=2**64 - 1), "undecodable"),
    ("mallory", forged(MODEL, "mallory", epoch=2**64 - 1), "undecodable"),
    ("mallory", forged(MODEL, "mallory", ts=float("nan")), "undecodable"),
    ("mallory", forged(MODEL, "mallory", events=[{"type": "stored", "block_hashes": [1],
                                                  "medium": "x" * 10_000}]), "undecodable"),
    # the victim's identity in the payload, on the attacker's own subject
    ("mallory", forged(MODEL, "w0", epoch=2**63 - 1), "identity_mismatch"),
    ("mallory", forged(MODEL, "w1", seq=2**62), "identity_mismatch"),
    ("mallory", forged("other/model", "w2"), "identity_mismatch"),
    # its own identity, an epoch from the far future
    ("mallory", forged(MODEL, "mallory", epoch=2**63 - 1), "epoch_in_future"),
    # a batch time from the far future (pools' newest-wins order, the model's freshness)
    ("mallory", forged(MODEL, "mallory", ts=1e308), "ts_in_future"),
]


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_forged_batches_cost_nobody_anything(backend: str, nats_url: str,
                                                   tmp_path: Path) -> None:
    """Out-of-range and forged batches published between 8 workers' traffic (sharing
    their fetches) are dead-lettered with their reasons; every honest worker ends exact,
    with no gap and no resync."""
    import nats

    from kvcore.bus import subject_for

    redis_server = RedisServer(tmp_path / "redis").start() if backend == "redis" else None
    fleet = chain_fleet(nats_url)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    try:
        async with indexer(nats_url, redis_server and redis_server.url) as service:
            assert service.index is not None
            await fleet.start()
            for round_ in range(len(FORGERIES)):
                fleet.store(range(round_ * 10, round_ * 10 + 10))
                worker, payload, _ = FORGERIES[round_]
                await js.publish(subject_for(MODEL, worker), payload,
                                 headers={"Nats-Msg-Id": f"forged-{round_}"})
            await fleet.flush()
            await eventually(lambda: caught_up(service.index, fleet.published, MODEL), 120)
            expected: dict[str, int] = {}
            for _, _, reason in FORGERIES:
                expected[reason] = expected.get(reason, 0) + 1
            await eventually(lambda: equals_dict(service.stats.dead_letters, expected), 30)
            assert await mismatches(service.index, fleet.published, MODEL) == (0, 0, 0)
            assert (service.stats.gaps, service.stats.resyncs_requested) == (0, 0)
            workers = {w.worker_id for w in await service.index.workers(MODEL)}
            assert workers == {f"w{w}" for w in range(WORKERS)}  # mallory never got in
    finally:
        await nc.close()
        await fleet.close()
        if redis_server is not None:
            redis_server.stop()


async def equals_dict(got: dict[str, int], want: dict[str, int]) -> bool:
    return got == want


async def test_a_wild_seq_is_a_gap_not_a_high_water_mark(nats_url: str) -> None:
    """A rank's batch 2^40 seqs ahead is not applied (it would make every real batch
    after it a duplicate): it counts as a gap and asks for a resync, and the rank's next
    real batch still applies."""
    import nats

    from kvcore.bus import (
        SCHEMA_VERSION,
        BlockStored,
        EventBatch,
        encode_batch,
        pack_tokens,
        subject_for,
    )

    def batch(seq: int, block: int) -> bytes:
        return encode_batch(EventBatch(
            schema=SCHEMA_VERSION, model=MODEL, worker_id="solo", epoch=1, seq=seq,
            events=[BlockStored(block_hashes=[block], parent_hash=block - 1 or None,
                                token_ids=pack_tokens(range(block * BS, (block + 1) * BS)),
                                block_size=BS)]))

    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    try:
        async with indexer(nats_url, None) as service:
            assert service.index is not None
            for i, seq in enumerate((0, 1 << 40, 1)):
                await js.publish(subject_for(MODEL, "solo"), batch(seq, i + 1),
                                 headers={"Nats-Msg-Id": f"solo-{i}"})
            index = service.index

            async def at_seq_one() -> bool:
                return [w.last_seq for w in await index.workers(MODEL)] == [1]

            await eventually(at_seq_one, 30)
            assert service.stats.gaps == 1
            assert (await index.stats()).dropped.get("seq_jump") == 1
    finally:
        await nc.close()


async def test_a_batch_the_index_raises_on_costs_only_itself(nats_url: str) -> None:
    """Should a well-formed batch still make the index raise (a bug, not an outage), the
    fetch is applied batch by batch: that batch alone is dead-lettered (apply_failed),
    the other workers' batches of the same fetches are applied, none is lost."""
    import nats

    from kvcore.bus import SCHEMA_VERSION, AllBlocksCleared, encode_batch, subject_for

    fleet = chain_fleet(nats_url)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    try:
        async with indexer(nats_url, None) as service:
            assert service.index is not None
            real_apply = service.index.apply

            async def apply(batches: list[EventBatch], *,
                            validated: bool = False) -> list[ApplyOutcome]:
                if any(b.worker_id == "poison" for b in batches):
                    raise ValueError("a bug the index trips on")
                return await real_apply(batches, validated=validated)

            service.index.apply = apply  # type: ignore[method-assign]
            await fleet.start()
            for seq in range(5):
                fleet.store(range(seq * 10, seq * 10 + 10))
                payload = encode_batch(EventBatch(schema=SCHEMA_VERSION, model=MODEL,
                                                  worker_id="poison", epoch=1, seq=seq,
                                                  events=[AllBlocksCleared()]))
                await js.publish(subject_for(MODEL, "poison"), payload,
                                 headers={"Nats-Msg-Id": f"poison-{seq}"})
            await fleet.flush()
            await eventually(lambda: caught_up(service.index, fleet.published, MODEL), 120)
            await eventually(lambda: equals_dict(service.stats.dead_letters,
                                                 {"apply_failed": 5}), 30)
            assert await mismatches(service.index, fleet.published, MODEL) == (0, 0, 0)
            # each refused batch is a gap of its own rank (a resync is asked of it), and
            # of no other
            assert service.stats.gaps == 5
    finally:
        await nc.close()
        await fleet.close()


async def test_a_poison_message_at_the_size_limit_is_dead_lettered(tmp_path: Path) -> None:
    """Garbage that just fits the server's max_payload: its dead-letter copy (with its
    reason headers) would not, so the copy is cut and says so; the consumer's connection
    survives and the next batch is applied."""
    import nats

    from kvcore.bus import DEAD_LETTER_SUBJECT, subject_for
    from kvcore.topology import DEAD_LETTER_STREAM

    limit = 64 * 1024
    nats_server = EmbeddedNats(tmp_path / "nats", max_payload=limit).start()
    fleet = chain_fleet(nats_server.url)
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    try:
        async with indexer(nats_server.url, None) as service:
            assert service.index is not None
            await js.publish(subject_for(MODEL, "w0"), b"\xc1" * (limit - 300),
                             headers={"Nats-Msg-Id": "big-poison"})
            await fleet.start()
            fleet.store(range(3))
            await fleet.flush()
            await eventually(lambda: caught_up(service.index, fleet.published, MODEL), 60)
            assert service.stats.dead_letters == {"undecodable": 1}
            copy = await js.get_last_msg(DEAD_LETTER_STREAM, f"{DEAD_LETTER_SUBJECT}.undecodable")
            assert copy.headers is not None
            assert copy.headers["Kv-Truncated-From"] == str(limit - 300)
            assert copy.data is not None and len(copy.data) < limit - 300
    finally:
        await nc.close()
        await fleet.close()
        nats_server.stop()


async def test_redis_restored_from_an_older_dump_invents_nothing(
        nats_url: str, tmp_path: Path) -> None:
    """Redis comes back from an RDB taken before a round of removals (a restore, or a
    lagging replica promoted) under a running indexer: its partition markers still match,
    but the index is behind what the stream acknowledged, so the consumer rebuilds the
    partitions within a check interval. 0 phantom blocks."""
    redis_server = RedisServer(tmp_path / "redis").start()
    client = aioredis.Redis.from_url(redis_server.url)
    fleet = chain_fleet(nats_url)
    try:
        async with indexer(nats_url, redis_server.url) as service:
            assert service.index is not None
            await fleet.start()
            await behind_the_stream(fleet, service.index, client, redis_server, tmp_path)
            rebuilds = service.stats.rebuilds
            await eventually(lambda: is_true(service.stats.rebuilds > rebuilds))
            await eventually(lambda: caught_up(service.index, fleet.published, MODEL), 120)
            await eventually(lambda: health_is(service.grpc_port, SERVING), 30)
            counts = await mismatches(service.index, fleet.published, MODEL)
            print(f"\nredis restored from an older dump under a running indexer: "
                  f"phantom, missing, differing = {counts}")
            assert counts == (0, 0, 0)
    finally:
        await client.aclose()
        await fleet.close()
        redis_server.stop()


async def test_a_restore_between_an_apply_and_its_position_write_loses_nothing(
        nats_url: str, tmp_path: Path) -> None:
    """The race of the test above, made to happen every time: a fetch holding each
    worker's last batch (2,000 removals) is applied, then Redis comes back from a dump
    taken after the last position write and before that apply, and the position write
    that follows fails once. The position alone cannot show the lost apply, and no later
    batch of those workers would show a gap: the consumer applies the fetch again after
    the failure, and the index ends with 0 phantom blocks."""
    redis_server = RedisServer(tmp_path / "redis").start()
    client = aioredis.Redis.from_url(redis_server.url)
    fleet = chain_fleet(nats_url)
    try:
        async with indexer(nats_url, redis_server.url) as service:
            index = service.index
            assert isinstance(index, RedisIndex)
            await fleet.start()
            dump = await indexed_and_dumped(fleet, index, client, tmp_path)
            set_marker = index.set_marker
            restored: list[str] = []

            async def restore_then_fail(name: str, value: str | None) -> None:
                if name.startswith("position.") and not restored:
                    restored.append(name)
                    restore_from(redis_server, dump, tmp_path)
                    raise BackendError("injected: redis restored from an older dump")
                await set_marker(name, value)

            index.set_marker = restore_then_fail  # type: ignore[method-assign]
            for w, pub in enumerate(fleet.pubs):  # one batch per worker, its last
                pub.removed([h for chain in range(40) for h in fleet.chain_hashes(w, chain)])
                pub.end_step()
            await fleet.flush()
            await eventually(lambda: is_true(bool(restored)), 30)
            await eventually(lambda: caught_up(index, fleet.published, MODEL), 60)
            counts = await mismatches(index, fleet.published, MODEL)
            print(f"\nrestore between an apply and its position write ({restored[0]}): "
                  f"phantom, missing, differing = {counts}")
            assert counts == (0, 0, 0)
    finally:
        await client.aclose()
        await fleet.close()
        redis_server.stop()


async def test_an_indexer_starting_on_an_older_dump_rebuilds(nats_url: str,
                                                             tmp_path: Path) -> None:
    """The same restore while the indexer was down (SIGKILLed: no snapshot, no new marker
    on the way out): the one that starts finds the index behind the stream's ack floor
    and rebuilds. 0 phantom blocks."""
    redis_server = RedisServer(tmp_path / "redis").start()
    client = aioredis.Redis.from_url(redis_server.url)
    fleet = chain_fleet(nats_url)
    child = IndexerProcess(nats_url, redis_server.url, tmp_path, partitions=PARTITIONS)
    index = RedisIndex.from_url(redis_server.url)
    try:
        child.start()
        await fleet.start()
        await behind_the_stream(fleet, index, client, redis_server, tmp_path,
                                while_down=child)
        await index.reset_caches()
        await eventually(lambda: caught_up(index, fleet.published, MODEL), 120)
        counts = await mismatches(index, fleet.published, MODEL)
        print(f"\nredis restored from an older dump, indexer SIGKILLed and restarted: "
              f"phantom, missing, differing = {counts}")
        assert counts == (0, 0, 0)
        assert "index behind the stream" in "".join(
            log.read_text() for log in tmp_path.glob("indexer-*.log"))
    finally:
        child.stop()
        await index.close()
        await client.aclose()
        await fleet.close()
        redis_server.stop()


async def indexed_and_dumped(fleet: ChainFleet, index: Index, client: aioredis.Redis,
                             tmp_path: Path) -> Path:
    """Index 5,000 blocks per worker, wait until every partition's first rebuild has
    finished, and copy Redis's dump of that state aside; its path."""
    fleet.store(range(100))
    await fleet.flush()
    await eventually(lambda: caught_up(index, fleet.published, MODEL), 120)

    async def trusted() -> bool:
        return not any([marker_is_rebuilding(await index.get_marker(marker_name(p)))
                        for p in range(PARTITIONS)])

    await eventually(trusted, 30)
    await client.save()
    dump = tmp_path / "old-dump.rdb"
    shutil.copy(tmp_path / "redis" / "dump.rdb", dump)
    return dump


def restore_from(redis_server: RedisServer, dump: Path, tmp_path: Path) -> None:
    """Redis SIGKILLed and started again from `dump`."""
    redis_server.kill()
    shutil.copy(dump, tmp_path / "redis" / "dump.rdb")
    redis_server.start()


async def behind_the_stream(fleet: ChainFleet, index: Index, client: aioredis.Redis,
                            redis_server: RedisServer, tmp_path: Path, *,
                            while_down: IndexerProcess | None = None) -> None:
    """Index 5,000 blocks per worker, dump Redis, remove 2,000 of them per worker and add
    1,000, then bring Redis back from the dump (with `while_down` killed meanwhile)."""
    dump = await indexed_and_dumped(fleet, index, client, tmp_path)
    fleet.remove(range(40))
    fleet.store(range(100, 120))
    await fleet.flush()
    await eventually(lambda: caught_up(index, fleet.published, MODEL), 120)
    if while_down is not None:
        while_down.kill()
    restore_from(redis_server, dump, tmp_path)
    if while_down is not None:
        while_down.start()




async def test_redis_starting_second_is_waited_for(nats_url: str, tmp_path: Path) -> None:
    """The indexer starts while its Redis is not up yet (a pod scheduled first): it does
    not exit, says NOT_SERVING, and serves and ingests once Redis is there."""
    redis_server = RedisServer(tmp_path / "redis", port=free_port())
    fleet = chain_fleet(nats_url)
    try:
        async with indexer(nats_url, redis_server.url) as service:
            assert service.index is not None
            await eventually(lambda: health_is(service.grpc_port, NOT_SERVING), 20)
            await fleet.start()
            fleet.store(range(5))
            await fleet.flush()
            redis_server.start()
            await eventually(lambda: caught_up(service.index, fleet.published, MODEL), 60)
            await eventually(lambda: health_is(service.grpc_port, SERVING), 30)
            assert await mismatches(service.index, fleet.published, MODEL) == (0, 0, 0)
    finally:
        await fleet.close()
        redis_server.stop()
