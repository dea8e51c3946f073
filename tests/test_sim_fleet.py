"""`kv-sim fleet` (`make sim`) against a running `kv-indexer serve`, both as the commands a
newcomer runs: the service writes its run file, the fleet finds the service's NATS in it
(the embedded server is on whatever port was free), and the index answers with hits for
the fleet's shared prompts. A NATS that is not there, or not the service's, ends the fleet
at once with one line and exit status 1.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats import connect as nats_connect

from indexer.client import IndexerClient, Query
from indexer.runfile import Endpoints, read_endpoints
from kvcore.topology import StreamSettings, ensure_stream
from kvsim.mock_engines import synthetic_prompts
from tests.support.servers import ConfiguredNats, free_port, terminate

BIN = Path(sys.executable).parent
ENGINES, BLOCK_SIZE, PREFIX_TOKENS, PREFIXES = 3, 16, 1_024, 2
FLEET_ARGS = ["--engines", str(ENGINES), "--block-size", str(BLOCK_SIZE),
              "--prefix-tokens", str(PREFIX_TOKENS), "--prefixes", str(PREFIXES),
              "--capacity-blocks", "20000", "--rate", "30", "--seed", "7"]


def wait_for_endpoints(data_dir: Path, proc: subprocess.Popen[bytes],
                       timeout: float = 60.0) -> Endpoints:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "kv-indexer serve exited during start-up"
        found = read_endpoints(data_dir)
        if found is not None:
            return found
        time.sleep(0.2)
    raise AssertionError("kv-indexer serve wrote no run file")


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[Path, Endpoints]]:
    """`kv-indexer serve` on its embedded NATS (port 4222 if free, else any), its run
    file in tmp_path/.kv-indexer as `make run` would leave it in the checkout."""
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [str(BIN / "kv-indexer"), "serve", "--grpc-listen", "127.0.0.1:0",
         "--metrics-listen", "", "--log-level", "warning"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        endpoints = wait_for_endpoints(tmp_path / ".kv-indexer", proc)
        assert endpoints.pid == proc.pid
        yield tmp_path, endpoints
    finally:
        terminate(proc)
        log.close()
    assert not (tmp_path / ".kv-indexer" / "endpoints.json").exists(), \
        "serve left its run file behind"


def shared_prefixes() -> list[list[int]]:
    """The fleet's system prompts: its generator's prompts, cut to the prefix length."""
    prompts = synthetic_prompts(seed=7, n_prefixes=PREFIXES, prefix_tokens=PREFIX_TOKENS,
                                max_suffix=512)
    seen: dict[tuple[int, ...], None] = {}
    for prompt in prompts:
        seen.setdefault(tuple(prompt[:PREFIX_TOKENS]))
        if len(seen) == PREFIXES:
            return [list(p) for p in seen]
    raise AssertionError("unreachable")


def best_match(client: IndexerClient, model: str, tokens: list[int]) -> int:
    answer = client.score(Query(model=model, token_ids=tokens))
    return max((s.matched_blocks for s in answer.scores), default=0)


def test_fleet_feeds_the_running_service(service: tuple[Path, Endpoints]) -> None:
    """`kv-sim fleet` from the service's directory, no --nats-url: every engine registers,
    each shared prompt is a full hit, and nothing is invented for other models or fresh
    tokens."""
    workdir, endpoints = service
    log = (workdir / "fleet.log").open("wb")
    fleet = subprocess.Popen([str(BIN / "kv-sim"), "fleet", *FLEET_ARGS], cwd=workdir,
                             stdout=log, stderr=subprocess.STDOUT)
    full = PREFIX_TOKENS // BLOCK_SIZE
    try:
        with IndexerClient(endpoints.grpc_target, timeout=5.0) as client:
            deadline = time.monotonic() + 60
            matches = [0] * PREFIXES
            while time.monotonic() < deadline and min(matches) < full:
                assert fleet.poll() is None, (workdir / "fleet.log").read_text()
                matches = [best_match(client, "sim/model", p) for p in shared_prefixes()]
                time.sleep(0.5)
            assert matches == [full] * PREFIXES
            workers = {w.worker_id for w in client.list_workers()}
            assert workers == {f"engine-{w:03d}" for w in range(ENGINES)}
            assert best_match(client, "other/model", shared_prefixes()[0]) == 0
            fresh = list(range(70_000, 70_000 + PREFIX_TOKENS))  # beyond the fleet's ids
            assert best_match(client, "sim/model", fresh) == 0
    finally:
        fleet.send_signal(signal.SIGINT)  # Ctrl-C: a clean stop
        code = fleet.wait(timeout=30)
        log.close()
    output = (workdir / "fleet.log").read_text()
    assert code == 0, output
    assert f"-> {endpoints.nats_url}" in output  # the service's NATS, from the run file


def run_fleet(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "kv-sim"), "fleet", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, check=False)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kv-sim fleet: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    return lines[0]


def test_unreachable_nats_fails_at_once(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    started = time.monotonic()
    line = one_line(run_fleet(["--nats-url", f"nats://127.0.0.1:{port}",
                               "--nats-start-timeout", "2"], tmp_path))
    assert time.monotonic() - started < 30
    assert f"cannot connect to NATS at nats://127.0.0.1:{port}" in line


def test_nats_without_the_service_stream_is_refused(tmp_path: Path) -> None:
    """A NATS no indexer uses (another server on 4222, say): nothing is published there."""
    nats = ConfiguredNats(tmp_path).start()
    try:
        line = one_line(run_fleet(["--nats-url", nats.url()], tmp_path))
    finally:
        nats.stop()
    assert "has no KV_EVENTS stream" in line


def test_no_service_running(tmp_path: Path) -> None:
    line = one_line(run_fleet([], tmp_path))
    assert "no running kv-indexer serve found" in line and "make run" in line


def test_stale_run_file(tmp_path: Path) -> None:
    """The run file of a service that was SIGKILLed names a dead pid: said, not trusted."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_dir = tmp_path / ".kv-indexer"
    run_dir.mkdir()
    (run_dir / "endpoints.json").write_text(
        f'{{"nats_url": "nats://127.0.0.1:4222", "grpc_target": "", "pid": {dead.pid}}}')
    line = one_line(run_fleet([], tmp_path))
    assert f"pid {dead.pid}, which is gone" in line
    assert os.stat(run_dir / "endpoints.json")  # left for the operator to see


def test_bridge_without_its_nats_fails_loudly(tmp_path: Path) -> None:
    """`kv-publisher bridge` pointed at a NATS that is not there says so at the first
    refused attempt, and gives up after --nats-start-timeout with one line, exit 1: it
    neither waits silently nor publishes anywhere else."""
    port = free_port()
    result = subprocess.run(
        [*bridge_argv(f"nats://127.0.0.1:{port}"), "--nats-start-timeout", "2"],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert '"nats_connecting"' in lines[0]
    assert '"nats_connect_failed"' in lines[1]  # said at once, not only at the end
    assert lines[-1] == (f"kv-publisher bridge: cannot connect to NATS at nats://127.0.0.1:"
                         f"{port} within 2 s (last error: ConnectionRefusedError(111, "
                         f"\"Connect call failed ('127.0.0.1', {port})\"))")
    assert result.stdout == ""  # no "bridge ... ->" line: it never ran


def bridge_argv(nats_url: str) -> list[str]:
    return [str(BIN / "kv-publisher"), "bridge", "--zmq-endpoint",
            f"tcp://127.0.0.1:{free_port()}", "--model", "m", "--worker-id", "w",
            "--nats-url", nats_url, "--log-format", "json"]


def bridge_start_output(nats_url: str, tmp_path: Path) -> tuple[str, str]:
    """(stdout, stderr) of a bridge run until it bridges, then stopped with SIGTERM."""
    out, err = (tmp_path / "out").open("w+"), (tmp_path / "err").open("w+")
    proc = subprocess.Popen(bridge_argv(nats_url), stdout=out, stderr=err, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 30
        while "kv-publisher bridge:" not in (tmp_path / "out").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "err").read_text()
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    out.seek(0)
    err.seek(0)
    return out.read(), err.read()


def test_bridge_warns_on_a_nats_no_indexer_uses(tmp_path: Path) -> None:
    """Another NATS on the port (no KV_EVENTS stream): the bridge says so at once, and
    keeps its batches for when an indexer creates the stream; with the stream, no word."""
    nats = ConfiguredNats(tmp_path).start()
    try:
        _, stderr = bridge_start_output(nats.url(), tmp_path)
        warnings = [json.loads(line) for line in stderr.splitlines()
                    if '"no_event_stream"' in line]
        assert len(warnings) == 1 and warnings[0]["level"] == "warning", stderr
        assert warnings[0]["url"] == nats.url()
        asyncio.run(create_event_stream(nats.url()))
        _, stderr = bridge_start_output(nats.url(), tmp_path)
        assert "no_event_stream" not in stderr
    finally:
        nats.stop()


async def create_event_stream(url: str) -> None:
    nc = await nats_connect(url)
    try:
        await ensure_stream(nc.jetstream(), StreamSettings())
    finally:
        await nc.close()
