//! `[audit]`: where decisions are recorded, and how durably.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{CheckError, MINUTE, duration, range};
use crate::config::{AuditConfig, StoreConfig};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAudit {
    path: PathBuf,
    #[serde(default = "yes")]
    required: bool,
    #[serde(default)]
    redis_stream: bool,
    #[serde(default = "stream_max_len")]
    redis_stream_max_len: u64,
    #[serde(default)]
    fsync: RawFsync,
    #[serde(default = "default_fsync_interval", deserialize_with = "duration")]
    fsync_interval: Duration,
}

/// `audit.fsync`.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawFsync {
    Always,
    #[default]
    Interval,
    Never,
}

fn default_fsync_interval() -> Duration {
    Duration::from_secs(1)
}

fn stream_max_len() -> u64 {
    10_000_000
}

fn yes() -> bool {
    true
}

impl RawAudit {
    /// The Redis stream needs the store's Redis: checked as soon as the store is.
    pub(super) fn check_stream(&self, store: &StoreConfig) -> Result<(), CheckError> {
        if self.redis_stream && store.stream_redis().is_none() {
            return Err((
                "audit.redis_stream",
                "needs a Redis store or store.redis_url (the stream lives in the store's Redis)"
                    .into(),
            ));
        }
        Ok(())
    }

    pub(super) fn check(self) -> Result<AuditConfig, CheckError> {
        Ok(AuditConfig {
            path: self.path,
            required: self.required,
            redis_stream: self.redis_stream,
            redis_stream_max_len: self.redis_stream_max_len,
            fsync: match self.fsync {
                RawFsync::Always => crate::audit::Fsync::Always,
                RawFsync::Interval => crate::audit::Fsync::Interval,
                RawFsync::Never => crate::audit::Fsync::Never,
            },
            fsync_interval: range(
                "audit.fsync_interval",
                self.fsync_interval,
                Duration::from_millis(10),
                MINUTE,
            )?,
        })
    }
}
