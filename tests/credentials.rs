//! Task-bound JWTs end to end, on both stores: issued to the executor of an approved task,
//! verified by an independent JOSE implementation (jwt-simple) against the served JWKS, with
//! `cnf` recomputed from the client certificate; introspected; dead the moment the task ends;
//! and every refusal (another agent, states, grants, TTL abuse, replayed completion).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test helpers: a failure is a failed test"
)]

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{Broker, RedisServer};
use jwt_simple::prelude::{
    ECDSAP256PublicKeyLike as _, ES256PublicKey, Ed25519PublicKey, EdDSAPublicKeyLike as _,
    JWTClaims, VerificationOptions,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use serde::Deserialize;
use taskcred::api::pb;
use taskcred::api::pb::credential_service_client::CredentialServiceClient;
use taskcred::api::pb::task_service_client::TaskServiceClient;
use taskcred::clock::ManualClock;
use tonic::Code;
use tonic::transport::Channel;

const AGENT: &str = "spiffe://taskcred.dev/agent/demo";
const ISSUER: &str = "http://127.0.0.1:7480";

async fn tasks_as(b: &Broker, name: &str) -> TaskServiceClient<Channel> {
    TaskServiceClient::new(b.channel_as(name).await)
}

async fn creds_as(b: &Broker, name: &str) -> CredentialServiceClient<Channel> {
    CredentialServiceClient::new(b.channel_as(name).await)
}

fn secs(s: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: s,
        nanos: 0,
    })
}

/// Requests a task for the demo agent with `labels`, and has `approver` approve it if needed.
async fn approved_task(b: &Broker, labels: &[(&str, &str)], ttl: Option<i64>) -> pb::Task {
    let request = pb::RequestTaskRequest {
        executor: AGENT.into(),
        purpose: "rotate the staging database password".into(),
        grants: vec![
            pb::Grant {
                audience: "db.staging".into(),
                actions: vec!["read".into(), "rotate".into()],
            },
            pb::Grant {
                audience: "https://vault.example.com".into(),
                actions: vec!["secret:read".into()],
            },
        ],
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        deadline: secs(3600),
        credential_ttl: ttl.and_then(secs),
        ..Default::default()
    };
    let t = tasks_as(b, "requester")
        .await
        .request_task(request)
        .await
        .unwrap()
        .into_inner();
    if t.state == pb::TaskState::Approved as i32 {
        return t;
    }
    tasks_as(b, "approver")
        .await
        .approve_task(pb::DecideTaskRequest {
            task_id: t.id.clone(),
            note: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
}

fn token_request(task: &str, audience: &str) -> pb::IssueTokenRequest {
    pb::IssueTokenRequest {
        task_id: task.into(),
        audience: audience.into(),
        ..Default::default()
    }
}

#[derive(Debug, Deserialize)]
struct Custom {
    client_id: String,
    scope: String,
    task_id: String,
    approval_ids: Vec<String>,
    cnf: serde_json::Value,
}

/// Verifies `token` as an independent verifier would: JWKS from the HTTP port, jwt-simple.
async fn verify_independently(b: &Broker, token: &str, audience: &str) -> JWTClaims<Custom> {
    let (_, body) = b.http_get("/.well-known/jwks.json").await;
    let jwks: serde_json::Value = serde_json::from_str(&body).unwrap();
    let jwk = &jwks["keys"][0];
    let kid = jwk["kid"].as_str().unwrap().to_owned();
    let options = VerificationOptions {
        allowed_issuers: Some(HashSet::from([ISSUER.to_owned()])),
        allowed_audiences: Some(HashSet::from([audience.to_owned()])),
        required_key_id: Some(kid),
        required_signature_type: Some("at+jwt".into()),
        time_tolerance: Some(jwt_simple::prelude::Duration::from_secs(0)),
        ..Default::default()
    };
    let d = |k: &str| URL_SAFE_NO_PAD.decode(jwk[k].as_str().unwrap()).unwrap();
    match jwk["kty"].as_str() {
        Some("EC") => {
            let mut point = vec![4u8];
            point.extend(d("x"));
            point.extend(d("y"));
            ES256PublicKey::from_bytes(&point)
                .unwrap()
                .verify_token::<Custom>(token, Some(options))
                .unwrap()
        }
        Some("OKP") => Ed25519PublicKey::from_bytes(&d("x"))
            .unwrap()
            .verify_token::<Custom>(token, Some(options))
            .unwrap(),
        other => panic!("unexpected kty {other:?}"),
    }
}

fn header_of(token: &str) -> serde_json::Value {
    serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(token.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap()
}

fn x5t_s256(pem: &str) -> String {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, &der))
}

async fn introspect(b: &Broker, token: &str) -> pb::IntrospectResponse {
    creds_as(b, "approver")
        .await
        .introspect(pb::IntrospectRequest {
            token: token.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Issue, verify independently, introspect, complete, and everything after, on one broker.
async fn token_lifecycle(b: &Broker) {
    let task = approved_task(b, &[], None).await;
    let mut agent = creds_as(b, "agent").await;
    let issued = agent
        .issue_token(token_request(&task.id, "db.staging"))
        .await
        .unwrap()
        .into_inner();

    let header = header_of(&issued.token);
    assert_eq!(header["typ"], "at+jwt");
    assert_eq!(header["alg"], "ES256");
    let claims = verify_independently(b, &issued.token, "db.staging").await;
    assert_eq!(claims.issuer.as_deref(), Some(ISSUER));
    assert_eq!(claims.subject.as_deref(), Some(AGENT));
    let raw: serde_json::Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(issued.token.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        raw["aud"], "db.staging",
        "exactly one audience, as a string"
    );
    assert_eq!(
        raw["exp"].as_u64().unwrap() - raw["iat"].as_u64().unwrap(),
        300
    );
    assert_eq!(raw["nbf"], raw["iat"]);
    let jti = claims.jwt_id.clone().unwrap();
    assert_eq!(jti.len(), 32);
    assert!(jti.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(jti, issued.jti);
    assert_eq!(claims.custom.client_id, AGENT);
    assert_eq!(claims.custom.scope, "read rotate");
    assert_eq!(claims.custom.task_id, task.id);
    assert_eq!(
        claims.custom.approval_ids,
        vec![task.approvals[0].id.clone()]
    );
    let agent_cert = b.dev_identity("agent").cert;
    assert_eq!(
        claims.custom.cnf["x5t#S256"],
        x5t_s256(&agent_cert).as_str()
    );

    // A subset of actions, and the second audience (a URL).
    let narrow = agent
        .issue_token(pb::IssueTokenRequest {
            actions: vec!["read".into()],
            ..token_request(&task.id, "db.staging")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        verify_independently(b, &narrow.token, "db.staging")
            .await
            .custom
            .scope,
        "read"
    );
    let url = agent
        .issue_token(token_request(&task.id, "https://vault.example.com"))
        .await
        .unwrap()
        .into_inner();
    verify_independently(b, &url.token, "https://vault.example.com").await;

    // Introspection: active, with the RFC 7662 members.
    let i = introspect(b, &issued.token).await;
    assert!(i.active);
    assert_eq!(
        (i.sub.as_str(), i.aud.as_str(), i.jti.as_str()),
        (AGENT, "db.staging", jti.as_str())
    );
    assert_eq!(i.cnf_x5t_s256, x5t_s256(&agent_cert));
    assert_eq!(i.task_id, task.id);

    // Completion by the executor revokes every token of the task at once.
    let done = tasks_as(b, "agent")
        .await
        .complete_task(pb::CompleteTaskRequest {
            task_id: task.id.clone(),
            outcome: pb::Outcome::Succeeded.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.revoked_leases, 3);
    assert_eq!(done.task.unwrap().state, pb::TaskState::Completed as i32);
    for t in [&issued.token, &narrow.token, &url.token] {
        assert_eq!(
            introspect(b, t).await,
            pb::IntrospectResponse::default(),
            "exactly {{active: false}}"
        );
    }
    // Nothing more is issued; a replayed completion is refused.
    let err = agent
        .issue_token(token_request(&task.id, "db.staging"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = tasks_as(b, "requester")
        .await
        .complete_task(pb::CompleteTaskRequest {
            task_id: task.id.clone(),
            outcome: pb::Outcome::Succeeded.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn token_lifecycle_on_the_embedded_store() {
    let b = Broker::start().await;
    token_lifecycle(&b).await;
    refusals(&b).await;
    b.stop().await;
}

#[tokio::test]
async fn token_lifecycle_on_redis() {
    let redis = RedisServer::start();
    let b = Broker::start_on_redis(&redis.url()).await;
    token_lifecycle(&b).await;
    refusals(&b).await;
    b.stop().await;
}

/// Every refusal of IssueToken, with its status.
async fn refusals(b: &Broker) {
    let task = approved_task(b, &[], None).await;
    let mut agent = creds_as(b, "agent").await;

    // Another caller asking for the agent's task.
    for name in ["requester", "approver", "operator"] {
        let err = creds_as(b, name)
            .await
            .issue_token(token_request(&task.id, "db.staging"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{name}");
    }
    // Outside the grant.
    let err = agent
        .issue_token(token_request(&task.id, "db.prod"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = agent
        .issue_token(pb::IssueTokenRequest {
            actions: vec!["drop".into()],
            ..token_request(&task.id, "db.staging")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // The action of another audience is not this audience's.
    let err = agent
        .issue_token(pb::IssueTokenRequest {
            actions: vec!["secret:read".into()],
            ..token_request(&task.id, "db.staging")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // TTL abuse: zero and negative are refused; above the ceiling is clamped, never widened;
    // one second is honoured.
    for bad in [0, -5] {
        let err = agent
            .issue_token(pb::IssueTokenRequest {
                ttl: secs(bad),
                ..token_request(&task.id, "db.staging")
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "ttl {bad}");
        assert!(err.message().starts_with("ttl"), "{}", err.message());
    }
    for (asked, granted) in [(86400 * 365, 300), (1, 1), (42, 42)] {
        let r = agent
            .issue_token(pb::IssueTokenRequest {
                ttl: secs(asked),
                ..token_request(&task.id, "db.staging")
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.ttl.unwrap().seconds, granted, "asked {asked}");
        let claims = verify_independently(b, &r.token, "db.staging").await;
        let life = claims.expires_at.unwrap().as_secs() - claims.issued_at.unwrap().as_secs();
        assert_eq!(life, granted as u64);
    }

    // Policy narrows with the request context: production tokens live at most five minutes.
    let prod = approved_task(b, &[("env", "production"), ("risk", "low")], Some(3600)).await;
    assert_eq!(
        prod.state,
        pb::TaskState::PendingApproval as i32,
        "production needs two"
    );
    tasks_as(b, "approver2")
        .await
        .approve_task(pb::DecideTaskRequest {
            task_id: prod.id.clone(),
            note: String::new(),
        })
        .await
        .unwrap();
    let err = agent
        .issue_token(pb::IssueTokenRequest {
            ttl: secs(600),
            ..token_request(&prod.id, "db.staging")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    agent
        .issue_token(pb::IssueTokenRequest {
            ttl: secs(300),
            ..token_request(&prod.id, "db.staging")
        })
        .await
        .unwrap();

    // A pending task, a denied task, an unknown task, a malformed id.
    let pending = tasks_as(b, "requester")
        .await
        .request_task(pb::RequestTaskRequest {
            executor: AGENT.into(),
            purpose: "p".into(),
            grants: vec![pb::Grant {
                audience: "db.staging".into(),
                actions: vec!["read".into()],
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let err = agent
        .issue_token(token_request(&pending.id, "db.staging"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    tasks_as(b, "approver")
        .await
        .deny_task(pb::DecideTaskRequest {
            task_id: pending.id.clone(),
            note: String::new(),
        })
        .await
        .unwrap();
    let err = agent
        .issue_token(token_request(&pending.id, "db.staging"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = agent
        .issue_token(token_request(
            "0192f4c5-0000-7000-8000-000000000000",
            "db.staging",
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = agent
        .issue_token(token_request("nope", "db.staging"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Introspection of anything that is not an active token of ours: exactly {active: false}.
    let good = agent
        .issue_token(token_request(&task.id, "db.staging"))
        .await
        .unwrap()
        .into_inner()
        .token;
    let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
    let mut claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&parts[1]).unwrap()).unwrap();
    claims["scope"] = "read rotate admin".into();
    parts[1] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
    let tampered = parts.join(".");
    let foreign = taskcred::mint::JwtKey::generate(taskcred::config::JwtAlgorithm::ES256)
        .unwrap()
        .sign_jws("at+jwt", &claims)
        .unwrap();
    for bad in [
        "",
        "garbage",
        "a.b.c",
        &tampered,
        &foreign,
        &"x".repeat(10_000),
    ] {
        assert_eq!(
            introspect(b, bad).await,
            pb::IntrospectResponse::default(),
            "{bad:.20}"
        );
    }
    assert!(introspect(b, &good).await.active);
}

#[tokio::test]
async fn tokens_expire_and_the_deadline_bounds_them() {
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let b = Broker::launch(
        tempfile::tempdir().unwrap(),
        Vec::new(),
        Some(clock.clone()),
    )
    .await;
    let task = approved_task(&b, &[], None).await;
    let mut agent = creds_as(&b, "agent").await;
    let t = agent
        .issue_token(pb::IssueTokenRequest {
            ttl: secs(10),
            ..token_request(&task.id, "db.staging")
        })
        .await
        .unwrap()
        .into_inner();
    assert!(introspect(&b, &t.token).await.active);
    clock.advance(Duration::from_secs(11));
    assert_eq!(
        introspect(&b, &t.token).await,
        pb::IntrospectResponse::default()
    );

    // Near the deadline the token is cut to it; past it nothing is issued.
    clock.advance(Duration::from_secs(3600 - 11 - 20));
    let near = agent
        .issue_token(token_request(&task.id, "db.staging"))
        .await
        .unwrap()
        .into_inner();
    assert!(near.ttl.unwrap().seconds <= 20, "{:?}", near.ttl);
    clock.advance(Duration::from_secs(21));
    let err = agent
        .issue_token(token_request(&task.id, "db.staging"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    b.stop().await;
}

#[tokio::test]
async fn eddsa_keys_are_selectable() {
    let dir = tempfile::tempdir().unwrap();
    taskcred::devpki::init(dir.path()).unwrap();
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        base64::engine::general_purpose::STANDARD.encode(pkcs8.as_ref())
    );
    let key_path = dir.path().join("ed25519-key.pem");
    std::fs::write(&key_path, pem).unwrap();
    std::fs::set_permissions(
        &key_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let env = vec![
        (
            "TASKCRED_ISSUER__JWT_KEY".into(),
            key_path.to_str().unwrap().to_owned(),
        ),
        ("TASKCRED_ISSUER__JWT_ALGORITHM".into(), "EdDSA".into()),
    ];
    let b = Broker::launch(dir, env, None).await;
    let task = approved_task(&b, &[], None).await;
    let token = creds_as(&b, "agent")
        .await
        .issue_token(token_request(&task.id, "db.staging"))
        .await
        .unwrap()
        .into_inner()
        .token;
    assert_eq!(header_of(&token)["alg"], "EdDSA");
    verify_independently(&b, &token, "db.staging").await;
    assert!(introspect(&b, &token).await.active);
    b.stop().await;
}
