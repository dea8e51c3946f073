"""One Redis connection that carries every concurrent query, pipelined.

redis-py's asyncio client spends 80-130 µs of CPU per command (pool checkout, retry
wrappers, stream reads) and gives each concurrent command a connection of its own. Score
sends one EVALSHA per call, so on the query path that overhead was a fifth of the server's
CPU. Here a command is one `transport.write` of hiredis-packed bytes and one future; replies
come back in order on the same socket, so Redis reads (and answers) bursts of concurrent
queries with one syscall each way. About 20-55 µs per command (bench/grpc_score.py).

Plain TCP and Unix sockets with a password and a database number are spoken here; anything
else a URL can ask for (TLS, credential providers) stays on redis-py: `for_client` returns
None and the caller keeps using its client.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Final

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError, NoScriptError, ResponseError

__all__ = ["RedisPipe"]

_PLAIN_CLASSES: Final = (aioredis.Connection, aioredis.UnixDomainSocketConnection)


class _Protocol(asyncio.Protocol):
    """Feeds replies to the waiting futures, oldest first."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiters: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()  # a socket serves the loop that opened it
        self._unsent: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            waiter = self.waiters.popleft()
            if not waiter.done():  # a caller that gave up (deadline) no longer listens
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._unsent.clear()
        error = ConnectionError(f"redis connection lost: {exc or 'closed by server'}")
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionError("redis connection is closed")
        waiter = self.loop.create_future()
        # Commands issued in one turn of the event loop leave in one write (one syscall
        # here, one read in Redis) at the end of that turn.
        if not self._unsent:
            self.loop.call_soon(self._flush)
        self._unsent.append(packed)
        self.waiters.append(waiter)
        return waiter

    def _flush(self) -> None:
        if self.transport is not None and self._unsent:
            self.transport.write(b"".join(self._unsent))
        self._unsent.clear()


def _pack(args: tuple[bytes | str | int | None, ...]) -> bytes:
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]  # stub: a 1-tuple
    return packed


def _raise_if_error(reply: Any) -> Any:
    if isinstance(reply, hiredis.ReplyError):
        message = str(reply)
        if message.startswith("NOSCRIPT"):
            raise NoScriptError(message)
        raise ResponseError(message)
    return reply


class RedisPipe:
    """Commands from any number of tasks over one lazily (re)connected socket."""

    def __init__(self, address: tuple[str, int] | str, *, db: int = 0,
                 username: str | None = None, password: str | None = None,
                 connect_timeout: float | None = 5.0) -> None:
        self._address = address
        self._handshake = _handshake_commands(db, username, password)
        self._connect_timeout = connect_timeout
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Task[_Protocol] | None = None

    @classmethod
    def for_client(cls, client: aioredis.Redis) -> RedisPipe | None:
        """A pipe to where `client` connects, or None if it needs what only redis-py speaks."""
        pool = client.connection_pool
        kwargs = pool.connection_kwargs
        if (pool.connection_class not in _PLAIN_CLASSES or kwargs.get("credential_provider")
                or kwargs.get("protocol") not in (None, 2, "2")):
            return None
        address = kwargs["path"] if "path" in kwargs else (kwargs["host"], kwargs["port"])
        return cls(address, db=int(kwargs.get("db") or 0), username=kwargs.get("username"),
                   password=kwargs.get("password"),
                   connect_timeout=kwargs.get("socket_connect_timeout", 5.0))

    async def call(self, *args: bytes | str | int) -> Any:
        """One command's reply; an error reply raises ResponseError (NoScriptError)."""
        protocol = self._protocol
        if (protocol is None or protocol.transport is None
                or protocol.loop is not asyncio.get_running_loop()):
            protocol = await self._connect()
        return _raise_if_error(await protocol.send(_pack(args)))

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None

    async def _connect(self) -> _Protocol:
        # Concurrent first calls share one connection attempt.
        if (self._connecting is None or self._connecting.done()
                or self._connecting.get_loop() is not asyncio.get_running_loop()):
            self._connecting = asyncio.ensure_future(self._open())
        protocol = await asyncio.shield(self._connecting)
        self._protocol = protocol
        return protocol

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        protocol: _Protocol | None = None
        try:
            async with asyncio.timeout(self._connect_timeout):
                if isinstance(self._address, str):
                    _, protocol = await loop.create_unix_connection(_Protocol, self._address)
                else:
                    host, port = self._address
                    _, protocol = await loop.create_connection(_Protocol, host, port)
                replies = [protocol.send(_pack(c)) for c in self._handshake]
                for reply in await asyncio.gather(*replies):
                    _raise_if_error(reply)
            return protocol
        except BaseException as exc:
            if protocol is not None and protocol.transport is not None:
                protocol.transport.close()
            if isinstance(exc, OSError | TimeoutError):
                raise ConnectionError(
                    f"cannot connect to redis at {self._address}: {exc}") from exc
            raise


def _handshake_commands(db: int, username: str | None,
                        password: str | None) -> list[tuple[str | int | None, ...]]:
    commands: list[tuple[str | int | None, ...]] = []
    if password is not None:
        commands.append(("AUTH", username, password) if username else ("AUTH", password))
    if db:
        commands.append(("SELECT", db))
    return commands
