//! The Redis store, shared by any number of broker replicas. redis-rs async with a connection
//! manager (reconnects by itself; bounded connection and response timeouts so that a dead Redis
//! answers `UNAVAILABLE` quickly). Every multi-step change is one Lua script.
//!
//! - `keys.rs`: the key layout, written once, with its documentation (what each key holds, what
//!   may be left half-written, what Redis Cluster would need). Read it first.
//! - `codec.rs`: hash fields and log entries to tasks, leases and revocations.
//! - `scripts.rs` and `lua/*.lua`: the scripts, one file each, the revocation step written once.
//! - `tasks.rs`, `leases.rs`, `locks.rs`, `expiry.rs`, `log.rs`, `meta.rs`: the [`Store`]
//!   operations by topic, as inherent methods that the trait implementation below calls.

mod codec;
mod expiry;
mod keys;
mod leases;
mod locks;
mod log;
mod meta;
mod scripts;
mod tasks;

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use redis::AsyncCommands as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use tokio::sync::OnceCell;

use self::keys::{DEADLINES, EXPIRY, claim_key};
use self::scripts::Scripts;
use super::{Epoch, IssueError, Store, StoreError, TaskChange, TaskPage, TaskQuery, UpdateError};
use crate::identity::WorkloadId;
use crate::lease::{Cursor, Lease, LeaseId, Lock, Revocation, Swept};
use crate::mint::PublishedKey;
use crate::task::{Task, TaskId};

/// Attempts of one compare-and-set update before giving up with [`StoreError::Contention`].
const CAS_ATTEMPTS: usize = 16;

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
    scripts: Scripts,
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
            scripts: Scripts::new(),
            watch: tokio::sync::Mutex::new(None),
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
}

#[async_trait]
impl Store for RedisStore {
    async fn create_task(&self, task: &Task) -> Result<(), StoreError> {
        self.insert_task(task).await
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
        self.compare_and_set_task(id, change, retention).await
    }

    async fn list_tasks(&self, query: &TaskQuery) -> Result<TaskPage, StoreError> {
        self.scan_tasks(query).await
    }

    async fn issue_lease(&self, lease: &Lease, now: SystemTime) -> Result<(), IssueError> {
        self.record_lease(lease, now).await
    }

    async fn get_lease(&self, id: &LeaseId) -> Result<Option<Lease>, StoreError> {
        self.lease_by_id(id).await
    }

    async fn renew_lease(
        &self,
        id: &LeaseId,
        credential: &str,
        expires_at: SystemTime,
        now: SystemTime,
    ) -> Result<Lease, IssueError> {
        self.renew_credential(id, credential, expires_at, now).await
    }

    async fn revoke_lease(
        &self,
        id: &LeaseId,
        reason: &str,
        now: SystemTime,
    ) -> Result<Lease, UpdateError> {
        self.revoke_active(id, reason, now).await
    }

    async fn task_leases(&self, task: &TaskId) -> Result<Vec<Lease>, StoreError> {
        self.leases_of_task(task).await
    }

    async fn find_lease(
        &self,
        task: &TaskId,
        credential: &str,
    ) -> Result<Option<Lease>, StoreError> {
        self.lease_by_credential(task, credential).await
    }

    async fn end_task(
        &self,
        id: &TaskId,
        change: TaskChange,
        retention: Duration,
    ) -> Result<(Task, Vec<Lease>), UpdateError> {
        self.end_task_and_leases(id, change, retention).await
    }

    async fn lock_agent(&self, lock: &Lock) -> Result<Lock, StoreError> {
        self.write_lock(lock).await
    }

    async fn sweep_lock(
        &self,
        agent: &WorkloadId,
        reason: &str,
        at: SystemTime,
        retention: Duration,
        limit: usize,
    ) -> Result<Swept, StoreError> {
        self.sweep_step(agent, reason, at, retention, limit).await
    }

    async fn unlock_agent(&self, agent: &WorkloadId) -> Result<Option<Lock>, StoreError> {
        self.lift_lock(agent).await
    }

    async fn agent_lock(
        &self,
        agent: &WorkloadId,
        now: SystemTime,
    ) -> Result<Option<Lock>, StoreError> {
        self.lock_in_force(agent, now).await
    }

    async fn list_locks(&self, now: SystemTime) -> Result<Vec<Lock>, StoreError> {
        self.locks_in_force(now).await
    }

    async fn expire_leases(&self, now: SystemTime, limit: usize) -> Result<Vec<Lease>, StoreError> {
        self.claim_expired(now, limit).await
    }

    async fn overdue_tasks(
        &self,
        now: SystemTime,
        limit: usize,
    ) -> Result<Vec<TaskId>, StoreError> {
        self.past_deadline(now, limit).await
    }

    async fn forget_deadline(&self, id: &TaskId) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        conn.zrem::<_, _, i64>(DEADLINES, id.to_string())
            .await
            .map(|_| ())
            .map_err(|e| unavailable(&e))
    }

    async fn next_due(&self) -> Result<Option<SystemTime>, StoreError> {
        self.earliest_due().await
    }

    async fn publish_key(&self, key: &PublishedKey) -> Result<(), StoreError> {
        self.put_signing_key(key).await
    }

    async fn published_keys(&self, now: SystemTime) -> Result<Vec<PublishedKey>, StoreError> {
        self.live_signing_keys(now).await
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
        self.read_revocations(after, limit, wait).await
    }

    async fn revocation_head(&self) -> Result<Cursor, StoreError> {
        self.last_revocation().await
    }

    async fn prune_revocations(&self, before: SystemTime) -> Result<(), StoreError> {
        self.trim_revocations(before).await
    }

    async fn epoch(&self, fresh: &Epoch) -> Result<Epoch, StoreError> {
        self.epoch_marker(fresh).await
    }

    async fn claim(
        &self,
        key: &str,
        value: &str,
        until: SystemTime,
    ) -> Result<Option<String>, StoreError> {
        self.set_claim(key, value, until).await
    }

    async fn claimed(&self, key: &str) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn().await?;
        conn.get(claim_key(key)).await.map_err(|e| unavailable(&e))
    }

    async fn release_claim(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.drop_claim(key, value).await
    }

    async fn swap_claim(
        &self,
        key: &str,
        expected: &str,
        value: &str,
        until: SystemTime,
    ) -> Result<bool, StoreError> {
        self.replace_claim(key, expected, value, until).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.write_probe().await
    }

    async fn live_leases(&self) -> Result<u64, StoreError> {
        let mut conn = self.conn().await?;
        conn.zcard(EXPIRY).await.map_err(|e| unavailable(&e))
    }
}
