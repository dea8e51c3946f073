-- Delete what is left of a model that has no worker rank, or leave it be if it has one.
-- KEYS: the model's slots, nextslot, bk, bx, slotver, block_size, groups, pool_floor,
-- blk, free, then (a model in the older layout only, without the layout stamp in `bk`)
-- the meta and log of every slot below ARGV[1] (the caller's read of nextslot), then the
-- `blk<g>` hash of each KV-cache group in ARGV[2..] (the caller's read of the `groups`
-- hash's fields): every key the call may delete is declared, as Redis Cluster wants (all
-- share the hash tag {m:<model>}), bucket hashes `b:<n>` aside (holders.lua).
-- Returns the number of ranks the model has: 0 when it had none and its keys are gone,
-- -1 when the declared keys do not cover what is there (nextslot grew past ARGV[1],
-- `groups` lists a group not in ARGV[2..]): nothing done, the caller reads them again.
-- Layout 2 deletes a rank's keys when the rank is removed, and every presence entry with
-- them, so its buckets are empty here; should its block count say otherwise, every
-- bucket is deleted too, before slot ids may start again from 0.
-- Nothing is scanned; big values are freed off the main thread (UNLINK).
local p = string.match(KEYS[1], '^(.*:)')  -- the model prefix
local ranks = redis.call('HLEN', p .. 'slots')
if ranks > 0 then
  return ranks
end
local buckets = open_buckets(p)
local next_slot = tonumber(redis.call('GET', p .. 'nextslot') or '0')
local per_slot = next_slot
if buckets.layout == LAYOUT then
  per_slot = 0
end
local n_groups = #ARGV - 1
if per_slot > tonumber(ARGV[1]) or #KEYS ~= 10 + 2 * tonumber(ARGV[1]) + n_groups then
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
for slot = 0, per_slot - 1 do
  local wp = p .. 'w:' .. slot .. ':'
  local pp = p .. 'p:' .. slot .. ':'
  redis.call('UNLINK', wp .. 'meta', wp .. 'log', wp .. 'pools', pp .. 'map', pp .. 'gone')
end
if buckets.count ~= 0 then
  for b = 0, 2 ^ buckets.level + buckets.split - 1 do
    redis.call('UNLINK', p .. 'b:' .. b)
  end
end
for _, group in ipairs(groups) do
  redis.call('UNLINK', p .. 'blk' .. group)
end
redis.call('UNLINK', p .. 'bk', p .. 'bx', p .. 'groups', p .. 'slots', p .. 'slotver',
  p .. 'nextslot', p .. 'block_size', p .. 'pool_floor', p .. 'blk', p .. 'free')
return 0
