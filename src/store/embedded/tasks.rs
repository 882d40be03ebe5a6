//! Tasks, the [`TaskStore`] of the embedded store: creating one with its index entries, reading
//! one, listing them through the narrowest index, changing one inside a write transaction, ending
//! one with its leases, and pruning ended tasks with their history (and claims past their
//! expiry).
//!
//! Each of these keeps `tasks_open_by_executor` exact in its own transaction: a task is in it
//! from its creation until the change that ends it.

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use redb::{ReadableDatabase as _, ReadableTable as _, WriteTransaction};

use super::EmbeddedStore;
use super::leases::revoke_active_leases;
use super::tables::{
    BY_EXECUTOR, BY_REQUESTER, CLAIMS, CREDENTIALS, DEADLINES, ENDED, LEASE_TASKS, LEASES,
    OPEN_BY_EXECUTOR, TASKS, revision_of,
};
use crate::lease::Lease;
use crate::store::{
    CASCADE_GRACE, StoreError, TaskChange, TaskPage, TaskQuery, TaskStore, UpdateError,
    VersionedTask, decode, encode, task_ended_reason, unix_ms, unix_ms_ceil,
};
use crate::task::{Task, TaskError, TaskId, Unmet};

#[async_trait]
impl TaskStore for EmbeddedStore {
    /// The task, its executor (and, while open, open-task) and requester index entries and its
    /// deadline, in one transaction.
    async fn create_task(&self, task: &Task) -> Result<(), StoreError> {
        let task = task.clone();
        self.blocking(move |db| {
            let bytes = encode(&task)?;
            let id = task.id.to_string();
            let txn = db.begin_write()?;
            {
                let mut tasks = txn.open_table(TASKS)?;
                if tasks.get(id.as_str())?.is_some() {
                    return Err(StoreError::Exists(task.id));
                }
                if let Some(lock) = super::locks::lock_in(&txn, &task.executor, task.created_at)? {
                    return Err(StoreError::Locked(lock.reason));
                }
                tasks.insert(id.as_str(), bytes.as_slice())?;
                txn.open_table(BY_EXECUTOR)?
                    .insert((task.executor.as_str(), id.as_str()), ())?;
                if !task.state.is_terminal() {
                    txn.open_table(OPEN_BY_EXECUTOR)?
                        .insert((task.executor.as_str(), id.as_str()), ())?;
                }
                txn.open_table(BY_REQUESTER)?
                    .insert((task.requester.as_str(), id.as_str()), ())?;
                txn.open_table(DEADLINES)?
                    .insert((unix_ms_ceil(task.deadline), id.as_str()), ())?;
            }
            txn.commit()?;
            Ok(())
        })
        .await
    }

    async fn get_versioned_task(&self, id: &TaskId) -> Result<Option<VersionedTask>, StoreError> {
        let id = id.to_string();
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let tasks = txn.open_table(TASKS)?;
            let got = tasks.get(id.as_str())?;
            got.map(|v| {
                Ok(VersionedTask {
                    task: decode(v.value())?,
                    revision: revision_of(v.value()),
                })
            })
            .transpose()
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

    /// A page of tasks, newest first.
    async fn list_tasks(&self, query: &TaskQuery) -> Result<TaskPage, StoreError> {
        let query = query.clone();
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let tasks = txn.open_table(TASKS)?;
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
                        let index = txn.open_table(table)?;
                        let who = who.as_str().to_owned();
                        let end = before.clone().unwrap_or_else(|| "~".into());
                        let range =
                            index.range((who.as_str(), "")..(who.as_str(), end.as_str()))?;
                        Box::new(
                            range
                                .rev()
                                .map(|r| Ok::<_, StoreError>(r?.0.value().1.to_owned()))
                                .take(query.max_scan.saturating_add(1))
                                .collect::<Vec<_>>()
                                .into_iter(),
                        )
                    }
                    (None, None) => {
                        let range = match &before {
                            Some(b) => tasks.range(..b.as_str()),
                            None => tasks.range::<&str>(..),
                        }?;
                        Box::new(
                            range
                                .rev()
                                .map(|r| Ok::<_, StoreError>(r?.0.value().to_owned()))
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
                if let Some(v) = tasks.get(id.as_str())? {
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
    }

    /// The change, which must end the task, and the revocation of its active leases, in one
    /// transaction.
    async fn end_task(
        &self,
        id: &TaskId,
        change: TaskChange,
        retention: Duration,
    ) -> Result<(Task, Vec<Lease>), UpdateError> {
        let key = id.to_string();
        let done = self
            .blocking(move |db| {
                let txn = db.begin_write()?;
                let result = {
                    let next = change_in(&txn, &key, &change, retention)?;
                    let Some(ended) = next.ended_at.filter(|_| next.state.is_terminal()) else {
                        // Not committed: the change is dropped.
                        return Err(TaskError::Precondition(Unmet::NotAnEnd).into());
                    };
                    let reason = task_ended_reason(&next);
                    let mut leases = txn.open_table(LEASES)?;
                    let active = revoke_active_leases(&txn, &mut leases, &key, &reason, ended)?;
                    if !next.children.is_empty() {
                        refile_due(&txn, &next, ended)?;
                    }
                    (next, active)
                };
                txn.commit()?;
                Ok(result)
            })
            .await;
        if done.is_ok() {
            self.logged();
        }
        done
    }

    /// Deletes the tasks that ended before `ended_before` with their index entries and leases,
    /// and the claims past their expiry.
    async fn prune_ended(&self, ended_before: SystemTime) -> Result<usize, StoreError> {
        let cutoff = unix_ms(ended_before);
        self.blocking(move |db| {
            let txn = db.begin_write()?;
            let mut pruned = 0;
            {
                let mut ended = txn.open_table(ENDED)?;
                let mut tasks = txn.open_table(TASKS)?;
                let mut by_executor = txn.open_table(BY_EXECUTOR)?;
                let mut open = txn.open_table(OPEN_BY_EXECUTOR)?;
                let mut by_requester = txn.open_table(BY_REQUESTER)?;
                let mut leases = txn.open_table(LEASES)?;
                let mut credentials = txn.open_table(CREDENTIALS)?;
                let mut lease_tasks = txn.open_table(LEASE_TASKS)?;
                let due: Vec<(u64, String)> = ended
                    .range((0, "")..(cutoff, ""))?
                    .map(|r| r.map(|(k, _)| (k.value().0, k.value().1.to_owned())))
                    .collect::<Result<_, redb::StorageError>>()?;
                for (at, id) in due {
                    ended.remove((at, id.as_str()))?;
                    let Some(task) = tasks
                        .remove(id.as_str())?
                        .map(|v| decode(v.value()))
                        .transpose()?
                    else {
                        continue;
                    };
                    by_executor.remove((task.executor.as_str(), id.as_str()))?;
                    // An ended task has left it already; this keeps a stray entry from
                    // outliving its task.
                    open.remove((task.executor.as_str(), id.as_str()))?;
                    by_requester.remove((task.requester.as_str(), id.as_str()))?;
                    let range = (id.as_str(), "")..=(id.as_str(), "~");
                    let lease_ids: Vec<String> = leases
                        .range(range.clone())?
                        .map(|r| r.map(|(k, _)| k.value().1.to_owned()))
                        .collect::<Result<_, redb::StorageError>>()?;
                    for lease in &lease_ids {
                        lease_tasks.remove(lease.as_str())?;
                    }
                    leases.retain_in(range.clone(), |_, _| false)?;
                    credentials.retain_in(range, |_, _| false)?;
                    pruned += 1;
                }
            }
            // Claims past their expiry (Redis drops its own).
            let now = unix_ms(SystemTime::now());
            txn.open_table(CLAIMS)?
                .retain(|_, (until, _)| until > now)?;
            txn.commit()?;
            Ok(pruned)
        })
        .await
    }
}

/// Applies `change` to task `key` inside write transaction `txn` and writes the result; a task
/// this change ends leaves the open-task index and is filed to be pruned `retention` after it
/// ended. Returns the task as changed. Nothing is kept unless the caller commits.
fn change_in(
    txn: &WriteTransaction,
    key: &str,
    change: &TaskChange,
    retention: Duration,
) -> Result<Task, UpdateError> {
    let mut tasks = txn.open_table(TASKS)?;
    let current = match tasks.get(key)? {
        Some(v) => decode(v.value())?,
        None => return Err(UpdateError::NotFound),
    };
    let mut next = current.clone();
    change(&mut next)?;
    tasks.insert(key, encode(&next)?.as_slice())?;
    let (was_open, is_open) = (!current.state.is_terminal(), !next.state.is_terminal());
    if was_open != is_open || current.executor != next.executor {
        let mut open = txn.open_table(OPEN_BY_EXECUTOR)?;
        if was_open {
            open.remove((current.executor.as_str(), key))?;
        }
        if is_open {
            open.insert((next.executor.as_str(), key), ())?;
        }
    }
    if let (None, Some(ended)) = (current.ended_at, next.ended_at) {
        // Kept for `retention` after it ends: index by the time it may be pruned.
        txn.open_table(ENDED)?
            .insert((unix_ms(ended + retention), key), ())?;
    }
    Ok(next)
}

/// Files `task`, which ended at `ended` with delegated children, due again at `ended` plus
/// [`CASCADE_GRACE`] instead of at its deadline: the reaper then ends what is below it.
pub(super) fn refile_due(
    txn: &redb::WriteTransaction,
    task: &Task,
    ended: SystemTime,
) -> Result<(), StoreError> {
    let id = task.id.to_string();
    let mut deadlines = txn.open_table(DEADLINES)?;
    deadlines.remove((unix_ms_ceil(task.deadline), id.as_str()))?;
    deadlines.insert((unix_ms_ceil(ended + CASCADE_GRACE), id.as_str()), ())?;
    Ok(())
}
