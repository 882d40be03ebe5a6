-- Gives an active, unexpired lease a new credential if its task is unchanged since it was
-- checked and carries no lock's mark, in a bucket with its epoch copy (see issue.lua), and
-- files it under its new expiry. The previous credential is logged as revoked (superseded).
-- Needs lease.lua before it.
-- KEYS: task, task's leases, task's credentials, the bucket's epoch, revocation log and expiry
-- index; on one server also the agent's lock (see issue.lua).
-- ARGV: task version read, lease suffix, new credential field, new expiry (8 bytes), now
-- (8 bytes), now (ms), task id, new expiry (ms, rounded up), expiry member.
-- Returns `{'ok', executor, record}`, or `{code}`: 0 the task changed, -1 missing, -2 locked,
-- -3 lease no longer active, -4 store reset.
if redis.call('EXISTS', KEYS[4]) == 0 then return {'-4'} end
local v = redis.call('HGET', KEYS[1], 'v')
if not v then return {'-1'} end
if v ~= ARGV[1] then return {'0'} end
if marked(KEYS[1], ARGV[6]) then return {'-2'} end
if KEYS[7] and redis.call('EXISTS', KEYS[7]) == 1 then return {'-2'} end
local rec = redis.call('HGET', KEYS[2], ARGV[2])
if not rec then return {'-1'} end
if string.byte(rec, 2) ~= 0 or redis.call('HEXISTS', KEYS[1], 'le') == 1 then return {'-3'} end
if not later(string.sub(rec, 4, 11), ARGV[5]) then return {'-3'} end
local agent = task_agent(KEYS[1])
log_revocation(KEYS[5], rec, ARGV[2], ARGV[7], agent, 'superseded by renewal', ARGV[6])
local n = string.byte(rec, 28) % 128
local new = string.sub(rec, 1, 3) .. ARGV[4] .. string.sub(rec, 12, 27) .. ARGV[3] ..
  string.sub(rec, 29 + n)
redis.call('HSET', KEYS[2], ARGV[2], new)
redis.call('HSET', KEYS[3], ARGV[3], ARGV[2])
redis.call('ZADD', KEYS[6], ARGV[8], ARGV[9])
return {'ok', agent, new}
