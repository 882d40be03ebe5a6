//! `taskcred.v1.CredentialService`: thin handlers over [`Broker`].

use std::time::Duration;

use tonic::{Request, Response, Status};

use super::auth::caller;
use super::error::status;
use super::pb;
use super::pb::credential_service_server::CredentialService;
use crate::broker::{Broker, Introspection, TokenRequest};
use crate::task::TaskId;

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
        let r = request.into_inner();
        let task = TaskId::parse(&r.task_id)
            .map_err(|_| Status::invalid_argument("task_id: not a task id (a lowercase UUIDv7)"))?;
        let ttl = r
            .ttl
            .map(|d| {
                Duration::try_from(d)
                    .map_err(|_| Status::invalid_argument("ttl: must be a positive duration"))
            })
            .transpose()?;
        let issued = self
            .broker
            .issue_token(
                &peer,
                TokenRequest {
                    task,
                    audience: r.audience,
                    actions: r.actions,
                    ttl,
                },
            )
            .await
            .map_err(status)?;
        let granted = issued
            .lease
            .expires_at
            .duration_since(issued.lease.issued_at)
            .unwrap_or_default();
        Ok(Response::new(pb::IssueTokenResponse {
            token: issued.token,
            lease_id: issued.lease.id.to_string(),
            jti: issued.lease.credential,
            expires_at: Some(issued.lease.expires_at.into()),
            ttl: prost_types::Duration::try_from(granted).ok(),
        }))
    }

    async fn introspect(
        &self,
        request: Request<pb::IntrospectRequest>,
    ) -> Result<Response<pb::IntrospectResponse>, Status> {
        let who = caller(&request)?.id.clone();
        let token = request.into_inner().token;
        let answer = self.broker.introspect(&who, &token).await.map_err(status)?;
        let secs = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
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
                cnf_x5t_s256: c.cnf.x5t_s256,
            },
        }))
    }
}
