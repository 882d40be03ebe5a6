-- Records a lease if the task is unchanged since it was checked and carries no lock's mark,
-- and files it by expiry for the reaper.
-- A bucket without its epoch copy lost its data (or the store was reset): nothing is recorded,
-- and the broker starts a new epoch before anything is issued. A lease id recorded already (an
-- earlier attempt of the same request) is refused: -5. Needs lease.lua before it.
-- KEYS: task, task's leases, task's credentials, the bucket's expiry index, the bucket's epoch;
-- on one server (not a Cluster) also the agent's lock, so that a lock whose marking was cut
-- short (its broker died) holds here at once (on a Cluster the broker reads it first).
-- ARGV: version read, new version ('' when the task is unchanged), new task data, lease suffix
-- (8 bytes), lease record, credential field, expiry (ms, rounded up), expiry member (24 bytes),
-- the executor, now (ms).
-- Returns 1 when recorded; 0 when the task changed, -1 missing, -2 locked, -4 store reset,
-- -5 lease recorded already.
if redis.call('EXISTS', KEYS[5]) == 0 then return -4 end
if redis.call('HEXISTS', KEYS[2], ARGV[4]) == 1 then return -5 end
local v = redis.call('HGET', KEYS[1], 'v')
if not v then return -1 end
if v ~= ARGV[1] then return 0 end
if marked(KEYS[1], ARGV[10]) then return -2 end
if KEYS[6] and redis.call('EXISTS', KEYS[6]) == 1 then return -2 end
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], 'v', ARGV[2], 'data', ARGV[3], 'x', ARGV[9])
end
redis.call('HSET', KEYS[2], ARGV[4], ARGV[5])
redis.call('HSET', KEYS[3], ARGV[6], ARGV[4])
redis.call('ZADD', KEYS[4], ARGV[7], ARGV[8])
return 1
