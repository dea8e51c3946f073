-- Claim a slot id in one sub-slot of a sub-slot model (redis_sharded.py): this sub-slot's
-- copy of the id counter, `nextslot` under its own hash tag, so that a master restored
-- from an older dump (the directory's counter rolled back) cannot give an id out again
-- while any other master keeps the copies raised past it.
-- KEYS[1] the sub-slot's `nextslot`: "<the lowest id never claimed here> <claimer>"
-- ARGV[1] the id, ARGV[2] the claimer (random per claim: a resent claim is recognised)
-- The claim holds iff no id >= it was claimed here: the copy is raised to id + 1.
-- Returns 0 (claimed, also when an earlier try of this claim did), else the copy: the
-- caller claims again from there.
local want = tonumber(ARGV[1])
local raw = redis.call('GET', KEYS[1])
local floor, by = 0, ''
if raw then
  local sep = string.find(raw, ' ', 1, true)
  floor, by = tonumber(string.sub(raw, 1, sep - 1)), string.sub(raw, sep + 1)
end
if floor <= want then
  redis.call('SET', KEYS[1], tostring(want + 1) .. ' ' .. ARGV[2])
  return 0
end
if floor == want + 1 and by == ARGV[2] then
  return 0
end
return floor
