"""`--help` that shows every option's default (one formatter for every command)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["DefaultsArgumentParser", "DefaultsHelpFormatter", "shows_default"]


def shows_default(value: object) -> bool:
    """Whether a default is worth printing: not unset, off, empty or suppressed."""
    return value not in (None, False, "", [], (), argparse.SUPPRESS)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's `(default: X)` after each option's help, except where the help already
    says its default or there is none to show (unset, off, empty)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or not shows_default(action.default):
            return text
        return super()._get_help_string(action)


class DefaultsArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser with DefaultsHelpFormatter (for add_subparsers' parser_class)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
