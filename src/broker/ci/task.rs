//! The task of a CI job: found or made by its exchange (keyed by signed claims, decided by
//! policy with the CI job as principal), and completed by `CompleteCiTask`.

use crate::broker::{Denial, Precondition};
use crate::store::Claim;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{TASK_CLAIM, token_error};
use crate::audit::AuditEvent;
use crate::broker::revoker::Cause;
use crate::broker::{Broker, BrokerError};
use crate::ci::VerifiedIdToken;
use crate::identity::WorkloadId;
use crate::lease::CredentialKind;
use crate::policy::{PolicyAction, Principal, Resource, Verdict};
use crate::task::{
    Action, Audience, Grant, Outcome, RawTaskRequest, Task, TaskId, TaskRequest, TaskState,
};

impl Broker {
    /// The job's task, found through its claim or created (policy permitting), with the
    /// verdict of policy on this exchange.
    pub(super) async fn ci_task(
        &self,
        v: &VerifiedIdToken,
        identity: &WorkloadId,
        audience: &Audience,
        actions: &BTreeSet<Action>,
        kind: CredentialKind,
        ttl: Duration,
    ) -> Result<(Task, Verdict), BrokerError> {
        let action = PolicyAction::ExchangeCiToken;
        let key = format!("{TASK_CLAIM}:{}", v.job.task_key());
        let now = self.clock.now();
        let retention = self.settings.task_retention;
        for _ in 0..3 {
            // Built (and bounded) before the claim, so that a refused one leaves no claim.
            let task =
                self.ci_candidate(v, identity, TaskId::generate(), audience, actions, now)?;
            let candidate = task.id;
            let held = self
                .store
                .claim(&Claim {
                    key: &key,
                    value: &candidate.to_string(),
                    until: v.expires_at + retention,
                })
                .await?;
            let task = match held {
                None => {
                    // This exchange is the job's first: the task is made here, if policy says so.
                    let verdict = self.decide_ci(v, &task, audience, actions, kind, ttl);
                    if !verdict.allowed {
                        let _ = self.store.release_claim(&key, &candidate.to_string()).await;
                        return Err(self.ci_denied(v, &task, &verdict));
                    }
                    let mut task = task;
                    if verdict.quorum > 0 {
                        task.state = TaskState::PendingApproval;
                    }
                    task.quorum = verdict.quorum;
                    task.request_policies = verdict.policies.clone();
                    if let Err(e) = self.store.create_task(&task).await {
                        let _ = self.store.release_claim(&key, &candidate.to_string()).await;
                        return Err(e.into());
                    }
                    self.audit.record(
                        &AuditEvent::new(now, "RequestTask", &v.job.subject, true)
                            .task(task.id)
                            .policies(&verdict.policies)
                            .detail("quorum", verdict.quorum)
                            .detail("executor", identity.as_str())
                            .detail("ci_issuer", v.issuer.name.as_str()),
                    );
                    return Ok((task, verdict));
                }
                Some(id) => {
                    let id = TaskId::parse(&id).map_err(|_| {
                        BrokerError::Internal(format!("claim {key} holds no task id"))
                    })?;
                    match self.store.get_task(&id).await? {
                        Some(t) => t,
                        None => {
                            // Its creator may be between its claim and its write; or it failed
                            // there: then the claim is released and taken again.
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            match self.store.get_task(&id).await? {
                                Some(t) => t,
                                None => {
                                    self.store.release_claim(&key, &id.to_string()).await?;
                                    continue;
                                }
                            }
                        }
                    }
                }
            };
            if &task.executor != identity {
                return Err(BrokerError::Internal(format!(
                    "claim {key} maps to a task of another executor"
                )));
            }
            let granted = task
                .grants
                .iter()
                .find(|g| &g.audience == audience)
                .is_some_and(|g| actions.is_subset(&g.actions));
            if !granted {
                return Err(self.ci_refusal(
                    action,
                    v,
                    Some(task.id),
                    BrokerError::Denied(Denial::CiGrantsFixed(grants_text(&task.grants))),
                ));
            }
            let verdict = self.decide_ci(v, &task, audience, actions, kind, ttl);
            if !verdict.allowed {
                return Err(self.ci_denied(v, &task, &verdict));
            }
            return Ok((task, verdict));
        }
        Err(BrokerError::Unavailable(
            "the job's task could not be found or made".into(),
        ))
    }

    pub(super) fn decide_ci(
        &self,
        v: &VerifiedIdToken,
        task: &Task,
        audience: &Audience,
        actions: &BTreeSet<Action>,
        kind: CredentialKind,
        ttl: Duration,
    ) -> Verdict {
        let now = self.clock.now();
        let ttl_secs = ttl
            .min(task.credential_ttl)
            .min(self.settings.limits.credential_ttl_max)
            .min(task.deadline.duration_since(now).unwrap_or_default())
            .as_secs();
        let actions: Vec<String> = actions.iter().map(ToString::to_string).collect();
        let context = crate::broker::MintRequest {
            kind,
            audience: Some(audience.as_str()),
            actions: &actions,
            renewal: false,
        }
        .context(ttl_secs);
        self.policy.decide_as(
            Principal::CiJob(&v.job),
            PolicyAction::ExchangeCiToken,
            &Resource::Task(task),
            Some(context),
        )
    }

    pub(super) fn ci_denied(
        &self,
        v: &VerifiedIdToken,
        task: &Task,
        verdict: &Verdict,
    ) -> BrokerError {
        let mut event = AuditEvent::new(
            self.clock.now(),
            PolicyAction::ExchangeCiToken.name(),
            &v.job.subject,
            false,
        )
        .task(task.id)
        .policies(&verdict.policies)
        .reason(crate::audit::NOT_PERMITTED)
        .detail("ci_issuer", v.issuer.name.as_str())
        .detail("repository", v.job.repository.as_str())
        .detail("repository_id", v.job.repository_id.as_str())
        .detail("ref", v.job.git_ref.as_str())
        .detail("environment", v.job.environment.as_str())
        .detail("id_token_sha256", v.token_sha256.as_str());
        if !verdict.errors.is_empty() {
            event = event.detail("policy_errors", verdict.errors.clone());
        }
        self.audit.record(&event);
        BrokerError::Denied(Denial::Policy(PolicyAction::ExchangeCiToken))
    }

    /// The task a job's first exchange would make: executor and requester the job's
    /// identity, one grant, labelled with the issuer, ending with the ID token (or sooner).
    pub(super) fn ci_candidate(
        &self,
        v: &VerifiedIdToken,
        identity: &WorkloadId,
        id: TaskId,
        audience: &Audience,
        actions: &BTreeSet<Action>,
        now: SystemTime,
    ) -> Result<Task, BrokerError> {
        let limits = &self.settings.limits;
        let mut deadline_in = v
            .expires_at
            .duration_since(now)
            .unwrap_or_default()
            .min(limits.deadline_max);
        if let Some(max) = v.issuer.task_deadline_max {
            deadline_in = deadline_in.min(max);
        }
        if deadline_in < Duration::from_secs(1) {
            return Err(BrokerError::Precondition(Precondition::IdTokenExpiring));
        }
        let repository: String = v.job.repository.chars().take(200).collect();
        let purpose = format!(
            "CI job {} of {repository}, run {} attempt {} ({})",
            v.job.job, v.job.run_id, v.job.run_attempt, v.issuer.name
        );
        // Through the same bounds as any requested task (purpose, grant size, deadline, ceiling).
        let request = TaskRequest::parse(
            RawTaskRequest {
                executor: identity.to_string(),
                purpose,
                grants: vec![(
                    audience.to_string(),
                    actions.iter().map(ToString::to_string).collect(),
                )],
                labels: vec![("ci".into(), v.issuer.name.clone())],
                deadline_in: Some(deadline_in),
                credential_ttl: Some(limits.credential_ttl_max),
            },
            limits,
        )?;
        Ok(Task::new(id, request, identity.clone(), 0, Vec::new(), now))
    }

    /// Ends a CI job's task on the proof of an ID token of the same job, revoking every
    /// credential of it. Returns the task and how many leases were revoked.
    ///
    /// # Errors
    /// [`BrokerError::Unauthenticated`], [`BrokerError::NotFound`] (the job never exchanged),
    /// [`BrokerError::Denied`], [`BrokerError::Precondition`] (already ended),
    /// [`BrokerError::Unavailable`].
    pub async fn complete_ci_task(
        &self,
        id_token: &str,
        source: Option<IpAddr>,
        outcome: Outcome,
    ) -> Result<(Task, usize), BrokerError> {
        let action = PolicyAction::CompleteCiTask;
        let v = self.verify_id_token(action, id_token, source).await?;
        let identity = self
            .ci
            .workload_id(&v.job)
            .map_err(|e| self.ci_refusal(action, &v, None, token_error(e)))?;
        let key = format!("{TASK_CLAIM}:{}", v.job.task_key());
        let Some(id) = self.store.claimed(&key).await? else {
            return Err(self.ci_refusal(
                action,
                &v,
                None,
                BrokerError::NotFound(crate::broker::Missing::CiTask),
            ));
        };
        let id = TaskId::parse(&id)
            .map_err(|_| BrokerError::Internal(format!("claim {key} holds no task id")))?;
        let task = self.load(&id).await?;
        if task.executor != identity {
            return Err(BrokerError::Internal(format!(
                "claim {key} maps to a task of another executor"
            )));
        }
        let verdict = self.policy.decide_as(
            Principal::CiJob(&v.job),
            action,
            &Resource::Task(&task),
            None,
        );
        if !verdict.allowed {
            return Err(self.ci_refusal(
                action,
                &v,
                Some(id),
                BrokerError::Denied(Denial::Policy(PolicyAction::CompleteCiTask)),
            ));
        }
        let now = self.clock.now();
        let who = identity.clone();
        let (task, revoked) = self
            .revoker
            .end_task(
                &id,
                Arc::new(move |t: &mut Task| t.complete(&who, outcome, now)),
                Cause::TaskEnd,
                |task| {
                    AuditEvent::new(now, action.name(), &v.job.subject, true)
                        .task(task.id)
                        .policies(&verdict.policies)
                        .detail("state", task.state.as_str())
                        .detail("ci_issuer", v.issuer.name.as_str())
                        .detail("id_token_sha256", v.token_sha256.as_str())
                },
            )
            .await
            .map_err(|e| self.ci_refusal(action, &v, Some(id), e.into()))?;
        if task.state == TaskState::Failed {
            self.lock_on_failure(&identity, &task).await;
        }
        Ok((task, revoked.len()))
    }
}

fn grants_text(grants: &[Grant]) -> String {
    grants
        .iter()
        .map(|g| {
            let actions: Vec<String> = g.actions.iter().map(ToString::to_string).collect();
            format!("{} [{}]", g.audience, actions.join(" "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}
