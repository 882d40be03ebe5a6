//! The steps every issuance shares (a fresh token or certificate, a renewal, a CI job's
//! credential): the checks and lifetime of [`Issuance`], the one policy decision with the mint
//! context, recording the lease before anything is signed (with request ids and store resets),
//! and the audit line without which nothing is handed out.

use crate::broker::{Denial, Precondition};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::audit::AuditEvent;
use crate::identity::PeerIdentity;
use crate::lease::{CredentialKind, Lease, LeaseId, LeaseState, check_issuable};
use crate::mint::{
    AccessClaims, Actor, Confirmation, IssuingCa, SvidRequest, VerifiedCsr, random_id,
    random_serial, serial_hex,
};
use crate::policy::{PolicyAction, Principal, Resource, Verdict};
use crate::store::IssueError;
use crate::task::{Decision, Task, TaskId};
use std::sync::Arc;

use super::task_cache::CachedTask;
use super::{Broker, BrokerError};
use super::{RequestId, retries};

/// Whole seconds since the Unix epoch (0 before it).
pub(super) fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The action that issues a credential of `kind`.
pub(super) fn issue_action(kind: CredentialKind) -> PolicyAction {
    match kind {
        CredentialKind::Jwt => PolicyAction::IssueToken,
        CredentialKind::X509 => PolicyAction::IssueCertificate,
    }
}

/// The kind of credential `action` issues.
pub(super) fn lease_kind(action: PolicyAction) -> CredentialKind {
    if action == PolicyAction::IssueCertificate {
        CredentialKind::X509
    } else {
        CredentialKind::Jwt
    }
}

/// A fresh credential id of `kind`: a `jti`, or a certificate serial (hex, and its bytes).
pub(super) fn new_credential_id(
    kind: CredentialKind,
) -> Result<(String, Option<[u8; 16]>), BrokerError> {
    let internal = |e: crate::mint::MintError| BrokerError::Internal(e.to_string());
    match kind {
        CredentialKind::Jwt => Ok((random_id().map_err(internal)?, None)),
        CredentialKind::X509 => {
            let serial = random_serial().map_err(internal)?;
            Ok((serial_hex(&serial), Some(serial)))
        }
    }
}

/// Fresh lease ids tried after one that met a recorded id.
const FRESH_ID_ATTEMPTS: usize = 3;

/// The shared state of one issuance once its checks passed.
#[derive(Debug)]
pub(super) struct Issuance {
    /// The task as read (or cached) at the revision the issuance is decided on.
    pub(super) task: Arc<CachedTask>,
    pub(super) now: SystemTime,
    pub(super) now_secs: u64,
    pub(super) ttl_secs: u64,
    /// The caller's request id, if it gave one.
    pub(super) request: Option<RequestId>,
    /// Whether the lease is an earlier attempt's (a retried request, answered again).
    pub(super) reanswer: bool,
}

impl Issuance {
    pub(super) fn exp_secs(&self) -> u64 {
        self.now_secs + self.ttl_secs
    }

    /// The X509-SVID of `caller` for this issuance's task, signed by `ca` for `csr`'s key,
    /// valid from `now` to `not_after`.
    pub(super) fn sign_svid(
        &self,
        ca: &IssuingCa,
        csr: &VerifiedCsr,
        caller: &PeerIdentity,
        serial: [u8; 16],
        (now, not_after): (SystemTime, SystemTime),
    ) -> Result<String, BrokerError> {
        ca.issue(
            csr,
            &SvidRequest {
                id: &caller.id,
                task: &self.task.id,
                delegated: self.task.parent.map(|parent| (self.task.root_id(), parent)),
                serial,
                now,
                not_after,
            },
        )
        .map_err(|e| BrokerError::Internal(e.to_string()))
    }
}

/// What a new lease is for.
#[derive(Debug)]
pub(super) struct NewLease {
    pub(super) kind: CredentialKind,
    pub(super) credential: String,
    pub(super) audience: Option<String>,
    pub(super) actions: Vec<String>,
}

/// A lease recorded by this attempt, or by an earlier attempt of the same request id.
#[derive(Debug)]
pub(super) enum Recorded {
    New(Lease),
    Earlier(Lease),
}

/// What is about to be minted, as policy is told it (the context of `IssueToken`,
/// `IssueCertificate` and `ExchangeCiToken`, the same on every path).
#[derive(Debug, Clone, Copy)]
pub(super) struct MintRequest<'a> {
    pub(super) kind: CredentialKind,
    /// The one audience of a JWT; none for a certificate.
    pub(super) audience: Option<&'a str>,
    /// The actions a JWT grants (its scope); none for a certificate.
    pub(super) actions: &'a [String],
    /// A renewal of an existing lease.
    pub(super) renewal: bool,
}

impl MintRequest<'_> {
    /// The Cedar action deciding this kind of credential for a workload.
    pub(super) fn action(&self) -> PolicyAction {
        match self.kind {
            CredentialKind::Jwt => PolicyAction::IssueToken,
            CredentialKind::X509 => PolicyAction::IssueCertificate,
        }
    }

    pub(super) fn context(&self, ttl_secs: u64) -> serde_json::Value {
        serde_json::json!({
            "kind": self.kind.as_str(),
            "audience": self.audience.unwrap_or_default(),
            "actions": self.actions,
            "ttl_secs": ttl_secs,
            "renewal": self.renewal,
        })
    }
}

impl Broker {
    /// The claims of `lease`'s token, issued at `iat` and expiring at `exp` (Unix seconds).
    pub(super) fn access_claims(
        &self,
        caller: &PeerIdentity,
        task: &Task,
        lease: &Lease,
        (iat, exp): (u64, u64),
    ) -> AccessClaims {
        let delegated = task.delegation.is_some();
        AccessClaims {
            iss: self.keys.issuer().to_owned(),
            // A delegated task's token carries the root executor's approved authority.
            sub: task.subject().to_string(),
            aud: lease.audience.clone().unwrap_or_default(),
            exp,
            nbf: iat,
            iat,
            jti: lease.credential.clone(),
            client_id: caller.id.to_string(),
            scope: lease.actions.join(" "),
            task_id: task.id.to_string(),
            // The approvals of the chain above, then the task's own.
            approval_ids: task
                .delegation
                .iter()
                .flat_map(|d| d.reviewed.iter().map(|r| r.approval_id.clone()))
                .chain(
                    task.approvals
                        .iter()
                        .filter(|a| a.decision == Decision::Approve)
                        .map(|a| a.id.clone()),
                )
                .collect(),
            // A CI job without a client certificate gets an unbound token.
            cnf: (!caller.cert_sha256.is_empty()).then(|| Confirmation {
                x5t_s256: caller.cert_sha256.clone(),
            }),
            ci: None,
            act: Actor::chain(&task.actors().iter().map(|w| w.as_str()).collect::<Vec<_>>()),
            root_task_id: delegated.then(|| task.root_id().to_string()),
            parent_task_id: task.parent.map(|p| p.to_string()),
        }
    }

    /// The lifetime granted, in whole seconds: `asked` (`None`: the task's ceiling) within the
    /// task's ceiling, the configured one and `room` (what is left to the deadline, or to the
    /// renewal ceiling).
    pub(super) fn lifetime_secs(
        &self,
        task: &Task,
        asked: Option<Duration>,
        room: Duration,
    ) -> u64 {
        asked
            .unwrap_or(task.credential_ttl)
            .min(task.credential_ttl)
            .min(self.settings.limits.credential_ttl_max)
            .min(room)
            .as_secs()
    }

    /// The checks every issuance shares, cheapest first, and the lifetime granted.
    pub(super) async fn begin_issuance(
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
        let task = self.issuable_task(task).await?;
        let now = self.clock.now();
        let refuse = |e| self.refusal(action, caller, task.id, e);
        // A CI job's credentials come from ExchangeCiToken alone (its identity cannot pass the
        // TLS layer either: the CI trust domain is never one of mTLS).
        if (task.executor.trust_domain() == self.ci.trust_domain())
            != (action == PolicyAction::ExchangeCiToken)
        {
            return Err(refuse(BrokerError::Denied(Denial::CiOnlyByExchange)));
        }
        if let Err(e) = check_issuable(&task, &caller.id, now) {
            return Err(refuse(self.explain_by_lock(&caller.id, e.into()).await));
        }
        if task.parent.is_some() {
            self.check_chain(&task).await.map_err(refuse)?;
        }
        let to_deadline = task.deadline.duration_since(now).unwrap_or_default();
        let ttl_secs = self.lifetime_secs(&task, ttl, to_deadline);
        if ttl_secs < 1 {
            return Err(refuse(BrokerError::Precondition(
                Precondition::DeadlineTooClose,
            )));
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
    pub(super) fn authorize_issuance(
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
    pub(super) fn authorize_mint(
        &self,
        principal: Principal<'_>,
        who: &str,
        issuance: &Issuance,
        mint: &MintRequest<'_>,
    ) -> Result<Verdict, BrokerError> {
        let action = mint.action();
        let context = Some(mint.context(issuance.ttl_secs));
        let task = &issuance.task;
        let prepared = match principal {
            Principal::Workload(_) => task.prepared(|t| self.policy.prepare_task(t).ok()),
            Principal::CiJob(_) => None,
        };
        let verdict = match (principal, prepared) {
            (Principal::Workload(w), Some(prepared)) => self
                .policy
                .decide_prepared(prepared, w, action, task, context),
            _ => self
                .policy
                .decide_as(principal, action, &Resource::Task(task), context),
        };
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
        Err(BrokerError::Denied(Denial::Policy(action)))
    }

    /// The lease of a new credential: recorded now, or, for a retried request id, the one an
    /// earlier attempt recorded (see [`retries`]). Only a lease recorded by this attempt or an
    /// earlier one is returned: a credential is never handed out without one.
    pub(super) async fn lease_for(
        &self,
        caller: &PeerIdentity,
        issuance: &Issuance,
        request: Option<&RequestId>,
        fingerprint: &str,
        new: NewLease,
    ) -> Result<Recorded, BrokerError> {
        let action = issue_action(new.kind);
        let Some(request) = request else {
            return self.record_lease(caller, issuance, None, new).await;
        };
        let claim = retries::IssueClaim::new(&caller.id, request, fingerprint);
        let refuse = |e| self.refusal(action, caller, issuance.task.id, e);
        let recorded = match self
            .claim_issuance(&claim, &issuance.task.id, issuance.task.deadline)
            .await
            .map_err(refuse)?
        {
            retries::Claimed::Record(id) => {
                self.record_lease(caller, issuance, Some(id), new).await?
            }
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
    pub(super) async fn record_lease(
        &self,
        caller: &PeerIdentity,
        issuance: &Issuance,
        claimed: Option<LeaseId>,
        new: NewLease,
    ) -> Result<Recorded, BrokerError> {
        let fresh = claimed.is_none();
        let lease = Lease {
            id: claimed.unwrap_or_else(|| LeaseId::generate(&issuance.task.id)),
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
        let seen = Some((&**issuance.task, issuance.task.revision()));
        let mut at = issuance.now;
        let mut recorded = self.store.issue_lease(&lease, seen, at).await;
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
            at = now;
            recorded = self.store.issue_lease(&lease, seen, at).await;
        }
        // A fresh id recorded already is another issuance's (two replicas' ids of one task in
        // the same millisecond may meet, by chance): never that lease, a new id.
        for _ in 0..FRESH_ID_ATTEMPTS {
            if !(fresh && matches!(recorded, Err(IssueError::Exists))) {
                break;
            }
            lease.id = LeaseId::generate(&issuance.task.id);
            recorded = self.store.issue_lease(&lease, seen, at).await;
        }
        match recorded {
            Ok(started) => {
                if let Some(started) = started {
                    self.tasks.put(started);
                }
            }
            Err(IssueError::Changed(current)) => {
                // Decided on a revision the store no longer holds: nothing was recorded; the
                // caller decides again on the task as it is.
                self.tasks.put(*current);
                return Err(self.refusal(
                    action,
                    caller,
                    issuance.task.id,
                    BrokerError::TaskChanged,
                ));
            }
            Err(IssueError::Exists) if fresh => {
                return Err(self.refusal(
                    action,
                    caller,
                    issuance.task.id,
                    BrokerError::Internal("fresh lease ids met recorded ones".into()),
                ));
            }
            Err(IssueError::Exists) => {
                // Another attempt of the same request recorded it first.
                return match self.store.get_lease(&lease.id).await {
                    Ok(Some(earlier)) => Ok(Recorded::Earlier(earlier)),
                    Ok(None) => Err(BrokerError::Precondition(Precondition::RequestLeaseGone(
                        lease.id.clone(),
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
    pub(super) async fn audit_issued(
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
            self.revoker.revoke_unaudited(&lease.id, issuance.now).await;
            return Err(BrokerError::AuditFailed(e.to_string()));
        }
        Ok(())
    }
}
