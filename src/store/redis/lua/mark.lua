-- Copies an agent's lock into tasks of one bucket (keys.rs `lk`: the lock's end in ms, '0' for
-- none; a mark only grows), where issuance and renewal check it in their own step. A task not
-- written yet (filed among the open tasks, its create to come) gets a mark of its own that
-- expires after ARGV[2] ms: its create sees it and is refused.
-- KEYS: the tasks.
-- ARGV: the lock's end (ms, '0' none), the lifetime of a mark on a task not written yet (ms).
-- Returns how many tasks it marked.
for _, tk in ipairs(KEYS) do
  local cur = redis.call('HGET', tk, 'lk')
  local new = ARGV[1]
  if cur == '0' or (cur and new ~= '0' and tonumber(cur) > tonumber(new)) then new = cur end
  redis.call('HSET', tk, 'lk', new)
  if redis.call('HEXISTS', tk, 'v') == 0 then redis.call('PEXPIRE', tk, ARGV[2]) end
end
return #KEYS
