//! Introspection: whether a token or certificate of ours is active now.

use crate::broker::Denial;
use std::time::SystemTime;

use crate::audit::AuditEvent;
use crate::identity::WorkloadId;
use crate::lease::Lease;
use crate::mint::{AccessClaims, IssuedCertInfo};
use crate::policy::{PolicyAction, Resource};
use crate::task::TaskId;

use super::{Broker, BrokerError};

/// What introspection found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Introspection {
    /// The token is ours, valid now, and its lease is active.
    Active(Box<AccessClaims>),
    /// Anything else: expired, revoked, unknown, foreign, malformed. No reason is given.
    Inactive,
}

impl Broker {
    /// Tells whether `token` is one of ours, valid now, and its lease active. Anything else is
    /// inactive, without a reason.
    ///
    /// # Errors
    /// [`BrokerError::Denied`] if policy does not permit the caller to introspect;
    /// [`BrokerError::Unavailable`] when the store cannot answer (never "inactive" by default).
    pub async fn introspect(
        &self,
        caller: &WorkloadId,
        token: &str,
    ) -> Result<Introspection, BrokerError> {
        let now = self.clock.now();
        let verdict = self
            .policy
            .decide(caller, PolicyAction::Introspect, &Resource::Broker);
        if !verdict.allowed {
            self.audit.record(
                &AuditEvent::new(now, "Introspect", caller.as_str(), false)
                    .reason(crate::audit::NOT_PERMITTED),
            );
            return Err(BrokerError::Denied(Denial::Policy(
                PolicyAction::Introspect,
            )));
        }
        let Ok(claims) = self.keys.verify_access_token(token, now) else {
            return Ok(Introspection::Inactive);
        };
        let Ok(task) = TaskId::parse(&claims.task_id) else {
            return Ok(Introspection::Inactive);
        };
        // The lease is the current actor's: `sub` names the root executor of a delegated task.
        let holder = claims.act.as_ref().map_or(&claims.sub, |a| &a.sub);
        let Ok(agent) = WorkloadId::parse(holder) else {
            return Ok(Introspection::Inactive);
        };
        let lease = self.live_lease(&task, &claims.jti, &agent, now).await?;
        // A delegated credential dies with a lock of anyone in its chain (`sub` and the earlier
        // actors), from the lock's first step, before its sweep reaches the delegate's task.
        if lease.is_some()
            && let Some(act) = &claims.act
        {
            for who in act
                .subjects()
                .into_iter()
                .skip(1)
                .chain([claims.sub.as_str()])
            {
                let Ok(id) = WorkloadId::parse(who) else {
                    return Ok(Introspection::Inactive);
                };
                if self.store.agent_lock(&id, now).await?.is_some() {
                    return Ok(Introspection::Inactive);
                }
            }
        }
        Ok(match lease {
            Some(_) => Introspection::Active(Box::new(claims)),
            None => Introspection::Inactive,
        })
    }

    /// The lease of `task` whose current credential is `credential`, if it is active at `now`,
    /// issued to `agent`, and `agent` is not locked: a lock holds from its first step on, before
    /// its sweep has revoked every lease. The lease and the lock are read at once.
    pub(super) async fn live_lease(
        &self,
        task: &TaskId,
        credential: &str,
        agent: &WorkloadId,
        now: SystemTime,
    ) -> Result<Option<Lease>, BrokerError> {
        let (lease, lock) = tokio::join!(
            self.store.find_lease(task, credential),
            self.store.agent_lock(agent, now)
        );
        if lock?.is_some() {
            return Ok(None);
        }
        Ok(lease?.filter(|l| l.is_active(credential, now) && &l.agent == agent))
    }

    /// Tells whether a certificate this broker issued is active: signed by the issuing CA, its
    /// lease active, now before its notAfter. Anything else is inactive, without a reason.
    ///
    /// # Errors
    /// [`BrokerError::Denied`] if policy does not permit the caller to introspect;
    /// [`BrokerError::Unavailable`] when the store cannot answer.
    pub async fn introspect_certificate(
        &self,
        caller: &WorkloadId,
        certificate: &[u8],
    ) -> Result<Option<(IssuedCertInfo, Lease)>, BrokerError> {
        self.authorize(caller, PolicyAction::Introspect, &Resource::Broker)?;
        let now = self.clock.now();
        let Some(info) = self.ca.as_ref().and_then(|ca| ca.read_issued(certificate)) else {
            return Ok(None);
        };
        let Ok(task) = TaskId::parse(&info.task) else {
            return Ok(None);
        };
        let Ok(agent) = WorkloadId::parse(&info.spiffe_id) else {
            return Ok(None);
        };
        let lease = self.live_lease(&task, &info.serial, &agent, now).await?;
        Ok(lease.map(|l| (info, l)))
    }
}
