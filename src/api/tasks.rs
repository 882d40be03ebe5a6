//! `taskcred.v1.TaskService`: thin handlers over [`Broker`] with the proto conversions.

use std::time::{Duration, SystemTime};

use tonic::{Request, Response, Status};

use super::auth::caller;
use super::error::status;
use super::pb;
use super::pb::task_service_server::TaskService;
use crate::broker::{Broker, ListRequest, RequestId};
use crate::identity::WorkloadId;
use crate::task::{Decision, Outcome, RawTaskRequest, Task, TaskId, TaskState};

/// The task service.
#[derive(Debug, Clone)]
pub struct TaskApi {
    broker: Broker,
    /// The largest message sent: a page of tasks is cut shorter to fit it.
    max_message_bytes: usize,
}

impl TaskApi {
    /// Serves `broker`'s use cases, with answers of at most `max_message_bytes`.
    pub fn new(broker: Broker, max_message_bytes: usize) -> Self {
        Self {
            broker,
            max_message_bytes,
        }
    }
}

fn invalid(field: &str, reason: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {reason}"))
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

fn optional_id(field: &str, s: &str) -> Result<Option<WorkloadId>, Status> {
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

/// The proto form of a task.
pub fn task_to_pb(t: Task) -> pb::Task {
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
    }
}

#[tonic::async_trait]
impl TaskService for TaskApi {
    async fn request_task(
        &self,
        request: Request<pb::RequestTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        let who = caller(&request)?.id.clone();
        let r = request.into_inner();
        let raw = RawTaskRequest {
            executor: r.executor,
            purpose: r.purpose,
            grants: r
                .grants
                .into_iter()
                .map(|g| (g.audience, g.actions))
                .collect(),
            labels: r.labels.into_iter().collect(),
            deadline_in: duration("deadline", r.deadline)?,
            credential_ttl: duration("credential_ttl", r.credential_ttl)?,
            parent: Some(r.parent_id),
        };
        let task = self.broker.request_task(&who, raw).await.map_err(status)?;
        Ok(Response::new(task_to_pb(task)))
    }

    async fn get_task(
        &self,
        request: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        let who = caller(&request)?.id.clone();
        let id = task_id(&request.get_ref().task_id)?;
        let task = self.broker.get_task(&who, &id).await.map_err(status)?;
        Ok(Response::new(task_to_pb(task)))
    }

    async fn list_tasks(
        &self,
        request: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        let who = caller(&request)?.id.clone();
        let r = request.into_inner();
        let list = ListRequest {
            state: state_from_pb(r.state)?,
            executor: optional_id("executor", &r.executor)?,
            requester: optional_id("requester", &r.requester)?,
            page_size: (r.page_size > 0).then_some(r.page_size as usize),
            page_token: (!r.page_token.is_empty()).then_some(r.page_token),
        };
        let page = self.broker.list_tasks(&who, list).await.map_err(status)?;
        let mut next_page_token = page.next_page_token;
        let ids: Vec<TaskId> = page.tasks.iter().map(|t| t.id).collect();
        let mut tasks: Vec<pb::Task> = page.tasks.into_iter().map(task_to_pb).collect();
        // Cut the page where it outgrows the message limit (a task can be large: purpose,
        // grants, labels, notes); the next page starts after the last task kept.
        let budget = self
            .max_message_bytes
            .saturating_sub(super::admin::ENVELOPE);
        let keep =
            super::admin::fitting(tasks.iter().map(prost::Message::encoded_len), budget).max(1);
        if keep < tasks.len() {
            tasks.truncate(keep);
            next_page_token = Some(
                self.broker
                    .page_token_after(&who, ids[keep - 1])
                    .await
                    .map_err(status)?,
            );
        }
        Ok(Response::new(pb::ListTasksResponse {
            tasks,
            next_page_token: next_page_token.unwrap_or_default(),
        }))
    }

    async fn approve_task(
        &self,
        request: Request<pb::DecideTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        self.decide(request, Decision::Approve).await
    }

    async fn deny_task(
        &self,
        request: Request<pb::DecideTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        self.decide(request, Decision::Deny).await
    }

    async fn complete_task(
        &self,
        request: Request<pb::CompleteTaskRequest>,
    ) -> Result<Response<pb::CompleteTaskResponse>, Status> {
        self.complete(request).await
    }

    async fn revoke_task(
        &self,
        request: Request<pb::RevokeTaskRequest>,
    ) -> Result<Response<pb::CompleteTaskResponse>, Status> {
        let who = caller(&request)?.id.clone();
        let r = request.get_ref();
        let id = task_id(&r.task_id)?;
        let (task, leases) = self
            .broker
            .revoke_task(&who, &id, &r.reason)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::CompleteTaskResponse {
            task: Some(task_to_pb(task)),
            revoked_leases: u32::try_from(leases.len()).unwrap_or(u32::MAX),
        }))
    }

    async fn cancel_task(
        &self,
        request: Request<pb::CancelTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        let who = caller(&request)?.id.clone();
        let id = task_id(&request.get_ref().task_id)?;
        let task = self.broker.cancel_task(&who, &id).await.map_err(status)?;
        Ok(Response::new(task_to_pb(task)))
    }
}

impl TaskApi {
    async fn complete(
        &self,
        request: Request<pb::CompleteTaskRequest>,
    ) -> Result<Response<pb::CompleteTaskResponse>, Status> {
        let who = caller(&request)?.id.clone();
        let r = request.into_inner();
        let id = task_id(&r.task_id)?;
        let outcome = outcome_from_pb(r.outcome)?;
        let request_id = RequestId::parse(&r.request_id).map_err(status)?;
        let (task, revoked) = self
            .broker
            .complete_task(&who, &id, outcome, request_id.as_ref())
            .await
            .map_err(status)?;
        Ok(Response::new(pb::CompleteTaskResponse {
            task: Some(task_to_pb(task)),
            revoked_leases: u32::try_from(revoked).unwrap_or(u32::MAX),
        }))
    }

    async fn decide(
        &self,
        request: Request<pb::DecideTaskRequest>,
        decision: Decision,
    ) -> Result<Response<pb::Task>, Status> {
        let who = caller(&request)?.id.clone();
        let r = request.into_inner();
        let id = task_id(&r.task_id)?;
        let task = self
            .broker
            .decide(&who, &id, decision, r.note)
            .await
            .map_err(status)?;
        Ok(Response::new(task_to_pb(task)))
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
