-- Holder lists of a sub-slot model (redis_sharded.py), prepended to the sub-slot scripts.
-- A value is the sorted list of u32 little-endian entries `slot_id * 16 + tier bits`, as
-- in holders.lua, kept in one plain hash per sub-slot (`blk`). Self-contained so that
-- the single-slot layout's placement code can change without touching these scripts.
local function sub_find(v, id)
  -- The 0-based index of `id`'s entry and the entry, or the insertion index and nil.
  local lo, hi = 0, #v / 4
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    local e = struct.unpack('<I4', v, mid * 4 + 1)
    local s = math.floor(e / 16)
    if s < id then
      lo = mid + 1
    elseif s > id then
      hi = mid
    else
      return mid, e
    end
  end
  return lo, nil
end

-- `v` (or false: no holder) with `id`'s tier bits: cleared where `clear` says, then set
-- where `set` says. Returns the new value ('' when no holder is left).
local function sub_change(v, id, clear, set)
  v = v or ''
  local i, e = sub_find(v, id)
  local tiers = 0
  if e then
    tiers = e % 16
  end
  local now = bit.bor(bit.band(tiers, 15 - clear), set)
  if now == tiers then
    return v
  end
  local tail = string.sub(v, i * 4 + (e and 5 or 1))
  if now == 0 then
    return string.sub(v, 1, i * 4) .. tail
  end
  return string.sub(v, 1, i * 4) .. struct.pack('<I4', id * 16 + now) .. tail
end

-- Change many keys of the hash `blk`: `keys[i]` gets (clears[i], sets[i]) for holder `id`.
-- Read with one HMGET and written with one HSET and one HDEL per chunk of keys.
local SUB_CHUNK = 512
local function sub_apply(blk, id, keys, clears, sets)
  for first = 1, #keys, SUB_CHUNK do
    local last = math.min(first + SUB_CHUNK - 1, #keys)
    local values = redis.call('HMGET', blk, unpack(keys, first, last))
    local put, gone = {}, {}
    for j = first, last do
      local old = values[j - first + 1]
      local new = sub_change(old, id, clears[j], sets[j])
      if new == '' then
        if old then
          gone[#gone + 1] = keys[j]
        end
      elseif new ~= old then
        put[#put + 1] = keys[j]
        put[#put + 1] = new
      end
    end
    if #put > 0 then
      redis.call('HSET', blk, unpack(put))
    end
    if #gone > 0 then
      redis.call('HDEL', blk, unpack(gone))
    end
  end
end
