//! The one owner of revocation: every way a credential ends early or at its expiry (a task
//! completed, revoked or past its deadline; a lease revoked; a lock; an expiry; an issuance whose
//! audit line could not be written; a renewal superseding a credential) goes through
//! [`Revoker`], which makes the store step, writes the decision's audit line with what it ended,
//! counts it by cause and logs it. (The audit line of each revoked credential comes from the
//! revocation log, written by the store in the same step: see `auditor`.)
//!
//! As in openbao's `ExpirationManager` (`revokeCommon`): the use cases decide, the revoker ends.

use crate::store::LockSweep;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::audit::{AuditEvent, AuditLog};
use crate::identity::WorkloadId;
use crate::lease::{Lease, LeaseId, LockOutcome};
use crate::store::{Store, StoreError, TaskChange, UpdateError};
use crate::task::{Task, TaskId};

/// Leases and tasks a lock's sweep ends per store step: as many as one chunk of the Redis
/// store's revocation script, each step well under 50 ms of Redis (Redis serves other callers
/// between the steps).
pub const SWEEP_CHUNK: usize = 1000;

/// Why credentials end: the `cause` label of [`super::metrics::REVOCATIONS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cause {
    /// Their task was completed (by its executor, its requester or its CI job).
    TaskEnd,
    /// An operator revoked their task or the lease.
    Revoke,
    /// Their agent was locked.
    Lock,
    /// Their task passed its deadline (the reaper).
    Deadline,
    /// The audit line of the issuance could not be written: never handed out.
    AuditFailure,
    /// A renewal gave the lease a new credential.
    Renewal,
    /// A task above theirs in its delegation tree ended.
    ParentEnd,
}

impl Cause {
    /// Every cause.
    pub(super) const ALL: [Self; 7] = [
        Self::TaskEnd,
        Self::Revoke,
        Self::Lock,
        Self::Deadline,
        Self::AuditFailure,
        Self::Renewal,
        Self::ParentEnd,
    ];

    /// The metric label.
    pub(super) const fn label(self) -> &'static str {
        match self {
            Self::TaskEnd => "task_end",
            Self::Revoke => "revoke",
            Self::Lock => "lock",
            Self::Deadline => "deadline",
            Self::AuditFailure => "audit_failure",
            Self::Renewal => "renewal",
            Self::ParentEnd => "parent_end",
        }
    }
}

/// Ends credentials: the store step, the audit line, the metric, the log line.
#[derive(Debug)]
pub(super) struct Revoker {
    store: Arc<dyn Store>,
    audit: Arc<AuditLog>,
    /// How long ended tasks (and their leases) stay readable.
    task_retention: Duration,
}

impl Revoker {
    /// A revoker over `store`, auditing to `audit`.
    pub(super) fn new(
        store: Arc<dyn Store>,
        audit: Arc<AuditLog>,
        task_retention: Duration,
    ) -> Self {
        Self {
            store,
            audit,
            task_retention,
        }
    }

    /// Ends task `id` by `change`, revoking every active lease of it in the same atomic store
    /// step; the audit line `describe` makes of the ended task lists the credentials revoked.
    ///
    /// # Errors
    /// What the store or the change refused: nothing was ended.
    pub(super) async fn end_task(
        &self,
        id: &TaskId,
        change: TaskChange,
        cause: Cause,
        describe: impl FnOnce(&Task) -> AuditEvent,
    ) -> Result<(Task, Vec<Lease>), UpdateError> {
        let (task, leases) = self.store.end_task(id, change, self.task_retention).await?;
        let credentials: Vec<&str> = leases.iter().map(|l| l.credential.as_str()).collect();
        self.audit
            .record_listing(describe(&task), "revoked_credentials", &credentials);
        tracing::info!(task = %task.id, state = %task.state, cause = cause.label(), revoked = leases.len(), "task ended");
        count(cause, leases.len());
        Ok((task, leases))
    }

    /// Ends every open task delegated below `ended` (a task that has just ended), with their
    /// active leases, each in its own atomic store step (each task's keys stay apart, as Redis
    /// Cluster wants them): children first, then theirs. A child that had ended already is left
    /// alone: its own end takes care of what is below it. `by` names who ended the parent in
    /// the audit lines. Returns the tasks ended and how many credentials they held.
    ///
    /// # Errors
    /// The store's, with what was ended so far staying ended: the parent is filed due again
    /// when it ends (see [`crate::store::CASCADE_GRACE`]) and the reaper ends the rest.
    pub(super) async fn end_below(
        &self,
        ended: &Task,
        by: &str,
        at: SystemTime,
    ) -> Result<(Vec<TaskId>, usize), StoreError> {
        let mut stack: Vec<(TaskId, TaskId)> = ended
            .children
            .iter()
            .rev()
            .map(|c| (*c, ended.id))
            .collect();
        let (mut tasks, mut credentials) = (Vec::new(), 0);
        while let Some((id, parent)) = stack.pop() {
            let why = format!("task {parent} above it ended");
            let change: TaskChange = Arc::new(move |t: &mut Task| {
                if t.revoke(&why, at) {
                    Ok(())
                } else {
                    Err(crate::task::TaskError::Precondition(
                        crate::task::Unmet::Ended(t.state),
                    ))
                }
            });
            match self
                .end_task(&id, change, Cause::ParentEnd, |t| {
                    AuditEvent::new(at, "DelegationEnded", by, true)
                        .task(t.id)
                        .reason("a task above it in its delegation tree ended")
                        .detail("parent", parent.to_string())
                        .detail("root", t.root_id().to_string())
                })
                .await
            {
                Ok((child, leases)) => {
                    credentials += leases.len();
                    tasks.push(child.id);
                    stack.extend(child.children.iter().rev().map(|c| (*c, child.id)));
                }
                // Ended already (its own end reaches below it), or gone.
                Err(UpdateError::Rejected(_) | UpdateError::NotFound) => {}
                Err(UpdateError::Store(e)) => return Err(e),
            }
        }
        Ok((tasks, credentials))
    }

    /// Revokes lease `id` for `reason`; `event`, if any, is the decision's audit line (it gets
    /// the lease and credential ids).
    ///
    /// # Errors
    /// [`UpdateError::NotFound`], [`UpdateError::Rejected`] (not active), or the store's.
    pub(super) async fn revoke_lease(
        &self,
        id: &LeaseId,
        reason: &str,
        at: SystemTime,
        cause: Cause,
        event: Option<AuditEvent>,
    ) -> Result<Lease, UpdateError> {
        let revoked = self.store.revoke_lease(id, reason, at).await?;
        if let Some(event) = event {
            self.audit.record(
                &event
                    .detail("lease_id", id.as_str())
                    .detail("credential", revoked.credential.as_str()),
            );
        }
        tracing::info!(lease = %id, task = %revoked.task, cause = cause.label(), "lease revoked");
        count(cause, 1);
        Ok(revoked)
    }

    /// Revokes the lease of an issuance whose audit line could not be written: its credential
    /// is never handed out. A failure is logged: the lease then expires unused.
    pub(super) async fn revoke_unaudited(&self, lease: &LeaseId, at: SystemTime) {
        if let Err(e) = self
            .store
            .revoke_lease(lease, "the audit log could not be written", at)
            .await
        {
            tracing::warn!(error = %e, %lease, "revoking an unaudited lease failed; it expires unused");
        }
        // Counted either way: the credential was never handed out.
        count(Cause::AuditFailure, 1);
    }

    /// Ends up to `limit` leases whose credential expired by `now`, each once whatever the
    /// number of replicas, with an audit line each.
    ///
    /// # Errors
    /// The store's; what was ended stays ended.
    pub(super) async fn expire_leases(
        &self,
        now: SystemTime,
        limit: usize,
    ) -> Result<Vec<Lease>, StoreError> {
        let ended = self.store.expire_leases(now, limit).await?;
        for lease in &ended {
            self.audit.record(
                &AuditEvent::new(now, "LeaseExpired", "reaper", true)
                    .task(lease.task)
                    .detail("lease_id", lease.id.as_str())
                    .detail("credential", lease.credential.as_str())
                    .detail("agent", lease.agent.as_str()),
            );
            let late = now
                .duration_since(lease.expires_at)
                .unwrap_or_default()
                .as_secs_f64();
            metrics::histogram!(super::metrics::REAPER_LATENESS).record(late);
        }
        metrics::counter!(super::reaper::LEASES_EXPIRED).increment(ended.len() as u64);
        Ok(ended)
    }

    /// Counts the credential a renewal superseded (the store logged its revocation in the
    /// renewal's own step).
    pub(super) fn superseded(&self) {
        count(Cause::Renewal, 1);
    }

    /// Ends the open tasks and live leases of locked `agent`, [`SWEEP_CHUNK`] at a time,
    /// adding them to `outcome` (what was ended stays in it when a step fails).
    ///
    /// # Errors
    /// The store's: the lock holds, and the reaper ends the rest.
    pub(super) async fn sweep_lock(
        &self,
        agent: &WorkloadId,
        reason: &str,
        at: SystemTime,
        outcome: &mut LockOutcome,
    ) -> Result<(), StoreError> {
        let result = loop {
            let swept = match self
                .store
                .sweep_lock(&LockSweep {
                    agent,
                    reason,
                    at,
                    retention: self.task_retention,
                    limit: SWEEP_CHUNK,
                })
                .await
            {
                Ok(swept) => swept,
                Err(e) => break Err(e),
            };
            count(Cause::Lock, swept.leases.len());
            outcome.tasks.extend(swept.tasks);
            outcome.leases.extend(swept.leases);
            if swept.remaining == 0 {
                break Ok(());
            }
        };
        if !outcome.tasks.is_empty() || !outcome.leases.is_empty() {
            tracing::debug!(%agent, tasks = outcome.tasks.len(), leases = outcome.leases.len(), "a lock's sweep ended tasks and leases");
        }
        result
    }
}

/// Counts `n` credentials ended by `cause`.
fn count(cause: Cause, n: usize) {
    if n > 0 {
        metrics::counter!(super::metrics::REVOCATIONS, "cause" => cause.label())
            .increment(n as u64);
    }
}
