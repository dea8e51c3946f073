"""The tree reads as the data flow: which package may import which, no cycles, a light
contract, and a bridge that starts without the indexer's stack."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("kvcore", "publisher", "indexer")
# package -> the first-party packages it may import
ALLOWED: dict[str, set[str]] = {
    "kvcore": {"kvcore"},
    "publisher": {"kvcore", "publisher"},
    "indexer": {"kvcore", "indexer"},
    "kvsim": {"kvcore", "publisher", "indexer", "kvsim"},
}
FIRST_PARTY = {*ALLOWED, "bench", "tests"}
# what the contract package may import beyond the standard library
KVCORE_THIRD_PARTY = {"msgspec", "xxhash", "nats", "structlog", "uvloop"}


def modules(package: str) -> Iterator[tuple[str, Path]]:
    for path in sorted((ROOT / package).rglob("*.py")):
        if "_proto" in path.parts:
            continue
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path


def imports(path: Path, *, top_level_only: bool = False) -> Iterator[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_upstream(package: str) -> None:
    """kvcore imports nothing of ours; publisher and indexer only kvcore (never each
    other); the tools may import everything but nothing installed imports them, bench
    or tests."""
    wrong = [f"{name} imports {target}"
             for name, path in modules(package)
             for target in imports(path)
             if target.split(".")[0] in FIRST_PARTY
             and target.split(".")[0] not in ALLOWED[package]]
    assert not wrong, wrong


def test_the_contract_stays_light() -> None:
    stdlib = set(sys.stdlib_module_names)
    heavy = [f"{name} imports {target}" for name, path in modules("kvcore")
             for target in imports(path)
             if target.split(".")[0] not in stdlib | KVCORE_THIRD_PARTY | {"kvcore"}]
    assert not heavy, heavy


def test_no_import_cycles() -> None:
    """Module-level imports between our modules form no cycle."""
    known = {name for package in ALLOWED for name, _ in modules(package)}
    graph: dict[str, set[str]] = {}
    for package in ALLOWED:
        for name, path in modules(package):
            targets = set()
            for imported in imports(path, top_level_only=True):
                target = imported
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    targets.add(target)
            graph[name] = targets
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            cycle = [*stack[stack.index(node):], node]
            raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
        if node in done:
            return
        for target in sorted(graph.get(node, ())):
            if not target.startswith(node + "."):  # a package importing its own modules
                visit(target, [*stack, node])
        done.add(node)

    for module in sorted(graph):
        visit(module, [])


def test_the_bridge_starts_without_the_indexer_stack() -> None:
    """`kv-publisher` runs in every GPU pod: importing its command line must not load
    redis, grpc or any of the indexer's modules, nor prometheus_client (loaded only for
    --metrics-listen)."""
    code = ("import sys, publisher.cli; "
            "print('\\n'.join(sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'redis', 'prometheus_client', 'grpc', 'indexer', 'kvsim'})))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=ROOT).stdout.split()
    assert loaded == []


def test_test_modules_do_not_import_each_other() -> None:
    """Shared fixtures and builders live in tests/support, not in other test modules."""
    wrong = [f"{path.name} imports {target}"
             for path in sorted((ROOT / "tests").glob("test_*.py"))
             for target in imports(path)
             if target.startswith("tests.test_")]
    assert not wrong, wrong
