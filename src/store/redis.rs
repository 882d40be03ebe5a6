//! The Redis store, shared by any number of broker replicas. redis-rs async with a connection
//! manager (reconnects by itself; bounded connection and response timeouts so that a dead Redis
//! answers `UNAVAILABLE` quickly). Every multi-step change is one Lua script.
//!
//! Keys (`{}` is the hash tag, so that everything of one task stays in one Redis Cluster slot):
//! - `tc:task:{<id>}`: hash `v` (version), `data` (JSON). Updates compare-and-set on `v`.
//! - `tc:lease:{<task>}:<lease>`: hash `data` (the lease as issued, JSON), `state`, `ended_ms`,
//!   `reason`, `cred`; `tc:leases:{<task>}`: set of the task's lease ids;
//!   `tc:cred:{<task>}:<jti or serial>`: the lease holding that credential.
//! - `tc:lock:<agent>`: the agent's lock (JSON). It is read in the issuance script with the task's
//!   keys; on Redis Cluster that needs the lock in the task's slot (not yet: one node or a
//!   replicated primary today).
//! - `tc:idx:tasks`, `tc:idx:executor:<spiffe id>`, `tc:idx:requester:<spiffe id>`: sorted sets
//!   of task ids (score 0, ordered by id, which is creation order). Index entries are written
//!   before the task, so a failure leaves at most an entry that points nowhere; readers skip and
//!   remove such entries. Nothing else is ever half-written.
//! - `tc:revocations`: the revocation log, a stream appended by the revoking scripts themselves
//!   (so an entry exists exactly when the revocation happened); its ids are the watchers'
//!   cursors, read with `XRANGE` and waited for with a blocking `XREAD` on a connection of its
//!   own. Trimmed by `MINID` once the credentials it names have expired. Like `tc:expiry`, it is
//!   one key for all tasks: Redis Cluster needs it split per slot (not yet).

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use redis::AsyncCommands as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use tokio::sync::OnceCell;

use super::{
    Epoch, IssueError, Store, StoreError, TaskChange, TaskPage, TaskQuery, UpdateError, decode,
    decode_lease, encode, encode_lease, from_unix_ms, task_ended_reason, unix_ms, unix_ms_ceil,
};
use crate::identity::WorkloadId;
use crate::lease::{
    CredentialKind, Cursor, Lease, LeaseId, LeaseState, Lock, Revocation, Swept, check_issuable,
};
use crate::mint::PublishedKey;
use crate::task::{Task, TaskError, TaskId};

/// Attempts of one compare-and-set update before giving up with [`StoreError::Contention`].
const CAS_ATTEMPTS: usize = 16;
/// Ids read from an index per round trip when listing.
const LIST_BATCH: usize = 64;

const ALL_TASKS: &str = "tc:idx:tasks";
/// The set of agents with a lock (locks expire by themselves; readers drop stale members).
const LOCKS: &str = "tc:locks";
/// Active leases by expiry: member `task/lease`, score the expiry in ms (rounded up).
const EXPIRY: &str = "tc:expiry";
/// Tasks by deadline: member the task id, score the deadline in ms (rounded up).
const DEADLINES: &str = "tc:deadlines";
/// Published signing keys: field `kid`, value the JSON [`PublishedKey`].
const SIGNING_KEYS: &str = "tc:signing-keys";
/// The store's epoch marker (JSON [`Epoch`]), written once with `SET NX`.
const EPOCH: &str = "tc:epoch";
/// The revocation log: a stream whose entry ids are the watchers' cursors.
const REVOCATIONS: &str = "tc:revocations";
/// Written by the readiness probe (a short-lived key): a store that refuses writes is not ready.
const READY_PROBE: &str = "tc:ready-probe";

/// A Lua function the revoking scripts begin with: appends the revocation of the lease at hash
/// `lk` (its current credential and expiry) to the revocation log, in the same script.
const LOG_REVOCATION: &str = r"
local function log_revocation(lk, reason, at_ms)
  local f = redis.call('HMGET', lk, 'data', 'cred', 'exp_ns')
  if not f[1] then return end
  local d = cjson.decode(f[1])
  local aud = d.audience
  if type(aud) ~= 'string' then aud = '' end
  redis.call('XADD', 'tc:revocations', '*', 'lease', d.id, 'task', d.task, 'agent', d.agent,
    'kind', d.kind, 'cred', f[2] or d.credential, 'aud', aud, 'exp_ns', f[3], 'reason', reason,
    'at_ms', at_ms)
end
";

fn task_key(id: &str) -> String {
    format!("tc:task:{{{id}}}")
}

fn lease_prefix(task: &str) -> String {
    format!("tc:lease:{{{task}}}:")
}

fn leases_key(task: &str) -> String {
    format!("tc:leases:{{{task}}}")
}

fn cred_prefix(task: &str) -> String {
    format!("tc:cred:{{{task}}}:")
}

fn lease_index_key(lease: &str) -> String {
    format!("tc:leaseidx:{lease}")
}

fn lock_key(agent: &WorkloadId) -> String {
    format!("tc:lock:{agent}")
}

fn claim_key(key: &str) -> String {
    format!("tc:claim:{key}")
}

/// The agent's live leases (`task/lease`): issued, not yet revoked or expired. What a lock's
/// sweep walks, instead of the agent's whole history.
fn live_key(agent: &str) -> String {
    format!("tc:live:{agent}")
}

/// The agent's open tasks (pending or approved) as executor: what a lock's sweep ends.
fn open_key(agent: &str) -> String {
    format!("tc:open:{agent}")
}

fn executor_key(who: &str) -> String {
    format!("tc:idx:executor:{who}")
}

fn requester_key(who: &str) -> String {
    format!("tc:idx:requester:{who}")
}

/// Deletes a claim only if it still holds the value given.
const RELEASE_CLAIM: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Replaces a claim that still holds the expected value. KEYS: claim. ARGV: expected, value,
/// until (ms). Returns 1 when it did.
const SWAP_CLAIM: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PXAT', ARGV[3])
  return 1
end
return 0
";

const CREATE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'v', 1, 'data', ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
return 1";

/// Replaces the task if its version is still ARGV[1]; sets an expiry time when ARGV[4] is given.
const COMPARE_AND_SET: &str = r"
local v = redis.call('HGET', KEYS[1], 'v')
if not v then return -1 end
if v ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'data', ARGV[3])
if ARGV[4] ~= '' then redis.call('PEXPIREAT', KEYS[1], ARGV[4]) end
if ARGV[5] == '1' then redis.call('SREM', KEYS[2], ARGV[6]) end
return 1";

/// Records a lease if the task is unchanged since it was checked and the agent is not locked,
/// and files it by expiry for the reaper.
/// A store without its epoch marker was reset (its data lost): nothing is recorded, and the broker
/// starts a new epoch before anything is issued. A lease id recorded already (an earlier
/// attempt of the same request) is refused: -5.
/// KEYS: task, lock, lease, task's lease set, credential index, lease index, expiry index, epoch,
/// the agent's live leases.
/// ARGV: version read, new version ('' when the task is unchanged), new task data, lease JSON,
/// lease id, credential id, expiry (ns since the epoch), task id, expiry (ms, rounded up), agent.
const ISSUE: &str = r"
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
return 1";

/// Claims one lease filed in the expiry index and ends it as expired if it is active and its
/// credential has expired; a lease renewed since is filed again under its new expiry. Only the
/// caller whose ZREM removed the entry acts, so each lease is ended once whatever the number
/// of reapers. KEYS: expiry index, lease. ARGV: member (`task/lease`), now (ns).
/// Returns 1 when this call ended the lease.
const EXPIRE: &str = r"
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('HGET', KEYS[2], 'state') ~= 'active' then return 0 end
local exp = tonumber(redis.call('HGET', KEYS[2], 'exp_ns'))
if not exp then return 0 end
if exp > tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], string.format('%.0f', math.ceil(exp / 1000000)), ARGV[1])
  return 0
end
redis.call('HSET', KEYS[2], 'state', 'expired', 'reason', 'expired',
  'ended_ms', string.format('%.0f', math.floor(exp / 1000000)))
local agent = lease_agent(KEYS[2])
if agent then redis.call('SREM', 'tc:live:' .. agent, ARGV[1]) end
return 1";

/// Gives an active, unexpired lease a new credential if its task is unchanged since it was
/// checked and the agent is not locked, in a store with its epoch marker (see [`ISSUE`]).
/// KEYS: task, lock, lease, new credential index, epoch.
/// ARGV: task version read, new credential, new expiry, now (both ns since the epoch), lease id,
/// now (ms). The previous credential is logged as revoked (superseded).
const RENEW: &str = r"
if redis.call('EXISTS', KEYS[5]) == 0 then return -4 end
local v = redis.call('HGET', KEYS[1], 'v')
if not v then return -1 end
if v ~= ARGV[1] then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return -2 end
if redis.call('HGET', KEYS[3], 'state') ~= 'active' then return -3 end
local exp = tonumber(redis.call('HGET', KEYS[3], 'exp_ns'))
if not exp or exp <= tonumber(ARGV[4]) then return -3 end
log_revocation(KEYS[3], 'superseded by renewal', ARGV[6])
redis.call('HSET', KEYS[3], 'cred', ARGV[2], 'exp_ns', ARGV[3])
redis.call('SET', KEYS[4], ARGV[5])
return 1";

/// Locks an agent: one short step (the lock key is what issuance, renewal and introspection
/// check, so it takes effect at once). A lock in force that ends later (or never) stays as it
/// is: locks only grow. KEYS: lock, the set of locked agents. ARGV: lock JSON, now ms, lock
/// expiry ms ('' none), agent. Returns the lock in force (JSON).
const LOCK: &str = r"
local cur = redis.call('GET', KEYS[1])
local keep = false
if cur then
  local pttl = redis.call('PTTL', KEYS[1])
  if pttl == -1 then keep = true
  elseif pttl > 0 and ARGV[3] ~= '' and tonumber(ARGV[2]) + pttl >= tonumber(ARGV[3]) then
    keep = true
  end
end
if not keep then
  redis.call('SET', KEYS[1], ARGV[1])
  if ARGV[3] ~= '' then redis.call('PEXPIREAT', KEYS[1], ARGV[3]) end
  cur = ARGV[1]
end
redis.call('SADD', KEYS[2], ARGV[4])
return cur";

/// One bounded step of a lock's sweep: takes up to `limit` of the agent's open tasks and up to
/// `limit` of its live leases out of their sets (SPOP: each is taken by one sweeper) and ends
/// those still open or active. Task state changes are laid over the task's JSON as hash fields
/// (`state`, `ended_ms`, `end_reason`) and its version is bumped, so that concurrent
/// compare-and-sets fail and re-read. KEYS: the agent's open tasks, its live leases, the expiry
/// index. ARGV: ended ms, reason, expire-at ms for ended tasks, limit.
/// Returns `{remaining, revoked task ids..., '|', 'task/lease' of revoked leases...}`.
const SWEEP: &str = r"
local tasks, leases = {}, {}
for _, id in ipairs(redis.call('SPOP', KEYS[1], ARGV[4])) do
  local tk = 'tc:task:{' .. id .. '}'
  local data = redis.call('HGET', tk, 'data')
  if data then
    local st = redis.call('HGET', tk, 'state') or cjson.decode(data).state
    if st == 'pending_approval' or st == 'approved' then
      redis.call('HSET', tk, 'state', 'revoked', 'ended_ms', ARGV[1], 'end_reason', ARGV[2])
      redis.call('HINCRBY', tk, 'v', 1)
      redis.call('PEXPIREAT', tk, ARGV[3])
      table.insert(tasks, id)
    end
  end
end
for _, m in ipairs(redis.call('SPOP', KEYS[2], ARGV[4])) do
  local slash = string.find(m, '/', 1, true)
  if slash then
    local id, lid = string.sub(m, 1, slash - 1), string.sub(m, slash + 1)
    local lk = 'tc:lease:{' .. id .. '}:' .. lid
    if redis.call('HGET', lk, 'state') == 'active' then
      redis.call('HSET', lk, 'state', 'revoked', 'ended_ms', ARGV[1], 'reason', ARGV[2])
      redis.call('ZREM', KEYS[3], m)
      log_revocation(lk, ARGV[2], ARGV[1])
      table.insert(leases, m)
    end
  end
end
local out = {tostring(redis.call('SCARD', KEYS[1]) + redis.call('SCARD', KEYS[2]))}
for _, t in ipairs(tasks) do table.insert(out, t) end
table.insert(out, '|')
for _, l in ipairs(leases) do table.insert(out, l) end
return out";

/// The agent of a lease (its hash field; older leases only have it in their JSON).
const LEASE_AGENT: &str = r"
local function lease_agent(lk)
  local a = redis.call('HGET', lk, 'agent')
  if a then return a end
  local d = redis.call('HGET', lk, 'data')
  if d then return cjson.decode(d).agent end
  return nil
end
";

/// Revokes one active lease and takes it out of the expiry index (which so holds exactly the
/// unrevoked leases) and the agent's live leases. KEYS: lease, expiry index, the agent's live
/// leases. ARGV: ended ms, reason, member (`task/lease`).
const REVOKE_LEASE: &str = r"
local st = redis.call('HGET', KEYS[1], 'state')
if not st then return -1 end
if st ~= 'active' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'revoked', 'ended_ms', ARGV[1], 'reason', ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[3])
redis.call('SREM', KEYS[3], ARGV[3])
log_revocation(KEYS[1], ARGV[2], ARGV[1])
return 1";

/// Ends a task and revokes every active lease in its set, atomically.
/// KEYS: task, task's lease set, expiry index, the executor's live leases, the executor's open
/// tasks. ARGV: version read, new version, new task data,
/// expire-at ms ('' for none), ended ms, reason, lease key prefix, credential key prefix, task id.
/// Returns `{'missing'}`, `{'conflict'}`, or `{'ok', revoked lease ids...}`.
const END_TASK: &str = r"
local v = redis.call('HGET', KEYS[1], 'v')
if not v then return {'missing'} end
if v ~= ARGV[1] then return {'conflict'} end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'data', ARGV[3])
local revoked = {'ok'}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local lk = ARGV[7] .. id
  if redis.call('HGET', lk, 'state') == 'active' then
    redis.call('HSET', lk, 'state', 'revoked', 'ended_ms', ARGV[5], 'reason', ARGV[6])
    redis.call('ZREM', KEYS[3], ARGV[9] .. '/' .. id)
    redis.call('SREM', KEYS[4], ARGV[9] .. '/' .. id)
    log_revocation(lk, ARGV[6], ARGV[5])
    table.insert(revoked, id)
  end
  if ARGV[4] ~= '' then
    redis.call('PEXPIREAT', lk, ARGV[4])
    local cred = redis.call('HGET', lk, 'cred')
    if cred then redis.call('PEXPIREAT', ARGV[8] .. cred, ARGV[4]) end
  end
end
if ARGV[4] ~= '' then
  redis.call('PEXPIREAT', KEYS[1], ARGV[4])
  redis.call('PEXPIREAT', KEYS[2], ARGV[4])
end
redis.call('SREM', KEYS[5], ARGV[9])
return revoked";

/// The hash fields of a task as listed: `data`, and the overlay `state`, `ended_ms`,
/// `end_reason`.
type TaskFields = (Option<Vec<u8>>, Option<String>, Option<u64>, Option<String>);

/// The hash fields of a task as read for an update: `v` and [`TaskFields`], flat.
type TaskRecord = (
    Option<String>,
    Option<Vec<u8>>,
    Option<String>,
    Option<u64>,
    Option<String>,
);

/// Lays the state a lock script wrote beside the JSON over the task.
fn with_overlay(
    mut task: Task,
    state: Option<String>,
    ended_ms: Option<u64>,
    reason: Option<String>,
) -> Result<Task, StoreError> {
    if let Some(s) = state {
        task.state = crate::task::TaskState::parse(&s)
            .ok_or_else(|| StoreError::Corrupt(format!("task {}: state {s:?}", task.id)))?;
        task.ended_at = ended_ms.map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms));
        task.updated_at = task.ended_at.unwrap_or(task.updated_at);
        task.end_reason = reason;
    }
    Ok(task)
}

/// The hash fields of a lease, in the order of [`LeaseFields`].
const LEASE_FIELDS: [&str; 6] = ["data", "state", "ended_ms", "reason", "cred", "exp_ns"];

/// The hash fields of a lease: `data`, `state`, `ended_ms`, `reason`, `cred`, `exp_ns`.
type LeaseFields = (
    Option<Vec<u8>>,
    Option<String>,
    Option<u64>,
    Option<String>,
    Option<String>,
    Option<u64>,
);

/// A lease from its hash fields (the JSON and the fields scripts change beside it); `None`
/// when the lease does not exist.
fn lease_from_fields(lease: &str, fields: LeaseFields) -> Result<Option<Lease>, StoreError> {
    let (data, state, ended_ms, reason, cred, exp_ns) = fields;
    let Some(data) = data else {
        return Ok(None);
    };
    let mut l = decode_lease(&data)?;
    l.state = match state.as_deref() {
        Some("active") => LeaseState::Active,
        Some("revoked") => LeaseState::Revoked,
        Some("expired") => LeaseState::Expired,
        other => {
            return Err(StoreError::Corrupt(format!(
                "lease {lease}: state {other:?}"
            )));
        }
    };
    if let Some(ms) = ended_ms {
        l.ended_at = Some(SystemTime::UNIX_EPOCH + Duration::from_millis(ms));
    }
    if reason.is_some() {
        l.reason = reason;
    }
    if let Some(cred) = cred {
        l.credential = cred;
    }
    if let Some(ns) = exp_ns {
        l.expires_at = SystemTime::UNIX_EPOCH + Duration::from_nanos(ns);
    }
    Ok(Some(l))
}

/// One stream entry: its id and its fields, flat (`field, value, ...`).
type StreamEntry = (String, Vec<String>);

/// One stream of an `XREAD` reply: its key and its entries.
type StreamReply = (String, Vec<StreamEntry>);

/// A revocation from a log entry written by `LOG_REVOCATION`.
fn revocation_from_entry((id, flat): StreamEntry) -> Result<Revocation, StoreError> {
    let bad = |what: &str| StoreError::Corrupt(format!("revocation {id}: {what}"));
    let cursor = Cursor::parse(&id).ok_or_else(|| bad("id"))?;
    let mut fields = std::collections::HashMap::new();
    for pair in flat.chunks_exact(2) {
        fields.insert(pair[0].as_str(), pair[1].as_str());
    }
    let get = |name: &str| fields.get(name).copied().ok_or_else(|| bad(name));
    let number = |name: &str| -> Result<u64, StoreError> {
        get(name)?.parse::<u64>().map_err(|_| bad(name))
    };
    Ok(Revocation {
        cursor,
        kind: match get("kind")? {
            "jwt" => CredentialKind::Jwt,
            "x509" => CredentialKind::X509,
            _ => return Err(bad("kind")),
        },
        credential: get("cred")?.to_owned(),
        lease: LeaseId::parse(get("lease")?).map_err(|_| bad("lease"))?,
        task: TaskId::parse(get("task")?).map_err(|_| bad("task"))?,
        agent: WorkloadId::parse(get("agent")?).map_err(|_| bad("agent"))?,
        audience: Some(get("aud")?)
            .filter(|a| !a.is_empty())
            .map(str::to_owned),
        reason: get("reason")?.to_owned(),
        revoked_at: from_unix_ms(number("at_ms")?),
        expires_at: SystemTime::UNIX_EPOCH + Duration::from_nanos(number("exp_ns")?),
    })
}

/// Nanoseconds since the Unix epoch (0 before it): exact for lease expiries (Lua compares them
/// as doubles, to within a microsecond, which is all it needs).
fn unix_ns(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn unavailable(e: &redis::RedisError) -> StoreError {
    // The error text names the server and failure, never the URL's password.
    StoreError::Unavailable(format!("redis: {e}"))
}

/// The failure of a write. Redis answered with an error (out of memory, read-only, a refused
/// script), or the connection was refused: nothing was written. Anything else (a timeout, a
/// connection lost after the command was sent) may have been applied, or may still be: the
/// outcome is unknown, and the caller is told so.
fn write_failed(e: &redis::RedisError) -> StoreError {
    // Server errors the library knows (`Server`) and those it does not (`Extension`: OOM,
    // MISCONF, READONLY...) are answers: the command was refused.
    if matches!(
        e.kind(),
        redis::ErrorKind::Server(_) | redis::ErrorKind::Extension
    ) || e.is_connection_refusal()
    {
        unavailable(e)
    } else {
        StoreError::OutcomeUnknown(format!("redis: {e}"))
    }
}

/// The Redis store. Connects on first use, so a broker starts while Redis is down and answers
/// `UNAVAILABLE` until it is back.
pub struct RedisStore {
    client: redis::Client,
    conn: OnceCell<ConnectionManager>,
    create: redis::Script,
    cas: redis::Script,
    issue: redis::Script,
    end_task: redis::Script,
    renew: redis::Script,
    revoke_lease: redis::Script,
    lock: redis::Script,
    sweep: redis::Script,
    expire: redis::Script,
    release: redis::Script,
    swap: redis::Script,
    /// The connection that blocks in `XREAD` for [`Store::revocations`] waits: its own, so that
    /// a blocked read never delays other commands.
    watch: tokio::sync::Mutex<Option<MultiplexedConnection>>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The connection info may hold a password: never print it.
        f.debug_struct("RedisStore").finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store for the Redis at `url` (`redis://`).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the URL does not parse.
    pub fn new(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(|e| {
            StoreError::Unavailable(format!("redis URL does not parse ({:?})", e.kind()))
        })?;
        Ok(Self {
            client,
            conn: OnceCell::new(),
            create: redis::Script::new(CREATE),
            cas: redis::Script::new(COMPARE_AND_SET),
            issue: redis::Script::new(ISSUE),
            end_task: redis::Script::new(&format!("{LOG_REVOCATION}{END_TASK}")),
            renew: redis::Script::new(&format!("{LOG_REVOCATION}{RENEW}")),
            revoke_lease: redis::Script::new(&format!("{LOG_REVOCATION}{REVOKE_LEASE}")),
            lock: redis::Script::new(LOCK),
            sweep: redis::Script::new(&format!("{LOG_REVOCATION}{SWEEP}")),
            watch: tokio::sync::Mutex::new(None),
            expire: redis::Script::new(&format!("{LEASE_AGENT}{EXPIRE}")),
            release: redis::Script::new(RELEASE_CLAIM),
            swap: redis::Script::new(SWAP_CLAIM),
        })
    }

    async fn conn(&self) -> Result<ConnectionManager, StoreError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        self.conn
            .get_or_try_init(|| async {
                self.client
                    .get_connection_manager_with_config(config)
                    .await
                    .map_err(|e| unavailable(&e))
            })
            .await
            .cloned()
    }

    async fn read(
        &self,
        conn: &mut ConnectionManager,
        id: &str,
    ) -> Result<Option<(String, Task)>, StoreError> {
        let (v, data, state, ended_ms, reason): TaskRecord = redis::cmd("HMGET")
            .arg(task_key(id))
            .arg("v")
            .arg("data")
            .arg("state")
            .arg("ended_ms")
            .arg("end_reason")
            .query_async(conn)
            .await
            .map_err(|e| unavailable(&e))?;
        match (v, data) {
            (Some(v), Some(data)) => Ok(Some((
                v,
                with_overlay(decode(&data)?, state, ended_ms, reason)?,
            ))),
            _ => Ok(None),
        }
    }
}

impl RedisStore {
    /// Blocks in `XREAD` on the watch connection for up to `wait` for log entries after
    /// `after`. A failed connection is dropped and made again on the next call.
    async fn wait_revocations(
        &self,
        after: Cursor,
        limit: usize,
        wait: Duration,
    ) -> Result<Vec<StreamEntry>, StoreError> {
        let wait = wait.min(super::MAX_REVOCATION_WAIT);
        let mut slot = self.watch.lock().await;
        let conn = match slot.as_mut() {
            Some(c) => c,
            None => {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(2)))
                    .set_response_timeout(Some(
                        super::MAX_REVOCATION_WAIT + Duration::from_secs(2),
                    ));
                let c = self
                    .client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map_err(|e| unavailable(&e))?;
                slot.insert(c)
            }
        };
        // Nil when nothing came in time; else one (stream, entries) pair.
        let read: Result<Option<Vec<StreamReply>>, _> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(limit)
            .arg("BLOCK")
            .arg(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1))
            .arg("STREAMS")
            .arg(REVOCATIONS)
            .arg(after.to_string())
            .query_async(conn)
            .await;
        match read {
            Ok(streams) => Ok(streams
                .into_iter()
                .flatten()
                .flat_map(|(_, entries)| entries)
                .collect()),
            Err(e) => {
                *slot = None;
                Err(unavailable(&e))
            }
        }
    }

    /// Reads a lease: the JSON as issued, with the fields that change in place laid over it.
    async fn read_lease(
        &self,
        conn: &mut ConnectionManager,
        task: &str,
        lease: &str,
    ) -> Result<Option<Lease>, StoreError> {
        let fields: LeaseFields = redis::cmd("HMGET")
            .arg(format!("{}{lease}", lease_prefix(task)))
            .arg(&LEASE_FIELDS)
            .query_async(conn)
            .await
            .map_err(|e| unavailable(&e))?;
        lease_from_fields(lease, fields)
    }

    /// Reads the leases `(task, lease id)` in one pipelined round trip, in the order given,
    /// skipping those that do not exist.
    async fn read_leases<T: AsRef<str>, L: AsRef<str>>(
        &self,
        conn: &mut ConnectionManager,
        ids: &[(T, L)],
    ) -> Result<Vec<Lease>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut reads = redis::pipe();
        for (task, lease) in ids {
            reads
                .cmd("HMGET")
                .arg(format!("{}{}", lease_prefix(task.as_ref()), lease.as_ref()))
                .arg(&LEASE_FIELDS);
        }
        let fields: Vec<LeaseFields> =
            reads.query_async(conn).await.map_err(|e| unavailable(&e))?;
        let mut out = Vec::with_capacity(ids.len());
        for ((_, lease), f) in ids.iter().zip(fields) {
            out.extend(lease_from_fields(lease.as_ref(), f)?);
        }
        Ok(out)
    }

    /// Removes index entries whose task no longer exists (pruned, or a create that failed after
    /// writing its index entries). Best effort: a failure leaves them for the next reader.
    async fn drop_dangling(&self, conn: &mut ConnectionManager, key: &str, ids: &[String]) {
        if ids.is_empty() {
            return;
        }
        let _: Result<i64, _> = conn.zrem(key, ids).await;
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn create_task(&self, task: &Task) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let id = task.id.to_string();
        let data = encode(task)?;
        // Index entries first: if the create below fails they point nowhere and are skipped.
        redis::pipe()
            .zadd(ALL_TASKS, &id, 0)
            .ignore()
            .zadd(executor_key(task.executor.as_str()), &id, 0)
            .ignore()
            .zadd(requester_key(task.requester.as_str()), &id, 0)
            .ignore()
            .zadd(DEADLINES, &id, unix_ms_ceil(task.deadline))
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        let created: i64 = self
            .create
            .key(task_key(&id))
            .key(open_key(task.executor.as_str()))
            .arg(data)
            .arg(&id)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| write_failed(&e))?;
        if created == 1 {
            Ok(())
        } else {
            Err(StoreError::Exists(task.id))
        }
    }

    async fn get_task(&self, id: &TaskId) -> Result<Option<Task>, StoreError> {
        let mut conn = self.conn().await?;
        Ok(self.read(&mut conn, &id.to_string()).await?.map(|(_, t)| t))
    }

    async fn update_task(
        &self,
        id: &TaskId,
        change: TaskChange,
        retention: Duration,
    ) -> Result<Task, UpdateError> {
        let mut conn = self.conn().await?;
        let key = id.to_string();
        for _ in 0..CAS_ATTEMPTS {
            let Some((version, current)) = self.read(&mut conn, &key).await? else {
                return Err(UpdateError::NotFound);
            };
            let mut next = current.clone();
            change(&mut next)?;
            let next_version = version
                .parse::<u64>()
                .map_err(|_| StoreError::Corrupt(format!("task {key}: bad version")))?
                + 1;
            let expire_at = match (current.ended_at, next.ended_at) {
                (None, Some(ended)) => unix_ms(ended + retention).to_string(),
                _ => String::new(),
            };
            let applied: i64 = self
                .cas
                .key(task_key(&key))
                .key(open_key(next.executor.as_str()))
                .arg(&version)
                .arg(next_version)
                .arg(encode(&next)?)
                .arg(expire_at)
                .arg(if next.state.is_terminal() { "1" } else { "" })
                .arg(&key)
                .invoke_async(&mut conn)
                .await
                .map_err(|e| write_failed(&e))?;
            match applied {
                1 => return Ok(next),
                -1 => return Err(UpdateError::NotFound),
                _ => continue, // another writer changed it: apply the change to its version
            }
        }
        Err(StoreError::Contention(*id).into())
    }

    async fn list_tasks(&self, query: &TaskQuery) -> Result<TaskPage, StoreError> {
        let mut conn = self.conn().await?;
        let index = match (&query.executor, &query.requester) {
            (Some(e), _) => executor_key(e.as_str()),
            (None, Some(r)) => requester_key(r.as_str()),
            (None, None) => ALL_TASKS.to_owned(),
        };
        let mut page = TaskPage::default();
        let mut upper = query
            .before
            .map_or_else(|| "+".to_owned(), |b| format!("({b}"));
        let mut scanned = 0usize;
        loop {
            let ids: Vec<String> = redis::cmd("ZREVRANGEBYLEX")
                .arg(&index)
                .arg(&upper)
                .arg("-")
                .arg("LIMIT")
                .arg(0)
                .arg(LIST_BATCH)
                .query_async(&mut conn)
                .await
                .map_err(|e| unavailable(&e))?;
            if ids.is_empty() {
                return Ok(page);
            }
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.cmd("HMGET")
                    .arg(task_key(id))
                    .arg("data")
                    .arg("state")
                    .arg("ended_ms")
                    .arg("end_reason");
            }
            let data: Vec<TaskFields> = pipe
                .query_async(&mut conn)
                .await
                .map_err(|e| unavailable(&e))?;
            let mut dangling = Vec::new();
            for (id, data) in ids.iter().zip(data) {
                if page.tasks.len() >= query.limit || scanned >= query.max_scan {
                    // Continue after the last id examined.
                    page.next = TaskId::parse(upper.trim_start_matches('(')).ok();
                    self.drop_dangling(&mut conn, &index, &dangling).await;
                    return Ok(page);
                }
                scanned += 1;
                upper = format!("({id}");
                match data {
                    (Some(d), state, ended_ms, reason) => {
                        let task = with_overlay(decode(&d)?, state, ended_ms, reason)?;
                        if query.matches(&task) {
                            page.tasks.push(task);
                        }
                    }
                    (None, ..) => dangling.push(id.clone()),
                }
            }
            self.drop_dangling(&mut conn, &index, &dangling).await;
            if ids.len() < LIST_BATCH {
                return Ok(page);
            }
        }
    }

    async fn issue_lease(&self, lease: &Lease, now: SystemTime) -> Result<(), IssueError> {
        let mut conn = self.conn().await?;
        let task_id = lease.task.to_string();
        let lease_json = encode_lease(lease)?;
        for _ in 0..CAS_ATTEMPTS {
            let Some((version, mut task)) = self.read(&mut conn, &task_id).await? else {
                return Err(IssueError::NotFound);
            };
            check_issuable(&task, &lease.agent, now)?;
            let (next_version, data) = if task.started_at.is_none() {
                task.started_at = Some(now);
                let v = version
                    .parse::<u64>()
                    .map_err(|_| StoreError::Corrupt(format!("task {task_id}: bad version")))?;
                ((v + 1).to_string(), encode(&task)?)
            } else {
                (String::new(), Vec::new())
            };
            let outcome: i64 = self
                .issue
                .key(task_key(&task_id))
                .key(lock_key(&lease.agent))
                .key(format!("{}{}", lease_prefix(&task_id), lease.id))
                .key(leases_key(&task_id))
                .key(format!("{}{}", cred_prefix(&task_id), lease.credential))
                .key(lease_index_key(lease.id.as_str()))
                .key(EXPIRY)
                .key(EPOCH)
                .key(live_key(lease.agent.as_str()))
                .arg(&version)
                .arg(next_version)
                .arg(data)
                .arg(lease_json.as_slice())
                .arg(lease.id.as_str())
                .arg(&lease.credential)
                .arg(unix_ns(lease.expires_at))
                .arg(&task_id)
                .arg(unix_ms_ceil(lease.expires_at))
                .arg(lease.agent.as_str())
                .invoke_async(&mut conn)
                .await
                .map_err(|e| write_failed(&e))?;
            match outcome {
                1 => return Ok(()),
                -1 => return Err(IssueError::NotFound),
                -4 => return Err(IssueError::StoreReset),
                -5 => return Err(IssueError::Exists),
                -2 => {
                    let lock: Option<String> = conn
                        .get(lock_key(&lease.agent))
                        .await
                        .map_err(|e| unavailable(&e))?;
                    let reason = lock
                        .and_then(|l| serde_json::from_str::<serde_json::Value>(&l).ok())
                        .and_then(|v| v["reason"].as_str().map(str::to_owned))
                        .unwrap_or_default();
                    return Err(IssueError::Locked(reason));
                }
                _ => continue, // the task changed since it was checked: check again
            }
        }
        Err(StoreError::Contention(lease.task).into())
    }

    async fn get_lease(&self, id: &LeaseId) -> Result<Option<Lease>, StoreError> {
        let mut conn = self.conn().await?;
        let task: Option<String> = conn
            .get(lease_index_key(id.as_str()))
            .await
            .map_err(|e| unavailable(&e))?;
        match task {
            Some(task) => self.read_lease(&mut conn, &task, id.as_str()).await,
            None => Ok(None),
        }
    }

    async fn renew_lease(
        &self,
        id: &LeaseId,
        credential: &str,
        expires_at: SystemTime,
        now: SystemTime,
    ) -> Result<Lease, IssueError> {
        let mut conn = self.conn().await?;
        for _ in 0..CAS_ATTEMPTS {
            let Some(lease) = self.get_lease(id).await? else {
                return Err(IssueError::NotFound);
            };
            let task_id = lease.task.to_string();
            let Some((version, task)) = self.read(&mut conn, &task_id).await? else {
                return Err(IssueError::NotFound);
            };
            check_issuable(&task, &lease.agent, now)?;
            super::check_renewable(&lease, now)?;
            let outcome: i64 = self
                .renew
                .key(task_key(&task_id))
                .key(lock_key(&lease.agent))
                .key(format!("{}{}", lease_prefix(&task_id), id))
                .key(format!("{}{credential}", cred_prefix(&task_id)))
                .key(EPOCH)
                .arg(&version)
                .arg(credential)
                .arg(unix_ns(expires_at))
                .arg(unix_ns(now))
                .arg(id.as_str())
                .arg(unix_ms(now))
                .invoke_async(&mut conn)
                .await
                .map_err(|e| write_failed(&e))?;
            match outcome {
                1 => {
                    return self
                        .read_lease(&mut conn, &task_id, id.as_str())
                        .await?
                        .ok_or(IssueError::NotFound);
                }
                -1 => return Err(IssueError::NotFound),
                -2 => return Err(IssueError::Locked(String::new())),
                -4 => return Err(IssueError::StoreReset),
                -3 => {
                    return Err(TaskError::Precondition("lease is no longer active".into()).into());
                }
                _ => continue, // the task changed since it was checked: check again
            }
        }
        Err(
            StoreError::Unavailable(format!("too much contention renewing lease {id}; retry"))
                .into(),
        )
    }

    async fn revoke_lease(
        &self,
        id: &LeaseId,
        reason: &str,
        now: SystemTime,
    ) -> Result<Lease, UpdateError> {
        let mut conn = self.conn().await?;
        let Some(lease) = self.get_lease(id).await? else {
            return Err(UpdateError::NotFound);
        };
        let task_id = lease.task.to_string();
        let outcome: i64 = self
            .revoke_lease
            .key(format!("{}{}", lease_prefix(&task_id), id))
            .key(EXPIRY)
            .key(live_key(lease.agent.as_str()))
            .arg(unix_ms(now))
            .arg(reason)
            .arg(format!("{task_id}/{id}"))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| write_failed(&e))?;
        match outcome {
            1 => self
                .read_lease(&mut conn, &task_id, id.as_str())
                .await?
                .ok_or(UpdateError::NotFound),
            -1 => Err(UpdateError::NotFound),
            _ => Err(TaskError::Precondition("lease is not active".into()).into()),
        }
    }

    async fn task_leases(&self, task: &TaskId) -> Result<Vec<Lease>, StoreError> {
        let mut conn = self.conn().await?;
        let task = task.to_string();
        let mut ids: Vec<String> = conn
            .smembers(leases_key(&task))
            .await
            .map_err(|e| unavailable(&e))?;
        // Lease ids are UUIDv7: their order is issuance order.
        ids.sort_unstable();
        let pairs: Vec<(&str, &str)> = ids.iter().map(|id| (task.as_str(), id.as_str())).collect();
        self.read_leases(&mut conn, &pairs).await
    }

    async fn find_lease(
        &self,
        task: &TaskId,
        credential: &str,
    ) -> Result<Option<Lease>, StoreError> {
        let mut conn = self.conn().await?;
        let task = task.to_string();
        let lease: Option<String> = conn
            .get(format!("{}{credential}", cred_prefix(&task)))
            .await
            .map_err(|e| unavailable(&e))?;
        match lease {
            Some(id) => self.read_lease(&mut conn, &task, &id).await,
            None => Ok(None),
        }
    }

    async fn end_task(
        &self,
        id: &TaskId,
        change: TaskChange,
        retention: Duration,
    ) -> Result<(Task, Vec<Lease>), UpdateError> {
        let mut conn = self.conn().await?;
        let key = id.to_string();
        for _ in 0..CAS_ATTEMPTS {
            let Some((version, current)) = self.read(&mut conn, &key).await? else {
                return Err(UpdateError::NotFound);
            };
            let mut next = current.clone();
            change(&mut next)?;
            let Some(ended) = next.ended_at.filter(|_| next.state.is_terminal()) else {
                return Err(
                    TaskError::Precondition("the change does not end the task".into()).into(),
                );
            };
            let next_version = version
                .parse::<u64>()
                .map_err(|_| StoreError::Corrupt(format!("task {key}: bad version")))?
                + 1;
            let expire_at = if current.ended_at.is_none() {
                unix_ms(ended + retention).to_string()
            } else {
                String::new()
            };
            let outcome: Vec<String> = self
                .end_task
                .key(task_key(&key))
                .key(leases_key(&key))
                .key(EXPIRY)
                .key(live_key(current.executor.as_str()))
                .key(open_key(current.executor.as_str()))
                .arg(&version)
                .arg(next_version)
                .arg(encode(&next)?)
                .arg(expire_at)
                .arg(unix_ms(ended))
                .arg(task_ended_reason(&next))
                .arg(lease_prefix(&key))
                .arg(cred_prefix(&key))
                .arg(&key)
                .invoke_async(&mut conn)
                .await
                .map_err(|e| write_failed(&e))?;
            let revoked = match outcome.split_first() {
                Some((status, revoked)) if status == "ok" => revoked,
                Some((status, _)) if status == "missing" => return Err(UpdateError::NotFound),
                _ => continue, // the task changed since it was read: apply the change again
            };
            let pairs: Vec<(&str, &str)> =
                revoked.iter().map(|l| (key.as_str(), l.as_str())).collect();
            return Ok((next, self.read_leases(&mut conn, &pairs).await?));
        }
        Err(StoreError::Contention(*id).into())
    }

    async fn lock_agent(&self, lock: &Lock) -> Result<Lock, StoreError> {
        let mut conn = self.conn().await?;
        let json = serde_json::to_vec(lock)
            .map_err(|e| StoreError::Corrupt(format!("encoding lock: {e}")))?;
        let in_force: String = self
            .lock
            .key(lock_key(&lock.agent))
            .key(LOCKS)
            .arg(json)
            .arg(unix_ms(lock.at))
            .arg(
                lock.until
                    .map(|u| unix_ms(u).to_string())
                    .unwrap_or_default(),
            )
            .arg(lock.agent.as_str())
            .invoke_async(&mut conn)
            .await
            .map_err(|e| write_failed(&e))?;
        serde_json::from_str(&in_force)
            .map_err(|e| StoreError::Corrupt(format!("lock of {}: {e}", lock.agent)))
    }

    async fn sweep_lock(
        &self,
        agent: &WorkloadId,
        reason: &str,
        at: SystemTime,
        retention: Duration,
        limit: usize,
    ) -> Result<Swept, StoreError> {
        let mut conn = self.conn().await?;
        let outcome: Vec<String> = self
            .sweep
            .key(open_key(agent.as_str()))
            .key(live_key(agent.as_str()))
            .key(EXPIRY)
            .arg(unix_ms(at))
            .arg(reason)
            .arg(unix_ms(at + retention))
            .arg(limit.max(1))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| write_failed(&e))?;
        // {remaining, tasks..., '|', 'task/lease'...}
        let Some((remaining, outcome)) = outcome.split_first() else {
            return Err(StoreError::Corrupt("lock sweep: empty answer".into()));
        };
        let remaining = remaining
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("lock sweep: {remaining:?} left")))?;
        let (tasks, leases) = match outcome.iter().position(|i| i == "|") {
            Some(bar) => (&outcome[..bar], &outcome[bar + 1..]),
            None => (outcome, &[][..]),
        };
        let pairs: Vec<(&str, &str)> = leases
            .iter()
            .filter_map(|item| item.split_once('/'))
            .collect();
        Ok(Swept {
            tasks: tasks.iter().filter_map(|t| TaskId::parse(t).ok()).collect(),
            leases: self.read_leases(&mut conn, &pairs).await?,
            remaining,
        })
    }

    async fn unlock_agent(&self, agent: &WorkloadId) -> Result<Option<Lock>, StoreError> {
        let mut conn = self.conn().await?;
        let (lock, _, _): (Option<Vec<u8>>, i64, i64) = redis::pipe()
            .atomic()
            .get(lock_key(agent))
            .del(lock_key(agent))
            .srem(LOCKS, agent.as_str())
            .query_async(&mut conn)
            .await
            .map_err(|e| write_failed(&e))?;
        lock.map(|l| serde_json::from_slice(&l))
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("lock of {agent}: {e}")))
    }

    async fn agent_lock(
        &self,
        agent: &WorkloadId,
        now: SystemTime,
    ) -> Result<Option<Lock>, StoreError> {
        let mut conn = self.conn().await?;
        let lock: Option<Vec<u8>> = conn
            .get(lock_key(agent))
            .await
            .map_err(|e| unavailable(&e))?;
        let lock = lock
            .map(|l| serde_json::from_slice::<Lock>(&l))
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("lock of {agent}: {e}")))?;
        Ok(lock.filter(|l| l.holds_at(now)))
    }

    async fn list_locks(&self, now: SystemTime) -> Result<Vec<Lock>, StoreError> {
        let mut conn = self.conn().await?;
        let agents: Vec<String> = conn.smembers(LOCKS).await.map_err(|e| unavailable(&e))?;
        let mut out = Vec::new();
        let mut gone = Vec::new();
        for agent in agents {
            let lock: Option<Vec<u8>> = conn
                .get(format!("tc:lock:{agent}"))
                .await
                .map_err(|e| unavailable(&e))?;
            match lock {
                Some(l) => {
                    let lock: Lock = serde_json::from_slice(&l)
                        .map_err(|e| StoreError::Corrupt(format!("lock of {agent}: {e}")))?;
                    if lock.holds_at(now) {
                        out.push(lock);
                    }
                }
                // Lifted by its own expiry.
                None => gone.push(agent),
            }
        }
        if !gone.is_empty() {
            let _: Result<i64, _> = conn.srem(LOCKS, &gone).await;
        }
        Ok(out)
    }

    async fn expire_leases(&self, now: SystemTime, limit: usize) -> Result<Vec<Lease>, StoreError> {
        let mut conn = self.conn().await?;
        let due: Vec<String> = conn
            .zrangebyscore_limit(
                EXPIRY,
                "-inf",
                unix_ms(now),
                0,
                isize::try_from(limit).unwrap_or(isize::MAX),
            )
            .await
            .map_err(|e| unavailable(&e))?;
        // One round trip claims them all (each claim is its own atomic script), one more reads
        // the leases this call ended.
        let (due, malformed): (Vec<&String>, Vec<&String>) =
            due.iter().partition(|m| m.contains('/'));
        let due: Vec<(String, String)> = due
            .iter()
            .filter_map(|m| m.split_once('/'))
            .map(|(task, lease)| (task.to_owned(), lease.to_owned()))
            .collect();
        if due.is_empty() && malformed.is_empty() {
            return Ok(Vec::new());
        }
        let mut claims = redis::pipe();
        if !malformed.is_empty() {
            // Never written by the broker; dropped so that they are not due forever.
            claims.zrem(EXPIRY, malformed).ignore();
        }
        claims.load_script(&self.expire).ignore();
        for (task, lease) in &due {
            claims.invoke_script(
                self.expire
                    .key(EXPIRY)
                    .key(format!("{}{lease}", lease_prefix(task)))
                    .arg(format!("{task}/{lease}"))
                    .arg(unix_ns(now)),
            );
        }
        let claimed: Vec<i64> = claims
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        let mine: Vec<&(String, String)> = due
            .iter()
            .zip(claimed)
            .filter(|(_, c)| *c == 1)
            .map(|(d, _)| d)
            .collect();
        let mine: Vec<(&str, &str)> = mine.iter().map(|(t, l)| (t.as_str(), l.as_str())).collect();
        self.read_leases(&mut conn, &mine).await
    }

    async fn overdue_tasks(
        &self,
        now: SystemTime,
        limit: usize,
    ) -> Result<Vec<TaskId>, StoreError> {
        let mut conn = self.conn().await?;
        let due: Vec<String> = conn
            .zrangebyscore_limit(
                DEADLINES,
                "-inf",
                unix_ms(now),
                0,
                isize::try_from(limit).unwrap_or(isize::MAX),
            )
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(due.iter().filter_map(|id| TaskId::parse(id).ok()).collect())
    }

    async fn forget_deadline(&self, id: &TaskId) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        conn.zrem::<_, _, i64>(DEADLINES, id.to_string())
            .await
            .map(|_| ())
            .map_err(|e| unavailable(&e))
    }

    async fn next_due(&self) -> Result<Option<SystemTime>, StoreError> {
        let mut conn = self.conn().await?;
        let (lease, task): (Vec<(String, u64)>, Vec<(String, u64)>) = redis::pipe()
            .zrange_withscores(EXPIRY, 0, 0)
            .zrange_withscores(DEADLINES, 0, 0)
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(lease
            .into_iter()
            .chain(task)
            .map(|(_, ms)| ms)
            .min()
            .map(from_unix_ms))
    }

    async fn publish_key(&self, key: &PublishedKey) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(key)
            .map_err(|e| StoreError::Corrupt(format!("encoding key {}: {e}", key.kid)))?;
        let mut conn = self.conn().await?;
        conn.hset::<_, _, _, i64>(SIGNING_KEYS, &key.kid, bytes)
            .await
            .map(|_| ())
            .map_err(|e| unavailable(&e))
    }

    async fn published_keys(&self, now: SystemTime) -> Result<Vec<PublishedKey>, StoreError> {
        let mut conn = self.conn().await?;
        let all: Vec<(String, Vec<u8>)> = conn
            .hgetall(SIGNING_KEYS)
            .await
            .map_err(|e| unavailable(&e))?;
        let mut live = Vec::new();
        let mut stale = Vec::new();
        for (kid, v) in all {
            let key: PublishedKey = serde_json::from_slice(&v)
                .map_err(|e| StoreError::Corrupt(format!("signing key {kid}: {e}")))?;
            if key.until > now {
                live.push(key);
            } else {
                stale.push(kid);
            }
        }
        if !stale.is_empty() {
            // Best effort: a reader skips them anyway.
            let _: Result<i64, _> = conn.hdel(SIGNING_KEYS, &stale).await;
        }
        Ok(live)
    }

    async fn prune_ended(&self, _ended_before: SystemTime) -> Result<usize, StoreError> {
        // Redis expires ended tasks itself (PEXPIREAT set when they end); readers drop the index
        // entries left behind.
        Ok(0)
    }

    async fn revocations(
        &self,
        after: Option<Cursor>,
        limit: usize,
        wait: Duration,
    ) -> Result<Vec<Revocation>, StoreError> {
        let entries: Vec<StreamEntry> = if wait.is_zero() {
            let mut conn = self.conn().await?;
            let start = after.map_or_else(|| "-".to_owned(), |c| format!("({c}"));
            redis::cmd("XRANGE")
                .arg(REVOCATIONS)
                .arg(start)
                .arg("+")
                .arg("COUNT")
                .arg(limit)
                .query_async(&mut conn)
                .await
                .map_err(|e| unavailable(&e))?
        } else {
            self.wait_revocations(after.unwrap_or(Cursor::START), limit, wait)
                .await?
        };
        entries.into_iter().map(revocation_from_entry).collect()
    }

    async fn revocation_head(&self) -> Result<Cursor, StoreError> {
        let mut conn = self.conn().await?;
        let last: Vec<StreamEntry> = redis::cmd("XREVRANGE")
            .arg(REVOCATIONS)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        match last.first() {
            Some((id, _)) => Cursor::parse(id)
                .ok_or_else(|| StoreError::Corrupt(format!("revocation id {id:?}"))),
            None => Ok(Cursor::START),
        }
    }

    async fn prune_revocations(&self, before: SystemTime) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let _: i64 = redis::cmd("XTRIM")
            .arg(REVOCATIONS)
            .arg("MINID")
            .arg(unix_ms(before))
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(())
    }

    async fn epoch(&self, fresh: &Epoch) -> Result<Epoch, StoreError> {
        let mut conn = self.conn().await?;
        let json =
            serde_json::to_string(fresh).map_err(|e| StoreError::Corrupt(format!("epoch: {e}")))?;
        // Written only if absent; the old value (if any) comes back: one round trip.
        let old: Option<String> = redis::cmd("SET")
            .arg(EPOCH)
            .arg(json)
            .arg("NX")
            .arg("GET")
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        match old {
            Some(o) => {
                serde_json::from_str(&o).map_err(|e| StoreError::Corrupt(format!("epoch: {e}")))
            }
            None => Ok(fresh.clone()),
        }
    }

    async fn claim(
        &self,
        key: &str,
        value: &str,
        until: SystemTime,
    ) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn().await?;
        // Written only if absent, expiring by itself; the holder (if any) comes back.
        redis::cmd("SET")
            .arg(claim_key(key))
            .arg(value)
            .arg("NX")
            .arg("GET")
            .arg("PXAT")
            .arg(unix_ms_ceil(until).max(1))
            .query_async(&mut conn)
            .await
            .map_err(|e| write_failed(&e))
    }

    async fn claimed(&self, key: &str) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn().await?;
        conn.get(claim_key(key)).await.map_err(|e| unavailable(&e))
    }

    async fn release_claim(&self, key: &str, value: &str) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        self.release
            .key(claim_key(key))
            .arg(value)
            .invoke_async::<i64>(&mut conn)
            .await
            .map(|_| ())
            .map_err(|e| unavailable(&e))
    }

    async fn swap_claim(
        &self,
        key: &str,
        expected: &str,
        value: &str,
        until: SystemTime,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        self.swap
            .key(claim_key(key))
            .arg(expected)
            .arg(value)
            .arg(unix_ms_ceil(until).max(1))
            .invoke_async::<i64>(&mut conn)
            .await
            .map(|n| n == 1)
            .map_err(|e| write_failed(&e))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        // A write: refused by a read-only replica, an out-of-memory `noeviction` Redis, or one
        // whose persistence fails (MISCONF).
        redis::cmd("SET")
            .arg(READY_PROBE)
            .arg(1)
            .arg("PX")
            .arg(60_000)
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| unavailable(&e))
    }

    async fn live_leases(&self) -> Result<u64, StoreError> {
        let mut conn = self.conn().await?;
        conn.zcard(EXPIRY).await.map_err(|e| unavailable(&e))
    }
}
