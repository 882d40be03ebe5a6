-- Files a task about to be created among its executor's open tasks, unless the executor is
-- locked: a locked agent gets no new task (what its lock's sweep would end). The first half of
-- a create (`create.lua` is the second, in the task's slot); see locks.rs for why this order
-- keeps a lock whole.
-- KEYS: the executor's lock, its open tasks.
-- ARGV: task id.
-- Returns `{'locked', lock JSON}` or `{'ok', now ms}` (this server's clock).
local lock = redis.call('GET', KEYS[1])
if lock then return {'locked', lock} end
redis.call('SADD', KEYS[2], ARGV[1])
local t = redis.call('TIME')
return {'ok', string.format('%.0f', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))}
