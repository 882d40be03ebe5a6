//! Fast tests of the use cases, without a socket: a broker over the embedded store, the shipped
//! policies and a manual clock. (The same flows over real mTLS, and on Redis, are in
//! `tests/testsuite/`.)

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed expectation is a failed test"
)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{
    Broker, BrokerError, BrokerParts, BrokerSettings, Denial, Introspection, Missing, TokenRequest,
};
use crate::audit::AuditLog;
use crate::ci::CiIssuers;
use crate::clock::ManualClock;
use crate::identity::{PeerIdentity, TrustDomains, WorkloadId};
use crate::lease::LeaseState;
use crate::mint::{JwtAlgorithm, JwtKey, KeyRing};
use crate::policy::PolicyEngine;
use crate::store::embedded::EmbeddedStore;
use crate::task::{Outcome, RawTaskRequest, TaskId, TaskLimits, TaskState};

const REQUESTER: &str = "spiffe://taskcred.dev/human/requester";
const OPERATOR: &str = "spiffe://taskcred.dev/human/operator";
const AGENT: &str = "spiffe://taskcred.dev/agent/demo";
const OTHER_AGENT: &str = "spiffe://taskcred.dev/agent/other";

fn id(s: &str) -> WorkloadId {
    WorkloadId::parse(s).unwrap()
}

/// An agent as its certificate proves it.
fn peer(s: &str) -> PeerIdentity {
    PeerIdentity {
        id: id(s),
        not_after: SystemTime::now() + Duration::from_secs(86_400),
        cert_sha256: format!("thumbprint-of-{s}"),
    }
}

/// A broker over a fresh embedded store in `dir`, with the shipped policies, on `clock`.
struct Fixture {
    broker: Broker,
    clock: Arc<ManualClock>,
    audit_path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("taskcred.db")).unwrap());
    let policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policies");
    let audit_path = dir.path().join("audit.log");
    let key = JwtKey::generate(JwtAlgorithm::ES256).unwrap();
    let broker = Broker::new(
        BrokerParts {
            store,
            policy: Arc::new(PolicyEngine::load(&policies).unwrap()),
            audit: Arc::new(AuditLog::open(&audit_path).unwrap()),
            clock: clock.clone(),
            keys: KeyRing::new("https://broker.test".into(), key).unwrap(),
            ca: None,
            key_file: dir.path().join("jwt.key"),
            ci: CiIssuers::new(Vec::new(), "ci.taskcred.dev".into()),
            trust_domains: TrustDomains::parse(["taskcred.dev"]).unwrap(),
        },
        BrokerSettings {
            limits: TaskLimits::default(),
            task_retention: Duration::from_secs(86_400),
            lease_renewal_max: Duration::from_secs(3600),
            agent_rate: None,
            ci_rate: None,
            public_rate: None,
            lock_on_failure: Duration::from_secs(3600),
            delegation: crate::task::DelegationLimits::default(),
        },
    );
    // A broker begins the store's epoch before it issues anything.
    broker.check_store_epoch().await.unwrap();
    Fixture {
        broker,
        clock,
        audit_path,
        _dir: dir,
    }
}

impl Fixture {
    /// A low-risk read for `AGENT`, approved at once by the shipped policies.
    async fn approved_task(&self) -> TaskId {
        let task = self
            .broker
            .request_task(
                &id(REQUESTER),
                RawTaskRequest {
                    executor: AGENT.into(),
                    purpose: "read the staging database".into(),
                    grants: vec![("db.staging".into(), vec!["read".into()])],
                    ..RawTaskRequest::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(task.state, TaskState::Approved);
        task.id
    }

    async fn token(&self, task: TaskId, audience: &str, ttl: u64) -> Result<String, BrokerError> {
        self.token_as(AGENT, task, audience, &[], ttl).await
    }

    async fn token_as(
        &self,
        agent: &str,
        task: TaskId,
        audience: &str,
        actions: &[&str],
        ttl: u64,
    ) -> Result<String, BrokerError> {
        let issued = self
            .broker
            .issue_token(
                &peer(agent),
                TokenRequest {
                    task,
                    audience: audience.into(),
                    actions: actions.iter().map(|a| (*a).to_owned()).collect(),
                    ttl: Some(Duration::from_secs(ttl)),
                    request_id: None,
                },
            )
            .await?;
        Ok(issued.token)
    }

    async fn active(&self, token: &str) -> bool {
        matches!(
            self.broker.introspect(&id(OPERATOR), token).await.unwrap(),
            Introspection::Active(_)
        )
    }

    fn audit_actions(&self) -> Vec<String> {
        std::fs::read_to_string(&self.audit_path)
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                format!(
                    "{} {}",
                    v["action"].as_str().unwrap(),
                    v["decision"].as_str().unwrap()
                )
            })
            .collect()
    }
}

/// A fixture, and a task approved in it (executor [`AGENT`], reading `db.staging`).
async fn fixture_with_approved_task() -> (Fixture, TaskId) {
    let f = fixture().await;
    let task = f.approved_task().await;
    (f, task)
}

#[tokio::test]
async fn an_approved_task_gets_a_token_bound_to_its_executor() {
    let (f, task) = fixture_with_approved_task().await;
    let token = f.token(task, "db.staging", 60).await.unwrap();
    assert!(f.active(&token).await);
    let Introspection::Active(claims) = f.broker.introspect(&id(OPERATOR), &token).await.unwrap()
    else {
        panic!("inactive");
    };
    assert_eq!(claims.sub, AGENT);
    assert_eq!(claims.task_id, task.to_string());
    assert_eq!(claims.scope, "read");
    assert_eq!(claims.exp - claims.iat, 60);
    assert_eq!(
        claims.cnf.unwrap().x5t_s256,
        format!("thumbprint-of-{AGENT}")
    );
    assert!(f.audit_actions().contains(&"IssueToken allow".to_owned()));
}

#[tokio::test]
async fn nothing_outside_the_grant_or_for_another_agent_is_issued() {
    let (f, task) = fixture_with_approved_task().await;
    for refused in [
        f.token(task, "db.production", 60).await,
        f.token_as(AGENT, task, "db.staging", &["write"], 60).await,
        f.token_as(OTHER_AGENT, task, "db.staging", &[], 60).await,
    ] {
        assert!(
            matches!(refused, Err(BrokerError::Denied(_))),
            "{refused:?}"
        );
    }
    assert!(matches!(
        f.token(TaskId::generate(), "db.staging", 60).await,
        Err(BrokerError::NotFound(Missing::Task))
    ));
}

#[tokio::test]
async fn completing_a_task_revokes_all_its_credentials_at_once() {
    let (f, task) = fixture_with_approved_task().await;
    let first = f.token(task, "db.staging", 60).await.unwrap();
    let second = f.token(task, "db.staging", 60).await.unwrap();
    let (ended, revoked) = f
        .broker
        .complete_task(&id(AGENT), &task, Outcome::Succeeded, None)
        .await
        .unwrap();
    assert_eq!((ended.state, revoked), (TaskState::Completed, 2));
    assert!(!f.active(&first).await);
    assert!(!f.active(&second).await);
    assert!(matches!(
        f.token(task, "db.staging", 60).await,
        Err(BrokerError::Precondition(_))
    ));
}

#[tokio::test]
async fn the_reaper_ends_what_expired_on_the_clock() {
    let (f, task) = fixture_with_approved_task().await;
    let short = f.token(task, "db.staging", 30).await.unwrap();
    let long = f.token(task, "db.staging", 600).await.unwrap();
    let reaper = f.broker.reaper();
    assert_eq!(reaper.reap().await.unwrap().leases, 0);
    f.clock.advance(Duration::from_secs(31));
    let reaped = reaper.reap().await.unwrap();
    assert_eq!(reaped.leases, 1);
    assert!(!f.active(&short).await);
    assert!(f.active(&long).await);
    let leases = f.broker.store().task_leases(&task).await.unwrap();
    let expired = leases
        .iter()
        .filter(|l| l.state == LeaseState::Expired)
        .count();
    assert_eq!(expired, 1);
    // Once more: each lease is ended once.
    assert_eq!(reaper.reap().await.unwrap().leases, 0);
}

#[tokio::test]
async fn a_locked_agent_loses_its_credentials_and_gets_no_more() {
    let (f, task) = fixture_with_approved_task().await;
    let token = f.token(task, "db.staging", 60).await.unwrap();
    let (_, outcome) = f
        .broker
        .lock_agent(&id(OPERATOR), &id(AGENT), "suspected leak", None, None)
        .await
        .unwrap();
    assert_eq!((outcome.leases.len(), outcome.pending), (1, false));
    assert!(!f.active(&token).await);
    match f.token(task, "db.staging", 60).await {
        Err(BrokerError::Denied(Denial::Locked(reason))) => assert_eq!(reason, "suspected leak"),
        other => panic!("{other:?}"),
    }
    // Only an operator locks.
    assert!(matches!(
        f.broker
            .lock_agent(&id(REQUESTER), &id(OTHER_AGENT), "no", None, None)
            .await,
        Err(BrokerError::Denied(_))
    ));
}

#[tokio::test]
async fn a_renewal_replaces_the_credential() {
    let (f, task) = fixture_with_approved_task().await;
    let issued = f
        .broker
        .issue_token(
            &peer(AGENT),
            TokenRequest {
                task,
                audience: "db.staging".into(),
                actions: Vec::new(),
                ttl: Some(Duration::from_secs(60)),
                request_id: None,
            },
        )
        .await
        .unwrap();
    f.clock.advance(Duration::from_secs(10));
    let renewed = f
        .broker
        .renew_lease(&peer(AGENT), &issued.lease.id, None, None)
        .await
        .unwrap();
    let super::Credential::Token(fresh) = renewed.credential else {
        panic!("a token lease renews to a token");
    };
    assert!(!f.active(&issued.token).await);
    assert!(f.active(&fresh).await);
    // Not by another agent.
    assert!(matches!(
        f.broker
            .renew_lease(&peer(OTHER_AGENT), &issued.lease.id, None, None)
            .await,
        Err(BrokerError::Denied(_))
    ));
}
