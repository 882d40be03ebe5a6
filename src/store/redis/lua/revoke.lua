-- revoke_lease(lk, member, reason, at_ms, expiry, log, live): the one revocation step, shared by
-- revoke_lease.lua, end_task.lua and sweep.lua (prepended by scripts.rs, after
-- log_revocation.lua). The caller has checked that the lease at hash `lk` is active.
-- Marks it revoked (`state`, `ended_ms`, `reason`), takes `member` (`task/lease`) out of the
-- expiry index `expiry` (which so holds exactly the unrevoked leases) and, when `live` is given,
-- out of the agent's live leases (the sweep has popped it from there already), and logs the
-- revocation to `log`.
local function revoke_lease(lk, member, reason, at_ms, expiry, log, live)
  redis.call('HSET', lk, 'state', 'revoked', 'ended_ms', at_ms, 'reason', reason)
  redis.call('ZREM', expiry, member)
  if live then redis.call('SREM', live, member) end
  log_revocation(log, lk, reason, at_ms)
end
