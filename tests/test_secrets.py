"""No secret in any log, banner, error or health answer: `kv-indexer serve` (with reader
processes) and `kv-publisher bridge` run as processes against a nats-server and a
redis-server that require passwords, given in their URLs; everything they print, and
what their HTTP endpoints answer, is searched for the planted passwords. Also when a
password is refused, and when NATS goes away."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import structlog

from indexer.config import parse_service_config
from indexer.errors import ConfigError
from kvcore.redact import redact_text, redact_url
from kvcore.runtime import redact_event
from publisher.cli import parse_bridge_args
from tests.support.polling import eventually, is_true
from tests.support.servers import ConfiguredNats, RedisServer, free_port

NATS_SECRET = "S3cr3t-plant"
REDIS_SECRET = "R3dis-plant-pw"
WRONG_SECRET = "Wr0ng-plant-pw"
PLANTED = (NATS_SECRET, REDIS_SECRET, WRONG_SECRET)


class TestRedaction:
    """`redact_url` / `redact_text`: every URL secret form the services are given."""

    @pytest.mark.parametrize(("text", "expected"), [
        ("nats://u:S3cr3t@127.0.0.1:4222", "nats://u:***@127.0.0.1:4222"),
        ("nats://s3cr3t-token@nats:4222", "nats://***@nats:4222"),
        ("redis://:S3cr3t@redis:6379/0", "redis://:***@redis:6379/0"),
        ("rediss://user:S3cr3t@redis:6380/0", "rediss://user:***@redis:6380/0"),
        ("redis://user:p@ss@redis:6379/0", "redis://user:***@redis:6379/0"),
        ("redis://redis:6379/0?password=S3cr3t&db=1", "redis://redis:6379/0?password=***&db=1"),
        ("tls://u:S3cr3t@a:4222,nats://v:S3cr3t@b:4222", "tls://u:***@a:4222,nats://v:***@b:4222"),
        ("ParseResult(scheme='nats', netloc='u:S3cr3t@h:4222')",
         "ParseResult(scheme='nats', netloc='u:***@h:4222')"),
        ("{'password': 'S3cr3t'}", "{'password': '***'}"),
        ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
        ("mail me: user@example.com at 12:00", "mail me: user@example.com at 12:00"),
    ])
    def test_redact(self, text: str, expected: str) -> None:
        assert redact_text(text) == expected
        assert redact_url(text) == expected

    def test_log_processor(self) -> None:
        """Every string value of a log event (tracebacks too), and objects that print one."""
        event = {"event": "x", "url": "nats://u:S3cr3t@h", "n": 3,
                 "error": ConnectionError("redis://:S3cr3t@h:6379 refused"),
                 "exception": "Traceback ...\nError: nats://tok@h"}
        out = redact_event(None, "info", event)
        assert "S3cr3t" not in str(out) and "tok@" not in str(out)
        assert out["n"] == 3

    def test_config_errors(self) -> None:
        """A URL given to the wrong setting is echoed redacted."""
        with pytest.raises(ConfigError) as info:
            parse_service_config(["--partitions", f"nats://u:{NATS_SECRET}@h:4222"],
                                 environ={})
        assert NATS_SECRET not in str(info.value) and "u:***@" in str(info.value)

    def test_bridge_argument_errors(self, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit):
            parse_bridge_args(["--zmq-endpoint", "tcp://e:5557", "--model", "m",
                               "--worker-id", "w", f"nats://u:{NATS_SECRET}@h:4222"])
        err = capsys.readouterr().err
        assert "unrecognized arguments" in err and NATS_SECRET not in err


# --- processes --------------------------------------------------------------------------


class Output:
    """Everything a child process prints (stdout and stderr), read by a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, needle: str, within: float = 60.0) -> None:
        deadline = time.monotonic() + within
        while needle not in self.text:
            assert self.proc.poll() is None or needle in self.text, \
                f"exited with {self.proc.returncode} before printing {needle!r}:\n{self.text}"
            assert time.monotonic() < deadline, f"no {needle!r} within {within}s:\n{self.text}"
            time.sleep(0.05)

    def stop(self) -> str:
        """SIGTERM (to its process group: readers too); everything it printed."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._thread.join(10)
        return self.text


def _spawn(module: str, args: list[str]) -> Output:
    code = f"import sys; from {module} import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return Output(proc)


@contextmanager
def running(module: str, args: list[str]) -> Iterator[Output]:
    out = _spawn(module, args)
    try:
        yield out
    finally:
        out.stop()


def serve_args(tmp_path: Path, nats_url: str, redis_url: str, *extra: str) -> list[str]:
    return ["--nats-url", nats_url, "--redis-url", redis_url, "--data-dir",
            str(tmp_path / "data"), "--grpc-listen", f"127.0.0.1:{free_port()}",
            "--partitions", "2", "--log-format", "json", *extra]


def bridge_args(nats_url: str, *extra: str) -> list[str]:
    return ["bridge", "--zmq-endpoint", f"tcp://127.0.0.1:{free_port()}", "--model", "m",
            "--worker-id", "w", "--nats-url", nats_url, "--log-format", "json", *extra]


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def assert_no_secret(what: str, text: str) -> None:
    found = [secret for secret in PLANTED if secret in text]
    assert not found, f"{what} printed {found}:\n{text}"


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[tuple[ConfiguredNats, RedisServer]]:
    """A nats-server and a redis-server that both require a password."""
    nats_server = ConfiguredNats(
        tmp_path / "nats", f'authorization {{ user: u, password: "{NATS_SECRET}" }}\n').start()
    redis_server = RedisServer(tmp_path / "redis", password=REDIS_SECRET).start()
    yield nats_server, redis_server
    redis_server.stop()
    nats_server.stop()


@pytest.mark.integration
def test_no_secret_in_what_the_processes_print(
        tmp_path: Path, guarded: tuple[ConfiguredNats, RedisServer]) -> None:
    """Banners, logs (start-up, an outage of NATS, shutdown), /metrics and /healthz of
    `kv-indexer serve` with a reader process and of `kv-publisher bridge`: the passwords
    of their NATS and Redis URLs appear nowhere; the banners show them as ***."""
    nats_server, redis_server = guarded
    nats_url = nats_server.url("u", NATS_SECRET)
    metrics_port, bridge_port = free_port(), free_port()
    serve = _spawn("indexer.app", serve_args(
        tmp_path, nats_url, redis_server.url, "--grpc-processes", "2",
        "--metrics-listen", f"127.0.0.1:{metrics_port}"))
    bridge = None
    bodies: list[str] = []
    try:
        serve.wait_for('"serving"')  # the banner, a JSON log line in JSON-log mode
        assert f'"nats": "nats://u:***@127.0.0.1:{nats_server.port} (external)"' in serve.text
        assert f'"index": "redis redis://:***@127.0.0.1:{redis_server.port}/0"' in serve.text
        serve.wait_for('"reader_serving"')
        bridge = _spawn("publisher.cli", bridge_args(
            nats_url, "--metrics-listen", f"127.0.0.1:{bridge_port}"))
        bridge.wait_for("kv-publisher bridge:")
        assert f"-> nats://u:***@127.0.0.1:{nats_server.port} as m / w" in bridge.text
        for port, path in ((metrics_port, "/metrics"), (bridge_port, "/metrics"),
                           (bridge_port, "/healthz")):
            bodies.append(http_get(port, path)[1])

        nats_server.stop()  # the bridge's health says where it reconnects to
        asyncio.run(eventually(lambda: is_true(http_get(bridge_port, "/healthz")[0] == 503),
                               30))
        status, body = http_get(bridge_port, "/healthz")
        bodies.append(body)
        assert status == 503, body
        assert f"reconnecting to nats://u:***@127.0.0.1:{nats_server.port}" in body, body
        serve.wait_for('"nats_error"')
        nats_server.start()
        asyncio.run(eventually(lambda: is_true(http_get(bridge_port, "/healthz")[0] == 200),
                               30))
    finally:
        outputs = {"kv-indexer serve": serve.stop()}
        if bridge is not None:
            outputs["kv-publisher bridge"] = bridge.stop()
    for what, text in outputs.items():
        assert_no_secret(what, text)
    for body in bodies:
        assert_no_secret("an HTTP answer", body)
    assert serve.proc.returncode == 0, outputs["kv-indexer serve"]
    assert bridge is not None and bridge.proc.returncode == 0, outputs["kv-publisher bridge"]


@pytest.mark.integration
def test_no_secret_when_a_password_is_refused(
        tmp_path: Path, guarded: tuple[ConfiguredNats, RedisServer]) -> None:
    """A wrong NATS password (serve and bridge stop at start-up with one line naming the
    flags to check), a wrong Redis password (serve runs NOT_SERVING and says why): still
    no password in any output."""
    nats_server, redis_server = guarded
    wrong_nats = nats_server.url("u", WRONG_SECRET)
    right_nats = nats_server.url("u", NATS_SECRET)
    wrong_redis = f"redis://:{WRONG_SECRET}@127.0.0.1:{redis_server.port}/0"
    outputs: dict[str, str] = {}
    with running("indexer.app", serve_args(tmp_path / "a", wrong_nats, redis_server.url,
                                           "--metrics-listen", "")) as out:
        out.wait_for("refused the credentials")
        out.wait_for(f"nats://u:***@127.0.0.1:{nats_server.port}")  # nats_connecting
        assert out.proc.wait(30) == 1, out.text
    outputs["serve, wrong NATS password"] = out.text
    with running("publisher.cli", bridge_args(wrong_nats)) as out:
        out.wait_for("refused the credentials")
        assert out.proc.wait(30) == 1, out.text
    outputs["bridge, wrong NATS password"] = out.text
    with running("indexer.app", serve_args(tmp_path / "b", right_nats, wrong_redis,
                                           "--metrics-listen", "")) as out:
        out.wait_for('"serving"')
        out.wait_for("invalid username-password pair")
        assert f"redis://:***@127.0.0.1:{redis_server.port}/0" in out.text
    outputs["serve, wrong Redis password"] = out.text
    for what, text in outputs.items():
        assert_no_secret(what, text)


def test_structlog_configuration_redacts(capsys: pytest.CaptureFixture[str]) -> None:
    """configure_logging puts the redaction in the processor chain of every logger."""
    from kvcore.runtime import configure_logging

    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        configure_logging("json", "info")
        structlog.configure(cache_logger_on_first_use=False)  # nothing outlives the test
        structlog.get_logger("t").info("connecting", url=f"nats://u:{NATS_SECRET}@h:4222")
        logging.getLogger("nats.aio.client").error("nats: error on nats://u:%s@h", NATS_SECRET)
    finally:
        structlog.configure(**saved)
        root.handlers[:] = handlers
        root.setLevel(level)
    err = capsys.readouterr().err
    assert "nats://u:***@h:4222" in err and "nats: error on nats://u:***@h" in err
    assert NATS_SECRET not in err
