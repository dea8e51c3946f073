"""The gRPC contract (protos/kvindex/v1/indexer.proto) and its committed generated code."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc

from indexer import _protogen
from indexer._proto.kvindex.v1 import indexer_pb2, indexer_pb2_grpc

RPCS = ["Score", "FindBestWorker", "FindBestWorkerStream", "ScoreBatch", "ListWorkers", "GetStats",
        "Diagnose"]


def test_generated_code_is_up_to_date() -> None:
    """indexer/_proto matches a fresh generation from protos/ (else: run `make proto`)."""
    problems = _protogen.check()
    assert not problems, (
        "generated gRPC code under indexer/_proto is stale; run `make proto` and commit:\n  "
        + "\n  ".join(problems)
    )


def test_check_detects_edited_and_missing_files(tmp_path: Path) -> None:
    """The staleness check flags a hand-edited, a missing and an orphaned generated file."""
    out = tmp_path / "_proto"
    shutil.copytree(_protogen.OUT_DIR, out, ignore=shutil.ignore_patterns("__pycache__"))
    files = _protogen.render()
    assert _protogen.diff(out, files) == []

    with (out / "kvindex/v1/indexer_pb2.py").open("a", encoding="utf-8") as fh:
        fh.write("# hand edit\n")
    (out / "kvindex/v1/indexer_pb2.pyi").unlink()
    (out / "kvindex/v1/old_pb2.py").write_text("", encoding="utf-8")
    assert sorted(_protogen.diff(out, files)) == [
        "missing: kvindex/v1/indexer_pb2.pyi",
        "not generated from any proto: kvindex/v1/old_pb2.py",
        "stale: kvindex/v1/indexer_pb2.py",
    ]


def test_score_request_round_trip_and_service_rpcs() -> None:
    """A ScoreRequest survives serialization and KvIndexer exposes exactly the five RPCs."""
    request = indexer_pb2.ScoreRequest(
        model="llama-3-8b",
        lora_name="sql-adapter",
        cache_salt="tenant-7",
        token_ids=[1, 2, 3, 2**32 - 1],
        block_keys=[0, 1, 2**64 - 1],
        workers=["w-0", "w-1"],
        tier_weights=indexer_pb2.TierWeights(gpu=1.0, cpu=0.25),
        include_zero=True,
        block_size=16,
    )
    decoded = indexer_pb2.ScoreRequest.FromString(request.SerializeToString())
    assert decoded == request
    assert list(decoded.token_ids) == [1, 2, 3, 2**32 - 1]
    assert list(decoded.block_keys) == [0, 1, 2**64 - 1]
    assert decoded.tier_weights.HasField("cpu")
    assert not decoded.tier_weights.HasField("storage")

    service = indexer_pb2.DESCRIPTOR.services_by_name["KvIndexer"]
    assert service.full_name == "kvindex.v1.KvIndexer"
    assert [method.name for method in service.methods] == RPCS
    with grpc.insecure_channel("localhost:1") as channel:  # lazy: never connects
        stub = indexer_pb2_grpc.KvIndexerStub(channel)
        for name in RPCS:
            assert callable(getattr(stub, name))
            assert callable(getattr(indexer_pb2_grpc.KvIndexerServicer, name))
