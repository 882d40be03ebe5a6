//! `[store]`: which backend holds tasks and leases, where, and how durably.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{CheckError, duration, range};
use crate::config::StoreConfig;
use crate::store::redis::{Durability, Topology};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStore {
    #[serde(default)]
    backend: StoreBackend,
    #[serde(default = "default_store_path")]
    path: PathBuf,
    redis_url: Option<String>,
    #[serde(default)]
    redis_urls: Vec<String>,
    #[serde(default)]
    sentinel_urls: Vec<String>,
    sentinel_master: Option<String>,
    #[serde(default)]
    durability: RawDurability,
    #[serde(default = "default_replication_timeout", deserialize_with = "duration")]
    replication_timeout: Duration,
}

fn default_store_path() -> PathBuf {
    PathBuf::from("/var/lib/taskcred/taskcred.db")
}

fn default_replication_timeout() -> Duration {
    Duration::from_secs(1)
}

/// Which lease store backs the broker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreBackend {
    /// A file on local disk: one broker process.
    #[default]
    Embedded,
    /// A Redis server shared by any number of broker replicas.
    Redis,
    /// A Redis Cluster (`store.redis_urls`, its seed nodes).
    RedisCluster,
    /// A primary managed by Redis Sentinel (`store.sentinel_urls`, `store.sentinel_master`).
    RedisSentinel,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawDurability {
    #[default]
    Async,
    Replicated,
}

/// A Redis URL as the store takes it: `redis://` (TLS is not built in).
fn check_url(key: &'static str, url: &str) -> Result<(), CheckError> {
    if url.starts_with("rediss://") {
        return Err((
            key,
            "rediss:// (TLS) is not built into this broker: use redis:// on a private \
             network, or through a TLS tunnel (stunnel, a sidecar) on localhost"
                .into(),
        ));
    }
    if !url.starts_with("redis://") {
        // Never echo the URL: it may carry a password.
        return Err((key, "must start with redis://".into()));
    }
    Ok(())
}

/// At least one URL, each a `redis://` one, at most 64.
fn check_urls(key: &'static str, urls: &[String], backend: &str) -> Result<(), CheckError> {
    if urls.is_empty() {
        return Err((key, format!("required when store.backend = \"{backend}\"")));
    }
    if urls.len() > 64 {
        return Err((key, "at most 64 URLs".into()));
    }
    urls.iter().try_for_each(|u| check_url(key, u))
}

impl RawStore {
    pub(super) fn check(self) -> Result<StoreConfig, CheckError> {
        if let Some(url) = &self.redis_url {
            check_url("store.redis_url", url)?;
        }
        let topology = match self.backend {
            StoreBackend::Embedded => None,
            StoreBackend::Redis => match &self.redis_url {
                Some(url) => Some(Topology::Single(url.clone())),
                None => {
                    return Err((
                        "store.redis_url",
                        "required when store.backend = \"redis\"".into(),
                    ));
                }
            },
            StoreBackend::RedisCluster => {
                check_urls("store.redis_urls", &self.redis_urls, "redis_cluster")?;
                Some(Topology::Cluster(self.redis_urls.clone()))
            }
            StoreBackend::RedisSentinel => {
                check_urls("store.sentinel_urls", &self.sentinel_urls, "redis_sentinel")?;
                let master = self
                    .sentinel_master
                    .clone()
                    .filter(|m| !m.is_empty())
                    .ok_or((
                        "store.sentinel_master",
                        "required when store.backend = \"redis_sentinel\"".to_owned(),
                    ))?;
                Some(Topology::Sentinel {
                    urls: self.sentinel_urls.clone(),
                    master,
                })
            }
        };
        let durability = match self.durability {
            RawDurability::Async => Durability::Async,
            RawDurability::Replicated => {
                if topology.is_none() {
                    return Err((
                        "store.durability",
                        "\"replicated\" needs a Redis backend (the embedded store is one file)"
                            .into(),
                    ));
                }
                Durability::Replicated {
                    timeout: range(
                        "store.replication_timeout",
                        self.replication_timeout,
                        Duration::from_millis(10),
                        Duration::from_millis(1500),
                    )?,
                }
            }
        };
        Ok(StoreConfig {
            backend: self.backend,
            path: self.path,
            redis_url: self.redis_url,
            topology,
            durability,
        })
    }
}
