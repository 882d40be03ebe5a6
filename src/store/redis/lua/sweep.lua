-- One bounded step of a lock's sweep: takes up to `limit` of the agent's open tasks out of
-- their set (SPOP: each is taken by one sweeper) and ends those still open; then revokes up to
-- `limit` leases of the agent's ended live tasks (those this or an earlier step ended, or an
-- end left unfinished), in chunks (lease.lua `revoke_chunk`), whatever a task holds. Task
-- state changes are laid over the task's JSON as hash fields (`state`, `ended_ms`,
-- `end_reason`) and its version is bumped, so that concurrent compare-and-sets fail and
-- re-read; `le` ends its leases at once. A task ended
-- with leases or delegated children is filed due again, so that the reaper finishes what a
-- sweep leaves (an unlocked agent's sweep included). Needs lease.lua before it.
-- KEYS: the agent's open tasks, its live tasks, the expiry index, the revocation log,
-- the deadline index.
-- ARGV: ended ms, reason, expire-at ms for ended tasks, limit, the task, leases and
-- credentials key templates (keys.rs: `%s` is the task id), the due-again ms, ended (8 bytes,
-- ns), the agent.
-- Returns `{remaining, revoked task ids..., '|', task id, suffix, record, ...}`.
local limit = tonumber(ARGV[4])
local tasks, leases = {}, {}
-- Ends task `id` if it is still open (as a revocation by the lock); whether it was.
local function end_open(id)
  local tk = string.format(ARGV[5], id)
  local data = redis.call('HGET', tk, 'data')
  if not data then return false end
  local task = cjson.decode(data)
  local st = redis.call('HGET', tk, 'state') or task.state
  if st ~= 'pending_approval' and st ~= 'approved' then return false end
  local tl = string.format(ARGV[6], id)
  redis.call('HSET', tk, 'state', 'revoked', 'ended_ms', ARGV[1], 'end_reason', ARGV[2])
  redis.call('HINCRBY', tk, 'v', 1)
  if redis.call('HEXISTS', tk, 'le') == 0 then
    redis.call('HSET', tk, 'le', ARGV[9], 'lm', ARGV[1], 'lr', ARGV[2], 'rc', '0', 'x', ARGV[10])
  end
  redis.call('PEXPIREAT', tk, ARGV[3])
  redis.call('PEXPIREAT', tl, ARGV[3])
  redis.call('PEXPIREAT', string.format(ARGV[7], id), ARGV[3])
  local children = type(task.children) == 'table' and #task.children > 0
  if children or redis.call('EXISTS', tl) == 1 then
    redis.call('ZADD', KEYS[5], ARGV[8], id)
  end
  redis.call('SREM', KEYS[1], id)
  table.insert(tasks, id)
  return true
end
for _, id in ipairs(redis.call('SPOP', KEYS[1], limit)) do end_open(id) end
-- The leases: at most `limit` revoked, at most 8 tasks looked at (a task's history is
-- skipped over chunk by chunk, in later steps, never walked at once).
local budget = limit
for i = 1, 8 do
  if budget <= 0 then break end
  local id = tasks[i]
  if not id then id = redis.call('SRANDMEMBER', KEYS[2]) end
  if not id then break end
  local tk = string.format(ARGV[5], id)
  -- A live task not ended yet: an open one is left to a later step's SPOP; one that is not
  -- among the open ones is ended now (within the step's `limit` of tasks); one that ended
  -- before this layout (no `le`) holds none of this layout's leases.
  if redis.call('HEXISTS', tk, 'le') == 0 then
    if redis.call('SISMEMBER', KEYS[1], id) == 0 then
      if #tasks >= limit then break end
      if not end_open(id) then redis.call('SREM', KEYS[2], id) end
    end
  else
    local _, n = revoke_chunk(tk, string.format(ARGV[6], id), KEYS[3], KEYS[4], KEYS[2], id,
      budget, leases, true)
    budget = budget - n
  end
end
local out = {tostring(redis.call('SCARD', KEYS[1]) + redis.call('SCARD', KEYS[2]))}
for _, t in ipairs(tasks) do table.insert(out, t) end
table.insert(out, '|')
for _, l in ipairs(leases) do table.insert(out, l) end
return out
