//! `taskcred bench`: the benchmark anyone can rerun. It starts a scratch Redis and brokers (child
//! processes of this binary, on the dev PKI in a scratch dir, issuance rate limits off), drives
//! each RPC with C calls in flight over K reused mTLS channels for a fixed time, and measures in
//! the same run the floors each figure is bounded by: a no-op authenticated RPC on the same
//! channels, raw signatures per second, raw scripted Redis lease writes per second. It reports
//! one JSON object and a table; every figure carries its ratio to its floor.

pub mod cluster;
pub mod cost;
pub mod floors;
pub mod load;
pub mod scale;
pub mod setup;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::api::pb;
use crate::api::pb::ci_service_client::CiServiceClient;
use crate::api::pb::credential_service_client::CredentialServiceClient;
use crate::api::pb::identity_service_client::IdentityServiceClient;
use crate::api::pb::task_service_client::TaskServiceClient;
use crate::mint::{JwtAlgorithm, JwtKey};
use cost::Meter;
use load::{Shape, Stats, drive_metered};
use setup::{BrokerProcess, RedisProcess};

/// The dev agent every load run acts as.
pub const AGENT: &str = "spiffe://taskcred.dev/agent/demo";
/// The audience of the bench's tasks.
const AUDIENCE: &str = "db.staging";
/// The CI issuer the bench plays (GitHub Actions' claims, its own ES256 key).
const CI_ISSUER: &str = "https://token.actions.githubusercontent.com";
const CI_AUDIENCE: &str = "https://taskcred.bench.invalid";

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The reduced set: shorter windows, no scale runs (under two minutes on 2 cores).
    pub quick: bool,
    /// Calls in flight.
    pub concurrency: usize,
    /// Reused mTLS channels they share.
    pub channels: usize,
    /// Measured seconds per figure (default: 3 quick, 10 otherwise).
    pub seconds: Option<f64>,
    /// Run the scale runs (default: not with --quick).
    pub scale: bool,
    /// Live leases of the scale runs.
    pub scale_leases: usize,
    /// Leases of the force-revoke run.
    pub revoke_leases: usize,
    /// Run the Redis Cluster figures instead (`--store cluster`: a local 3-master cluster).
    pub cluster: bool,
}

/// A figure with its floors: `{per_sec, p50_ms, ..., broker_cpu_us, overhead_us,
/// ratio_to_<floor>}`. `unavoidable_us` is the CPU per call of the cryptography the call cannot
/// avoid (its signature, a CSR's check, a handshake): `overhead_us` is the broker's CPU per call
/// beyond it.
fn figure(stats: &Stats, floors: &[(&str, f64)], unavoidable_us: Option<f64>) -> Value {
    let mut v = serde_json::to_value(stats).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        for key in ["broker_cpu_us", "redis_cpu_us"] {
            if let Some(us) = m.get(key).and_then(Value::as_f64) {
                m.insert(key.into(), json!(round(us, 1)));
            }
        }
        if let (Some(cpu), Some(floor)) = (stats.broker_cpu_us, unavoidable_us) {
            m.insert("unavoidable_us".into(), json!(round(floor, 1)));
            m.insert("overhead_us".into(), json!(round(cpu - floor, 1)));
        }
        for (name, per_sec) in floors {
            let ratio = if *per_sec > 0.0 {
                stats.per_sec / per_sec
            } else {
                0.0
            };
            m.insert(format!("ratio_to_{name}"), json!(round(ratio, 3)));
        }
    }
    v
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The machine, for the record.
fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({
        "cores": std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        "cpu": cpu,
        "kernel": kernel.trim(),
    })
}

/// An approved task for the dev agent: requested by the requester, approved if policy asks.
///
/// # Errors
/// When the broker refuses.
pub async fn approved_task(b: &BrokerProcess, purpose: &str) -> Result<String, String> {
    let request = pb::RequestTaskRequest {
        executor: AGENT.into(),
        purpose: purpose.into(),
        grants: vec![pb::Grant {
            audience: AUDIENCE.into(),
            actions: vec!["read".into()],
        }],
        labels: [("env".to_owned(), "staging".to_owned())].into(),
        deadline: Some(prost_types::Duration {
            seconds: 3 * 3600,
            nanos: 0,
        }),
        ..Default::default()
    };
    let task = TaskServiceClient::new(b.channel(Some("requester")).await?)
        .request_task(request)
        .await
        .map_err(|e| format!("RequestTask: {e}"))?
        .into_inner();
    if task.state == pb::TaskState::Approved as i32 {
        return Ok(task.id);
    }
    TaskServiceClient::new(b.channel(Some("approver")).await?)
        .approve_task(pb::DecideTaskRequest {
            task_id: task.id.clone(),
            note: "bench".into(),
        })
        .await
        .map_err(|e| format!("ApproveTask: {e}"))?;
    Ok(task.id)
}

/// `k` channels as the dev agent.
async fn agent_channels(b: &BrokerProcess, k: usize) -> Result<Arc<Vec<Channel>>, String> {
    let mut v = Vec::with_capacity(k);
    for _ in 0..k.max(1) {
        v.push(b.channel(Some("agent")).await?);
    }
    Ok(Arc::new(v))
}

fn token_request(task: &str) -> pb::IssueTokenRequest {
    pb::IssueTokenRequest {
        task_id: task.into(),
        audience: AUDIENCE.into(),
        actions: vec!["read".into()],
        ttl: None,
        request_id: String::new(),
    }
}

/// `IssueToken` with `shape` over `channels`.
async fn issue_tokens(
    channels: &Arc<Vec<Channel>>,
    task: &str,
    shape: Shape,
    meter: Meter,
) -> Stats {
    let (channels, request) = (Arc::clone(channels), token_request(task));
    drive_metered(shape, meter, move |w, _| {
        let mut c = CredentialServiceClient::new(channels[w % channels.len()].clone());
        let request = request.clone();
        async move {
            c.issue_token(request)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    })
    .await
}

/// The no-op authenticated RPC (`WhoAmI`: the identity check and nothing else).
async fn noop(channels: &Arc<Vec<Channel>>, shape: Shape, meter: Meter) -> Stats {
    let channels = Arc::clone(channels);
    drive_metered(shape, meter, move |w, _| {
        let mut c = IdentityServiceClient::new(channels[w % channels.len()].clone());
        async move {
            c.who_am_i(pb::WhoAmIRequest {})
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    })
    .await
}

/// `IssueCertificate` from P-256 CSRs (a pool made before the run: key generation is the
/// client's cost, not the broker's).
async fn issue_certificates(
    channels: &Arc<Vec<Channel>>,
    task: &str,
    shape: Shape,
    meter: Meter,
) -> Result<Stats, String> {
    let mut csrs = Vec::new();
    for _ in 0..64 {
        let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .map_err(|e| e.to_string())?;
        csrs.push(csr.der().to_vec());
    }
    let (channels, csrs, task) = (Arc::clone(channels), Arc::new(csrs), task.to_owned());
    Ok(drive_metered(shape, meter, move |w, n| {
        let mut c = CredentialServiceClient::new(channels[w % channels.len()].clone());
        #[allow(clippy::cast_possible_truncation)]
        let csr = csrs[(n as usize + w) % csrs.len()].clone();
        let task = task.clone();
        async move {
            c.issue_certificate(pb::IssueCertificateRequest {
                task_id: task,
                csr,
                ttl: None,
                request_id: String::new(),
            })
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
        }
    })
    .await)
}

/// `Introspect` of tokens issued before the run.
async fn introspections(
    channels: &Arc<Vec<Channel>>,
    task: &str,
    shape: Shape,
    meter: Meter,
) -> Result<Stats, String> {
    let mut c = CredentialServiceClient::new(channels[0].clone());
    let mut tokens = Vec::new();
    for _ in 0..256 {
        tokens.push(
            c.issue_token(token_request(task))
                .await
                .map_err(|e| e.to_string())?
                .into_inner()
                .token,
        );
    }
    let (channels, tokens) = (Arc::clone(channels), Arc::new(tokens));
    Ok(drive_metered(shape, meter, move |w, n| {
        let mut c = CredentialServiceClient::new(channels[w % channels.len()].clone());
        #[allow(clippy::cast_possible_truncation)]
        let token = tokens[(n as usize * 7 + w) % tokens.len()].clone();
        async move {
            match c
                .introspect(pb::IntrospectRequest {
                    token,
                    certificate: Vec::new(),
                })
                .await
            {
                Ok(r) if r.get_ref().active => Ok(()),
                Ok(_) => Err("a live token introspected inactive".into()),
                Err(e) => Err(e.to_string()),
            }
        }
    })
    .await)
}

/// The bench's CI issuer: its key and the JWK Set file the broker trusts.
struct CiIssuer {
    key: JwtKey,
}

impl CiIssuer {
    fn new(dir: &std::path::Path) -> Result<(Self, String), String> {
        let key = JwtKey::generate(JwtAlgorithm::ES256).map_err(|e| e.to_string())?;
        let jwks = dir.join("ci-jwks.json");
        std::fs::write(&jwks, json!({"keys": [key.public_jwk()]}).to_string())
            .map_err(|e| e.to_string())?;
        let config = format!(
            r#"[{{name = "github", preset = "github", issuer = "{CI_ISSUER}", audience = "{CI_AUDIENCE}", algorithms = ["ES256"], jwks_file = "{}"}}]"#,
            jwks.display()
        );
        Ok((Self { key }, config))
    }

    /// `n` GitHub-shaped ID tokens of one run of `main` in production (each exchanged once).
    fn tokens(&self, n: usize, run: &str) -> Result<Vec<String>, String> {
        let t = unix_now();
        (0..n)
            .map(|_| {
                let claims = json!({
                    "iss": CI_ISSUER, "aud": CI_AUDIENCE, "iat": t - 5, "nbf": t - 5,
                    "exp": t + 900, "jti": uuid::Uuid::now_v7().simple().to_string(),
                    "sub": "repo:example-org/app:environment:production",
                    "repository": "example-org/app", "repository_id": "123456789",
                    "repository_owner": "example-org", "repository_owner_id": "987654321",
                    "ref": "refs/heads/main", "ref_type": "branch", "environment": "production",
                    "event_name": "push", "run_id": run, "run_attempt": "1",
                    "workflow_ref": "example-org/app/.github/workflows/deploy.yml@refs/heads/main",
                    "job_workflow_ref": "example-org/app/.github/workflows/deploy.yml@refs/heads/main",
                    "sha": "0123456789abcdef0123456789abcdef01234567", "actor": "bench",
                });
                self.key.sign_jws("JWT", &claims).map_err(|e| e.to_string())
            })
            .collect()
    }
}

/// `ExchangeCiToken`, each over a fresh TLS connection without a client certificate.
async fn ci_exchanges(
    b: &BrokerProcess,
    issuer: &CiIssuer,
    shape: Shape,
    meter: Meter,
) -> Result<Stats, String> {
    // Enough ID tokens for any rate this machine reaches (each is exchanged once).
    let secs = (shape.warmup + shape.measure).as_secs_f64();
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let n = (secs * 6000.0) as usize;
    let tokens = Arc::new(issuer.tokens(n, &unix_now().to_string())?);
    let next = Arc::new(AtomicUsize::new(0));
    let (grpc, dev) = (b.grpc, b.dev_dir().to_owned());
    Ok(drive_metered(shape, meter, move |_, _| {
        let (tokens, next, dev) = (Arc::clone(&tokens), Arc::clone(&next), dev.clone());
        async move {
            let token = tokens
                .get(next.fetch_add(1, Ordering::Relaxed))
                .ok_or("ran out of ID tokens")?
                .clone();
            let channel = setup::channel(grpc, &dev, None).await?;
            CiServiceClient::new(channel)
                .exchange_ci_token(pb::ExchangeCiTokenRequest {
                    id_token: token,
                    audience: "prod-cluster".into(),
                    actions: vec!["deploy".into()],
                    ..Default::default()
                })
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    })
    .await)
}

/// The environment of every bench broker: budgets off (the load comes from one identity and
/// one address), warnings only, the bench's CI issuer.
fn bench_env(ci_config: &str) -> Vec<(String, String)> {
    vec![
        ("TASKCRED_LIMITS__ISSUANCE_PER_SECOND".into(), "0".into()),
        ("TASKCRED_LIMITS__CI_PER_SECOND".into(), "0".into()),
        ("TASKCRED_LIMITS__RPC_PER_SECOND".into(), "0".into()),
        ("TASKCRED_LIMITS__PUBLIC_PER_SECOND".into(), "0".into()),
        // Every load client comes from one address: the per-source connection budgets are
        // for attackers, not for the bench's fresh-TLS clients.
        (
            "TASKCRED_SERVER__MAX_ANONYMOUS_CONNECTIONS_PER_SOURCE".into(),
            "100000".into(),
        ),
        (
            "TASKCRED_SERVER__MAX_HANDSHAKES_PER_SOURCE".into(),
            "100000".into(),
        ),
        ("TASKCRED_LOG__LEVEL".into(), "warn".into()),
        ("TASKCRED_CI__ISSUERS".into(), ci_config.to_owned()),
    ]
}

/// Runs the bench.
///
/// # Errors
/// When a broker or Redis cannot be started or set up (a failed call inside a run is counted in
/// its figure, not an error).
#[allow(clippy::too_many_lines)]
pub async fn run(opts: &Options) -> Result<Value, String> {
    let secs = opts.seconds.unwrap_or(if opts.quick { 3.0 } else { 10.0 });
    let shape = Shape {
        concurrency: opts.concurrency.max(1),
        warmup: Duration::from_secs_f64((secs / 5.0).clamp(0.5, 2.0)),
        measure: Duration::from_secs_f64(secs),
    };
    let sign_time = Duration::from_secs_f64((secs / 3.0).clamp(1.0, 3.0));
    let scratch = tempfile::tempdir().map_err(|e| e.to_string())?;
    let dev = scratch.path().join("dev");
    crate::devpki::init(&dev).map_err(|e| e.to_string())?;
    let eddsa_key = dev.join("jwt-key-eddsa.pem");
    JwtKey::generate(JwtAlgorithm::EdDSA)
        .and_then(|k| k.save(&eddsa_key))
        .map_err(|e| e.to_string())?;
    let (ci, ci_config) = CiIssuer::new(&dev)?;
    if opts.cluster {
        let base = bench_env(&ci_config);
        let mut out = json!({
            "machine": machine(),
            "store": "cluster",
            "concurrency": shape.concurrency,
            "channels": opts.channels,
            "measure_secs": secs,
            "quick": opts.quick,
        });
        let figures = cluster::run(
            scratch.path(),
            &dev,
            &base,
            shape,
            opts.channels,
            (
                opts.scale_leases.min(cluster::MEMORY_LEASES),
                opts.revoke_leases,
            ),
        )
        .await?;
        let m = out.as_object_mut().ok_or("report")?;
        m.extend(figures);
        return Ok(out);
    }
    let redis = match RedisProcess::start(&scratch.path().join("redis")) {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("bench: no Redis ({e}): the store figures are the embedded store's");
            None
        }
    };
    let env = |store: &str, alg: &str| -> Vec<(String, String)> {
        let mut env = bench_env(&ci_config);
        if let (Some(r), "redis") = (&redis, store) {
            env.push(("TASKCRED_STORE__BACKEND".into(), "redis".into()));
            env.push(("TASKCRED_STORE__REDIS_URL".into(), r.url.clone()));
        }
        if alg == "EdDSA" {
            env.push(("TASKCRED_ISSUER__JWT_ALGORITHM".into(), "EdDSA".into()));
            env.push((
                "TASKCRED_ISSUER__JWT_KEY".into(),
                eddsa_key.display().to_string(),
            ));
        }
        env
    };
    let store = if redis.is_some() { "redis" } else { "embedded" };
    let mut out = json!({
        "machine": machine(),
        "store": store,
        "concurrency": shape.concurrency,
        "channels": opts.channels,
        "measure_secs": secs,
        "quick": opts.quick,
    });

    eprintln!("bench: floors (raw signatures and checks, TLS handshakes, raw Redis lease writes)");
    let cores = floors::cores();
    let sign_ed25519 = floors::signatures_per_sec("ed25519", sign_time)?;
    let sign_p256 = floors::signatures_per_sec("p256", sign_time)?;
    let verify_p256 = floors::verifications_per_sec("p256", sign_time)?;
    let verify_ed25519 = floors::verifications_per_sec("ed25519", sign_time)?;
    let ci_hs = floors::ci_handshakes_per_sec(sign_time)?;
    let (sign_ed25519_us, sign_p256_us) = (sign_ed25519.us, sign_p256.us);
    let (verify_p256_us, ci_floor_us) = (verify_p256.us, ci_hs.us);
    let (sign_ed25519, sign_p256, ci_floor) =
        (sign_ed25519.per_sec, sign_p256.per_sec, ci_hs.per_sec);
    let redis_pid = redis.as_ref().map(RedisProcess::pid);
    let redis_floor = match &redis {
        Some(r) => Some(
            floors::redis_lease_writes(
                &r.url,
                shape,
                Meter {
                    broker: None,
                    redis: redis_pid,
                },
            )
            .await?,
        ),
        None => None,
    };
    let redis_per_sec = redis_floor.as_ref().map_or(0.0, |s| s.per_sec);
    let meter = |b: &BrokerProcess, store: &str| Meter {
        broker: Some(b.pid()),
        redis: if store == "redis" { redis_pid } else { None },
    };

    eprintln!("bench: broker on {store}, EdDSA");
    let a = BrokerProcess::start(&dev, &env(store, "EdDSA"))?;
    let ma = meter(&a, store);
    let channels = agent_channels(&a, opts.channels).await?;
    let task = approved_task(&a, "bench: issue tokens").await?;
    eprintln!("bench: noop");
    let noop = noop(&channels, shape, ma).await;
    let noop_per_sec = noop.per_sec;
    eprintln!("bench: IssueToken (EdDSA)");
    let token = issue_tokens(&channels, &task, shape, ma).await;
    eprintln!("bench: IssueCertificate");
    let cert = issue_certificates(&channels, &task, shape, ma).await?;
    eprintln!("bench: Introspect");
    let intro = introspections(&channels, &task, shape, ma).await?;
    eprintln!("bench: ExchangeCiToken over fresh TLS");
    let ci_fresh = ci_exchanges(&a, &ci, shape, ma).await?;
    a.stop();

    eprintln!("bench: broker on {store}, ES256");
    let b = BrokerProcess::start(&dev, &env(store, "ES256"))?;
    let channels_b = agent_channels(&b, opts.channels).await?;
    let task_b = approved_task(&b, "bench: issue ES256 tokens").await?;
    let token_es256 = issue_tokens(&channels_b, &task_b, shape, meter(&b, store)).await;
    b.stop();

    // The shipped production setting: Redis fsyncs its AOF before it answers each write.
    let token_fsync_always = match &redis {
        Some(r) => {
            eprintln!("bench: broker on redis with appendfsync always, EdDSA");
            r.config_set("appendfsync", "always").await?;
            let d = BrokerProcess::start(&dev, &env("redis", "EdDSA"))?;
            let channels_d = agent_channels(&d, opts.channels).await?;
            let task_d = approved_task(&d, "bench: issue tokens, appendfsync always").await?;
            let s = issue_tokens(&channels_d, &task_d, shape, meter(&d, "redis")).await;
            d.stop();
            r.config_set("appendfsync", "everysec").await?;
            Some(s)
        }
        None => None,
    };

    let token_embedded = if redis.is_some() {
        eprintln!("bench: broker on the embedded store, EdDSA");
        let c = BrokerProcess::start(&dev, &env("embedded", "EdDSA"))?;
        let channels_c = agent_channels(&c, opts.channels).await?;
        let task_c = approved_task(&c, "bench: issue tokens, embedded").await?;
        let s = issue_tokens(&channels_c, &task_c, shape, meter(&c, "embedded")).await;
        c.stop();
        s
    } else {
        token.clone()
    };

    let m = out.as_object_mut().ok_or("report")?;
    m.insert("noop".into(), figure(&noop, &[], Some(0.0)));
    m.insert(
        "issue_token".into(),
        figure(
            &token,
            &[
                ("noop", noop_per_sec),
                ("sign_ed25519", sign_ed25519),
                ("redis_lease_write", redis_per_sec),
            ],
            Some(sign_ed25519_us),
        ),
    );
    m.insert(
        "issue_token_es256".into(),
        figure(
            &token_es256,
            &[
                ("noop", noop_per_sec),
                ("sign_p256", sign_p256),
                ("redis_lease_write", redis_per_sec),
            ],
            Some(sign_p256_us),
        ),
    );
    if let Some(s) = &token_fsync_always {
        m.insert(
            "issue_token_fsync_always".into(),
            figure(
                s,
                &[("noop", noop_per_sec), ("issue_token", token.per_sec)],
                Some(sign_ed25519_us),
            ),
        );
    }
    m.insert(
        "issue_token_embedded".into(),
        figure(
            &token_embedded,
            &[("noop", noop_per_sec), ("sign_ed25519", sign_ed25519)],
            Some(sign_ed25519_us),
        ),
    );
    // The certificate's P-256 signature by the issuing CA, and the CSR's P-256 check.
    m.insert(
        "issue_certificate".into(),
        figure(
            &cert,
            &[
                ("noop", noop_per_sec),
                ("sign_p256", sign_p256),
                ("redis_lease_write", redis_per_sec),
            ],
            Some(sign_p256_us + verify_p256_us),
        ),
    );
    // Nothing is unavoidable: a token the broker issued can be known by its hash.
    m.insert(
        "introspect".into(),
        figure(&intro, &[("noop", noop_per_sec)], Some(0.0)),
    );
    // The handshake and the ID token's check (both ends of the handshake are in the floor, as
    // both run on this machine), and the signature of the token handed out.
    m.insert(
        "ci_exchange_fresh_tls".into(),
        figure(
            &ci_fresh,
            &[("noop", noop_per_sec), ("ci_floor", ci_floor)],
            Some(ci_floor_us + sign_ed25519_us),
        ),
    );
    m.insert(
        "floors".into(),
        json!({
            "cores": cores,
            "noop_per_sec": round(noop_per_sec, 0),
            "sign_ed25519_per_sec": round(sign_ed25519, 0),
            "sign_p256_per_sec": round(sign_p256, 0),
            "verify_p256_per_sec": round(verify_p256.per_sec, 0),
            "verify_ed25519_per_sec": round(verify_ed25519.per_sec, 0),
            "sign_ed25519_us": round(sign_ed25519_us, 1),
            "sign_p256_us": round(sign_p256_us, 1),
            "verify_p256_us": round(verify_p256_us, 1),
            "verify_ed25519_us": round(verify_ed25519.us, 1),
            "ci_floor_per_sec": round(ci_floor, 0),
            "ci_floor_us": round(ci_floor_us, 1),
            "redis_lease_write_per_sec": round(redis_per_sec, 0),
            "redis_lease_write": redis_floor.as_ref().map(|s| figure(s, &[], None)),
        }),
    );

    if opts.scale {
        match &redis {
            Some(r) => {
                // A fresh store: the load runs' leases are not part of the scale runs.
                r.flush().await?;
                let env = env("redis", "EdDSA");
                let a = BrokerProcess::start(&dev, &env)?;
                let sizes = (opts.scale_leases, opts.revoke_leases);
                let report = scale::run(&a, r, sizes, shape, &env).await;
                a.stop();
                for (k, v) in report? {
                    m.insert(k, v);
                }
            }
            None => eprintln!("bench: the scale runs need redis-server; skipped"),
        }
    }
    Ok(out)
}

/// The table of `report`.
pub fn table(report: &Value) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    if report["store"] == "cluster" {
        for (k, v) in report.as_object().into_iter().flatten() {
            if let Some(name) = k.strip_prefix("cluster_") {
                let _ = writeln!(s, "{name:<32} {v}");
            }
        }
        return s;
    }
    let _ = writeln!(
        s,
        "{:<24} {:>10} {:>8} {:>8} {:>8} {:>7} {:>7} {:>7} {:>7}  ratios to floors",
        "figure",
        "per sec",
        "p50 ms",
        "p99 ms",
        "p999 ms",
        "errors",
        "cpu us",
        "over us",
        "redis us"
    );
    for name in [
        "noop",
        "issue_token",
        "issue_token_es256",
        "issue_token_embedded",
        "issue_certificate",
        "introspect",
        "ci_exchange_fresh_tls",
    ] {
        let f = &report[name];
        let ratios: Vec<String> = f
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| {
                k.strip_prefix("ratio_to_")
                    .map(|floor| format!("{floor} {:.2}", v.as_f64().unwrap_or_default()))
            })
            .collect();
        let us = |key: &str| {
            f[key]
                .as_f64()
                .map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"))
        };
        let _ = writeln!(
            s,
            "{:<24} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>7} {:>7} {:>7} {:>7}  {}",
            name,
            f["per_sec"].as_f64().unwrap_or_default(),
            f["p50_ms"].as_f64().unwrap_or_default(),
            f["p99_ms"].as_f64().unwrap_or_default(),
            f["p999_ms"].as_f64().unwrap_or_default(),
            f["errors"].as_u64().unwrap_or_default(),
            us("broker_cpu_us"),
            us("overhead_us"),
            us("redis_cpu_us"),
            ratios.join(", ")
        );
    }
    let fl = &report["floors"];
    let _ = writeln!(
        s,
        "floors: noop {:.0}/s, Ed25519 {:.0} sig/s ({:.1} us), P-256 {:.0} sig/s ({:.1} us), \
         P-256 check {:.1} us, CI handshake + check {:.0}/s ({:.0} us), Redis lease writes {:.0}/s",
        fl["noop_per_sec"].as_f64().unwrap_or_default(),
        fl["sign_ed25519_per_sec"].as_f64().unwrap_or_default(),
        fl["sign_ed25519_us"].as_f64().unwrap_or_default(),
        fl["sign_p256_per_sec"].as_f64().unwrap_or_default(),
        fl["sign_p256_us"].as_f64().unwrap_or_default(),
        fl["verify_p256_us"].as_f64().unwrap_or_default(),
        fl["ci_floor_per_sec"].as_f64().unwrap_or_default(),
        fl["ci_floor_us"].as_f64().unwrap_or_default(),
        fl["redis_lease_write_per_sec"].as_f64().unwrap_or_default(),
    );
    for key in [
        "start_ms_1m_leases",
        "force_revoke_10k_ms",
        "force_revoke_10k_verified_ms",
        "reaper_lag_p99_ms",
        "reaper_lag_max_ms",
        "redis_bytes_per_lease",
        "broker_rss_bytes_before",
        "broker_rss_bytes_after",
        "broker_idle_cpu_percent",
    ] {
        if let Some(v) = report.get(key) {
            let _ = writeln!(s, "{key}: {v}");
        }
    }
    s
}
