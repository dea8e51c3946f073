"""Engine side of the bridge: one SUB socket per DP rank, engine seq tracking, replay.

Live messages are `[topic, seq, payload]`. The next expected seq is tracked per rank:
- a gap is filled from the engine's replay socket (DEALER; both answer forms); a gap the
  replay cannot fill becomes AllBlocksCleared for the rank (fewer hits, never wrong ones)
  and is counted;
- a seq lower than expected means the engine restarted: a new epoch starts (the index
  forgets the old one; vLLM sends no AllBlocksCleared at start-up);
- the first message seen with seq > 0 also asks the replay for what came before it.

A worker whose stores carry vLLM's hash lookahead has them all left out
(`hash_lookahead`, publisher/engines.py): said once per rank, then counted.

Removals by one owner of a tier (vLLM's `ownership`) that another owner still holds are
held back (`publisher.residency.TierOwners`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Final, Literal

import msgspec
import structlog
import zmq
import zmq.asyncio

from kvcore.bus import AllBlocksCleared
from publisher.engines import (
    EngineDecodeError,
    decode_engine_payload,
    encode_replay_request,
    parse_live_frames,
    parse_replay_frames,
)
from publisher.publisher import RankPublisher
from publisher.residency import TierOwners

__all__ = ["EngineSource", "SourceStats", "rank_endpoint"]

log = structlog.get_logger("publisher.zmq")

_POLL_MS: Final = 200
_BURST: Final = 256  # messages read per wake-up: one busy engine cannot starve the loop
_SUB_HWM: Final = 100_000


class SourceStats(msgspec.Struct):
    batches: int = 0
    gaps: int = 0
    gaps_filled: int = 0
    gaps_unfilled: int = 0
    engine_restarts: int = 0
    bad_messages: int = 0
    skipped_events: dict[str, int] = msgspec.field(default_factory=dict)
    # blocks an owner removed from a tier another owner still holds (not published)
    removals_held_back: int = 0


def rank_endpoint(endpoint: str, dp_rank: int) -> str:
    """vLLM adds the DP rank to the TCP port of both endpoints."""
    if dp_rank == 0 or not endpoint.startswith("tcp://"):
        return endpoint
    host, _, port = endpoint.rpartition(":")
    return f"{host}:{int(port) + dp_rank}"


class EngineSource:
    """Reads one engine rank's ZMQ events into its RankPublisher."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        rank: RankPublisher,
        endpoint: str,
        *,
        replay_endpoint: str | None = None,
        topic: str = "",
        flavor: Literal["vllm", "sglang"] = "vllm",
        replay_timeout_s: float = 2.0,
        pools: Sequence[str] = (),
    ) -> None:
        self._pools = tuple(pools)  # declared shared storage pools (publisher/engines.py)
        self.stats = SourceStats()
        self.next_seq: int | None = None
        self._ctx = ctx
        self._rank = rank
        self._endpoint = rank_endpoint(endpoint, rank.dp_rank)
        self._replay_endpoint = (rank_endpoint(replay_endpoint, rank.dp_rank)
                                 if replay_endpoint else None)
        self._topic = topic
        self._flavor = flavor
        self._replay_timeout_s = replay_timeout_s
        self._tier_owners = TierOwners(rank.mirror.holds)
        self._log = log.bind(worker=rank.worker_id, dp_rank=rank.dp_rank)

    @property
    def dp_rank(self) -> int:
        return self._rank.dp_rank

    async def run(self, stop: asyncio.Event) -> None:
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, _SUB_HWM)
        sub.setsockopt(zmq.LINGER, 0)
        sub.connect(self._endpoint)
        sub.subscribe(self._topic.encode())
        self._log.info("engine_source_started", endpoint=self._endpoint,
                       replay=self._replay_endpoint)
        # Reads go through a plain (non-asyncio) view of the socket: one await per burst of
        # messages instead of two futures per message.
        raw: zmq.Socket[bytes] = zmq.Socket.shadow(sub.underlying)
        try:
            while not stop.is_set():
                if not await sub.poll(_POLL_MS):
                    continue
                for _ in range(_BURST):
                    try:
                        frames = raw.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    await self.on_frames(frames)
        finally:
            sub.close()

    async def on_frames(self, frames: list[bytes]) -> None:
        try:
            seq, payload = parse_live_frames(frames)
        except EngineDecodeError as exc:
            self.stats.bad_messages += 1
            self._log.warning("bad_engine_message", error=str(exc))
            return
        await self.on_batch(seq, payload)

    async def on_batch(self, seq: int, payload: bytes) -> None:
        expected = self.next_seq
        if expected is not None and seq < expected:
            self.stats.engine_restarts += 1
            self._log.info("engine_restarted", seq=seq, expected=expected)
            self._rank.restart_epoch()
            self._tier_owners.clear()
            expected = 0
        elif expected is None:
            expected = 0
        if seq > expected:
            await self._fill_gap(expected, seq)
        self._publish(seq, payload)

    async def _fill_gap(self, start: int, end: int) -> None:
        self.stats.gaps += 1
        missing = await self.replay(start, end)
        if missing is None:
            self.stats.gaps_unfilled += 1
            self._log.warning("gap_unfilled", start=start, end=end)
            self._tier_owners.clear()
            self._rank.publish([AllBlocksCleared()])
            return
        self.stats.gaps_filled += 1
        for seq, payload in missing:
            self._publish(seq, payload)

    def _publish(self, seq: int, payload: bytes) -> None:
        self.next_seq = seq + 1
        self.stats.batches += 1
        try:
            batch = decode_engine_payload(payload, flavor=self._flavor, pools=self._pools)
        except EngineDecodeError as exc:
            # What the batch did is unknown: treat it as a gap nobody can fill.
            self.stats.bad_messages += 1
            self._log.warning("bad_engine_payload", seq=seq, error=str(exc))
            self._tier_owners.clear()
            self._rank.publish([AllBlocksCleared()])
            return
        for skipped in batch.skipped:
            reason = skipped.split(":", 1)[0]
            count = self.stats.skipped_events.get(reason, 0) + 1
            self.stats.skipped_events[reason] = count
            if count & (count - 1) == 0:  # the 1st, 2nd, 4th, 8th ... of each reason
                self._log.warning("engine_event_skipped", reason=reason, detail=skipped,
                                  seq=seq, count=count)
            if reason == "hash_lookahead" and count == 1:
                self._log.warning(
                    "engine_hash_lookahead",
                    hint="this worker hashes each KV block together with the tokens "
                    "after it (vLLM hash lookahead, on with EAGLE speculative decoding and "
                    "prefix caching); block keys cannot cover those tokens, so its stores "
                    "are not indexed: it gets no prefix hits, instead of false ones",
                    seq=seq)
        events = self._tier_owners.filter(batch.events, batch.owners)
        self.stats.removals_held_back = self._tier_owners.held_back
        self._rank.publish(events, batch.ts)

    async def replay(self, start: int, end: int) -> list[tuple[int, bytes]] | None:
        """Batches start..end-1 from the engine's replay buffer, or None if it lacks any."""
        if self._replay_endpoint is None:
            return None
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(self._replay_endpoint)
        got: dict[int, bytes] = {}
        try:
            await dealer.send_multipart(encode_replay_request(start))
            while True:
                if not await dealer.poll(int(self._replay_timeout_s * 1000)):
                    self._log.warning("replay_timeout", start=start, end=end)
                    return None
                answer = parse_replay_frames(await dealer.recv_multipart())
                if answer is None:
                    break
                seq, payload = answer
                if start <= seq < end:
                    got[seq] = payload
        except EngineDecodeError as exc:
            self._log.warning("bad_replay_answer", error=str(exc))
            return None
        finally:
            with contextlib.suppress(Exception):
                dealer.close()
        if len(got) != end - start:
            return None
        return sorted(got.items())
