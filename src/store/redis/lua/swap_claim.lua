-- Replaces a claim that still holds the expected value.
-- KEYS: claim. ARGV: expected, value, until (ms).
-- Returns 1 when it did.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PXAT', ARGV[3])
  return 1
end
return 0
