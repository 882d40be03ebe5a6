//! `taskcred.v1.AdminService`: operator actions.

use tonic::{Request, Response, Status};

use super::auth::caller;
use super::error::status;
use super::pb;
use super::pb::admin_service_server::AdminService;
use crate::broker::Broker;

/// The admin service.
#[derive(Debug, Clone)]
pub struct AdminApi {
    broker: Broker,
}

impl AdminApi {
    /// Serves `broker`'s admin use cases.
    pub fn new(broker: Broker) -> Self {
        Self { broker }
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn reload_policy(
        &self,
        request: Request<pb::ReloadPolicyRequest>,
    ) -> Result<Response<pb::ReloadPolicyResponse>, Status> {
        let who = caller(&request)?.id.clone();
        let (n, files) = self.broker.reload_policy(&who).map_err(status)?;
        Ok(Response::new(pb::ReloadPolicyResponse {
            policies: u32::try_from(n).unwrap_or(u32::MAX),
            files,
        }))
    }
}
