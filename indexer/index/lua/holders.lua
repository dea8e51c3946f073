-- Presence values and where they live (layout 2; prepended to the scripts that read or
-- write presence, see redis.py `_lua_with_holders`).
--
-- A block's value is the sorted list of its holders: u32 little-endian entries
-- `slot_id * 16 + tier bits`, one per holding rank (slot ids are never reused, so an
-- entry can only mean the rank that wrote it). No holder: no field.
--
-- KV-cache group 0 is spread over small hashes `b:<n>` (listpack-encoded by Redis while
-- they hold <= 128 fields of <= 64-byte values: a few bytes of overhead per field, where
-- one big hash costs ~80 B per field). The bucket of a key is its low 32 bits modulo the
-- bucket count, grown by linear hashing: state in `bk` (level, split, count of blocks);
-- n = 2^level buckets plus `split` more, bucket b < split addressed modulo 2n. The load
-- (blocks per bucket, `--redis-bucket-load`) is the model's, set when it is created: 0
-- keeps one bucket, a hashtable-encoded hash that Score reads 64 keys per HMGET (faster,
-- ~80 B per block). A value longer than HOLDER_INLINE (a block several ranks hold: a
-- shared prefix) lives in the plain hash `bx` and the bucket holds '' for it: Score
-- reads those 64 per HMGET (a bucket costs one HGET per key), and a bucket keeps its
-- compact encoding (values <= 64 bytes). Groups > 0 are plain hashes.
local LAYOUT = '2'
local HOLDER_INLINE = 8  -- 2 holders: a block 3 or more ranks hold is in `bx`
local DEFAULT_LOAD = 40  -- blocks per bucket: unsplit buckets stay below 128 fields

local function holder_find(v, slot)
  -- The 0-based index of `slot`'s entry and the entry, or the insertion index and nil.
  local lo, hi = 0, #v / 4
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    local e = struct.unpack('<I4', v, mid * 4 + 1)
    local s = math.floor(e / 16)
    if s < slot then
      lo = mid + 1
    elseif s > slot then
      hi = mid
    else
      return mid, e
    end
  end
  return lo, nil
end

-- The value with tier bit `m` of `slot` set, or nil when it was set already.
local function holders_set(v, slot, m)
  if not v then
    return struct.pack('<I4', slot * 16 + m)
  end
  local i, e = holder_find(v, slot)
  if e then
    if math.floor(e / m) % 2 == 1 then
      return nil
    end
    return string.sub(v, 1, i * 4) .. struct.pack('<I4', e + m) .. string.sub(v, i * 4 + 5)
  end
  return string.sub(v, 1, i * 4) .. struct.pack('<I4', slot * 16 + m) .. string.sub(v, i * 4 + 1)
end

-- The value with tier bit `m` of `slot` cleared ('' when no holder is left), or nil when
-- it was not set.
local function holders_clear(v, slot, m)
  if not v then
    return nil
  end
  local i, e = holder_find(v, slot)
  if not e or math.floor(e / m) % 2 == 0 then
    return nil
  end
  if e - m == slot * 16 then
    return string.sub(v, 1, i * 4) .. string.sub(v, i * 4 + 5)
  end
  return string.sub(v, 1, i * 4) .. struct.pack('<I4', e - m) .. string.sub(v, i * 4 + 5)
end

-- A presence store: group 0's buckets (`p` the model prefix) or a plain hash.
local function open_buckets(p)
  local st = redis.call('HMGET', p .. 'bk', 'level', 'split', 'count', 'layout', 'load')
  local level = tonumber(st[1]) or 0
  return {p = p, level = level, split = tonumber(st[2]) or 0, n = 2 ^ level,
    count = tonumber(st[3]) or 0, layout = st[4], load = tonumber(st[5]) or DEFAULT_LOAD,
    dirty = false, names = {}}
end

local function plain_store(hash)
  return {hash = hash}
end

local function bucket_name(st, b)
  local name = st.names[b]
  if not name then
    name = st.p .. 'b:' .. b
    st.names[b] = name
  end
  return name
end

local function bucket_of(st, key)
  local h = struct.unpack('<I4', key)
  local b = h % st.n
  if b < st.split then
    b = h % (2 * st.n)
  end
  return bucket_name(st, b)
end

-- The value of `key` (false when absent), the hash holding its bucket entry, and whether
-- the value is in `bx`.
local function store_get(st, key)
  if st.hash then
    return redis.call('HGET', st.hash, key), st.hash, false
  end
  local b = bucket_of(st, key)
  local v = redis.call('HGET', b, key)
  if v == '' then
    return redis.call('HGET', st.p .. 'bx', key), b, true
  end
  return v, b, false
end

-- Split the next bucket (linear hashing): its keys whose next address bit is set move to
-- bucket split + n. Called as the block count passes the load, so no bucket grows far
-- past 2 x its load in fields, even within one call.
local function split_bucket(st)
  local n = 2 ^ st.level
  local from = st.p .. 'b:' .. st.split
  local moved, names = {}, {}
  local all = redis.call('HGETALL', from)
  for i = 1, #all, 2 do
    if struct.unpack('<I4', all[i]) % (2 * n) ~= st.split then
      moved[#moved + 1] = all[i]
      moved[#moved + 1] = all[i + 1]
      names[#names + 1] = all[i]
    end
  end
  if #names > 0 then
    redis.call('HSET', st.p .. 'b:' .. (st.split + n), unpack(moved))
    redis.call('HDEL', from, unpack(names))
  end
  st.split = st.split + 1
  if st.split == n then
    st.level = st.level + 1
    st.n = 2 * n
    st.split = 0
  end
end

-- Store the bucket state if it changed.
local function close_buckets(st)
  if st.dirty then
    redis.call('HSET', st.p .. 'bk', 'level', st.level, 'split', st.split, 'count', st.count)
  end
end

-- One more block in the buckets: split the next one if the load is passed.
local function count_new(st)
  st.count = st.count + 1
  st.dirty = true
  if st.load > 0 and st.count > st.load * (st.n + st.split) then
    split_bucket(st)
  end
end

local function store_put(st, key, where, big, old, new)
  if st.hash then
    if new == '' then
      redis.call('HDEL', where, key)
    else
      redis.call('HSET', where, key, new)
    end
    return
  end
  if new == '' then
    redis.call('HDEL', where, key)
    if big then redis.call('HDEL', st.p .. 'bx', key) end
    st.count = st.count - 1
    st.dirty = true
    return
  end
  if #new <= HOLDER_INLINE then
    redis.call('HSET', where, key, new)
    if big then redis.call('HDEL', st.p .. 'bx', key) end
  else
    redis.call('HSET', st.p .. 'bx', key, new)
    if not big then redis.call('HSET', where, key, '') end
  end
  if not old then
    count_new(st)
  end
end

local function set_holder(st, key, slot, m)
  -- Most stored blocks are new to the index: one call when the field is absent.
  if not st.hash and redis.call('HSETNX', bucket_of(st, key), key,
      struct.pack('<I4', slot * 16 + m)) == 1 then
    count_new(st)
    return
  end
  local v, where, big = store_get(st, key)
  local nv = holders_set(v, slot, m)
  if nv then store_put(st, key, where, big, v, nv) end
end

local function clear_holder(st, key, slot, m)
  local v, where, big = store_get(st, key)
  local nv = holders_clear(v, slot, m)
  if nv then store_put(st, key, where, big, v, nv) end
end

-- Whether a model's keys are in another layout: it has ranks (or a slot map version)
-- but no layout 2 stamp. Such a model is refused, never read.
local function old_layout(p, layout)
  return layout ~= LAYOUT and (redis.call('EXISTS', p .. 'slots') == 1
    or redis.call('EXISTS', p .. 'blk') == 1)
end
