"""The release artefacts: the sdist carries everything a build needs, a wheel built from
that sdist carries the C extension and runs on its own, and the version is one.

`python -m build --no-isolation` (the dev extra's build and setuptools, no download) builds
the sdist from a copy of the checkout and the wheel from the sdist, as `pip install` of an
sdist does. The wheel is then unpacked and imported with the checkout out of sight: only
the unpacked wheel and this venv's third-party packages on sys.path.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path
from typing import NamedTuple

import pytest

from kvcore import __version__

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kvcore", "publisher", "indexer", "kvsim")
# not copied into the build: VCS, venvs, caches, earlier build output, runtime data
_SKIP_AT_ROOT = {".git", ".venv", "build", "dist", ".kv-indexer", "data", ".hypothesis",
                 ".mypy_cache", ".ruff_cache", ".pytest_cache"}


def c_compiler() -> str | None:
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    return shutil.which(cc.split()[0])


needs_cc = pytest.mark.skipif(
    c_compiler() is None,
    reason="no C compiler: a wheel built here would have no kvcore._native to check")


class Artefacts(NamedTuple):
    sdist: Path
    wheel: Path
    sdist_names: set[str]  # paths inside the sdist, without its top directory
    wheel_names: set[str]
    site: Path  # the wheel, unpacked


def _copy_ignore(directory: str, names: list[str]) -> set[str]:
    skipped = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
    if Path(directory) == ROOT:
        skipped |= _SKIP_AT_ROOT & set(names)
    return skipped


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory: pytest.TempPathFactory) -> Artefacts:
    """sdist from a copy of the checkout (stray build products such as the in-place
    kvcore/_native*.so included: the sdist must leave them out), wheel from the sdist."""
    if c_compiler() is None:
        pytest.skip("no C compiler")
    tmp = tmp_path_factory.mktemp("packaging")
    source, out = tmp / "source", tmp / "dist"
    shutil.copytree(ROOT, source, ignore=_copy_ignore, symlinks=True)
    build = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(source)],
        check=False, capture_output=True, text=True, cwd=tmp, timeout=300)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    with tarfile.open(sdist) as tar:
        sdist_names = {name.partition("/")[2] for name in tar.getnames()} - {""}
    with zipfile.ZipFile(wheel) as whl:
        wheel_names = set(whl.namelist())
        site = tmp / "site"
        whl.extractall(site)
    return Artefacts(sdist, wheel, sdist_names, wheel_names, site)


def _tracked(*patterns: str) -> set[str]:
    """Checkout files matching the glob patterns, relative to the root."""
    return {path.relative_to(ROOT).as_posix() for pattern in patterns
            for path in ROOT.glob(pattern) if "__pycache__" not in path.parts}


@needs_cc
def test_sdist_carries_what_the_build_needs(artefacts: Artefacts) -> None:
    """The C sources with the vendored xxHash and its licence (and the Redis module's, with
    Redis's module header and its licence), the .proto, every module,
    stub, Lua script and py.typed of the packages, the licences and the changelog; no
    build products and no half test suite."""
    names = artefacts.sdist_names
    needed = {
        "pyproject.toml", "MANIFEST.in", "README.md", "CHANGELOG.md", "LICENSE", "NOTICE",
        "native/xxhash/xxhash.h", "native/xxhash/LICENSE",
        "native/redis_module/kvi.c", "native/redis_module/redismodule.h",
        "native/redis_module/LICENSE",
        "protos/kvindex/v1/indexer.proto",
        *_tracked("native/*.c", "native/*.h"),
        *(path for package in PACKAGES
          for path in _tracked(f"{package}/**/*.py", f"{package}/**/*.pyi",
                               f"{package}/**/*.lua", f"{package}/py.typed")),
    }
    assert {"indexer/index/lua/apply.lua", "kvcore/_native.pyi",
            "indexer/_proto/kvindex/v1/indexer_pb2.pyi"} <= needed
    assert not needed - names, sorted(needed - names)
    built = [n for n in names if n.endswith((".so", ".pyc", ".o")) or "__pycache__" in n]
    assert not built, built
    assert not [n for n in names if n.startswith("tests/")]


@needs_cc
def test_wheel_from_the_sdist_has_the_extension(artefacts: Artefacts) -> None:
    """The wheel built from the sdist holds the compiled extension, the typing markers and
    stubs, the Lua scripts, the generated gRPC modules and the three licences."""
    names = artefacts.wheel_names
    assert [n for n in names if re.fullmatch(r"kvcore/_native\.[^/]*\.so", n)], sorted(names)
    dist_info = f"kv_indexer-{__version__}.dist-info"
    needed = {
        *(f"{package}/py.typed" for package in PACKAGES),
        "kvcore/__init__.py", "kvcore/_native.pyi",
        *_tracked("indexer/index/lua/*.lua"),
        "indexer/_proto/kvindex/v1/indexer_pb2.py",
        "indexer/_proto/kvindex/v1/indexer_pb2.pyi",
        "indexer/_proto/kvindex/v1/indexer_pb2_grpc.py",
        f"{dist_info}/licenses/LICENSE", f"{dist_info}/licenses/NOTICE",
        f"{dist_info}/licenses/native/xxhash/LICENSE",
    }
    assert not needed - names, sorted(needed - names)


@needs_cc
def test_wheel_metadata(artefacts: Artefacts) -> None:
    """Version from kvcore.__version__; grpcio-tools only with the dev extra; the extras
    the README names exist."""
    with zipfile.ZipFile(artefacts.wheel) as whl:
        text = whl.read(f"kv_indexer-{__version__}.dist-info/METADATA").decode()
    meta = Parser().parsestr(text)
    assert meta["Version"] == __version__
    assert meta["License-Expression"] == "Apache-2.0"
    assert {"client", "publisher", "server", "all", "dev", "bench"} <= set(
        meta.get_all("Provides-Extra") or [])
    tools = [r for r in meta.get_all("Requires-Dist") or [] if r.startswith("grpcio-tools")]
    assert tools and all('extra == "dev"' in r for r in tools), tools


@needs_cc
def test_the_wheel_runs_on_its_own(artefacts: Artefacts, tmp_path: Path) -> None:
    """Imported from the unpacked wheel (not the checkout): the extension loads, NATIVE is
    True, and the three commands' entry points print the version."""
    site = str(artefacts.site)
    code = f"""
import contextlib, importlib.metadata as md, io, sys
SITE = {site!r}
sys.path.insert(0, SITE)
import kvcore, kvcore._native, kvcore.keys, indexer.client, indexer.index.redis
assert kvcore.keys.NATIVE, "kvcore.keys.NATIVE is False"
ours = [m for name, m in sys.modules.items()
        if name.split(".")[0] in {set(PACKAGES)!r} and getattr(m, "__file__", None)]
outside = [m.__name__ for m in ours if not m.__file__.startswith(SITE)]
assert not outside, ("imported from outside the wheel", outside)
indexer.index.redis._lua("apply.lua")  # package data, read through importlib.resources
(dist,) = [d for d in md.distributions(path=[SITE]) if d.name == "kv-indexer"]
for name in ("kv-indexer", "kv-publisher", "kv-sim"):
    (entry,) = dist.entry_points.select(group="console_scripts", name=name)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = entry.load()(["--version"])
        except SystemExit as exc:
            code = exc.code
    assert code in (0, None), (name, code)
    print(out.getvalue().strip())
"""
    # -I: no PYTHONPATH, no user site, no script directory; the cwd is an empty directory.
    result = subprocess.run([sys.executable, "-I", "-c", code], check=False,
                            capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [
        f"{prog} {__version__} (C extension: yes)"
        for prog in ("kv-indexer", "kv-publisher", "kv-sim")]


def test_one_version() -> None:
    """pyproject.toml reads the version from kvcore/__init__.py; the changelog has its
    entry and an Unreleased section; the image's label says the same."""
    assert re.fullmatch(r"\d+\.\d+\.\d+(?:[ab]\d+|rc\d+)?(?:\.dev\d+)?", __version__)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^dynamic = \["version"\]', pyproject, re.M)
    assert 'version = { attr = "kvcore.__version__" }' in pyproject
    headings = re.findall(r"^## \[([^\]]+)\]", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert headings[:1] == ["Unreleased"] and __version__ in headings
    label = re.search(r'org\.opencontainers\.image\.version="([^"]+)"',
                      (ROOT / "Dockerfile").read_text())
    assert label is not None and label.group(1) == __version__


def test_licences() -> None:
    """LICENSE is the Apache License 2.0 pyproject declares; NOTICE names the vendored
    xxHash, its licence and its copyright as xxhash.h states it."""
    licence = (ROOT / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    assert "END OF TERMS AND CONDITIONS" in licence
    assert re.search(r'^license = "Apache-2.0"$', (ROOT / "pyproject.toml").read_text(), re.M)
    notice = (ROOT / "NOTICE").read_text()
    header = (ROOT / "native" / "xxhash" / "xxhash.h").read_text()
    copyright_line = re.search(r"Copyright \(C\) (\d{4}-\d{4}) Yann Collet", header)
    assert copyright_line is not None
    assert f"Copyright (c) {copyright_line.group(1)} Yann Collet" in notice
    assert "xxHash" in notice and "BSD 2-Clause" in notice
    assert "native/xxhash/LICENSE" in notice


def test_cibuildwheel_refuses_a_wheel_without_the_extension() -> None:
    """cibuildwheel (not run here) tests each wheel it builds: the command starts and
    kvcore._native is in it; no Windows builds (native/ uses GCC/Clang built-ins)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["cibuildwheel"]
    commands = config["test-command"]
    assert "kv-indexer --version" in commands
    assert any("k.NATIVE" in c and "sys.exit" in c for c in commands), commands
    assert "*-win*" in config["skip"].split()
    assert config["build"].split()[0] == "cp311-*"
