//! Revocations reaching verifiers, end to end: the watch stream (current set, live events,
//! audience filter, resuming after a cursor, heartbeats) on both stores; two replicas on one
//! Redis (issue on A, lock on B: inactive on A and streamed by A's watch within a second); and
//! the same with two `taskcred serve` processes and `taskcred revocations watch`.

use std::time::{Duration, Instant};

use crate::common::flows::{
    AGENT, approved_task, creds_as, introspect, issue_as_agent, lock, unlock,
};
use crate::common::{Broker, RedisServer, ServeProcess, redis_env, run_as};
use taskcred::api::pb;
use taskcred::api::pb::revocation_event::Event;
use taskcred::api::pb::revocation_service_client::RevocationServiceClient;
use tonic::Code;
use tonic::Streaming;

async fn watch(b: &Broker, after: &str, audience: &str) -> Streaming<pb::RevocationEvent> {
    RevocationServiceClient::new(b.channel_as("verifier").await)
        .watch_revocations(pb::WatchRevocationsRequest {
            after: after.into(),
            audience: audience.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// The next message, within `within`.
async fn next(s: &mut Streaming<pb::RevocationEvent>, within: Duration) -> pb::RevocationEvent {
    tokio::time::timeout(within, s.message())
        .await
        .expect("no event in time")
        .unwrap()
        .expect("the stream ended")
}

/// The revoked credentials before `Synced`, and the cursor of `Synced`.
async fn backlog(s: &mut Streaming<pb::RevocationEvent>) -> (Vec<pb::Revoked>, String) {
    let mut revoked = Vec::new();
    loop {
        let e = next(s, Duration::from_secs(5)).await;
        match e.event.unwrap() {
            Event::Revoked(r) => revoked.push(r),
            Event::Synced(_) => return (revoked, e.cursor),
            Event::Heartbeat(_) => panic!("a heartbeat before synced"),
        }
    }
}

/// The next revocation (skipping heartbeats), within `within`, and its cursor.
async fn next_revoked(
    s: &mut Streaming<pb::RevocationEvent>,
    within: Duration,
) -> (pb::Revoked, String) {
    let deadline = Instant::now() + within;
    loop {
        let e = next(s, deadline.saturating_duration_since(Instant::now())).await;
        if let Some(Event::Revoked(r)) = e.event {
            return (r, e.cursor);
        }
    }
}

async fn revoke_lease(b: &Broker, lease: &str) {
    creds_as(b, "agent")
        .await
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: lease.into(),
        })
        .await
        .unwrap();
}

async fn watch_stream(b: &Broker) {
    // Before anyone watches: one lease revoked, one still active.
    let task = approved_task(b, &[], None).await;
    let first = issue_as_agent(b, &task.id, None).await;
    let second = issue_as_agent(b, &task.id, None).await;
    revoke_lease(b, &first.lease_id).await;

    // The current set, then synced.
    let mut all = watch(b, "", "").await;
    let (revoked, synced_at) = backlog(&mut all).await;
    assert_eq!(revoked.len(), 1, "{revoked:#?}");
    let r = &revoked[0];
    assert_eq!(
        (
            r.kind.as_str(),
            r.credential_id.as_str(),
            r.lease_id.as_str()
        ),
        ("jwt", first.jti.as_str(), first.lease_id.as_str())
    );
    assert_eq!(
        (r.task_id.as_str(), r.agent.as_str()),
        (task.id.as_str(), AGENT)
    );
    assert_eq!(r.audience, "db.staging");
    assert_eq!(r.expires_at, first.expires_at);
    assert!(!r.reason.is_empty());
    assert!(!synced_at.is_empty());

    // Filtered by audience: another audience sees nothing.
    let mut other = watch(b, "", "other.example").await;
    assert!(backlog(&mut other).await.0.is_empty());
    let mut same = watch(b, "", "db.staging").await;
    assert_eq!(backlog(&mut same).await.0.len(), 1);

    // Live: a lock's revocation arrives within a second.
    let started = Instant::now();
    lock(b, "leaked credentials").await;
    let (live, cursor) = next_revoked(&mut all, Duration::from_secs(1)).await;
    assert_eq!(live.credential_id, second.jti);
    assert!(live.reason.contains("leaked credentials"), "{live:?}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        next_revoked(&mut same, Duration::from_secs(1)).await.0,
        live
    );
    drop(all);

    // Resuming after the cursor: exactly what was missed, then synced.
    unlock(b).await;
    let task = approved_task(b, &[], None).await;
    let missed = issue_as_agent(b, &task.id, None).await;
    revoke_lease(b, &missed.lease_id).await;
    let mut resumed = watch(b, &cursor, "").await;
    let (revoked, _) = backlog(&mut resumed).await;
    let ids: Vec<&str> = revoked.iter().map(|r| r.credential_id.as_str()).collect();
    assert_eq!(ids, vec![missed.jti.as_str()]);

    // Quiet: a heartbeat within 5 s (and a bit), carrying the cursor to resume from.
    let beat = next(&mut resumed, Duration::from_secs(7)).await;
    assert!(matches!(beat.event, Some(Event::Heartbeat(_))), "{beat:?}");
    assert!(!beat.cursor.is_empty());

    // Bad requests name the field.
    let mut client = RevocationServiceClient::new(b.channel_as("verifier").await);
    for (after, audience, field) in [
        ("not-a-cursor", "", "after"),
        ("1-2-3", "", "after"),
        (&"9".repeat(60)[..], "", "after"),
        ("", &"a".repeat(300)[..], "audience"),
        ("", "a\nb", "audience"),
    ] {
        let err = client
            .watch_revocations(pb::WatchRevocationsRequest {
                after: after.into(),
                audience: audience.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{after:?} {audience:?}: {err:?}"
        );
        assert!(err.message().starts_with(field), "{err:?}");
    }
}

#[tokio::test]
async fn watch_on_the_embedded_store() {
    // A watch outlives the per-RPC time limit (it only bounds the call's start).
    let b = Broker::start_with_env(vec![(
        "TASKCRED_SERVER__REQUEST_TIMEOUT".into(),
        "2s".into(),
    )])
    .await;
    watch_stream(&b).await;
    b.stop().await;
}

#[tokio::test]
async fn watch_on_redis() {
    let redis = RedisServer::start();
    let b = Broker::start_on_redis(&redis.url()).await;
    watch_stream(&b).await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_on_one_replica_reaches_the_other_within_a_second() {
    let redis = RedisServer::start();
    let a = Broker::start_on_redis(&redis.url()).await;
    let b = a.replica(redis_env(&redis.url())).await;
    let mut on_a = watch(&a, "", "").await;
    assert!(backlog(&mut on_a).await.0.is_empty());
    let mut on_b = watch(&b, "", "").await;
    assert!(backlog(&mut on_b).await.0.is_empty());

    let task = approved_task(&a, &[], None).await;
    let issued = issue_as_agent(&a, &task.id, None).await;
    assert!(introspect(&a, &issued.token).await.active);
    let started = Instant::now();
    let locked = lock(&b, "replica test").await;
    assert_eq!(locked.revoked_leases, vec![issued.lease_id.clone()]);
    // Introspection on A answers from the shared store at once...
    assert!(!introspect(&a, &issued.token).await.active);
    // ...and A's watchers get the event from B's lock within a second.
    let (r, _) = next_revoked(&mut on_a, Duration::from_secs(1)).await;
    assert_eq!(r.credential_id, issued.jti);
    let (r, _) = next_revoked(&mut on_b, Duration::from_secs(1)).await;
    assert_eq!(r.credential_id, issued.jti);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    a.stop().await;
    b.stop().await;
}

/// Reads a child's stdout lines into a channel.
fn lines_of(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead as _;
    let out = std::io::BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The first JSON line of `lines` with `"type": kind` within `within`.
fn line_of_type(
    lines: &std::sync::mpsc::Receiver<String>,
    kind: &str,
    within: Duration,
) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no {kind} line in {within:?}"));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["type"] == kind {
            return v;
        }
    }
}

/// The issue's check: two `serve` processes on one Redis; a lease issued on one and locked on
/// the other is inactive on both within a second, and `revocations watch` on either prints it.
#[test]
fn two_serve_processes_share_revocations() {
    let redis = RedisServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let dev = tmp.path().join("dev");
    let dev_s = dev.to_str().unwrap();
    let url = redis.url();
    let serve = |audit: &str| {
        let audit = tmp.path().join(audit);
        ServeProcess::start(
            &[
                "serve",
                "--dev",
                "--dev-dir",
                dev_s,
                "--grpc-addr",
                "127.0.0.1:0",
                "--http-addr",
                "127.0.0.1:0",
                "--redis",
                &url,
            ],
            &[("TASKCRED_AUDIT__PATH", audit.to_str().unwrap())],
        )
    };
    let a = serve("audit-a.jsonl");
    let b = serve("audit-b.jsonl");
    let watcher = |s: &ServeProcess| {
        let mut child = std::process::Command::new(crate::common::BIN)
            .args([
                "--broker",
                &format!("https://{}", s.grpc),
                "--dev-dir",
                dev_s,
                "--as",
                "verifier",
                "revocations",
                "watch",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let lines = lines_of(&mut child);
        line_of_type(&lines, "synced", Duration::from_secs(10));
        (child, lines)
    };
    let (mut watch_a, lines_a) = watcher(&a);
    let (mut watch_b, lines_b) = watcher(&b);

    let (code, out, err) = run_as(
        a.grpc,
        dev_s,
        "requester",
        &[
            "task",
            "request",
            "--executor",
            AGENT,
            "--grant",
            "db=read",
            "--purpose",
            "p",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let task = out.trim().to_owned();
    let (code, _, err) = run_as(a.grpc, dev_s, "approver", &["task", "approve", &task]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = run_as(
        a.grpc,
        dev_s,
        "agent",
        &[
            "--json",
            "token",
            "issue",
            "--task",
            &task,
            "--audience",
            "db",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let issued: serde_json::Value = serde_json::from_str(&out).unwrap();
    let token = issued["token"].as_str().unwrap();
    let jti = issued["jti"].as_str().unwrap();

    let locked_at = Instant::now();
    let (code, _, err) = run_as(
        b.grpc,
        dev_s,
        "operator",
        &["agent", "lock", AGENT, "--reason", "two replicas"],
    );
    assert_eq!(code, 0, "{err}");
    for s in [&a, &b] {
        let (_, out, _) = run_as(s.grpc, dev_s, "approver", &["token", "introspect", token]);
        assert_eq!(out.trim(), r#"{"active":false}"#);
    }
    for lines in [&lines_a, &lines_b] {
        let line = line_of_type(lines, "revoked", Duration::from_secs(1));
        assert_eq!(line["credential_id"], jti, "{line}");
        assert_eq!(line["task_id"], task.as_str());
    }
    // Process start-up of the CLI calls is counted in too; a second is the issue's bound.
    eprintln!("lock to both watch lines: {:?}", locked_at.elapsed());
    let _ = watch_a.kill();
    let _ = watch_b.kill();
    let _ = watch_a.wait();
    let _ = watch_b.wait();
    assert_eq!(a.terminate().code(), Some(0));
    assert_eq!(b.terminate().code(), Some(0));
}

/// The epoch and its start carried by a `Synced` or `Heartbeat`.
fn epoch_of(e: &pb::RevocationEvent) -> Option<(String, prost_types::Timestamp)> {
    match e.event.as_ref()? {
        Event::Synced(s) => Some((s.store_epoch.clone(), s.store_epoch_started_at?)),
        Event::Heartbeat(h) => Some((h.store_epoch.clone(), h.store_epoch_started_at?)),
        Event::Revoked(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_comes_back_empty_is_detected() {
    let mut redis = RedisServer::start();
    let b = Broker::start_on_redis(&redis.url()).await;
    let mut old_watch = watch(&b, "", "").await;
    let synced = next(&mut old_watch, Duration::from_secs(5)).await;
    let (before, _) = epoch_of(&synced).unwrap();
    assert!(!before.is_empty());
    let task = approved_task(&b, &[], None).await;
    let issued = issue_as_agent(&b, &task.id, None).await;
    assert!(introspect(&b, &issued.token).await.active);
    let (_, ready) = b.http_get("/readyz").await;
    assert_eq!(ready, "ready\n");

    // Metrics are the test process's (every broker of the suite counts into them): the reset
    // is seen as one more than before.
    let resets_before = crate::common::sample(
        &b.http_get("/metrics").await.1,
        "taskcred_store_resets_total",
    );
    redis.restart_empty();
    // Noticed within a check or two (every 5 s), said in /readyz and the metrics.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, body) = b.http_get("/readyz").await;
        if body.contains("store reset detected") {
            assert!(body.contains(&before), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "no reset in /readyz: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, metrics) = b.http_get("/metrics").await;
    assert!(
        crate::common::sample(&metrics, "taskcred_store_resets_total") > resets_before,
        "{metrics}"
    );
    // What was issued before is inactive.
    assert!(!introspect(&b, &issued.token).await.active);
    // Watchers learn the new epoch (a heartbeat on the old stream, synced on a new one), which
    // began after the token was issued.
    let deadline = Instant::now() + Duration::from_secs(15);
    let after = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let e = match tokio::time::timeout(left, old_watch.message()).await {
            Ok(Ok(Some(e))) => e,
            // The stream may end while Redis restarts: a verifier reconnects.
            _ => {
                old_watch = watch(&b, "", "").await;
                continue;
            }
        };
        if let Some((epoch, started)) = epoch_of(&e)
            && epoch != before
        {
            break (epoch, started);
        }
        assert!(Instant::now() < deadline, "no new epoch on the stream");
    };
    let started = std::time::SystemTime::try_from(after.1).unwrap();
    let issued_at = std::time::SystemTime::try_from(issued.expires_at.unwrap()).unwrap()
        - Duration::from_secs(u64::try_from(issued.ttl.unwrap().seconds).unwrap());
    assert!(started > issued_at);
    let mut fresh = watch(&b, "", "").await;
    let synced = next(&mut fresh, Duration::from_secs(5)).await;
    assert_eq!(epoch_of(&synced).unwrap().0, after.0);
    b.stop().await;
}

fn openssl(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `/crl` of `b`, checked and converted to PEM by openssl, written to `path`; its text form.
async fn fetch_crl(b: &Broker, path: &std::path::Path) -> String {
    let (status, head, der) = crate::common::http_get_bytes(b.http, "/crl").await;
    assert_eq!(status, 200, "{head}");
    assert!(head.contains("application/pkix-crl"), "{head}");
    let der_path = path.with_extension("der");
    std::fs::write(&der_path, der).unwrap();
    let der_s = der_path.to_str().unwrap();
    let (ok, out) = openssl(&[
        "crl",
        "-inform",
        "DER",
        "-in",
        der_s,
        "-out",
        path.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    let (ok, text) = openssl(&["crl", "-inform", "DER", "-in", der_s, "-noout", "-text"]);
    assert!(ok, "{text}");
    text
}

/// A certificate revoked on one replica is listed in the CRL of the other, which openssl then
/// uses to refuse it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_crl_lists_revoked_certificates_across_replicas() {
    let redis = RedisServer::start();
    let a = Broker::start_on_redis(&redis.url()).await;
    let b = a.replica(redis_env(&redis.url())).await;
    let task = approved_task(&a, &[], None).await;
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    let issued = creds_as(&a, "agent")
        .await
        .issue_certificate(pb::IssueCertificateRequest {
            task_id: task.id.clone(),
            csr,
            ttl: None,
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let dir = tempfile::tempdir().unwrap();
    let (leaf, chain, crl) = (
        dir.path().join("leaf.pem"),
        dir.path().join("chain.pem"),
        dir.path().join("crl.pem"),
    );
    std::fs::write(&leaf, &issued.certificate_pem).unwrap();
    std::fs::write(&chain, &issued.chain_pem).unwrap();
    let ca = a.path("ca.pem");
    let verify = || {
        openssl(&[
            "verify",
            "-crl_check",
            "-CAfile",
            ca.to_str().unwrap(),
            "-untrusted",
            chain.to_str().unwrap(),
            "-CRLfile",
            crl.to_str().unwrap(),
            leaf.to_str().unwrap(),
        ])
    };

    let before = fetch_crl(&a, &crl).await;
    assert!(before.contains("No Revoked Certificates"), "{before}");
    let (ok, out) = verify();
    assert!(ok, "{out}");

    revoke_lease(&b, &issued.lease_id).await;
    // The CRL is brought up to date at most once a second (CRL_MIN_REBUILD).
    let listed = |text: &str| {
        text.to_lowercase()
            .replace(':', "")
            .contains(&issued.serial)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let after = loop {
        let text = fetch_crl(&a, &crl).await;
        if listed(&text) || std::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(listed(&after), "{} not in {after}", issued.serial);
    let (ok, out) = verify();
    assert!(!ok && out.contains("certificate revoked"), "{out}");
    a.stop().await;
    b.stop().await;
}

/// The status a stream ends with, whatever messages come before it.
async fn ended_with(stream: &mut Streaming<pb::RevocationEvent>) -> tonic::Status {
    loop {
        match stream.message().await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the stream ended without a status"),
            Err(s) => return s,
        }
    }
}

/// A watch holds only while its caller is honoured: it ends `UNAUTHENTICATED`
/// (`CERTIFICATE_EXPIRED`) within a heartbeat of the watcher's certificate expiring, and
/// `PERMISSION_DENIED` within a heartbeat of a policy set that no longer permits it (found by an
/// attack review: both went on streaming).
#[tokio::test]
async fn a_watch_ends_when_its_certificate_expires_or_policy_withdraws_it() {
    use taskcred::broker::HEARTBEAT;
    let b = Broker::start().await;
    let within = HEARTBEAT + Duration::from_secs(5);
    let reason = |s: &tonic::Status| taskcred::api::reason_of(s);

    // A verifier whose certificate lives 3 seconds.
    let mut params = crate::common::svid_params(&["spiffe://taskcred.dev/verifier/short"]);
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::minutes(1);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::seconds(3);
    let short = crate::common::issue(&params, &b.dev_ca());
    let mut stream = RevocationServiceClient::new(b.channel(Some(&short)).await)
        .watch_revocations(pb::WatchRevocationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let ended = tokio::time::timeout(Duration::from_secs(3) + within, ended_with(&mut stream))
        .await
        .expect("the watch outlived its certificate");
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    assert_eq!(reason(&ended).as_deref(), Some("CERTIFICATE_EXPIRED"));

    // The dev verifier watches; then policy stops permitting verifiers to.
    let mut stream = watch(&b, "", "").await;
    next(&mut stream, within).await;
    let path = b.path("policies/credentials.cedar");
    let policies = std::fs::read_to_string(&path).unwrap();
    let withdrawn = policies.replace("principal.path like \"/verifier/*\" || ", "");
    assert_ne!(withdrawn, policies);
    std::fs::write(&path, withdrawn).unwrap();
    crate::common::flows::admin_as(&b, "operator")
        .await
        .reload_policy(pb::ReloadPolicyRequest {})
        .await
        .unwrap();
    let ended = tokio::time::timeout(within, ended_with(&mut stream))
        .await
        .expect("the watch outlived its permission");
    assert_eq!(ended.code(), Code::PermissionDenied, "{ended:?}");
    assert_eq!(reason(&ended).as_deref(), Some("POLICY_DENIED"));
    b.stop().await;
}
