-- Locks an agent: the lock key, in the agent's slot (what task creation checks, and
-- introspection reads). A lock in force that ends later (or never) stays as it is: locks only
-- grow. The caller then marks the agent's open tasks (`mark.lua`) before it answers.
-- KEYS: lock.
-- ARGV: lock JSON, now ms, lock expiry ms ('' none).
-- Returns the lock in force (JSON).
local cur = redis.call('GET', KEYS[1])
local keep = false
if cur then
  local pttl = redis.call('PTTL', KEYS[1])
  if pttl == -1 then keep = true
  elseif pttl > 0 and ARGV[3] ~= '' and tonumber(ARGV[2]) + pttl >= tonumber(ARGV[3]) then
    keep = true
  end
end
if not keep then
  redis.call('SET', KEYS[1], ARGV[1])
  if ARGV[3] ~= '' then redis.call('PEXPIREAT', KEYS[1], ARGV[3]) end
  cur = ARGV[1]
end
return cur
