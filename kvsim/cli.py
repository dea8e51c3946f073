"""`kv-sim`: the tools that feed or measure the service without a GPU.

    kv-sim engines ...         mock vLLM / SGLang engines on the real ZMQ wire
    kv-sim fleet ...           mock engines and their bridges feeding a running kv-indexer serve
    kv-sim demo ...            a live fleet, a router and the index side by side
    kv-sim bench routing ...   routing quality on a Mooncake trace (also `kv-indexer bench routing`)
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from kvcore.about import version_line

__all__ = ["bench_main", "bench_routing", "main"]

_USAGE = ("usage: kv-sim {engines,fleet,demo,bench routing} [options]  (--help on each); "
          "kv-sim --version")


def bench_routing(argv: list[str]) -> int:
    from kvsim.routing.cli import main as routing_main  # noqa: PLC0415 - heavy, on demand

    return routing_main(argv)


def bench_main(argv: list[str]) -> int:
    if argv[:1] != ["routing"]:
        print("usage: kv-sim bench routing [options]  (--help for them)", file=sys.stderr)
        return 2
    return bench_routing(argv[1:])


def _engines(argv: list[str]) -> int:
    from kvsim.mock_engines import main as engines_main  # noqa: PLC0415

    return engines_main(argv)


def _fleet(argv: list[str]) -> int:
    from kvsim.fleet import main as fleet_main  # noqa: PLC0415

    return fleet_main(argv)


def _demo(argv: list[str]) -> int:
    from kvsim.demo import main as demo_main  # noqa: PLC0415

    return demo_main(argv)


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "engines": _engines, "fleet": _fleet, "demo": _demo, "bench": bench_main}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_USAGE)
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        print(version_line("kv-sim"))
        return 0
    command = COMMANDS.get(args[0])
    if command is None:
        print(f"kv-sim: unknown command {args[0]!r}\n{_USAGE}", file=sys.stderr)
        return 2
    return command(args[1:])
