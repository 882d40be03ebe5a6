-- Helpers prepended (by scripts.rs) to the scripts that read or end lease records. A record is
-- codec.rs `encode_record`: byte 1 the version, 2 the state (0 active, 1 revoked, 2 expired),
-- 3 the kind (0 jwt, 1 x509), 4..11 the expiry (ns, big-endian), 12..19 issued, 20..27 the
-- renewal ceiling, 28 the credential's head byte (0x80 | n: n raw bytes of hex; else n bytes
-- of text), then the credential, the audience (0 none, or 1 and a 2-byte length), the rest; an ended
-- record has its end (8 bytes, ns) and reason (2-byte length, text) after all that.

-- The 16 bytes of a canonical task id.
local function uuid_bytes(id)
  return (string.gsub(string.gsub(id, '-', ''), '..', function(h)
    return string.char(tonumber(h, 16))
  end))
end

-- The first 4 and last 4 bytes of an 8-byte big-endian time, as numbers (exact in a double).
local function halves(t)
  local a, b, c, d, e, f, g, h = string.byte(t, 1, 8)
  return ((a * 256 + b) * 256 + c) * 256 + d, ((e * 256 + f) * 256 + g) * 256 + h
end

-- Whether 8-byte time `a` is after `b`.
local function later(a, b)
  local ah, al = halves(a)
  local bh, bl = halves(b)
  return ah > bh or (ah == bh and al > bl)
end

-- The 8-byte time `t` in ms, rounded up, as a decimal string (exact: no 64-bit arithmetic).
local function ceil_ms(t)
  local hi, lo = halves(t)
  -- 2^32 = 4294 * 10^6 + 967296
  local rest = hi * 967296 + lo
  local ms = hi * 4294 + math.floor(rest / 1000000)
  if rest % 1000000 ~= 0 then ms = ms + 1 end
  return string.format('%.0f', ms)
end

-- The executor of task hash `tk`: its `x` field; tasks of earlier layouts have it in their JSON.
local function task_agent(tk)
  local x = redis.call('HGET', tk, 'x')
  if x then return x end
  local d = redis.call('HGET', tk, 'data')
  if d then return cjson.decode(d).executor end
  return ''
end

-- Whether task hash `tk` carries a lock's mark (keys.rs `lk`: the lock's end in ms, '0' for
-- none) that holds at `now_ms`.
local function marked(tk, now_ms)
  local lk = redis.call('HGET', tk, 'lk')
  return lk ~= false and (lk == '0' or tonumber(lk) > tonumber(now_ms))
end

-- Appends the revocation of the credential in record `rec` (as it was, active) of lease
-- `suffix` of `task` to the log `log` (a stream: the bucket's `rev`, keys.rs), in the revoking script
-- itself, so that an entry exists exactly when the revocation happened. The entry holds the
-- record itself (codec.rs reads the credential, kind, audience and expiry from it): nothing is
-- decoded or formatted per lease here.
local function log_revocation(log, rec, suffix, task, agent, reason, at_ms)
  redis.call('XADD', log, '*', 'task', task, 's', suffix, 'agent', agent, 'r', rec,
    'reason', reason, 'at_ms', at_ms)
end

-- Record `rec` (active) ended with `state` (1 revoked, 2 expired) at `ended` (8 bytes), for
-- `reason`.
local function ended_record(rec, state, ended, reason)
  local n = #reason
  return string.sub(rec, 1, 1) .. string.char(state) .. string.sub(rec, 3) .. ended ..
    string.char(math.floor(n / 256), n % 256) .. reason
end

-- The one revocation step: the active lease `suffix` of task `task` (its 16 bytes `task16`,
-- its leases hash `tl`, its executor `agent`), record `rec`, is marked revoked, taken out of
-- the expiry index `exp` (which so holds exactly the unrevoked leases) and logged. Returns the
-- new record.
local function revoke(tl, exp, log, task, task16, agent, suffix, rec, reason, ended, at_ms)
  local new = ended_record(rec, 1, ended, reason)
  redis.call('HSET', tl, suffix, new)
  redis.call('ZREM', exp, task16 .. suffix)
  log_revocation(log, rec, suffix, task, agent, reason, at_ms)
  return new
end

-- One bounded chunk of the revocation of an ended task's leases: from the task's saved `HSCAN`
-- cursor (`rc`), revokes at most `budget` of the active leases the scan returns (with the end
-- `le`, `lm`, `lr` the task holds), appending `suffix, record` (preceded by the task id when
-- `tagged`) to `out`. The cursor moves on only once every lease of its batch is handled, so a
-- batch cut short by the budget is scanned again (the leases revoked are then skipped).
-- Returns whether nothing is left (true for a task that no longer exists, false for one that
-- has not ended) and how many it revoked.
local function revoke_chunk(tk, tl, exp, log, task, budget, out, tagged)
  local f = redis.call('HMGET', tk, 'rc', 'le', 'lm', 'lr', 'v')
  local cur, ended, at_ms, reason = f[1], f[2], f[3], f[4] or ''
  if not f[5] then return true, 0 end
  if not ended then return false, 0 end
  if not cur then return true, 0 end
  local agent = task_agent(tk)
  local task16 = uuid_bytes(task)
  local scan = redis.call('HSCAN', tl, cur, 'COUNT', budget)
  local items = scan[2]
  local n, whole = 0, true
  -- The chunk's records and index entries are written by one HSET and one ZREM (a variadic
  -- ZREM costs a third of one call per member); each log entry is its own XADD.
  local records, members = {}, {}
  for i = 1, #items, 2 do
    local rec = items[i + 1]
    if string.byte(rec, 2) == 0 then
      if n >= budget then
        whole = false
        break
      end
      local suffix = items[i]
      local new = ended_record(rec, 1, ended, reason)
      records[#records + 1] = suffix
      records[#records + 1] = new
      members[#members + 1] = task16 .. suffix
      log_revocation(log, rec, suffix, task, agent, reason, at_ms)
      if tagged then out[#out + 1] = task end
      out[#out + 1] = suffix
      out[#out + 1] = new
      n = n + 1
    end
  end
  if n > 0 then
    redis.call('HSET', tl, unpack(records))
    redis.call('ZREM', exp, unpack(members))
  end
  if whole then
    if scan[1] == '0' then
      redis.call('HDEL', tk, 'rc')
      return true, n
    end
    redis.call('HSET', tk, 'rc', scan[1])
  end
  return false, n
end
