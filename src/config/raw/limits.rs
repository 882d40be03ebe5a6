//! `[limits]`: issuance rate limits, per identity and per replica.

use serde::Deserialize;

use super::{CheckError, range};
use crate::broker::limits::Rate;
use crate::config::LimitsConfig;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLimits {
    issuance_per_second: f64,
    issuance_burst: u32,
    ci_per_second: f64,
    ci_burst: u32,
    public_per_second: f64,
    public_burst: u32,
    rpc_per_second: f64,
    rpc_burst: u32,
}

impl Default for RawLimits {
    fn default() -> Self {
        Self {
            issuance_per_second: 100.0,
            issuance_burst: 200,
            ci_per_second: 5.0,
            ci_burst: 20,
            public_per_second: 20.0,
            public_burst: 100,
            rpc_per_second: 200.0,
            rpc_burst: 400,
        }
    }
}

impl RawLimits {
    pub(super) fn check(self) -> Result<LimitsConfig, CheckError> {
        Ok(LimitsConfig {
            issuance: rate(
                "limits.issuance_per_second",
                self.issuance_per_second,
                self.issuance_burst,
            )?,
            ci: rate("limits.ci_per_second", self.ci_per_second, self.ci_burst)?,
            public: rate(
                "limits.public_per_second",
                self.public_per_second,
                self.public_burst,
            )?,
            rpc: rate("limits.rpc_per_second", self.rpc_per_second, self.rpc_burst)?,
        })
    }
}

/// A rate, or none when `per_second` is 0.
fn rate(key: &'static str, per_second: f64, burst: u32) -> Result<Option<Rate>, CheckError> {
    if per_second == 0.0 {
        return Ok(None);
    }
    if !(per_second.is_finite() && (0.001..=1_000_000.0).contains(&per_second)) {
        return Err((
            key,
            format!("{per_second} is outside 0.001..=1000000 (0 for no limit)"),
        ));
    }
    let burst = range(key, burst, 1, 1_000_000)?;
    Ok(Some(Rate {
        per_second,
        burst: f64::from(burst),
    }))
}
