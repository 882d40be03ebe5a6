//! The scale runs: force-revoke of one agent holding 10,000 live leases (time until every one
//! is inactive in introspection); then a store holding N live leases (1,000,000 by default,
//! written straight into Redis through the broker's own store code) of which 1,000 a second
//! expire: the reaper's lag, Redis memory per lease, the broker's RSS before and after (it must
//! not grow with the count) and its idle CPU; and a second broker started on that full store,
//! timed to its first credential.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};

use super::load::Shape;
use super::setup::{BrokerProcess, RedisProcess};
use super::{AGENT, approved_task, token_request};
use crate::api::pb;
use crate::api::pb::admin_service_client::AdminServiceClient;
use crate::api::pb::credential_service_client::CredentialServiceClient;
use crate::identity::WorkloadId;
use crate::lease::{CredentialKind, Lease, LeaseId, LeaseState};
use crate::store::redis::RedisStore;
use crate::store::{DueStore as _, LeaseStore as _, MetaStore as _, TaskStore as _};
use crate::task::{RawTaskRequest, Task, TaskId, TaskLimits, TaskRequest};

/// Leases expiring per second in the reaper run.
const EXPIRING_PER_SEC: usize = 1_000;

/// An approved task of `executor` (no quorum), as the bulk runs write them straight into the
/// store.
pub(super) fn bulk_task(executor: &str) -> Result<Task, String> {
    let limits = TaskLimits::default();
    let raw = RawTaskRequest {
        executor: executor.into(),
        purpose: "bench".into(),
        grants: vec![("db".into(), vec!["read".into()])],
        ..RawTaskRequest::default()
    };
    let request = TaskRequest::parse(raw, &limits).map_err(|e| e.to_string())?;
    let requester =
        WorkloadId::parse("spiffe://taskcred.dev/human/requester").map_err(|e| e.to_string())?;
    let now = SystemTime::now();
    Ok(Task::new(
        TaskId::generate(),
        request,
        requester,
        0,
        Vec::new(),
        now,
    ))
}

/// A JWT lease of `task` for its executor, expiring at `expires_at`.
fn bulk_lease(task: &Task, expires_at: SystemTime) -> Result<Lease, String> {
    let now = SystemTime::now();
    Ok(Lease {
        id: LeaseId::generate(&task.id),
        task: task.id,
        agent: task.executor.clone(),
        kind: CredentialKind::Jwt,
        credential: crate::mint::random_id().map_err(|e| e.to_string())?,
        audience: Some("db".into()),
        actions: vec!["read".into()],
        cnf: "bench".into(),
        issued_at: now,
        expires_at,
        renew_until: now + Duration::from_secs(3600),
        state: LeaseState::Active,
        ended_at: None,
        reason: None,
    })
}

/// Writes leases `range` (lease `i` in task `i / 1000`), expiring at `expiry(i)`, 64 at a time.
pub(super) async fn write_leases(
    store: &Arc<RedisStore>,
    tasks: &Arc<Vec<Task>>,
    range: std::ops::Range<usize>,
    expiry: impl Fn(usize) -> SystemTime + Send + Sync + 'static,
) -> Result<(), String> {
    let next = Arc::new(AtomicUsize::new(range.start));
    let expiry = Arc::new(expiry);
    let workers: Vec<_> = (0..64)
        .map(|_| {
            let (store, tasks, next, expiry) = (
                Arc::clone(store),
                Arc::clone(tasks),
                Arc::clone(&next),
                Arc::clone(&expiry),
            );
            let end = range.end;
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= end {
                        return Ok::<(), String>(());
                    }
                    let task = tasks.get(i / 1000).ok_or("no task")?;
                    let lease = bulk_lease(task, expiry(i))?;
                    store
                        .issue_lease(&lease, None, SystemTime::now())
                        .await
                        .map_err(|e| e.to_string())?;
                }
            })
        })
        .collect();
    for w in workers {
        w.await.map_err(|e| e.to_string())??;
    }
    Ok(())
}

/// Runs them against broker `b` on Redis `redis`, with `leases` live leases.
///
/// # Errors
/// When setting a run up fails.
pub async fn run(
    b: &BrokerProcess,
    redis: &RedisProcess,
    (leases, revoke): (usize, usize),
    shape: Shape,
    env: &[(String, String)],
) -> Result<Vec<(String, Value)>, String> {
    let mut out = Vec::new();
    let store = Arc::new(RedisStore::new(&redis.url).map_err(|e| e.to_string())?);
    let memory_before = redis.used_memory().await?;
    let rss_before = b.rss_bytes();

    // Leases straight into the store: tasks of 1,000 leases each, all valid for 50 minutes
    // except those that will expire at 1,000 a second during the measured window.
    let window = shape.measure.max(Duration::from_secs(10));
    // Room for writing the expiring leases and the idle measurement before the window opens.
    let lead = Duration::from_secs(12);
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let expiring = ((window.as_secs_f64() * EXPIRING_PER_SEC as f64) as usize).min(leases);
    // The store was flushed for this run: its epoch is made by whichever writer comes first
    // (the broker may still be starting), as every broker does; leases are refused without one.
    store
        .epoch(&crate::store::Epoch::new(SystemTime::now()))
        .await
        .map_err(|e| e.to_string())?;
    let live_before = store.live_leases().await.map_err(|e| e.to_string())?;
    eprintln!("bench: writing {leases} live leases into Redis");
    let per_task = 1_000;
    let mut tasks = Vec::new();
    for _ in 0..leases.div_ceil(per_task) {
        // Other agents' leases: the store's load, not the force-revoked agent's.
        let task = bulk_task(&format!("spiffe://taskcred.dev/agent/bulk-{}", tasks.len()))?;
        store.create_task(&task).await.map_err(|e| e.to_string())?;
        tasks.push(task);
    }
    let tasks = Arc::new(tasks);
    let fill = Instant::now();
    // The long-lived ones first; then, once the window's start is known, those that expire in it.
    let far = SystemTime::now() + Duration::from_secs(3000);
    write_leases(&store, &tasks, expiring..leases, move |_| far).await?;
    let start = SystemTime::now() + lead;
    write_leases(&store, &tasks, 0..expiring, move |i| {
        #[allow(clippy::cast_precision_loss)]
        let at = Duration::from_secs_f64(i as f64 / EXPIRING_PER_SEC as f64);
        start + at
    })
    .await?;
    let fill_secs = fill.elapsed().as_secs_f64();
    eprintln!("bench: {leases} leases written in {fill_secs:.1} s");
    let memory_after = redis.used_memory().await?;
    #[allow(clippy::cast_precision_loss)]
    let per_lease = memory_after.saturating_sub(memory_before) as f64 / leases.max(1) as f64;
    out.push((
        "redis_bytes_per_lease".into(),
        json!(super::round(per_lease, 0)),
    ));
    out.push(("scale_leases".into(), json!(leases)));
    out.push((
        "scale_fill_per_sec".into(),
        json!(super::round(leases as f64 / fill_secs, 0)),
    ));

    // Idle: nothing asked of the broker, nothing due yet.
    let idle = Duration::from_secs(5);
    let cpu0 = b.cpu_seconds();
    tokio::time::sleep(idle).await;
    if let (Some(c0), Some(c1)) = (cpu0, b.cpu_seconds()) {
        out.push((
            "broker_idle_cpu_percent".into(),
            json!(super::round((c1 - c0) / idle.as_secs_f64() * 100.0, 2)),
        ));
    }
    out.push(("broker_rss_bytes_before".into(), json!(rss_before)));
    out.push(("broker_rss_bytes_after".into(), json!(b.rss_bytes())));

    // The reaper's lag while 1,000 a second expire: now minus the oldest due expiry, sampled.
    let until_start = start.duration_since(SystemTime::now()).unwrap_or_default();
    eprintln!("bench: reaper run ({expiring} leases expiring over {window:?})");
    tokio::time::sleep(until_start).await;
    let mut lags = Vec::new();
    let end = Instant::now() + window + Duration::from_secs(2);
    while Instant::now() < end {
        let now = SystemTime::now();
        if let Ok(next) = store.next_due().await {
            let lag = next
                .and_then(|due| now.duration_since(due).ok())
                .unwrap_or_default();
            lags.push(lag.as_secs_f64() * 1000.0);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    lags.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let i = ((lags.len() as f64 * q).ceil() as usize).clamp(1, lags.len().max(1)) - 1;
        lags.get(i).copied().unwrap_or_default()
    };
    out.push((
        "reaper_lag_p99_ms".into(),
        json!(super::round(pick(0.99), 1)),
    ));
    out.push((
        "reaper_lag_max_ms".into(),
        json!(super::round(pick(1.0), 1)),
    ));
    // Give the reaper its last round, then count what it ended.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let live_after = store.live_leases().await.map_err(|e| e.to_string())?;
    out.push(("scale_expiring".into(), json!(expiring)));
    out.push((
        "scale_reaped".into(),
        json!((live_before + leases as u64).saturating_sub(live_after)),
    ));

    // Cold start on the full store: a second broker, timed from its start to its first
    // credential (no per-lease state is loaded at start).
    eprintln!("bench: a broker starting on the full store");
    let t0 = Instant::now();
    let second = BrokerProcess::start(b.dev_dir(), env)?;
    let listening_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let first = async {
        let task = approved_task(&second, "bench: cold start").await?;
        CredentialServiceClient::new(second.channel(Some("agent")).await?)
            .issue_token(token_request(&task))
            .await
            .map_err(|e| format!("IssueToken after start: {e}"))
    }
    .await;
    let first_ms = t0.elapsed().as_secs_f64() * 1000.0;
    second.stop();
    first?;
    let live = store.live_leases().await.map_err(|e| e.to_string())?;
    out.push((
        "start_ms_1m_leases".into(),
        json!(super::round(first_ms, 1)),
    ));
    out.push((
        "start_ms_listening".into(),
        json!(super::round(listening_ms, 1)),
    ));
    out.push(("start_live_leases".into(), json!(live)));
    out.extend(force_revoke(b, revoke).await?);
    Ok(out)
}

/// Force-revoke: `revoke` live tokens of the agent issued through `b`, then the lock; every one
/// must then introspect inactive. The figures `force_revoke_10k_*`.
///
/// # Errors
/// When issuing the tokens or the lock fails.
pub(super) async fn force_revoke(
    b: &BrokerProcess,
    revoke: usize,
) -> Result<Vec<(String, Value)>, String> {
    let mut out = Vec::new();
    eprintln!("bench: force-revoke of {revoke} leases");
    let task = approved_task(b, "bench: force-revoke").await?;
    let channels = Arc::new(vec![
        b.channel(Some("agent")).await?,
        b.channel(Some("agent")).await?,
    ]);
    let tokens = Arc::new(std::sync::Mutex::new(Vec::with_capacity(revoke)));
    {
        let next = Arc::new(AtomicUsize::new(0));
        let workers: Vec<_> = (0..64)
            .map(|w| {
                let (channels, tokens, next, request) = (
                    Arc::clone(&channels),
                    Arc::clone(&tokens),
                    Arc::clone(&next),
                    token_request(&task),
                );
                tokio::spawn(async move {
                    let mut c = CredentialServiceClient::new(channels[w % 2].clone());
                    while next.fetch_add(1, Ordering::Relaxed) < revoke {
                        let t = c
                            .issue_token(request.clone())
                            .await
                            .map_err(|e| e.to_string())?
                            .into_inner()
                            .token;
                        tokens.lock().map_err(|e| e.to_string())?.push(t);
                    }
                    Ok::<(), String>(())
                })
            })
            .collect();
        for w in workers {
            w.await.map_err(|e| e.to_string())??;
        }
    }
    let tokens: Vec<String> = std::mem::take(&mut *tokens.lock().map_err(|e| e.to_string())?);
    let mut admin = AdminServiceClient::new(b.channel(Some("operator")).await?);
    let t0 = Instant::now();
    let locked = admin
        .lock_agent(pb::LockAgentRequest {
            agent: AGENT.into(),
            reason: "bench: force-revoke".into(),
            duration: None,
            request_id: String::new(),
        })
        .await;
    let lock_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let revoked = match locked {
        Ok(r) => r.into_inner().revoked_lease_count as usize,
        Err(e) => return Err(format!("LockAgent: {e}")),
    };
    let tokens = Arc::new(tokens);
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..64)
        .map(|w| {
            let (channels, tokens, next) = (
                Arc::clone(&channels),
                Arc::clone(&tokens),
                Arc::clone(&next),
            );
            tokio::spawn(async move {
                let mut c = CredentialServiceClient::new(channels[w % 2].clone());
                let mut inactive = 0usize;
                while let Some(token) = tokens.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let r = c
                        .introspect(pb::IntrospectRequest {
                            token: token.clone(),
                            certificate: Vec::new(),
                        })
                        .await
                        .map_err(|e| e.to_string())?;
                    if !r.get_ref().active {
                        inactive += 1;
                    }
                }
                Ok::<usize, String>(inactive)
            })
        })
        .collect();
    let mut inactive = 0;
    for w in workers {
        inactive += w.await.map_err(|e| e.to_string())??;
    }
    let verified_ms = t0.elapsed().as_secs_f64() * 1000.0;
    out.push((
        "force_revoke_10k_ms".into(),
        json!(super::round(lock_ms, 1)),
    ));
    out.push(("force_revoke_leases".into(), json!(revoke)));
    out.push(("force_revoke_10k_revoked".into(), json!(revoked)));
    out.push(("force_revoke_10k_inactive".into(), json!(inactive)));
    out.push((
        "force_revoke_10k_verified_ms".into(),
        json!(super::round(verified_ms, 1)),
    ));
    Ok(out)
}
