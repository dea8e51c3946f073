"""What is installed: the version and whether the C extension is in use.

A source install (an sdist, `pip install .`) builds `kvcore._native` when it finds a C
compiler and falls back to the pure-Python loops when it does not, and pip shows no
sign of it. `kv-indexer serve` and `kv-publisher bridge` log `NATIVE_MISSING` at start
(`kvcore.runtime.warn_if_pure_python`), and every command's `--version` says which.
"""

from __future__ import annotations

from typing import Final

from kvcore import __version__
from kvcore.keys import NATIVE

__all__ = ["NATIVE_MISSING", "NATIVE_MISSING_SHORT", "build_labels", "version_line"]

NATIVE_MISSING: Final = (
    "kvcore._native (the C extension) is not installed: block keys, the memory index's "
    "block table and gRPC token decoding run in pure Python, several times slower. "
    "Reinstall where a C compiler and the Python headers are (e.g. gcc, python3-dev): "
    "pip install -v --force-reinstall --no-deps --no-binary kv-indexer kv-indexer "
    "(-v shows the compiler's error); `kv-indexer --version` tells whether it is in use"
)


NATIVE_MISSING_SHORT: Final = (
    "MISSING: running the pure-Python fallback, several times slower; reinstall with a C "
    "compiler (README: Is the C extension in use?)")


def version_line(prog: str) -> str:
    """`<prog> <version> (C extension: yes)`, or `MISSING: ...` and what to do."""
    native = "yes" if NATIVE else NATIVE_MISSING_SHORT
    return f"{prog} {__version__} (C extension: {native})"


def build_labels() -> tuple[str, str]:
    """(version, native) of the `*_build_info` series: native is "true" while the C
    extension is in use."""
    return __version__, "true" if NATIVE else "false"
