"""Default limits of the gRPC server, shared by `ServiceSettings` and the settings of
`kv-indexer serve` (`indexer.config`), which must not import grpc. docs/grpc.md, "Limits"."""

from __future__ import annotations

from typing import Final

__all__ = [
    "DEFAULT_CONNECTION_IDLE_S",
    "DEFAULT_MAX_BATCH_REQUESTS",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_REQUEST_LOADS",
    "DEFAULT_MAX_REQUEST_WORKERS",
    "DEFAULT_STREAM_WINDOW",
]

# Queries one ScoreBatch may carry.
DEFAULT_MAX_BATCH_REQUESTS: Final = 1024
# Entries of ScoreRequest.workers (each query: Score, FindBestWorker's score, ScoreBatch's).
DEFAULT_MAX_REQUEST_WORKERS: Final = 65_536
# Entries of FindBestWorkerRequest.loads.
DEFAULT_MAX_REQUEST_LOADS: Final = 65_536
# A connection with no call in progress for this long is closed by the server (GOAWAY; a
# client reconnects on its next call).
DEFAULT_CONNECTION_IDLE_S: Final = 300.0
# Connections one server process accepts on its address at once; more are closed at accept.
DEFAULT_MAX_CONNECTIONS: Final = 4096
# Messages of one FindBestWorkerStream in flight (being decided or waiting to be sent).
DEFAULT_STREAM_WINDOW: Final = 16
