"""`kv-indexer doctor`: ask a running indexer why routing gets no hits (the `Diagnose` RPC)
and print its findings, each with a verdict and a fix; `--json` for scripts.

Exit status: 0 when no finding is an error (warnings and notes are printed), 3 when one is
(1 when the call failed, 2 on a usage error, as the other query commands).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from typing import Final

import grpc
import msgspec

from indexer.client import IndexerClient, IndexerClientError
from indexer.findings import Diagnosis, Finding
from kvcore.helpfmt import DefaultsArgumentParser

__all__ = ["ERRORS_FOUND", "add_doctor_command", "render"]

ERRORS_FOUND: Final = 3  # exit status when a finding is an error
_WIDTH: Final = 100


def add_doctor_command(sub: argparse._SubParsersAction[DefaultsArgumentParser],
                       common: DefaultsArgumentParser) -> None:
    """Register `doctor` with the query commands' options (target, TLS, token, --json)."""
    doctor = sub.add_parser(
        "doctor", parents=[common],
        help="explain why routing gets no hits: findings with a fix each (exit 3 on errors)")
    doctor.add_argument("--model", default="",
                        help="only this model (default: every model the service knows or "
                             "was asked about)")
    doctor.set_defaults(run=run_doctor)


def _where(finding: Finding) -> str:
    parts = []
    if finding.model:
        parts.append(f"model {finding.model}")
    if finding.worker_id:
        rank = f" rank {finding.dp_rank}" if finding.dp_rank is not None else ""
        parts.append(f"worker {finding.worker_id}{rank}")
    return f" ({', '.join(parts)})" if parts else ""


def _wrapped(label: str, text: str) -> str:
    return textwrap.fill(text, _WIDTH, initial_indent=f"    {label} ",
                         subsequent_indent=" " * (5 + len(label)))


def render(diagnosis: Diagnosis) -> str:
    """The findings for people: one block per finding, worst first, or the verdict that
    nothing is wrong."""
    lines = []
    for finding in diagnosis.findings:
        lines.append(f"{finding.severity.upper()} {finding.code}{_where(finding)}")
        lines.append(_wrapped("what:", finding.summary))
        lines.append(_wrapped("fix: ", finding.fix))
    if not diagnosis.findings:
        lines.append(f"no problems found ({len(diagnosis.checks)} checks passed)")
    else:
        counts = {s: sum(f.severity == s for f in diagnosis.findings)
                  for s in ("error", "warning", "info")}
        lines.append(", ".join(f"{n} {s}(s)" for s, n in counts.items() if n))
    lines.extend(f"note: {limit}" for limit in diagnosis.limitations)
    return "\n".join(lines)


def run_doctor(client: IndexerClient, args: argparse.Namespace) -> int:
    try:
        diagnosis = client.diagnose(args.model or None)
    except IndexerClientError as exc:
        if exc.code != grpc.StatusCode.UNIMPLEMENTED:
            raise
        print(f"kv-indexer doctor: the indexer at {args.target} has no Diagnose RPC (a version "
              "older than kv-indexer doctor): upgrade it", file=sys.stderr)
        return 1
    if args.json:
        print(msgspec.json.encode({"findings": diagnosis.findings, "checks": diagnosis.checks,
                                   "limitations": diagnosis.limitations,
                                   "ok": not diagnosis.has_errors}).decode())
    else:
        print(render(diagnosis))
    return ERRORS_FOUND if diagnosis.has_errors else 0
