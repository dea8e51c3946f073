"""The partitions probe: a process holding none is only at fault while some partition has
no holder (a spare process beside enough others is healthy)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

from indexer.ingest.partitions import PartitionLeases
from indexer.probes import ProcessProbes


def leases_with(*, held: dict[int, int], share: int, all_taken: bool,
                ttl_s: float = 0.0) -> PartitionLeases:
    """Leases in a given state (no NATS: the probes only read it)."""
    async def nothing(_partition: int) -> None:
        return None
    leases = PartitionLeases(cast(Any, None), 8, start=nothing, stop=nothing, ttl_s=ttl_s)
    leases.held, leases.share, leases.all_taken = held, share, all_taken
    return leases


def probes_with(leases: PartitionLeases) -> ProcessProbes:
    return ProcessProbes(cast(Any, None), cast(Any, None), list, leases, stall_s=30.0)


async def test_a_spare_process_is_healthy() -> None:
    """8 partitions over 5 processes: ceil(8/5) = 2 each, so the fifth holds none while
    the others hold all 8; it must not say NOT_SERVING for that."""
    leases = leases_with(held={}, share=2, all_taken=True)
    assert await probes_with(leases).partitions() is None


async def test_holding_none_while_partitions_are_free_is_reported() -> None:
    leases = leases_with(held={}, share=2, all_taken=False)
    probes = probes_with(leases)
    await probes.partitions()  # starts the clock
    reason = await probes.partitions()
    assert reason is not None and "holds no partition" in reason
    leases.held = {0: 1}
    assert await probes.partitions() is None


async def test_a_consumer_that_does_not_stop_is_reported() -> None:
    """A lease handed back stays held until its consumer stops; a consumer stuck in its
    batch for longer than the stall limit leaves the partition ingested by nobody."""
    batch_done = asyncio.Event()

    async def stop(_partition: int) -> None:
        await batch_done.wait()
    leases = leases_with(held={0: 1}, share=1, all_taken=True)
    leases._stop = stop
    leases._stopping(3)
    probes = probes_with(leases)
    assert await probes.partitions() is None
    stopping, _ = leases._stops[3]
    leases._stops[3] = (stopping, time.monotonic() - 31)
    reason = await probes.partitions()
    assert reason is not None and "partition 3's consumer has not stopped in 31 s" in reason
    batch_done.set()
    await stopping
    assert await probes.partitions() is None
