"""bench/grpcload.c, the bench's C load generator, against a real server: it must count
only answered calls as measured, every non-OK status as an error, and stop (not spin)
when the server goes away, or bench-grpc's figures mean nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bench import grpcload
from indexer._proto.kvindex.v1 import indexer_pb2 as pb
from indexer.index.memory import MemoryIndex
from indexer.serve.service import start_grpc_server
from tests.support.grpc_scenario import CONFIG, MODEL, NO_CACHE, TOKENS, scenario

SCORE = "/kvindex.v1.KvIndexer/Score"
STREAM = "/kvindex.v1.KvIndexer/FindBestWorkerStream"
VALID = pb.ScoreRequest(model="m", block_keys=[1, 2, 3]).SerializeToString()
INVALID = pb.ScoreRequest(model="", block_keys=[1]).SerializeToString()  # INVALID_ARGUMENT


@pytest.fixture(scope="module")
def binary() -> Path:
    built = grpcload.build()
    if built is None:
        pytest.skip("grpcload cannot be built here (no compiler or no libnghttp2-dev)")
    return built


async def run(binary: Path, tmp_path: Path, bodies: list[bytes], *, mode: str, amount: float,
              duration: float = 0.5, stop_server_after: float | None = None,
              method: str = SCORE) -> grpcload.LoadRun:
    load = grpcload.GrpcLoad(binary, tmp_path / "bodies")
    grpcload.write_bodies(bodies, load.bodies)
    index = MemoryIndex(CONFIG)
    await index.apply(scenario())
    server, port = await start_grpc_server(index, "127.0.0.1:0", settings=NO_CACHE)
    try:
        proc = grpcload.start(load, tmp_path / "latencies", port=port, method=method,
                              mode=mode, amount=amount, connections=2, warmup=0.1,
                              duration=duration)
        finished = asyncio.create_task(
            asyncio.to_thread(grpcload.finish, proc, tmp_path / "latencies", 30))
        if stop_server_after is not None:
            await asyncio.sleep(stop_server_after)
            await server.stop(grace=2)  # GOAWAY, then the calls in flight may finish
        return await finished
    finally:
        await server.stop(None)


async def test_answered_calls_are_measured(binary: Path, tmp_path: Path) -> None:
    result = await run(binary, tmp_path, [VALID], mode="closed", amount=4)
    assert result.errors == {}
    assert len(result.latencies) > 10
    assert all(0 < x < 5 for x in result.latencies)


async def test_failed_calls_are_counted_by_status_not_measured(binary: Path,
                                                              tmp_path: Path) -> None:
    result = await run(binary, tmp_path, [INVALID], mode="closed", amount=4)
    assert result.latencies == []
    assert set(result.errors) == {"INVALID_ARGUMENT"}
    assert result.errors["INVALID_ARGUMENT"] > 10


async def test_open_loop_sends_on_schedule(binary: Path, tmp_path: Path) -> None:
    result = await run(binary, tmp_path, [VALID, VALID], mode="open", amount=200)
    assert result.errors == {}
    assert 90 <= len(result.latencies) <= 101  # 200 calls/s over 0.5 s
    assert result.max_lag < 0.1


async def test_a_server_going_away_stops_the_run(binary: Path, tmp_path: Path) -> None:
    """After GOAWAY every new call would be refused at once: the generator must stop with
    an error instead of spinning through refused calls until its end."""
    with pytest.raises(RuntimeError, match="GOAWAY"):
        await run(binary, tmp_path, [VALID], mode="closed", amount=4, duration=20,
                  stop_server_after=0.5)


def stream_message(*models: str) -> bytes:
    """A FindBestWorkerStream message of one decision per model over the scenario prompt."""
    return pb.FindBestWorkerStreamRequest(requests=[
        pb.FindBestWorkerRequest(score=pb.ScoreRequest(model=model, token_ids=TOKENS))
        for model in models]).SerializeToString()


async def test_stream_mode_counts_every_decision_of_an_answer(binary: Path,
                                                             tmp_path: Path) -> None:
    """sclosed: messages of 3 decisions on one stream per connection, one of them failing
    (FAILED_PRECONDITION): two measured per answer, one counted as an error."""
    result = await run(binary, tmp_path, [stream_message(MODEL, "nobody", MODEL)],
                       mode="sclosed", amount=4, method=STREAM)
    failed = result.errors.pop("FAILED_PRECONDITION")
    assert result.errors == {}
    assert len(result.latencies) > 20 and len(result.latencies) % 2 == 0
    # errors count over the whole run (warm-up and tail too), measured calls in the window
    assert len(result.latencies) // 2 <= failed < len(result.latencies)
    assert all(0 < x < 5 for x in result.latencies)


async def test_stream_open_loop_sends_on_schedule(binary: Path, tmp_path: Path) -> None:
    result = await run(binary, tmp_path, [stream_message(MODEL)], mode="sopen", amount=200,
                       method=STREAM)
    assert result.errors == {}
    assert 90 <= len(result.latencies) <= 101  # 200 messages/s of one decision over 0.5 s
    assert result.max_lag < 0.1
