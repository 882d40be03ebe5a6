//! The key layout of the Redis store, written once: every key name and key function. No
//! script spells a key name itself, and every script declares every key it touches as `KEYS`,
//! all of one hash slot, so that the same scripts run on one server, a Sentinel-managed primary
//! and a Redis Cluster.
//!
//! Two kinds of hash tag (`{}`: what Redis Cluster hashes to a slot):
//! - **Buckets**: a task belongs to one of [`BUCKETS`] buckets (the last hex digit of its id: a
//!   UUIDv7's random bits), and every key of the task shares its bucket's tag, with the
//!   bucket's expiry index, revocation log, deadline index and epoch copy. So an issuance, a
//!   renewal, a revocation, a task's end and an expiry are each one script in one slot. The tags
//!   ([`TAGS`]) are chosen so that bucket `i` hashes into the `i`-th sixteenth of the slot
//!   space: a Cluster that splits slots evenly (as `redis-cli --cluster create` does) gets an
//!   even share of buckets on every master. The bucket count is fixed for a store's life.
//! - **Agents**: an agent's lock, its open tasks and the tasks its lock's sweep is ending share
//!   the agent's tag (`{a:<spiffe id>}`).
//!
//! Keys of bucket `B` (`tc:{B}:...`):
//! - `t:<task>`: the task, a hash: `v` (version), `data` (JSON), the overlay a lock's sweep lays
//!   over the JSON (`state`, `ended_ms`, `end_reason`), `x` (the executor), `lk` (the agent's
//!   lock as copied in by [`LockStore::lock_agent`](crate::store::LockStore::lock_agent): the
//!   lock's end in ms, `0` for none, see `locks.rs` for the ordering), and once the task has
//!   ended, when its leases ended: `le` (8 bytes, ns since the epoch, big-endian), `lm` (the
//!   same in ms), `lr` (the reason its leases carry), and `rc` while the revocation of its
//!   leases is unfinished (the `HSCAN` cursor of `l:<task>` where the next chunk starts).
//!   Updates compare-and-set on `v`, and every script that changes the task's fields bumps `v`:
//!   an issuance is recorded against the revision the broker decided on. A hash holding only
//!   `lk` is a lock's mark on a task being created (see `create.lua`); it expires by itself.
//! - `l:<task>`: the task's leases, a hash: field the lease id's 8-byte suffix
//!   ([`LeaseId::suffix`](crate::lease::LeaseId::suffix)), value the lease record (codec.rs
//!   `encode_record`).
//! - `c:<task>`: the task's credentials, a hash: field the credential id packed (codec.rs
//!   `credential_field`), value the lease's suffix.
//! - `exp`: the bucket's active leases by expiry, a sorted set: member 24 bytes (the task's 16
//!   uuid bytes and the lease's 8-byte suffix: [`member`]), score the expiry in ms (rounded
//!   up). What the reaper walks, bucket by bucket.
//! - `rev`: the bucket's revocation log, a stream appended by the revoking scripts themselves
//!   (an entry exists exactly when the revocation happened). The store's log is the merge of
//!   the buckets' logs (`log.rs`: one cursor across them). Trimmed by `MINID`.
//! - `dl`: the bucket's tasks by deadline (and, filed again, ended tasks whose children or
//!   lease revocations are unfinished).
//! - `reaper`: held, for a few seconds, by the replica that reaps the bucket now.
//! - `epoch`: a copy of the store's epoch: a bucket whose copy is gone lost its data (a
//!   Cluster master that came back empty), and issuance there stops until the broker has
//!   started a new epoch.
//!
//! A lease of a task that has ended (`le` set) is ended from that moment, whatever its record
//! says: every read, renewal and revocation reads the task in the same script.
//!
//! Keys of agent `A` (`tc:{a:A}:...`): `lock` (the lock, JSON, expiring with it), `open` (the
//! agent's open tasks as executor, added before the task is written, removed after it ends:
//! what a lock marks and sweeps), `sweep` (tasks a lock's sweep took from `open` and has not
//! finished).
//!
//! Keys of their own slot: `tc:idx:tasks`, `tc:idx:executor:<spiffe id>`,
//! `tc:idx:requester:<spiffe id>` (sorted sets of task ids, score 0, in creation order; written
//! before the task, so a failure leaves at most an entry that points nowhere, which readers
//! skip and remove), `tc:locks` (agents with a lock, added before the lock), `tc:epoch`,
//! `tc:signing-keys`, `tc:claim:<name>`, `tc:ready-probe`.
//!
//! Keys of the earlier layouts (`tc:task:{<id>}`, `tc:l:*`, `tc:exp`, `tc:revocations`...) are
//! not read: see docs/runbook.md, "Upgrade the Redis layout".

use crate::task::TaskId;

/// How many buckets the tasks are spread over: fixed for a store's life.
pub(super) const BUCKETS: usize = 16;

/// The hash tag of each bucket: bucket `i`'s tag hashes (CRC16, as Redis Cluster) into slots
/// `i * 1024 .. (i + 1) * 1024`, so that evenly split slots hold buckets evenly.
pub(super) const TAGS: [&str; BUCKETS] = [
    "03", "122", "212", "311", "461", "562", "60", "742", "843", "940", "a21", "b60", "c13", "d13",
    "e61", "f20",
];

/// All tasks, by id (a sorted set, score 0).
pub(super) const ALL_TASKS: &str = "tc:idx:tasks";
/// The set of agents with a lock (locks expire by themselves; readers drop stale members).
pub(super) const LOCKS: &str = "tc:locks";
/// Published signing keys: field `kid`, value the JSON [`PublishedKey`](crate::mint::PublishedKey).
pub(super) const SIGNING_KEYS: &str = "tc:signing-keys";
/// The store's epoch marker (JSON [`Epoch`](crate::store::Epoch)), written once with `SET NX`;
/// each bucket holds a copy ([`epoch_key`]).
pub(super) const EPOCH: &str = "tc:epoch";
/// Written by the readiness probe (a short-lived key): a store that refuses writes is not ready.
pub(super) const READY_PROBE: &str = "tc:ready-probe";

/// The bucket of a task: the last hex digit of its canonical id.
pub(super) fn bucket_of(task: &str) -> usize {
    task.bytes()
        .last()
        .and_then(|b| char::from(b).to_digit(16))
        .map_or(0, |d| d as usize % BUCKETS)
}

/// The key `what` of bucket `b`.
fn in_bucket(b: usize, what: &str) -> String {
    format!("tc:{{{}}}:{what}", TAGS[b % BUCKETS])
}

/// The task's hash.
pub(super) fn task_key(id: &str) -> String {
    in_bucket(bucket_of(id), &format!("t:{id}"))
}

/// The task's leases: suffix -> record.
pub(super) fn leases_key(task: &str) -> String {
    in_bucket(bucket_of(task), &format!("l:{task}"))
}

/// The task's credentials: packed credential id -> suffix.
pub(super) fn creds_key(task: &str) -> String {
    in_bucket(bucket_of(task), &format!("c:{task}"))
}

/// Bucket `b`'s active leases by expiry.
pub(super) fn expiry_key(b: usize) -> String {
    in_bucket(b, "exp")
}

/// Bucket `b`'s revocation log.
pub(super) fn log_key(b: usize) -> String {
    in_bucket(b, "rev")
}

/// Bucket `b`'s tasks by deadline.
pub(super) fn deadlines_key(b: usize) -> String {
    in_bucket(b, "dl")
}

/// Held (with an expiry) by the replica that reaps bucket `b` now.
pub(super) fn reaper_key(b: usize) -> String {
    in_bucket(b, "reaper")
}

/// Bucket `b`'s copy of the store's epoch.
pub(super) fn epoch_key(b: usize) -> String {
    in_bucket(b, "epoch")
}

/// The agent's key `what`.
fn of_agent(agent: &str, what: &str) -> String {
    format!("tc:{{a:{agent}}}:{what}")
}

/// The agent's lock.
pub(super) fn lock_key(agent: &crate::identity::WorkloadId) -> String {
    lock_key_of(agent.as_str())
}

/// [`lock_key`] for an agent read back from [`LOCKS`].
pub(super) fn lock_key_of(agent: &str) -> String {
    of_agent(agent, "lock")
}

/// The agent's open tasks (pending or approved) as executor: what a lock marks and sweeps.
pub(super) fn open_key(agent: &str) -> String {
    of_agent(agent, "open")
}

/// The tasks a lock's sweep took from [`open_key`] and has not finished ending.
pub(super) fn sweep_key(agent: &str) -> String {
    of_agent(agent, "sweep")
}

/// A claim (see [`ClaimStore::claim`](crate::store::ClaimStore::claim)).
pub(super) fn claim_key(key: &str) -> String {
    format!("tc:claim:{key}")
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

/// A lease as a member of an expiry index: the task's 16 bytes, then the lease's 8-byte suffix.
pub(super) fn member(task: &TaskId, suffix: [u8; 8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(24);
    m.extend_from_slice(&task_bytes(task));
    m.extend_from_slice(&suffix);
    m
}

/// The task and suffix of an expiry index member; `None` for anything else.
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

    /// CRC16 (XMODEM), as Redis Cluster hashes a key's tag to its slot.
    fn slot(tag: &str) -> u16 {
        let mut crc: u16 = 0;
        for b in tag.bytes() {
            crc ^= u16::from(b) << 8;
            for _ in 0..8 {
                crc = if crc & 0x8000 == 0 {
                    crc << 1
                } else {
                    (crc << 1) ^ 0x1021
                };
            }
        }
        crc % 16_384
    }

    /// Bucket `i`'s tag falls in the `i`-th sixteenth of the slots (the check value of CRC16
    /// XMODEM first, so that the function is the one Redis uses).
    #[test]
    fn bucket_tags_spread_over_the_slots() {
        assert_eq!(slot("123456789"), 0x31C3);
        for (i, tag) in TAGS.iter().enumerate() {
            let s = usize::from(slot(tag));
            assert!((i * 1024..(i + 1) * 1024).contains(&s), "{tag}: slot {s}");
        }
    }

    /// A task's keys share its bucket's tag; an agent's keys share the agent's.
    #[test]
    fn a_task_and_an_agent_each_keep_to_one_tag() {
        let id = "0190a0b0-0000-7000-8000-00000000000b";
        assert_eq!(bucket_of(id), 11);
        for k in [task_key(id), leases_key(id), creds_key(id)]
            .into_iter()
            .chain([
                expiry_key(11),
                log_key(11),
                deadlines_key(11),
                epoch_key(11),
            ])
        {
            assert!(k.starts_with("tc:{b60}:"), "{k}");
        }
        let agent = "spiffe://taskcred.dev/agent/demo";
        for k in [lock_key_of(agent), open_key(agent), sweep_key(agent)] {
            assert!(
                k.starts_with("tc:{a:spiffe://taskcred.dev/agent/demo}:"),
                "{k}"
            );
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
