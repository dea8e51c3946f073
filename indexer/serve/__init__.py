"""Serving: the gRPC servicer, its wire helpers, the live-worker directory, reader processes."""
