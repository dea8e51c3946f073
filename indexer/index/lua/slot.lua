-- Find or allocate the slot id of a worker rank (or a shared storage pool) in a model.
-- KEYS: the model's slots, nextslot, slotver, bk (declared for Redis Cluster);
-- ARGV[1] worker id, ARGV[2] dp rank, ARGV[3] a random integer the slot map version
-- starts from when the model has none (a model collected and started again must not
-- repeat a version a reader may have cached with the old slot map), ARGV[4] the bucket
-- load of a model created here (holders.lua).
-- Returns {slot id, created (0|1)}. Slot ids come from `nextslot` and are never given
-- out again (holders.lua): a holder entry always means the rank that wrote it. A model
-- whose keys are in an older layout is refused (an error reply), never written.
local p = string.match(KEYS[1], '^(.*:)')  -- the model prefix
local MAX_SLOT_ID = 268435455  -- 28 bits: the holder entry's slot id field
local layout = redis.call('HGET', p .. 'bk', 'layout')
if old_layout(p, layout) then
  return redis.error_reply('KVI_LAYOUT ' .. p .. ' holds an older presence layout')
end
local ref = ARGV[1] .. '\n' .. ARGV[2]
local s = redis.call('HGET', p .. 'slots', ref)
if s then
  return {s, 0}
end
local next_id = redis.call('INCR', p .. 'nextslot')
if next_id - 1 > MAX_SLOT_ID then
  return redis.error_reply('model ' .. p .. ' used every slot id (2^28)')
end
s = tostring(next_id - 1)
redis.call('HSET', p .. 'slots', ref, s)
redis.call('SET', p .. 'slotver', ARGV[3], 'NX')
redis.call('INCR', p .. 'slotver')
if layout ~= LAYOUT then
  redis.call('HSET', p .. 'bk', 'layout', LAYOUT, 'load', ARGV[4])
end
return {s, 1}
