"""The partitions probe: a process holding none is only at fault while some partition has
no holder (a spare process beside enough others is healthy)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from indexer.probes import ProcessProbes


def probes_with(leases: object) -> ProcessProbes:
    return ProcessProbes(cast(Any, None), cast(Any, None), list, cast(Any, leases),
                         stall_s=30.0)


async def test_a_spare_process_is_healthy() -> None:
    """8 partitions over 5 processes: ceil(8/5) = 2 each, so the fifth holds none while
    the others hold all 8; it must not say NOT_SERVING for that."""
    leases = SimpleNamespace(held={}, share=2, all_taken=True, ttl_s=0.0)
    assert await probes_with(leases).partitions() is None


async def test_holding_none_while_partitions_are_free_is_reported() -> None:
    leases = SimpleNamespace(held={}, share=2, all_taken=False, ttl_s=0.0)
    probes = probes_with(leases)
    await probes.partitions()  # starts the clock
    reason = await probes.partitions()
    assert reason is not None and "holds no partition" in reason
    leases.held = {0: 1}
    assert await probes.partitions() is None
