//! `taskcred::verify` against a real broker: a token verifies locally (signature, iss, aud,
//! exp, cnf against the agent's certificate); a revocation reaches the verifier through the watch
//! stream within a second; a rotated-in key is fetched on its unknown kid; with the broker gone
//! the strict verifier refuses once its view is stale, the best-effort one keeps its last view.

use std::time::{Duration, Instant};

use crate::common::Broker;
use crate::common::flows::{ISSUER, admin_as, approved_task, creds_as, issue_as_agent};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use taskcred::api::pb;
use taskcred::verify::{StalePolicy, Verifier, VerifierConfig, VerifyError};
use tokio_util::sync::CancellationToken;

fn der_of(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

async fn started(b: &Broker, audience: &str, stale: StalePolicy) -> (Verifier, CancellationToken) {
    let mut config = VerifierConfig::new(
        ISSUER,
        audience,
        &format!("http://{}/.well-known/jwks.json", b.http),
    );
    config.max_staleness = Duration::from_secs(2);
    config.stale = stale;
    let v = Verifier::new(config).unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(v.clone().run(b.channel_as("verifier").await, stop.clone()));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !v.revocations_current() {
        assert!(Instant::now() < deadline, "the verifier never synced");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (v, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_server_verifies_locally_and_learns_revocations() {
    let b = Broker::start().await;
    let agent = der_of(&b.dev_identity("agent").cert);
    let other = der_of(&b.dev_identity("requester").cert);
    let (v, stop) = started(&b, "db.staging", StalePolicy::Strict).await;
    let (elsewhere, stop_elsewhere) = started(&b, "other.example", StalePolicy::Strict).await;

    let task = approved_task(&b, &[], None).await;
    let issued = issue_as_agent(&b, &task.id, None).await;
    let claims = v.verify(&issued.token, Some(&agent)).await.unwrap();
    assert_eq!(claims.jti, issued.jti);
    assert_eq!(claims.task_id, task.id);

    // cnf: another certificate, or none, is refused.
    assert_eq!(
        v.verify(&issued.token, Some(&other)).await,
        Err(VerifyError::Unbound)
    );
    assert_eq!(
        v.verify(&issued.token, None).await,
        Err(VerifyError::Unbound)
    );
    // aud, tampering, garbage.
    assert!(matches!(
        elsewhere.verify(&issued.token, Some(&agent)).await,
        Err(VerifyError::Invalid(_))
    ));
    let mut parts: Vec<String> = issued.token.split('.').map(str::to_owned).collect();
    parts[1] = parts[1].replacen('e', "f", 1);
    assert!(v.verify(&parts.join("."), Some(&agent)).await.is_err());
    assert!(matches!(
        v.verify("not.a.token", Some(&agent)).await,
        Err(VerifyError::Malformed(_))
    ));
    assert!(matches!(
        v.verify(&"a".repeat(10_000), Some(&agent)).await,
        Err(VerifyError::Malformed(_))
    ));

    // A revocation reaches the verifier within a second, without a call to the broker.
    creds_as(&b, "agent")
        .await
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: issued.lease_id.clone(),
        })
        .await
        .unwrap();
    let revoked_at = Instant::now();
    loop {
        match v.verify(&issued.token, Some(&agent)).await {
            Err(VerifyError::Revoked) => break,
            other => assert!(
                revoked_at.elapsed() < Duration::from_secs(1),
                "still {other:?} after {:?}",
                revoked_at.elapsed()
            ),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // A rotated-in key: unknown kid, fetched at once.
    admin_as(&b, "operator")
        .await
        .rotate_signing_key(pb::RotateSigningKeyRequest {})
        .await
        .unwrap();
    let fresh = issue_as_agent(&b, &task.id, None).await;
    // (At most one refetch a second: the verifier fetched the set at start.)
    let rotated_at = Instant::now();
    while let Err(e) = v.verify(&fresh.token, Some(&agent)).await {
        assert_eq!(e, VerifyError::UnknownKey);
        assert!(rotated_at.elapsed() < Duration::from_secs(2), "{e:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The broker goes away: strict refuses once the view is stale; best-effort keeps it.
    let (lenient, stop_lenient) = started(&b, "db.staging", StalePolicy::BestEffort).await;
    b.stop().await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        v.verify(&fresh.token, Some(&agent)).await,
        Err(VerifyError::Stale)
    );
    lenient.verify(&fresh.token, Some(&agent)).await.unwrap();
    assert_eq!(
        lenient.verify(&issued.token, Some(&agent)).await,
        Err(VerifyError::Revoked)
    );
    stop.cancel();
    stop_elsewhere.cancel();
    stop_lenient.cancel();
}

/// Issue 16, point 7: a token that carries `cnf` always needs the matching certificate, even
/// where the verifier lets tokens without `cnf` pass (RFC 8705 section 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bound_token_needs_its_certificate_whatever_require_cnf_says() {
    let b = Broker::start().await;
    let agent = der_of(&b.dev_identity("agent").cert);
    let mut config = VerifierConfig::new(
        ISSUER,
        "db.staging",
        &format!("http://{}/.well-known/jwks.json", b.http),
    );
    config.require_cnf = false;
    config.stale = StalePolicy::BestEffort;
    let v = Verifier::new(config).unwrap();
    v.refresh_keys().await.unwrap();
    let task = approved_task(&b, &[], None).await;
    let issued = issue_as_agent(&b, &task.id, None).await;
    assert_eq!(
        v.verify(&issued.token, None).await,
        Err(VerifyError::Unbound),
        "a stolen bound token without its certificate"
    );
    v.verify(&issued.token, Some(&agent)).await.unwrap();
    b.stop().await;
}

/// Issue 16, point 7: the JWK Set over plain http is refused off loopback (anyone on the path
/// could hand out keys) unless explicitly allowed; the broker's HTTP port serves HTTPS
/// (`server.http_tls`), which a verifier uses with the broker's CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jwks_comes_over_https() {
    for url in [
        "http://broker.example.com/.well-known/jwks.json",
        "http://10.0.0.8:7480/.well-known/jwks.json",
        "ftp://127.0.0.1/jwks",
    ] {
        let e = Verifier::new(VerifierConfig::new(ISSUER, "db.staging", url)).unwrap_err();
        assert!(matches!(e, VerifyError::Setup(_)), "{url}: {e:?}");
    }
    let mut lax = VerifierConfig::new(
        ISSUER,
        "db.staging",
        "http://broker.mesh.internal/.well-known/jwks.json",
    );
    lax.danger_allow_plain_http_jwks = true;
    Verifier::new(lax).unwrap();

    let b = Broker::start_with_env(vec![("TASKCRED_SERVER__HTTP_TLS".into(), "true".into())]).await;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(b.path("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut config = VerifierConfig::new(
        ISSUER,
        "db.staging",
        &format!("https://localhost:{}/.well-known/jwks.json", b.http.port()),
    );
    config.tls = Some(tls);
    config.stale = StalePolicy::BestEffort;
    let v = Verifier::new(config).unwrap();
    v.refresh_keys().await.unwrap();
    let task = approved_task(&b, &[], None).await;
    let issued = issue_as_agent(&b, &task.id, None).await;
    let agent = der_of(&b.dev_identity("agent").cert);
    v.verify(&issued.token, Some(&agent)).await.unwrap();
    // Plain HTTP on the TLS port gets nothing.
    let mut s = tokio::net::TcpStream::connect(b.http).await.unwrap();
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut buf)).await;
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
    b.stop().await;
}
