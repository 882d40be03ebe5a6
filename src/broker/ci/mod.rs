//! The CI exchange: a CI job's OIDC ID token, verified against a trusted issuer, becomes a task
//! (one per job of a run attempt, derived from the token, approved by policy alone unless a
//! policy asks for approvals) and a credential of that task; an ID token of the same job ends
//! the task. Each ID token is exchanged once per audience.

mod task;

use crate::broker::{Denial, Precondition};
use crate::store::Claim;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use super::limits::{self, Limited};
use super::{Broker, BrokerError, IssuedCertificate, IssuedToken};
use crate::audit::AuditEvent;
use crate::ci::{CiError, CiJob, TrustedIssuer, VerifiedIdToken};
use crate::identity::{PeerIdentity, WorkloadId};
use crate::lease::CredentialKind;
use crate::mint::{SvidRequest, random_id, sha256_hex, verify_csr};
use crate::policy::{PolicyAction, Principal};
use crate::task::{Action, Audience, TaskId, TaskState};

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
pub(super) struct Exchange<'a> {
    v: &'a VerifiedIdToken,
    identity: &'a WorkloadId,
    audience: &'a Audience,
    actions: &'a BTreeSet<Action>,
    csr: Option<crate::mint::VerifiedCsr>,
    ttl: Option<Duration>,
    client_cert_sha256: Option<&'a str>,
}

/// Prefix of the claim mapping a job to its task.
pub(super) const TASK_CLAIM: &str = "ci-task";
/// Prefix of the claim recording that an ID token was exchanged for an audience.
pub(super) const EXCHANGE_CLAIM: &str = "ci-exchange";

pub(super) fn token_error(e: CiError) -> BrokerError {
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
        e => BrokerError::Unauthenticated(e),
    }
}

impl Broker {
    /// Verifies `token`, after the rate limit of its `source`. Refusals are audited with the
    /// token's hash, sampled (anyone can send garbage: it must not fill the disk).
    pub(super) async fn verify_id_token(
        &self,
        action: PolicyAction,
        token: &str,
        source: Option<IpAddr>,
    ) -> Result<VerifiedIdToken, BrokerError> {
        if self.ci.is_empty() {
            return Err(BrokerError::Precondition(Precondition::NoCiIssuer));
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
    pub(super) fn ci_refusal(
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
        let kind = if request.csr.is_some() {
            "ci_x509"
        } else {
            "ci_jwt"
        };
        let mut issuer = None;
        let result = super::metrics::metered(kind, self.exchange(request, &mut issuer)).await;
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

    /// The exchange itself; `issuer` names the issuer once the token is verified (for the
    /// metric of [`Broker::exchange_ci_token`]).
    pub(super) async fn exchange(
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
            return Err(BrokerError::Precondition(Precondition::NoIssuingCa));
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
                BrokerError::Denied(Denial::CiIdentityLocked(lock.reason)),
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
            .claim(&Claim {
                key: &replay_key,
                value: &marker,
                until: v.expires_at + v.issuer.leeway,
            })
            .await
            .map_err(BrokerError::from)?;
        if held.is_some() {
            return Err(self.ci_refusal(
                action,
                &v,
                None,
                BrokerError::Denied(Denial::Replayed(audience.to_string())),
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
    pub(super) async fn exchange_claimed(
        &self,
        x: Exchange<'_>,
    ) -> Result<CiExchanged, BrokerError> {
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
        let (super::Recorded::New(lease) | super::Recorded::Earlier(lease)) =
            self.record_lease(&caller, &issuance, None, new).await?;
        let (identity, csr) = (x.identity, x.csr);

        let credential = match (csr, serial, &self.ca) {
            (Some(csr), Some(serial), Some(ca)) => {
                let certificate_pem = ca
                    .issue(
                        &csr,
                        &SvidRequest {
                            id: identity,
                            task: &task.id,
                            delegated: None,
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
}
