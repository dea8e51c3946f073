"""Who may call the gRPC server: TLS, mutual TLS, bearer tokens.

`GrpcSecurity.load` reads `--grpc-tls-cert` / `--grpc-tls-key` (TLS), `--grpc-tls-client-ca`
(mTLS: a client must present a certificate signed by one of these CAs, or the handshake
fails) and `--grpc-token-file` (bearer tokens, one per line: several let a token be
rotated without a gap). With tokens, every call but the health service's must carry
`authorization: Bearer <token>` metadata; a missing or wrong token is refused with
UNAUTHENTICATED before the handler runs. Tokens are compared with `hmac.compare_digest`.
Health checks stay open so that load balancers and kubelets need no token; they tell
nothing but SERVING / NOT_SERVING.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import grpc
import msgspec
from grpc_health.v1 import health_pb2

from indexer.errors import ConfigError

if TYPE_CHECKING:
    from indexer.config import ServiceConfig

__all__ = ["OPEN_SERVICES", "GrpcSecurity", "TokenAuth", "read_tokens"]

# Services a caller needs no token for.
OPEN_SERVICES: Final = (health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,)


def _read_bytes(flag: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot read {path}: {exc.strerror or exc}") from exc


def read_tokens(path: str, flag: str = "--grpc-token-file") -> tuple[bytes, ...]:
    """The tokens of a token file: one per line, blank lines and '#' comments skipped."""
    tokens = []
    for raw in _read_bytes(flag, path).splitlines():
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        if not all(0x21 <= c <= 0x7E for c in line):
            raise ConfigError(f"{flag}: {path} holds a token with spaces or non-ASCII bytes "
                              "(a token is one word of printable ASCII)")
        tokens.append(line)
    if not tokens:
        raise ConfigError(f"{flag}: {path} holds no token")
    return tuple(tokens)


class GrpcSecurity(msgspec.Struct, frozen=True, kw_only=True):
    """TLS material and bearer tokens of a gRPC server (all optional)."""

    cert_chain: bytes | None = None
    private_key: bytes | None = None
    client_ca: bytes | None = None  # set: client certificates required
    tokens: tuple[bytes, ...] = ()

    @classmethod
    def load(cls, *, cert: str | None = None, key: str | None = None,
             client_ca: str | None = None, token_file: str | None = None) -> GrpcSecurity:
        if bool(cert) != bool(key):
            raise ConfigError("--grpc-tls-cert and --grpc-tls-key go together")
        if client_ca and not cert:
            raise ConfigError("--grpc-tls-client-ca needs --grpc-tls-cert and --grpc-tls-key")
        return cls(
            cert_chain=_read_bytes("--grpc-tls-cert", cert) if cert else None,
            private_key=_read_bytes("--grpc-tls-key", key) if key else None,
            client_ca=_read_bytes("--grpc-tls-client-ca", client_ca) if client_ca else None,
            tokens=read_tokens(token_file) if token_file else (),
        )

    @classmethod
    def from_config(cls, config: ServiceConfig) -> GrpcSecurity:
        """What `kv-indexer serve`'s --grpc-tls-* and --grpc-token-file name."""
        return cls.load(cert=config.grpc_tls_cert, key=config.grpc_tls_key,
                        client_ca=config.grpc_tls_client_ca, token_file=config.grpc_token_file)

    @property
    def tls(self) -> bool:
        return self.cert_chain is not None

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials for `add_secure_port` (only when `tls`)."""
        assert self.cert_chain is not None and self.private_key is not None
        try:
            return grpc.ssl_server_credentials(
                [(self.private_key, self.cert_chain)], root_certificates=self.client_ca,
                require_client_auth=self.client_ca is not None)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"--grpc-tls-cert/--grpc-tls-key: {exc}") from exc

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [TokenAuth(self.tokens)] if self.tokens else []

    def describe(self) -> str:
        """For the banner: plaintext, TLS or mTLS, with or without tokens."""
        kind = "mTLS" if self.client_ca else "TLS" if self.tls else "plaintext"
        return kind + (f", bearer tokens ({len(self.tokens)})" if self.tokens else "")


Handler = Any  # grpc.RpcMethodHandler (grpc ships no type stubs)
_REFUSAL: Final = "missing or invalid bearer token (authorization: Bearer <token>)"


async def _refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _REFUSAL)


class TokenAuth(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc has no stubs
    """Refuses calls without one of `tokens` as a bearer token, except to OPEN_SERVICES."""

    def __init__(self, tokens: Sequence[bytes],
                 open_services: Sequence[str] = OPEN_SERVICES) -> None:
        if not tokens:
            raise ValueError("TokenAuth needs at least one token")
        self._expected = tuple(b"Bearer " + token for token in tokens)
        self._open = tuple(f"/{name}/" for name in open_services)
        # One refusing handler per call shape (the reflection service streams).
        self._refusals = {
            (False, False): grpc.unary_unary_rpc_method_handler(_refuse),
            (False, True): grpc.unary_stream_rpc_method_handler(_refuse),
            (True, False): grpc.stream_unary_rpc_method_handler(_refuse),
            (True, True): grpc.stream_stream_rpc_method_handler(_refuse),
        }

    def authorized(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        for key, value in metadata or ():
            if key != "authorization":
                continue
            given = value.encode("utf-8", "replace") if isinstance(value, str) else value
            # Every token is compared (constant time each), whichever matches.
            matched = False
            for expected in self._expected:
                matched |= hmac.compare_digest(given, expected)
            return matched
        return False

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if (handler is None or method.startswith(self._open)
                or self.authorized(handler_call_details.invocation_metadata)):
            return handler
        return self._refusals[(bool(handler.request_streaming),
                               bool(handler.response_streaming))]
