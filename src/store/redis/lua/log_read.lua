-- Reads one bucket's revocation log after a place (or only its last entry), with this
-- server's clock: every entry logged later has an id at or after that time (a stream's ids grow
-- with its server's clock), which is what lets `log.rs` merge the buckets' logs under one
-- cursor. Read only.
-- KEYS: the bucket's revocation log.
-- ARGV: the first id to read (inclusive; '' for the last entry only), the most entries.
-- Returns `{seconds, microseconds, entries}` (entries as XRANGE gives them).
local t = redis.call('TIME')
if ARGV[1] == '' then
  return {t[1], t[2], redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)}
end
return {t[1], t[2], redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])}
