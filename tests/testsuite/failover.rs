//! Brokers on a real local Redis Cluster (3 masters, 3 replicas) and a real Sentinel setup (a
//! primary, a replica, 3 sentinels): a lock raced by issuance on two replicas issues nothing
//! after it returns; a master killed under issuance load fails issuance closed, issuance
//! resumes by itself after the promotion, and with `replicated` durability every credential
//! answered before the kill still has its lease, is still revocable, and expiry and locks go on.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use taskcred::api::pb;
use tonic::Code;

use crate::common::Broker;
use crate::common::flows::{
    AGENT, admin_as, approved_task, creds_as, introspect, lock, secs, token_request, unlock,
};
use crate::common::topology::{RedisCluster, RedisSentinel};

/// The environment of a broker on `backend` (`redis_cluster` or `redis_sentinel`) with
/// `durability`, its per-identity budgets off (these tests hammer one agent).
fn env(store: &[(&str, String)], durability: &str) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = store
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    env.extend([
        ("TASKCRED_STORE__DURABILITY".into(), durability.into()),
        ("TASKCRED_LIMITS__ISSUANCE_PER_SECOND".into(), "0".into()),
        ("TASKCRED_LIMITS__RPC_PER_SECOND".into(), "0".into()),
    ]);
    env
}

/// A TOML array of the URLs, as an environment override takes it.
fn toml_list(urls: &[String]) -> String {
    let quoted: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
    format!("[{}]", quoted.join(","))
}

fn cluster_env(cluster: &RedisCluster, durability: &str) -> Vec<(String, String)> {
    env(
        &[
            ("TASKCRED_STORE__BACKEND", "redis_cluster".into()),
            ("TASKCRED_STORE__REDIS_URLS", toml_list(&cluster.urls())),
        ],
        durability,
    )
}

fn sentinel_env(sentinel: &RedisSentinel, durability: &str) -> Vec<(String, String)> {
    env(
        &[
            ("TASKCRED_STORE__BACKEND", "redis_sentinel".into()),
            (
                "TASKCRED_STORE__SENTINEL_URLS",
                toml_list(&sentinel.sentinel_urls()),
            ),
            (
                "TASKCRED_STORE__SENTINEL_MASTER",
                RedisSentinel::MASTER.into(),
            ),
        ],
        durability,
    )
}

/// `n` approved tasks of the demo agent (ids are random: they fall in many buckets).
async fn tasks(b: &Broker, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(approved_task(b, &[], None).await.id);
    }
    out
}

/// One issuance as it went: when it was sent, for which task, and what came back.
struct Attempt {
    sent: Instant,
    task: String,
    answer: Result<pb::IssueTokenResponse, tonic::Status>,
}

/// Issues tokens for `tasks` from `workers` loops (alternating the brokers) until `stop`.
fn hammer(
    clients: Vec<pb::credential_service_client::CredentialServiceClient<tonic::transport::Channel>>,
    tasks: Vec<String>,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinSet<Vec<Attempt>> {
    let mut set = tokio::task::JoinSet::new();
    for w in 0..workers {
        let (clients, tasks, stop) = (clients.clone(), tasks.clone(), Arc::clone(&stop));
        set.spawn(async move {
            let mut out = Vec::new();
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                let task = tasks[i % tasks.len()].clone();
                let mut client = clients[i % clients.len()].clone();
                i += 1;
                let sent = Instant::now();
                let answer = client
                    .issue_token(token_request(&task, "db.staging"))
                    .await
                    .map(tonic::Response::into_inner);
                if answer.is_err() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                out.push(Attempt { sent, task, answer });
            }
            out
        });
    }
    set
}

/// Lock and issuance hammered at once on two replicas over a Cluster, three rounds: no
/// issuance sent after `LockAgent` returned succeeds, and every credential issued before is
/// inactive once it has.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_credential_is_issued_after_a_lock_returns_on_a_cluster() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let a = Broker::start_with_env(cluster_env(&cluster, "async")).await;
    let b = a.replica(cluster_env(&cluster, "async")).await;
    let clients = vec![creds_as(&a, "agent").await, creds_as(&b, "agent").await];
    for round in 0..3 {
        let tasks = tasks(&a, 8).await;
        let stop = Arc::new(AtomicBool::new(false));
        let hammering = hammer(clients.clone(), tasks, 8, Arc::clone(&stop));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let locked = lock(if round % 2 == 0 { &b } else { &a }, "race").await;
        let returned = Instant::now();
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, Ordering::Relaxed);
        let attempts: Vec<Attempt> = hammering.join_all().await.into_iter().flatten().collect();
        let issued: Vec<&Attempt> = attempts.iter().filter(|t| t.answer.is_ok()).collect();
        let after: Vec<&Attempt> = attempts.iter().filter(|t| t.sent > returned).collect();
        eprintln!(
            "round {round}: {} issued, {} sent after the lock returned, {} leases revoked by it",
            issued.len(),
            after.len(),
            locked.revoked_leases.len()
        );
        assert!(issued.len() > 20, "the race had issuance before the lock");
        assert!(after.len() > 20, "the race had issuance after the lock");
        for t in &after {
            let refused = t.answer.as_ref().err().unwrap_or_else(|| {
                panic!("round {round}: a credential was issued after the lock returned")
            });
            assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
        }
        for t in issued {
            let r = t.answer.as_ref().unwrap();
            assert!(!introspect(&a, &r.token).await.active, "{}", r.lease_id);
        }
        unlock(&a).await;
    }
    b.stop().await;
    a.stop().await;
}

/// What a failover did to issuance: how long nothing was issued, and whether every credential
/// answered before the kill kept its lease and was revoked by a lock afterwards.
async fn issuance_across_a_failover(
    b: &Broker,
    kill: impl FnOnce() -> Instant + Send + 'static,
    label: &str,
) {
    let tasks = tasks(b, 12).await;
    let stop = Arc::new(AtomicBool::new(false));
    let clients = vec![creds_as(b, "agent").await];
    let hammering = hammer(clients, tasks.clone(), 6, Arc::clone(&stop));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let killed = Instant::now();
    let promoted = tokio::task::spawn_blocking(kill).await.unwrap();
    // Issuance on every task again, or 12 s past the promotion.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let deadline = promoted + Duration::from_secs(12);
    loop {
        let mut client = creds_as(b, "agent").await;
        let mut all = true;
        for t in &tasks {
            all &= client
                .issue_token(token_request(t, "db.staging"))
                .await
                .is_ok();
        }
        if all || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let attempts: Vec<Attempt> = hammering.join_all().await.into_iter().flatten().collect();

    // Fails closed while it lasts, resumes by itself within 10 s of the promotion.
    let mut last_before: HashMap<&str, Instant> = HashMap::new();
    let mut first_after: HashMap<&str, Instant> = HashMap::new();
    for t in &attempts {
        match &t.answer {
            Ok(_) if t.sent < killed => {
                last_before.insert(&t.task, t.sent);
            }
            Ok(_) => {
                first_after.entry(&t.task).or_insert(t.sent);
            }
            Err(s) => assert!(
                matches!(s.code(), Code::Unavailable),
                "{label}: issuance failed with {s:?}, not UNAVAILABLE"
            ),
        }
    }
    let mut worst = Duration::ZERO;
    for t in &tasks {
        let resumed = *first_after
            .get(t.as_str())
            .unwrap_or_else(|| panic!("{label}: no issuance for task {t} after the failover"));
        assert!(
            resumed <= promoted + Duration::from_secs(10),
            "{label}: task {t} resumed {:?} after the promotion",
            resumed.saturating_duration_since(promoted)
        );
        worst = worst.max(resumed.saturating_duration_since(killed));
    }
    let answered: Vec<&pb::IssueTokenResponse> = attempts
        .iter()
        .filter(|t| t.sent < killed)
        .filter_map(|t| t.answer.as_ref().ok())
        .collect();
    eprintln!(
        "{label}: promoted {:?} after the kill; longest without issuance on a task {worst:?}; \
         {} credentials answered before the kill",
        promoted.saturating_duration_since(killed),
        answered.len()
    );

    // Every credential answered before the kill still has its lease...
    let mut lost = 0;
    for r in &answered {
        if !introspect(b, &r.token).await.active {
            lost += 1;
        }
    }
    assert_eq!(lost, 0, "{label}: leases lost in the failover");
    // ...expiry goes on (a 1 s credential issued now ends by itself, by the reaper)...
    let mut agent = creds_as(b, "agent").await;
    let brief = agent
        .issue_token(pb::IssueTokenRequest {
            ttl: secs(1),
            ..token_request(&tasks[0], "db.staging")
        })
        .await
        .unwrap()
        .into_inner();
    let mut admin = admin_as(b, "operator").await;
    let state_of = |lease: String| {
        let mut admin = admin.clone();
        let task = tasks[0].clone();
        async move {
            admin
                .list_leases(pb::ListLeasesRequest {
                    task_id: task,
                    page_size: 500,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .leases
                .into_iter()
                .find(|l| l.lease_id == lease)
                .map(|l| l.state)
        }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while state_of(brief.lease_id.clone()).await.as_deref() != Some("expired") {
        assert!(
            Instant::now() < deadline,
            "{label}: the reaper did not expire a lease"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ...and a lock revokes all of them.
    lock(b, "failover").await;
    for r in answered.iter().take(200) {
        assert!(
            !introspect(b, &r.token).await.active,
            "{label}: {}",
            r.lease_id
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let leases = admin
            .list_leases(pb::ListLeasesRequest {
                task_id: tasks[0].clone(),
                page_size: 500,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .leases;
        if leases
            .iter()
            .filter(|l| l.lease_id != brief.lease_id)
            .all(|l| l.state != "active")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{label}: the lock's sweep did not end"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A Cluster master killed under issuance load, `replicated` durability.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_master_fails_over_under_issuance_and_loses_nothing_replicated() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let b = Broker::start_with_env(cluster_env(&cluster, "replicated")).await;
    let cluster = Arc::new(std::sync::Mutex::new(cluster));
    let c = Arc::clone(&cluster);
    issuance_across_a_failover(
        &b,
        move || {
            let mut c = c.lock().unwrap();
            let victim = c.masters()[0];
            c.kill(victim);
            c.wait_for_failover(victim, Duration::from_secs(20));
            let promoted = Instant::now();
            // Restarted, as a supervisor would: it rejoins as its shard's replica, and
            // `replicated` writes there go on (a shard without a replica refuses them).
            c.restart(victim);
            promoted
        },
        "cluster",
    )
    .await;
    b.stop().await;
}

/// The Sentinel primary killed under issuance load, `replicated` durability.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sentinel_primary_fails_over_under_issuance_and_loses_nothing_replicated() {
    let sentinel = tokio::task::spawn_blocking(RedisSentinel::start)
        .await
        .unwrap();
    let b = Broker::start_with_env(sentinel_env(&sentinel, "replicated")).await;
    let sentinel = Arc::new(std::sync::Mutex::new(sentinel));
    let s = Arc::clone(&sentinel);
    issuance_across_a_failover(
        &b,
        move || {
            let mut s = s.lock().unwrap();
            let old = s.kill_primary();
            s.wait_for_failover(old, Duration::from_secs(20));
            let promoted = Instant::now();
            s.restart(old);
            promoted
        },
        "sentinel",
    )
    .await;
    b.stop().await;
}

/// With `replicated` durability a task is filed among its executor's open tasks durably before
/// it is written (what a later lock marks and ends relies on that entry): when the agent's
/// shard has no live replica, a task for the agent is refused (UNAVAILABLE), not created with
/// an entry a failover could lose; with the replica back, tasks are created again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_is_not_created_while_its_agents_shard_has_no_replica_replicated() {
    let mut cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let b = Broker::start_with_env(cluster_env(&cluster, "replicated")).await;
    approved_task(&b, &[], None).await;
    let open = format!("tc:{{a:{AGENT}}}:open");
    let any = cluster.masters()[0];
    let slot: u16 = cluster
        .cli(any, &["CLUSTER", "KEYSLOT", &open])
        .trim()
        .parse()
        .unwrap();
    let replica = cluster.replica_of(cluster.master_of_slot(slot));
    cluster.kill(replica);
    let refused = crate::common::flows::tasks_as(&b, "requester")
        .await
        .request_task(crate::common::flows::task_request_for(AGENT))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.restart(replica);
        cluster
    })
    .await
    .unwrap();
    approved_task(&b, &[], None).await;
    b.stop().await;
    drop(cluster);
}

/// The shared audit stream on a Cluster: two replicas write one chained stream into it (its
/// keys share a slot), and `audit export --redis-cluster` reads it back whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_write_one_chained_audit_stream_on_a_cluster() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let mut env = cluster_env(&cluster, "async");
    env.push(("TASKCRED_AUDIT__REDIS_STREAM".into(), "true".into()));
    let a = Broker::start_with_env(env.clone()).await;
    let b_file = a.path("audit-b.jsonl");
    env.push((
        "TASKCRED_AUDIT__PATH".into(),
        b_file.to_str().unwrap().into(),
    ));
    let b = a.replica(env).await;
    let task = approved_task(&a, &[], None).await;
    for (broker, n) in [(&a, 10), (&b, 10)] {
        let mut agent = creds_as(broker, "agent").await;
        for _ in 0..n {
            agent
                .issue_token(token_request(&task.id, "db.staging"))
                .await
                .unwrap();
        }
    }
    b.stop().await;
    let dir = a.stop().await;
    let in_files = crate::common::line_count(&dir.path().join("audit.jsonl"))
        + crate::common::line_count(&b_file);
    let urls = cluster.urls().join(",");
    let (code, out, err) = crate::common::run(&["audit", "export", "--redis-cluster", &urls]);
    assert_eq!(code, 0, "{err}");
    let exported = dir.path().join("stream.jsonl");
    std::fs::write(&exported, &out).unwrap();
    let (code, report, _) =
        crate::common::run(&["--json", "audit", "verify", exported.to_str().unwrap()]);
    assert_eq!(code, 0, "{report}");
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(report["intact"], true);
    assert_eq!(report["lines"], in_files, "{report}");
}
