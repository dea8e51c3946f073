"""What every command says about itself: `--version` (and whether the C extension is in
use), `kv-indexer health` against a real gRPC health service, and the warning
`kv-indexer serve` and `kv-publisher bridge` log at start without the C extension."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import pytest
from grpc_health.v1 import health, health_pb2
from structlog.testing import capture_logs

import indexer.app
import kvcore.runtime
import publisher.cli
from indexer import cli
from indexer.index.memory import MemoryIndex
from kvcore import __version__
from kvcore.about import NATIVE_MISSING, NATIVE_MISSING_SHORT
from kvcore.keys import NATIVE
from kvsim import cli as sim_cli
from tests.support.grpc_scenario import serving
from tests.support.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
NATIVE_WORD = "yes" if NATIVE else NATIVE_MISSING_SHORT
MAINS: dict[str, Callable[[Sequence[str]], int]] = {
    "kv-indexer": cli.main, "kv-publisher": publisher.cli.main, "kv-sim": sim_cli.main}


@pytest.mark.parametrize("prog", sorted(MAINS))
@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(prog: str, flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`<prog> --version` prints the version and whether kvcore._native is in use, exit 0."""
    try:
        code: object = MAINS[prog]([flag])
    except SystemExit as exc:  # argparse's version action
        code = exc.code
    assert code in (0, None)
    assert capsys.readouterr().out == f"{prog} {__version__} (C extension: {NATIVE_WORD})\n"


def test_installed_scripts_print_the_version() -> None:
    """The console scripts of this install run and agree with kvcore.__version__."""
    bin_dir = Path(sys.executable).parent
    for prog in sorted(MAINS):
        out = subprocess.run([str(bin_dir / prog), "--version"], capture_output=True,
                             text=True, check=True, timeout=60).stdout
        assert out.split()[:2] == [prog, __version__]


class TestHealth:
    """`kv-indexer health`: grpc.health.v1 Check; exit 0 only on SERVING."""

    async def run(self, *args: str) -> int:
        return await asyncio.to_thread(cli.main, ["health", *args])

    async def test_follows_the_health_service(self, capsys: pytest.CaptureFixture[str]) -> None:
        """SERVING exits 0, NOT_SERVING 1, for the server ("") and a named service; an
        unknown service name is NOT_FOUND, exit 1."""
        servicer = health.aio.HealthServicer()
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        await servicer.set("kvindex.v1.KvIndexer", health_pb2.HealthCheckResponse.NOT_SERVING)
        async with serving(MemoryIndex(), health_servicer=servicer) as (_, port):
            capsys.readouterr()  # the server's start-up log line
            target = f"127.0.0.1:{port}"
            assert await self.run("--target", target) == 0
            assert capsys.readouterr().out == "SERVING\n"
            assert await self.run("--target", target, "--service",
                                  "kvindex.v1.KvIndexer") == 1
            assert capsys.readouterr().out == "NOT_SERVING\n"
            await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            assert await self.run("--target", target) == 1
            assert capsys.readouterr().out == "NOT_SERVING\n"
            assert await self.run("--target", target, "--service", "nope") == 1
            assert "NOT_FOUND" in capsys.readouterr().err

    async def test_target_from_environment(self, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
        async with serving(MemoryIndex()) as (_, port):
            capsys.readouterr()  # the server's start-up log line
            monkeypatch.setenv("KV_INDEXER_TARGET", f"127.0.0.1:{port}")
            assert await self.run() == 0
            assert capsys.readouterr().out == "SERVING\n"

    def test_unreachable_exits_1(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert cli.main(["health", "--target", f"127.0.0.1:{free_port()}",
                         "--timeout", "2"]) == 1
        assert "UNAVAILABLE" in capsys.readouterr().err

    def test_bad_timeout_exits_2(self) -> None:
        with pytest.raises(SystemExit) as exc:
            cli.main(["health", "--timeout", "0"])
        assert exc.value.code == 2


def _close(coro: Coroutine[Any, Any, Any], *_: object) -> None:
    coro.close()  # the service or the bridge is not run here


def _native_warnings(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "native_extension_missing"]


@pytest.mark.parametrize("native", [True, False], ids=["native", "pure-python"])
def test_serve_warns_without_the_extension(native: bool,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """`kv-indexer serve` logs one warning at start when kvcore._native is missing (pip
    hides a failed optional build), none when it is there."""
    monkeypatch.setattr(kvcore.runtime, "NATIVE", native)
    monkeypatch.setattr(indexer.app, "configure_logging", lambda *_: None)
    monkeypatch.setattr(indexer.app, "run_event_loop", _close)
    with capture_logs() as logs:
        assert indexer.app.main([]) == 0
    warnings = _native_warnings(logs)
    assert warnings == ([] if native else [
        {"event": "native_extension_missing", "log_level": "warning",
         "detail": NATIVE_MISSING}])


@pytest.mark.parametrize("native", [True, False], ids=["native", "pure-python"])
def test_bridge_warns_without_the_extension(native: bool,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """So does `kv-publisher bridge`."""
    monkeypatch.setattr(kvcore.runtime, "NATIVE", native)
    monkeypatch.setattr(publisher.cli, "configure_logging", lambda *_: None)
    monkeypatch.setattr(publisher.cli.asyncio, "run", _close)
    with capture_logs() as logs:
        assert publisher.cli.main(["bridge", "--zmq-endpoint", "tcp://127.0.0.1:1",
                                   "--model", "m", "--worker-id", "w"]) == 0
    assert len(_native_warnings(logs)) == (0 if native else 1)
