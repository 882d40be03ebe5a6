//! Bringing a file written by an earlier version up to date, in the transaction that opens the
//! store; each step runs once, marked in `meta`.
//!
//! `open_by_executor_v1`: `tasks_open_by_executor` gets an entry for every open task, and the
//! active leases an earlier lock sweep left on the tasks it revoked (it ended tasks before their
//! leases, one bounded step at a time) are revoked now, as that sweep would have: the sweep
//! walks the open tasks only, and every path now ends a task only with its last active lease.

use std::collections::BTreeSet;
use std::time::SystemTime;

use redb::{ReadableTable as _, WriteTransaction};

use super::leases::revoke_active_leases;
use super::tables::{
    EXPIRY, LEASES, META, OPEN_BY_EXECUTOR, OPEN_BY_EXECUTOR_V1, TASKS, from_json,
};
use crate::store::{StoreError, task_ended_reason};
use crate::task::Task;

/// Runs, inside write transaction `txn`, the steps the file has not had yet.
pub(super) fn migrate(txn: &WriteTransaction) -> Result<(), StoreError> {
    if txn.open_table(META)?.get(OPEN_BY_EXECUTOR_V1)?.is_none() {
        index_open_tasks(txn)?;
        revoke_leftover_leases(txn)?;
        txn.open_table(META)?
            .insert(OPEN_BY_EXECUTOR_V1, b"1".as_slice())?;
    }
    Ok(())
}

/// Files every open task (pending approval or approved) under its executor in
/// `tasks_open_by_executor`.
fn index_open_tasks(txn: &WriteTransaction) -> Result<(), StoreError> {
    let tasks = txn.open_table(TASKS)?;
    let mut open = txn.open_table(OPEN_BY_EXECUTOR)?;
    for entry in tasks.iter()? {
        let (id, v) = entry?;
        let id = id.value();
        let task: Task = from_json(v.value(), format_args!("task {id}"))?;
        if !task.state.is_terminal() {
            open.insert((task.executor.as_str(), id), ())?;
        }
    }
    Ok(())
}

/// Revokes the active leases of ended tasks, found through the expiry index (which holds exactly
/// the unrevoked leases), with the reason their task ended with, at the time it ended.
fn revoke_leftover_leases(txn: &WriteTransaction) -> Result<(), StoreError> {
    let ended: Vec<(String, String, SystemTime)> = {
        let expiry = txn.open_table(EXPIRY)?;
        let tasks = txn.open_table(TASKS)?;
        let mut seen = BTreeSet::new();
        let mut ended = Vec::new();
        for entry in expiry.iter()? {
            let (k, _) = entry?;
            let (_, id, _) = k.value();
            if !seen.insert(id.to_owned()) {
                continue;
            }
            let Some(v) = tasks.get(id)? else {
                // Pruned with its leases: the reaper drops the entry.
                continue;
            };
            let task: Task = from_json(v.value(), format_args!("task {id}"))?;
            if task.state.is_terminal() {
                let reason = task
                    .end_reason
                    .clone()
                    .unwrap_or_else(|| task_ended_reason(&task));
                let at = task.ended_at.unwrap_or_else(SystemTime::now);
                ended.push((id.to_owned(), reason, at));
            }
        }
        ended
    };
    let mut leases = txn.open_table(LEASES)?;
    for (id, reason, at) in ended {
        revoke_active_leases(txn, &mut leases, &id, &reason, at)?;
    }
    Ok(())
}
