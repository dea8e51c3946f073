"""Secrets out of everything a process prints: banners, logs, errors, health answers.

NATS and Redis credentials travel in URLs (`nats://user:password@host:4222`,
`nats://token@host:4222`, `redis://:password@host:6379/0`,
`rediss://user:password@host:6380/0`, or `?password=` in a Redis URL's query). Anything
that shows a URL shows `redact_url(url)`; anything that may quote one (an exception, a
log line) goes through `redact_text`. `configure_logging` (kvcore.runtime) applies
`redact_text` to every structured log value and to the standard library's log records, so
a URL that reaches a log unredacted is still printed with `***` in place of its secret.

User names stay readable (they say which identity a process uses, and are not secret);
a lone user part is a NATS token, so it is hidden too.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["MASK", "redact_text", "redact_url"]

MASK: Final = "***"

# scheme://userinfo@ : userinfo runs to the last '@' before the path, query or fragment
# (an unescaped '@' in a password must not leave its tail visible).
_USERINFO: Final = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)"
                              r"(?P<userinfo>[^/?#\s\"'<>]*)@")
# password=..., token=..., in a URL's query string (redis-py reads `?password=`)
_QUERY_SECRET: Final = re.compile(
    r"(?P<key>[?&;](?:password|pass|passwd|pwd|token|auth_token|secret)=)[^&;#\s\"'<>]*",
    re.IGNORECASE)

# reprs of parsed URLs and keyword arguments: netloc='user:pw@host', password='pw',
# {'password': 'pw'}
_NETLOC: Final = re.compile(r"(?P<scheme>\bnetloc=['\"])(?P<userinfo>[^'\"@\s]*)@")
_QUOTED_SECRET: Final = re.compile(
    r"(?P<key>\b(?:password|passwd|pass|auth_token|token)['\"]?\s*[=:]\s*)"
    r"(?P<quote>['\"])[^'\"]*(?P=quote)", re.IGNORECASE)


def _mask_userinfo(match: re.Match[str]) -> str:
    userinfo = match.group("userinfo")
    user, sep, _password = userinfo.partition(":")
    shown = f"{user}:{MASK}" if sep else MASK  # no ':': the whole part is a token
    return f"{match.group('scheme')}{shown}@"


def redact_url(url: str) -> str:
    """`url` with its password or token replaced by `***` (user names kept)."""
    return redact_text(url)


def redact_text(text: str) -> str:
    """Every URL secret in `text` (a message, an exception, a traceback) replaced."""
    if "://" not in text and "=" not in text and ":" not in text:
        return text
    text = _USERINFO.sub(_mask_userinfo, text)
    text = _NETLOC.sub(_mask_userinfo, text)
    text = _QUOTED_SECRET.sub(lambda m: f"{m.group('key')}{m.group('quote')}{MASK}"
                              f"{m.group('quote')}", text)
    return _QUERY_SECRET.sub(lambda m: f"{m.group('key')}{MASK}", text)
