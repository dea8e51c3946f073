"""`kv-indexer bench routing`: routing quality on a real trace, through the whole system.

    kv-indexer bench routing --trace ../shared/traces/mooncake_conversation_trace.jsonl \\
        --workers 16 --capacity-blocks 65536 --block-size 16 --policy all \\
        [--check-trace ../shared/traces/mooncake_synthetic_trace.jsonl] [--speedup X] \\
        [--max-requests N] [--redis-url URL] [--tune-overlap-weights 1,2,4 ...]

A Mooncake trace is replayed against simulated engines, once per policy, each time on a fresh
fleet of the `kv-sim engines` engines (`MockEngine`: an LRU pool of `--capacity-blocks`
GPU blocks per worker publishing real vLLM ZMQ events):

- `kv`: the router calls FindBestWorker over gRPC with the engines' current loads, against a
  real `IndexerService` on its embedded default (nats-server from the wheel, in-memory index,
  or Redis with `--redis-url`) fed by one bridge per engine (`EngineSource` +
  `KVEventPublisher`): engine ZMQ events -> bridge -> JetStream -> consumer -> index -> gRPC.
- `oracle`: the same cost function (`indexer.scheduling.choose_worker`, same overlap weight,
  temperature, seed and loads) over overlaps read from the engines' pools directly, no index
  in between: the gap between `kv` and `oracle` is what index staleness / inaccuracy costs.
- `round-robin` and `random` (seeded): no index, for contrast.

Requests: trace record i becomes `trace_tokens(record)` (each 512-token hash id expands into
deterministic token ids), the engine caches its full 16-token blocks. Every policy's hit ratio
is counted by the engines themselves (cached prompt tokens / prompt tokens). The single-cache
bound is one infinite cache over the trace: each request hits the longest prefix, in whole
blocks, that any earlier request had.

Time is simulated, never slept: request i arrives at its trace timestamp divided by
`--speedup` (a load multiplier: 2 replays the trace at twice its rate). Requests with the
same arrival time form one step. Per worker, prompts are prefilled one at a time (FIFO) at
`--prefill-rate` uncached tokens/s, then decode at `--decode-rate` tokens/s per request (no
batching slowdown); a request is active from arrival to its last token, and its prompt blocks
are pinned in the pool (never evicted) while it is. The router reports per worker, in
FindBestWorker's loads: active_blocks = prompt blocks of its unfinished requests,
waiting_requests = requests whose prefill has not started, prefill_tokens_in_flight =
uncached tokens not yet prefilled.

Index staleness (kv): after each step the event path is allowed to catch up: the run waits
(wall time, up to `--catch-up-timeout` s) until every bridge has read every batch its engine
sent, every publisher's buffer is in JetStream, and ListWorkers shows each worker's last
published seq applied. So the index is at most one step behind: requests of the same step do
not see each other's blocks (the oracle does). Steps that time out are counted.

Modules: `settings` (the run's knobs and command line), `traces` (arrival steps, the
single-cache bound), `clock` (pinned pools, simulated prefill and decode, loads), `replay`
(one policy, one trace; the kv wait for the event path), `tuning` (the knob grid),
`results` (the JSON report), `markdown` and `plot` (docs/benchmarks.md and its figure), `cli`
(`main`). The routers are `kvsim.routers`, the bridges `kvsim.bridges`; the demo uses both.
"""
