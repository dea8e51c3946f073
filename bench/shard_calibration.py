"""What the shard simulation (`bench/shard_sim.py`) takes from a real redis-server: bytes of
used_memory per hash field by value length, and redis-server CPU per Score call, per key
looked up, per reply byte and per presence write.

CPU is redis-server's own (utime + stime from /proc), so it holds on a shared machine where
wall-clock latency would not; every point runs until the server has spent at least
`MIN_CPU_S` on it.
"""

from __future__ import annotations

import itertools
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio as aioredis

import indexer.index

VALUE_LENGTHS = (3, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 5120)
MIN_CPU_S = 0.6
IN_FLIGHT = 8  # calls per pipeline: Scores from several routers at once
WIDE_MASK = 2_500  # a mask byte length: one rank's bit at a random slot of 10,000
# Fields added to every measured HASH first: below hash-max-listpack-entries (512) a HASH
# is a listpack, scanned linearly per lookup, which a model's block hash never is.
FILLER_FIELDS = 4_096
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Presence writes, each key stored then evicted in the same call so that every call does
# real work however often it runs. Proposed: one rank's 5-byte holder entry.
STORE_EVICT_ENTRY = """
for i = 1, #ARGV do
  redis.call('HSETNX', KEYS[1], ARGV[i], 'abcd\\1')
  redis.call('HDEL', KEYS[1], ARGV[i])
end
return #ARGV
"""
# Proposed, a block other ranks hold too: splice one 4-byte entry into a holder list of
# ARGV[1] bytes, then splice it out (what a holder-list script does besides the lookup).
SPLICE_ENTRY = """
local at = math.floor(tonumber(ARGV[1]) / 8) * 4 + 2
for i = 2, #ARGV do
  local key = ARGV[i]
  local v = redis.call('HGET', KEYS[1], key)
  redis.call('HSET', KEYS[1], key, string.sub(v, 1, at - 1) .. 'wxyz' .. string.sub(v, at))
  v = redis.call('HGET', KEYS[1], key)
  redis.call('HSET', KEYS[1], key, string.sub(v, 1, at - 1) .. string.sub(v, at + 4))
end
return #ARGV
"""
LONG_LIST = 401  # a holder list of 100 ranks
# Today: apply.lua's code paths for a block one rank holds, its bit at byte ARGV[1] of the
# mask: set_bits' fresh field, then clear_bits (clear, trim trailing zero bytes, delete).
STORE_EVICT_MASK_BIT = """
local byte_i = tonumber(ARGV[1])
local fresh = string.rep('\\0', byte_i - 1) .. string.char(1)
for i = 2, #ARGV do
  local key = ARGV[i]
  redis.call('HSETNX', KEYS[1], key, fresh)
  local v = redis.call('HGET', KEYS[1], key)
  local b = string.byte(v, byte_i)
  local nv = string.sub(v, 1, byte_i - 1) .. string.char(b - 1) .. string.sub(v, byte_i + 1)
  local e = #nv
  while e > 0 and string.byte(nv, e) == 0 do e = e - 1 end
  if e == 0 then
    redis.call('HDEL', KEYS[1], key)
  else
    redis.call('HSET', KEYS[1], key, string.sub(nv, 1, e))
  end
end
return #ARGV
"""


@dataclass(frozen=True)
class Calibration:
    """Measured costs; CPU in microseconds of redis-server time."""

    field_bytes: dict[int, float]  # value length -> used_memory per field of a large HASH
    score_call_us: float  # one Score script call that stops at its first key
    score_lookup_us: float  # each further key it looks up
    reply_byte_us: float  # each byte of mask it returns
    write_op_us: float  # a holder entry stored or evicted (the mean of the two)
    wide_write_op_us: float  # today: a bit set or cleared in a WIDE_MASK-byte mask
    list_write_op_us: float  # proposed: an entry spliced into or out of a LONG_LIST list
    apply_call_us: float  # one script call carrying writes
    hmget_call_us: float  # a plain HMGET of one key
    hmget_key_us: float  # each further key of a plain HMGET

    def bytes_per_field(self, value_length: int) -> float:
        """Linear between the measured lengths; beyond the last, its per-byte slope."""
        lengths = sorted(self.field_bytes)
        if value_length <= lengths[0]:
            return self.field_bytes[lengths[0]]
        for low, high in itertools.pairwise(lengths):
            if value_length <= high:
                share = (value_length - low) / (high - low)
                low_bytes, high_bytes = self.field_bytes[low], self.field_bytes[high]
                return low_bytes + share * (high_bytes - low_bytes)
        last, before = lengths[-1], lengths[-2]
        slope = (self.field_bytes[last] - self.field_bytes[before]) / (last - before)
        return self.field_bytes[last] + slope * (value_length - last)

    def write_op_us_at(self, mask_length: float) -> float:
        """Today: a presence write on a mask of `mask_length` bytes (linear in the length)."""
        share = min(1.0, max(0.0, mask_length / WIDE_MASK))
        return self.write_op_us + share * (self.wide_write_op_us - self.write_op_us)

    def entry_write_us_at(self, list_length: float) -> float:
        """Proposed: a holder-entry write in a list of `list_length` bytes (linear)."""
        share = max(0.0, (list_length - 5) / (LONG_LIST - 5))
        return self.write_op_us + share * (self.list_write_op_us - self.write_op_us)


def server_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def random_fields(rng: random.Random, count: int) -> list[bytes]:
    return [rng.getrandbits(64).to_bytes(8, "little") for _ in range(count)]


async def used_memory(client: aioredis.Redis) -> int:
    info = await client.info("memory")
    return int(info["used_memory"])


async def bytes_per_field(client: aioredis.Redis, rng: random.Random, length: int) -> float:
    """used_memory growth per field of a HASH of 8-byte fields and `length`-byte values."""
    await client.flushall()
    count = 20_000 if length <= 512 else 4_000
    before = await used_memory(client)
    for first in range(0, count, 500):
        mapping = {f: rng.randbytes(length) for f in random_fields(rng, min(500, count - first))}
        await client.hset("calib:blk", mapping=mapping)  # type: ignore[arg-type]
    grown = await used_memory(client) - before
    await client.flushall()
    return grown / count


async def cpu_per_call(client: aioredis.Redis, pid: int, script: str, keys: list[str],
                       per_call: list[list[bytes]]) -> float:
    """redis-server CPU (us) per EVALSHA of `script`, IN_FLIGHT calls per pipeline; the
    calls take their arguments from `per_call` in turn."""
    sha = await client.script_load(script)
    calls, spent, start = 0, 0.0, server_cpu_s(pid)
    while spent < MIN_CPU_S:
        pipe = client.pipeline(transaction=False)
        for i in range(IN_FLIGHT):
            pipe.evalsha(sha, len(keys), *keys, *per_call[(calls + i) % len(per_call)])
        await pipe.execute()
        calls += IN_FLIGHT
        spent = server_cpu_s(pid) - start
    return spent / calls * 1e6


async def cpu_per_command(client: aioredis.Redis, pid: int, *command: str | bytes) -> float:
    """redis-server CPU (us) per plain command, IN_FLIGHT per pipeline."""
    calls, spent, start = 0, 0.0, server_cpu_s(pid)
    while spent < MIN_CPU_S:
        pipe = client.pipeline(transaction=False)
        for _ in range(IN_FLIGHT):
            pipe.execute_command(*command)
        await pipe.execute()
        calls += IN_FLIGHT
        spent = server_cpu_s(pid) - start
    return spent / calls * 1e6


async def hmget_costs(client: aioredis.Redis, pid: int,
                      rng: random.Random) -> tuple[float, float]:
    """A plain HMGET (no script, no early stop): per call and per key."""
    await add_filler(client, rng, "calib:blk")
    held = random_fields(rng, 64)
    await client.hset("calib:blk", mapping={f: b"\x01" for f in held})
    one_us = await cpu_per_command(client, pid, "HMGET", "calib:blk", held[0])
    many_us = await cpu_per_command(client, pid, "HMGET", "calib:blk", *held)
    await client.flushall()
    return one_us, (many_us - one_us) / 63


def score_script() -> str:
    """The sub-slot layout's Score read (one plain presence hash, no bucket state: the
    one-slot score.lua needs its model's keys and holders.lua)."""
    return (Path(indexer.index.__file__).parent / "lua" / "subslot_score.lua").read_text()


async def add_filler(client: aioredis.Redis, rng: random.Random, key: str) -> None:
    await client.hset(key, mapping={f: b"\x01" for f in random_fields(rng, FILLER_FIELDS)})


async def score_costs(client: aioredis.Redis, pid: int,
                      rng: random.Random) -> tuple[float, float, float]:
    """The Score script's CPU: per call, per key looked up, per reply byte."""
    script, keys = score_script(), ["calib:blk", "calib:slotver"]
    await add_filler(client, rng, "calib:blk")
    held = random_fields(rng, 512)
    await client.hset("calib:blk", mapping={f: b"\x01" for f in held})
    missing = random_fields(rng, 1)
    call_us = await cpu_per_call(client, pid, script, keys, [[missing[0]]])
    full_us = await cpu_per_call(client, pid, script, keys, [[b"".join(held)]])
    lookup_us = max(0.0, (full_us - call_us) / 512)
    wide = random_fields(rng, 64)  # every mask distinct: 64 runs of 4,096 bytes
    await client.hset("calib:blk", mapping={f: rng.randbytes(4096) for f in wide})
    wide_us = await cpu_per_call(client, pid, script, keys, [[b"".join(wide)]])
    reply_us = max(0.0, (wide_us - call_us - 64 * lookup_us) / (64 * 4096))
    await client.flushall()
    return call_us, lookup_us, reply_us


async def write_costs(client: aioredis.Redis, pid: int,
                      rng: random.Random) -> tuple[float, float, float, float]:
    """Per presence write (a holder entry; a bit in a wide mask; an entry in a long list)
    and per script call."""
    await add_filler(client, rng, "calib:blk")
    keys = random_fields(rng, 256)
    entry_us = await cpu_per_call(client, pid, STORE_EVICT_ENTRY, ["calib:blk"], [keys])
    call_us = await cpu_per_call(client, pid, STORE_EVICT_ENTRY, ["calib:blk"], [[]])
    byte_i = str(WIDE_MASK).encode()
    mask_us = await cpu_per_call(client, pid, STORE_EVICT_MASK_BIT, ["calib:blk"],
                                 [[byte_i, *keys]])
    await client.hset("calib:blk", mapping={k: rng.randbytes(LONG_LIST) for k in keys})
    list_us = await cpu_per_call(client, pid, SPLICE_ENTRY, ["calib:blk"],
                                 [[str(LONG_LIST).encode(), *keys]])
    await client.flushall()
    # two writes (a store and an evict) per key
    return ((entry_us - call_us) / 512, (mask_us - call_us) / 512,
            (list_us - call_us) / 512, call_us)


async def calibrate(url: str, pid: int, seed: int) -> Calibration:
    rng = random.Random(seed)
    client = aioredis.Redis.from_url(url)
    try:
        await client.config_set("appendonly", "no")
        started = time.monotonic()
        sizes = {length: await bytes_per_field(client, rng, length) for length in VALUE_LENGTHS}
        call_us, lookup_us, reply_us = await score_costs(client, pid, rng)
        op_us, wide_op_us, list_op_us, apply_call_us = await write_costs(client, pid, rng)
        hmget_us, hmget_key_us = await hmget_costs(client, pid, rng)
        print(f"calibrated in {time.monotonic() - started:.1f} s")
    finally:
        await client.aclose()
    return Calibration(sizes, call_us, lookup_us, reply_us, op_us, wide_op_us, list_op_us,
                       apply_call_us, hmget_us, hmget_key_us)
