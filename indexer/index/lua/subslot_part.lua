-- Waves 1 and 2 of a sub-slot model's apply (redis_sharded.py): the parts of several
-- ranks in one sub-slot. A part is the net change of one rank in this sub-slot from the
-- stored position `from` to the call's position `to`; positions are 16-byte tokens (the
-- rank's call counter, big-endian u64, then the writing process's 8-byte nonce) stored
-- in `pos` with a phase byte: 'c' clears done, 'd' done.
-- KEYS[1] the sub-slot's `blk` hash (KV-cache group 0), KEYS[2] its `pos` hash,
--         KEYS[2 + i] the pending-keys string `p:<id>` of part i, then the `blk<g>` hash
--         of each group g > 0 the parts change.
-- ARGV[1] the wave ('1' clears, '2' clears and sets), ARGV[1 + i] part i:
--   <I4 slot id> <c17 from (16 x '\0' then '-' when absent)> <c16 to>, then entries
--   <c8 key> <B KV-cache group> <B tier bits to clear> <B tier bits to set>
-- A part applies iff the stored position is `from` (wave 2: or `to` with clears done);
-- one already at `to` (wave 1: or past its clears) was applied by an earlier try and is
-- skipped; any other position is a conflict and nothing of that part is written.
-- Wave 2 records the part's set keys in `p:<id>`, so collecting an id names every entry
-- a call not yet committed to the rank's ledger may have written here.
-- Returns one status per part: 'ok' | 'skip' | 'conflict'.
local ABSENT = string.rep('\0', 16) .. '-'
local wave = ARGV[1]
local hashes = {[0] = KEYS[1]}  -- KV-cache group -> its presence hash here
for h = #ARGV + 2, #KEYS do
  hashes[tonumber(string.match(KEYS[h], 'blk(%d+)$'))] = KEYS[h]
end
local out = {}
for i = 2, #ARGV do
  local part = ARGV[i]
  local id, from, to = struct.unpack('<I4c17c16', part)
  local cur = redis.call('HGET', KEYS[2], id) or ABSENT
  local status
  if wave == '1' then
    if cur == from then
      status = 'ok'
    elseif cur == to .. 'c' or cur == to .. 'd' then
      status = 'skip'
    else
      status = 'conflict'
    end
  else
    if cur == from or cur == to .. 'c' then
      status = 'ok'
    elseif cur == to .. 'd' then
      status = 'skip'
    else
      status = 'conflict'
    end
  end
  if status == 'ok' then
    local changes, set_keys = {}, {}  -- group -> {keys, clears, sets}
    for pos = 38, #part, 11 do
      local key = string.sub(part, pos, pos + 7)
      local g, c, s = string.byte(part, pos + 8, pos + 10)
      if wave == '1' then
        s = 0
      end
      if c > 0 or s > 0 then
        local change = changes[g]
        if not change then
          if not hashes[g] then
            return redis.error_reply('KV-cache group ' .. g .. ' not declared')
          end
          change = {{}, {}, {}}
          changes[g] = change
        end
        local n = #change[1] + 1
        change[1][n], change[2][n], change[3][n] = key, c, s
      end
      if s > 0 then
        set_keys[#set_keys + 1] = key
      end
    end
    if wave == '2' and #set_keys > 0 then
      redis.call('SET', KEYS[2 + i - 1], table.concat(set_keys))
    elseif wave == '2' then
      redis.call('DEL', KEYS[2 + i - 1])
    end
    for g, change in pairs(changes) do
      sub_apply(hashes[g], id, change[1], change[2], change[3])
    end
    redis.call('HSET', KEYS[2], id, to .. (wave == '1' and 'c' or 'd'))
  end
  out[#out + 1] = status
end
return out
