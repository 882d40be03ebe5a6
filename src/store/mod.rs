//! The store: where tasks, leases, locks and the published signing keys live. Coarse atomic
//! operations, one trait per concern ([`TaskStore`], [`LeaseStore`], [`LockStore`], [`DueStore`],
//! [`RevocationLog`], [`MetaStore`], [`ClaimStore`]); [`Store`] is all of them, implemented for
//! every type that implements each, and is what the broker holds (`Arc<dyn Store>`). Two
//! backends implement each concern trait in the file of its topic: [`embedded`] (a redb file,
//! one broker process) and [`redis`] (any number of stateless replicas); [`metered`] wraps
//! either with metrics. One conformance suite (`tests/testsuite/store/`) holds the cases both
//! must pass.
//!
//! A change to a task is a pure function of the task (the rules of [`crate::task`]) applied by
//! [`TaskStore::update_task`] atomically: a redb write transaction, or a compare-and-set on a
//! version in Redis, retried on conflict. A store that cannot be reached answers
//! [`StoreError::Unavailable`] and leaves nothing half-written.

pub mod embedded;
pub mod metered;
pub mod redis;

use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::identity::WorkloadId;
use crate::lease::{Cursor, Lease, LeaseId, Lock, Revocation, Swept};
use crate::mint::PublishedKey;
use crate::task::{Task, TaskError, TaskId, TaskState, Unmet};

/// Why the store could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend cannot be reached or failed; nothing was changed. Callers answer `UNAVAILABLE`.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A change was sent and no answer came (a timeout, a connection lost): it may have been
    /// made, or may still be. Callers say so; a retry must be safe to repeat.
    #[error("store outcome unknown: {0}")]
    OutcomeUnknown(String),
    /// A record does not decode: the data is damaged or from an incompatible version.
    #[error("store record damaged: {0}")]
    Corrupt(String),
    /// A task with this id exists already.
    #[error("task {0} exists already")]
    Exists(TaskId),
    /// Concurrent writers kept changing the record; the change was not applied.
    #[error("too much contention on task {0}; try again")]
    Contention(TaskId),
    /// The task's executor is locked (for this reason): a locked agent gets no new task.
    #[error("the agent is locked: {0}")]
    Locked(String),
}

/// Why [`TaskStore::update_task`] did not apply a change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UpdateError {
    /// No such task.
    #[error("no such task")]
    NotFound,
    /// The task's rules refused the change; the task is unchanged.
    #[error(transparent)]
    Rejected(#[from] TaskError),
    /// The store failed; the task is unchanged.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A change to one task: applied to the current version, atomically. It may run more than once
/// (Redis retries on conflict), so it must be a pure function of the task.
pub type TaskChange = std::sync::Arc<dyn Fn(&mut Task) -> Result<(), TaskError> + Send + Sync>;

/// The version of a task as its store holds it: it changes whenever the task does (a counter on
/// Redis, a digest of the record on the embedded store). Opaque outside the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Revision(pub u64);

/// A task with the [`Revision`] it was read at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionedTask {
    /// The task.
    pub task: Task,
    /// Its revision.
    pub revision: Revision,
}

/// Why [`LeaseStore::issue_lease`] did not record a lease.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IssueError {
    /// No such task.
    #[error("no such task")]
    NotFound,
    /// The task does not allow it now: not approved, past its deadline, another executor.
    #[error(transparent)]
    Refused(#[from] TaskError),
    /// The agent is locked (force-revoked).
    #[error("agent is locked: {0}")]
    Locked(String),
    /// The store has no epoch marker: it was reset (its data lost) since the broker last
    /// looked. Nothing is recorded; the broker starts a new epoch first.
    #[error("the store was reset")]
    StoreReset,
    /// A lease with this id is recorded already (an earlier attempt of the same request);
    /// nothing is changed.
    #[error("a lease with this id exists")]
    Exists,
    /// The task changed since the revision the caller decided on; nothing is recorded. Holds
    /// the task as it is now.
    #[error("the task changed since it was read")]
    Changed(Box<VersionedTask>),
    /// The store failed; nothing was recorded.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Which tasks to list, newest first.
#[derive(Debug, Clone)]
pub struct TaskQuery {
    /// Only in this state.
    pub state: Option<TaskState>,
    /// Only with this executor.
    pub executor: Option<WorkloadId>,
    /// Only with this requester.
    pub requester: Option<WorkloadId>,
    /// Only tasks older than this one (the page cursor).
    pub before: Option<TaskId>,
    /// Most tasks in the page.
    pub limit: usize,
    /// Most tasks examined for one page; bounds the cost of a selective filter. The page then
    /// ends early with a cursor to continue from.
    pub max_scan: usize,
}

/// One page of tasks.
#[derive(Debug, Clone, Default)]
pub struct TaskPage {
    /// The tasks, newest first.
    pub tasks: Vec<Task>,
    /// Where the next page starts, if there may be more.
    pub next: Option<TaskId>,
}

impl TaskQuery {
    /// Whether `task` matches the filters (the cursor and limits aside).
    pub fn matches(&self, task: &Task) -> bool {
        self.state.is_none_or(|s| task.state == s)
            && self.executor.as_ref().is_none_or(|e| &task.executor == e)
            && self.requester.as_ref().is_none_or(|r| &task.requester == r)
    }
}

/// The store's epoch marker: made once when the store is first used, so that a store that
/// comes back empty (Redis restarted without persistence) shows a new epoch and brokers notice.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Epoch {
    /// A random id (UUIDv7).
    pub id: String,
    /// When it was made: nothing in the store is older.
    pub started_at: SystemTime,
}

impl Epoch {
    /// A new epoch starting at `now`.
    pub fn new(now: SystemTime) -> Self {
        Self {
            id: uuid::Uuid::now_v7().hyphenated().to_string(),
            started_at: now,
        }
    }
}

/// The next credential of a renewed lease ([`LeaseStore::renew_lease`]).
#[derive(Debug, Clone, Copy)]
pub struct Renewal<'a> {
    /// The new credential's id (a `jti` or a certificate serial).
    pub credential: &'a str,
    /// When it expires.
    pub expires_at: SystemTime,
    /// The time the renewal is checked at.
    pub now: SystemTime,
}

/// One step of a lock's sweep ([`LockStore::sweep_lock`]).
#[derive(Debug, Clone, Copy)]
pub struct LockSweep<'a> {
    /// The locked agent.
    pub agent: &'a WorkloadId,
    /// The reason the ended tasks and revoked leases carry.
    pub reason: &'a str,
    /// The time they were ended at (the lock's).
    pub at: SystemTime,
    /// How long the ended tasks stay readable.
    pub retention: Duration,
    /// The most tasks, and the most leases, one step ends.
    pub limit: usize,
}

/// A read of the revocation log ([`RevocationLog::revocations`]).
#[derive(Debug, Clone, Copy)]
pub struct LogRead {
    /// Entries after this cursor; from the log's start when `None`.
    pub after: Option<Cursor>,
    /// The most entries returned.
    pub limit: usize,
    /// How long to wait for an entry when there is none yet (zero: answer at once).
    pub wait: Duration,
}

/// A claim: `value` under `key` until `until` ([`ClaimStore`]).
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    /// What is claimed.
    pub key: &'a str,
    /// Who or what holds it.
    pub value: &'a str,
    /// When the claim lapses.
    pub until: SystemTime,
}

/// How long after a task with delegated children ends it is filed due again
/// ([`TaskStore::end_task`], [`LockStore::sweep_lock`]): the replica that ended it ends the tasks
/// below it meanwhile, and the reaper then makes sure they ended (a replica may die, or its
/// store fail, half way down the tree).
pub const CASCADE_GRACE: Duration = Duration::from_secs(10);

/// Longest wait [`RevocationLog::revocations`] accepts.
pub const MAX_REVOCATION_WAIT: Duration = Duration::from_secs(10);

/// Tasks, kept atomically (see the module docs): writing, reading, changing, listing, ending
/// (with their leases) and pruning them.
#[async_trait]
pub trait TaskStore: Send + Sync {
    /// Writes a new task, unless its executor is locked (at the task's `created_at`): a locked
    /// agent gets no new task, in the same atomic step as the lock's check.
    ///
    /// # Errors
    /// [`StoreError::Exists`] for a known id; [`StoreError::Locked`];
    /// [`StoreError::Unavailable`], [`StoreError::OutcomeUnknown`].
    async fn create_task(&self, task: &Task) -> Result<(), StoreError>;

    /// Reads a task.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`], [`StoreError::Corrupt`].
    async fn get_task(&self, id: &TaskId) -> Result<Option<Task>, StoreError> {
        Ok(self.get_versioned_task(id).await?.map(|v| v.task))
    }

    /// Reads a task with its [`Revision`], for [`LeaseStore::issue_lease`] to check against.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`], [`StoreError::Corrupt`].
    async fn get_versioned_task(&self, id: &TaskId) -> Result<Option<VersionedTask>, StoreError>;

    /// Applies `change` to the current version of the task, atomically, and returns the result.
    /// A task that reaches a terminal state is kept for `retention` after it ends.
    ///
    /// # Errors
    /// [`UpdateError`]: not found, refused by the rules, or the store failed (task unchanged).
    async fn update_task(
        &self,
        id: &TaskId,
        change: TaskChange,
        retention: Duration,
    ) -> Result<Task, UpdateError>;

    /// Lists tasks, newest first.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`], [`StoreError::Corrupt`].
    async fn list_tasks(&self, query: &TaskQuery) -> Result<TaskPage, StoreError>;

    /// Ends a task and revokes every active lease of it, atomically: `change` must move the task
    /// to a terminal state. A lease recorded concurrently is either refused (the task changed)
    /// or revoked with the others; never left active on an ended task. A task that ends with
    /// children is filed due again (as by its deadline) at its end plus [`CASCADE_GRACE`], in
    /// the same step, so that the reaper ends what is below it if its ender could not. Returns
    /// the task and the leases revoked.
    ///
    /// A store may revoke a task with many leases in bounded steps: the end holds at once (no
    /// lease of the task reads active, renews or issues from the first step on), and the rest
    /// of its leases are revoked and logged in later steps. A step that fails after the first
    /// leaves the task filed due as above, and the answer is `Ok` with the leases revoked so
    /// far (the end itself happened); ending an ended task again finishes what is left.
    ///
    /// # Errors
    /// [`UpdateError`]; nothing is changed.
    async fn end_task(
        &self,
        id: &TaskId,
        change: TaskChange,
        retention: Duration,
    ) -> Result<(Task, Vec<Lease>), UpdateError>;

    /// Deletes tasks that ended before `ended_before`, with their history. Returns how many.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    async fn prune_ended(&self, ended_before: SystemTime) -> Result<usize, StoreError>;
}

/// Leases: recording one against its task, finding, renewing and revoking them, and counting
/// the unrevoked ones.
#[async_trait]
pub trait LeaseStore: Send + Sync {
    /// Records `lease` if, in the same atomic step, its task exists, is approved, is before its
    /// deadline, is executed by `lease.agent`, and the agent is not locked. Marks the task as
    /// started. Only after this returns may the credential be signed and handed out. A lease
    /// id is recorded once: [`IssueError::Exists`] for a known one (a retried request).
    ///
    /// `seen` is the task as the caller read it (from [`TaskStore::get_versioned_task`]) and
    /// decided on, if it did: the lease is recorded only if the store still holds that
    /// revision (the store may then check `seen` instead of reading the task again: one round
    /// trip), else nothing is recorded and the answer is [`IssueError::Changed`] with the task
    /// as it is now, for the caller to decide again. Without `seen`, the store reads the task
    /// itself. Returns the task as this issuance left it when it changed it (the first
    /// issuance marks the task started), so a caller keeping tasks can refresh.
    ///
    /// # Errors
    /// [`IssueError`]; nothing is recorded.
    async fn issue_lease(
        &self,
        lease: &Lease,
        seen: Option<(&Task, Revision)>,
        now: SystemTime,
    ) -> Result<Option<VersionedTask>, IssueError>;

    /// The lease of task `task` whose current credential is `credential` (a `jti` or serial).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`], [`StoreError::Corrupt`].
    async fn find_lease(
        &self,
        task: &TaskId,
        credential: &str,
    ) -> Result<Option<Lease>, StoreError>;

    /// The lease with this id.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`], [`StoreError::Corrupt`].
    async fn get_lease(&self, id: &LeaseId) -> Result<Option<Lease>, StoreError>;

    /// Every lease of task `task`, in issuance order, whatever its state.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`], [`StoreError::Corrupt`].
    async fn task_leases(&self, task: &TaskId) -> Result<Vec<Lease>, StoreError>;

    /// Replaces the credential of an active lease (renewal), re-checking in the same atomic
    /// step its task (approved, before its deadline, executed by the lease's agent), the
    /// agent's lock, and that the lease is active and unexpired at [`Renewal::now`]. The
    /// previous credential stops being active.
    ///
    /// # Errors
    /// [`IssueError`]: `NotFound` for no such lease; `Refused` when the task or lease forbids.
    async fn renew_lease(&self, id: &LeaseId, to: &Renewal<'_>) -> Result<Lease, IssueError>;

    /// Ends one lease as revoked.
    ///
    /// # Errors
    /// [`UpdateError`]: `NotFound`, or `Rejected` when the lease is not active.
    async fn revoke_lease(
        &self,
        id: &LeaseId,
        reason: &str,
        now: SystemTime,
    ) -> Result<Lease, UpdateError>;

    /// How many leases are unrevoked: live ones, and expired ones the reaper has not yet
    /// reached (the `taskcred_leases_active` gauge). Cheap: the size of the expiry index.
    async fn live_leases(&self) -> Result<u64, StoreError>;
}

/// Agent locks (force-revoke): setting one, the sweep that ends what it covers, lifting and
/// reading them.
#[async_trait]
pub trait LockStore: Send + Sync {
    /// Locks an agent, in one short atomic step, and returns the lock in force: the one asked
    /// for, or the earlier one where that ends later (locks only grow). It takes effect at
    /// once: issuance and renewal check it in their own atomic step, introspection reads it.
    /// The agent's open tasks and live leases are then ended by [`LockStore::sweep_lock`]. A lock
    /// with `until` lifts by itself then.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`], [`StoreError::OutcomeUnknown`].
    async fn lock_agent(&self, lock: &Lock) -> Result<Lock, StoreError>;

    /// Ends, in one bounded atomic step, up to `limit` open tasks (moved to `revoked`, kept
    /// for `retention`) and up to `limit` live leases (revoked, logged) of the locked `agent`,
    /// with `reason`, at `at`. Only what is open or live is walked, never the agent's history;
    /// each task or lease is ended once whatever the number of sweepers. A task it ends that has
    /// children is filed due again at `at` plus [`CASCADE_GRACE`], as by
    /// [`TaskStore::end_task`]. Call again while
    /// [`Swept::remaining`] is not zero.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`], [`StoreError::OutcomeUnknown`]; what was ended stays ended.
    async fn sweep_lock(&self, step: &LockSweep<'_>) -> Result<Swept, StoreError>;

    /// Lifts the lock of `agent`, returning it if there was one.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    async fn unlock_agent(&self, agent: &WorkloadId) -> Result<Option<Lock>, StoreError>;

    /// The lock of `agent`, if one holds at `now`.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`], [`StoreError::Corrupt`].
    async fn agent_lock(
        &self,
        agent: &WorkloadId,
        now: SystemTime,
    ) -> Result<Option<Lock>, StoreError>;

    /// Every lock that holds at `now`.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`], [`StoreError::Corrupt`].
    async fn list_locks(&self, now: SystemTime) -> Result<Vec<Lock>, StoreError>;
}

/// What falls due, for the reaper: expiring leases, tasks past their deadline, and the next
/// moment anything is due.
#[async_trait]
pub trait DueStore: Send + Sync {
    /// Ends as expired up to `limit` active leases whose credential expired at or before
    /// `now`, earliest first, found through an index by expiry (never a scan of all leases).
    /// Each is claimed atomically: of several brokers reaping at once, exactly one ends a
    /// given lease. A renewed lease found under its old expiry is re-filed under the new one.
    /// Returns the leases this call ended.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`]; what was ended stays ended, the rest stays due.
    async fn expire_leases(&self, now: SystemTime, limit: usize) -> Result<Vec<Lease>, StoreError>;

    /// Up to `limit` tasks whose deadline passed at or before `now`, earliest first, as filed
    /// when created (some may have ended since), or as filed again when a task with children
    /// ended. The reaper ends the open ones with [`TaskStore::end_task`], ends what is below
    /// the ended ones, and then [`DueStore::forget_deadline`]s them.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    async fn overdue_tasks(&self, now: SystemTime, limit: usize)
    -> Result<Vec<TaskId>, StoreError>;

    /// Drops a task from the index of deadlines.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    async fn forget_deadline(&self, id: &TaskId) -> Result<(), StoreError>;

    /// The earliest time something is due: a lease expiry or a task deadline still filed.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    async fn next_due(&self) -> Result<Option<SystemTime>, StoreError>;
}

/// The durable revocation log: every revocation, in order, read by cursor and pruned by age.
#[async_trait]
pub trait RevocationLog: Send + Sync {
    /// Up to `limit` entries of the revocation log after `after` (from its start when `None`),
    /// oldest first. Every revocation (by an operator, a task's end, a lock, or a renewal that
    /// supersedes a credential) is logged in the same atomic step as the revocation itself;
    /// expiry is not (verifiers check `exp`). With a non-zero `wait` (at most
    /// [`MAX_REVOCATION_WAIT`]) and nothing after `after` yet, waits up to that long for an
    /// entry.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`], [`StoreError::Corrupt`].
    async fn revocations(&self, read: LogRead) -> Result<Vec<Revocation>, StoreError>;

    /// The cursor of the log's last entry ([`Cursor::START`] when it is empty).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    async fn revocation_head(&self) -> Result<Cursor, StoreError>;

    /// Drops the log entries logged before `before` (every credential they name has expired
    /// when `before` is at least the longest credential lifetime ago).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    async fn prune_revocations(&self, before: SystemTime) -> Result<(), StoreError>;
}

/// Store-wide records: the epoch marker, the published signing keys, and the readiness probe.
#[async_trait]
pub trait MetaStore: Send + Sync {
    /// The store's epoch marker; `fresh` is written (atomically, if there is none yet) and
    /// returned when the store has none.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`], [`StoreError::Corrupt`].
    async fn epoch(&self, fresh: &Epoch) -> Result<Epoch, StoreError>;

    /// Publishes a public signing key until `key.until`, replacing an earlier publication of
    /// the same `kid` (so a later `until` extends it and an earlier one shortens it).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    async fn publish_key(&self, key: &PublishedKey) -> Result<(), StoreError>;

    /// Every key published until after `now`. Keys whose time has passed are dropped.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`], [`StoreError::Corrupt`].
    async fn published_keys(&self, now: SystemTime) -> Result<Vec<PublishedKey>, StoreError>;

    /// Checks that the store answers and takes a write (a Redis that is read-only, out of memory
    /// or failing to persist answers reads but refuses writes: that broker is not ready).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    async fn ping(&self) -> Result<(), StoreError>;
}

/// Claims: a value under a key until an expiry, held once across replicas.
#[async_trait]
pub trait ClaimStore: Send + Sync {
    /// Records `value` under `key` until `until`, unless `key` holds an unexpired value: then
    /// that value comes back and nothing changes. One atomic step, shared by every replica.
    /// What must happen once (a CI ID token exchanged for an audience) and what must be one
    /// record for many callers (the task of a CI job) are claims.
    async fn claim(&self, claim: &Claim<'_>) -> Result<Option<String>, StoreError>;

    /// The value of the unexpired claim `key`, if any.
    async fn claimed(&self, key: &str) -> Result<Option<String>, StoreError>;

    /// Removes the claim `key` if it still holds `value` (work that claimed, then failed).
    async fn release_claim(&self, key: &str, value: &str) -> Result<(), StoreError>;

    /// Replaces the unexpired claim `key` by `value` until `until` if it still holds
    /// `expected`, in one atomic step; returns whether it did. A holder keeps its claim
    /// (`expected == value`, a later `until`), or moves a mark forward that only it may move.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`], [`StoreError::OutcomeUnknown`].
    async fn swap_claim(&self, expected: &str, claim: &Claim<'_>) -> Result<bool, StoreError>;
}

/// The whole store: every concern above, as the broker holds it (`Arc<dyn Store>`). Each
/// backend implements every concern trait, then this one (empty).
pub trait Store:
    TaskStore
    + LeaseStore
    + LockStore
    + DueStore
    + RevocationLog
    + MetaStore
    + ClaimStore
    + std::fmt::Debug
{
}

/// Milliseconds since the Unix epoch (0 before it).
pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Milliseconds since the Unix epoch, rounded up: a time filed under it is due only once it
/// has passed.
pub(crate) fn unix_ms_ceil(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        if d.subsec_nanos() % 1_000_000 == 0 {
            ms
        } else {
            ms.saturating_add(1)
        }
    })
}

/// The time `ms` milliseconds after the Unix epoch.
pub(crate) fn from_unix_ms(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

pub(crate) fn encode(task: &Task) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(task).map_err(|e| StoreError::Corrupt(format!("encoding task: {e}")))
}

pub(crate) fn decode(bytes: &[u8]) -> Result<Task, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("decoding task: {e}")))
}

pub(crate) fn encode_lease(lease: &Lease) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(lease).map_err(|e| StoreError::Corrupt(format!("encoding lease: {e}")))
}

pub(crate) fn decode_lease(bytes: &[u8]) -> Result<Lease, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("decoding lease: {e}")))
}

/// Whether `lease` may get a new credential at `now`.
///
/// # Errors
/// [`TaskError::Precondition`] when it is not active or has expired.
pub fn check_renewable(lease: &Lease, now: SystemTime) -> Result<(), TaskError> {
    if lease.state != crate::lease::LeaseState::Active {
        return Err(TaskError::Precondition(Unmet::LeaseEnded(
            match lease.state {
                crate::lease::LeaseState::Revoked => "revoked",
                _ => "expired",
            },
        )));
    }
    if now >= lease.expires_at {
        return Err(TaskError::Precondition(Unmet::LeaseExpired));
    }
    Ok(())
}

/// The reason recorded on leases revoked because their task ended.
pub fn task_ended_reason(task: &Task) -> String {
    format!("task {}", task.state)
}
