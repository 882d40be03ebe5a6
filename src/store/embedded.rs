//! The embedded store: one redb file on local disk, for a single broker process and for
//! `serve --dev`. Every operation is one redb transaction (ACID, crash-safe, durable on commit),
//! run on tokio's blocking pool.
//!
//! Tables: `tasks` (id -> JSON), `tasks_by_executor` and `tasks_by_requester` ((who, id) -> ()),
//! `tasks_ended` ((ended ms, id) -> ()) for retention, `leases` ((task, lease) -> JSON),
//! `credentials` ((task, jti or serial) -> lease), `lease_tasks` (lease -> task) and `locks`
//! (agent -> JSON). Task ids are UUIDv7 strings, so key
//! order is creation order.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase as _, ReadableTable as _, TableDefinition};
use tokio::sync::watch;

use super::{
    Epoch, IssueError, Store, StoreError, TaskChange, TaskPage, TaskQuery, UpdateError, decode,
    decode_lease, encode, encode_lease, from_unix_ms, task_ended_reason, unix_ms, unix_ms_ceil,
};
use crate::identity::WorkloadId;
use crate::lease::{
    Cursor, Lease, LeaseId, LeaseState, Lock, Revocation, SUPERSEDED, Swept, check_issuable,
};
use crate::mint::PublishedKey;
use crate::task::{Task, TaskError, TaskId};

const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");
const BY_EXECUTOR: TableDefinition<(&str, &str), ()> = TableDefinition::new("tasks_by_executor");
const BY_REQUESTER: TableDefinition<(&str, &str), ()> = TableDefinition::new("tasks_by_requester");
const ENDED: TableDefinition<(u64, &str), ()> = TableDefinition::new("tasks_ended");
const LEASES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("leases");
const CREDENTIALS: TableDefinition<(&str, &str), &str> = TableDefinition::new("credentials");
const LOCKS: TableDefinition<&str, &[u8]> = TableDefinition::new("locks");
const LEASE_TASKS: TableDefinition<&str, &str> = TableDefinition::new("lease_tasks");
const SIGNING_KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("signing_keys");
/// Active leases by expiry (ms, rounded up): what the reaper ends next.
const EXPIRY: TableDefinition<(u64, &str, &str), ()> = TableDefinition::new("lease_expiry");
/// Tasks by deadline (ms, rounded up), filed when created.
const DEADLINES: TableDefinition<(u64, &str), ()> = TableDefinition::new("task_deadlines");
/// Store-wide markers: `epoch` (the JSON [`Epoch`]).
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// Claims: key -> (expiry in ms since the epoch, value).
const CLAIMS: TableDefinition<&str, (u64, &str)> = TableDefinition::new("claims");
/// The revocation log: key the [`Cursor`] (`ms`, `seq`), value the JSON [`Revocation`].
const REVOCATIONS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("revocations");

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("embedded store: {e}"))
}

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
        let txn = db.begin_write().map_err(backend)?;
        txn.open_table(TASKS).map_err(backend)?;
        txn.open_table(BY_EXECUTOR).map_err(backend)?;
        txn.open_table(BY_REQUESTER).map_err(backend)?;
        txn.open_table(ENDED).map_err(backend)?;
        txn.open_table(LEASES).map_err(backend)?;
        txn.open_table(CREDENTIALS).map_err(backend)?;
        txn.open_table(LOCKS).map_err(backend)?;
        txn.open_table(LEASE_TASKS).map_err(backend)?;
        txn.open_table(SIGNING_KEYS).map_err(backend)?;
        txn.open_table(EXPIRY).map_err(backend)?;
        txn.open_table(DEADLINES).map_err(backend)?;
        txn.open_table(REVOCATIONS).map_err(backend)?;
        txn.open_table(META).map_err(backend)?;
        txn.open_table(CLAIMS).map_err(backend)?;
        txn.commit().map_err(backend)?;
        Ok(Self {
            db: Arc::new(db),
            path: path.to_owned(),
            logged: Arc::new(watch::Sender::new(0)),
        })
    }

    /// Wakes the waiters of [`Store::revocations`] after a commit that may have logged one.
    fn logged(&self) {
        self.logged.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Reads up to `limit` log entries after `after`.
    async fn read_revocations(
        &self,
        after: Option<Cursor>,
        limit: usize,
    ) -> Result<Vec<Revocation>, StoreError> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let log = txn.open_table(REVOCATIONS).map_err(backend)?;
            let from = after.unwrap_or(Cursor::START);
            let range = log.range((from.ms, from.seq)..).map_err(backend)?;
            let mut out = Vec::new();
            for entry in range {
                let (k, v) = entry.map_err(backend)?;
                let (ms, seq) = k.value();
                let cursor = Cursor { ms, seq };
                if after.is_some_and(|a| cursor <= a) {
                    continue;
                }
                if out.len() >= limit {
                    break;
                }
                let mut r: Revocation = serde_json::from_slice(v.value())
                    .map_err(|e| StoreError::Corrupt(format!("revocation {cursor}: {e}")))?;
                r.cursor = cursor;
                out.push(r);
            }
            Ok(out)
        })
        .await
        .map_err(store_only)
    }

    /// Runs `f` on the blocking pool.
    async fn blocking<T, F>(&self, f: F) -> Result<T, UpdateError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, UpdateError> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| UpdateError::Store(backend(format!("worker: {e}"))))?
    }
}

/// A file without its epoch marker was replaced (its data lost) since the broker last looked:
/// nothing is recorded in it until a new epoch begins (see the Redis store's `ISSUE`).
fn has_epoch(txn: &redb::WriteTransaction) -> Result<(), IssueError> {
    match txn
        .open_table(META)
        .map_err(backend)?
        .get("epoch")
        .map_err(backend)?
    {
        Some(_) => Ok(()),
        None => Err(IssueError::StoreReset),
    }
}

/// The lock of `agent` that holds at `now`, read inside write transaction `txn`.
fn lock_in(
    txn: &redb::WriteTransaction,
    agent: &WorkloadId,
    now: SystemTime,
) -> Result<Option<Lock>, StoreError> {
    let locks = txn.open_table(LOCKS).map_err(backend)?;
    let Some(v) = locks.get(agent.as_str()).map_err(backend)? else {
        return Ok(None);
    };
    let lock: Lock = serde_json::from_slice(v.value())
        .map_err(|e| StoreError::Corrupt(format!("lock of {agent}: {e}")))?;
    Ok(lock.holds_at(now).then_some(lock))
}

/// Appends revocations to the log inside write transaction `txn`, numbered after the last
/// entry (`ms` never goes back, so the log stays in order if the clock does).
fn log_in(txn: &redb::WriteTransaction, revoked: &[Revocation]) -> Result<(), StoreError> {
    if revoked.is_empty() {
        return Ok(());
    }
    let mut log = txn.open_table(REVOCATIONS).map_err(backend)?;
    let mut last = log.last().map_err(backend)?.map(|(k, _)| {
        let (ms, seq) = k.value();
        Cursor { ms, seq }
    });
    for r in revoked {
        let ms = unix_ms(r.revoked_at);
        let next = match last {
            Some(l) if l.ms >= ms => Cursor {
                ms: l.ms,
                seq: l.seq + 1,
            },
            _ => Cursor { ms, seq: 0 },
        };
        let json = serde_json::to_vec(r)
            .map_err(|e| StoreError::Corrupt(format!("encoding revocation: {e}")))?;
        log.insert((next.ms, next.seq), json.as_slice())
            .map_err(backend)?;
        last = Some(next);
    }
    Ok(())
}

/// Revokes every active lease of `task` in `leases` (a table of a write transaction), logs the
/// revocations, and returns the leases.
/// Takes `lease` of `task` out of the expiry index (it ended before its expiry): the index holds
/// exactly the unrevoked leases, and the reaper never visits an ended one.
fn unfile(
    expiry: &mut redb::Table<'_, (u64, &'static str, &'static str), ()>,
    task: &str,
    lease: &Lease,
) -> Result<(), StoreError> {
    expiry
        .remove((unix_ms_ceil(lease.expires_at), task, lease.id.as_str()))
        .map_err(backend)?;
    Ok(())
}

fn revoke_active_leases(
    txn: &redb::WriteTransaction,
    leases: &mut redb::Table<'_, (&'static str, &'static str), &'static [u8]>,
    task: &str,
    reason: &str,
    at: SystemTime,
) -> Result<Vec<Lease>, StoreError> {
    Ok(revoke_some_active_leases(txn, leases, task, reason, at, usize::MAX)?.0)
}

/// Revokes up to `limit` active leases of `task`; returns them and how many active ones are
/// left.
fn revoke_some_active_leases(
    txn: &redb::WriteTransaction,
    leases: &mut redb::Table<'_, (&'static str, &'static str), &'static [u8]>,
    task: &str,
    reason: &str,
    at: SystemTime,
    limit: usize,
) -> Result<(Vec<Lease>, usize), StoreError> {
    let mut active: Vec<Lease> = Vec::new();
    let mut left = 0;
    for entry in leases.range((task, "")..=(task, "~")).map_err(backend)? {
        let (_, v) = entry.map_err(backend)?;
        let lease = decode_lease(v.value())?;
        if lease.state == LeaseState::Active {
            if active.len() < limit {
                active.push(lease);
            } else {
                left += 1;
            }
        }
    }
    let mut expiry = txn.open_table(EXPIRY).map_err(backend)?;
    for lease in &mut active {
        lease.revoke(reason, at);
        leases
            .insert((task, lease.id.as_str()), encode_lease(lease)?.as_slice())
            .map_err(backend)?;
        unfile(&mut expiry, task, lease)?;
    }
    let logged: Vec<Revocation> = active
        .iter()
        .map(|l| Revocation::of(l, reason, at))
        .collect();
    log_in(txn, &logged)?;
    Ok((active, left))
}

/// The task id and the lease `id`, read inside write transaction `txn`.
fn lease_in(txn: &redb::WriteTransaction, id: &str) -> Result<Option<(String, Lease)>, StoreError> {
    let Some(task_id) = txn
        .open_table(LEASE_TASKS)
        .map_err(backend)?
        .get(id)
        .map_err(backend)?
        .map(|v| v.value().to_owned())
    else {
        return Ok(None);
    };
    let leases = txn.open_table(LEASES).map_err(backend)?;
    let lease = leases
        .get((task_id.as_str(), id))
        .map_err(backend)?
        .map(|v| decode_lease(v.value()))
        .transpose()?;
    Ok(lease.map(|l| (task_id, l)))
}

/// Applies `change` to task `key` inside write transaction `txn` and writes the result; a task
/// this change ends is filed to be pruned `retention` after it ended. Returns the task as
/// changed. Nothing is kept unless the caller commits.
fn change_in(
    txn: &redb::WriteTransaction,
    key: &str,
    change: &TaskChange,
    retention: Duration,
) -> Result<Task, UpdateError> {
    let mut tasks = txn.open_table(TASKS).map_err(backend)?;
    let current = match tasks.get(key).map_err(backend)? {
        Some(v) => decode(v.value())?,
        None => return Err(UpdateError::NotFound),
    };
    let mut next = current.clone();
    change(&mut next)?;
    tasks
        .insert(key, encode(&next)?.as_slice())
        .map_err(backend)?;
    if let (None, Some(ended)) = (current.ended_at, next.ended_at) {
        // Kept for `retention` after it ends: index by the time it may be pruned.
        txn.open_table(ENDED)
            .map_err(backend)?
            .insert((unix_ms(ended + retention), key), ())
            .map_err(backend)?;
    }
    Ok(next)
}

fn store_only(e: UpdateError) -> StoreError {
    match e {
        UpdateError::Store(s) => s,
        other => StoreError::Corrupt(other.to_string()),
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn create_task(&self, task: &Task) -> Result<(), StoreError> {
        let task = task.clone();
        self.blocking(move |db| {
            let bytes = encode(&task)?;
            let id = task.id.to_string();
            let txn = db.begin_write().map_err(backend)?;
            {
                let mut tasks = txn.open_table(TASKS).map_err(backend)?;
                if tasks.get(id.as_str()).map_err(backend)?.is_some() {
                    return Err(StoreError::Exists(task.id).into());
                }
                tasks
                    .insert(id.as_str(), bytes.as_slice())
                    .map_err(backend)?;
                txn.open_table(BY_EXECUTOR)
                    .map_err(backend)?
                    .insert((task.executor.as_str(), id.as_str()), ())
                    .map_err(backend)?;
                txn.open_table(BY_REQUESTER)
                    .map_err(backend)?
                    .insert((task.requester.as_str(), id.as_str()), ())
                    .map_err(backend)?;
                txn.open_table(DEADLINES)
                    .map_err(backend)?
                    .insert((unix_ms_ceil(task.deadline), id.as_str()), ())
                    .map_err(backend)?;
            }
            txn.commit().map_err(backend)?;
            Ok(())
        })
        .await
        .map_err(store_only)
    }

    async fn get_task(&self, id: &TaskId) -> Result<Option<Task>, StoreError> {
        let id = id.to_string();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let tasks = txn.open_table(TASKS).map_err(backend)?;
            let got = tasks.get(id.as_str()).map_err(backend)?;
            Ok(got.map(|v| decode(v.value())).transpose()?)
        })
        .await
        .map_err(store_only)
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
            let txn = db.begin_write().map_err(backend)?;
            let updated = change_in(&txn, &key, &change, retention)?;
            txn.commit().map_err(backend)?;
            Ok(updated)
        })
        .await
    }

    async fn list_tasks(&self, query: &TaskQuery) -> Result<TaskPage, StoreError> {
        let query = query.clone();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let tasks = txn.open_table(TASKS).map_err(backend)?;
            let before = query.before.map(|b| b.to_string());
            // Candidate ids, newest first, from the narrowest index available.
            let ids: Box<dyn Iterator<Item = Result<String, StoreError>>> =
                match (&query.executor, &query.requester) {
                    (Some(who), _) | (None, Some(who)) => {
                        let table = if query.executor.is_some() {
                            BY_EXECUTOR
                        } else {
                            BY_REQUESTER
                        };
                        let index = txn.open_table(table).map_err(backend)?;
                        let who = who.as_str().to_owned();
                        let end = before.clone().unwrap_or_else(|| "~".into());
                        let range = index
                            .range((who.as_str(), "")..(who.as_str(), end.as_str()))
                            .map_err(backend)?;
                        Box::new(
                            range
                                .rev()
                                .map(|r| r.map(|(k, _)| k.value().1.to_owned()).map_err(backend))
                                .take(query.max_scan.saturating_add(1))
                                .collect::<Vec<_>>()
                                .into_iter(),
                        )
                    }
                    (None, None) => {
                        let range = match &before {
                            Some(b) => tasks.range(..b.as_str()),
                            None => tasks.range::<&str>(..),
                        }
                        .map_err(backend)?;
                        Box::new(
                            range
                                .rev()
                                .map(|r| r.map(|(k, _)| k.value().to_owned()).map_err(backend))
                                .take(query.max_scan.saturating_add(1))
                                .collect::<Vec<_>>()
                                .into_iter(),
                        )
                    }
                };
            let mut page = TaskPage::default();
            let mut last = None;
            for (scanned, id) in ids.enumerate() {
                let id = id?;
                if page.tasks.len() >= query.limit || scanned >= query.max_scan {
                    page.next = last
                        .map(|l: String| TaskId::parse(&l))
                        .transpose()
                        .ok()
                        .flatten();
                    break;
                }
                if let Some(v) = tasks.get(id.as_str()).map_err(backend)? {
                    let task = decode(v.value())?;
                    if query.matches(&task) {
                        page.tasks.push(task);
                    }
                }
                last = Some(id);
            }
            Ok(page)
        })
        .await
        .map_err(store_only)
    }

    async fn issue_lease(&self, lease: &Lease, now: SystemTime) -> Result<(), IssueError> {
        let lease = lease.clone();
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || -> Result<(), IssueError> {
            let task_id = lease.task.to_string();
            let txn = db.begin_write().map_err(backend)?;
            has_epoch(&txn)?;
            {
                let known = txn
                    .open_table(LEASE_TASKS)
                    .map_err(backend)?
                    .get(lease.id.as_str())
                    .map_err(backend)?
                    .is_some();
                if known {
                    return Err(IssueError::Exists);
                }
                let mut tasks = txn.open_table(TASKS).map_err(backend)?;
                let mut task = match tasks.get(task_id.as_str()).map_err(backend)? {
                    Some(v) => decode(v.value())?,
                    None => return Err(IssueError::NotFound),
                };
                check_issuable(&task, &lease.agent, now)?;
                if let Some(lock) = lock_in(&txn, &lease.agent, now)? {
                    return Err(IssueError::Locked(lock.reason));
                }
                if task.started_at.is_none() {
                    task.started_at = Some(now);
                    tasks
                        .insert(task_id.as_str(), encode(&task)?.as_slice())
                        .map_err(backend)?;
                }
                txn.open_table(LEASES)
                    .map_err(backend)?
                    .insert(
                        (task_id.as_str(), lease.id.as_str()),
                        encode_lease(&lease)?.as_slice(),
                    )
                    .map_err(backend)?;
                txn.open_table(EXPIRY)
                    .map_err(backend)?
                    .insert(
                        (
                            unix_ms_ceil(lease.expires_at),
                            task_id.as_str(),
                            lease.id.as_str(),
                        ),
                        (),
                    )
                    .map_err(backend)?;
                txn.open_table(CREDENTIALS)
                    .map_err(backend)?
                    .insert(
                        (task_id.as_str(), lease.credential.as_str()),
                        lease.id.as_str(),
                    )
                    .map_err(backend)?;
                txn.open_table(LEASE_TASKS)
                    .map_err(backend)?
                    .insert(lease.id.as_str(), task_id.as_str())
                    .map_err(backend)?;
            }
            txn.commit().map_err(backend)?;
            Ok(())
        })
        .await
        .map_err(|e| IssueError::Store(backend(format!("worker: {e}"))))?
    }

    async fn get_lease(&self, id: &LeaseId) -> Result<Option<Lease>, StoreError> {
        let id = id.as_str().to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let Some(task) = txn
                .open_table(LEASE_TASKS)
                .map_err(backend)?
                .get(id.as_str())
                .map_err(backend)?
                .map(|v| v.value().to_owned())
            else {
                return Ok(None);
            };
            let leases = txn.open_table(LEASES).map_err(backend)?;
            let got = leases.get((task.as_str(), id.as_str())).map_err(backend)?;
            Ok(got.map(|v| decode_lease(v.value())).transpose()?)
        })
        .await
        .map_err(store_only)
    }

    async fn renew_lease(
        &self,
        id: &LeaseId,
        credential: &str,
        expires_at: SystemTime,
        now: SystemTime,
    ) -> Result<Lease, IssueError> {
        let (id, credential) = (id.as_str().to_owned(), credential.to_owned());
        let db = self.db.clone();
        let renewed = tokio::task::spawn_blocking(move || -> Result<Lease, IssueError> {
            let txn = db.begin_write().map_err(backend)?;
            has_epoch(&txn)?;
            let lease = {
                let Some((task_id, mut lease)) = lease_in(&txn, &id)? else {
                    return Err(IssueError::NotFound);
                };
                let mut leases = txn.open_table(LEASES).map_err(backend)?;
                let task = match txn
                    .open_table(TASKS)
                    .map_err(backend)?
                    .get(task_id.as_str())
                    .map_err(backend)?
                {
                    Some(v) => decode(v.value())?,
                    None => return Err(IssueError::NotFound),
                };
                check_issuable(&task, &lease.agent, now)?;
                super::check_renewable(&lease, now)?;
                if let Some(lock) = lock_in(&txn, &lease.agent, now)? {
                    return Err(IssueError::Locked(lock.reason));
                }
                log_in(&txn, &[Revocation::of(&lease, SUPERSEDED, now)])?;
                // Filed again under its new expiry.
                let mut expiry = txn.open_table(EXPIRY).map_err(backend)?;
                unfile(&mut expiry, &task_id, &lease)?;
                lease.credential = credential;
                lease.expires_at = expires_at;
                expiry
                    .insert(
                        (unix_ms_ceil(expires_at), task_id.as_str(), id.as_str()),
                        (),
                    )
                    .map_err(backend)?;
                leases
                    .insert(
                        (task_id.as_str(), id.as_str()),
                        encode_lease(&lease)?.as_slice(),
                    )
                    .map_err(backend)?;
                txn.open_table(CREDENTIALS)
                    .map_err(backend)?
                    .insert((task_id.as_str(), lease.credential.as_str()), id.as_str())
                    .map_err(backend)?;
                lease
            };
            txn.commit().map_err(backend)?;
            Ok(lease)
        })
        .await
        .map_err(|e| IssueError::Store(backend(format!("worker: {e}"))))?;
        if renewed.is_ok() {
            self.logged();
        }
        renewed
    }

    async fn revoke_lease(
        &self,
        id: &LeaseId,
        reason: &str,
        now: SystemTime,
    ) -> Result<Lease, UpdateError> {
        let (id, reason) = (id.as_str().to_owned(), reason.to_owned());
        let done = self
            .blocking(move |db| {
                let txn = db.begin_write().map_err(backend)?;
                let lease = {
                    let Some((task_id, mut lease)) = lease_in(&txn, &id)? else {
                        return Err(UpdateError::NotFound);
                    };
                    let mut leases = txn.open_table(LEASES).map_err(backend)?;
                    if !lease.revoke(&reason, now) {
                        return Err(TaskError::Precondition("lease is not active".into()).into());
                    }
                    log_in(&txn, &[Revocation::of(&lease, &reason, now)])?;
                    leases
                        .insert(
                            (task_id.as_str(), id.as_str()),
                            encode_lease(&lease)?.as_slice(),
                        )
                        .map_err(backend)?;
                    unfile(
                        &mut txn.open_table(EXPIRY).map_err(backend)?,
                        &task_id,
                        &lease,
                    )?;
                    lease
                };
                txn.commit().map_err(backend)?;
                Ok(lease)
            })
            .await;
        if done.is_ok() {
            self.logged();
        }
        done
    }

    async fn task_leases(&self, task: &TaskId) -> Result<Vec<Lease>, StoreError> {
        let task = task.to_string();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let leases = txn.open_table(LEASES).map_err(backend)?;
            let mut out = Vec::new();
            for entry in leases
                .range((task.as_str(), "")..=(task.as_str(), "~"))
                .map_err(backend)?
            {
                let (_, v) = entry.map_err(backend)?;
                out.push(decode_lease(v.value())?);
            }
            Ok(out)
        })
        .await
        .map_err(store_only)
    }

    async fn find_lease(
        &self,
        task: &TaskId,
        credential: &str,
    ) -> Result<Option<Lease>, StoreError> {
        let (task, credential) = (task.to_string(), credential.to_owned());
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let creds = txn.open_table(CREDENTIALS).map_err(backend)?;
            let Some(lease_id) = creds
                .get((task.as_str(), credential.as_str()))
                .map_err(backend)?
                .map(|v| v.value().to_owned())
            else {
                return Ok(None);
            };
            let leases = txn.open_table(LEASES).map_err(backend)?;
            let got = leases
                .get((task.as_str(), lease_id.as_str()))
                .map_err(backend)?;
            Ok(got.map(|v| decode_lease(v.value())).transpose()?)
        })
        .await
        .map_err(store_only)
    }

    async fn end_task(
        &self,
        id: &TaskId,
        change: TaskChange,
        retention: Duration,
    ) -> Result<(Task, Vec<Lease>), UpdateError> {
        let key = id.to_string();
        let done = self
            .blocking(move |db| {
                let txn = db.begin_write().map_err(backend)?;
                let result = {
                    let next = change_in(&txn, &key, &change, retention)?;
                    let Some(ended) = next.ended_at.filter(|_| next.state.is_terminal()) else {
                        // Not committed: the change is dropped.
                        return Err(TaskError::Precondition(
                            "the change does not end the task".into(),
                        )
                        .into());
                    };
                    let reason = task_ended_reason(&next);
                    let mut leases = txn.open_table(LEASES).map_err(backend)?;
                    let active = revoke_active_leases(&txn, &mut leases, &key, &reason, ended)?;
                    (next, active)
                };
                txn.commit().map_err(backend)?;
                Ok(result)
            })
            .await;
        if done.is_ok() {
            self.logged();
        }
        done
    }

    async fn lock_agent(&self, lock: &Lock) -> Result<Lock, StoreError> {
        let lock = lock.clone();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            let in_force = {
                let agent = lock.agent.as_str();
                let mut locks = txn.open_table(LOCKS).map_err(backend)?;
                let current: Option<Lock> = locks
                    .get(agent)
                    .map_err(backend)?
                    .map(|v| serde_json::from_slice(v.value()))
                    .transpose()
                    .map_err(|e| StoreError::Corrupt(format!("lock of {agent}: {e}")))?;
                // Locks only grow: one in force that ends later (or never) stays.
                match current {
                    Some(c) if c.outlasts(&lock, lock.at) => c,
                    _ => {
                        let json = serde_json::to_vec(&lock)
                            .map_err(|e| StoreError::Corrupt(format!("encoding lock: {e}")))?;
                        locks.insert(agent, json.as_slice()).map_err(backend)?;
                        lock.clone()
                    }
                }
            };
            txn.commit().map_err(backend)?;
            Ok(in_force)
        })
        .await
        .map_err(store_only)
    }

    async fn sweep_lock(
        &self,
        agent: &WorkloadId,
        reason: &str,
        at: SystemTime,
        retention: Duration,
        limit: usize,
    ) -> Result<Swept, StoreError> {
        // One node: the sweep walks the agent's tasks as executor (its history too), ending
        // up to `limit` tasks and leases per transaction.
        let (agent, reason) = (agent.as_str().to_owned(), reason.to_owned());
        let done = self
            .blocking(move |db| {
                let txn = db.begin_write().map_err(backend)?;
                let mut swept = Swept::default();
                {
                    let task_ids: Vec<String> = txn
                        .open_table(BY_EXECUTOR)
                        .map_err(backend)?
                        .range((agent.as_str(), "")..=(agent.as_str(), "~"))
                        .map_err(backend)?
                        .map(|r| r.map(|(k, _)| k.value().1.to_owned()))
                        .collect::<Result<_, _>>()
                        .map_err(backend)?;
                    let mut tasks = txn.open_table(TASKS).map_err(backend)?;
                    let mut leases = txn.open_table(LEASES).map_err(backend)?;
                    let mut ended = txn.open_table(ENDED).map_err(backend)?;
                    for id in task_ids {
                        let Some(mut task) = tasks
                            .get(id.as_str())
                            .map_err(backend)?
                            .map(|v| decode(v.value()))
                            .transpose()?
                        else {
                            continue;
                        };
                        if !task.state.is_terminal() && swept.tasks.len() >= limit {
                            swept.remaining += 1;
                        } else if task.revoke(&reason, at) {
                            tasks
                                .insert(id.as_str(), encode(&task)?.as_slice())
                                .map_err(backend)?;
                            ended
                                .insert((unix_ms(at + retention), id.as_str()), ())
                                .map_err(backend)?;
                            swept.tasks.push(task.id);
                        }
                        let budget = limit.saturating_sub(swept.leases.len());
                        let (revoked, left) =
                            revoke_some_active_leases(&txn, &mut leases, &id, &reason, at, budget)?;
                        swept.leases.extend(revoked);
                        swept.remaining += left;
                    }
                }
                txn.commit().map_err(backend)?;
                Ok(swept)
            })
            .await
            .map_err(store_only);
        if done.as_ref().is_ok_and(|s| !s.leases.is_empty()) {
            self.logged();
        }
        done
    }

    async fn unlock_agent(&self, agent: &WorkloadId) -> Result<Option<Lock>, StoreError> {
        let agent = agent.as_str().to_owned();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            let removed = txn
                .open_table(LOCKS)
                .map_err(backend)?
                .remove(agent.as_str())
                .map_err(backend)?
                .map(|v| serde_json::from_slice::<Lock>(v.value()))
                .transpose()
                .map_err(|e| StoreError::Corrupt(format!("lock of {agent}: {e}")))?;
            txn.commit().map_err(backend)?;
            Ok(removed)
        })
        .await
        .map_err(store_only)
    }

    async fn agent_lock(
        &self,
        agent: &WorkloadId,
        now: SystemTime,
    ) -> Result<Option<Lock>, StoreError> {
        let agent = agent.as_str().to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let lock = txn
                .open_table(LOCKS)
                .map_err(backend)?
                .get(agent.as_str())
                .map_err(backend)?
                .map(|v| serde_json::from_slice::<Lock>(v.value()))
                .transpose()
                .map_err(|e| StoreError::Corrupt(format!("lock of {agent}: {e}")))?;
            Ok(lock.filter(|l| l.holds_at(now)))
        })
        .await
        .map_err(store_only)
    }

    async fn list_locks(&self, now: SystemTime) -> Result<Vec<Lock>, StoreError> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let locks = txn.open_table(LOCKS).map_err(backend)?;
            let mut out = Vec::new();
            for entry in locks.iter().map_err(backend)? {
                let (_, v) = entry.map_err(backend)?;
                let lock: Lock = serde_json::from_slice(v.value())
                    .map_err(|e| StoreError::Corrupt(format!("lock: {e}")))?;
                if lock.holds_at(now) {
                    out.push(lock);
                }
            }
            Ok(out)
        })
        .await
        .map_err(store_only)
    }

    async fn expire_leases(&self, now: SystemTime, limit: usize) -> Result<Vec<Lease>, StoreError> {
        self.blocking(move |db| {
            // Most rounds find nothing due: answer from a read transaction, without a commit.
            let first_due = db
                .begin_read()
                .map_err(backend)?
                .open_table(EXPIRY)
                .map_err(backend)?
                .first()
                .map_err(backend)?
                .map(|(k, _)| k.value().0);
            if first_due.is_none_or(|ms| ms > unix_ms(now)) {
                return Ok(Vec::new());
            }
            let txn = db.begin_write().map_err(backend)?;
            let mut ended = Vec::new();
            {
                let mut expiry = txn.open_table(EXPIRY).map_err(backend)?;
                let mut leases = txn.open_table(LEASES).map_err(backend)?;
                let due: Vec<(u64, String, String)> = expiry
                    .range((0, "", "")..=(unix_ms(now), "~", "~"))
                    .map_err(backend)?
                    .take(limit)
                    .map(|r| {
                        r.map(|(k, _)| {
                            let (ms, task, lease) = k.value();
                            (ms, task.to_owned(), lease.to_owned())
                        })
                    })
                    .collect::<Result<_, _>>()
                    .map_err(backend)?;
                for (ms, task, id) in due {
                    expiry
                        .remove((ms, task.as_str(), id.as_str()))
                        .map_err(backend)?;
                    let Some(mut lease) = leases
                        .get((task.as_str(), id.as_str()))
                        .map_err(backend)?
                        .map(|v| decode_lease(v.value()))
                        .transpose()?
                    else {
                        continue;
                    };
                    if lease.expire(now) {
                        leases
                            .insert(
                                (task.as_str(), id.as_str()),
                                encode_lease(&lease)?.as_slice(),
                            )
                            .map_err(backend)?;
                        ended.push(lease);
                    } else if lease.state == LeaseState::Active {
                        // Renewed since it was filed: file it under its new expiry.
                        expiry
                            .insert(
                                (unix_ms_ceil(lease.expires_at), task.as_str(), id.as_str()),
                                (),
                            )
                            .map_err(backend)?;
                    }
                }
            }
            txn.commit().map_err(backend)?;
            Ok(ended)
        })
        .await
        .map_err(store_only)
    }

    async fn overdue_tasks(
        &self,
        now: SystemTime,
        limit: usize,
    ) -> Result<Vec<TaskId>, StoreError> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(DEADLINES).map_err(backend)?;
            let mut due = Vec::new();
            for entry in table
                .range((0, "")..=(unix_ms(now), "~"))
                .map_err(backend)?
                .take(limit)
            {
                let (k, _) = entry.map_err(backend)?;
                if let Ok(id) = TaskId::parse(k.value().1) {
                    due.push(id);
                }
            }
            Ok(due)
        })
        .await
        .map_err(store_only)
    }

    async fn forget_deadline(&self, id: &TaskId) -> Result<(), StoreError> {
        let id = id.to_string();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            {
                let deadline = match txn
                    .open_table(TASKS)
                    .map_err(backend)?
                    .get(id.as_str())
                    .map_err(backend)?
                {
                    Some(v) => Some(decode(v.value())?.deadline),
                    None => None,
                };
                let mut table = txn.open_table(DEADLINES).map_err(backend)?;
                match deadline {
                    Some(d) => {
                        table
                            .remove((unix_ms_ceil(d), id.as_str()))
                            .map_err(backend)?;
                    }
                    // Pruned: find it by id (rare; the index is small).
                    None => {
                        table
                            .retain(|(_, task), ()| task != id.as_str())
                            .map_err(backend)?;
                    }
                }
            }
            txn.commit().map_err(backend)?;
            Ok(())
        })
        .await
        .map_err(store_only)
    }

    async fn next_due(&self) -> Result<Option<SystemTime>, StoreError> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let lease = txn
                .open_table(EXPIRY)
                .map_err(backend)?
                .first()
                .map_err(backend)?
                .map(|(k, _)| k.value().0);
            let task = txn
                .open_table(DEADLINES)
                .map_err(backend)?
                .first()
                .map_err(backend)?
                .map(|(k, _)| k.value().0);
            Ok(lease.into_iter().chain(task).min().map(from_unix_ms))
        })
        .await
        .map_err(store_only)
    }

    async fn publish_key(&self, key: &PublishedKey) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(key)
            .map_err(|e| StoreError::Corrupt(format!("encoding key {}: {e}", key.kid)))?;
        let kid = key.kid.clone();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            txn.open_table(SIGNING_KEYS)
                .map_err(backend)?
                .insert(kid.as_str(), bytes.as_slice())
                .map_err(backend)?;
            txn.commit().map_err(backend)?;
            Ok(())
        })
        .await
        .map_err(store_only)
    }

    async fn published_keys(&self, now: SystemTime) -> Result<Vec<PublishedKey>, StoreError> {
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            let mut live = Vec::new();
            {
                let mut table = txn.open_table(SIGNING_KEYS).map_err(backend)?;
                let mut stale = Vec::new();
                for entry in table.iter().map_err(backend)? {
                    let (kid, v) = entry.map_err(backend)?;
                    let key: PublishedKey = serde_json::from_slice(v.value()).map_err(|e| {
                        StoreError::Corrupt(format!("signing key {}: {e}", kid.value()))
                    })?;
                    if key.until > now {
                        live.push(key);
                    } else {
                        stale.push(key.kid);
                    }
                }
                for kid in stale {
                    table.remove(kid.as_str()).map_err(backend)?;
                }
            }
            txn.commit().map_err(backend)?;
            Ok(live)
        })
        .await
        .map_err(store_only)
    }

    async fn prune_ended(&self, ended_before: SystemTime) -> Result<usize, StoreError> {
        let cutoff = unix_ms(ended_before);
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            let mut pruned = 0;
            {
                let mut ended = txn.open_table(ENDED).map_err(backend)?;
                let mut tasks = txn.open_table(TASKS).map_err(backend)?;
                let mut by_executor = txn.open_table(BY_EXECUTOR).map_err(backend)?;
                let mut by_requester = txn.open_table(BY_REQUESTER).map_err(backend)?;
                let mut leases = txn.open_table(LEASES).map_err(backend)?;
                let mut credentials = txn.open_table(CREDENTIALS).map_err(backend)?;
                let mut lease_tasks = txn.open_table(LEASE_TASKS).map_err(backend)?;
                let due: Vec<(u64, String)> = ended
                    .range((0, "")..(cutoff, ""))
                    .map_err(backend)?
                    .map(|r| r.map(|(k, _)| (k.value().0, k.value().1.to_owned())))
                    .collect::<Result<_, _>>()
                    .map_err(backend)?;
                for (at, id) in due {
                    ended.remove((at, id.as_str())).map_err(backend)?;
                    let Some(task) = tasks
                        .remove(id.as_str())
                        .map_err(backend)?
                        .map(|v| decode(v.value()))
                        .transpose()?
                    else {
                        continue;
                    };
                    by_executor
                        .remove((task.executor.as_str(), id.as_str()))
                        .map_err(backend)?;
                    by_requester
                        .remove((task.requester.as_str(), id.as_str()))
                        .map_err(backend)?;
                    let range = (id.as_str(), "")..=(id.as_str(), "~");
                    let lease_ids: Vec<String> = leases
                        .range(range.clone())
                        .map_err(backend)?
                        .map(|r| r.map(|(k, _)| k.value().1.to_owned()))
                        .collect::<Result<_, _>>()
                        .map_err(backend)?;
                    for lease in &lease_ids {
                        lease_tasks.remove(lease.as_str()).map_err(backend)?;
                    }
                    leases
                        .retain_in(range.clone(), |_, _| false)
                        .map_err(backend)?;
                    credentials
                        .retain_in(range, |_, _| false)
                        .map_err(backend)?;
                    pruned += 1;
                }
            }
            // Claims past their expiry (Redis drops its own).
            let now = unix_ms(SystemTime::now());
            txn.open_table(CLAIMS)
                .map_err(backend)?
                .retain(|_, (until, _)| until > now)
                .map_err(backend)?;
            txn.commit().map_err(backend)?;
            Ok(pruned)
        })
        .await
        .map_err(store_only)
    }

    async fn revocations(
        &self,
        after: Option<Cursor>,
        limit: usize,
        wait: Duration,
    ) -> Result<Vec<Revocation>, StoreError> {
        let deadline = tokio::time::Instant::now() + wait.min(super::MAX_REVOCATION_WAIT);
        // Subscribed before reading, so a commit after the read still wakes this waiter.
        let mut logged = self.logged.subscribe();
        loop {
            let found = self.read_revocations(after, limit).await?;
            if !found.is_empty() || wait.is_zero() {
                return Ok(found);
            }
            match tokio::time::timeout_at(deadline, logged.changed()).await {
                Ok(Ok(())) => {}
                _ => return Ok(Vec::new()),
            }
        }
    }

    async fn revocation_head(&self) -> Result<Cursor, StoreError> {
        self.blocking(|db| {
            let txn = db.begin_read().map_err(backend)?;
            let log = txn.open_table(REVOCATIONS).map_err(backend)?;
            Ok(log
                .last()
                .map_err(backend)?
                .map_or(Cursor::START, |(k, _)| {
                    let (ms, seq) = k.value();
                    Cursor { ms, seq }
                }))
        })
        .await
        .map_err(store_only)
    }

    async fn prune_revocations(&self, before: SystemTime) -> Result<(), StoreError> {
        let before = unix_ms(before);
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            txn.open_table(REVOCATIONS)
                .map_err(backend)?
                .retain_in(..(before, 0), |_, _| false)
                .map_err(backend)?;
            txn.commit().map_err(backend)?;
            Ok(())
        })
        .await
        .map_err(store_only)
    }

    async fn epoch(&self, fresh: &Epoch) -> Result<Epoch, StoreError> {
        let fresh = fresh.clone();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            let epoch = {
                let mut meta = txn.open_table(META).map_err(backend)?;
                let known = meta
                    .get("epoch")
                    .map_err(backend)?
                    .map(|v| serde_json::from_slice::<Epoch>(v.value()));
                match known {
                    Some(e) => e.map_err(|e| StoreError::Corrupt(format!("epoch: {e}")))?,
                    None => {
                        let json = serde_json::to_vec(&fresh)
                            .map_err(|e| StoreError::Corrupt(format!("epoch: {e}")))?;
                        meta.insert("epoch", json.as_slice()).map_err(backend)?;
                        fresh
                    }
                }
            };
            txn.commit().map_err(backend)?;
            Ok(epoch)
        })
        .await
        .map_err(store_only)
    }

    async fn claim(
        &self,
        key: &str,
        value: &str,
        until: SystemTime,
    ) -> Result<Option<String>, StoreError> {
        let (key, value) = (key.to_owned(), value.to_owned());
        let now = unix_ms(SystemTime::now());
        let until = unix_ms_ceil(until);
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            let held = {
                let mut claims = txn.open_table(CLAIMS).map_err(backend)?;
                let held = claims
                    .get(key.as_str())
                    .map_err(backend)?
                    .map(|v| (v.value().0, v.value().1.to_owned()))
                    .filter(|(exp, _)| *exp > now)
                    .map(|(_, v)| v);
                if held.is_none() {
                    claims
                        .insert(key.as_str(), (until, value.as_str()))
                        .map_err(backend)?;
                }
                held
            };
            txn.commit().map_err(backend)?;
            Ok(held)
        })
        .await
        .map_err(store_only)
    }

    async fn claimed(&self, key: &str) -> Result<Option<String>, StoreError> {
        let key = key.to_owned();
        let now = unix_ms(SystemTime::now());
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let claims = txn.open_table(CLAIMS).map_err(backend)?;
            let held = claims
                .get(key.as_str())
                .map_err(backend)?
                .filter(|v| v.value().0 > now)
                .map(|v| v.value().1.to_owned());
            Ok(held)
        })
        .await
        .map_err(store_only)
    }

    async fn release_claim(&self, key: &str, value: &str) -> Result<(), StoreError> {
        let (key, value) = (key.to_owned(), value.to_owned());
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            {
                let mut claims = txn.open_table(CLAIMS).map_err(backend)?;
                let holds = claims
                    .get(key.as_str())
                    .map_err(backend)?
                    .is_some_and(|v| v.value().1 == value);
                if holds {
                    claims.remove(key.as_str()).map_err(backend)?;
                }
            }
            txn.commit().map_err(backend)?;
            Ok(())
        })
        .await
        .map_err(store_only)
    }

    async fn swap_claim(
        &self,
        key: &str,
        expected: &str,
        value: &str,
        until: SystemTime,
    ) -> Result<bool, StoreError> {
        let (key, expected, value) = (key.to_owned(), expected.to_owned(), value.to_owned());
        let now = unix_ms(SystemTime::now());
        let until = unix_ms_ceil(until);
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            let holds = {
                let mut claims = txn.open_table(CLAIMS).map_err(backend)?;
                let holds = claims
                    .get(key.as_str())
                    .map_err(backend)?
                    .is_some_and(|v| v.value().0 > now && v.value().1 == expected);
                if holds {
                    claims
                        .insert(key.as_str(), (until, value.as_str()))
                        .map_err(backend)?;
                }
                holds
            };
            txn.commit().map_err(backend)?;
            Ok(holds)
        })
        .await
        .map_err(store_only)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        // A write transaction (committed empty): a file that can no longer be written (a full
        // or read-only disk) is not ready.
        self.blocking(|db| {
            db.begin_write()
                .map_err(backend)?
                .commit()
                .map_err(backend)?;
            Ok(())
        })
        .await
        .map_err(store_only)
    }

    async fn live_leases(&self) -> Result<u64, StoreError> {
        self.blocking(|db| {
            let txn = db.begin_read().map_err(backend)?;
            let expiry = txn.open_table(EXPIRY).map_err(backend)?;
            Ok(redb::ReadableTableMetadata::len(&expiry).map_err(backend)?)
        })
        .await
        .map_err(store_only)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::EmbeddedStore;

    #[test]
    fn the_database_file_is_its_owners_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("taskcred.db");
        drop(EmbeddedStore::open(&path).unwrap());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = EmbeddedStore::open(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }
}
