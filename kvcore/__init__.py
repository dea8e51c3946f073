"""The contract both sides share: bus batches and limits (`kvcore.bus`), JetStream topology
(`kvcore.topology`), block keys (`kvcore.keys`, C twin `kvcore._native`), process set-up
(`kvcore.runtime`).

`__version__` is the one place the version is written: pyproject.toml reads it at build
time, and `kv-indexer`, `kv-publisher` and `kv-sim` print it (`--version`).
"""

__version__ = "0.1.0"
