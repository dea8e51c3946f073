-- Wave 3 of a sub-slot model's apply (redis_sharded.py): a rank's ledger in its home
-- sub-slot, moved from the committed token `expected` to `to` iff it is at `expected`.
-- KEYS[1] the rank's `w:<id>:meta`, KEYS[2] its `w:<id>:log`.
-- ARGV: expected token ('' for a rank never written), new token, position (epoch, seq:
-- big-endian i64 x2), ts, n0, n1, n2, n3, degraded ('0'|'1'), worker id, dp rank, log
-- segment, replace ('1': the segment replaces the log), the rank's position in each
-- sub-slot after this call (17 bytes each: what a reader of the rank must find there),
-- the shared storage pools the rank wrote into since its last gap (names, one a line).
-- Returns 'ok', 'skip' (already at the new token: an earlier try ran) or 'conflict'.
local cur = redis.call('HGET', KEYS[1], 'tok') or ''
if cur == ARGV[2] then
  return 'skip'
end
if cur ~= ARGV[1] then
  return 'conflict'
end
redis.call('HSET', KEYS[1], 'tok', ARGV[2], 'pos', ARGV[3], 'ts', ARGV[4], 'n0', ARGV[5],
  'n1', ARGV[6], 'n2', ARGV[7], 'n3', ARGV[8], 'degraded', ARGV[9], 'worker', ARGV[10],
  'rank', ARGV[11], 'subs', ARGV[14], 'pools', ARGV[15])
if ARGV[13] == '1' then
  redis.call('SET', KEYS[2], ARGV[12])
elseif #ARGV[12] > 0 then
  redis.call('APPEND', KEYS[2], ARGV[12])
end
return 'ok'
