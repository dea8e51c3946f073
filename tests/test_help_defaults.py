"""`--help` of every command shows each option's default (issue 19: `kv-publisher bridge
--help` showed none). Each command's real entry point runs with `--help`; every parser
that prints is captured, and each of its options with a default (not unset, off or empty)
must say it in what was printed."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator

import pytest

from indexer import cli as indexer_cli
from indexer.config import SETTINGS, ServiceConfig
from kvcore.helpfmt import shows_default
from kvsim import cli as sim_cli
from publisher import cli as publisher_cli

COMMANDS: list[tuple[Callable[[list[str]], int], list[str]]] = [
    (indexer_cli.main, []), (indexer_cli.main, ["score"]), (indexer_cli.main, ["workers"]),
    (indexer_cli.main, ["stats"]), (indexer_cli.main, ["health"]),
    (indexer_cli.main, ["serve"]), (indexer_cli.main, ["rebuild"]),
    (indexer_cli.main, ["migrate-layout"]),
    (indexer_cli.main, ["nats-auth"]), (indexer_cli.main, ["bench", "routing"]),
    (publisher_cli.main, ["bridge"]),
    (sim_cli.main, ["engines"]), (sim_cli.main, ["fleet"]), (sim_cli.main, ["demo"]),
]


def ids() -> Iterator[str]:
    for main, argv in COMMANDS:
        yield " ".join([main.__module__.split(".")[0], *argv])


def printed_help(main: Callable[[list[str]], int], argv: list[str],
                 monkeypatch: pytest.MonkeyPatch) -> list[tuple[argparse.ArgumentParser, str]]:
    """(parser, text) of each help the command printed."""
    printed: list[tuple[argparse.ArgumentParser, str]] = []
    original = argparse.ArgumentParser.format_help

    def capture(parser: argparse.ArgumentParser) -> str:
        text = original(parser)
        printed.append((parser, text))
        return text

    monkeypatch.setattr(argparse.ArgumentParser, "format_help", capture)
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code in (0, None)
    assert printed, "no help printed"
    return printed


def entry(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """An option's entry in its parser's help, as printed, without white space (wrapping
    may break a line after any hyphen)."""
    formatter = parser._get_formatter()
    return "".join(formatter._format_action(action).split())


@pytest.mark.parametrize(("main", "argv"), COMMANDS, ids=list(ids()))
def test_help_shows_defaults(main: Callable[[list[str]], int], argv: list[str],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    for parser, text in printed_help(main, argv, monkeypatch):
        flat = "".join(text.split())
        missing = []
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            shown = entry(parser, action)
            assert shown in flat
            if shows_default(action.default) and "default" not in shown:
                missing.append(shown)
        assert missing == [], f"{parser.prog}: options whose default --help does not show"


def test_serve_help_shows_the_configuration_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve`'s flags default to None (unset: the environment may set them); the help
    shows the defaults that apply, from ServiceConfig."""
    ((parser, text),) = printed_help(indexer_cli.main, ["serve"], monkeypatch)
    defaults = ServiceConfig()
    flat = "".join(text.split())
    checked = 0
    for flag, field, *_ in SETTINGS:
        value = getattr(defaults, field)
        action = next(a for a in parser._actions if flag in a.option_strings)
        if shows_default(value):
            assert f"default:{value})" in entry(parser, action), flag
            checked += 1
    assert checked >= 20
    assert "default:127.0.0.1:50051" in flat
