//! The key layout of the Redis store, written once: every key name and key function, and the
//! templates the Lua scripts get for keys they can only name once they have read an id. No
//! script spells a key name itself; each takes its keys as `KEYS` or, when built from data it
//! reads, a template as `ARGV` from here.
//!
//! Keys (`{}` is the hash tag, so that everything of one task stays in one Redis Cluster slot):
//! - `tc:task:{<id>}`: hash `v` (version), `data` (JSON). Updates compare-and-set on `v`.
//! - `tc:lease:{<task>}:<lease>`: hash `data` (the lease as issued, JSON), `state`, `ended_ms`,
//!   `reason`, `cred`; `tc:leases:{<task>}`: set of the task's lease ids;
//!   `tc:cred:{<task>}:<jti or serial>`: the lease holding that credential.
//! - `tc:lock:<agent>`: the agent's lock (JSON). It is read in the issuance script with the task's
//!   keys; on Redis Cluster that needs the lock in the task's slot (not yet: one node or a
//!   replicated primary today).
//! - `tc:idx:tasks`, `tc:idx:executor:<spiffe id>`, `tc:idx:requester:<spiffe id>`: sorted sets
//!   of task ids (score 0, ordered by id, which is creation order). Index entries are written
//!   before the task, so a failure leaves at most an entry that points nowhere; readers skip and
//!   remove such entries. Nothing else is ever half-written.
//! - `tc:revocations`: the revocation log, a stream appended by the revoking scripts themselves
//!   (so an entry exists exactly when the revocation happened); its ids are the watchers'
//!   cursors, read with `XRANGE` and waited for with a blocking `XREAD` on a connection of its
//!   own. Trimmed by `MINID` once the credentials it names have expired. Like `tc:expiry`, it is
//!   one key for all tasks: Redis Cluster needs it split per slot (not yet).

use crate::identity::WorkloadId;

/// All tasks, by id (a sorted set, score 0).
pub(super) const ALL_TASKS: &str = "tc:idx:tasks";
/// The set of agents with a lock (locks expire by themselves; readers drop stale members).
pub(super) const LOCKS: &str = "tc:locks";
/// Active leases by expiry: member `task/lease` (see [`member`]), score the expiry in ms
/// (rounded up).
pub(super) const EXPIRY: &str = "tc:expiry";
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

/// [`lease_prefix`] with `%s` for the task id, for scripts that name leases they read from a set.
pub(super) fn lease_prefix_template() -> String {
    lease_prefix(SLOT)
}

/// [`live_key`] with `%s` for the agent, for scripts that learn the agent from the lease.
pub(super) fn live_template() -> String {
    live_key(SLOT)
}

/// The task's hash.
pub(super) fn task_key(id: &str) -> String {
    format!("tc:task:{{{id}}}")
}

/// What a lease id follows in its key: `tc:lease:{<task>}:`.
pub(super) fn lease_prefix(task: &str) -> String {
    format!("tc:lease:{{{task}}}:")
}

/// The lease's hash.
pub(super) fn lease_key(task: &str, lease: &str) -> String {
    format!("{}{lease}", lease_prefix(task))
}

/// The set of the task's lease ids.
pub(super) fn leases_key(task: &str) -> String {
    format!("tc:leases:{{{task}}}")
}

/// What a credential id (a JWT's `jti`, a certificate's serial) follows in its key.
pub(super) fn cred_prefix(task: &str) -> String {
    format!("tc:cred:{{{task}}}:")
}

/// The lease holding a credential of the task.
pub(super) fn cred_key(task: &str, credential: &str) -> String {
    format!("{}{credential}", cred_prefix(task))
}

/// The task of a lease, by lease id.
pub(super) fn lease_index_key(lease: &str) -> String {
    format!("tc:leaseidx:{lease}")
}

/// The agent's lock.
pub(super) fn lock_key(agent: &WorkloadId) -> String {
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

/// The agent's live leases (`task/lease`): issued, not yet revoked or expired. What a lock's
/// sweep walks, instead of the agent's whole history.
pub(super) fn live_key(agent: &str) -> String {
    format!("tc:live:{agent}")
}

/// The agent's open tasks (pending or approved) as executor: what a lock's sweep ends.
pub(super) fn open_key(agent: &str) -> String {
    format!("tc:open:{agent}")
}

/// The tasks of an executor, by id.
pub(super) fn executor_key(who: &str) -> String {
    format!("tc:idx:executor:{who}")
}

/// The tasks of a requester, by id.
pub(super) fn requester_key(who: &str) -> String {
    format!("tc:idx:requester:{who}")
}

/// A lease as a member of [`EXPIRY`] and of the live sets: `task/lease` (the issuance and
/// end-task scripts join the two the same way).
pub(super) fn member(task: &str, lease: &str) -> String {
    format!("{task}/{lease}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A template filled in as Lua's `string.format` does is the key itself.
    #[test]
    fn templates_name_the_same_keys() {
        let id = "0190a0b0-0000-7000-8000-000000000001";
        assert_eq!(task_template().replacen(SLOT, id, 1), task_key(id));
        assert_eq!(
            lease_prefix_template().replacen(SLOT, id, 1),
            lease_prefix(id)
        );
        assert_eq!(
            live_template().replacen(SLOT, "spiffe://a/b", 1),
            live_key("spiffe://a/b")
        );
        for t in [task_template(), lease_prefix_template(), live_template()] {
            assert_eq!(t.matches('%').count(), 1, "{t}");
        }
    }
}
