-- Revokes one active lease (revoke.lua's step). Needs log_revocation.lua and revoke.lua before
-- it.
-- KEYS: lease, expiry index, the agent's live leases, revocation log.
-- ARGV: ended ms, reason, member (`task/lease`).
-- Returns 1 when revoked, 0 when the lease is not active, -1 when it is missing.
local st = redis.call('HGET', KEYS[1], 'state')
if not st then return -1 end
if st ~= 'active' then return 0 end
revoke_lease(KEYS[1], ARGV[3], ARGV[2], ARGV[1], KEYS[2], KEYS[4], KEYS[3])
return 1
