//! Operating the broker: the audit log as operators check it (a session's log passes `taskcred
//! audit verify`, one changed byte is found; a log that cannot be written stops issuance unless
//! configured not to), the metrics of a short session, and per-identity rate limits.
use crate::common::Broker;
use crate::common::flows::{approved_task, creds_as, tasks_as, token_request};
use taskcred::api::pb;
use tonic::Code;

#[tokio::test]
async fn audit_verify_accepts_a_session_log_and_finds_one_changed_byte() {
    let b = Broker::start().await;
    // A short session: a task approved, a token, a refusal, a completion.
    let task = approved_task(&b, &[("env", "staging")], None).await;
    creds_as(&b, "agent")
        .await
        .issue_token(token_request(&task.id, "db.staging"))
        .await
        .unwrap();
    let refused = creds_as(&b, "requester")
        .await
        .issue_token(token_request(&task.id, "db.staging"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let b = b.restart().await; // the chain continues across a restart
    creds_as(&b, "agent")
        .await
        .issue_token(token_request(&task.id, "db.staging"))
        .await
        .unwrap();
    let dir = b.stop().await;
    let log = dir.path().join("audit.jsonl");
    let path = log.to_str().unwrap();

    let (code, out, err) = crate::common::run(&["audit", "verify", path]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("ok: "), "{out}");
    let text = std::fs::read(&log).unwrap();
    let lines = text.iter().filter(|b| **b == b'\n').count();
    assert!(lines >= 6, "{lines} lines");

    // One byte of a middle line changed: the chain breaks at the line after it.
    let middle = lines / 2;
    let start = text
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .nth(middle - 1)
        .unwrap()
        .0
        + 1;
    let mut changed = text.clone();
    let at = start
        + changed[start..]
            .windows(8)
            .position(|w| w == b"\"action\"")
            .unwrap()
        + 10;
    changed[at] ^= 0x20; // the case of one letter
    std::fs::write(&log, &changed).unwrap();
    let (code, out, _) = crate::common::run(&["--json", "audit", "verify", path]);
    assert_eq!(code, 1, "{out}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["intact"], false);
    assert_eq!(report["line"], middle + 2, "{report}");
}

/// Issue 17, point 1: while the audit log cannot be written (and is required), no decision that
/// must be audited is made: not a credential, and neither a task request, an approval nor a lock.
#[tokio::test]
async fn issuance_fails_closed_when_the_audit_log_cannot_be_written() {
    // A task approved while the disk was fine.
    let b = Broker::start().await;
    let task = approved_task(&b, &[("env", "staging")], None).await;
    let dir = b.stop().await;
    // Then every write to /dev/full fails (ENOSPC).
    let full = vec![("TASKCRED_AUDIT__PATH".to_owned(), "/dev/full".to_owned())];
    let b = Broker::launch(dir, full.clone(), None).await;
    let e = creds_as(&b, "agent")
        .await
        .issue_token(token_request(&task.id, "db.staging"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("audit log"), "{e:?}");
    let e = tasks_as(&b, "requester")
        .await
        .request_task(pb::RequestTaskRequest {
            executor: crate::common::flows::AGENT.into(),
            purpose: "unaudited".into(),
            grants: vec![pb::Grant {
                audience: "db.staging".into(),
                actions: vec!["read".into()],
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let e = crate::common::flows::admin_as(&b, "operator")
        .await
        .lock_agent(pb::LockAgentRequest {
            agent: crate::common::flows::AGENT.into(),
            reason: "unaudited".into(),
            duration: None,
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        crate::common::flows::admin_as(&b, "operator")
            .await
            .list_locks(pb::ListLocksRequest::default())
            .await
            .is_err(),
        "reads are decisions too"
    );
    let (_, metrics) = b.http_get("/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("taskcred_audit_write_failures_total") && !l.ends_with(" 0")),
        "{metrics}"
    );
    let dir = b.stop().await;

    // audit.required = false: issued anyway (still counted).
    let mut env = full;
    env.push(("TASKCRED_AUDIT__REQUIRED".into(), "false".into()));
    let b = Broker::launch(dir, env, None).await;
    creds_as(&b, "agent")
        .await
        .issue_token(token_request(&task.id, "db.staging"))
        .await
        .unwrap();
    b.stop().await;
}

/// The Checked-by of the metrics: issuance, denial and reaper-lag series after a short session.
#[tokio::test]
async fn metrics_show_issuance_denials_and_reaper_lag() {
    let b = Broker::start().await;
    let task = approved_task(&b, &[("env", "staging")], None).await;
    creds_as(&b, "agent")
        .await
        .issue_token(pb::IssueTokenRequest {
            ttl: crate::common::flows::secs(1),
            ..token_request(&task.id, "db.staging")
        })
        .await
        .unwrap();
    let _ = creds_as(&b, "requester")
        .await
        .issue_token(token_request(&task.id, "db.staging"))
        .await
        .unwrap_err();
    // The token expires after a second; the reaper ends its lease.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let metrics = loop {
        let (_, m) = b.http_get("/metrics").await;
        if crate::common::sample(&m, "taskcred_reaper_lateness_seconds_count") > 0.0
            || std::time::Instant::now() > deadline
        {
            break m;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    // Counted (served at zero from the start: the values tell).
    for series in [
        "taskcred_issuance_total{kind=\"jwt\",outcome=\"issued\"}",
        "taskcred_issuance_total{kind=\"jwt\",outcome=\"denied\"}",
        "taskcred_issuance_duration_seconds_count{kind=\"jwt\",outcome=\"issued\"}",
        "taskcred_denials_total{action=\"IssueToken\",reason=\"rule\"}",
        "taskcred_reaper_lateness_seconds_count",
        "taskcred_store_operation_duration_seconds_count{op=\"issue_lease\"}",
    ] {
        assert!(
            crate::common::sample(&metrics, series) > 0.0,
            "{series} not counted in\n{metrics}"
        );
    }
    // Sampled from the store.
    for series in [
        "taskcred_reaper_lag_seconds ",
        "taskcred_leases_active ",
        "taskcred_agents_locked ",
    ] {
        assert!(metrics.contains(series), "{series} missing in\n{metrics}");
    }
    b.stop().await;
}

/// The series of the agents' rate limit.
const LIMITED_AGENT: &str = "taskcred_rate_limited_total{kind=\"agent\"}";

/// Over its rate, an agent is refused with RESOURCE_EXHAUSTED and when to retry; it gets tokens
/// again once its bucket has refilled; the burst alert counts.
#[tokio::test]
async fn an_agent_over_its_issuance_rate_is_told_when_to_retry() {
    let b = Broker::start_with_env(vec![
        ("TASKCRED_LIMITS__ISSUANCE_PER_SECOND".into(), "2".into()),
        ("TASKCRED_LIMITS__ISSUANCE_BURST".into(), "3".into()),
    ])
    .await;
    let limited_before = crate::common::sample(&b.http_get("/metrics").await.1, LIMITED_AGENT);
    let task = approved_task(&b, &[("env", "staging")], None).await;
    let mut agent = creds_as(&b, "agent").await;
    for _ in 0..3 {
        agent
            .issue_token(token_request(&task.id, "db.staging"))
            .await
            .unwrap();
    }
    let e = agent
        .issue_token(token_request(&task.id, "db.staging"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let wait = crate::common::retry_after_ms(&e);
    assert!((1..=500).contains(&wait), "{wait}");
    tokio::time::sleep(std::time::Duration::from_millis(wait + 50)).await;
    agent
        .issue_token(token_request(&task.id, "db.staging"))
        .await
        .unwrap();
    let (_, metrics) = b.http_get("/metrics").await;
    assert!(
        crate::common::sample(&metrics, LIMITED_AGENT) > limited_before,
        "{metrics}"
    );
    b.stop().await;
}

#[tokio::test]
async fn replicas_write_one_chained_audit_stream() {
    let redis = crate::common::RedisServer::start();
    let url = redis.url();
    let mut env = crate::common::redis_env(&url);
    env.push(("TASKCRED_AUDIT__REDIS_STREAM".into(), "true".into()));
    let a = Broker::start_with_env(env.clone()).await;
    // The second replica keeps its own file (each file is one replica's chain).
    let b_file = a.path("audit-b.jsonl");
    env.push((
        "TASKCRED_AUDIT__PATH".into(),
        b_file.to_str().unwrap().into(),
    ));
    let b = a.replica(env).await;

    let task = approved_task(&a, &[("env", "staging")], None).await;
    // Both replicas decide at once, so their appends to the stream contend.
    let issue = |mut client: pb::credential_service_client::CredentialServiceClient<_>| {
        let task = task.id.clone();
        async move {
            for _ in 0..25 {
                client
                    .issue_token(token_request(&task, "db.staging"))
                    .await
                    .unwrap();
            }
        }
    };
    tokio::join!(
        issue(creds_as(&a, "agent").await),
        issue(creds_as(&b, "agent").await)
    );
    b.stop().await;
    let dir = a.stop().await;
    let in_files = crate::common::line_count(&dir.path().join("audit.jsonl"))
        + crate::common::line_count(&b_file);
    assert!(in_files >= 50, "{in_files}");

    let (code, out, err) = crate::common::run(&["audit", "export", "--redis-url", &url]);
    assert_eq!(code, 0, "{err}");
    let exported = dir.path().join("stream.jsonl");
    std::fs::write(&exported, &out).unwrap();
    let (code, report, _) =
        crate::common::run(&["--json", "audit", "verify", exported.to_str().unwrap()]);
    assert_eq!(code, 0, "{report}");
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(report["intact"], true);
    assert_eq!(report["anchor"], taskcred::audit::GENESIS);
    // Every replica's every event is in the one stream.
    assert_eq!(report["lines"], in_files, "{report}");
}

/// Force-revoking an agent that holds more leases than one answer can name: the lock answers
/// with complete counts and the first 1,000 ids, and the audit log names every credential in
/// bounded lines.
#[tokio::test]
async fn locking_a_busy_agent_answers_counts_and_audits_every_credential() {
    // Issuance is fast enough now that 1,100 calls in a row also meet the per-identity RPC
    // rate: both budgets off, this test is about the lock.
    let b = Broker::start_with_env(vec![
        ("TASKCRED_LIMITS__ISSUANCE_PER_SECOND".into(), "0".into()),
        ("TASKCRED_LIMITS__RPC_PER_SECOND".into(), "0".into()),
    ])
    .await;
    let task = approved_task(&b, &[("env", "staging")], None).await;
    let mut agent = creds_as(&b, "agent").await;
    for _ in 0..1100 {
        agent
            .issue_token(token_request(&task.id, "db.staging"))
            .await
            .unwrap();
    }
    let r = crate::common::flows::admin_as(&b, "operator")
        .await
        .lock_agent(pb::LockAgentRequest {
            agent: "spiffe://taskcred.dev/agent/demo".into(),
            reason: "key leaked".into(),
            duration: None,
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.revoked_lease_count, 1100);
    assert_eq!(r.revoked_leases.len(), 1000);
    assert_eq!(r.revoked_task_count, 1);
    let dir = b.stop().await;
    let log = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    let parts: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l["action"] == "LockAgent" && l["details"]["revoked_credentials"].is_array())
        .collect();
    assert_eq!(parts.len(), 2);
    let listed: usize = parts
        .iter()
        .map(|p| {
            p["details"]["revoked_credentials"]
                .as_array()
                .unwrap()
                .len()
        })
        .sum();
    assert_eq!(listed, 1100);
}

/// While Redis is away the shared stream's writes fail, are counted and retried; once it is
/// back the stream catches up and holds every event, still one intact chain.
#[tokio::test]
async fn the_audit_stream_catches_up_after_redis_returns() {
    let mut redis = crate::common::RedisServer::start();
    let url = redis.url();
    let mut env = crate::common::redis_env(&url);
    env.push(("TASKCRED_AUDIT__REDIS_STREAM".into(), "true".into()));
    let b = Broker::start_with_env(env).await;
    let task = approved_task(&b, &[("env", "staging")], None).await;
    creds_as(&b, "agent")
        .await
        .issue_token(token_request(&task.id, "db.staging"))
        .await
        .unwrap();

    redis.stop();
    // Audited without the store: policy reloads.
    let mut admin = crate::common::flows::admin_as(&b, "operator").await;
    for _ in 0..3 {
        admin
            .reload_policy(pb::ReloadPolicyRequest {})
            .await
            .unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let (_, m) = b.http_get("/metrics").await;
        if m.lines().any(|l| {
            l.starts_with("taskcred_audit_write_failures_total{sink=\"redis\"}")
                && !l.ends_with(" 0")
        }) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no failure counted:\n{m}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    redis.restart();
    // The writer retries with a backoff of at most 5 s; stopping drains what is left.
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    let dir = b.stop().await;
    let in_file = std::fs::read_to_string(dir.path().join("audit.jsonl"))
        .unwrap()
        .lines()
        .count();
    let (code, out, err) = crate::common::run(&["audit", "export", "--redis-url", &url]);
    assert_eq!(code, 0, "{err}");
    let exported = dir.path().join("stream.jsonl");
    std::fs::write(&exported, &out).unwrap();
    let (code, report, _) =
        crate::common::run(&["--json", "audit", "verify", exported.to_str().unwrap()]);
    assert_eq!(code, 0, "{report}");
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(report["lines"], in_file, "{report}");
    assert!(out.contains("ReloadPolicy"));
}
