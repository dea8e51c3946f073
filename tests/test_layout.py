"""The tree reads as the data flow: which package may import which, no cycles, a light
contract, a bridge that starts without the indexer's stack, a client that loads neither,
and each install (base, extras) with every module its part imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.extras import distributions, run_restricted

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


def test_the_client_is_light() -> None:
    """`import indexer.client` (a router's whole need) loads neither the index package nor
    the service's or the bridge's dependencies."""
    code = ("import sys, indexer.client; "
            "print('\\n'.join(sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'redis', 'nats', 'prometheus_client', 'zmq', 'uvloop', 'kvsim', 'publisher'} "
            "or m.startswith(('indexer.index', 'indexer.ingest', 'indexer.serve')))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=ROOT).stdout.split()
    assert loaded == []


def _product_modules(*packages: str) -> list[str]:
    """Every module of `packages` but the dev-only generator and `__main__` scripts."""
    return [name for package in packages for name, _ in modules(package)
            if name != "indexer._protogen" and not name.endswith(".__main__")]


# extras -> modules that must import with nothing else installed; the code after them runs
# too. The base install is the router's kit: client, query CLI, contract, embeddable index.
INSTALLS: dict[tuple[str, ...], tuple[list[str], str]] = {
    (): (["indexer.client", "indexer.cli", "indexer.index", "kvcore.bus", "kvcore.keys",
          "kvcore.about", "kvcore.runtime", "kvsim.cli"],
         "import indexer; indexer.SyncMemoryIndex(); indexer.cli.main(['--version'])"),
    ("publisher",): (_product_modules("kvcore", "publisher"),
                     "import publisher.cli as c; c.main(['--version'])"),
    ("server",): (_product_modules("kvcore", "indexer"),
                  "import indexer.app"),
    ("all",): (_product_modules("kvcore", "publisher", "indexer", "kvsim"),
               "import kvsim.cli as c; c.main(['--version'])"),
    ("dev",): (["indexer._protogen"], ""),
}


@pytest.mark.parametrize("extras", list(INSTALLS), ids=lambda e: "+".join(e) or "base")
def test_each_install_has_what_its_modules_import(extras: tuple[str, ...]) -> None:
    """With only pyproject's requirements for the base install plus these extras (followed
    through the installed distributions' own requirements) importable, every module of
    the part they serve imports and its command starts."""
    names, code = INSTALLS[extras]
    script = (f"import importlib\nfor name in {names!r}:\n"
              f"    importlib.import_module(name)\n{code}\n")
    result = run_restricted(extras, script)
    assert result.returncode == 0, result.stderr[-3000:]


def test_build_tools_are_not_runtime_dependencies() -> None:
    """grpcio-tools (make proto, tests/test_proto.py) and the build frontend come with the
    dev extra only."""
    runtime = distributions(["all"])
    assert {"grpcio-tools", "build", "setuptools", "pytest"}.isdisjoint(runtime)
    assert {"grpcio-tools", "build", "setuptools"} <= distributions(["dev"])
