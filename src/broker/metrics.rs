//! The use cases' metrics: their names, and how an outcome becomes a label. Recorded where the
//! use case ends, so that every path (success and each refusal) counts once.

use std::time::Instant;

use super::{Broker, BrokerError};

/// Credentials handed out or refused, by `kind` (`jwt`, `x509`, `renewal`, `ci_jwt`, `ci_x509`)
/// and `outcome` (`issued`, or the refusal class).
pub const ISSUANCE: &str = "taskcred_issuance_total";
/// Latency of issuance, in seconds, by `kind` and `outcome`.
pub const ISSUANCE_DURATION: &str = "taskcred_issuance_duration_seconds";
/// Refusals, by `action` and `reason`, counted as the audit log records them.
pub use crate::audit::DENIALS;
/// How late the reaper ended each expired lease (seconds past its expiry).
pub const REAPER_LATENESS: &str = "taskcred_reaper_lateness_seconds";
/// The reaper's lag: now minus the oldest expiry (or task deadline) not yet reaped; 0 when
/// nothing is overdue. Sampled from the store by every replica (the same value on each).
pub const REAPER_LAG: &str = "taskcred_reaper_lag_seconds";
/// Unrevoked leases in the store (live, and expired ones not yet reaped): the whole
/// deployment's, the same on every replica.
pub const LEASES_ACTIVE: &str = "taskcred_leases_active";
/// Agents locked now (force-revoked), the whole deployment's.
pub const AGENTS_LOCKED: &str = "taskcred_agents_locked";
/// Credentials revoked before their expiry, by `cause` (`task_end`, `lock`, `revoke`,
/// `deadline`, `renewal`, `audit_failure`); counted by the revoker.
pub const REVOCATIONS: &str = "taskcred_revocations_total";
/// CI exchanges, by `issuer` (configured name, or `unknown`) and `outcome`.
pub const CI_EXCHANGES: &str = "taskcred_ci_exchanges_total";

/// Every `kind` of [`ISSUANCE`].
pub const ISSUANCE_KINDS: &[&str] = &["jwt", "x509", "renewal", "ci_jwt", "ci_x509"];

/// Every `outcome` label [`outcome`] gives.
pub const OUTCOMES: &[&str] = &[
    "issued",
    "invalid",
    "denied",
    "not_found",
    "precondition",
    "pending",
    "unauthenticated",
    "unavailable",
    "audit_failed",
    "outcome_unknown",
    "exhausted",
    "out_of_range",
    "rate_limited",
    "internal",
];

/// The label of a use case's outcome.
pub fn outcome<T>(result: &Result<T, BrokerError>) -> &'static str {
    match result {
        Ok(_) => "issued",
        Err(e) => match e {
            BrokerError::Invalid { .. } => "invalid",
            BrokerError::Denied(_) => "denied",
            BrokerError::NotFound(_) => "not_found",
            BrokerError::Precondition(_) => "precondition",
            BrokerError::Pending(_) => "pending",
            BrokerError::Unauthenticated(_) | BrokerError::CertificateExpired => "unauthenticated",
            BrokerError::Unavailable(_) | BrokerError::Incomplete(_) | BrokerError::TaskChanged => {
                "unavailable"
            }
            BrokerError::AuditFailed(_) => "audit_failed",
            BrokerError::OutcomeUnknown(_) => "outcome_unknown",
            BrokerError::Exhausted(_) => "exhausted",
            BrokerError::OutOfRange { .. } => "out_of_range",
            BrokerError::RateLimited(_) => "rate_limited",
            BrokerError::Internal(_) => "internal",
        },
    }
}

/// Runs one issuance of `kind` and counts it, whatever its outcome (each refusal too), with
/// its latency: the one wrapper of every issuance path.
pub(super) async fn metered<T>(
    kind: &'static str,
    issuance: impl Future<Output = Result<T, BrokerError>>,
) -> Result<T, BrokerError> {
    let start = Instant::now();
    let result = issuance.await;
    let outcome = outcome(&result);
    metrics::counter!(ISSUANCE, "kind" => kind, "outcome" => outcome).increment(1);
    metrics::histogram!(ISSUANCE_DURATION, "kind" => kind, "outcome" => outcome)
        .record(start.elapsed().as_secs_f64());
    result
}

/// How often [`Broker::run_store_gauges`] samples the store.
const GAUGES_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

impl Broker {
    /// Samples the store's gauges every few seconds until `shutdown`.
    pub async fn run_store_gauges(self, shutdown: tokio_util::sync::CancellationToken) {
        let mut every = tokio::time::interval(GAUGES_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = every.tick() => {}
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.observe_store() => {}
            }
        }
    }

    /// Samples the store's gauges: active leases, locked agents, the reaper's lag. A failure
    /// leaves the last values and is counted by the store's own metrics.
    pub async fn observe_store(&self) {
        let now = self.clock.now();
        if let Ok(n) = self.store.live_leases().await {
            #[allow(clippy::cast_precision_loss)] // a gauge: f64 is its type
            metrics::gauge!(LEASES_ACTIVE).set(n as f64);
        }
        if let Ok(locks) = self.store.list_locks(now).await {
            #[allow(clippy::cast_precision_loss)]
            metrics::gauge!(AGENTS_LOCKED).set(locks.len() as f64);
        }
        if let Ok(next) = self.store.next_due().await {
            let lag = next
                .and_then(|due| now.duration_since(due).ok())
                .unwrap_or_default();
            metrics::gauge!(REAPER_LAG).set(lag.as_secs_f64());
        }
    }
}

/// Describes the metrics for `/metrics`.
pub fn describe() {
    for (name, help) in [
        (
            ISSUANCE,
            "credentials issued or refused, by kind and outcome",
        ),
        (DENIALS, "refusals by action and reason"),
        (
            crate::store::metered::STORE_ERRORS,
            "store failures by op and kind",
        ),
        (REVOCATIONS, "credentials revoked before expiry, by cause"),
        (CI_EXCHANGES, "CI exchanges by issuer and outcome"),
        (
            super::limits::RATE_LIMITED,
            "issuances refused over an identity's rate, by kind (alert on bursts)",
        ),
    ] {
        metrics::describe_counter!(name, help);
    }
    for (name, help) in [
        (ISSUANCE_DURATION, "issuance latency by kind and outcome"),
        (
            REAPER_LATENESS,
            "how late the reaper ended each expired lease",
        ),
        (
            crate::store::metered::STORE_DURATION,
            "store operation latency by op",
        ),
    ] {
        metrics::describe_histogram!(name, metrics::Unit::Seconds, help);
    }
    metrics::describe_gauge!(
        REAPER_LAG,
        metrics::Unit::Seconds,
        "now minus the oldest expiry or deadline not yet reaped"
    );
    metrics::describe_gauge!(LEASES_ACTIVE, "unrevoked leases in the store");
    metrics::describe_gauge!(AGENTS_LOCKED, "agents locked now");
}

/// Registers the CI exchanges of `issuer` at zero, for each outcome.
pub(super) fn register_issuer_at_zero(issuer: &str) {
    for outcome in OUTCOMES {
        metrics::counter!(CI_EXCHANGES, "issuer" => issuer.to_owned(), "outcome" => *outcome)
            .absolute(0);
    }
}

/// Registers the use cases' series at zero, each with every label value it can have where those
/// are few: a series that appears only at its first event loses that event to `increase()` and
/// leaves dashboards empty.
pub fn register_at_zero() {
    for kind in ISSUANCE_KINDS {
        for outcome in OUTCOMES {
            metrics::counter!(ISSUANCE, "kind" => *kind, "outcome" => *outcome).absolute(0);
            // A histogram is served from its first observation on; its handle is made here.
            let _ = metrics::histogram!(ISSUANCE_DURATION, "kind" => *kind, "outcome" => *outcome);
        }
    }
    for outcome in OUTCOMES {
        metrics::counter!(CI_EXCHANGES, "issuer" => "unknown", "outcome" => *outcome).absolute(0);
    }
    for cause in super::revoker::Cause::ALL {
        metrics::counter!(REVOCATIONS, "cause" => cause.label()).absolute(0);
    }
    for kind in [
        super::limits::Limited::Agent,
        super::limits::Limited::CiRepository,
        super::limits::Limited::Source,
    ] {
        metrics::counter!(super::limits::RATE_LIMITED, "kind" => kind.name()).absolute(0);
    }
    for name in [
        super::LEASES_EXPIRED,
        super::TASKS_EXPIRED,
        super::REAPER_FAILURES,
        super::LOCK_ON_FAILURE_ERRORS,
        super::REVOCATIONS_AUDITED,
        super::REVOCATION_AUDIT_FAILURES,
        super::STORE_RESETS,
        super::revocations::FED,
        crate::store::redis::FAILOVERS,
    ] {
        metrics::counter!(name).absolute(0);
    }
    let _ = metrics::histogram!(REAPER_LATENESS);
    for name in [
        LEASES_ACTIVE,
        AGENTS_LOCKED,
        REAPER_LAG,
        super::revocations::WATCHERS,
        crate::store::redis::REPLICATION_LAG,
    ] {
        metrics::gauge!(name).set(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::{Denial, Exhaustion, Missing, Precondition};
    use crate::policy::PolicyAction;

    #[test]
    fn every_outcome_is_registered_at_zero() {
        let errors = [
            BrokerError::Invalid {
                field: "ttl",
                reason: String::new(),
            },
            BrokerError::Denied(Denial::Policy(PolicyAction::IssueToken)),
            BrokerError::NotFound(Missing::Task),
            BrokerError::Precondition(Precondition::NoIssuingCa),
            BrokerError::Pending(crate::task::TaskId::generate()),
            BrokerError::Unauthenticated(crate::ci::CiError::TooLarge),
            BrokerError::Unavailable(String::new()),
            BrokerError::AuditFailed(String::new()),
            BrokerError::OutcomeUnknown(String::new()),
            BrokerError::Exhausted(Exhaustion::Watches),
            BrokerError::OutOfRange {
                after: crate::lease::Cursor::default(),
                head: crate::lease::Cursor::default(),
            },
            BrokerError::RateLimited(std::time::Duration::from_secs(1)),
            BrokerError::Internal(String::new()),
        ];
        let mut seen: Vec<&str> = errors
            .into_iter()
            .map(|e| outcome::<()>(&Err(e)))
            .chain([outcome(&Ok(()))])
            .collect();
        seen.sort_unstable();
        let mut listed = OUTCOMES.to_vec();
        listed.sort_unstable();
        assert_eq!(seen, listed);
    }
}
