-- Presence masks of a query's blocks, in order, up to the first block nobody holds (no
-- worker can match past it), after the slot map's version. Consecutive equal masks (the
-- usual case along a shared prefix) come back as one run, so the reply stays small.
-- KEYS[1] the model's blk hash, KEYS[2] its slotver; ARGV[1] the block keys, 8 bytes each.
-- Returns {slotver or false, mask1, count1, mask2, count2, ...}.
local packed = ARGV[1]
local n = #packed / 8
local out = {redis.call('GET', KEYS[2])}
-- Small chunks: a query stops paying for lookups soon after its first unheld block.
local CHUNK = 64
local run_mask, run_count = nil, 0
local sub = string.sub
local ended = false
for first = 0, n - 1, CHUNK do
  if ended then
    break
  end
  local fields = {}
  local last = math.min(first + CHUNK, n) - 1
  for i = first, last do
    fields[i - first + 1] = sub(packed, i * 8 + 1, i * 8 + 8)
  end
  local values = redis.call('HMGET', KEYS[1], unpack(fields))
  for i = 1, #values do
    local mask = values[i]
    if not mask then  -- HMGET gives false for a missing field
      ended = true
      break
    end
    if mask == run_mask then
      run_count = run_count + 1
    else
      if run_mask then
        out[#out + 1] = run_mask
        out[#out + 1] = run_count
      end
      run_mask, run_count = mask, 1
    end
  end
end
if run_mask then
  out[#out + 1] = run_mask
  out[#out + 1] = run_count
end
return out
