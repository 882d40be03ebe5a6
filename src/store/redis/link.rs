//! How the Redis store reaches Redis: one server (a connection manager that reconnects by
//! itself), a Redis Cluster (redis-rs' async cluster client: it follows `MOVED` and refreshes
//! its slot map after a failover) or a primary managed by Redis Sentinel (the primary the
//! sentinels name, asked again every [`SENTINEL_POLL`], a new connection made when it changes);
//! and what a write must reach before its caller is told of it ([`Durability`]).
//!
//! Every connection is multiplexed: the commands of all callers go down one connection per
//! server, in order, which is what makes a `WAIT` after a write cover that write.

use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{Cmd, Pipeline, RedisFuture, Value};
use tokio::sync::OnceCell;

use super::{RESPONSE_TIMEOUT, unavailable};
use crate::store::StoreError;

/// How often the sentinels are asked which server is the primary (and the primary how far its
/// best replica is behind).
pub const SENTINEL_POLL: Duration = Duration::from_millis(500);

/// Counter: primaries the Sentinel topology moved to after the first (failovers seen).
pub const FAILOVERS: &str = "taskcred_store_failovers_total";
/// Gauge: bytes of the replication stream the primary's best replica had not acknowledged at
/// the last check (what an `async` failover would lose now); Sentinel topology.
pub const REPLICATION_LAG: &str = "taskcred_store_replication_lag_bytes";

/// Where the store's Redis is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topology {
    /// One server (or a primary behind a fixed address), `redis://`.
    Single(String),
    /// A Redis Cluster, reached through any of these seed nodes.
    Cluster(Vec<String>),
    /// The primary that these sentinels name for `master`.
    Sentinel {
        /// The sentinels (`redis://host:port`).
        urls: Vec<String>,
        /// The name the sentinels monitor the primary under.
        master: String,
    },
}

/// What a write must reach before the caller is told it happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// The primary's answer (and its own AOF setting): a failover may lose the writes the
    /// replicas had not received yet (Redis replicates asynchronously).
    #[default]
    Async,
    /// At least one replica acknowledged the write (`WAIT 1`) within `timeout`; else the
    /// caller is told the outcome is unknown, and nothing is handed out.
    Replicated {
        /// How long to wait for the replica.
        timeout: Duration,
    },
}

/// A connection of any topology, as redis-rs commands and scripts take it.
#[derive(Clone)]
pub(crate) enum Link {
    /// One server, or the current Sentinel primary.
    Server(ConnectionManager),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Server(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Server(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Server(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// The store's connections: made on first use, shared by every call.
pub(crate) struct Links {
    kind: Kind,
    durability: Durability,
}

enum Kind {
    Server {
        client: redis::Client,
        conn: OnceCell<ConnectionManager>,
    },
    Cluster {
        client: Box<redis::cluster::ClusterClient>,
        conn: OnceCell<ClusterConnection>,
    },
    Sentinel(Arc<Sentinel>),
}

/// The Sentinel topology: the sentinels, and the connection to the primary they named last.
struct Sentinel {
    client: tokio::sync::Mutex<SentinelClient>,
    /// The primary's address and a connection to it.
    current: RwLock<Option<(String, ConnectionManager)>>,
    /// Whether the task that follows the primary runs.
    following: std::sync::atomic::AtomicBool,
    /// The last [`REPLICATION_LAG`] read.
    lag: std::sync::atomic::AtomicU64,
    /// What writes wait for (said when a failover is seen).
    durability: Durability,
}

fn bad_url(what: &str, e: &redis::RedisError) -> StoreError {
    // Never echo the URL: it may carry a password.
    StoreError::Unavailable(format!("{what} does not parse ({:?})", e.kind()))
}

fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500))
}

impl Links {
    /// Connections for `topology`; nothing is connected yet.
    pub(crate) fn new(topology: &Topology, durability: Durability) -> Result<Self, StoreError> {
        let kind = match topology {
            Topology::Single(url) => Kind::Server {
                client: redis::Client::open(url.as_str())
                    .map_err(|e| bad_url("the redis URL", &e))?,
                conn: OnceCell::new(),
            },
            Topology::Cluster(urls) => Kind::Cluster {
                client: Box::new(
                    ClusterClientBuilder::new(urls.iter().map(String::as_str))
                        .connection_timeout(Duration::from_secs(2))
                        .response_timeout(RESPONSE_TIMEOUT)
                        .overall_response_timeout(Some(RESPONSE_TIMEOUT + Duration::from_secs(1)))
                        .retries(4)
                        .build()
                        .map_err(|e| bad_url("a redis cluster URL", &e))?,
                ),
                conn: OnceCell::new(),
            },
            Topology::Sentinel { urls, master } => {
                // The primary and its replicas take the credentials of the first sentinel URL
                // (one `requirepass` for the whole set, the common setup).
                let first = urls.first().map(String::as_str).unwrap_or_default();
                let info = redis::IntoConnectionInfo::into_connection_info(first)
                    .map_err(|e| bad_url("a redis sentinel URL", &e))?;
                let node = SentinelNodeConnectionInfo::default()
                    .set_redis_connection_info(info.redis_settings().clone());
                let client = SentinelClient::build(
                    urls.iter().map(String::as_str).collect(),
                    master.clone(),
                    Some(node),
                    SentinelServerType::Master,
                )
                .map_err(|e| bad_url("a redis sentinel URL", &e))?;
                Kind::Sentinel(Arc::new(Sentinel {
                    client: tokio::sync::Mutex::new(client),
                    current: RwLock::new(None),
                    following: std::sync::atomic::AtomicBool::new(false),
                    lag: std::sync::atomic::AtomicU64::new(0),
                    durability,
                }))
            }
        };
        Ok(Self { kind, durability })
    }

    /// A connection (made now if there is none yet).
    pub(crate) async fn get(&self) -> Result<Link, StoreError> {
        match &self.kind {
            Kind::Server { client, conn } => conn
                .get_or_try_init(|| async {
                    client
                        .get_connection_manager_with_config(manager_config())
                        .await
                        .map_err(|e| unavailable(&e))
                })
                .await
                .cloned()
                .map(Link::Server),
            Kind::Cluster { client, conn } => conn
                .get_or_try_init(|| async {
                    client
                        .get_async_connection()
                        .await
                        .map_err(|e| unavailable(&e))
                })
                .await
                .cloned()
                .map(Link::Cluster),
            Kind::Sentinel(s) => {
                if !s.following.swap(true, std::sync::atomic::Ordering::AcqRel) {
                    tokio::spawn(follow(Arc::downgrade(s)));
                }
                if let Some((_, c)) = s.current.read().ok().and_then(|c| c.clone()) {
                    return Ok(Link::Server(c));
                }
                s.refresh().await.map(Link::Server)
            }
        }
    }

    /// Whether this is a Redis Cluster (where no script may touch two slots).
    pub(super) fn is_cluster(&self) -> bool {
        matches!(self.kind, Kind::Cluster { .. })
    }

    /// With `replicated` durability, `WAIT 1` on the server of `key`'s slot.
    pub(super) async fn settle(&self, conn: &mut Link, key: &str) -> Result<(), StoreError> {
        let Durability::Replicated { timeout } = self.durability else {
            return Ok(());
        };
        let ms = u64::try_from(timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut wait = redis::cmd("WAIT");
        wait.arg(1).arg(ms);
        let reached: Result<i64, redis::RedisError> = match conn {
            Link::Server(c) => wait.query_async(c).await,
            Link::Cluster(c) => {
                let route = Route::with_key(key.as_bytes(), SlotAddr::Master);
                c.route_command(
                    wait,
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
                )
                .await
                .and_then(|v| redis::from_redis_value(v).map_err(redis::RedisError::from))
            }
        };
        match reached {
            Ok(n) if n >= 1 => Ok(()),
            Ok(_) => Err(StoreError::OutcomeUnknown(format!(
                "redis: the write is on the primary and reached no replica within {ms} ms \
                 (store.durability = \"replicated\")"
            ))),
            Err(e) => Err(StoreError::OutcomeUnknown(format!(
                "redis: the write is on the primary; waiting for a replica failed: {e}"
            ))),
        }
    }
}

impl Sentinel {
    /// Asks the sentinels for the primary and connects to it if it is not the one connected
    /// to; returns the connection to the primary.
    async fn refresh(&self) -> Result<ConnectionManager, StoreError> {
        let client = self
            .client
            .lock()
            .await
            .async_get_client()
            .await
            .map_err(|e| unavailable(&e))?;
        let addr = client.get_connection_info().addr().to_string();
        if let Some((known, c)) = self.current.read().ok().and_then(|c| c.clone())
            && known == addr
        {
            return Ok(c);
        }
        let conn = client
            .get_connection_manager_with_config(manager_config())
            .await
            .map_err(|e| unavailable(&e))?;
        if let Ok(mut current) = self.current.write() {
            if current.as_ref().is_some_and(|(known, _)| known != &addr) {
                metrics::counter!(FAILOVERS).increment(1);
                let lag = self.lag.load(std::sync::atomic::Ordering::Relaxed);
                tracing::error!(
                    primary = %addr,
                    replication_lag_bytes = lag,
                    durability = ?self.durability,
                    "redis sentinel: the primary changed (a failover); writes go to the new one. \
                     With durability async the writes the new primary had not received are lost \
                     (its replica was this many bytes behind at the last check): re-apply recent \
                     locks; with replicated nothing acknowledged is lost"
                );
            }
            *current = Some((addr, conn.clone()));
        }
        Ok(conn)
    }

    /// Reads how far the primary's best replica is behind (`INFO replication`: the primary's
    /// offset less the largest replica offset) into [`REPLICATION_LAG`].
    async fn sample_lag(&self) {
        let Some((_, mut conn)) = self.current.read().ok().and_then(|c| c.clone()) else {
            return;
        };
        let info: Result<String, _> = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut conn)
            .await;
        if let Some(lag) = info.ok().as_deref().and_then(replication_lag) {
            self.lag.store(lag, std::sync::atomic::Ordering::Relaxed);
            #[allow(clippy::cast_precision_loss)]
            metrics::gauge!(REPLICATION_LAG).set(lag as f64);
        }
    }
}

/// The bytes a primary's best replica is behind, from `INFO replication` text; `None` without
/// a replica (then everything would be lost: reported as the whole offset).
fn replication_lag(info: &str) -> Option<u64> {
    let field = |line: &str, name: &str| -> Option<u64> {
        line.split(',')
            .find_map(|kv| kv.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
    };
    let master: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("master_repl_offset:"))
        .and_then(|v| v.trim().parse().ok())?;
    let best = info
        .lines()
        .filter(|l| l.starts_with("slave") && l.contains("state=online"))
        .filter_map(|l| field(l.split_once(':')?.1, "offset="))
        .max();
    Some(master.saturating_sub(best.unwrap_or(0)))
}

/// Follows the sentinels' primary while the store lives.
async fn follow(sentinel: Weak<Sentinel>) {
    loop {
        tokio::time::sleep(SENTINEL_POLL).await;
        let Some(s) = sentinel.upgrade() else { return };
        match s.refresh().await {
            Ok(_) => s.sample_lag().await,
            Err(e) => tracing::debug!(error = %e, "redis sentinel: no primary known yet"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::replication_lag;

    /// The best online replica's offset counts; a primary without one has nothing safe.
    #[test]
    fn replication_lag_is_read_from_info() {
        let info = "# Replication\r\nrole:master\r\nconnected_slaves:2\r\n\
            slave0:ip=127.0.0.1,port=7001,state=online,offset=900,lag=0\r\n\
            slave1:ip=127.0.0.1,port=7002,state=wait_bgsave,offset=1000,lag=0\r\n\
            master_repl_offset:1000\r\n";
        assert_eq!(replication_lag(info), Some(100));
        assert_eq!(
            replication_lag("role:master\r\nmaster_repl_offset:42\r\n"),
            Some(42)
        );
        assert_eq!(replication_lag("role:slave\r\n"), None);
    }
}
