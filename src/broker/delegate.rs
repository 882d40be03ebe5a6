//! Delegation: a child task from an approved one (`DelegateTask`) and the tree below a task
//! (`GetTaskTree`). The rules are the task model's ([`crate::task`]: subset of grants, no later
//! deadline, no longer ceiling, bounded depth, no agent twice); the end of a tree with its
//! parent is the revoker's (`Revoker::end_below`), called by every use case that ends a task.
//!
//! A child is made in three steps, each one task's atomic store step (so that a tree's tasks
//! may live in different Redis Cluster slots): the parent adopts the child's id (while it is
//! approved: a parent that ended refuses), the child is written, and the parent is read again.
//! A parent that ended in between has ended, or will end, the child through its list of
//! children; one that ended before the child was written is caught by the read: the child is
//! ended at once and the delegation refused. Issuance checks the chain above a child as well.

use std::sync::Arc;

use crate::audit::AuditEvent;
use crate::identity::WorkloadId;
use crate::policy::{PolicyAction, Resource};
use crate::store::TaskChange;
use crate::task::{
    Forbidden, RawTaskRequest, Task, TaskError, TaskId, TaskRequest, TaskState, Unmet,
};

use super::revoker::Cause;
use super::{Broker, BrokerError, Denial, Precondition};

/// The tree below a task, as `GetTaskTree` answers it.
#[derive(Debug, Clone, Default)]
pub struct TaskTree {
    /// The task asked for, then the tasks below it that the caller may read, depth first
    /// (each names its parent).
    pub tasks: Vec<Task>,
    /// Tasks below that the caller may not read (left out, with what is below them).
    pub hidden: usize,
}

impl Broker {
    /// Delegates part of task `parent` to another agent: a child task executed by
    /// `raw.executor`, requested by `caller` (who must execute `parent`). Its deadline and
    /// credential ceiling default to the parent's. Policy (`DelegateTask`) decides and fixes
    /// the approvals the step needs; with none the child is approved at once.
    ///
    /// # Errors
    /// [`BrokerError::Invalid`], [`BrokerError::Denied`] (policy, a rule of delegation, a lock),
    /// [`BrokerError::Precondition`] (the parent is not approved, past its deadline, or a budget
    /// is spent), [`BrokerError::NotFound`], [`BrokerError::Unavailable`].
    pub async fn delegate_task(
        &self,
        caller: &WorkloadId,
        parent_id: &TaskId,
        mut raw: RawTaskRequest,
    ) -> Result<Task, BrokerError> {
        let action = PolicyAction::DelegateTask;
        let parent = self.load(parent_id).await?;
        let refuse = |e: BrokerError| {
            self.audit_refusal(action, caller, parent.id, &e);
            e
        };
        if parent.executor.trust_domain() == self.ci.trust_domain() {
            return Err(refuse(BrokerError::Denied(Denial::Rule(Forbidden::CiTask))));
        }
        let now = self.clock.now();
        if &parent.executor != caller {
            return Err(refuse(TaskError::Forbidden(Forbidden::NotDelegator).into()));
        }
        parent.check_delegable(now).map_err(|e| refuse(e.into()))?;
        if crate::task::remaining(&parent, now) < std::time::Duration::from_secs(1) {
            return Err(refuse(BrokerError::Precondition(
                Precondition::DeadlineTooClose,
            )));
        }
        raw.deadline_in = raw
            .deadline_in
            .or_else(|| Some(crate::task::remaining(&parent, now)));
        raw.credential_ttl = raw.credential_ttl.or(Some(parent.credential_ttl));
        let request =
            TaskRequest::parse(raw, &self.settings.limits).map_err(|e| refuse(e.into()))?;
        if request.executor.trust_domain() == self.ci.trust_domain() {
            return Err(refuse(BrokerError::Invalid {
                field: "executor",
                reason: "a CI identity's tasks come only from ExchangeCiToken".into(),
            }));
        }
        let limits = self.settings.delegation;
        let mut child = parent
            .delegate(TaskId::generate(), caller, request, &limits, now)
            .map_err(|e| refuse(e.into()))?;
        let verdict = self.decide_delegation(caller, &parent, &child)?;
        // After policy (a lock is no business of a caller policy refuses), and again once the
        // child is written (see `attach`). The delegate's lock reason is not the caller's.
        self.check_unlocked(caller, &child.executor, now)
            .await
            .map_err(refuse)?;
        child.quorum = verdict.quorum;
        child.request_policies = verdict.policies;
        if child.quorum == 0 {
            child.state = TaskState::Approved;
        }
        if let Err(e) = self.attach(&parent, &child, now).await {
            // The decision's line named the child: the record says it was not made.
            self.audit_refusal(action, caller, child.id, &e);
            return Err(e);
        }
        tracing::info!(task = %child.id, parent = %parent.id, executor = %child.executor, depth = child.depth(), quorum = child.quorum, "task delegated");
        Ok(child)
    }

    /// Refuses a delegation while the delegator or the delegate is locked.
    async fn check_unlocked(
        &self,
        delegator: &WorkloadId,
        delegate: &WorkloadId,
        now: std::time::SystemTime,
    ) -> Result<(), BrokerError> {
        let (mine, theirs) = tokio::join!(
            self.store.agent_lock(delegator, now),
            self.store.agent_lock(delegate, now)
        );
        if let Some(lock) = mine? {
            return Err(BrokerError::Denied(Denial::Locked(format!(
                "the delegator {delegator}: {}",
                lock.reason
            ))));
        }
        if theirs?.is_some() {
            return Err(BrokerError::Denied(Denial::Locked(format!(
                "the delegate {delegate} is locked"
            ))));
        }
        Ok(())
    }

    /// Asks policy about a delegation and writes its one provenance line: the actor (the
    /// delegator), the intent (purpose), the context (labels, depth, chain), the target
    /// (executor and grants), the reviewers of the chain so far, and the decision.
    fn decide_delegation(
        &self,
        caller: &WorkloadId,
        parent: &Task,
        child: &Task,
    ) -> Result<crate::policy::Verdict, BrokerError> {
        let action = PolicyAction::DelegateTask;
        let chain: Vec<&str> = child
            .delegation
            .iter()
            .flat_map(|d| d.chain.iter().map(WorkloadId::as_str))
            .collect();
        let labels: Vec<String> = parent
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let strictly_narrower = parent.strictly_wider_than(child);
        let context = serde_json::json!({
            "depth": child.depth(),
            "chain": chain,
            "strictly_narrower": strictly_narrower,
            "parent_id": parent.id.to_string(),
            "parent_labels": labels,
            "parent_audiences": parent.grants.iter().map(|g| g.audience.as_str()).collect::<Vec<_>>(),
            "parent_actions": parent.grants.iter().flat_map(|g| g.actions.iter().map(|a| a.as_str())).collect::<std::collections::BTreeSet<_>>(),
        });
        let verdict = self
            .policy
            .decide_in(caller, action, &Resource::Task(child), Some(context));
        let reviewers: Vec<String> = child
            .delegation
            .iter()
            .flat_map(|d| d.reviewed.iter())
            .map(|r| format!("{} ({})", r.approver, r.task))
            .collect();
        let grants: Vec<String> = child
            .grants
            .iter()
            .map(|g| {
                let actions: Vec<&str> = g.actions.iter().map(|a| a.as_str()).collect();
                format!("{}={}", g.audience, actions.join(","))
            })
            .collect();
        let mut event = AuditEvent::new(
            child.created_at,
            action.name(),
            caller.as_str(),
            verdict.allowed,
        )
        .task(child.id)
        .policies(&verdict.policies)
        .detail("parent", parent.id.to_string())
        .detail("root", child.root_id().to_string())
        .detail("purpose", child.purpose.as_str())
        .detail("executor", child.executor.as_str())
        .detail("grants", grants)
        .detail(
            "labels",
            child
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>(),
        )
        .detail("depth", child.depth())
        .detail("chain", chain)
        .detail("strictly_narrower", strictly_narrower)
        .detail("reviewers", reviewers);
        if !verdict.errors.is_empty() {
            event = event.detail("policy_errors", verdict.errors.clone());
        }
        if !verdict.allowed {
            self.audit
                .record(&event.reason(crate::audit::NOT_PERMITTED));
            return Err(BrokerError::Denied(Denial::Policy(action)));
        }
        // A decision that cannot be recorded is not made (with `audit.required`).
        self.audit
            .record_or_refuse(&event.detail("quorum", verdict.quorum))
            .map_err(|e| BrokerError::AuditFailed(e.to_string()))?;
        Ok(verdict)
    }

    /// The three store steps of a delegation (see the module docs): the root counts the child
    /// and the parent adopts it, the child is written, and the parent is read again.
    async fn attach(
        &self,
        parent: &Task,
        child: &Task,
        now: std::time::SystemTime,
    ) -> Result<(), BrokerError> {
        let limits = self.settings.delegation;
        let retention = self.settings.task_retention;
        let root = child.root_id();
        if root != parent.id {
            let count: TaskChange = Arc::new(move |t: &mut Task| t.count_descendant(&limits));
            match self.store.update_task(&root, count, retention).await {
                Ok(_) => {}
                Err(crate::store::UpdateError::NotFound) => {
                    return Err(BrokerError::Precondition(Precondition::Task(
                        Unmet::AncestorEnded(root),
                    )));
                }
                Err(e) => return Err(e.into()),
            }
        }
        let id = child.id;
        let adopt: TaskChange = Arc::new(move |t: &mut Task| t.adopt(id, &limits, now));
        if let Err(e) = self.store.update_task(&parent.id, adopt, retention).await {
            if root != parent.id {
                // The root's count back (best effort: a lost one only narrows the tree).
                let undo: TaskChange = Arc::new(|t: &mut Task| {
                    t.descendants = t.descendants.saturating_sub(1);
                    Ok(())
                });
                let _ = self.store.update_task(&root, undo, retention).await;
            }
            return Err(e.into());
        }
        self.store.create_task(child).await?;
        // Read again once the child is written: a parent that ended, or a lock of either agent,
        // since the checks above. (A lock written after this read sweeps the child: it is among
        // the delegate's open tasks by now.)
        let again = self.load(&parent.id).await;
        let locked = self
            .check_unlocked(&child.requester, &child.executor, now)
            .await;
        let refusal = match (again, locked) {
            (Ok(p), Ok(())) if !p.state.is_terminal() => return Ok(()),
            (Ok(p), Ok(())) => {
                BrokerError::Precondition(Precondition::Task(Unmet::AncestorEnded(p.id)))
            }
            (_, Err(e)) | (Err(e), Ok(())) => e,
        };
        // The child may not live: end it before anyone can use it.
        let why = format!("task {} was refused as it was delegated", child.id);
        let end: TaskChange = Arc::new(move |t: &mut Task| {
            if t.revoke(&why, now) {
                Ok(())
            } else {
                Err(TaskError::Precondition(Unmet::Ended(t.state)))
            }
        });
        let _ = self
            .revoker
            .end_task(&id, end, Cause::ParentEnd, |t| {
                AuditEvent::new(now, "DelegationEnded", "broker", true)
                    .task(t.id)
                    .reason("the delegation was refused after the task was written")
                    .detail("parent", parent.id.to_string())
            })
            .await;
        Err(refusal)
    }

    /// Ends the tasks below `ended` (a task the caller `by` has just ended), audited, and
    /// says whether all of them could be ended now.
    ///
    /// # Errors
    /// [`BrokerError::Incomplete`] when the store failed half way: the task itself ended, and
    /// the reaper ends the rest of its tree within [`crate::store::CASCADE_GRACE`] and a round.
    pub(super) async fn end_tree_below(
        &self,
        ended: &Task,
        by: &str,
    ) -> Result<usize, BrokerError> {
        if ended.children.is_empty() {
            return Ok(0);
        }
        match self.revoker.end_below(ended, by, self.clock.now()).await {
            Ok((tasks, credentials)) => {
                if !tasks.is_empty() {
                    tracing::info!(task = %ended.id, below = tasks.len(), credentials, "ended the tasks delegated below a task");
                }
                Ok(credentials)
            }
            Err(e) => {
                tracing::warn!(task = %ended.id, error = %e, "ending the tasks below an ended task failed; the reaper ends the rest");
                Err(BrokerError::Incomplete(format!(
                    "task {} ended, but some tasks delegated below it could not be ended yet \
                     (the store failed): the broker ends them within {} s; their credentials \
                     are refused meanwhile",
                    ended.id,
                    crate::store::CASCADE_GRACE.as_secs() + 1
                )))
            }
        }
    }

    /// Refuses an issuance for a delegated task when a task above it has ended (its end is
    /// ending this one, or will: see the module docs).
    pub(super) async fn check_chain(&self, task: &Task) -> Result<(), BrokerError> {
        // A lock of anyone above holds from its first step, before its sweep reaches here.
        if let Some(d) = &task.delegation {
            let now = self.clock.now();
            for agent in &d.chain {
                if self.store.agent_lock(agent, now).await?.is_some() {
                    return Err(BrokerError::Denied(Denial::Locked(
                        "an agent above this task in its delegation chain is locked".into(),
                    )));
                }
            }
        }
        let mut next = task.parent;
        let mut steps = 0;
        while let Some(id) = next {
            steps += 1;
            if steps > self.settings.delegation.max_depth.max(task.depth()) {
                break;
            }
            match self.store.get_task(&id).await? {
                Some(t) if !t.state.is_terminal() => next = t.parent,
                _ => {
                    return Err(BrokerError::Precondition(Precondition::Task(
                        Unmet::AncestorEnded(id),
                    )));
                }
            }
        }
        Ok(())
    }

    /// The tree below task `id` (itself included), as far as `caller` may read it: a task the
    /// caller may not `GetTask` is left out with what is below it, and counted.
    ///
    /// # Errors
    /// [`BrokerError::NotFound`], [`BrokerError::Denied`] (the task itself), [`BrokerError::Unavailable`].
    pub async fn task_tree(
        &self,
        caller: &WorkloadId,
        id: &TaskId,
    ) -> Result<TaskTree, BrokerError> {
        let top = self.get_task(caller, id).await?;
        let mut tree = TaskTree::default();
        let mut stack = vec![top];
        // A tree holds at most max_tree_tasks below its root; the bound holds even if the
        // records say otherwise.
        let most =
            usize::try_from(self.settings.delegation.max_tree_tasks).unwrap_or(usize::MAX) + 1;
        while let Some(task) = stack.pop() {
            for child in task.children.iter().rev() {
                if tree.tasks.len() + stack.len() >= most {
                    break;
                }
                match self.store.get_task(child).await? {
                    Some(c)
                        if self
                            .policy
                            .decide(caller, PolicyAction::GetTask, &Resource::Task(&c))
                            .allowed =>
                    {
                        stack.push(c);
                    }
                    Some(_) => tree.hidden += 1,
                    None => {}
                }
            }
            tree.tasks.push(task);
        }
        Ok(tree)
    }
}
