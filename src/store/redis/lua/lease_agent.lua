-- lease_agent(lk): a helper (prepended by scripts.rs). The agent of the lease at hash `lk`: its
-- `agent` field; older leases only have it in their JSON. nil for a missing lease.
local function lease_agent(lk)
  local a = redis.call('HGET', lk, 'agent')
  if a then return a end
  local d = redis.call('HGET', lk, 'data')
  if d then return cjson.decode(d).agent end
  return nil
end
