//! `taskcred.v1.IdentityService`: tells the caller who the broker believes it is.

use tonic::{Request, Response};

use super::Reply;
use super::auth::caller;
use super::pb::identity_service_server::IdentityService;
use super::pb::{WhoAmIRequest, WhoAmIResponse};

/// The identity service; stateless.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdentityApi;

#[tonic::async_trait]
impl IdentityService for IdentityApi {
    async fn who_am_i(&self, request: Request<WhoAmIRequest>) -> Reply<WhoAmIResponse> {
        let peer = caller(&request)?;
        Ok(Response::new(WhoAmIResponse {
            spiffe_id: peer.id.to_string(),
            trust_domain: peer.id.trust_domain().to_owned(),
            path: peer.id.path().to_owned(),
            cert_not_after: Some(peer.not_after.into()),
            cert_sha256: peer.cert_sha256.clone(),
        }))
    }
}
