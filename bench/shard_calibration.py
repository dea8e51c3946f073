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

# The presence writes of apply.lua, reduced to the field operation each block costs.
SET_NEW = """
for i = 1, #ARGV do redis.call('HSETNX', KEYS[1], ARGV[i], 'abc') end
return #ARGV
"""
DELETE = """
for i = 1, #ARGV do redis.call('HDEL', KEYS[1], ARGV[i]) end
return #ARGV
"""
# Today's set_bits on a block other ranks hold too: read the mask, splice one byte, write.
SET_BIT_IN_MASK = """
for i = 1, #ARGV do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  local at = math.floor(#v / 2)
  redis.call('HSET', KEYS[1], ARGV[i],
    string.sub(v, 1, at - 1) .. string.char(1) .. string.sub(v, at + 1))
end
return #ARGV
"""


@dataclass(frozen=True)
class Calibration:
    """Measured costs; CPU in microseconds of redis-server time."""

    field_bytes: dict[int, float]  # value length -> used_memory per field of a large HASH
    score_call_us: float  # one score.lua call that stops at its first key
    score_lookup_us: float  # each further key it looks up
    reply_byte_us: float  # each byte of mask it returns
    write_op_us: float  # HSETNX of a new field / HDEL (the mean of the two)
    wide_write_op_us: float  # a bit set inside a WIDE_MASK-byte mask
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
        """A presence write on a value of `mask_length` bytes (linear in the length)."""
        share = min(1.0, max(0.0, mask_length / WIDE_MASK))
        return self.write_op_us + share * (self.wide_write_op_us - self.write_op_us)


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
    return (Path(indexer.index.__file__).parent / "lua" / "score.lua").read_text()


async def add_filler(client: aioredis.Redis, rng: random.Random, key: str) -> None:
    await client.hset(key, mapping={f: b"\x01" for f in random_fields(rng, FILLER_FIELDS)})


async def score_costs(client: aioredis.Redis, pid: int,
                      rng: random.Random) -> tuple[float, float, float]:
    """score.lua's CPU: per call, per key looked up, per reply byte."""
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
                      rng: random.Random) -> tuple[float, float, float]:
    """Per presence write (new field or delete; a bit set in a wide mask) and per call."""
    await add_filler(client, rng, "calib:blk")
    batches = [random_fields(rng, 256) for _ in range(64)]
    set_us = await cpu_per_call(client, pid, SET_NEW, ["calib:blk"], batches)
    delete_us = await cpu_per_call(client, pid, DELETE, ["calib:blk"], batches)
    empty_us = await cpu_per_call(client, pid, SET_NEW, ["calib:blk"], [[b"x"]])
    wide = random_fields(rng, 256)
    await client.hset("calib:wide", mapping={f: rng.randbytes(WIDE_MASK) for f in wide})
    wide_us = await cpu_per_call(client, pid, SET_BIT_IN_MASK, ["calib:wide"], [wide])
    await client.flushall()
    call_us = empty_us
    per_op = ((set_us + delete_us) / 2 - call_us) / 256
    return per_op, (wide_us - call_us) / 256, call_us


async def calibrate(url: str, pid: int, seed: int) -> Calibration:
    rng = random.Random(seed)
    client = aioredis.Redis.from_url(url)
    try:
        await client.config_set("appendonly", "no")
        started = time.monotonic()
        sizes = {length: await bytes_per_field(client, rng, length) for length in VALUE_LENGTHS}
        call_us, lookup_us, reply_us = await score_costs(client, pid, rng)
        op_us, wide_op_us, apply_call_us = await write_costs(client, pid, rng)
        hmget_us, hmget_key_us = await hmget_costs(client, pid, rng)
        print(f"calibrated in {time.monotonic() - started:.1f} s")
    finally:
        await client.aclose()
    return Calibration(sizes, call_us, lookup_us, reply_us, op_us, wide_op_us, apply_call_us,
                       hmget_us, hmget_key_us)
