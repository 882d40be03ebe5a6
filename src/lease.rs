//! Leases: the record of a credential issued for a task. A lease is written (durably) before its
//! credential is signed and returned; it ends when revoked, when its task ends, or when it
//! expires. Pure: no I/O, time is passed in.

use std::fmt;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::identity::WorkloadId;
use crate::task::{Forbidden, Task, TaskError, TaskId, TaskState, Unmet};

/// A lease id: `<task id>.<16 hex digits>`, so that the id names its task (a store needs no
/// index from lease to task) and, within a task, sorts in issuance order. Ids of earlier
/// versions (a bare UUIDv7) still parse; they name no task.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LeaseId(String);

/// The length of a task id in a lease id (a hyphenated UUID).
const TASK_LEN: usize = 36;

impl LeaseId {
    /// A fresh id for a lease of `task`.
    pub fn generate(task: &TaskId) -> Self {
        Self(format!("{task}.{:016x}", next_suffix()))
    }

    /// Parses a canonical lease id.
    ///
    /// # Errors
    /// [`TaskError::Invalid`] (field `lease_id`).
    pub fn parse(s: &str) -> Result<Self, TaskError> {
        let bad = || TaskError::Invalid {
            field: "lease_id",
            reason: "not a lease id (<task id>.<16 lowercase hex digits>)".into(),
        };
        if let Some((task, suffix)) = s.split_once('.') {
            TaskId::parse(task).map_err(|_| bad())?;
            if suffix.len() != 16
                || !suffix
                    .bytes()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            {
                return Err(bad());
            }
            return Ok(Self(s.to_owned()));
        }
        let u = uuid::Uuid::try_parse(s).map_err(|_| bad())?;
        if u.get_version_num() != 7 || u.hyphenated().to_string() != s {
            return Err(bad());
        }
        Ok(Self(s.to_owned()))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The task the id names (none for an id of an earlier version).
    pub fn task(&self) -> Option<TaskId> {
        self.0
            .get(..TASK_LEN)
            .filter(|_| self.0.len() > TASK_LEN)
            .and_then(|t| TaskId::parse(t).ok())
    }

    /// What follows the task in the id: its 8 bytes (none for an id of an earlier version).
    pub fn suffix(&self) -> Option<[u8; 8]> {
        let hex = self.0.get(TASK_LEN + 1..).filter(|h| h.len() == 16)?;
        u64::from_str_radix(hex, 16).ok().map(u64::to_be_bytes)
    }

    /// The id of `task`'s lease with `suffix` (what [`suffix`](Self::suffix) returned).
    pub fn from_parts(task: &TaskId, suffix: [u8; 8]) -> Self {
        Self(format!("{task}.{:016x}", u64::from_be_bytes(suffix)))
    }
}

/// The next lease id suffix of this process: milliseconds since 2020 in the high 42 bits, a
/// random start in the low 22, and always above the last one (so a process's ids sort in the
/// order it issued them, and two replicas' ids of the same millisecond differ but by chance).
fn next_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    const EPOCH_2020_MS: u64 = 1_577_836_800_000;
    let ms = crate::store::unix_ms(SystemTime::now()).saturating_sub(EPOCH_2020_MS);
    // The low bits of a UUIDv7 are random (its counter, if any, sits above them).
    let random = u64::from(uuid::Uuid::now_v7().as_u128() as u32) & ((1 << 22) - 1);
    let fresh = (ms << 22) | random;
    let mut last = LAST.load(Ordering::Relaxed);
    loop {
        let next = fresh.max(last + 1);
        match LAST.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(seen) => last = seen,
        }
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What kind of credential a lease tracks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CredentialKind {
    /// An RFC 9068 JWT access token; the credential id is its `jti`.
    Jwt,
    /// An X509-SVID; the credential id is its serial, in hex.
    X509,
}

/// Where a lease is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseState {
    /// Its credential may be used until it expires.
    Active,
    /// Ended before its time: revoked, or its task ended.
    Revoked,
    /// Its time passed.
    Expired,
}

impl LeaseState {
    /// Its name: `active`, `revoked`, `expired`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Revoked => "revoked",
            Self::Expired => "expired",
        }
    }

    /// The state named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Active, Self::Revoked, Self::Expired]
            .into_iter()
            .find(|st| st.as_str() == s)
    }
}

impl CredentialKind {
    /// Its name: `jwt`, `x509`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Jwt => "jwt",
            Self::X509 => "x509",
        }
    }
}

/// One issued credential and what it is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Its id.
    pub id: LeaseId,
    /// The task it serves.
    pub task: TaskId,
    /// The executor it was issued to.
    pub agent: WorkloadId,
    /// JWT or X.509.
    pub kind: CredentialKind,
    /// The `jti` or serial of the current credential.
    pub credential: String,
    /// The one audience of a JWT.
    pub audience: Option<String>,
    /// The actions granted (the token's `scope`).
    pub actions: Vec<String>,
    /// `x5t#S256` of the client certificate the credential is bound to.
    pub cnf: String,
    /// When the lease began.
    pub issued_at: SystemTime,
    /// When the current credential expires.
    pub expires_at: SystemTime,
    /// Renewals may not go past this.
    pub renew_until: SystemTime,
    /// Where it is.
    pub state: LeaseState,
    /// When it ended.
    pub ended_at: Option<SystemTime>,
    /// Why it ended.
    pub reason: Option<String>,
}

impl Lease {
    /// Whether the credential `id` of this lease is usable at `now`.
    pub fn is_active(&self, credential: &str, now: SystemTime) -> bool {
        self.state == LeaseState::Active && self.credential == credential && now < self.expires_at
    }

    /// Ends the lease as revoked, if it is active.
    pub fn revoke(&mut self, reason: &str, now: SystemTime) -> bool {
        if self.state != LeaseState::Active {
            return false;
        }
        self.state = LeaseState::Revoked;
        self.ended_at = Some(now);
        self.reason = Some(reason.to_owned());
        true
    }

    /// Ends the lease as expired, if it is active and its credential has expired at `now`.
    pub fn expire(&mut self, now: SystemTime) -> bool {
        if self.state != LeaseState::Active || now < self.expires_at {
            return false;
        }
        self.state = LeaseState::Expired;
        self.ended_at = Some(self.expires_at);
        self.reason = Some("expired".into());
        true
    }
}

/// A force-revoke: while it holds, nothing is issued or renewed to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lock {
    /// The locked agent.
    pub agent: WorkloadId,
    /// Why, as the operator wrote it.
    pub reason: String,
    /// Who locked it.
    pub operator: WorkloadId,
    /// When.
    pub at: SystemTime,
    /// When it lifts by itself, if ever.
    pub until: Option<SystemTime>,
}

impl Lock {
    /// Whether the lock holds at `now`.
    pub fn holds_at(&self, now: SystemTime) -> bool {
        self.until.is_none_or(|u| now < u)
    }

    /// Whether this lock, in force at `now`, lasts at least as long as `other` would: then
    /// `other` leaves it as it is (locks are monotonic: the later end wins, no end is latest).
    pub fn outlasts(&self, other: &Self, now: SystemTime) -> bool {
        self.holds_at(now)
            && match (self.until, other.until) {
                (None, _) => true,
                (Some(_), None) => false,
                (Some(mine), Some(theirs)) => mine >= theirs,
            }
    }
}

/// What locking an agent ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LockOutcome {
    /// The lock in force after the call: the one asked for, or the earlier one where that ends
    /// later (a lock never shortens or lifts a lock in force). `None` only in a default value.
    pub in_force: Option<Lock>,
    /// Tasks moved to `revoked`.
    pub tasks: Vec<TaskId>,
    /// Leases revoked (with their credential ids).
    pub leases: Vec<Lease>,
    /// Whether some of the agent's tasks or leases are still to be ended: the store failed
    /// during the sweep. The lock holds meanwhile (nothing is issued, renewed or introspected
    /// active) and the reaper ends the rest.
    pub pending: bool,
}

/// What one bounded step of a lock's sweep ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Swept {
    /// Tasks moved to `revoked`.
    pub tasks: Vec<TaskId>,
    /// Leases revoked.
    pub leases: Vec<Lease>,
    /// Open tasks and live leases of the agent still to be looked at.
    pub remaining: usize,
}

/// Why a credential may not be issued for a task at this moment. The store re-checks these in
/// the same atomic step that writes the lease.
///
/// # Errors
/// [`TaskError::Forbidden`] when `agent` is not the executor; [`TaskError::Precondition`] when
/// the task is not approved or its deadline has passed.
pub fn check_issuable(task: &Task, agent: &WorkloadId, now: SystemTime) -> Result<(), TaskError> {
    if &task.executor != agent {
        return Err(TaskError::Forbidden(Forbidden::NotExecutor));
    }
    if task.state != TaskState::Approved {
        return Err(TaskError::Precondition(Unmet::NotApproved(task.state)));
    }
    if now >= task.deadline {
        return Err(TaskError::Precondition(Unmet::DeadlinePassed));
    }
    Ok(())
}

/// A place in the store's revocation log, in log order: `<ms>-<seq>` (a Redis stream id; the
/// embedded store numbers its log the same way). A watcher resumes after the last it saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cursor {
    /// Milliseconds since the Unix epoch when the entry was logged.
    pub ms: u64,
    /// Order among the entries of one millisecond.
    pub seq: u64,
}

impl Cursor {
    /// Before every entry.
    pub const START: Self = Self { ms: 0, seq: 0 };

    /// Parses `<ms>-<seq>` (decimal, no sign, no spaces).
    pub fn parse(s: &str) -> Option<Self> {
        let (ms, seq) = s.split_once('-')?;
        let digits =
            |p: &str| !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit());
        if !digits(ms) || !digits(seq) {
            return None;
        }
        Some(Self {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// Why a revocation log entry says a renewed lease's previous credential ended.
pub const SUPERSEDED: &str = "superseded by renewal";

/// A credential that stopped being usable before its own expiry, as the revocation log keeps
/// it until that expiry: what verifiers following the watch stream or the CRL must refuse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// Where it sits in the log (set by the store when read back).
    #[serde(skip)]
    pub cursor: Cursor,
    /// JWT or X.509.
    pub kind: CredentialKind,
    /// The `jti` or serial (hex) that was revoked.
    pub credential: String,
    /// Its lease.
    pub lease: LeaseId,
    /// The lease's task.
    pub task: TaskId,
    /// The agent it was issued to.
    pub agent: WorkloadId,
    /// The audience of a JWT.
    pub audience: Option<String>,
    /// Why it ended.
    pub reason: String,
    /// When it was revoked.
    pub revoked_at: SystemTime,
    /// When the credential expires by itself; the entry is useless after.
    pub expires_at: SystemTime,
}

impl Revocation {
    /// The revocation of `lease`'s current credential, at `at`, for `reason`.
    pub fn of(lease: &Lease, reason: &str, at: SystemTime) -> Self {
        Self {
            cursor: Cursor::START,
            kind: lease.kind,
            credential: lease.credential.clone(),
            lease: lease.id.clone(),
            task: lease.task,
            agent: lease.agent.clone(),
            audience: lease.audience.clone(),
            reason: reason.to_owned(),
            revoked_at: at,
            expires_at: lease.expires_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An id names its task and parses back; a process's ids of one task sort in the order it
    /// made them; ids of other shapes are refused, earlier versions' ids still parse.
    #[test]
    fn lease_ids_name_their_task_and_sort_in_issuance_order() {
        let task = TaskId::generate();
        let ids: Vec<LeaseId> = (0..1000).map(|_| LeaseId::generate(&task)).collect();
        for pair in ids.windows(2) {
            assert!(pair[0] < pair[1], "{} {}", pair[0], pair[1]);
        }
        let id = &ids[0];
        assert_eq!(LeaseId::parse(id.as_str()).unwrap(), *id);
        assert_eq!(id.task(), Some(task));
        assert_eq!(LeaseId::from_parts(&task, id.suffix().unwrap()), *id);
        let text = id.as_str();
        for bad in [
            text.to_uppercase(),
            format!("{text}0"),
            text[..text.len() - 1].to_owned(),
            format!("{task}."),
            format!(".{}", &text[37..]),
            format!("{task}.+{}", &text[38..]),
            format!("{text}.x"),
        ] {
            assert!(LeaseId::parse(&bad).is_err(), "{bad}");
        }
        let old = uuid::Uuid::now_v7().hyphenated().to_string();
        let old = LeaseId::parse(&old).unwrap();
        assert_eq!(old.task(), None);
        assert_eq!(old.suffix(), None);
    }
}
