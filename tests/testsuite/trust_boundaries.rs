//! The trust boundaries of issue 16, each as the attack that crossed it, now refused: every test
//! here performs the attack against a real broker over real TLS. (Trust domains bound to their
//! bundles and CI identities outside mTLS are in `tests/testsuite/mtls.rs`; the CI claims in
//! `tests/testsuite/ci.rs`; the configuration refusals in `tests/testsuite/config.rs`.)

use std::time::Duration;

use crate::common::flows::{
    AGENT, admin_as, approved_task, creds_as, introspect, issue_as_agent, secs, task_request_for,
    tasks_as, token_request,
};
use crate::common::{Broker, RedisServer};
use taskcred::api::pb;
use taskcred::api::pb::revocation_service_client::RevocationServiceClient;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::Code;

fn lock_request(agent: &str, reason: &str, duration: Option<i64>) -> pb::LockAgentRequest {
    pb::LockAgentRequest {
        agent: agent.into(),
        reason: reason.into(),
        duration: duration.and_then(secs),
        request_id: String::new(),
    }
}

/// Point 3: a renewal is decided as a fresh issuance. A production token capped at five
/// minutes by policy cannot be renewed to the task's ceiling (an hour).
#[tokio::test]
async fn a_renewal_gets_no_more_than_a_fresh_issuance() {
    let b = Broker::start().await;
    let task = production_task(&b).await;
    assert_eq!(task.state, pb::TaskState::Approved as i32);
    assert_eq!(task.credential_ttl.unwrap().seconds, 3600);
    let mut agent = creds_as(&b, "agent").await;
    let fresh = issue_as_agent(&b, &task.id, Some(300)).await;
    // Today's attack: renew without a lifetime, which meant the task's full ceiling.
    let renew = |ttl: Option<i64>| pb::RenewLeaseRequest {
        lease_id: fresh.lease_id.clone(),
        ttl: ttl.and_then(secs),
        csr: Vec::new(),
    };
    for ttl in [None, Some(1800), Some(301)] {
        let err = agent.renew_lease(renew(ttl)).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "ttl {ttl:?}: {err:?}");
        assert!(err.message().contains("IssueToken"), "{err:?}");
    }
    // What a fresh issuance gets, a renewal gets.
    let renewed = agent
        .renew_lease(renew(Some(300)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(renewed.ttl.unwrap().seconds, 300);
    assert!(introspect(&b, &renewed.token).await.active);
    // The refusals are audited as the issuance decision they were.
    let audit = std::fs::read_to_string(b.path("audit.jsonl")).unwrap();
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"action\":\"IssueToken\"")
                && l.contains("\"decision\":\"deny\"")
                && l.contains("production-credentials-are-short")),
        "{audit}"
    );
    b.stop().await;
}

/// Point 5: a lock never shortens or lifts a lock in force; only UnlockAgent lifts one.
async fn locks_only_grow(b: &Broker) {
    let task = approved_task(b, &[], None).await;
    issue_as_agent(b, &task.id, None).await;
    let mut operator = admin_as(b, "operator").await;
    let indefinite = operator
        .lock_agent(lock_request(AGENT, "credential leak", None))
        .await
        .unwrap()
        .into_inner();
    assert!(indefinite.lock.unwrap().until.is_none());
    // The attack: a one-second lock over an indefinite one, which used to replace it.
    let short = operator
        .lock_agent(lock_request(AGENT, "pause", Some(1)))
        .await
        .unwrap()
        .into_inner();
    let in_force = short.lock.unwrap();
    assert!(in_force.until.is_none(), "{in_force:?}");
    assert_eq!(in_force.reason, "credential leak");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let locks = operator
        .list_locks(pb::ListLocksRequest::default())
        .await
        .unwrap()
        .into_inner()
        .locks;
    assert_eq!(locks.len(), 1, "{locks:?}");
    assert!(locks[0].until.is_none());
    // No new task for the agent either, while the indefinite lock holds.
    let err = tasks_as(b, "requester")
        .await
        .request_task(task_request_for(AGENT))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // A longer lock over a shorter one extends it.
    operator
        .unlock_agent(pb::UnlockAgentRequest {
            agent: AGENT.into(),
        })
        .await
        .unwrap();
    operator
        .lock_agent(lock_request(AGENT, "short", Some(60)))
        .await
        .unwrap();
    let longer = operator
        .lock_agent(lock_request(AGENT, "longer", Some(7200)))
        .await
        .unwrap()
        .into_inner()
        .lock
        .unwrap();
    assert_eq!(longer.reason, "longer");
    let shorter = operator
        .lock_agent(lock_request(AGENT, "shorter", Some(30)))
        .await
        .unwrap()
        .into_inner()
        .lock
        .unwrap();
    assert_eq!(shorter.reason, "longer", "the later end wins");
    operator
        .unlock_agent(pb::UnlockAgentRequest {
            agent: AGENT.into(),
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn locks_only_grow_on_the_embedded_store() {
    let b = Broker::start().await;
    locks_only_grow(&b).await;
    b.stop().await;
}

#[tokio::test]
async fn locks_only_grow_on_redis() {
    let redis = RedisServer::start();
    let b = Broker::start_on_redis(&redis.url()).await;
    locks_only_grow(&b).await;
    b.stop().await;
}

/// An approved production task (two approvals) for the demo agent, with a credential ceiling
/// of an hour.
async fn production_task(b: &Broker) -> pb::Task {
    let t = approved_task(b, &[("env", "production")], Some(3600)).await;
    tasks_as(b, "approver2")
        .await
        .approve_task(pb::DecideTaskRequest {
            task_id: t.id.clone(),
            note: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
}

fn fail(task: &str) -> pb::CompleteTaskRequest {
    pb::CompleteTaskRequest {
        task_id: task.into(),
        outcome: pb::Outcome::Failed as i32,
        request_id: String::new(),
    }
}

/// Point 5: a requester reporting its own task failed does not lock the executor (which would
/// end the executor's tasks of every other requester); the executor's own report does, for
/// `ttl.lock_on_failure` only.
#[tokio::test]
async fn only_the_executors_failure_report_locks_it_and_not_for_ever() {
    let b = Broker::start().await;
    let other = approved_task(&b, &[], None).await;
    let other_token = issue_as_agent(&b, &other.id, None).await;
    let task = production_task(&b).await;
    assert_eq!(task.state, pb::TaskState::Approved as i32);
    // The attack: the requester reports failure.
    tasks_as(&b, "requester")
        .await
        .complete_task(fail(&task.id))
        .await
        .unwrap();
    let mut operator = admin_as(&b, "operator").await;
    let locks = || async {
        admin_as(&b, "operator")
            .await
            .list_locks(pb::ListLocksRequest::default())
            .await
            .unwrap()
            .into_inner()
            .locks
    };
    assert!(
        locks().await.is_empty(),
        "a requester's report locks nobody"
    );
    assert!(introspect(&b, &other_token.token).await.active);

    // The executor's own report locks it, with an end.
    let task = production_task(&b).await;
    tasks_as(&b, "agent")
        .await
        .complete_task(fail(&task.id))
        .await
        .unwrap();
    let locked = locks().await;
    assert_eq!(locked.len(), 1, "{locked:?}");
    let until = locked[0].until.expect("a lock on failure ends");
    let left = until.seconds - locked[0].locked_at.unwrap().seconds;
    assert_eq!(left, 3600, "ttl.lock_on_failure");
    operator
        .unlock_agent(pb::UnlockAgentRequest {
            agent: AGENT.into(),
        })
        .await
        .unwrap();
    b.stop().await;
}

/// Point 5: policy sees how long a lock lasts (`context.duration_secs`, `context.until`).
#[tokio::test]
async fn lock_agent_is_decided_with_its_duration() {
    let b = Broker::start().await;
    // The approvers may pause an agent for up to an hour, never lock it for good.
    std::fs::write(
        b.path("policies/pause.cedar"),
        r#"permit (principal, action == Taskcred::Action::"LockAgent", resource)
when { principal.path == "/human/approver" &&
       context.duration_secs > 0 && context.duration_secs <= 3600 && context.until > 0 };"#,
    )
    .unwrap();
    admin_as(&b, "operator")
        .await
        .reload_policy(pb::ReloadPolicyRequest {})
        .await
        .unwrap();
    let mut approver = admin_as(&b, "approver").await;
    for duration in [None, Some(7200)] {
        let err = approver
            .lock_agent(lock_request(AGENT, "pause", duration))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{duration:?}");
    }
    approver
        .lock_agent(lock_request(AGENT, "pause", Some(600)))
        .await
        .unwrap();
    // A lock on an identity of no trust domain of this broker would hold nothing: refused. The
    // CI domain is one of the broker's.
    let mut operator = admin_as(&b, "operator").await;
    let err = operator
        .lock_agent(lock_request(
            "spiffe://elsewhere.example/agent/x",
            "typo",
            None,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("no trust domain"), "{err:?}");
    operator
        .lock_agent(lock_request(
            "spiffe://ci.taskcred.dev/ci/github/123456789",
            "stop this repository's CI",
            None,
        ))
        .await
        .unwrap();
    b.stop().await;
}

/// Point 6a: watches are a verifier's role, and one identity cannot take every slot.
#[tokio::test]
async fn only_verifiers_watch_and_each_within_its_share() {
    let b = Broker::start().await;
    let watch = |c: tonic::transport::Channel| async move {
        RevocationServiceClient::new(c)
            .watch_revocations(pb::WatchRevocationsRequest::default())
            .await
    };
    for name in ["agent", "requester", "approver"] {
        let err = watch(b.channel_as(name).await).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{name}: {err:?}");
    }
    let channel = b.channel_as("verifier").await;
    let mut held = Vec::new();
    for _ in 0..taskcred::broker::MAX_WATCHES_PER_IDENTITY {
        held.push(watch(channel.clone()).await.unwrap().into_inner());
    }
    let err = watch(channel.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // Another verifier still gets one.
    watch(b.channel_as("operator").await).await.unwrap();
    // A slot comes back when its watch ends.
    held.pop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    watch(channel).await.unwrap();
    b.stop().await;
}

/// Point 9: a cursor past the end of the log is refused, never answered as synced, on both
/// stores.
async fn a_future_cursor_is_out_of_range(b: &Broker) {
    let mut client = RevocationServiceClient::new(b.channel_as("verifier").await);
    let mut now = client
        .watch_revocations(pb::WatchRevocationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let synced = tokio::time::timeout(Duration::from_secs(5), now.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    for after in [format!("{}-0", ms + 86_400_000), "99999999999999-0".into()] {
        let err = client
            .watch_revocations(pb::WatchRevocationsRequest {
                after: after.clone(),
                audience: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::OutOfRange, "{after}: {err:?}");
    }
    // The cursor of the synced event is in range.
    client
        .watch_revocations(pb::WatchRevocationsRequest {
            after: synced.cursor,
            audience: String::new(),
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn a_future_cursor_is_out_of_range_on_the_embedded_store() {
    let b = Broker::start().await;
    a_future_cursor_is_out_of_range(&b).await;
    b.stop().await;
}

#[tokio::test]
async fn a_future_cursor_is_out_of_range_on_redis() {
    let redis = RedisServer::start();
    let b = Broker::start_on_redis(&redis.url()).await;
    a_future_cursor_is_out_of_range(&b).await;
    b.stop().await;
}

/// Point 10: Durations that break their specification are refused, never normalized, on every
/// field that takes one.
#[tokio::test]
async fn invalid_durations_are_refused_everywhere() {
    let b = Broker::start().await;
    let task = approved_task(&b, &[], None).await;
    let lease = issue_as_agent(&b, &task.id, Some(60)).await;
    let bad = [
        prost_types::Duration {
            seconds: 60,
            nanos: 2_000_000_000,
        },
        prost_types::Duration {
            seconds: 3600,
            nanos: -1,
        },
        prost_types::Duration {
            seconds: -1,
            nanos: 500,
        },
    ];
    for d in bad {
        let d = Some(d);
        let err = creds_as(&b, "agent")
            .await
            .issue_token(pb::IssueTokenRequest {
                ttl: d,
                ..token_request(&task.id, "db.staging")
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{d:?}");
        assert!(err.message().starts_with("ttl: "), "{err:?}");
        let err = creds_as(&b, "agent")
            .await
            .renew_lease(pb::RenewLeaseRequest {
                lease_id: lease.lease_id.clone(),
                ttl: d,
                csr: Vec::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{d:?}");
        let err = tasks_as(&b, "requester")
            .await
            .request_task(pb::RequestTaskRequest {
                executor: AGENT.into(),
                purpose: "p".into(),
                grants: vec![pb::Grant {
                    audience: "db.staging".into(),
                    actions: vec!["read".into()],
                }],
                deadline: d,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{d:?}");
        assert!(err.message().starts_with("deadline: "), "{err:?}");
        let err = admin_as(&b, "operator")
            .await
            .lock_agent(pb::LockAgentRequest {
                duration: d,
                ..lock_request(AGENT, "x", None)
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{d:?}");
        assert!(err.message().starts_with("duration: "), "{err:?}");
    }
    // Nothing was changed by any of them: no lock, the lease still active.
    assert!(
        admin_as(&b, "operator")
            .await
            .list_locks(pb::ListLocksRequest::default())
            .await
            .unwrap()
            .into_inner()
            .locks
            .is_empty()
    );
    assert!(introspect(&b, &lease.token).await.active);
    b.stop().await;
}

/// Point 10: errors name their real cause. An unknown lease is no "no such task"; a CSR with a
/// refused key type is no "signature does not verify"; no parser internals.
#[tokio::test]
async fn errors_name_their_real_cause() {
    let b = Broker::start().await;
    let err = creds_as(&b, "agent")
        .await
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: uuid::Uuid::now_v7().to_string(),
            ttl: None,
            csr: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), "no such lease");
    let err = creds_as(&b, "operator")
        .await
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.message(), "no such lease");

    // A secp256k1 key, made by openssl (neither rcgen nor ring makes one).
    let dir = tempfile::tempdir().unwrap();
    let csr_path = dir.path().join("k1.der");
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:secp256k1",
            "-nodes",
            "-keyout",
        ])
        .arg(dir.path().join("k1.key"))
        .args(["-subj", "/CN=k1", "-outform", "DER", "-out"])
        .arg(&csr_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let task = approved_task(&b, &[], None).await;
    let err = creds_as(&b, "agent")
        .await
        .issue_certificate(pb::IssueCertificateRequest {
            task_id: task.id.clone(),
            csr: std::fs::read(&csr_path).unwrap(),
            ttl: None,
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("unsupported key"), "{err:?}");
    assert!(!err.message().contains("signature"), "{err:?}");
    // Garbage: the refusal says what it is, not what the parser thought.
    let err = creds_as(&b, "agent")
        .await
        .issue_certificate(pb::IssueCertificateRequest {
            task_id: task.id.clone(),
            csr: vec![0x30, 0x82, 0xff, 0xff, 1, 2, 3],
            ttl: None,
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.message(),
        "csr: not a PKCS#10 certificate request: bad DER"
    );
    b.stop().await;
}

/// Point 11: page tokens say nothing of the tasks the scan passed over, and only their caller
/// can use them.
#[tokio::test]
async fn page_tokens_are_opaque_and_bound_to_their_caller() {
    let b = Broker::start().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(approved_task(&b, &[], None).await.id);
    }
    let list = |name: &'static str, token: String| {
        let b = &b;
        async move {
            tasks_as(b, name)
                .await
                .list_tasks(pb::ListTasksRequest {
                    page_size: 1,
                    page_token: token,
                    ..Default::default()
                })
                .await
        }
    };
    let first = list("requester", String::new()).await.unwrap().into_inner();
    let token = first.next_page_token;
    assert!(!token.is_empty());
    for id in &ids {
        assert!(!token.contains(id.as_str()));
        assert!(!token.contains(&id.replace('-', "")));
    }
    let second = list("requester", token.clone()).await.unwrap().into_inner();
    assert_eq!(second.tasks.len(), 1);
    assert_eq!(second.tasks[0].id, ids[1]);
    // Another caller's token, a task id, garbage: refused.
    for (who, t) in [
        ("approver", token.clone()),
        ("requester", ids[0].clone()),
        ("requester", "x".repeat(300)),
    ] {
        let err = list(who, t).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{who}: {err:?}");
        assert!(err.message().starts_with("page_token"), "{err:?}");
    }
    b.stop().await;
}

/// Point 11: approval notes and purposes refuse control, separator and format characters (they
/// are shown to people: no forged line, no reordered or hidden text).
#[tokio::test]
async fn notes_with_control_characters_are_refused() {
    let b = Broker::start().await;
    let task = tasks_as(&b, "requester")
        .await
        .request_task(pb::RequestTaskRequest {
            executor: AGENT.into(),
            purpose: "p".into(),
            grants: vec![pb::Grant {
                audience: "db.staging".into(),
                actions: vec!["rotate".into()],
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for note in [
        "ok\n2026-01-01 approved by the CISO",
        "\u{1b}[2Jcleared",
        "a\u{0}b",
        "ok\u{2028}APPROVED by the CISO",
        "reviewed \u{202E}kcab",
        "hidden\u{200B}text",
    ] {
        let err = tasks_as(&b, "approver")
            .await
            .approve_task(pb::DecideTaskRequest {
                task_id: task.id.clone(),
                note: note.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{note:?}");
        assert!(err.message().starts_with("note"), "{err:?}");
    }
    for purpose in ["deploy\u{2028}APPROVED", "read \u{202E}sdrow"] {
        let err = tasks_as(&b, "requester")
            .await
            .request_task(pb::RequestTaskRequest {
                executor: AGENT.into(),
                purpose: purpose.into(),
                grants: vec![pb::Grant {
                    audience: "db.staging".into(),
                    actions: vec!["rotate".into()],
                }],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{purpose:?}");
        assert!(err.message().starts_with("purpose"), "{err:?}");
    }
    b.stop().await;
}

/// Point 11: `key revoke KID` drops a compromised key at once: the JWK Set no longer lists it
/// and tokens it signed are inactive.
#[tokio::test]
async fn a_revoked_signing_key_is_dropped_at_once() {
    let b = Broker::start().await;
    let task = approved_task(&b, &[], None).await;
    let old = issue_as_agent(&b, &task.id, None).await;
    let mut operator = admin_as(&b, "operator").await;
    let rotated = operator
        .rotate_signing_key(pb::RotateSigningKeyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        introspect(&b, &old.token).await.active,
        "the old key still verifies"
    );
    let err = operator
        .revoke_signing_key(pb::RevokeSigningKeyRequest {
            kid: rotated.kid.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let err = operator
        .revoke_signing_key(pb::RevokeSigningKeyRequest {
            kid: "no-such-kid".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = admin_as(&b, "agent")
        .await
        .revoke_signing_key(pb::RevokeSigningKeyRequest {
            kid: rotated.previous_kid.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    let kept = operator
        .revoke_signing_key(pb::RevokeSigningKeyRequest {
            kid: rotated.previous_kid.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kept.kids, vec![rotated.kid.clone()]);
    let (_, jwks) = b.http_get("/.well-known/jwks.json").await;
    assert!(!jwks.contains(&rotated.previous_kid), "{jwks}");
    assert!(jwks.contains(&rotated.kid));
    assert!(!introspect(&b, &old.token).await.active);
    b.stop().await;
}

/// Point 11: a store error on one overdue task does not stall the others of the reaper's batch.
/// A task record damaged in Redis fails its end; the task due after it expires anyway.
#[tokio::test]
async fn one_damaged_task_does_not_stall_the_reaper() {
    let redis = RedisServer::start();
    let b = Broker::start_on_redis(&redis.url()).await;
    let short = |deadline: i64| {
        let b = &b;
        async move {
            tasks_as(b, "requester")
                .await
                .request_task(pb::RequestTaskRequest {
                    executor: AGENT.into(),
                    purpose: "brief".into(),
                    grants: vec![pb::Grant {
                        audience: "db.staging".into(),
                        actions: vec!["rotate".into()],
                    }],
                    deadline: secs(deadline),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let damaged = short(1).await;
    let healthy = short(2).await;
    let redis::Value::Array(keys) = redis.command(&["KEYS", &format!("tc:{{*}}:t:{}", damaged.id)])
    else {
        panic!("KEYS answers an array")
    };
    let [redis::Value::BulkString(key)] = keys.as_slice() else {
        panic!("one key holds the task: {keys:?}")
    };
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "HSET"])
        .arg(std::str::from_utf8(key).unwrap())
        .args(["data", "not json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    loop {
        let t = tasks_as(&b, "requester")
            .await
            .get_task(pb::GetTaskRequest {
                task_id: healthy.id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if t.state == pb::TaskState::Expired as i32 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the healthy task never expired: {t:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    b.stop().await;
}

/// Point 6c: a connection that completes TLS and never speaks HTTP/2 is closed within the
/// handshake timeout; connections without a certificate have a budget of their own; an idle
/// one is closed.
#[tokio::test]
async fn anonymous_and_silent_connections_hold_no_slot_for_long() {
    let b = Broker::start_with_env(vec![
        ("TASKCRED_SERVER__HANDSHAKE_TIMEOUT".into(), "500ms".into()),
        (
            "TASKCRED_SERVER__MAX_ANONYMOUS_CONNECTIONS".into(),
            "2".into(),
        ),
        (
            "TASKCRED_SERVER__ANONYMOUS_IDLE_TIMEOUT".into(),
            "1s".into(),
        ),
    ])
    .await;
    let connect = || tls_without_certificate(&b);
    // Closed (end of stream or an error), within `within`.
    let closed_within = |mut tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
                         within: Duration| async move {
        let mut buf = [0u8; 256];
        let started = std::time::Instant::now();
        loop {
            match tokio::time::timeout(within, tls.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => return started.elapsed(),
                Ok(Ok(_)) => {}
                Err(_) => panic!("still open after {within:?}"),
            }
        }
    };
    // Silent after TLS: closed at the handshake timeout.
    let silent = connect().await;
    let took = closed_within(silent, Duration::from_secs(3)).await;
    assert!(took < Duration::from_secs(2), "{took:?}");

    // Two anonymous connections that spoke: the third is closed at once.
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut kept = Vec::new();
    for _ in 0..2 {
        let mut tls = connect().await;
        tls.write_all(preface).await.unwrap();
        kept.push(tls);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = connect().await;
    let _ = third.write_all(preface).await;
    let took = closed_within(third, Duration::from_secs(3)).await;
    assert!(took < Duration::from_millis(900), "{took:?}");
    // An agent with a certificate is not held up by them.
    crate::common::handshake(b.grpc, &b.path("ca.pem"), Some(&b.dev_identity("agent")))
        .await
        .unwrap();
    // The kept ones sent no RPC: closed once idle.
    for tls in kept {
        let took = closed_within(tls, Duration::from_secs(4)).await;
        assert!(took < Duration::from_secs(3), "{took:?}");
    }
    b.stop().await;
}

/// Point 6d: `/crl` is served from a cache brought up to date at most once a second, whatever
/// the rate of requests.
#[tokio::test]
async fn the_crl_is_not_rebuilt_per_request() {
    let b = Broker::start().await;
    let reads = |metrics: &str| -> u64 {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("taskcred_store_operation_duration_seconds_count")
                    && l.contains("op=\"revocations\"")
            })
            .and_then(|l| l.rsplit(' ').next())
            .map_or(0, |n| n.parse().unwrap())
    };
    let task = approved_task(&b, &[], None).await;
    let issued = issue_as_agent(&b, &task.id, None).await;
    creds_as(&b, "agent")
        .await
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: issued.lease_id,
        })
        .await
        .unwrap();
    let (_, before) = b.http_get("/metrics").await;
    let started = std::time::Instant::now();
    for _ in 0..50 {
        let (status, _, _) = crate::common::http_get_bytes(b.http, "/crl").await;
        assert_eq!(status, 200);
    }
    let seconds = started.elapsed().as_secs() + 1;
    let (_, after) = b.http_get("/metrics").await;
    let delta = reads(&after) - reads(&before);
    // The revocation feed reads the log too, about once per its wait: a few reads a second at
    // most, never one per request.
    assert!(
        delta <= 4 * seconds + 4,
        "{delta} log reads for 50 CRL requests in {seconds}s"
    );
    b.stop().await;
}

/// Point 11: `serve --dev`'s issuer is its HTTP port, wherever `--http-addr` puts it.
#[tokio::test]
async fn the_dev_issuer_follows_the_http_address() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tmp = tempfile::tempdir().unwrap();
    let dev = tmp.path().join("dev");
    // A port given, and one the kernel picks (`:0`): the issuer is the port served, never the
    // default 7480 that something else may own (the second found by an attack review).
    for http in [format!("127.0.0.1:{port}"), "127.0.0.1:0".to_owned()] {
        let serve = crate::common::ServeProcess::start(
            &[
                "--dev-dir",
                dev.to_str().unwrap(),
                "serve",
                "--dev",
                "--grpc-addr",
                "127.0.0.1:0",
                "--http-addr",
                &http,
            ],
            &[],
        );
        let (_, body) =
            crate::common::http_get(serve.http, "/.well-known/openid-configuration").await;
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(doc["issuer"], format!("http://{}", serve.http));
        assert_eq!(
            doc["jwks_uri"],
            format!("http://{}/.well-known/jwks.json", serve.http)
        );
        if http.ends_with(":0") {
            assert_ne!(serve.http.port(), 0);
        } else {
            assert_eq!(serve.http.to_string(), http);
        }
        assert_eq!(serve.terminate().code(), Some(0));
    }
}

/// Point 6b: the public RPCs have a budget per source address before any verification, and
/// garbage ID tokens cannot fill the audit log.
#[tokio::test]
async fn garbage_id_tokens_are_limited_and_sampled() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, r#"{"keys": []}"#).unwrap();
    let issuer = format!(
        r#"[{{name = "generic", preset = "generic", issuer = "https://ci.example.test", audience = "taskcred", algorithms = ["RS256"], jwks_file = "{}"}}]"#,
        jwks.display()
    );
    // A usable key is required at start: give the set one (RFC 7517's example key).
    std::fs::write(
        &jwks,
        r#"{"keys": [{"kty": "EC", "crv": "P-256", "kid": "k", "use": "sig",
            "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
            "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#,
    )
    .unwrap();
    let issuer = issuer.replace(r#"algorithms = ["RS256"]"#, r#"algorithms = ["ES256"]"#);
    let b = Broker::launch(
        dir,
        vec![
            ("TASKCRED_CI__ISSUERS".into(), issuer),
            ("TASKCRED_LIMITS__PUBLIC_PER_SECOND".into(), "5".into()),
            ("TASKCRED_LIMITS__PUBLIC_BURST".into(), "40".into()),
        ],
        None,
    )
    .await;
    let mut ci = taskcred::api::pb::ci_service_client::CiServiceClient::new(b.channel(None).await);
    let garbage = format!(
        "eyJhbGciOiJFUzI1NiIsImtpZCI6ImsifQ.{}.AAAA",
        base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            r#"{"iss":"https://ci.example.test","aud":"taskcred"}"#
        )
    );
    let (mut refused, mut limited) = (0, 0);
    for _ in 0..100 {
        let err = ci
            .exchange_ci_token(pb::ExchangeCiTokenRequest {
                id_token: garbage.clone(),
                audience: "db.staging".into(),
                actions: vec!["read".into()],
                ..Default::default()
            })
            .await
            .unwrap_err();
        match err.code() {
            Code::Unauthenticated => refused += 1,
            Code::ResourceExhausted => {
                assert!(crate::common::retry_after_ms(&err) > 0);
                limited += 1;
            }
            other => panic!("{other:?}: {err:?}"),
        }
    }
    assert!(limited >= 50, "refused {refused}, limited {limited}");
    let audit = std::fs::read_to_string(b.path("audit.jsonl")).unwrap();
    let lines = audit
        .lines()
        .filter(|l| l.contains("ci:unverified"))
        .count();
    assert!(
        lines <= taskcred::audit::SAMPLES_PER_WINDOW as usize,
        "{lines} audit lines for {refused} refusals"
    );
    let (_, metrics) = b.http_get("/metrics").await;
    assert!(
        crate::common::sample(&metrics, "taskcred_rate_limited_total{kind=\"source\"}") >= 1.0,
        "{metrics}"
    );
    b.stop().await;
}

/// Found by the review: no anonymous caller holds a stream (`Health/Watch` needs a
/// certificate), an anonymous connection ends at its maximum age whatever it does, and one
/// source address or one identity cannot take every connection slot.
#[tokio::test]
async fn connection_budgets_per_source_identity_and_age() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let b = Broker::start_with_env(vec![
        ("TASKCRED_SERVER__ANONYMOUS_MAX_AGE".into(), "2s".into()),
        (
            "TASKCRED_SERVER__MAX_ANONYMOUS_CONNECTIONS_PER_SOURCE".into(),
            "2".into(),
        ),
        (
            "TASKCRED_SERVER__MAX_CONNECTIONS_PER_IDENTITY".into(),
            "2".into(),
        ),
    ])
    .await;
    let anon = b.channel(None).await;
    let err = HealthClient::new(anon.clone())
        .watch(HealthCheckRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    // Talking all along (HTTP/2 pings every 200 ms), an anonymous connection still ends at its
    // maximum age, long before its idle timeout (30 s).
    let mut tls = tls_without_certificate(&b).await;
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        let ping = b"\0\0\x08\x06\0\0\0\0\0taskcred";
        if tls.write_all(ping).await.is_err() {
            break;
        }
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(200), tls.read(&mut buf)).await
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the anonymous connection outlived its maximum age"
        );
    }
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    // Per source: two anonymous connections at most (the third is closed after its handshake).
    let held: Vec<_> = futures_like_two(&b, None).await;
    let third = crate::common::handshake(b.grpc, &b.path("ca.pem"), None).await;
    assert!(third.is_err(), "{third:?}");
    drop(held);
    // Per identity: two connections of the agent; a third is closed; another identity is not.
    let agent = b.dev_identity("agent");
    let held: Vec<_> = futures_like_two(&b, Some(&agent)).await;
    assert!(
        crate::common::handshake(b.grpc, &b.path("ca.pem"), Some(&agent))
            .await
            .is_err()
    );
    crate::common::handshake(b.grpc, &b.path("ca.pem"), Some(&b.dev_identity("operator")))
        .await
        .unwrap();
    drop(held);
    b.stop().await;
}

/// A TLS connection to `b`'s gRPC port without a client certificate.
async fn tls_without_certificate(
    b: &Broker,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::pem::PemObject::pem_file_iter(b.path("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(b.grpc).await.unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap()
}

/// Two open channels to `b` (with `identity`), each having made a call.
async fn futures_like_two(
    b: &Broker,
    identity: Option<&crate::common::Pem>,
) -> Vec<tonic::transport::Channel> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let mut out = Vec::new();
    for _ in 0..2 {
        let c = b.channel(identity).await;
        HealthClient::new(c.clone())
            .check(HealthCheckRequest::default())
            .await
            .unwrap();
        out.push(c);
    }
    out
}

/// Found by the review: the HTTP port (JWK Set, CRL) closes silent connections and gives one
/// source address a share of its connections only.
#[tokio::test]
async fn the_http_port_keeps_its_connections_moving() {
    let b = Broker::start_with_env(vec![
        ("TASKCRED_SERVER__HTTP_IDLE_TIMEOUT".into(), "1s".into()),
        (
            "TASKCRED_SERVER__MAX_HTTP_CONNECTIONS_PER_SOURCE".into(),
            "3".into(),
        ),
    ])
    .await;
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(tokio::net::TcpStream::connect(b.http).await.unwrap());
    }
    // The share of this source is taken: a fourth connection is closed at once.
    let mut fourth = tokio::net::TcpStream::connect(b.http).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(2), fourth.read(&mut buf))
        .await
        .expect("the fourth connection is closed at once");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    // The silent ones are closed once idle, and the port serves again.
    for mut s in silent {
        let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
            .await
            .expect("closed within the idle timeout");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    }
    let (status, _) = b.http_get("/.well-known/jwks.json").await;
    assert_eq!(status, 200);
    b.stop().await;
}

/// Found by the review: every path that mints is decided as a credential of its kind, so the
/// dev policy's five-minute cap on production credentials holds for certificates and for CI
/// exchanges too, not only for tokens an agent asks for.
#[tokio::test]
async fn the_production_cap_holds_for_certificates() {
    let b = Broker::start().await;
    let task = production_task(&b).await;
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    let mut agent = creds_as(&b, "agent").await;
    let err = agent
        .issue_certificate(pb::IssueCertificateRequest {
            task_id: task.id.clone(),
            csr: csr.clone(),
            ttl: secs(3600),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("IssueCertificate"), "{err:?}");
    let cert = agent
        .issue_certificate(pb::IssueCertificateRequest {
            task_id: task.id.clone(),
            csr,
            ttl: secs(300),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cert.ttl.unwrap().seconds, 300);
    b.stop().await;
}

/// Found by the review: a task's size is bounded (a listing reads tasks whole), a listing is
/// cut to fit the message limit, and an identity's RPCs (each a decision and an audit line) have
/// a budget.
#[tokio::test]
async fn tasks_and_listings_and_rpcs_have_budgets() {
    let b = Broker::start_with_env(vec![
        ("TASKCRED_LIMITS__RPC_PER_SECOND".into(), "1000".into()),
        ("TASKCRED_LIMITS__RPC_BURST".into(), "1000".into()),
    ])
    .await;
    let mut requester = tasks_as(&b, "requester").await;
    let grants = |n: usize, name_len: usize| -> Vec<pb::Grant> {
        (0..n)
            .map(|g| pb::Grant {
                audience: format!("aud-{g}"),
                actions: (0..32)
                    .map(|a| format!("{a:02}{}", "x".repeat(name_len - 2)))
                    .collect(),
            })
            .collect()
    };
    let ask = |grants: Vec<pb::Grant>| pb::RequestTaskRequest {
        executor: AGENT.into(),
        purpose: "p".repeat(1000),
        grants,
        ..Default::default()
    };
    let err = requester
        .request_task(ask(grants(16, 250)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("bytes of text"), "{err:?}");
    // Big tasks under the bound: a page of 20 does not fit 256 KiB and is cut, not refused.
    for _ in 0..20 {
        requester.request_task(ask(grants(3, 150))).await.unwrap();
    }
    let mut approver = tasks_as(&b, "approver").await;
    let (mut seen, mut token) = (0, String::new());
    loop {
        let page = approver
            .list_tasks(pb::ListTasksRequest {
                page_size: 20,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(prost::Message::encoded_len(&page) <= 256 * 1024);
        seen += page.tasks.len();
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, 20);
    b.stop().await;

    // The RPC budget of an identity.
    let b = Broker::start_with_env(vec![
        ("TASKCRED_LIMITS__RPC_PER_SECOND".into(), "1".into()),
        ("TASKCRED_LIMITS__RPC_BURST".into(), "5".into()),
    ])
    .await;
    let mut agent = tasks_as(&b, "agent").await;
    let mut limited = None;
    for _ in 0..10 {
        if let Err(e) = agent.list_tasks(pb::ListTasksRequest::default()).await {
            limited = Some(e);
            break;
        }
    }
    let e = limited.expect("the budget held");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(crate::common::retry_after_ms(&e) > 0);
    // Another identity has its own.
    tasks_as(&b, "requester")
        .await
        .list_tasks(pb::ListTasksRequest::default())
        .await
        .unwrap();
    b.stop().await;
}

/// Bytes that do not decode as the request message are the caller's fault: INVALID_ARGUMENT
/// without the decoder's words, never INTERNAL (that would trip the operators' alerts), with or
/// without a client certificate.
#[tokio::test]
async fn undecodable_requests_are_invalid_arguments() {
    let b = Broker::start().await;
    // Field 2 (a string in ExchangeCiTokenRequest) holding bytes that are not UTF-8.
    let bad = pb::IssueCertificateRequest {
        csr: vec![0xff, 0xfe, 0xfd],
        ..Default::default()
    };
    for channel in [b.channel(None).await, b.channel_as("agent").await] {
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.unwrap();
        let codec = tonic_prost::ProstCodec::<
            pb::IssueCertificateRequest,
            pb::ExchangeCiTokenResponse,
        >::default();
        let err = grpc
            .unary(
                tonic::Request::new(bad.clone()),
                "/taskcred.v1.CiService/ExchangeCiToken".parse().unwrap(),
                codec,
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(!err.message().contains("UTF-8"), "{err:?}");
    }
    // No RPC was answered INTERNAL (the series are served at zero from the start).
    let (_, metrics) = b.http_get("/metrics").await;
    assert!(
        metrics
            .lines()
            .filter(|l| l.starts_with("taskcred_grpc_requests_total")
                && l.contains("code=\"INTERNAL\""))
            .all(|l| l.ends_with(" 0")),
        "{metrics}"
    );
    b.stop().await;
}

/// R13: one address cannot hold every slot with connections that never finish their TLS
/// handshake: past `server.max_handshakes_per_source` they are closed at once, and the address
/// gets through again as soon as its pending ones go.
#[tokio::test]
async fn one_address_holds_few_unfinished_handshakes() {
    let b = Broker::start_with_env(vec![(
        "TASKCRED_SERVER__MAX_HANDSHAKES_PER_SOURCE".into(),
        "4".into(),
    )])
    .await;
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(tokio::net::TcpStream::connect(b.grpc).await.unwrap());
    }
    // Let the accept loop take them.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let mut fifth = tokio::net::TcpStream::connect(b.grpc).await.unwrap();
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(std::time::Duration::from_secs(2), fifth.read(&mut buf))
        .await
        .expect("the fifth pending handshake is closed at once");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    drop(silent);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    crate::common::flows::tasks_as(&b, "requester")
        .await
        .list_tasks(pb::ListTasksRequest::default())
        .await
        .unwrap();
    b.stop().await;
}
