"""bench/grpcload.c, the bench's C load generator, against a real server: it must count
what it measures and every non-OK status, or bench-grpc's figures mean nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bench import grpcload
from indexer._proto.kvindex.v1 import indexer_pb2 as pb
from indexer.index.memory import MemoryIndex
from tests.test_service import CONFIG, scenario, serving

SCORE = "/kvindex.v1.KvIndexer/Score"
VALID = pb.ScoreRequest(model="m", block_keys=[1, 2, 3]).SerializeToString()
INVALID = pb.ScoreRequest(model="", block_keys=[1]).SerializeToString()  # INVALID_ARGUMENT


@pytest.fixture(scope="module")
def binary() -> Path:
    built = grpcload.build()
    if built is None:
        pytest.skip("grpcload cannot be built here (no compiler or no libnghttp2-dev)")
    return built


async def run(binary: Path, tmp_path: Path, bodies: list[bytes], mode: str,
              amount: float) -> grpcload.LoadRun:
    load = grpcload.GrpcLoad(binary, tmp_path / "bodies")
    grpcload.write_bodies(bodies, load.bodies)
    index = MemoryIndex(CONFIG)
    await index.apply(scenario())
    async with serving(index) as (_, port):
        proc = grpcload.start(load, tmp_path / "latencies", port=port, method=SCORE,
                              mode=mode, amount=amount, connections=2, warmup=0.1,
                              duration=0.5)
        return await asyncio.to_thread(grpcload.finish, proc, tmp_path / "latencies", 30)


async def test_closed_loop_counts_calls_and_errors_by_status(binary: Path,
                                                             tmp_path: Path) -> None:
    result = await run(binary, tmp_path, [VALID, INVALID], "closed", 4)
    assert len(result.latencies) > 10
    assert all(0 < x < 5 for x in result.latencies)
    # Bodies alternate, so failures are about as many as successes (plus the warm-up's).
    failed = result.errors["INVALID_ARGUMENT"]
    assert set(result.errors) == {"INVALID_ARGUMENT"}
    assert failed >= len(result.latencies) // 2


async def test_open_loop_keeps_its_schedule(binary: Path, tmp_path: Path) -> None:
    result = await run(binary, tmp_path, [VALID], "open", 200)
    assert result.errors == {}
    assert 90 <= len(result.latencies) <= 101  # 200 calls/s over 0.5 s
    assert all(s >= f for s, f in zip(result.from_schedule, result.latencies, strict=True))
