-- Replaces a value that still holds the expected one (no expiry).
-- KEYS: the key. ARGV: expected, value.
-- Returns 1 when it did.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return 1
end
return 0
