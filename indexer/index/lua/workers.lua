-- Every worker rank of one model with its metadata, read in one call (read-only).
-- KEYS[1] the model's slots hash ("kvi:{m:<model>}:slots"). The ranks' meta hashes are
-- read undeclared (read-only; while the model's hash slot migrates, a rank whose meta
-- moved first reads as not written yet).
-- Returns {ranks, then per rank: "worker\nrank", slot, pos, ts, n0, n1, n2, n3, degraded}
-- where `ranks` counts the model's slot entries (0: the model has no rank left) and a
-- rank whose metadata is not written yet (allocated, no batch applied) has false fields.
local p = string.match(KEYS[1], '^(.*:)')  -- the model prefix
local slots = redis.call('HGETALL', p .. 'slots')
local out = {#slots / 2}
for i = 1, #slots, 2 do
  local meta = redis.call('HMGET', p .. 'w:' .. slots[i + 1] .. ':meta',
    'pos', 'ts', 'n0', 'n1', 'n2', 'n3', 'degraded')
  out[#out + 1] = slots[i]
  out[#out + 1] = slots[i + 1]
  for j = 1, 7 do
    out[#out + 1] = meta[j]
  end
end
return out
