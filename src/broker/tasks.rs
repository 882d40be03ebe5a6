//! The life of a task: request, read, list, approve or deny, cancel, complete.

use std::sync::Arc;

use crate::audit::AuditEvent;
use crate::identity::WorkloadId;
use crate::policy::{PolicyAction, Resource};
use crate::store::TaskQuery;
use crate::task::{Approval, Decision, Outcome, RawTaskRequest, Task, TaskId, TaskRequest};

use super::revoker::Cause;
use super::task_cache::CachedTask;
use super::{Broker, BrokerError, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, Missing};
use super::{RequestId, retries};

/// Most tasks examined for one page of `ListTasks`.
pub(super) const MAX_SCAN: usize = 1000;

/// Filters of `ListTasks`, as asked.
#[derive(Debug, Clone, Default)]
pub struct ListRequest {
    /// Only this state.
    pub state: Option<crate::task::TaskState>,
    /// Only this executor.
    pub executor: Option<WorkloadId>,
    /// Only this requester.
    pub requester: Option<WorkloadId>,
    /// Page size (default 20, at most 100).
    pub page_size: Option<usize>,
    /// The opaque token of the previous page (see [`TaskListing`]).
    pub page_token: Option<String>,
}

/// One page of `ListTasks`.
#[derive(Debug, Clone, Default)]
pub struct TaskListing {
    /// The tasks the caller may read, newest first.
    pub tasks: Vec<Task>,
    /// Where the next page starts, if there may be more: opaque and bound to the caller (the
    /// scan may have stopped at a task the caller may not read).
    pub next_page_token: Option<String>,
}

impl Broker {
    /// Requests a task executed by `raw.executor` on behalf of `caller`. Policy decides whether
    /// it may be asked and how many approvals it needs; with none it is approved at once.
    ///
    /// # Errors
    /// [`BrokerError::Invalid`] naming the field, [`BrokerError::Denied`] by policy,
    /// [`BrokerError::Unavailable`].
    pub async fn request_task(
        &self,
        caller: &WorkloadId,
        raw: RawTaskRequest,
    ) -> Result<Task, BrokerError> {
        let request = TaskRequest::parse(raw, &self.settings.limits)?;
        // A CI job's task is made only by the exchange of its ID token, never asked for.
        if request.executor.trust_domain() == self.ci.trust_domain() {
            return Err(BrokerError::Invalid {
                field: "executor",
                reason: "a CI identity's tasks come only from ExchangeCiToken".into(),
            });
        }
        let now = self.clock.now();
        let id = TaskId::generate();
        // The quorum is not known before policy answers; the provisional task only informs it.
        let provisional = Task::new(id, request.clone(), caller.clone(), 1, Vec::new(), now);
        let verdict = self.authorize(
            caller,
            PolicyAction::RequestTask,
            &Resource::Task(&provisional),
        )?;
        let task = Task::new(
            id,
            request,
            caller.clone(),
            verdict.quorum,
            verdict.policies,
            now,
        );
        self.store.create_task(&task).await?;
        tracing::info!(task = %task.id, executor = %task.executor, quorum = task.quorum, state = %task.state, "task requested");
        Ok(task)
    }

    /// The task `id` for an issuance: as cached if it is, else read (and cached if approved).
    pub(super) async fn issuable_task(&self, id: &TaskId) -> Result<Arc<CachedTask>, BrokerError> {
        if let Some(task) = self.tasks.get(id) {
            return Ok(task);
        }
        self.read_issuable(id).await
    }

    /// The task `id` as the store holds it now (cached if approved).
    pub(super) async fn read_issuable(&self, id: &TaskId) -> Result<Arc<CachedTask>, BrokerError> {
        let read = self
            .store
            .get_versioned_task(id)
            .await?
            .ok_or(BrokerError::NotFound(Missing::Task))?;
        Ok(self.tasks.put(read))
    }

    pub(super) async fn load(&self, id: &TaskId) -> Result<Task, BrokerError> {
        self.store
            .get_task(id)
            .await?
            .ok_or(BrokerError::NotFound(Missing::Task))
    }

    /// Reads a task, with its grants, labels and approval history.
    ///
    /// # Errors
    /// [`BrokerError::NotFound`], [`BrokerError::Denied`], [`BrokerError::Unavailable`].
    pub async fn get_task(&self, caller: &WorkloadId, id: &TaskId) -> Result<Task, BrokerError> {
        let task = self.load(id).await?;
        self.authorize(caller, PolicyAction::GetTask, &Resource::Task(&task))?;
        Ok(task)
    }

    /// Lists tasks newest first; a page holds only the tasks `GetTask` permits the caller.
    ///
    /// # Errors
    /// [`BrokerError::Denied`], [`BrokerError::Invalid`] for a bad page size,
    /// [`BrokerError::Unavailable`].
    pub async fn list_tasks(
        &self,
        caller: &WorkloadId,
        request: ListRequest,
    ) -> Result<TaskListing, BrokerError> {
        let limit = request.page_size.unwrap_or(DEFAULT_PAGE_SIZE);
        if limit == 0 || limit > MAX_PAGE_SIZE {
            return Err(BrokerError::Invalid {
                field: "page_size",
                reason: format!("must be 1 to {MAX_PAGE_SIZE}"),
            });
        }
        self.authorize(caller, PolicyAction::ListTasks, &Resource::Broker)?;
        let before = match &request.page_token {
            Some(token) => Some(self.open_page(caller, token).await?),
            None => None,
        };
        let mut page = self
            .store
            .list_tasks(&TaskQuery {
                state: request.state,
                executor: request.executor,
                requester: request.requester,
                before,
                limit,
                max_scan: MAX_SCAN,
            })
            .await?;
        page.tasks.retain(|t| {
            self.policy
                .decide(caller, PolicyAction::GetTask, &Resource::Task(t))
                .allowed
        });
        let next_page_token = match page.next {
            Some(next) => Some(self.seal_page(caller, next).await?),
            None => None,
        };
        Ok(TaskListing {
            tasks: page.tasks,
            next_page_token,
        })
    }

    /// Records an approval or denial by `caller`. Separation of duties holds whatever policy
    /// says: no decision by the requester or the executor, one per approver, none after the
    /// deadline or on a task that is not pending.
    ///
    /// # Errors
    /// [`BrokerError::Denied`] (policy or separation of duties), [`BrokerError::Precondition`],
    /// [`BrokerError::NotFound`], [`BrokerError::Invalid`] (note), [`BrokerError::Unavailable`].
    pub async fn decide(
        &self,
        caller: &WorkloadId,
        id: &TaskId,
        decision: Decision,
        note: String,
    ) -> Result<Task, BrokerError> {
        let action = match decision {
            Decision::Approve => PolicyAction::ApproveTask,
            Decision::Deny => PolicyAction::DenyTask,
        };
        crate::task::check_note(&note)?;
        let task = self.load(id).await?;
        self.authorize(caller, action, &Resource::Task(&task))?;
        let now = self.clock.now();
        let approval = Approval {
            id: TaskId::generate().to_string(),
            approver: caller.clone(),
            decision,
            at: now,
            note,
        };
        let approval_id = approval.id.clone();
        let result = self
            .store
            .update_task(
                id,
                Arc::new(move |t: &mut Task| t.decide(approval.clone(), now)),
                self.settings.task_retention,
            )
            .await
            .map_err(BrokerError::from);
        match result {
            Ok(task) => {
                self.audit.record(
                    &AuditEvent::new(now, action.name(), caller.as_str(), true)
                        .task(task.id)
                        .reason("decision recorded")
                        .detail("approval_id", approval_id)
                        .detail("state", task.state.as_str())
                        .detail("approvals", task.approval_count())
                        .detail("quorum", task.quorum),
                );
                tracing::info!(task = %task.id, approver = %caller, state = %task.state, "decision recorded");
                Ok(task)
            }
            Err(e) => {
                self.audit_refusal(action, caller, *id, &e);
                Err(e)
            }
        }
    }

    /// Cancels a task on behalf of its requester, before it runs.
    ///
    /// # Errors
    /// [`BrokerError::Denied`], [`BrokerError::Precondition`], [`BrokerError::NotFound`],
    /// [`BrokerError::Unavailable`].
    pub async fn cancel_task(&self, caller: &WorkloadId, id: &TaskId) -> Result<Task, BrokerError> {
        let task = self.load(id).await?;
        self.authorize(caller, PolicyAction::CancelTask, &Resource::Task(&task))?;
        let now = self.clock.now();
        let who = caller.clone();
        // Through the revoker: an approved task that has not run may have delegated children.
        let result = self
            .revoker
            .end_task(
                id,
                Arc::new(move |t: &mut Task| t.cancel(&who, now)),
                Cause::TaskEnd,
                |task| {
                    AuditEvent::new(now, "CancelTask", caller.as_str(), true)
                        .task(task.id)
                        .detail("state", task.state.as_str())
                },
            )
            .await
            .map_err(BrokerError::from);
        match result {
            Ok((task, _)) => {
                self.end_tree_below(&task, caller.as_str()).await?;
                Ok(task)
            }
            Err(e) => {
                self.audit_refusal(PolicyAction::CancelTask, caller, *id, &e);
                Err(e)
            }
        }
    }

    /// Ends a task on behalf of its executor or requester, revoking every credential of it in
    /// the same atomic step. Returns the task and how many leases were revoked.
    ///
    /// # Errors
    /// [`BrokerError::NotFound`], [`BrokerError::Denied`], [`BrokerError::Precondition`] (not
    /// approved, or already ended: a replayed completion), [`BrokerError::Unavailable`].
    pub async fn complete_task(
        &self,
        caller: &WorkloadId,
        id: &TaskId,
        outcome: Outcome,
        request: Option<&RequestId>,
    ) -> Result<(Task, usize), BrokerError> {
        let task = self.load(id).await?;
        let verdict = self.authorize(caller, PolicyAction::CompleteTask, &Resource::Task(&task))?;
        let now = self.clock.now();
        let request_id = request.map(RequestId::as_str);
        if let Some(request) = request {
            let retry = self
                .claim_completion(caller, *id, request, outcome, now)
                .await
                .inspect_err(|e| self.audit_refusal(PolicyAction::CompleteTask, caller, *id, e))?;
            // A retry of a completion that took effect: the same answer, not "already ended".
            if retry && retries::ended_as(&task, caller, outcome) {
                // The first attempt may have been cut off on its way down the tree.
                let below = self.end_tree_below(&task, caller.as_str()).await?;
                let revoked = self.revoked_by_end(&task).await? + below;
                self.audit.record(
                    &AuditEvent::new(now, "CompleteTask", caller.as_str(), true)
                        .task(task.id)
                        .policies(&verdict.policies)
                        .detail("state", task.state.as_str())
                        .detail_opt("request_id", request_id)
                        .detail("answered_again", true),
                );
                return Ok((task, revoked));
            }
        }
        let who = caller.clone();
        let result = self
            .revoker
            .end_task(
                id,
                Arc::new(move |t: &mut Task| t.complete(&who, outcome, now)),
                Cause::TaskEnd,
                |task| {
                    AuditEvent::new(now, "CompleteTask", caller.as_str(), true)
                        .task(task.id)
                        .policies(&verdict.policies)
                        .detail("state", task.state.as_str())
                        .detail_opt("request_id", request_id)
                },
            )
            .await
            .map_err(BrokerError::from);
        match result {
            Ok((task, revoked)) => {
                if task.state == crate::task::TaskState::Failed {
                    self.lock_on_failure(caller, &task).await;
                }
                let below = self.end_tree_below(&task, caller.as_str()).await?;
                Ok((task, revoked.len() + below))
            }
            Err(e) => {
                self.audit_refusal(PolicyAction::CompleteTask, caller, *id, &e);
                Err(e)
            }
        }
    }
}
