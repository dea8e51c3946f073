"""The bridge's Prometheus metrics and health endpoint, on one small HTTP server.

`GET /metrics` answers the Prometheus text format, read from the publisher's, its sink's
and its engine sources' counters at scrape time (nothing is counted twice). `GET /healthz`
answers 200 when NATS is connected and the sink is moving, 503 otherwise, with the reason
in the body (`KVEventPublisher.health`). The server runs on the bridge's event loop, so a
scrape reads the counters between two steps of it, never halfway through one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from typing import Final

import structlog
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Gauge,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvcore.about import NATIVE_MISSING_SHORT, build_labels
from kvcore.keys import NATIVE
from publisher.publisher import KVEventPublisher
from publisher.zmq_source import EngineSource

__all__ = ["BridgeCollector", "BridgeHttpServer"]

log = structlog.get_logger("publisher.metrics")

_MAX_REQUEST_BYTES: Final = 8192
_READ_TIMEOUT_S: Final = 5.0


class BridgeCollector(Collector):
    """kv_publisher_* series of one publisher and its engine sources."""

    def __init__(self, publisher: KVEventPublisher, sources: Sequence[EngineSource] = ()):
        self._publisher = publisher
        self._sources = list(sources)

    def collect(self) -> Iterator[Metric]:
        pub = self._publisher
        sink = pub.sink
        labels = ["model", "worker"]
        ids = [pub.model, pub.worker_id]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=labels)
            family.add_metric(ids, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=labels)
            family.add_metric(ids, value)
            return family

        healthy, _ = pub.health()
        yield gauge("kv_publisher_nats_connected", "1 while the NATS connection is up",
                    1.0 if pub.connected else 0.0)
        yield gauge("kv_publisher_healthy", "1 while /healthz answers 200",
                    1.0 if healthy else 0.0)
        if sink is None:
            return
        stats = sink.stats
        yield gauge("kv_publisher_max_payload_bytes",
                    "max_payload of the NATS server (from its INFO)", sink.max_payload)
        yield gauge("kv_publisher_buffered_batches",
                    "Batches waiting for a JetStream ack", sink.pending)
        yield gauge("kv_publisher_buffered_bytes",
                    "Payload bytes waiting for a JetStream ack", sink.pending_bytes)
        yield gauge("kv_publisher_sink_stalled_seconds",
                    "Seconds batches have waited with none acknowledged", sink.stalled_for())
        for name, doc, value in (
            ("kv_publisher_published_batches", "Batches stored by JetStream", stats.published),
            ("kv_publisher_published_bytes", "Payload bytes stored by JetStream", stats.bytes),
            ("kv_publisher_published_blocks", "Blocks in the batches stored", stats.blocks),
            ("kv_publisher_refused_batches", "Batches refused: buffer full (a resync follows)",
             stats.refused),
            ("kv_publisher_publish_retries", "Publish rounds retried (NATS away, no ack)",
             stats.retries),
            ("kv_publisher_splits", "Engine steps or resyncs published as several batches",
             stats.splits),
            ("kv_publisher_split_events", "Events cut into several events to fit max_payload",
             stats.split_events),
            ("kv_publisher_max_payload_errors",
             "MaxPayloadError from the client (the batch is replaced, never retried)",
             stats.max_payload_errors),
        ):
            yield counter(name, doc, value)
        for name, doc, by_reason in (
            ("kv_publisher_dropped_batches", "Batches not published, by reason",
             stats.dropped_batches),
            ("kv_publisher_dropped_blocks", "Blocks not published, by reason",
             stats.dropped_blocks),
        ):
            family = CounterMetricFamily(name, doc, labels=[*labels, "reason"])
            for reason, count in sorted(by_reason.items()):
                family.add_metric([*ids, reason], count)
            yield family
        ranks = CounterMetricFamily("kv_publisher_resyncs", "Resyncs published (mirror re-sent)",
                                    labels=[*labels, "dp_rank"])
        for rank in pub.ranks:
            ranks.add_metric([*ids, str(rank.dp_rank)], rank.resyncs)
        yield ranks
        requests = CounterMetricFamily(
            "kv_publisher_resync_requests",
            "Resync requests received from the indexer: answered at once, or rate-limited "
            "(merged into one resync at the end of the rank's interval)",
            labels=[*labels, "dp_rank", "outcome"])
        for rank in pub.ranks:
            limited = rank.resync_requests_limited
            requests.add_metric([*ids, str(rank.dp_rank), "answered"],
                                rank.resync_requests - limited)
            requests.add_metric([*ids, str(rank.dp_rank), "rate_limited"], limited)
        yield requests
        yield counter("kv_publisher_resync_requests_invalid",
                      "Resync requests that could not be read or named no rank of this worker",
                      pub.resync_requests_invalid)
        yield from self._engine_series(labels, ids)

    def _engine_series(self, labels: list[str], ids: list[str]) -> Iterator[Metric]:
        rank_labels = [*labels, "dp_rank"]
        series = (
            ("kv_publisher_engine_batches", "Engine batches read from ZMQ", "batches"),
            ("kv_publisher_engine_seq_gaps", "Gaps in the engine's ZMQ seq", "gaps"),
            ("kv_publisher_engine_gaps_filled", "Engine seq gaps filled from replay",
             "gaps_filled"),
            ("kv_publisher_engine_gaps_unfilled",
             "Engine seq gaps replay could not fill (the rank is cleared)", "gaps_unfilled"),
            ("kv_publisher_engine_restarts", "Engine restarts seen (seq went back)",
             "engine_restarts"),
            ("kv_publisher_engine_bad_messages", "Engine messages that could not be decoded",
             "bad_messages"),
            ("kv_publisher_engine_removals_held_back",
             "Blocks an owner removed from a tier another owner still holds (not published)",
             "removals_held_back"),
        )
        for name, doc, attr in series:
            family = CounterMetricFamily(name, doc, labels=rank_labels)
            for source in self._sources:
                family.add_metric([*ids, str(source.dp_rank)], getattr(source.stats, attr))
            yield family
        skipped = CounterMetricFamily("kv_publisher_engine_skipped_events",
                                      "Engine events left out, by reason",
                                      labels=[*rank_labels, "reason"])
        for source in self._sources:
            for reason, count in sorted(source.stats.skipped_events.items()):
                skipped.add_metric([*ids, str(source.dp_rank), reason], count)
        yield skipped


class BridgeHttpServer:
    """GET /metrics and GET /healthz of one bridge, served on its event loop."""

    def __init__(self, publisher: KVEventPublisher, sources: Sequence[EngineSource] = ()):
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(BridgeCollector(publisher, sources))
        # kv_publisher_build_info{version,native} and the process_* / python_info series
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        Gauge("kv_publisher_build_info", "The running version, and whether the C extension "
              "(kvcore._native) is in use; always 1", ["version", "native"],
              registry=self.registry).labels(*build_labels()).set(1)
        self._publisher = publisher
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the port (useful with port 0)."""
        self._server = await asyncio.start_server(self._serve, host, port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("bridge_http_listening", host=host, port=self.port)
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    def respond(self, method: str, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for a request."""
        path = path.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, "text/plain; charset=utf-8", b"method not allowed\n"
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/healthz":
            healthy, reason = self._publisher.health()
            # Slow, not unhealthy: said on every check, the status left alone.
            warning = "" if NATIVE else f"warning: C extension {NATIVE_MISSING_SHORT}\n"
            return (200 if healthy else 503), "text/plain; charset=utf-8", (
                reason + "\n" + warning).encode()
        return 404, "text/plain; charset=utf-8", b"not found: try /metrics or /healthz\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT_S)
            if len(head) > _MAX_REQUEST_BYTES:
                raise ValueError("request too large")
            method, path, _version = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            status, content_type, body = self.respond(method, path)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ValueError, UnicodeDecodeError):
            status, content_type, body, method = 400, "text/plain; charset=utf-8", \
                b"bad request\n", "GET"
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found",
                  405: "Method Not Allowed", 503: "Service Unavailable"}[status]
        header = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                  f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        try:
            writer.write(header if method == "HEAD" else header + body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
