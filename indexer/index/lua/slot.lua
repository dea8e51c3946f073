-- Find or allocate the slot (bit nibble) of a worker rank within a model.
-- KEYS: the model's slots, free, nextslot, slotver (declared for Redis Cluster); ARGV[1] worker id, ARGV[2] dp rank, ARGV[3] a random integer the
-- slot map version starts from when the model has none (a model collected and started
-- again must not repeat a version a reader may have cached with the old slot map).
-- Returns {slot, created (0|1)}. Freed slots are reused smallest first.
local p = string.match(KEYS[1], '^(.*:)')  -- the model prefix
local ref = ARGV[1] .. '\n' .. ARGV[2]
local s = redis.call('HGET', p .. 'slots', ref)
if s then
  return {s, 0}
end
local free = redis.call('ZPOPMIN', p .. 'free')
if free[1] then
  s = free[1]
else
  s = tostring(redis.call('INCR', p .. 'nextslot') - 1)
end
redis.call('HSET', p .. 'slots', ref, s)
redis.call('SET', p .. 'slotver', ARGV[3], 'NX')
redis.call('INCR', p .. 'slotver')
return {s, 1}
