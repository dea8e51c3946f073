-- Holder lists of a query's blocks (holders.lua), in order, up to the first block nobody
-- holds (no worker can match past it), after the slot map's version. Consecutive equal
-- values (the usual case along a shared prefix) come back as one run, so the reply stays
-- small. Read-only (replicas run it with EVALSHA_RO).
-- KEYS[1] the model's bucket state `bk`, KEYS[2] its slotver, KEYS[3] its groups hash
-- (the KV-cache groups of a hybrid model: their values are not looked up here), KEYS[4]
-- its `bx` hash; the bucket hashes are read undeclared. ARGV[1] the block keys, 8 bytes
-- each.
-- Returns {slotver or false, groups as {field, value, ...}, value1, count1, value2, ...},
-- or an error reply for a model in an older layout.
local p = string.match(KEYS[1], '^(.*:)')
local packed = ARGV[1]
local n = #packed / 8
local st = open_buckets(p)
local version = redis.call('GET', KEYS[2])
if old_layout(p, st.layout) then
  return redis.error_reply('KVI_LAYOUT ' .. p .. ' holds an older presence layout')
end
local out = {version, redis.call('HGETALL', KEYS[3])}
local run_value, run_count = nil, 0
-- 64 keys a chunk. A model in one bucket (load 0, or a first bucket): one HMGET of it,
-- then one of `bx` for the keys whose bucket entry is '' (a shared prefix at load > 0,
-- or data written at load 0 by earlier versions). In many buckets: one HMGET of `bx`
-- (where the shared prefix is), then one HGET per other key in its bucket.
local CHUNK = 64
local bx = p .. 'bx'
local one_bucket = st.n == 1 and st.split == 0 and bucket_of(st, string.rep('\0', 8))

-- The values of `fields` (false for a key nobody holds).
local function one_bucket_values(fields, count)
  local values = redis.call('HMGET', one_bucket, unpack(fields, 1, count))
  local elsewhere, at = {}, {}
  for i = 1, count do
    local value = values[i]
    if not value then
      break  -- the walk ends here
    end
    if value == '' then
      elsewhere[#elsewhere + 1] = fields[i]
      at[#at + 1] = i
    end
  end
  if #at > 0 then
    local shared = redis.call('HMGET', bx, unpack(elsewhere))
    for k = 1, #at do
      values[at[k]] = shared[k]
    end
  end
  return values
end

local function bucket_values(fields, count)
  local values = redis.call('HMGET', bx, unpack(fields, 1, count))
  for i = 1, count do
    if not values[i] then
      values[i] = redis.call('HGET', bucket_of(st, fields[i]), fields[i])
      if not values[i] then
        break  -- the walk ends here
      end
    end
  end
  return values
end

local values_of = one_bucket and one_bucket_values or bucket_values
local ended = false
for first = 0, n - 1, CHUNK do
  if ended then
    break
  end
  local count = math.min(CHUNK, n - first)
  local fields = {struct.unpack(string.rep('c8', count), packed, first * 8 + 1)}
  local values = values_of(fields, count)
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
end
if run_value then
  out[#out + 1] = run_value
  out[#out + 1] = run_count
end
return out
