"""What a newcomer meets first (issue 19's papercuts): `make run` without redis-server, a
quiet start, the banner as a log line when logs are JSON, a loud word when the C
extension is missing, and a README quickstart that shows the local fleet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import indexer.app
import publisher.metrics
from indexer.app import IndexerService
from indexer.config import ServiceConfig
from indexer.runfile import read_endpoints
from kvcore.about import NATIVE_MISSING_SHORT
from publisher.metrics import BridgeHttpServer
from publisher.publisher import KVEventPublisher
from tests.support.servers import terminate

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# nats_started, nats_connecting, grpc_listening, consumers_started, serving: what an
# operator needs at start, one line each (it was 24 for an empty in-memory index).
MAX_START_LINES = 6


def make_dry_run(target: str) -> str:
    """The commands `make TARGET` would run, every prerequisite included (-B); as a
    top-level make, also when the suite itself runs under `make test`."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(["make", "--no-print-directory", "-n", "-B", target], cwd=ROOT,
                          capture_output=True, text=True, check=True, timeout=60,
                          env=env).stdout


@pytest.mark.parametrize("target", ["run", "sim", "demo"])
def test_local_targets_need_no_redis_server(target: str) -> None:
    assert "redis-server" not in make_dry_run(target)


def test_tests_still_get_redis_server() -> None:
    assert "redis-server" in make_dry_run("pytest")


def test_make_sim_runs_the_fleet() -> None:
    assert make_dry_run("sim").strip().splitlines()[-1].endswith("kv-sim fleet")


def test_readme_quickstart() -> None:
    """The quickstart shows the fleet in one command and where the commands live."""
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("```sh", 1)[1].split("```", 1)[0]
    for command in ("make run", "make sim", "make test"):
        assert command in quickstart, command
    head = readme.split("## What it is", 1)[0]
    assert ".venv/bin" in head


def serve(tmp_path: Path, log_format: str) -> tuple[list[str], list[str]]:
    """(stdout lines, stderr lines) of `kv-indexer serve` on its embedded NATS, from start
    to a clean SIGTERM stop once it serves."""
    out, err = (tmp_path / "out").open("w+"), (tmp_path / "err").open("w+")
    proc = subprocess.Popen(
        [str(BIN / "kv-indexer"), "serve", "--log-format", log_format, "--data-dir",
         str(tmp_path / "data"), "--grpc-listen", "127.0.0.1:0", "--metrics-listen", ""],
        stdout=out, stderr=err)
    try:
        deadline = time.monotonic() + 60
        while read_endpoints(tmp_path / "data") is None:  # written once it serves
            assert proc.poll() is None and time.monotonic() < deadline, "serve did not start"
            time.sleep(0.1)
        time.sleep(0.5)  # the rebuilds of the empty partitions end
    finally:
        terminate(proc)
    assert proc.returncode == 0
    out.seek(0)
    err.seek(0)
    return out.read().splitlines(), err.read().splitlines()


def test_json_start_is_quiet_and_all_json(tmp_path: Path) -> None:
    stdout, stderr = serve(tmp_path, "json")
    assert stdout == []  # no plain-text banner among the JSON lines
    events: list[dict[str, Any]] = [json.loads(line) for line in stderr]
    names = [e["event"] for e in events]
    assert "serving" in names
    start = names[:names.index("serving") + 1]
    assert len(start) <= MAX_START_LINES, start
    serving = events[names.index("serving")]
    assert serving["level"] == "info"
    assert set(serving) >= {"grpc", "nats", "metrics", "index", "partitions", "c_ext", "loop"}
    assert serving["nats"].startswith("nats://127.0.0.1:") and "(embedded)" in serving["nats"]
    assert serving["index"] == "in-memory"
    assert len(events) <= MAX_START_LINES + 2, names  # and stopping is as quiet


def test_console_banner_on_stdout(tmp_path: Path) -> None:
    stdout, stderr = serve(tmp_path, "console")
    assert stdout[0] == "kv-indexer serving"
    fields = dict(line.split(None, 1) if not line.startswith("  C ext") else
                  ("C ext", line.split("C ext", 1)[1]) for line in stdout[1:])
    assert set(fields) == {"gRPC", "NATS", "metrics", "index", "partitions", "C ext", "loop"}
    assert len(stderr) <= MAX_START_LINES + 2, stderr


async def test_banner_says_when_the_extension_is_missing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    service = IndexerService(ServiceConfig(grpc_listen="127.0.0.1:0"))
    monkeypatch.setattr(indexer.app, "NATIVE", False)
    assert service.banner_fields()["C ext"] == NATIVE_MISSING_SHORT
    assert "  C ext    MISSING: running the pure-Python fallback" in service.banner()
    monkeypatch.setattr(indexer.app, "NATIVE", True)
    assert service.banner_fields()["C ext"] == "yes"


@pytest.mark.parametrize("command", ["kv-indexer", "kv-publisher", "kv-sim"])
def test_version_says_when_the_extension_is_missing(command: str) -> None:
    """A compiler-less install (kvcore._native cannot be imported) says so in --version."""
    module = {"kv-indexer": "indexer.cli", "kv-publisher": "publisher.cli",
              "kv-sim": "kvsim.cli"}[command]
    code = ("import sys; sys.modules['kvcore._native'] = None; "
            f"from {module} import main; main(['--version'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=False, timeout=60)
    assert result.stdout.strip().endswith(f"(C extension: {NATIVE_MISSING_SHORT})"), result


@pytest.mark.parametrize("native", [True, False], ids=["native", "pure-python"])
def test_bridge_healthz_says_when_the_extension_is_missing(
        native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bridge's /healthz (its liveness probe) stays 200, and says the C extension is
    missing on every check when it is."""
    monkeypatch.setattr(publisher.metrics, "NATIVE", native)
    never_connected = KVEventPublisher("m", "w", block_size=4, nats_url="nats://127.0.0.1:1")
    monkeypatch.setattr(never_connected, "health",
                        lambda: (True, "ok: NATS connected, 0 batches pending"))
    server = BridgeHttpServer(never_connected)
    status, _, body = server.respond("GET", "/healthz")
    assert status == 200
    lines = body.decode().splitlines()
    assert lines[0] == "ok: NATS connected, 0 batches pending"
    assert lines[1:] == ([] if native else [f"warning: C extension {NATIVE_MISSING_SHORT}"])
