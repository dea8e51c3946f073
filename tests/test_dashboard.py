"""deploy/grafana/kv-indexer-dashboard.json against what the processes really export.

The exported names come from scrapes: a real `IndexerService` (in-memory index, gRPC and
/metrics on, events applied and Score calls served) and a connected bridge's /metrics
(`publisher/metrics.py`). Every metric an expression or variable query names must be one
of them, histogram and counter suffixes included (`_bucket` only of a histogram, `_total`
only of a counter), and every panel has a title and queries the datasource variable.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest

from indexer._proto.kvindex.v1 import indexer_pb2 as pb
from indexer._proto.kvindex.v1 import indexer_pb2_grpc as pb_grpc
from indexer.app import IndexerService
from publisher.metrics import BridgeHttpServer
from tests.support.event_path import BS, MODEL, TOKENS, matched, publisher, service_config, store
from tests.support.exposition import exposed_names
from tests.support.polling import equals, eventually

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / \
    "kv-indexer-dashboard.json"
README = Path(__file__).resolve().parents[1] / "README.md"
DATASOURCE = "${datasource}"

# PromQL words that are not metric names.
KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                      "and", "or", "unless", "offset", "inf", "nan"})


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers once strings, label
    matchers, ranges, grouping clauses and function calls are taken out."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges ($__rate_interval)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\b[a-zA-Z_]\w*\s*\(", "(", text)  # function names
    return {word for word in re.findall(r"\b[a-zA-Z_:][\w:]*\b", text)
            if word.lower() not in KEYWORDS}


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    out = []
    for panel in board["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def variable_queries(board: dict[str, Any]) -> list[str]:
    return [str(v["definition"]) for v in board["templating"]["list"] if v.get("definition")]


def label_values_metric(definition: str) -> set[str]:
    match = re.fullmatch(r"label_values\((\w+),\s*\w+\)", definition)
    return {match.group(1)} if match else metric_names(definition)


class TestUnits:
    def test_metric_names(self) -> None:
        expr = ('histogram_quantile(0.99, sum by (le, method) (rate(kv_indexer_grpc_request_'
                'seconds_bucket{job=~"$job", method!~"grpc\\\\..*"}[$__rate_interval])))')
        assert metric_names(expr) == {"kv_indexer_grpc_request_seconds_bucket"}
        expr = ('sum by (code) (rate(a_total{code!="OK"}[5m])) / ignoring(code) group_left '
                'sum(rate(a_total[5m])) or on (instance) process_open_fds > bool 0')
        assert metric_names(expr) == {"a_total", "process_open_fds"}

    def test_exposed_names(self) -> None:
        text = ("# TYPE h histogram\nh_bucket{le=\"1\"} 1.0\n# TYPE c_total counter\n"
                "# TYPE g gauge\ng 1.0\n")
        assert exposed_names(text) == {"h_bucket", "h_sum", "h_count", "c_total", "g"}


class TestDashboardShape:
    def test_panels_titled_on_the_datasource_variable(self) -> None:
        board = dashboard()
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        ids = [p["id"] for p in panels(board)]
        assert len(ids) == len(set(ids))
        for panel in panels(board):
            assert str(panel.get("title", "")).strip(), panel["id"]
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] == DATASOURCE, panel["title"]
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == DATASOURCE, panel["title"]
                assert target["expr"].strip(), panel["title"]

    def test_rows_and_what_they_show(self) -> None:
        """The query path, event path, bridge and process rows, each with its series."""
        board = dashboard()
        rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
        for wanted in ("Query path", "Event path", "Bridge", "Process"):
            assert any(title.startswith(wanted) for title in rows), wanted
        exprs = [t["expr"] for p in panels(board) for t in p.get("targets", [])]
        names = set().union(*(metric_names(e) for e in exprs))
        assert {
            "kv_indexer_grpc_requests_total", "kv_indexer_grpc_request_seconds_bucket",
            "kv_indexer_event_lag_seconds_bucket", "kv_indexer_apply_seconds_bucket",
            "kv_indexer_batches_applied_total", "kv_indexer_dead_letters_total",
            "kv_indexer_gaps_total", "kv_indexer_resyncs_requested_total",
            "kv_indexer_consumer_pending", "kv_indexer_seconds_since_last_apply",
            "kv_indexer_serving", "kv_publisher_published_batches_total",
            "kv_publisher_buffered_batches", "kv_publisher_dropped_batches_total",
            "kv_publisher_nats_connected", "kv_publisher_resyncs_total",
            "process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
        } <= names
        assert "kv_indexer_lag_seconds" not in names  # deprecated quantile gauge
        # Quantiles come from histograms summed by le across processes.
        quantiles = [e for e in exprs if "histogram_quantile" in e]
        assert quantiles
        for expr in quantiles:
            assert re.search(r"sum by \(le\b", expr) and "_bucket{" in expr, expr
        assert any("by (method)" in e and "kv_indexer_grpc_requests_total" in e for e in exprs)
        assert any("by (code)" in e and 'code!="OK"' in e for e in exprs)
        assert any("by (reason)" in e and "kv_indexer_dead_letters_total" in e for e in exprs)
        assert any("by (partition)" in e for e in exprs)


@pytest.mark.integration
async def test_every_queried_metric_is_exported(nats_url: str) -> None:
    """Scrape a live service (events applied, Score served, a refused call) and a connected
    bridge; every name in every panel and variable query is in one of the scrapes."""
    svc = IndexerService(service_config(nats_url, metrics_listen="127.0.0.1:0",
                                        grpc_listen="127.0.0.1:0"))
    await svc.start()
    try:
        async with publisher(nats_url) as pub:
            store(pub, 1, 4)
            await pub.flush()
            await eventually(lambda: equals(matched(svc), 4))
            bridge_text = BridgeHttpServer(pub).respond("GET", "/metrics")[2].decode()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.grpc_port}") as channel:
            stub = pb_grpc.KvIndexerStub(channel)
            await stub.Score(pb.ScoreRequest(model=MODEL, token_ids=TOKENS, block_size=BS))
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Score(pb.ScoreRequest(model=""))
        assert svc.metrics is not None
        await svc.metrics.refresh()
        url = f"http://127.0.0.1:{svc.metrics_port}/metrics"
        indexer_text = await asyncio.to_thread(
            lambda: urllib.request.urlopen(url, timeout=10).read().decode())
        applied = svc.stats.batches_applied
    finally:
        await svc.close()

    # The event path's histograms saw every applied batch, and at least one apply call.
    assert f"kv_indexer_event_lag_seconds_count {float(applied)}" in indexer_text
    assert re.search(r"^kv_indexer_apply_seconds_count [1-9]", indexer_text, re.M)
    assert 'kv_indexer_grpc_requests_total{code="INVALID_ARGUMENT",method="Score"} 1.0' \
        in indexer_text
    assert "kv_indexer_build_info{" in indexer_text and "kv_publisher_build_info{" in bridge_text

    exported = exposed_names(indexer_text) | exposed_names(bridge_text)
    # The README's metrics list names every kv_indexer_* series and the build infos (in a
    # group, by its suffix after the prefix: `_gaps_total`).
    readme = README.read_text()
    families = {re.sub(r"_(bucket|sum|count)$", "", name) for name in exported
                if name.startswith("kv_indexer_") and not name.endswith("_created")}
    families.add("kv_publisher_build_info")
    unlisted = {name for name in families if f"`{name}`" not in readme
                and f"`_{name.removeprefix('kv_indexer_')}`" not in readme}
    assert unlisted == set()
    board = dashboard()
    missing = {}
    for panel in panels(board):
        for target in panel.get("targets", []):
            unknown = metric_names(target["expr"]) - exported
            if unknown:
                missing[panel["title"]] = sorted(unknown)
    for definition in variable_queries(board):
        unknown = label_values_metric(definition) - exported
        if unknown:
            missing[f"variable {definition}"] = sorted(unknown)
    assert missing == {}
