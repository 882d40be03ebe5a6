//! `taskcred.v1.TaskService`: thin handlers over [`Broker`] with the proto conversions.

use tonic::{Request, Response};

use super::Reply;
use super::auth::{caller_and_message, caller_id};
use super::convert::{outcome_from_pb, request_id, task_id};
use super::pb;
use super::pb::task_service_server::TaskService;
use super::pb::{
    CancelTaskRequest, CompleteTaskRequest, CompleteTaskResponse, DecideTaskRequest,
    DelegateTaskRequest, GetTaskRequest, GetTaskTreeRequest, GetTaskTreeResponse, ListTasksRequest,
    ListTasksResponse, RequestTaskRequest, RevokeTaskRequest,
};
use crate::broker::{Broker, ListRequest};
use crate::task::{Decision, RawTaskRequest, TaskId};

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

#[tonic::async_trait]
impl TaskService for TaskApi {
    async fn request_task(&self, request: Request<RequestTaskRequest>) -> Reply<pb::Task> {
        let who = caller_id(&request)?;
        let raw = RawTaskRequest::try_from(request.into_inner())?;
        let task = self.broker.request_task(&who, raw).await?;
        Ok(Response::new(pb::Task::from(task)))
    }

    async fn get_task(&self, request: Request<GetTaskRequest>) -> Reply<pb::Task> {
        let who = caller_id(&request)?;
        let id = task_id(&request.get_ref().task_id)?;
        let task = self.broker.get_task(&who, &id).await?;
        Ok(Response::new(pb::Task::from(task)))
    }

    async fn list_tasks(&self, request: Request<ListTasksRequest>) -> Reply<ListTasksResponse> {
        let who = caller_id(&request)?;
        let list = ListRequest::try_from(request.into_inner())?;
        let page = self.broker.list_tasks(&who, list).await?;
        let mut next_page_token = page.next_page_token;
        let ids: Vec<TaskId> = page.tasks.iter().map(|t| t.id).collect();
        let mut tasks: Vec<pb::Task> = page.tasks.into_iter().map(pb::Task::from).collect();
        // Cut the page where it outgrows the message limit (a task can be large: purpose,
        // grants, labels, notes); the next page starts after the last task kept.
        let budget = self
            .max_message_bytes
            .saturating_sub(super::admin::ENVELOPE);
        let keep =
            super::admin::fitting(tasks.iter().map(prost::Message::encoded_len), budget).max(1);
        if keep < tasks.len() {
            tasks.truncate(keep);
            next_page_token = Some(self.broker.page_token_after(&who, ids[keep - 1]).await?);
        }
        Ok(Response::new(ListTasksResponse {
            tasks,
            next_page_token: next_page_token.unwrap_or_default(),
        }))
    }

    async fn approve_task(&self, request: Request<DecideTaskRequest>) -> Reply<pb::Task> {
        self.decide(request, Decision::Approve).await
    }

    async fn deny_task(&self, request: Request<DecideTaskRequest>) -> Reply<pb::Task> {
        self.decide(request, Decision::Deny).await
    }

    async fn complete_task(
        &self,
        request: Request<CompleteTaskRequest>,
    ) -> Reply<CompleteTaskResponse> {
        self.complete(request).await
    }

    async fn revoke_task(
        &self,
        request: Request<RevokeTaskRequest>,
    ) -> Reply<CompleteTaskResponse> {
        let (who, r) = caller_and_message(request)?;
        let id = task_id(&r.task_id)?;
        let (task, leases) = self.broker.revoke_task(&who, &id, &r.reason).await?;
        Ok(Response::new(CompleteTaskResponse {
            task: Some(pb::Task::from(task)),
            revoked_leases: u32::try_from(leases.len()).unwrap_or(u32::MAX),
        }))
    }

    async fn delegate_task(&self, request: Request<DelegateTaskRequest>) -> Reply<pb::Task> {
        let (who, r) = caller_and_message(request)?;
        let (parent, raw) = super::convert::delegation(r)?;
        let task = self.broker.delegate_task(&who, &parent, raw).await?;
        Ok(Response::new(pb::Task::from(task)))
    }

    async fn get_task_tree(
        &self,
        request: Request<GetTaskTreeRequest>,
    ) -> Reply<GetTaskTreeResponse> {
        let who = caller_id(&request)?;
        let id = task_id(&request.get_ref().task_id)?;
        let tree = self.broker.task_tree(&who, &id).await?;
        let mut tasks: Vec<pb::Task> = tree.tasks.into_iter().map(pb::Task::from).collect();
        // Cut where the tree outgrows the message limit (the task asked for always stays).
        let budget = self
            .max_message_bytes
            .saturating_sub(super::admin::ENVELOPE);
        let keep =
            super::admin::fitting(tasks.iter().map(prost::Message::encoded_len), budget).max(1);
        let truncated = keep < tasks.len();
        tasks.truncate(keep);
        Ok(Response::new(GetTaskTreeResponse {
            tasks,
            hidden: u32::try_from(tree.hidden).unwrap_or(u32::MAX),
            truncated,
        }))
    }

    async fn cancel_task(&self, request: Request<CancelTaskRequest>) -> Reply<pb::Task> {
        let who = caller_id(&request)?;
        let id = task_id(&request.get_ref().task_id)?;
        let task = self.broker.cancel_task(&who, &id).await?;
        Ok(Response::new(pb::Task::from(task)))
    }
}

impl TaskApi {
    async fn complete(&self, request: Request<CompleteTaskRequest>) -> Reply<CompleteTaskResponse> {
        let (who, r) = caller_and_message(request)?;
        let id = task_id(&r.task_id)?;
        let outcome = outcome_from_pb(r.outcome)?;
        let request_id = request_id(&r.request_id)?;
        let (task, revoked) = self
            .broker
            .complete_task(&who, &id, outcome, request_id.as_ref())
            .await?;
        Ok(Response::new(CompleteTaskResponse {
            task: Some(pb::Task::from(task)),
            revoked_leases: u32::try_from(revoked).unwrap_or(u32::MAX),
        }))
    }

    async fn decide(
        &self,
        request: Request<DecideTaskRequest>,
        decision: Decision,
    ) -> Reply<pb::Task> {
        let (who, r) = caller_and_message(request)?;
        let id = task_id(&r.task_id)?;
        let task = self.broker.decide(&who, &id, decision, r.note).await?;
        Ok(Response::new(pb::Task::from(task)))
    }
}
