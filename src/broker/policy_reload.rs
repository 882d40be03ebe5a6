//! Reloading the policies, by RPC or on SIGHUP: an invalid set is refused and the set in
//! force stays.

use crate::audit::AuditEvent;
use crate::broker::Precondition;
use crate::identity::WorkloadId;
use crate::policy::{PolicyAction, Resource};

use super::{Broker, BrokerError};

impl Broker {
    /// Reloads the policies if policy permits `caller` to. An invalid set is refused and the
    /// policies in force stay.
    ///
    /// # Errors
    /// [`BrokerError::Denied`], or [`BrokerError::Precondition`] with the file and line at fault.
    pub fn reload_policy(&self, caller: &WorkloadId) -> Result<(usize, Vec<String>), BrokerError> {
        self.authorize(caller, PolicyAction::ReloadPolicy, &Resource::Broker)?;
        self.reload_policy_unchecked("ReloadPolicy RPC", Some(caller))
    }

    /// Reloads the policies for the operator's SIGHUP, which proves itself by having access to
    /// the process.
    ///
    /// # Errors
    /// [`BrokerError::Precondition`] with the file and line at fault.
    pub fn reload_policy_on_signal(&self) -> Result<(usize, Vec<String>), BrokerError> {
        self.reload_policy_unchecked("SIGHUP", None)
    }

    pub(super) fn reload_policy_unchecked(
        &self,
        trigger: &str,
        caller: Option<&WorkloadId>,
    ) -> Result<(usize, Vec<String>), BrokerError> {
        let principal = caller.map_or("process signal", WorkloadId::as_str);
        match self.policy.reload() {
            Ok(n) => {
                let files = self
                    .policy
                    .current()
                    .files()
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect();
                tracing::info!(policies = n, trigger, "policies reloaded");
                self.audit.record(
                    &AuditEvent::new(self.clock.now(), "ReloadPolicy", principal, true)
                        .reason(format!("{n} policies loaded ({trigger})")),
                );
                Ok((n, files))
            }
            Err(e) => {
                tracing::error!(error = %e, trigger, "policy reload refused; the policies in force stay");
                self.audit.record(
                    &AuditEvent::new(self.clock.now(), "ReloadPolicy", principal, false)
                        .reason(format!("invalid policy set, previous set stays: {e}")),
                );
                Err(BrokerError::Precondition(Precondition::PolicySetRefused(
                    e.to_string(),
                )))
            }
        }
    }
}
