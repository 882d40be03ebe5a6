//! `taskcred bench --store cluster`: the figures on a Redis Cluster the bench starts itself
//! (3 masters, 3 replicas, `redis-server` and `redis-cli` from `PATH`): issuance with each
//! durability setting, Redis bytes per lease, force-revoke, and a failover under issuance load
//! (a master killed, then restarted): how long issuance stopped, and how many credentials
//! answered before the kill lost their lease, with `async` and with `replicated` durability.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};

use super::cost::Meter;
use super::load::Shape;
use super::setup::BrokerProcess;
use super::{agent_channels, approved_task, figure, issue_tokens, noop, round, token_request};
use crate::api::pb;
use crate::api::pb::credential_service_client::CredentialServiceClient;
use crate::store::redis::{Durability, RedisStore, Topology};
use crate::store::{LeaseStore as _, MetaStore as _, TaskStore as _};

/// Most leases written for the memory figure.
pub const MEMORY_LEASES: usize = 100_000;

/// A local Redis Cluster of 6 nodes, killed when dropped.
pub struct ClusterProcess {
    nodes: Vec<(u16, PathBuf, Option<Child>)>,
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}

fn cli(port: u16, args: &[&str]) -> Result<String, String> {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .map_err(|e| format!("redis-cli: {e}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn spawn(port: u16, dir: &Path) -> Result<Child, String> {
    let bus = free_port()?;
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
        .args(["--cluster-port", &bus.to_string()])
        .args(["--cluster-replica-validity-factor", "0"])
        .args(["--cluster-config-file", "nodes.conf"])
        .args([
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
        ])
        .args([
            "--maxmemory-policy",
            "noeviction",
            "--repl-diskless-sync-delay",
            "0",
        ])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("redis-server: {e}"))
}

/// Waits until `ok` holds, for up to `within`.
fn until(within: Duration, what: &str, mut ok: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + within;
    while !ok() {
        if Instant::now() > deadline {
            return Err(format!("redis cluster: {what} within {within:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

impl ClusterProcess {
    /// Starts 6 nodes under `dir`, makes them a cluster (3 masters, each with a replica) and
    /// waits until it serves every slot.
    ///
    /// # Errors
    /// When `redis-server` or `redis-cli` is missing or the cluster does not form in 30 s.
    pub fn start(dir: &Path) -> Result<Self, String> {
        let mut nodes = Vec::new();
        for i in 0..6 {
            let port = free_port()?;
            let d = dir.join(format!("node-{i}"));
            std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
            let child = spawn(port, &d)?;
            nodes.push((port, d, Some(child)));
        }
        let c = Self { nodes };
        for (port, _, _) in &c.nodes {
            until(Duration::from_secs(10), "a node answers", || {
                cli(*port, &["PING"]).is_ok_and(|o| o.trim() == "PONG")
            })?;
        }
        let addrs: Vec<String> = c
            .nodes
            .iter()
            .map(|(p, _, _)| format!("127.0.0.1:{p}"))
            .collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "1", "--cluster-yes"]);
        cli(c.nodes[0].0, &args)?;
        c.wait_ok()?;
        Ok(c)
    }

    /// Until every live node says the cluster is ok.
    fn wait_ok(&self) -> Result<(), String> {
        until(Duration::from_secs(30), "state ok", || {
            self.nodes
                .iter()
                .filter(|n| n.2.is_some())
                .all(|(p, _, _)| {
                    cli(*p, &["CLUSTER", "INFO"]).is_ok_and(|o| o.contains("cluster_state:ok"))
                })
                && self.masters().len() == 3
        })
    }

    /// The seed URLs.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|(p, _, _)| format!("redis://127.0.0.1:{p}/"))
            .collect()
    }

    /// The live masters serving slots, as `CLUSTER NODES` on a live node says.
    pub fn masters(&self) -> Vec<u16> {
        let Some((port, _, _)) = self.nodes.iter().find(|n| n.2.is_some()) else {
            return Vec::new();
        };
        let live: Vec<u16> = self
            .nodes
            .iter()
            .filter(|n| n.2.is_some())
            .map(|n| n.0)
            .collect();
        cli(*port, &["CLUSTER", "NODES"])
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("master") && !l.contains("fail") && l.split(' ').count() > 8)
            .filter_map(|l| {
                let addr = l.split(' ').nth(1)?;
                addr.split(['@', ':']).nth(1)?.parse().ok()
            })
            .filter(|p| live.contains(p))
            .collect()
    }

    /// Redis memory in use over the masters.
    pub fn used_memory(&self) -> u64 {
        self.masters()
            .iter()
            .filter_map(|p| {
                cli(*p, &["INFO", "memory"]).ok()?.lines().find_map(|l| {
                    l.strip_prefix("used_memory:")
                        .and_then(|v| v.trim().parse::<u64>().ok())
                })
            })
            .sum()
    }

    /// Empties every master.
    pub fn flush(&self) {
        for p in self.masters() {
            let _ = cli(p, &["FLUSHALL"]);
        }
    }

    /// Kills master `port`, waits until its replica serves its slots; returns when it did.
    ///
    /// # Errors
    /// When no promotion comes within 30 s.
    pub fn kill_and_fail_over(&mut self, port: u16) -> Result<Instant, String> {
        if let Some(n) = self.nodes.iter_mut().find(|n| n.0 == port)
            && let Some(mut child) = n.2.take()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.wait_ok()?;
        Ok(Instant::now())
    }

    /// Starts node `port` again (it rejoins as a replica).
    ///
    /// # Errors
    /// When it does not start.
    pub fn restart(&mut self, port: u16) -> Result<(), String> {
        if let Some(n) = self.nodes.iter_mut().find(|n| n.0 == port) {
            n.2 = Some(spawn(port, &n.1)?);
        }
        until(
            Duration::from_secs(10),
            "the restarted node answers",
            || cli(port, &["PING"]).is_ok_and(|o| o.trim() == "PONG"),
        )
    }
}

impl Drop for ClusterProcess {
    fn drop(&mut self) {
        for (_, _, child) in &mut self.nodes {
            if let Some(mut c) = child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// The broker's environment on `cluster` with `durability`.
fn on_cluster(
    base: &[(String, String)],
    cluster: &ClusterProcess,
    durability: &str,
) -> Vec<(String, String)> {
    let urls: Vec<String> = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
    let mut env = base.to_vec();
    env.extend([
        ("TASKCRED_STORE__BACKEND".into(), "redis_cluster".into()),
        (
            "TASKCRED_STORE__REDIS_URLS".into(),
            format!("[{}]", urls.join(",")),
        ),
        ("TASKCRED_STORE__DURABILITY".into(), durability.into()),
    ]);
    env
}

/// The cluster figures, with `base` the broker environment of the other runs and `dev` the
/// dev PKI.
///
/// # Errors
/// When the cluster or a broker cannot be started or set up.
pub async fn run(
    scratch: &Path,
    dev: &Path,
    base: &[(String, String)],
    shape: Shape,
    channels: usize,
    (leases, revoke): (usize, usize),
) -> Result<Vec<(String, Value)>, String> {
    let dir = scratch.join("cluster");
    let cluster = {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || ClusterProcess::start(&dir))
            .await
            .map_err(|e| e.to_string())??
    };
    let mut out = Vec::new();
    let mut noop_per_sec = 0.0;
    for durability in ["async", "replicated"] {
        eprintln!("bench: broker on the redis cluster, {durability}, EdDSA");
        let b = BrokerProcess::start(dev, &on_cluster(base, &cluster, durability))?;
        let meter = Meter {
            broker: Some(b.pid()),
            redis: None,
        };
        let ch = agent_channels(&b, channels).await?;
        if durability == "async" {
            let n = noop(&ch, shape, meter).await;
            noop_per_sec = n.per_sec;
            out.push(("cluster_noop".into(), figure(&n, &[], Some(0.0))));
        }
        let task = approved_task(&b, "bench: issue tokens on a cluster").await?;
        let s = issue_tokens(&ch, &task, shape, meter).await;
        out.push((
            format!("cluster_issue_token_{durability}"),
            figure(&s, &[("noop", noop_per_sec)], None),
        ));
        b.stop();
        cluster.flush();
    }

    // Force-revoke on an empty store (as the single-server run): the agent's leases only.
    let b = BrokerProcess::start(dev, &on_cluster(base, &cluster, "async"))?;
    let revoked = super::scale::force_revoke(&b, revoke).await;
    b.stop();
    out.extend(
        revoked?
            .into_iter()
            .map(|(k, v)| (format!("cluster_{k}"), v)),
    );
    // It locked the agent: the next runs start on an empty store.
    cluster.flush();

    eprintln!("bench: {leases} leases written into the cluster");
    cluster.flush();
    let store = Arc::new(
        RedisStore::with(&Topology::Cluster(cluster.urls()), Durability::Async)
            .map_err(|e| e.to_string())?,
    );
    store
        .epoch(&crate::store::Epoch::new(SystemTime::now()))
        .await
        .map_err(|e| e.to_string())?;
    let before = cluster.used_memory();
    let mut tasks = Vec::new();
    for i in 0..leases.div_ceil(1000) {
        let t = super::scale::bulk_task(&format!("spiffe://taskcred.dev/agent/bulk-{i}"))?;
        store.create_task(&t).await.map_err(|e| e.to_string())?;
        tasks.push(t);
    }
    let far = SystemTime::now() + Duration::from_secs(3000);
    super::scale::write_leases(&store, &Arc::new(tasks), 0..leases, move |_| far).await?;
    let live = store.live_leases().await.map_err(|e| e.to_string())?;
    #[allow(clippy::cast_precision_loss)]
    let per_lease = cluster.used_memory().saturating_sub(before) as f64 / leases.max(1) as f64;
    out.push((
        "cluster_redis_bytes_per_lease".into(),
        json!(round(per_lease, 0)),
    ));
    out.push(("cluster_live_leases_written".into(), json!(live)));
    cluster.flush();
    drop(store);

    let cluster = Arc::new(std::sync::Mutex::new(cluster));
    for durability in ["async", "replicated"] {
        eprintln!("bench: failover under issuance load, {durability}");
        let env = {
            let c = cluster.lock().map_err(|e| e.to_string())?;
            on_cluster(base, &c, durability)
        };
        let b = BrokerProcess::start(dev, &env)?;
        let figures = failover(&b, &cluster).await;
        b.stop();
        out.push((format!("cluster_failover_{durability}"), figures?));
    }
    Ok(out)
}

/// One failover under load on broker `b`: 12 tasks issued for by 16 loops, a master killed
/// after 2 s, restarted once its replica took over. Figures: seconds from the kill until every
/// task had a credential again, the longest a task went without one, and the credentials
/// answered before the kill that no longer introspect active (their lease lost).
async fn failover(
    b: &BrokerProcess,
    cluster: &Arc<std::sync::Mutex<ClusterProcess>>,
) -> Result<Value, String> {
    let mut tasks = Vec::new();
    for _ in 0..12 {
        tasks.push(approved_task(b, "bench: failover").await?);
    }
    let tasks = Arc::new(tasks);
    let stop = Arc::new(AtomicBool::new(false));
    // Set once the kill is under way; then each task that issues again sets its bit.
    let killing = Arc::new(AtomicBool::new(false));
    let back = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let channel = b.channel(Some("agent")).await?;
    type Attempt = (Instant, usize, Option<String>);
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..16 {
        let (tasks, stop, channel) = (Arc::clone(&tasks), Arc::clone(&stop), channel.clone());
        let (killing, back) = (Arc::clone(&killing), Arc::clone(&back));
        workers.spawn(async move {
            let mut c = CredentialServiceClient::new(channel);
            let mut seen: Vec<Attempt> = Vec::new();
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                let t = i % tasks.len();
                i += 1;
                let sent = Instant::now();
                let after_kill = killing.load(Ordering::Relaxed);
                match c.issue_token(token_request(&tasks[t])).await {
                    Ok(r) => {
                        if after_kill {
                            back.fetch_or(1 << t, Ordering::Relaxed);
                        }
                        seen.push((sent, t, Some(r.into_inner().token)));
                    }
                    Err(_) => {
                        seen.push((sent, t, None));
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            seen
        });
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (killed, promoted) = {
        let cluster = Arc::clone(cluster);
        let killing = Arc::clone(&killing);
        tokio::task::spawn_blocking(move || {
            let mut c = cluster.lock().map_err(|e| e.to_string())?;
            let victim = *c.masters().first().ok_or("no master")?;
            killing.store(true, Ordering::Relaxed);
            let killed = Instant::now();
            let promoted = c.kill_and_fail_over(victim)?;
            c.restart(victim)?;
            Ok::<_, String>((killed, promoted))
        })
        .await
        .map_err(|e| e.to_string())??
    };
    // Load goes on until every task issued again (and a second more), or 20 s past the
    // promotion.
    let all = (1u64 << tasks.len()) - 1;
    while back.load(Ordering::Relaxed) != all && Instant::now() < promoted + Duration::from_secs(20)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let attempts: Vec<Attempt> = workers.join_all().await.into_iter().flatten().collect();
    let mut resumed: HashMap<usize, Instant> = HashMap::new();
    let mut last_before: HashMap<usize, Instant> = HashMap::new();
    let mut answered = Vec::new();
    let mut refused = 0usize;
    for (sent, t, token) in &attempts {
        match token {
            Some(token) if *sent < killed => {
                last_before.insert(*t, *sent);
                answered.push(token.clone());
            }
            Some(_) => {
                resumed.entry(*t).or_insert(*sent);
            }
            None => refused += 1,
        }
    }
    let all_back = (0..tasks.len())
        .map(|t| resumed.get(&t).copied())
        .collect::<Option<Vec<Instant>>>()
        .and_then(|v| v.into_iter().max());
    let longest = (0..tasks.len())
        .filter_map(|t| {
            Some(
                resumed
                    .get(&t)?
                    .saturating_duration_since(*last_before.get(&t)?),
            )
        })
        .max()
        .unwrap_or_default();
    let mut c = CredentialServiceClient::new(channel);
    let mut lost = 0usize;
    let settled = Instant::now() + Duration::from_secs(30);
    for token in &answered {
        // The store may still be settling (a node rejoining): UNAVAILABLE is asked again.
        let active = loop {
            match c
                .introspect(pb::IntrospectRequest {
                    token: token.clone(),
                    certificate: Vec::new(),
                })
                .await
            {
                Ok(r) => break r.get_ref().active,
                Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < settled => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(s) => return Err(format!("Introspect after the failover: {s}")),
            }
        };
        if !active {
            lost += 1;
        }
    }
    Ok(json!({
        "promoted_after_s": round(promoted.saturating_duration_since(killed).as_secs_f64(), 2),
        "all_tasks_issuing_after_s": all_back.map(|t| round(t.saturating_duration_since(killed).as_secs_f64(), 2)),
        "longest_without_issuance_s": round(longest.as_secs_f64(), 2),
        "refused_during": refused,
        "answered_before_kill": answered.len(),
        "leases_lost": lost,
    }))
}
