//! CI per-job credentials: a local OIDC issuer (its own RSA key made by `openssl`, signing with
//! ring; its JWK Set in a file or served over HTTP) mints GitHub- and GitLab-shaped ID tokens
//! that real brokers exchange over TLS without a client certificate. The dev policies decide
//! (`config/policies/ci.cedar`): `main` of example-org/app (by id) in production may deploy.
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::common::Broker;
use crate::common::flows::{introspect, tasks_as};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jwt_simple::prelude::{ECDSAP256PublicKeyLike as _, ES256PublicKey, NoCustomClaims};
use rustls::pki_types::pem::PemObject as _;
use serde_json::{Value, json};
use taskcred::api::pb;
use taskcred::api::pb::ci_service_client::CiServiceClient;
use tonic::Code;

/// The series of the CI repositories' rate limit.
const LIMITED_CI: &str = "taskcred_rate_limited_total{kind=\"ci\"}";

const GITHUB: &str = "https://token.actions.githubusercontent.com";
const GITLAB: &str = "https://gitlab.example.com";
const AUDIENCE: &str = "https://taskcred.example.test";

/// A test OIDC issuer: an RSA key and the JWK Set publishing it.
struct TestIssuer {
    key: ring::rsa::KeyPair,
    kid: String,
}

impl TestIssuer {
    fn new(kid: &str) -> Self {
        let out = std::process::Command::new("openssl")
            .stderr(std::process::Stdio::null())
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-outform",
                "DER",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "openssl genpkey failed");
        Self {
            // PKCS#8 or, from some OpenSSL versions, PKCS#1.
            key: ring::rsa::KeyPair::from_pkcs8(&out.stdout)
                .or_else(|_| ring::rsa::KeyPair::from_der(&out.stdout))
                .unwrap(),
            kid: kid.into(),
        }
    }

    fn jwk(&self) -> Value {
        let c: ring::rsa::PublicKeyComponents<Vec<u8>> = self.key.public().into();
        let (n, e) = (c.n, c.e);
        json!({"kty": "RSA", "kid": self.kid, "use": "sig", "alg": "RS256",
               "n": URL_SAFE_NO_PAD.encode(n), "e": URL_SAFE_NO_PAD.encode(e)})
    }

    fn sign_with_header(&self, header: &Value, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut sig = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(
                &ring::signature::RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                input.as_bytes(),
                &mut sig,
            )
            .unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
    }

    fn sign(&self, claims: &Value) -> String {
        self.sign_with_header(
            &json!({"alg": "RS256", "typ": "JWT", "kid": self.kid}),
            claims,
        )
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn fresh_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

/// A GitHub Actions ID token's claims: `main` of example-org/app, production, run `run`.
fn github_claims(run: &str) -> Value {
    let t = now();
    json!({
        "iss": GITHUB, "aud": AUDIENCE, "iat": t - 5, "nbf": t - 5, "exp": t + 300,
        "jti": fresh_id(),
        "sub": "repo:example-org/app:environment:production",
        "repository": "example-org/app", "repository_id": "123456789",
        "repository_owner": "example-org", "repository_owner_id": "987654321",
        "ref": "refs/heads/main", "ref_type": "branch", "environment": "production",
        "event_name": "push", "workflow_ref": "example-org/app/.github/workflows/deploy.yml@refs/heads/main",
        "job_workflow_ref": "example-org/app/.github/workflows/deploy.yml@refs/heads/main",
        "run_id": run, "run_attempt": "1", "check_run_id": "5001",
        "runner_environment": "github-hosted",
        "sha": "0123456789abcdef0123456789abcdef01234567", "actor": "octocat",
    })
}

fn gitlab_claims(job: &str, protected: &str) -> Value {
    let t = now();
    json!({
        "iss": GITLAB, "aud": AUDIENCE, "iat": t - 5, "nbf": t - 5, "exp": t + 600,
        "jti": fresh_id(),
        "sub": "project_path:group/proj:ref_type:branch:ref:main",
        "namespace_id": "77", "namespace_path": "group", "project_id": "4242",
        "project_path": "group/proj", "pipeline_id": "9001", "pipeline_source": "push",
        "job_id": job, "ref": "main", "ref_type": "branch", "ref_protected": protected,
        "user_login": "alice", "sha": "abc",
    })
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

fn issuer_env(issuers: &[String]) -> Vec<(String, String)> {
    vec![(
        "TASKCRED_CI__ISSUERS".into(),
        format!("[{}]", issuers.join(", ")),
    )]
}

fn github_issuer(jwks_file: &std::path::Path) -> String {
    format!(
        r#"{{name = "github", preset = "github", issuer = "{GITHUB}", audience = "{AUDIENCE}", jwks_file = "{}"}}"#,
        jwks_file.display()
    )
}

/// A broker trusting `issuer` as GitHub Actions, its JWK Set in a file; `extra` env on top.
async fn github_broker(issuer: &TestIssuer, extra: Vec<(String, String)>) -> Broker {
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("github-jwks.json");
    std::fs::write(&jwks, json!({"keys": [issuer.jwk()]}).to_string()).unwrap();
    let mut env = issuer_env(&[github_issuer(&jwks)]);
    env.extend(extra);
    Broker::launch(dir, env, None).await
}

async fn ci_client(b: &Broker) -> CiServiceClient<tonic::transport::Channel> {
    // No client certificate: the ID token is the only proof.
    CiServiceClient::new(b.channel(None).await)
}

fn exchange(token: &str, audience: &str, action: &str) -> pb::ExchangeCiTokenRequest {
    pb::ExchangeCiTokenRequest {
        id_token: token.into(),
        audience: audience.into(),
        actions: vec![action.into()],
        ..Default::default()
    }
}

fn payload(token: &str) -> Value {
    serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap()
}

fn audit_lines(b: &Broker) -> Vec<Value> {
    crate::common::audit_lines(&b.path("audit.jsonl"))
}

/// The Checked-by of the issue, and the job's end.
#[tokio::test]
async fn a_github_token_is_exchanged_once_and_policy_decides_by_branch() {
    let issuer = TestIssuer::new("gh-1");
    let b = github_broker(&issuer, Vec::new()).await;
    let mut ci = ci_client(&b).await;

    let id_token = issuer.sign(&github_claims("1001"));
    let r = ci
        .exchange_ci_token(exchange(&id_token, "prod-cluster", "deploy"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.identity, "spiffe://ci.taskcred.dev/ci/github/123456789");
    let claims = payload(&r.token);
    assert_eq!(claims["sub"], r.identity.as_str());
    assert_eq!(claims["aud"], "prod-cluster");
    assert_eq!(claims["scope"], "deploy");
    assert_eq!(claims["task_id"], r.task_id.as_str());
    assert_eq!(claims["ci"]["repository"], "example-org/app");
    assert_eq!(claims["ci"]["repository_id"], "123456789");
    assert_eq!(claims["ci"]["run_id"], "1001");
    assert_eq!(claims["ci"]["ref"], "refs/heads/main");
    assert!(claims.get("cnf").is_none(), "no client certificate: no cnf");
    // The token's exp never passes the ID token's.
    assert!(claims["exp"].as_i64().unwrap() <= now() + 300);

    // An independent JOSE implementation verifies it with the broker's JWK Set.
    let (_, body) = b.http_get("/.well-known/jwks.json").await;
    let jwks: Value = serde_json::from_str(&body).unwrap();
    let jwk = &jwks["keys"][0];
    let mut point = vec![4u8];
    point.extend(URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap());
    point.extend(URL_SAFE_NO_PAD.decode(jwk["y"].as_str().unwrap()).unwrap());
    ES256PublicKey::from_bytes(&point)
        .unwrap()
        .verify_token::<NoCustomClaims>(&r.token, None)
        .unwrap();
    assert!(introspect(&b, &r.token).await.active);

    // The same ID token again: refused, audited.
    let replay = ci
        .exchange_ci_token(exchange(&id_token, "prod-cluster", "deploy"))
        .await
        .unwrap_err();
    assert_eq!(replay.code(), Code::PermissionDenied, "{replay:?}");
    assert!(replay.message().contains("already exchanged"));

    // Another branch of the same repository: policy refuses.
    let feature = with(github_claims("1002"), "ref", json!("refs/heads/feature"));
    let refused = ci
        .exchange_ci_token(exchange(&issuer.sign(&feature), "prod-cluster", "deploy"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    // A second job of the same run (its own signed check_run_id) gets its own task.
    let smoke = with(github_claims("1001"), "check_run_id", json!("5002"));
    let other = ci
        .exchange_ci_token(exchange(&issuer.sign(&smoke), "prod-cluster", "deploy"))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(other.task_id, r.task_id);

    // The job's last step: an ID token of the same job ends the task and its credentials.
    let done = ci
        .complete_ci_task(pb::CompleteCiTaskRequest {
            id_token: issuer.sign(&github_claims("1001")),
            outcome: pb::Outcome::Succeeded as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.task.unwrap().id, r.task_id);
    assert_eq!(done.revoked_leases, 1);
    assert!(!introspect(&b, &r.token).await.active);
    assert!(introspect(&b, &other.token).await.active);

    // Every refusal is audited, with the ID token's hash, never the token.
    let audit = audit_lines(&b);
    let text = std::fs::read_to_string(b.path("audit.jsonl")).unwrap();
    assert!(!text.contains(&id_token) && !text.contains(&r.token));
    let refusals: Vec<&Value> = audit
        .iter()
        .filter(|l| l["action"] == "ExchangeCiToken" && l["decision"] == "deny")
        .collect();
    assert_eq!(refusals.len(), 2, "{refusals:?}");
    assert!(
        refusals
            .iter()
            .all(|l| l.to_string().contains("id_token_sha256"))
    );
    b.stop().await;
}

/// Every bad input of the issue: refused with a clear status and an audit line.
#[tokio::test]
async fn bad_id_tokens_are_refused_with_clear_statuses() {
    let issuer = TestIssuer::new("gh-1");
    let stranger = TestIssuer::new("gh-1");
    let b = github_broker(&issuer, Vec::new()).await;
    let mut ci = ci_client(&b).await;
    let good = || github_claims(&fresh_id());
    let t = now();
    let hs256 = {
        // HMAC keyed with the issuer's public key (the classic RS/HS confusion).
        let header = json!({"alg": "HS256", "typ": "JWT", "kid": "gh-1"});
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(good().to_string())
        );
        let key =
            ring::hmac::Key::new(ring::hmac::HMAC_SHA256, issuer.jwk().to_string().as_bytes());
        let tag = ring::hmac::sign(&key, input.as_bytes());
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    };
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(json!({"alg": "none", "typ": "JWT"}).to_string()),
        URL_SAFE_NO_PAD.encode(good().to_string())
    );
    let tampered = {
        let token = issuer.sign(&good());
        let parts: Vec<&str> = token.split('.').collect();
        let changed = with(good(), "ref", json!("refs/heads/main-but-not"));
        format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(changed.to_string()),
            parts[2]
        )
    };
    let cases: Vec<(&str, String, Code)> = vec![
        (
            "wrong issuer",
            issuer.sign(&with(good(), "iss", json!("https://evil.example.com"))),
            Code::Unauthenticated,
        ),
        (
            "wrong aud",
            issuer.sign(&with(good(), "aud", json!("https://other.example.com"))),
            Code::Unauthenticated,
        ),
        (
            "GitHub's default audience",
            issuer.sign(&with(
                good(),
                "aud",
                json!("https://github.com/example-org"),
            )),
            Code::Unauthenticated,
        ),
        (
            "expired",
            issuer.sign(&with(
                with(good(), "exp", json!(t - 120)),
                "iat",
                json!(t - 400),
            )),
            Code::Unauthenticated,
        ),
        (
            "not yet valid",
            issuer.sign(&with(good(), "nbf", json!(t + 600))),
            Code::Unauthenticated,
        ),
        (
            "too old",
            issuer.sign(&with(good(), "iat", json!(t - 3 * 3600))),
            Code::Unauthenticated,
        ),
        ("alg none", none, Code::Unauthenticated),
        ("HS256 with the public key", hs256, Code::Unauthenticated),
        (
            "unknown kid",
            issuer.sign_with_header(
                &json!({"alg": "RS256", "typ": "JWT", "kid": "nobody"}),
                &good(),
            ),
            Code::Unauthenticated,
        ),
        (
            "signed by another key with the same kid",
            stranger.sign(&good()),
            Code::Unauthenticated,
        ),
        ("tampered payload", tampered, Code::Unauthenticated),
        (
            "repository name matches, id differs",
            issuer.sign(&with(good(), "repository_id", json!("55555"))),
            Code::PermissionDenied,
        ),
        (
            "environment policy does not allow",
            issuer.sign(&with(good(), "environment", json!("staging"))),
            Code::PermissionDenied,
        ),
        (
            "a pull request",
            issuer.sign(&with(good(), "event_name", json!("pull_request"))),
            Code::PermissionDenied,
        ),
        (
            "over the size limit",
            issuer.sign(&with(good(), "padding", json!("x".repeat(9000)))),
            Code::InvalidArgument,
        ),
        ("not a JWT", "a.b".into(), Code::InvalidArgument),
    ];
    let before = audit_lines(&b).len();
    for (what, token, code) in &cases {
        let e = ci
            .exchange_ci_token(exchange(token, "prod-cluster", "deploy"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), *code, "{what}: {e:?}");
    }
    // One audit line per refusal, each with the ID token's hash.
    let after = audit_lines(&b);
    let refusals = after[before..]
        .iter()
        .filter(|l| l["decision"] == "deny" && l["action"] == "ExchangeCiToken")
        .count();
    assert_eq!(refusals, cases.len(), "every refusal is audited");

    // A job's first exchange makes its task through the same bounds as any task request.
    let e = ci
        .exchange_ci_token(pb::ExchangeCiTokenRequest {
            actions: (0..200).map(|i| format!("a{i}")).collect(),
            ..exchange(&issuer.sign(&good()), "prod-cluster", "deploy")
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("grants.actions"), "{e:?}");

    // A scope must be named; nothing is guessed.
    let e = ci
        .exchange_ci_token(pb::ExchangeCiTokenRequest {
            actions: Vec::new(),
            ..exchange(&issuer.sign(&good()), "prod-cluster", "deploy")
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    b.stop().await;
}

/// GitHub's default audience is refused in the configuration itself.
#[test]
fn the_default_github_audience_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    crate::common::install_provider();
    taskcred::devpki::init(dir.path()).unwrap();
    let jwks = dir.path().join("j.json");
    std::fs::write(&jwks, r#"{"keys": []}"#).unwrap();
    let issuer = format!(
        r#"{{name = "github", preset = "github", issuer = "{GITHUB}", audience = "https://github.com/example-org", jwks_file = "{}"}}"#,
        jwks.display()
    );
    let err = taskcred::config::load(
        &taskcred::config::Source::Dev(dir.path().to_owned()),
        issuer_env(&[issuer]),
        &taskcred::config::Overrides::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("ci.issuers.audience"), "{err}");
    assert!(err.contains("default audience"), "{err}");
}

/// A local JWK Set server: GET /jwks answers whatever the test puts there.
async fn jwks_server(keys: Arc<Mutex<Value>>) -> std::net::SocketAddr {
    let app = axum::Router::new().route(
        "/jwks",
        axum::routing::get(move || {
            let keys = keys.clone();
            async move { axum::Json(keys.lock().unwrap().clone()) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// GitLab-shaped tokens, keys fetched over HTTP and refetched for an unknown `kid`, on Redis
/// with two replicas: a replay on the other replica is refused too.
#[tokio::test]
async fn gitlab_tokens_with_fetched_keys_on_two_replicas() {
    let redis = crate::common::RedisServer::start();
    let first = TestIssuer::new("gl-1");
    let keys = Arc::new(Mutex::new(json!({"keys": [first.jwk()]})));
    let addr = jwks_server(keys.clone()).await;
    let gitlab = format!(
        r#"{{name = "gitlab", preset = "gitlab", issuer = "{GITLAB}", audience = "{AUDIENCE}", jwks_url = "http://{addr}/jwks", jwks_refetch_min = "200ms"}}"#
    );
    let mut env = crate::common::redis_env(&redis.url());
    env.extend(issuer_env(&[gitlab]));
    let a = Broker::start_with_env(env.clone()).await;
    let b = a.replica(env).await;
    let mut on_a = ci_client(&a).await;
    let mut on_b = ci_client(&b).await;

    let request = |token: String| pb::ExchangeCiTokenRequest {
        id_token: token,
        audience: "artifacts-staging".into(),
        actions: vec!["read".into()],
        ..Default::default()
    };
    let token = first.sign(&gitlab_claims("500", "true"));
    let r = on_a
        .exchange_ci_token(request(token.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.identity, "spiffe://ci.taskcred.dev/ci/gitlab/4242");
    let claims = payload(&r.token);
    assert_eq!(claims["ci"]["job"], "500");
    assert_eq!(claims["ci"]["ref_protected"], true);
    let replay = on_b.exchange_ci_token(request(token)).await.unwrap_err();
    assert_eq!(replay.code(), Code::PermissionDenied, "{replay:?}");

    // ref_protected "false" against a protected-only policy.
    let e = on_a
        .exchange_ci_token(request(first.sign(&gitlab_claims("501", "false"))))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // The issuer rotates: a token with a new kid makes the broker refetch (rate limited).
    let second = TestIssuer::new("gl-2");
    *keys.lock().unwrap() = json!({"keys": [first.jwk(), second.jwk()]});
    tokio::time::sleep(Duration::from_millis(300)).await;
    on_b.exchange_ci_token(request(second.sign(&gitlab_claims("502", "true"))))
        .await
        .unwrap();

    b.stop().await;
    a.stop().await;
}

/// Policy asks for an approval (a tag release): the exchange names the pending task; once an
/// approver approves, the same ID token is exchanged. A client certificate, when presented,
/// is bound into cnf.
#[tokio::test]
async fn a_release_waits_for_its_approval_and_binds_a_presented_certificate() {
    let issuer = TestIssuer::new("gh-1");
    let b = github_broker(&issuer, Vec::new()).await;
    let mut ci = ci_client(&b).await;
    let tag = with(
        with(github_claims("2001"), "ref", json!("refs/tags/v1.0.0")),
        "ref_type",
        json!("tag"),
    );
    let id_token = issuer.sign(&tag);
    let pending = ci
        .exchange_ci_token(exchange(&id_token, "release-store", "publish"))
        .await
        .unwrap_err();
    assert_eq!(pending.code(), Code::FailedPrecondition, "{pending:?}");
    let task_id = pending
        .metadata()
        .get("taskcred-task-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert!(pending.message().contains(&task_id));

    tasks_as(&b, "approver")
        .await
        .approve_task(pb::DecideTaskRequest {
            task_id: task_id.clone(),
            note: "release 1.0.0".into(),
        })
        .await
        .unwrap();
    // Over a connection presenting a client certificate: the token is bound to it.
    let agent = b.dev_identity("agent");
    let r = CiServiceClient::new(b.channel(Some(&agent)).await)
        .exchange_ci_token(exchange(&id_token, "release-store", "publish"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.task_id, task_id);
    let claims = payload(&r.token);
    assert_eq!(claims["approval_ids"].as_array().unwrap().len(), 1);
    let der = rustls::pki_types::CertificateDer::from_pem_slice(agent.cert.as_bytes()).unwrap();
    assert_eq!(
        claims["cnf"]["x5t#S256"],
        taskcred::identity::cert_thumbprint_sha256(&der)
    );
    b.stop().await;
}

/// What a pipeline runs: `taskcred ci exchange` (env format) and `taskcred ci complete`, with
/// no client certificate.
#[tokio::test]
async fn the_cli_exchanges_and_completes() {
    let issuer = TestIssuer::new("gh-1");
    let b = github_broker(&issuer, Vec::new()).await;
    let dir = b.dir.path().to_str().unwrap().to_owned();
    let broker = format!("https://{}", b.grpc);
    let token_file = b.path("id-token");
    std::fs::write(&token_file, issuer.sign(&github_claims("3001"))).unwrap();
    let token_path = token_file.to_str().unwrap().to_owned();
    let base = ["--broker", broker.as_str(), "--dev-dir", dir.as_str(), "ci"];
    let (code, out, err) = tokio::task::spawn_blocking({
        let token_path = token_path.clone();
        let base = base.map(str::to_owned);
        move || {
            let mut args: Vec<&str> = base.iter().map(String::as_str).collect();
            args.extend([
                "exchange",
                "--id-token",
                &token_path,
                "--audience",
                "prod-cluster",
                "--action",
                "deploy",
                "--format",
                "env",
            ]);
            crate::common::run(&args)
        }
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{err}");
    let token = out
        .lines()
        .find_map(|l| l.strip_prefix("export TASKCRED_TOKEN='"))
        .and_then(|t| t.strip_suffix('\''))
        .unwrap_or_else(|| panic!("no TASKCRED_TOKEN in {out}"));
    assert!(out.contains("export TASKCRED_TASK_ID='"));
    assert!(introspect(&b, token).await.active);

    let (code, out, err) = tokio::task::spawn_blocking({
        let base = base.map(str::to_owned);
        move || {
            let mut args: Vec<&str> = base.iter().map(String::as_str).collect();
            args.extend(["complete", "--id-token", &token_path]);
            crate::common::run(&args)
        }
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("1 credential(s) revoked"), "{out}");
    assert!(!introspect(&b, token).await.active);
    b.stop().await;
}

/// With a CSR the job gets an X509-SVID of its identity (checked by `openssl verify`); an
/// operator's lock on the job identity kills the repository's CI credentials and refuses more.
#[tokio::test]
async fn a_csr_gets_a_certificate_and_a_lock_stops_the_repository() {
    let issuer = TestIssuer::new("gh-1");
    let b = github_broker(&issuer, Vec::new()).await;
    let mut ci = ci_client(&b).await;
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    let feature = with(github_claims("4001"), "ref", json!("refs/heads/feature"));
    let r = ci
        .exchange_ci_token(pb::ExchangeCiTokenRequest {
            csr,
            ..exchange(&issuer.sign(&feature), "artifacts-staging", "read")
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.token.is_empty());
    std::fs::write(b.path("ci-cert.pem"), &r.certificate_pem).unwrap();
    std::fs::write(b.path("ci-chain.pem"), &r.chain_pem).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(b.path("ca.pem"))
        .arg("-untrusted")
        .arg(b.path("ci-chain.pem"))
        .arg(b.path("ci-cert.pem"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let san = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(b.path("ci-cert.pem"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&san.stdout)
            .contains("URI:spiffe://ci.taskcred.dev/ci/github/123456789"),
        "{san:?}"
    );

    let jwt = ci
        .exchange_ci_token(exchange(
            &issuer.sign(&github_claims("4002")),
            "prod-cluster",
            "deploy",
        ))
        .await
        .unwrap()
        .into_inner();
    crate::common::flows::admin_as(&b, "operator")
        .await
        .lock_agent(pb::LockAgentRequest {
            agent: jwt.identity.clone(),
            reason: "compromised runner".into(),
            duration: None,
            request_id: String::new(),
        })
        .await
        .unwrap();
    assert!(!introspect(&b, &jwt.token).await.active);
    let e = ci
        .exchange_ci_token(exchange(
            &issuer.sign(&github_claims("4003")),
            "prod-cluster",
            "deploy",
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("locked"), "{e:?}");
    b.stop().await;
}

/// Over its rate, a repository's exchanges are refused with RESOURCE_EXHAUSTED and when to retry
/// (the limit is per repository identity, after the ID token is verified); the burst alert counts.
#[tokio::test]
async fn a_repository_over_its_exchange_rate_is_told_when_to_retry() {
    let issuer = TestIssuer::new("gh-rate");
    let b = github_broker(
        &issuer,
        vec![
            ("TASKCRED_LIMITS__CI_PER_SECOND".into(), "1".into()),
            ("TASKCRED_LIMITS__CI_BURST".into(), "2".into()),
        ],
    )
    .await;
    let limited_before = crate::common::sample(&b.http_get("/metrics").await.1, LIMITED_CI);
    let mut ci = ci_client(&b).await;
    for run in ["2001", "2002"] {
        ci.exchange_ci_token(exchange(
            &issuer.sign(&github_claims(run)),
            "prod-cluster",
            "deploy",
        ))
        .await
        .unwrap();
    }
    let e = ci
        .exchange_ci_token(exchange(
            &issuer.sign(&github_claims("2003")),
            "prod-cluster",
            "deploy",
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let wait = crate::common::retry_after_ms(&e);
    assert!((1..=1000).contains(&wait), "{wait}");
    tokio::time::sleep(Duration::from_millis(wait + 50)).await;
    ci.exchange_ci_token(exchange(
        &issuer.sign(&github_claims("2004")),
        "prod-cluster",
        "deploy",
    ))
    .await
    .unwrap();
    let (_, metrics) = b.http_get("/metrics").await;
    assert!(
        crate::common::sample(&metrics, LIMITED_CI) > limited_before,
        "{metrics}"
    );
    b.stop().await;
}

/// Issue 16, point 4: CI jobs are told apart by signed claims only, the replay claim comes
/// before anything is made from a token, time claims are bounded, and the shipped policies
/// allow-list the events that may get credentials.
#[tokio::test]
async fn ci_jobs_are_told_apart_by_signed_claims_only() {
    let issuer = TestIssuer::new("gh-1");
    let b = github_broker(&issuer, Vec::new()).await;
    let mut ci = ci_client(&b).await;
    let tasks_made = |b: &Broker| {
        audit_lines(b)
            .iter()
            .filter(|l| l["action"] == "RequestTask" && l["decision"] == "allow")
            .count()
    };

    // The deploy job of run 7001 (its check_run_id 5001) gets its task.
    let deploy = issuer.sign(&github_claims("7001"));
    let r = ci
        .exchange_ci_token(exchange(&deploy, "prod-cluster", "deploy"))
        .await
        .unwrap()
        .into_inner();
    // A sibling job of the same run (its own check_run_id) cannot end the deploy job's task:
    // its token leads to its own task, which it never made.
    let sibling = with(github_claims("7001"), "check_run_id", json!("5009"));
    let err = ci
        .complete_ci_task(pb::CompleteCiTaskRequest {
            id_token: issuer.sign(&sibling),
            outcome: pb::Outcome::Failed as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(introspect(&b, &r.token).await.active, "the deploy goes on");

    // Without a job id, jobs differ by their other signed claims: another environment is
    // another task; nothing the job says of itself enters the key.
    let no_job = |env: &str| {
        let mut c = github_claims("7002");
        c.as_object_mut().unwrap().remove("check_run_id");
        with(c, "environment", json!(env))
    };
    let prod = ci
        .exchange_ci_token(exchange(
            &issuer.sign(&no_job("production")),
            "prod-cluster",
            "deploy",
        ))
        .await
        .unwrap()
        .into_inner();
    let staging = ci
        .exchange_ci_token(exchange(
            &issuer.sign(&no_job("staging")),
            "artifacts-staging",
            "read",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(prod.task_id, staging.task_id);

    // A replayed token is refused before any task is made from it.
    let made = tasks_made(&b);
    let err = ci
        .exchange_ci_token(exchange(&deploy, "prod-cluster", "deploy"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(tasks_made(&b), made);
    // A token policy refuses leaves no claim: after a fix of policy it could be exchanged.
    // (The refusal itself made no task either.)
    let refused = issuer.sign(&with(github_claims("7003"), "environment", json!("qa")));
    let err = ci
        .exchange_ci_token(exchange(&refused, "prod-cluster", "deploy"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(tasks_made(&b), made);

    // Time claims: an exp near i64::MAX (it panicked the broker), a lifetime past the issuer's
    // bound (24 h by default).
    let t = now();
    for (what, claims) in [
        (
            "exp near i64::MAX",
            with(github_claims("7004"), "exp", json!(i64::MAX - 1)),
        ),
        (
            "a 30-day token",
            with(github_claims("7004"), "exp", json!(t + 30 * 86_400)),
        ),
    ] {
        let err = ci
            .exchange_ci_token(exchange(&issuer.sign(&claims), "prod-cluster", "deploy"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{what}: {err:?}");
    }
    // The broker is still there.
    let (status, _) = b.http_get("/healthz").await;
    assert_eq!(status, 200);

    // The credential an exchange mints is decided as every credential is: the dev policy's
    // five-minute cap on production credentials holds here too (found by the review).
    let long = with(github_claims(&fresh_id()), "exp", json!(t + 3700));
    let err = ci
        .exchange_ci_token(pb::ExchangeCiTokenRequest {
            ttl: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
            ..exchange(&issuer.sign(&long), "prod-cluster", "deploy")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("IssueToken"), "{err:?}");

    // Events: an allow-list. A comment or a review (never in any deny-list) gets nothing; a
    // manual dispatch of main does.
    for event in [
        "issue_comment",
        "pull_request_review",
        "pull_request_target",
        "schedule",
    ] {
        let claims = with(github_claims(&fresh_id()), "event_name", json!(event));
        let err = ci
            .exchange_ci_token(exchange(&issuer.sign(&claims), "prod-cluster", "deploy"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{event}: {err:?}");
    }
    let dispatch = with(
        github_claims(&fresh_id()),
        "event_name",
        json!("workflow_dispatch"),
    );
    ci.exchange_ci_token(exchange(&issuer.sign(&dispatch), "prod-cluster", "deploy"))
        .await
        .unwrap();
    b.stop().await;
}

/// Issue 16, point 11: a CI issuer whose keys cannot be fetched is not asked again for every
/// token: failed fetches back off.
#[tokio::test]
async fn a_failing_jwks_url_is_not_hammered() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let hits = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counted = hits.clone();
    let app = axum::Router::new().route(
        "/jwks",
        axum::routing::get(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            async { (axum::http::StatusCode::SERVICE_UNAVAILABLE, "down") }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    let issuer = TestIssuer::new("gl-1");
    let gitlab = format!(
        r#"{{name = "gitlab", preset = "gitlab", issuer = "{GITLAB}", audience = "{AUDIENCE}", jwks_url = "http://{addr}/jwks", jwks_refetch_min = "1s"}}"#
    );
    let b = Broker::start_with_env(issuer_env(&[gitlab])).await;
    let mut ci = ci_client(&b).await;
    for i in 0..30 {
        let e = ci
            .exchange_ci_token(pb::ExchangeCiTokenRequest {
                id_token: issuer.sign(&gitlab_claims(&format!("{i}"), "true")),
                audience: "artifacts-staging".into(),
                actions: vec!["read".into()],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // 3 s of calls: the first fetch, then one after 1 s, the next after 2 s more.
    let n = hits.load(Ordering::SeqCst);
    assert!((1..=3).contains(&n), "{n} fetches for 30 tokens");
    b.stop().await;
}

/// An ID token without `jti` is exchanged once, even when its ECDSA signature is rewritten
/// into the other valid one ((r, s) to (r, n - s)): replay is keyed on what was signed, never on
/// the signature.
#[tokio::test]
async fn an_es256_token_without_jti_is_not_replayed_by_rewriting_its_signature() {
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let key =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let point = key.public_key().as_ref();
    let jwk = json!({"kty": "EC", "crv": "P-256", "kid": "es-1", "use": "sig", "alg": "ES256",
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..65])});
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("es-jwks.json");
    std::fs::write(&jwks, json!({"keys": [jwk]}).to_string()).unwrap();
    let env = issuer_env(&[format!(
        r#"{{name = "github", preset = "github", issuer = "{GITHUB}", audience = "{AUDIENCE}", algorithms = ["ES256"], jwks_file = "{}"}}"#,
        jwks.display()
    )]);
    let b = Broker::launch(dir, env, None).await;

    let mut claims = github_claims("3001");
    claims.as_object_mut().unwrap().remove("jti");
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(json!({"alg": "ES256", "typ": "JWT", "kid": "es-1"}).to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = key.sign(&rng, input.as_bytes()).unwrap();
    let sig = sig.as_ref();
    // s' = n - s, big-endian, with the P-256 group order n.
    let n = hex_bytes("ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551");
    let mut s2 = [0u8; 32];
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let d = i16::from(n[i]) - i16::from(sig[32 + i]) - borrow;
        (s2[i], borrow) = if d < 0 {
            (u8::try_from(d + 256).unwrap(), 1)
        } else {
            (u8::try_from(d).unwrap(), 0)
        };
    }
    let first = format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig));
    let rewritten = format!(
        "{input}.{}",
        URL_SAFE_NO_PAD.encode([&sig[..32], &s2[..]].concat())
    );
    assert_ne!(first, rewritten);

    let mut ci = ci_client(&b).await;
    ci.exchange_ci_token(exchange(&first, "prod-cluster", "deploy"))
        .await
        .unwrap();
    let replay = ci
        .exchange_ci_token(exchange(&rewritten, "prod-cluster", "deploy"))
        .await
        .unwrap_err();
    assert_eq!(replay.code(), Code::PermissionDenied, "{replay:?}");
    assert!(replay.message().contains("already exchanged"), "{replay:?}");
    b.stop().await;
}

fn hex_bytes(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}
