"""`kv-indexer nats-auth`: a nats-server `authorization` block with one user per worker.

Each worker's user may publish only its own event subject, its own liveness key and the
one read-only JetStream API call its publisher makes; it may subscribe only to its own
resync requests and its own inbox; it may answer the requests it receives
(`allow_responses`). The indexer's user may do what the indexer does (the JetStream API,
KV buckets, the snapshot object store, resync requests and dead letters) and publishes
no events. So a worker cannot publish as another, touch another's liveness entry, or ask
another for a resync: only the indexer can (docs/architecture.md, "Trust model").

    kv-indexer nats-auth --worker MODEL WORKER [--worker MODEL WORKER ...] \\
        [--workers-file FILE] [--indexer-user NAME] --password-dir DIR > auth.conf

Passwords: for each user, `DIR/<user>` is read if it exists, else a random one is
generated and written there (mode 0600). They must be URL-safe ([A-Za-z0-9._~-]) since
clients give them in the NATS URL (`nats://USER:PASSWORD@host:4222`), which nats-py does
not percent-decode. The printed block holds the passwords: keep it as secret as they are.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import msgspec

from kvcore.bus import BusDecodeError, check_identity
from kvcore.helpfmt import DefaultsHelpFormatter
from kvcore.topology import (
    LIVENESS_BUCKET,
    RESYNC_PREFIX,
    liveness_key,
    worker_publish_subjects,
    worker_subscribe_subjects,
)

__all__ = [
    "DEFAULT_INDEXER_USER",
    "NatsUser",
    "indexer_user",
    "main",
    "render_authorization",
    "worker_user",
    "worker_user_name",
]

DEFAULT_INDEXER_USER: Final = "kv-indexer"
_SAFE_PASSWORD: Final = re.compile(r"[A-Za-z0-9._~-]{16,256}")
_SAFE_USER: Final = re.compile(r"[A-Za-z0-9._~=-]{1,512}")

# What the indexer publishes to: the JetStream API (streams, consumers, KV buckets and the
# snapshot object store are all managed through it), acks and flow control of its
# consumers, KV buckets (leases, liveness reads, recovery state), the object store,
# resync requests and dead letters. Not `kv.events.>`: the indexer publishes no events.
INDEXER_PUBLISH: Final = ("$JS.API.>", "$JS.ACK.>", "$JS.FC.>", "$KV.>", "$O.>",
                          f"{RESYNC_PREFIX}.>", "kv.deadletter.>")
# Replies and consumer deliveries come to its inboxes.
INDEXER_SUBSCRIBE: Final = ("_INBOX.>",)


class NatsUser(msgspec.Struct, frozen=True):
    user: str
    password: str
    publish: list[str]
    subscribe: list[str]
    allow_responses: bool = False


def worker_user_name(model: str, worker_id: str) -> str:
    """The NATS user of a worker: `kvw-` and its liveness key (URL-safe, unique)."""
    return f"kvw-{liveness_key(model, worker_id)}"


def worker_user(model: str, worker_id: str, password: str) -> NatsUser:
    return NatsUser(worker_user_name(model, worker_id), password,
                    publish=worker_publish_subjects(model, worker_id),
                    subscribe=worker_subscribe_subjects(model, worker_id),
                    allow_responses=True)


def indexer_user(name: str, password: str) -> NatsUser:
    return NatsUser(name, password, publish=list(INDEXER_PUBLISH),
                    subscribe=list(INDEXER_SUBSCRIBE))


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _subjects(subjects: Sequence[str]) -> str:
    return "[" + ", ".join(_quoted(s) for s in subjects) + "]"


def render_authorization(users: Sequence[NatsUser]) -> str:
    """The nats-server `authorization { users = [...] }` block for `users`."""
    lines = ["# kv-indexer nats-auth: one user per worker, and the indexer's.",
             f"# Workers may publish only their own events and liveness key "
             f"(bucket {LIVENESS_BUCKET}); only the indexer may ask for resyncs.",
             "authorization {", "  users = ["]
    for u in users:
        perms = [f"publish: {{ allow: {_subjects(u.publish)} }}",
                 f"subscribe: {{ allow: {_subjects(u.subscribe)} }}"]
        if u.allow_responses:
            perms.append("allow_responses: true")
        lines.append(f"    {{ user: {_quoted(u.user)}, password: {_quoted(u.password)},")
        lines.append("      permissions: {")
        lines.extend(f"        {p}" for p in perms)
        lines.append("      } }")
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


class AuthError(Exception):
    """A bad argument or password file (exit status 2)."""


def password_for(user: str, directory: Path) -> str:
    """The password in `directory/user`, or a new random one written there (0600)."""
    path = directory / user
    if path.exists():
        password = path.read_text().strip()
        if not _SAFE_PASSWORD.fullmatch(password):
            raise AuthError(f"{path}: a password must be 16 to 256 characters of "
                            "[A-Za-z0-9._~-] (it goes in a NATS URL as it is)")
        return password
    password = secrets.token_urlsafe(32)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(password + "\n")
    return password


def _workers(args: argparse.Namespace) -> list[tuple[str, str]]:
    pairs = [(model, worker) for model, worker in args.worker or []]
    if args.workers_file:
        for number, line in enumerate(Path(args.workers_file).read_text().splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise AuthError(f"{args.workers_file}:{number}: expected MODEL WORKER")
            pairs.append((parts[0], parts[1]))
    seen: set[tuple[str, str]] = set()
    unique = []
    for model, worker in pairs:
        try:
            check_identity(model, worker)
        except BusDecodeError as exc:
            raise AuthError(f"worker {model!r} / {worker!r}: {exc}") from exc
        if (model, worker) not in seen:
            seen.add((model, worker))
            unique.append((model, worker))
    return unique


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kv-indexer nats-auth", formatter_class=DefaultsHelpFormatter,
        description="Print a nats-server authorization block: one user per worker, allowed "
                    "only its own subjects, and the indexer's user.")
    parser.add_argument("--worker", nargs=2, action="append", metavar=("MODEL", "WORKER"),
                        help="a worker's model and worker id, as its publisher is given them "
                             "(repeatable)")
    parser.add_argument("--workers-file", default=None,
                        help="a file of 'MODEL WORKER' lines (blank and # lines skipped)")
    parser.add_argument("--indexer-user", default=DEFAULT_INDEXER_USER,
                        help="the indexer's user name (default %(default)s)")
    parser.add_argument("--password-dir", required=True,
                        help="directory of one password file per user: read when there, "
                             "generated (0600) when not")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if not _SAFE_USER.fullmatch(args.indexer_user):
            raise AuthError("--indexer-user must be URL-safe: [A-Za-z0-9._~=-]")
        workers = _workers(args)
        if not workers:
            raise AuthError("no worker: give --worker MODEL WORKER or --workers-file")
        directory = Path(args.password_dir)
        users = [indexer_user(args.indexer_user,
                              password_for(args.indexer_user, directory))]
        names = {args.indexer_user}
        for model, worker in workers:
            name = worker_user_name(model, worker)
            if name in names:
                raise AuthError(f"user {name} would be defined twice")
            names.add(name)
            users.append(worker_user(model, worker, password_for(name, directory)))
    except (AuthError, OSError) as exc:
        print(f"kv-indexer nats-auth: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(render_authorization(users))
    print(f"kv-indexer nats-auth: {len(users)} users; passwords in {directory}/<user>",
          file=sys.stderr)
    return 0
