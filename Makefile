# Two commands on a fresh machine: `make run` and `make test`. Both create what they need.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
PYTHON  ?= python3
PKGS    := kvcore publisher indexer kvsim
PROTO_OUT := indexer/_proto

.PHONY: chaos dist setup redis-server libnghttp2-dev test lint typecheck pytest run demo bench bench-keys bench-memory bench-redis bench-events bench-grpc bench-rebuild bench-dead-models bench-tls bench-grpc-metrics bench-shards proto clean

setup: $(STAMP) redis-server

$(STAMP): pyproject.toml $(wildcard native/*.c native/*.h)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

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

pytest: setup
	$(VENV)/bin/pytest -q -p no:cacheprovider

# The field-fault suite's long variants: a 60 s NATS outage under 16 workers (~160,000
# block entries), both backends; prints the figures docs/benchmarks.md quotes.
chaos: setup
	KV_CHAOS_OUTAGE_S=60 KV_CHAOS_WORKERS=16 $(VENV)/bin/pytest -q -s -p no:cacheprovider \
	  tests/test_field_faults.py tests/test_chaos.py tests/test_max_payload.py

test: setup lint pytest

run: setup
	$(VENV)/bin/kv-indexer serve

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

bench: bench-keys bench-memory bench-redis bench-events bench-grpc bench-rebuild bench-dead-models bench-tls

bench-keys: setup
	$(PY) -m bench.keys

bench-memory: setup
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m bench.memory_vs_dynamo

bench-redis: setup
	$(PY) -m bench.redis_backend

bench-events: setup
	$(PY) -m bench.event_path

bench-grpc: setup libnghttp2-dev
	$(PY) -m bench.grpc_score

bench-rebuild: setup
	$(PY) -m bench.rebuild

bench-dead-models: setup
	$(PY) -m bench.dead_models

# What TLS costs: gRPC Score plaintext vs TLS vs mTLS + token, Redis Score redis:// vs rediss://
bench-tls: setup
	$(PY) -m bench.tls

# One model larger than a shard: memory and Redis work per shard, 10,000 ranks x 100,000
# blocks over 1-24 shards (a simulation calibrated on a private redis-server; ~1-2 minutes)
bench-shards: setup
	$(PY) -m bench.shard_sim

# What the gRPC metrics interceptor costs per call (a micro-benchmark, seconds)
bench-grpc-metrics: setup
	$(PY) -m bench.grpc_metrics

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
