"""The query pipe: one connection, many concurrent callers, each gets its own reply."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.credentials import UsernamePasswordCredentialProvider
from redis.exceptions import ConnectionError, NoScriptError, ResponseError, TimeoutError

from indexer.index.redis_pipe import RedisPipe, pack
from tests.support.servers import RedisServer

pytestmark = pytest.mark.integration


@pytest.fixture
async def pipe(redis_client: aioredis.Redis) -> AsyncIterator[RedisPipe]:
    pipe = RedisPipe.for_client(redis_client)
    assert pipe is not None
    yield pipe
    await pipe.close()


async def test_concurrent_callers_get_their_own_replies(pipe: RedisPipe,
                                                        redis_client: aioredis.Redis) -> None:
    await redis_client.mset({f"k{i}": f"v{i}".encode() for i in range(500)})
    replies = await asyncio.gather(*(pipe.call("GET", f"k{i}") for i in range(500)))
    assert replies == [f"v{i}".encode() for i in range(500)]


async def test_callers_arriving_while_it_connects_share_one_connection(
        redis_server: RedisServer, redis_client: aioredis.Redis) -> None:
    async def connected() -> int:
        return int((await redis_client.info("clients"))["connected_clients"])

    before = await connected()
    pipe = RedisPipe(("127.0.0.1", redis_server.port))

    async def ping_after(turns: int) -> bytes:
        for _ in range(turns):
            await asyncio.sleep(0)
        return bytes(await pipe.call("PING"))

    assert set(await asyncio.gather(*(ping_after(i % 8) for i in range(200)))) == {b"PONG"}
    assert await connected() == before + 1
    await pipe.close()
    await asyncio.sleep(0.05)
    assert await connected() == before


async def test_a_caller_that_gives_up_does_not_shift_the_replies(pipe: RedisPipe) -> None:
    slow = asyncio.ensure_future(pipe.call("BLPOP", "nothing-here", "0.2"))
    await asyncio.sleep(0.02)
    slow.cancel()
    # The BLPOP's nil arrives first and must go nowhere, not to the next caller.
    assert await pipe.call("ECHO", "after") == b"after"
    assert await pipe.call("ECHO", "again") == b"again"


async def test_error_replies_raise(pipe: RedisPipe) -> None:
    with pytest.raises(NoScriptError):
        await pipe.call("EVALSHA", "0" * 40, 0)
    with pytest.raises(ResponseError, match="unknown command"):
        await pipe.call("NO-SUCH-COMMAND")
    assert await pipe.call("PING") == b"PONG"  # the connection is still good


async def test_transactions_of_concurrent_callers_stay_whole(pipe: RedisPipe) -> None:
    """A transaction's commands leave back to back: no other caller's command lands
    inside it (it would be queued there and its caller would get QUEUED)."""
    async def counted() -> list[object]:
        return await pipe.transaction(pack("INCR", "n"), pack("GET", "n"))

    replies = await asyncio.gather(*(counted() if i % 2 else pipe.call("INCR", "n")
                                     for i in range(400)))
    for reply in replies[1::2]:
        assert isinstance(reply, list)
        count, got = reply
        assert got == str(count).encode()
    assert all(isinstance(reply, int) for reply in replies[::2])
    assert int(await pipe.call("GET", "n")) == 400


async def test_transaction_errors_raise(pipe: RedisPipe) -> None:
    with pytest.raises(ResponseError, match="unknown command"):  # EXEC then aborts
        await pipe.transaction(pack("SET", "k", "v"), pack("NO-SUCH-COMMAND"))
    assert await pipe.call("GET", "k") is None  # nothing of it ran
    await pipe.call("SET", "s", "text")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await pipe.transaction(pack("LPUSH", "s", "x"))
    assert await pipe.transaction(pack("PING")) == [b"PONG"]  # the connection is good


async def test_password_and_database_from_the_url(redis_server: RedisServer,
                                                  redis_client: aioredis.Redis) -> None:
    url = f"redis://:s3cret@127.0.0.1:{redis_server.port}/5"
    client = aioredis.Redis.from_url(url, decode_responses=False)
    await redis_client.config_set("requirepass", "s3cret")
    try:
        await client.set("where", b"db5")
        pipe = RedisPipe.for_client(client)
        assert pipe is not None
        assert await pipe.call("GET", "where") == b"db5"
        await pipe.close()
        wrong = RedisPipe.for_client(aioredis.Redis.from_url(url.replace("s3cret", "wrong")))
        assert wrong is not None
        with pytest.raises(ResponseError):
            await wrong.call("PING")
    finally:
        await client.config_set("requirepass", "")
        await client.aclose()


def test_a_new_event_loop_gets_a_new_connection(redis_server: RedisServer) -> None:
    """asyncio.run() twice with one pipe: the second loop must not wait on the first's
    socket (nothing reads it once that loop has stopped)."""
    pipe = RedisPipe(("127.0.0.1", redis_server.port))

    async def ping() -> bytes:
        return bytes(await asyncio.wait_for(pipe.call("PING"), 5))

    async def ping_and_close() -> bytes:
        reply = await ping()
        await pipe.close()
        return reply

    assert asyncio.run(ping()) == b"PONG"
    assert asyncio.run(ping_and_close()) == b"PONG"


def test_pipelined_calls_on_uvloop(redis_server: RedisServer) -> None:
    """`kv-indexer serve` runs on uvloop, whose transports are not asyncio.Transport
    subclasses: the pipe must speak through them all the same."""
    pytest.importorskip("uvloop")
    from kvcore.runtime import run_event_loop

    pipe = RedisPipe(("127.0.0.1", redis_server.port))

    async def calls() -> tuple[str, list[bytes]]:
        try:
            await pipe.call("SET", "uv:key", "value")
            replies = await asyncio.wait_for(
                asyncio.gather(*(pipe.call("GET", "uv:key") for _ in range(20))), 5)
            return type(asyncio.get_running_loop()).__module__, replies
        finally:
            await pipe.close()

    loop_module, replies = run_event_loop(calls(), "uvloop")
    assert loop_module.startswith("uvloop")
    assert replies == [b"value"] * 20


def test_what_stays_on_redis_py() -> None:
    """TLS and Unix sockets are spoken by the pipe (TLS: tests/test_tls_redis.py);
    credential providers and RESP3 stay on redis-py."""
    assert RedisPipe.for_client(aioredis.Redis.from_url("rediss://127.0.0.1:6380/0")) is not None
    assert RedisPipe.for_client(aioredis.Redis.from_url("unix:///tmp/r.sock?db=2")) is not None
    assert RedisPipe.for_client(aioredis.Redis.from_url("redis://127.0.0.1:6380/0",
                                                        protocol=3)) is None
    provider = UsernamePasswordCredentialProvider("alice", "pw")
    assert RedisPipe.for_client(aioredis.Redis.from_url("redis://127.0.0.1:6380/0",
                                                        credential_provider=provider)) is None


async def test_reconnects_after_redis_restarts(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    try:
        pipe = RedisPipe(("127.0.0.1", server.port))
        assert await pipe.call("PING") == b"PONG"
        pending = asyncio.ensure_future(pipe.call("BLPOP", "nothing-here", "5"))
        await asyncio.sleep(0.05)
        server.kill()
        with pytest.raises(ConnectionError):
            await pending
        with pytest.raises(ConnectionError):
            await pipe.call("PING")
        server.start()
        assert await pipe.call("PING") == b"PONG"
        await pipe.close()
    finally:
        server.stop()


async def _silent_server() -> tuple[asyncio.Server, int, list[int]]:
    """Accepts connections, reads what comes, never answers; counts connections."""
    accepted: list[int] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        while await reader.read(65536):
            pass
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], accepted


async def test_a_silent_server_times_out_and_the_next_call_reconnects() -> None:
    server, port, accepted = await _silent_server()
    async with server:
        pipe = RedisPipe(("127.0.0.1", port), reply_timeout=0.2)
        for expected_connections in (1, 2):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(pipe.call("PING"), 5)
            assert len(accepted) == expected_connections
        await pipe.close()


async def test_close_while_connecting_is_a_connection_error() -> None:
    server, port, _ = await _silent_server()
    async with server:
        pipe = RedisPipe(("127.0.0.1", port), password="never-answered")
        call = asyncio.ensure_future(pipe.call("PING"))
        await asyncio.sleep(0.1)  # connected; AUTH sent and unanswered
        await pipe.close()
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(call, 5)


async def test_the_reply_timeout_comes_from_the_url() -> None:
    server, port, _ = await _silent_server()
    async with server:
        client = aioredis.Redis.from_url(f"redis://127.0.0.1:{port}/0?socket_timeout=0.2")
        pipe = RedisPipe.for_client(client)
        assert pipe is not None
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(pipe.call("PING"), 5)
        await pipe.close()
        await client.aclose()


async def test_a_malformed_reply_drops_the_connection_and_no_caller_gets_it() -> None:
    """Garbage on the socket (not RESP) fails the callers waiting on it with a
    ConnectionError; the next call opens a new connection."""
    replies = [b"!!not resp\r\n", b"+PONG\r\n"]

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reply = replies.pop(0)
        while await reader.read(65536):
            writer.write(reply)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    async with server:
        pipe = RedisPipe(("127.0.0.1", server.sockets[0].getsockname()[1]))
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(pipe.call("PING"), 5)
        assert await asyncio.wait_for(pipe.call("PING"), 5) == b"PONG"
        await pipe.close()


async def test_a_pipeline_gets_every_reply_in_order(pipe: RedisPipe) -> None:
    replies = await asyncio.gather(*(pipe.pipeline(pack("SET", f"p{i}", i), pack("INCR", f"p{i}"),
                                                   pack("GET", f"p{i}")) for i in range(100)))
    assert replies == [[b"OK", i + 1, str(i + 1).encode()] for i in range(100)]
    with pytest.raises(NoScriptError):
        await pipe.pipeline(pack("PING"), pack("EVALSHA", "0" * 40, 0), pack("SET", "q", 1))
    assert await pipe.call("GET", "q") == b"1"  # not a transaction: the rest ran
