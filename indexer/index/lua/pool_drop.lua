-- Forget a shared storage pool of a model: its presence bits, map and metadata, and free
-- its slot (indexer/index/pools.py).
-- KEYS[1] the model's slots (its prefix names the rest); ARGV[1] pool name.
-- Returns 0 when the model has no pool of that name, 1 when it was dropped, 2 when it was
-- dropped and the model has no slot left (the caller collects the model, gc.lua).
local p = string.match(KEYS[1], '^(.*:)')  -- the model prefix
local ref = ARGV[1] .. '\n-1'
local slot = tonumber(redis.call('HGET', p .. 'slots', ref))
if not slot then
  return 0
end
local blk = p .. 'blk'
local bitpos = slot * 4 + 2
local byte_i = math.floor(bitpos / 8) + 1
local m = 2 ^ (bitpos % 8)
local map = p .. 'p:' .. slot .. ':map'
for _, value in ipairs(redis.call('HVALS', map)) do
  local key = string.sub(value, 1, 8)  -- then the store's ts
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
local wp = p .. 'w:' .. slot .. ':'
redis.call('UNLINK', map, p .. 'p:' .. slot .. ':gone', wp .. 'meta', wp .. 'log',
  wp .. 'pools')
redis.call('HDEL', p .. 'slots', ref)
redis.call('ZADD', p .. 'free', slot, slot)
redis.call('INCR', p .. 'slotver')
if redis.call('EXISTS', p .. 'slots') == 0 then
  return 2
end
return 1
