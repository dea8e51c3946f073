"""kv-publisher: bridges an inference engine's KV events onto NATS JetStream.

Kept light on purpose: `kvcore.bus` (the bus contract) is imported by the indexer.
"""
