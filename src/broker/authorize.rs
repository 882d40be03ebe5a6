//! Asking policy and auditing the answer, and auditing the refusals of the other checks.

use crate::audit::AuditEvent;
use crate::broker::Denial;
use crate::identity::{PeerIdentity, WorkloadId};
use crate::policy::{PolicyAction, Resource, Verdict};
use crate::task::TaskId;

use super::{Broker, BrokerError};

impl Broker {
    /// Asks policy, audits the answer, and refuses unless permitted.
    pub(super) fn authorize(
        &self,
        caller: &WorkloadId,
        action: PolicyAction,
        resource: &Resource<'_>,
    ) -> Result<Verdict, BrokerError> {
        self.authorize_in(caller, action, resource, None)
    }

    /// As [`Broker::authorize`], with a request context.
    pub(super) fn authorize_in(
        &self,
        caller: &WorkloadId,
        action: PolicyAction,
        resource: &Resource<'_>,
        context: Option<serde_json::Value>,
    ) -> Result<Verdict, BrokerError> {
        let verdict = self.policy.decide_in(caller, action, resource, context);
        let mut event = AuditEvent::new(
            self.clock.now(),
            action.name(),
            caller.as_str(),
            verdict.allowed,
        )
        .policies(&verdict.policies);
        if let Resource::Task(t) = resource {
            event = event.task(t.id);
        }
        if !verdict.errors.is_empty() {
            event = event.detail("policy_errors", verdict.errors.clone());
        }
        if verdict.allowed {
            if action == PolicyAction::RequestTask {
                event = event.detail("quorum", verdict.quorum);
            }
            // A decision that cannot be recorded is not made (with `audit.required`).
            self.audit
                .record_or_refuse(&event)
                .map_err(|e| BrokerError::AuditFailed(e.to_string()))?;
            Ok(verdict)
        } else {
            self.audit
                .record(&event.reason(crate::audit::NOT_PERMITTED));
            Err(BrokerError::Denied(Denial::Policy(action)))
        }
    }

    /// Audits a refusal of `caller` (as a peer) and hands the error back.
    pub(super) fn refusal(
        &self,
        action: PolicyAction,
        caller: &PeerIdentity,
        task: TaskId,
        e: BrokerError,
    ) -> BrokerError {
        self.audit_refusal(action, &caller.id, task, &e);
        if !matches!(e, BrokerError::TaskChanged) {
            // Whatever refused, the next issuance reads the task afresh.
            self.tasks.forget(&task);
        }
        e
    }

    pub(super) fn audit_refusal(
        &self,
        action: PolicyAction,
        caller: &WorkloadId,
        task: TaskId,
        e: &BrokerError,
    ) {
        if matches!(
            e,
            BrokerError::Denied(_) | BrokerError::Precondition(_) | BrokerError::Invalid { .. }
        ) {
            self.audit.record(
                &AuditEvent::new(self.clock.now(), action.name(), caller.as_str(), false)
                    .task(task)
                    .reason(e.to_string()),
            );
        }
        if let BrokerError::OutcomeUnknown(detail) = e {
            // Neither done nor refused, as far as the broker can know: the record says so.
            self.audit.record(
                &AuditEvent::new(self.clock.now(), action.name(), caller.as_str(), false)
                    .outcome_unknown()
                    .task(task)
                    .reason(format!("outcome unknown: {detail}")),
            );
        }
    }
}
