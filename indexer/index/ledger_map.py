"""A worker rank's engine hash -> (block key, held tiers) map, the bulk of a `WorkerLedger`.

`new_ledger_map()` gives the C map (`kvcore._native.LedgerMap`: 17 bytes a slot in packed
arrays, keyed slot mix) when the extension is built, else `DictLedgerMap`, two dicts with
the same methods. A hash whose tier mask is 0 is a ghost (evicted, remembered so a child
stored later resolves it). tests/test_ledger_map.py holds the two equal.
"""

from __future__ import annotations

import secrets
import struct
import sys
from collections.abc import Iterable, Sequence
from typing import Final, Protocol

from kvcore.keys import NATIVE

if NATIVE:
    from kvcore._native import LedgerMap

__all__ = ["DictLedgerMap", "EngineHashMap", "new_ledger_map"]

_LOG_HASH: Final = struct.Struct("<cQ")  # ledger.LOG_HASH
_LOG_RUN: Final = struct.Struct("<cBH")  # ledger.LOG_RUN
_LOG_RUN_ENTRY: Final = struct.Struct("<QQ")  # ledger.LOG_RUN_ENTRY
_RUN_MAX: Final = 0xFFFF


class EngineHashMap(Protocol):
    """What a `WorkerLedger` needs of its engine-hash map."""

    def __len__(self) -> int: ...

    def __contains__(self, engine_hash: object, /) -> bool: ...

    def get(self, engine_hash: int, default: int | None = None, /) -> int | None: ...

    def tiers_of(self, engine_hash: int, /) -> int: ...

    def put(self, engine_hash: int, key: int, tiers: int, /) -> None: ...

    def discard(self, engine_hash: int, /) -> bool: ...

    def add_new(self, hashes: Sequence[int], keys: Sequence[int], tiers: int, /) -> bool: ...

    def drop_tier(
        self, hashes: Sequence[int], tier_bit: int, /
    ) -> tuple[list[int], list[int], list[int], int]: ...

    def held_keys(self, tier_bit: int, /) -> list[int]: ...

    def items(self) -> list[tuple[int, int, int]]: ...

    def clear(self) -> None: ...

    def log_records(self) -> bytes: ...

    def pack_log(self, hashes: Iterable[int], /) -> bytes: ...

    def load_run(self, data: bytes | memoryview, pos: int, /) -> int: ...

    @property
    def nbytes(self) -> int: ...


def new_ledger_map() -> EngineHashMap:
    if NATIVE:
        return LedgerMap(secret=secrets.randbits(64))
    return DictLedgerMap()


class DictLedgerMap:
    """`EngineHashMap` on two dicts: the pure-Python fallback and the C map's reference."""

    __slots__ = ("keys", "tiers")

    def __init__(self) -> None:
        self.keys: dict[int, int] = {}  # engine hash -> key, held blocks and ghosts
        self.tiers: dict[int, int] = {}  # engine hash -> tier mask, held blocks only

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, engine_hash: object, /) -> bool:
        return engine_hash in self.keys

    def get(self, engine_hash: int, default: int | None = None, /) -> int | None:
        return self.keys.get(engine_hash, default)

    def tiers_of(self, engine_hash: int, /) -> int:
        return self.tiers.get(engine_hash, 0)

    def put(self, engine_hash: int, key: int, tiers: int, /) -> None:
        self.keys[engine_hash] = key
        if tiers:
            self.tiers[engine_hash] = tiers
        else:
            self.tiers.pop(engine_hash, None)

    def discard(self, engine_hash: int, /) -> bool:
        self.tiers.pop(engine_hash, None)
        return self.keys.pop(engine_hash, None) is not None

    def add_new(self, hashes: Sequence[int], keys: Sequence[int], tiers: int, /) -> bool:
        """Map each hash to its key, held in `tiers`, when none is known and none repeats;
        else change nothing and return False."""
        if len(hashes) != len(keys):
            raise ValueError("hashes and keys differ in length")
        distinct = set(hashes)
        if len(distinct) != len(hashes) or not self.keys.keys().isdisjoint(distinct):
            return False
        self.keys.update(zip(hashes, keys, strict=True))
        if tiers:
            self.tiers.update(dict.fromkeys(hashes, tiers))
        return True

    def drop_tier(
        self, hashes: Sequence[int], tier_bit: int, /
    ) -> tuple[list[int], list[int], list[int], int]:
        """Clear `tier_bit` of each hash holding it: (their keys, their hashes, the hashes
        now in no tier, how many hashes were unknown)."""
        keys, tiers = self.keys, self.tiers
        dropped: list[int] = []
        touched: list[int] = []
        ghosted: list[int] = []
        unknown = 0
        for h in hashes:
            mask = tiers.get(h, 0)
            if not mask & tier_bit:
                unknown += h not in keys
                continue
            mask ^= tier_bit
            if mask:
                tiers[h] = mask
            else:
                del tiers[h]
                ghosted.append(h)
            dropped.append(keys[h])
            touched.append(h)
        return dropped, touched, ghosted, unknown

    def held_keys(self, tier_bit: int, /) -> list[int]:
        keys = self.keys
        return [keys[h] for h, mask in self.tiers.items() if mask & tier_bit]

    def items(self) -> list[tuple[int, int, int]]:
        tiers = self.tiers
        return [(h, key, tiers.get(h, 0)) for h, key in self.keys.items()]

    def clear(self) -> None:
        self.keys.clear()
        self.tiers.clear()

    def log_records(self) -> bytes:
        """Every hash as N runs of the ledger log, one tier mask after another."""
        tiers = self.tiers
        return self.pack_log(sorted(self.keys, key=lambda h: tiers.get(h, 0)))

    def pack_log(self, hashes: Iterable[int], /) -> bytes:
        """N runs of the hashes mapped (consecutive ones of one tier mask), a D record
        for each other one."""
        keys, tiers = self.keys, self.tiers
        out = bytearray()
        count_at, run_tiers, run_count = -1, -1, 0  # the open run: where its count is
        for h in hashes:
            key = keys.get(h)
            if key is None:
                out += _LOG_HASH.pack(b"D", h)
                count_at = -1
                continue
            mask = tiers.get(h, 0)
            if count_at >= 0 and mask == run_tiers and run_count < _RUN_MAX:
                run_count += 1
                out[count_at : count_at + 2] = run_count.to_bytes(2, "little")
            else:
                out += _LOG_RUN.pack(b"N", mask, 1)
                count_at, run_tiers, run_count = len(out) - 2, mask, 1
            out += _LOG_RUN_ENTRY.pack(h, key)
        return bytes(out)

    def load_run(self, data: bytes | memoryview, pos: int, /) -> int:
        """Put the ledger log's N record at `pos` (ValueError if it does not parse); the
        position after it."""
        if pos < 0 or pos + _LOG_RUN.size > len(data):
            raise ValueError(f"truncated ledger log at byte {pos}")
        _, mask, count = _LOG_RUN.unpack_from(data, pos)
        if mask > 0xF:
            raise ValueError(f"tier mask {mask} out of range at byte {pos}")
        start = pos + _LOG_RUN.size
        end: int = start + count * _LOG_RUN_ENTRY.size
        if end > len(data):
            raise ValueError(f"truncated ledger log at byte {pos}")
        put = self.put
        for h, key in _LOG_RUN_ENTRY.iter_unpack(memoryview(data)[start:end]):
            put(h, key, mask)
        return end

    @property
    def nbytes(self) -> int:
        """The two dicts' own tables (not the int objects they point to)."""
        return sys.getsizeof(self.keys) + sys.getsizeof(self.tiers)
