//! A [`Store`] that measures another: the latency of every operation
//! (`taskcred_store_operation_duration_seconds{op}`) and its failures
//! (`taskcred_store_errors_total{op,kind}`: the backend unreachable, a damaged record, contention;
//! a domain answer such as "no such task" is no failure). The broker's store is always wrapped.

use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;

use super::{Epoch, IssueError, Store, StoreError, TaskChange, TaskPage, TaskQuery, UpdateError};
use crate::identity::WorkloadId;
use crate::lease::{Cursor, Lease, LeaseId, Lock, Revocation, Swept};
use crate::mint::PublishedKey;
use crate::task::{Task, TaskId};

/// Store operation latency, by `op`.
pub const STORE_DURATION: &str = "taskcred_store_operation_duration_seconds";
/// Store failures, by `op` and `kind` (`unavailable`, `corrupt`, `contention`).
pub const STORE_ERRORS: &str = "taskcred_store_errors_total";

/// The store failure inside an operation's error, if it is one.
trait Failure {
    fn store_error(&self) -> Option<&StoreError>;
}

impl Failure for StoreError {
    fn store_error(&self) -> Option<&StoreError> {
        Some(self)
    }
}

impl Failure for UpdateError {
    fn store_error(&self) -> Option<&StoreError> {
        match self {
            Self::Store(e) => Some(e),
            _ => None,
        }
    }
}

impl Failure for IssueError {
    fn store_error(&self) -> Option<&StoreError> {
        match self {
            Self::Store(e) => Some(e),
            _ => None,
        }
    }
}

/// Records `result` of `op`, started at `start`.
fn measured<T, E: Failure>(op: &'static str, start: Instant, result: Result<T, E>) -> Result<T, E> {
    metrics::histogram!(STORE_DURATION, "op" => op).record(start.elapsed());
    if let Err(e) = &result {
        count_failure(op, e);
    }
    result
}

/// Counts `e` of `op` if it is a store failure (not a domain answer).
fn count_failure(op: &'static str, e: &impl Failure) {
    let kind = match e.store_error() {
        Some(StoreError::Unavailable(_)) => "unavailable",
        Some(StoreError::OutcomeUnknown(_)) => "outcome_unknown",
        Some(StoreError::Corrupt(_)) => "corrupt",
        Some(StoreError::Contention(_)) => "contention",
        _ => return,
    };
    metrics::counter!(STORE_ERRORS, "op" => op, "kind" => kind).increment(1);
}

/// Times `$call` on the inner store as operation `$op`.
macro_rules! metered {
    ($op:literal, $call:expr) => {{
        let start = Instant::now();
        let result = $call.await;
        measured($op, start, result)
    }};
}

/// The measured store.
#[derive(Debug)]
pub struct Metered<S>(pub S);

#[async_trait]
impl<S: Store> Store for Metered<S> {
    async fn create_task(&self, task: &Task) -> Result<(), StoreError> {
        metered!("create_task", self.0.create_task(task))
    }

    async fn get_task(&self, id: &TaskId) -> Result<Option<Task>, StoreError> {
        metered!("get_task", self.0.get_task(id))
    }

    async fn update_task(
        &self,
        id: &TaskId,
        change: TaskChange,
        retention: Duration,
    ) -> Result<Task, UpdateError> {
        metered!("update_task", self.0.update_task(id, change, retention))
    }

    async fn list_tasks(&self, query: &TaskQuery) -> Result<TaskPage, StoreError> {
        metered!("list_tasks", self.0.list_tasks(query))
    }

    async fn issue_lease(&self, lease: &Lease, now: SystemTime) -> Result<(), IssueError> {
        metered!("issue_lease", self.0.issue_lease(lease, now))
    }

    async fn find_lease(
        &self,
        task: &TaskId,
        credential: &str,
    ) -> Result<Option<Lease>, StoreError> {
        metered!("find_lease", self.0.find_lease(task, credential))
    }

    async fn get_lease(&self, id: &LeaseId) -> Result<Option<Lease>, StoreError> {
        metered!("get_lease", self.0.get_lease(id))
    }

    async fn task_leases(&self, task: &TaskId) -> Result<Vec<Lease>, StoreError> {
        metered!("task_leases", self.0.task_leases(task))
    }

    async fn renew_lease(
        &self,
        id: &LeaseId,
        credential: &str,
        expires_at: SystemTime,
        now: SystemTime,
    ) -> Result<Lease, IssueError> {
        metered!(
            "renew_lease",
            self.0.renew_lease(id, credential, expires_at, now)
        )
    }

    async fn revoke_lease(
        &self,
        id: &LeaseId,
        reason: &str,
        now: SystemTime,
    ) -> Result<Lease, UpdateError> {
        metered!("revoke_lease", self.0.revoke_lease(id, reason, now))
    }

    async fn end_task(
        &self,
        id: &TaskId,
        change: TaskChange,
        retention: Duration,
    ) -> Result<(Task, Vec<Lease>), UpdateError> {
        metered!("end_task", self.0.end_task(id, change, retention))
    }

    async fn lock_agent(&self, lock: &Lock) -> Result<Lock, StoreError> {
        metered!("lock_agent", self.0.lock_agent(lock))
    }

    async fn sweep_lock(
        &self,
        agent: &WorkloadId,
        reason: &str,
        at: SystemTime,
        retention: Duration,
        limit: usize,
    ) -> Result<Swept, StoreError> {
        metered!(
            "sweep_lock",
            self.0.sweep_lock(agent, reason, at, retention, limit)
        )
    }

    async fn unlock_agent(&self, agent: &WorkloadId) -> Result<Option<Lock>, StoreError> {
        metered!("unlock_agent", self.0.unlock_agent(agent))
    }

    async fn agent_lock(
        &self,
        agent: &WorkloadId,
        now: SystemTime,
    ) -> Result<Option<Lock>, StoreError> {
        metered!("agent_lock", self.0.agent_lock(agent, now))
    }

    async fn list_locks(&self, now: SystemTime) -> Result<Vec<Lock>, StoreError> {
        metered!("list_locks", self.0.list_locks(now))
    }

    async fn expire_leases(&self, now: SystemTime, limit: usize) -> Result<Vec<Lease>, StoreError> {
        metered!("expire_leases", self.0.expire_leases(now, limit))
    }

    async fn overdue_tasks(
        &self,
        now: SystemTime,
        limit: usize,
    ) -> Result<Vec<TaskId>, StoreError> {
        metered!("overdue_tasks", self.0.overdue_tasks(now, limit))
    }

    async fn forget_deadline(&self, id: &TaskId) -> Result<(), StoreError> {
        metered!("forget_deadline", self.0.forget_deadline(id))
    }

    async fn next_due(&self) -> Result<Option<SystemTime>, StoreError> {
        metered!("next_due", self.0.next_due())
    }

    async fn revocations(
        &self,
        after: Option<Cursor>,
        limit: usize,
        wait: Duration,
    ) -> Result<Vec<Revocation>, StoreError> {
        // A blocking read: its duration is mostly waiting, so only failures are counted.
        let result = self.0.revocations(after, limit, wait).await;
        if let Err(e) = &result {
            count_failure("revocations", e);
        }
        result
    }

    async fn revocation_head(&self) -> Result<Cursor, StoreError> {
        metered!("revocation_head", self.0.revocation_head())
    }

    async fn prune_revocations(&self, before: SystemTime) -> Result<(), StoreError> {
        metered!("prune_revocations", self.0.prune_revocations(before))
    }

    async fn publish_key(&self, key: &PublishedKey) -> Result<(), StoreError> {
        metered!("publish_key", self.0.publish_key(key))
    }

    async fn published_keys(&self, now: SystemTime) -> Result<Vec<PublishedKey>, StoreError> {
        metered!("published_keys", self.0.published_keys(now))
    }

    async fn prune_ended(&self, ended_before: SystemTime) -> Result<usize, StoreError> {
        metered!("prune_ended", self.0.prune_ended(ended_before))
    }

    async fn epoch(&self, fresh: &Epoch) -> Result<Epoch, StoreError> {
        metered!("epoch", self.0.epoch(fresh))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        metered!("ping", self.0.ping())
    }

    async fn claim(
        &self,
        key: &str,
        value: &str,
        until: SystemTime,
    ) -> Result<Option<String>, StoreError> {
        metered!("claim", self.0.claim(key, value, until))
    }

    async fn claimed(&self, key: &str) -> Result<Option<String>, StoreError> {
        metered!("claimed", self.0.claimed(key))
    }

    async fn release_claim(&self, key: &str, value: &str) -> Result<(), StoreError> {
        metered!("release_claim", self.0.release_claim(key, value))
    }

    async fn swap_claim(
        &self,
        key: &str,
        expected: &str,
        value: &str,
        until: SystemTime,
    ) -> Result<bool, StoreError> {
        metered!("swap_claim", self.0.swap_claim(key, expected, value, until))
    }

    async fn live_leases(&self) -> Result<u64, StoreError> {
        metered!("live_leases", self.0.live_leases())
    }
}
