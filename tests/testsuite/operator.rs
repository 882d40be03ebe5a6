//! Operator actions end to end, on both stores: rotating the JWT signing key (the old key keeps
//! verifying its tokens, also after a restart, until they have all expired) and force-revoking
//! an agent (its leases die at once, every issuance or renewal is refused with the lock's
//! reason until it is unlocked), also by policy when a production task fails.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::common::flows::{
    AGENT, admin_as, approved_task, creds_as, header_of, introspect, issue_as_agent, secs,
    task_request_for, tasks_as, token_request, verify_independently,
};
use crate::common::{Broker, RedisServer, redis_env};
use taskcred::api::pb;
use taskcred::clock::{Clock as _, ManualClock};
use taskcred::config::JwtAlgorithm;
use taskcred::mint::JwtKey;
use tonic::Code;

fn kids(jwks_body: &str) -> Vec<String> {
    let jwks: serde_json::Value = serde_json::from_str(jwks_body).unwrap();
    jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect()
}

/// Rotation on a broker over `clock`; returns the broker (restarted on the way).
async fn rotation(b: Broker, clock: &ManualClock) -> Broker {
    let task = approved_task(&b, &[], None).await;
    let before = issue_as_agent(&b, &task.id, None).await.token;
    let k1 = header_of(&before)["kid"].as_str().unwrap().to_owned();

    // Only who policy permits rotates.
    for name in ["agent", "requester", "approver"] {
        let err = admin_as(&b, name)
            .await
            .rotate_signing_key(pb::RotateSigningKeyRequest {})
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{name}");
    }
    let r = admin_as(&b, "operator")
        .await
        .rotate_signing_key(pb::RotateSigningKeyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.previous_kid, k1);
    assert_ne!(r.kid, k1);
    let k2 = r.kid.clone();
    // The old key stays published as long as a token it signed can live (1 h) and a minute.
    let until = SystemTime::try_from(r.previous_published_until.unwrap()).unwrap();
    assert_eq!(
        until.duration_since(clock.now()).unwrap(),
        Duration::from_secs(3660)
    );

    // The key file holds the new key, owner-only: a restart signs with it.
    let file = b.path("jwt-key.pem");
    assert_eq!(JwtKey::load(&file, JwtAlgorithm::ES256).unwrap().kid(), k2);
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // New tokens carry the new kid; old and new verify independently from the JWKS, which
    // lists the signing key first.
    let after = issue_as_agent(&b, &task.id, None).await.token;
    assert_eq!(header_of(&after)["kid"], k2.as_str());
    verify_independently(&b, &before, "db.staging").await;
    verify_independently(&b, &after, "db.staging").await;
    assert_eq!(
        kids(&b.http_get("/.well-known/jwks.json").await.1),
        [k2.clone(), k1.clone()]
    );
    assert!(introspect(&b, &before).await.active);
    assert!(introspect(&b, &after).await.active);

    // A restart keeps both: the old key's publication lives in the store.
    let b = b.restart().await;
    assert_eq!(
        kids(&b.http_get("/.well-known/jwks.json").await.1),
        [k2.clone(), k1.clone()]
    );
    assert!(introspect(&b, &before).await.active);
    assert!(introspect(&b, &after).await.active);
    verify_independently(&b, &before, "db.staging").await;
    let third = issue_as_agent(&b, &task.id, None).await.token;
    assert_eq!(header_of(&third)["kid"], k2.as_str());

    // Once every token of the old key has expired, it is no longer published.
    clock.advance(Duration::from_secs(3661));
    let b = b.restart().await;
    assert_eq!(
        kids(&b.http_get("/.well-known/jwks.json").await.1),
        std::slice::from_ref(&k2)
    );
    assert!(!introspect(&b, &before).await.active);
    b
}

fn clock_at_now() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(SystemTime::now()))
}

#[tokio::test]
async fn signing_key_rotation_on_the_embedded_store() {
    let clock = clock_at_now();
    let b = Broker::launch(
        tempfile::tempdir().unwrap(),
        Vec::new(),
        Some(clock.clone()),
    )
    .await;
    rotation(b, &clock).await.stop().await;
}

#[tokio::test]
async fn signing_key_rotation_on_redis() {
    let redis = RedisServer::start();
    let clock = clock_at_now();
    let b = Broker::launch(
        tempfile::tempdir().unwrap(),
        redis_env(&redis.url()),
        Some(clock.clone()),
    )
    .await;
    rotation(b, &clock).await.stop().await;
}

fn lock_request(agent: &str, reason: &str, duration: Option<i64>) -> pb::LockAgentRequest {
    pb::LockAgentRequest {
        agent: agent.into(),
        reason: reason.into(),
        duration: duration.and_then(secs),
        request_id: String::new(),
    }
}

/// Force-revoke on one broker.
async fn locks(b: &Broker) {
    let task = approved_task(b, &[], None).await;
    let issued = issue_as_agent(b, &task.id, None).await;
    let mut operator = admin_as(b, "operator").await;

    // Bad requests, then callers policy does not permit.
    for (req, field) in [
        (lock_request("not a spiffe id", "leak", None), "agent"),
        (lock_request(AGENT, "", None), "reason"),
        (lock_request(AGENT, "line\nbreak", None), "reason"),
        (lock_request(AGENT, &"x".repeat(513), None), "reason"),
        (lock_request(AGENT, "leak", Some(0)), "duration"),
        (lock_request(AGENT, "leak", Some(-5)), "duration"),
    ] {
        let err = operator.lock_agent(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}");
        assert!(err.message().starts_with(field), "{}", err.message());
    }
    for name in ["agent", "requester", "approver"] {
        let err = admin_as(b, name)
            .await
            .lock_agent(lock_request(AGENT, "leak", None))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{name}");
    }
    assert!(
        introspect(b, &issued.token).await.active,
        "refusals changed nothing"
    );

    // The lock ends the task and its lease at once.
    let locked = operator
        .lock_agent(lock_request(AGENT, "credential leak", None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(locked.revoked_tasks, std::slice::from_ref(&task.id));
    assert_eq!(
        locked.revoked_leases,
        std::slice::from_ref(&issued.lease_id)
    );
    let lock = locked.lock.unwrap();
    assert_eq!(lock.operator, "spiffe://taskcred.dev/human/operator");
    assert!(lock.until.is_none());
    assert!(!introspect(b, &issued.token).await.active);
    let t = tasks_as(b, "requester")
        .await
        .get_task(pb::GetTaskRequest {
            task_id: task.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.state, pb::TaskState::Revoked as i32);

    // A task for the locked agent is refused (a locked agent gets no new task), and every
    // issuance or renewal answers PERMISSION_DENIED with the reason: on the revoked task and
    // for the revoked lease.
    let err = tasks_as(b, "requester")
        .await
        .request_task(task_request_for(AGENT))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("credential leak"),
        "{}",
        err.message()
    );
    let mut agent = creds_as(b, "agent").await;
    for id in [&task.id] {
        let err = agent
            .issue_token(token_request(id, "db.staging"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(
            err.message().contains("credential leak"),
            "{}",
            err.message()
        );
    }
    let err = agent
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: issued.lease_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("credential leak"),
        "{}",
        err.message()
    );

    // Listed for the operator, not for others.
    let listed = operator
        .list_locks(pb::ListLocksRequest::default())
        .await
        .unwrap()
        .into_inner()
        .locks;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].agent, AGENT);
    assert_eq!(listed[0].reason, "credential leak");
    let err = admin_as(b, "agent")
        .await
        .list_locks(pb::ListLocksRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // Unlocked: a task approved now gets credentials; the revoked one stays so.
    let unlocked = operator
        .unlock_agent(pb::UnlockAgentRequest {
            agent: AGENT.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unlocked.lock.unwrap().reason, "credential leak");
    let again = operator
        .unlock_agent(pb::UnlockAgentRequest {
            agent: AGENT.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(again.lock.is_none());
    assert!(
        operator
            .list_locks(pb::ListLocksRequest::default())
            .await
            .unwrap()
            .into_inner()
            .locks
            .is_empty()
    );
    let fresh = approved_task(b, &[], None).await;
    issue_as_agent(b, &fresh.id, None).await;
    let err = agent
        .issue_token(token_request(&task.id, "db.staging"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // A lock with an end says so.
    let timed = operator
        .lock_agent(lock_request(AGENT, "pause", Some(3600)))
        .await
        .unwrap()
        .into_inner();
    assert!(timed.lock.unwrap().until.is_some());
    assert_eq!(timed.revoked_tasks, std::slice::from_ref(&fresh.id));
    operator
        .unlock_agent(pb::UnlockAgentRequest {
            agent: AGENT.into(),
        })
        .await
        .unwrap();
}

/// An operator ends one task and its credentials.
async fn revoke_task(b: &Broker) {
    let task = approved_task(b, &[], None).await;
    let issued = issue_as_agent(b, &task.id, None).await;
    let revoke = |reason: &str| pb::RevokeTaskRequest {
        task_id: task.id.clone(),
        reason: reason.into(),
    };
    for name in ["agent", "requester", "approver"] {
        let err = tasks_as(b, name)
            .await
            .revoke_task(revoke("stop"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{name}");
    }
    let mut operator = tasks_as(b, "operator").await;
    let err = operator.revoke_task(revoke("")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = operator
        .revoke_task(pb::RevokeTaskRequest {
            task_id: "nope".into(),
            reason: "stop".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(introspect(b, &issued.token).await.active);

    let r = operator
        .revoke_task(revoke("wrong target"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.revoked_leases, 1);
    let t = r.task.unwrap();
    assert_eq!(t.state, pb::TaskState::Revoked as i32);
    assert!(t.end_reason.contains("wrong target"), "{}", t.end_reason);
    assert!(!introspect(b, &issued.token).await.active);
    let err = creds_as(b, "agent")
        .await
        .issue_token(token_request(&task.id, "db.staging"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = operator.revoke_task(revoke("again")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn force_revoke_on_the_embedded_store() {
    let b = Broker::start().await;
    locks(&b).await;
    revoke_task(&b).await;
    failed_tasks(&b).await;
    b.stop().await;
}

#[tokio::test]
async fn force_revoke_on_redis() {
    let redis = RedisServer::start();
    let b = Broker::start_on_redis(&redis.url()).await;
    locks(&b).await;
    revoke_task(&b).await;
    failed_tasks(&b).await;
    b.stop().await;
}

/// A task ending as `failed` locks its agent when policy says so (the dev policy: in
/// production), and only then.
async fn failed_tasks(b: &Broker) {
    let fail = |id: String| pb::CompleteTaskRequest {
        task_id: id,
        outcome: pb::Outcome::Failed as i32,
        request_id: String::new(),
    };
    // Not production: the failure locks nothing.
    let task = approved_task(b, &[], None).await;
    tasks_as(b, "agent")
        .await
        .complete_task(fail(task.id.clone()))
        .await
        .unwrap();
    let locks = admin_as(b, "operator")
        .await
        .list_locks(pb::ListLocksRequest::default())
        .await
        .unwrap()
        .into_inner()
        .locks;
    assert!(locks.is_empty(), "{locks:?}");

    // Production (two approvals): its failure locks the agent, which loses its other leases.
    let other = approved_task(b, &[], None).await;
    let other_token = issue_as_agent(b, &other.id, None).await;
    let task = approved_task(b, &[("env", "production")], None).await;
    let task = if task.state == pb::TaskState::Approved as i32 {
        task
    } else {
        tasks_as(b, "approver2")
            .await
            .approve_task(pb::DecideTaskRequest {
                task_id: task.id.clone(),
                note: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
    };
    assert_eq!(task.state, pb::TaskState::Approved as i32);
    let token = issue_as_agent(b, &task.id, None).await;
    let done = tasks_as(b, "agent")
        .await
        .complete_task(fail(task.id.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.task.unwrap().state, pb::TaskState::Failed as i32);
    let locks = admin_as(b, "operator")
        .await
        .list_locks(pb::ListLocksRequest::default())
        .await
        .unwrap()
        .into_inner()
        .locks;
    assert_eq!(locks.len(), 1, "{locks:?}");
    assert_eq!(locks[0].agent, AGENT);
    assert!(locks[0].reason.contains(&task.id), "{:?}", locks[0]);
    assert!(!introspect(b, &token.token).await.active);
    assert!(!introspect(b, &other_token.token).await.active);
    let err = creds_as(b, "agent")
        .await
        .issue_token(token_request(&other.id, "db.staging"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("failed"), "{err:?}");
    admin_as(b, "operator")
        .await
        .unlock_agent(pb::UnlockAgentRequest {
            agent: AGENT.into(),
        })
        .await
        .unwrap();
}

/// Every list answer pages within its page size and the message limit (issue 17, point 4): a
/// task of 600 leases listed by task and by agent, and 150 locks.
#[tokio::test]
async fn lists_page_within_their_size_and_the_message_limit() {
    use prost::Message as _;
    let b = Broker::start_with_env(vec![
        // 600 issuances in a row meet both per-identity budgets: this test is about paging.
        ("TASKCRED_LIMITS__ISSUANCE_PER_SECOND".into(), "0".into()),
        ("TASKCRED_LIMITS__RPC_PER_SECOND".into(), "0".into()),
        ("TASKCRED_SERVER__MAX_MESSAGE_BYTES".into(), "16384".into()),
    ])
    .await;
    let task = approved_task(&b, &[], None).await;
    let mut agent = creds_as(&b, "agent").await;
    for _ in 0..600 {
        agent
            .issue_token(token_request(&task.id, "db.staging"))
            .await
            .unwrap();
    }
    let mut admin = admin_as(&b, "operator").await;
    for by_task in [true, false] {
        let mut seen = std::collections::HashSet::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            let page = admin
                .list_leases(pb::ListLeasesRequest {
                    task_id: if by_task {
                        task.id.clone()
                    } else {
                        String::new()
                    },
                    agent: if by_task { String::new() } else { AGENT.into() },
                    page_size: 500,
                    page_token: token,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            assert!(page.encoded_len() <= 16384, "{}", page.encoded_len());
            assert!(page.leases.len() <= 500);
            for l in &page.leases {
                assert!(seen.insert(l.lease_id.clone()), "twice: {}", l.lease_id);
            }
            pages += 1;
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        assert_eq!(seen.len(), 600, "by task: {by_task}");
        assert!(pages > 1);
    }
    // A page size smaller than a task: the next page continues inside it.
    let first = admin
        .list_leases(pb::ListLeasesRequest {
            task_id: task.id.clone(),
            page_size: 7,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.leases.len(), 7);
    assert!(!first.next_page_token.is_empty());

    for i in 0..150 {
        admin
            .lock_agent(pb::LockAgentRequest {
                agent: format!("spiffe://taskcred.dev/agent/idle-{i:03}"),
                reason: "paging".into(),
                duration: None,
                request_id: String::new(),
            })
            .await
            .unwrap();
    }
    let (mut locks, mut token) = (Vec::new(), String::new());
    loop {
        let page = admin
            .list_locks(pb::ListLocksRequest {
                page_size: 100,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.locks.len() <= 100);
        locks.extend(page.locks.into_iter().map(|l| l.agent));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(locks.len(), 150);
    let mut sorted = locks.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, locks, "in order, each once");
    b.stop().await;
}
