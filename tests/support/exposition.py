"""Reading a Prometheus text exposition in tests."""

from __future__ import annotations

import re


def exposed_names(text: str) -> set[str]:
    """The series names a Prometheus text scrape can be queried by: histograms as
    `_bucket` / `_sum` / `_count`, counters by their `_total` samples, gauges as they are
    (families without samples count, from their TYPE line)."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            suffixes = {"histogram": ("_bucket", "_sum", "_count"),
                        "summary": ("", "_sum", "_count")}.get(kind, ("",))
            names.update(name + s for s in suffixes)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names
