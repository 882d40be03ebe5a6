//! Proto conversions at the edge: `TryFrom` a request message into what a use case takes (the
//! error is the `INVALID_ARGUMENT` naming the field), `From` a use case's answer into the
//! response message. Handlers are then a few lines each.

use std::time::{Duration, SystemTime};

use tonic::Status;

use super::pb;
use crate::broker::{
    IssuedCertificate, IssuedToken, ListRequest, Renewed, RequestId, TokenRequest,
};
use crate::identity::WorkloadId;
use crate::lease::{Lease, LeaseId, Lock};
use crate::task::{Decision, Outcome, RawTaskRequest, Task, TaskId, TaskState};

/// `INVALID_ARGUMENT` for `field`, with the reason `INVALID_FIELD` and the field in its
/// `ErrorInfo` (as the use cases' own refusals of a field).
pub(super) fn invalid(field: &str, reason: impl std::fmt::Display) -> Status {
    super::error::with_reason(
        &Status::invalid_argument(format!("{field}: {reason}")),
        "INVALID_FIELD",
        std::collections::HashMap::from([("field".to_owned(), field.to_owned())]),
    )
}

/// A `google.protobuf.Duration` as its specification defines one, refused otherwise (never
/// normalized): nanos within ±999,999,999 and of the sign of the seconds, seconds within
/// ±315,576,000,000 (10,000 years); and, for the broker, not negative.
///
/// # Errors
/// `INVALID_ARGUMENT` naming `field` and the rule broken.
pub(super) fn duration(
    field: &str,
    d: Option<prost_types::Duration>,
) -> Result<Option<Duration>, Status> {
    d.map(|d| strict_duration(&d).map_err(|why| invalid(field, why)))
        .transpose()
}

/// Largest `seconds` of a valid `google.protobuf.Duration`.
const MAX_DURATION_SECONDS: i64 = 315_576_000_000;

fn strict_duration(d: &prost_types::Duration) -> Result<Duration, &'static str> {
    if !(-999_999_999..=999_999_999).contains(&d.nanos) {
        return Err("not a valid Duration: nanos must be within -999999999..=999999999");
    }
    if !(-MAX_DURATION_SECONDS..=MAX_DURATION_SECONDS).contains(&d.seconds) {
        return Err("not a valid Duration: seconds out of range");
    }
    if (d.seconds > 0 && d.nanos < 0) || (d.seconds < 0 && d.nanos > 0) {
        return Err("not a valid Duration: seconds and nanos have opposite signs");
    }
    match (u64::try_from(d.seconds), u32::try_from(d.nanos)) {
        (Ok(secs), Ok(nanos)) => Ok(Duration::new(secs, nanos)),
        _ => Err("must not be negative"),
    }
}

pub(super) fn task_id(s: &str) -> Result<TaskId, Status> {
    TaskId::parse(s).map_err(|_| invalid("task_id", "not a task id (a lowercase UUIDv7)"))
}

pub(super) fn optional_id(field: &str, s: &str) -> Result<Option<WorkloadId>, Status> {
    if s.is_empty() {
        return Ok(None);
    }
    WorkloadId::parse(s)
        .map(Some)
        .map_err(|e| invalid(field, e))
}

/// The proto state of a domain state.
pub fn state_to_pb(s: TaskState) -> pb::TaskState {
    match s {
        TaskState::PendingApproval => pb::TaskState::PendingApproval,
        TaskState::Approved => pb::TaskState::Approved,
        TaskState::Denied => pb::TaskState::Denied,
        TaskState::Completed => pb::TaskState::Completed,
        TaskState::Failed => pb::TaskState::Failed,
        TaskState::Cancelled => pb::TaskState::Cancelled,
        TaskState::Expired => pb::TaskState::Expired,
        TaskState::Revoked => pb::TaskState::Revoked,
    }
}

/// The domain state of a proto state (`None` for unspecified).
///
/// # Errors
/// `INVALID_ARGUMENT` for a value outside the enum.
pub fn state_from_pb(v: i32) -> Result<Option<TaskState>, Status> {
    Ok(
        match pb::TaskState::try_from(v).map_err(|_| invalid("state", "unknown state"))? {
            pb::TaskState::Unspecified => None,
            pb::TaskState::PendingApproval => Some(TaskState::PendingApproval),
            pb::TaskState::Approved => Some(TaskState::Approved),
            pb::TaskState::Denied => Some(TaskState::Denied),
            pb::TaskState::Completed => Some(TaskState::Completed),
            pb::TaskState::Failed => Some(TaskState::Failed),
            pb::TaskState::Cancelled => Some(TaskState::Cancelled),
            pb::TaskState::Expired => Some(TaskState::Expired),
            pb::TaskState::Revoked => Some(TaskState::Revoked),
        },
    )
}

/// The outcome of a completion; unspecified means succeeded.
pub(super) fn outcome_from_pb(outcome: i32) -> Result<Outcome, Status> {
    Ok(
        match pb::Outcome::try_from(outcome).map_err(|_| invalid("outcome", "unknown outcome"))? {
            pb::Outcome::Unspecified | pb::Outcome::Succeeded => Outcome::Succeeded,
            pb::Outcome::Failed => Outcome::Failed,
            pb::Outcome::Cancelled => Outcome::Cancelled,
        },
    )
}

pub(super) fn ts(t: SystemTime) -> Option<prost_types::Timestamp> {
    Some(t.into())
}

impl From<Task> for pb::Task {
    fn from(t: Task) -> Self {
        let (root_id, depth) = (t.root_id().to_string(), t.depth());
        pb::Task {
            id: t.id.to_string(),
            executor: t.executor.to_string(),
            requester: t.requester.to_string(),
            purpose: t.purpose,
            grants: t
                .grants
                .iter()
                .map(|g| pb::Grant {
                    audience: g.audience.to_string(),
                    actions: g.actions.iter().map(ToString::to_string).collect(),
                })
                .collect(),
            labels: t
                .labels
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            credential_ttl: prost_types::Duration::try_from(t.credential_ttl).ok(),
            deadline: ts(t.deadline),
            parent_id: t.parent.map(|p| p.to_string()).unwrap_or_default(),
            state: state_to_pb(t.state).into(),
            quorum: t.quorum,
            approvals: t
                .approvals
                .into_iter()
                .map(|a| pb::Approval {
                    id: a.id,
                    approver: a.approver.to_string(),
                    decision: match a.decision {
                        Decision::Approve => pb::Decision::Approve,
                        Decision::Deny => pb::Decision::Deny,
                    }
                    .into(),
                    decided_at: ts(a.at),
                    note: a.note,
                })
                .collect(),
            request_policies: t.request_policies,
            created_at: ts(t.created_at),
            updated_at: ts(t.updated_at),
            started_at: t.started_at.and_then(ts),
            ended_at: t.ended_at.and_then(ts),
            end_reason: t.end_reason.unwrap_or_default(),
            root_id,
            depth: u32::try_from(depth).unwrap_or(u32::MAX),
            chain: t
                .delegation
                .iter()
                .flat_map(|d| d.chain.iter().map(ToString::to_string))
                .collect(),
            children: t.children.iter().map(ToString::to_string).collect(),
        }
    }
}

pub(super) fn agent(s: &str) -> Result<WorkloadId, Status> {
    WorkloadId::parse(s).map_err(|e| invalid("agent", e))
}

impl From<Lock> for pb::Lock {
    fn from(l: Lock) -> Self {
        pb::Lock {
            agent: l.agent.to_string(),
            reason: l.reason,
            operator: l.operator.to_string(),
            locked_at: ts(l.at),
            until: l.until.and_then(ts),
        }
    }
}

impl From<Lease> for pb::Lease {
    fn from(l: Lease) -> Self {
        pb::Lease {
            lease_id: l.id.to_string(),
            task_id: l.task.to_string(),
            agent: l.agent.to_string(),
            kind: l.kind.as_str().into(),
            credential_id: l.credential,
            audience: l.audience.unwrap_or_default(),
            actions: l.actions,
            state: l.state.as_str().into(),
            issued_at: ts(l.issued_at),
            expires_at: ts(l.expires_at),
            renew_until: ts(l.renew_until),
            ended_at: l.ended_at.and_then(ts),
            reason: l.reason.unwrap_or_default(),
        }
    }
}

pub(super) fn ttl(d: Option<prost_types::Duration>) -> Result<Option<Duration>, Status> {
    duration("ttl", d)
}

pub(super) fn lease_id(s: &str) -> Result<LeaseId, Status> {
    LeaseId::parse(s).map_err(|_| {
        invalid(
            "lease_id",
            "not a lease id (<task id>.<16 lowercase hex digits>)",
        )
    })
}

/// The lifetime a lease's credential was granted: the lease's expiry less its issue time.
fn granted(lease: &crate::lease::Lease) -> Option<prost_types::Duration> {
    let d = lease
        .expires_at
        .duration_since(lease.issued_at)
        .unwrap_or_default();
    prost_types::Duration::try_from(d).ok()
}

impl TryFrom<pb::RequestTaskRequest> for RawTaskRequest {
    type Error = Status;

    fn try_from(r: pb::RequestTaskRequest) -> Result<Self, Status> {
        if !r.parent_id.is_empty() {
            return Err(invalid(
                "parent_id",
                "a child task is made with DelegateTask, by the parent task's executor",
            ));
        }
        Ok(Self {
            executor: r.executor,
            purpose: r.purpose,
            grants: grants(r.grants),
            labels: r.labels.into_iter().collect(),
            deadline_in: duration("deadline", r.deadline)?,
            credential_ttl: duration("credential_ttl", r.credential_ttl)?,
        })
    }
}

/// The (audience, actions) pairs of the grants asked for, checked later by `TaskRequest::parse`.
fn grants(grants: Vec<pb::Grant>) -> Vec<(String, Vec<String>)> {
    grants
        .into_iter()
        .map(|g| (g.audience, g.actions))
        .collect()
}

/// The parent and the child asked for of a `DelegateTask` request.
pub(super) fn delegation(r: pb::DelegateTaskRequest) -> Result<(TaskId, RawTaskRequest), Status> {
    let parent = TaskId::parse(&r.parent_id)
        .map_err(|_| invalid("parent_id", "not a task id (a lowercase UUIDv7)"))?;
    Ok((
        parent,
        RawTaskRequest {
            executor: r.executor,
            purpose: r.purpose,
            grants: grants(r.grants),
            labels: r.labels.into_iter().collect(),
            deadline_in: duration("deadline", r.deadline)?,
            credential_ttl: duration("credential_ttl", r.credential_ttl)?,
        },
    ))
}

impl TryFrom<pb::ListTasksRequest> for ListRequest {
    type Error = Status;

    fn try_from(r: pb::ListTasksRequest) -> Result<Self, Status> {
        Ok(Self {
            state: state_from_pb(r.state)?,
            executor: optional_id("executor", &r.executor)?,
            requester: optional_id("requester", &r.requester)?,
            page_size: (r.page_size > 0).then_some(r.page_size as usize),
            page_token: (!r.page_token.is_empty()).then_some(r.page_token),
        })
    }
}

impl TryFrom<pb::IssueTokenRequest> for TokenRequest {
    type Error = Status;

    fn try_from(r: pb::IssueTokenRequest) -> Result<Self, Status> {
        Ok(Self {
            task: task_id(&r.task_id)?,
            ttl: ttl(r.ttl)?,
            request_id: request_id(&r.request_id)?,
            audience: r.audience,
            actions: r.actions,
        })
    }
}

/// An optional request id (`""` for none).
///
/// # Errors
/// `INVALID_ARGUMENT` for one out of bounds.
pub(super) fn request_id(s: &str) -> Result<Option<RequestId>, Status> {
    RequestId::parse(s).map_err(Status::from)
}

/// What an issuance answer says of the lease behind its credential: the lease id, the
/// credential's id (`jti` or serial), when it expires and the lifetime granted.
pub(super) type LeaseFields = (
    String,
    String,
    Option<prost_types::Timestamp>,
    Option<prost_types::Duration>,
);

pub(super) fn lease_fields(lease: Lease) -> LeaseFields {
    let (expires_at, ttl) = (ts(lease.expires_at), granted(&lease));
    (lease.id.to_string(), lease.credential, expires_at, ttl)
}

impl From<IssuedToken> for pb::IssueTokenResponse {
    fn from(issued: IssuedToken) -> Self {
        let (lease_id, jti, expires_at, ttl) = lease_fields(issued.lease);
        Self {
            token: issued.token,
            lease_id,
            jti,
            expires_at,
            ttl,
        }
    }
}

impl From<IssuedCertificate> for pb::IssueCertificateResponse {
    fn from(issued: IssuedCertificate) -> Self {
        let (lease_id, serial, expires_at, ttl) = lease_fields(issued.lease);
        Self {
            certificate_pem: issued.certificate_pem,
            chain_pem: issued.chain_pem,
            lease_id,
            serial,
            expires_at,
            ttl,
        }
    }
}

impl From<Renewed> for pb::RenewLeaseResponse {
    fn from(renewed: Renewed) -> Self {
        let (token, certificate_pem, chain_pem) = match renewed.credential {
            crate::broker::Credential::Token(t) => (t, String::new(), String::new()),
            crate::broker::Credential::Certificate {
                certificate_pem,
                chain_pem,
            } => (String::new(), certificate_pem, chain_pem),
        };
        Self {
            expires_at: ts(renewed.lease.expires_at),
            lease_id: renewed.lease.id.to_string(),
            credential_id: renewed.lease.credential,
            ttl: prost_types::Duration::try_from(renewed.ttl).ok(),
            renewal_left: prost_types::Duration::try_from(renewed.renewal_left).ok(),
            token,
            certificate_pem,
            chain_pem,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn d(seconds: i64, nanos: i32) -> Option<prost_types::Duration> {
        Some(prost_types::Duration { seconds, nanos })
    }

    #[test]
    fn durations_are_refused_not_normalized() {
        assert_eq!(
            duration("ttl", d(60, 500)).unwrap(),
            Some(Duration::new(60, 500))
        );
        assert_eq!(duration("ttl", d(0, 0)).unwrap(), Some(Duration::ZERO));
        assert_eq!(duration("ttl", None).unwrap(), None);
        for (defect, bad) in [
            ("nanos over a second", d(1, 1_000_000_000)),
            ("nanos far over", d(0, i32::MAX)),
            ("nanos under", d(0, -1_000_000_000)),
            ("opposite signs", d(5, -1)),
            ("opposite signs, negative seconds", d(-5, 1)),
            ("negative", d(-1, 0)),
            ("negative nanos", d(0, -1)),
            ("seconds past 10000 years", d(315_576_000_001, 0)),
            ("seconds at i64::MAX", d(i64::MAX, 0)),
        ] {
            let e = duration("ttl", bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{defect}");
            assert!(
                e.message().starts_with("ttl: "),
                "{defect}: {}",
                e.message()
            );
        }
    }
}
