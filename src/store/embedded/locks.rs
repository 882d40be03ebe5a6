//! Agent locks, the [`LockStore`] of the embedded store: setting one (locks only grow), the
//! sweep that ends a locked agent's open tasks and live leases in bounded steps (walking the
//! agent's open tasks only, through `tasks_open_by_executor`), lifting one, and reading them.

use std::time::SystemTime;

use async_trait::async_trait;
use redb::{ReadableDatabase as _, ReadableTable as _, WriteTransaction};

use super::EmbeddedStore;
use super::leases::revoke_some_active_leases;
use super::tables::{ENDED, LEASES, LOCKS, OPEN_BY_EXECUTOR, TASKS, from_json, to_json};
use crate::identity::WorkloadId;
use crate::lease::{Lock, Swept};
use crate::store::{LockStore, LockSweep, StoreError, decode, encode, unix_ms};

#[async_trait]
impl LockStore for EmbeddedStore {
    /// Writes `lock` unless one in force ends later; returns the lock in force.
    async fn lock_agent(&self, lock: &Lock) -> Result<Lock, StoreError> {
        let lock = lock.clone();
        self.blocking(move |db| {
            let txn = db.begin_write()?;
            let in_force = {
                let agent = lock.agent.as_str();
                let mut locks = txn.open_table(LOCKS)?;
                let current: Option<Lock> = locks
                    .get(agent)?
                    .map(|v| from_json(v.value(), format_args!("lock of {agent}")))
                    .transpose()?;
                // Locks only grow: one in force that ends later (or never) stays.
                match current {
                    Some(c) if c.outlasts(&lock, lock.at) => c,
                    _ => {
                        let json = to_json(&lock, "encoding lock")?;
                        locks.insert(agent, json.as_slice())?;
                        lock.clone()
                    }
                }
            };
            txn.commit()?;
            Ok(in_force)
        })
        .await
    }

    /// One bounded step of ending the locked agent's open tasks and live leases, in one
    /// transaction, walking the agent's entries in `tasks_open_by_executor` only.
    async fn sweep_lock(&self, step: &LockSweep<'_>) -> Result<Swept, StoreError> {
        let (agent, reason, at) = (step.agent, step.reason, step.at);
        let (retention, limit) = (step.retention, step.limit);
        // One node: the sweep walks the agent's open tasks (never its history), ending up to
        // `limit` tasks and leases per transaction.
        //
        // Every live lease of the agent belongs to one of them, so the walk of their leases
        // finds them all: a lease is recorded only for an approved task of its executor (checked
        // in the transaction that records it, which also marks the task started), and no
        // transaction ends a task that still has an active lease. `end_task` revokes them in
        // the transaction that ends it (completion, failure, an operator's revoke, the reaper's
        // expiry); `update_task` ends a task only by a denial (pending: no lease yet) or a
        // cancellation (not started: no lease yet); and this sweep revokes a task only once its
        // last active lease is revoked (in this step or an earlier one: the lock stops new
        // ones, so each step leaves fewer). A file from an earlier version, whose sweep revoked
        // tasks first, has such leftovers revoked when it is opened (`migrate`).
        let (agent, reason) = (agent.as_str().to_owned(), reason.to_owned());
        let done = self
            .blocking(move |db| {
                let txn = db.begin_write()?;
                let mut swept = Swept::default();
                {
                    let mut open = txn.open_table(OPEN_BY_EXECUTOR)?;
                    let task_ids: Vec<String> = open
                        .range((agent.as_str(), "")..=(agent.as_str(), "~"))?
                        .map(|r| r.map(|(k, _)| k.value().1.to_owned()))
                        .collect::<Result<_, redb::StorageError>>()?;
                    let mut tasks = txn.open_table(TASKS)?;
                    let mut leases = txn.open_table(LEASES)?;
                    let mut ended = txn.open_table(ENDED)?;
                    for id in task_ids {
                        let budget = limit.saturating_sub(swept.leases.len());
                        let (revoked, left) =
                            revoke_some_active_leases(&txn, &mut leases, &id, &reason, at, budget)?;
                        swept.leases.extend(revoked);
                        swept.remaining += left;
                        let task = tasks
                            .get(id.as_str())?
                            .map(|v| decode(v.value()))
                            .transpose()?;
                        let Some(mut task) = task.filter(|t| !t.state.is_terminal()) else {
                            // Not open (the index is kept exact, so never expected): the entry
                            // goes once its task holds no active lease.
                            if left == 0 {
                                open.remove((agent.as_str(), id.as_str()))?;
                            }
                            continue;
                        };
                        if left > 0 || swept.tasks.len() >= limit {
                            // Ended in a later step, after its last active lease.
                            swept.remaining += 1;
                        } else if task.revoke(&reason, at) {
                            tasks.insert(id.as_str(), encode(&task)?.as_slice())?;
                            if !task.children.is_empty() {
                                super::tasks::refile_due(&txn, &task, at)?;
                            }
                            ended.insert((unix_ms(at + retention), id.as_str()), ())?;
                            open.remove((agent.as_str(), id.as_str()))?;
                            swept.tasks.push(task.id);
                        }
                    }
                }
                txn.commit()?;
                Ok(swept)
            })
            .await;
        if done.as_ref().is_ok_and(|s| !s.leases.is_empty()) {
            self.logged();
        }
        done
    }

    /// Removes the lock of `agent` and returns it.
    async fn unlock_agent(&self, agent: &WorkloadId) -> Result<Option<Lock>, StoreError> {
        let agent = agent.as_str().to_owned();
        self.blocking(move |db| {
            let txn = db.begin_write()?;
            let removed = txn
                .open_table(LOCKS)?
                .remove(agent.as_str())?
                .map(|v| from_json::<Lock>(v.value(), format_args!("lock of {agent}")))
                .transpose()?;
            txn.commit()?;
            Ok(removed)
        })
        .await
    }

    /// Read, then kept if it holds at `now`.
    async fn agent_lock(
        &self,
        agent: &WorkloadId,
        now: SystemTime,
    ) -> Result<Option<Lock>, StoreError> {
        let agent = agent.as_str().to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let lock = txn
                .open_table(LOCKS)?
                .get(agent.as_str())?
                .map(|v| from_json::<Lock>(v.value(), format_args!("lock of {agent}")))
                .transpose()?;
            Ok(lock.filter(|l| l.holds_at(now)))
        })
        .await
    }

    /// Every lock read, kept if it holds at `now`.
    async fn list_locks(&self, now: SystemTime) -> Result<Vec<Lock>, StoreError> {
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let locks = txn.open_table(LOCKS)?;
            let mut out = Vec::new();
            for entry in locks.iter()? {
                let (_, v) = entry?;
                let lock: Lock = from_json(v.value(), "lock")?;
                if lock.holds_at(now) {
                    out.push(lock);
                }
            }
            Ok(out)
        })
        .await
    }
}

/// The lock of `agent` that holds at `now`, read inside write transaction `txn`.
pub(super) fn lock_in(
    txn: &WriteTransaction,
    agent: &WorkloadId,
    now: SystemTime,
) -> Result<Option<Lock>, StoreError> {
    let locks = txn.open_table(LOCKS)?;
    let Some(v) = locks.get(agent.as_str())? else {
        return Ok(None);
    };
    let lock: Lock = from_json(v.value(), format_args!("lock of {agent}"))?;
    Ok(lock.holds_at(now).then_some(lock))
}
