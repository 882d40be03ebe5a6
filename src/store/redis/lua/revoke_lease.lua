-- Revokes one active lease (lease.lua `revoke`). A lease of a task that has ended is ended
-- already (its chunk revokes and logs it). Needs lease.lua before it.
-- KEYS: task, task's leases, expiry index, revocation log.
-- ARGV: lease suffix, task id, reason, ended (8 bytes, ns), ended ms.
-- Returns `{'missing'}`, `{'inactive'}` or `{'ok', executor, record}`.
local rec = redis.call('HGET', KEYS[2], ARGV[1])
if not rec or redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
if string.byte(rec, 2) ~= 0 or redis.call('HEXISTS', KEYS[1], 'le') == 1 then
  return {'inactive'}
end
local agent = task_agent(KEYS[1])
local new = revoke(KEYS[2], KEYS[3], KEYS[4], ARGV[2], uuid_bytes(ARGV[2]), agent, ARGV[1], rec,
  ARGV[3], ARGV[4], ARGV[5])
return {'ok', agent, new}
