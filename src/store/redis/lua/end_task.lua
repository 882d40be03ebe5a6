-- Ends a task and, in the same step, the first chunk of its leases (lease.lua `revoke_chunk`):
-- from this step on every lease of it reads as ended (`le`); the rest of the records, index
-- entries and log entries follow in `end_chunk.lua` steps. A task whose chunks are unfinished
-- after this step is filed due again (ARGV[12]) so that the reaper finishes them if its ender
-- cannot. Needs lease.lua before it.
-- The caller then takes the task out of its executor's open tasks (another slot).
-- KEYS: task, task's leases, task's credentials, the bucket's expiry index, revocation log and
-- deadline index.
-- ARGV: version read, new version, new task data, expire-at ms ('' for none), ended (8 bytes,
-- ns), ended ms, reason, task id, due-again ms ('' for none: a task with delegated children is
-- filed due again, so that the reaper ends what is below it), chunk size, the executor,
-- due-again ms of unfinished chunks.
-- Returns `{'missing'}`, `{'conflict'}`, or `{'ok', '1' done | '0', suffix, record, ...}`.
local v = redis.call('HGET', KEYS[1], 'v')
if not v then return {'missing'} end
if v ~= ARGV[1] then return {'conflict'} end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'data', ARGV[3])
if redis.call('HEXISTS', KEYS[1], 'le') == 0 then
  redis.call('HSET', KEYS[1], 'le', ARGV[5], 'lm', ARGV[6], 'lr', ARGV[7], 'rc', '0', 'x', ARGV[11])
end
if ARGV[4] ~= '' then
  for i = 1, 3 do redis.call('PEXPIREAT', KEYS[i], ARGV[4]) end
end
if ARGV[9] ~= '' then redis.call('ZADD', KEYS[6], ARGV[9], ARGV[8]) end
local out = {'ok', '1'}
local done = revoke_chunk(KEYS[1], KEYS[2], KEYS[4], KEYS[5], ARGV[8], tonumber(ARGV[10]), out,
  false)
if not done then
  out[2] = '0'
  redis.call('ZADD', KEYS[6], ARGV[12], ARGV[8])
end
return out
