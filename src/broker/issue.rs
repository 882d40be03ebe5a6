//! `IssueToken` and `IssueCertificate`: a fresh credential for the executor of an approved task.

use crate::broker::{Denial, Precondition};
use std::time::Duration;

use crate::identity::PeerIdentity;
use crate::lease::{CredentialKind, Lease};
use crate::mint::{VerifiedCsr, random_id, random_serial, serial_hex, verify_csr};
use crate::policy::PolicyAction;
use crate::task::{Action, Audience, TaskId};

use super::error::csr_error;
use super::issuance::{MintRequest, NewLease, Recorded, unix_secs};
use super::limits::Limited;
use super::{Broker, BrokerError};
use super::{RequestId, metrics};

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

impl Broker {
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
        metrics::metered("jwt", async {
            self.rate_limit(Limited::Agent, caller.id.as_str())?;
            match self.issue_token_once(caller, &request).await {
                Err(BrokerError::TaskChanged) => self.issue_token_once(caller, &request).await,
                done => done,
            }
        })
        .await
    }

    /// One attempt of [`Broker::issue_token`], decided on the task as read.
    async fn issue_token_once(
        &self,
        caller: &PeerIdentity,
        request: &TokenRequest,
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
        let refuse = |e| self.refusal(PolicyAction::IssueToken, caller, task.id, e);
        let grant = task
            .grants
            .iter()
            .find(|g| g.audience == audience)
            .ok_or_else(|| {
                refuse(BrokerError::Denied(Denial::AudienceNotGranted(
                    audience.to_string(),
                )))
            })?;
        if let Some(a) = asked.iter().find(|a| !grant.actions.contains(*a)) {
            return Err(refuse(BrokerError::Denied(Denial::ActionNotGranted {
                action: a.to_string(),
                audience: audience.to_string(),
            })));
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
        metrics::metered("x509", async {
            self.rate_limit(Limited::Agent, caller.id.as_str())?;
            let csr = verify_csr(csr).map_err(csr_error)?;
            let attempt = || self.issue_certificate_once(caller, task, &csr, ttl, request);
            match attempt().await {
                Err(BrokerError::TaskChanged) => attempt().await,
                done => done,
            }
        })
        .await
    }

    /// One attempt of [`Broker::issue_certificate`], decided on the task as read.
    async fn issue_certificate_once(
        &self,
        caller: &PeerIdentity,
        task: &TaskId,
        csr: &VerifiedCsr,
        ttl: Option<Duration>,
        request: Option<&RequestId>,
    ) -> Result<IssuedCertificate, BrokerError> {
        let Some(ca) = &self.ca else {
            return Err(BrokerError::Precondition(Precondition::NoIssuingCa));
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
                    BrokerError::Precondition(Precondition::CertificateIssued {
                        lease: lease.id.clone(),
                        serial: lease.credential.clone(),
                    }),
                ));
            }
        };
        let certificate_pem =
            issuance.sign_svid(ca, csr, caller, serial, (lease.issued_at, lease.expires_at))?;
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
}
