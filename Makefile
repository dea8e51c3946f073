# Two commands on a fresh machine: `make run` and `make test`. Both create what they need.
# Only the tests and the Redis benches need redis-server; `make run`, `make sim` and
# `make demo` use the in-memory index.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
PYTHON  ?= python3
PKGS    := kvcore publisher indexer kvsim
PROTO_OUT := indexer/_proto
CC      ?= cc
# The optional Redis module (native/redis_module/kvi.c): redis-server --loadmodule it
REDIS_MODULE := native/redis_module/kvi.so

.PHONY: chaos dist setup redis-module redis-server libnghttp2-dev test lint typecheck pytest run demo bench bench-keys bench-memory bench-redis bench-events bench-grpc bench-decisions bench-rebuild bench-dead-models bench-tls bench-grpc-metrics bench-diagnose proto clean sim test-redis-cluster bench-redis-cluster bench-replicas bench-nats-cluster bench-shards bench-redis-subslots bench-redis-markers bench-redis-module bench-redis-restart

setup: $(STAMP) $(REDIS_MODULE)

$(STAMP): pyproject.toml $(wildcard native/*.c native/*.h)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

redis-module: $(REDIS_MODULE)

# Written to a new file, then renamed: a server running the module keeps the one it loaded.
$(REDIS_MODULE): native/redis_module/kvi.c native/redis_module/redismodule.h
	$(CC) -O2 -Wall -std=c11 -shared -fPIC -o $@.tmp $<
	mv $@.tmp $@

# redis-server comes from Debian's package; install it when missing and we can.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing redis-server with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; \
	  else \
	    echo "redis-server is missing: install Debian's redis-server package" >&2; exit 1; \
	  fi; }

# bench-grpc's load generator (bench/grpcload.c) links libnghttp2; without it the bench
# runs its Python clients only.
libnghttp2-dev:
	@[ -f /usr/include/nghttp2/nghttp2.h ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing libnghttp2-dev with apt-get"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libnghttp2-dev; } \
	      || echo "could not install libnghttp2-dev: bench-grpc will run its Python clients only" >&2; \
	  else \
	    echo "libnghttp2-dev is missing: bench-grpc will run its Python clients only" >&2; \
	  fi; }

lint: $(STAMP)
	$(VENV)/bin/ruff check $(PKGS) tests bench
	$(VENV)/bin/mypy

typecheck: lint

# libnghttp2-dev: so the tests of bench/grpcload.c build and run it (they skip without it).
pytest: setup redis-server libnghttp2-dev
	$(VENV)/bin/pytest -q -p no:cacheprovider

# The field-fault suite's long variants: a 60 s NATS outage under 16 workers (~160,000
# block entries), both backends; prints the figures docs/benchmarks.md quotes.
chaos: setup redis-server
	KV_CHAOS_OUTAGE_S=60 KV_CHAOS_WORKERS=16 $(VENV)/bin/pytest -q -s -p no:cacheprovider \
	  tests/test_field_faults.py tests/test_chaos.py tests/test_max_payload.py

test: setup lint pytest

# The Redis Cluster suites alone (a private 3-master cluster with a replica each, on local
# ports: slot migration, master failover, lost writes, the index contract); `make test`
# runs them too, with everything else.
test-redis-cluster: setup redis-server
	$(VENV)/bin/pytest -q -p no:cacheprovider -m redis_cluster tests/test_redis_cluster.py tests/test_index_contract.py \
	  tests/test_redis_markers.py tests/test_redis_cluster_restore.py tests/test_redis_subslot_ids.py

run: setup
	$(VENV)/bin/kv-indexer serve

# A simulated fleet (mock vLLM engines and their bridges) feeding the service `make run`
# started from this directory: it finds the service's NATS in .kv-indexer/endpoints.json.
sim: setup
	$(VENV)/bin/kv-sim fleet

demo: setup
	$(VENV)/bin/kv-sim demo

proto: $(STAMP)
	$(PY) -m indexer._protogen

# The sdist and a wheel built from it (what `pip install kv-indexer` from source does), in
# an isolated build environment; PyPI wheels: cibuildwheel ([tool.cibuildwheel]).
dist: $(STAMP)
	rm -rf dist
	$(PY) -m build --outdir dist .
	$(PY) -c "import sys, zipfile, glob; w = glob.glob('dist/*.whl'); \
	  sys.exit(0 if w and any('kvcore/_native' in n for n in zipfile.ZipFile(w[0]).namelist()) \
	  else 'the wheel has no kvcore._native (no C compiler?)')"

bench: bench-keys bench-memory bench-redis bench-redis-module bench-redis-restart bench-redis-cluster bench-shards bench-events bench-grpc bench-rebuild bench-dead-models bench-tls bench-replicas bench-nats-cluster

bench-keys: setup
	$(PY) -m bench.keys

bench-memory: setup
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m bench.memory_vs_dynamo

bench-redis: setup redis-server
	$(PY) -m bench.redis_backend

bench-redis-module: setup redis-server
	$(PY) -m bench.redis_backend --module --scale-loads 0

bench-redis-cluster: setup redis-server
	$(PY) -m bench.redis_cluster

bench-redis-subslots: setup redis-server
	$(PY) -m bench.redis_subslots

bench-redis-markers: setup redis-server
	$(PY) -m bench.redis_markers

bench-events: setup redis-server
	$(PY) -m bench.event_path

# Redis read replicas: Score through a replica vs the primary, declared staleness under load
bench-replicas: setup redis-server
	$(PY) -m bench.read_replicas
	$(PY) -m bench.read_replicas --subslots 4

# NATS: end-to-end ingest on one server vs a 3-node cluster with 3 replicas; a leader lost
bench-nats-cluster: setup redis-server
	$(PY) -m bench.nats_cluster

bench-grpc: setup redis-server libnghttp2-dev
	$(PY) -m bench.grpc_score

# FindBestWorker decisions/s from one server process, unary vs FindBestWorkerStream, 1,024
# ranks, 8k-token prompts, load from bench/grpcload.c (issue 18's gRPC target).
bench-decisions: setup libnghttp2-dev
	$(PY) -m bench.decisions

bench-redis-restart: setup redis-server
	$(PY) -m bench.redis_restart

bench-rebuild: setup redis-server
	$(PY) -m bench.rebuild

bench-dead-models: setup redis-server
	$(PY) -m bench.dead_models

# What TLS costs: gRPC Score plaintext vs TLS vs mTLS + token, Redis Score redis:// vs rediss://
bench-tls: setup redis-server
	$(PY) -m bench.tls

# What Diagnose's bookkeeping costs Score and ingest (an A/B in one process)
bench-diagnose: setup
	$(PY) -m bench.diagnose_cost

# One model larger than a shard: memory and Redis work per shard, 10,000 ranks x 100,000
# blocks over 1-24 shards (a simulation calibrated on a private redis-server; ~1-2 minutes)
bench-shards: setup redis-server
	$(PY) -m bench.shard_sim

# What the gRPC metrics interceptor costs per call (a micro-benchmark, seconds)
bench-grpc-metrics: setup
	$(PY) -m bench.grpc_metrics

clean:
	rm -f $(REDIS_MODULE)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
