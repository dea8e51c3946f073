"""NATS with TLS and credentials: a real nats-server (mTLS, NKey users, user/password,
operator mode with a .creds file); the indexer and a publisher connect and events flow end
to end. A set-up that cannot work ends `kv-indexer serve` and `kv-publisher bridge` with
one line naming the flag, and SIGTERM ends a start-up that waits for NATS."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
import nkeys
import pytest

from indexer.app import IndexerService
from indexer.config import parse_service_config
from indexer.embedded import EmbeddedNats
from indexer.errors import ConfigError
from kvcore.connect import NatsSecurity, NatsSetupError, connect_nats, nats_connect_options
from publisher.cli import parse_bridge_args
from tests.support.certs import Pki, make_pki, nats_tls_block
from tests.support.event_path import TOKENS, matched, publisher, service_config
from tests.support.nats_auth import new_nkey, operator_mode
from tests.support.polling import equals, eventually
from tests.support.servers import free_port

pytestmark = pytest.mark.integration

# A start-up that cannot work must end well within this (a hang would not).
EXIT_BOUND_S = 30


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def start_nats(directory: Path, config: str) -> EmbeddedNats:
    return EmbeddedNats(directory, config=config).start()


@pytest.fixture
def mtls_nats(tmp_path: Path, pki: Pki) -> Iterator[EmbeddedNats]:
    """A nats-server that speaks TLS only and verifies client certificates."""
    server = start_nats(tmp_path / "nats", nats_tls_block(pki, verify=True))
    yield server
    server.stop()


def client_tls(pki: Pki) -> NatsSecurity:
    return NatsSecurity(nats_tls_ca=str(pki.ca), nats_tls_cert=str(pki.client_cert),
                        nats_tls_key=str(pki.client_key))


async def events_flow(url: str, security: NatsSecurity, **settings: object) -> None:
    """An IndexerService and a publisher on `url` with `security`: eight blocks indexed."""
    fields = {k: v for k, v in msgspec.structs.asdict(security).items() if v}
    svc = IndexerService(service_config(url, **fields, **settings))
    await svc.start()
    try:
        async with publisher(url, "w1", nats_security=security) as pub:
            pub.stored(list(range(1, 9)), TOKENS, parent_hash=None)
            assert await pub.flush()
            await eventually(lambda: equals(matched(svc), 8), timeout=20)
    finally:
        await svc.close()


class TestEndToEnd:
    async def test_mtls_indexer_and_publisher(self, mtls_nats: EmbeddedNats, pki: Pki) -> None:
        await events_flow(mtls_nats.url, client_tls(pki))

    async def test_nkey_user_over_tls(self, tmp_path: Path, pki: Pki) -> None:
        user = new_nkey(nkeys.PREFIX_BYTE_USER)
        seed = tmp_path / "user.nk"
        seed.write_bytes(user.seed + b"\n")
        server = start_nats(tmp_path / "nats", nats_tls_block(pki, verify=False)
                            + f"\nauthorization {{ users = [ {{ nkey: {user.public} }} ] }}")
        try:
            await events_flow(server.url, NatsSecurity(nats_tls_ca=str(pki.ca),
                                                       nats_nkey_seed=str(seed)))
            with pytest.raises(NatsSetupError, match="refused the credentials"):
                await connect_nats(server.url, NatsSecurity(nats_tls_ca=str(pki.ca)),
                                   name="no-credentials", start_timeout_s=10)
        finally:
            server.stop()

    async def test_user_and_password_from_files(self, tmp_path: Path) -> None:
        (tmp_path / "user").write_text("indexer\n")
        (tmp_path / "password").write_text("s3cret pass\n")
        (tmp_path / "wrong").write_text("guess\n")
        server = start_nats(tmp_path / "nats", 'authorization { users = [ '
                                               '{ user: indexer, password: "s3cret pass" } ] }')
        try:
            await events_flow(server.url, NatsSecurity(
                nats_user_file=str(tmp_path / "user"),
                nats_password_file=str(tmp_path / "password")))
            with pytest.raises(NatsSetupError, match="--nats-user-file"):
                await connect_nats(server.url, NatsSecurity(
                    nats_user_file=str(tmp_path / "user"),
                    nats_password_file=str(tmp_path / "wrong")),
                    name="wrong-password", start_timeout_s=10)
        finally:
            server.stop()

    async def test_creds_file_in_operator_mode(self, tmp_path: Path) -> None:
        mode = operator_mode(tmp_path / "auth")
        server = start_nats(tmp_path / "nats", mode.config)
        try:
            await events_flow(server.url, NatsSecurity(nats_creds=str(mode.creds)))
            with pytest.raises(NatsSetupError, match="refused the credentials"):
                await connect_nats(server.url, name="no-creds", start_timeout_s=10)
        finally:
            server.stop()


def serve_argv(*args: str) -> list[str]:
    code = "import sys; from indexer.app import main; sys.exit(main(sys.argv[1:]))"
    return [sys.executable, "-c", code, "--grpc-listen", "", "--metrics-listen", "",
            "--log-format", "json", *args]


def bridge_argv(nats_url: str) -> list[str]:
    code = "import sys; from publisher.cli import main; sys.exit(main(sys.argv[1:]))"
    return [sys.executable, "-c", code, "bridge", "--zmq-endpoint",
            f"tcp://127.0.0.1:{free_port()}", "--model", "m", "--worker-id", "w",
            "--nats-url", nats_url, "--log-format", "json"]


def run_to_exit(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run `argv` to its end; TimeoutExpired (a failed test) if it hangs."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=EXIT_BOUND_S,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, check=False)


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


class TestStartUpFailures:
    """The finding: a TLS NATS with an untrusted certificate at start hung and ignored
    SIGTERM. Now such a start-up ends, non-zero, with one line naming the flag."""

    def test_serve_without_the_ca_exits_naming_the_flag(self, mtls_nats: EmbeddedNats,
                                                       pki: Pki) -> None:
        done = run_to_exit(serve_argv("--nats-url", mtls_nats.url))
        assert done.returncode == 1, done.stderr
        line = last_line(done.stderr)
        assert line.startswith("kv-indexer serve: cannot connect to NATS at "), line
        assert "--nats-tls-ca" in line
        assert "Traceback" not in done.stderr

    def test_serve_with_an_untrusting_ca_or_no_client_cert(self, mtls_nats: EmbeddedNats,
                                                          pki: Pki) -> None:
        done = run_to_exit(serve_argv("--nats-url", mtls_nats.url,
                                      "--nats-tls-ca", str(pki.other_ca)))
        assert done.returncode == 1
        assert "does not verify against --nats-tls-ca" in last_line(done.stderr)
        done = run_to_exit(serve_argv("--nats-url", mtls_nats.url,
                                      "--nats-tls-ca", str(pki.ca)))
        assert done.returncode == 1
        assert "--nats-tls-cert and --nats-tls-key" in last_line(done.stderr)

    def test_bridge_without_the_ca_exits_naming_the_flag(self, mtls_nats: EmbeddedNats) -> None:
        done = run_to_exit(bridge_argv(mtls_nats.url))
        assert done.returncode == 1, done.stderr
        line = last_line(done.stderr)
        assert line.startswith("kv-publisher bridge: cannot connect to NATS"), line
        assert "--nats-tls-ca" in line

    def test_rebuild_takes_the_same_flags(self, mtls_nats: EmbeddedNats, pki: Pki) -> None:
        code = "import sys; from indexer.cli import main; sys.exit(main(sys.argv[1:]))"
        argv = [sys.executable, "-c", code, "rebuild", "--nats-url", mtls_nats.url,
                "--partitions", "2"]
        refused = run_to_exit(argv)
        assert refused.returncode == 1
        assert "--nats-tls-ca" in last_line(refused.stderr)
        done = run_to_exit([*argv, "--nats-tls-ca", str(pki.ca), "--nats-tls-cert",
                            str(pki.client_cert), "--nats-tls-key", str(pki.client_key)])
        assert done.returncode == 0, done.stderr
        assert "rebuild requested for 2 partitions" in done.stdout

    def test_no_nats_at_all_gives_up_after_the_start_timeout(self) -> None:
        done = run_to_exit(serve_argv("--nats-url", f"nats://127.0.0.1:{free_port()}",
                                      "--nats-start-timeout", "2"))
        assert done.returncode == 1
        assert "within 2 s" in last_line(done.stderr)

    @pytest.mark.parametrize("program", ["serve", "bridge"])
    def test_sigterm_during_start_up(self, program: str) -> None:
        """Waiting for a NATS that is not there, serve and the bridge stop on SIGTERM."""
        url = f"nats://127.0.0.1:{free_port()}"
        argv = serve_argv("--nats-url", url) if program == "serve" else bridge_argv(url)
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            assert proc.stderr is not None
            for line in proc.stderr:  # it is trying (and failing) to connect
                if "nats_connect_failed" in line:
                    break
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=EXIT_BOUND_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err
        if program == "serve":
            assert "stopping_during_startup" in err


class TestSettings:
    def test_serve_flags_and_environment(self, pki: Pki) -> None:
        config = parse_service_config(
            ["--nats-url", "nats://n:4222", "--nats-tls-cert", str(pki.client_cert)],
            environ={"KV_INDEXER_NATS_TLS_CA": str(pki.ca),
                     "KV_INDEXER_NATS_TLS_KEY": str(pki.client_key),
                     "KV_INDEXER_NATS_START_TIMEOUT_S": "5"})
        assert (config.nats_tls_ca, config.nats_tls_cert, config.nats_tls_key,
                config.nats_start_timeout_s) == (str(pki.ca), str(pki.client_cert),
                                                 str(pki.client_key), 5.0)

    def test_bridge_flags_and_environment(self, pki: Pki, monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
        seed = tmp_path / "seed"
        seed.write_text("SU...\n")
        monkeypatch.setenv("KV_PUBLISHER_NATS_TLS_CA", str(pki.ca))
        args = parse_bridge_args(["--zmq-endpoint", "tcp://e:5557", "--model", "m",
                                  "--worker-id", "w", "--nats-nkey-seed", str(seed)])
        assert (args.nats_tls_ca, args.nats_nkey_seed, args.nats_start_timeout) == (
            str(pki.ca), str(seed), "60")

    @pytest.mark.parametrize(
        ("argv", "message"),
        [
            (["--nats-tls-cert", "{cert}"], "--nats-tls-cert and --nats-tls-key go together"),
            (["--nats-user-file", "{cert}"], "--nats-user-file and --nats-password-file"),
            (["--nats-creds", "{cert}", "--nats-nkey-seed", "{cert}"],
             "--nats-creds and --nats-nkey-seed: give one way"),
            (["--nats-tls-ca", "/nonexistent/ca.pem"], "--nats-tls-ca: cannot read"),
            (["--nats-start-timeout", "0"], "--nats-start-timeout must be > 0"),
        ],
    )
    def test_bad_settings_name_the_flag(self, pki: Pki, argv: list[str], message: str) -> None:
        argv = ["--nats-url", "nats://n:4222", *(a.format(cert=pki.client_cert) for a in argv)]
        with pytest.raises(ConfigError, match=message):
            parse_service_config(argv, environ={})

    def test_tls_flags_need_an_external_nats(self, pki: Pki) -> None:
        with pytest.raises(ConfigError, match="need --nats-url"):
            parse_service_config(["--nats-tls-ca", str(pki.ca)], environ={})

    def test_a_ca_file_that_is_no_certificate(self, tmp_path: Path) -> None:
        bogus = tmp_path / "ca.pem"
        bogus.write_text("not a certificate\n")
        with pytest.raises(NatsSetupError, match=r"--nats-tls-ca: .* holds no usable CA"):
            nats_connect_options(NatsSecurity(nats_tls_ca=str(bogus)))
