"""The PNG of prefix hit ratio over each trace, per policy (matplotlib: the `bench` extra)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from kvsim.routing.replay import TraceRun
from kvsim.routing.settings import POLICY_LABELS

__all__ = ["plot"]

_COLORS: Final = {"kv": "tab:blue", "oracle": "tab:orange", "round-robin": "tab:green",
                  "random": "tab:red"}
_PLOT_WINDOWS: Final = 40


def plot(runs: Sequence[TraceRun], path: Path) -> None:
    """Cumulative and windowed hit ratio over each trace, per policy, with the bound."""
    import matplotlib  # noqa: PLC0415 - the `bench` extra, only needed here

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(2, len(runs), figsize=(7.0 * len(runs), 8.0), squeeze=False)
    for col, run in enumerate(runs):
        trace = run.trace
        minutes = [a / 60.0 for a in trace.arrivals]
        prompts = [r.input_length for r in trace.records]
        lines: list[tuple[str, list[int], str | None, str]] = [
            ("single-cache bound", run.bound_hits, "k", "--"),
            ("one LRU of the fleet's capacity", run.pooled_hits, "0.55", "-.")]
        lines += [(POLICY_LABELS[p], s.hit_tokens, _COLORS[p], ":" if p == "oracle" else "-")
                  for p, s in run.series.items()]
        span = max(trace.arrivals[-1], 1e-9)
        for label, hits, color, style in lines:
            cum = list(itertools.accumulate(hits))
            total = list(itertools.accumulate(prompts))
            width = 2.0 if style == ":" else 1.2
            axes[0][col].plot(minutes, [h / t for h, t in zip(cum, total, strict=True)],
                              label=label, color=color, linestyle=style, linewidth=width)
            xs, ys = [], []
            for k in range(_PLOT_WINDOWS):
                lo, hi = span * k / _PLOT_WINDOWS, span * (k + 1) / _PLOT_WINDOWS
                idx = [i for i, a in enumerate(trace.arrivals)
                       if lo <= a < hi or (k == _PLOT_WINDOWS - 1 and a == hi)]
                p = sum(prompts[i] for i in idx)
                if p:
                    xs.append((lo + hi) / 2 / 60.0)
                    ys.append(sum(hits[i] for i in idx) / p)
            axes[1][col].plot(xs, ys, label=label, color=color, linestyle=style,
                              linewidth=width, marker=".")
        axes[0][col].set_title(f"{trace.name}: cumulative prefix hit ratio")
        axes[1][col].set_title(f"{trace.name}: hit ratio per {span / _PLOT_WINDOWS / 60:.1f} "
                               "min window")
        for row in (0, 1):
            axes[row][col].set_xlabel("trace time (simulated minutes)")
            axes[row][col].set_ylabel("cached prompt tokens / prompt tokens")
            axes[row][col].set_ylim(0.0, 1.0)
            axes[row][col].grid(alpha=0.3)
        axes[0][col].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
