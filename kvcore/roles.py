"""Prefill/decode disaggregation roles: what a worker declares in the registry, and which
roles a query's role filter admits.

A worker is `prefill`, `decode` or `both` (the default: it serves whole requests, and every
worker registered before roles existed counts as one). A filter `prefill` admits prefill and
both workers, `decode` admits decode and both, `both` admits only workers declared both, and
the empty filter admits every worker. A `store` is the publisher of a shared storage pool's
own content (a KV store writing with `pool=`): it declares itself so that it is never a
routing candidate (it serves no requests); no query filter names it. Light (no imports) so
the base client install can check a role before sending it.
"""

from __future__ import annotations

from typing import Final

__all__ = ["DEFAULT_ROLE", "ROLES", "STORE", "WORKER_ROLES", "check_role", "check_worker_role",
           "role_matches"]

PREFILL: Final = "prefill"
DECODE: Final = "decode"
BOTH: Final = "both"
ROLES: Final = (PREFILL, DECODE, BOTH)  # what a query's role filter may name
STORE: Final = "store"
WORKER_ROLES: Final = (*ROLES, STORE)  # what a publisher may declare
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


def check_worker_role(role: str, field: str = "role") -> str:
    """`role` when a publisher may declare it (ROLES, or `store`); ValueError otherwise."""
    if role in WORKER_ROLES:
        return role
    raise ValueError(f"{field}: {role!r} is not a worker role; expected one of "
                     f"{', '.join(WORKER_ROLES)}")
