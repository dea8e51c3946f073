"""What `Diagnose` answers: findings (severity, code, summary, fix, the model and worker they
concern), shared by the service that makes them (indexer/serve/diagnose.py), the client
that receives them and `kv-indexer doctor`, which prints them. Light: msgspec only."""

from __future__ import annotations

from typing import Final

import msgspec

__all__ = ["CODES", "ERROR", "INFO", "SEVERITIES", "WARNING", "Diagnosis", "Finding",
           "severity_rank"]

INFO: Final = "info"
WARNING: Final = "warning"
ERROR: Final = "error"
SEVERITIES: Final = (INFO, WARNING, ERROR)  # mildest first

# Every finding code, with what it means (docs/grpc.md lists the same).
CODES: Final[dict[str, str]] = {
    "unknown_model": "queries or the request name a model no worker publishes",
    "silent_worker": "a worker is registered (heartbeats) but its events never arrive",
    "unregistered_worker": "a worker publishes events but has no registry entry",
    "block_size_mismatch": "queries or registry entries use another block size than "
                           "the model's events",
    "first_block_misses": "queries miss even their first block while the model holds many",
    "stores_without_removals": "a rank's blocks are stored and never removed",
    "clock_skew": "a publisher's batch timestamps disagree with the indexer's clock",
    "degraded_worker": "a rank's state is known to be incomplete",
    "dead_letters": "batches were refused (dead-lettered) by the consumers",
    "rebuilding": "the index is being rebuilt",
    "native_missing": "the indexer runs without its C extension (slow path)",
}


class Finding(msgspec.Struct, frozen=True, kw_only=True):
    """One problem and what to do about it."""

    severity: str  # INFO, WARNING or ERROR
    code: str  # a key of CODES
    summary: str
    fix: str
    model: str = ""
    worker_id: str = ""
    dp_rank: int | None = None


class Diagnosis(msgspec.Struct, frozen=True, kw_only=True):
    """The findings, worst first; the checks that ran; what the answering process could
    not see."""

    findings: list[Finding]
    checks: list[str]
    limitations: list[str] = msgspec.field(default_factory=list)

    @property
    def has_errors(self) -> bool:
        return any(f.severity == ERROR for f in self.findings)


def severity_rank(severity: str) -> int:
    """0 for info, 1 warning, 2 error (unknown names sort as info)."""
    return SEVERITIES.index(severity) if severity in SEVERITIES else 0
