"""Benchmarks: `make bench` and friends. Each prints its figures and writes its section
of docs/benchmarks.md (see kvsim.report)."""
