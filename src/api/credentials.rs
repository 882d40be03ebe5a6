//! `taskcred.v1.CredentialService`: thin handlers over [`Broker`].

use tonic::{Request, Response};

use super::Reply;
use super::auth::{caller, caller_and_message, caller_id};
use super::convert::{lease_id, request_id, task_id, ttl};
use super::pb::credential_service_server::CredentialService;
use super::pb::{
    IntrospectRequest, IntrospectResponse, IssueCertificateRequest, IssueCertificateResponse,
    IssueTokenRequest, IssueTokenResponse, RenewLeaseRequest, RenewLeaseResponse,
    RevokeLeaseRequest, RevokeLeaseResponse,
};
use crate::broker::{Broker, Introspection, TokenRequest};

/// The credential service.
#[derive(Debug, Clone)]
pub struct CredentialApi {
    broker: Broker,
}

impl CredentialApi {
    /// Serves `broker`'s credential use cases.
    pub fn new(broker: Broker) -> Self {
        Self { broker }
    }
}

#[tonic::async_trait]
impl CredentialService for CredentialApi {
    async fn issue_token(&self, request: Request<IssueTokenRequest>) -> Reply<IssueTokenResponse> {
        let peer = caller(&request)?.clone();
        let asked = TokenRequest::try_from(request.into_inner())?;
        let issued = self.broker.issue_token(&peer, asked).await?;
        Ok(Response::new(issued.into()))
    }

    async fn issue_certificate(
        &self,
        request: Request<IssueCertificateRequest>,
    ) -> Reply<IssueCertificateResponse> {
        let peer = caller(&request)?.clone();
        let r = request.into_inner();
        let task = task_id(&r.task_id)?;
        let ttl = ttl(r.ttl)?;
        let issued = self
            .broker
            .issue_certificate(
                &peer,
                &task,
                &r.csr,
                ttl,
                request_id(&r.request_id)?.as_ref(),
            )
            .await?;
        Ok(Response::new(issued.into()))
    }

    async fn renew_lease(&self, request: Request<RenewLeaseRequest>) -> Reply<RenewLeaseResponse> {
        let peer = caller(&request)?.clone();
        let r = request.into_inner();
        let id = lease_id(&r.lease_id)?;
        let csr = (!r.csr.is_empty()).then_some(r.csr.as_slice());
        let renewed = self
            .broker
            .renew_lease(&peer, &id, ttl(r.ttl)?, csr)
            .await?;
        Ok(Response::new(renewed.into()))
    }

    async fn revoke_lease(
        &self,
        request: Request<RevokeLeaseRequest>,
    ) -> Reply<RevokeLeaseResponse> {
        let who = caller_id(&request)?;
        let id = lease_id(&request.get_ref().lease_id)?;
        let lease = self.broker.revoke_lease(&who, &id).await?;
        Ok(Response::new(RevokeLeaseResponse {
            lease_id: lease.id.to_string(),
            credential_id: lease.credential,
        }))
    }

    async fn introspect(&self, request: Request<IntrospectRequest>) -> Reply<IntrospectResponse> {
        let (who, r) = caller_and_message(request)?;
        let secs = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        match (r.token.is_empty(), r.certificate.is_empty()) {
            // An empty token is simply not active (after policy has been asked).
            (_, true) => {}
            (true, false) => {
                let found = self
                    .broker
                    .introspect_certificate(&who, &r.certificate)
                    .await?;
                return Ok(Response::new(match found {
                    None => IntrospectResponse::default(),
                    Some((info, lease)) => IntrospectResponse {
                        active: true,
                        sub: info.spiffe_id,
                        exp: secs(info.not_after),
                        iat: secs(
                            lease
                                .issued_at
                                .duration_since(std::time::UNIX_EPOCH)
                                .map_or(0, |d| d.as_secs()),
                        ),
                        task_id: info.task,
                        serial: info.serial,
                        cnf_x5t_s256: lease.cnf,
                        root_task_id: info.delegated.clone().map(|d| d.0).unwrap_or_default(),
                        parent_task_id: info.delegated.map(|d| d.1).unwrap_or_default(),
                        ..Default::default()
                    },
                }));
            }
            (false, false) => {
                return Err(super::convert::invalid(
                    "token, certificate",
                    "one or the other, not both",
                ));
            }
        }
        let answer = self.broker.introspect(&who, &r.token).await?;
        Ok(Response::new(match answer {
            Introspection::Inactive => IntrospectResponse::default(),
            Introspection::Active(c) => IntrospectResponse {
                active: true,
                sub: c.sub,
                aud: c.aud,
                iss: c.iss,
                exp: secs(c.exp),
                iat: secs(c.iat),
                nbf: secs(c.nbf),
                jti: c.jti,
                scope: c.scope,
                client_id: c.client_id,
                task_id: c.task_id,
                cnf_x5t_s256: c.cnf.map(|c| c.x5t_s256).unwrap_or_default(),
                serial: String::new(),
                actors: c
                    .act
                    .as_ref()
                    .map(|a| a.subjects().into_iter().map(str::to_owned).collect())
                    .unwrap_or_default(),
                root_task_id: c.root_task_id.unwrap_or_default(),
                parent_task_id: c.parent_task_id.unwrap_or_default(),
            },
        }))
    }
}
