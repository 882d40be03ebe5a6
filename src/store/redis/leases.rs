//! Leases, the [`LeaseStore`] of the Redis store: recording one as issued, renewing and revoking
//! it, reading leases by id, by credential and by task, and counting the unrevoked ones. A
//! lease id names its task ([`LeaseId::task`]): every lease read goes straight to the task's
//! keys, and reads the task's end in the same script (a lease of an ended task is ended).

use std::borrow::Cow;
use std::time::SystemTime;

use async_trait::async_trait;
use redis::AsyncCommands as _;

use super::codec::{TaskEnd, credential_field, decode_record, encode_record, ns_bytes, suffix_of};
use super::keys::{
    BUCKETS, bucket_of, creds_key, epoch_key, expiry_key, leases_key, lock_key, log_key, member,
    task_key,
};
use super::link::Link;
use super::{CAS_ATTEMPTS, RedisStore, unavailable, write_failed};
use crate::identity::WorkloadId;
use crate::lease::{Lease, LeaseId, check_issuable};
use crate::store::{
    IssueError, LeaseStore, Renewal, Revision, StoreError, UpdateError, VersionedTask,
    check_renewable, encode, unix_ms, unix_ms_ceil,
};
use crate::task::{Task, TaskError, TaskId, Unmet};

/// A lease as `lua/read_lease.lua` answers: suffix, record, executor, the task's `le`, `lr`.
type LeaseReply = (Vec<u8>, Vec<u8>, String, Vec<u8>, String);

#[async_trait]
impl LeaseStore for RedisStore {
    /// Checks the task (`seen`, or as read), then records the lease if the task is unchanged
    /// since. A task changed since `seen` is [`IssueError::Changed`]; one changed since this
    /// store read it is read and checked again, up to `CAS_ATTEMPTS` times.
    async fn issue_lease(
        &self,
        lease: &Lease,
        seen: Option<(&Task, Revision)>,
        now: SystemTime,
    ) -> Result<Option<VersionedTask>, IssueError> {
        let Some(suffix) = lease
            .id
            .suffix()
            .filter(|_| lease.id.task() == Some(lease.task))
        else {
            return Err(StoreError::Corrupt(format!(
                "lease id {} does not name its task {}",
                lease.id, lease.task
            ))
            .into());
        };
        let mut conn = self.conn().await?;
        let task_id = lease.task.to_string();
        let bucket = bucket_of(&task_id);
        let record = encode_record(lease)?;
        let credential = credential_field(&lease.credential)?;
        let mut seen = seen.map(|(task, revision)| (Cow::Borrowed(task), revision));
        let told = seen.is_some();
        for _ in 0..CAS_ATTEMPTS {
            let (task, revision) = match seen.take() {
                Some(seen) => seen,
                None => match self.read(&mut conn, &task_id).await? {
                    Some(VersionedTask { task, revision }) => (Cow::Owned(task), revision),
                    None => return Err(IssueError::NotFound),
                },
            };
            check_issuable(&task, &lease.agent, now)?;
            let version = revision.0.to_string();
            let started = task.started_at.is_none().then(|| {
                let mut task = task.clone().into_owned();
                task.started_at = Some(now);
                VersionedTask {
                    task,
                    revision: Revision(revision.0 + 1),
                }
            });
            let (next_version, data) = match &started {
                Some(next) => (next.revision.0.to_string(), encode(&next.task)?),
                None => (String::new(), Vec::new()),
            };
            self.unless_locked(&mut conn, &lease.agent).await?;
            let mut call = self.scripts.issue.prepare_invoke();
            call.key(task_key(&task_id))
                .key(leases_key(&task_id))
                .key(creds_key(&task_id))
                .key(expiry_key(bucket))
                .key(epoch_key(bucket));
            if !self.links.is_cluster() {
                call.key(lock_key(&lease.agent));
            }
            let outcome: i64 = call
                .arg(&version)
                .arg(next_version)
                .arg(data)
                .arg(&suffix[..])
                .arg(record.as_slice())
                .arg(credential.as_slice())
                .arg(unix_ms_ceil(lease.expires_at))
                .arg(member(&lease.task, suffix))
                .arg(lease.agent.as_str())
                .arg(unix_ms(now))
                .invoke_async(&mut conn)
                .await
                .map_err(|e| write_failed(&e))?;
            match outcome {
                1 => {
                    self.settle(&mut conn, &task_key(&task_id)).await?;
                    return Ok(started);
                }
                0 if told => {
                    return match self.read(&mut conn, &task_id).await? {
                        Some(current) => Err(IssueError::Changed(Box::new(current))),
                        None => Err(IssueError::NotFound),
                    };
                }
                -1 => return Err(IssueError::NotFound),
                -4 => return Err(IssueError::StoreReset),
                -5 => return Err(IssueError::Exists),
                -2 => return Err(self.locked(&mut conn, &lease.agent).await),
                _ => continue, // the task changed since it was checked: check again
            }
        }
        Err(StoreError::Contention(lease.task).into())
    }

    /// The id names its task; an id that names none (an earlier layout's) is not found.
    async fn get_lease(&self, id: &LeaseId) -> Result<Option<Lease>, StoreError> {
        let (Some(task), Some(suffix)) = (id.task(), id.suffix()) else {
            return Ok(None);
        };
        let mut conn = self.conn().await?;
        self.read_lease(&mut conn, &task, &suffix[..], &[]).await
    }

    /// Checks the task and the lease, then gives the lease its new credential if the task is
    /// unchanged since; else checks again, up to `CAS_ATTEMPTS` times.
    async fn renew_lease(&self, id: &LeaseId, to: &Renewal<'_>) -> Result<Lease, IssueError> {
        let (credential, expires_at, now) = (to.credential, to.expires_at, to.now);
        let (Some(task_id), Some(suffix)) = (id.task(), id.suffix()) else {
            return Err(IssueError::NotFound);
        };
        let key = task_id.to_string();
        let bucket = bucket_of(&key);
        let field = credential_field(credential)?;
        let mut conn = self.conn().await?;
        for _ in 0..CAS_ATTEMPTS {
            let Some(lease) = self
                .read_lease(&mut conn, &task_id, &suffix[..], &[])
                .await?
            else {
                return Err(IssueError::NotFound);
            };
            let Some(VersionedTask { task, revision }) = self.read(&mut conn, &key).await? else {
                return Err(IssueError::NotFound);
            };
            let version = revision.0.to_string();
            check_issuable(&task, &lease.agent, now)?;
            check_renewable(&lease, now)?;
            self.unless_locked(&mut conn, &lease.agent).await?;
            let mut call = self.scripts.renew.prepare_invoke();
            call.key(task_key(&key))
                .key(leases_key(&key))
                .key(creds_key(&key))
                .key(epoch_key(bucket))
                .key(log_key(bucket))
                .key(expiry_key(bucket));
            if !self.links.is_cluster() {
                call.key(lock_key(&lease.agent));
            }
            let outcome: Vec<Vec<u8>> = call
                .arg(&version)
                .arg(&suffix[..])
                .arg(field.as_slice())
                .arg(&ns_bytes(expires_at)[..])
                .arg(&ns_bytes(now)[..])
                .arg(unix_ms(now))
                .arg(&key)
                .arg(unix_ms_ceil(expires_at))
                .arg(member(&task_id, suffix))
                .invoke_async(&mut conn)
                .await
                .map_err(|e| write_failed(&e))?;
            match outcome.first().map(Vec::as_slice) {
                Some(b"ok") => {
                    self.settle(&mut conn, &task_key(&key)).await?;
                    return Ok(ended_one(task_id, suffix, &outcome, "renewal")?);
                }
                Some(b"-1") => return Err(IssueError::NotFound),
                Some(b"-2") => return Err(self.locked(&mut conn, &lease.agent).await),
                Some(b"-4") => return Err(IssueError::StoreReset),
                Some(b"-3") => {
                    return Err(TaskError::Precondition(Unmet::LeaseNoLongerActive).into());
                }
                _ => continue, // the task changed since it was checked: check again
            }
        }
        Err(
            StoreError::Unavailable(format!("too much contention renewing lease {id}; retry"))
                .into(),
        )
    }

    /// One script, which also takes the lease out of the expiry index and logs the revocation.
    async fn revoke_lease(
        &self,
        id: &LeaseId,
        reason: &str,
        now: SystemTime,
    ) -> Result<Lease, UpdateError> {
        let (Some(task_id), Some(suffix)) = (id.task(), id.suffix()) else {
            return Err(UpdateError::NotFound);
        };
        let key = task_id.to_string();
        let bucket = bucket_of(&key);
        let mut conn = self.conn().await?;
        let outcome: Vec<Vec<u8>> = self
            .scripts
            .revoke_lease
            .key(task_key(&key))
            .key(leases_key(&key))
            .key(expiry_key(bucket))
            .key(log_key(bucket))
            .arg(&suffix[..])
            .arg(&key)
            .arg(reason)
            .arg(&ns_bytes(now)[..])
            .arg(unix_ms(now))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| write_failed(&e))?;
        match outcome.first().map(Vec::as_slice) {
            Some(b"ok") => {
                self.settle(&mut conn, &task_key(&key)).await?;
                Ok(ended_one(task_id, suffix, &outcome, "revocation")?)
            }
            Some(b"missing") => Err(UpdateError::NotFound),
            _ => Err(TaskError::Precondition(Unmet::LeaseNotActive).into()),
        }
    }

    /// In issuance order (the order of the suffixes), with the task's end laid over them.
    async fn task_leases(&self, task: &TaskId) -> Result<Vec<Lease>, StoreError> {
        let mut conn = self.conn().await?;
        let key = task.to_string();
        #[expect(
            clippy::type_complexity,
            reason = "an HMGET and an HGETALL reply, decoded as redis-rs gives them"
        )]
        let ((x, le, lr), all): (
            (Option<String>, Option<Vec<u8>>, Option<String>),
            Vec<(Vec<u8>, Vec<u8>)>,
        ) = redis::pipe()
            .atomic()
            .cmd("HMGET")
            .arg(task_key(&key))
            .arg("x")
            .arg("le")
            .arg("lr")
            .hgetall(leases_key(&key))
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        if all.is_empty() {
            return Ok(Vec::new());
        }
        let agent = match x {
            Some(x) => parse_agent(&x)?,
            // A task of an earlier layout: its JSON names its executor.
            None => match self.read(&mut conn, &key).await? {
                Some(v) => v.task.executor,
                None => return Ok(Vec::new()),
            },
        };
        let end = TaskEnd::from_fields(le, lr);
        let mut all = all;
        all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        all.iter()
            .map(|(s, rec)| decode_record(*task, &agent, suffix_of(s)?, rec, end.as_ref()))
            .collect()
    }

    /// The task's credential hash names the lease.
    async fn find_lease(
        &self,
        task: &TaskId,
        credential: &str,
    ) -> Result<Option<Lease>, StoreError> {
        let Ok(field) = credential_field(credential) else {
            return Ok(None); // longer than any recorded
        };
        let mut conn = self.conn().await?;
        self.read_lease(&mut conn, task, &[], &field).await
    }

    /// The sizes of the buckets' expiry indexes.
    async fn live_leases(&self) -> Result<u64, StoreError> {
        let conn = self.conn().await?;
        let counts = futures_util::future::try_join_all((0..BUCKETS).map(|b| {
            let mut conn = conn.clone();
            async move { conn.zcard::<_, u64>(expiry_key(b)).await }
        }))
        .await
        .map_err(|e| unavailable(&e))?;
        Ok(counts.iter().sum())
    }
}

impl RedisStore {
    /// On a Cluster, where the issuance script cannot read the agent's lock (another slot),
    /// reads it first: a lock whose marking was cut short (its broker died) holds all the
    /// same. The marks close the race with a lock being taken meanwhile (see `locks.rs`).
    async fn unless_locked(&self, conn: &mut Link, agent: &WorkloadId) -> Result<(), IssueError> {
        if !self.links.is_cluster() {
            return Ok(());
        }
        let lock: Option<String> = conn
            .get(lock_key(agent))
            .await
            .map_err(|e| unavailable(&e))?;
        match lock {
            Some(l) => Err(IssueError::Locked(super::locks::reason_of(&l))),
            None => Ok(()),
        }
    }

    /// The refusal of an issuance or renewal that found the agent locked, with the lock's
    /// reason (read after: empty when the lock went meanwhile).
    async fn locked(&self, conn: &mut Link, agent: &WorkloadId) -> IssueError {
        IssueError::Locked(self.lock_reason(conn, agent).await)
    }

    /// Reads the lease of `task` with `suffix` (or, with an empty suffix, holding the
    /// credential field `credential`), its task's end laid over it.
    async fn read_lease(
        &self,
        conn: &mut Link,
        task: &TaskId,
        suffix: &[u8],
        credential: &[u8],
    ) -> Result<Option<Lease>, StoreError> {
        let key = task.to_string();
        let reply: Option<LeaseReply> = self
            .scripts
            .read_lease
            .key(task_key(&key))
            .key(leases_key(&key))
            .key(creds_key(&key))
            .arg(suffix)
            .arg(credential)
            .invoke_async(conn)
            .await
            .map_err(|e| unavailable(&e))?;
        let Some((suffix, rec, agent, le, lr)) = reply else {
            return Ok(None);
        };
        let end = TaskEnd::from_fields(Some(le), Some(lr));
        decode_record(
            *task,
            &parse_agent(&agent)?,
            suffix_of(&suffix)?,
            &rec,
            end.as_ref(),
        )
        .map(Some)
    }
}

/// The executor a script read from a task.
pub(super) fn parse_agent(agent: &str) -> Result<WorkloadId, StoreError> {
    WorkloadId::parse(agent).map_err(|_| StoreError::Corrupt(format!("task executor {agent:?}")))
}

/// The lease of a `{'ok', executor, record}` answer.
fn ended_one(
    task: TaskId,
    suffix: [u8; 8],
    outcome: &[Vec<u8>],
    what: &str,
) -> Result<Lease, StoreError> {
    let (Some(agent), Some(rec)) = (outcome.get(1), outcome.get(2)) else {
        return Err(StoreError::Corrupt(format!("{what}: short answer")));
    };
    let agent =
        std::str::from_utf8(agent).map_err(|_| StoreError::Corrupt(format!("{what}: executor")))?;
    decode_record(task, &parse_agent(agent)?, suffix, rec, None)
}

/// The leases of `{suffix, record, ...}` (a chunk's answer) of `task`, executed by `agent`.
pub(super) fn chunk_leases(
    task: TaskId,
    agent: &WorkloadId,
    pairs: &[Vec<u8>],
) -> Result<Vec<Lease>, StoreError> {
    pairs
        .chunks_exact(2)
        .map(|p| decode_record(task, agent, suffix_of(&p[0])?, &p[1], None))
        .collect()
}
