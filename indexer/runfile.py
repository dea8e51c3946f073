"""The run file: where a running `kv-indexer serve` can be reached, for local tools.

`serve` writes `<data dir>/endpoints.json` once it serves and removes it when it stops,
so `kv-sim fleet` (`make sim`) finds the NATS server the service really uses: the
embedded nats-server takes a random port when 4222 is taken. The file holds the NATS URL
as the service was given it (with any password), so it is written readable by its owner
only.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["RUN_FILE_NAME", "Endpoints", "StaleRunFileError", "read_endpoints", "remove_endpoints",
           "write_endpoints"]

RUN_FILE_NAME = "endpoints.json"


class StaleRunFileError(Exception):
    """The run file names a process that is gone (killed before it could remove it)."""


@dataclass(frozen=True, slots=True)
class Endpoints:
    nats_url: str
    grpc_target: str  # host:port a local client dials ("" when gRPC is off)
    pid: int


def run_file(data_dir: Path) -> Path:
    return data_dir / RUN_FILE_NAME


def write_endpoints(data_dir: Path, endpoints: Endpoints) -> Path:
    path = run_file(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(asdict(endpoints), out)
    temporary.replace(path)
    return path


def remove_endpoints(data_dir: Path) -> None:
    """Remove the run file if this process wrote it (another serve may have replaced it)."""
    with contextlib.suppress(FileNotFoundError, StaleRunFileError, ValueError):
        found = read_endpoints(data_dir)
        if found is not None and found.pid == os.getpid():
            run_file(data_dir).unlink()


def read_endpoints(data_dir: Path) -> Endpoints | None:
    """The endpoints of the serve running from `data_dir`; None when no run file is there.
    StaleRunFileError when its process is gone; ValueError when the file is not one."""
    path = run_file(data_dir)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not a run file: {exc}") from exc
    try:
        endpoints = Endpoints(str(raw["nats_url"]), str(raw["grpc_target"]), int(raw["pid"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path} is not a run file: {exc!r}") from exc
    if not _alive(endpoints.pid):
        raise StaleRunFileError(f"{path} names kv-indexer serve pid {endpoints.pid}, which is gone")
    return endpoints


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True
