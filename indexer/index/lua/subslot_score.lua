-- A sub-slot's part of a Score (redis_sharded.py): the holder lists of its keys, in query
-- order, up to its first key nobody holds. Keys are read in chunks of 4, 8, 16, 32, 64, so
-- a sub-slot reads at most one chunk past that key. Read-only.
-- KEYS[1] the sub-slot's `blk` hash; ARGV[1] its keys, 8 bytes each.
-- Returns runs of equal values, flat: {value1, count1, value2, count2, ...}; the counts
-- sum to the number of leading keys held.
local packed = ARGV[1]
local n = #packed / 8
local out = {}
local run_value, run_count = nil, 0
local first, chunk = 0, 4
local ended = false
while first < n and not ended do
  local count = math.min(chunk, n - first)
  local fields = {struct.unpack(string.rep('c8', count), packed, first * 8 + 1)}
  local values = redis.call('HMGET', KEYS[1], unpack(fields, 1, count))
  for i = 1, count do
    local value = values[i]
    if not value then
      ended = true
      break
    end
    if value == run_value then
      run_count = run_count + 1
    else
      if run_value then
        out[#out + 1] = run_value
        out[#out + 1] = run_count
      end
      run_value, run_count = value, 1
    end
  end
  first = first + count
  chunk = math.min(chunk * 2, 64)
end
if run_value then
  out[#out + 1] = run_value
  out[#out + 1] = run_count
end
return out
