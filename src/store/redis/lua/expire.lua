-- Claims one lease filed in the expiry index and ends it as expired if it is active and its
-- credential has expired; a lease renewed since is filed again under its new expiry. Only the
-- caller whose ZREM removed the entry acts, so each lease is ended once whatever the number
-- of reapers. Needs lease_agent.lua before it.
-- KEYS: expiry index, lease.
-- ARGV: member (`task/lease`), now (ns), the live-leases key template (keys.rs `LIVE_TEMPLATE`:
-- `%s` is the agent).
-- Returns 1 when this call ended the lease.
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('HGET', KEYS[2], 'state') ~= 'active' then return 0 end
local exp = tonumber(redis.call('HGET', KEYS[2], 'exp_ns'))
if not exp then return 0 end
if exp > tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], string.format('%.0f', math.ceil(exp / 1000000)), ARGV[1])
  return 0
end
redis.call('HSET', KEYS[2], 'state', 'expired', 'reason', 'expired',
  'ended_ms', string.format('%.0f', math.floor(exp / 1000000)))
local agent = lease_agent(KEYS[2])
if agent then redis.call('SREM', string.format(ARGV[3], agent), ARGV[1]) end
return 1
