//! Leases, the [`LeaseStore`] of the embedded store: recording one (checked against its task,
//! the agent's lock and the epoch marker in the same transaction), reading, renewal, revocation,
//! the count of unrevoked ones, and the revocation of a task's active leases when it ends or its
//! agent is locked. Their expiry is in `expiry`.
//!
//! The `lease_expiry` index holds exactly the unrevoked leases: every path that ends a lease
//! before its expiry takes it out ([`unfile`]), so the reaper never visits an ended one.

use std::time::SystemTime;

use async_trait::async_trait;
use redb::{ReadableDatabase as _, ReadableTable as _, Table, WriteTransaction};

use super::EmbeddedStore;
use super::locks::lock_in;
use super::log::log_in;
use super::tables::{CREDENTIALS, EXPIRY, LEASE_TASKS, LEASES, META, TASKS, revision_of};
use crate::lease::{Lease, LeaseId, LeaseState, Revocation, SUPERSEDED, check_issuable};
use crate::store::{
    IssueError, LeaseStore, Renewal, Revision, StoreError, UpdateError, VersionedTask,
    check_renewable, decode, decode_lease, encode, encode_lease, unix_ms_ceil,
};
use crate::task::{Task, TaskError, TaskId, Unmet};

#[async_trait]
impl LeaseStore for EmbeddedStore {
    /// Queued for the writer thread (`writer`), which records it with the issuances queued
    /// beside it in one durable commit, checked as [`issue_in`] checks it, and answers only
    /// once that commit is done.
    async fn issue_lease(
        &self,
        lease: &Lease,
        seen: Option<(&Task, Revision)>,
        now: SystemTime,
    ) -> Result<Option<VersionedTask>, IssueError> {
        let seen = seen.map(|(_, revision)| revision);
        self.writer.issue(lease.clone(), seen, now).await
    }

    /// Found through the lease's task.
    async fn get_lease(&self, id: &LeaseId) -> Result<Option<Lease>, StoreError> {
        let id = id.as_str().to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let Some(task) = txn
                .open_table(LEASE_TASKS)?
                .get(id.as_str())?
                .map(|v| v.value().to_owned())
            else {
                return Ok(None);
            };
            let leases = txn.open_table(LEASES)?;
            let got = leases.get((task.as_str(), id.as_str()))?;
            got.map(|v| decode_lease(v.value())).transpose()
        })
        .await
    }

    /// Found through the `credentials` table.
    async fn find_lease(
        &self,
        task: &TaskId,
        credential: &str,
    ) -> Result<Option<Lease>, StoreError> {
        let (task, credential) = (task.to_string(), credential.to_owned());
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let creds = txn.open_table(CREDENTIALS)?;
            let Some(lease_id) = creds
                .get((task.as_str(), credential.as_str()))?
                .map(|v| v.value().to_owned())
            else {
                return Ok(None);
            };
            let leases = txn.open_table(LEASES)?;
            let got = leases.get((task.as_str(), lease_id.as_str()))?;
            got.map(|v| decode_lease(v.value())).transpose()
        })
        .await
    }

    /// In key order, which is issuance order.
    async fn task_leases(&self, task: &TaskId) -> Result<Vec<Lease>, StoreError> {
        let task = task.to_string();
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let leases = txn.open_table(LEASES)?;
            let mut out = Vec::new();
            for entry in leases.range((task.as_str(), "")..=(task.as_str(), "~"))? {
                let (_, v) = entry?;
                out.push(decode_lease(v.value())?);
            }
            Ok(out)
        })
        .await
    }

    /// Re-checks the task, the lease and the lock, logs the superseded credential, and files
    /// the lease under its new expiry, in one transaction.
    async fn renew_lease(&self, id: &LeaseId, to: &Renewal<'_>) -> Result<Lease, IssueError> {
        let (credential, expires_at, now) = (to.credential, to.expires_at, to.now);
        let (id, credential) = (id.as_str().to_owned(), credential.to_owned());
        let renewed = self
            .blocking(move |db| {
                let txn = db.begin_write()?;
                has_epoch(&txn)?;
                let lease = {
                    let Some((task_id, mut lease)) = lease_in(&txn, &id)? else {
                        return Err(IssueError::NotFound);
                    };
                    let mut leases = txn.open_table(LEASES)?;
                    let task = match txn.open_table(TASKS)?.get(task_id.as_str())? {
                        Some(v) => decode(v.value())?,
                        None => return Err(IssueError::NotFound),
                    };
                    check_issuable(&task, &lease.agent, now)?;
                    check_renewable(&lease, now)?;
                    if let Some(lock) = lock_in(&txn, &lease.agent, now)? {
                        return Err(IssueError::Locked(lock.reason));
                    }
                    log_in(&txn, &[Revocation::of(&lease, SUPERSEDED, now)])?;
                    // Filed again under its new expiry.
                    let mut expiry = txn.open_table(EXPIRY)?;
                    unfile(&mut expiry, &task_id, &lease)?;
                    lease.credential = credential;
                    lease.expires_at = expires_at;
                    expiry.insert(
                        (unix_ms_ceil(expires_at), task_id.as_str(), id.as_str()),
                        (),
                    )?;
                    leases.insert(
                        (task_id.as_str(), id.as_str()),
                        encode_lease(&lease)?.as_slice(),
                    )?;
                    txn.open_table(CREDENTIALS)?
                        .insert((task_id.as_str(), lease.credential.as_str()), id.as_str())?;
                    lease
                };
                txn.commit()?;
                Ok(lease)
            })
            .await;
        if renewed.is_ok() {
            self.logged();
        }
        renewed
    }

    /// Ends the lease as revoked, logs it, and takes it out of the expiry index, in one
    /// transaction.
    async fn revoke_lease(
        &self,
        id: &LeaseId,
        reason: &str,
        now: SystemTime,
    ) -> Result<Lease, UpdateError> {
        let (id, reason) = (id.as_str().to_owned(), reason.to_owned());
        let done = self
            .blocking(move |db| {
                let txn = db.begin_write()?;
                let lease = {
                    let Some((task_id, mut lease)) = lease_in(&txn, &id)? else {
                        return Err(UpdateError::NotFound);
                    };
                    let mut leases = txn.open_table(LEASES)?;
                    if !lease.revoke(&reason, now) {
                        return Err(TaskError::Precondition(Unmet::LeaseNotActive).into());
                    }
                    log_in(&txn, &[Revocation::of(&lease, &reason, now)])?;
                    leases.insert(
                        (task_id.as_str(), id.as_str()),
                        encode_lease(&lease)?.as_slice(),
                    )?;
                    unfile(&mut txn.open_table(EXPIRY)?, &task_id, &lease)?;
                    lease
                };
                txn.commit()?;
                Ok(lease)
            })
            .await;
        if done.is_ok() {
            self.logged();
        }
        done
    }

    /// The size of the expiry index.
    async fn live_leases(&self) -> Result<u64, StoreError> {
        self.blocking(|db| {
            let txn = db.begin_read()?;
            let expiry = txn.open_table(EXPIRY)?;
            Ok(redb::ReadableTableMetadata::len(&expiry)?)
        })
        .await
    }
}

/// Checks the epoch marker, that the lease id is new, the task (as stored: a revision other
/// than `seen` is [`IssueError::Changed`]) and the agent's lock, then marks the task started
/// and files the lease, in `txn`. Every check comes before the first write: a refused lease
/// writes nothing. Returns the task if this issuance changed it (started it).
pub(super) fn issue_in(
    txn: &WriteTransaction,
    lease: &Lease,
    seen: Option<Revision>,
    now: SystemTime,
) -> Result<Option<VersionedTask>, IssueError> {
    let task_id = lease.task.to_string();
    has_epoch(txn)?;
    let known = txn
        .open_table(LEASE_TASKS)?
        .get(lease.id.as_str())?
        .is_some();
    if known {
        return Err(IssueError::Exists);
    }
    let mut tasks = txn.open_table(TASKS)?;
    let (mut task, revision) = match tasks.get(task_id.as_str())? {
        Some(v) => (decode(v.value())?, revision_of(v.value())),
        None => return Err(IssueError::NotFound),
    };
    if seen.is_some_and(|seen| seen != revision) {
        return Err(IssueError::Changed(Box::new(VersionedTask {
            task,
            revision,
        })));
    }
    check_issuable(&task, &lease.agent, now)?;
    if let Some(lock) = lock_in(txn, &lease.agent, now)? {
        return Err(IssueError::Locked(lock.reason));
    }
    let started = if task.started_at.is_none() {
        task.started_at = Some(now);
        let bytes = encode(&task)?;
        let revision = revision_of(&bytes);
        tasks.insert(task_id.as_str(), bytes.as_slice())?;
        Some(VersionedTask { task, revision })
    } else {
        None
    };
    txn.open_table(LEASES)?.insert(
        (task_id.as_str(), lease.id.as_str()),
        encode_lease(lease)?.as_slice(),
    )?;
    txn.open_table(EXPIRY)?.insert(
        (
            unix_ms_ceil(lease.expires_at),
            task_id.as_str(),
            lease.id.as_str(),
        ),
        (),
    )?;
    txn.open_table(CREDENTIALS)?.insert(
        (task_id.as_str(), lease.credential.as_str()),
        lease.id.as_str(),
    )?;
    txn.open_table(LEASE_TASKS)?
        .insert(lease.id.as_str(), task_id.as_str())?;
    Ok(started)
}

/// A file without its epoch marker was replaced (its data lost) since the broker last looked:
/// nothing is recorded in it until a new epoch begins (see the Redis store's `ISSUE`).
fn has_epoch(txn: &WriteTransaction) -> Result<(), IssueError> {
    match txn.open_table(META)?.get("epoch")? {
        Some(_) => Ok(()),
        None => Err(IssueError::StoreReset),
    }
}

/// The task id and the lease `id`, read inside write transaction `txn`.
fn lease_in(txn: &WriteTransaction, id: &str) -> Result<Option<(String, Lease)>, StoreError> {
    let Some(task_id) = txn
        .open_table(LEASE_TASKS)?
        .get(id)?
        .map(|v| v.value().to_owned())
    else {
        return Ok(None);
    };
    let leases = txn.open_table(LEASES)?;
    let lease = leases
        .get((task_id.as_str(), id))?
        .map(|v| decode_lease(v.value()))
        .transpose()?;
    Ok(lease.map(|l| (task_id, l)))
}

/// Takes `lease` of `task` out of the expiry index (it ended before its expiry): the index holds
/// exactly the unrevoked leases, and the reaper never visits an ended one.
fn unfile(
    expiry: &mut Table<'_, (u64, &'static str, &'static str), ()>,
    task: &str,
    lease: &Lease,
) -> Result<(), StoreError> {
    expiry.remove((unix_ms_ceil(lease.expires_at), task, lease.id.as_str()))?;
    Ok(())
}

/// Revokes every active lease of `task` in `leases` (a table of a write transaction), logs the
/// revocations, and returns the leases.
pub(super) fn revoke_active_leases(
    txn: &WriteTransaction,
    leases: &mut Table<'_, (&'static str, &'static str), &'static [u8]>,
    task: &str,
    reason: &str,
    at: SystemTime,
) -> Result<Vec<Lease>, StoreError> {
    Ok(revoke_some_active_leases(txn, leases, task, reason, at, usize::MAX)?.0)
}

/// Revokes up to `limit` active leases of `task`; returns them and how many active ones are
/// left.
pub(super) fn revoke_some_active_leases(
    txn: &WriteTransaction,
    leases: &mut Table<'_, (&'static str, &'static str), &'static [u8]>,
    task: &str,
    reason: &str,
    at: SystemTime,
    limit: usize,
) -> Result<(Vec<Lease>, usize), StoreError> {
    let mut active: Vec<Lease> = Vec::new();
    let mut left = 0;
    for entry in leases.range((task, "")..=(task, "~"))? {
        let (_, v) = entry?;
        let lease = decode_lease(v.value())?;
        if lease.state == LeaseState::Active {
            if active.len() < limit {
                active.push(lease);
            } else {
                left += 1;
            }
        }
    }
    let mut expiry = txn.open_table(EXPIRY)?;
    for lease in &mut active {
        lease.revoke(reason, at);
        leases.insert((task, lease.id.as_str()), encode_lease(lease)?.as_slice())?;
        unfile(&mut expiry, task, lease)?;
    }
    let logged: Vec<Revocation> = active
        .iter()
        .map(|l| Revocation::of(l, reason, at))
        .collect();
    log_in(txn, &logged)?;
    Ok((active, left))
}
