"""Prefill/decode disaggregation roles: what a worker declares in the registry, and which
roles a query's role filter admits.

A worker is `prefill`, `decode` or `both` (the default: it serves whole requests, and every
worker registered before roles existed counts as one). A filter `prefill` admits prefill and
both workers, `decode` admits decode and both, `both` admits only workers declared both, and
the empty filter admits every worker. Light (no imports) so the base client install can
check a role before sending it.
"""

from __future__ import annotations

from typing import Final

__all__ = ["DEFAULT_ROLE", "ROLES", "check_role", "role_matches"]

PREFILL: Final = "prefill"
DECODE: Final = "decode"
BOTH: Final = "both"
ROLES: Final = (PREFILL, DECODE, BOTH)
DEFAULT_ROLE: Final = BOTH


def check_role(role: str, field: str = "role", *, allow_empty: bool = False) -> str:
    """`role` when it is one of ROLES (or empty, when allowed); ValueError naming `field`."""
    if role in ROLES or (allow_empty and role == ""):
        return role
    choices = ", ".join(ROLES) + (" (or empty: any)" if allow_empty else "")
    raise ValueError(f"{field}: {role!r} is not a worker role; expected one of {choices}")


def role_matches(worker_role: str, wanted: str) -> bool:
    """Does a worker declared `worker_role` pass the filter `wanted` ("" = no filter)?"""
    return not wanted or worker_role == wanted or (worker_role == BOTH and wanted != BOTH)
