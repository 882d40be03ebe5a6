//! The key layout of the Redis store, written once: every key name and key function, and the
//! templates the Lua scripts get for keys they can only name once they have read an id. No
//! script spells a key name itself; each takes its keys as `KEYS` or, when built from data it
//! reads, a template as `ARGV` from here.
//!
//! Keys (`{}` is the hash tag: everything of one task stays in one Redis Cluster slot):
//! - `tc:task:{<id>}`: the task, a hash: `v` (version), `data` (JSON), the overlay a lock's
//!   sweep lays over the JSON (`state`, `ended_ms`, `end_reason`), `x` (the executor, so that
//!   scripts need not decode the JSON), and once the task has ended, when its leases ended:
//!   `le` (8 bytes, ns since the epoch, big-endian), `lm` (the same in ms, decimal), `lr` (the
//!   reason its leases carry), and `rc` while the revocation of its leases is unfinished (the
//!   `HSCAN` cursor of `tc:l:{<id>}` where the next chunk starts). Updates compare-and-set on
//!   `v`, and every script that changes the task's fields bumps `v`: an issuance is recorded
//!   against the revision the broker decided on (the broker checked that copy), so a change
//!   that left `v` alone would let a stale copy through. The task key is the one of earlier
//!   layouts: tasks stay readable across the upgrade.
//! - `tc:l:{<task>}`: the task's leases, a hash: field the lease id's 8-byte suffix
//!   ([`LeaseId::suffix`](crate::lease::LeaseId::suffix)), value the lease record (codec.rs
//!   `encode_record`: a version byte, state, kind, fixed-width times, the credential, audience,
//!   actions and `cnf` thumbprint; no task, no agent: the key and the task say them).
//! - `tc:c:{<task>}`: the task's credentials, a hash: field the credential id packed (codec.rs
//!   `credential_field`: 16 raw bytes for a 32-hex-digit `jti` or serial), value the lease's
//!   suffix. A renewed lease keeps its earlier credentials' entries (they find the lease, which
//!   no longer vouches for them).
//! - A lease of a task that has ended (`le` set) is ended from that moment, whatever its record
//!   says: every read, renewal and revocation reads the task in the same script. The records,
//!   the expiry index and the revocation log then follow in bounded chunks (`rc`).
//! - `tc:exp`: active leases by expiry, a sorted set: member 24 bytes (the task's 16 uuid bytes
//!   and the lease's 8-byte suffix: [`member`]), score the expiry in ms (rounded up). What the
//!   reaper walks, and the count of live leases.
//! - `tc:lock:<agent>`: the agent's lock (JSON); `tc:locks`: the agents with one. The lock is
//!   read in the issuance script with the task's keys; on Redis Cluster that needs the lock in
//!   the task's slot (not yet: one node or a replicated primary today).
//! - `tc:open:<agent>`: the agent's open tasks (pending or approved) as executor: what a lock's
//!   sweep ends; `tc:live:<agent>`: the agent's tasks that may hold live leases (added by each
//!   issuance, removed once the task has ended and its leases are all revoked): what a lock's
//!   sweep revokes leases of. An index by agent of tasks, not of leases: no per-lease entry.
//! - `tc:idx:tasks`, `tc:idx:executor:<spiffe id>`, `tc:idx:requester:<spiffe id>`: sorted sets
//!   of task ids (score 0, ordered by id, which is creation order). Index entries are written
//!   before the task, so a failure leaves at most an entry that points nowhere; readers skip and
//!   remove such entries. Nothing else is ever half-written.
//! - `tc:deadlines`: tasks by deadline (and, filed again, ended tasks whose children are
//!   unfinished, at their end plus `CASCADE_GRACE`, or whose lease revocations are, at their
//!   end plus 1 s).
//! - `tc:revocations`: the revocation log, a stream appended by the revoking scripts themselves
//!   (so an entry exists exactly when the revocation happened); its ids are the watchers'
//!   cursors, read with `XRANGE` and waited for with a blocking `XREAD` on a connection of its
//!   own. Trimmed by `MINID` once the credentials it names have expired. Like `tc:exp`, it is
//!   one key for all tasks: Redis Cluster needs it split per slot (not yet).
//!
//! Keys of the earlier layout that this one no longer reads (`tc:lease:*`, `tc:leases:*`,
//! `tc:cred:*`, `tc:leaseidx:*`, `tc:expiry`; the `task/lease` members of `tc:live:*`): see docs/runbook.md, "Upgrade the
//! Redis layout".

use crate::task::TaskId;

/// All tasks, by id (a sorted set, score 0).
pub(super) const ALL_TASKS: &str = "tc:idx:tasks";
/// The set of agents with a lock (locks expire by themselves; readers drop stale members).
pub(super) const LOCKS: &str = "tc:locks";
/// Active leases by expiry: member [`member`] (24 bytes), score the expiry in ms (rounded up).
pub(super) const EXPIRY: &str = "tc:exp";
/// Tasks by deadline: member the task id, score the deadline in ms (rounded up).
pub(super) const DEADLINES: &str = "tc:deadlines";
/// Published signing keys: field `kid`, value the JSON [`PublishedKey`](crate::mint::PublishedKey).
pub(super) const SIGNING_KEYS: &str = "tc:signing-keys";
/// The store's epoch marker (JSON [`Epoch`](crate::store::Epoch)), written once with `SET NX`.
pub(super) const EPOCH: &str = "tc:epoch";
/// The revocation log: a stream whose entry ids are the watchers' cursors.
pub(super) const REVOCATIONS: &str = "tc:revocations";
/// Written by the readiness probe (a short-lived key): a store that refuses writes is not ready.
pub(super) const READY_PROBE: &str = "tc:ready-probe";

/// What a template has where the id goes: a Lua `string.format` conversion.
const SLOT: &str = "%s";

/// The task key with `%s` for the id ([`task_key`] as a template), for scripts that name tasks
/// they read from a set.
pub(super) fn task_template() -> String {
    task_key(SLOT)
}

/// [`leases_key`] with `%s` for the task id.
pub(super) fn leases_template() -> String {
    leases_key(SLOT)
}

/// [`creds_key`] with `%s` for the task id.
pub(super) fn creds_template() -> String {
    creds_key(SLOT)
}

/// The task's hash.
pub(super) fn task_key(id: &str) -> String {
    format!("tc:task:{{{id}}}")
}

/// The task's leases: suffix -> record.
pub(super) fn leases_key(task: &str) -> String {
    format!("tc:l:{{{task}}}")
}

/// The task's credentials: packed credential id -> suffix.
pub(super) fn creds_key(task: &str) -> String {
    format!("tc:c:{{{task}}}")
}

/// The agent's lock.
pub(super) fn lock_key(agent: &crate::identity::WorkloadId) -> String {
    lock_key_of(agent.as_str())
}

/// [`lock_key`] for an agent read back from [`LOCKS`].
pub(super) fn lock_key_of(agent: &str) -> String {
    format!("tc:lock:{agent}")
}

/// A claim (see [`ClaimStore::claim`](crate::store::ClaimStore::claim)).
pub(super) fn claim_key(key: &str) -> String {
    format!("tc:claim:{key}")
}

/// The agent's open tasks (pending or approved) as executor: what a lock's sweep ends.
pub(super) fn open_key(agent: &str) -> String {
    format!("tc:open:{agent}")
}

/// The agent's tasks that may hold live leases: issued to, and not yet ended with every lease
/// revoked. (An earlier layout kept `task/lease` members here: the sweep drops them.)
pub(super) fn live_key(agent: &str) -> String {
    format!("tc:live:{agent}")
}

/// The tasks of an executor, by id.
pub(super) fn executor_key(who: &str) -> String {
    format!("tc:idx:executor:{who}")
}

/// The tasks of a requester, by id.
pub(super) fn requester_key(who: &str) -> String {
    format!("tc:idx:requester:{who}")
}

/// The 16 bytes of a task id.
pub(super) fn task_bytes(task: &TaskId) -> [u8; 16] {
    // A TaskId is a canonical UUID by construction: it parses.
    uuid::Uuid::try_parse(&task.to_string()).map_or([0; 16], |u| *u.as_bytes())
}

/// The task id of 16 uuid bytes, if they are one.
pub(super) fn task_of_bytes(bytes: &[u8]) -> Option<TaskId> {
    let u = uuid::Uuid::from_slice(bytes).ok()?;
    TaskId::parse(&u.hyphenated().to_string()).ok()
}

/// A lease as a member of [`EXPIRY`]: the task's 16 bytes, then the lease's 8-byte suffix.
pub(super) fn member(task: &TaskId, suffix: [u8; 8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(24);
    m.extend_from_slice(&task_bytes(task));
    m.extend_from_slice(&suffix);
    m
}

/// The task and suffix of an [`EXPIRY`] member; `None` for anything else.
pub(super) fn parse_member(m: &[u8]) -> Option<(TaskId, [u8; 8])> {
    if m.len() != 24 {
        return None;
    }
    let task = task_of_bytes(&m[..16])?;
    let suffix = <[u8; 8]>::try_from(&m[16..]).ok()?;
    Some((task, suffix))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A template filled in as Lua's `string.format` does is the key itself.
    #[test]
    fn templates_name_the_same_keys() {
        let id = "0190a0b0-0000-7000-8000-000000000001";
        assert_eq!(task_template().replacen(SLOT, id, 1), task_key(id));
        assert_eq!(leases_template().replacen(SLOT, id, 1), leases_key(id));
        assert_eq!(creds_template().replacen(SLOT, id, 1), creds_key(id));
        for t in [task_template(), leases_template(), creds_template()] {
            assert_eq!(t.matches('%').count(), 1, "{t}");
        }
    }

    /// A member names its task and lease, and nothing else parses as one.
    #[test]
    fn members_round_trip() {
        let task = TaskId::generate();
        let suffix = [1, 2, 3, 4, 5, 6, 7, 8];
        let m = member(&task, suffix);
        assert_eq!(m.len(), 24);
        assert_eq!(parse_member(&m), Some((task, suffix)));
        assert_eq!(parse_member(b"task/lease"), None);
    }
}
