//! `RevokeLease`: ends one lease at once.

use crate::audit::AuditEvent;
use crate::identity::WorkloadId;
use crate::lease::{Lease, LeaseId};
use crate::policy::{PolicyAction, Resource};
use crate::store::UpdateError;

use super::revoker::Cause;
use super::{Broker, BrokerError, Missing};

impl Broker {
    /// Ends one lease: its credential stops being active at once.
    ///
    /// # Errors
    /// [`BrokerError::NotFound`], [`BrokerError::Denied`] (policy), [`BrokerError::Precondition`]
    /// (not active), [`BrokerError::Unavailable`].
    pub async fn revoke_lease(
        &self,
        caller: &WorkloadId,
        id: &LeaseId,
    ) -> Result<Lease, BrokerError> {
        let lease = self
            .store
            .get_lease(id)
            .await?
            .ok_or(BrokerError::NotFound(Missing::Lease))?;
        let task = self.load(&lease.task).await?;
        let verdict = self.authorize(caller, PolicyAction::RevokeLease, &Resource::Task(&task))?;
        let now = self.clock.now();
        let event = AuditEvent::new(now, "RevokeLease", caller.as_str(), true)
            .task(task.id)
            .policies(&verdict.policies);
        let reason = format!("revoked by {caller}");
        let revoked = self
            .revoker
            .revoke_lease(id, &reason, now, Cause::Revoke, Some(event))
            .await
            .map_err(|e| match e {
                UpdateError::NotFound => BrokerError::NotFound(Missing::Lease),
                e => e.into(),
            })
            .inspect_err(|e| self.audit_refusal(PolicyAction::RevokeLease, caller, task.id, e))?;
        Ok(revoked)
    }
}
