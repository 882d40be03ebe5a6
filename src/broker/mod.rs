//! The use cases of the broker: request, read, list, approve, deny, cancel and complete tasks;
//! issue, renew, revoke and introspect task-bound credentials; reload policy. `agents` holds
//! force-revoke (locks), `keys` the signing keys' publication and rotation, `auditor` the audit
//! lines of the revocation log, `retries` request ids. Each use case asks Cedar first (nothing
//! is allowed by code alone), applies the rules through one atomic store operation, and audits
//! the decision. No tonic types here.

mod agents;
mod auditor;
mod ci;
mod crl;
mod epoch;
mod keys;
mod leases;
pub mod limits;
pub mod metrics;
mod pages;
mod reaper;
mod retries;
mod revocations;

pub use agents::{
    LOCK_ON_FAILURE_ERRORS, LockPage, MAX_LOCK_DURATION, MAX_LOCK_PAGE, MAX_REASON_BYTES,
    check_reason,
};
pub use auditor::{
    AUDITED_CURSOR, AUDITOR_CLAIM, AuditStep, REVOCATION_AUDIT_FAILURES, REVOCATIONS_AUDITED,
};
pub use ci::{CiCredential, CiExchangeRequest, CiExchanged};
pub use crl::CRL_REFRESH;
pub use epoch::{EPOCH_CHECK, STORE_EPOCH_STARTED, STORE_RESETS, StoreReset};
pub use keys::{KEY_REFRESH, Rotation};
pub use leases::{LeaseCursor, LeasePage, LeaseQuery, MAX_LEASE_PAGE};
pub use reaper::{LEASES_EXPIRED, REAPER_FAILURES, Reaped, TASKS_EXPIRED};
pub use retries::{MAX_REQUEST_ID, RequestId};
pub use revocations::{
    FED, HEARTBEAT, MAX_WATCHES, MAX_WATCHES_PER_IDENTITY, RevocationWatch, WATCHERS, WatchEvent,
};

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::audit::{AuditEvent, AuditLog};
use crate::clock::Clock;
use crate::identity::{PeerIdentity, WorkloadId};
use crate::lease::{CredentialKind, Lease, LeaseId, LeaseState, check_issuable};
use crate::mint::{
    AccessClaims, Confirmation, IssuedCertInfo, IssuingCa, KeyRing, SvidRequest, random_id,
    random_serial, serial_hex, verify_csr,
};
use crate::policy::{PolicyAction, PolicyEngine, Principal, Resource, Verdict};
use crate::store::{IssueError, Store, StoreError, TaskQuery, UpdateError, check_renewable};
use crate::task::{
    Action, Approval, Audience, Decision, Outcome, RawTaskRequest, Task, TaskError, TaskId,
    TaskLimits, TaskRequest,
};

/// Largest page of `ListTasks`.
pub const MAX_PAGE_SIZE: usize = 100;
/// Page size when none is asked.
pub const DEFAULT_PAGE_SIZE: usize = 20;
/// Most tasks examined for one page of `ListTasks`.
const MAX_SCAN: usize = 1000;

/// Why a use case refused or failed. One mapping to gRPC statuses lives in `api`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// An input field is out of bounds (`INVALID_ARGUMENT`).
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Policy or separation of duties refuses (`PERMISSION_DENIED`).
    #[error("{0}")]
    Denied(String),
    /// No such task, lease... (`NOT_FOUND`).
    #[error("{0}")]
    NotFound(Missing),
    /// The task's state does not allow it (`FAILED_PRECONDITION`).
    #[error("{0}")]
    Precondition(String),
    /// The store cannot be reached (`UNAVAILABLE`); nothing was changed.
    #[error("store unavailable")]
    Unavailable(String),
    /// The store did not answer a change it was sent (`UNAVAILABLE`, said so): it may have
    /// been made. A retry with the same request id is safe.
    #[error("outcome unknown")]
    OutcomeUnknown(String),
    /// The audit log cannot be written and is required (`audit.required`): the decision is not
    /// made (`UNAVAILABLE`); nothing was changed.
    #[error("the audit log cannot be written")]
    AuditFailed(String),
    /// A limit of this broker is reached (`RESOURCE_EXHAUSTED`); retry later.
    #[error("{0}")]
    Exhausted(String),
    /// A position the caller gave is not one the broker holds (`OUT_OF_RANGE`).
    #[error("{0}")]
    OutOfRange(String),
    /// The proof of identity is refused (`UNAUTHENTICATED`): a CI ID token that fails a check.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller went over its issuance rate (`RESOURCE_EXHAUSTED`, with when to retry).
    #[error("issuance rate limit reached; retry in {} ms", .0.as_millis().max(1))]
    RateLimited(Duration),
    /// The task awaits approvals (`FAILED_PRECONDITION`, naming the task).
    #[error("task {0} is pending approval; retry once it is approved")]
    Pending(TaskId),
    /// Something that should not happen (`INTERNAL`); details are logged, not returned.
    #[error("internal error")]
    Internal(String),
}

/// What a `NOT_FOUND` did not find.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Missing {
    /// No task has the id.
    #[error("no such task")]
    Task,
    /// No lease has the id.
    #[error("no such lease")]
    Lease,
    /// No published signing key has the kid.
    #[error("no published signing key has that kid")]
    Key,
    /// The CI job has no task: it never exchanged an ID token.
    #[error("no task for this job: it has not exchanged an ID token")]
    CiTask,
}

impl From<TaskError> for BrokerError {
    fn from(e: TaskError) -> Self {
        match e {
            TaskError::Invalid { field, reason } => Self::Invalid { field, reason },
            TaskError::Forbidden(m) => Self::Denied(m),
            TaskError::Precondition(m) => Self::Precondition(m),
        }
    }
}

impl From<StoreError> for BrokerError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(m) => Self::Unavailable(m),
            StoreError::OutcomeUnknown(m) => Self::OutcomeUnknown(m),
            StoreError::Contention(id) => {
                Self::Unavailable(format!("contention on task {id}; retry"))
            }
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<IssueError> for BrokerError {
    fn from(e: IssueError) -> Self {
        match e {
            IssueError::NotFound => Self::NotFound(Missing::Task),
            IssueError::Refused(t) => t.into(),
            IssueError::Locked(reason) => Self::Denied(format!("agent is locked: {reason}")),
            IssueError::StoreReset => Self::Unavailable(
                "the store was reset (its data lost): nothing was issued; a new store epoch \
                 began"
                    .into(),
            ),
            IssueError::Exists => Self::Precondition("a lease with this id exists".into()),
            IssueError::Store(s) => s.into(),
        }
    }
}

impl From<UpdateError> for BrokerError {
    fn from(e: UpdateError) -> Self {
        match e {
            UpdateError::NotFound => Self::NotFound(Missing::Task),
            UpdateError::Rejected(t) => t.into(),
            UpdateError::Store(s) => s.into(),
        }
    }
}

/// The refusal of a CSR.
fn csr_error(e: crate::mint::CsrError) -> BrokerError {
    BrokerError::Invalid {
        field: "csr",
        reason: e.to_string(),
    }
}

/// Whole seconds since the Unix epoch (0 before it).
fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The action that issues a credential of `kind`.
fn issue_action(kind: CredentialKind) -> PolicyAction {
    match kind {
        CredentialKind::Jwt => PolicyAction::IssueToken,
        CredentialKind::X509 => PolicyAction::IssueCertificate,
    }
}

/// The kind of credential `action` issues.
fn lease_kind(action: PolicyAction) -> CredentialKind {
    if action == PolicyAction::IssueCertificate {
        CredentialKind::X509
    } else {
        CredentialKind::Jwt
    }
}

/// A fresh credential id of `kind`: a `jti`, or a certificate serial (hex, and its bytes).
fn new_credential_id(kind: CredentialKind) -> Result<(String, Option<[u8; 16]>), BrokerError> {
    let internal = |e: crate::mint::MintError| BrokerError::Internal(e.to_string());
    match kind {
        CredentialKind::Jwt => Ok((random_id().map_err(internal)?, None)),
        CredentialKind::X509 => {
            let serial = random_serial().map_err(internal)?;
            Ok((serial_hex(&serial), Some(serial)))
        }
    }
}

/// Filters of `ListTasks`, as asked.
#[derive(Debug, Clone, Default)]
pub struct ListRequest {
    /// Only this state.
    pub state: Option<crate::task::TaskState>,
    /// Only this executor.
    pub executor: Option<WorkloadId>,
    /// Only this requester.
    pub requester: Option<WorkloadId>,
    /// Page size (default 20, at most 100).
    pub page_size: Option<usize>,
    /// The opaque token of the previous page (see [`TaskListing`]).
    pub page_token: Option<String>,
}

/// One page of `ListTasks`.
#[derive(Debug, Clone, Default)]
pub struct TaskListing {
    /// The tasks the caller may read, newest first.
    pub tasks: Vec<Task>,
    /// Where the next page starts, if there may be more: opaque and bound to the caller (the
    /// scan may have stopped at a task the caller may not read).
    pub next_page_token: Option<String>,
}

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
}

/// What `IssueToken` asks for.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    /// The task.
    pub task: TaskId,
    /// The one audience.
    pub audience: String,
    /// A subset of the grant's actions; empty for all of them.
    pub actions: Vec<String>,
    /// Lifetime asked; `None` for the task's ceiling.
    pub ttl: Option<Duration>,
    /// Makes a retry safe (see [`RequestId`]).
    pub request_id: Option<RequestId>,
}

/// A token handed out, with its lease.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    /// The compact JWS.
    pub token: String,
    /// The lease recorded before it was signed.
    pub lease: Lease,
}

/// A certificate handed out, with its lease.
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    /// The X509-SVID (PEM).
    pub certificate_pem: String,
    /// The issuing CA's certificate (PEM): the chain up to, not including, the root.
    pub chain_pem: String,
    /// The lease recorded before it was signed.
    pub lease: Lease,
}

/// The shared state of one issuance once its checks passed.
#[derive(Debug)]
struct Issuance {
    task: Task,
    now: SystemTime,
    now_secs: u64,
    ttl_secs: u64,
    /// The caller's request id, if it gave one.
    request: Option<RequestId>,
    /// Whether the lease is an earlier attempt's (a retried request, answered again).
    reanswer: bool,
}

impl Issuance {
    fn exp_secs(&self) -> u64 {
        self.now_secs + self.ttl_secs
    }
}

/// What a new lease is for.
#[derive(Debug)]
struct NewLease {
    kind: CredentialKind,
    credential: String,
    audience: Option<String>,
    actions: Vec<String>,
}

/// A lease recorded by this attempt, or by an earlier attempt of the same request id.
#[derive(Debug)]
enum Recorded {
    New(Lease),
    Earlier(Lease),
}

/// What is about to be minted, as policy is told it (the context of `IssueToken`,
/// `IssueCertificate` and `ExchangeCiToken`, the same on every path).
#[derive(Debug, Clone, Copy)]
struct MintRequest<'a> {
    kind: CredentialKind,
    /// The one audience of a JWT; none for a certificate.
    audience: Option<&'a str>,
    /// The actions a JWT grants (its scope); none for a certificate.
    actions: &'a [String],
    /// A renewal of an existing lease.
    renewal: bool,
}

impl MintRequest<'_> {
    /// The Cedar action deciding this kind of credential for a workload.
    fn action(&self) -> PolicyAction {
        match self.kind {
            CredentialKind::Jwt => PolicyAction::IssueToken,
            CredentialKind::X509 => PolicyAction::IssueCertificate,
        }
    }

    fn context(&self, ttl_secs: u64) -> serde_json::Value {
        serde_json::json!({
            "kind": self.kind.as_str(),
            "audience": self.audience.unwrap_or_default(),
            "actions": self.actions,
            "ttl_secs": ttl_secs,
            "renewal": self.renewal,
        })
    }
}

/// A renewed credential.
#[derive(Debug, Clone)]
pub enum Credential {
    /// A compact JWS.
    Token(String),
    /// An X509-SVID and its chain (PEM).
    Certificate {
        /// The certificate.
        certificate_pem: String,
        /// The issuing CA's certificate.
        chain_pem: String,
    },
}

/// What `RenewLease` hands back.
#[derive(Debug, Clone)]
pub struct Renewed {
    /// The fresh credential.
    pub credential: Credential,
    /// The lease, with its new credential id and expiry.
    pub lease: Lease,
    /// The lifetime of the fresh credential.
    pub ttl: Duration,
    /// How much further the lease may be renewed past the new expiry.
    pub renewal_left: Duration,
}

/// What introspection found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Introspection {
    /// The token is ours, valid now, and its lease is active.
    Active(Box<AccessClaims>),
    /// Anything else: expired, revoked, unknown, foreign, malformed. No reason is given.
    Inactive,
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

    /// Asks policy, audits the answer, and refuses unless permitted.
    fn authorize(
        &self,
        caller: &WorkloadId,
        action: PolicyAction,
        resource: &Resource<'_>,
    ) -> Result<Verdict, BrokerError> {
        self.authorize_in(caller, action, resource, None)
    }

    /// As [`Broker::authorize`], with a request context.
    fn authorize_in(
        &self,
        caller: &WorkloadId,
        action: PolicyAction,
        resource: &Resource<'_>,
        context: Option<serde_json::Value>,
    ) -> Result<Verdict, BrokerError> {
        let verdict = self.policy.decide_in(caller, action, resource, context);
        let mut event = AuditEvent::new(
            self.clock.now(),
            action.name(),
            caller.as_str(),
            verdict.allowed,
        )
        .policies(&verdict.policies);
        if let Resource::Task(t) = resource {
            event = event.task(t.id);
        }
        if !verdict.errors.is_empty() {
            event = event.detail("policy_errors", verdict.errors.clone());
        }
        if verdict.allowed {
            if action == PolicyAction::RequestTask {
                event = event.detail("quorum", verdict.quorum);
            }
            // A decision that cannot be recorded is not made (with `audit.required`).
            self.audit
                .record_or_refuse(&event)
                .map_err(|e| BrokerError::AuditFailed(e.to_string()))?;
            Ok(verdict)
        } else {
            self.audit
                .record(&event.reason(crate::audit::NOT_PERMITTED));
            Err(BrokerError::Denied(format!(
                "policy does not permit {} here",
                action.name()
            )))
        }
    }

    /// Audits a refusal of `caller` (as a peer) and hands the error back.
    fn refusal(
        &self,
        action: PolicyAction,
        caller: &PeerIdentity,
        task: TaskId,
        e: BrokerError,
    ) -> BrokerError {
        self.audit_refusal(action, &caller.id, task, &e);
        e
    }

    fn audit_refusal(
        &self,
        action: PolicyAction,
        caller: &WorkloadId,
        task: TaskId,
        e: &BrokerError,
    ) {
        if matches!(
            e,
            BrokerError::Denied(_) | BrokerError::Precondition(_) | BrokerError::Invalid { .. }
        ) {
            self.audit.record(
                &AuditEvent::new(self.clock.now(), action.name(), caller.as_str(), false)
                    .task(task)
                    .reason(e.to_string()),
            );
        }
        if let BrokerError::OutcomeUnknown(detail) = e {
            // Neither done nor refused, as far as the broker can know: the record says so.
            self.audit.record(
                &AuditEvent::new(self.clock.now(), action.name(), caller.as_str(), false)
                    .outcome_unknown()
                    .task(task)
                    .reason(format!("outcome unknown: {detail}")),
            );
        }
    }

    /// Requests a task executed by `raw.executor` on behalf of `caller`. Policy decides whether
    /// it may be asked and how many approvals it needs; with none it is approved at once.
    ///
    /// # Errors
    /// [`BrokerError::Invalid`] naming the field, [`BrokerError::Denied`] by policy,
    /// [`BrokerError::Unavailable`].
    pub async fn request_task(
        &self,
        caller: &WorkloadId,
        raw: RawTaskRequest,
    ) -> Result<Task, BrokerError> {
        let request = TaskRequest::parse(raw, &self.settings.limits)?;
        // A CI job's task is made only by the exchange of its ID token, never asked for.
        if request.executor.trust_domain() == self.ci.trust_domain() {
            return Err(BrokerError::Invalid {
                field: "executor",
                reason: "a CI identity's tasks come only from ExchangeCiToken".into(),
            });
        }
        let now = self.clock.now();
        let id = TaskId::generate();
        // The quorum is not known before policy answers; the provisional task only informs it.
        let provisional = Task::new(id, request.clone(), caller.clone(), 1, Vec::new(), now);
        let verdict = self.authorize(
            caller,
            PolicyAction::RequestTask,
            &Resource::Task(&provisional),
        )?;
        let task = Task::new(
            id,
            request,
            caller.clone(),
            verdict.quorum,
            verdict.policies,
            now,
        );
        self.store.create_task(&task).await?;
        tracing::info!(task = %task.id, executor = %task.executor, quorum = task.quorum, state = %task.state, "task requested");
        Ok(task)
    }

    async fn load(&self, id: &TaskId) -> Result<Task, BrokerError> {
        self.store
            .get_task(id)
            .await?
            .ok_or(BrokerError::NotFound(Missing::Task))
    }

    /// Reads a task, with its grants, labels and approval history.
    ///
    /// # Errors
    /// [`BrokerError::NotFound`], [`BrokerError::Denied`], [`BrokerError::Unavailable`].
    pub async fn get_task(&self, caller: &WorkloadId, id: &TaskId) -> Result<Task, BrokerError> {
        let task = self.load(id).await?;
        self.authorize(caller, PolicyAction::GetTask, &Resource::Task(&task))?;
        Ok(task)
    }

    /// Lists tasks newest first; a page holds only the tasks `GetTask` permits the caller.
    ///
    /// # Errors
    /// [`BrokerError::Denied`], [`BrokerError::Invalid`] for a bad page size,
    /// [`BrokerError::Unavailable`].
    pub async fn list_tasks(
        &self,
        caller: &WorkloadId,
        request: ListRequest,
    ) -> Result<TaskListing, BrokerError> {
        let limit = request.page_size.unwrap_or(DEFAULT_PAGE_SIZE);
        if limit == 0 || limit > MAX_PAGE_SIZE {
            return Err(BrokerError::Invalid {
                field: "page_size",
                reason: format!("must be 1 to {MAX_PAGE_SIZE}"),
            });
        }
        self.authorize(caller, PolicyAction::ListTasks, &Resource::Broker)?;
        let before = match &request.page_token {
            Some(token) => Some(self.open_page(caller, token).await?),
            None => None,
        };
        let mut page = self
            .store
            .list_tasks(&TaskQuery {
                state: request.state,
                executor: request.executor,
                requester: request.requester,
                before,
                limit,
                max_scan: MAX_SCAN,
            })
            .await?;
        page.tasks.retain(|t| {
            self.policy
                .decide(caller, PolicyAction::GetTask, &Resource::Task(t))
                .allowed
        });
        let next_page_token = match page.next {
            Some(next) => Some(self.seal_page(caller, next).await?),
            None => None,
        };
        Ok(TaskListing {
            tasks: page.tasks,
            next_page_token,
        })
    }

    /// Records an approval or denial by `caller`. Separation of duties holds whatever policy
    /// says: no decision by the requester or the executor, one per approver, none after the
    /// deadline or on a task that is not pending.
    ///
    /// # Errors
    /// [`BrokerError::Denied`] (policy or separation of duties), [`BrokerError::Precondition`],
    /// [`BrokerError::NotFound`], [`BrokerError::Invalid`] (note), [`BrokerError::Unavailable`].
    pub async fn decide(
        &self,
        caller: &WorkloadId,
        id: &TaskId,
        decision: Decision,
        note: String,
    ) -> Result<Task, BrokerError> {
        let action = match decision {
            Decision::Approve => PolicyAction::ApproveTask,
            Decision::Deny => PolicyAction::DenyTask,
        };
        crate::task::check_note(&note)?;
        let task = self.load(id).await?;
        self.authorize(caller, action, &Resource::Task(&task))?;
        let now = self.clock.now();
        let approval = Approval {
            id: TaskId::generate().to_string(),
            approver: caller.clone(),
            decision,
            at: now,
            note,
        };
        let approval_id = approval.id.clone();
        let result = self
            .store
            .update_task(
                id,
                Arc::new(move |t: &mut Task| t.decide(approval.clone(), now)),
                self.settings.task_retention,
            )
            .await
            .map_err(BrokerError::from);
        match result {
            Ok(task) => {
                self.audit.record(
                    &AuditEvent::new(now, action.name(), caller.as_str(), true)
                        .task(task.id)
                        .reason("decision recorded")
                        .detail("approval_id", approval_id)
                        .detail("state", task.state.as_str())
                        .detail("approvals", task.approval_count())
                        .detail("quorum", task.quorum),
                );
                tracing::info!(task = %task.id, approver = %caller, state = %task.state, "decision recorded");
                Ok(task)
            }
            Err(e) => {
                self.audit_refusal(action, caller, *id, &e);
                Err(e)
            }
        }
    }

    /// Cancels a task on behalf of its requester, before it runs.
    ///
    /// # Errors
    /// [`BrokerError::Denied`], [`BrokerError::Precondition`], [`BrokerError::NotFound`],
    /// [`BrokerError::Unavailable`].
    pub async fn cancel_task(&self, caller: &WorkloadId, id: &TaskId) -> Result<Task, BrokerError> {
        let task = self.load(id).await?;
        self.authorize(caller, PolicyAction::CancelTask, &Resource::Task(&task))?;
        let now = self.clock.now();
        let who = caller.clone();
        let result = self
            .store
            .update_task(
                id,
                Arc::new(move |t: &mut Task| t.cancel(&who, now)),
                self.settings.task_retention,
            )
            .await
            .map_err(BrokerError::from);
        if let Err(e) = &result {
            self.audit_refusal(PolicyAction::CancelTask, caller, *id, e);
        }
        result
    }

    /// Reloads the policies if policy permits `caller` to. An invalid set is refused and the
    /// policies in force stay.
    ///
    /// # Errors
    /// [`BrokerError::Denied`], or [`BrokerError::Precondition`] with the file and line at fault.
    pub fn reload_policy(&self, caller: &WorkloadId) -> Result<(usize, Vec<String>), BrokerError> {
        self.authorize(caller, PolicyAction::ReloadPolicy, &Resource::Broker)?;
        self.reload_policy_unchecked("ReloadPolicy RPC", Some(caller))
    }

    /// Reloads the policies for the operator's SIGHUP, which proves itself by having access to
    /// the process.
    ///
    /// # Errors
    /// [`BrokerError::Precondition`] with the file and line at fault.
    pub fn reload_policy_on_signal(&self) -> Result<(usize, Vec<String>), BrokerError> {
        self.reload_policy_unchecked("SIGHUP", None)
    }

    fn reload_policy_unchecked(
        &self,
        trigger: &str,
        caller: Option<&WorkloadId>,
    ) -> Result<(usize, Vec<String>), BrokerError> {
        let principal = caller.map_or("process signal", WorkloadId::as_str);
        match self.policy.reload() {
            Ok(n) => {
                let files = self
                    .policy
                    .current()
                    .files()
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect();
                tracing::info!(policies = n, trigger, "policies reloaded");
                self.audit.record(
                    &AuditEvent::new(self.clock.now(), "ReloadPolicy", principal, true)
                        .reason(format!("{n} policies loaded ({trigger})")),
                );
                Ok((n, files))
            }
            Err(e) => {
                tracing::error!(error = %e, trigger, "policy reload refused; the policies in force stay");
                self.audit.record(
                    &AuditEvent::new(self.clock.now(), "ReloadPolicy", principal, false)
                        .reason(format!("invalid policy set, previous set stays: {e}")),
                );
                Err(BrokerError::Precondition(format!(
                    "policy set refused, the policies in force stay: {e}"
                )))
            }
        }
    }

    /// Issues a JWT for one audience of an approved task to its executor, bound to the caller's
    /// certificate. Checks, cheapest first: the request's bounds; the task exists; the caller
    /// is its executor; it is approved and before its deadline; the audience and actions are
    /// inside its grants; policy permits (with the request as context). The lease is then
    /// recorded by the store in the same atomic step that re-checks the task and the agent's
    /// lock, and only then is the token signed.
    ///
    /// The lifetime is the least of: what was asked, the task's ceiling, the configured
    /// ceiling, and the time left to the deadline (down to 1 s); never more than asked.
    ///
    /// # Errors
    /// [`BrokerError::Invalid`] naming the field, [`BrokerError::NotFound`],
    /// [`BrokerError::Denied`] (not the executor, outside the grant, policy, locked agent),
    /// [`BrokerError::Precondition`] (task not approved, deadline), [`BrokerError::Unavailable`].
    pub async fn issue_token(
        &self,
        caller: &PeerIdentity,
        request: TokenRequest,
    ) -> Result<IssuedToken, BrokerError> {
        let start = std::time::Instant::now();
        let result = match self.rate_limit(limits::Limited::Agent, caller.id.as_str()) {
            Ok(()) => self.issue_token_unmetered(caller, request).await,
            Err(e) => Err(e),
        };
        metrics::issuance("jwt", &result, start);
        result
    }

    async fn issue_token_unmetered(
        &self,
        caller: &PeerIdentity,
        request: TokenRequest,
    ) -> Result<IssuedToken, BrokerError> {
        let audience = Audience::parse(&request.audience).map_err(|_| BrokerError::Invalid {
            field: "audience",
            reason: "1 to 256 bytes of A-Z a-z 0-9 . _ : / -".into(),
        })?;
        let mut asked: Vec<Action> = Vec::with_capacity(request.actions.len());
        for a in &request.actions {
            asked.push(Action::parse(a).map_err(|_| BrokerError::Invalid {
                field: "actions",
                reason: format!("{a:?} is not an action"),
            })?);
        }
        let mut issuance = self
            .begin_issuance(caller, &request.task, request.ttl, PolicyAction::IssueToken)
            .await?;
        issuance.request = request.request_id.clone();
        let task = &issuance.task;
        let grant = task
            .grants
            .iter()
            .find(|g| g.audience == audience)
            .ok_or_else(|| {
                self.refusal(
                    PolicyAction::IssueToken,
                    caller,
                    task.id,
                    BrokerError::Denied(format!("audience {audience} is not granted by the task")),
                )
            })?;
        if let Some(a) = asked.iter().find(|a| !grant.actions.contains(*a)) {
            return Err(self.refusal(
                PolicyAction::IssueToken,
                caller,
                task.id,
                BrokerError::Denied(format!("action {a} is not granted for {audience}")),
            ));
        }
        let mut actions: Vec<String> = if asked.is_empty() {
            grant.actions.iter().map(ToString::to_string).collect()
        } else {
            asked.iter().map(ToString::to_string).collect()
        };
        actions.sort();
        actions.dedup();

        let verdict = self.authorize_issuance(
            caller,
            &issuance,
            &MintRequest {
                kind: CredentialKind::Jwt,
                audience: Some(audience.as_str()),
                actions: &actions,
                renewal: false,
            },
        )?;
        let jti = random_id().map_err(|e| BrokerError::Internal(e.to_string()))?;
        let fingerprint = format!(
            "jwt {} {audience} {} {:?}",
            task.id,
            actions.join(" "),
            request.ttl
        );
        let new = NewLease {
            kind: CredentialKind::Jwt,
            credential: jti,
            audience: Some(audience.to_string()),
            actions,
        };
        let recorded = self
            .lease_for(
                caller,
                &issuance,
                request.request_id.as_ref(),
                &fingerprint,
                new,
            )
            .await?;
        let lease = match recorded {
            Recorded::New(lease) => lease,
            Recorded::Earlier(lease) => {
                issuance.reanswer = true;
                lease
            }
        };
        let times = (unix_secs(lease.issued_at), unix_secs(lease.expires_at));
        let claims = self.access_claims(caller, &issuance.task, &lease, times);
        let token = self
            .keys
            .sign_access_token(&claims)
            .map_err(|e| BrokerError::Internal(e.to_string()))?;
        self.audit_issued("IssueToken", caller, &issuance, &verdict, &lease, times)
            .await?;
        Ok(IssuedToken { token, lease })
    }

    /// Issues an X509-SVID for the key of `csr` to the executor of an approved task, with the
    /// same checks and lifetime rule as [`Broker::issue_token`]. The CSR's signature and key are
    /// checked first; nothing else of it is used.
    ///
    /// # Errors
    /// As [`Broker::issue_token`]; [`BrokerError::Invalid`] (field `csr`) for a bad CSR;
    /// [`BrokerError::Precondition`] when no issuing CA is configured.
    pub async fn issue_certificate(
        &self,
        caller: &PeerIdentity,
        task: &TaskId,
        csr: &[u8],
        ttl: Option<Duration>,
        request: Option<&RequestId>,
    ) -> Result<IssuedCertificate, BrokerError> {
        let start = std::time::Instant::now();
        let result = match self.rate_limit(limits::Limited::Agent, caller.id.as_str()) {
            Ok(()) => {
                self.issue_certificate_unmetered(caller, task, csr, ttl, request)
                    .await
            }
            Err(e) => Err(e),
        };
        metrics::issuance("x509", &result, start);
        result
    }

    async fn issue_certificate_unmetered(
        &self,
        caller: &PeerIdentity,
        task: &TaskId,
        csr: &[u8],
        ttl: Option<Duration>,
        request: Option<&RequestId>,
    ) -> Result<IssuedCertificate, BrokerError> {
        let csr = verify_csr(csr).map_err(csr_error)?;
        let Some(ca) = &self.ca else {
            return Err(BrokerError::Precondition(
                "this broker has no issuing CA configured (issuer.ca_cert)".into(),
            ));
        };
        let mut issuance = self
            .begin_issuance(caller, task, ttl, PolicyAction::IssueCertificate)
            .await?;
        issuance.request = request.cloned();
        let verdict = self.authorize_issuance(
            caller,
            &issuance,
            &MintRequest {
                kind: CredentialKind::X509,
                audience: None,
                actions: &[],
                renewal: false,
            },
        )?;
        let serial = random_serial().map_err(|e| BrokerError::Internal(e.to_string()))?;
        // Not the CSR: a retry may come with a new key (an earlier attempt's certificate is
        // never signed again, and a lease not yet recorded takes the key of the retry).
        let fingerprint = format!("x509 {} {ttl:?}", issuance.task.id);
        let new = NewLease {
            kind: CredentialKind::X509,
            credential: serial_hex(&serial),
            audience: None,
            actions: Vec::new(),
        };
        let lease = match self
            .lease_for(caller, &issuance, request, &fingerprint, new)
            .await?
        {
            Recorded::New(lease) => lease,
            // A serial is never signed twice: the lease is the caller's to renew.
            Recorded::Earlier(lease) => {
                return Err(self.refusal(
                    PolicyAction::IssueCertificate,
                    caller,
                    issuance.task.id,
                    BrokerError::Precondition(format!(
                        "this request_id already issued lease {} (serial {}); renew that lease \
                         (RenewLease) for a certificate",
                        lease.id, lease.credential
                    )),
                ));
            }
        };
        let certificate_pem = ca
            .issue(
                &csr,
                &SvidRequest {
                    id: &caller.id,
                    task: &issuance.task.id,
                    serial,
                    now: lease.issued_at,
                    not_after: lease.expires_at,
                },
            )
            .map_err(|e| BrokerError::Internal(e.to_string()))?;
        self.audit_issued(
            "IssueCertificate",
            caller,
            &issuance,
            &verdict,
            &lease,
            (unix_secs(lease.issued_at), unix_secs(lease.expires_at)),
        )
        .await?;
        Ok(IssuedCertificate {
            certificate_pem,
            chain_pem: ca.chain_pem().to_owned(),
            lease,
        })
    }

    /// Gives an active lease a fresh credential (a new `jti` or serial), up to the lease's
    /// renewal ceiling and the task's deadline; the previous credential stops being active.
    /// A JWT keeps its audience and scope; a certificate needs a CSR (the key may rotate).
    /// A lifetime asked past the ceiling is refused with the time left, never silently cut;
    /// with none asked, the credential lives the least of the task's ceiling and the time left.
    ///
    /// # Errors
    /// [`BrokerError::NotFound`], [`BrokerError::Denied`] (another agent, policy, locked),
    /// [`BrokerError::Precondition`] (lease or task ended, ceiling reached),
    /// [`BrokerError::Invalid`], [`BrokerError::Unavailable`].
    pub async fn renew_lease(
        &self,
        caller: &PeerIdentity,
        id: &LeaseId,
        ttl: Option<Duration>,
        csr: Option<&[u8]>,
    ) -> Result<Renewed, BrokerError> {
        let start = std::time::Instant::now();
        let result = match self.rate_limit(limits::Limited::Agent, caller.id.as_str()) {
            Ok(()) => self.renew_lease_unmetered(caller, id, ttl, csr).await,
            Err(e) => Err(e),
        };
        metrics::issuance("renewal", &result, start);
        result
    }

    async fn renew_lease_unmetered(
        &self,
        caller: &PeerIdentity,
        id: &LeaseId,
        ttl: Option<Duration>,
        csr: Option<&[u8]>,
    ) -> Result<Renewed, BrokerError> {
        if let Some(t) = ttl
            && t < Duration::from_secs(1)
        {
            return Err(BrokerError::Invalid {
                field: "ttl",
                reason: "must be at least 1s".into(),
            });
        }
        let lease = self
            .store
            .get_lease(id)
            .await?
            .ok_or(BrokerError::NotFound(Missing::Lease))?;
        let csr = match (lease.kind, csr) {
            (CredentialKind::X509, Some(c)) => Some(verify_csr(c).map_err(csr_error)?),
            (CredentialKind::X509, None) => {
                return Err(BrokerError::Invalid {
                    field: "csr",
                    reason: "required to renew a certificate lease".into(),
                });
            }
            (CredentialKind::Jwt, _) => None,
        };
        let task = self.load(&lease.task).await?;
        let now = self.clock.now();
        if lease.agent != caller.id {
            return Err(self.refusal(
                PolicyAction::RenewLease,
                caller,
                task.id,
                BrokerError::Denied("only the lease's agent may renew it".into()),
            ));
        }
        if let Err(e) =
            check_issuable(&task, &caller.id, now).and_then(|()| check_renewable(&lease, now))
        {
            let e = self.explain_by_lock(&caller.id, e.into()).await;
            return Err(self.refusal(PolicyAction::RenewLease, caller, task.id, e));
        }
        let left = lease.renew_until.duration_since(now).unwrap_or_default();
        if left.as_secs() < 1 {
            return Err(self.refusal(
                PolicyAction::RenewLease,
                caller,
                task.id,
                BrokerError::Precondition("the lease's renewal ceiling is reached".into()),
            ));
        }
        if let Some(asked) = ttl
            && asked > left
        {
            return Err(self.refusal(
                PolicyAction::RenewLease,
                caller,
                task.id,
                BrokerError::Precondition(format!(
                    "a {}s credential would pass the lease's renewal ceiling: {}s left",
                    asked.as_secs(),
                    left.as_secs()
                )),
            ));
        }
        let ttl_secs = ttl
            .unwrap_or(task.credential_ttl)
            .min(task.credential_ttl)
            .min(self.settings.limits.credential_ttl_max)
            .min(left)
            .as_secs();
        let issuance = Issuance {
            now_secs: unix_secs(now),
            task,
            now,
            ttl_secs,
            request: None,
            reanswer: false,
        };
        let verdict = self.authorize_issuance(
            caller,
            &issuance,
            &MintRequest {
                kind: lease.kind,
                audience: lease.audience.as_deref(),
                actions: &lease.actions,
                renewal: true,
            },
        )?;
        let (credential, serial) = new_credential_id(lease.kind)?;
        let expires_at = UNIX_EPOCH + Duration::from_secs(issuance.exp_secs());
        let renewed = self
            .store
            .renew_lease(id, &credential, expires_at, now)
            .await;
        if matches!(renewed, Err(IssueError::StoreReset)) {
            self.after_store_reset().await;
        }
        let renewed = renewed.map_err(|e| {
            let e = match e {
                IssueError::NotFound => BrokerError::NotFound(Missing::Lease),
                e => e.into(),
            };
            self.refusal(PolicyAction::RenewLease, caller, lease.task, e)
        })?;
        let credential = match (serial, csr, &self.ca) {
            (Some(serial), Some(csr), Some(ca)) => Credential::Certificate {
                certificate_pem: ca
                    .issue(
                        &csr,
                        &SvidRequest {
                            id: &caller.id,
                            task: &issuance.task.id,
                            serial,
                            now,
                            not_after: expires_at,
                        },
                    )
                    .map_err(|e| BrokerError::Internal(e.to_string()))?,
                chain_pem: ca.chain_pem().to_owned(),
            },
            (Some(_), _, _) => {
                return Err(BrokerError::Precondition(
                    "this broker has no issuing CA configured (issuer.ca_cert)".into(),
                ));
            }
            (None, _, _) => Credential::Token(
                self.keys
                    .sign_access_token(&self.access_claims(
                        caller,
                        &issuance.task,
                        &renewed,
                        (issuance.now_secs, issuance.exp_secs()),
                    ))
                    .map_err(|e| BrokerError::Internal(e.to_string()))?,
            ),
        };
        self.audit_issued(
            PolicyAction::RenewLease.name(),
            caller,
            &issuance,
            &verdict,
            &renewed,
            (issuance.now_secs, issuance.exp_secs()),
        )
        .await?;
        // The credential it replaces stops being active.
        metrics::revoked("renewal", 1);
        let renewal_left = renewed
            .renew_until
            .duration_since(expires_at)
            .unwrap_or_default();
        Ok(Renewed {
            credential,
            lease: renewed,
            ttl: Duration::from_secs(ttl_secs),
            renewal_left,
        })
    }

    /// Ends one lease: its credential stops being active at once.
    ///
    /// # Errors
    /// [`BrokerError::NotFound`], [`BrokerError::Denied`] (policy), [`BrokerError::Precondition`]
    /// (not active), [`BrokerError::Unavailable`].
    pub async fn revoke_lease(
        &self,
        caller: &WorkloadId,
        id: &LeaseId,
    ) -> Result<Lease, BrokerError> {
        let lease = self
            .store
            .get_lease(id)
            .await?
            .ok_or(BrokerError::NotFound(Missing::Lease))?;
        let task = self.load(&lease.task).await?;
        let verdict = self.authorize(caller, PolicyAction::RevokeLease, &Resource::Task(&task))?;
        let now = self.clock.now();
        let revoked = self
            .store
            .revoke_lease(id, &format!("revoked by {caller}"), now)
            .await
            .map_err(|e| match e {
                UpdateError::NotFound => BrokerError::NotFound(Missing::Lease),
                e => e.into(),
            })
            .inspect_err(|e| self.audit_refusal(PolicyAction::RevokeLease, caller, task.id, e))?;
        self.audit.record(
            &AuditEvent::new(now, "RevokeLease", caller.as_str(), true)
                .task(task.id)
                .policies(&verdict.policies)
                .detail("lease_id", id.as_str())
                .detail("credential", revoked.credential.as_str()),
        );
        metrics::revoked("revoke", 1);
        Ok(revoked)
    }

    /// The claims of `lease`'s token, issued at `iat` and expiring at `exp` (Unix seconds).
    fn access_claims(
        &self,
        caller: &PeerIdentity,
        task: &Task,
        lease: &Lease,
        (iat, exp): (u64, u64),
    ) -> AccessClaims {
        AccessClaims {
            iss: self.keys.issuer().to_owned(),
            sub: caller.id.to_string(),
            aud: lease.audience.clone().unwrap_or_default(),
            exp,
            nbf: iat,
            iat,
            jti: lease.credential.clone(),
            client_id: caller.id.to_string(),
            scope: lease.actions.join(" "),
            task_id: task.id.to_string(),
            approval_ids: task
                .approvals
                .iter()
                .filter(|a| a.decision == Decision::Approve)
                .map(|a| a.id.clone())
                .collect(),
            // A CI job without a client certificate gets an unbound token.
            cnf: (!caller.cert_sha256.is_empty()).then(|| Confirmation {
                x5t_s256: caller.cert_sha256.clone(),
            }),
            ci: None,
        }
    }

    /// The checks every issuance shares, cheapest first, and the lifetime granted.
    async fn begin_issuance(
        &self,
        caller: &PeerIdentity,
        task: &TaskId,
        ttl: Option<Duration>,
        action: PolicyAction,
    ) -> Result<Issuance, BrokerError> {
        if let Some(ttl) = ttl
            && ttl < Duration::from_secs(1)
        {
            return Err(BrokerError::Invalid {
                field: "ttl",
                reason: "must be at least 1s".into(),
            });
        }
        let task = self.load(task).await?;
        let now = self.clock.now();
        // A CI job's credentials come from ExchangeCiToken alone (its identity cannot pass the
        // TLS layer either: the CI trust domain is never one of mTLS).
        if (task.executor.trust_domain() == self.ci.trust_domain())
            != (action == PolicyAction::ExchangeCiToken)
        {
            return Err(self.refusal(
                action,
                caller,
                task.id,
                BrokerError::Denied(
                    "a CI job's credentials come only from ExchangeCiToken, with its ID token"
                        .into(),
                ),
            ));
        }
        if let Err(e) = check_issuable(&task, &caller.id, now) {
            let e = self.explain_by_lock(&caller.id, e.into()).await;
            return Err(self.refusal(action, caller, task.id, e));
        }
        let to_deadline = task.deadline.duration_since(now).unwrap_or_default();
        let ttl_secs = ttl
            .unwrap_or(task.credential_ttl)
            .min(task.credential_ttl)
            .min(self.settings.limits.credential_ttl_max)
            .min(to_deadline)
            .as_secs();
        if ttl_secs < 1 {
            return Err(self.refusal(
                action,
                caller,
                task.id,
                BrokerError::Precondition(
                    "less than a second remains before the task's deadline".into(),
                ),
            ));
        }
        Ok(Issuance {
            task,
            now,
            now_secs: unix_secs(now),
            ttl_secs,
            request: None,
            reanswer: false,
        })
    }

    /// The one issuance decision of every path that mints for a workload (a fresh token or
    /// certificate, a renewal): the kind's action with the same context, so that a renewal is
    /// never granted what a fresh issuance would be refused.
    fn authorize_issuance(
        &self,
        caller: &PeerIdentity,
        issuance: &Issuance,
        mint: &MintRequest<'_>,
    ) -> Result<Verdict, BrokerError> {
        self.authorize_mint(
            Principal::Workload(&caller.id),
            caller.id.as_str(),
            issuance,
            mint,
        )
    }

    /// The issuance decision for any principal (a workload, or a CI job after its own
    /// `ExchangeCiToken` decision): the kind's action, with the mint context. `who` names the
    /// principal in the audit line.
    fn authorize_mint(
        &self,
        principal: Principal<'_>,
        who: &str,
        issuance: &Issuance,
        mint: &MintRequest<'_>,
    ) -> Result<Verdict, BrokerError> {
        let action = mint.action();
        let verdict = self.policy.decide_as(
            principal,
            action,
            &Resource::Task(&issuance.task),
            Some(mint.context(issuance.ttl_secs)),
        );
        if verdict.allowed {
            return Ok(verdict);
        }
        self.audit.record(
            &AuditEvent::new(issuance.now, action.name(), who, false)
                .task(issuance.task.id)
                .policies(&verdict.policies)
                .reason(crate::audit::NOT_PERMITTED)
                .detail("ttl_secs", issuance.ttl_secs),
        );
        Err(BrokerError::Denied(format!(
            "policy does not permit {} here",
            action.name()
        )))
    }

    /// The lease of a new credential: recorded now, or, for a retried request id, the one an
    /// earlier attempt recorded (see [`retries`]). Only a lease recorded by this attempt or an
    /// earlier one is returned: a credential is never handed out without one.
    async fn lease_for(
        &self,
        caller: &PeerIdentity,
        issuance: &Issuance,
        request: Option<&RequestId>,
        fingerprint: &str,
        new: NewLease,
    ) -> Result<Recorded, BrokerError> {
        let action = issue_action(new.kind);
        let Some(request) = request else {
            return self
                .record_lease(caller, issuance, LeaseId::generate(), new)
                .await;
        };
        let claim = retries::IssueClaim::new(&caller.id, request, fingerprint);
        let refuse = |e| self.refusal(action, caller, issuance.task.id, e);
        let recorded = match self
            .claim_issuance(&claim, issuance.task.deadline)
            .await
            .map_err(refuse)?
        {
            retries::Claimed::Record(id) => self.record_lease(caller, issuance, id, new).await?,
            retries::Claimed::Recorded(lease) => Recorded::Earlier(*lease),
        };
        if let Recorded::Earlier(lease) = &recorded {
            Self::check_reanswer(
                lease,
                caller,
                issuance.task.id,
                lease_kind(action),
                issuance.now,
            )
            .map_err(refuse)?;
        }
        Ok(recorded)
    }

    /// Records the lease `id` durably, in the store's atomic step that re-checks the task and
    /// lock. A lease already recorded under `id` (an earlier attempt of the same request) is
    /// returned as it is.
    async fn record_lease(
        &self,
        caller: &PeerIdentity,
        issuance: &Issuance,
        id: LeaseId,
        new: NewLease,
    ) -> Result<Recorded, BrokerError> {
        let lease = Lease {
            id,
            task: issuance.task.id,
            agent: caller.id.clone(),
            kind: new.kind,
            credential: new.credential,
            audience: new.audience,
            actions: new.actions,
            cnf: caller.cert_sha256.clone(),
            // Whole seconds, as the credential's iat/notBefore and exp/notAfter say.
            issued_at: UNIX_EPOCH + Duration::from_secs(issuance.now_secs),
            expires_at: UNIX_EPOCH + Duration::from_secs(issuance.exp_secs()),
            renew_until: (issuance.now + self.settings.lease_renewal_max)
                .min(issuance.task.deadline),
            state: LeaseState::Active,
            ended_at: None,
            reason: None,
        };
        let action = issue_action(new.kind);
        let mut lease = lease;
        let mut recorded = self.store.issue_lease(&lease, issuance.now).await;
        if matches!(recorded, Err(IssueError::StoreReset)) {
            // The store lost its data since the last check: begin the new epoch, then issue in
            // it, dated after its start (verifiers accept nothing issued before the epoch).
            self.after_store_reset().await;
            let now = self.clock.now().max(issuance.now);
            let issued = UNIX_EPOCH + Duration::from_secs(unix_secs(now));
            lease.expires_at = (issued + Duration::from_secs(issuance.ttl_secs))
                .min(issuance.task.deadline)
                .max(issued);
            lease.issued_at = issued;
            recorded = self.store.issue_lease(&lease, now).await;
        }
        match recorded {
            Ok(()) => {}
            Err(IssueError::Exists) => {
                // Another attempt of the same request recorded it first.
                return match self.store.get_lease(&lease.id).await {
                    Ok(Some(earlier)) => Ok(Recorded::Earlier(earlier)),
                    Ok(None) => Err(BrokerError::Precondition(format!(
                        "this request_id issued lease {}, which is gone; use a new request_id",
                        lease.id
                    ))),
                    Err(e) => Err(e.into()),
                }
                .map_err(|e| self.refusal(action, caller, issuance.task.id, e));
            }
            Err(e) => return Err(self.refusal(action, caller, issuance.task.id, e.into())),
        }
        self.wake_reaper_for(lease.expires_at);
        Ok(Recorded::New(lease))
    }

    /// Audits a credential about to be handed out. When the line cannot be written and the
    /// audit log is required (`audit.required`), the credential is not handed out: its lease is
    /// revoked and the caller gets `UNAVAILABLE`.
    async fn audit_issued(
        &self,
        action: &'static str,
        caller: &PeerIdentity,
        issuance: &Issuance,
        verdict: &Verdict,
        lease: &Lease,
        (iat, exp): (u64, u64),
    ) -> Result<(), BrokerError> {
        let mut event = AuditEvent::new(issuance.now, action, caller.id.as_str(), true)
            .task(issuance.task.id)
            .policies(&verdict.policies)
            .detail("lease_id", lease.id.as_str())
            .detail("ttl_secs", exp.saturating_sub(iat))
            .detail("exp", exp)
            .detail_opt(
                "request_id",
                issuance.request.as_ref().map(RequestId::as_str),
            )
            .detail_opt("answered_again", issuance.reanswer.then_some(true));
        event = match lease.kind {
            CredentialKind::Jwt => event
                .detail("jti", lease.credential.as_str())
                .detail("audience", lease.audience.clone().unwrap_or_default())
                .detail("scope", lease.actions.join(" ")),
            CredentialKind::X509 => event.detail("serial", lease.credential.as_str()),
        };
        if let Err(e) = self.audit.record_or_refuse(&event) {
            if let Err(revoke) = self
                .store
                .revoke_lease(
                    &lease.id,
                    "the audit log could not be written",
                    issuance.now,
                )
                .await
            {
                tracing::warn!(error = %revoke, lease = %lease.id, "revoking an unaudited lease failed; it expires unused");
            }
            metrics::revoked("audit_failure", 1);
            return Err(BrokerError::AuditFailed(e.to_string()));
        }
        Ok(())
    }

    /// Ends a task on behalf of its executor or requester, revoking every credential of it in
    /// the same atomic step. Returns the task and how many leases were revoked.
    ///
    /// # Errors
    /// [`BrokerError::NotFound`], [`BrokerError::Denied`], [`BrokerError::Precondition`] (not
    /// approved, or already ended: a replayed completion), [`BrokerError::Unavailable`].
    pub async fn complete_task(
        &self,
        caller: &WorkloadId,
        id: &TaskId,
        outcome: Outcome,
        request: Option<&RequestId>,
    ) -> Result<(Task, usize), BrokerError> {
        let task = self.load(id).await?;
        let verdict = self.authorize(caller, PolicyAction::CompleteTask, &Resource::Task(&task))?;
        let now = self.clock.now();
        let request_id = request.map(RequestId::as_str);
        if let Some(request) = request {
            let retry = self
                .claim_completion(caller, *id, request, outcome, now)
                .await
                .inspect_err(|e| self.audit_refusal(PolicyAction::CompleteTask, caller, *id, e))?;
            // A retry of a completion that took effect: the same answer, not "already ended".
            if retry && retries::ended_as(&task, caller, outcome) {
                let revoked = self.revoked_by_end(&task).await?;
                self.audit.record(
                    &AuditEvent::new(now, "CompleteTask", caller.as_str(), true)
                        .task(task.id)
                        .policies(&verdict.policies)
                        .detail("state", task.state.as_str())
                        .detail_opt("request_id", request_id)
                        .detail("answered_again", true),
                );
                return Ok((task, revoked));
            }
        }
        let who = caller.clone();
        let result = self
            .store
            .end_task(
                id,
                Arc::new(move |t: &mut Task| t.complete(&who, outcome, now)),
                self.settings.task_retention,
            )
            .await
            .map_err(BrokerError::from);
        match result {
            Ok((task, revoked)) => {
                let ids: Vec<&str> = revoked.iter().map(|l| l.credential.as_str()).collect();
                self.audit.record_listing(
                    AuditEvent::new(now, "CompleteTask", caller.as_str(), true)
                        .task(task.id)
                        .policies(&verdict.policies)
                        .detail("state", task.state.as_str())
                        .detail_opt("request_id", request_id),
                    "revoked_credentials",
                    &ids,
                );
                tracing::info!(task = %task.id, state = %task.state, revoked = revoked.len(), "task completed");
                metrics::revoked("task_end", revoked.len());
                if task.state == crate::task::TaskState::Failed {
                    self.lock_on_failure(caller, &task).await;
                }
                Ok((task, revoked.len()))
            }
            Err(e) => {
                self.audit_refusal(PolicyAction::CompleteTask, caller, *id, &e);
                Err(e)
            }
        }
    }

    /// Tells whether `token` is one of ours, valid now, and its lease active. Anything else is
    /// inactive, without a reason.
    ///
    /// # Errors
    /// [`BrokerError::Denied`] if policy does not permit the caller to introspect;
    /// [`BrokerError::Unavailable`] when the store cannot answer (never "inactive" by default).
    pub async fn introspect(
        &self,
        caller: &WorkloadId,
        token: &str,
    ) -> Result<Introspection, BrokerError> {
        let verdict = self
            .policy
            .decide(caller, PolicyAction::Introspect, &Resource::Broker);
        if !verdict.allowed {
            self.audit.record(
                &AuditEvent::new(self.clock.now(), "Introspect", caller.as_str(), false)
                    .reason(crate::audit::NOT_PERMITTED),
            );
            return Err(BrokerError::Denied(
                "policy does not permit Introspect here".into(),
            ));
        }
        let now = self.clock.now();
        let Ok(claims) = self.keys.verify_access_token(token, now) else {
            return Ok(Introspection::Inactive);
        };
        let Ok(task) = TaskId::parse(&claims.task_id) else {
            return Ok(Introspection::Inactive);
        };
        let Ok(agent) = WorkloadId::parse(&claims.sub) else {
            return Ok(Introspection::Inactive);
        };
        let lease = self.live_lease(&task, &claims.jti, &agent, now).await?;
        Ok(match lease {
            Some(_) => Introspection::Active(Box::new(claims)),
            None => Introspection::Inactive,
        })
    }

    /// The lease of `task` whose current credential is `credential`, if it is active at `now`,
    /// issued to `agent`, and `agent` is not locked: a lock holds from its first step on, before
    /// its sweep has revoked every lease. The lease and the lock are read at once.
    async fn live_lease(
        &self,
        task: &TaskId,
        credential: &str,
        agent: &WorkloadId,
        now: SystemTime,
    ) -> Result<Option<Lease>, BrokerError> {
        let (lease, lock) = tokio::join!(
            self.store.find_lease(task, credential),
            self.store.agent_lock(agent, now)
        );
        if lock?.is_some() {
            return Ok(None);
        }
        Ok(lease?.filter(|l| l.is_active(credential, now) && &l.agent == agent))
    }

    /// Tells whether a certificate this broker issued is active: signed by the issuing CA, its
    /// lease active, now before its notAfter. Anything else is inactive, without a reason.
    ///
    /// # Errors
    /// [`BrokerError::Denied`] if policy does not permit the caller to introspect;
    /// [`BrokerError::Unavailable`] when the store cannot answer.
    pub async fn introspect_certificate(
        &self,
        caller: &WorkloadId,
        certificate: &[u8],
    ) -> Result<Option<(IssuedCertInfo, Lease)>, BrokerError> {
        self.authorize(caller, PolicyAction::Introspect, &Resource::Broker)?;
        let now = self.clock.now();
        let Some(info) = self.ca.as_ref().and_then(|ca| ca.read_issued(certificate)) else {
            return Ok(None);
        };
        let Ok(task) = TaskId::parse(&info.task) else {
            return Ok(None);
        };
        let Ok(agent) = WorkloadId::parse(&info.spiffe_id) else {
            return Ok(None);
        };
        let lease = self.live_lease(&task, &info.serial, &agent, now).await?;
        Ok(lease.map(|l| (info, l)))
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
