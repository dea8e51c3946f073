"""Generated from protos/ by `python -m indexer._protogen`; do not edit."""
