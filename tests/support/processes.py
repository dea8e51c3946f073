"""Child processes of tests: `kv-indexer serve` that can be SIGKILLed, and whether a
process has exited."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def exited(pid: int) -> bool:
    """True once `pid` is gone, or has exited and only waits to be reaped (a zombie still
    answers kill(0); on Linux its /proc state says Z)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:  # no /proc here, or it exited just now: ask again later
        return False
    return state == "Z"


def exits_within(pid: int, within: float) -> bool:
    """Poll `exited(pid)` for up to `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if exited(pid):
            return True
        time.sleep(0.05)
    return False


class IndexerProcess:
    """`kv-indexer serve` as a child process that can be SIGKILLed and started again."""

    def __init__(self, nats_url: str, redis_url: str, log_dir: Path, *, partitions: int,
                 snapshot_every_batches: int = 100_000) -> None:
        self.args = ["--nats-url", nats_url, "--redis-url", redis_url, "--grpc-listen", "",
                     "--metrics-listen", "", "--partitions", str(partitions),
                     "--snapshot-every-batches", str(snapshot_every_batches),
                     "--liveness-grace", "3600", "--log-format", "json"]
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        code = "import sys; from indexer.app import main; sys.exit(main(sys.argv[1:]))"
        log = (self.log_dir / f"indexer-{self.starts}.log").open("wb")
        self.proc = subprocess.Popen([sys.executable, "-c", code, *self.args], stdout=log,
                                     stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.starts += 1

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def count(self, event: str) -> int:
        return sum(log.read_text().count(f'"event": "{event}"')
                   for log in self.log_dir.glob("indexer-*.log"))
