-- One more bounded chunk of the revocation of an ended task's leases (lease.lua
-- `revoke_chunk`): what an end_task.lua step left, continued by its ender, by a repeated end
-- or by the reaper. Needs lease.lua before it.
-- KEYS: task, task's leases, the bucket's expiry index and revocation log.
-- ARGV: task id, chunk size.
-- Returns `{'1' done | '0', executor, suffix, record, ...}`.
local out = {'1', task_agent(KEYS[1])}
local done = revoke_chunk(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], tonumber(ARGV[2]), out,
  false)
if not done then out[1] = '0' end
return out
