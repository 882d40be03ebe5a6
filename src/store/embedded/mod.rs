//! The embedded store: one redb file on local disk, for a single broker process and for
//! `serve --dev`. Every operation is one redb transaction (ACID, crash-safe, durable on commit),
//! run on tokio's blocking pool; but issuances, the hot path, go to one writer thread that
//! records those that arrive together in one transaction and one durable commit (`writer`).
//!
//! Tables: `tasks` (id -> JSON), `tasks_by_executor` and `tasks_by_requester` ((who, id) -> ()),
//! `tasks_open_by_executor` ((who, id) -> (), the open tasks only, what a lock's sweep walks),
//! `tasks_ended` ((ended ms, id) -> ()) for retention, `leases` ((task, lease) -> JSON),
//! `credentials` ((task, jti or serial) -> lease), `lease_tasks` (lease -> task) and `locks`
//! (agent -> JSON). Task ids are UUIDv7 strings, so key
//! order is creation order.
//!
//! This file holds the store and opening it. Each concern trait of [`Store`](super::Store) is
//! implemented in the file of its topic: `tasks` ([`TaskStore`](super::TaskStore)), `leases`
//! ([`LeaseStore`](super::LeaseStore)), `locks` ([`LockStore`](super::LockStore)), `expiry`
//! ([`DueStore`](super::DueStore)), `log` ([`RevocationLog`](super::RevocationLog), the
//! revocation log), `meta` ([`MetaStore`](super::MetaStore): epoch marker, signing keys, the
//! readiness probe) and `claims` ([`ClaimStore`](super::ClaimStore)). `tables` holds the table
//! definitions and record codec; `errors` turns redb's errors into [`StoreError`]s, so the
//! bodies use `?`; `migrate` brings a file written by an earlier version up to date when it is
//! opened; `writer` is the thread that records issuances in batches.

mod claims;
mod errors;
mod expiry;
mod leases;
mod locks;
mod log;
mod meta;
mod migrate;
mod tables;
mod tasks;
#[cfg(test)]
mod tests;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::Database;
use tokio::sync::watch;

use self::writer::Writer;
use super::StoreError;

/// The embedded store. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    path: PathBuf,
    /// Bumped after each commit that logged a revocation; wakes
    /// [`RevocationLog::revocations`](super::RevocationLog::revocations) waiters.
    logged: Arc<watch::Sender<u64>>,
    /// The thread that records issuances; it ends when the last clone is dropped.
    writer: Arc<Writer>,
}

impl super::Store for EmbeddedStore {}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.path)
            .finish()
    }
}

/// Makes the database file readable by its owner only (0600) if it is new, and refuses one
/// that others may read or write: it holds tasks, approval notes, leases and the key that seals
/// page tokens.
fn private_file(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let failed = |e: std::io::Error| StoreError::Unavailable(format!("{}: {e}", path.display()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(failed(e)),
    }
    let mode = std::fs::metadata(path)
        .map_err(failed)?
        .permissions()
        .mode();
    if mode & 0o007 != 0 {
        return Err(StoreError::Unavailable(format!(
            "{}: others may read or write it (mode {:o}): chmod 600 it; it holds the tasks, \
             leases and the key that seals page tokens",
            path.display(),
            mode & 0o777
        )));
    }
    Ok(())
}

impl EmbeddedStore {
    /// Opens (or creates) the store file at `path`; its directory must exist. A file written by
    /// an earlier version is brought up to date in the same transaction.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the file cannot be opened (another process holds it, it
    /// is not a redb file, permissions, the writer thread cannot be started);
    /// [`StoreError::Corrupt`] when a task record it must read to bring the file up to date does
    /// not decode.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        private_file(path)?;
        let db = Database::create(path)
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", path.display())))?;
        let txn = db.begin_write()?;
        tables::create_tables(&txn)?;
        migrate::migrate(&txn)?;
        txn.commit()?;
        let db = Arc::new(db);
        Ok(Self {
            writer: Arc::new(Writer::start(db.clone())?),
            db,
            path: path.to_owned(),
            logged: Arc::new(watch::Sender::new(0)),
        })
    }

    /// Runs `f` on the blocking pool. A worker that fails is [`StoreError::Unavailable`].
    async fn blocking<T, E, F>(&self, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&Database) -> Result<T, E> + Send + 'static,
    {
        let db = self.db.clone();
        match tokio::task::spawn_blocking(move || f(&db)).await {
            Ok(done) => done,
            Err(e) => Err(errors::worker(e).into()),
        }
    }
}
