//! The record under faults: what the broker tells its callers and writes in its audit log is
//! what happened, whatever fails under it. A real `redis-server` is hung (SIGSTOP), killed and
//! restarted, emptied and cut off (`CLIENT KILL`); a replica is killed inside a lock; the audit
//! file hits its size limit. Every answer is OK or UNAVAILABLE (saying when its outcome is
//! unknown), a retry with the same request id has one effect, and no acknowledged lease is lost
//! with the production Redis setting (`appendfsync always`).
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::common::flows::{
    AGENT, admin_as, approved_task, creds_as, introspect, tasks_as, token_request,
};
use crate::common::{Broker, RedisServer, audit_lines, redis_env};
use taskcred::api::pb;
use tonic::Code;

fn outcome_unknown(s: &tonic::Status) -> bool {
    s.metadata()
        .get("taskcred-outcome")
        .is_some_and(|v| v == "unknown")
}

fn with_request_id(task: &str, audience: &str, id: &str) -> pb::IssueTokenRequest {
    pb::IssueTokenRequest {
        request_id: id.into(),
        ..token_request(task, audience)
    }
}

/// Every lease of `task`, page by page.
async fn leases_of(b: &Broker, task: &str) -> Vec<pb::Lease> {
    let mut admin = admin_as(b, "operator").await;
    let (mut all, mut token) = (Vec::new(), String::new());
    loop {
        let page = admin
            .list_leases(pb::ListLeasesRequest {
                task_id: task.into(),
                page_size: 500,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        all.extend(page.leases);
        if page.next_page_token.is_empty() {
            return all;
        }
        token = page.next_page_token;
    }
}

fn csr() -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec()
}

/// A retry under the same request id has one effect: the same token (lease, jti) again, never a
/// second lease; a certificate is not signed twice (the retry names the lease to renew); a
/// completion retried answers OK; a different request under a used id is refused; what is
/// handed out (or locked) is audited with its request id.
async fn retries_on(b: &Broker) {
    let task = approved_task(b, &[], None).await;
    let mut agent = creds_as(b, "agent").await;
    let first = agent
        .issue_token(with_request_id(&task.id, "db.staging", "deploy-42"))
        .await
        .unwrap()
        .into_inner();
    let again = agent
        .issue_token(with_request_id(&task.id, "db.staging", "deploy-42"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (&again.lease_id, &again.jti, again.expires_at),
        (&first.lease_id, &first.jti, first.expires_at)
    );
    assert!(introspect(b, &again.token).await.active);
    crate::common::flows::verify_independently(b, &again.token, "db.staging").await;
    // Another request under the same id, and a malformed id: refused.
    let other = agent
        .issue_token(with_request_id(
            &task.id,
            "https://vault.example.com",
            "deploy-42",
        ))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::InvalidArgument, "{other:?}");
    assert!(other.message().contains("request_id"), "{other:?}");
    let bad = agent
        .issue_token(with_request_id(&task.id, "db.staging", "no spaces"))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    // Without an id, each call is a new credential.
    let plain = agent
        .issue_token(token_request(&task.id, "db.staging"))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(plain.lease_id, first.lease_id);

    // A certificate: issued once; the retry is told which lease to renew.
    let cert = |id: &str| pb::IssueCertificateRequest {
        task_id: task.id.clone(),
        csr: csr(),
        request_id: id.into(),
        ..Default::default()
    };
    let issued = agent
        .issue_certificate(cert("cert-1"))
        .await
        .unwrap()
        .into_inner();
    let retried = agent.issue_certificate(cert("cert-1")).await.unwrap_err();
    assert_eq!(retried.code(), Code::FailedPrecondition, "{retried:?}");
    assert!(retried.message().contains(&issued.lease_id), "{retried:?}");
    // Another caller's retry under the same id is its own request.
    let leases = leases_of(b, &task.id).await;
    assert_eq!(leases.len(), 3, "{leases:?}");

    // Completion: the retry answers OK with the same count; a replay without the id does not.
    let done = |id: &str| pb::CompleteTaskRequest {
        task_id: task.id.clone(),
        request_id: id.into(),
        ..Default::default()
    };
    let mut tasks = tasks_as(b, "agent").await;
    let ended = tasks
        .complete_task(done("end-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ended.revoked_leases, 3);
    let ended_again = tasks
        .complete_task(done("end-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ended_again.revoked_leases, 3);
    assert_eq!(
        ended_again.task.unwrap().state,
        pb::TaskState::Completed as i32
    );
    let replay = tasks.complete_task(done("")).await.unwrap_err();
    assert_eq!(replay.code(), Code::FailedPrecondition, "{replay:?}");
    let other = tasks.complete_task(done("end-2")).await.unwrap_err();
    assert_eq!(other.code(), Code::FailedPrecondition, "{other:?}");
    // A retried token request of an ended task: refused (the task ended), nothing issued.
    let late = agent
        .issue_token(with_request_id(&task.id, "db.staging", "deploy-42"))
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition, "{late:?}");

    // A lock carries its request id into the audit log.
    admin_as(b, "operator")
        .await
        .lock_agent(pb::LockAgentRequest {
            agent: AGENT.into(),
            reason: "incident 7".into(),
            request_id: "lock-7".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    let lines = audit_lines(&b.path("audit.jsonl"));
    let with_id = |action: &str, id: &str| {
        lines
            .iter()
            .filter(|l| l["action"] == action && l["details"]["request_id"] == id)
            .count()
    };
    assert_eq!(
        with_id("IssueToken", "deploy-42"),
        2,
        "issued, and answered again"
    );
    let answered_again = lines
        .iter()
        .filter(|l| l["details"]["answered_again"] == true)
        .count();
    assert_eq!(answered_again, 2, "the token and the completion");
    assert_eq!(with_id("CompleteTask", "end-1"), 2);
    assert_eq!(with_id("LockAgent", "lock-7"), 1);
}

#[tokio::test]
async fn retried_requests_have_one_effect_on_the_embedded_store() {
    let b = Broker::start().await;
    retries_on(&b).await;
    b.stop().await;
}

#[tokio::test]
async fn retried_requests_have_one_effect_on_redis() {
    let redis = RedisServer::start();
    let b = Broker::start_on_redis(&redis.url()).await;
    retries_on(&b).await;
    b.stop().await;
}

/// Redis hung (SIGSTOP: connections open, no answer): every call answers UNAVAILABLE within
/// the store's timeout, reads fail closed (never "inactive" by default), `/readyz` answers 503
/// within its probe's second; everything works again once Redis goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_answers_unavailable_and_recovers() {
    let redis = RedisServer::start();
    let b = Broker::start_on_redis(&redis.url()).await;
    let task = approved_task(&b, &[], None).await;
    let mut agent = creds_as(&b, "agent").await;
    let before = agent
        .issue_token(token_request(&task.id, "db.staging"))
        .await
        .unwrap()
        .into_inner();

    redis.signal("STOP");
    let started = Instant::now();
    let hung = agent
        .issue_token(token_request(&task.id, "db.staging"))
        .await
        .unwrap_err();
    assert_eq!(hung.code(), Code::Unavailable, "{hung:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let ready = Instant::now();
    let (status, _) = b.http_get("/readyz").await;
    assert_eq!(status, 503);
    assert!(
        ready.elapsed() < Duration::from_secs(1),
        "{:?}",
        ready.elapsed()
    );
    let intro = creds_as(&b, "approver")
        .await
        .introspect(pb::IntrospectRequest {
            token: before.token.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(intro.code(), Code::Unavailable, "{intro:?}");

    redis.signal("CONT");
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        match agent
            .issue_token(token_request(&task.id, "db.staging"))
            .await
        {
            Ok(r) => break r.into_inner(),
            Err(s) => {
                assert_eq!(s.code(), Code::Unavailable, "{s:?}");
                assert!(Instant::now() < deadline, "not back: {s:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert!(introspect(&b, &after.token).await.active);
    assert!(introspect(&b, &before.token).await.active);
    let (status, _) = b.http_get("/readyz").await;
    assert_eq!(status, 200);
    b.stop().await;
}

/// Redis that reads but does not write for a while (`CLIENT PAUSE ... WRITE`: a stalled
/// primary, a long fsync): a change sent then may be applied later, so the answer says its
/// outcome is unknown (UNAVAILABLE, `taskcred-outcome: unknown`) and the audit log records it
/// as such; the retries under the same request ids have one effect each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_whose_outcome_is_unknown_say_so_and_their_retries_have_one_effect() {
    let redis = Arc::new(RedisServer::start());
    let b = Broker::start_on_redis(&redis.url()).await;
    let task = approved_task(&b, &[], None).await;
    let mut agent = creds_as(&b, "agent").await;
    agent
        .issue_token(token_request(&task.id, "db.staging"))
        .await
        .unwrap();

    redis.command(&["CLIENT", "PAUSE", "3500", "WRITE"]);
    let hung = agent
        .issue_token(with_request_id(&task.id, "db.staging", "paused-1"))
        .await
        .unwrap_err();
    assert_eq!(hung.code(), Code::Unavailable, "{hung:?}");
    assert!(outcome_unknown(&hung), "{hung:?}");
    assert!(hung.message().contains("request_id"), "{hung:?}");
    let done = tasks_as(&b, "agent")
        .await
        .complete_task(pb::CompleteTaskRequest {
            task_id: task.id.clone(),
            request_id: "end-paused".into(),
            ..Default::default()
        })
        .await;
    // The pause may end while the completion waits: then it succeeds.
    if let Err(done) = &done {
        assert_eq!(done.code(), Code::Unavailable, "{done:?}");
        assert!(outcome_unknown(done), "{done:?}");
    }
    tokio::time::sleep(Duration::from_millis(3600)).await;

    // The retries: the token once (or refused, the task having ended), the completion OK.
    let retried = agent
        .issue_token(with_request_id(&task.id, "db.staging", "paused-1"))
        .await;
    let ended = tasks_as(&b, "agent")
        .await
        .complete_task(pb::CompleteTaskRequest {
            task_id: task.id.clone(),
            request_id: "end-paused".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ended.task.unwrap().state, pb::TaskState::Completed as i32);
    let leases = leases_of(&b, &task.id).await;
    assert!(leases.len() <= 2, "one lease per request: {leases:?}");
    if let Ok(r) = retried {
        assert!(leases.iter().any(|l| l.lease_id == r.get_ref().lease_id));
    }
    let lines = audit_lines(&b.path("audit.jsonl"));
    let unknown: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["decision"] == "unknown")
        .collect();
    assert!(
        unknown.iter().any(|l| l["action"] == "IssueToken"),
        "{unknown:?}"
    );
    b.stop().await;
}

/// Issues tokens from `workers` clients until `stop`, keeping every acknowledged one.
fn issue_until(
    b: &Broker,
    clients: Vec<
        taskcred::api::pb::credential_service_client::CredentialServiceClient<
            tonic::transport::Channel,
        >,
    >,
    task: &str,
    stop: Instant,
) -> tokio::task::JoinSet<(Vec<pb::IssueTokenResponse>, Vec<Code>)> {
    let _ = b;
    let mut set = tokio::task::JoinSet::new();
    for mut c in clients {
        let task = task.to_owned();
        set.spawn(async move {
            let (mut ok, mut errors) = (Vec::new(), Vec::new());
            while Instant::now() < stop {
                match c.issue_token(token_request(&task, "db.staging")).await {
                    Ok(r) => ok.push(r.into_inner()),
                    Err(s) => {
                        errors.push(s.code());
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            (ok, errors)
        });
    }
    set
}

/// Redis killed (SIGKILL) and restarted twice under issuance load, with the production setting
/// `appendfsync always`: every answer is OK or UNAVAILABLE, and every token that was returned
/// has its lease after the restarts (introspection active, listed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_lease_is_lost_when_redis_is_killed() {
    let mut redis = RedisServer::start();
    let mut env = redis_env(&redis.url());
    env.push(("TASKCRED_LIMITS__ISSUANCE_PER_SECOND".into(), "0".into()));
    env.push(("TASKCRED_LIMITS__RPC_PER_SECOND".into(), "0".into()));
    let b = Broker::start_with_env(env).await;
    let task = approved_task(&b, &[], Some(600)).await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(creds_as(&b, "agent").await);
    }
    let stop = Instant::now() + Duration::from_secs(4);
    let mut load = issue_until(&b, clients, &task.id, stop);
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(900)).await;
        redis.restart();
    }
    let (mut ok, mut errors) = (Vec::new(), Vec::new());
    while let Some(r) = load.join_next().await {
        let (o, e) = r.unwrap();
        ok.extend(o);
        errors.extend(e);
    }
    assert!(ok.len() > 20, "{} issued", ok.len());
    assert!(errors.iter().all(|c| *c == Code::Unavailable), "{errors:?}");
    let listed: HashSet<String> = leases_of(&b, &task.id)
        .await
        .into_iter()
        .map(|l| l.lease_id)
        .collect();
    let lost: Vec<&str> = ok
        .iter()
        .filter(|r| !listed.contains(&r.lease_id))
        .map(|r| r.lease_id.as_str())
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged leases lost: {lost:?}",
        lost.len(),
        ok.len()
    );
    for r in ok.iter().step_by((ok.len() / 20).max(1)) {
        assert!(introspect(&b, &r.token).await.active, "{}", r.lease_id);
    }
    eprintln!(
        "{} issued, {} refused UNAVAILABLE, none lost over two Redis kills",
        ok.len(),
        errors.len()
    );
    b.stop().await;
}

/// Every connection of the broker cut by Redis (`CLIENT KILL TYPE normal`), again and again
/// under load: answers are OK or UNAVAILABLE, and the broker reconnects by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connections_answer_unavailable_and_recover() {
    let redis = Arc::new(RedisServer::start());
    let mut env = redis_env(&redis.url());
    env.push(("TASKCRED_LIMITS__ISSUANCE_PER_SECOND".into(), "0".into()));
    env.push(("TASKCRED_LIMITS__RPC_PER_SECOND".into(), "0".into()));
    let b = Broker::start_with_env(env).await;
    let task = approved_task(&b, &[], Some(600)).await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(creds_as(&b, "agent").await);
    }
    let stop = Instant::now() + Duration::from_secs(3);
    let mut load = issue_until(&b, clients, &task.id, stop);
    let mut cuts = 0;
    while Instant::now() < stop {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let r = Arc::clone(&redis);
        tokio::task::spawn_blocking(move || r.command(&["CLIENT", "KILL", "TYPE", "normal"]))
            .await
            .unwrap();
        cuts += 1;
    }
    let (mut ok, mut errors) = (Vec::new(), Vec::new());
    while let Some(r) = load.join_next().await {
        let (o, e) = r.unwrap();
        ok.extend(o);
        errors.extend(e);
    }
    assert!(errors.iter().all(|c| *c == Code::Unavailable), "{errors:?}");
    assert!(!ok.is_empty());
    // Back at once after the last cut.
    let mut agent = creds_as(&b, "agent").await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let after = loop {
        match agent
            .issue_token(token_request(&task.id, "db.staging"))
            .await
        {
            Ok(r) => break r.into_inner(),
            Err(s) => {
                assert_eq!(s.code(), Code::Unavailable, "{s:?}");
                assert!(Instant::now() < deadline, "not back: {s:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert!(introspect(&b, &after.token).await.active);
    let listed: HashSet<String> = leases_of(&b, &task.id)
        .await
        .into_iter()
        .map(|l| l.lease_id)
        .collect();
    assert!(ok.iter().all(|r| listed.contains(&r.lease_id)));
    eprintln!(
        "{cuts} cuts: {} issued, {} UNAVAILABLE",
        ok.len(),
        errors.len()
    );
    b.stop().await;
}

/// The store's epoch marker, as the broker wrote it.
fn epoch_marker(redis: &RedisServer) -> serde_json::Value {
    match redis.command(&["GET", "tc:epoch"]) {
        redis::Value::BulkString(v) => serde_json::from_slice(&v).unwrap(),
        other => panic!("no epoch marker: {other:?}"),
    }
}

/// A Redis that comes back empty, and a token asked at once (before any periodic epoch check):
/// the issuance itself finds the epoch marker gone, starts the new epoch, then issues; the
/// token is of the new epoch (issued at or after its start), so verifiers accept it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_issued_right_after_a_reset_is_of_the_new_epoch() {
    let mut redis = RedisServer::start();
    let b = Broker::start_on_redis(&redis.url()).await;
    // The broker makes the marker as it starts serving.
    approved_task(&b, &[], None).await;
    let before = epoch_marker(&redis);
    redis.restart_empty();
    // The task is made on the empty store; the token follows at once.
    let deadline = Instant::now() + Duration::from_secs(5);
    let task = loop {
        match tasks_as(&b, "requester")
            .await
            .request_task(pb::RequestTaskRequest {
                executor: AGENT.into(),
                purpose: "after the reset".into(),
                grants: vec![pb::Grant {
                    audience: "db.staging".into(),
                    actions: vec!["read".into()],
                }],
                deadline: crate::common::flows::secs(600),
                ..Default::default()
            })
            .await
        {
            Ok(t) => break t.into_inner(),
            Err(s) => {
                assert_eq!(s.code(), Code::Unavailable, "{s:?}");
                assert!(Instant::now() < deadline, "{s:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(task.state, pb::TaskState::Approved as i32, "{task:?}");
    let issued = creds_as(&b, "agent")
        .await
        .issue_token(token_request(&task.id, "db.staging"))
        .await
        .unwrap()
        .into_inner();
    let after = epoch_marker(&redis);
    assert_ne!(after["id"], before["id"]);
    let started = after["started_at"]["secs_since_epoch"].as_u64().unwrap();
    let iat = SystemTime::try_from(issued.expires_at.unwrap()).unwrap()
        - Duration::from_secs(u64::try_from(issued.ttl.unwrap().seconds).unwrap());
    let iat = iat
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // As verifiers compare them (whole seconds): not before the epoch.
    assert!(
        iat >= started,
        "iat {iat} before the epoch's start {started}"
    );
    assert!(introspect(&b, &issued.token).await.active);
    b.stop().await;
}

/// The `CredentialRevoked` lines of the audit files in `dir`: lease id and log cursor.
fn revoked_lines(files: &[&Path]) -> Vec<(String, String)> {
    files
        .iter()
        .flat_map(|f| audit_lines(f))
        .filter(|l| l["action"] == "CredentialRevoked")
        .map(|l| {
            (
                l["details"]["lease_id"].as_str().unwrap().to_owned(),
                l["details"]["cursor"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Issue 17, point 2: a replica that dies right after the store step of a completion leaves
/// no revocation unaccounted: the revocation log is audited (a `CredentialRevoked` line per
/// entry) by whichever replica holds the auditor's claim, once across replicas; a replica that
/// dies mid-batch leaves lines the next auditor writes again, with the same cursor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_revocation_is_audited_once_though_its_replica_dies() {
    let redis = RedisServer::start();
    let logs = tempfile::tempdir().unwrap();
    let (a_log, b_log) = (logs.path().join("a.jsonl"), logs.path().join("b.jsonl"));
    let unlimited = [
        ("TASKCRED_LIMITS__ISSUANCE_PER_SECOND", "0"),
        ("TASKCRED_LIMITS__RPC_PER_SECOND", "0"),
    ];
    let mut env = redis_env(&redis.url());
    env.push((
        "TASKCRED_AUDIT__PATH".into(),
        b_log.to_str().unwrap().to_owned(),
    ));
    env.extend(
        unlimited
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    let b = Broker::start_with_env(env).await;
    let dev = b.dir.path().to_str().unwrap().to_owned();
    let mut a_env = vec![("TASKCRED_AUDIT__PATH", a_log.to_str().unwrap())];
    a_env.extend(unlimited);
    let url = redis.url();
    let a = crate::common::ServeProcess::start(
        &[
            "serve",
            "--dev",
            "--dev-dir",
            &dev,
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
            "--redis",
            &url,
        ],
        &a_env,
    );
    let agent_id = b.dev_identity("agent");
    let on_a = b.channel_to(a.grpc, Some(&agent_id)).await;

    // Thirty leases through replica A, ten through B.
    let task = approved_task(&b, &[], Some(600)).await;
    let other = approved_task(&b, &[], Some(600)).await;
    let mut creds_a =
        taskcred::api::pb::credential_service_client::CredentialServiceClient::new(on_a.clone());
    for _ in 0..30 {
        creds_a
            .issue_token(token_request(&task.id, "db.staging"))
            .await
            .unwrap();
    }
    let mut creds_b = creds_as(&b, "agent").await;
    for _ in 0..10 {
        creds_b
            .issue_token(token_request(&other.id, "db.staging"))
            .await
            .unwrap();
    }
    // The completion through A, and A killed at once: its own lines may never be written.
    let done = taskcred::api::pb::task_service_client::TaskServiceClient::new(on_a)
        .complete_task(pb::CompleteTaskRequest {
            task_id: task.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    a.kill();
    assert_eq!(done.revoked_leases, 30);
    // A lock through B.
    admin_as(&b, "operator")
        .await
        .lock_agent(pb::LockAgentRequest {
            agent: AGENT.into(),
            reason: "incident 9".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    let mut revoked: HashSet<String> = HashSet::new();
    for t in [&task.id, &other.id] {
        for l in leases_of(&b, t).await {
            assert_eq!(l.state, "revoked", "{l:?}");
            revoked.insert(l.lease_id);
        }
    }
    assert_eq!(revoked.len(), 40);
    // Within the auditor's takeover time (its claim lapses 6 s after A died).
    let deadline = Instant::now() + Duration::from_secs(20);
    let lines = loop {
        let lines = revoked_lines(&[&a_log, &b_log]);
        let seen: HashSet<&str> = lines.iter().map(|(l, _)| l.as_str()).collect();
        if revoked.iter().all(|l| seen.contains(l.as_str())) {
            break lines;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} revocations audited",
            revoked.iter().filter(|l| seen.contains(l.as_str())).count(),
            revoked.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // One entry each; a line written twice (an auditor that died mid-batch) has its cursor.
    let mut cursors: std::collections::HashMap<&str, HashSet<&str>> = Default::default();
    for (lease, cursor) in &lines {
        cursors.entry(lease).or_default().insert(cursor);
    }
    for (lease, c) in &cursors {
        assert_eq!(c.len(), 1, "lease {lease} revoked under cursors {c:?}");
    }
    assert_eq!(cursors.len(), 40);
    // The chain of each file still verifies (A's may end in a torn line: it was killed).
    let (code, out, err) = crate::common::run(&["audit", "verify", b_log.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    b.stop().await;
}

/// Issue 17, point 5, and a replica killed inside a lock: the lock is one short step that holds
/// at once (nothing more is issued, and introspection refuses even before the sweep reaches a
/// lease); its leases are revoked in bounded steps that walk only the agent's live leases; the
/// replica that locked is killed during its sweep, and another replica's reaper finishes it:
/// every lease revoked once, each revocation logged once and audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_inside_a_lock_leaves_nothing_live() {
    use taskcred::store::{LeaseStore as _, TaskStore as _};
    let redis = RedisServer::start();
    let logs = tempfile::tempdir().unwrap();
    let (a_log, b_log) = (logs.path().join("a.jsonl"), logs.path().join("b.jsonl"));
    let mut env = redis_env(&redis.url());
    env.push((
        "TASKCRED_AUDIT__PATH".into(),
        b_log.to_str().unwrap().to_owned(),
    ));
    let b = Broker::start_with_env(env).await;
    let dev = b.dir.path().to_str().unwrap().to_owned();
    let url = redis.url();
    let a = crate::common::ServeProcess::start(
        &[
            "serve",
            "--dev",
            "--dev-dir",
            &dev,
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
            "--redis",
            &url,
        ],
        &[("TASKCRED_AUDIT__PATH", a_log.to_str().unwrap())],
    );
    // A token through the brokers, and 4,000 more live leases (and 4,000 ended ones: history
    // the sweep never walks) written straight into the store.
    let task = approved_task(&b, &[], Some(600)).await;
    let token = creds_as(&b, "agent")
        .await
        .issue_token(token_request(&task.id, "db.staging"))
        .await
        .unwrap()
        .into_inner();
    let store = taskcred::store::redis::RedisStore::new(&url).unwrap();
    let now = SystemTime::now();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let t = crate::store::conformance::sample_task(
            AGENT,
            "spiffe://taskcred.dev/human/requester",
            0,
        );
        store.create_task(&t).await.unwrap();
        tasks.push(t);
    }
    let mut writes = tokio::task::JoinSet::new();
    let store = Arc::new(store);
    for (i, t) in tasks.iter().enumerate() {
        let (store, t) = (Arc::clone(&store), t.clone());
        writes.spawn(async move {
            for _ in 0..1000 {
                let l = crate::store::conformance::sample_lease(&t, AGENT);
                store.issue_lease(&l, None, now).await.unwrap();
            }
            // Half the tasks end: their leases are history.
            if i % 2 == 1 {
                let done: taskcred::store::TaskChange =
                    Arc::new(move |task: &mut taskcred::task::Task| {
                        task.complete(
                            &taskcred::identity::WorkloadId::parse(AGENT).unwrap(),
                            taskcred::task::Outcome::Succeeded,
                            now,
                        )
                    });
                store
                    .end_task(&t.id, done, Duration::from_secs(3600))
                    .await
                    .unwrap();
            }
        });
    }
    writes.join_all().await;
    let live_before = store.live_leases().await.unwrap();
    let log_before = redis.log_len();

    // The lock through A; A killed as soon as its first step is in the store.
    let lock_key = format!("tc:{{a:{AGENT}}}:lock");
    let mut admin_a = taskcred::api::pb::admin_service_client::AdminServiceClient::new(
        b.channel_to(a.grpc, Some(&b.dev_identity("operator")))
            .await,
    );
    let locking = tokio::spawn(async move {
        admin_a
            .lock_agent(pb::LockAgentRequest {
                agent: AGENT.into(),
                reason: "incident 11".into(),
                ..Default::default()
            })
            .await
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis.command(&["EXISTS", &lock_key]) != redis::Value::Int(1) {
        assert!(Instant::now() < deadline, "no lock");
        std::thread::sleep(Duration::from_millis(1));
    }
    a.kill();
    let _ = locking.await;

    // The lock holds at once, whatever the sweep reached.
    let refused = creds_as(&b, "agent")
        .await
        .issue_token(token_request(&task.id, "db.staging"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(!introspect(&b, &token.token).await.active);

    // B's reaper finishes the sweep once the lock is older than its grace; every live lease is
    // revoked exactly once.
    let deadline = Instant::now()
        + taskcred::broker::LOCK_SWEEP_GRACE
        + taskcred::broker::LOCK_SWEEP_EVERY
        + Duration::from_secs(30);
    let sweeping = |set: &str| redis.command(&["SCARD", &format!("tc:{{a:{AGENT}}}:{set}")]);
    while sweeping("open") != redis::Value::Int(0) || sweeping("sweep") != redis::Value::Int(0) {
        assert!(Instant::now() < deadline, "the sweep was not finished");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let live_leases = live_before - store.live_leases().await.unwrap();
    assert_eq!(
        live_leases, 4001,
        "every live lease of the agent, none of the others'"
    );
    for t in &tasks {
        for l in store.task_leases(&t.id).await.unwrap() {
            assert_ne!(l.state, taskcred::lease::LeaseState::Active, "{l:?}");
        }
    }
    let logged = redis.log_len() - log_before;
    assert_eq!(logged, 4001, "each revocation logged once");
    // And audited, by whichever replica holds the auditor's claim.
    let deadline = Instant::now() + Duration::from_secs(25);
    loop {
        let lines = revoked_lines(&[&a_log, &b_log]);
        let leases: HashSet<&str> = lines.iter().map(|(l, _)| l.as_str()).collect();
        if leases.len() >= 4001 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of 4001 audited",
            leases.len()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    b.stop().await;
}

/// Issue 17, point 1, on a real file: the audit log hits its size limit (`RLIMIT_FSIZE`, as a
/// full disk would stop it) under a broker on Redis. From then on every audited decision is
/// refused UNAVAILABLE (issuance, task requests, locks), the file is left whole (`audit verify`
/// passes: no half line), and the credentials whose lines failed were revoked. Restarted with
/// room, the broker goes on with the same chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_log_that_runs_out_of_room_stays_whole_and_refuses() {
    let redis = RedisServer::start();
    let dev = tempfile::tempdir().unwrap();
    let dev_s = dev.path().to_str().unwrap().to_owned();
    let (code, out, err) = crate::common::run(&["dev", "init", "--dir", &dev_s]);
    assert_eq!(code, 0, "{out}{err}");
    let log = dev.path().join("audit.jsonl");
    let url = redis.url();
    let serve = |limited: bool| {
        let mut line = String::new();
        if limited {
            // 24 KiB, and SIGXFSZ ignored: writes past it fail with EFBIG.
            line.push_str("ulimit -f 24; trap '' XFSZ; ");
        }
        line.push_str("exec \"$0\" \"$@\"");
        crate::common::ServeProcess::start_program(
            "bash",
            &[
                "-c",
                &line,
                crate::common::BIN,
                "serve",
                "--dev",
                "--dev-dir",
                &dev_s,
                "--grpc-addr",
                "127.0.0.1:0",
                "--http-addr",
                "127.0.0.1:0",
                "--redis",
                &url,
            ],
            &[
                ("TASKCRED_AUDIT__PATH", log.to_str().unwrap()),
                ("TASKCRED_LIMITS__ISSUANCE_PER_SECOND", "0"),
            ],
        )
    };
    let s = serve(true);
    let channel = |name: &str| {
        let id = crate::common::dev_identity_in(dev.path(), name);
        let grpc = s.grpc;
        let dir = dev.path().to_owned();
        async move { crate::common::channel_at(grpc, &dir, Some(&id)).await }
    };
    let mut tasks =
        taskcred::api::pb::task_service_client::TaskServiceClient::new(channel("requester").await);
    let request = || pb::RequestTaskRequest {
        executor: AGENT.into(),
        purpose: "fill the audit log".into(),
        grants: vec![pb::Grant {
            audience: "db.staging".into(),
            actions: vec!["read".into()],
        }],
        deadline: crate::common::flows::secs(600),
        ..Default::default()
    };
    let task = tasks.request_task(request()).await.unwrap().into_inner();
    let mut agent = taskcred::api::pb::credential_service_client::CredentialServiceClient::new(
        channel("agent").await,
    );
    let mut issued = Vec::new();
    let refused = loop {
        match agent
            .issue_token(token_request(&task.id, "db.staging"))
            .await
        {
            Ok(r) => issued.push(r.into_inner()),
            Err(s) => break s,
        }
        assert!(issued.len() < 1000, "the audit log never filled");
    };
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("audit log"), "{refused:?}");
    // Every audited decision is refused while the log cannot be written (a shorter line may
    // still fit in what is left: then it is written whole, and the next is refused).
    let mut fitted = 0;
    let t = loop {
        match tasks.request_task(request()).await {
            Ok(_) => fitted += 1,
            Err(s) => break s,
        }
        assert!(fitted < 100);
    };
    assert_eq!(t.code(), Code::Unavailable, "{t:?}");
    let mut admin =
        taskcred::api::pb::admin_service_client::AdminServiceClient::new(channel("operator").await);
    let l = loop {
        match admin
            .lock_agent(pb::LockAgentRequest {
                agent: "spiffe://taskcred.dev/agent/other".into(),
                reason: "while the log is full".into(),
                ..Default::default()
            })
            .await
        {
            Ok(_) => fitted += 1,
            Err(s) => break s,
        }
        assert!(fitted < 100);
    };
    assert_eq!(l.code(), Code::Unavailable, "{l:?}");
    // The file is whole: every line ends, the chain verifies.
    let text = std::fs::read(&log).unwrap();
    assert!(text.ends_with(b"\n"));
    let (code, out, err) = crate::common::run(&["audit", "verify", log.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    s.kill();

    // With room again: the same chain goes on; the refused credential's lease was revoked.
    let s = serve(false);
    let mut agent = taskcred::api::pb::credential_service_client::CredentialServiceClient::new(
        crate::common::channel_at(
            s.grpc,
            dev.path(),
            Some(&crate::common::dev_identity_in(dev.path(), "agent")),
        )
        .await,
    );
    agent
        .issue_token(token_request(&task.id, "db.staging"))
        .await
        .unwrap();
    let leases = taskcred::api::pb::admin_service_client::AdminServiceClient::new(
        crate::common::channel_at(
            s.grpc,
            dev.path(),
            Some(&crate::common::dev_identity_in(dev.path(), "operator")),
        )
        .await,
    )
    .list_leases(pb::ListLeasesRequest {
        task_id: task.id.clone(),
        page_size: 500,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .leases;
    let issued: HashSet<&str> = issued.iter().map(|r| r.lease_id.as_str()).collect();
    let unaudited: Vec<&pb::Lease> = leases
        .iter()
        .filter(|l| !issued.contains(l.lease_id.as_str()) && l.state != "active")
        .collect();
    assert!(
        unaudited
            .iter()
            .any(|l| l.reason.contains("audit log could not be written")),
        "{leases:?}"
    );
    // Active: what was handed out before, and the token after the restart; nothing else.
    let active = leases.iter().filter(|l| l.state == "active").count();
    assert_eq!(active, issued.len() + 1, "{leases:?}");
    let (code, out, err) = crate::common::run(&["audit", "verify", log.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    s.terminate();
}

/// Issue 17, point 8: a Redis that answers but refuses writes (out of memory under `noeviction`,
/// as `maxmemory` reached) is no ready store: `/readyz` says so, changes answer UNAVAILABLE
/// (Redis refused them: nothing was changed, and the answer says so, not "unknown"), and all is
/// well again once it takes writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_refuses_writes_is_not_ready() {
    let redis = RedisServer::start();
    let b = Broker::start_on_redis(&redis.url()).await;
    let task = approved_task(&b, &[], None).await;
    let (status, body) = b.http_get("/readyz").await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    redis.command(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    redis.command(&["CONFIG", "SET", "maxmemory", "1"]);
    let (status, body) = b.http_get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("refuses writes"), "{body}");
    let refused = creds_as(&b, "agent")
        .await
        .issue_token(token_request(&task.id, "db.staging"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(!outcome_unknown(&refused), "{refused:?}");
    redis.command(&["CONFIG", "SET", "maxmemory", "0"]);
    let (status, _) = b.http_get("/readyz").await;
    assert_eq!(status, 200);
    creds_as(&b, "agent")
        .await
        .issue_token(token_request(&task.id, "db.staging"))
        .await
        .unwrap();
    b.stop().await;
}
