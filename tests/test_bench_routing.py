"""`kv-indexer bench routing` (kvsim/routing/): a small replay through the whole
system, and the pieces the figures rest on (the single-cache bound, pinned pools)."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import msgspec
import pytest

from kvsim.mock_engines import TraceRecord, trace_tokens
from kvsim.routing.cli import main
from kvsim.routing.clock import PinnedPool
from kvsim.routing.markdown import report_body
from kvsim.routing.results import RoutingReport
from kvsim.routing.settings import POLICIES, parse_args
from kvsim.routing.traces import single_cache_hits

TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / \
    "mooncake_conversation_trace.jsonl"
SLICE = 200
EPS = 0.01


def _generated_trace(n: int) -> list[dict[str, object]]:
    """Mooncake-shaped conversations (used when the shared trace is not on this machine):
    every prompt starts with the shared id 0, later turns extend earlier ones."""
    rng = random.Random(7)
    next_id = itertools.count(1)
    conversations: list[list[int]] = []
    lines: list[dict[str, object]] = []
    for i in range(n):
        if conversations and rng.random() < 0.6:
            ids = rng.choice(conversations)
            ids.extend(next(next_id) for _ in range(rng.randint(1, 3)))
        else:
            ids = [0, *(next(next_id) for _ in range(rng.randint(2, 12)))]
            conversations.append(ids)
        length = 512 * (len(ids) - 1) + rng.randint(1, 512)
        lines.append({"timestamp": 300 * (i // 3), "input_length": length,
                      "output_length": rng.randint(1, 600), "hash_ids": list(ids)})
    return lines


@pytest.fixture
def trace_slice(tmp_path: Path) -> Path:
    """The first 200 requests of the conversation trace (or a generated stand-in)."""
    path = tmp_path / "slice.jsonl"
    if TRACE.is_file():
        with TRACE.open() as f:
            path.write_text("".join(itertools.islice(f, SLICE)))
    else:
        path.write_text("".join(json.dumps(line) + "\n" for line in _generated_trace(SLICE)))
    return path


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_replay_report(trace_slice: Path, tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    """Every policy on 4 workers with tiny pools: structure and sanity relations."""
    out = tmp_path / "report.json"
    argv = ["--trace", str(trace_slice), "--workers", "4", "--capacity-blocks", "4096",
            "--block-size", "16", "--policy", "all", "--no-doc", "--quiet",
            "--json-out", str(out)]
    assert main(argv) == 0
    report = msgspec.json.decode(out.read_bytes(), type=RoutingReport)
    printed = capsys.readouterr().out
    assert "single-cache bound" in printed

    assert (report.workers, report.capacity_blocks, report.block_size) == (4, 4096, 16)
    (trace,) = report.traces
    assert trace.requests == SLICE
    assert set(trace.policies) == set(POLICIES)
    bound = trace.bound_hit_ratio
    assert 0.0 < bound < 1.0
    for name, r in trace.policies.items():
        assert r.policy == name
        assert r.requests == SLICE and r.prompt_tokens == trace.prompt_tokens
        assert sum(r.requests_per_worker) == SLICE and len(r.prefill_tokens_per_worker) == 4
        assert sum(r.prefill_tokens_per_worker) == r.prompt_tokens - r.hit_tokens
        assert 0.0 < r.hit_ratio <= bound + 1e-12, name  # no router beats one infinite cache
        assert 1.0 <= r.load_balance <= 4.0
        assert r.ttft_p50_s <= r.ttft_p99_s
    kv, oracle = trace.policies["kv"], trace.policies["oracle"]
    rr, rnd = trace.policies["round-robin"], trace.policies["random"]
    assert kv.hit_ratio >= rr.hit_ratio - EPS
    assert kv.hit_ratio >= rnd.hit_ratio - EPS
    assert oracle.hit_ratio >= rr.hit_ratio - EPS
    assert oracle.hit_ratio >= kv.hit_ratio - 2 * EPS  # staleness costs, never helps much
    # The routers that score say what they expected; the others do not.
    assert kv.predicted_hit_ratio is not None and oracle.predicted_hit_ratio is not None
    assert rr.predicted_hit_ratio is None and rr.find_best_worker is None
    assert oracle.mispredicted_requests == 0  # it reads the pools it is served from
    # kv went through FindBestWorker (but for the first step: nothing indexed yet, no live
    # worker) and waited for the event path after every step.
    assert kv.find_best_worker is not None
    unanswered = kv.fallbacks.get("FAILED_PRECONDITION", 0)
    assert kv.find_best_worker.count + unanswered == SLICE
    assert kv.find_best_worker.count >= SLICE // 2
    assert 0.0 < kv.find_best_worker.p50_ms <= kv.find_best_worker.p99_ms
    assert kv.catch_up is not None and kv.catch_up.steps > 0
    assert kv.catch_up.timeouts <= kv.catch_up.steps // 10
    assert kv.catch_up.gaps_unfilled == 0

    body = report_body(report, tmp_path / "plot.png")
    assert "| KV-aware (FindBestWorker) |" in body and "![" in body
    assert "single-cache bound" in body


def _record(ids: list[int], length: int) -> TraceRecord:
    return TraceRecord(timestamp=0, input_length=length, hash_ids=ids, output_length=1)


def test_single_cache_bound() -> None:
    """The bound hits the longest earlier prefix in whole blocks, partial blocks included."""
    records = [
        _record([0, 1], 600),      # new
        _record([0, 1, 2], 1100),  # shares 600 tokens of [0, 1]: 37 blocks
        _record([0, 3], 700),      # shares block id 0: 32 blocks
        _record([0, 1, 2], 1100),  # everything (68 full blocks)
    ]
    assert single_cache_hits(records, 16) == [0, 37 * 16, 32 * 16, 68 * 16]
    assert len(trace_tokens(records[1])) == 1100


def test_pinned_blocks_are_not_evicted() -> None:
    """Blocks pinned by a running request survive; the pool overcommits instead."""
    pool = PinnedPool(capacity_blocks=4, block_size=2)
    pool.serve([1, 2, 3, 4])
    pool.pin(pool.last_hashes)
    first = list(pool.last_hashes)
    pool.serve([5, 6, 7, 8, 9, 10])  # 3 new blocks, 2 free, the other 2 pinned
    assert set(first) <= set(pool.gpu)
    assert pool.overcommits == 1 and len(pool.gpu) == 5
    pool.unpin(first)
    assert not pool.pinned
    pool.serve([11, 12])  # now the oldest, unpinned, goes
    assert pool.evicted == 2 and len(pool.gpu) == 4


@pytest.mark.parametrize("argv", [["--workers", "0"], ["--speedup", "0"],
                                  ["--max-requests", "0"], ["--overlap-weight", "-1"],
                                  ["--tune-overlap-weights", "1,x"]])
def test_bad_arguments(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(["--trace", "t.jsonl", *argv])
    assert exc.value.code == 2
