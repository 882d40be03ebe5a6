-- The tasks' half of one bounded step of a lock's sweep (see `sweep_take.lua`), for tasks of
-- one bucket: ends each that is still open (as a revocation by the lock), then revokes up to
-- `budget` leases of those that have ended, in chunks (lease.lua `revoke_chunk`), whatever a
-- task holds. Task state changes are laid over the task's JSON as hash fields (`state`,
-- `ended_ms`, `end_reason`) and its version is bumped, so that concurrent compare-and-sets fail
-- and re-read; `le` ends its leases at once. A task ended with leases or delegated children is
-- filed due again, so that the reaper finishes what a sweep leaves. Needs lease.lua before it.
-- KEYS: the bucket's expiry index, revocation log and deadline index, then for each task: the
-- task, its leases, its credentials.
-- ARGV: ended ms, reason, expire-at ms for ended tasks, budget, the due-again ms, ended (8
-- bytes, ns), the agent, then the task ids (one per key triple).
-- Returns `{ended task ids..., '|', finished task ids..., '|', task id, suffix, record, ...}`:
-- finished ones have ended with every lease revoked (or no longer exist).
local budget = tonumber(ARGV[4])
local ended, finished, leases = {}, {}, {}
for i = 1, (#KEYS - 3) / 3 do
  local tk, tl, tc = KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3]
  local id = ARGV[7 + i]
  local data = redis.call('HGET', tk, 'data')
  if not data then
    finished[#finished + 1] = id
  else
    local task = cjson.decode(data)
    local st = redis.call('HGET', tk, 'state') or task.state
    if st == 'pending_approval' or st == 'approved' then
      redis.call('HSET', tk, 'state', 'revoked', 'ended_ms', ARGV[1], 'end_reason', ARGV[2])
      redis.call('HINCRBY', tk, 'v', 1)
      if redis.call('HEXISTS', tk, 'le') == 0 then
        redis.call('HSET', tk, 'le', ARGV[6], 'lm', ARGV[1], 'lr', ARGV[2], 'rc', '0', 'x', ARGV[7])
      end
      redis.call('PEXPIREAT', tk, ARGV[3])
      redis.call('PEXPIREAT', tl, ARGV[3])
      redis.call('PEXPIREAT', tc, ARGV[3])
      local children = type(task.children) == 'table' and #task.children > 0
      if children or redis.call('EXISTS', tl) == 1 then
        redis.call('ZADD', KEYS[3], ARGV[5], id)
      end
      ended[#ended + 1] = id
    end
    if redis.call('HEXISTS', tk, 'le') == 0 then
      -- Ended before the lease end existed (no lease of this layout): nothing to revoke.
      finished[#finished + 1] = id
    elseif budget > 0 then
      local done, n = revoke_chunk(tk, tl, KEYS[1], KEYS[2], id, budget, leases, true)
      budget = budget - n
      if done then finished[#finished + 1] = id end
    end
  end
end
local out = ended
out[#out + 1] = '|'
for _, id in ipairs(finished) do out[#out + 1] = id end
out[#out + 1] = '|'
for _, l in ipairs(leases) do out[#out + 1] = l end
return out
