-- Writes a new task unless one with its key exists, and files it among the executor's open tasks.
-- KEYS: task, the executor's open tasks. ARGV: task data (JSON), task id, executor.
-- Returns 1 when created, 0 when the task exists already.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'v', 1, 'data', ARGV[1], 'x', ARGV[3])
redis.call('SADD', KEYS[2], ARGV[2])
return 1
