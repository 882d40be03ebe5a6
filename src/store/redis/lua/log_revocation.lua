-- log_revocation(log, lk, reason, at_ms): a helper the revoking scripts begin with (prepended by
-- scripts.rs). Appends the revocation of the lease at hash `lk` (its current credential and
-- expiry) to the revocation log `log` (a stream: keys.rs `REVOCATIONS`), in the same script, so
-- that an entry exists exactly when the revocation happened. Does nothing for a missing lease.
local function log_revocation(log, lk, reason, at_ms)
  local f = redis.call('HMGET', lk, 'data', 'cred', 'exp_ns')
  if not f[1] then return end
  local d = cjson.decode(f[1])
  local aud = d.audience
  if type(aud) ~= 'string' then aud = '' end
  redis.call('XADD', log, '*', 'lease', d.id, 'task', d.task, 'agent', d.agent,
    'kind', d.kind, 'cred', f[2] or d.credential, 'aud', aud, 'exp_ns', f[3], 'reason', reason,
    'at_ms', at_ms)
end
