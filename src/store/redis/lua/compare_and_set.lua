-- Replaces the task if its version is still ARGV[1]; sets an expiry time when ARGV[4] is given.
-- KEYS: task, the executor's open tasks.
-- ARGV: version read, new version, new task data, expire-at ms ('' none), '1' when the task is now
-- terminal (it leaves the open tasks), task id.
-- Returns 1 when replaced, 0 when the version changed, -1 when the task is missing.
local v = redis.call('HGET', KEYS[1], 'v')
if not v then return -1 end
if v ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'data', ARGV[3])
if ARGV[4] ~= '' then redis.call('PEXPIREAT', KEYS[1], ARGV[4]) end
if ARGV[5] == '1' then redis.call('SREM', KEYS[2], ARGV[6]) end
return 1
