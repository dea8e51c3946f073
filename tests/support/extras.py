"""What an install with only some extras could import, and running code as if it were one.

`importable(extras)` follows pyproject.toml's requirements for the base install plus
`extras` through the installed distributions' own requirements (their markers evaluated,
the extras they ask for included) to the top-level module names those distributions
provide. `run_restricted(extras, code)` runs `code` in a child interpreter of this venv
whose imports of any other third-party module fail as if it were not installed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterable
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "kv-indexer"
FIRST_PARTY = frozenset({"kvcore", "publisher", "indexer", "kvsim"})


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@cache
def _project() -> dict[str, Any]:
    project: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project


def requirements(extras: Iterable[str] = ()) -> list[Requirement]:
    """The project's requirements for the base install plus `extras`, self-references
    (`kv-indexer[a,b]`) expanded."""
    project = _project()
    optional: dict[str, list[str]] = project["optional-dependencies"]
    found: list[Requirement] = []
    seen: set[str] = set()
    pending = [Requirement(r) for r in project["dependencies"]]
    todo = list(extras)
    while todo or pending:
        if todo:
            extra = todo.pop()
            if extra in seen:
                continue
            if extra not in optional:
                raise KeyError(f"pyproject.toml has no extra {extra!r}")
            seen.add(extra)
            pending.extend(Requirement(r) for r in optional[extra])
            continue
        req = pending.pop()
        if normalize(req.name) == PROJECT:
            todo.extend(req.extras)
        else:
            found.append(req)
    return found


def _applies(req: Requirement, extras: Iterable[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": extra}) for extra in ("", *extras))


def distributions(extras: Iterable[str] = ()) -> set[str]:
    """Normalized names of every distribution the install pulls in (installed here)."""
    seen: set[tuple[str, tuple[str, ...]]] = set()
    queue: list[tuple[Requirement, tuple[str, ...]]] = [(r, ()) for r in requirements(extras)]
    while queue:
        req, parent_extras = queue.pop()
        if not _applies(req, parent_extras):
            continue
        key = (normalize(req.name), tuple(sorted(req.extras)))
        if key in seen:
            continue
        seen.add(key)
        dist = metadata.distribution(key[0])  # PackageNotFoundError: not installed here
        queue.extend((Requirement(r), key[1]) for r in dist.requires or ())
    return {name for name, _ in seen}


@cache
def _modules_by_distribution() -> dict[str, frozenset[str]]:
    inverse: dict[str, set[str]] = {}
    for module, dists in metadata.packages_distributions().items():
        for dist in dists:
            inverse.setdefault(normalize(dist), set()).add(module)
    return {dist: frozenset(modules) for dist, modules in inverse.items()}


def importable(extras: Iterable[str] = ()) -> set[str]:
    """Top-level module names the install provides: the standard library, ours, and those
    of every distribution it pulls in."""
    modules = _modules_by_distribution()
    third_party = {m for dist in distributions(extras) for m in modules.get(dist, ())}
    return {*sys.stdlib_module_names, *sys.builtin_module_names, *FIRST_PARTY, *third_party}


# A meta path finder in front of the interpreter's own: names outside ALLOWED are not
# found (ModuleNotFoundError on import, None from importlib.util.find_spec), as when
# the distribution is not installed.
_PRELUDE = """
import importlib.machinery, sys
ALLOWED = frozenset({allowed})
class OnlyAllowed:
    def __init__(self, finders):
        self.finders = finders
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] not in ALLOWED:
            return None
        for finder in self.finders:
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                return spec
        return None
    def find_distributions(self, *args, **kwargs):
        for finder in self.finders:
            if hasattr(finder, "find_distributions"):
                yield from finder.find_distributions(*args, **kwargs)
    def invalidate_caches(self):
        for finder in self.finders:
            if hasattr(finder, "invalidate_caches"):
                finder.invalidate_caches()
sys.meta_path[:] = [OnlyAllowed(list(sys.meta_path))]
"""


def run_restricted(extras: Iterable[str], code: str, *,
                   cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `code` with only what the base install plus `extras` provides importable."""
    prelude = _PRELUDE.format(allowed=json.dumps(sorted(importable(extras))))
    return subprocess.run([sys.executable, "-c", prelude + code], check=False,
                          capture_output=True, text=True, cwd=cwd or ROOT, timeout=120)
