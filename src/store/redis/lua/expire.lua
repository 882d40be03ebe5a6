-- Claims one lease filed in the expiry index and ends it as expired if it is active, its task
-- has not ended and its credential has expired; one filed under an earlier expiry is filed again under its own.
-- Only the caller whose ZREM removed the entry acts, so each lease is ended once whatever the
-- number of reapers. Needs lease.lua before it.
-- KEYS: expiry index, the task's leases, the task.
-- ARGV: member (24 bytes), lease suffix, now (8 bytes).
-- Returns `{executor, record}` when this call ended the lease, else false.
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return false end
local rec = redis.call('HGET', KEYS[2], ARGV[2])
if not rec or string.byte(rec, 2) ~= 0 then return false end
if redis.call('HEXISTS', KEYS[3], 'le') == 1 then
  -- Its task has ended: the end revokes and logs this lease (in a chunk still to come), it
  -- does not expire. Filed again a second on, for the case the end's chunks are late.
  redis.call('ZADD', KEYS[1], string.format('%.0f', tonumber(ceil_ms(ARGV[3])) + 1000), ARGV[1])
  return false
end
local exp = string.sub(rec, 4, 11)
if later(exp, ARGV[3]) then
  redis.call('ZADD', KEYS[1], ceil_ms(exp), ARGV[1])
  return false
end
local new = ended_record(rec, 2, exp, 'expired')
redis.call('HSET', KEYS[2], ARGV[2], new)
return {task_agent(KEYS[3]), new}
