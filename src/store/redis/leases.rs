//! Leases, the [`LeaseStore`] of the Redis store: recording one as issued, renewing and revoking
//! it, reading leases by id, by credential and by task, and counting the unrevoked ones.

use std::borrow::Cow;
use std::time::SystemTime;

use async_trait::async_trait;
use redis::AsyncCommands as _;
use redis::aio::ConnectionManager;

use super::codec::{LEASE_FIELDS, LeaseFields, lease_from_fields, unix_ns};
use super::keys::{
    EPOCH, EXPIRY, REVOCATIONS, cred_key, lease_index_key, lease_key, leases_key, live_key,
    lock_key, member, task_key,
};
use super::{CAS_ATTEMPTS, RedisStore, unavailable, write_failed};
use crate::lease::{Lease, LeaseId, check_issuable};
use crate::store::{
    IssueError, LeaseStore, Renewal, Revision, StoreError, UpdateError, VersionedTask,
    check_renewable, encode, encode_lease, unix_ms, unix_ms_ceil,
};
use crate::task::{Task, TaskError, TaskId, Unmet};

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
        let mut conn = self.conn().await?;
        let task_id = lease.task.to_string();
        let lease_json = encode_lease(lease)?;
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
            let outcome: i64 = self
                .scripts
                .issue
                .key(task_key(&task_id))
                .key(lock_key(&lease.agent))
                .key(lease_key(&task_id, lease.id.as_str()))
                .key(leases_key(&task_id))
                .key(cred_key(&task_id, &lease.credential))
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
                1 => return Ok(started),
                0 if told => {
                    return match self.read(&mut conn, &task_id).await? {
                        Some(current) => Err(IssueError::Changed(Box::new(current))),
                        None => Err(IssueError::NotFound),
                    };
                }
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

    /// The lease index names its task.
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

    /// Checks the task and the lease, then gives the lease its new credential if the task is
    /// unchanged since; else checks again, up to `CAS_ATTEMPTS` times.
    async fn renew_lease(&self, id: &LeaseId, to: &Renewal<'_>) -> Result<Lease, IssueError> {
        let (credential, expires_at, now) = (to.credential, to.expires_at, to.now);
        let mut conn = self.conn().await?;
        for _ in 0..CAS_ATTEMPTS {
            let Some(lease) = self.get_lease(id).await? else {
                return Err(IssueError::NotFound);
            };
            let task_id = lease.task.to_string();
            let Some(VersionedTask { task, revision }) = self.read(&mut conn, &task_id).await?
            else {
                return Err(IssueError::NotFound);
            };
            let version = revision.0.to_string();
            check_issuable(&task, &lease.agent, now)?;
            check_renewable(&lease, now)?;
            let outcome: i64 = self
                .scripts
                .renew
                .key(task_key(&task_id))
                .key(lock_key(&lease.agent))
                .key(lease_key(&task_id, id.as_str()))
                .key(cred_key(&task_id, credential))
                .key(EPOCH)
                .key(REVOCATIONS)
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

    /// One script, which also takes the lease out of the expiry index and the agent's live
    /// leases and logs the revocation.
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
            .scripts
            .revoke_lease
            .key(lease_key(&task_id, id.as_str()))
            .key(EXPIRY)
            .key(live_key(lease.agent.as_str()))
            .key(REVOCATIONS)
            .arg(unix_ms(now))
            .arg(reason)
            .arg(member(&task_id, id.as_str()))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| write_failed(&e))?;
        match outcome {
            1 => self
                .read_lease(&mut conn, &task_id, id.as_str())
                .await?
                .ok_or(UpdateError::NotFound),
            -1 => Err(UpdateError::NotFound),
            _ => Err(TaskError::Precondition(Unmet::LeaseNotActive).into()),
        }
    }

    /// In issuance order.
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

    /// The credential index names the lease.
    async fn find_lease(
        &self,
        task: &TaskId,
        credential: &str,
    ) -> Result<Option<Lease>, StoreError> {
        let mut conn = self.conn().await?;
        let task = task.to_string();
        let lease: Option<String> = conn
            .get(cred_key(&task, credential))
            .await
            .map_err(|e| unavailable(&e))?;
        match lease {
            Some(id) => self.read_lease(&mut conn, &task, &id).await,
            None => Ok(None),
        }
    }

    /// The size of the expiry index.
    async fn live_leases(&self) -> Result<u64, StoreError> {
        let mut conn = self.conn().await?;
        conn.zcard(EXPIRY).await.map_err(|e| unavailable(&e))
    }
}

impl RedisStore {
    /// Reads a lease: the JSON as issued, with the fields that change in place laid over it.
    async fn read_lease(
        &self,
        conn: &mut ConnectionManager,
        task: &str,
        lease: &str,
    ) -> Result<Option<Lease>, StoreError> {
        let fields: LeaseFields = redis::cmd("HMGET")
            .arg(lease_key(task, lease))
            .arg(&LEASE_FIELDS)
            .query_async(conn)
            .await
            .map_err(|e| unavailable(&e))?;
        lease_from_fields(lease, fields)
    }

    /// Reads the leases `(task, lease id)` in one pipelined round trip, in the order given,
    /// skipping those that do not exist.
    pub(super) async fn read_leases<T: AsRef<str>, L: AsRef<str>>(
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
                .arg(lease_key(task.as_ref(), lease.as_ref()))
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
}
