//! `taskcred.v1.AdminService`: operator actions (policy reload, signing-key rotation,
//! force-revoke).

use prost::Message as _;
use tonic::{Request, Response};

use super::Reply;
use super::auth::{caller_and_message, caller_id};
use super::convert::{agent, duration, task_id, ts};
use super::pb;
use super::pb::admin_service_server::AdminService;
use super::pb::{
    ListLeasesRequest, ListLeasesResponse, ListLocksRequest, ListLocksResponse, LockAgentRequest,
    LockAgentResponse, ReloadPolicyRequest, ReloadPolicyResponse, RevokeSigningKeyRequest,
    RevokeSigningKeyResponse, RotateSigningKeyRequest, RotateSigningKeyResponse,
    UnlockAgentRequest, UnlockAgentResponse,
};
use crate::broker::{Broker, LeaseCursor, LeaseQuery, RequestId};
use crate::identity::WorkloadId;
use crate::lease::LeaseState;

/// Ids a `LockAgentResponse` lists at most (the counts are complete; the audit log names all).
const LISTED: usize = 1000;

/// The admin service.
#[derive(Debug, Clone)]
pub struct AdminApi {
    broker: Broker,
    /// The largest message sent: a page is cut shorter to fit it.
    max_message_bytes: usize,
}

impl AdminApi {
    /// Serves `broker`'s admin use cases, with answers of at most `max_message_bytes`.
    pub fn new(broker: Broker, max_message_bytes: usize) -> Self {
        Self {
            broker,
            max_message_bytes,
        }
    }
}

/// Bytes kept for the rest of a list answer (its token, field tags, the gRPC frame).
pub(super) const ENVELOPE: usize = 1024;

/// How many items of the encoded sizes `sizes` fit in `budget` bytes of a repeated field (each
/// costs its size, a tag and a length prefix).
pub(super) fn fitting(sizes: impl Iterator<Item = usize>, budget: usize) -> usize {
    let mut used = 0usize;
    let mut n = 0;
    for size in sizes {
        used += 1 + prost::length_delimiter_len(size) + size;
        if used > budget {
            break;
        }
        n += 1;
    }
    n
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn reload_policy(
        &self,
        request: Request<ReloadPolicyRequest>,
    ) -> Reply<ReloadPolicyResponse> {
        let who = caller_id(&request)?;
        let (n, files) = self.broker.reload_policy(&who)?;
        Ok(Response::new(ReloadPolicyResponse {
            policies: u32::try_from(n).unwrap_or(u32::MAX),
            files,
        }))
    }

    async fn revoke_signing_key(
        &self,
        request: Request<RevokeSigningKeyRequest>,
    ) -> Reply<RevokeSigningKeyResponse> {
        let who = caller_id(&request)?;
        let kid = request.into_inner().kid;
        if kid.is_empty() || kid.len() > 128 || kid.chars().any(char::is_control) {
            return Err(super::convert::invalid(
                "kid",
                "1 to 128 bytes, no control characters",
            ));
        }
        let kids = self.broker.revoke_signing_key(&who, &kid).await?;
        Ok(Response::new(RevokeSigningKeyResponse { kids }))
    }

    async fn rotate_signing_key(
        &self,
        request: Request<RotateSigningKeyRequest>,
    ) -> Reply<RotateSigningKeyResponse> {
        let who = caller_id(&request)?;
        let r = self.broker.rotate_signing_key(&who).await?;
        Ok(Response::new(RotateSigningKeyResponse {
            previous_kid: r.previous_kid,
            kid: r.kid,
            previous_published_until: ts(r.previous_published_until),
        }))
    }

    async fn lock_agent(&self, request: Request<LockAgentRequest>) -> Reply<LockAgentResponse> {
        let (who, r) = caller_and_message(request)?;
        let target = agent(&r.agent)?;
        let until = duration("duration", r.duration)?;
        let (lock, outcome) = self
            .broker
            .lock_agent(
                &who,
                &target,
                &r.reason,
                until,
                RequestId::parse(&r.request_id)?.as_ref(),
            )
            .await?;
        Ok(Response::new(LockAgentResponse {
            lock: Some(pb::Lock::from(lock)),
            // Bounded: an agent may hold more leases than one message can name.
            revoked_tasks: outcome
                .tasks
                .iter()
                .take(LISTED)
                .map(ToString::to_string)
                .collect(),
            revoked_leases: outcome
                .leases
                .iter()
                .take(LISTED)
                .map(|l| l.id.as_str().to_owned())
                .collect(),
            revoked_task_count: u32::try_from(outcome.tasks.len()).unwrap_or(u32::MAX),
            revoked_lease_count: u32::try_from(outcome.leases.len()).unwrap_or(u32::MAX),
            pending: outcome.pending,
        }))
    }

    async fn unlock_agent(
        &self,
        request: Request<UnlockAgentRequest>,
    ) -> Reply<UnlockAgentResponse> {
        let who = caller_id(&request)?;
        let target = agent(&request.get_ref().agent)?;
        let lifted = self.broker.unlock_agent(&who, &target).await?;
        Ok(Response::new(UnlockAgentResponse {
            lock: lifted.map(pb::Lock::from),
        }))
    }

    async fn list_leases(&self, request: Request<ListLeasesRequest>) -> Reply<ListLeasesResponse> {
        let (who, req) = caller_and_message(request)?;
        let optional = |s: &str| Some(s.to_owned()).filter(|s| !s.is_empty());
        let query = LeaseQuery {
            agent: optional(&req.agent).map(|a| agent(&a)).transpose()?,
            task: optional(&req.task_id).map(|t| task_id(&t)).transpose()?,
            state: optional(&req.state)
                .map(|s| {
                    LeaseState::parse(&s).ok_or_else(|| {
                        super::convert::invalid("state", "one of active, revoked, expired")
                    })
                })
                .transpose()?,
            page_size: usize::try_from(req.page_size).unwrap_or(usize::MAX),
            after: optional(&req.page_token)
                .map(|t| {
                    LeaseCursor::parse(&t).ok_or_else(|| {
                        super::convert::invalid("page_token", "not from a previous page")
                    })
                })
                .transpose()?,
        };
        let page = self.broker.list_leases(&who, query).await?;
        let mut next = page.next;
        let mut leases: Vec<(pb::Lease, LeaseCursor)> = page
            .leases
            .into_iter()
            .map(|(l, at)| (pb::Lease::from(l), at))
            .collect();
        // Cut the page where it outgrows the message limit; the next page starts there.
        let budget = self.max_message_bytes.saturating_sub(ENVELOPE);
        // At least one, so that a listing always moves on.
        let keep = fitting(leases.iter().map(|(l, _)| l.encoded_len()), budget).max(1);
        if keep < leases.len() {
            next = Some(leases[keep].1);
            leases.truncate(keep);
        }
        Ok(Response::new(ListLeasesResponse {
            leases: leases.into_iter().map(|(l, _)| l).collect(),
            next_page_token: next.map(|t| t.to_string()).unwrap_or_default(),
        }))
    }

    async fn list_locks(&self, request: Request<ListLocksRequest>) -> Reply<ListLocksResponse> {
        let (who, req) = caller_and_message(request)?;
        let after =
            match req.page_token.as_str() {
                "" => None,
                t => Some(WorkloadId::parse(t).map_err(|_| {
                    super::convert::invalid("page_token", "not from a previous page")
                })?),
            };
        let page = self
            .broker
            .list_locks(
                &who,
                usize::try_from(req.page_size).unwrap_or(usize::MAX),
                after.as_ref(),
            )
            .await?;
        let mut next = page.next;
        let mut locks: Vec<(pb::Lock, WorkloadId)> = page
            .locks
            .into_iter()
            .map(|l| {
                let agent = l.agent.clone();
                (pb::Lock::from(l), agent)
            })
            .collect();
        let budget = self.max_message_bytes.saturating_sub(ENVELOPE);
        let keep = fitting(locks.iter().map(|(l, _)| l.encoded_len()), budget).max(1);
        if keep < locks.len() {
            // The page ends after the last lock that fits.
            next = Some(locks[keep - 1].1.clone());
            locks.truncate(keep);
        }
        Ok(Response::new(ListLocksResponse {
            locks: locks.into_iter().map(|(l, _)| l).collect(),
            next_page_token: next.map(|a| a.to_string()).unwrap_or_default(),
        }))
    }
}
