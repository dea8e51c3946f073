"""Presence masks as the walk reads them from the C block table."""

from __future__ import annotations


def as_runs(masks: list[int], wanted: int) -> list[int]:
    """Masks as BlockTable.mask_runs gives them, runs [mask, count, ...]: equal neighbours
    merged, up to the first without a `wanted` bit."""
    runs: list[int] = []
    for mask in masks:
        if runs and mask == runs[-2]:
            runs[-1] += 1
        elif mask & wanted:
            runs += (mask, 1)
        else:
            break
    return runs
