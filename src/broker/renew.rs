//! `RenewLease`: a fresh credential for an active lease, within its renewal ceiling.

use crate::broker::{Denial, Precondition};
use crate::store::Renewal;
use std::time::{Duration, UNIX_EPOCH};

use crate::identity::PeerIdentity;
use crate::lease::{CredentialKind, Lease, LeaseId, check_issuable};
use crate::mint::verify_csr;
use crate::policy::PolicyAction;
use crate::store::{IssueError, check_renewable};

use super::error::csr_error;
use super::issuance::{Issuance, MintRequest, new_credential_id, unix_secs};
use super::limits::Limited;
use super::metrics;
use super::{Broker, BrokerError, Missing};

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

impl Broker {
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
        metrics::metered("renewal", async {
            self.rate_limit(Limited::Agent, caller.id.as_str())?;
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
            // Read, not cached: the renewal's store step checks the task as it is, so policy
            // decides on the same.
            let task = self.read_issuable(&lease.task).await?;
            let now = self.clock.now();
            let refuse = |e| self.refusal(PolicyAction::RenewLease, caller, task.id, e);
            if lease.agent != caller.id {
                return Err(refuse(BrokerError::Denied(Denial::NotLeaseAgent)));
            }
            if let Err(e) =
                check_issuable(&task, &caller.id, now).and_then(|()| check_renewable(&lease, now))
            {
                return Err(refuse(self.explain_by_lock(&caller.id, e.into()).await));
            }
            if task.parent.is_some() {
                self.check_chain(&task).await.map_err(refuse)?;
            }
            let left = lease.renew_until.duration_since(now).unwrap_or_default();
            if left.as_secs() < 1 {
                return Err(refuse(BrokerError::Precondition(
                    Precondition::RenewalCeilingReached,
                )));
            }
            if let Some(asked) = ttl
                && asked > left
            {
                return Err(refuse(BrokerError::Precondition(
                    Precondition::PastRenewalCeiling {
                        asked: asked.as_secs(),
                        left: left.as_secs(),
                    },
                )));
            }
            let ttl_secs = self.lifetime_secs(&task, ttl, left);
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
                .renew_lease(
                    id,
                    &Renewal {
                        credential: &credential,
                        expires_at,
                        now,
                    },
                )
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
                    certificate_pem: issuance.sign_svid(
                        ca,
                        &csr,
                        caller,
                        serial,
                        (now, expires_at),
                    )?,
                    chain_pem: ca.chain_pem().to_owned(),
                },
                (Some(_), _, _) => {
                    return Err(BrokerError::Precondition(Precondition::NoIssuingCa));
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
            self.revoker.superseded();
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
        })
        .await
    }
}
