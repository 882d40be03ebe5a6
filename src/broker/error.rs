//! Why a use case refused or failed: [`BrokerError`], and what the store's and the task rules'
//! errors become. The one mapping to gRPC statuses lives in `api::error`.

use std::time::Duration;

use super::revocations::MAX_WATCHES_PER_IDENTITY;
use crate::ci::CiError;
use crate::lease::{Cursor, LeaseId};
use crate::policy::PolicyAction;
use crate::store::{IssueError, StoreError, UpdateError};
use crate::task::{Forbidden, TaskError, TaskId, Unmet};

/// Why a use case refused or failed. One mapping to gRPC statuses lives in `api`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// An input field is out of bounds (`INVALID_ARGUMENT`).
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Policy or separation of duties refuses (`PERMISSION_DENIED`).
    #[error("{0}")]
    Denied(Denial),
    /// No such task, lease... (`NOT_FOUND`).
    #[error("{0}")]
    NotFound(Missing),
    /// The task's state, or the broker's, does not allow it (`FAILED_PRECONDITION`).
    #[error("{0}")]
    Precondition(Precondition),
    /// The store cannot be reached (`UNAVAILABLE`); nothing was changed.
    #[error("store unavailable")]
    Unavailable(String),
    /// The task changed between the issuance's decision and its record; nothing was issued.
    /// The broker decides once more on the task as it is; this reaches a caller only when the
    /// task changed again meanwhile (`UNAVAILABLE`: retry).
    #[error("the task changed while the credential was being issued; nothing was issued, retry")]
    TaskChanged,
    /// The store did not answer a change it was sent (`UNAVAILABLE`, said so): it may have
    /// been made. A retry with the same request id is safe.
    #[error("outcome unknown")]
    OutcomeUnknown(String),
    /// The audit log cannot be written and is required (`audit.required`): the decision is not
    /// made (`UNAVAILABLE`); nothing was changed.
    #[error("the audit log cannot be written")]
    AuditFailed(String),
    /// A limit of this broker is reached (`RESOURCE_EXHAUSTED`); retry later.
    #[error("{0}")]
    Exhausted(Exhaustion),
    /// A position the caller gave is not one the broker holds (`OUT_OF_RANGE`).
    #[error(
        "after: cursor {after} is past the end of the revocation log ({head}); resume from an \
         earlier cursor, or start over without one"
    )]
    OutOfRange {
        /// The cursor given.
        after: Cursor,
        /// The last entry of the log.
        head: Cursor,
    },
    /// The proof of identity is refused (`UNAUTHENTICATED`): a CI ID token that fails a check.
    #[error("{0}")]
    Unauthenticated(CiError),
    /// The caller's certificate expired during a long call (a revocation watch): its identity
    /// is no longer honoured (`UNAUTHENTICATED`).
    #[error("the client certificate expired; reconnect with a fresh one")]
    CertificateExpired,
    /// The caller went over its issuance rate (`RESOURCE_EXHAUSTED`, with when to retry).
    #[error("issuance rate limit reached; retry in {} ms", .0.as_millis().max(1))]
    RateLimited(Duration),
    /// A task ended, but the tasks delegated below it could not all be ended yet (the store
    /// failed half way): `UNAVAILABLE`, saying so; the reaper ends the rest.
    #[error("{0}")]
    Incomplete(String),
    /// The task awaits approvals (`FAILED_PRECONDITION`, naming the task).
    #[error("task {0} is pending approval; retry once it is approved")]
    Pending(TaskId),
    /// Something that should not happen (`INTERNAL`); details are logged, not returned.
    #[error("internal error")]
    Internal(String),
}

/// What a `NOT_FOUND` did not find.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Missing {
    /// No task has the id.
    #[error("no such task")]
    Task,
    /// No lease has the id.
    #[error("no such lease")]
    Lease,
    /// No published signing key has the kid.
    #[error("no published signing key has that kid")]
    Key,
    /// The CI job has no task: it never exchanged an ID token.
    #[error("no task for this job: it has not exchanged an ID token")]
    CiTask,
}

/// Which limit of this broker is reached (`RESOURCE_EXHAUSTED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Exhaustion {
    /// The caller holds its share of revocation watches on this replica.
    #[error("this identity has {MAX_WATCHES_PER_IDENTITY} revocation watches open")]
    WatchesOfIdentity,
    /// This replica holds all the revocation watches it serves.
    #[error("too many revocation watches open")]
    Watches,
}

/// Why a caller is refused (`PERMISSION_DENIED`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Denial {
    /// Policy does not permit the action here.
    #[error("policy does not permit {} here", .0.name())]
    Policy(PolicyAction),
    /// The task rules forbid it, whatever policy says (separation of duties).
    #[error("{0}")]
    Rule(Forbidden),
    /// A CI job's credentials come from its ID token alone.
    #[error("a CI job's credentials come only from ExchangeCiToken, with its ID token")]
    CiOnlyByExchange,
    /// The audience asked for is not one the task grants.
    #[error("audience {0} is not granted by the task")]
    AudienceNotGranted(String),
    /// An action asked for is not granted for the audience.
    #[error("action {action} is not granted for {audience}")]
    ActionNotGranted {
        /// The action.
        action: String,
        /// The audience.
        audience: String,
    },
    /// The agent is locked (force-revoked), with the operator's reason.
    #[error("agent is locked: {0}")]
    Locked(String),
    /// The CI job's identity is locked, with the operator's reason.
    #[error("the job's identity is locked: {0}")]
    CiIdentityLocked(String),
    /// The ID token was exchanged already for the audience: a replay.
    #[error("this ID token was already exchanged for {0}: ask the CI provider for a new one")]
    Replayed(String),
    /// A CI job's first exchange fixed its task's grants (listed).
    #[error("the job's task grants {0}; a job's first exchange fixes its grants")]
    CiGrantsFixed(String),
    /// Only the lease's agent renews it.
    #[error("only the lease's agent may renew it")]
    NotLeaseAgent,
    /// A delegation would give the child more than its parent holds.
    #[error("a delegation may only narrow: {0}")]
    Widens(String),
}

impl Denial {
    /// The stable, machine-readable reason (`google.rpc.ErrorInfo.reason`).
    pub const fn reason(&self) -> &'static str {
        match self {
            Self::Policy(_) => "POLICY_DENIED",
            Self::Rule(f) => f.reason(),
            Self::CiOnlyByExchange => "CI_ONLY_BY_EXCHANGE",
            Self::AudienceNotGranted(_) => "AUDIENCE_NOT_GRANTED",
            Self::ActionNotGranted { .. } => "ACTION_NOT_GRANTED",
            Self::Locked(_) => "AGENT_LOCKED",
            Self::CiIdentityLocked(_) => "CI_IDENTITY_LOCKED",
            Self::Replayed(_) => "ID_TOKEN_REPLAYED",
            Self::CiGrantsFixed(_) => "CI_GRANTS_FIXED",
            Self::NotLeaseAgent => "NOT_THE_LEASE_AGENT",
            Self::Widens(_) => "DELEGATION_WIDENS",
        }
    }
}

/// What the state of a task, a lease or the broker does not allow (`FAILED_PRECONDITION`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Precondition {
    /// The task's or the lease's state (the task rules).
    #[error("{0}")]
    Task(Unmet),
    /// No issuing CA is configured: no certificates.
    #[error("this broker has no issuing CA configured (issuer.ca_cert)")]
    NoIssuingCa,
    /// No CI issuer is configured: no CI exchange.
    #[error("this broker trusts no CI issuer (configure [[ci.issuers]])")]
    NoCiIssuer,
    /// Less than a second is left before the task's deadline.
    #[error("less than a second remains before the task's deadline")]
    DeadlineTooClose,
    /// The ID token expires within a second.
    #[error("the ID token expires in less than a second")]
    IdTokenExpiring,
    /// The lease's renewal ceiling is reached.
    #[error("the lease's renewal ceiling is reached")]
    RenewalCeilingReached,
    /// The lifetime asked for would pass the lease's renewal ceiling.
    #[error("a {asked}s credential would pass the lease's renewal ceiling: {left}s left")]
    PastRenewalCeiling {
        /// Seconds asked.
        asked: u64,
        /// Seconds left.
        left: u64,
    },
    /// A lease with this id exists (a retry recorded it).
    #[error("a lease with this id exists")]
    LeaseExists,
    /// The lease a request id issued is gone (pruned).
    #[error("this request_id issued lease {0}, which is gone; use a new request_id")]
    RequestLeaseGone(LeaseId),
    /// The lease a request id issued has ended.
    #[error("this request_id issued lease {lease}, which has ended ({why}); use a new request_id")]
    RequestLeaseEnded {
        /// The lease.
        lease: LeaseId,
        /// Why it ended.
        why: String,
    },
    /// A retried certificate request: a serial is never signed twice.
    #[error(
        "this request_id already issued lease {lease} (serial {serial}); renew that lease \
         (RenewLease) for a certificate"
    )]
    CertificateIssued {
        /// The lease.
        lease: LeaseId,
        /// Its certificate's serial.
        serial: String,
    },
    /// The policy set asked for is invalid; the one in force stays.
    #[error("policy set refused, the policies in force stay: {0}")]
    PolicySetRefused(String),
    /// The key asked to be revoked is the one this replica signs with.
    #[error(
        "this replica signs with that key: rotate it first (`taskcred key rotate`), then \
         revoke it"
    )]
    KeyInUse,
}

impl Precondition {
    /// The stable, machine-readable reason (`google.rpc.ErrorInfo.reason`).
    pub const fn reason(&self) -> &'static str {
        match self {
            Self::Task(u) => u.reason(),
            Self::NoIssuingCa => "NO_ISSUING_CA",
            Self::NoCiIssuer => "NO_CI_ISSUER",
            Self::DeadlineTooClose => "TASK_DEADLINE_TOO_CLOSE",
            Self::IdTokenExpiring => "ID_TOKEN_EXPIRING",
            Self::RenewalCeilingReached | Self::PastRenewalCeiling { .. } => "RENEWAL_CEILING",
            Self::LeaseExists => "LEASE_EXISTS",
            Self::RequestLeaseGone(_) | Self::RequestLeaseEnded { .. } => "REQUEST_ID_SPENT",
            Self::CertificateIssued { .. } => "CERTIFICATE_ISSUED_FOR_REQUEST_ID",
            Self::PolicySetRefused(_) => "POLICY_SET_REFUSED",
            Self::KeyInUse => "KEY_IN_USE",
        }
    }
}

impl BrokerError {
    /// The stable, machine-readable reason of the refusal (`google.rpc.ErrorInfo.reason` in the
    /// status details): what clients switch on, where the message is for people.
    pub const fn reason(&self) -> &'static str {
        match self {
            Self::Invalid { .. } => "INVALID_FIELD",
            Self::Denied(d) => d.reason(),
            Self::NotFound(m) => m.reason(),
            Self::Precondition(p) => p.reason(),
            Self::Unavailable(_) => "STORE_UNAVAILABLE",
            Self::TaskChanged => "TASK_CHANGED",
            Self::OutcomeUnknown(_) => "OUTCOME_UNKNOWN",
            Self::AuditFailed(_) => "AUDIT_UNWRITABLE",
            Self::Exhausted(_) => "WATCH_LIMIT_REACHED",
            Self::OutOfRange { .. } => "CURSOR_OUT_OF_RANGE",
            Self::Unauthenticated(_) => "ID_TOKEN_REFUSED",
            Self::CertificateExpired => "CERTIFICATE_EXPIRED",
            Self::RateLimited(_) => "RATE_LIMITED",
            Self::Pending(_) => "TASK_PENDING_APPROVAL",
            Self::Incomplete(_) => "CASCADE_PENDING",
            Self::Internal(_) => "INTERNAL",
        }
    }
}

impl Missing {
    /// The stable, machine-readable reason (`google.rpc.ErrorInfo.reason`).
    pub const fn reason(self) -> &'static str {
        match self {
            Self::Task => "TASK_NOT_FOUND",
            Self::Lease => "LEASE_NOT_FOUND",
            Self::Key => "KEY_NOT_FOUND",
            Self::CiTask => "CI_TASK_NOT_FOUND",
        }
    }
}

impl From<TaskError> for BrokerError {
    fn from(e: TaskError) -> Self {
        match e {
            TaskError::Invalid { field, reason } => Self::Invalid { field, reason },
            TaskError::Forbidden(f) => Self::Denied(Denial::Rule(f)),
            TaskError::Precondition(u) => Self::Precondition(Precondition::Task(u)),
            TaskError::Widens(what) => Self::Denied(Denial::Widens(what)),
        }
    }
}

impl From<StoreError> for BrokerError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(m) => Self::Unavailable(m),
            StoreError::OutcomeUnknown(m) => Self::OutcomeUnknown(m),
            StoreError::Contention(id) => {
                Self::Unavailable(format!("contention on task {id}; retry"))
            }
            StoreError::Locked(reason) => Self::Denied(Denial::Locked(reason)),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<IssueError> for BrokerError {
    fn from(e: IssueError) -> Self {
        match e {
            IssueError::NotFound => Self::NotFound(Missing::Task),
            IssueError::Refused(t) => t.into(),
            IssueError::Locked(reason) => Self::Denied(Denial::Locked(reason)),
            IssueError::StoreReset => Self::Unavailable(
                "the store was reset (its data lost): nothing was issued; a new store epoch \
                 began"
                    .into(),
            ),
            IssueError::Exists => Self::Precondition(Precondition::LeaseExists),
            IssueError::Changed(_) => Self::TaskChanged,
            IssueError::Store(s) => s.into(),
        }
    }
}

impl From<UpdateError> for BrokerError {
    fn from(e: UpdateError) -> Self {
        match e {
            UpdateError::NotFound => Self::NotFound(Missing::Task),
            UpdateError::Rejected(t) => t.into(),
            UpdateError::Store(s) => s.into(),
        }
    }
}

/// The refusal of a CSR.
pub(super) fn csr_error(e: crate::mint::CsrError) -> BrokerError {
    BrokerError::Invalid {
        field: "csr",
        reason: e.to_string(),
    }
}
