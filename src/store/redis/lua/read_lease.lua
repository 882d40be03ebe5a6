-- Reads one lease with what its task says of it, in one step: a lease of a task that has ended
-- is ended from that moment (the task's `le`), whatever its record says yet. Read only.
-- KEYS: task, task's leases, task's credentials.
-- ARGV: the lease suffix, or '' to find it by the credential field ARGV[2].
-- Returns false when there is no such lease (or task), else
-- `{suffix, record, executor, le or '', lr or ''}`.
local s = ARGV[1]
if s == '' then
  s = redis.call('HGET', KEYS[3], ARGV[2])
  if not s then return false end
end
local rec = redis.call('HGET', KEYS[2], s)
if not rec then return false end
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local f = redis.call('HMGET', KEYS[1], 'le', 'lr')
return {s, rec, task_agent(KEYS[1]), f[1] or '', f[2] or ''}
