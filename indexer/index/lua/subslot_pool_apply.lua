-- Apply a shared storage pool's pending presence changes in one sub-slot
-- (redis_sharded.py; the entries come from the pool's pending list for this sub-slot,
-- lua/subslot_pool.lua). Entries are numbered in the order the pool decided them; the
-- sub-slot keeps the last number it applied (`pos` field `q<id>`), so each entry applies
-- once and in order, whichever process sends it and however many send it at once.
-- KEYS[1] the sub-slot's `blk` hash (a pool's presence lives in KV-cache group 0),
--         KEYS[2] its `pos` hash
-- ARGV[1] the pool's slot id, ARGV[2 ..] entries: <d number> <d number of the list's
--         entry before it> <c1 'S'|'C'> keys (8 bytes each): the pool's storage bit set /
--         cleared on those keys
-- An entry above the last number applied here whose predecessor is not that number
-- means this sub-slot lost entries it had applied (its master failed over to a replica
-- that lacked them, after the home dropped them as applied): nothing more is applied
-- and 'gap' is returned (the caller re-slots the pool). Returns the last number applied
-- here, 'gap', or 'dead' (the pool is being collected or re-slotted: nothing is done).
local STORAGE = 4
local id = tonumber(ARGV[1])
local field = 'q' .. ARGV[1]
local cur = redis.call('HGET', KEYS[2], field)
if cur == 'x' then
  return 'dead'
end
cur = tonumber(cur or '0')
local applied = cur
for i = 2, #ARGV do
  local entry = ARGV[i]
  local number, prev = struct.unpack('<dd', entry)
  if number > applied and prev ~= applied then
    if applied > cur then
      redis.call('HSET', KEYS[2], field, string.format('%.17g', applied))
    end
    return 'gap'
  end
  if number > applied then
    local set = string.sub(entry, 17, 17) == 'S'
    local keys, clears, sets = {}, {}, {}
    for p = 18, #entry, 8 do
      local n = #keys + 1
      keys[n] = string.sub(entry, p, p + 7)
      clears[n] = set and 0 or STORAGE
      sets[n] = set and STORAGE or 0
    end
    sub_apply(KEYS[1], id, keys, clears, sets)
    applied = number
  end
end
if applied > cur then
  redis.call('HSET', KEYS[2], field, string.format('%.17g', applied))
end
return tostring(applied)
