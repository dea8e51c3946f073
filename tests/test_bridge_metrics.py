"""`kv-publisher bridge --metrics-listen`: Prometheus /metrics and /healthz of a real bridge
process, following a mock engine and a private nats-server that is stopped and started."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from indexer.embedded import EmbeddedNats, free_port
from kvcore.topology import StreamSettings, ensure_stream
from kvsim.mock_engines import MockEngine
from publisher.cli import parse_bridge_args, parse_listen
from publisher.publisher import KVEventPublisher
from tests.support.polling import eventually
from tests.support.prompts import prompts

pytestmark = pytest.mark.integration

MODEL = "mock/model"
WORKER = "engine-0"
LABELS = f'model="{MODEL}",worker="{WORKER}"'


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def fetch(url: str) -> tuple[int, str]:
    return await asyncio.to_thread(get, url)


def sample(body: str, name: str, labels: str = LABELS) -> float | None:
    """The value of series `name{labels}` (labels in any order) in a scrape, if there."""
    want = set(labels.split(","))
    for line in body.splitlines():
        match = re.fullmatch(r"(\w+)\{(.*)\} (\S+)", line)
        if match and match.group(1) == name and set(match.group(2).split(",")) == want:
            return float(match.group(3))
    return None


class Bridge:
    """`kv-publisher bridge` as a child process, its output in a file."""

    def __init__(self, args: list[str], log: Path) -> None:
        code = "import sys; from publisher.cli import main; sys.exit(main(sys.argv[1:]))"
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-c", code, "bridge", *args],
                                     stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@pytest.fixture
def engine() -> Iterator[MockEngine]:
    mock = MockEngine(capacity_blocks=64, block_size=16, endpoint="tcp://127.0.0.1:*",
                      replay_endpoint="tcp://127.0.0.1:*").start()
    yield mock
    mock.close()


class TestBridgeEndpoints:
    """The bridge's /metrics and /healthz answer, and follow NATS going away and back."""

    async def test_metrics_and_health_follow_nats(self, nats_server: EmbeddedNats,
                                                  engine: MockEngine, tmp_path: Path) -> None:
        """Healthy and counting; 503 with the reason while NATS is down, buffering; healthy
        again, and everything buffered published, once it is back."""
        nc = await nats.connect(nats_server.url)
        await ensure_stream(nc.jetstream(), StreamSettings(partitions=2))
        await nc.close()
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        bridge = Bridge(["--zmq-endpoint", engine.endpoint, "--replay-endpoint",
                         engine.replay_endpoint or "", "--model", MODEL, "--worker-id", WORKER,
                         "--nats-url", nats_server.url, "--metrics-listen", f"127.0.0.1:{port}",
                         "--log-format", "json"], tmp_path / "bridge.log")
        queries = prompts(40)
        try:
            async def healthy() -> bool:
                try:
                    return (await fetch(f"{base}/healthz"))[0] == 200
                except OSError:
                    return False  # not listening yet

            await eventually(healthy, timeout=30)
            status, body = await fetch(f"{base}/healthz")
            assert status == 200 and body.startswith("ok: NATS connected")

            async def metric(name: str, labels: str = LABELS) -> float | None:
                return sample((await fetch(f"{base}/metrics"))[1], name, labels)

            async def at_least(name: str, value: float, labels: str = LABELS) -> bool:
                got = await metric(name, labels)
                return got is not None and got >= value

            # SUB may not be connected for the first batch: replay fills that gap
            for tokens in queries[:5]:
                engine.serve(tokens)
            await eventually(lambda: at_least("kv_publisher_published_batches_total", 5))
            engine.drop_next(2)  # a gap in the engine's seq, filled from replay
            for tokens in queries[5:10]:
                engine.serve(tokens)
            rank0 = f'{LABELS},dp_rank="0"'
            await eventually(lambda: at_least("kv_publisher_engine_gaps_filled_total", 1, rank0))
            body = (await fetch(f"{base}/metrics"))[1]
            assert sample(body, "kv_publisher_nats_connected") == 1.0
            assert sample(body, "kv_publisher_healthy") == 1.0
            assert sample(body, "kv_publisher_max_payload_bytes") == 1024 * 1024
            assert (sample(body, "kv_publisher_engine_seq_gaps_total", rank0) or 0) >= 1
            assert (sample(body, "kv_publisher_published_bytes_total") or 0) > 0
            for name in ("kv_publisher_buffered_batches", "kv_publisher_buffered_bytes",
                         "kv_publisher_refused_batches_total", "kv_publisher_splits_total",
                         "kv_publisher_split_events_total", "kv_publisher_publish_retries_total",
                         "kv_publisher_max_payload_errors_total"):
                assert sample(body, name) is not None, name
            for name in ("kv_publisher_dropped_batches", "kv_publisher_dropped_blocks",
                         "kv_publisher_engine_skipped_events"):
                assert f"# TYPE {name}_total counter" in body, name
            assert sample(body, "kv_publisher_resyncs_total", rank0) is not None

            nats_server.kill()

            async def unhealthy() -> bool:
                status, body = await fetch(f"{base}/healthz")
                return status == 503 and "NATS disconnected" in body

            await eventually(unhealthy, timeout=30)
            for tokens in queries[10:20]:
                engine.serve(tokens)  # buffered by the bridge meanwhile
            await eventually(lambda: at_least("kv_publisher_buffered_batches", 1))
            assert await metric("kv_publisher_nats_connected") == 0.0
            assert await metric("kv_publisher_healthy") == 0.0
            published = await metric("kv_publisher_published_batches_total")

            nats_server.start()
            await eventually(healthy, timeout=30)

            async def drained() -> bool:
                body = (await fetch(f"{base}/metrics"))[1]
                return (sample(body, "kv_publisher_buffered_batches") == 0.0
                        and (sample(body, "kv_publisher_published_batches_total") or 0)
                        >= (published or 0) + 10)

            await eventually(drained, timeout=30)
            assert await metric("kv_publisher_nats_connected") == 1.0
            assert (await fetch(f"{base}/nothing"))[0] == 404
        finally:
            assert bridge.stop() == 0, bridge.log.read_text()[-2000:]
        assert "/metrics and /healthz on 127.0.0.1:" in bridge.log.read_text()

    async def test_stalled_sink_is_unhealthy(self, nats_server: EmbeddedNats) -> None:
        """Connected, but nothing acknowledged (no stream to store into): 503, and why."""
        pub = KVEventPublisher(MODEL, WORKER, block_size=16, nats_url=nats_server.url,
                               stall_s=0.0)
        await pub.start()
        try:
            assert pub.health() == (True, "ok: NATS connected, 0 batches pending")
            pub.stored([1], list(range(16)))
            pub.end_step()

            async def stalled() -> bool:
                healthy, reason = pub.health()
                return not healthy and reason.startswith("sink stalled: 1 batches pending")

            await eventually(stalled)
        finally:
            pub._stop.set()  # nothing can be flushed: do not wait for it
            await pub.close()


class TestBridgeSettings:
    """--metrics-listen is checked at start-up; kv-publisher stays free of the indexer."""

    def test_metrics_listen_values(self) -> None:
        base = ["--zmq-endpoint", "tcp://127.0.0.1:5557", "--model", "m", "--worker-id", "w"]
        assert parse_bridge_args(base).metrics_listen == ""  # off unless asked for
        assert parse_bridge_args([*base, "--metrics-listen", "0.0.0.0:9401"]).metrics_listen
        assert parse_listen(":9401") == ("0.0.0.0", 9401)
        assert parse_listen("[::1]:0") == ("::1", 0)
        with pytest.raises(SystemExit):
            parse_bridge_args([*base, "--metrics-listen", "9401"])

    def test_publisher_imports_no_indexer_or_redis(self) -> None:
        """`kv-publisher` loads neither the indexer package nor redis."""
        code = ("import sys, publisher.cli, publisher.metrics; "
                "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
                "('indexer', 'redis')); print(bad); sys.exit(1 if bad else 0)")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                timeout=60, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
