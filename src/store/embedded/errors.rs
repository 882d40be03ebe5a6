//! How redb's errors become [`StoreError`]s, so that `?` replaces a hand-written `map_err`.
//!
//! Every redb error is [`StoreError::Unavailable`] with the message `embedded store: {error}`:
//! the file could not be read or written, and the transaction that failed committed nothing.
//! The same error reaches [`UpdateError::Store`] and [`IssueError::Store`] unchanged, so the
//! bodies of [`TaskStore::update_task`](crate::store::TaskStore::update_task) and
//! [`LeaseStore::issue_lease`](crate::store::LeaseStore::issue_lease) use `?` too.
//!
//! [`redb::DatabaseError`] has no conversion on purpose: the one place that opens the file
//! names the file in its message (see [`EmbeddedStore::open`](super::EmbeddedStore::open)).

use crate::store::{IssueError, StoreError, UpdateError};

/// The embedded store's failure: the backend failed, nothing was changed.
fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("embedded store: {e}"))
}

/// A blocking-pool worker that panicked or was cancelled: the store's answer is unknown to it,
/// reported as the backend failing (as a redb error is).
pub(super) fn worker(e: tokio::task::JoinError) -> StoreError {
    backend(format!("worker: {e}"))
}

/// The writer thread could not be started, or stopped (it panicked): issuances cannot be
/// recorded, reported as the backend failing.
pub(super) fn writer(e: impl std::fmt::Display) -> StoreError {
    backend(format!("writer: {e}"))
}

/// `From<redb::$error>` for each of the store's error types, all through [`backend`].
macro_rules! from_redb {
    ($($error:ident),+ $(,)?) => {$(
        impl From<redb::$error> for StoreError {
            fn from(e: redb::$error) -> Self {
                backend(e)
            }
        }

        impl From<redb::$error> for UpdateError {
            fn from(e: redb::$error) -> Self {
                Self::Store(e.into())
            }
        }

        impl From<redb::$error> for IssueError {
            fn from(e: redb::$error) -> Self {
                Self::Store(e.into())
            }
        }
    )+};
}

from_redb!(TransactionError, TableError, StorageError, CommitError);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redb_error_reads_as_backend_did() {
        let e = redb::StorageError::Corrupted("bad page".into());
        let expected = StoreError::Unavailable(format!("embedded store: {e}"));
        assert_eq!(StoreError::from(e), expected);
        let e = redb::StorageError::Corrupted("bad page".into());
        assert_eq!(UpdateError::from(e), UpdateError::Store(expected.clone()));
        let e = redb::StorageError::Corrupted("bad page".into());
        assert_eq!(IssueError::from(e), IssueError::Store(expected));
    }
}
