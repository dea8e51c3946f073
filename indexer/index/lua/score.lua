-- Presence masks of a query's blocks, in order, up to the first block nobody holds (no
-- worker can match past it), after the slot map's version.
-- KEYS[1] the model's blk hash, KEYS[2] its slotver; ARGV[1] the block keys, 8 bytes each.
-- Returns {slotver or false, mask1, mask2, ...}.
local packed = ARGV[1]
local n = #packed / 8
local out = {redis.call('GET', KEYS[2])}
local CHUNK = 512
for first = 0, n - 1, CHUNK do
  local fields = {}
  local last = math.min(first + CHUNK, n) - 1
  for i = first, last do
    fields[#fields + 1] = string.sub(packed, i * 8 + 1, i * 8 + 8)
  end
  local values = redis.call('HMGET', KEYS[1], unpack(fields))
  for i = 1, #values do
    if not values[i] then
      return out
    end
    out[#out + 1] = values[i]
  end
end
return out
