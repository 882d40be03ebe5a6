//! `[ttl]`: how long credentials, leases and tasks live.

use std::time::Duration;

use serde::Deserialize;

use super::{CheckError, DAY, MINUTE, SECOND, duration, range};
use crate::config::TtlConfig;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawTtl {
    #[serde(deserialize_with = "duration")]
    credential_default: Duration,
    #[serde(deserialize_with = "duration")]
    credential_max: Duration,
    #[serde(deserialize_with = "duration")]
    lease_renewal_max: Duration,
    #[serde(deserialize_with = "duration")]
    task_deadline_max: Duration,
    #[serde(deserialize_with = "duration")]
    task_retention: Duration,
    #[serde(deserialize_with = "duration")]
    lock_on_failure: Duration,
}

impl Default for RawTtl {
    fn default() -> Self {
        Self {
            credential_default: Duration::from_secs(5 * 60),
            credential_max: Duration::from_secs(60 * 60),
            lease_renewal_max: Duration::from_secs(8 * 60 * 60),
            task_deadline_max: Duration::from_secs(24 * 60 * 60),
            task_retention: Duration::from_secs(30 * 24 * 60 * 60),
            lock_on_failure: Duration::from_secs(60 * 60),
        }
    }
}

impl RawTtl {
    pub(super) fn check(self) -> Result<TtlConfig, CheckError> {
        let t = self;
        Ok(TtlConfig {
            credential_max: range("ttl.credential_max", t.credential_max, SECOND, DAY)?,
            credential_default: range(
                "ttl.credential_default",
                t.credential_default,
                SECOND,
                t.credential_max,
            )?,
            lease_renewal_max: range(
                "ttl.lease_renewal_max",
                t.lease_renewal_max,
                t.credential_max,
                30 * DAY,
            )?,
            task_deadline_max: range(
                "ttl.task_deadline_max",
                t.task_deadline_max,
                SECOND,
                30 * DAY,
            )?,
            task_retention: range("ttl.task_retention", t.task_retention, MINUTE, 3650 * DAY)?,
            lock_on_failure: range("ttl.lock_on_failure", t.lock_on_failure, MINUTE, 366 * DAY)?,
        })
    }
}
