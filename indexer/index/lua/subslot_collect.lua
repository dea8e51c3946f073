-- Collect a retired slot id from one sub-slot (redis_sharded.py): remove its holder
-- entries from the keys its ledger names here and from the keys its last uncommitted
-- part may have set (`p:<id>`), then its position. Idempotent.
-- KEYS[1] the sub-slot's `blk`, KEYS[2] its `pos`, KEYS[3] `p:<id>`.
-- ARGV[1] the slot id, ARGV[2] keys, 8 bytes each.
-- Returns the number of keys looked at.
local id = tonumber(ARGV[1])
local packed = ARGV[2] .. (redis.call('GET', KEYS[3]) or '')
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
sub_apply(KEYS[1], id, keys, clears, sets)
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
return #keys
