-- Delete what is left of a model that has no worker rank, or leave it be if it has one.
-- KEYS: the model's slots, nextslot, blk, slotver, free, block_size, groups, then the
-- meta and log of every slot below ARGV[1] (the caller's read of nextslot), then the
-- `blk<g>` hash of each KV-cache group in ARGV[2..] (the caller's read of the `groups`
-- hash's fields): every key the call may delete is declared, as Redis Cluster wants
-- (all share the hash tag {m:<model>}).
-- Returns the number of ranks the model has: 0 when it had none and its keys are gone,
-- -1 when nextslot grew past ARGV[1] or `groups` lists a group not in ARGV[2..]
-- (nothing done: the caller reads them again).
-- Every key of the model is named from its own structures (slots are numbered below
-- `nextslot`), so nothing is scanned; big values are freed off the main thread (UNLINK).
local p = string.match(KEYS[1], '^(.*:)')  -- the model prefix
local ranks = redis.call('HLEN', p .. 'slots')
if ranks > 0 then
  return ranks
end
local next_slot = tonumber(redis.call('GET', p .. 'nextslot') or '0')
local n_groups = #ARGV - 1
if next_slot > tonumber(ARGV[1]) or #KEYS ~= 7 + 2 * tonumber(ARGV[1]) + n_groups then
  return -1
end
local declared = {}
for a = 2, #ARGV do
  declared[ARGV[a]] = true
end
local groups = redis.call('HKEYS', p .. 'groups')
for _, group in ipairs(groups) do
  if not declared[group] then
    return -1
  end
end
for slot = 0, next_slot - 1 do
  local wp = p .. 'w:' .. slot .. ':'
  local pp = p .. 'p:' .. slot .. ':'
  redis.call('UNLINK', wp .. 'meta', wp .. 'log', wp .. 'pools', pp .. 'map', pp .. 'gone')
end
for _, group in ipairs(groups) do
  redis.call('UNLINK', p .. 'blk' .. group)
end
redis.call('UNLINK', p .. 'blk', p .. 'groups', p .. 'slots', p .. 'slotver', p .. 'free',
  p .. 'nextslot', p .. 'block_size', p .. 'pool_floor')
return 0
