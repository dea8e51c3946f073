-- Apply the changes of bus batches to worker ranks: presence bits, each rank's ledger log
-- and metadata. A record holds what one or more consecutive batches of one rank changed;
-- it is applied only if the rank's stored position (epoch, seq) equals the one the
-- caller's ledger started from, so replayed or concurrent batches change nothing. The
-- first record that fails this check stops the call.
--
-- KEYS[1]  model prefix, "kvi:{m:<model>}:" (every key below shares its hash slot)
-- ARGV     one record per rank:
--   header  <H slot> <c16 expected position> <c16 new position> <d ts> <B flags>
--           <I4 x4 held blocks per tier> <I4 dp rank> <H worker id length>
--           <I4 presence ops length> <I4 ledger log length> <I4 block size>
--           positions are (epoch, seq) as big-endian signed 64-bit; flags: 1 the log
--           segment replaces the rank's log (reset or compaction), 2 degraded, 4 remove
--           the rank after applying; a block size > 0 is stored as the model's
--   then    worker id, presence ops, ledger log segment (opaque here; see redis.py)
--           presence op: <c1 'S'|'C'> <H bit position> <I4 count> count x key (8 bytes)
--           of KV-cache group 0 (the `blk` hash), or <c1 'T'|'K'> <B group> <H bit
--           position> <I4 count> keys: set / clear in group g's hash `blk<g>`
-- A record applies only while its rank still owns the record's slot in `slots`.
-- Returns one status per record applied ('ok' | 'removed' | 'emptied': removed, and the
-- model has no rank left), then 'conflict' if one failed.
local p = KEYS[1]
local blk = p .. 'blk'
local NOPOS = string.rep('\255', 16)
local HEADER = '<Hc16c16dBI4I4I4I4I4HI4I4I4'

local function set_bits(blk, ops, pos, count, byte_i, m)
  local fresh = string.rep('\0', byte_i - 1) .. string.char(m)
  for _ = 1, count do
    local key = string.sub(ops, pos, pos + 7)
    pos = pos + 8
    -- Most stored blocks are new to the index: one call when the field is absent.
    if redis.call('HSETNX', blk, key, fresh) == 0 then
      local v = redis.call('HGET', blk, key)
      local len = #v
      if byte_i > len then
        redis.call('HSET', blk, key, v .. string.rep('\0', byte_i - len - 1) .. string.char(m))
      else
        local b = string.byte(v, byte_i)
        if bit.band(b, m) == 0 then
          redis.call('HSET', blk, key,
            string.sub(v, 1, byte_i - 1) .. string.char(b + m) .. string.sub(v, byte_i + 1))
        end
      end
    end
  end
  return pos
end

local function clear_bits(blk, ops, pos, count, byte_i, m)
  for _ = 1, count do
    local key = string.sub(ops, pos, pos + 7)
    pos = pos + 8
    local v = redis.call('HGET', blk, key)
    if v and byte_i <= #v then
      local b = string.byte(v, byte_i)
      if bit.band(b, m) ~= 0 then
        local nv = string.sub(v, 1, byte_i - 1) .. string.char(b - m) .. string.sub(v, byte_i + 1)
        local e = #nv
        while e > 0 and string.byte(nv, e) == 0 do e = e - 1 end
        if e == 0 then
          redis.call('HDEL', blk, key)
        else
          redis.call('HSET', blk, key, string.sub(nv, 1, e))
        end
      end
    end
  end
  return pos
end

local function apply_presence(rec, pos, stop)
  while pos < stop do
    local kind, group, bitpos, count
    local hash = blk
    kind = string.sub(rec, pos, pos)
    if kind == 'S' or kind == 'C' then
      kind, bitpos, count, pos = struct.unpack('<c1HI4', rec, pos)
    else
      kind, group, bitpos, count, pos = struct.unpack('<c1BHI4', rec, pos)
      hash = blk .. group
    end
    local byte_i = math.floor(bitpos / 8) + 1
    local m = 2 ^ (bitpos % 8)
    if kind == 'S' or kind == 'T' then
      pos = set_bits(hash, rec, pos, count, byte_i, m)
    else
      pos = clear_bits(hash, rec, pos, count, byte_i, m)
    end
  end
end

local function apply_one(rec)
  local slot, expected, newpos, ts, flags, n0, n1, n2, n3, rank,
        wlen, olen, llen, block_size, pos = struct.unpack(HEADER, rec, 1)
  local wp = p .. 'w:' .. slot .. ':'
  local meta = wp .. 'meta'
  local worker = string.sub(rec, pos, pos + wlen - 1)
  pos = pos + wlen
  local ref = worker .. '\n' .. rank
  -- The rank must still own the slot: a writer whose rank was removed (and the slot
  -- freed, or the whole model collected) meanwhile must not write into it.
  if tonumber(redis.call('HGET', p .. 'slots', ref)) ~= slot
      or (redis.call('HGET', meta, 'pos') or NOPOS) ~= expected then
    return 'conflict'
  end
  apply_presence(rec, pos, pos + olen)
  pos = pos + olen
  if bit.band(flags, 4) ~= 0 then
    redis.call('DEL', meta, wp .. 'log')
    redis.call('HDEL', p .. 'slots', ref)
    redis.call('ZADD', p .. 'free', slot, slot)
    redis.call('INCR', p .. 'slotver')
    if redis.call('EXISTS', p .. 'slots') == 0 then
      return 'emptied'  -- the model's last rank: the caller collects the model (gc.lua)
    end
    return 'removed'
  end
  if bit.band(flags, 1) ~= 0 then
    redis.call('SET', wp .. 'log', string.sub(rec, pos, pos + llen - 1))
  elseif llen > 0 then
    redis.call('APPEND', wp .. 'log', string.sub(rec, pos, pos + llen - 1))
  end
  local degraded = '0'
  if bit.band(flags, 2) ~= 0 then degraded = '1' end
  redis.call('HSET', meta, 'pos', newpos, 'ts', string.format('%.17g', ts),
    'n0', n0, 'n1', n1, 'n2', n2, 'n3', n3, 'degraded', degraded,
    'worker', worker, 'rank', rank)
  if block_size > 0 then
    redis.call('SET', p .. 'block_size', block_size)
  end
  return 'ok'
end

local statuses = {}
for i = 1, #ARGV do
  local status = apply_one(ARGV[i])
  statuses[#statuses + 1] = status
  if status == 'conflict' then
    break
  end
end
return statuses
