"""Ingest: durable JetStream consumers, partition leases, liveness and recovery."""
