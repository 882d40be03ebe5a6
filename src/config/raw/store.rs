//! `[store]`: which backend holds tasks and leases, and where.

use std::path::PathBuf;

use serde::Deserialize;

use super::CheckError;
use crate::config::StoreConfig;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStore {
    #[serde(default)]
    backend: StoreBackend,
    #[serde(default = "default_store_path")]
    path: PathBuf,
    redis_url: Option<String>,
}

fn default_store_path() -> PathBuf {
    PathBuf::from("/var/lib/taskcred/taskcred.db")
}

/// Which lease store backs the broker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// A file on local disk: one broker process.
    #[default]
    Embedded,
    /// A Redis server shared by any number of broker replicas.
    Redis,
}

impl RawStore {
    pub(super) fn check(self) -> Result<StoreConfig, CheckError> {
        let redis_url = match (self.backend, self.redis_url) {
            (StoreBackend::Redis, None) => {
                return Err((
                    "store.redis_url",
                    "required when store.backend = \"redis\"".into(),
                ));
            }
            (_, Some(url)) if url.starts_with("rediss://") => {
                return Err((
                    "store.redis_url",
                    "rediss:// (TLS) is not built into this broker: use redis:// on a private \
                     network, or through a TLS tunnel (stunnel, a sidecar) on localhost"
                        .into(),
                ));
            }
            (_, Some(url)) if !url.starts_with("redis://") => {
                // Never echo the URL: it may carry a password.
                return Err(("store.redis_url", "must start with redis://".into()));
            }
            (_, url) => url,
        };
        Ok(StoreConfig {
            backend: self.backend,
            path: self.path,
            redis_url,
        })
    }
}
