"""What publishers really published, and how far an index is from the reference model of it.

`CapturingSink` wraps a publisher's sink and records every batch the sink accepted, in
order; `ReferenceIndex` replays them; `mismatches` counts block keys whose holders differ.
"""

from __future__ import annotations

from indexer.index.protocol import Index
from kvcore.bus import EventBatch
from publisher.publisher import KVEventPublisher
from tests.support.reference import ReferenceIndex


class CapturingSink:
    """Wraps a publisher's sink: every batch it accepts is recorded, in order."""

    def __init__(self, pub: KVEventPublisher, published: list[EventBatch]) -> None:
        assert pub.sink is not None
        original = pub.sink.offer

        def offer(batch: EventBatch, **kwargs: bool) -> bool:
            accepted = original(batch, **kwargs)
            if accepted:
                published.append(batch)
            return accepted

        pub.sink.offer = offer  # type: ignore[method-assign]


Position = tuple[int, int]  # epoch, seq


def last_positions(published: list[EventBatch], model: str) -> dict[tuple[str, int], Position]:
    """(worker, rank) -> (epoch, seq) of the last batch published for `model`."""
    return {(b.worker_id, b.dp_rank): (b.epoch, b.seq) for b in published if b.model == model}


async def caught_up(index: Index, published: list[EventBatch], model: str) -> bool:
    """Every rank's position in the index is the last one published."""
    try:
        seen = {(w.worker_id, w.dp_rank): (w.epoch, w.last_seq)
                for w in await index.workers(model)}
    except Exception:  # noqa: BLE001 - the backend may be restarting
        return False
    return seen == last_positions(published, model)


async def mismatches(index: Index, published: list[EventBatch], model: str,
                     ghost_capacity: int = 65_536) -> tuple[int, int, int]:
    """(phantom, missing, differing) block keys of `model`: held in the index but not by the
    reference, the other way round, and held by both with other holders or tiers."""
    reference = ReferenceIndex(ghost_capacity)
    for batch in published:
        reference.apply(batch)
    got = await index.presence(model)
    want = reference.presence(model)
    phantom = len(set(got) - set(want))
    missing = len(set(want) - set(got))
    differing = sum(1 for key in set(got) & set(want) if got[key] != want[key])
    return phantom, missing, differing
