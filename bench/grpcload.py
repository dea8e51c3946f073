"""The lean load generator (`bench/grpcload.c`): build it, run it, read what it measured.

grpc.aio clients cost about 0.2 ms of CPU per call on the two cores the server also runs
on; grpcload (HTTP/2 through libnghttp2, Debian's libnghttp2-dev) costs a few tens of
microseconds, so its figures describe the server rather than the load.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import grpc

SOURCE = Path(__file__).with_name("grpcload.c")
BINARY = Path(sys.prefix) / "bin" / "grpcload"
_STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


@dataclass(frozen=True)
class GrpcLoad:
    """A built generator and the request bodies it sends, in turn."""

    binary: Path
    bodies: Path


@dataclass
class LoadRun:
    latencies: list[float] = field(default_factory=list)  # seconds, from send
    from_schedule: list[float] = field(default_factory=list)  # seconds, from schedule
    errors: dict[str, int] = field(default_factory=dict)  # by status code name
    cpu: float = 0.0  # the generator's CPU seconds over warm-up and run
    max_lag: float = 0.0  # seconds a send trailed its schedule, at most


def build() -> Path | None:
    """The binary, compiled when missing or older than its source; None, with the reason
    printed, when there is no compiler or no libnghttp2 headers."""
    if BINARY.exists() and BINARY.stat().st_mtime >= SOURCE.stat().st_mtime:
        return BINARY
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        print("grpcload: no C compiler, only grpc.aio clients will run", flush=True)
        return None
    done = subprocess.run([compiler, "-O2", "-o", str(BINARY), str(SOURCE), "-lnghttp2"],
                          capture_output=True, text=True, check=False)
    if done.returncode:
        print("grpcload: build failed (is libnghttp2-dev installed? `make bench-grpc` "
              f"installs it), only grpc.aio clients will run:\n{done.stderr.strip()[-400:]}",
              flush=True)
        return None
    return BINARY


def write_bodies(messages: list[bytes], path: Path) -> None:
    """Each serialised request as a gRPC frame, in the records grpcload reads."""
    with path.open("wb") as out:
        for message in messages:
            frame = b"\0" + len(message).to_bytes(4, "big") + message
            out.write(len(frame).to_bytes(4, "little") + frame)


def start(load: GrpcLoad, latencies: Path, *, port: int, method: str, mode: str,
          amount: float, connections: int, warmup: float,
          duration: float) -> subprocess.Popen[str]:
    """Start one run: `mode` "closed" (`amount` calls in flight) or "open" (`amount`
    calls/s); per-call latencies go to `latencies`."""
    return subprocess.Popen(
        [str(load.binary), str(port), method, str(load.bodies), str(latencies), mode,
         f"{amount:g}", str(connections), f"{warmup:g}", f"{duration:g}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str], latencies: Path, timeout: float) -> LoadRun:
    """Wait for a run started by `start` and read its figures."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # or it goes on loading the server through later measurements
        proc.communicate()
        raise
    if proc.returncode:
        raise RuntimeError(f"grpcload failed ({proc.returncode}): {stderr.strip()}")
    summary = json.loads(stdout)
    run = LoadRun(cpu=summary["cpu"], max_lag=summary["max_lag"])
    for code, count in summary["errors"].items():
        name = _STATUS_NAMES.get(int(code), f"STATUS_{code}") if code.isdigit() else "NO_STATUS"
        run.errors[name] = count
    for line in latencies.read_text().splitlines():
        from_send, from_schedule = line.split()
        run.latencies.append(float(from_send) * 1e-6)
        run.from_schedule.append(float(from_schedule) * 1e-6)
    if len(run.latencies) != summary["calls"]:
        raise RuntimeError("grpcload's latency file does not match its call count")
    return run
