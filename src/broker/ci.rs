//! The CI exchange: a CI job's OIDC ID token, verified against a trusted issuer, becomes a task
//! (one per job of a run attempt, derived from the token, approved by policy alone unless a
//! policy asks for approvals) and a credential of that task; an ID token of the same job ends
//! the task. Each ID token is exchanged once per audience.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::limits::{self, Limited};
use super::{Broker, BrokerError, IssuedCertificate, IssuedToken};
use crate::audit::AuditEvent;
use crate::ci::{CiError, CiJob, TrustedIssuer, VerifiedIdToken};
use crate::identity::{PeerIdentity, WorkloadId};
use crate::lease::{CredentialKind, LeaseId};
use crate::mint::{SvidRequest, random_id, sha256_hex, verify_csr};
use crate::policy::{PolicyAction, Principal, Resource, Verdict};
use crate::task::{
    Action, Audience, Grant, Outcome, RawTaskRequest, Task, TaskId, TaskRequest, TaskState,
};

/// What `ExchangeCiToken` asks for.
#[derive(Debug, Clone, Default)]
pub struct CiExchangeRequest {
    /// The CI provider's ID token (compact JWS).
    pub id_token: String,
    /// Where the call came from: the public RPCs are rate limited by source before the token
    /// is verified.
    pub source: Option<IpAddr>,
    /// The one audience.
    pub audience: String,
    /// The actions asked for at that audience (at least one).
    pub actions: Vec<String>,
    /// Lifetime asked; `None` for the configured default.
    pub ttl: Option<Duration>,
    /// A CSR: a certificate is issued instead of a JWT.
    pub csr: Option<Vec<u8>>,
    /// The thumbprint of the client certificate the job presented, if any: bound into `cnf`.
    pub client_cert_sha256: Option<String>,
}

/// A credential handed to a CI job.
#[derive(Debug, Clone)]
pub enum CiCredential {
    /// A JWT.
    Token(IssuedToken),
    /// An X509-SVID.
    Certificate(IssuedCertificate),
}

/// What `ExchangeCiToken` hands back.
#[derive(Debug, Clone)]
pub struct CiExchanged {
    /// The credential and its lease.
    pub credential: CiCredential,
    /// The job's task.
    pub task: TaskId,
    /// The identity the job's credentials are issued to.
    pub identity: WorkloadId,
    /// What the ID token proved.
    pub job: CiJob,
}

/// One exchange, once its ID token is verified, its request checked and its token claimed.
struct Exchange<'a> {
    v: &'a VerifiedIdToken,
    identity: &'a WorkloadId,
    audience: &'a Audience,
    actions: &'a BTreeSet<Action>,
    csr: Option<crate::mint::VerifiedCsr>,
    ttl: Option<Duration>,
    client_cert_sha256: Option<&'a str>,
}

/// Prefix of the claim mapping a job to its task.
const TASK_CLAIM: &str = "ci-task";
/// Prefix of the claim recording that an ID token was exchanged for an audience.
const EXCHANGE_CLAIM: &str = "ci-exchange";

fn token_error(e: CiError) -> BrokerError {
    match e {
        CiError::TooLarge | CiError::Malformed(_) => BrokerError::Invalid {
            field: "id_token",
            reason: e.to_string(),
        },
        CiError::KeysUnavailable(detail) => {
            BrokerError::Unavailable(format!("CI issuer keys: {detail}"))
        }
        CiError::Claims(reason) => BrokerError::Invalid {
            field: "id_token",
            reason,
        },
        e => BrokerError::Unauthenticated(e.to_string()),
    }
}

impl Broker {
    /// Verifies `token`, after the rate limit of its `source`. Refusals are audited with the
    /// token's hash, sampled (anyone can send garbage: it must not fill the disk).
    async fn verify_id_token(
        &self,
        action: PolicyAction,
        token: &str,
        source: Option<IpAddr>,
    ) -> Result<VerifiedIdToken, BrokerError> {
        if self.ci.is_empty() {
            return Err(BrokerError::Precondition(
                "this broker trusts no CI issuer (configure [[ci.issuers]])".into(),
            ));
        }
        if let Some(addr) = source {
            self.rate_limit(Limited::Source, &limits::source_key(addr))?;
        }
        let now = self.clock.now();
        self.ci.verify(token, now).await.map_err(|e| {
            self.unverified.record(
                &self.audit,
                &AuditEvent::new(now, action.name(), crate::audit::UNVERIFIED_CI, false)
                    .reason(e.to_string())
                    .detail("id_token_sha256", sha256_hex(token.as_bytes())),
                now,
            );
            token_error(e)
        })
    }

    /// Audits a refusal of a verified CI job and hands the error back.
    fn ci_refusal(
        &self,
        action: PolicyAction,
        v: &VerifiedIdToken,
        task: Option<TaskId>,
        e: BrokerError,
    ) -> BrokerError {
        let mut event = AuditEvent::new(self.clock.now(), action.name(), &v.job.subject, false)
            .reason(e.to_string())
            .detail("ci_issuer", v.issuer.name.as_str())
            .detail("repository", v.job.repository.as_str())
            .detail("repository_id", v.job.repository_id.as_str())
            .detail("run_id", v.job.run_id.as_str())
            .detail("id_token_sha256", v.token_sha256.as_str());
        if let Some(t) = task {
            event = event.task(t);
        }
        self.audit.record(&event);
        e
    }

    /// Exchanges a CI job's ID token for a credential of its task: verifies the token, finds
    /// or creates the job's task (policy decides, with the request as context, and fixes the
    /// approvals a new task needs), records the lease once the token is claimed for that
    /// audience, and only then signs.
    ///
    /// # Errors
    /// [`BrokerError::Unauthenticated`] (the token fails a check), [`BrokerError::Invalid`],
    /// [`BrokerError::Denied`] (policy, a replay, outside the task's grant, a locked
    /// repository), [`BrokerError::Pending`], [`BrokerError::Precondition`],
    /// [`BrokerError::Unavailable`].
    pub async fn exchange_ci_token(
        &self,
        request: CiExchangeRequest,
    ) -> Result<CiExchanged, BrokerError> {
        let start = std::time::Instant::now();
        let kind = if request.csr.is_some() {
            "ci_x509"
        } else {
            "ci_jwt"
        };
        let mut issuer = None;
        let result = self.exchange_unmetered(request, &mut issuer).await;
        super::metrics::issuance(kind, &result, start);
        let issuer = issuer.map_or_else(
            || "unknown".to_owned(),
            |i: Arc<TrustedIssuer>| i.name.clone(),
        );
        metrics::counter!(
            super::metrics::CI_EXCHANGES,
            "issuer" => issuer,
            "outcome" => super::metrics::outcome(&result)
        )
        .increment(1);
        result
    }

    async fn exchange_unmetered(
        &self,
        request: CiExchangeRequest,
        issuer: &mut Option<Arc<TrustedIssuer>>,
    ) -> Result<CiExchanged, BrokerError> {
        let action = PolicyAction::ExchangeCiToken;
        let v = self
            .verify_id_token(action, &request.id_token, request.source)
            .await?;
        *issuer = Some(v.issuer.clone());
        let audience = Audience::parse(&request.audience).map_err(|_| BrokerError::Invalid {
            field: "audience",
            reason: "1 to 256 bytes of A-Z a-z 0-9 . _ : / -".into(),
        })?;
        if request.actions.is_empty() {
            return Err(BrokerError::Invalid {
                field: "actions",
                reason: "name at least one action: the broker never guesses a scope".into(),
            });
        }
        let mut actions = BTreeSet::new();
        for a in &request.actions {
            actions.insert(Action::parse(a).map_err(|_| BrokerError::Invalid {
                field: "actions",
                reason: format!("{a:?} is not an action"),
            })?);
        }
        if let Some(ttl) = request.ttl
            && ttl < Duration::from_secs(1)
        {
            return Err(BrokerError::Invalid {
                field: "ttl",
                reason: "must be at least 1s".into(),
            });
        }
        let csr = match &request.csr {
            Some(c) => Some(verify_csr(c).map_err(super::csr_error)?),
            None => None,
        };
        if csr.is_some() && self.ca.is_none() {
            return Err(BrokerError::Precondition(
                "this broker has no issuing CA configured (issuer.ca_cert)".into(),
            ));
        }
        let identity = self
            .ci
            .workload_id(&v.job)
            .map_err(|e| self.ci_refusal(action, &v, None, token_error(e)))?;
        self.rate_limit(Limited::CiRepository, identity.as_str())?;
        // A locked repository gets nothing, not even a new task (the lease step checks again).
        if let Some(lock) = self.store.agent_lock(&identity, self.clock.now()).await? {
            return Err(self.ci_refusal(
                action,
                &v,
                None,
                BrokerError::Denied(format!("the job's identity is locked: {}", lock.reason)),
            ));
        }

        // Once per token and audience, across replicas, and before anything is made from the
        // token (a task, a lease); released if no credential comes of it.
        let replay_key = format!(
            "{EXCHANGE_CLAIM}:{}:{}:{audience}",
            v.issuer.name, v.token_id
        );
        let marker = random_id().map_err(|e| BrokerError::Internal(e.to_string()))?;
        let held = self
            .store
            .claim(&replay_key, &marker, v.expires_at + v.issuer.leeway)
            .await
            .map_err(BrokerError::from)?;
        if held.is_some() {
            return Err(self.ci_refusal(
                action,
                &v,
                None,
                BrokerError::Denied(format!(
                    "this ID token was already exchanged for {audience}: ask the CI provider for a new one"
                )),
            ));
        }
        let exchange = Exchange {
            v: &v,
            identity: &identity,
            audience: &audience,
            actions: &actions,
            csr,
            ttl: request.ttl,
            client_cert_sha256: request.client_cert_sha256.as_deref(),
        };
        let result = self.exchange_claimed(exchange).await;
        if result.is_err()
            && let Err(release) = self.store.release_claim(&replay_key, &marker).await
        {
            tracing::warn!(error = %release, "could not release the exchange claim of a failed CI exchange");
        }
        result
    }

    /// The exchange once its token is claimed: the job's task, the lease, the credential.
    async fn exchange_claimed(&self, x: Exchange<'_>) -> Result<CiExchanged, BrokerError> {
        let action = PolicyAction::ExchangeCiToken;
        let v = x.v;
        let kind = if x.csr.is_some() {
            CredentialKind::X509
        } else {
            CredentialKind::Jwt
        };
        let ttl = x.ttl.unwrap_or(self.settings.limits.credential_ttl_default);
        let scope: Vec<String> = x.actions.iter().map(ToString::to_string).collect();

        let (task, verdict) = self
            .ci_task(v, x.identity, x.audience, x.actions, kind, ttl)
            .await?;
        if task.state == TaskState::PendingApproval {
            return Err(self.ci_refusal(action, v, Some(task.id), BrokerError::Pending(task.id)));
        }

        let caller = PeerIdentity {
            id: x.identity.clone(),
            not_after: v.expires_at,
            cert_sha256: x.client_cert_sha256.unwrap_or_default().to_owned(),
        };
        let issuance = self
            .begin_issuance(&caller, &task.id, Some(ttl), action)
            .await?;
        // The credential itself is decided as on every path that mints: whatever a policy
        // forbids of IssueToken or IssueCertificate, it forbids here too.
        let mint = self.authorize_mint(
            Principal::CiJob(&v.job),
            &v.job.subject,
            &issuance,
            &super::MintRequest {
                kind,
                audience: Some(x.audience.as_str()),
                actions: &scope,
                renewal: false,
            },
        )?;
        let mut verdict = verdict;
        verdict.policies.extend(mint.policies);
        let (credential_id, serial) = super::new_credential_id(kind)?;
        // An ID token is exchanged once (its replay claim): no request id, no earlier attempt.
        let new = super::NewLease {
            kind,
            credential: credential_id,
            audience: (kind == CredentialKind::Jwt).then(|| x.audience.to_string()),
            actions: if kind == CredentialKind::Jwt {
                scope
            } else {
                Vec::new()
            },
        };
        let (super::Recorded::New(lease) | super::Recorded::Earlier(lease)) = self
            .record_lease(&caller, &issuance, LeaseId::generate(), new)
            .await?;
        let (identity, csr) = (x.identity, x.csr);

        let credential = match (csr, serial, &self.ca) {
            (Some(csr), Some(serial), Some(ca)) => {
                let certificate_pem = ca
                    .issue(
                        &csr,
                        &SvidRequest {
                            id: identity,
                            task: &task.id,
                            serial,
                            now: lease.issued_at,
                            not_after: lease.expires_at,
                        },
                    )
                    .map_err(|e| BrokerError::Internal(e.to_string()))?;
                CiCredential::Certificate(IssuedCertificate {
                    certificate_pem,
                    chain_pem: ca.chain_pem().to_owned(),
                    lease: lease.clone(),
                })
            }
            _ => {
                let mut claims = self.access_claims(
                    &caller,
                    &issuance.task,
                    &lease,
                    (
                        super::unix_secs(lease.issued_at),
                        super::unix_secs(lease.expires_at),
                    ),
                );
                claims.ci = Some(v.job.clone());
                let token = self
                    .keys
                    .sign_access_token(&claims)
                    .map_err(|e| BrokerError::Internal(e.to_string()))?;
                CiCredential::Token(IssuedToken {
                    token,
                    lease: lease.clone(),
                })
            }
        };
        self.audit_issued(
            action.name(),
            &caller,
            &issuance,
            &verdict,
            &lease,
            (
                super::unix_secs(lease.issued_at),
                super::unix_secs(lease.expires_at),
            ),
        )
        .await?;
        self.audit.record(
            &AuditEvent::new(issuance.now, "CiTokenExchanged", &v.job.subject, true)
                .task(task.id)
                .detail("ci_issuer", v.issuer.name.as_str())
                .detail("repository", v.job.repository.as_str())
                .detail("repository_id", v.job.repository_id.as_str())
                .detail("ref", v.job.git_ref.as_str())
                .detail("environment", v.job.environment.as_str())
                .detail("run_id", v.job.run_id.as_str())
                .detail("run_attempt", v.job.run_attempt)
                .detail("job", v.job.job.as_str())
                .detail("id_token_sha256", v.token_sha256.as_str())
                .detail("lease_id", lease.id.as_str()),
        );
        Ok(CiExchanged {
            credential,
            task: task.id,
            identity: identity.clone(),
            job: v.job.clone(),
        })
    }

    /// The job's task, found through its claim or created (policy permitting), with the
    /// verdict of policy on this exchange.
    async fn ci_task(
        &self,
        v: &VerifiedIdToken,
        identity: &WorkloadId,
        audience: &Audience,
        actions: &BTreeSet<Action>,
        kind: CredentialKind,
        ttl: Duration,
    ) -> Result<(Task, Verdict), BrokerError> {
        let action = PolicyAction::ExchangeCiToken;
        let key = format!("{TASK_CLAIM}:{}", v.job.task_key());
        let now = self.clock.now();
        let retention = self.settings.task_retention;
        for _ in 0..3 {
            // Built (and bounded) before the claim, so that a refused one leaves no claim.
            let task =
                self.ci_candidate(v, identity, TaskId::generate(), audience, actions, now)?;
            let candidate = task.id;
            let held = self
                .store
                .claim(&key, &candidate.to_string(), v.expires_at + retention)
                .await?;
            let task = match held {
                None => {
                    // This exchange is the job's first: the task is made here, if policy says so.
                    let verdict = self.decide_ci(v, &task, audience, actions, kind, ttl);
                    if !verdict.allowed {
                        let _ = self.store.release_claim(&key, &candidate.to_string()).await;
                        return Err(self.ci_denied(v, &task, &verdict));
                    }
                    let mut task = task;
                    if verdict.quorum > 0 {
                        task.state = TaskState::PendingApproval;
                    }
                    task.quorum = verdict.quorum;
                    task.request_policies = verdict.policies.clone();
                    if let Err(e) = self.store.create_task(&task).await {
                        let _ = self.store.release_claim(&key, &candidate.to_string()).await;
                        return Err(e.into());
                    }
                    self.audit.record(
                        &AuditEvent::new(now, "RequestTask", &v.job.subject, true)
                            .task(task.id)
                            .policies(&verdict.policies)
                            .detail("quorum", verdict.quorum)
                            .detail("executor", identity.as_str())
                            .detail("ci_issuer", v.issuer.name.as_str()),
                    );
                    return Ok((task, verdict));
                }
                Some(id) => {
                    let id = TaskId::parse(&id).map_err(|_| {
                        BrokerError::Internal(format!("claim {key} holds no task id"))
                    })?;
                    match self.store.get_task(&id).await? {
                        Some(t) => t,
                        None => {
                            // Its creator may be between its claim and its write; or it failed
                            // there: then the claim is released and taken again.
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            match self.store.get_task(&id).await? {
                                Some(t) => t,
                                None => {
                                    self.store.release_claim(&key, &id.to_string()).await?;
                                    continue;
                                }
                            }
                        }
                    }
                }
            };
            if &task.executor != identity {
                return Err(BrokerError::Internal(format!(
                    "claim {key} maps to a task of another executor"
                )));
            }
            let granted = task
                .grants
                .iter()
                .find(|g| &g.audience == audience)
                .is_some_and(|g| actions.is_subset(&g.actions));
            if !granted {
                return Err(self.ci_refusal(
                    action,
                    v,
                    Some(task.id),
                    BrokerError::Denied(format!(
                        "the job's task grants {}; a job's first exchange fixes its grants",
                        grants_text(&task.grants)
                    )),
                ));
            }
            let verdict = self.decide_ci(v, &task, audience, actions, kind, ttl);
            if !verdict.allowed {
                return Err(self.ci_denied(v, &task, &verdict));
            }
            return Ok((task, verdict));
        }
        Err(BrokerError::Unavailable(
            "the job's task could not be found or made".into(),
        ))
    }

    fn decide_ci(
        &self,
        v: &VerifiedIdToken,
        task: &Task,
        audience: &Audience,
        actions: &BTreeSet<Action>,
        kind: CredentialKind,
        ttl: Duration,
    ) -> Verdict {
        let now = self.clock.now();
        let ttl_secs = ttl
            .min(task.credential_ttl)
            .min(self.settings.limits.credential_ttl_max)
            .min(task.deadline.duration_since(now).unwrap_or_default())
            .as_secs();
        let actions: Vec<String> = actions.iter().map(ToString::to_string).collect();
        let context = super::MintRequest {
            kind,
            audience: Some(audience.as_str()),
            actions: &actions,
            renewal: false,
        }
        .context(ttl_secs);
        self.policy.decide_as(
            Principal::CiJob(&v.job),
            PolicyAction::ExchangeCiToken,
            &Resource::Task(task),
            Some(context),
        )
    }

    fn ci_denied(&self, v: &VerifiedIdToken, task: &Task, verdict: &Verdict) -> BrokerError {
        let mut event = AuditEvent::new(
            self.clock.now(),
            PolicyAction::ExchangeCiToken.name(),
            &v.job.subject,
            false,
        )
        .task(task.id)
        .policies(&verdict.policies)
        .reason(crate::audit::NOT_PERMITTED)
        .detail("ci_issuer", v.issuer.name.as_str())
        .detail("repository", v.job.repository.as_str())
        .detail("repository_id", v.job.repository_id.as_str())
        .detail("ref", v.job.git_ref.as_str())
        .detail("environment", v.job.environment.as_str())
        .detail("id_token_sha256", v.token_sha256.as_str());
        if !verdict.errors.is_empty() {
            event = event.detail("policy_errors", verdict.errors.clone());
        }
        self.audit.record(&event);
        BrokerError::Denied("policy does not permit ExchangeCiToken here".into())
    }

    /// The task a job's first exchange would make: executor and requester the job's
    /// identity, one grant, labelled with the issuer, ending with the ID token (or sooner).
    fn ci_candidate(
        &self,
        v: &VerifiedIdToken,
        identity: &WorkloadId,
        id: TaskId,
        audience: &Audience,
        actions: &BTreeSet<Action>,
        now: SystemTime,
    ) -> Result<Task, BrokerError> {
        let limits = &self.settings.limits;
        let mut deadline_in = v
            .expires_at
            .duration_since(now)
            .unwrap_or_default()
            .min(limits.deadline_max);
        if let Some(max) = v.issuer.task_deadline_max {
            deadline_in = deadline_in.min(max);
        }
        if deadline_in < Duration::from_secs(1) {
            return Err(BrokerError::Precondition(
                "the ID token expires in less than a second".into(),
            ));
        }
        let repository: String = v.job.repository.chars().take(200).collect();
        let purpose = format!(
            "CI job {} of {repository}, run {} attempt {} ({})",
            v.job.job, v.job.run_id, v.job.run_attempt, v.issuer.name
        );
        // Through the same bounds as any requested task (purpose, grant size, deadline, ceiling).
        let request = TaskRequest::parse(
            RawTaskRequest {
                executor: identity.to_string(),
                purpose,
                grants: vec![(
                    audience.to_string(),
                    actions.iter().map(ToString::to_string).collect(),
                )],
                labels: vec![("ci".into(), v.issuer.name.clone())],
                deadline_in: Some(deadline_in),
                credential_ttl: Some(limits.credential_ttl_max),
                parent: None,
            },
            limits,
        )?;
        Ok(Task::new(id, request, identity.clone(), 0, Vec::new(), now))
    }

    /// Ends a CI job's task on the proof of an ID token of the same job, revoking every
    /// credential of it. Returns the task and how many leases were revoked.
    ///
    /// # Errors
    /// [`BrokerError::Unauthenticated`], [`BrokerError::NotFound`] (the job never exchanged),
    /// [`BrokerError::Denied`], [`BrokerError::Precondition`] (already ended),
    /// [`BrokerError::Unavailable`].
    pub async fn complete_ci_task(
        &self,
        id_token: &str,
        source: Option<IpAddr>,
        outcome: Outcome,
    ) -> Result<(Task, usize), BrokerError> {
        let action = PolicyAction::CompleteCiTask;
        let v = self.verify_id_token(action, id_token, source).await?;
        let identity = self
            .ci
            .workload_id(&v.job)
            .map_err(|e| self.ci_refusal(action, &v, None, token_error(e)))?;
        let key = format!("{TASK_CLAIM}:{}", v.job.task_key());
        let Some(id) = self.store.claimed(&key).await? else {
            return Err(self.ci_refusal(
                action,
                &v,
                None,
                BrokerError::NotFound(super::Missing::CiTask),
            ));
        };
        let id = TaskId::parse(&id)
            .map_err(|_| BrokerError::Internal(format!("claim {key} holds no task id")))?;
        let task = self.load(&id).await?;
        if task.executor != identity {
            return Err(BrokerError::Internal(format!(
                "claim {key} maps to a task of another executor"
            )));
        }
        let verdict = self.policy.decide_as(
            Principal::CiJob(&v.job),
            action,
            &Resource::Task(&task),
            None,
        );
        if !verdict.allowed {
            return Err(self.ci_refusal(
                action,
                &v,
                Some(id),
                BrokerError::Denied("policy does not permit CompleteCiTask here".into()),
            ));
        }
        let now = self.clock.now();
        let who = identity.clone();
        let (task, revoked) = self
            .store
            .end_task(
                &id,
                Arc::new(move |t: &mut Task| t.complete(&who, outcome, now)),
                self.settings.task_retention,
            )
            .await
            .map_err(|e| self.ci_refusal(action, &v, Some(id), e.into()))?;
        let ids: Vec<&str> = revoked.iter().map(|l| l.credential.as_str()).collect();
        self.audit.record_listing(
            AuditEvent::new(now, action.name(), &v.job.subject, true)
                .task(task.id)
                .policies(&verdict.policies)
                .detail("state", task.state.as_str())
                .detail("ci_issuer", v.issuer.name.as_str())
                .detail("id_token_sha256", v.token_sha256.as_str()),
            "revoked_credentials",
            &ids,
        );
        tracing::info!(task = %task.id, state = %task.state, revoked = revoked.len(), "CI task completed");
        super::metrics::revoked("task_end", revoked.len());
        if task.state == TaskState::Failed {
            self.lock_on_failure(&identity, &task).await;
        }
        Ok((task, revoked.len()))
    }
}

fn grants_text(grants: &[Grant]) -> String {
    grants
        .iter()
        .map(|g| {
            let actions: Vec<String> = g.actions.iter().map(ToString::to_string).collect();
            format!("{} [{}]", g.audience, actions.join(" "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}
