//! The use cases' metrics: their names, and how an outcome becomes a label. Recorded where the
//! use case ends, so that every path (success and each refusal) counts once.

use std::time::Instant;

use super::BrokerError;

/// Credentials handed out or refused, by `kind` (`jwt`, `x509`, `renewal`, `ci_jwt`, `ci_x509`)
/// and `outcome` (`issued`, or the refusal class).
pub const ISSUANCE: &str = "taskcred_issuance_total";
/// Latency of issuance, in seconds, by `kind` and `outcome`.
pub const ISSUANCE_DURATION: &str = "taskcred_issuance_duration_seconds";
/// Refusals, by `action` and `reason`, counted as the audit log records them.
pub use crate::audit::DENIALS;
/// How late the reaper ended each expired lease (seconds past its expiry).
pub const REAPER_LATENESS: &str = "taskcred_reaper_lateness_seconds";
/// The reaper's lag in its last round: how far past its expiry the oldest lease it ended was.
pub const REAPER_LAG: &str = "taskcred_reaper_lag_seconds";
/// Credentials revoked before their expiry, by `cause` (`task_end`, `lock`, `revoke`,
/// `renewal`, `audit_failure`).
pub const REVOCATIONS: &str = "taskcred_revocations_total";
/// CI exchanges, by `issuer` (configured name, or `unknown`) and `outcome`.
pub const CI_EXCHANGES: &str = "taskcred_ci_exchanges_total";

/// The label of a use case's outcome.
pub fn outcome<T>(result: &Result<T, BrokerError>) -> &'static str {
    match result {
        Ok(_) => "issued",
        Err(e) => match e {
            BrokerError::Invalid { .. } => "invalid",
            BrokerError::Denied(_) => "denied",
            BrokerError::NotFound => "not_found",
            BrokerError::Precondition(_) => "precondition",
            BrokerError::Pending(_) => "pending",
            BrokerError::Unauthenticated(_) => "unauthenticated",
            BrokerError::Unavailable(_) => "unavailable",
            BrokerError::Exhausted(_) => "exhausted",
            BrokerError::RateLimited(_) => "rate_limited",
            BrokerError::Internal(_) => "internal",
        },
    }
}

/// Counts one issuance of `kind` that started at `start`.
pub(super) fn issuance<T>(kind: &'static str, result: &Result<T, BrokerError>, start: Instant) {
    let outcome = outcome(result);
    metrics::counter!(ISSUANCE, "kind" => kind, "outcome" => outcome).increment(1);
    metrics::histogram!(ISSUANCE_DURATION, "kind" => kind, "outcome" => outcome)
        .record(start.elapsed().as_secs_f64());
}

/// Counts `n` revocations of `cause`.
pub(super) fn revoked(cause: &'static str, n: usize) {
    if n > 0 {
        metrics::counter!(REVOCATIONS, "cause" => cause).increment(n as u64);
    }
}

/// Describes the metrics for `/metrics`.
pub fn describe() {
    metrics::describe_counter!(
        ISSUANCE,
        "credentials issued or refused, by kind and outcome"
    );
    metrics::describe_histogram!(
        ISSUANCE_DURATION,
        metrics::Unit::Seconds,
        "issuance latency by kind and outcome"
    );
    metrics::describe_counter!(DENIALS, "refusals by action and reason");
    metrics::describe_histogram!(
        REAPER_LATENESS,
        metrics::Unit::Seconds,
        "how late the reaper ended each expired lease"
    );
    metrics::describe_gauge!(
        REAPER_LAG,
        metrics::Unit::Seconds,
        "the reaper's lag in its last round (oldest lease ended, past its expiry)"
    );
    metrics::describe_counter!(REVOCATIONS, "credentials revoked before expiry, by cause");
    metrics::describe_counter!(CI_EXCHANGES, "CI exchanges by issuer and outcome");
    metrics::describe_counter!(
        super::limits::RATE_LIMITED,
        "issuances refused over an identity's rate, by kind (alert on bursts)"
    );
}
