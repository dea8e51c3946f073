# kv-indexer image: `kv-indexer serve` by default; the same image runs `kv-publisher bridge`
# and `kv-sim engines` (override the entrypoint, see docker-compose.yml).
#
#   docker build -t kv-indexer:local .
#   docker run --rm -p 50051:50051 -p 9400:9400 kv-indexer:local          # embedded NATS
#   docker run --rm -e KV_INDEXER_NATS_URL=nats://nats:4222 \
#              -e KV_INDEXER_REDIS_URL=redis://redis:6379/0 kv-indexer:local
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Only what `pip install .` needs (pyproject's readme is README.md; native/ holds the C
# hot loops); .dockerignore keeps the rest of the tree out of the build context.
COPY pyproject.toml README.md ./
COPY native ./native
COPY indexer ./indexer
COPY publisher ./publisher
# gcc only for the build: the C extension must be in the image (the check fails the build
# otherwise), the compiler need not.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install . \
    && python -c "import kvcore.keys as k; assert k.NATIVE, 'kvcore._native not built'" \
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
ENTRYPOINT ["kv-indexer", "serve"]
