"""Process set-up shared by `kv-indexer` and `kv-publisher`: logging, event loop, GC."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.util
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, Final, TypeVar

import structlog

from kvcore.about import NATIVE_MISSING
from kvcore.keys import NATIVE
from kvcore.redact import redact_text

__all__ = [
    "SERVER_GC_THRESHOLDS",
    "configure_logging",
    "json_logs",
    "loop_name",
    "redact_event",
    "run_event_loop",
    "scoped_logging",
    "settle_gc",
    "supervise",
    "uvloop_installed",
    "warn_if_pure_python",
]

T = TypeVar("T")

log = structlog.get_logger("kvcore.runtime")

# Delays before restarting a failed background task; a task that ran this long without
# failing starts the sequence over.
SUPERVISE_BACKOFF_S: Final = (0.1, 0.5, 1.0, 2.0, 5.0)
_HEALTHY_RUN_S: Final = 30.0

# A long-lived index server: full collections rare, the youngest generation small.
SERVER_GC_THRESHOLDS: Final = (2_000, 50, 1000)


def settle_gc(thresholds: tuple[int, int, int] | None = None) -> None:
    """Freeze what start-up built out of the collector's sight, optionally with new
    thresholds (`SERVER_GC_THRESHOLDS` for the indexer; the bridge keeps Python's).

    Full collections walk every tracked object; frozen objects are not walked, so a
    collection's pause depends on what was made since start-up, not on the index or the
    mirror. Full collections waiting for 1,000 middle ones keeps them rare in a server
    whose heap is mostly long-lived. The youngest generation stays small on purpose:
    grpc.aio leaves three objects in a reference cycle per call, which only a collection
    frees, and a large generation frees them in one long pause (docs/benchmarks.md, the
    bench-grpc section's GC note).
    """
    if thresholds is not None:
        gc.set_threshold(*thresholds)
    gc.collect()
    gc.freeze()


def uvloop_installed() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def run_event_loop(main: Coroutine[Any, Any, T], event_loop: str = "auto") -> T:
    """Run `main` to completion on uvloop (libuv), unless `event_loop` is "asyncio" or, for
    "auto", uvloop is not installed.

    Under uvloop a server process spends less CPU per call in the loop and in its
    transports (the Redis pipe, gRPC's wake-ups); docs/benchmarks.md has the A/B.
    """
    if event_loop != "asyncio":
        try:
            import uvloop  # noqa: PLC0415 - optional: not on every platform
        except ImportError:
            if event_loop == "uvloop":
                raise
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def loop_name() -> str:
    """"uvloop" or "asyncio": the running loop's kind."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"


def redact_event(_logger: object, _method: str,
                 event_dict: structlog.typing.EventDict) -> structlog.typing.EventDict:
    """structlog processor: URL secrets out of every string value (tracebacks included,
    so it runs after `format_exc_info`)."""
    for key, value in event_dict.items():
        if isinstance(value, str):
            event_dict[key] = redact_text(value)
        elif not isinstance(value, int | float | bool | list | tuple | dict | None):
            text = str(value)  # an exception or other object: replaced only if it held one
            if (redacted := redact_text(text)) != text:
                event_dict[key] = redacted
    return event_dict


class _RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


def _route_stdlib_logging(level: int) -> None:
    """Libraries' own log records (nats-py's 'encountered error', asyncio's) to stderr
    through the same redaction, instead of Python's unformatted last-resort handler."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_kv_redacting", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RedactingFormatter("%(levelname)s %(name)s: %(message)s"))
    handler._kv_redacting = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(max(level, logging.WARNING))


def json_logs(log_format: str) -> bool:
    """Whether `log_format` means JSON lines: "json", or "auto" off a terminal."""
    return log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())


def configure_logging(log_format: str = "auto", level: str = "info") -> None:
    """structlog: JSON lines in containers, readable console output on a terminal. No
    URL secret is ever printed (`kvcore.redact`)."""
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json_logs(log_format)
        else structlog.dev.ConsoleRenderer()
    )
    level_no = logging.getLevelNamesMapping()[level.upper()]
    _route_stdlib_logging(level_no)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_event,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def warn_if_pure_python() -> bool:
    """Log `native_extension_missing` (a warning) when kvcore._native is not in use: an
    optional extension that failed to build leaves no trace in pip's output. Called once at
    start, after `configure_logging`. True when the extension is in use."""
    if NATIVE:
        return True
    log.warning("native_extension_missing", detail=NATIVE_MISSING)
    return False


@contextlib.contextmanager
def scoped_logging(level: str) -> Iterator[None]:
    """Plain console logs at `level` to stderr for a while (demo, benchmarks); the previous
    structlog setup afterwards."""
    saved = structlog.get_config()
    structlog.configure(
        processors=[structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    redact_event,
                    structlog.dev.ConsoleRenderer(colors=False)],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    try:
        yield
    finally:
        structlog.configure(**saved)


async def supervise(
    name: str,
    run: Callable[[asyncio.Event], Awaitable[None]],
    stop: asyncio.Event,
    *,
    on_failure: Callable[[str], None] | None = None,
    outages: tuple[type[BaseException], ...] = (),
) -> None:
    """Run `run(stop)` until `stop` is set. A background task of a long-lived process must
    never end unnoticed: an exception, or a return while `stop` is not set, is logged
    (`task_failed`, with the traceback), counted through `on_failure(name)`, and the task
    is started again after a backoff (`SUPERVISE_BACKOFF_S`). Exceptions of the `outages`
    types (a server away: expected, and repeated while it lasts) are logged as
    `task_interrupted` without a traceback."""
    failures = 0
    while not stop.is_set():
        started = time.monotonic()
        try:
            await run(stop)
        except outages as exc:
            log.warning("task_interrupted", task=name, error=repr(exc)[:300])
        except Exception:
            log.exception("task_failed", task=name)
        else:
            if stop.is_set():
                return
            log.error("task_failed", task=name, error="returned while the process runs")
        if on_failure is not None:
            on_failure(name)
        failures = 1 if time.monotonic() - started > _HEALTHY_RUN_S else failures + 1
        delay = SUPERVISE_BACKOFF_S[min(failures, len(SUPERVISE_BACKOFF_S)) - 1]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
