"""Whether a child process (or one a child started) has exited."""

from __future__ import annotations

import os
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
