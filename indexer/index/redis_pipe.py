"""One Redis connection that carries every concurrent query, pipelined.

redis-py's asyncio client spends much of a command's CPU on pool checkout, retry wrappers
and stream reads, and gives each concurrent command a connection of its own. Score sends
one EVALSHA per call, so on the query path that overhead was a large share of the server's
CPU. Here a command is hiredis-packed bytes and one future. Commands issued in one
turn of the event loop leave in one write, and replies resolve the futures in order, so
Redis reads (and answers) bursts of concurrent queries with one syscall each way.
`make bench-redis` compares the two paths ("Score's connection to Redis").

Plain TCP, TLS (rediss://: the TLS context is the one redis-py builds for the client, so
CA, client certificate and hostname checks are the same) and Unix sockets, with a user,
a password and a database number, are spoken here; anything else a URL can ask for
(credential providers, RESP3) stays on redis-py: `for_client` returns None and the caller
keeps using its client. Every failure is a redis-py exception
(ConnectionError, TimeoutError, ResponseError, NoScriptError).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Any, Final, cast

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError, NoScriptError, ResponseError, TimeoutError

__all__ = ["RedisPipe", "pack"]

_SPOKEN_CLASSES: Final = (aioredis.Connection, aioredis.SSLConnection,
                          aioredis.UnixDomainSocketConnection)


class _Protocol(asyncio.Protocol):
    """Feeds replies to the waiting futures, oldest first; gives up on a silent server."""

    def __init__(self, reply_timeout: float | None) -> None:
        self.reader = hiredis.Reader()
        self.waiters: deque[tuple[asyncio.Future[Any], float]] = deque()  # (future, sent at)
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()  # a socket serves the loop that opened it
        self._reply_timeout = reply_timeout
        self._watchdog: asyncio.TimerHandle | None = None
        self._unsent: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, though not always an asyncio.Transport subclass (uvloop's).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            waiter, _ = self.waiters.popleft()
            if not waiter.done():  # a caller that gave up (deadline) no longer listens
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all(ConnectionError(f"redis connection lost: {exc or 'closed by server'}"))

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionError("redis connection is closed")
        waiter = self.loop.create_future()
        if not self._unsent:
            self.loop.call_soon(self._flush)
        self._unsent.append(packed)
        self.waiters.append((waiter, self.loop.time()))
        if self._reply_timeout is not None and self._watchdog is None:
            self._watchdog = self.loop.call_later(self._reply_timeout, self._check_replies)
        return waiter

    def close(self) -> None:
        if self.loop.is_closed():  # nothing can run there any more, nor be woken
            self.transport = None
            self.waiters.clear()
            return
        if self.transport is not None:
            self.transport.close()
        self._fail_all(ConnectionError("redis connection closed"))

    def _flush(self) -> None:
        if self.transport is not None and self._unsent:
            self.transport.write(b"".join(self._unsent))
        self._unsent.clear()

    def _check_replies(self) -> None:
        """Redis answers in order: if the oldest command waited too long, the socket is
        dead or the server is stuck; drop it so the next query reconnects."""
        self._watchdog = None
        if not self.waiters or self._reply_timeout is None:
            return
        waited = self.loop.time() - self.waiters[0][1]
        if waited >= self._reply_timeout:
            if self.transport is not None:
                self.transport.abort()
            self._fail_all(TimeoutError(f"no reply from redis in {self._reply_timeout:g} s"))
        else:
            self._watchdog = self.loop.call_later(self._reply_timeout - waited,
                                                  self._check_replies)

    def _fail_all(self, error: Exception) -> None:
        self.transport = None
        self._unsent.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        while self.waiters:
            waiter, _ = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)


def _pack(args: tuple[bytes | str | int, ...]) -> bytes:
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]  # stub: a 1-tuple
    return packed


def pack(*args: bytes | str | int) -> bytes:
    """A command as the bytes `RedisPipe.transaction` sends."""
    return _pack(args)


_MULTI: Final = _pack(("MULTI",))
_EXEC: Final = _pack(("EXEC",))


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
                 connect_timeout: float | None = 5.0,
                 reply_timeout: float | None = None,
                 ssl_context: ssl.SSLContext | None = None, readonly: bool = False) -> None:
        self._address = address
        self._ssl = ssl_context
        self._handshake = _handshake_commands(db, username, password, readonly)
        self._connect_timeout = connect_timeout
        self._reply_timeout = reply_timeout
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Task[_Protocol] | None = None

    @classmethod
    def for_client(cls, client: aioredis.Redis, *, readonly: bool = False) -> RedisPipe | None:
        """A pipe to where `client` connects, with its timeouts and credentials, or None
        if it needs what only redis-py speaks. `readonly`: READONLY on connecting (a
        Redis Cluster replica then serves reads of its master's slots)."""
        pool = client.connection_pool
        kwargs = pool.connection_kwargs
        if (pool.connection_class not in _SPOKEN_CLASSES or kwargs.get("credential_provider")
                or kwargs.get("protocol") not in (None, 2, "2")):
            return None
        context: ssl.SSLContext | None = None
        if pool.connection_class is aioredis.SSLConnection:
            # The context redis-py would use: same CA, client certificate, checks.
            context = pool.connection_class(**kwargs).ssl_context.get()
        address = kwargs["path"] if "path" in kwargs else (kwargs["host"], kwargs["port"])
        return cls(address, db=int(kwargs.get("db") or 0), username=kwargs.get("username"),
                   password=kwargs.get("password"),
                   connect_timeout=kwargs.get("socket_connect_timeout", 5.0),
                   reply_timeout=kwargs.get("socket_timeout"), ssl_context=context,
                   readonly=readonly)

    @classmethod
    def for_cluster_node(cls, node: Any) -> RedisPipe | None:
        """A pipe to a Redis Cluster node (redis-py's ClusterNode), or None if its
        connections need what only redis-py speaks (TLS, a credential provider, RESP3)."""
        kwargs = node.connection_kwargs
        if (node.connection_class is not aioredis.Connection
                or kwargs.get("credential_provider")
                or kwargs.get("protocol") not in (None, 2, "2")):
            return None
        return cls((node.host, int(node.port)), username=kwargs.get("username"),
                   password=kwargs.get("password"),
                   connect_timeout=kwargs.get("socket_connect_timeout") or 5.0,
                   reply_timeout=kwargs.get("socket_timeout"))

    async def call(self, *args: bytes | str | int) -> Any:
        """One command's reply; an error reply raises ResponseError (NoScriptError)."""
        protocol = self._protocol
        if (protocol is None or protocol.transport is None
                or protocol.loop is not asyncio.get_running_loop()):
            protocol = await self._connect()
        return _raise_if_error(await protocol.send(_pack(args)))

    async def transaction(self, *commands: bytes) -> list[Any]:
        """The replies of `commands` (each packed: `pack`), run as one MULTI / EXEC, so
        no other client's command runs between them. They leave back to back (nothing
        else of this pipe comes between); an error reply raises ResponseError."""
        protocol = self._protocol
        if (protocol is None or protocol.transport is None
                or protocol.loop is not asyncio.get_running_loop()):
            protocol = await self._connect()
        waiters = [protocol.send(packed) for packed in (_MULTI, *commands, _EXEC)]
        try:
            await waiters[-1]  # replies come in order: the others are in when EXEC's is
        finally:
            for waiter in waiters:  # none left waiting, no exception left unretrieved
                if not waiter.done():
                    waiter.cancel()  # a caller's deadline: their replies are dropped
                elif not waiter.cancelled():
                    waiter.exception()
        for waiter in waiters:
            _raise_if_error(waiter.result())
        results = cast(list[Any], waiters[-1].result())
        for result in results:
            _raise_if_error(result)
        return results

    async def pipeline(self, *commands: bytes) -> list[Any]:
        """The replies of `commands` (each packed: `pack`), sent back to back in one
        write, one future awaited; not atomic (no MULTI). An error reply raises
        ResponseError (NoScriptError) once every reply is in."""
        protocol = self._protocol
        if (protocol is None or protocol.transport is None
                or protocol.loop is not asyncio.get_running_loop()):
            protocol = await self._connect()
        waiters = [protocol.send(packed) for packed in commands]
        try:
            await waiters[-1]  # replies come in order: the others are in when the last is
        finally:
            for waiter in waiters:
                if not waiter.done():
                    waiter.cancel()
                elif not waiter.cancelled():
                    waiter.exception()
        replies = [waiter.result() for waiter in waiters]
        for reply in replies:
            _raise_if_error(reply)
        return replies

    async def close(self) -> None:
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        self._connecting = None
        if self._protocol is not None:
            self._protocol.close()
        self._protocol = None

    async def _connect(self) -> _Protocol:
        # Callers that find no connection share one attempt; the one that succeeded is
        # the connection until it is lost.
        loop = asyncio.get_running_loop()
        task = self._connecting
        if task is None or task.get_loop() is not loop or task.done():
            task = self._connecting = loop.create_task(self._open())
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():  # close() stopped the attempt, not this caller's deadline
                raise ConnectionError("redis pipe closed while connecting") from None
            raise

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        protocol: _Protocol | None = None
        try:
            async with asyncio.timeout(self._connect_timeout):
                if isinstance(self._address, str):
                    _, protocol = await loop.create_unix_connection(
                        lambda: _Protocol(self._reply_timeout), self._address)
                else:
                    host, port = self._address
                    _, protocol = await loop.create_connection(
                        lambda: _Protocol(self._reply_timeout), host, port, ssl=self._ssl)
                replies = [protocol.send(_pack(c)) for c in self._handshake]
                for reply in await asyncio.gather(*replies):
                    _raise_if_error(reply)
        except BaseException as exc:
            if protocol is not None:
                protocol.close()
            if isinstance(exc, OSError | asyncio.TimeoutError):
                raise ConnectionError(
                    f"cannot connect to redis at {self._address}: {exc!r}") from exc
            raise
        if self._protocol is not None:
            self._protocol.close()  # e.g. a socket of an event loop that has ended
        self._protocol = protocol
        return protocol


def _handshake_commands(db: int, username: str | None, password: str | None,
                        readonly: bool = False) -> list[tuple[str | int, ...]]:
    commands: list[tuple[str | int, ...]] = []
    if password:  # as redis-py: an empty password means no AUTH
        commands.append(("AUTH", username, password) if username else ("AUTH", password))
    if db:
        commands.append(("SELECT", db))
    if readonly:
        commands.append(("READONLY",))
    return commands
