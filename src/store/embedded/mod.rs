//! The embedded store: one redb file on local disk, for a single broker process and for
//! `serve --dev`. Every operation is one redb transaction (ACID, crash-safe, durable on commit),
//! run on tokio's blocking pool.
//!
//! Tables: `tasks` (id -> JSON), `tasks_by_executor` and `tasks_by_requester` ((who, id) -> ()),
//! `tasks_ended` ((ended ms, id) -> ()) for retention, `leases` ((task, lease) -> JSON),
//! `credentials` ((task, jti or serial) -> lease), `lease_tasks` (lease -> task) and `locks`
//! (agent -> JSON). Task ids are UUIDv7 strings, so key
//! order is creation order.
//!
//! This file holds the store, opening it and the [`Store`] implementation; the transactions
//! live by topic: `tables` (definitions and record codec), `tasks`, `leases`, `locks`, `log`
//! (the revocation log), `claims` and `meta` (epoch marker, signing keys). `errors` turns
//! redb's errors into [`StoreError`]s, so the bodies use `?`.

mod claims;
mod errors;
mod leases;
mod locks;
mod log;
mod meta;
mod tables;
mod tasks;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase as _, ReadableTable as _};
use tokio::sync::watch;

use self::tables::{DEADLINES, EXPIRY, TASKS};
use self::tasks::change_in;
use super::{
    Epoch, IssueError, Store, StoreError, TaskChange, TaskPage, TaskQuery, UpdateError, decode,
    from_unix_ms,
};
use crate::identity::WorkloadId;
use crate::lease::{Cursor, Lease, LeaseId, Lock, Revocation, Swept};
use crate::mint::PublishedKey;
use crate::task::{Task, TaskId};

/// The embedded store. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    path: PathBuf,
    /// Bumped after each commit that logged a revocation; wakes [`Store::revocations`] waiters.
    logged: Arc<watch::Sender<u64>>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.path)
            .finish()
    }
}

/// Makes the database file readable by its owner only (0600) if it is new, and refuses one
/// that others may read or write: it holds tasks, approval notes, leases and the key that seals
/// page tokens.
fn private_file(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let failed = |e: std::io::Error| StoreError::Unavailable(format!("{}: {e}", path.display()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(failed(e)),
    }
    let mode = std::fs::metadata(path)
        .map_err(failed)?
        .permissions()
        .mode();
    if mode & 0o007 != 0 {
        return Err(StoreError::Unavailable(format!(
            "{}: others may read or write it (mode {:o}): chmod 600 it; it holds the tasks, \
             leases and the key that seals page tokens",
            path.display(),
            mode & 0o777
        )));
    }
    Ok(())
}

impl EmbeddedStore {
    /// Opens (or creates) the store file at `path`; its directory must exist.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the file cannot be opened (another process holds it, it
    /// is not a redb file, permissions).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        private_file(path)?;
        let db = Database::create(path)
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", path.display())))?;
        let txn = db.begin_write()?;
        tables::create_tables(&txn)?;
        txn.commit()?;
        Ok(Self {
            db: Arc::new(db),
            path: path.to_owned(),
            logged: Arc::new(watch::Sender::new(0)),
        })
    }

    /// Runs `f` on the blocking pool. A worker that fails is [`StoreError::Unavailable`].
    async fn blocking<T, E, F>(&self, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&Database) -> Result<T, E> + Send + 'static,
    {
        let db = self.db.clone();
        match tokio::task::spawn_blocking(move || f(&db)).await {
            Ok(done) => done,
            Err(e) => Err(errors::worker(e).into()),
        }
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn create_task(&self, task: &Task) -> Result<(), StoreError> {
        self.insert_task(task).await
    }

    async fn get_task(&self, id: &TaskId) -> Result<Option<Task>, StoreError> {
        let id = id.to_string();
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let tasks = txn.open_table(TASKS)?;
            let got = tasks.get(id.as_str())?;
            got.map(|v| decode(v.value())).transpose()
        })
        .await
    }

    async fn update_task(
        &self,
        id: &TaskId,
        change: TaskChange,
        retention: Duration,
    ) -> Result<Task, UpdateError> {
        // Running the change inside the write transaction (redb has one writer at a time) makes
        // read-modify-write atomic.
        let key = id.to_string();
        self.blocking(move |db| {
            let txn = db.begin_write()?;
            let updated = change_in(&txn, &key, &change, retention)?;
            txn.commit()?;
            Ok(updated)
        })
        .await
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
        self.revoke_by_id(id, reason, now).await
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
        self.put_lock(lock).await
    }

    async fn sweep_lock(
        &self,
        agent: &WorkloadId,
        reason: &str,
        at: SystemTime,
        retention: Duration,
        limit: usize,
    ) -> Result<Swept, StoreError> {
        self.sweep_locked_agent(agent, reason, at, retention, limit)
            .await
    }

    async fn unlock_agent(&self, agent: &WorkloadId) -> Result<Option<Lock>, StoreError> {
        self.remove_lock(agent).await
    }

    async fn agent_lock(
        &self,
        agent: &WorkloadId,
        now: SystemTime,
    ) -> Result<Option<Lock>, StoreError> {
        self.read_lock(agent, now).await
    }

    async fn list_locks(&self, now: SystemTime) -> Result<Vec<Lock>, StoreError> {
        self.read_locks(now).await
    }

    async fn expire_leases(&self, now: SystemTime, limit: usize) -> Result<Vec<Lease>, StoreError> {
        self.reap_expired(now, limit).await
    }

    async fn overdue_tasks(
        &self,
        now: SystemTime,
        limit: usize,
    ) -> Result<Vec<TaskId>, StoreError> {
        self.due_tasks(now, limit).await
    }

    async fn forget_deadline(&self, id: &TaskId) -> Result<(), StoreError> {
        self.unfile_deadline(id).await
    }

    async fn next_due(&self) -> Result<Option<SystemTime>, StoreError> {
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let lease = txn.open_table(EXPIRY)?.first()?.map(|(k, _)| k.value().0);
            let task = txn
                .open_table(DEADLINES)?
                .first()?
                .map(|(k, _)| k.value().0);
            Ok(lease.into_iter().chain(task).min().map(from_unix_ms))
        })
        .await
    }

    async fn publish_key(&self, key: &PublishedKey) -> Result<(), StoreError> {
        self.write_key(key).await
    }

    async fn published_keys(&self, now: SystemTime) -> Result<Vec<PublishedKey>, StoreError> {
        self.live_keys(now).await
    }

    async fn prune_ended(&self, ended_before: SystemTime) -> Result<usize, StoreError> {
        self.prune_ended_tasks(ended_before).await
    }

    async fn revocations(
        &self,
        after: Option<Cursor>,
        limit: usize,
        wait: Duration,
    ) -> Result<Vec<Revocation>, StoreError> {
        self.wait_for_revocations(after, limit, wait).await
    }

    async fn revocation_head(&self) -> Result<Cursor, StoreError> {
        self.last_revocation().await
    }

    async fn prune_revocations(&self, before: SystemTime) -> Result<(), StoreError> {
        self.drop_revocations(before).await
    }

    async fn epoch(&self, fresh: &Epoch) -> Result<Epoch, StoreError> {
        self.epoch_or(fresh).await
    }

    async fn claim(
        &self,
        key: &str,
        value: &str,
        until: SystemTime,
    ) -> Result<Option<String>, StoreError> {
        self.take_claim(key, value, until).await
    }

    async fn claimed(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.read_claim(key).await
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
        // A write transaction (committed empty): a file that can no longer be written (a full
        // or read-only disk) is not ready.
        self.blocking(|db| {
            db.begin_write()?.commit()?;
            Ok(())
        })
        .await
    }

    async fn live_leases(&self) -> Result<u64, StoreError> {
        self.blocking(|db| {
            let txn = db.begin_read()?;
            let expiry = txn.open_table(EXPIRY)?;
            Ok(redb::ReadableTableMetadata::len(&expiry)?)
        })
        .await
    }
}
