-- Forget a shared storage pool of a model: its holder entries, map and metadata, and
-- its slot id (indexer/index/pools.py).
-- KEYS[1] the model's slots (its prefix names the rest); ARGV[1] pool name.
-- Returns 0 when the model has no pool of that name, 1 when it was dropped, 2 when it was
-- dropped and the model has no slot left (the caller collects the model, gc.lua).
local p = string.match(KEYS[1], '^(.*:)')  -- the model prefix
local ref = ARGV[1] .. '\n-1'
local slot = tonumber(redis.call('HGET', p .. 'slots', ref))
if not slot then
  return 0
end
local buckets = open_buckets(p)
local keys = {}
for i, value in ipairs(redis.call('HVALS', p .. 'p:' .. slot .. ':map')) do
  keys[i] = string.sub(value, 1, 8)  -- then the store's ts
end
prefetch(buckets, keys)
clear_holders(buckets, keys, slot, 4)
close_buckets(buckets)
local map = p .. 'p:' .. slot .. ':map'
local wp = p .. 'w:' .. slot .. ':'
redis.call('UNLINK', map, p .. 'p:' .. slot .. ':gone', wp .. 'meta', wp .. 'log',
  wp .. 'pools')
redis.call('HDEL', p .. 'slots', ref)  -- its slot id is never given out again
redis.call('INCR', p .. 'slotver')
if redis.call('EXISTS', p .. 'slots') == 0 then
  return 2
end
return 1
