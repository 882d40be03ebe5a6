-- The agent's half of one step of a lock's sweep: moves up to `limit` of its open tasks to the
-- tasks being swept (each taken by one sweeper: SPOP), and names up to `limit` of those to
-- work on now. The tasks' half is `sweep.lua`, bucket by bucket; a task leaves the swept ones
-- (SREM, by the caller) once ended with every lease revoked.
-- KEYS: the agent's open tasks, the tasks being swept.
-- ARGV: limit.
-- Returns `{open left, task ids...}`.
local limit = tonumber(ARGV[1])
local taken = redis.call('SPOP', KEYS[1], limit)
if #taken > 0 then redis.call('SADD', KEYS[2], unpack(taken)) end
local out = {tostring(redis.call('SCARD', KEYS[1]))}
for _, id in ipairs(redis.call('SRANDMEMBER', KEYS[2], limit)) do out[#out + 1] = id end
return out
