-- The directory of a sub-slot model (redis_sharded.py): ranks -> slot ids, the id
-- counter, the slot map version, the sub-slot tags, ids being collected, the model state.
-- KEYS: the directory's slots, nextslot, slotver, subslots, retired, pending, state,
-- block_size, groups (KV-cache group > 0 -> "kind\nwindow", written by redis_sharded.py),
-- pool_floor (shared storage pools take no write older than it: snapshot imports).
-- A shared storage pool is mapped as a rank whose dp rank is -1.
-- ARGV[1] the operation, then its arguments:
--   'rank' worker, dp rank, version start, tags[, id]: the rank's id (the tags stored if
--          the model has none yet) -> {id, 0, tags}; a rank not mapped yet is mapped to
--          `id` -> {id, 1, tags}; without `id`, or when the counter has passed it,
--          -> {'new', counter, tags}: the caller claims an id >= counter in every
--          sub-slot (lua/subslot_claim.lua) and calls again with it.
--          {'collecting'} while the model is being collected
--   'newid' worker, dp rank[, id]: `id`, claimed in every sub-slot, as the rank's new id
--          for a re-slot, listed in `pending` (a rank's ids pending from an
--          interrupted re-slot are retired; a pool's are not: two processes may
--          re-slot it at once, one of them owns the re-slot) -> {id}; without `id`, or
--          when the counter has passed it, -> {'new', counter}, as 'rank'
--   'switch' worker, dp rank, old id, new id: map the rank to the new id (pending for
--          it) and retire the old and any other id pending for it -> 'ok' (also when an
--          earlier try did), or 'conflict' when the rank is at neither id or the new id
--          is no longer pending
--   'abandon' worker, dp rank, id: a pending id of the rank not used goes to be collected
--   'remove' worker, dp rank: unmap the rank and retire its id (and any id pending for
--          it) -> id, or false
--   'collected' id: the id's keys are gone everywhere -> 1
--   'gc': a model with no rank and nothing to collect goes to 'collecting' -> the tags,
--          or false
--   'drop': a collecting model's directory goes (the counter stays: ids never repeat)
-- Ids are never given out twice: a holder entry always means the rank that wrote it. An
-- id is taken here only after every sub-slot's copy of the counter was raised past it
-- (claimed), so a directory restored from an older dump (its counter rolled back) meets
-- copies on the other masters that make the caller claim higher.
local slots, nextslot, slotver, subslots, retired, pending, state =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local MAX_SLOT_ID = 268435455
local op = ARGV[1]

-- The claimed id ARGV[i] taken (the counter raised past it), or nil when there is none
-- or the counter passed it: the caller claims from the counter.
local function take_id(i)
  local want = tonumber(ARGV[i])
  if not want or want < tonumber(redis.call('GET', nextslot) or '0') then
    return nil
  end
  if want > MAX_SLOT_ID then
    return redis.error_reply('model ' .. slots .. ' used every slot id (2^28)')
  end
  redis.call('SET', nextslot, tostring(want + 1))
  return tostring(want)
end

local function counter()
  return redis.call('GET', nextslot) or '0'
end

local function bump(start)
  redis.call('SET', slotver, start or tostring(math.random(1, 2 ^ 30)), 'NX')
  redis.call('INCR', slotver)
end

-- Ids an interrupted re-slot of the rank left pending go to be collected.
local function retire_pending(ref)
  local listed = redis.call('HGETALL', pending)
  for i = 1, #listed, 2 do
    if listed[i + 1] == ref then
      redis.call('HDEL', pending, listed[i])
      redis.call('HSET', retired, listed[i], ref)
    end
  end
end

if op == 'rank' then
  if redis.call('GET', state) == 'collecting' then
    return {'collecting'}
  end
  local ref = ARGV[2] .. '\n' .. ARGV[3]
  redis.call('SET', subslots, ARGV[5], 'NX')
  local tags = redis.call('GET', subslots)
  local s = redis.call('HGET', slots, ref)
  if s then
    return {s, 0, tags}
  end
  s = take_id(6)
  if not s then
    return {'new', counter(), tags}
  elseif type(s) == 'table' then
    return s
  end
  redis.call('HSET', slots, ref, s)
  bump(ARGV[4])
  return {s, 1, tags}
elseif op == 'newid' then
  local ref = ARGV[2] .. '\n' .. ARGV[3]
  local s = take_id(4)
  if not s then
    return {'new', counter()}
  elseif type(s) == 'table' then
    return s
  end
  if ARGV[3] ~= '-1' then
    retire_pending(ref)  -- a pool's pending ids may be a live re-slot's: its switch retires them
  end
  redis.call('HSET', pending, s, ref)
  return {s}
elseif op == 'switch' then
  local ref = ARGV[2] .. '\n' .. ARGV[3]
  local now = redis.call('HGET', slots, ref)
  if now == ARGV[5] then
    return 'ok'  -- an earlier try switched it
  end
  if now ~= ARGV[4] or redis.call('HGET', pending, ARGV[5]) ~= ref then
    return 'conflict'
  end
  redis.call('HSET', slots, ref, ARGV[5])
  redis.call('HDEL', pending, ARGV[5])
  retire_pending(ref)
  redis.call('HSET', retired, ARGV[4], ref)
  bump(nil)
  return 'ok'
elseif op == 'abandon' then
  local ref = ARGV[2] .. '\n' .. ARGV[3]
  if redis.call('HGET', pending, ARGV[4]) == ref then
    redis.call('HDEL', pending, ARGV[4])
    redis.call('HSET', retired, ARGV[4], ref)
  end
  return 1
elseif op == 'remove' then
  local ref = ARGV[2] .. '\n' .. ARGV[3]
  retire_pending(ref)
  local s = redis.call('HGET', slots, ref)
  if not s then
    return false
  end
  redis.call('HDEL', slots, ref)
  redis.call('HSET', retired, s, ref)
  bump(nil)
  return s
elseif op == 'collected' then
  redis.call('HDEL', retired, ARGV[2])
  redis.call('HDEL', pending, ARGV[2])
  return 1
elseif op == 'gc' then
  if redis.call('HLEN', slots) > 0 or redis.call('HLEN', retired) > 0
      or redis.call('HLEN', pending) > 0 then
    return false
  end
  local tags = redis.call('GET', subslots)
  if not tags then
    return false
  end
  redis.call('SET', state, 'collecting')
  return tags
elseif op == 'drop' then
  if redis.call('GET', state) == 'collecting' then
    redis.call('DEL', slots, slotver, subslots, retired, pending, state, KEYS[8], KEYS[9],
      KEYS[10])
    return 1
  end
  return 0
end
return redis.error_reply('unknown directory operation ' .. tostring(op))
