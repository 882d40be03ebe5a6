-- Gives an active, unexpired lease a new credential if its task is unchanged since it was
-- checked and the agent is not locked, in a store with its epoch marker (see issue.lua).
-- The previous credential is logged as revoked (superseded). Needs log_revocation.lua before it.
-- KEYS: task, lock, lease, new credential index, epoch, revocation log.
-- ARGV: task version read, new credential, new expiry, now (both ns since the epoch), lease id,
-- now (ms).
-- Returns 1 when renewed; 0 when the task changed, -1 missing, -2 locked, -3 lease no longer
-- active, -4 store reset.
if redis.call('EXISTS', KEYS[5]) == 0 then return -4 end
local v = redis.call('HGET', KEYS[1], 'v')
if not v then return -1 end
if v ~= ARGV[1] then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return -2 end
if redis.call('HGET', KEYS[3], 'state') ~= 'active' then return -3 end
local exp = tonumber(redis.call('HGET', KEYS[3], 'exp_ns'))
if not exp or exp <= tonumber(ARGV[4]) then return -3 end
log_revocation(KEYS[6], KEYS[3], 'superseded by renewal', ARGV[6])
redis.call('HSET', KEYS[3], 'cred', ARGV[2], 'exp_ns', ARGV[3])
redis.call('SET', KEYS[4], ARGV[5])
return 1
