//! Force-revoke: locking an agent (its leases die and its open tasks end in one atomic step,
//! nothing new is issued to it) by an operator or, after a failed task, by policy; lifting the
//! lock, listing locks, revoking one task, and explaining a refusal by the lock that caused it.

use crate::broker::Denial;
use std::sync::Arc;
use std::time::Duration;

use super::revoker::Cause;
use super::{Broker, BrokerError, RequestId};
use crate::audit::AuditEvent;
use crate::identity::WorkloadId;
use crate::lease::{Lease, Lock, LockOutcome};
use crate::policy::{PolicyAction, Resource};
use crate::store::TaskChange;
use crate::task::{Task, TaskError, TaskId, Unmet};

/// Counter of locks policy asked for after a failed task that could not be written.
pub const LOCK_ON_FAILURE_ERRORS: &str = "taskcred_lock_on_failure_errors_total";
/// Longest lock reason, in bytes.
pub const MAX_REASON_BYTES: usize = 512;
/// Most locks in one page of `ListLocks`.
pub const MAX_LOCK_PAGE: usize = 500;

/// One page of locks, by agent id.
#[derive(Debug, Clone, Default)]
pub struct LockPage {
    /// The locks in force.
    pub locks: Vec<Lock>,
    /// The last agent of this page, when more follow.
    pub next: Option<WorkloadId>,
}

/// Longest lock with an end; a longer one is a lock without end.
pub const MAX_LOCK_DURATION: Duration = Duration::from_secs(366 * 86400);

/// Checks an operator's free-text reason: 1 to [`MAX_REASON_BYTES`] bytes, no control
/// characters.
///
/// # Errors
/// [`BrokerError::Invalid`] on field `reason`.
pub fn check_reason(reason: &str) -> Result<(), BrokerError> {
    let bad = |why: &str| BrokerError::Invalid {
        field: "reason",
        reason: why.into(),
    };
    if reason.trim().is_empty() {
        return Err(bad("required"));
    }
    if reason.len() > MAX_REASON_BYTES {
        return Err(bad(&format!("longer than {MAX_REASON_BYTES} bytes")));
    }
    if crate::text::has_deceptive(reason) {
        return Err(bad(
            "must not contain control, separator or format characters",
        ));
    }
    Ok(())
}

/// The context of `LockAgent`: how long the lock asked for lasts (0: until unlocked).
fn lock_context(
    duration: Option<Duration>,
    until: Option<std::time::SystemTime>,
) -> serde_json::Value {
    let until = until
        .and_then(|u| u.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    serde_json::json!({
        "duration_secs": duration.map_or(0, |d| d.as_secs()),
        "until": until,
    })
}

/// A lock's end for an audit line ("" for none).
fn until_text(until: Option<std::time::SystemTime>) -> String {
    until
        .map(|u| humantime::format_rfc3339_millis(u).to_string())
        .unwrap_or_default()
}

impl Broker {
    /// Locks `agent` if policy permits `caller` (with the lock's duration as context): in one
    /// atomic store step the lock is written, every active lease of the agent revoked and every
    /// open task it executes moved to `revoked`. A `duration` lifts the lock by itself then. A
    /// lock never shortens or lifts one in force: where the lock in force ends later (or
    /// never), it stays, and the outcome says so.
    ///
    /// # Errors
    /// [`BrokerError::Invalid`] (reason, duration), [`BrokerError::Denied`],
    /// [`BrokerError::Unavailable`] (nothing changed).
    pub async fn lock_agent(
        &self,
        caller: &WorkloadId,
        agent: &WorkloadId,
        reason: &str,
        duration: Option<Duration>,
        request: Option<&RequestId>,
    ) -> Result<(Lock, LockOutcome), BrokerError> {
        check_reason(reason)?;
        // A lock on an identity no caller can have would hold nothing: say so.
        if !self.trust_domains.allows(agent) && agent.trust_domain() != self.ci.trust_domain() {
            return Err(BrokerError::Invalid {
                field: "agent",
                reason: format!(
                    "{agent} is in no trust domain of this broker (identity.trust_domains, or \
                     the CI domain {})",
                    self.ci.trust_domain()
                ),
            });
        }
        if let Some(d) = duration
            && (d < Duration::from_secs(1) || d > MAX_LOCK_DURATION)
        {
            return Err(BrokerError::Invalid {
                field: "duration",
                reason: "must be 1s to 366 days (unset: until unlocked)".into(),
            });
        }
        let now = self.clock.now();
        let until = duration.map(|d| now + d);
        let verdict = self.authorize_in(
            caller,
            PolicyAction::LockAgent,
            &Resource::Workload(agent),
            Some(lock_context(duration, until)),
        )?;
        let lock = Lock {
            agent: agent.clone(),
            reason: reason.to_owned(),
            operator: caller.clone(),
            at: now,
            until,
        };
        let outcome = self.apply_lock(&lock, &verdict.policies, request).await?;
        let in_force = outcome.in_force.clone().unwrap_or(lock);
        Ok((in_force, outcome))
    }

    /// After `task` ended as failed, reported by `caller`: if the reporter is the executor
    /// itself, asks policy (`LockOnFailure`, the executor as principal) whether to lock it, and
    /// locks it for `ttl.lock_on_failure` if so. Another party's report (a requester's) never
    /// locks the executor: it could otherwise end the executor's other tasks at will. A lock
    /// that cannot be written is logged and counted, not returned: the task has ended already.
    pub(super) async fn lock_on_failure(&self, caller: &WorkloadId, task: &Task) {
        if caller != &task.executor {
            return;
        }
        let duration = self.settings.lock_on_failure;
        let verdict = self.policy.decide_in(
            &task.executor,
            PolicyAction::LockOnFailure,
            &Resource::Task(task),
            Some(serde_json::json!({ "duration_secs": duration.as_secs() })),
        );
        if !verdict.allowed {
            return;
        }
        let now = self.clock.now();
        let lock = Lock {
            agent: task.executor.clone(),
            reason: format!("task {} failed", task.id),
            operator: caller.clone(),
            at: now,
            until: Some(now + duration),
        };
        if let Err(e) = self.apply_lock(&lock, &verdict.policies, None).await {
            metrics::counter!(LOCK_ON_FAILURE_ERRORS).increment(1);
            tracing::error!(
                agent = %lock.agent,
                task = %task.id,
                error = %e,
                "policy locks this agent after its task failed, but the lock could not be written"
            );
        }
    }

    /// Writes `lock` (it holds from then on), then ends what it covers in bounded steps; logs
    /// and audits it. A sweep the store cannot finish is left to the reaper (`pending`).
    async fn apply_lock(
        &self,
        lock: &Lock,
        policies: &[String],
        request: Option<&RequestId>,
    ) -> Result<LockOutcome, BrokerError> {
        let request_id = request.map(RequestId::as_str);
        let (agent, caller, reason, now) = (&lock.agent, &lock.operator, &lock.reason, lock.at);
        let mut outcome = match self.store.lock_agent(lock).await {
            Ok(in_force) => LockOutcome {
                in_force: Some(in_force),
                ..LockOutcome::default()
            },
            Err(e) => {
                let e = BrokerError::from(e);
                if let BrokerError::OutcomeUnknown(detail) = &e {
                    // The lock may hold (and its revocations are in the log, audited from it):
                    // the record says what the broker knows.
                    self.audit.record(
                        &AuditEvent::new(now, "LockAgent", caller.as_str(), false)
                            .outcome_unknown()
                            .policies(policies)
                            .reason(format!("outcome unknown: {detail}"))
                            .detail("agent", agent.as_str())
                            .detail("until", until_text(lock.until))
                            .detail_opt("request_id", request_id),
                    );
                }
                return Err(e);
            }
        };
        if let Err(e) = self
            .revoker
            .sweep_lock(agent, &format!("agent locked: {reason}"), now, &mut outcome)
            .await
        {
            tracing::warn!(%agent, error = %e, "the lock holds; the reaper ends the rest of its tasks and leases");
            outcome.pending = true;
        }
        // The tasks the lock ended end the tasks delegated below them (to other agents).
        for id in outcome.tasks.clone() {
            let ended = match self.store.get_task(&id).await {
                Ok(Some(t)) => t,
                Ok(None) => continue,
                Err(_) => {
                    outcome.pending = true;
                    continue;
                }
            };
            if self.end_tree_below(&ended, caller.as_str()).await.is_err() {
                outcome.pending = true;
            }
        }
        let in_force = outcome.in_force.as_ref().unwrap_or(lock);
        let kept = in_force != lock;
        tracing::warn!(
            %agent,
            operator = %caller,
            tasks = outcome.tasks.len(),
            leases = outcome.leases.len(),
            kept_longer_lock = kept,
            "agent locked"
        );
        let credentials: Vec<&str> = outcome
            .leases
            .iter()
            .map(|l| l.credential.as_str())
            .collect();
        let tasks: Vec<String> = outcome.tasks.iter().map(ToString::to_string).collect();
        self.audit.record_listing(
            AuditEvent::new(now, "LockAgent", caller.as_str(), true)
                .policies(policies)
                .reason(reason)
                .detail("agent", agent.as_str())
                .detail("revoked_tasks", tasks)
                .detail("until", until_text(lock.until))
                .detail("until_in_force", until_text(in_force.until))
                .detail("kept_longer_lock", kept)
                .detail("pending", outcome.pending)
                .detail_opt("request_id", request_id),
            "revoked_credentials",
            &credentials,
        );
        Ok(outcome)
    }

    /// Lifts the lock of `agent` if policy permits `caller`; returns it if there was one.
    /// What the lock revoked stays revoked.
    ///
    /// # Errors
    /// [`BrokerError::Denied`], [`BrokerError::Unavailable`].
    pub async fn unlock_agent(
        &self,
        caller: &WorkloadId,
        agent: &WorkloadId,
    ) -> Result<Option<Lock>, BrokerError> {
        let verdict = self.authorize(
            caller,
            PolicyAction::UnlockAgent,
            &Resource::Workload(agent),
        )?;
        let lifted = self.store.unlock_agent(agent).await?;
        self.audit.record(
            &AuditEvent::new(self.clock.now(), "UnlockAgent", caller.as_str(), true)
                .policies(&verdict.policies)
                .detail("agent", agent.as_str())
                .detail("was_locked", lifted.is_some()),
        );
        Ok(lifted)
    }

    /// Ends an open task as `revoked` if policy permits `caller`, revoking every active lease
    /// of it in the same atomic store step. Returns the task and the leases revoked.
    ///
    /// # Errors
    /// [`BrokerError::Invalid`] (reason), [`BrokerError::NotFound`], [`BrokerError::Denied`],
    /// [`BrokerError::Precondition`] (the task has ended), [`BrokerError::Unavailable`].
    pub async fn revoke_task(
        &self,
        caller: &WorkloadId,
        id: &TaskId,
        reason: &str,
    ) -> Result<(Task, Vec<Lease>), BrokerError> {
        check_reason(reason)?;
        let task = self.load(id).await?;
        let verdict = self.authorize(caller, PolicyAction::RevokeTask, &Resource::Task(&task))?;
        let now = self.clock.now();
        let why = format!("revoked by {caller}: {reason}");
        let change: TaskChange = Arc::new(move |t: &mut Task| {
            if t.revoke(&why, now) {
                Ok(())
            } else {
                Err(TaskError::Precondition(Unmet::Ended(t.state)))
            }
        });
        let (task, leases) = self
            .revoker
            .end_task(id, change, Cause::Revoke, |task| {
                AuditEvent::new(now, "RevokeTask", caller.as_str(), true)
                    .task(task.id)
                    .policies(&verdict.policies)
                    .reason(reason)
            })
            .await
            .map_err(BrokerError::from)
            .inspect_err(|e| self.audit_refusal(PolicyAction::RevokeTask, caller, *id, e))?;
        tracing::warn!(task = %id, operator = %caller, leases = leases.len(), "task revoked");
        self.end_tree_below(&task, caller.as_str()).await?;
        Ok((task, leases))
    }

    /// One page of the locks in force, by agent id after `after`, if policy permits `caller`.
    /// `page_size` 0 means 100; at most [`MAX_LOCK_PAGE`].
    ///
    /// # Errors
    /// [`BrokerError::Denied`], [`BrokerError::Invalid`] (page size),
    /// [`BrokerError::Unavailable`].
    pub async fn list_locks(
        &self,
        caller: &WorkloadId,
        page_size: usize,
        after: Option<&WorkloadId>,
    ) -> Result<LockPage, BrokerError> {
        let size = super::leases::page_size(page_size, MAX_LOCK_PAGE)?;
        self.authorize(caller, PolicyAction::ListLocks, &Resource::Broker)?;
        let mut locks = self.store.list_locks(self.clock.now()).await?;
        locks.sort_by(|a, b| a.agent.cmp(&b.agent));
        locks.retain(|l| after.is_none_or(|a| &l.agent > a));
        let next = (locks.len() > size).then(|| locks[size - 1].agent.clone());
        locks.truncate(size);
        Ok(LockPage { locks, next })
    }

    /// A refusal to issue or renew for `agent`, explained by its lock when one holds: a locked
    /// agent's tasks and leases were ended by the lock, and the agent is told why
    /// (`PERMISSION_DENIED` with the reason) rather than that its task ended.
    pub(super) async fn explain_by_lock(&self, agent: &WorkloadId, e: BrokerError) -> BrokerError {
        if !matches!(e, BrokerError::Precondition(_)) {
            return e;
        }
        match self.store.agent_lock(agent, self.clock.now()).await {
            Ok(Some(lock)) => BrokerError::Denied(Denial::Locked(lock.reason)),
            _ => e,
        }
    }
}
