-- Delete what is left of a model that has no worker rank, or leave it be if it has one.
-- KEYS[1] model prefix, "kvi:{m:<model>}:" (every key below shares its hash slot).
-- Returns the number of ranks the model has: 0 when it had none and its keys are gone.
-- Every key of the model is named from its own structures (slots are numbered below
-- `nextslot`), so nothing is scanned; big values are freed off the main thread (UNLINK).
local p = KEYS[1]
local ranks = redis.call('HLEN', p .. 'slots')
if ranks > 0 then
  return ranks
end
local next_slot = tonumber(redis.call('GET', p .. 'nextslot') or '0')
for slot = 0, next_slot - 1 do
  local wp = p .. 'w:' .. slot .. ':'
  redis.call('UNLINK', wp .. 'meta', wp .. 'log')
end
for _, group in ipairs(redis.call('HKEYS', p .. 'groups')) do
  redis.call('UNLINK', p .. 'blk' .. group)
end
redis.call('UNLINK', p .. 'blk', p .. 'groups', p .. 'slots', p .. 'slotver', p .. 'free', p .. 'nextslot',
  p .. 'block_size')
return 0
