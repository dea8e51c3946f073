"""Bounded cardinality of the indexer's per-worker series: at most --metrics-max-workers
worker ranks have series of their own on /metrics, every other rank is summed into
worker="_other", and a rank keeps its series while it stays in the index."""

from __future__ import annotations

import asyncio
import urllib.request
from collections import defaultdict

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from indexer.config import parse_service_config
from indexer.index.memory import MemoryIndex
from indexer.ingest.consumer import ConsumerStats
from indexer.metrics import DEFAULT_MAX_WORKER_SERIES, OTHER_WORKERS, MetricsExporter
from kvcore.bus import SCHEMA_VERSION, BlockRemoved, BlockStored, EventBatch, pack_tokens

MODEL = "cap/model"
BS = 4


def worker_name(i: int) -> str:
    return f"w{i:05d}"


def batches(workers: range, *, blocks: int = 2, seq: int = 0) -> list[EventBatch]:
    """`blocks` blocks stored on each worker, distinct per worker."""
    out = []
    for i in workers:
        first = i * 1000
        out.append(EventBatch(
            schema=SCHEMA_VERSION, model=MODEL, worker_id=worker_name(i), epoch=1, seq=seq,
            events=[BlockStored(block_hashes=list(range(first, first + blocks)),
                                token_ids=pack_tokens(range(first * BS,
                                                            (first + blocks) * BS)),
                                block_size=BS)]))
    return out


async def scrape(exporter: MetricsExporter) -> dict[str, list[tuple[dict[str, str], float]]]:
    """/metrics over HTTP: samples by name."""
    await exporter.refresh()
    url = f"http://127.0.0.1:{exporter.port}/metrics"
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
    samples: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[sample.name].append((sample.labels, sample.value))
    return samples


def workers_of(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> set[str]:
    return {labels["worker"] for labels, _ in samples[name]}


async def test_two_thousand_workers_make_at_most_cap_plus_one_series() -> None:
    """2,000 workers, a cap of 1,000: 1,000 workers with their own series and one
    "_other" series holding the rest's blocks (and a count of their degraded ranks)."""
    index = MemoryIndex()
    await index.apply(batches(range(2000)))
    exporter = MetricsExporter(index, ConsumerStats(), CollectorRegistry(),
                               max_worker_series=1000)
    exporter.serve("127.0.0.1:0")
    samples = await scrape(exporter)

    for name in ("kv_indexer_worker_blocks", "kv_indexer_worker_degraded"):
        workers = workers_of(samples, name)
        assert len(workers) == 1001 and OTHER_WORKERS in workers, name
    blocks = {labels["worker"]: value for labels, value in samples["kv_indexer_worker_blocks"]}
    assert blocks[OTHER_WORKERS] == 1000 * 2
    assert sum(blocks.values()) == 2000 * 2
    assert samples["kv_indexer_workers"][0][1] == 2000
    assert samples["kv_indexer_worker_ranks_aggregated"][0][1] == 1000
    other_degraded = [v for labels, v in samples["kv_indexer_worker_degraded"]
                      if labels["worker"] == OTHER_WORKERS]
    assert other_degraded == [0]

    # Newcomers (sorting before everyone) do not take series from workers that have one;
    # a worker that leaves frees its series for one of them.
    named = workers_of(samples, "kv_indexer_worker_blocks") - {OTHER_WORKERS}
    early = EventBatch(schema=SCHEMA_VERSION, model=MODEL, worker_id="a-newcomer", epoch=1,
                       seq=0, events=[BlockStored(block_hashes=[7], token_ids=pack_tokens(
                           [1, 2, 3, 4]), block_size=BS)])
    await index.apply([early])
    samples = await scrape(exporter)
    assert workers_of(samples, "kv_indexer_worker_blocks") - {OTHER_WORKERS} == named
    gone = sorted(named)[0]
    await index.remove_worker(MODEL, gone)
    samples = await scrape(exporter)
    now_named = workers_of(samples, "kv_indexer_worker_blocks") - {OTHER_WORKERS}
    assert now_named == named - {gone} | {"a-newcomer"}
    assert len(workers_of(samples, "kv_indexer_worker_blocks")) == 1001


async def test_a_cap_of_zero_sums_every_worker() -> None:
    index = MemoryIndex()
    await index.apply(batches(range(10)))
    await index.apply([EventBatch(schema=SCHEMA_VERSION, model=MODEL, worker_id=worker_name(3),
                                  epoch=1, seq=1,
                                  events=[BlockRemoved(block_hashes=[3000])])])
    exporter = MetricsExporter(index, ConsumerStats(), CollectorRegistry(), max_worker_series=0)
    exporter.serve("127.0.0.1:0")
    samples = await scrape(exporter)
    assert samples["kv_indexer_worker_blocks"] == [
        ({"model": OTHER_WORKERS, "worker": OTHER_WORKERS, "dp_rank": OTHER_WORKERS,
          "tier": "gpu"}, 19.0)]


def test_the_cap_is_a_setting() -> None:
    assert parse_service_config([], environ={}).metrics_max_workers == DEFAULT_MAX_WORKER_SERIES
    config = parse_service_config([], environ={"KV_INDEXER_METRICS_MAX_WORKERS": "50"})
    assert config.metrics_max_workers == 50
