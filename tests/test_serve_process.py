"""`kv-indexer serve` on its embedded default, as a process: it stops cleanly on Ctrl-C,
and its nats-server never outlives it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvcore.runtime import uvloop_installed
from tests.support.processes import exits_within
from tests.support.servers import free_port

pytestmark = pytest.mark.integration


def _start_serve(tmp_path: Path) -> tuple[subprocess.Popen[str], int, str]:
    """The service in a process group of its own, as a shell runs a foreground job;
    returns it, its nats-server's pid and its `serving` line (the banner, as JSON)."""
    code = "import sys; from indexer.app import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "--data-dir", str(tmp_path / "data"), "--grpc-listen",
         f"127.0.0.1:{free_port()}", "--metrics-listen", "", "--log-format", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    nats_pid = 0
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        if line.startswith("{") and '"nats_started"' in line:
            nats_pid = int(json.loads(line)["pid"])
        if line.startswith("{") and '"serving"' in line:
            break
        assert time.monotonic() < deadline, "kv-indexer serve did not come up"
    assert nats_pid, "no nats_started line"
    return proc, nats_pid, line


def _kill_if_left(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def test_ctrl_c_stops_the_consumers_before_nats(tmp_path: Path) -> None:
    proc, nats_pid, banner = _start_serve(tmp_path)
    try:
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends the foreground job
        output, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, output
        # The consumers drained against a live server: no failures, no timeouts.
        assert "partition_consumer_failed" not in output, output
        assert "Traceback" not in output, output
        assert exits_within(nats_pid, 10)
        if uvloop_installed():  # the default --event-loop auto serves on it
            assert json.loads(banner)["loop"] == "uvloop", banner
    finally:
        _kill_if_left(nats_pid)


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_a_killed_indexer_takes_its_nats_server_along(tmp_path: Path) -> None:
    proc, nats_pid, _ = _start_serve(tmp_path)
    try:
        proc.kill()
        proc.wait(10)
        assert exits_within(nats_pid, 10)
    finally:
        _kill_if_left(nats_pid)


@pytest.mark.parametrize("flag", ["--grpc-listen", "--metrics-listen"])
def test_a_busy_port_is_one_line_naming_the_flag(flag: str, nats_url: str,
                                                 tmp_path: Path) -> None:
    """A port someone else holds stops start-up with one line on stderr that names the
    flag (exit status 2, a usage error), not a traceback."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        listen = {"--grpc-listen": "127.0.0.1:0", "--metrics-listen": ""} | {flag: busy}
        code = "import sys; from indexer.app import main; sys.exit(main(sys.argv[1:]))"
        done = subprocess.run(
            [sys.executable, "-c", code, "--nats-url", nats_url, "--data-dir",
             str(tmp_path), "--log-format", "json", "--grpc-listen", listen["--grpc-listen"],
             "--metrics-listen", listen["--metrics-listen"]],
            capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"kv-indexer serve: {flag} {busy}"), last
    assert "Traceback" not in done.stderr
