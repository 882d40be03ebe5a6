//! The Redis store, shared by any number of broker replicas. redis-rs async with a connection
//! manager (reconnects by itself; bounded connection and response timeouts so that a dead Redis
//! answers `UNAVAILABLE` quickly). Every multi-step change is one Lua script.
//!
//! - `keys.rs`: the key layout, written once, with its documentation (what each key holds, what
//!   may be left half-written, what Redis Cluster would need). Read it first.
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
mod locks;
mod log;
mod meta;
mod scripts;
mod tasks;

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use tokio::sync::OnceCell;

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

/// The Redis store. Connects on first use, so a broker starts while Redis is down and answers
/// `UNAVAILABLE` until it is back.
pub struct RedisStore {
    client: redis::Client,
    conn: OnceCell<ConnectionManager>,
    scripts: Scripts,
    /// The connection that blocks in `XREAD` for
    /// [`RevocationLog::revocations`](super::RevocationLog::revocations) waits: its own, so that
    /// a blocked read never delays other commands.
    watch: tokio::sync::Mutex<Option<MultiplexedConnection>>,
}

impl super::Store for RedisStore {}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The connection info may hold a password: never print it.
        f.debug_struct("RedisStore").finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store for the Redis at `url` (`redis://`).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the URL does not parse.
    pub fn new(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(|e| {
            StoreError::Unavailable(format!("redis URL does not parse ({:?})", e.kind()))
        })?;
        Ok(Self {
            client,
            conn: OnceCell::new(),
            scripts: Scripts::new(),
            watch: tokio::sync::Mutex::new(None),
        })
    }

    async fn conn(&self) -> Result<ConnectionManager, StoreError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        self.conn
            .get_or_try_init(|| async {
                self.client
                    .get_connection_manager_with_config(config)
                    .await
                    .map_err(|e| unavailable(&e))
            })
            .await
            .cloned()
    }
}
