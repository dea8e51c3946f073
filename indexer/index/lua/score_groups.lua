-- Presence masks of a hybrid model's query blocks in each KV-cache group asked for.
-- KEYS[1] model prefix, "kvi:{m:<model>}:"; ARGV[1] the block keys, 8 bytes each;
-- ARGV[2..] group numbers (0 is the `blk` hash, g > 0 `blk<g>`).
-- Returns one list per group, in order: each block's mask, or false when not held.
local p = KEYS[1]
local packed = ARGV[1]
local n = #packed / 8
local CHUNK = 256
local out = {}
for a = 2, #ARGV do
  local group = ARGV[a]
  local hash = p .. 'blk'
  if group ~= '0' then
    hash = hash .. group
  end
  local masks = {}
  for first = 0, n - 1, CHUNK do
    local count = math.min(CHUNK, n - first)
    local fields = {struct.unpack(string.rep('c8', count), packed, first * 8 + 1)}
    local values = redis.call('HMGET', hash, unpack(fields, 1, count))
    for i = 1, count do
      masks[#masks + 1] = values[i]
    end
  end
  out[#out + 1] = masks
end
return out
