-- Writes a new task unless one with its key exists, and files it by deadline. The task was
-- first filed among its executor's open tasks (`enrol.lua`, in the agent's slot) at `enrolled`
-- (ms, that server's clock): a lock taken since has marked the task's key (keys.rs `lk`), and
-- the task is not written. The mark on a task not yet written lives `MARK_TTL` (locks.rs): a
-- create later than `CREATE_WITHIN` ms after its enrolment is refused, so that it never
-- outlives the mark.
-- KEYS: task, the bucket's deadline index.
-- ARGV: task data (JSON), task id, executor, deadline (ms, rounded up), enrolled (ms),
-- `CREATE_WITHIN` (ms).
-- Returns 1 when created, 0 when the task exists already, -2 when a lock marked it, -3 when
-- too late.
if redis.call('HEXISTS', KEYS[1], 'v') == 1 then return 0 end
if redis.call('HEXISTS', KEYS[1], 'lk') == 1 then return -2 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now - tonumber(ARGV[5]) > tonumber(ARGV[6]) then return -3 end
redis.call('HSET', KEYS[1], 'v', 1, 'data', ARGV[1], 'x', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[2])
return 1
