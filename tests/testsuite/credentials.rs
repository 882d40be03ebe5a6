//! Task-bound JWTs end to end, on both stores: issued to the executor of an approved task,
//! verified by an independent JOSE implementation (jwt-simple) against the served JWKS, with
//! `cnf` recomputed from the client certificate; introspected; dead the moment the task ends;
//! and every refusal (another agent, states, grants, TTL abuse, replayed completion).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::common::flows::{
    AGENT, ISSUER, approved_task, creds_as, header_of, introspect, secs, tasks_as, token_request,
    verify_independently,
};
use crate::common::{Broker, RedisServer};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use taskcred::api::{pb, reason_of};
use taskcred::clock::ManualClock;
use tonic::Code;

fn x5t_s256(pem: &str) -> String {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, &der))
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
            request_id: String::new(),
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
            request_id: String::new(),
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
    renewals(&b).await;
    b.stop().await;
}

#[tokio::test]
async fn token_lifecycle_on_redis() {
    let redis = RedisServer::start();
    let b = Broker::start_on_redis(&redis.url()).await;
    token_lifecycle(&b).await;
    refusals(&b).await;
    renewals(&b).await;
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
        // Beside the message, a stable reason clients switch on (google.rpc.ErrorInfo).
        assert_eq!(
            reason_of(&err).as_deref(),
            Some("NOT_THE_EXECUTOR"),
            "{name}"
        );
    }
    // Outside the grant.
    let err = agent
        .issue_token(token_request(&task.id, "db.prod"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(reason_of(&err).as_deref(), Some("AUDIENCE_NOT_GRANTED"));
    let err = agent
        .issue_token(pb::IssueTokenRequest {
            actions: vec!["drop".into()],
            ..token_request(&task.id, "db.staging")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(reason_of(&err).as_deref(), Some("ACTION_NOT_GRANTED"));
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
                actions: vec!["read".into(), "rotate".into()],
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

fn csr_with(params: rcgen::CertificateParams) -> (Vec<u8>, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = params.serialize_request(&key).unwrap().der().to_vec();
    (csr, key)
}

fn openssl(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

async fn issue_cert(
    b: &Broker,
    task: &str,
    csr: Vec<u8>,
) -> Result<pb::IssueCertificateResponse, tonic::Status> {
    creds_as(b, "agent")
        .await
        .issue_certificate(pb::IssueCertificateRequest {
            task_id: task.into(),
            csr,
            ttl: secs(120),
            request_id: String::new(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// The profile of STANDARDS.md B and I, read back with x509-parser.
fn check_svid_profile(pem: &str, task: &str, serial: &str, expires: i64) {
    use x509_parser::prelude::*;
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    let (_, c) = X509Certificate::from_der(&der).unwrap();
    assert!(c.subject().iter().next().is_none(), "empty subject");
    let san = c.subject_alternative_name().unwrap().unwrap();
    assert!(san.critical, "SAN critical with an empty subject");
    let names: Vec<String> = san
        .value
        .general_names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect();
    assert_eq!(
        names,
        vec![format!("URI(\"{AGENT}\")")],
        "exactly one URI SAN, nothing from the CSR"
    );
    let bc = c.basic_constraints().unwrap().unwrap();
    assert!(bc.critical && !bc.value.ca, "CA:FALSE, critical");
    let ku = c.key_usage().unwrap().unwrap();
    assert!(ku.critical);
    assert!(ku.value.digital_signature() && !ku.value.key_cert_sign() && !ku.value.crl_sign());
    assert_eq!(ku.value.flags, 1, "digitalSignature only");
    let eku = c.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    let oids: Vec<String> = c
        .extensions()
        .iter()
        .map(|e| e.oid.to_id_string())
        .collect();
    assert!(oids.contains(&"2.5.29.35".to_owned()), "AKI");
    assert!(oids.contains(&"2.5.29.14".to_owned()), "SKI");
    let ext = c
        .extensions()
        .iter()
        .find(|e| e.oid.to_id_string() == "2.25.2308847322465903446.1")
        .expect("task extension");
    assert!(!ext.critical);
    assert_eq!(&ext.value[2..], task.as_bytes());
    let raw = c.raw_serial();
    assert_eq!(raw.len(), 16);
    assert!(raw[0] & 0x80 == 0 && raw[0] != 0, "positive, 128 bits");
    assert_eq!(
        raw.iter().map(|b| format!("{b:02x}")).collect::<String>(),
        serial
    );
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let nb = c.validity().not_before.timestamp();
    assert!(
        nb <= now && nb >= now - 62,
        "backdated at most 60 s: {nb} vs {now}"
    );
    assert_eq!(c.validity().not_after.timestamp(), expires);
}

#[tokio::test]
async fn certificates_verify_with_openssl_and_die_with_their_task() {
    let b = Broker::start().await;
    let task = approved_task(&b, &[], None).await;

    // A CSR asking for another name, CA powers and key usages: all of it is ignored.
    let mut greedy = rcgen::CertificateParams::new(vec!["evil.example.com".to_owned()]).unwrap();
    greedy.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    greedy.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    greedy.subject_alt_names.push(rcgen::SanType::URI(
        "spiffe://taskcred.dev/agent/admin".try_into().unwrap(),
    ));
    let (csr, _key) = csr_with(greedy);
    let r = issue_cert(&b, &task.id, csr).await.unwrap();
    let expires = r.expires_at.unwrap().seconds;
    check_svid_profile(&r.certificate_pem, &task.id, &r.serial, expires);
    assert_eq!(r.ttl.unwrap().seconds, 120);

    // openssl, independently: chains to the root through the issuing CA, good for clientAuth.
    let dir = tempfile::tempdir().unwrap();
    let leaf = dir.path().join("leaf.pem");
    let chain = dir.path().join("chain.pem");
    std::fs::write(&leaf, &r.certificate_pem).unwrap();
    std::fs::write(&chain, &r.chain_pem).unwrap();
    let ca = b.path("ca.pem");
    let (ok, out) = openssl(&[
        "verify",
        "-CAfile",
        ca.to_str().unwrap(),
        "-untrusted",
        chain.to_str().unwrap(),
        "-purpose",
        "sslclient",
        leaf.to_str().unwrap(),
    ]);
    assert!(ok && out.contains(": OK"), "{out}");
    // Not by the root alone: the issuing CA is needed (it is a real intermediate).
    let (ok, _) = openssl(&[
        "verify",
        "-CAfile",
        ca.to_str().unwrap(),
        leaf.to_str().unwrap(),
    ]);
    assert!(!ok);

    // It is a client certificate for the task's audiences (openssl accepted it for sslclient
    // above), not an identity at the broker itself: see
    // a_task_certificate_is_not_a_client_identity_at_the_broker.

    // Introspection by certificate; the task's end revokes it.
    let mut approver = creds_as(&b, "approver").await;
    let ask = |pem: String| pb::IntrospectRequest {
        token: String::new(),
        certificate: pem.into_bytes(),
    };
    let i = approver
        .introspect(ask(r.certificate_pem.clone()))
        .await
        .unwrap()
        .into_inner();
    assert!(i.active);
    assert_eq!(
        (i.serial.as_str(), i.sub.as_str(), i.task_id.as_str()),
        (r.serial.as_str(), AGENT, task.id.as_str())
    );
    // A certificate of another CA (the agent's own dev certificate) is not ours to vouch for.
    let foreign = approver
        .introspect(ask(b.dev_identity("agent").cert))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(foreign, pb::IntrospectResponse::default());
    let both = approver
        .introspect(pb::IntrospectRequest {
            token: "x".into(),
            certificate: b"y".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(both.code(), Code::InvalidArgument);

    let done = tasks_as(&b, "requester")
        .await
        .complete_task(pb::CompleteTaskRequest {
            task_id: task.id.clone(),
            outcome: pb::Outcome::Failed.into(),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.revoked_leases, 1);
    let i = approver
        .introspect(ask(r.certificate_pem))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(i, pb::IntrospectResponse::default());
    let (csr, _) = csr_with(rcgen::CertificateParams::default());
    assert_eq!(
        issue_cert(&b, &task.id, csr).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    b.stop().await;
}

#[tokio::test]
async fn bad_csrs_are_invalid_arguments() {
    let b = Broker::start().await;
    let task = approved_task(&b, &[], None).await;
    let dir = tempfile::tempdir().unwrap();
    let openssl_csr = |name: &str, newkey: &[&str]| -> Vec<u8> {
        let out = dir.path().join(format!("{name}.der"));
        let key = dir.path().join(format!("{name}.key"));
        let mut args = vec!["req", "-new", "-nodes", "-subj", "/CN=x", "-outform", "DER"];
        args.extend_from_slice(newkey);
        args.extend([
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            out.to_str().unwrap(),
        ]);
        let (ok, log) = openssl(&args);
        assert!(ok, "{log}");
        std::fs::read(out).unwrap()
    };

    // What is accepted: P-256 (rcgen), RSA 2048 and Ed25519 (openssl), PEM or DER.
    let (p256, _) = csr_with(rcgen::CertificateParams::default());
    issue_cert(&b, &task.id, p256.clone()).await.unwrap();
    let pem = format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        base64::engine::general_purpose::STANDARD.encode(&p256)
    );
    issue_cert(&b, &task.id, pem.into_bytes()).await.unwrap();
    issue_cert(
        &b,
        &task.id,
        openssl_csr("rsa2048", &["-newkey", "rsa:2048"]),
    )
    .await
    .unwrap();
    issue_cert(
        &b,
        &task.id,
        openssl_csr("ed25519", &["-newkey", "ed25519"]),
    )
    .await
    .unwrap();

    let mut wrong_signature = p256.clone();
    let last = wrong_signature.len() - 1;
    wrong_signature[last] ^= 0x01;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"not a csr".to_vec()),
        ("empty", Vec::new()),
        ("wrong_signature", wrong_signature),
        ("truncated", p256[..p256.len() / 2].to_vec()),
        ("rsa_1024", openssl_csr("rsa1024", &["-newkey", "rsa:1024"])),
        (
            "secp256k1",
            openssl_csr(
                "k1",
                &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:secp256k1"],
            ),
        ),
        (
            "sha1_signature",
            openssl_csr("sha1", &["-newkey", "rsa:2048", "-sha1"]),
        ),
        ("oversized", vec![0x30; 9000]),
    ];
    for (defect, csr) in cases {
        let err = issue_cert(&b, &task.id, csr).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{defect}: {err:?}");
        assert!(
            err.message().starts_with("csr"),
            "{defect}: {}",
            err.message()
        );
    }
    b.stop().await;
}

fn renew(lease: &str, ttl: Option<i64>, csr: Vec<u8>) -> pb::RenewLeaseRequest {
    pb::RenewLeaseRequest {
        lease_id: lease.into(),
        ttl: ttl.and_then(secs),
        csr,
    }
}

/// RenewLease and RevokeLease, for tokens and certificates.
async fn renewals(b: &Broker) {
    let task = approved_task(b, &[], None).await;
    let mut agent = creds_as(b, "agent").await;
    let first = agent
        .issue_token(pb::IssueTokenRequest {
            actions: vec!["read".into()],
            ..token_request(&task.id, "db.staging")
        })
        .await
        .unwrap()
        .into_inner();
    let r = agent
        .renew_lease(renew(&first.lease_id, Some(60), Vec::new()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.lease_id, first.lease_id);
    assert_ne!(r.credential_id, first.jti);
    assert_eq!(r.ttl.unwrap().seconds, 60);
    let left = r.renewal_left.unwrap().seconds;
    assert!(
        left > 3000 && left <= 3600,
        "the deadline bounds the ceiling: {left}"
    );
    let claims = verify_independently(b, &r.token, "db.staging").await;
    assert_eq!(claims.custom.scope, "read", "same audience and scope");
    assert_eq!(claims.jwt_id.as_deref(), Some(r.credential_id.as_str()));
    assert_eq!(
        introspect(b, &first.token).await,
        pb::IntrospectResponse::default(),
        "previous token revoked"
    );
    assert!(introspect(b, &r.token).await.active);

    // Past the ceiling: refused, saying what is left; not silently cut.
    let err = agent
        .renew_lease(renew(&first.lease_id, Some(7200), Vec::new()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("left"), "{}", err.message());
    // Only the lease's agent renews; nobody else revokes it under the dev policy.
    let err = creds_as(b, "requester")
        .await
        .renew_lease(renew(&first.lease_id, None, Vec::new()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = creds_as(b, "approver")
        .await
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: first.lease_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = agent
        .renew_lease(renew("nope", None, Vec::new()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Revocation ends it; nothing renews it after.
    let revoked = agent
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: first.lease_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.credential_id, r.credential_id);
    assert_eq!(
        introspect(b, &r.token).await,
        pb::IntrospectResponse::default()
    );
    let err = agent
        .renew_lease(renew(&first.lease_id, None, Vec::new()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = agent
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: first.lease_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // A certificate lease renews with a CSR, to a new serial; the old certificate is revoked.
    let (csr, _) = csr_with(rcgen::CertificateParams::default());
    let cert = issue_cert(b, &task.id, csr).await.unwrap();
    let err = agent
        .renew_lease(renew(&cert.lease_id, None, Vec::new()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let (csr, _) = csr_with(rcgen::CertificateParams::default());
    let again = agent
        .renew_lease(renew(&cert.lease_id, Some(30), csr))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(again.credential_id, cert.serial);
    assert!(
        again
            .certificate_pem
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
    let mut approver = creds_as(b, "approver").await;
    let ask = |pem: &str| pb::IntrospectRequest {
        token: String::new(),
        certificate: pem.as_bytes().to_vec(),
    };
    assert!(
        !approver
            .introspect(ask(&cert.certificate_pem))
            .await
            .unwrap()
            .into_inner()
            .active
    );
    let now = approver
        .introspect(ask(&again.certificate_pem))
        .await
        .unwrap()
        .into_inner();
    assert!(now.active);
    assert_eq!(now.serial, again.credential_id);
}

/// A task's X509-SVID is a credential for the task's audiences, not an identity at the broker:
/// even though the dev issuing CA chains to the client trust bundle, the broker refuses it as a
/// client certificate (else a revoked task certificate could still ask for tokens).
#[tokio::test]
async fn a_task_certificate_is_not_a_client_identity_at_the_broker() {
    let b = Broker::start().await;
    let task = approved_task(&b, &[("env", "staging")], None).await;
    let (csr, key) = csr_with(rcgen::CertificateParams::default());
    let issued = issue_cert(&b, &task.id, csr).await.unwrap();
    let svid = crate::common::Pem {
        cert: format!("{}{}", issued.certificate_pem, issued.chain_pem),
        key: key.serialize_pem(),
    };
    let ca = std::fs::read(b.path("ca.pem")).unwrap();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
        .domain_name("localhost")
        .identity(tonic::transport::Identity::from_pem(&svid.cert, &svid.key));
    let endpoint = tonic::transport::Endpoint::from_shared(format!("https://{}", b.grpc))
        .unwrap()
        .tls_config(tls)
        .unwrap();
    // TLS 1.3: the refusal may come with the handshake or with the first call.
    let refused = match endpoint.connect().await {
        Err(_) => true,
        Ok(channel) => {
            let r = pb::identity_service_client::IdentityServiceClient::new(channel)
                .who_am_i(pb::WhoAmIRequest {})
                .await;
            r.is_err()
        }
    };
    assert!(
        refused,
        "a task certificate was accepted as a client identity"
    );
    // The agent's own identity still works.
    pb::identity_service_client::IdentityServiceClient::new(b.channel_as("agent").await)
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .unwrap();
    b.stop().await;
}
