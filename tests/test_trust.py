"""Per-worker authorization on the bus, with a real nats-server run from the config
`kv-indexer nats-auth` prints: a worker's publisher, authenticated as its own user, is
indexed end to end by an indexer authenticated as the indexer's user; the same worker can
neither publish as another worker, nor touch another's liveness entry, nor ask another for
a resync."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client as NatsClient

from indexer.app import IndexerService
from indexer.config import ServiceConfig
from indexer.index.protocol import ResyncRequest
from indexer.ingest.recovery import request_rebuild
from indexer.nats_auth import DEFAULT_INDEXER_USER, worker_user_name
from indexer.nats_auth import main as nats_auth_main
from kvcore.bus import (
    SCHEMA_VERSION,
    STREAM_NAME,
    BlockStored,
    EventBatch,
    encode_batch,
    pack_tokens,
    subject_for,
)
from kvcore.topology import (
    LIVENESS_BUCKET,
    PARTITION_PREFIX,
    StreamSettings,
    WorkerRecord,
    liveness_key,
    resync_subject,
    worker_inbox_prefix,
)
from publisher.publisher import KVEventPublisher, new_epoch
from tests.support.polling import eventually, is_true
from tests.support.servers import ConfiguredNats, RedisServer

pytestmark = pytest.mark.integration

MODEL = "trust/model"
WORKER_A = "worker-a:8000"
WORKER_B = "worker-b:8000"
PARTITIONS = 2
BS = 4


@dataclass
class AuthFleet:
    """The nats-server with generated users, and everyone's password."""

    server: ConfiguredNats
    passwords: Path

    def url(self, user: str) -> str:
        return self.server.url(user, (self.passwords / user).read_text().strip())

    def worker_url(self, worker: str) -> str:
        return self.url(worker_user_name(MODEL, worker))

    @property
    def indexer_url(self) -> str:
        return self.url(DEFAULT_INDEXER_USER)

    def violations(self) -> list[str]:
        return [line for line in self.server.log_text().splitlines()
                if "Violation" in line or "authentication error" in line]


@pytest.fixture
def auth_fleet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[AuthFleet]:
    """A nats-server whose users are what `kv-indexer nats-auth` prints for workers A, B."""
    passwords = tmp_path / "passwords"
    assert nats_auth_main(["--worker", MODEL, WORKER_A, "--worker", MODEL, WORKER_B,
                           "--password-dir", str(passwords)]) == 0
    config = capsys.readouterr().out
    server = ConfiguredNats(tmp_path / "nats", config).start()
    yield AuthFleet(server, passwords)
    server.stop()


@asynccontextmanager
async def indexer(url: str, redis_url: str | None = None) -> AsyncIterator[IndexerService]:
    service = IndexerService(ServiceConfig(
        nats_url=url, redis_url=redis_url, grpc_listen="", metrics_listen="",
        partitions=PARTITIONS, liveness_ttl_s=3.0, liveness_grace_s=3600.0,
        snapshot_every_batches=1, snapshot_every_s=0.2))
    await service.start()
    try:
        yield service
    finally:
        await service.close()


@asynccontextmanager
async def worker(fleet: AuthFleet, worker_id: str) -> AsyncIterator[KVEventPublisher]:
    pub = KVEventPublisher(MODEL, worker_id, block_size=BS, nats_url=fleet.worker_url(worker_id),
                           stream=StreamSettings(partitions=PARTITIONS, liveness_ttl_s=3.0))
    await pub.start()
    try:
        yield pub
    finally:
        await pub.close()


def store(pub: KVEventPublisher, first: int, count: int) -> None:
    pub.stored(list(range(first, first + count)), list(range(first * BS, (first + count) * BS)))
    pub.end_step()


async def gpu_blocks(service: IndexerService, worker_id: str) -> int:
    assert service.index is not None
    return sum(w.blocks_by_tier.get("gpu", 0) for w in await service.index.workers(MODEL)
               if w.worker_id == worker_id)


@dataclass
class Intruder:
    """A raw connection as worker A, collecting the errors the server sends it."""

    nc: NatsClient
    errors: list[str] = field(default_factory=list)

    def denied(self, what: str, subject: str) -> bool:
        """The server reported a permissions violation for `what` on `subject`."""
        wanted = f"permissions violation for {what} to \"{subject}\"".lower()
        return any(wanted in error.lower() for error in self.errors)

    async def attempt(self, what: str, subject: str,
                      call: asyncio.Future[Any] | None = None) -> None:
        """Wait for the server's verdict on an attempt (then give up on its reply)."""
        await eventually(lambda: is_true(self.denied(what, subject)), 15)
        if call is not None:
            call.cancel()
            with contextlib.suppress(BaseException):
                await call


@asynccontextmanager
async def intruder(fleet: AuthFleet) -> AsyncIterator[Intruder]:
    """Worker A's user, connected as A's publisher would be."""
    errors: list[str] = []

    async def collect(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(fleet.worker_url(WORKER_A), error_cb=collect,
                            inbox_prefix=worker_inbox_prefix(MODEL, WORKER_A))
    try:
        yield Intruder(nc, errors)
    finally:
        await nc.close()


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_an_authenticated_worker_is_indexed_end_to_end(
        backend: str, auth_fleet: AuthFleet, tmp_path: Path) -> None:
    """Worker A's publisher, as A's user, and the indexer, as the indexer's user: A's
    batches, liveness entry and a resync the indexer asks for all go through, and the
    server refused nothing (the generated permissions are all the honest path needs,
    leases, snapshots and a `kv-indexer rebuild` included)."""
    redis = RedisServer(tmp_path / "redis").start() if backend == "redis" else None
    try:
        async with indexer(auth_fleet.indexer_url, redis and redis.url) as service, \
                worker(auth_fleet, WORKER_A) as pub:
            store(pub, 0, 8)
            assert await pub.flush(30)
            await eventually(lambda: is_true(service.liveness is not None and (
                MODEL, WORKER_A) in service.liveness.live), 30)
            assert service.liveness is not None
            assert service.liveness.live[(MODEL, WORKER_A)].epoch == pub.ranks[0].epoch
            await eventually(lambda: gpu_blocks_are(service, WORKER_A, 8), 30)

            service._resync.request(ResyncRequest(MODEL, WORKER_A, 0, pub.ranks[0].epoch,
                                                  "test"))
            await eventually(lambda: is_true(pub.ranks[0].resyncs == 1), 15)
            store(pub, 100, 4)
            assert await pub.flush(30)
            await eventually(lambda: gpu_blocks_are(service, WORKER_A, 12), 30)
            if redis is not None:  # the operator's command, with the indexer's user
                await eventually(lambda: is_true(not service.rebuilding), 30)
                rebuilds = service.stats.rebuilds
                await request_rebuild(auth_fleet.indexer_url, PARTITIONS)
                await eventually(lambda: is_true(
                    service.stats.rebuilds >= rebuilds + PARTITIONS), 30)
                await eventually(lambda: is_true(not service.rebuilding), 30)
                await eventually(lambda: gpu_blocks_are(service, WORKER_A, 12), 30)
            assert service.stats.dead_letters == {}
    finally:
        if redis is not None:
            redis.stop()
    assert auth_fleet.violations() == []


async def gpu_blocks_are(service: IndexerService, worker_id: str, count: int) -> bool:
    return await gpu_blocks(service, worker_id) == count


async def stored_subjects(service: IndexerService) -> dict[str, int]:
    """Messages per stored subject in the event stream (read as the indexer)."""
    assert service._js is not None
    info = await service._js.stream_info(STREAM_NAME, subjects_filter=f"{PARTITION_PREFIX}.>")
    return dict(info.state.subjects or {})


async def test_a_worker_cannot_publish_as_another(auth_fleet: AuthFleet) -> None:
    """A publishing a batch on B's subject (naming B, as B would): the server refuses it
    as a permissions violation; B's subject holds only B's own batches, and the index only
    B's blocks."""
    async with indexer(auth_fleet.indexer_url) as service, \
            worker(auth_fleet, WORKER_B) as pub_b, intruder(auth_fleet) as a:
        store(pub_b, 0, 3)
        assert await pub_b.flush(30)
        await eventually(lambda: gpu_blocks_are(service, WORKER_B, 3), 30)
        before = await stored_subjects(service)

        subject = subject_for(MODEL, WORKER_B)
        forged = EventBatch(schema=SCHEMA_VERSION, model=MODEL, worker_id=WORKER_B,
                            epoch=new_epoch(), seq=0, ts=0.0, events=[BlockStored(
                                block_hashes=[999], token_ids=pack_tokens([1, 2, 3, 4]),
                                block_size=BS)])
        call = asyncio.ensure_future(a.nc.jetstream().publish(
            subject, encode_batch(forged), timeout=30.0))
        await a.attempt("publish", subject, call)

        assert await stored_subjects(service) == before
        assert await gpu_blocks(service, WORKER_B) == 3
    log = "\n".join(auth_fleet.violations())
    assert f'"$G/user:{worker_user_name(MODEL, WORKER_A)}" - Publish Violation - ' \
           f'Subject "{subject}"' in log


async def test_a_worker_cannot_touch_another_s_liveness_entry(auth_fleet: AuthFleet) -> None:
    """A may look the liveness bucket up (its publisher does), but putting B's key,
    deleting it (which would have B's blocks dropped after the grace period) and reading it
    are refused; B's entry stays B's."""
    async with indexer(auth_fleet.indexer_url) as service, \
            worker(auth_fleet, WORKER_B) as pub_b, intruder(auth_fleet) as a:
        assert service.liveness is not None
        await eventually(lambda: is_true((MODEL, WORKER_B) in service.liveness.live), 30)
        key = liveness_key(MODEL, WORKER_B)
        subject = f"$KV.{LIVENESS_BUCKET}.{key}"
        js = a.nc.jetstream()
        kv = await js.key_value(LIVENESS_BUCKET)  # allowed: STREAM.INFO of the bucket

        lie = WorkerRecord(model=MODEL, worker_id=WORKER_B, block_size=BS, epoch=1)
        put = asyncio.ensure_future(kv.put(key, msgspec.json.encode(lie)))
        await a.attempt("publish", subject, put)
        a.errors.clear()
        delete = asyncio.ensure_future(js.publish(subject, b"", timeout=30.0,
                                                  headers={"KV-Operation": "DEL"}))
        await a.attempt("publish", subject, delete)
        a.errors.clear()
        read = asyncio.ensure_future(kv.get(key))
        await eventually(lambda: is_true(any("permissions violation for publish to "
                                             "\"$js.api." in e.lower() for e in a.errors)), 15)
        read.cancel()
        with contextlib.suppress(BaseException):
            await read

        assert service._js is not None
        entry = await (await service._js.key_value(LIVENESS_BUCKET)).get(key)
        assert entry.operation is None and entry.value is not None
        record = msgspec.json.decode(entry.value, type=WorkerRecord)
        assert record.epoch == pub_b.ranks[0].epoch
        assert (MODEL, WORKER_B) in service.liveness.live
        assert not service.liveness.is_gone(MODEL, WORKER_B)


async def test_a_worker_cannot_ask_another_for_a_resync(auth_fleet: AuthFleet) -> None:
    """A's resync request to B is refused by the server, and A cannot listen to B's resync
    subject or inbox either; the indexer's request is the first B ever gets."""
    async with indexer(auth_fleet.indexer_url) as service, \
            worker(auth_fleet, WORKER_B) as pub_b, intruder(auth_fleet) as a:
        subject = resync_subject(MODEL, WORKER_B)
        request = asyncio.ensure_future(a.nc.request(
            subject, msgspec.json.encode({"dp_rank": 0, "reason": "forged"}), timeout=30.0))
        await a.attempt("publish", subject, request)
        await a.nc.subscribe(subject)
        await a.attempt("subscription", subject)
        inbox = f"{worker_inbox_prefix(MODEL, WORKER_B)}.>"
        await a.nc.subscribe(inbox)
        await a.attempt("subscription", inbox)

        service._resync.request(ResyncRequest(MODEL, WORKER_B, 0, pub_b.ranks[0].epoch,
                                              "control"))
        await eventually(lambda: is_true(pub_b.ranks[0].resync_requests == 1), 15)
        assert (pub_b.ranks[0].resyncs, pub_b.resync_requests_invalid) == (1, 0)


# --- the generator and the shipped server config -----------------------------------------

DEPLOY_NATS = Path(__file__).resolve().parent.parent / "deploy" / "nats"


def test_nats_auth_keeps_passwords_and_refuses_bad_ones(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Passwords are generated once (0600) and read back on the next run; a password that
    cannot go in a URL, or no worker at all, is an error (exit status 2)."""
    passwords = tmp_path / "passwords"
    assert nats_auth_main(["--worker", MODEL, WORKER_A, "--password-dir", str(passwords)]) == 0
    first = capsys.readouterr()
    path = passwords / worker_user_name(MODEL, WORKER_A)
    password = path.read_text().strip()
    assert path.stat().st_mode & 0o777 == 0o600
    assert f'password: "{password}"' in first.out and password not in first.err
    workers = tmp_path / "workers.txt"
    workers.write_text(f"# the fleet\n{MODEL} {WORKER_A}\n\n{MODEL} {WORKER_B}\n")
    assert nats_auth_main(["--workers-file", str(workers), "--password-dir",
                           str(passwords)]) == 0
    second = capsys.readouterr().out
    assert f'password: "{password}"' in second and second.count("{ user:") == 3

    (passwords / DEFAULT_INDEXER_USER).write_text("not for a URL: has spaces and @\n")
    assert nats_auth_main(["--worker", MODEL, WORKER_A, "--password-dir",
                           str(passwords)]) == 2
    assert "URL" in capsys.readouterr().err
    assert nats_auth_main(["--password-dir", str(passwords)]) == 2


async def test_the_shipped_server_config_takes_the_generated_users(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """deploy/nats/nats.conf with the printed auth.conf: the server starts with JetStream,
    the indexer's user gets in and a wrong password does not."""
    shipped = (DEPLOY_NATS / "nats.conf").read_text()
    assert 'store_dir: "/data"' in shipped and "include ./auth.conf" in shipped
    (tmp_path / "nats.conf").write_text(  # its store in the test's dir, nothing else changed
        shipped.replace('store_dir: "/data"', f'store_dir: "{tmp_path / "jetstream"}"'))
    assert nats_auth_main(["--worker", MODEL, WORKER_A, "--password-dir",
                           str(tmp_path / "passwords")]) == 0
    (tmp_path / "auth.conf").write_text(capsys.readouterr().out)
    server = ConfiguredNats(tmp_path / "server", config_file=tmp_path / "nats.conf").start()
    try:
        fleet = AuthFleet(server, tmp_path / "passwords")
        nc = await nats.connect(fleet.indexer_url)
        try:
            info = await nc.jetstream().account_info()
            assert info.limits is not None
        finally:
            await nc.close()
        with pytest.raises(Exception, match="Authorization Violation"):
            await nats.connect(server.url(DEFAULT_INDEXER_USER, "Wr0ng-password-x"),
                               allow_reconnect=False, max_reconnect_attempts=0)
    finally:
        server.stop()
