-- A KV-cache group's spec ("kind\nwindow") in a model's `groups` hash, merged: the
-- strictest rule any worker named stays (indexer.index.hybrid.spec_strictness, whose
-- order this repeats: a bare group > 0 < mamba < sliding window, larger windows stricter
-- < full, every other kind and a bare group 0). A worker can so make a group's rule stricter (fewer hits for
-- others), never looser (hits others' caches do not hold).
-- KEYS[1] the groups hash; ARGV[1] the group; ARGV[2] its spec. Returns 1 if written.
local function strictness(spec)
  if not spec then return -2, 0 end
  local kind, window = string.match(spec, '^(.-)\n(%d*)$')
  if not kind then return 2, 0 end
  window = tonumber(window) or 0
  if kind == '' and window == 0 then
    if ARGV[1] == '0' then return 2, 0 end  -- group 0 bare: full attention
    return -1, 0
  end
  if kind == 'mamba' then return 0, 0 end
  if (kind == 'sliding_window' or kind == 'sliding_window_mla') and window > 0 then
    return 1, window
  end
  return 2, 0
end
local old = redis.call('HGET', KEYS[1], ARGV[1])
local old_rank, old_window = strictness(old)
local new_rank, new_window = strictness(ARGV[2])
if new_rank > old_rank or (new_rank == old_rank and new_window > old_window) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
return 0
