-- A shared storage pool of a sub-slot model (redis_sharded.py), in the pool's home
-- sub-slot: every writer's pool ops are decided here, one script call at a time, so the
-- pool's writes are serialized through this one key set whatever process sends them.
-- The rule is PoolState's (indexer/index/pools.py, and apply.lua's pool ops): newest
-- write wins per engine hash, tombstones, a floor. What an op changes in the pool's
-- presence is not written to the sub-slots here (another slot): it is appended, in
-- decision order, to the pool's pending list of each sub-slot the key lives in, as
-- entries numbered by the pool's own op counter `seq`, each naming the number of the
-- list's entry before it; lua/subslot_pool_apply.lua applies a sub-slot's entries there
-- in that order, each once (the sub-slot keeps the last number it applied), and whoever
-- sends a pool op drains every pending list it reads.
-- KEYS[1] `q:<id>:map` (engine hash -> key .. store ts), KEYS[2] `q:<id>:gone`
--         (hash -> removal ts), KEYS[3] `q:<id>:st` (floor, gone_max, epoch, seq, ts, and
--         `l<k>`: the number of sub-slot k's last entry),
--         KEYS[4] `q:<id>:w` (writer slot id -> its last op position),
--         KEYS[5] `w:<id>:meta` (the pool's listing, as a rank's), KEYS[6] the home
--         sub-slot's `pos` (field `q<id>` = 'x' once the pool is being collected),
--         KEYS[7 ..] `q:<id>:l:<k>`: sub-slot k's pending list, k = 0 .. S - 1
-- ARGV[1] pool id, ARGV[2] pool name, ARGV[3] the model's pool floor (snapshot
--         imports), ARGV[4] 'trim' then one applied number per sub-slot: drop the
--         entries each sub-slot has applied (returns 1), or 'diverged' when a number is
--         past the op counter (this home lost ops a sub-slot applied); or 'mark' (on a
--         re-slot's old id) then the new id ('' only asks), and '1' to mark an id
--         already dead: the old id's re-slot, set once with the `x` mark in this home
--         -> {new id}, or 'none' / 'gone' (not re-slotted; dead) when only asked or
--         refused; or 'build' (a re-slot's new id, below); or 'ops', the
--         highest number any sub-slot has applied (read by the
--         caller just before: one above the op counter means this home lost ops the
--         sub-slots applied, and 'diverged' is returned, nothing decided), then ops:
--   <c1 'P'|'R'|'W'> <I4 writer slot id> <c24 writer position> <d ts> <I4 count>, then
--   count x (hash, key) for P, count x hash for R (8 bytes each); the writer position is
--   (epoch, seq, op index in the batch) as big-endian u64: an op at or below the writer's
--   stored position was applied by an earlier call and is skipped (replays change
--   nothing).
-- An entry is <d number> <d number of the list's entry before it> <c1 'S'|'C'> keys.
-- Returns 'dead' (the pool is being collected or re-slotted), 'diverged', or the op
-- counter and every pending list, one array per sub-slot.
local MAX_TOMBSTONES = 65536  -- indexer/index/pools.py
local map, gone, st, wpos, meta, hpos = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local id, name = ARGV[1], ARGV[2]
local S = #KEYS - 6

-- A re-slot's mark: one owner per re-slot, found again by whoever meets the old id dead.
if ARGV[4] == 'mark' then
  local to = redis.call('HGET', st, 'reslot_to')
  if to then
    return {to}
  end
  local dead = redis.call('HGET', hpos, 'q' .. id) == 'x'
  if ARGV[5] == '' or (dead and ARGV[6] ~= '1') then
    return dead and 'gone' or 'none'
  end
  redis.call('HSET', st, 'reslot_to', ARGV[5])
  redis.call('HSET', hpos, 'q' .. id, 'x')
  return {ARGV[5]}
end

if redis.call('HGET', hpos, 'q' .. id) == 'x' then
  return 'dead'
end

local function lists(seq)
  local out = {tostring(seq)}
  for k = 1, S do
    out[k + 1] = redis.call('LRANGE', KEYS[6 + k], 0, -1)
  end
  return out
end

if ARGV[4] == 'trim' then
  local seq = tonumber(redis.call('HGET', st, 'seq') or '0')
  for k = 1, S do
    if tonumber(ARGV[4 + k]) > seq then
      return 'diverged'  -- a sub-slot applied entries this home never numbered (lost)
    end
  end
  for k = 1, S do
    local done = tonumber(ARGV[4 + k])
    while true do
      local head = redis.call('LINDEX', KEYS[6 + k], 0)
      if not head or struct.unpack('<d', head) > done then
        break
      end
      redis.call('LPOP', KEYS[6 + k])
    end
  end
  return 1
end

-- A re-slot's new id built once: its keys replaced by the old id's state (ARGV[5 .. 8]:
-- the number of map, gone, st and w pairs, then the pairs), every key its map holds
-- becoming a set entry. Later calls (another process resuming the re-slot) build nothing.
local rebuild = false
if ARGV[4] == 'build' then
  if redis.call('HEXISTS', st, 'built') == 1 then
    return lists(tonumber(redis.call('HGET', st, 'seq') or '0'))
  end
  redis.call('DEL', map, gone, st, wpos, unpack(KEYS, 7))
  local first = 9
  for j, key in ipairs({map, gone, st, wpos}) do
    local pairs_left = tonumber(ARGV[4 + j])
    while pairs_left > 0 do
      local n = math.min(pairs_left, 1000)
      redis.call('HSET', key, unpack(ARGV, first, first + 2 * n - 1))
      first = first + 2 * n
      pairs_left = pairs_left - n
    end
  end
  redis.call('HSET', st, 'built', '1')
  rebuild = true
end

local state = redis.call('HMGET', st, 'floor', 'gone_max', 'epoch', 'seq', 'ts')
local floor = math.max(tonumber(state[1] or '0'), tonumber(ARGV[3]))
local gone_max = tonumber(state[2] or '0')
local epoch = tonumber(state[3] or '0')
local seq = tonumber(state[4] or '0')
local last_ts = tonumber(state[5] or '0')
local last = {}  -- sub-slot -> the number of its list's last entry
for k = 1, S do
  last[k] = tonumber(redis.call('HGET', st, 'l' .. k) or '0')
end

-- key mod S of an 8-byte little-endian key, by its bytes (Lua numbers are doubles)
local powers = {1}
for i = 2, 8 do
  powers[i] = (powers[i - 1] * 256) % S
end
local function subslot(key)
  local r = 0
  local b = {string.byte(key, 1, 8)}
  for i = 1, 8 do
    r = (r + b[i] * powers[i]) % S
  end
  return r + 1
end

-- Presence changes, per sub-slot: the current run of one kind, flushed as one numbered
-- entry when the kind changes (order between a clear and a set of one key is kept).
local runs = {}
local function flush(k)
  local run = runs[k]
  if run and #run.keys > 0 then
    seq = seq + 1
    redis.call('RPUSH', KEYS[6 + k], struct.pack('<dd', seq, last[k]) .. run.kind ..
      table.concat(run.keys))
    last[k] = seq
  end
  runs[k] = nil
end
local function change(kind, key)
  local k = subslot(key)
  local run = runs[k]
  if run and run.kind ~= kind then
    flush(k)
    run = nil
  end
  if not run then
    run = {kind = kind, keys = {}}
    runs[k] = run
  end
  run.keys[#run.keys + 1] = key
end

local function stamp_of(v)
  return struct.unpack('<d', v, 9)
end

local function store(arg, pos, count, ts)
  if ts < floor then return end
  for i = 0, count - 1 do
    local h = string.sub(arg, pos + i * 16, pos + i * 16 + 7)
    local key = string.sub(arg, pos + i * 16 + 8, pos + i * 16 + 15)
    local was_gone = redis.call('HGET', gone, h)
    local old = redis.call('HGET', map, h)
    if not (was_gone and struct.unpack('<d', was_gone) > ts)
        and not (old and stamp_of(old) > ts) then
      if was_gone then redis.call('HDEL', gone, h) end
      redis.call('HSET', map, h, key .. struct.pack('<d', ts))
      local old_key = old and string.sub(old, 1, 8)
      if old_key ~= key then
        if old_key then change('C', old_key) end
        change('S', key)
      end
    end
  end
end

local function remove(arg, pos, count, ts)
  local remember = ts >= floor
  for i = 0, count - 1 do
    local h = string.sub(arg, pos + i * 8, pos + i * 8 + 7)
    local old = redis.call('HGET', map, h)
    if not (old and stamp_of(old) > ts) then
      if old then
        redis.call('HDEL', map, h)
        change('C', string.sub(old, 1, 8))
      end
      local was_gone = remember and redis.call('HGET', gone, h)
      if remember and not (was_gone and struct.unpack('<d', was_gone) > ts) then
        redis.call('HSET', gone, h, struct.pack('<d', ts))
      end
    end
  end
  if ts > gone_max then gone_max = ts end
  if redis.call('HLEN', gone) > MAX_TOMBSTONES then
    if gone_max > floor then floor = gone_max end
    redis.call('UNLINK', gone)
  end
end

local function wipe(ts)
  local all = redis.call('HGETALL', map)
  for i = 1, #all, 2 do
    local v = all[i + 1]
    if stamp_of(v) <= ts then
      redis.call('HDEL', map, all[i])
      change('C', string.sub(v, 1, 8))
    end
  end
  if ts > floor then floor = ts end
  local tombs = redis.call('HGETALL', gone)
  for i = 1, #tombs, 2 do
    if struct.unpack('<d', tombs[i + 1]) <= floor then
      redis.call('HDEL', gone, tombs[i])
    end
  end
  epoch = epoch + 1
end

-- Whether position a (24 bytes, three big-endian u64) is above b: compared as six u32.
local function above(a, b)
  for i = 1, 24, 4 do
    local x, y = struct.unpack('>I4', a, i), struct.unpack('>I4', b, i)
    if x ~= y then return x > y end
  end
  return false
end

if rebuild then
  local all = redis.call('HVALS', map)
  for i = 1, #all do
    change('S', string.sub(all[i], 1, 8))
  end
end
if ARGV[4] == 'ops' and tonumber(ARGV[5]) > seq then
  return 'diverged'
end
local arg_i = 6
while ARGV[4] == 'ops' and arg_i <= #ARGV do
  local arg = ARGV[arg_i]
  local kind, writer, wat, ts, count = struct.unpack('<c1I4c24dI4', arg)
  local stored = redis.call('HGET', wpos, writer)
  if not stored or above(wat, stored) then
    redis.call('HSET', wpos, writer, wat)
    if ts > last_ts then last_ts = ts end
    if kind == 'P' then
      store(arg, 42, count, ts)
    elseif kind == 'R' then
      remove(arg, 42, count, ts)
    else
      wipe(ts)
    end
  end
  arg_i = arg_i + 1
end
for k = 1, S do
  flush(k)
  redis.call('HSET', st, 'l' .. k, string.format('%.17g', last[k]))
end
redis.call('HSET', st, 'floor', string.format('%.17g', floor),
  'gone_max', string.format('%.17g', gone_max), 'epoch', epoch, 'seq', seq,
  'ts', string.format('%.17g', last_ts))
redis.call('HSET', meta, 'pos', struct.pack('>i8i8', epoch, -1),
  'ts', string.format('%.17g', last_ts), 'n0', 0, 'n1', 0, 'n2', redis.call('HLEN', map),
  'n3', 0, 'degraded', '0', 'worker', name, 'rank', -1)
return lists(seq)
