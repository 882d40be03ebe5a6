-- Ends a task and revokes every active lease in its set (revoke.lua's step), atomically. Needs
-- log_revocation.lua and revoke.lua before it.
-- KEYS: task, task's lease set, expiry index, the executor's live leases, the executor's open
-- tasks, revocation log, deadline index.
-- ARGV: version read, new version, new task data, expire-at ms ('' for none), ended ms, reason,
-- lease key prefix, credential key prefix, task id, due-again ms ('' for none: a task with
-- delegated children is filed due again, so that the reaper ends what is below it).
-- Returns `{'missing'}`, `{'conflict'}`, or `{'ok', revoked lease ids...}`.
local v = redis.call('HGET', KEYS[1], 'v')
if not v then return {'missing'} end
if v ~= ARGV[1] then return {'conflict'} end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'data', ARGV[3])
local revoked = {'ok'}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local lk = ARGV[7] .. id
  if redis.call('HGET', lk, 'state') == 'active' then
    revoke_lease(lk, ARGV[9] .. '/' .. id, ARGV[6], ARGV[5], KEYS[3], KEYS[6], KEYS[4])
    table.insert(revoked, id)
  end
  if ARGV[4] ~= '' then
    redis.call('PEXPIREAT', lk, ARGV[4])
    local cred = redis.call('HGET', lk, 'cred')
    if cred then redis.call('PEXPIREAT', ARGV[8] .. cred, ARGV[4]) end
  end
end
if ARGV[4] ~= '' then
  redis.call('PEXPIREAT', KEYS[1], ARGV[4])
  redis.call('PEXPIREAT', KEYS[2], ARGV[4])
end
redis.call('SREM', KEYS[5], ARGV[9])
if ARGV[10] ~= '' then redis.call('ZADD', KEYS[7], ARGV[10], ARGV[9]) end
return revoked
