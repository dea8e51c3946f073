-- Collect a retired slot id from one sub-slot (redis_sharded.py): remove its holder
-- entries, in every KV-cache group's hash, from the keys its ledger names here and from
-- the keys its last uncommitted part may have set (`p:<id>`), then its position.
-- Idempotent.
-- KEYS[1] the sub-slot's `pos`, KEYS[2] `p:<id>`, KEYS[3..] its presence hashes: `blk`
-- (group 0) and `blk<g>` of each group the model lists.
-- ARGV[1] the slot id, ARGV[2] keys, 8 bytes each.
-- Returns the number of keys looked at.
local id = tonumber(ARGV[1])
local packed = ARGV[2] .. (redis.call('GET', KEYS[2]) or '')
local keys, clears, sets = {}, {}, {}
local seen = {}
for pos = 1, #packed, 8 do
  local key = string.sub(packed, pos, pos + 7)
  if not seen[key] then
    seen[key] = true
    local n = #keys + 1
    keys[n], clears[n], sets[n] = key, 15, 0
  end
end
for h = 3, #KEYS do
  sub_apply(KEYS[h], id, keys, clears, sets)
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
return #keys
