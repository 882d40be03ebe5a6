-- Deletes a claim only if it still holds the value given.
-- KEYS: claim. ARGV: value.
-- Returns the number of keys deleted (1 or 0).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
