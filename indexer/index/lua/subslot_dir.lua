-- The directory of a sub-slot model (redis_sharded.py): ranks -> slot ids, the id
-- counter, the slot map version, the sub-slot tags, ids being collected, the model state.
-- KEYS: the directory's slots, nextslot, slotver, subslots, retired, pending, state,
-- block_size, groups (KV-cache group > 0 -> "kind\nwindow", written by redis_sharded.py).
-- ARGV[1] the operation, then its arguments:
--   'rank' worker, dp rank, version start, tags: the rank's id (allocated if new; the
--          tags stored if the model has none yet) -> {id, created, tags}, or
--          {'collecting'} while the model is being collected
--   'newid' worker, dp rank: a new id for a re-slot, listed in `pending` (ids of the
--          rank pending from an interrupted re-slot are retired) -> id
--   'switch' worker, dp rank, old id, new id: map the rank to the new id and retire the
--          old -> 'ok' (also when an earlier try did), or 'conflict' when the rank is at
--          neither id
--   'remove' worker, dp rank: unmap the rank and retire its id (and any id pending for
--          it) -> id, or false
--   'collected' id: the id's keys are gone everywhere -> 1
--   'gc': a model with no rank and nothing to collect goes to 'collecting' -> the tags,
--          or false
--   'drop': a collecting model's directory goes (the counter stays: ids never repeat)
-- Ids are never given out twice: a holder entry always means the rank that wrote it.
local slots, nextslot, slotver, subslots, retired, pending, state =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local MAX_SLOT_ID = 268435455
local op = ARGV[1]

local function new_id(ref)
  local n = redis.call('INCR', nextslot)
  if n - 1 > MAX_SLOT_ID then
    return redis.error_reply('model ' .. slots .. ' used every slot id (2^28)')
  end
  return tostring(n - 1)
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
  s = new_id(ref)
  if type(s) == 'table' then
    return s
  end
  redis.call('HSET', slots, ref, s)
  bump(ARGV[4])
  return {s, 1, tags}
elseif op == 'newid' then
  local ref = ARGV[2] .. '\n' .. ARGV[3]
  retire_pending(ref)
  local s = new_id(ref)
  if type(s) == 'table' then
    return s
  end
  redis.call('HSET', pending, s, ref)
  return s
elseif op == 'switch' then
  local ref = ARGV[2] .. '\n' .. ARGV[3]
  local now = redis.call('HGET', slots, ref)
  if now == ARGV[5] then
    return 'ok'  -- an earlier try switched it
  end
  if now ~= ARGV[4] then
    return 'conflict'
  end
  redis.call('HSET', slots, ref, ARGV[5])
  redis.call('HDEL', pending, ARGV[5])
  redis.call('HSET', retired, ARGV[4], ref)
  bump(nil)
  return 'ok'
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
    redis.call('DEL', slots, slotver, subslots, retired, pending, state, KEYS[8], KEYS[9])
    return 1
  end
  return 0
end
return redis.error_reply('unknown directory operation ' .. tostring(op))
