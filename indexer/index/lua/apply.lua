-- Apply the changes of bus batches to worker ranks: presence bits, each rank's ledger log
-- and metadata. A record holds what one or more consecutive batches of one rank changed;
-- it is applied only if the rank's stored position (epoch, seq) equals the one the
-- caller's ledger started from, so replayed or concurrent batches change nothing. The
-- first record that fails this check stops the call.
--
-- KEYS     every key the call touches, declared so Redis Cluster routes the call (and
--          answers TRYAGAIN while a slot is half migrated) by all of them: the model's
--          bk, bx, slots, slotver, block_size, then each record's rank meta and log
--          (`w:<slot>:meta`, `w:<slot>:log`), all sharing the hash tag {m:<model>}
-- ARGV     one record per rank:
--   header  <I4 slot id> <c16 expected position> <c16 new position> <d ts> <B flags>
--           <I4 x4 held blocks per tier> <I4 dp rank> <H worker id length>
--           <I4 presence ops length> <I4 ledger log length> <I4 block size>
--           positions are (epoch, seq) as big-endian signed 64-bit; flags: 1 the log
--           segment replaces the rank's log (reset, compaction, a string log), 2 degraded, 4 remove
--           the rank after applying, 8 probe the buckets first (Redis Cluster, below); a block size > 0 is stored as the model's
--   then    worker id, presence ops, ledger log segment (opaque here; see redis.py)
--           presence op: <c1 'S'|'C'> <I4 bit position> <I4 count> count x key (8 bytes)
--           of KV-cache group 0 (its buckets, holders.lua), or <c1 'T'|'K'> <B group>
--           <I4 bit position> <I4 count> keys: set / clear in group g's hash `blk<g>`;
--           bit position = slot id * 4 + tier
--           pool op (shared storage pools, indexer/index/pools.py), as of <d ts>:
--             <c1 'P'> <I4 pool slot> <I4 count> <H name length> name <d ts>,
--               count x (hash, key): the pool holds these blocks
--             <c1 'R'> <I4 pool slot> <I4 count> <H name length> name <d ts>, count x hash:
--               these blocks left the pool (resolved through its map)
--             <c1 'W'> <I4 pool slot> <I4 0> <H name length> name <d ts>: wiped
--             <c1 'X'> <I4 0> <I4 0> <d ts>: wipe every pool this rank wrote into (a gap)
--           A pool's presence lives in group 0 (its storage tier in its holder entry).
-- Bucket hashes `b:<n>` and `bx` (holders.lua) are written undeclared, like the pool keys
-- (they share the model's hash tag); `bk`, their state, is declared.
-- KEYS past the records' ones: the `blk<g>` hash of every KV-cache group > 0 the
--          records' T / K ops name (declared like the others; an op naming an undeclared
--          group hash is an error, before the record's rank is checked).
-- A record applies only while its rank still owns the record's slot in `slots`, and
-- each pool it names still owns its slot (checked before anything is written).
-- Returns one status per record applied ('ok' | 'removed' | 'emptied': removed, and the
-- model has no rank left), then 'conflict' if one failed.
local p = string.match(KEYS[1], '^(.*:)')  -- the model prefix, "kvi:{m:<model>}:"
local NOPOS = string.rep('\255', 16)
local HEADER = '<I4c16c16dBI4I4I4I4I4HI4I4I4'
local buckets = open_buckets(p)

-- The keys of each group-0 S / C op, cut once by `group0_keys`: record -> op position
-- -> keys.
local op_tables = {}

-- The `count` keys (8 bytes each) of `ops` from `pos`, read into `st`'s cache: one
-- HMGET for the op's keys, not one read per block (none when the call's prefetch read
-- every group-0 key: `all_read`).
local function op_keys(st, ops, pos, count)
  local cut = op_tables[ops]
  if cut and cut[pos] then
    return cut[pos]
  end
  local keys = {}
  for k = 1, count do
    keys[k] = string.sub(ops, pos, pos + 7)
    pos = pos + 8
  end
  if not st.all_read then prefetch(st, keys) end
  return keys
end

-- The Redis module (native/redis_module/kvi.c), when this server has it loaded: its
-- KVI.HOLDERS applies an op's whole run of keys to one hash in C, as holders_set /
-- holders_clear would key by key, writing each key at once (no cache, no prefetch). It
-- takes a plain `blk<g>` hash, and group 0 at bucket load 0 (one bucket, every value
-- inline); a model that splits keeps the Lua path. Asked once a call (COMMAND INFO: a
-- call of an unknown command would count as an error in INFO errorstats), so a server
-- without it (or that lost it in a restart) runs the Lua path.
local module_loaded = nil

local function has_module()
  if module_loaded == nil then
    local info = redis.call('COMMAND', 'INFO', 'kvi.holders')[1]
    module_loaded = type(info) == 'table' and info[2] == 6  -- its arity: this version
  end
  return module_loaded
end

-- Whether `st`'s ops go to the module: a plain hash, or group 0 in one bucket for good.
local function module_store(st)
  if st.hash then
    return has_module()
  end
  return st.load == 0 and only_hash(st) ~= false and has_module()
end

-- The op's `count` keys from `pos` through KVI.HOLDERS (`kind` S / C: group 0's bucket,
-- whose '' values are in `bx`; T / K: a plain hash). The bucket's block count follows
-- the fields it added and deleted.
local function module_bits(st, kind, ops, pos, count, bitpos)
  local stop = pos + count * 8
  local reply = redis.call('KVI.HOLDERS', st.hash or only_hash(st), KEYS[2], kind, bitpos,
    string.sub(ops, pos, stop - 1))
  if not st.hash and (reply[1] > 0 or reply[2] > 0) then
    st.count = st.count + reply[1] - reply[2]
    st.dirty_count = true
  end
  return stop
end

local function set_bits(st, ops, pos, count, bitpos)
  if st.module then
    return module_bits(st, st.hash and 'T' or 'S', ops, pos, count, bitpos)
  end
  set_holders(st, op_keys(st, ops, pos, count), math.floor(bitpos / 4), 2 ^ (bitpos % 4))
  return pos + count * 8
end

local function clear_bits(st, ops, pos, count, bitpos)
  if st.module then
    return module_bits(st, st.hash and 'K' or 'C', ops, pos, count, bitpos)
  end
  clear_holders(st, op_keys(st, ops, pos, count), math.floor(bitpos / 4), 2 ^ (bitpos % 4))
  return pos + count * 8
end

local group_hashes = {}  -- the declared blk<g> hashes (KEYS past the records' ones)
local group_stores = {}  -- blk<g> -> its store (plain_store), written back at the end
local POOL_OP = {P = 16, R = 8, W = 0}  -- bytes per block of each pool op
local MAX_TOMBSTONES = 65536  -- indexer/index/pools.py

local function pool_ref(name)
  return name .. '\n-1'  -- a pool's entry in `slots` (no worker rank is negative)
end

-- Whether every pool op of the record names a pool that still owns its slot.
-- Group ops must name declared group hashes (checked here, before anything is written:
-- a script error does not undo what it wrote).
local function pools_owned(rec, pos, stop)
  while pos < stop do
    local kind, slot, count
    kind = string.sub(rec, pos, pos)
    local per
    if kind == 'T' or kind == 'K' then
      local group
      kind, group, slot, count, pos = struct.unpack('<c1BI4I4', rec, pos)
      if not group_hashes[p .. 'blk' .. group] then
        error('a presence op names ' .. p .. 'blk' .. group .. ', not a declared key')
      end
      pos = pos + count * 8
    else
      kind, slot, count, pos = struct.unpack('<c1I4I4', rec, pos)
      per = POOL_OP[kind]
    end
    if kind == 'T' or kind == 'K' then
      -- done above
    elseif per then
      local nlen
      nlen, pos = struct.unpack('<H', rec, pos)
      local name = string.sub(rec, pos, pos + nlen - 1)
      pos = pos + nlen + 8
      if tonumber(redis.call('HGET', p .. 'slots', pool_ref(name))) ~= slot then
        return false
      end
      pos = pos + count * per
    elseif kind == 'X' then
      pos = pos + 8
    else
      pos = pos + count * 8
    end
  end
  return true
end

-- A pool: its keys, storage bit and write-order state (newest write wins per engine
-- hash, as PoolState in indexer/index/pools.py: map values are key .. store ts, `gone`
-- holds tombstones (removal ts), stores and removals older than `floor` are ignored).
local function pool_open(slot, name)
  local meta = p .. 'w:' .. slot .. ':meta'
  local st = redis.call('HMGET', meta, 'floor', 'gone_max', 'epoch', 'ts')
  return {slot = slot, name = name, meta = meta,
    map = p .. 'p:' .. slot .. ':map', gone = p .. 'p:' .. slot .. ':gone',
    bitpos = slot * 4 + 2,
    floor = math.max(tonumber(st[1]) or 0,
      tonumber(redis.call('GET', p .. 'pool_floor') or '0')),
    gone_max = tonumber(st[2]) or 0,
    epoch = tonumber(st[3]) or 0, ts = tonumber(st[4]) or 0}
end

local function pool_close(pool)
  redis.call('HSET', pool.meta, 'pos', struct.pack('>i8i8', pool.epoch, -1),
    'ts', string.format('%.17g', pool.ts), 'n0', 0, 'n1', 0,
    'n2', redis.call('HLEN', pool.map), 'n3', 0, 'degraded', '0', 'worker', pool.name,
    'rank', -1, 'epoch', pool.epoch, 'floor', string.format('%.17g', pool.floor),
    'gone_max', string.format('%.17g', pool.gone_max))
end

local function stamp_of(v)
  return (struct.unpack('<d', v, 9))
end

local function pool_store(pool, rec, pos, count, ts)
  if ts < pool.floor then return pos + count * 16 end
  for _ = 1, count do
    local h = string.sub(rec, pos, pos + 7)
    local key = string.sub(rec, pos + 8, pos + 15)
    pos = pos + 16
    local gone = redis.call('HGET', pool.gone, h)
    local old = redis.call('HGET', pool.map, h)
    if not ((gone and struct.unpack('<d', gone) > ts) or (old and stamp_of(old) > ts)) then
      if gone then redis.call('HDEL', pool.gone, h) end
      redis.call('HSET', pool.map, h, key .. struct.pack('<d', ts))
      local old_key = old and string.sub(old, 1, 8)
      if old_key ~= key then
        if old_key then clear_bits(buckets, old_key, 1, 1, pool.bitpos) end
        set_bits(buckets, key, 1, 1, pool.bitpos)
      end
    end
  end
  return pos
end

local function pool_remove(pool, rec, pos, count, ts)
  -- below the floor no store is taken: no tombstone needed, but held blocks still go
  local remember = ts >= pool.floor
  for _ = 1, count do
    local h = string.sub(rec, pos, pos + 7)
    pos = pos + 8
    local old = redis.call('HGET', pool.map, h)
    if not (old and stamp_of(old) > ts) then
      if old then
        redis.call('HDEL', pool.map, h)
        clear_bits(buckets, string.sub(old, 1, 8), 1, 1, pool.bitpos)
      end
      local gone = remember and redis.call('HGET', pool.gone, h)
      if remember and not (gone and struct.unpack('<d', gone) > ts) then
        redis.call('HSET', pool.gone, h, struct.pack('<d', ts))
      end
    end
  end
  if ts > pool.gone_max then pool.gone_max = ts end
  if redis.call('HLEN', pool.gone) > MAX_TOMBSTONES then
    if pool.gone_max > pool.floor then pool.floor = pool.gone_max end
    redis.call('UNLINK', pool.gone)
  end
  return pos
end

local function pool_wipe(pool, ts)
  local all = redis.call('HGETALL', pool.map)
  for i = 1, #all, 2 do
    local v = all[i + 1]
    if stamp_of(v) <= ts then
      redis.call('HDEL', pool.map, all[i])
      clear_bits(buckets, string.sub(v, 1, 8), 1, 1, pool.bitpos)
    end
  end
  if ts > pool.floor then pool.floor = ts end
  local gone = redis.call('HGETALL', pool.gone)
  for i = 1, #gone, 2 do
    if struct.unpack('<d', gone[i + 1]) <= pool.floor then
      redis.call('HDEL', pool.gone, gone[i])
    end
  end
  pool.epoch = pool.epoch + 1
end

-- After a gap in a writer's batches: its lost evictions are unknown, so the pools it
-- wrote into (its `pools` set: "slot\nname") are wiped as of the batch's ts, if they
-- still own their slots.
local function wipe_written(wp, ts)
  for _, entry in ipairs(redis.call('SMEMBERS', wp .. 'pools')) do
    local slot_s, name = string.match(entry, '^(%d+)\n(.*)$')
    local slot = tonumber(slot_s)
    if tonumber(redis.call('HGET', p .. 'slots', pool_ref(name))) == slot then
      local pool = pool_open(slot, name)
      pool_wipe(pool, ts)
      pool_close(pool)
    end
  end
  redis.call('DEL', wp .. 'pools')
end

local function apply_pool_op(rec, pos, kind, slot, count, wp)
  local nlen, name, ts
  nlen, pos = struct.unpack('<H', rec, pos)
  name = string.sub(rec, pos, pos + nlen - 1)
  ts, pos = struct.unpack('<d', rec, pos + nlen)
  local pool = pool_open(slot, name)
  if ts > pool.ts then pool.ts = ts end
  if kind == 'P' then
    pos = pool_store(pool, rec, pos, count, ts)
  elseif kind == 'R' then
    pos = pool_remove(pool, rec, pos, count, ts)
  else
    pool_wipe(pool, ts)
  end
  pool_close(pool)
  redis.call('SADD', wp .. 'pools', slot .. '\n' .. name)
  return pos
end

local function apply_presence(rec, pos, stop, wp)
  while pos < stop do
    local kind, group, bitpos, count
    kind = string.sub(rec, pos, pos)
    if kind == 'T' or kind == 'K' then
      kind, group, bitpos, count, pos = struct.unpack('<c1BI4I4', rec, pos)
      local hash = p .. 'blk' .. group  -- declared: pools_owned checked
      local store = group_stores[hash]
      if not store then
        store = plain_store(hash)
        store.module = module_store(store)
        group_stores[hash] = store
      end
      if kind == 'T' then
        pos = set_bits(store, rec, pos, count, bitpos)
      else
        pos = clear_bits(store, rec, pos, count, bitpos)
      end
    else
      kind, bitpos, count, pos = struct.unpack('<c1I4I4', rec, pos)
      if kind == 'S' or kind == 'C' then
        if kind == 'S' then
          pos = set_bits(buckets, rec, pos, count, bitpos)
        else
          pos = clear_bits(buckets, rec, pos, count, bitpos)
        end
      elseif kind == 'X' then
        local ts
        ts, pos = struct.unpack('<d', rec, pos)
        wipe_written(wp, ts)
      else
        pos = apply_pool_op(rec, pos, kind, bitpos, count, wp)
      end
    end
  end
end

-- A rank's log is a list of segments, read back joined (redis.py `_load_ledger`): a
-- string grown by APPEND keeps up to as much again in spare capacity, a list's
-- listpack nodes hold little more than the bytes. A segment goes in elements of
-- LOG_CHUNK bytes, one to a node of Redis's default 8 KB listpack limit (one element of
-- a whole snapshot, or of 4 KB, costs 1.3-2.5x its bytes; 8,000 costs 1.03x). A string
-- log (earlier versions) is appended to until the writer replaces it (the first write of
-- a ledger loaded from one does).
local LOG_CHUNK = 8000

-- Push the log bytes rec[pos, pos + llen) to `log` in LOG_CHUNK elements. The first
-- RPUSH goes through `first_push` (redis.call, or redis.pcall to learn that `log` is a
-- string: its error reply is returned, nothing pushed), the others through redis.call.
local function push_log(first_push, log, rec, pos, llen)
  local chunks, n, push = {}, 0, first_push
  local stop = pos + llen
  for at = pos, stop - 1, LOG_CHUNK do
    n = n + 1
    chunks[n] = string.sub(rec, at, math.min(at + LOG_CHUNK, stop) - 1)
    if n == 1000 or at + LOG_CHUNK >= stop then
      local reply = push('RPUSH', log, unpack(chunks))
      if type(reply) == 'table' and reply.err then return reply end
      chunks, n, push = {}, 0, redis.call
    end
  end
  return nil
end

local function replace_log(log, rec, pos, llen)
  redis.call('DEL', log)
  push_log(redis.call, log, rec, pos, llen)
end

local function append_log(log, rec, pos, llen)
  local pushed = push_log(redis.pcall, log, rec, pos, llen)
  if type(pushed) == 'table' and pushed.err then
    -- a string log: WRONGTYPE, nothing pushed
    redis.call('APPEND', log, string.sub(rec, pos, pos + llen - 1))
  end
end

local function apply_one(rec, i)
  local slot, expected, newpos, ts, flags, n0, n1, n2, n3, rank,
        wlen, olen, llen, block_size, pos = struct.unpack(HEADER, rec, 1)
  local wp = p .. 'w:' .. slot .. ':'
  local meta = wp .. 'meta'
  if KEYS[4 + 2 * i] ~= meta or KEYS[5 + 2 * i] ~= wp .. 'log' then
    error('record ' .. i .. ': its rank keys are not the declared ones')
  end
  local worker = string.sub(rec, pos, pos + wlen - 1)
  pos = pos + wlen
  local ref = worker .. '\n' .. rank
  -- The rank must still own the slot: a writer whose rank was removed (and the slot
  -- freed, or the whole model collected) meanwhile must not write into it.
  if tonumber(redis.call('HGET', p .. 'slots', ref)) ~= slot
      or (redis.call('HGET', meta, 'pos') or NOPOS) ~= expected
      or not pools_owned(rec, pos, pos + olen) then
    return 'conflict'
  end
  apply_presence(rec, pos, pos + olen, wp)
  pos = pos + olen
  if bit.band(flags, 4) ~= 0 then
    redis.call('DEL', meta, wp .. 'log', wp .. 'pools')
    redis.call('HDEL', p .. 'slots', ref)  -- its slot id is never given out again
    redis.call('INCR', p .. 'slotver')
    if redis.call('EXISTS', p .. 'slots') == 0 then
      return 'emptied'  -- the model's last rank: the caller collects the model (gc.lua)
    end
    return 'removed'
  end
  if bit.band(flags, 1) ~= 0 then
    replace_log(wp .. 'log', rec, pos, llen)
  elseif llen > 0 then
    append_log(wp .. 'log', rec, pos, llen)
  end
  local degraded = '0'
  if bit.band(flags, 2) ~= 0 then degraded = '1' end
  redis.call('HSET', meta, 'pos', newpos, 'ts', string.format('%.17g', ts),
    'n0', n0, 'n1', n1, 'n2', n2, 'n3', n3, 'degraded', degraded,
    'worker', worker, 'rank', rank)
  if block_size > 0 then
    redis.call('SET', p .. 'block_size', block_size)
  end
  return 'ok'
end

if #KEYS < 5 + 2 * #ARGV then
  return redis.error_reply('apply.lua wants 5 model keys, 2 per record, then group hashes')
end
if old_layout(p, buckets.layout) then
  return redis.error_reply('KVI_LAYOUT ' .. p .. ' holds an older presence layout')
end
for k = 6 + 2 * #ARGV, #KEYS do
  group_hashes[KEYS[k]] = true
end

-- The keys of the records' group-0 ops (S, C, P: those known before the call runs), in
-- order; each S / C op's keys also go to `op_tables`, for `op_keys`.
local function group0_keys()
  local keys, n = {}, 0
  for i = 1, #ARGV do
    local rec = ARGV[i]
    local cuts = {}
    op_tables[rec] = cuts
    local _, _, _, _, _, _, _, _, _, _, wlen, olen, _, _, pos = struct.unpack(HEADER, rec, 1)
    pos = pos + wlen
    local stop = pos + olen
    while pos < stop do
      local kind = string.sub(rec, pos, pos)
      local count, per, skip
      if kind == 'T' or kind == 'K' then
        _, _, _, count, pos = struct.unpack('<c1BI4I4', rec, pos)
        pos = pos + count * 8
      else
        _, _, count, pos = struct.unpack('<c1I4I4', rec, pos)
        if kind == 'S' or kind == 'C' or kind == 'P' then
          per, skip = 8, 0
          if kind == 'P' then
            local nlen
            nlen, pos = struct.unpack('<H', rec, pos)
            pos = pos + nlen + 8
            per, skip = 16, 8
          end
          local cut = {}
          for k = 0, count - 1 do
            local at = pos + k * per + skip
            local key = string.sub(rec, at, at + 7)
            n = n + 1
            keys[n] = key
            cut[k + 1] = key
          end
          if kind ~= 'P' then cuts[pos] = cut end
          pos = pos + count * per
        elseif kind == 'X' then
          pos = pos + 8
        elseif kind == 'R' or kind == 'W' then
          local nlen
          nlen, pos = struct.unpack('<H', rec, pos)
          pos = pos + nlen + 8
          if kind == 'R' then pos = pos + count * 8 end
        end
      end
    end
  end
  return keys
end

-- Whether every record carries flag `flag`.
local function all_flagged(flag)
  for i = 1, #ARGV do
    local _, _, _, _, flags = struct.unpack(HEADER, ARGV[i], 1)
    if bit.band(flags, flag) == 0 then
      return false
    end
  end
  return true
end

-- On Redis Cluster (records flagged 8): while the model's hash slot migrates, a bucket
-- may be on the target already, or not exist yet, and a script touching it fails there,
-- half done. So the bucket of every group-0 key the records name (`keys`), and every
-- bucket the splits they may cause write, is probed first (a probe of a key not served
-- here fails): one refused, the call answers TRYAGAIN with nothing written. (Pool
-- removals and wipes resolve their keys as they run, unprobed, as the pool keys
-- themselves are.)
local function buckets_here(keys)
  local seen, ok = {}, true
  local function probe(name)
    if ok and not seen[name] then
      seen[name] = true
      ok = pcall(redis.call, 'EXISTS', name)
    end
  end
  for i = 1, #keys do
    probe(bucket_of(buckets, keys[i]))
  end
  -- the splits #keys new blocks may cause, in order
  local split, n = buckets.split, buckets.n
  for _ = 0, (buckets.load > 0 and math.ceil(#keys / buckets.load) or -1) do
    probe(bucket_name(buckets, split))
    probe(bucket_name(buckets, split + n))
    split = split + 1
    if split == n then
      split, n = 0, 2 * n
    end
  end
  return ok
end

-- The group-0 keys are cut once, for the probe and for a model in one bucket (unless
-- the module writes it).
buckets.module = module_store(buckets)
local probing = all_flagged(8)
local keys = (probing or (only_hash(buckets) and not buckets.module)) and group0_keys()
if probing and not buckets_here(keys) then
  return redis.error_reply('TRYAGAIN a bucket of ' .. p .. ' is not served here (slot migrating)')
end

-- A model in one bucket: the call's group-0 keys in one HMGET, not one per op (a fleet
-- of many ranks sends records of a few blocks each).
if only_hash(buckets) and not buckets.module then
  if #keys > 0 then read_into(buckets, only_hash(buckets), keys) end  -- the cache is empty
  buckets.all_read = true
end

local statuses = {}
-- A script error keeps what ran before it: the cached presence and the bucket state are
-- written either way, so the block count stays exact (gc.lua relies on it).
local ran, err = pcall(function()
  for i = 1, #ARGV do
    local status = apply_one(ARGV[i], i)
    statuses[#statuses + 1] = status
    if status == 'conflict' then
      break
    end
  end
end)
for _, store in pairs(group_stores) do
  flush(store)
end
close_buckets(buckets)
if not ran then
  return redis.error_reply(tostring(err))
end
return statuses
