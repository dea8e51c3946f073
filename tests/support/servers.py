"""Private redis-server processes for tests (free ports, temp dirs, killable and
restartable by the test that owns them), nats-servers started from a config file of the
test's (users, permissions: `ConfiguredNats`), and emptying a shared nats-server's
JetStream between tests. Plain nats-servers are indexer.embedded.EmbeddedNats."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import nats

from indexer.embedded import find_nats_server

# The optional Redis module (native/redis_module/kvi.c), built by `make setup`.
KVI_MODULE = Path(__file__).resolve().parents[2] / "native" / "redis_module" / "kvi.so"


def kvi_module() -> Path:
    """The built Redis module, or an error saying how to build it."""
    if not KVI_MODULE.is_file():
        raise RuntimeError(f"{KVI_MODULE} is missing: run `make redis-module` (or `make setup`)")
    return KVI_MODULE


def terminate(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL after 10 s; nothing if it is not running."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout}s")


class ConfiguredNats:
    """A nats-server run from a config file: `config` (e.g. an `authorization` block)
    after the listen address and a JetStream store in `workdir`, or a `config_file` of
    its own, whose address is overridden on the command line (its JetStream store is its
    own business). Its log, with every permissions violation and refused password, is in
    `log_text()`."""

    def __init__(self, workdir: Path, config: str = "", port: int | None = None, *,
                 config_file: Path | None = None) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log_path = workdir / "nats-server.log"
        self.argv = ["-c", str(config_file)] if config_file is not None else []
        if config_file is None:
            config_path = workdir / "nats-server.conf"
            config_path.write_text(
                f'listen: "127.0.0.1:{self.port}"\n'
                f'jetstream {{ store_dir: "{workdir / "jetstream"}" }}\n{config}')
            self.argv = ["-c", str(config_path)]
        else:
            self.argv += ["-a", "127.0.0.1", "-p", str(self.port)]
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, user: str | None = None, password: str | None = None) -> str:
        """nats://[user:password@]127.0.0.1:port"""
        auth = f"{user}:{password}@" if user is not None else ""
        return f"nats://{auth}127.0.0.1:{self.port}"

    def start(self) -> ConfiguredNats:
        self.proc = subprocess.Popen(
            [find_nats_server(), *self.argv, "-l", str(self.log_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_port(self.port, self.proc, "nats-server", 10)
        return self

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self) -> None:
        terminate(self.proc)
        self.proc = None


class RedisServer:
    """A redis-server on a free port with its own dir; no persistence unless asked;
    `modules`: loaded at start (`--loadmodule`)."""

    def __init__(self, workdir: Path, port: int | None = None, *,
                 password: str | None = None, modules: tuple[Path, ...] = ()) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found: run `make setup` (installs it)")
        self.binary = binary
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.password = password  # --requirepass; `url` carries it
        self.modules = modules
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        return [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.workdir), "--logfile",
                str(self.workdir / "redis.log"), "--protected-mode", "no",
                *(["--requirepass", self.password] if self.password else []),
                *(arg for module in self.modules for arg in ("--loadmodule", str(module)))]

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(self.argv(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        _wait_for_port(self.port, self.proc, "redis-server", 10)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        terminate(self.proc)
        self.proc = None


def redis_speaks_tls() -> bool:
    """Whether this redis-server was built with TLS (Debian's is): it accepts --tls-port."""
    binary = shutil.which("redis-server")
    if binary is None:
        return False
    out = subprocess.run([binary, "--port", "0", "--tls-port", "0"], capture_output=True,
                         text=True, timeout=10, check=False)
    return "not listen anywhere" in out.stdout + out.stderr


class TlsRedisServer(RedisServer):
    """A redis-server that speaks only TLS (on `port`), with the test PKI's server
    certificate; `client_certs`: clients must present a certificate signed by `ca`.
    `users`: ACL rules, one user each (`"alice on >pw ~* &* +@all"`)."""

    def __init__(self, workdir: Path, *, cert: Path, key: Path, ca: Path,
                 client_certs: bool = False, users: tuple[str, ...] = (),
                 plain_port: bool = False) -> None:
        super().__init__(workdir)
        self.cert, self.key, self.ca = cert, key, ca
        self.client_certs = client_certs
        self.users = users
        # Also plain TCP on another port (bench/tls.py compares the two on one server).
        self.plain_port = free_port() if plain_port else 0

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        argv = super().argv()
        argv[argv.index("--port") + 1] = str(self.plain_port)  # 0: no plaintext port
        argv += ["--tls-port", str(self.port), "--tls-cert-file", str(self.cert),
                 "--tls-key-file", str(self.key), "--tls-ca-cert-file", str(self.ca),
                 "--tls-auth-clients", "yes" if self.client_certs else "no"]
        for rule in self.users:
            argv += ["--user", *rule.split()]  # one word an argument: a quoted rule is a name
        return argv


async def empty_jetstream(url: str) -> list[str]:
    """Delete every stream on the nats-server at `url` (KV buckets and object stores are
    streams too: KV_<bucket>, OBJ_<store>), with their consumers and messages. Returns the
    names deleted."""
    nc = await nats.connect(url, allow_reconnect=False)
    try:
        jsm = nc.jsm()
        names = sorted(info.config.name for info in await jsm.streams_info() if info.config.name)
        for name in names:
            await jsm.delete_stream(name)
        if await jsm.streams_info():
            raise RuntimeError(f"streams left on {url} after deleting {names}")
        return names
    finally:
        await nc.close()
