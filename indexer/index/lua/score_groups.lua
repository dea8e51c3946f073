-- Holder lists of a hybrid model's query blocks in each KV-cache group asked for.
-- Read-only (replicas run it with EVALSHA_RO).
-- KEYS: the store of each group asked for, in order: `bk` (the bucket state of group 0,
-- whose bucket hashes are read undeclared) or `blk<g>` for g > 0 (declared, as Redis
-- Cluster wants; all share the hash tag {m:<model>}); ARGV[1] the block keys, 8 bytes each.
-- Returns one list per group, in order: each block's value, or false when not held.
local packed = ARGV[1]
local n = #packed / 8
local CHUNK = 256
local out = {}
for a = 1, #KEYS do
  local hash = KEYS[a]
  local masks = {}
  if string.sub(hash, -3) == ':bk' then
    local st = open_buckets(string.match(hash, '^(.*:)'))
    for i = 0, n - 1 do
      masks[i + 1] = store_get(st, string.sub(packed, i * 8 + 1, i * 8 + 8))
    end
  else
    for first = 0, n - 1, CHUNK do
      local count = math.min(CHUNK, n - first)
      local fields = {struct.unpack(string.rep('c8', count), packed, first * 8 + 1)}
      local values = redis.call('HMGET', hash, unpack(fields, 1, count))
      for i = 1, count do
        masks[#masks + 1] = values[i]
      end
    end
  end
  out[#out + 1] = masks
end
return out
