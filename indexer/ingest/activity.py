"""What the consumers saw of each worker rank, for `Diagnose`: blocks stored and removed per
tier, clears, gaps, and how far batch timestamps (the publisher's clock) were from this
process's clock when applied.

One `EventActivity` per process, fed by every partition consumer with each applied batch
(`observe`) and each gap (`gap`). It is bounded (`max_ranks`, the oldest rank first out)
and cheap: a dict lookup and a pass over the batch's events, next to an index apply that
does far more per event. Lags are kept as a minimum per window: the smallest lag of a
window is the clock offset plus the shortest transit, so a backlog does not pass for skew.
"""

from __future__ import annotations

import time
from typing import Final

from kvcore.bus import TIERS, BlockRemoved, BlockStored, EventBatch, tier_index

__all__ = ["DEFAULT_LAG_WINDOW_S", "EventActivity", "RankActivity", "RankKey"]

RankKey = tuple[str, str, int]  # model, worker id, dp rank

DEFAULT_MAX_RANKS: Final = 65_536
DEFAULT_LAG_WINDOW_S: Final = 60.0
_MAX_MEDIA: Final = 64  # medium names whose tier is remembered (the bus allows any name)


class RankActivity:
    """Counters of one rank since this process first applied one of its batches."""

    __slots__ = ("batches", "clears", "gaps", "lag_window_start", "min_lag", "prev_min_lag",
                 "removed", "stored")

    def __init__(self, now: float) -> None:
        self.batches = 0
        self.stored = [0] * len(TIERS)  # blocks stored, per tier (TIERS order)
        self.removed = [0] * len(TIERS)
        self.clears = 0
        self.gaps = 0
        self.lag_window_start = now
        self.min_lag = float("inf")  # smallest lag of the current window
        self.prev_min_lag = float("inf")  # of the window before it

    def lag_floor(self, now: float, window_s: float) -> float | None:
        """The smallest lag of the last one or two windows of `window_s`; None when no
        batch was timed in them."""
        if now - self.lag_window_start >= 2 * window_s:
            return None
        floor = min(self.min_lag, self.prev_min_lag)
        return None if floor == float("inf") else floor


class EventActivity:
    """Per rank activity, bounded to `max_ranks` ranks."""

    def __init__(self, *, max_ranks: int = DEFAULT_MAX_RANKS,
                 lag_window_s: float = DEFAULT_LAG_WINDOW_S) -> None:
        self.ranks: dict[RankKey, RankActivity] = {}
        self.max_ranks = max_ranks
        self.lag_window_s = lag_window_s
        self._tiers: dict[str, int] = {}  # medium name as sent -> tier position

    def _tier(self, medium: str) -> int:
        tier = self._tiers.get(medium)
        if tier is None:
            tier = tier_index(medium)
            if len(self._tiers) < _MAX_MEDIA:
                self._tiers[medium] = tier
        return tier

    def _rank(self, batch: EventBatch, now: float) -> RankActivity:
        key = (batch.model, batch.worker_id, batch.dp_rank)
        rank = self.ranks.get(key)
        if rank is None:
            if len(self.ranks) >= self.max_ranks:
                del self.ranks[next(iter(self.ranks))]
            rank = self.ranks[key] = RankActivity(now)
        return rank

    def observe(self, batch: EventBatch, now: float, *, timed: bool = True) -> None:
        """An applied batch: its blocks per tier and, when `timed`, its lag (`now` - its
        timestamp). A rebuild's replay is not timed: its lags are the batches' ages."""
        rank = self._rank(batch, now)
        rank.batches += 1
        tier = self._tier
        for event in batch.events:
            if isinstance(event, BlockStored):
                rank.stored[tier(event.medium)] += len(event.block_hashes)
            elif isinstance(event, BlockRemoved):
                rank.removed[tier(event.medium)] += len(event.block_hashes)
            else:
                rank.clears += 1
        if not timed:
            return
        if now - rank.lag_window_start >= self.lag_window_s:
            stale = now - rank.lag_window_start >= 2 * self.lag_window_s
            rank.prev_min_lag = float("inf") if stale else rank.min_lag
            rank.min_lag = float("inf")
            rank.lag_window_start = now
        lag = now - batch.ts
        rank.min_lag = min(rank.min_lag, lag)

    def gap(self, batch: EventBatch) -> None:
        """Batches are missing before this one (a resync was asked for)."""
        self._rank(batch, time.time()).gaps += 1
