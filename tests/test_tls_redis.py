"""Redis over TLS, with client certificates and an ACL user whose password comes from a
file: the indexer ingests and scores through it, queries on the pipelined connection
(indexer/index/redis_pipe.py) under TLS; reader processes serve gRPC mTLS from it."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from indexer.app import IndexerService
from indexer.client import AsyncIndexerClient, Query, UnauthenticatedError, UnavailableError
from indexer.config import parse_service_config
from indexer.errors import ConfigError
from indexer.index.factory import RedisSecurity
from indexer.index.redis import RedisIndex
from indexer.index.redis_pipe import RedisPipe
from tests.support.certs import Pki, make_pki
from tests.support.event_path import BS, MODEL, TOKENS, matched, publisher, service_config
from tests.support.polling import equals, eventually, is_true
from tests.support.servers import TlsRedisServer, redis_speaks_tls

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not redis_speaks_tls(),
                       reason="this redis-server was built without TLS (Debian's has it)"),
]

USER, PASSWORD = "kvindexer", "correct-horse-battery"
TOKEN = "router-token"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_redis(tmp_path: Path, pki: Pki) -> Iterator[TlsRedisServer]:
    """TLS only, client certificates required, `default` off, one ACL user."""
    server = TlsRedisServer(tmp_path / "redis", cert=pki.server_cert, key=pki.server_key,
                            ca=pki.ca, client_certs=True,
                            users=(f"{USER} on >{PASSWORD} ~* &* +@all", "default off")).start()
    yield server
    server.stop()


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "redis-password"
    path.write_text(PASSWORD + "\n")
    return path


def user_url(server: TlsRedisServer) -> str:
    return f"rediss://{USER}@127.0.0.1:{server.port}/0"


def security(pki: Pki, password_file: Path | None = None) -> RedisSecurity:
    return RedisSecurity(tls_ca=str(pki.ca), tls_cert=str(pki.client_cert),
                         tls_key=str(pki.client_key),
                         password_file=str(password_file) if password_file else None)


class TestPipeUnderTls:
    async def test_queries_stay_pipelined(self, tls_redis: TlsRedisServer, pki: Pki,
                                          password_file: Path) -> None:
        client = aioredis.Redis.from_url(user_url(tls_redis), decode_responses=False,
                                         **security(pki, password_file).client_options())
        pipe = RedisPipe.for_client(client)
        try:
            assert pipe is not None
            assert await pipe.call("ACL", "WHOAMI") == USER.encode()
            await client.set("k", b"v")
            replies = await asyncio.gather(*(pipe.call("GET", "k") for _ in range(50)))
            assert replies == [b"v"] * 50
        finally:
            if pipe is not None:
                await pipe.close()
            await client.aclose()

    async def test_the_pipe_checks_the_certificate_as_redis_py_does(
            self, tls_redis: TlsRedisServer, pki: Pki, password_file: Path) -> None:
        """Trusting another CA, or presenting no client certificate: no connection."""
        options = security(pki, password_file).client_options()
        for changed in ({"ssl_ca_certs": str(pki.other_ca)},
                        {"ssl_certfile": None, "ssl_keyfile": None}):
            client = aioredis.Redis.from_url(user_url(tls_redis),
                                             **{**options, **changed})
            pipe = RedisPipe.for_client(client)
            assert pipe is not None
            try:
                with pytest.raises(RedisConnectionError):
                    await pipe.call("PING")
                with pytest.raises((RedisConnectionError, ssl.SSLError)):
                    await client.ping()
            finally:
                await pipe.close()
                await client.aclose()


class TestIndexerOnTlsRedis:
    async def test_events_flow_and_score_over_tls(self, nats_url: str,
                                                  tls_redis: TlsRedisServer, pki: Pki,
                                                  password_file: Path) -> None:
        svc = IndexerService(service_config(
            nats_url, redis_url=user_url(tls_redis), redis_tls_ca=str(pki.ca),
            redis_tls_cert=str(pki.client_cert), redis_tls_key=str(pki.client_key),
            redis_password_file=str(password_file)))
        await svc.start()
        try:
            assert isinstance(svc.index, RedisIndex)
            assert svc.index._queries is not None  # Score is on the pipe, under TLS
            async with publisher(nats_url, "w1") as pub:
                pub.stored(list(range(1, 9)), TOKENS, parent_hash=None)
                assert await pub.flush()
                await eventually(lambda: equals(matched(svc), 8), timeout=20)
        finally:
            await svc.close()

    async def test_readers_serve_mtls_grpc_from_tls_redis(
            self, nats_url: str, tls_redis: TlsRedisServer, pki: Pki, password_file: Path,
            tmp_path: Path) -> None:
        """--grpc-processes 2: with the main process's server stopped, the reader answers
        routers with a certificate and the token, and refuses the others."""
        tokens = tmp_path / "tokens"
        tokens.write_text(TOKEN + "\n")
        svc = IndexerService(service_config(
            nats_url, redis_url=user_url(tls_redis), redis_tls_ca=str(pki.ca),
            redis_tls_cert=str(pki.client_cert), redis_tls_key=str(pki.client_key),
            redis_password_file=str(password_file), grpc_listen="127.0.0.1:0",
            grpc_processes=2, grpc_tls_cert=str(pki.server_cert),
            grpc_tls_key=str(pki.server_key), grpc_tls_client_ca=str(pki.ca),
            grpc_token_file=str(tokens)))
        await svc.start()
        target = f"127.0.0.1:{svc.grpc_port}"
        query = Query(model=MODEL, token_ids=TOKENS, block_size=BS)
        own = [("grpc.use_local_subchannel_pool", 1)]  # a connection of each client's own

        def router(**overrides: object) -> AsyncIndexerClient:
            settings: dict[str, object] = {
                "root_certificates": pki.ca, "client_cert": pki.client_cert,
                "client_key": pki.client_key, "token": TOKEN, "timeout": 3.0,
                "options": own, **overrides}
            return AsyncIndexerClient(target, **settings)  # type: ignore[arg-type]

        async def scores(**overrides: object) -> dict[str, int] | None:
            async with router(**overrides) as client:
                try:
                    answer = await client.score(query)
                except UnavailableError:
                    return None
            return {s.worker_id: s.matched_blocks for s in answer.scores}

        try:
            assert svc.readers is not None
            await eventually(lambda: is_true(len(svc.readers.pids) == 1),  # type: ignore[union-attr]
                             timeout=20)
            async with publisher(nats_url, "w1") as pub:
                pub.stored(list(range(1, 9)), TOKENS, parent_hash=None)
                assert await pub.flush()
                await eventually(lambda: equals(matched(svc), 8), timeout=20)
                await svc._server.stop(0)  # type: ignore[union-attr]

                async def reader_answers() -> bool:
                    return await scores() == {"w1": 8}

                await eventually(reader_answers, timeout=30)
                async with router(token="wrong") as client:
                    with pytest.raises(UnauthenticatedError):
                        await client.score(query)
                assert await scores(client_cert=None, client_key=None) is None
                async with AsyncIndexerClient(target, timeout=2.0, options=own) as plain:
                    with pytest.raises(UnavailableError):
                        await plain.score(query)
        finally:
            await svc.close()


class TestSettings:
    @pytest.mark.parametrize(
        ("argv", "message"),
        [
            (["--redis-url", "redis://r:6379/0", "--redis-tls-ca", "{ca}"],
             "need a rediss:// --redis-url"),
            (["--redis-url", "rediss://r:6379/0", "--redis-tls-cert", "{ca}"],
             "--redis-tls-cert and --redis-tls-key go together"),
            (["--redis-password-file", "{ca}"], "--redis-password-file needs --redis-url"),
            (["--redis-url", "rediss://r:6379/0", "--redis-password-file", "/nonexistent"],
             "--redis-password-file: cannot read /nonexistent"),
        ],
    )
    def test_bad_settings_name_the_flag(self, pki: Pki, argv: list[str], message: str) -> None:
        with pytest.raises(ConfigError, match=message):
            parse_service_config([a.format(ca=pki.ca) for a in argv], environ={})

    def test_password_file_loses_only_its_line_end(self, tmp_path: Path) -> None:
        path = tmp_path / "pw"
        path.write_text(" spaced pw \r\n")
        options = RedisSecurity(password_file=str(path)).client_options()
        assert options == {"password": " spaced pw "}

