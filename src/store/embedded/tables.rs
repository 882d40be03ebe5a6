//! The redb tables of the embedded store, and the JSON codec of the records that are neither
//! tasks nor leases (those use the codec shared with Redis, in [`crate::store`]).
//!
//! Task ids are UUIDv7 strings, so key order is creation order.
//!
//! [`OPEN_BY_EXECUTOR`] holds exactly the open tasks (pending approval or approved), so that a
//! lock's sweep walks what it may end and never the agent's history: every transaction that
//! creates a task or ends one keeps it so (`tasks`: creating, changing, ending, pruning; `locks`:
//! the sweep), and a file written before it existed is indexed once when opened (`migrate`).

use std::fmt::Display;

use redb::{TableDefinition, WriteTransaction};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::store::StoreError;

/// Tasks: id -> JSON.
pub(super) const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");
/// Tasks by executor: (who, id) -> ().
pub(super) const BY_EXECUTOR: TableDefinition<(&str, &str), ()> =
    TableDefinition::new("tasks_by_executor");
/// Open tasks by executor: pending or approved, (who, id) -> (). A task leaves it in the
/// transaction that ends it.
pub(super) const OPEN_BY_EXECUTOR: TableDefinition<(&str, &str), ()> =
    TableDefinition::new("tasks_open_by_executor");
/// Tasks by requester: (who, id) -> ().
pub(super) const BY_REQUESTER: TableDefinition<(&str, &str), ()> =
    TableDefinition::new("tasks_by_requester");
/// Ended tasks by the time they may be pruned: (ms, id) -> ().
pub(super) const ENDED: TableDefinition<(u64, &str), ()> = TableDefinition::new("tasks_ended");
/// Leases: (task, lease) -> JSON.
pub(super) const LEASES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("leases");
/// Current credentials: (task, jti or serial) -> lease.
pub(super) const CREDENTIALS: TableDefinition<(&str, &str), &str> =
    TableDefinition::new("credentials");
/// Agent locks: agent -> JSON.
pub(super) const LOCKS: TableDefinition<&str, &[u8]> = TableDefinition::new("locks");
/// The task of each lease: lease -> task.
pub(super) const LEASE_TASKS: TableDefinition<&str, &str> = TableDefinition::new("lease_tasks");
/// Published signing keys: kid -> JSON.
pub(super) const SIGNING_KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("signing_keys");
/// Active leases by expiry (ms, rounded up): what the reaper ends next.
pub(super) const EXPIRY: TableDefinition<(u64, &str, &str), ()> =
    TableDefinition::new("lease_expiry");
/// Tasks by deadline (ms, rounded up), filed when created.
pub(super) const DEADLINES: TableDefinition<(u64, &str), ()> =
    TableDefinition::new("task_deadlines");
/// Store-wide markers: `epoch` (the JSON [`Epoch`](crate::store::Epoch)), and
/// [`OPEN_BY_EXECUTOR_V1`] once the open tasks of a file are indexed.
pub(super) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// The [`META`] key set once [`OPEN_BY_EXECUTOR`] holds every open task of the file: absent in
/// a file written by an earlier version, which is then indexed when opened.
pub(super) const OPEN_BY_EXECUTOR_V1: &str = "open_by_executor_v1";
/// Claims: key -> (expiry in ms since the epoch, value).
pub(super) const CLAIMS: TableDefinition<&str, (u64, &str)> = TableDefinition::new("claims");
/// The revocation log: key the [`Cursor`](crate::lease::Cursor) (`ms`, `seq`), value the JSON
/// [`Revocation`](crate::lease::Revocation).
pub(super) const REVOCATIONS: TableDefinition<(u64, u64), &[u8]> =
    TableDefinition::new("revocations");

/// Creates every table that does not exist yet, inside write transaction `txn`.
pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(TASKS)?;
    txn.open_table(BY_EXECUTOR)?;
    txn.open_table(OPEN_BY_EXECUTOR)?;
    txn.open_table(BY_REQUESTER)?;
    txn.open_table(ENDED)?;
    txn.open_table(LEASES)?;
    txn.open_table(CREDENTIALS)?;
    txn.open_table(LOCKS)?;
    txn.open_table(LEASE_TASKS)?;
    txn.open_table(SIGNING_KEYS)?;
    txn.open_table(EXPIRY)?;
    txn.open_table(DEADLINES)?;
    txn.open_table(REVOCATIONS)?;
    txn.open_table(META)?;
    txn.open_table(CLAIMS)?;
    Ok(())
}

/// Decodes the JSON record `bytes`. One that does not decode is [`StoreError::Corrupt`], its
/// message `{what}: {error}`.
pub(super) fn from_json<T: DeserializeOwned>(
    bytes: &[u8],
    what: impl Display,
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// Encodes `value` as a JSON record. One that does not encode is [`StoreError::Corrupt`], its
/// message `{what}: {error}`.
pub(super) fn to_json<T: Serialize + ?Sized>(
    value: &T,
    what: impl Display,
) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// The [`Revision`](crate::store::Revision) of a task record: a digest of its bytes (a task's
/// record changes whenever the task does).
pub(super) fn revision_of(record: &[u8]) -> crate::store::Revision {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::hash::DefaultHasher::new();
    record.hash(&mut h);
    crate::store::Revision(h.finish())
}
