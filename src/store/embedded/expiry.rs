//! What falls due, the [`DueStore`] of the embedded store: leases ended as expired through the
//! `lease_expiry` index (renewed ones re-filed under their new expiry), tasks past their deadline
//! through `task_deadlines`, forgetting a deadline, and the next moment anything is due.

use std::time::SystemTime;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase as _, ReadableTable as _};

use super::EmbeddedStore;
use super::tables::{DEADLINES, EXPIRY, LEASES, TASKS};
use crate::lease::{Lease, LeaseState};
use crate::store::{
    DueStore, StoreError, decode, decode_lease, encode_lease, from_unix_ms, unix_ms, unix_ms_ceil,
};
use crate::task::TaskId;

#[async_trait]
impl DueStore for EmbeddedStore {
    /// Ends the due leases found through the expiry index, re-filing renewed ones under their
    /// new expiry.
    async fn expire_leases(&self, now: SystemTime, limit: usize) -> Result<Vec<Lease>, StoreError> {
        self.blocking(move |db| expire_in(db, now, limit)).await
    }

    /// Up to `limit` tasks filed under a deadline at or before `now`, earliest first.
    async fn overdue_tasks(
        &self,
        now: SystemTime,
        limit: usize,
    ) -> Result<Vec<TaskId>, StoreError> {
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(DEADLINES)?;
            let mut due = Vec::new();
            for entry in table.range((0, "")..=(unix_ms(now), "~"))?.take(limit) {
                let (k, _) = entry?;
                if let Ok(id) = TaskId::parse(k.value().1) {
                    due.push(id);
                }
            }
            Ok(due)
        })
        .await
    }

    /// Drops the task's entry from the index of deadlines.
    async fn forget_deadline(&self, id: &TaskId) -> Result<(), StoreError> {
        let id = id.to_string();
        self.blocking(move |db| {
            let txn = db.begin_write()?;
            {
                let task = match txn.open_table(TASKS)?.get(id.as_str())? {
                    Some(v) => Some(decode(v.value())?),
                    None => None,
                };
                let mut table = txn.open_table(DEADLINES)?;
                match task {
                    Some(t) => {
                        table.remove((unix_ms_ceil(t.deadline), id.as_str()))?;
                        // Where an ended task with children was filed again (`refile_due`).
                        if let Some(ended) = t.ended_at {
                            let again = unix_ms_ceil(ended + crate::store::CASCADE_GRACE);
                            table.remove((again, id.as_str()))?;
                        }
                    }
                    // Pruned: find it by id (rare; the index is small).
                    None => {
                        table.retain(|(_, task), ()| task != id.as_str())?;
                    }
                }
            }
            txn.commit()?;
            Ok(())
        })
        .await
    }

    /// The first entry of each index.
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
}

/// The body of [`DueStore::expire_leases`], on the blocking pool.
fn expire_in(db: &Database, now: SystemTime, limit: usize) -> Result<Vec<Lease>, StoreError> {
    // Most rounds find nothing due: answer from a read transaction, without a commit.
    let first_due = db
        .begin_read()?
        .open_table(EXPIRY)?
        .first()?
        .map(|(k, _)| k.value().0);
    if first_due.is_none_or(|ms| ms > unix_ms(now)) {
        return Ok(Vec::new());
    }
    let txn = db.begin_write()?;
    let mut ended = Vec::new();
    {
        let mut expiry = txn.open_table(EXPIRY)?;
        let mut leases = txn.open_table(LEASES)?;
        let due: Vec<(u64, String, String)> = expiry
            .range((0, "", "")..=(unix_ms(now), "~", "~"))?
            .take(limit)
            .map(|r| {
                r.map(|(k, _)| {
                    let (ms, task, lease) = k.value();
                    (ms, task.to_owned(), lease.to_owned())
                })
            })
            .collect::<Result<_, redb::StorageError>>()?;
        for (ms, task, id) in due {
            expiry.remove((ms, task.as_str(), id.as_str()))?;
            let Some(mut lease) = leases
                .get((task.as_str(), id.as_str()))?
                .map(|v| decode_lease(v.value()))
                .transpose()?
            else {
                continue;
            };
            if lease.expire(now) {
                leases.insert(
                    (task.as_str(), id.as_str()),
                    encode_lease(&lease)?.as_slice(),
                )?;
                ended.push(lease);
            } else if lease.state == LeaseState::Active {
                // Renewed since it was filed: file it under its new expiry.
                expiry.insert(
                    (unix_ms_ceil(lease.expires_at), task.as_str(), id.as_str()),
                    (),
                )?;
            }
        }
    }
    txn.commit()?;
    Ok(ended)
}
