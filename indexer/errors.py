"""Errors of the indexer package.

IndexerError
├── InvalidQueryError       a Score query the index refuses (empty model, no blocks, bad weights)
│   └── QueryTooLargeError  the query exceeds the configured size limit
├── BackendError            the storage backend failed (Redis unreachable, script error)
└── ConfigError             a setting is invalid; the message names it
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "ConfigError",
    "IndexerError",
    "InvalidQueryError",
    "QueryTooLargeError",
]


class IndexerError(Exception):
    """Root of every error the indexer raises on purpose."""


class InvalidQueryError(IndexerError):
    """A query the index cannot answer as asked."""


class QueryTooLargeError(InvalidQueryError):
    """The query is larger than the configured limit."""


class BackendError(IndexerError):
    """The storage backend failed; the index state is unchanged for the failed call."""


class ConfigError(IndexerError):
    """An invalid setting."""
