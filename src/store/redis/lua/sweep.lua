-- One bounded step of a lock's sweep: takes up to `limit` of the agent's open tasks and up to
-- `limit` of its live leases out of their sets (SPOP: each is taken by one sweeper) and ends
-- those still open or active. Task state changes are laid over the task's JSON as hash fields
-- (`state`, `ended_ms`, `end_reason`) and its version is bumped, so that concurrent
-- compare-and-sets fail and re-read. Needs log_revocation.lua and revoke.lua before it.
-- KEYS: the agent's open tasks, its live leases, the expiry index, the revocation log, the
-- deadline index.
-- ARGV: ended ms, reason, expire-at ms for ended tasks, limit, the task key template and the
-- lease key prefix template (keys.rs `TASK_TEMPLATE`, `LEASE_PREFIX_TEMPLATE`: `%s` is the task
-- id), the due-again ms of an ended task with delegated children (the reaper ends what is
-- below it).
-- Returns `{remaining, revoked task ids..., '|', 'task/lease' of revoked leases...}`.
local tasks, leases = {}, {}
for _, id in ipairs(redis.call('SPOP', KEYS[1], ARGV[4])) do
  local tk = string.format(ARGV[5], id)
  local data = redis.call('HGET', tk, 'data')
  if data then
    local task = cjson.decode(data)
    local st = redis.call('HGET', tk, 'state') or task.state
    if st == 'pending_approval' or st == 'approved' then
      redis.call('HSET', tk, 'state', 'revoked', 'ended_ms', ARGV[1], 'end_reason', ARGV[2])
      redis.call('HINCRBY', tk, 'v', 1)
      redis.call('PEXPIREAT', tk, ARGV[3])
      if type(task.children) == 'table' and #task.children > 0 then
        redis.call('ZADD', KEYS[5], ARGV[7], id)
      end
      table.insert(tasks, id)
    end
  end
end
for _, m in ipairs(redis.call('SPOP', KEYS[2], ARGV[4])) do
  local slash = string.find(m, '/', 1, true)
  if slash then
    local id, lid = string.sub(m, 1, slash - 1), string.sub(m, slash + 1)
    local lk = string.format(ARGV[6], id) .. lid
    if redis.call('HGET', lk, 'state') == 'active' then
      -- No live set: the SPOP above took the member out of it.
      revoke_lease(lk, m, ARGV[2], ARGV[1], KEYS[3], KEYS[4])
      table.insert(leases, m)
    end
  end
end
local out = {tostring(redis.call('SCARD', KEYS[1]) + redis.call('SCARD', KEYS[2]))}
for _, t in ipairs(tasks) do table.insert(out, t) end
table.insert(out, '|')
for _, l in ipairs(leases) do table.insert(out, l) end
return out
