//! A [`Store`] that measures another (each concern trait implemented for [`Metered`] by one
//! macro): the latency of every operation
//! (`taskcred_store_operation_duration_seconds{op}`) and its failures
//! (`taskcred_store_errors_total{op,kind}`: the backend unreachable, a damaged record, contention;
//! a domain answer such as "no such task" is no failure). The broker's store is always wrapped.

use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;

use super::{
    Claim, ClaimStore, DueStore, Epoch, IssueError, LeaseStore, LockStore, LockSweep, LogRead,
    MetaStore, Renewal, Revision, RevocationLog, Store, StoreError, TaskChange, TaskPage,
    TaskQuery, TaskStore, UpdateError, VersionedTask,
};
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

/// The `kind` label of a store failure, for each kind.
pub const FAILURE_KINDS: &[&str] = &["unavailable", "outcome_unknown", "corrupt", "contention"];

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

/// The measured store.
#[derive(Debug)]
pub struct Metered<S>(pub S);

impl<S: Store> Store for Metered<S> {}

/// Implements each concern trait of [`Store`] for [`Metered`], one impl per trait from one line
/// per operation: each times the inner store's operation of the same name (its `op` label) and
/// counts its failures. What follows a trait's operations in braces is written out into its impl:
/// the blocking revocation read, whose duration is mostly waiting, so only failures count.
macro_rules! measured_store {
    ($(
        $concern:ident {
            $( $op:ident($($arg:ident: $ty:ty),*) -> $ret:ty; )*
        } $({ $($written:tt)* })?
    )*) => {
        /// Every operation's `op` label.
        pub const OPERATIONS: &[&str] = &[$($(stringify!($op),)*)* "revocations"];

        $(
            #[async_trait]
            impl<S: Store> $concern for Metered<S> {
                $(
                    async fn $op(&self, $($arg: $ty),*) -> $ret {
                        let start = Instant::now();
                        let result = self.0.$op($($arg),*).await;
                        measured(stringify!($op), start, result)
                    }
                )*
                $($($written)*)?
            }
        )*
    };
}

measured_store! {
    TaskStore {
        create_task(task: &Task) -> Result<(), StoreError>;
        get_versioned_task(id: &TaskId) -> Result<Option<VersionedTask>, StoreError>;
        update_task(id: &TaskId, change: TaskChange, retention: Duration)
            -> Result<Task, UpdateError>;
        list_tasks(query: &TaskQuery) -> Result<TaskPage, StoreError>;
        end_task(id: &TaskId, change: TaskChange, retention: Duration)
            -> Result<(Task, Vec<Lease>), UpdateError>;
        prune_ended(ended_before: SystemTime) -> Result<usize, StoreError>;
    }
    LeaseStore {
        issue_lease(lease: &Lease, seen: Option<(&Task, Revision)>, now: SystemTime)
            -> Result<Option<VersionedTask>, IssueError>;
        find_lease(task: &TaskId, credential: &str) -> Result<Option<Lease>, StoreError>;
        get_lease(id: &LeaseId) -> Result<Option<Lease>, StoreError>;
        task_leases(task: &TaskId) -> Result<Vec<Lease>, StoreError>;
        renew_lease(id: &LeaseId, to: &Renewal<'_>) -> Result<Lease, IssueError>;
        revoke_lease(id: &LeaseId, reason: &str, now: SystemTime) -> Result<Lease, UpdateError>;
        live_leases() -> Result<u64, StoreError>;
    }
    LockStore {
        lock_agent(lock: &Lock) -> Result<Lock, StoreError>;
        sweep_lock(step: &LockSweep<'_>) -> Result<Swept, StoreError>;
        unlock_agent(agent: &WorkloadId) -> Result<Option<Lock>, StoreError>;
        agent_lock(agent: &WorkloadId, now: SystemTime) -> Result<Option<Lock>, StoreError>;
        list_locks(now: SystemTime) -> Result<Vec<Lock>, StoreError>;
    }
    DueStore {
        expire_leases(now: SystemTime, limit: usize) -> Result<Vec<Lease>, StoreError>;
        overdue_tasks(now: SystemTime, limit: usize) -> Result<Vec<TaskId>, StoreError>;
        forget_deadline(id: &TaskId) -> Result<(), StoreError>;
        next_due() -> Result<Option<SystemTime>, StoreError>;
    }
    RevocationLog {
        revocation_head() -> Result<Cursor, StoreError>;
        prune_revocations(before: SystemTime) -> Result<(), StoreError>;
    } {
        async fn revocations(&self, read: LogRead) -> Result<Vec<Revocation>, StoreError> {
            let result = self.0.revocations(read).await;
            if let Err(e) = &result {
                count_failure("revocations", e);
            }
            result
        }
    }
    MetaStore {
        epoch(fresh: &Epoch) -> Result<Epoch, StoreError>;
        publish_key(key: &PublishedKey) -> Result<(), StoreError>;
        published_keys(now: SystemTime) -> Result<Vec<PublishedKey>, StoreError>;
        ping() -> Result<(), StoreError>;
    }
    ClaimStore {
        claim(claim: &Claim<'_>) -> Result<Option<String>, StoreError>;
        claimed(key: &str) -> Result<Option<String>, StoreError>;
        release_claim(key: &str, value: &str) -> Result<(), StoreError>;
        swap_claim(expected: &str, claim: &Claim<'_>) -> Result<bool, StoreError>;
    }
}
