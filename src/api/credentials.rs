//! `taskcred.v1.CredentialService`: thin handlers over [`Broker`].

use tonic::{Request, Response, Status};

use super::auth::caller;
use super::convert::{lease_id, request_id, task_id, ttl};
use super::error::status;
use super::pb;
use super::pb::credential_service_server::CredentialService;
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
    async fn issue_token(
        &self,
        request: Request<pb::IssueTokenRequest>,
    ) -> Result<Response<pb::IssueTokenResponse>, Status> {
        let peer = caller(&request)?.clone();
        let asked = TokenRequest::try_from(request.into_inner())?;
        let issued = self
            .broker
            .issue_token(&peer, asked)
            .await
            .map_err(status)?;
        Ok(Response::new(issued.into()))
    }

    async fn issue_certificate(
        &self,
        request: Request<pb::IssueCertificateRequest>,
    ) -> Result<Response<pb::IssueCertificateResponse>, Status> {
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
            .await
            .map_err(status)?;
        Ok(Response::new(issued.into()))
    }

    async fn renew_lease(
        &self,
        request: Request<pb::RenewLeaseRequest>,
    ) -> Result<Response<pb::RenewLeaseResponse>, Status> {
        let peer = caller(&request)?.clone();
        let r = request.into_inner();
        let id = lease_id(&r.lease_id)?;
        let csr = (!r.csr.is_empty()).then_some(r.csr.as_slice());
        let renewed = self
            .broker
            .renew_lease(&peer, &id, ttl(r.ttl)?, csr)
            .await
            .map_err(status)?;
        Ok(Response::new(renewed.into()))
    }

    async fn revoke_lease(
        &self,
        request: Request<pb::RevokeLeaseRequest>,
    ) -> Result<Response<pb::RevokeLeaseResponse>, Status> {
        let who = caller(&request)?.id.clone();
        let id = lease_id(&request.get_ref().lease_id)?;
        let lease = self.broker.revoke_lease(&who, &id).await.map_err(status)?;
        Ok(Response::new(pb::RevokeLeaseResponse {
            lease_id: lease.id.to_string(),
            credential_id: lease.credential,
        }))
    }

    async fn introspect(
        &self,
        request: Request<pb::IntrospectRequest>,
    ) -> Result<Response<pb::IntrospectResponse>, Status> {
        let who = caller(&request)?.id.clone();
        let r = request.into_inner();
        let secs = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        match (r.token.is_empty(), r.certificate.is_empty()) {
            // An empty token is simply not active (after policy has been asked).
            (_, true) => {}
            (true, false) => {
                let found = self
                    .broker
                    .introspect_certificate(&who, &r.certificate)
                    .await
                    .map_err(status)?;
                return Ok(Response::new(match found {
                    None => pb::IntrospectResponse::default(),
                    Some((info, lease)) => pb::IntrospectResponse {
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
                        ..Default::default()
                    },
                }));
            }
            (false, false) => {
                return Err(Status::invalid_argument(
                    "token, certificate: one or the other, not both",
                ));
            }
        }
        let answer = self
            .broker
            .introspect(&who, &r.token)
            .await
            .map_err(status)?;
        Ok(Response::new(match answer {
            Introspection::Inactive => pb::IntrospectResponse::default(),
            Introspection::Active(c) => pb::IntrospectResponse {
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
            },
        }))
    }
}
