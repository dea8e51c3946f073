"""Write one benchmark's section of docs/benchmarks.md, replacing its previous figures."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"

_HEADER = """# Benchmarks

Every figure below was measured by the command named in its section, on the machine it
names, and written here by that command (`kvsim/report.py`). Re-run a command to refresh
its section; targets that are missed are marked **MISSED**.
"""


def pct(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank below) of `values`; NaN when there are none."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def git_rev() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=False, cwd=DOC.parent.parent)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def write_section(key: str, title: str, command: str, body: str) -> None:
    """Replace (or append) the section marked `key` in docs/benchmarks.md."""
    DOC.parent.mkdir(parents=True, exist_ok=True)
    text = DOC.read_text() if DOC.exists() else _HEADER
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    section = (
        f"<!-- bench:{key}:begin -->\n## {title}\n\n"
        f"Command: `{command}`  \nMeasured {stamp} at commit {git_rev()} on {machine()}.\n\n"
        f"{body.strip()}\n<!-- bench:{key}:end -->\n"
    )
    marker = re.escape(key)
    pattern = re.compile(rf"<!-- bench:{marker}:begin -->.*?<!-- bench:{marker}:end -->\n", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: section, text)
    else:
        text = text.rstrip() + "\n\n" + section
    DOC.write_text(text)
    print(f"wrote section '{key}' to {DOC}")


def verdict(ok: bool) -> str:
    return "met" if ok else "**MISSED**"
