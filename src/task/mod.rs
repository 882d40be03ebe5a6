//! Tasks and approvals: the model, its bounds, the closed state machine and the rules that hold
//! whatever policy says (separation of duties, quorum, deadlines). Pure: no I/O, time is passed in.
//!
//! States: `pending_approval -> approved -> completed | failed | cancelled | expired | revoked`, and
//! `pending_approval -> denied | expired | cancelled`. Terminal states are final.

mod delegation;
mod model;

pub use delegation::{Delegation, DelegationLimits, Reviewed, remaining};
pub use model::{Action, Audience, Grant, Labels, RawTaskRequest, TaskId, TaskLimits, TaskRequest};

use std::fmt;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::identity::WorkloadId;

/// Checks an approval or denial note: at most [`MAX_NOTE_BYTES`], and nothing
/// [`crate::text::is_deceptive`] refuses (a note is shown to people, in the CLI, logs and
/// consoles: no escape sequences, no line break that could forge a line, no reordered text).
///
/// # Errors
/// [`TaskError::Invalid`] on field `note`.
pub fn check_note(note: &str) -> Result<(), TaskError> {
    if note.len() > MAX_NOTE_BYTES {
        return Err(TaskError::Invalid {
            field: "note",
            reason: format!("longer than {MAX_NOTE_BYTES} bytes"),
        });
    }
    if crate::text::has_deceptive(note) {
        return Err(TaskError::Invalid {
            field: "note",
            reason: "must not contain control, separator or format characters".into(),
        });
    }
    Ok(())
}

/// Longest approval or denial note, in bytes.
pub const MAX_NOTE_BYTES: usize = 1024;

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Waiting for the quorum of approvals.
    PendingApproval,
    /// Approved: credentials may be issued until the deadline.
    Approved,
    /// An approver denied it.
    Denied,
    /// Ended by its executor or requester as succeeded.
    Completed,
    /// Ended as failed.
    Failed,
    /// Cancelled by its requester.
    Cancelled,
    /// Its deadline passed.
    Expired,
    /// Ended by an operator or by the lock of its agent.
    Revoked,
}

impl TaskState {
    /// Every state, in declaration order.
    pub const ALL: [Self; 8] = [
        Self::PendingApproval,
        Self::Approved,
        Self::Denied,
        Self::Completed,
        Self::Failed,
        Self::Cancelled,
        Self::Expired,
        Self::Revoked,
    ];

    /// Whether the state is final.
    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::PendingApproval | Self::Approved)
    }

    /// The snake-case name used on the wire, in policy and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PendingApproval => "pending_approval",
            Self::Approved => "approved",
            Self::Denied => "denied",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
        }
    }

    /// Parses [`TaskState::as_str`] names.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An approver's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Counts towards the quorum.
    Approve,
    /// Ends the task as denied.
    Deny,
}

/// How a task ended, as its executor or requester reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The work is done.
    Succeeded,
    /// The work failed.
    Failed,
    /// The work was abandoned.
    Cancelled,
}

impl Outcome {
    /// The state and end reason of a task completed with this outcome by `by`.
    pub fn ends_as(self, by: &WorkloadId) -> (TaskState, String) {
        let (state, reason) = match self {
            Self::Succeeded => (TaskState::Completed, "completed: succeeded"),
            Self::Failed => (TaskState::Failed, "completed: failed"),
            Self::Cancelled => (TaskState::Cancelled, "completed: cancelled"),
        };
        (state, format!("{reason} (by {by})"))
    }
}

/// One recorded decision on a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// Unique id of this record (UUIDv7), carried by credentials issued under the approval.
    pub id: String,
    /// Who decided.
    pub approver: WorkloadId,
    /// What.
    pub decision: Decision,
    /// When.
    pub at: SystemTime,
    /// Why, as the approver wrote it (bounded).
    pub note: String,
}

/// A task: one piece of work an executor may do, with the grants it was approved for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    /// Its id (UUIDv7: ids sort by creation time).
    pub id: TaskId,
    /// The workload that does the work and receives credentials.
    pub executor: WorkloadId,
    /// Who asked for it.
    pub requester: WorkloadId,
    /// Why, in the requester's words (bounded).
    pub purpose: String,
    /// What the executor may do, per audience.
    pub grants: Vec<Grant>,
    /// Labels policy decides on (environment, data classification...).
    pub labels: Labels,
    /// Longest lifetime of one credential of this task.
    pub credential_ttl: Duration,
    /// After this the task expires and no credential outlives it.
    pub deadline: SystemTime,
    /// The task this one was delegated from, if any.
    pub parent: Option<TaskId>,
    /// Where a delegated task sits in its tree; `None` for a root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegation: Option<Delegation>,
    /// The tasks delegated from this one, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<TaskId>,
    /// On a root: how many tasks were delegated below it (the tree's budget).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub descendants: u32,
    /// Where it is.
    pub state: TaskState,
    /// Approvals needed, fixed by policy when requested.
    pub quorum: u32,
    /// Every decision recorded, in order.
    pub approvals: Vec<Approval>,
    /// The policies that permitted the request.
    pub request_policies: Vec<String>,
    /// When it was requested.
    pub created_at: SystemTime,
    /// Last change.
    pub updated_at: SystemTime,
    /// When the first credential was issued: the task is running from then on.
    pub started_at: Option<SystemTime>,
    /// When it reached a terminal state.
    pub ended_at: Option<SystemTime>,
    /// Why it ended, when it did.
    pub end_reason: Option<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Why a change to a task is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TaskError {
    /// An input field breaks its bounds.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field, as named in the API.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The caller may not do this, whatever policy says (separation of duties).
    #[error("{0}")]
    Forbidden(Forbidden),
    /// The task (or lease) is not in a state that allows this.
    #[error("{0}")]
    Precondition(Unmet),
    /// A delegation would give the child more than its parent holds (what, in words).
    #[error("a delegation may only narrow: {0}")]
    Widens(String),
}

/// What the rules forbid whoever asks, whatever policy says (`PERMISSION_DENIED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Forbidden {
    /// Separation of duties: no one decides on a task they requested.
    #[error("separation of duties: the requester may not decide on its own task")]
    RequesterDecides,
    /// Separation of duties: no one decides on a task they execute.
    #[error("separation of duties: the executor may not decide on its own task")]
    ExecutorDecides,
    /// Only the requester cancels.
    #[error("only the requester may cancel a task")]
    NotRequester,
    /// Only the executor or the requester completes.
    #[error("only the task's executor or requester may complete it")]
    NotParty,
    /// Only the executor gets credentials.
    #[error("only the task's executor may get credentials for it")]
    NotExecutor,
    /// Separation of duties: no one in a delegation chain decides on a step of it.
    #[error(
        "separation of duties: an executor of the delegation chain, or the root's requester, may \
         not decide on a step of it"
    )]
    ChainDecides,
    /// Only the executor delegates its task.
    #[error("only the task's executor may delegate it")]
    NotDelegator,
    /// The chain would be deeper than `delegation.max_depth`.
    #[error("the delegation chain would be deeper than this broker allows (delegation.max_depth)")]
    TooDeep,
    /// An agent may appear once in a chain.
    #[error("the delegate is already in the delegation chain; an agent appears once in a chain")]
    AgentTwice,
    /// A CI job's task is not delegated.
    #[error("a CI job's task is not delegated")]
    CiTask,
}

impl Forbidden {
    /// The stable, machine-readable reason (`google.rpc.ErrorInfo.reason`).
    pub const fn reason(self) -> &'static str {
        match self {
            Self::RequesterDecides => "REQUESTER_MAY_NOT_DECIDE",
            Self::ExecutorDecides => "EXECUTOR_MAY_NOT_DECIDE",
            Self::NotRequester => "NOT_THE_REQUESTER",
            Self::NotParty => "NOT_EXECUTOR_OR_REQUESTER",
            Self::NotExecutor | Self::NotDelegator => "NOT_THE_EXECUTOR",
            Self::ChainDecides => "CHAIN_MAY_NOT_DECIDE",
            Self::TooDeep => "DELEGATION_TOO_DEEP",
            Self::AgentTwice => "AGENT_TWICE_IN_CHAIN",
            Self::CiTask => "CI_TASK_NOT_DELEGATED",
        }
    }
}

/// A state of a task or lease that does not allow the change (`FAILED_PRECONDITION`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Unmet {
    /// Decisions are taken only while the task is pending.
    #[error("task is {0}, not pending approval")]
    NotPending(TaskState),
    /// The task's deadline has passed.
    #[error("the task's deadline has passed")]
    DeadlinePassed,
    /// An approver counts once.
    #[error("this approver has already decided on the task; an approver counts once")]
    AlreadyDecided,
    /// The task has ended.
    #[error("task is already {0}")]
    Ended(TaskState),
    /// A running task is completed or revoked, not cancelled.
    #[error("task is running (credentials were issued); complete or revoke it instead")]
    Running,
    /// Only an approved task is completed.
    #[error("task is {0}, not approved; nothing to complete")]
    NothingToComplete(TaskState),
    /// Only an approved task gets credentials.
    #[error("task is {0}, not approved")]
    NotApproved(TaskState),
    /// A task is expired only past its deadline.
    #[error("the deadline is ahead")]
    DeadlineAhead,
    /// A change that was to end the task did not.
    #[error("the change does not end the task")]
    NotAnEnd,
    /// The lease was revoked or has expired (as recorded).
    #[error("lease is {0}")]
    LeaseEnded(&'static str),
    /// The lease's credential has expired.
    #[error("lease has expired; ask for a new credential")]
    LeaseExpired,
    /// The lease is not active (any more).
    #[error("lease is not active")]
    LeaseNotActive,
    /// The lease stopped being active while it was being renewed.
    #[error("lease is no longer active")]
    LeaseNoLongerActive,
    /// The task has delegated as many children as it may.
    #[error("the task has delegated {0} children, the most one task may (delegation.max_children)")]
    TooManyChildren(usize),
    /// The tree holds as many tasks as it may.
    #[error(
        "the delegation tree holds {0} tasks below its root, the most it may (delegation.max_tree_tasks)"
    )]
    TreeFull(u32),
    /// A task above this one has ended.
    #[error("task {0} above this one in its delegation chain has ended")]
    AncestorEnded(TaskId),
    /// A change a caller composed refused itself (test and tool changes).
    #[error("{0}")]
    Other(String),
}

impl Unmet {
    /// The stable, machine-readable reason (`google.rpc.ErrorInfo.reason`).
    pub const fn reason(&self) -> &'static str {
        match self {
            Self::NotPending(_) => "TASK_NOT_PENDING",
            Self::DeadlinePassed => "TASK_DEADLINE_PASSED",
            Self::AlreadyDecided => "ALREADY_DECIDED",
            Self::Ended(_) => "TASK_ENDED",
            Self::Running => "TASK_RUNNING",
            Self::NothingToComplete(_) | Self::NotApproved(_) => "TASK_NOT_APPROVED",
            Self::DeadlineAhead => "TASK_DEADLINE_AHEAD",
            Self::NotAnEnd => "NOT_AN_END",
            Self::LeaseEnded(_) | Self::LeaseExpired => "LEASE_ENDED",
            Self::LeaseNotActive | Self::LeaseNoLongerActive => "LEASE_NOT_ACTIVE",
            Self::TooManyChildren(_) | Self::TreeFull(_) => "DELEGATION_BUDGET",
            Self::AncestorEnded(_) => "ANCESTOR_ENDED",
            Self::Other(_) => "TASK_PRECONDITION",
        }
    }
}

impl Task {
    /// A new task from a checked request. With a quorum of 0 it is approved at once.
    pub fn new(
        id: TaskId,
        request: TaskRequest,
        requester: WorkloadId,
        quorum: u32,
        request_policies: Vec<String>,
        now: SystemTime,
    ) -> Self {
        let state = if quorum == 0 {
            TaskState::Approved
        } else {
            TaskState::PendingApproval
        };
        Self {
            id,
            executor: request.executor,
            requester,
            purpose: request.purpose,
            grants: request.grants,
            labels: request.labels,
            credential_ttl: request.credential_ttl,
            deadline: now + request.deadline_in,
            parent: None,
            delegation: None,
            children: Vec::new(),
            descendants: 0,
            state,
            quorum,
            approvals: Vec::new(),
            request_policies,
            created_at: now,
            updated_at: now,
            started_at: None,
            ended_at: None,
            end_reason: None,
        }
    }

    /// Number of distinct approvals recorded.
    pub fn approval_count(&self) -> u32 {
        let n = self
            .approvals
            .iter()
            .filter(|a| a.decision == Decision::Approve)
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Records `approval`, enforcing separation of duties: the approver is neither requester nor
    /// executor and counts once; a denial ends the task; the quorum approves it; nothing is
    /// decided on a task that is not pending or is past its deadline.
    ///
    /// # Errors
    /// [`TaskError::Forbidden`] or [`TaskError::Precondition`]; the task is then unchanged.
    pub fn decide(&mut self, approval: Approval, now: SystemTime) -> Result<(), TaskError> {
        if self.state != TaskState::PendingApproval {
            return Err(TaskError::Precondition(Unmet::NotPending(self.state)));
        }
        if now >= self.deadline {
            return Err(TaskError::Precondition(Unmet::DeadlinePassed));
        }
        if let Some(rule) = self.may_not_decide(&approval.approver) {
            return Err(TaskError::Forbidden(rule));
        }
        if self
            .approvals
            .iter()
            .any(|a| a.approver == approval.approver)
        {
            return Err(TaskError::Precondition(Unmet::AlreadyDecided));
        }
        check_note(&approval.note)?;
        let decision = approval.decision;
        self.approvals.push(approval);
        self.updated_at = now;
        match decision {
            Decision::Deny => self.end(TaskState::Denied, "denied by an approver", now),
            Decision::Approve if self.approval_count() >= self.quorum => {
                self.state = TaskState::Approved;
            }
            Decision::Approve => {}
        }
        Ok(())
    }

    /// Cancels the task on behalf of its requester, before it runs.
    ///
    /// # Errors
    /// [`TaskError::Forbidden`] for anyone but the requester, [`TaskError::Precondition`] once the
    /// task has ended or started running.
    pub fn cancel(&mut self, by: &WorkloadId, now: SystemTime) -> Result<(), TaskError> {
        if by != &self.requester {
            return Err(TaskError::Forbidden(Forbidden::NotRequester));
        }
        if self.state.is_terminal() {
            return Err(TaskError::Precondition(Unmet::Ended(self.state)));
        }
        if self.started_at.is_some() {
            return Err(TaskError::Precondition(Unmet::Running));
        }
        self.end(TaskState::Cancelled, "cancelled by the requester", now);
        Ok(())
    }

    /// Ends an approved task on behalf of its executor or requester, with `outcome`. The store
    /// revokes every lease of the task in the same step.
    ///
    /// # Errors
    /// [`TaskError::Forbidden`] for anyone else; [`TaskError::Precondition`] for a task that is
    /// not approved (already ended, or never approved: cancel or deny it instead).
    pub fn complete(
        &mut self,
        by: &WorkloadId,
        outcome: Outcome,
        now: SystemTime,
    ) -> Result<(), TaskError> {
        if by != &self.executor && by != &self.requester {
            return Err(TaskError::Forbidden(Forbidden::NotParty));
        }
        if self.state != TaskState::Approved {
            return Err(TaskError::Precondition(Unmet::NothingToComplete(
                self.state,
            )));
        }
        let (state, reason) = outcome.ends_as(by);
        self.end(state, &reason, now);
        Ok(())
    }

    /// Ends a task that has not ended as revoked (an operator's force-revoke, a locked agent).
    /// Returns whether it changed.
    pub fn revoke(&mut self, reason: &str, now: SystemTime) -> bool {
        if self.state.is_terminal() {
            return false;
        }
        self.end(TaskState::Revoked, reason, now);
        true
    }

    /// Ends an open task whose deadline has passed as expired (the reaper).
    ///
    /// # Errors
    /// [`TaskError::Precondition`] when the task has ended or its deadline is still ahead.
    pub fn expire(&mut self, now: SystemTime) -> Result<(), TaskError> {
        if self.state.is_terminal() {
            return Err(TaskError::Precondition(Unmet::Ended(self.state)));
        }
        if now < self.deadline {
            return Err(TaskError::Precondition(Unmet::DeadlineAhead));
        }
        self.end(TaskState::Expired, "deadline passed", now);
        Ok(())
    }

    fn end(&mut self, state: TaskState, reason: &str, now: SystemTime) {
        self.state = state;
        self.ended_at = Some(now);
        self.updated_at = now;
        self.end_reason = Some(reason.to_owned());
    }
}

#[cfg(test)]
mod tests;
