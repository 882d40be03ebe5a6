//! `taskcred.v1.CiService`: the CI exchange and the end of a CI job's task. Public methods (no
//! client certificate needed); a certificate presented anyway is bound into `cnf`.

use tonic::{Request, Response, Status};

use super::auth::Caller;
use super::convert::granted;
use super::convert::{duration, outcome_from_pb, ts};
use super::error::status;
use super::pb;
use super::pb::ci_service_server::CiService;
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
        request: Request<pb::ExchangeCiTokenRequest>,
    ) -> Result<Response<pb::ExchangeCiTokenResponse>, Status> {
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
            .await
            .map_err(status)?;
        let (token, certificate_pem, chain_pem, lease) = match exchanged.credential {
            CiCredential::Token(t) => (t.token, String::new(), String::new(), t.lease),
            CiCredential::Certificate(c) => {
                (String::new(), c.certificate_pem, c.chain_pem, c.lease)
            }
        };
        Ok(Response::new(pb::ExchangeCiTokenResponse {
            token,
            certificate_pem,
            chain_pem,
            lease_id: lease.id.to_string(),

            expires_at: ts(lease.expires_at),
            ttl: granted(&lease),
            credential_id: lease.credential,

            task_id: exchanged.task.to_string(),
            identity: exchanged.identity.to_string(),
        }))
    }

    async fn complete_ci_task(
        &self,
        request: Request<pb::CompleteCiTaskRequest>,
    ) -> Result<Response<pb::CompleteTaskResponse>, Status> {
        let source = source(&request);
        let r = request.into_inner();
        let outcome = outcome_from_pb(r.outcome)?;
        let (task, revoked) = self
            .broker
            .complete_ci_task(&r.id_token, source, outcome)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::CompleteTaskResponse {
            task: Some(pb::Task::from(task)),
            revoked_leases: u32::try_from(revoked).unwrap_or(u32::MAX),
        }))
    }
}
