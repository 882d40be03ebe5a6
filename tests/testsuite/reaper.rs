//! The reaper, end to end with real brokers: leases end as expired within a second of their
//! expiry and tasks at their deadline, on both stores; with two replicas on one Redis, each of
//! 1,000 short leases is ended exactly once; while Redis is down issuance fails closed, and the
//! reaper catches up when it is back.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::common::flows::{
    AGENT, approved_task, creds_as, introspect, issue_as_agent, secs, tasks_as, token_request,
};
use crate::common::{Broker, RedisServer, redis_env};
use taskcred::api::pb;
use tonic::Code;

/// The `LeaseExpired` events of an audit log: lease id to the time the reaper ended it.
fn expirations(audit: &Path) -> Vec<(String, SystemTime)> {
    crate::common::audit_lines(audit)
        .into_iter()
        .filter(|e| e["action"] == "LeaseExpired")
        .map(|e| {
            (
                e["details"]["lease_id"].as_str().unwrap().to_owned(),
                humantime::parse_rfc3339(e["time"].as_str().unwrap()).unwrap(),
            )
        })
        .collect()
}

fn audit_env(dir: &Path, name: &str) -> (String, String) {
    (
        "TASKCRED_AUDIT__PATH".into(),
        dir.join(name).to_str().unwrap().to_owned(),
    )
}

fn expiry(r: &pb::IssueTokenResponse) -> SystemTime {
    SystemTime::try_from(r.expires_at.unwrap()).unwrap()
}

/// A 2 s lease is ended by the reaper within a second of its expiry; a task with a 2 s deadline
/// expires, and its leases with it.
async fn expiry_on(b: &Broker) {
    let expired_before = crate::common::sample(
        &b.http_get("/metrics").await.1,
        "taskcred_leases_expired_total",
    );
    let task = approved_task(b, &[], None).await;
    let issued = issue_as_agent(b, &task.id, Some(2)).await;
    assert!(introspect(b, &issued.token).await.active);
    let until = expiry(&issued) + Duration::from_millis(1200);
    while SystemTime::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!introspect(b, &issued.token).await.active);
    let ended = expirations(&b.path("audit.jsonl"));
    let (_, at) = ended
        .iter()
        .find(|(id, _)| id == &issued.lease_id)
        .expect("the reaper ended the lease");
    let late = at.duration_since(expiry(&issued)).unwrap_or_default();
    assert!(
        late <= Duration::from_secs(1),
        "ended {late:?} after expiry"
    );
    let (_, metrics) = b.http_get("/metrics").await;
    assert!(
        crate::common::sample(&metrics, "taskcred_leases_expired_total") > expired_before,
        "{metrics}"
    );

    // A task with a 2 s deadline ends as expired.
    let short = tasks_as(b, "requester")
        .await
        .request_task(pb::RequestTaskRequest {
            executor: AGENT.into(),
            purpose: "brief".into(),
            grants: vec![pb::Grant {
                audience: "db.staging".into(),
                actions: vec!["read".into(), "rotate".into()],
            }],
            deadline: secs(2),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let get = || async {
        tasks_as(b, "requester")
            .await
            .get_task(pb::GetTaskRequest {
                task_id: short.id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
    };
    assert_eq!(get().await.state, pb::TaskState::PendingApproval as i32);
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let t = get().await;
    assert_eq!(t.state, pb::TaskState::Expired as i32, "{t:?}");
}

#[tokio::test]
async fn leases_and_tasks_expire_on_the_embedded_store() {
    let b = Broker::start().await;
    expiry_on(&b).await;
    b.stop().await;
}

#[tokio::test]
async fn leases_and_tasks_expire_on_redis() {
    let redis = RedisServer::start();
    let b = Broker::start_on_redis(&redis.url()).await;
    expiry_on(&b).await;
    b.stop().await;
}

#[tokio::test]
async fn two_replicas_end_each_of_1000_leases_exactly_once() {
    let redis = RedisServer::start();
    let logs = tempfile::tempdir().unwrap();
    let env = |name: &str| {
        let mut e = redis_env(&redis.url());
        e.push(audit_env(logs.path(), name));
        // One agent issues 1,000 tokens in a burst, fast enough to meet the per-identity RPC
        // rate too: both budgets off, this test is about the reaper.
        e.push(("TASKCRED_LIMITS__ISSUANCE_PER_SECOND".into(), "0".into()));
        e.push(("TASKCRED_LIMITS__RPC_PER_SECOND".into(), "0".into()));
        e
    };
    let a = Broker::launch(tempfile::tempdir().unwrap(), env("a.jsonl"), None).await;
    let b = a.replica(env("b.jsonl")).await;
    // The replicas race for due leases, and under load one may take them all: the burst is
    // repeated (each check holding every time) until both took part, at most three times.
    for attempt in 1..=3 {
        if burst_reaped_once(&a, &b, logs.path()).await {
            break;
        }
        assert!(attempt < 3, "one replica reaped every burst");
    }
    b.stop().await;
    a.stop().await;
}

/// 1,000 leases of 1 or 2 s issued through `a` and `b`: each ends exactly once, at most 1 s
/// after its expiry. Returns whether both replicas ended some.
async fn burst_reaped_once(a: &Broker, b: &Broker, logs: &Path) -> bool {
    let task = approved_task(a, &[], None).await;

    // 1,000 leases of 1 or 2 s, issued on both replicas, eight at a time on each.
    let clients = [creds_as(a, "agent").await, creds_as(b, "agent").await];
    let mut issued: Vec<pb::IssueTokenResponse> = Vec::new();
    for round in 0..63 {
        let mut batch = tokio::task::JoinSet::new();
        for i in 0..16 {
            let n = round * 16 + i;
            if n >= 1000 {
                break;
            }
            let mut client = clients[i % 2].clone();
            let request = pb::IssueTokenRequest {
                ttl: secs(1 + (n % 2) as i64),
                ..token_request(&task.id, "db.staging")
            };
            batch.spawn(async move { client.issue_token(request).await.unwrap().into_inner() });
        }
        issued.extend(batch.join_all().await);
    }
    assert_eq!(issued.len(), 1000);
    let last = issued.iter().map(expiry).max().unwrap();
    while SystemTime::now() < last + Duration::from_millis(1500) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut ended: HashMap<String, Vec<SystemTime>> = HashMap::new();
    let (on_a, on_b) = (
        expirations(&logs.join("a.jsonl")),
        expirations(&logs.join("b.jsonl")),
    );
    let mine: HashSet<&str> = issued.iter().map(|r| r.lease_id.as_str()).collect();
    let took_part =
        |on: &[(String, SystemTime)]| on.iter().any(|(id, _)| mine.contains(id.as_str()));
    let both = took_part(&on_a) && took_part(&on_b);
    for (id, at) in on_a.into_iter().chain(on_b) {
        ended.entry(id).or_default().push(at);
    }
    let mut worst = Duration::ZERO;
    for r in &issued {
        let times = ended
            .get(&r.lease_id)
            .unwrap_or_else(|| panic!("lease {} never ended", r.lease_id));
        assert_eq!(
            times.len(),
            1,
            "lease {} ended {} times",
            r.lease_id,
            times.len()
        );
        let late = times[0].duration_since(expiry(r)).unwrap_or_default();
        worst = worst.max(late);
    }
    eprintln!("1,000 leases over two replicas: worst {worst:?} after expiry");
    assert!(
        worst <= Duration::from_secs(1),
        "worst: {worst:?} after expiry"
    );
    both
}

#[tokio::test]
async fn issuance_fails_closed_while_redis_is_down_and_the_reaper_catches_up() {
    let mut redis = RedisServer::start();
    let b = Broker::start_on_redis(&redis.url()).await;
    let task = approved_task(&b, &[], None).await;
    let issued = issue_as_agent(&b, &task.id, Some(1)).await;

    redis.stop();
    let err = creds_as(&b, "agent")
        .await
        .issue_token(token_request(&task.id, "db.staging"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    // The lease expires while Redis is down: nothing can record it.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        !expirations(&b.path("audit.jsonl"))
            .iter()
            .any(|(id, _)| id == &issued.lease_id)
    );

    redis.restart();
    let give_up = SystemTime::now() + Duration::from_secs(10);
    loop {
        if expirations(&b.path("audit.jsonl"))
            .iter()
            .any(|(id, _)| id == &issued.lease_id)
        {
            break;
        }
        assert!(SystemTime::now() < give_up, "the reaper did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And issuance works again.
    issue_as_agent(&b, &task.id, Some(60)).await;
    b.stop().await;
}
