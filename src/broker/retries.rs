//! Retry-safe requests: a caller's request id, and what a retry under it finds. An answer that
//! was lost (a timeout, a dropped connection, `UNAVAILABLE` with outcome unknown) can be retried
//! with the same id without a second effect: an issuance maps its id to one lease id in a store
//! claim taken before the lease is recorded, so a retry records that same lease (the store
//! refuses a lease id twice) or re-answers from it; a completion retried by its caller answers
//! OK once the task ended as asked.

use crate::broker::Precondition;
use crate::store::Claim;
use std::time::SystemTime;

use super::{Broker, BrokerError};
use crate::identity::{PeerIdentity, WorkloadId};
use crate::lease::{CredentialKind, Lease, LeaseId, LeaseState};
use crate::mint::sha256_hex;
use crate::store::task_ended_reason;
use crate::task::{Outcome, Task, TaskId};

/// Longest request id.
pub const MAX_REQUEST_ID: usize = 64;

/// A caller's request id: 1 to 64 of `A-Z a-z 0-9 _ -`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(String);

impl RequestId {
    /// Parses a request id; the empty string is none.
    ///
    /// # Errors
    /// [`BrokerError::Invalid`] (field `request_id`).
    pub fn parse(s: &str) -> Result<Option<Self>, BrokerError> {
        if s.is_empty() {
            return Ok(None);
        }
        if s.len() > MAX_REQUEST_ID
            || !s
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(BrokerError::Invalid {
                field: "request_id",
                reason: format!("1 to {MAX_REQUEST_ID} of A-Z a-z 0-9 _ -"),
            });
        }
        Ok(Some(Self(s.to_owned())))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What an issuance under a request id is to do.
#[derive(Debug)]
pub(super) enum Claimed {
    /// Record a lease with this id (the first attempt, or a retry of one that recorded none).
    Record(LeaseId),
    /// An earlier attempt recorded this lease: answer from it.
    Recorded(Box<Lease>),
}

/// The claim of an issuance: `key` maps the caller's request id to `value`, the lease id and
/// the request's fingerprint.
#[derive(Debug)]
pub(super) struct IssueClaim {
    key: String,
    fingerprint: String,
}

impl IssueClaim {
    /// The claim for `caller`'s request `id`, asking `request` (everything that shapes the
    /// credential: the task, kind, audience, actions and lifetime asked).
    pub(super) fn new(caller: &WorkloadId, id: &RequestId, request: &str) -> Self {
        Self {
            key: format!(
                "req:issue:{}:{}",
                sha256_hex(caller.as_str().as_bytes()),
                id.0
            ),
            fingerprint: sha256_hex(request.as_bytes()),
        }
    }
}

impl Broker {
    /// Takes (or finds) the claim of an issuance: which lease this request records, or the
    /// lease an earlier attempt recorded. The claim lasts until the task's deadline: no lease
    /// of the task outlives it.
    ///
    /// # Errors
    /// [`BrokerError::Invalid`] when the id was used for a different request;
    /// [`BrokerError::Unavailable`].
    pub(super) async fn claim_issuance(
        &self,
        claim: &IssueClaim,
        task: &TaskId,
        until: SystemTime,
    ) -> Result<Claimed, BrokerError> {
        let fresh = LeaseId::generate(task);
        let value = format!("{fresh} {}", claim.fingerprint);
        let asked = Claim {
            key: &claim.key,
            value: &value,
            until,
        };
        let Some(held) = self.store.claim(&asked).await? else {
            return Ok(Claimed::Record(fresh));
        };
        let (lease, fingerprint) = held
            .split_once(' ')
            .ok_or_else(|| BrokerError::Internal("a request claim without its lease".into()))?;
        if fingerprint != claim.fingerprint {
            return Err(BrokerError::Invalid {
                field: "request_id",
                reason: "already used for a different request; use a new one".into(),
            });
        }
        let lease = LeaseId::parse(lease).map_err(|e| BrokerError::Internal(e.to_string()))?;
        self.recorded_lease(lease).await
    }

    /// The lease `id` if it was recorded, else that it is to be recorded.
    pub(super) async fn recorded_lease(&self, id: LeaseId) -> Result<Claimed, BrokerError> {
        Ok(match self.store.get_lease(&id).await? {
            Some(lease) => Claimed::Recorded(Box::new(lease)),
            None => Claimed::Record(id),
        })
    }

    /// Checks that `lease`, recorded by an earlier attempt of `caller`'s request, can be
    /// answered again at `now`: the same caller's (and certificate's), of `kind`, still active.
    ///
    /// # Errors
    /// [`BrokerError::Precondition`] when it ended or expired (a new request id issues anew);
    /// [`BrokerError::Invalid`] when it is not this request's.
    pub(super) fn check_reanswer(
        lease: &Lease,
        caller: &PeerIdentity,
        task: TaskId,
        kind: CredentialKind,
        now: SystemTime,
    ) -> Result<(), BrokerError> {
        // The same certificate too: the credential is bound to the one it was issued to.
        if lease.agent != caller.id
            || lease.cnf != caller.cert_sha256
            || lease.task != task
            || lease.kind != kind
        {
            return Err(BrokerError::Invalid {
                field: "request_id",
                reason: "already used for a different request; use a new one".into(),
            });
        }
        if lease.state != LeaseState::Active || now >= lease.expires_at {
            let why = lease.reason.as_deref().unwrap_or("expired");
            return Err(BrokerError::Precondition(Precondition::RequestLeaseEnded {
                lease: lease.id.clone(),
                why: why.to_owned(),
            }));
        }
        Ok(())
    }

    /// Whether `caller`'s completion `id` of task `task` was claimed before (a retry), taking
    /// the claim if not. The claim lasts as long as the ended task is kept.
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`].
    pub(super) async fn claim_completion(
        &self,
        caller: &WorkloadId,
        task: TaskId,
        id: &RequestId,
        outcome: Outcome,
        now: SystemTime,
    ) -> Result<bool, BrokerError> {
        let key = format!("req:complete:{task}");
        let value = format!(
            "{} {} {}",
            sha256_hex(caller.as_str().as_bytes()),
            id.0,
            outcome.ends_as(caller).0
        );
        let until = now + self.settings.task_retention;
        let claim = Claim {
            key: &key,
            value: &value,
            until,
        };
        let held = self.store.claim(&claim).await?;
        Ok(held.as_deref() == Some(value.as_str()))
    }

    /// How many leases the end of `task` revoked (a retried completion's answer).
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`].
    pub(super) async fn revoked_by_end(&self, task: &Task) -> Result<usize, BrokerError> {
        let reason = task_ended_reason(task);
        Ok(self
            .store
            .task_leases(&task.id)
            .await?
            .iter()
            .filter(|l| l.state == LeaseState::Revoked && l.reason.as_deref() == Some(&reason))
            .count())
    }
}

/// Whether `task` ended as `caller`'s completion with `outcome` ends it.
pub(super) fn ended_as(task: &Task, caller: &WorkloadId, outcome: Outcome) -> bool {
    let (state, reason) = outcome.ends_as(caller);
    task.state == state && task.end_reason.as_deref() == Some(reason.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_short_and_plain() {
        assert_eq!(RequestId::parse("").unwrap(), None);
        assert_eq!(
            RequestId::parse("job-42_retry").unwrap().unwrap().as_str(),
            "job-42_retry"
        );
        assert!(RequestId::parse(&"a".repeat(64)).unwrap().is_some());
        for bad in ["a".repeat(65).as_str(), "a b", "a:b", "ü", "a\n", "../x"] {
            assert!(RequestId::parse(bad).is_err(), "{bad:?}");
        }
    }
}
