//! The Redis store, shared by any number of broker replicas, on one Redis server, a
//! Sentinel-managed primary or a Redis Cluster. Every multi-step change is one Lua script on the
//! keys of one hash slot.
//!
//! - `keys.rs`: the key layout, written once, with its documentation (what each key holds, which
//!   share a slot, what may be left half-written). Read it first.
//! - `link.rs`: the connection to each topology (bounded connection and response timeouts, so
//!   that a dead Redis answers `UNAVAILABLE` quickly) and the durability setting (`WAIT`).
//! - `codec.rs`: hash fields and log entries to tasks, leases and revocations.
//! - `scripts.rs` and `lua/*.lua`: the scripts, one file each, the revocation step written once.
//! - each concern trait of [`Store`](super::Store) implemented in the file of its topic:
//!   `tasks.rs` ([`TaskStore`](super::TaskStore)), `leases.rs` ([`LeaseStore`](super::LeaseStore)),
//!   `locks.rs` ([`LockStore`](super::LockStore)), `expiry.rs` ([`DueStore`](super::DueStore)),
//!   `log.rs` ([`RevocationLog`](super::RevocationLog)), `meta.rs`
//!   ([`MetaStore`](super::MetaStore)) and `claims.rs` ([`ClaimStore`](super::ClaimStore)).

mod claims;
mod codec;
mod expiry;
mod keys;
mod leases;
pub(crate) mod link;
mod locks;
mod log;
mod meta;
mod scripts;
mod tasks;

use std::time::Duration;

pub use self::link::{Durability, FAILOVERS, REPLICATION_LAG, Topology};
use self::link::{Link, Links};
use self::scripts::Scripts;
use super::StoreError;

/// Attempts of one compare-and-set update before giving up with [`StoreError::Contention`].
const CAS_ATTEMPTS: usize = 16;

fn unavailable(e: &redis::RedisError) -> StoreError {
    // The error text names the server and failure, never the URL's password.
    StoreError::Unavailable(format!("redis: {e}"))
}

/// The failure of a write. Redis answered with an error (out of memory, read-only, a refused
/// script), or the connection was refused: nothing was written. Anything else (a timeout, a
/// connection lost after the command was sent) may have been applied, or may still be: the
/// outcome is unknown, and the caller is told so.
fn write_failed(e: &redis::RedisError) -> StoreError {
    // Server errors the library knows (`Server`) and those it does not (`Extension`: OOM,
    // MISCONF, READONLY...) are answers: the command was refused.
    if matches!(
        e.kind(),
        redis::ErrorKind::Server(_) | redis::ErrorKind::Extension
    ) || e.is_connection_refusal()
    {
        unavailable(e)
    } else {
        StoreError::OutcomeUnknown(format!("redis: {e}"))
    }
}

/// The Redis store: one server, a Sentinel-managed primary or a Redis Cluster (`link.rs`), the
/// same key layout and scripts on each. Connects on first use, so a broker starts while Redis
/// is down and answers `UNAVAILABLE` until it is back.
pub struct RedisStore {
    links: Links,
    scripts: Scripts,
}

impl super::Store for RedisStore {}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The connection info may hold a password: never print it.
        f.debug_struct("RedisStore").finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store for the one Redis server at `url` (`redis://`), durability `async`.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the URL does not parse.
    pub fn new(url: &str) -> Result<Self, StoreError> {
        Self::with(&Topology::Single(url.to_owned()), Durability::Async)
    }

    /// A store on `topology`, answering writes as `durability` says.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when a URL does not parse.
    pub fn with(topology: &Topology, durability: Durability) -> Result<Self, StoreError> {
        Ok(Self {
            links: Links::new(topology, durability)?,
            scripts: Scripts::new(),
        })
    }

    async fn conn(&self) -> Result<Link, StoreError> {
        self.links.get().await
    }

    /// After a write to `key`'s slot that a caller is about to be told of: with `replicated`
    /// durability, waits until the write reached a replica (`WAIT`), or fails.
    ///
    /// # Errors
    /// [`StoreError::OutcomeUnknown`]: the write is on the primary but on no replica in time.
    async fn settle(&self, conn: &mut Link, key: &str) -> Result<(), StoreError> {
        self.links.settle(conn, key).await
    }
}

/// How long a command may wait for an answer before the store reports it unavailable.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
