"""Connecting to NATS, shared by `kv-indexer` and `kv-publisher`: TLS (a CA, a client
certificate), and the server's ways to authenticate a client (a `.creds` file, an NKey
seed, a user and password read from files).

`NatsSecurity` holds the settings, named as the flags of both programs name them
(`NATS_SECURITY_FLAGS`: `--nats-tls-ca`, ...; only the environment variables' prefixes
differ). `nats_connect_options` turns them into nats.connect keyword arguments, and
`connect_nats` makes the first connection within a bounded time: a set-up that cannot
work (an untrusted server certificate, a server that wants a client certificate, refused
credentials) fails at the first attempt with one line that names the flag to look at; a
server that is not there is retried until the start timeout. After the first connection
nats-py reconnects as configured by the caller, forever if asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgspec
import structlog

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient

from kvcore.redact import redact_text, redact_url

__all__ = [
    "DEFAULT_START_TIMEOUT_S",
    "NATS_SECURITY_FLAGS",
    "NatsSecurity",
    "NatsSetupError",
    "connect_nats",
    "nats_connect_options",
    "nats_servers",
]

log = structlog.get_logger("kvcore.connect")

# How long the first connection may take, retries of an absent server included.
DEFAULT_START_TIMEOUT_S: Final = 60.0
# One attempt's TCP connect, TLS handshake and INFO/CONNECT/PONG exchange.
_ATTEMPT_TIMEOUT_S: Final = 5.0

# (flag, NatsSecurity field, help): the same flags on `kv-indexer serve`, `kv-indexer
# rebuild` and `kv-publisher bridge`; the environment variable is the program's prefix
# plus the field upper-cased (KV_INDEXER_NATS_TLS_CA, KV_PUBLISHER_NATS_TLS_CA).
NATS_SECURITY_FLAGS: Final[tuple[tuple[str, str, str], ...]] = (
    ("--nats-tls-ca", "nats_tls_ca",
     "PEM file of the CA(s) that signed the NATS server's certificate (turns on TLS)"),
    ("--nats-tls-cert", "nats_tls_cert",
     "PEM client certificate for NATS servers that verify clients (with --nats-tls-key)"),
    ("--nats-tls-key", "nats_tls_key", "PEM private key of --nats-tls-cert"),
    ("--nats-creds", "nats_creds", "NATS .creds file (user JWT and NKey seed)"),
    ("--nats-nkey-seed", "nats_nkey_seed", "file holding an NKey user seed (SU...)"),
    ("--nats-user-file", "nats_user_file", "file holding the NATS user name"),
    ("--nats-password-file", "nats_password_file",
     "file holding the NATS password (with --nats-user-file)"),
)


def nats_servers(url: str) -> list[str]:
    """The server URLs of a NATS URL setting: one, or several separated by commas (the
    nodes of a cluster; the client connects to one and fails over to the others)."""
    return [part.strip() for part in url.split(",") if part.strip()]


class NatsSetupError(Exception):
    """A NATS connection set-up that cannot work; the message is one line naming the flag."""


class NatsSecurity(msgspec.Struct, frozen=True, kw_only=True):
    """TLS and credentials for NATS; every field is a file path (None: not used)."""

    nats_tls_ca: str | None = None
    nats_tls_cert: str | None = None
    nats_tls_key: str | None = None
    nats_creds: str | None = None
    nats_nkey_seed: str | None = None
    nats_user_file: str | None = None
    nats_password_file: str | None = None

    @classmethod
    def from_values(cls, values: Mapping[str, object]) -> NatsSecurity:
        """The NATS fields of a settings mapping or struct-like object (others ignored)."""
        return cls(**{field: str(values[field]) for _flag, field, _help in NATS_SECURITY_FLAGS
                      if values.get(field)})

    @property
    def uses_tls(self) -> bool:
        return bool(self.nats_tls_ca or self.nats_tls_cert)

    @property
    def has_credentials(self) -> bool:
        """A user of its own (creds, NKey or user and password files), with permissions."""
        return bool(self.nats_creds or self.nats_nkey_seed or self.nats_user_file)

    def check(self) -> None:
        """Refuse pairs given by halves, two ways to authenticate, unreadable files."""
        if bool(self.nats_tls_cert) != bool(self.nats_tls_key):
            raise NatsSetupError("--nats-tls-cert and --nats-tls-key go together")
        if bool(self.nats_user_file) != bool(self.nats_password_file):
            raise NatsSetupError("--nats-user-file and --nats-password-file go together")
        ways = [flag for flag, field in (("--nats-creds", "nats_creds"),
                                         ("--nats-nkey-seed", "nats_nkey_seed"),
                                         ("--nats-user-file", "nats_user_file"))
                if getattr(self, field)]
        if len(ways) > 1:
            raise NatsSetupError(f"{' and '.join(ways)}: give one way to authenticate")
        for flag, field, _help in NATS_SECURITY_FLAGS:
            path = getattr(self, field)
            if path:
                _read(flag, path)


def _read(flag: str, path: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise NatsSetupError(f"{flag}: cannot read {path}: {reason}") from exc


def _ssl_context(security: NatsSecurity) -> ssl.SSLContext:
    """The client's TLS context: the system's CAs unless --nats-tls-ca names others."""
    try:
        context = ssl.create_default_context(cafile=security.nats_tls_ca)
    except (OSError, ssl.SSLError) as exc:
        raise NatsSetupError(f"--nats-tls-ca: {security.nats_tls_ca} holds no usable CA "
                             f"certificate ({exc})") from exc
    if security.nats_tls_cert:
        try:
            context.load_cert_chain(security.nats_tls_cert, security.nats_tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise NatsSetupError(
                f"--nats-tls-cert/--nats-tls-key: cannot load the client certificate "
                f"{security.nats_tls_cert} with key {security.nats_tls_key} ({exc})") from exc
    return context


def nats_connect_options(security: NatsSecurity) -> dict[str, Any]:
    """nats.connect keyword arguments for `security` (NatsSetupError if unusable)."""
    security.check()
    options: dict[str, Any] = {}
    if security.uses_tls:
        options["tls"] = _ssl_context(security)
    if security.nats_creds:
        options["user_credentials"] = security.nats_creds
    if security.nats_nkey_seed:
        options["nkeys_seed"] = security.nats_nkey_seed
    if security.nats_user_file and security.nats_password_file:
        user = _read("--nats-user-file", security.nats_user_file).strip()
        password = _read("--nats-password-file", security.nats_password_file).strip()
        if not user:
            raise NatsSetupError(f"--nats-user-file: {security.nats_user_file} is empty")
        options["user"], options["password"] = user, password
    return options


def _explain(exc: BaseException, security: NatsSecurity) -> str | None:
    """What to fix, naming the flag, for an error that retrying will not cure; None for
    one that may pass (a server not up yet)."""
    text = f"{exc!r} {exc}".lower()
    if isinstance(exc, ssl.SSLCertVerificationError) or "certificate verify failed" in text:
        if security.nats_tls_ca:
            return (f"the server's TLS certificate does not verify against --nats-tls-ca "
                    f"{security.nats_tls_ca} ({getattr(exc, 'verify_message', exc)})")
        return ("the server's TLS certificate is not trusted by the system's CAs: pass the "
                "CA that signed it with --nats-tls-ca")
    if isinstance(exc, ssl.SSLError):
        if "certificate required" in text or "handshake failure" in text:
            return ("the server refused the TLS handshake: it wants a client certificate "
                    "(--nats-tls-cert and --nats-tls-key) it trusts")
        return f"TLS with the server failed ({exc}): check --nats-tls-ca/--nats-tls-cert"
    if "authorization violation" in text or "authentication" in text:
        return ("the server refused the credentials: check --nats-creds, --nats-nkey-seed "
                "or --nats-user-file/--nats-password-file")
    if "no ssl context provided" in text or "tls required" in text:
        return "the server requires TLS: pass --nats-tls-ca (and a client certificate)"
    return None


async def connect_nats(
    url: str,
    security: NatsSecurity | None = None,
    *,
    name: str,
    start_timeout_s: float | None = DEFAULT_START_TIMEOUT_S,
    **options: Any,
) -> NatsClient:
    """Connect to NATS at `url` with `security`; `options` go to nats.connect (reconnect
    settings for later). NatsSetupError, one line, when the set-up cannot work or the
    server was not reached within `start_timeout_s` (None: wait as long as it takes)."""
    security = security or NatsSecurity()
    kwargs = {**nats_connect_options(security), **options}
    kwargs.setdefault("connect_timeout", _ATTEMPT_TIMEOUT_S)
    fatal: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    last_error: list[BaseException] = []
    user_error_cb = kwargs.pop("error_cb", None)
    started = False

    async def on_error(exc: Exception) -> None:
        """nats-py reports each failed attempt here while it keeps trying."""
        if started:  # connected once: an ordinary error of a running connection
            if user_error_cb is not None:
                await user_error_cb(exc)
            else:  # a permissions violation, a password refused while reconnecting
                log.warning("nats_error", url=redact_url(url),
                            error=redact_text(repr(exc))[:300])
            return
        if not last_error or repr(last_error[-1]) != repr(exc):
            log.warning("nats_connect_failed", url=redact_url(url),
                        error=redact_text(repr(exc))[:300])
        last_error[:] = [exc]
        reason = _explain(exc, security)
        if reason is not None and not fatal.done():
            fatal.set_result(reason)

    import nats  # noqa: PLC0415 - the query CLI imports this module's flags without nats-py
    from nats.errors import Error as NatsError  # noqa: PLC0415

    servers = nats_servers(url)
    connecting = asyncio.ensure_future(nats.connect(servers, name=name, error_cb=on_error,
                                                    **kwargs))
    waiting: set[asyncio.Future[Any]] = {connecting, fatal}
    try:
        done, _ = await asyncio.wait(waiting, timeout=start_timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # cancelled (a signal during start-up): stop trying
        await _abandon(connecting)
        raise
    if connecting in done:
        try:
            client = connecting.result()
        except (NatsError, OSError, TimeoutError) as exc:
            reason = _explain(exc, security) or repr(exc)
            raise NatsSetupError(f"cannot connect to NATS at {url}: {reason}") from exc
        started = True
        return client
    await _abandon(connecting)
    if fatal.done():
        raise NatsSetupError(f"cannot connect to NATS at {url}: {fatal.result()}")
    last = f" (last error: {last_error[-1]!r})" if last_error else ""
    raise NatsSetupError(f"cannot connect to NATS at {url} within {start_timeout_s:g} s"
                         f"{last}")


async def _abandon(connecting: asyncio.Future[NatsClient]) -> None:
    """Stop a connection attempt. A cancel that lands as an asyncio.wait_for inside nats-py
    completes is lost on Python 3.11 (and the attempt would go on for ever): cancel again
    until it has ended."""
    while not connecting.done():
        connecting.cancel()
        await asyncio.wait({connecting}, timeout=0.5)
    if not connecting.cancelled() and connecting.exception() is None:
        with contextlib.suppress(Exception):
            await connecting.result().close()
