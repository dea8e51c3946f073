"""gRPC over TLS and mTLS, with bearer tokens: a real IndexerService (events published
over NATS, in-memory index) and routers with and without the right credentials.

Certificates come from tests/support/certs.py: a CA, a server certificate for 127.0.0.1 /
localhost, a client certificate, and a second CA nobody trusts."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from indexer import cli
from indexer.app import IndexerService
from indexer.client import (
    AsyncIndexerClient,
    IndexerClient,
    Query,
    RetryPolicy,
    UnauthenticatedError,
    UnavailableError,
)
from indexer.config import parse_service_config
from indexer.errors import ConfigError
from indexer.index.memory import MemoryIndex
from indexer.serve.auth import GrpcSecurity, TokenAuth, read_tokens
from indexer.serve.service import ServiceSettings, start_grpc_server
from tests.support.certs import Pki, make_pki
from tests.support.event_path import BS, MODEL, TOKENS, publisher, service_config
from tests.support.event_path import matched as matched_in
from tests.support.polling import equals, eventually

pytestmark = pytest.mark.integration

T = TypeVar("T")
TOKEN = "s3cr3t-router-token"
QUERY = Query(model=MODEL, token_ids=TOKENS, block_size=BS)
NO_RETRY = RetryPolicy(max_attempts=1)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("token") / "tokens"
    path.write_text(f"# routers\nold-token-being-rotated-out\n{TOKEN}\n")
    return path


async def blocking(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await asyncio.to_thread(fn, *args, **kwargs)


@contextlib.asynccontextmanager
async def indexed_service(nats_url: str, **settings: object) -> AsyncIterator[IndexerService]:
    """An IndexerService on gRPC 127.0.0.1:<free> holding live worker w1's eight blocks
    (its publisher stays up: a closed one deregisters the worker)."""
    svc = IndexerService(service_config(nats_url, grpc_listen="127.0.0.1:0", **settings))
    await svc.start()
    try:
        async with publisher(nats_url, "w1") as pub:
            pub.stored(list(range(1, 9)), TOKENS, parent_hash=None)
            assert await pub.flush()
            await eventually(lambda: equals(matched_in(svc), 8))
            yield svc
    finally:
        await svc.close()


def matched(answer: Any) -> dict[str, int]:
    return {s.worker_id: s.matched_blocks for s in answer.scores}


@pytest.fixture
async def tls_service(nats_url: str, pki: Pki, token_file: Path
                      ) -> AsyncIterator[IndexerService]:
    """Server TLS (no client certificates) with bearer tokens."""
    async with indexed_service(nats_url, grpc_tls_cert=str(pki.server_cert),
                               grpc_tls_key=str(pki.server_key),
                               grpc_token_file=str(token_file)) as svc:
        yield svc


@pytest.fixture
async def mtls_service(nats_url: str, pki: Pki) -> AsyncIterator[IndexerService]:
    """mTLS: the server wants a client certificate signed by the test CA."""
    async with indexed_service(nats_url, grpc_tls_cert=str(pki.server_cert),
                               grpc_tls_key=str(pki.server_key),
                               grpc_tls_client_ca=str(pki.ca)) as svc:
        yield svc


class TestServerTls:
    """TLS and a bearer token: the right credentials score, the others are refused."""

    async def test_sync_and_async_clients_score(self, tls_service: IndexerService,
                                                pki: Pki) -> None:
        target = f"127.0.0.1:{tls_service.grpc_port}"
        with IndexerClient(target, root_certificates=pki.ca, token=TOKEN,
                           timeout=5) as client:
            answer = await blocking(client.score, QUERY)
        assert matched(answer) == {"w1": 8}
        async with AsyncIndexerClient(f"localhost:{tls_service.grpc_port}",
                                      root_certificates=pki.read("ca"), token=TOKEN,
                                      timeout=5) as aclient:
            answer = await aclient.score(QUERY)
            workers = await aclient.list_workers(MODEL)
        assert matched(answer) == {"w1": 8}
        assert [w.worker_id for w in workers] == ["w1"]

    async def test_cli_score_with_ca_and_token_file(
            self, tls_service: IndexerService, pki: Pki, token_file: Path, tmp_path: Path,
            capsys: pytest.CaptureFixture[str]) -> None:
        tokens = tmp_path / "tokens.json"
        tokens.write_text(json.dumps(TOKENS))
        one_token = tmp_path / "token"
        one_token.write_text(TOKEN + "\n")
        code = await blocking(cli.main, [
            "score", "--target", f"127.0.0.1:{tls_service.grpc_port}", "--model", MODEL,
            "--tokens-file", str(tokens), "--block-size", str(BS), "--json",
            "--tls-ca", str(pki.ca), "--token-file", str(one_token)])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert [(s["worker_id"], s["matched_blocks"]) for s in json.loads(out)["scores"]] == [
            ("w1", 8)]

    async def test_cli_reads_its_settings_from_the_environment(
            self, tls_service: IndexerService, pki: Pki, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
        one_token = tmp_path / "token"
        one_token.write_text(TOKEN)
        monkeypatch.setenv("KV_INDEXER_TLS_CA", str(pki.ca))
        monkeypatch.setenv("KV_INDEXER_TOKEN_FILE", str(one_token))
        monkeypatch.setenv("KV_INDEXER_TARGET", f"127.0.0.1:{tls_service.grpc_port}")
        assert await blocking(cli.main, ["stats", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["blocks_stored"] == 8

    async def test_wrong_or_missing_token_is_unauthenticated(
            self, tls_service: IndexerService, pki: Pki,
            capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
        target = f"127.0.0.1:{tls_service.grpc_port}"
        for token in ("not-the-token", None):
            with IndexerClient(target, root_certificates=pki.ca, token=token,
                               timeout=5) as client, pytest.raises(UnauthenticatedError):
                await blocking(client.score, QUERY)
        async with AsyncIndexerClient(target, root_certificates=pki.ca, token=TOKEN + "x",
                                      timeout=5) as aclient:
            with pytest.raises(UnauthenticatedError):
                await aclient.stats()
        wrong = tmp_path / "wrong"
        wrong.write_text("nope\n")
        code = await blocking(cli.main, ["stats", "--target", target, "--tls-ca",
                                         str(pki.ca), "--token-file", str(wrong)])
        assert code == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err

    async def test_health_needs_no_token(self, tls_service: IndexerService, pki: Pki) -> None:
        credentials = grpc.ssl_channel_credentials(pki.read("ca"))
        async with grpc.aio.secure_channel(f"127.0.0.1:{tls_service.grpc_port}",
                                           credentials) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    async def test_plaintext_and_untrusting_clients_are_refused(
            self, tls_service: IndexerService, pki: Pki) -> None:
        target = f"127.0.0.1:{tls_service.grpc_port}"
        with IndexerClient(target, token=TOKEN, timeout=2, retry=NO_RETRY) as plain, \
                pytest.raises(UnavailableError):
            await blocking(plain.score, QUERY)
        # TLS, but trusting another CA: the server's certificate does not verify.
        with IndexerClient(target, root_certificates=pki.other_ca, token=TOKEN, timeout=2,
                           retry=NO_RETRY) as untrusting, pytest.raises(UnavailableError):
            await blocking(untrusting.score, QUERY)


class TestMutualTls:
    """mTLS: only clients with a certificate from the configured CA get in."""

    async def test_clients_with_a_certificate_score(self, mtls_service: IndexerService,
                                                    pki: Pki, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
        target = f"127.0.0.1:{mtls_service.grpc_port}"
        with IndexerClient(target, root_certificates=pki.ca, client_cert=pki.client_cert,
                           client_key=pki.client_key, timeout=5) as client:
            assert matched(await blocking(client.score, QUERY)) == {"w1": 8}
        async with AsyncIndexerClient(target, root_certificates=pki.read("ca"),
                                      client_cert=pki.read("client_cert"),
                                      client_key=pki.read("client_key"), timeout=5) as aclient:
            assert matched(await aclient.score(QUERY)) == {"w1": 8}
        tokens = tmp_path / "tokens.json"
        tokens.write_text(json.dumps(TOKENS))
        code = await blocking(cli.main, [
            "score", "--target", target, "--model", MODEL, "--tokens-file", str(tokens),
            "--block-size", str(BS), "--tls-ca", str(pki.ca), "--tls-cert",
            str(pki.client_cert), "--tls-key", str(pki.client_key)])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert out.splitlines()[2].split()[:3] == ["w1", "0", "8"]

    async def test_clients_without_a_trusted_certificate_are_refused(
            self, mtls_service: IndexerService, pki: Pki,
            capsys: pytest.CaptureFixture[str]) -> None:
        target = f"127.0.0.1:{mtls_service.grpc_port}"
        with IndexerClient(target, root_certificates=pki.ca, timeout=2,
                           retry=NO_RETRY) as no_cert, pytest.raises(UnavailableError):
            await blocking(no_cert.score, QUERY)
        async with AsyncIndexerClient(target, root_certificates=pki.ca,
                                      client_cert=pki.other_client_cert,
                                      client_key=pki.other_client_key, timeout=2,
                                      retry=NO_RETRY) as stranger:
            with pytest.raises(UnavailableError):
                await stranger.score(QUERY)
        with IndexerClient(target, timeout=2, retry=NO_RETRY) as plain, \
                pytest.raises(UnavailableError):
            await blocking(plain.stats)
        code = await blocking(cli.main, ["stats", "--target", target, "--tls-ca",
                                         str(pki.ca), "--timeout", "2"])
        assert code == 1
        assert "UNAVAILABLE" in capsys.readouterr().err


class TestServerSettings:
    """Reflection on and off; the token file; settings checked at start-up."""

    @staticmethod
    async def reflection_services(port: int) -> list[str] | grpc.StatusCode:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
                list_services="")]), timeout=5)
            try:
                async for reply in call:
                    return sorted(s.name for s in reply.list_services_response.service)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
        return []

    async def test_reflection_is_on_by_default_and_can_be_turned_off(self) -> None:
        index = MemoryIndex()
        server, port = await start_grpc_server(index, "127.0.0.1:0")
        try:
            assert "kvindex.v1.KvIndexer" in await self.reflection_services(port)  # type: ignore[operator]
        finally:
            await server.stop(None)
        server, port = await start_grpc_server(index, "127.0.0.1:0",
                                               settings=ServiceSettings(reflection=False))
        try:
            assert await self.reflection_services(port) == grpc.StatusCode.UNIMPLEMENTED
        finally:
            await server.stop(None)

    async def test_reflection_needs_the_token_too(self) -> None:
        """Only health is open: a streaming service is refused like a unary one."""
        index = MemoryIndex()
        server, port = await start_grpc_server(
            index, "127.0.0.1:0", security=GrpcSecurity(tokens=(TOKEN.encode(),)))
        try:
            assert await self.reflection_services(port) == grpc.StatusCode.UNAUTHENTICATED
        finally:
            await server.stop(None)

    def test_token_file_rules(self, tmp_path: Path) -> None:
        path = tmp_path / "t"
        path.write_text("\n# comment\n  one  \ntwo\n")
        assert read_tokens(str(path)) == (b"one", b"two")
        path.write_text("# nothing\n\n")
        with pytest.raises(ConfigError, match="holds no token"):
            read_tokens(str(path))
        path.write_text("two words\n")
        with pytest.raises(ConfigError, match="one word"):
            read_tokens(str(path))
        auth = TokenAuth([b"one", b"two"])
        assert auth.authorized([("authorization", "Bearer two")])
        assert not auth.authorized([("authorization", "Bearer three")])
        assert not auth.authorized([("authorization", "two")])
        assert not auth.authorized([("x-other", "Bearer two")])
        assert not auth.authorized(None)

    @pytest.mark.parametrize(
        ("argv", "message"),
        [
            (["--grpc-tls-cert", "{cert}"], "--grpc-tls-cert and --grpc-tls-key go together"),
            (["--grpc-tls-client-ca", "{ca}"], "--grpc-tls-client-ca needs --grpc-tls-cert"),
            (["--grpc-tls-cert", "{cert}", "--grpc-tls-key", "/nonexistent/key"],
             "--grpc-tls-key: cannot read /nonexistent/key"),
            (["--grpc-token-file", "/nonexistent/tokens"], "--grpc-token-file: cannot read"),
            (["--grpc-reflection", "maybe"], "--grpc-reflection must be on or off"),
        ],
    )
    def test_bad_settings_name_the_flag(self, pki: Pki, argv: list[str], message: str) -> None:
        argv = [a.format(cert=pki.server_cert, ca=pki.ca) for a in argv]
        with pytest.raises(ConfigError, match=message):
            parse_service_config(argv, environ={})

    def test_environment_variables(self, pki: Pki, token_file: Path) -> None:
        config = parse_service_config([], environ={
            "KV_INDEXER_GRPC_TLS_CERT": str(pki.server_cert),
            "KV_INDEXER_GRPC_TLS_KEY": str(pki.server_key),
            "KV_INDEXER_GRPC_TLS_CLIENT_CA": str(pki.ca),
            "KV_INDEXER_GRPC_TOKEN_FILE": str(token_file),
            "KV_INDEXER_GRPC_REFLECTION": "off"})
        security = GrpcSecurity.from_config(config)
        assert security.describe() == "mTLS, bearer tokens (2)"
        assert config.grpc_reflection == "off"
