# kv-indexer image: `kv-indexer serve` by default; the same image runs `kv-publisher bridge`
# and `kv-sim engines` (override the entrypoint, see docker-compose.yml).
#
#   docker build -t kv-indexer:local .
#   docker run --rm -p 50051:50051 -p 9400:9400 kv-indexer:local          # embedded NATS
#   docker run --rm -e KV_INDEXER_NATS_URL=nats://nats:4222 \
#              -e KV_INDEXER_REDIS_URL=redis://redis:6379/0 kv-indexer:local
#
# The base image is pinned to a patch release; bump it (and the label below) deliberately.
FROM python:3.11.11-slim-bookworm

# org.opencontainers.image.version is kvcore.__version__ (tests/test_packaging.py checks it).
LABEL org.opencontainers.image.title="kv-indexer" \
      org.opencontainers.image.description="Global KV-cache block index for LLM routers: kv-indexer serve, kv-publisher bridge, kv-sim engines" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.11-slim-bookworm"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Only what `pip install .` needs (pyproject's readme is README.md, its license-files are
# LICENSE, NOTICE and native/xxhash/LICENSE; native/ holds the C hot loops); .dockerignore
# keeps the rest of the tree out of the build context.
COPY pyproject.toml README.md LICENSE NOTICE ./
COPY native ./native
COPY kvcore ./kvcore
COPY indexer ./indexer
COPY publisher ./publisher
COPY kvsim ./kvsim
# gcc only for the build: the C extension must be in the image (the check fails the build
# otherwise), the compiler need not. The server and publisher extras: kv-indexer serve,
# kv-publisher bridge and kv-sim engines all run from this image.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install '.[server,publisher]' \
    && python -c "import kvcore.keys as k; assert k.NATIVE, 'kvcore._native not built'" \
    && kv-indexer --version \
    && apt-get purge -y gcc libc6-dev && apt-get autoremove -y \
    && rm -rf /var/lib/apt/lists/* /src

# An unprivileged user; /data holds the embedded nats-server's JetStream files when no
# KV_INDEXER_NATS_URL is given.
RUN useradd --system --uid 10001 --home-dir /data --create-home kv
USER 10001
WORKDIR /data

# Listen on all interfaces inside the container (the defaults are 127.0.0.1).
ENV KV_INDEXER_GRPC_LISTEN=0.0.0.0:50051 \
    KV_INDEXER_METRICS_LISTEN=0.0.0.0:9400 \
    KV_INDEXER_DATA_DIR=/data/kv-indexer \
    KV_INDEXER_LOG_FORMAT=json

EXPOSE 50051 9400
# grpc.health.v1 on the port KV_INDEXER_GRPC_LISTEN names: SERVING only while answers are
# right (README, Operations: Health). Containers of this image that run kv-publisher or
# kv-sim disable it (docker-compose.yml).
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=6 \
    CMD kv-indexer health --target "127.0.0.1:${KV_INDEXER_GRPC_LISTEN##*:}" --timeout 3 || exit 1
ENTRYPOINT ["kv-indexer", "serve"]
