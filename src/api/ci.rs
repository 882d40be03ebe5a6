//! `taskcred.v1.CiService`: the CI exchange and the end of a CI job's task. Public methods (no
//! client certificate needed); a certificate presented anyway is bound into `cnf`.

use tonic::{Request, Response};

use super::Reply;
use super::auth::Caller;
use super::convert::{duration, lease_fields, outcome_from_pb};
use super::pb;
use super::pb::ci_service_server::CiService;
use super::pb::{
    CompleteCiTaskRequest, CompleteTaskResponse, ExchangeCiTokenRequest, ExchangeCiTokenResponse,
};
use crate::broker::{Broker, CiCredential, CiExchangeRequest};

/// The CI service.
#[derive(Debug, Clone)]
pub struct CiApi {
    broker: Broker,
}

impl CiApi {
    /// Serves `broker`'s CI exchange.
    pub fn new(broker: Broker) -> Self {
        Self { broker }
    }
}

/// The address a call came from (the public RPCs are rate limited by it).
fn source<T>(request: &Request<T>) -> Option<std::net::IpAddr> {
    request
        .extensions()
        .get::<crate::tls::ConnInfo>()
        .map(|c| c.remote.ip())
}

#[tonic::async_trait]
impl CiService for CiApi {
    async fn exchange_ci_token(
        &self,
        request: Request<ExchangeCiTokenRequest>,
    ) -> Reply<ExchangeCiTokenResponse> {
        let bound = request
            .extensions()
            .get::<Caller>()
            .map(|c| c.0.cert_sha256.clone());
        let source = source(&request);
        let r = request.into_inner();
        let exchanged = self
            .broker
            .exchange_ci_token(CiExchangeRequest {
                id_token: r.id_token,
                source,
                audience: r.audience,
                actions: r.actions,
                ttl: duration("ttl", r.ttl)?,
                csr: (!r.csr.is_empty()).then_some(r.csr),
                client_cert_sha256: bound,
            })
            .await?;
        let (token, certificate_pem, chain_pem, lease) = match exchanged.credential {
            CiCredential::Token(t) => (t.token, String::new(), String::new(), t.lease),
            CiCredential::Certificate(c) => {
                (String::new(), c.certificate_pem, c.chain_pem, c.lease)
            }
        };
        let (lease_id, credential_id, expires_at, ttl) = lease_fields(lease);
        Ok(Response::new(ExchangeCiTokenResponse {
            token,
            certificate_pem,
            chain_pem,
            lease_id,
            credential_id,
            expires_at,
            ttl,
            task_id: exchanged.task.to_string(),
            identity: exchanged.identity.to_string(),
        }))
    }

    async fn complete_ci_task(
        &self,
        request: Request<CompleteCiTaskRequest>,
    ) -> Reply<CompleteTaskResponse> {
        let source = source(&request);
        let r = request.into_inner();
        let outcome = outcome_from_pb(r.outcome)?;
        let (task, revoked) = self
            .broker
            .complete_ci_task(&r.id_token, source, outcome)
            .await?;
        Ok(Response::new(CompleteTaskResponse {
            task: Some(pb::Task::from(task)),
            revoked_leases: u32::try_from(revoked).unwrap_or(u32::MAX),
        }))
    }
}
