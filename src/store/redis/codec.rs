//! The record codec of the Redis store: how a task's and a lease's hash fields and a revocation
//! log entry become domain values. Tasks and leases are JSON as written, with the fields that
//! scripts change in place (a lock's sweep, a revocation, a renewal) laid over them.

use std::time::{Duration, SystemTime};

use redis::{FromRedisValue, ParsingError, Value};

use crate::identity::WorkloadId;
use crate::lease::{CredentialKind, Cursor, Lease, LeaseId, LeaseState, Revocation};
use crate::store::{StoreError, decode, decode_lease, from_unix_ms};
use crate::task::{Task, TaskId, TaskState};

/// The hash fields of a task as listed, in the order of [`TASK_FIELDS`].
pub(super) const TASK_FIELDS: [&str; 4] = ["data", "state", "ended_ms", "end_reason"];

/// The hash fields of a task as listed: `data`, and the overlay `state`, `ended_ms`,
/// `end_reason` a lock's sweep writes beside the JSON.
pub(super) struct TaskFields {
    /// The task as last written, JSON; `None` when the task does not exist.
    pub(super) data: Option<Vec<u8>>,
    /// The state a sweep gave it.
    pub(super) state: Option<String>,
    /// When the sweep ended it (ms since the epoch).
    pub(super) ended_ms: Option<u64>,
    /// Why the sweep ended it.
    pub(super) end_reason: Option<String>,
}

impl TaskFields {
    /// The task with its overlay laid over it; `None` when it does not exist.
    pub(super) fn into_task(self) -> Result<Option<Task>, StoreError> {
        let Some(data) = self.data else {
            return Ok(None);
        };
        with_overlay(decode(&data)?, self.state, self.ended_ms, self.end_reason).map(Some)
    }
}

impl FromRedisValue for TaskFields {
    fn from_redis_value(v: Value) -> Result<Self, ParsingError> {
        let (data, state, ended_ms, end_reason) = FromRedisValue::from_redis_value(v)?;
        Ok(Self {
            data,
            state,
            ended_ms,
            end_reason,
        })
    }
}

/// The hash fields of a task as read for an update: `v`, then [`TASK_FIELDS`].
pub(super) struct TaskRecord {
    /// The version compare-and-set checks.
    pub(super) version: Option<String>,
    /// The task.
    pub(super) fields: TaskFields,
}

impl FromRedisValue for TaskRecord {
    fn from_redis_value(v: Value) -> Result<Self, ParsingError> {
        let (version, data, state, ended_ms, end_reason) = FromRedisValue::from_redis_value(v)?;
        Ok(Self {
            version,
            fields: TaskFields {
                data,
                state,
                ended_ms,
                end_reason,
            },
        })
    }
}

/// Lays the state a lock script wrote beside the JSON over the task.
pub(super) fn with_overlay(
    mut task: Task,
    state: Option<String>,
    ended_ms: Option<u64>,
    reason: Option<String>,
) -> Result<Task, StoreError> {
    if let Some(s) = state {
        task.state = TaskState::parse(&s)
            .ok_or_else(|| StoreError::Corrupt(format!("task {}: state {s:?}", task.id)))?;
        task.ended_at = ended_ms.map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms));
        task.updated_at = task.ended_at.unwrap_or(task.updated_at);
        task.end_reason = reason;
    }
    Ok(task)
}

/// The hash fields of a lease, in the order of [`LeaseFields`].
pub(super) const LEASE_FIELDS: [&str; 6] =
    ["data", "state", "ended_ms", "reason", "cred", "exp_ns"];

/// The hash fields of a lease: `data`, `state`, `ended_ms`, `reason`, `cred`, `exp_ns`.
pub(super) struct LeaseFields {
    /// The lease as issued, JSON; `None` when the lease does not exist.
    data: Option<Vec<u8>>,
    /// `active`, `revoked` or `expired`.
    state: Option<String>,
    /// When it ended (ms since the epoch).
    ended_ms: Option<u64>,
    /// Why it ended.
    reason: Option<String>,
    /// Its credential now (a renewal replaces it).
    cred: Option<String>,
    /// When that credential expires (ns since the epoch).
    exp_ns: Option<u64>,
}

impl FromRedisValue for LeaseFields {
    fn from_redis_value(v: Value) -> Result<Self, ParsingError> {
        let (data, state, ended_ms, reason, cred, exp_ns) = FromRedisValue::from_redis_value(v)?;
        Ok(Self {
            data,
            state,
            ended_ms,
            reason,
            cred,
            exp_ns,
        })
    }
}

/// A lease from its hash fields (the JSON and the fields scripts change beside it); `None`
/// when the lease does not exist.
pub(super) fn lease_from_fields(
    lease: &str,
    fields: LeaseFields,
) -> Result<Option<Lease>, StoreError> {
    let (data, state, ended_ms) = (fields.data, fields.state, fields.ended_ms);
    let (reason, cred, exp_ns) = (fields.reason, fields.cred, fields.exp_ns);
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

/// One stream entry: its id and its fields, flat (`field, value, ...`). A tuple: redis-rs
/// decodes stream replies into it directly.
pub(super) type StreamEntry = (String, Vec<String>);

/// One stream of an `XREAD` reply: its key and its entries.
pub(super) type StreamReply = (String, Vec<StreamEntry>);

/// A revocation from a log entry written by `lua/log_revocation.lua`.
pub(super) fn revocation_from_entry((id, flat): StreamEntry) -> Result<Revocation, StoreError> {
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
pub(super) fn unix_ns(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}
