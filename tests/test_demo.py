"""`python -m kvsim.demo` (`make demo`): the whole pipeline headless for a few seconds."""

from __future__ import annotations

import re

import pytest
from rich.console import Console

from kvsim.demo import InFlight, RichView, Snapshot, main, parse_args
from kvsim.routers import describe_fallbacks

TICK = re.compile(
    r"^t=(?P<t>[\d.]+)s requests=(?P<requests>\d+) kv_aware_hit_rate=(?P<kv>[\d.]+) "
    r"round_robin_hit_rate=(?P<rr>[\d.]+) events_per_s=(?P<eps>\d+) .*workers=(?P<workers>\d+) "
)
RESULT = re.compile(
    r"^result: requests=(?P<requests>\d+) kv_aware_hit_rate=(?P<kv>[\d.]+) "
    r"round_robin_hit_rate=(?P<rr>[\d.]+) kv_aware_predicted_hit_rate=(?P<predicted>[\d.]+) "
)


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_runs_headless(capsys: pytest.CaptureFixture[str]) -> None:
    """--no-tty prints a line per second and a result where KV-aware routing beats round robin."""
    assert main(["--duration", "4", "--no-tty", "--workers", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("indexer: gRPC 127.0.0.1:") for line in lines), lines[:3]
    ticks = [m for m in map(TICK.match, lines) if m]
    assert len(ticks) >= 2, lines
    last = ticks[-1]
    assert int(last["workers"]) == 8  # every engine's bridge reached the index
    assert int(last["eps"]) > 0
    workers = [line for line in lines if line.startswith("worker engine-")]
    assert len(workers) == 8
    (result,) = [m for m in map(RESULT.match, lines) if m]
    assert int(result["requests"]) > 50
    kv, rr, predicted = float(result["kv"]), float(result["rr"]), float(result["predicted"])
    assert 0.0 < rr < kv <= 1.0
    assert 0.0 < predicted <= 1.0


def test_in_flight_load() -> None:
    """A request holds its blocks on its worker for `lifetime` router steps."""
    load = InFlight(workers=2, lifetime=2)
    load.step()
    load.start(1, 10)
    assert load.active_blocks == [0, 10]
    load.step()
    load.start(0, 5)
    assert load.active_blocks == [5, 10]
    load.step()
    assert load.active_blocks == [5, 0]
    load.step()
    assert load.active_blocks == [0, 0]


@pytest.mark.parametrize("argv", [["--workers", "0"], ["--duration", "0"], ["--rate", "-1"],
                                  ["--request-lifetime", "0"]])
def test_bad_arguments(argv: list[str]) -> None:
    """Out-of-range settings stop with a usage error (exit status 2)."""
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2


def test_fallbacks_are_explained() -> None:
    """The live view said `FAILED_PRECONDITION 6` with no word on why (issue 19): it now
    says what each fallback means, in the view and in the plain summary."""
    counts = {"FAILED_PRECONDITION": 6, "unindexed_workers": 2}
    text = describe_fallbacks(counts)
    assert text.startswith("6 no worker of the model indexed yet")
    assert "2 some workers not indexed yet" in text
    assert "FAILED_PRECONDITION" not in text
    assert describe_fallbacks({}) == "none"
    snap = Snapshot(fallbacks=counts)
    assert f"fallbacks: {text}" in snap.summary()
    view = RichView("header", parse_args(["--no-tty"]))
    console = Console(record=True, width=400)
    console.print(view._render(snap))
    shown = " ".join(console.export_text().split())
    assert "no worker of the model indexed yet" in shown
    assert "FAILED_PRECONDITION" not in shown
