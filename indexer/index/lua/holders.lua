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
-- ~80 B per block). In a model that splits (load > 0), a value longer than HOLDER_INLINE
-- (a block several ranks hold: a shared prefix) lives in the plain hash `bx` and the
-- bucket holds '' for it: Score reads those 64 per HMGET (a bucket costs one HGET per
-- key), and a bucket keeps its compact encoding (values <= 64 bytes). At load 0 every
-- value stays in the one bucket (`inline`); a '' there (written by earlier versions) still
-- means "in `bx`", and the next write of that key moves it back. Groups > 0 are plain
-- hashes.
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
  if #v == 4 then  -- one holder (most blocks): no search
    local s = math.floor(struct.unpack('<I4', v) / 16)
    if s < slot then
      return v .. struct.pack('<I4', slot * 16 + m)
    elseif s > slot then
      return struct.pack('<I4', slot * 16 + m) .. v
    end
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

-- A presence store: group 0's buckets (`p` the model prefix) or a plain hash. Writes go
-- through the store's cache, in event order: `now` holds a touched key's value (false:
-- no holder), `big` is true for a key whose stored value is in `bx`, and `dirty` lists
-- the keys changed since the last `flush` (repeats allowed: each write takes the value
-- in `now`). A script reads the keys it will touch with one HMGET per hash (`prefetch`)
-- and writes them back with a few HSET / HDEL of many fields: a redis.call costs more
-- than a block's Lua work, and in Lua each table operation counts, hence the plain loops.
-- This holds while the store is one hash (a plain hash, load 0, a model's first bucket);
-- in many buckets a cache would cost an HMGET and an HSET per bucket touched, so keys
-- are read and written one by one there (`cache_writes`).
local function new_cache(st)
  st.now, st.big, st.dirty, st.n_dirty = {}, {}, {}, 0
  return st
end

local function open_buckets(p)
  local st = redis.call('HMGET', p .. 'bk', 'level', 'split', 'count', 'layout', 'load')
  local level = tonumber(st[1]) or 0
  return new_cache({p = p, level = level, split = tonumber(st[2]) or 0, n = 2 ^ level,
    count = tonumber(st[3]) or 0, layout = st[4], load = tonumber(st[5]) or DEFAULT_LOAD,
    dirty_count = false, names = {}})
end

local function plain_store(hash)
  return new_cache({hash = hash})
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

-- Whether `value` is stored in its own hash, not in `bx`: in a plain hash, in a model
-- that never splits (load 0: its one bucket is a hashtable, where a long value costs no
-- more than in `bx` and Score finds it with the HMGET it does anyway), or when short.
local function inline(st, value)
  return st.hash ~= nil or st.load == 0 or #value <= HOLDER_INLINE
end

-- The one hash every key of the store is in (a plain hash, or a single bucket), or false.
local function only_hash(st)
  return st.hash or (st.n == 1 and st.split == 0 and bucket_name(st, 0))
end

-- The value of `key` (false when absent), the hash holding its bucket entry, and whether
-- the value is in `bx`: read from Redis, not the cache (Score's reads).
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

local BATCH = 1000  -- fields per HMGET / HSET / HDEL (Lua's unpack takes < 8000 values)

-- Run `command` on `hash` with `args` (a flat list), BATCH fields (`per` values each) a
-- call; the replies of a reading command, concatenated.
local function each_batch(command, hash, args, per)
  local step = BATCH * per
  if #args <= step then
    return redis.call(command, hash, unpack(args))
  end
  local out, n = {}, 0
  for i = 1, #args, step do
    local reply = redis.call(command, hash, unpack(args, i, math.min(i + step - 1, #args)))
    if type(reply) == 'table' then
      for k = 1, #reply do
        n = n + 1
        out[n] = reply[k]
      end
    end
  end
  return out
end

-- Append `a` (and `b`) to the list of `hash` in `by` (hash -> list).
local function push(by, hash, a, b)
  local list = by[hash]
  if not list then
    list = {}
    by[hash] = list
  end
  list[#list + 1] = a
  if b then list[#list + 1] = b end
end

-- Read `fields` of `hash` into the cache, bar the keys it holds already.
local function read_into(st, hash, fields)
  local now, values = st.now, each_batch('HMGET', hash, fields, 1)
  local inline, n = {}, 0
  for i = 1, #fields do
    local key, v = fields[i], values[i]
    if now[key] == nil then
      if v == '' and not st.hash then
        n = n + 1
        inline[n] = key
      else
        now[key] = v
      end
    end
  end
  if n > 0 then
    values = each_batch('HMGET', st.p .. 'bx', inline, 1)
    for i = 1, n do
      local key = inline[i]
      now[key], st.big[key] = values[i], true
    end
  end
end

-- Read into the cache the keys of `keys` it does not hold yet (a store in one hash).
local function prefetch(st, keys)
  local one, now = only_hash(st), st.now
  if not one or #keys == 0 then
    return
  end
  local fields, n = {}, 0
  for i = 1, #keys do
    if now[keys[i]] == nil then
      n = n + 1
      fields[n] = keys[i]
    end
  end
  if n > 0 then read_into(st, one, fields) end
end

-- The cached value of `key` (false when absent).
local function cached(st, key)
  local v = st.now[key]
  if v == nil then
    prefetch(st, {key})
    v = st.now[key]
  end
  return v
end

-- Write the keys changed since the last flush (HSETs before HDELs: a hash losing its
-- last fields while gaining others is never deleted and created again). A key set and
-- cleared again since is written as it is now (an HDEL of an absent field does nothing).
local function flush(st)
  local now, big, dirty = st.now, st.big, st.dirty
  local one, sets, dels = only_hash(st), {}, {}
  local one_sets, n_sets, one_dels, n_dels = {}, 0, {}, 0  -- those of `one`
  for i = 1, st.n_dirty do
    local key = dirty[i]
    local new, was_big = now[key], big[key]
    if not was_big and one then
      if not new then
        n_dels = n_dels + 1
        one_dels[n_dels] = key
      elseif inline(st, new) then
        one_sets[n_sets + 1], one_sets[n_sets + 2] = key, new
        n_sets = n_sets + 2
      else
        push(sets, st.p .. 'bx', key, new)
        one_sets[n_sets + 1], one_sets[n_sets + 2] = key, ''
        n_sets = n_sets + 2
        big[key] = true
      end
    else
      local where = one or bucket_of(st, key)
      local new_big = new and not inline(st, new)
      if not new then
        push(dels, where, key)
      elseif new_big then
        push(sets, st.p .. 'bx', key, new)
        if not was_big then push(sets, where, key, '') end
      else
        push(sets, where, key, new)
      end
      if was_big and not new_big then push(dels, st.p .. 'bx', key) end
      big[key] = new_big or nil
    end
  end
  st.dirty, st.n_dirty = {}, 0
  if n_sets > 0 then each_batch('HSET', one, one_sets, 2) end
  for hash, args in pairs(sets) do each_batch('HSET', hash, args, 2) end
  if n_dels > 0 then each_batch('HDEL', one, one_dels, 1) end
  for hash, args in pairs(dels) do each_batch('HDEL', hash, args, 1) end
end

-- Whether the store's writes go through its cache: while it is one hash. Once a model
-- is in many buckets the cache is written and emptied, and keys are written one by one.
local function cache_writes(st)
  if only_hash(st) then
    return true
  end
  if st.n_dirty > 0 then flush(st) end
  if next(st.now) then st.now, st.big = {}, {} end
  return false
end

-- Split the next bucket (linear hashing): its keys whose next address bit is set move to
-- bucket split + n. Called as the block count passes the load, so no bucket grows far
-- past 2 x its load in fields, even within one call. The split moves what is stored;
-- what the cache holds unwritten goes to the bucket its key has when it is written.
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
    each_batch('HSET', st.p .. 'b:' .. (st.split + n), moved, 2)
    each_batch('HDEL', from, names, 1)
  end
  st.split = st.split + 1
  if st.split == n then
    st.level = st.level + 1
    st.n = 2 * n
    st.split = 0
  end
end

-- Write the cache, then the bucket state if it changed.
local function close_buckets(st)
  flush(st)
  if st.dirty_count then
    redis.call('HSET', st.p .. 'bk', 'level', st.level, 'split', st.split, 'count', st.count)
  end
end

-- One more block in the buckets: split the next one if the load is passed.
local function count_new(st)
  st.count = st.count + 1
  st.dirty_count = true
  if st.load > 0 and st.count > st.load * (st.n + st.split) then
    split_bucket(st)
  end
end

-- Change `key` from `old` to `new` ('' when no holder is left) in the cache.
local function store_put(st, key, old, new)
  if new == '' then new = false end
  st.now[key] = new
  local n = st.n_dirty + 1
  st.n_dirty = n
  st.dirty[n] = key
  if st.hash then
    return
  end
  if not new then
    st.count = st.count - 1
    st.dirty_count = true
  elseif not old then
    count_new(st)
  end
end

-- Key by key (a model in many buckets): the value read and written at once.
local function direct_put(st, key, where, big, old, new)
  if new == '' then
    redis.call('HDEL', where, key)
    if big then redis.call('HDEL', st.p .. 'bx', key) end
    st.count = st.count - 1
    st.dirty_count = true
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

local function direct_set(st, key, slot, m)
  -- Most stored blocks are new to the index: one call when the field is absent.
  if redis.call('HSETNX', bucket_of(st, key), key,
      struct.pack('<I4', slot * 16 + m)) == 1 then
    count_new(st)
    return
  end
  local v, where, big = store_get(st, key)
  local nv = holders_set(v, slot, m)
  if nv then direct_put(st, key, where, big, v, nv) end
end

local function direct_clear(st, key, slot, m)
  local v, where, big = store_get(st, key)
  local nv = holders_clear(v, slot, m)
  if nv then direct_put(st, key, where, big, v, nv) end
end

local function set_holder(st, key, slot, m)
  if not cache_writes(st) then return direct_set(st, key, slot, m) end
  local v = cached(st, key)
  local nv = holders_set(v, slot, m)
  if nv then store_put(st, key, v, nv) end
end

local function clear_holder(st, key, slot, m)
  if not cache_writes(st) then return direct_clear(st, key, slot, m) end
  local v = cached(st, key)
  local nv = holders_clear(v, slot, m)
  if nv then store_put(st, key, v, nv) end
end

-- set_holder of each of `keys`, in order (in locals while the cache takes them).
local function set_holders(st, keys, slot, m)
  if not cache_writes(st) then
    for i = 1, #keys do direct_set(st, keys[i], slot, m) end
    return
  end
  local now, dirty, n, added = st.now, st.dirty, st.n_dirty, 0
  local splits = not st.hash and st.load > 0
  local fresh = struct.pack('<I4', slot * 16 + m)
  for i = 1, #keys do
    local key = keys[i]
    if splits and not only_hash(st) then
      -- the first split: the rest of the keys one by one
      st.n_dirty = n
      cache_writes(st)
      for k = i, #keys do direct_set(st, keys[k], slot, m) end
      return
    end
    local v = now[key]
    if v == nil then v = cached(st, key) end
    local nv = fresh
    if v then nv = holders_set(v, slot, m) end
    if nv then
      now[key] = nv
      n = n + 1
      dirty[n] = key
      if not v then
        if splits then count_new(st) else added = added + 1 end
      end
    end
  end
  st.n_dirty = n
  if not st.hash and added > 0 then
    st.count = st.count + added
    st.dirty_count = true
  end
end

local function clear_holders(st, keys, slot, m)
  for i = 1, #keys do clear_holder(st, keys[i], slot, m) end
end

-- Whether a model's keys are in another layout: it has ranks (or a slot map version)
-- but no layout 2 stamp. Such a model is refused, never read.
local function old_layout(p, layout)
  return layout ~= LAYOUT and (redis.call('EXISTS', p .. 'slots') == 1
    or redis.call('EXISTS', p .. 'blk') == 1)
end
