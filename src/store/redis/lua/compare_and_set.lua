-- Replaces the task if its version is still ARGV[1]; sets an expiry time when ARGV[4] is given.
-- A task this makes terminal has its leases ended with it (`le`, as end_task.lua does; a
-- task ended this way normally has none): its chunks are left to the reaper, which re-ends it
-- at its deadline.
-- KEYS: task, task's leases, task's credentials.
-- ARGV: version read, new version, new task data, expire-at ms ('' none), '1' when the task is now
-- terminal (the caller then takes it out of its executor's open tasks), task id, ended (8 bytes,
-- ns), ended ms, reason.
-- Returns 1 when replaced, 0 when the version changed, -1 when the task is missing.
local v = redis.call('HGET', KEYS[1], 'v')
if not v then return -1 end
if v ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'data', ARGV[3])
if ARGV[4] ~= '' then
  for i = 1, 3 do redis.call('PEXPIREAT', KEYS[i], ARGV[4]) end
end
if ARGV[5] == '1' then
  if redis.call('HEXISTS', KEYS[1], 'le') == 0 then
    redis.call('HSET', KEYS[1], 'le', ARGV[7], 'lm', ARGV[8], 'lr', ARGV[9], 'rc', '0')
  end
end
return 1
