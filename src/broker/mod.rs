//! The use cases of the broker, one module each: `tasks` (request, read, list, approve, deny,
//! cancel, complete), `issue` and `issuance` (tokens and certificates, and the steps they share),
//! `renew`, `introspect`, `revoke`, `policy_reload`, `agents` (force-revoke locks), `ci` (the CI
//! exchange), `keys` (the signing keys' publication and rotation). `revoker` is the one owner of
//! revocation, `reaper` ends what expires, `auditor` writes the audit lines of the revocation log,
//! `retries` holds request ids. This module holds only [`Broker`], its parts and its settings.
//! Each use case asks Cedar first (nothing is allowed by code alone), applies the rules through
//! one atomic store operation, and audits the decision. No tonic types here.

mod agents;
mod auditor;
mod authorize;
mod ci;
mod crl;
mod delegate;
mod epoch;
mod error;
mod introspect;
mod issuance;
mod issue;
mod keys;
mod leases;
pub mod limits;
pub mod metrics;
mod pages;
mod policy_reload;
mod reaper;
mod renew;
mod retries;
mod revocations;
mod revoke;
mod revoker;
mod task_cache;
mod tasks;

pub use agents::{
    LOCK_ON_FAILURE_ERRORS, LockPage, MAX_LOCK_DURATION, MAX_LOCK_PAGE, MAX_REASON_BYTES,
    check_reason,
};
pub use auditor::{
    AUDITED_CURSOR, AUDITOR_CLAIM, AuditStep, REVOCATION_AUDIT_FAILURES, REVOCATIONS_AUDITED,
};
pub use ci::{CiCredential, CiExchangeRequest, CiExchanged};
pub use crl::CRL_REFRESH;
pub use delegate::TaskTree;
pub use epoch::{EPOCH_CHECK, STORE_EPOCH_STARTED, STORE_RESETS, StoreReset};
pub use error::{BrokerError, Denial, Exhaustion, Missing, Precondition};
pub use introspect::Introspection;
pub use issue::{IssuedCertificate, IssuedToken, TokenRequest};
pub use keys::{KEY_REFRESH, Rotation};
pub use leases::{LeaseCursor, LeasePage, LeaseQuery, MAX_LEASE_PAGE};
pub use reaper::{
    LEASES_EXPIRED, LOCK_SWEEP_EVERY, LOCK_SWEEP_GRACE, REAPER_FAILURES, Reaped, Reaper,
    TASKS_EXPIRED,
};
pub use renew::{Credential, Renewed};
pub use retries::{MAX_REQUEST_ID, RequestId};
pub use revocations::{
    FED, HEARTBEAT, MAX_WATCHES, MAX_WATCHES_PER_IDENTITY, RevocationWatch, WATCHERS, WatchEvent,
};
pub use revoker::SWEEP_CHUNK;
pub use tasks::{ListRequest, TaskListing};

use error::csr_error;
use issuance::{MintRequest, NewLease, Recorded, new_credential_id, unix_secs};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::audit::AuditLog;
use crate::clock::Clock;
use crate::mint::{IssuingCa, KeyRing};
use crate::policy::PolicyEngine;
use crate::store::Store;
use crate::task::TaskLimits;

/// Largest page of `ListTasks`.
pub const MAX_PAGE_SIZE: usize = 100;
/// Page size when none is asked.
pub const DEFAULT_PAGE_SIZE: usize = 20;

/// Settings of the use cases.
#[derive(Debug, Clone, Copy)]
pub struct BrokerSettings {
    /// Task request bounds (and the credential lifetime ceiling).
    pub limits: TaskLimits,
    /// How long ended tasks stay readable.
    pub task_retention: Duration,
    /// Longest a lease may be renewed for, from its first credential.
    pub lease_renewal_max: Duration,
    /// Issuance rate per agent identity (tokens, certificates, renewals); `None`: unlimited.
    pub agent_rate: Option<limits::Rate>,
    /// CI exchange rate per repository identity; `None`: unlimited.
    pub ci_rate: Option<limits::Rate>,
    /// Rate of the public RPCs per source address, before verification; `None`: unlimited.
    pub public_rate: Option<limits::Rate>,
    /// How long a lock that policy asks for after a failed task lasts.
    pub lock_on_failure: Duration,
    /// How far tasks may be delegated.
    pub delegation: crate::task::DelegationLimits,
}

/// The broker's use cases over a store, a policy engine, an audit log and a clock.
#[derive(Debug, Clone)]
pub struct Broker {
    store: Arc<dyn Store>,
    policy: Arc<PolicyEngine>,
    audit: Arc<AuditLog>,
    clock: Arc<dyn Clock>,
    keys: KeyRing,
    ca: Option<Arc<IssuingCa>>,
    key_file: Arc<std::path::Path>,
    /// Held while the signing key is replaced.
    rotation: Arc<tokio::sync::Mutex<()>>,
    /// Wakes the reaper when a lease falls due before its next round.
    reaper: Arc<reaper::ReaperSignal>,
    /// The one owner of revocation: every way a credential ends goes through it.
    revoker: Arc<revoker::Revoker>,
    /// Fans the revocation log out to this process's watches.
    revocations: Arc<revocations::RevocationHub>,
    /// The store's epoch as last seen, and any reset noticed.
    epoch: Arc<epoch::EpochState>,
    /// The last CRL built.
    crl: Arc<crl::CrlCache>,
    /// The CI issuers trusted for the CI exchange.
    /// The trust domains of workload identities: with the CI one, every identity there is.
    trust_domains: Arc<crate::identity::TrustDomains>,
    ci: Arc<crate::ci::CiIssuers>,
    /// Issuance rate limits per agent and per CI repository, and the rate of the public
    /// (unauthenticated) RPCs per source address, before any verification.
    agent_limiter: Arc<limits::RateLimiter>,
    ci_limiter: Arc<limits::RateLimiter>,
    source_limiter: Arc<limits::RateLimiter>,
    /// The key of `ListTasks` page tokens, shared by the replicas through the store.
    page_key: Arc<tokio::sync::OnceCell<ring::aead::LessSafeKey>>,
    /// Refusals of callers no proof was verified for, written to the audit log as samples and
    /// counts, so that garbage cannot fill the disk.
    unverified: Arc<crate::audit::Sampler>,
    /// Approved tasks as last read, for issuances (see [`task_cache`]).
    tasks: Arc<task_cache::TaskCache>,
    settings: BrokerSettings,
}

/// The parts a broker is made of.
#[derive(Debug)]
pub struct BrokerParts {
    /// Where tasks and leases live.
    pub store: Arc<dyn Store>,
    /// Who may do what.
    pub policy: Arc<PolicyEngine>,
    /// Where decisions are recorded.
    pub audit: Arc<AuditLog>,
    /// What time it is.
    pub clock: Arc<dyn Clock>,
    /// What signs tokens.
    pub keys: KeyRing,
    /// What signs certificates, if configured.
    pub ca: Option<Arc<IssuingCa>>,
    /// Where the signing key lives (a rotation writes the new key there).
    pub key_file: std::path::PathBuf,
    /// The CI issuers trusted for the CI exchange.
    pub ci: crate::ci::CiIssuers,
    /// The trust domains of workload identities (mTLS).
    pub trust_domains: crate::identity::TrustDomains,
}

impl Broker {
    /// Assembles the use cases.
    pub fn new(parts: BrokerParts, settings: BrokerSettings) -> Self {
        for issuer in parts.ci.names() {
            metrics::register_issuer_at_zero(issuer);
        }
        let revoker = revoker::Revoker::new(
            Arc::clone(&parts.store),
            Arc::clone(&parts.audit),
            settings.task_retention,
        );
        Self {
            store: parts.store,
            policy: parts.policy,
            audit: parts.audit,
            clock: parts.clock,
            keys: parts.keys,
            ca: parts.ca,
            key_file: parts.key_file.into(),
            rotation: Arc::default(),
            reaper: Arc::default(),
            revoker: Arc::new(revoker),
            revocations: Arc::default(),
            epoch: Arc::default(),
            crl: Arc::default(),
            ci: Arc::new(parts.ci),
            trust_domains: Arc::new(parts.trust_domains),
            agent_limiter: Arc::new(limits::RateLimiter::new(settings.agent_rate)),
            ci_limiter: Arc::new(limits::RateLimiter::new(settings.ci_rate)),
            source_limiter: Arc::new(limits::RateLimiter::new(settings.public_rate)),
            unverified: Arc::default(),
            page_key: Arc::default(),
            tasks: Arc::default(),
            settings,
        }
    }

    /// Takes a token of `key` from the bucket of its kind.
    fn rate_limit(&self, kind: limits::Limited, key: &str) -> Result<(), BrokerError> {
        let limiter = match kind {
            limits::Limited::Agent => &self.agent_limiter,
            limits::Limited::CiRepository => &self.ci_limiter,
            limits::Limited::Source => &self.source_limiter,
        };
        limiter
            .take(key, std::time::Instant::now())
            .map_err(|wait| {
                ::metrics::counter!(limits::RATE_LIMITED, "kind" => kind.name()).increment(1);
                BrokerError::RateLimited(wait)
            })
    }

    /// Writes the count of sampled-out refusals of unverified callers, once their window has
    /// passed (called every minute by the app).
    pub fn flush_unverified_refusals(&self) {
        self.unverified.flush(&self.audit, self.clock.now());
    }

    /// Fsyncs the audit log if it is synced on an interval (`audit.fsync = "interval"`), off
    /// the async threads.
    pub async fn sync_audit(&self) {
        if !self.audit.syncs_on_interval() {
            return;
        }
        let audit = self.audit.clone();
        match tokio::task::spawn_blocking(move || audit.sync()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                ::metrics::counter!(crate::audit::AUDIT_WRITE_FAILURES, "sink" => "file")
                    .increment(1);
                tracing::error!(error = %e, "fsync of the audit log failed");
            }
            Err(e) => tracing::error!(error = %e, "fsync of the audit log did not run"),
        }
    }

    /// The policy engine (for reloads on SIGHUP).
    pub fn policy(&self) -> &Arc<PolicyEngine> {
        &self.policy
    }

    /// The store (for readiness checks and housekeeping).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Deletes tasks whose retention has passed, and revocation log entries old enough that
    /// every credential they name has expired (logged more than the longest credential
    /// lifetime, plus a minute, ago).
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`].
    pub async fn prune(&self) -> Result<usize, BrokerError> {
        let now: SystemTime = self.clock.now();
        let logged_before = now
            .checked_sub(self.settings.limits.credential_ttl_max + Duration::from_secs(60))
            .unwrap_or(SystemTime::UNIX_EPOCH);
        self.store.prune_revocations(logged_before).await?;
        Ok(self.store.prune_ended(now).await?)
    }
}

#[cfg(test)]
mod tests;
