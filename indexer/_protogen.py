"""Generate the gRPC Python code in ``indexer/_proto`` from the ``.proto`` files in ``protos/``.

Usage::

    python -m indexer._protogen          # (re)write indexer/_proto (what `make proto` runs)
    python -m indexer._protogen --check  # exit 1 listing stale files if indexer/_proto is outdated

Every ``protos/<dir>/<name>.proto`` becomes ``indexer/_proto/<dir>/<name>_pb2.py``,
``<name>_pb2.pyi`` and ``<name>_pb2_grpc.py``, with an ``__init__.py`` in every package
directory. protoc emits imports rooted at the proto path (``from kvindex.v1 import
indexer_pb2``), which only resolve when ``indexer/_proto`` is on ``sys.path``; they are
rewritten to fully qualified imports (``from indexer._proto.kvindex.v1 import indexer_pb2``).
Imports of protos that are not ours (``google.protobuf``) are left alone.

Generation always happens in a temporary directory and is a pure function of the proto
files and the installed grpcio-tools version, so ``--check`` can compare byte for byte.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

__all__ = [
    "OUT_DIR",
    "PACKAGE",
    "PROTO_ROOT",
    "check",
    "diff",
    "main",
    "render",
    "write",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
OUT_DIR = REPO_ROOT / "indexer" / "_proto"
PACKAGE = "indexer._proto"

GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
INIT_TEXT = '"""Generated from protos/ by `python -m indexer._protogen`; do not edit."""\n'

# `from kvindex.v1 import indexer_pb2 [as alias]` and `import indexer_pb2 [as alias]`.
_FROM_IMPORT = re.compile(
    r"^(?P<indent>[ \t]*)from (?P<pkg>[\w.]+) import (?P<mod>\w+_pb2)\b", re.M
)
_PLAIN_IMPORT = re.compile(r"^(?P<indent>[ \t]*)import (?P<mod>\w+_pb2)\b", re.M)


class ProtocError(RuntimeError):
    """protoc rejected the proto files (its diagnostics went to stderr)."""


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Every .proto under proto_root, relative to it, in a stable order."""
    return sorted(
        (path.relative_to(proto_root) for path in proto_root.rglob("*.proto")),
        key=lambda path: path.as_posix(),
    )


def _grpc_tools_include() -> Path:
    """Directory of the well-known protos (google/protobuf/*.proto) bundled with grpc_tools."""
    return Path(grpc_tools.__file__).resolve().parent / "_proto"


def _run_protoc(proto_root: Path, protos: Sequence[Path], out: Path) -> None:
    args = [
        "grpc_tools.protoc",
        f"--proto_path={proto_root}",
        f"--proto_path={_grpc_tools_include()}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(proto_root / proto) for proto in protos),
    ]
    status = int(protoc.main(args))
    if status != 0:
        raise ProtocError(f"protoc failed with exit status {status}")


def _module_name(proto: Path) -> str:
    """kvindex/v1/indexer.proto -> kvindex.v1.indexer_pb2"""
    return ".".join((*proto.parent.parts, proto.stem + "_pb2"))


def qualify_imports(source: str, local_modules: Iterable[str], package: str = PACKAGE) -> str:
    """Rewrite imports of our own generated modules to live under `package`."""
    local = frozenset(local_modules)

    def from_import(match: re.Match[str]) -> str:
        pkg, mod = match["pkg"], match["mod"]
        if f"{pkg}.{mod}" not in local:
            return match[0]
        return f"{match['indent']}from {package}.{pkg} import {mod}"

    def plain_import(match: re.Match[str]) -> str:
        mod = match["mod"]
        if mod not in local:
            return match[0]
        return f"{match['indent']}from {package} import {mod}"

    return _PLAIN_IMPORT.sub(plain_import, _FROM_IMPORT.sub(from_import, source))


def render(proto_root: Path = PROTO_ROOT, package: str = PACKAGE) -> dict[str, str]:
    """The generated tree: path relative to the output package (posix) -> file text."""
    protos = proto_files(proto_root)
    if not protos:
        raise ProtocError(f"no .proto files under {proto_root}")
    local_modules = [_module_name(proto) for proto in protos]
    files: dict[str, str] = {"__init__.py": INIT_TEXT}
    with tempfile.TemporaryDirectory(prefix="protogen-") as tmp:
        out = Path(tmp)
        _run_protoc(proto_root.resolve(), protos, out)
        for path in sorted(out.rglob("*"), key=lambda p: p.as_posix()):
            if not path.is_file():
                continue
            rel = path.relative_to(out)
            text = path.read_text(encoding="utf-8")
            files[rel.as_posix()] = qualify_imports(text, local_modules, package)
            for depth in range(1, len(rel.parts)):
                files.setdefault(Path(*rel.parts[:depth], "__init__.py").as_posix(), INIT_TEXT)
    return dict(sorted(files.items()))


def _is_generated(path: Path) -> bool:
    return path.name == "__init__.py" or path.name.endswith(GENERATED_SUFFIXES)


def _existing(out_dir: Path) -> dict[str, Path]:
    """Files in out_dir that generation owns (skips __pycache__ and anything hand-written)."""
    if not out_dir.is_dir():
        return {}
    return {
        path.relative_to(out_dir).as_posix(): path
        for path in out_dir.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and _is_generated(path)
    }


def diff(out_dir: Path, files: Mapping[str, str]) -> list[str]:
    """What differs between out_dir and the generated tree, one "<kind>: <path>" a line."""
    existing = _existing(out_dir)
    problems: list[str] = []
    for rel in sorted(files.keys() | existing.keys()):
        if rel not in existing:
            problems.append(f"missing: {rel}")
        elif rel not in files:
            problems.append(f"not generated from any proto: {rel}")
        elif existing[rel].read_bytes() != files[rel].encode("utf-8"):
            problems.append(f"stale: {rel}")
    return problems


def write(out_dir: Path, files: Mapping[str, str]) -> list[str]:
    """Make out_dir hold exactly the generated tree; returns the changes made."""
    changes: list[str] = []
    existing = _existing(out_dir)
    for rel, text in files.items():
        data = text.encode("utf-8")
        path = out_dir / rel
        if rel in existing and path.read_bytes() == data:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        changes.append(f"{'updated' if rel in existing else 'created'}: {rel}")
    for rel in sorted(existing.keys() - files.keys()):
        existing[rel].unlink()
        changes.append(f"removed: {rel}")
    return changes


def check(proto_root: Path = PROTO_ROOT, out_dir: Path = OUT_DIR) -> list[str]:
    """Problems with the committed generated code; empty when it is up to date."""
    return diff(out_dir, render(proto_root))


def _display(path: Path) -> str:
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m indexer._protogen",
        description="Generate indexer/_proto from protos/ with grpc_tools.protoc.",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 listing the files that differ from a fresh generation",
    )
    parser.add_argument("--proto-root", type=Path, default=PROTO_ROOT, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    proto_root: Path = args.proto_root
    out_dir: Path = args.out

    try:
        files = render(proto_root)
    except ProtocError as exc:
        print(f"protogen: {exc}", file=sys.stderr)
        return 2

    if args.check:
        problems = diff(out_dir, files)
        if problems:
            print(
                f"protogen: generated code in {_display(out_dir)} is out of date with "
                f"{_display(proto_root)}; run `make proto` and commit the result:",
                file=sys.stderr,
            )
            for problem in problems:
                print(f"  {problem}", file=sys.stderr)
            return 1
        print(f"protogen: {_display(out_dir)} is up to date ({len(files)} files)")
        return 0

    changes = write(out_dir, files)
    for change in changes:
        print(f"protogen: {change}")
    if not changes:
        print(f"protogen: {_display(out_dir)} already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
