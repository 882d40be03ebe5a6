-- Records a lease if the task is unchanged since it was checked and the agent is not locked,
-- and files it by expiry for the reaper.
-- A store without its epoch marker was reset (its data lost): nothing is recorded, and the broker
-- starts a new epoch before anything is issued. A lease id recorded already (an earlier
-- attempt of the same request) is refused: -5.
-- KEYS: task, lock, lease, task's lease set, credential index, lease index, expiry index, epoch,
-- the agent's live leases.
-- ARGV: version read, new version ('' when the task is unchanged), new task data, lease JSON,
-- lease id, credential id, expiry (ns since the epoch), task id, expiry (ms, rounded up), agent.
-- Returns 1 when recorded; 0 when the task changed, -1 missing, -2 locked, -4 store reset,
-- -5 lease recorded already. Members `task/lease` are built as keys.rs `member` builds them.
if redis.call('EXISTS', KEYS[8]) == 0 then return -4 end
if redis.call('EXISTS', KEYS[6]) == 1 then return -5 end
local v = redis.call('HGET', KEYS[1], 'v')
if not v then return -1 end
if v ~= ARGV[1] then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return -2 end
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'v', ARGV[2], 'data', ARGV[3]) end
redis.call('HSET', KEYS[3], 'data', ARGV[4], 'state', 'active', 'cred', ARGV[6], 'exp_ns', ARGV[7],
  'agent', ARGV[10])
redis.call('SADD', KEYS[4], ARGV[5])
redis.call('SADD', KEYS[9], ARGV[8] .. '/' .. ARGV[5])
redis.call('SET', KEYS[5], ARGV[5])
redis.call('SET', KEYS[6], ARGV[8])
redis.call('ZADD', KEYS[7], ARGV[9], ARGV[8] .. '/' .. ARGV[5])
return 1
