//! Delegation: the executor of an approved task hands part of it, as a child task, to another
//! agent. The rules that hold whatever policy says: the child's grants are a subset of its
//! parent's, its deadline and credential ceiling no larger, its depth bounded, no agent twice in
//! one chain, the parent's labels kept. Pure, like the rest of [`crate::task`].
//!
//! A child task remembers where it sits ([`Delegation`]): its tree's root, the chain of
//! executors above it (the actors of RFC 8693 `act`), the root's requester, and the approvals
//! recorded above it. A parent remembers its children, so that its end can end them.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::{Decision, Forbidden, Task, TaskError, TaskId, TaskRequest, TaskState, Unmet};
use crate::identity::WorkloadId;

/// Bounds of delegation, from the `[delegation]` configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DelegationLimits {
    /// Deepest a child may sit below its root (a root is at depth 0).
    pub max_depth: usize,
    /// Most children one task may delegate.
    pub max_children: usize,
    /// Most tasks one tree may hold below its root.
    pub max_tree_tasks: u32,
}

impl Default for DelegationLimits {
    /// Depth 4, 16 children a task, 64 tasks below a root.
    fn default() -> Self {
        Self {
            max_depth: 4,
            max_children: 16,
            max_tree_tasks: 64,
        }
    }
}

/// An approval recorded on a task above a child: who reviewed the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reviewed {
    /// The task it was recorded on.
    pub task: TaskId,
    /// The approval's id.
    pub approval_id: String,
    /// Who approved.
    pub approver: WorkloadId,
}

/// Where a delegated task sits in its tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delegation {
    /// The root of the tree: the task its requester asked for directly.
    pub root: TaskId,
    /// The executors of the tasks above, from the root's down to the parent's (the delegator):
    /// the actors before this task's executor. Its length is the task's depth.
    pub chain: Vec<WorkloadId>,
    /// Who asked for the root task.
    pub root_requester: WorkloadId,
    /// The approvals recorded on the tasks above, the root's first.
    pub reviewed: Vec<Reviewed>,
}

impl Task {
    /// How deep the task sits below its root (0 for a root).
    pub fn depth(&self) -> usize {
        self.delegation.as_ref().map_or(0, |d| d.chain.len())
    }

    /// The root of the task's tree (itself for a root).
    pub fn root_id(&self) -> TaskId {
        self.delegation.as_ref().map_or(self.id, |d| d.root)
    }

    /// The executor of the root task: the subject whose approved authority a delegated
    /// credential carries (`sub`).
    pub fn subject(&self) -> &WorkloadId {
        self.delegation
            .as_ref()
            .and_then(|d| d.chain.first())
            .unwrap_or(&self.executor)
    }

    /// The actors of a delegated task's credentials, the current one (this task's executor)
    /// first, then the earlier ones back to the root's delegate; empty for a root.
    pub fn actors(&self) -> Vec<&WorkloadId> {
        let Some(d) = &self.delegation else {
            return Vec::new();
        };
        std::iter::once(&self.executor)
            .chain(d.chain.iter().skip(1).rev())
            .collect()
    }

    /// The executors of the chain above and who asked for the root: nobody among them decides
    /// on a step of the chain.
    fn in_chain(&self, who: &WorkloadId) -> bool {
        self.delegation
            .as_ref()
            .is_some_and(|d| &d.root_requester == who || d.chain.contains(who))
    }

    /// Whether separation of duties keeps `who` from deciding on this task: its requester, its
    /// executor, and for a delegated task everyone in its chain and the root's requester.
    pub(super) fn may_not_decide(&self, who: &WorkloadId) -> Option<Forbidden> {
        if who == &self.requester {
            Some(Forbidden::RequesterDecides)
        } else if who == &self.executor {
            Some(Forbidden::ExecutorDecides)
        } else if self.in_chain(who) {
            Some(Forbidden::ChainDecides)
        } else {
            None
        }
    }

    /// The child `request` asks for, delegated by `delegator` from this task at `now`, as it
    /// would be created (pending, quorum 1, until policy fixes its quorum): checked against
    /// every rule of delegation. Its deadline and credential ceiling default to the parent's;
    /// its labels are the parent's, to which the request may add new keys.
    ///
    /// # Errors
    /// [`TaskError::Forbidden`] for a caller that is not this task's executor, a chain too deep
    /// or an agent twice in it; [`TaskError::Widens`] for any widening; [`TaskError::Precondition`]
    /// for a task that is not approved or past its deadline.
    pub fn delegate(
        &self,
        child: TaskId,
        delegator: &WorkloadId,
        request: TaskRequest,
        limits: &DelegationLimits,
        now: SystemTime,
    ) -> Result<Task, TaskError> {
        if delegator != &self.executor {
            return Err(TaskError::Forbidden(Forbidden::NotDelegator));
        }
        self.check_delegable(now)?;
        if self.depth() + 1 > limits.max_depth {
            return Err(TaskError::Forbidden(Forbidden::TooDeep));
        }
        let mut chain = self
            .delegation
            .as_ref()
            .map(|d| d.chain.clone())
            .unwrap_or_default();
        chain.push(self.executor.clone());
        if chain.contains(&request.executor) {
            return Err(TaskError::Forbidden(Forbidden::AgentTwice));
        }
        for g in &request.grants {
            let Some(held) = self.grants.iter().find(|p| p.audience == g.audience) else {
                return Err(TaskError::Widens(format!(
                    "audience {} is not granted by the parent task",
                    g.audience
                )));
            };
            if let Some(a) = g.actions.iter().find(|a| !held.actions.contains(*a)) {
                return Err(TaskError::Widens(format!(
                    "action {a} is not granted for {} by the parent task",
                    g.audience
                )));
            }
        }
        if now + request.deadline_in > self.deadline {
            return Err(TaskError::Widens(
                "the deadline is later than the parent task's".into(),
            ));
        }
        if request.credential_ttl > self.credential_ttl {
            return Err(TaskError::Widens(format!(
                "credential_ttl is longer than the parent task's ({})",
                humantime::format_duration(self.credential_ttl)
            )));
        }
        let mut labels: Vec<(String, String)> = self
            .labels
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        for (k, v) in request.labels.iter() {
            match self.labels.get(k) {
                Some(held) if held == v => {}
                Some(_) => {
                    return Err(TaskError::Widens(format!(
                        "label {k} differs from the parent task's: a child keeps its parent's labels"
                    )));
                }
                None => labels.push((k.to_owned(), v.to_owned())),
            }
        }
        let labels = super::Labels::parse(labels)?;
        let d = self.delegation.as_ref();
        let mut reviewed = d.map(|d| d.reviewed.clone()).unwrap_or_default();
        reviewed.extend(
            self.approvals
                .iter()
                .filter(|a| a.decision == Decision::Approve)
                .map(|a| Reviewed {
                    task: self.id,
                    approval_id: a.id.clone(),
                    approver: a.approver.clone(),
                }),
        );
        let delegation = Delegation {
            root: self.root_id(),
            chain,
            root_requester: d.map_or_else(|| self.requester.clone(), |d| d.root_requester.clone()),
            reviewed,
        };
        let mut task = Task::new(
            child,
            TaskRequest { labels, ..request },
            delegator.clone(),
            1,
            Vec::new(),
            now,
        );
        task.parent = Some(self.id);
        task.delegation = Some(delegation);
        Ok(task)
    }

    /// Whether this task may be delegated from at `now`: approved and before its deadline.
    ///
    /// # Errors
    /// [`TaskError::Precondition`] otherwise.
    pub fn check_delegable(&self, now: SystemTime) -> Result<(), TaskError> {
        if self.state != TaskState::Approved {
            return Err(TaskError::Precondition(Unmet::NotApproved(self.state)));
        }
        if now >= self.deadline {
            return Err(TaskError::Precondition(Unmet::DeadlinePassed));
        }
        Ok(())
    }

    /// Whether a child's grants are strictly narrower than this task's: an audience or an
    /// action less.
    pub fn strictly_wider_than(&self, child: &Task) -> bool {
        self.grants.iter().any(|p| {
            child
                .grants
                .iter()
                .find(|g| g.audience == p.audience)
                .is_none_or(|g| g.actions.len() < p.actions.len())
        })
    }

    /// Records `child` among this task's children (the change applied to the parent when a
    /// delegation is made), while it is approved and before its deadline, within
    /// `max_children`. The root of the tree also counts it, within `max_tree_tasks`.
    ///
    /// # Errors
    /// [`TaskError::Precondition`] when the task ended, is past its deadline, or a budget is
    /// spent.
    pub fn adopt(
        &mut self,
        child: TaskId,
        limits: &DelegationLimits,
        now: SystemTime,
    ) -> Result<(), TaskError> {
        self.check_delegable(now)?;
        if self.children.contains(&child) {
            return Ok(());
        }
        if self.children.len() >= limits.max_children {
            return Err(TaskError::Precondition(Unmet::TooManyChildren(
                limits.max_children,
            )));
        }
        if self.delegation.is_none() {
            self.count_descendant(limits)?;
        }
        self.children.push(child);
        self.updated_at = now;
        Ok(())
    }

    /// Counts one more task below this root, within `max_tree_tasks`.
    ///
    /// # Errors
    /// [`TaskError::Precondition`] when the tree is full or the root has ended.
    pub fn count_descendant(&mut self, limits: &DelegationLimits) -> Result<(), TaskError> {
        if self.state.is_terminal() {
            return Err(TaskError::Precondition(Unmet::NotApproved(self.state)));
        }
        if self.descendants >= limits.max_tree_tasks {
            return Err(TaskError::Precondition(Unmet::TreeFull(
                limits.max_tree_tasks,
            )));
        }
        self.descendants += 1;
        Ok(())
    }
}

/// The deadline a child gets when its request names none: what is left of its parent's.
pub fn remaining(parent: &Task, now: SystemTime) -> Duration {
    parent.deadline.duration_since(now).unwrap_or_default()
}
