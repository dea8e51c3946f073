"""A fleet of library publishers storing and removing whole chains of blocks, every batch
it publishes recorded (for `tests.support.capture`'s reference comparison). Worker w's
chain c has `chain` blocks; the first `shared` chains have the same tokens on every
worker (a common system prompt), the others tokens of their own."""

from __future__ import annotations

from kvcore.bus import EventBatch
from kvcore.topology import StreamSettings
from publisher.publisher import KVEventPublisher
from tests.support.capture import CapturingSink

__all__ = ["ChainFleet"]


class ChainFleet:
    """`workers` publishers of `model`, `w0` ... , on `nats_url`."""

    def __init__(self, nats_url: str, model: str, *, workers: int, stream: StreamSettings,
                 block_size: int = 16, chain: int = 50, shared: int = 10) -> None:
        self.model = model
        self.block_size = block_size
        self.chain = chain
        self.shared = shared
        self.pubs = [KVEventPublisher(model, f"w{w}", block_size=block_size,
                                      nats_url=nats_url, stream=stream, max_pending=100_000)
                     for w in range(workers)]
        self.published: list[EventBatch] = []

    async def start(self) -> None:
        for pub in self.pubs:
            await pub.start()
            CapturingSink(pub, self.published)

    def chain_tokens(self, worker: int, chain: int) -> list[int]:
        owner = 0 if chain < self.shared else worker + 1
        start = (owner * 1000 + chain) * self.chain * self.block_size
        return list(range(start, start + self.chain * self.block_size))

    def chain_hashes(self, worker: int, chain: int) -> list[int]:
        return [(worker << 40) | (chain << 16) | i for i in range(self.chain)]

    def store(self, chains: range) -> None:
        """Every worker stores each chain of `chains`, one engine step per chain."""
        for w, pub in enumerate(self.pubs):
            for chain in chains:
                pub.stored(self.chain_hashes(w, chain), self.chain_tokens(w, chain))
                pub.end_step()

    def remove(self, chains: range, workers: range | None = None) -> None:
        for w in workers if workers is not None else range(len(self.pubs)):
            for chain in chains:
                self.pubs[w].removed(self.chain_hashes(w, chain))
                self.pubs[w].end_step()

    async def flush(self, timeout: float = 90.0) -> None:
        for pub in self.pubs:
            assert await pub.flush(timeout)

    async def close(self) -> None:
        for pub in self.pubs:
            await pub.close()
