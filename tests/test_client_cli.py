"""IndexerClient (sync), AsyncIndexerClient and the `kv-indexer` CLI against a real server.

The server runs on the test's event loop; blocking calls (the sync client, the CLI) run in
a worker thread so the loop keeps serving. Both backends (the `index` fixture), as in
tests/test_service.py.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import types
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest

from indexer import cli
from indexer.client import (
    AsyncIndexerClient,
    CandidateCost,
    DeadlineExceededError,
    FailedPreconditionError,
    Freshness,
    IndexerClient,
    IndexerClientError,
    InvalidArgumentError,
    Query,
    RetryPolicy,
    ScoreAnswer,
    TierWeightOverride,
    UnavailableError,
    WorkerLoad,
    WorkerMatch,
    WorkerStatus,
)
from indexer.index.protocol import Index
from indexer.serve.service import start_grpc_server
from tests.support.grpc_scenario import AGE, NO_CACHE, TOKENS, SlowScores, serving
from tests.support.prompt_tree import MODEL
from tests.support.servers import free_port

T = TypeVar("T")
FAST_RETRY = RetryPolicy(max_attempts=30, initial_backoff=0.05, max_backoff=0.2)


@pytest.fixture
async def target(index: Index) -> AsyncIterator[str]:
    async with serving(index) as (_, port):
        yield f"127.0.0.1:{port}"


async def blocking(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking call off the loop, so the server on the loop can answer it."""
    return await asyncio.to_thread(fn, *args, **kwargs)


def query(**kwargs: Any) -> Query:
    return Query(model=kwargs.pop("model", MODEL), token_ids=kwargs.pop("token_ids", TOKENS),
                 **kwargs)


class TestSyncClient:
    """IndexerClient: typed results, typed errors, deadlines, retries."""

    async def test_score_returns_typed_answer(self, target: str) -> None:
        """Score gives a ScoreAnswer of WorkerMatch structs with freshness."""
        with IndexerClient(target) as client:
            answer = await blocking(client.score, query())
        assert isinstance(answer, ScoreAnswer)
        assert answer.query_blocks == 4
        assert answer.scores[0] == WorkerMatch("w-a", 0, 4, 4.0, {"gpu": 4})
        assert [(s.worker_id, s.matched_blocks) for s in answer.scores] == [
            ("w-a", 4), ("w-c", 3), ("w-b", 2)]
        assert answer.freshness.last_event_age_seconds == pytest.approx(AGE, abs=2.0)

    async def test_query_options_reach_the_server(self, target: str) -> None:
        """workers, include_zero and tier weight overrides are sent."""
        with IndexerClient(target) as client:
            answer = await blocking(client.score, query(
                workers=["w-b", "w-c"], include_zero=True,
                tier_weights=TierWeightOverride(cpu=0.5)))
        assert [(s.worker_id, s.dp_rank, s.weighted_score) for s in answer.scores] == [
            ("w-c", 0, 1.5), ("w-b", 0, 2.0), ("w-b", 1, 0.0)]

    async def test_find_best_worker_weighs_loads(self, target: str) -> None:
        """Loads are sent; every candidate's cost comes back."""
        with IndexerClient(target) as client:
            choice = await blocking(client.find_best_worker, query(),
                                    [WorkerLoad("w-a", 0, active_blocks=10)],
                                    overlap_weight=1.0)
            seeded = await blocking(client.find_best_worker, query(), temperature=1.0, seed=3)
            again = await blocking(client.find_best_worker, query(), temperature=1.0, seed=3)
        assert (choice.worker_id, choice.dp_rank, choice.matched_blocks) == ("w-c", 0, 3)
        assert choice.candidates[0] == CandidateCost("w-c", 0, 3, 1, 0, 1.0)
        assert len(choice.candidates) == 4
        assert (seeded.worker_id, seeded.dp_rank) == (again.worker_id, again.dp_rank)

    async def test_batch_workers_and_stats(self, target: str) -> None:
        """ScoreBatch keeps order; ListWorkers and GetStats are typed too."""
        with IndexerClient(target) as client:
            answers = await blocking(client.score_batch, [query(), query(model="nobody")])
            workers = await blocking(client.list_workers, MODEL)
            stats = await blocking(client.stats)
        assert [len(a.scores) for a in answers] == [3, 0]
        assert [(w.worker_id, w.dp_rank, w.blocks_by_tier) for w in workers] == [
            ("w-a", 0, {"gpu": 4}), ("w-b", 0, {"gpu": 2}), ("w-b", 1, {"gpu": 1}),
            ("w-c", 0, {"cpu": 3})]
        assert (stats.batches_applied, stats.blocks_stored, stats.workers) == (4, 10, 4)

    async def test_errors_are_typed(self, target: str) -> None:
        """INVALID_ARGUMENT and FAILED_PRECONDITION become their exception classes."""
        with IndexerClient(target) as client:
            with pytest.raises(InvalidArgumentError) as invalid:
                await blocking(client.score, Query(model=MODEL))
            with pytest.raises(FailedPreconditionError) as precondition:
                await blocking(client.find_best_worker, query(model="nobody/m"))
        assert "token_ids" in invalid.value.details
        assert invalid.value.code.name == "INVALID_ARGUMENT"
        assert "'nobody/m'" in precondition.value.details
        assert isinstance(precondition.value, IndexerClientError)

    def test_packed_bytes_are_refused_as_token_ids(self) -> None:
        """Bytes are not token ids: the client refuses them instead of sending each byte."""
        with IndexerClient("127.0.0.1:1") as client, pytest.raises(TypeError, match="bytes"):
            client.score(Query(model=MODEL, token_ids=b"\x01\x00\x00\x00"))

    async def test_invalid_argument_is_not_retried(self, target: str) -> None:
        """Only UNAVAILABLE is retried: a refused request fails at once."""
        slow_retry = RetryPolicy(max_attempts=5, initial_backoff=2.0)
        with IndexerClient(target, timeout=10, retry=slow_retry) as client:
            started = time.monotonic()
            with pytest.raises(InvalidArgumentError):
                await blocking(client.score, Query(model=""))
        assert time.monotonic() - started < 1.5

    async def test_timeout_is_deadline_exceeded(self, index: Index) -> None:
        """A call slower than its timeout raises DeadlineExceededError on time."""
        async with serving(SlowScores(index, delay=5.0)) as (_, port):
            with IndexerClient(f"127.0.0.1:{port}", timeout=5.0) as client:
                started = time.monotonic()
                with pytest.raises(DeadlineExceededError):
                    await blocking(client.score, query(), timeout=0.3)
        assert time.monotonic() - started < 2.0

    async def test_retries_until_the_server_comes_up(self, index: Index) -> None:
        """UNAVAILABLE is retried with backoff within the timeout: a late server answers."""
        port = free_port()
        with IndexerClient(f"127.0.0.1:{port}", timeout=8.0, retry=FAST_RETRY) as client:
            call = asyncio.create_task(blocking(client.score, query()))
            await asyncio.sleep(0.5)
            assert not call.done()
            server, _ = await start_grpc_server(index, f"127.0.0.1:{port}", settings=NO_CACHE)
            try:
                answer = await asyncio.wait_for(call, 8.0)
            finally:
                await server.stop(None)
        assert answer.scores[0].worker_id == "w-a"

    async def test_gives_up_after_bounded_retries(self) -> None:
        """Nothing listening: UnavailableError after max_attempts, well before the timeout."""
        retry = RetryPolicy(max_attempts=3, initial_backoff=0.1, jitter=0.0)
        with IndexerClient(f"127.0.0.1:{free_port()}", timeout=10.0, retry=retry) as client:
            started = time.monotonic()
            with pytest.raises(UnavailableError):
                await blocking(client.stats)
        elapsed = time.monotonic() - started
        assert 0.3 <= elapsed < 3.0  # two backoffs: 0.1 s + 0.2 s

    async def test_closed_client_refuses_calls(self, target: str) -> None:
        """Leaving the `with` block closes the channel."""
        with IndexerClient(target) as client:
            await blocking(client.stats)
        with pytest.raises(ValueError, match="closed"):
            await blocking(client.stats)


class TestAsyncClient:
    """AsyncIndexerClient: the same calls and errors on asyncio."""

    async def test_every_call(self, target: str) -> None:
        """score, find_best_worker, score_batch, list_workers and stats."""
        async with AsyncIndexerClient(target) as client:
            answer = await client.score(query())
            choice = await client.find_best_worker(query(), [WorkerLoad("w-a", active_blocks=2)],
                                                   overlap_weight=1.0)
            batch = await client.score_batch([query(), query(token_ids=TOKENS[:8])])
            workers = await client.list_workers()
            stats = await client.stats()
        assert answer.scores[0].worker_id == "w-a"
        assert (choice.worker_id, choice.matched_blocks) == ("w-c", 3)
        assert [a.query_blocks for a in batch] == [4, 2]
        assert len(workers) == 4 and stats.workers == 4

    async def test_errors_are_typed(self, target: str) -> None:
        """Server statuses become the same exception classes as in the sync face."""
        async with AsyncIndexerClient(target) as client:
            with pytest.raises(InvalidArgumentError, match="got both"):
                await client.score(Query(model=MODEL, token_ids=TOKENS, block_keys=[1]))
            with pytest.raises(FailedPreconditionError):
                await client.find_best_worker(query(workers=["gone"]))

    async def test_retries_until_the_server_comes_up(self, index: Index) -> None:
        """The async face retries UNAVAILABLE the same way."""
        port = free_port()
        async with AsyncIndexerClient(f"127.0.0.1:{port}", timeout=8.0,
                                      retry=FAST_RETRY) as client:
            call = asyncio.create_task(client.list_workers())
            await asyncio.sleep(0.4)
            server, _ = await start_grpc_server(index, f"127.0.0.1:{port}", settings=NO_CACHE)
            try:
                workers = await asyncio.wait_for(call, 8.0)
            finally:
                await server.stop(None)
        assert len(workers) == 4

    async def test_timeout_is_deadline_exceeded(self, index: Index) -> None:
        """A per-call timeout bounds the call."""
        async with serving(SlowScores(index, delay=5.0)) as (_, port), AsyncIndexerClient(
                f"127.0.0.1:{port}") as client:
            with pytest.raises(DeadlineExceededError):
                await client.score(query(), timeout=0.2)


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps(TOKENS))
    return path


class TestCli:
    """`kv-indexer score | workers | stats`: tables by default, --json for scripts."""

    async def test_score_table(self, target: str, tokens_file: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
        """One row per matching worker rank, best first, with tier columns."""
        code = await blocking(cli.main, ["score", "--target", target, "--model", MODEL,
                                         "--tokens-file", str(tokens_file)])
        out = capsys.readouterr().out.splitlines()
        assert code == 0
        assert out[0].startswith("query: 4 blocks")
        assert out[1].split() == ["WORKER", "RANK", "MATCHED", "WEIGHTED", "GPU", "CPU",
                                  "STORAGE", "OTHER"]
        assert out[2].split() == ["w-a", "0", "4", "4.0", "4", "0", "0", "0"]
        assert out[3].split() == ["w-c", "0", "3", "2.4", "0", "3", "0", "0"]
        assert len(out) == 5

    async def test_unknown_model_is_not_a_miss(self, target: str, tokens_file: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
        """A model the index holds no worker of is said, with the models it does hold; a
        known model's miss is not (issue 19: an unknown model read as a cache miss)."""
        code = await blocking(cli.main, ["score", "--target", target, "--model", MODEL + "-x",
                                         "--tokens-file", str(tokens_file)])
        out = capsys.readouterr().out.splitlines()
        assert code == 0
        assert out[1] == "no worker holds any block of the query"
        assert out[2] == (f"the index holds no worker of model {MODEL + '-x'!r} (models it "
                          f"holds: {MODEL}); check the model name, or run `kv-indexer doctor`")
        tokens_file.write_text(json.dumps([t + 100_000 for t in TOKENS]))
        assert await blocking(cli.main, ["score", "--target", target, "--model", MODEL,
                                         "--tokens-file", str(tokens_file)]) == 0
        assert capsys.readouterr().out.splitlines()[1:] == [
            "no worker holds any block of the query"]

    def test_no_events_is_said(self, capsys: pytest.CaptureFixture[str]) -> None:
        """The wire's age 0 means no event seen yet: said so, not `0.0 s ago` (issue 19)."""
        empty = ScoreAnswer(query_blocks=4, scores=[], freshness=Freshness(0.0, [], False))
        cli._show_score(empty)
        cli._show_workers([WorkerStatus(MODEL, "w-a", 0, 1, -1, False, {}, 0.0)])
        out = capsys.readouterr().out.splitlines()
        assert out[0] == "query: 4 blocks; no events yet; degraded: none"
        assert out[-1].split()[-2:] == ["-", "both"]
        cli._show_score(msgspec.structs.replace(
            empty, freshness=Freshness(AGE, [], False)))
        assert capsys.readouterr().out.startswith(f"query: 4 blocks; last event {AGE:.1f} s ago")

    async def test_score_json(self, target: str, tokens_file: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
        """--json prints the answer as one JSON document."""
        code = await blocking(cli.main, ["score", "--target", target, "--model", MODEL,
                                         "--tokens-file", str(tokens_file), "--json",
                                         "--worker", "w-b", "--include-zero"])
        doc = json.loads(capsys.readouterr().out)
        assert code == 0
        assert doc["query_blocks"] == 4
        assert [(s["worker_id"], s["dp_rank"], s["matched_blocks"]) for s in doc["scores"]] == [
            ("w-b", 0, 2), ("w-b", 1, 0)]
        assert set(doc["freshness"]) == {"last_event_age_seconds", "degraded_workers",
                                         "rebuilding", "index_staleness_seconds",
                                         "read_replica"}

    async def test_workers_table_and_json(self, target: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
        """Every rank with epoch, sequence, health, tiers and age."""
        assert await blocking(cli.main, ["workers", "--target", target]) == 0
        table = capsys.readouterr().out.splitlines()
        assert table[0].split()[:6] == ["MODEL", "WORKER", "RANK", "EPOCH", "SEQ", "DEGRADED"]
        assert table[4].split()[:10] == [MODEL, "w-c", "0", "1", "0", "no", "0", "3", "0", "0"]
        assert await blocking(cli.main, ["workers", "--target", target, "--json",
                                         "--model", MODEL]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert [w["worker_id"] for w in doc] == ["w-a", "w-b", "w-b", "w-c"]

    async def test_stats_table_and_json(self, target: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
        """Counters as COUNTER / VALUE rows, or a JSON object."""
        assert await blocking(cli.main, ["stats", "--target", target]) == 0
        table = dict(line.split() for line in capsys.readouterr().out.splitlines()[1:])
        assert table["batches_applied"] == "4" and table["blocks_stored"] == "10"
        assert await blocking(cli.main, ["stats", "--target", target, "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["workers"] == 4 and doc["dropped"] == {}

    async def test_target_from_environment(self, target: str, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
        """KV_INDEXER_TARGET is the default --target."""
        monkeypatch.setenv("KV_INDEXER_TARGET", target)
        assert await blocking(cli.main, ["stats", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["workers"] == 4

    async def test_server_error_exits_1(self, target: str, tokens_file: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
        """A refused call prints the status and message to stderr and exits 1."""
        code = await blocking(cli.main, ["score", "--target", target, "--model", "",
                                         "--tokens-file", str(tokens_file)])
        err = capsys.readouterr().err
        assert code == 1
        assert "INVALID_ARGUMENT" in err and "model must not be empty" in err

    async def test_unreachable_target_exits_1(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Nothing listening: UNAVAILABLE after the retries, exit 1."""
        code = await blocking(cli.main, ["stats", "--target", f"127.0.0.1:{free_port()}",
                                         "--timeout", "0.5"])
        assert code == 1
        assert "UNAVAILABLE" in capsys.readouterr().err

    @pytest.mark.parametrize(("content", "message"), [
        ("[1, 2, \"x\"]", "JSON list of token ids"),
        ("{\"tokens\": [1]}", "JSON list of token ids"),
        ("[1, -2]", "JSON list of token ids"),
        ("[1, 2", "not valid JSON"),
        (None, "cannot read"),
    ])
    def test_bad_tokens_file_exits_2(self, tmp_path: Path, content: str | None, message: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
        """A tokens file that is not a JSON list of u32 ids is a usage error."""
        path = tmp_path / "tokens.json"
        if content is not None:
            path.write_text(content)
        code = cli.main(["score", "--target", "127.0.0.1:1", "--model", MODEL,
                         "--tokens-file", str(path)])
        assert code == 2
        assert message in capsys.readouterr().err

    def test_no_command_exits_2(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Without a subcommand the usage goes to stderr."""
        assert cli.main([]) == 2
        assert "score" in capsys.readouterr().err

    def test_serve_forwards_its_arguments(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """`serve` hands every remaining argument to indexer.app.main."""
        seen: list[list[str]] = []
        fake = types.ModuleType("indexer.app")
        fake.main = lambda argv: seen.append(argv) or 7  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "indexer.app", fake)
        assert cli.main(["serve", "--grpc-listen", "0.0.0.0:1", "--help"]) == 7
        assert seen == [["--grpc-listen", "0.0.0.0:1", "--help"]]
