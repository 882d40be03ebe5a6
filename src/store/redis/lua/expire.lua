-- Claims the leases of one bucket filed as due in its expiry index and ends as expired each
-- that is active, whose task has not ended and whose credential has expired; one filed under
-- an earlier expiry is filed again under its own. Only the caller whose ZREM removed an entry
-- acts on it, so each lease is ended once whatever the number of reapers. Needs lease.lua
-- before it.
-- KEYS: the bucket's expiry index, then for each lease: its task's leases, its task.
-- ARGV: now (8 bytes), then for each lease: its member (24 bytes), its suffix.
-- Returns `{i, executor, record, ...}` for the leases (by their place, from 1) this call ended.
local out = {}
for i = 1, (#KEYS - 1) / 2 do
  local tl, tk = KEYS[2 * i], KEYS[2 * i + 1]
  local m, s = ARGV[2 * i], ARGV[2 * i + 1]
  if redis.call('ZREM', KEYS[1], m) == 1 then
    local rec = redis.call('HGET', tl, s)
    if rec and string.byte(rec, 2) == 0 then
      if redis.call('HEXISTS', tk, 'le') == 1 then
        -- Its task has ended: the end revokes and logs this lease (in a chunk still to come),
        -- it does not expire. Filed again a second on, for the case the end's chunks are late.
        redis.call('ZADD', KEYS[1], string.format('%.0f', tonumber(ceil_ms(ARGV[1])) + 1000), m)
      else
        local exp = string.sub(rec, 4, 11)
        if later(exp, ARGV[1]) then
          redis.call('ZADD', KEYS[1], ceil_ms(exp), m)
        else
          local new = ended_record(rec, 2, exp, 'expired')
          redis.call('HSET', tl, s, new)
          out[#out + 1] = tostring(i)
          out[#out + 1] = task_agent(tk)
          out[#out + 1] = new
        end
      end
    end
  end
end
return out
