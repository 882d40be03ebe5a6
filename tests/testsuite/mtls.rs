//! The gRPC port over real TLS: every client certificate the broker must refuse, each named after
//! its defect, and what an accepted or certificate-less caller gets.

use crate::common::{Broker, Pem, handshake, issue, svid_params};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject as _;
use rustls::{AlertDescription, Error as TlsError};
use taskcred::api::pb::WhoAmIRequest;
use taskcred::api::pb::identity_service_client::IdentityServiceClient;
use time::{Duration, OffsetDateTime};
use tonic::Code;

const AGENT: &str = "spiffe://taskcred.dev/agent/demo";

/// A certificate the broker must refuse and the alert it must answer with.
struct Bad {
    defect: &'static str,
    pem: Pem,
    alert: AlertDescription,
}

fn expect_refused(result: Result<(), TlsError>, bad: &Bad) {
    match result {
        Err(TlsError::AlertReceived(a)) => {
            assert_eq!(a, bad.alert, "{}: wrong alert", bad.defect);
        }
        other => panic!(
            "{}: expected alert {:?}, got {other:?}",
            bad.defect, bad.alert
        ),
    }
}

fn bad_certificates(broker: &Broker) -> Vec<Bad> {
    let ca = broker.dev_ca();
    let now = OffsetDateTime::now_utc();
    let mut out = Vec::new();
    let mut add = |defect, params: CertificateParams, alert| {
        out.push(Bad {
            defect,
            pem: issue(&params, &ca),
            alert,
        });
    };

    let mut expired = svid_params(&[AGENT]);
    expired.not_before = now - Duration::days(10);
    expired.not_after = now - Duration::days(1);
    add("expired", expired, AlertDescription::CertificateExpired);

    let mut not_yet_valid = svid_params(&[AGENT]);
    not_yet_valid.not_before = now + Duration::days(1);
    not_yet_valid.not_after = now + Duration::days(10);
    add(
        "not_yet_valid",
        not_yet_valid,
        AlertDescription::CertificateExpired,
    );

    let mut no_uri_san = svid_params(&[]);
    no_uri_san.subject_alt_names = vec![rcgen::SanType::DnsName(
        "agent.taskcred.dev".try_into().unwrap(),
    )];
    add(
        "no_uri_san",
        no_uri_san,
        AlertDescription::CertificateUnknown,
    );

    add(
        "two_uri_sans",
        svid_params(&[AGENT, "spiffe://taskcred.dev/agent/other"]),
        AlertDescription::CertificateUnknown,
    );

    // Every bad SPIFFE ID of STANDARDS.md A, in an otherwise valid certificate.
    let long_td = format!("spiffe://{}/a", "a".repeat(256));
    let long_td: &'static str = Box::leak(long_td.into_boxed_str());
    for (defect, uri) in [
        (
            "spiffe_id_uppercase_trust_domain",
            "spiffe://Taskcred.dev/a",
        ),
        ("spiffe_id_port", "spiffe://taskcred.dev:443/a"),
        ("spiffe_id_empty_segment", "spiffe://taskcred.dev/a//b"),
        ("spiffe_id_trailing_slash", "spiffe://taskcred.dev/a/"),
        ("spiffe_id_percent_encoding", "spiffe://taskcred.dev/%41"),
        ("spiffe_id_query", "spiffe://taskcred.dev/a?x=1"),
        ("spiffe_id_fragment", "spiffe://taskcred.dev/a#x"),
        ("spiffe_id_dot_segment", "spiffe://taskcred.dev/a/../b"),
        ("spiffe_id_userinfo", "spiffe://u@taskcred.dev/a"),
        ("spiffe_id_no_path", "spiffe://taskcred.dev"),
        ("spiffe_id_wrong_scheme", "https://taskcred.dev/a"),
        ("spiffe_id_256_byte_trust_domain", long_td),
    ] {
        add(
            defect,
            svid_params(&[uri]),
            AlertDescription::CertificateUnknown,
        );
    }

    // An identity of a trust domain not served here: `access_denied`, so that the client can
    // tell it from a certificate that is no X509-SVID.
    add(
        "trust_domain_not_allowed",
        svid_params(&["spiffe://evil.dev/agent/demo"]),
        AlertDescription::AccessDenied,
    );

    let mut key_cert_sign = svid_params(&[AGENT]);
    key_cert_sign.key_usages.push(KeyUsagePurpose::KeyCertSign);
    add(
        "leaf_with_key_cert_sign",
        key_cert_sign,
        AlertDescription::CertificateUnknown,
    );

    // A CA certificate, signed by the trusted root and carrying a valid SPIFFE ID, presented as
    // a client leaf.
    let mut ca_as_leaf = svid_params(&[AGENT]);
    ca_as_leaf.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_as_leaf.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    add(
        "ca_certificate_as_leaf",
        ca_as_leaf,
        AlertDescription::CertificateUnknown,
    );
    out
}

#[tokio::test]
async fn refuses_every_bad_client_certificate_over_real_tls() {
    let broker = Broker::start().await;
    let ca_pem = broker.path("ca.pem");

    // The accepted case first, on the same broker, so a refusal below means the certificate.
    handshake(broker.grpc, &ca_pem, Some(&broker.dev_identity("agent")))
        .await
        .expect("a valid SVID completes the handshake");

    for bad in bad_certificates(&broker) {
        expect_refused(handshake(broker.grpc, &ca_pem, Some(&bad.pem)).await, &bad);
        // And through a gRPC client: the call fails, it never reaches WhoAmI.
        let endpoint = tonic::transport::Endpoint::from_shared(format!("https://{}", broker.grpc))
            .unwrap()
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(
                        std::fs::read(&ca_pem).unwrap(),
                    ))
                    .identity(tonic::transport::Identity::from_pem(
                        &bad.pem.cert,
                        &bad.pem.key,
                    ))
                    .domain_name("localhost"),
            )
            .unwrap();
        if let Ok(channel) = endpoint.connect().await {
            let result = IdentityServiceClient::new(channel)
                .who_am_i(WhoAmIRequest {})
                .await;
            assert!(
                result.is_err(),
                "{}: WhoAmI answered {result:?}",
                bad.defect
            );
        }
    }
    broker.stop().await;
}

#[tokio::test]
async fn refuses_a_certificate_from_another_ca() {
    let broker = Broker::start().await;
    let other = crate::common::another_ca();
    let pem = issue(&svid_params(&[AGENT]), &other);
    let bad = Bad {
        defect: "signed_by_another_ca",
        pem,
        alert: AlertDescription::UnknownCA,
    };
    expect_refused(
        handshake(broker.grpc, &broker.path("ca.pem"), Some(&bad.pem)).await,
        &bad,
    );
    broker.stop().await;
}

#[tokio::test]
async fn refuses_the_root_ca_certificate_presented_as_a_client_leaf() {
    let broker = Broker::start().await;
    let root = Pem {
        cert: std::fs::read_to_string(broker.path("ca.pem")).unwrap(),
        key: std::fs::read_to_string(broker.path("ca-key.pem")).unwrap(),
    };
    let result = handshake(broker.grpc, &broker.path("ca.pem"), Some(&root)).await;
    assert!(
        matches!(result, Err(TlsError::AlertReceived(_))),
        "root CA as leaf: {result:?}"
    );
    broker.stop().await;
}

#[tokio::test]
async fn whoami_returns_the_verified_identity() {
    let broker = Broker::start().await;
    let agent = broker.dev_identity("agent");
    let me = IdentityServiceClient::new(broker.channel(Some(&agent)).await)
        .who_am_i(WhoAmIRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(me.spiffe_id, AGENT);
    assert_eq!(me.trust_domain, "taskcred.dev");
    assert_eq!(me.path, "/agent/demo");
    let der = rustls::pki_types::CertificateDer::from_pem_slice(agent.cert.as_bytes()).unwrap();
    assert_eq!(
        me.cert_sha256,
        taskcred::identity::cert_thumbprint_sha256(&der)
    );
    let (_, rest) = x509_parser::parse_x509_certificate(&der).unwrap();
    assert_eq!(
        me.cert_not_after.unwrap().seconds,
        rest.validity().not_after.timestamp()
    );

    let approver = IdentityServiceClient::new(broker.channel_as("approver").await)
        .who_am_i(WhoAmIRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(approver.spiffe_id, "spiffe://taskcred.dev/human/approver");
    broker.stop().await;
}

#[tokio::test]
async fn without_a_client_certificate_only_public_rpcs_answer() {
    let broker = Broker::start().await;
    // The TLS layer accepts the connection...
    handshake(broker.grpc, &broker.path("ca.pem"), None)
        .await
        .expect("no client certificate is accepted at the TLS layer");
    let channel = broker.channel(None).await;
    // ...health is public...
    let health = tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    // ...everything else is UNAUTHENTICATED.
    let err = IdentityServiceClient::new(channel.clone())
        .who_am_i(WhoAmIRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(channel);
    let err = reflection
        .server_reflection_info(tokio_stream::iter([list_services_request()]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    broker.stop().await;
}

fn list_services_request() -> tonic_reflection::pb::v1::ServerReflectionRequest {
    tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    }
}

#[tokio::test]
async fn reflection_lists_the_services() {
    let broker = Broker::start().await;
    let mut reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
            broker.channel_as("agent").await,
        );
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter([list_services_request()]))
        .await
        .unwrap()
        .into_inner();
    let response = stream.message().await.unwrap().unwrap();
    let Some(
        tonic_reflection::pb::v1::server_reflection_response::MessageResponse::ListServicesResponse(
            list,
        ),
    ) = response.message_response
    else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["taskcred.v1.IdentityService", "grpc.health.v1.Health"] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
    broker.stop().await;
}

#[tokio::test]
async fn oversized_messages_are_refused() {
    let broker = Broker::start().await;
    let err = tonic_health::pb::health_client::HealthClient::new(broker.channel(None).await)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "x".repeat(300 * 1024),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{err:?}"
    );
    broker.stop().await;
}

#[tokio::test]
async fn http_port_serves_health_readiness_and_rpc_metrics() {
    let broker = Broker::start().await;
    assert_eq!(broker.http_get("/healthz").await.0, 200);
    assert_eq!(broker.http_get("/readyz").await.0, 200);
    IdentityServiceClient::new(broker.channel_as("agent").await)
        .who_am_i(WhoAmIRequest {})
        .await
        .unwrap();
    let _ = IdentityServiceClient::new(broker.channel(None).await)
        .who_am_i(WhoAmIRequest {})
        .await
        .unwrap_err();
    let (status, body) = broker.http_get("/metrics").await;
    assert_eq!(status, 200);
    let line = |code: &str| {
        body.lines().any(|l| {
            l.starts_with("taskcred_grpc_requests_total{")
                && l.contains("method=\"/taskcred.v1.IdentityService/WhoAmI\"")
                && l.contains(&format!("code=\"{code}\""))
        })
    };
    assert!(line("OK"), "no OK counter in:\n{body}");
    assert!(
        line("UNAUTHENTICATED"),
        "no UNAUTHENTICATED counter in:\n{body}"
    );
    assert!(
        body.contains("taskcred_grpc_request_duration_seconds_bucket{"),
        "no latency histogram in:\n{body}"
    );
    assert_eq!(broker.http_get("/nope").await.0, 404);
    broker.stop().await;
}

/// A partner trust domain's CA, as `rcgen` issuer, PEM and a SPIFFE bundle (JSON) of it.
fn partner_ca() -> (rcgen::Issuer<'static, KeyPair>, String, String) {
    use base64::Engine as _;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "partner.example CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let bundle = serde_json::json!({
        "spiffe_sequence": 1,
        "keys": [{"use": "x509-svid", "kty": "EC", "crv": "P-256",
                  "x5c": [base64::engine::general_purpose::STANDARD.encode(cert.der())]}],
    });
    let pem = cert.pem();
    (rcgen::Issuer::new(params, key), pem, bundle.to_string())
}

/// Issue 16, point 1: each trust domain is bound to its own bundle (X509-SVID section 5). With a
/// partner domain configured beside the dev one, the partner's CA issues its own identities,
/// and one that claims to be the dev operator: that one is refused at the handshake, though
/// its chain verifies against a configured bundle. The partner's bundle is a SPIFFE bundle.
#[tokio::test]
async fn a_partner_ca_cannot_issue_identities_of_another_trust_domain() {
    let dir = tempfile::tempdir().unwrap();
    let (partner, _, bundle) = partner_ca();
    std::fs::write(dir.path().join("partner.json"), bundle).unwrap();
    let domains = format!(
        r#"[{{name = "taskcred.dev", bundle = "{0}/ca.pem"}}, {{name = "partner.example", bundle = "{0}/partner.json"}}]"#,
        dir.path().display()
    );
    let broker = Broker::launch(
        dir,
        vec![("TASKCRED_IDENTITY__TRUST_DOMAINS".into(), domains)],
        None,
    )
    .await;
    let ca = broker.path("ca.pem");

    let own = issue(
        &svid_params(&["spiffe://partner.example/agent/x"]),
        &partner,
    );
    handshake(broker.grpc, &ca, Some(&own))
        .await
        .expect("the partner's CA speaks for the partner's domain");
    let id = IdentityServiceClient::new(broker.channel(Some(&own)).await)
        .who_am_i(WhoAmIRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(id.spiffe_id, "spiffe://partner.example/agent/x");

    let forged = issue(
        &svid_params(&["spiffe://taskcred.dev/human/operator"]),
        &partner,
    );
    expect_refused(
        handshake(broker.grpc, &ca, Some(&forged)).await,
        &Bad {
            defect: "another_domains_ca",
            pem: forged.clone(),
            alert: AlertDescription::UnknownCA,
        },
    );
    // And the dev CA cannot speak for the partner either.
    let dev_forged = issue(
        &svid_params(&["spiffe://partner.example/agent/x"]),
        &broker.dev_ca(),
    );
    expect_refused(
        handshake(broker.grpc, &ca, Some(&dev_forged)).await,
        &Bad {
            defect: "dev_ca_for_the_partner",
            pem: dev_forged.clone(),
            alert: AlertDescription::UnknownCA,
        },
    );
    // The dev identities still pass.
    handshake(broker.grpc, &ca, Some(&broker.dev_identity("operator")))
        .await
        .unwrap();
    broker.stop().await;
}

/// Only configured trust domains pass: with another domain alone, the dev identities are
/// refused (their CA is the bundle of a domain they do not name).
#[tokio::test]
async fn trust_domains_come_from_config() {
    let dir = tempfile::tempdir().unwrap();
    let domains = format!(
        r#"[{{name = "prod.example.com", bundle = "{}/ca.pem"}}]"#,
        dir.path().display()
    );
    let broker = Broker::launch(
        dir,
        vec![("TASKCRED_IDENTITY__TRUST_DOMAINS".into(), domains)],
        None,
    )
    .await;
    let result = handshake(
        broker.grpc,
        &broker.path("ca.pem"),
        Some(&broker.dev_identity("agent")),
    )
    .await;
    assert_eq!(
        result,
        Err(TlsError::AlertReceived(AlertDescription::AccessDenied))
    );
    broker.stop().await;
}

/// Issue 16, point 2: a client certificate naming a CI identity is refused at the handshake,
/// even signed by the dev CA: the CI trust domain is never one of mTLS. One in the dev domain
/// with a CI-looking path is just another workload: it gets nothing of a CI job's task.
#[tokio::test]
async fn ci_identities_are_not_mtls_identities() {
    let broker = Broker::start().await;
    let ca = broker.path("ca.pem");
    let ci = issue(
        &svid_params(&["spiffe://ci.taskcred.dev/ci/github/123456789"]),
        &broker.dev_ca(),
    );
    expect_refused(
        handshake(broker.grpc, &ca, Some(&ci)).await,
        &Bad {
            defect: "ci_identity_as_client_certificate",
            pem: ci.clone(),
            alert: AlertDescription::AccessDenied,
        },
    );
    // Nobody may ask for a task executed by a CI identity either.
    let err = taskcred::api::pb::task_service_client::TaskServiceClient::new(
        broker.channel_as("requester").await,
    )
    .request_task(taskcred::api::pb::RequestTaskRequest {
        executor: "spiffe://ci.taskcred.dev/ci/github/123456789".into(),
        purpose: "squat a CI job's identity".into(),
        grants: vec![taskcred::api::pb::Grant {
            audience: "prod-cluster".into(),
            actions: vec!["deploy".into()],
        }],
        ..Default::default()
    })
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("ExchangeCiToken"), "{err:?}");
    broker.stop().await;
}

#[tokio::test]
async fn http_port_publishes_the_signing_key_and_discovery() {
    let broker = Broker::start().await;
    let key = taskcred::mint::JwtKey::load(
        &broker.path("jwt-key.pem"),
        taskcred::config::JwtAlgorithm::ES256,
    )
    .unwrap();
    let (status, body) = broker.http_get("/.well-known/jwks.json").await;
    assert_eq!(status, 200);
    let jwks: serde_json::Value = serde_json::from_str(&body).unwrap();
    let keys = jwks["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["kid"], key.kid());
    assert_eq!(keys[0]["alg"], "ES256");
    assert_eq!(keys[0]["kty"], "EC");
    assert!(keys[0].get("d").is_none(), "no private part");
    // An ordinary JWT library reads it.
    let jwk: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&body).unwrap();
    taskcred::mint::install_jose_provider();
    jsonwebtoken::DecodingKey::from_jwk(&jwk.keys[0]).unwrap();

    let (status, body) = broker.http_get("/.well-known/openid-configuration").await;
    assert_eq!(status, 200);
    let d: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(d["issuer"], "http://127.0.0.1:7480");
    assert_eq!(d["jwks_uri"], "http://127.0.0.1:7480/.well-known/jwks.json");
    // Every field OpenID Connect Discovery 1.0 marks REQUIRED, so that libraries do not assume
    // RS256: the algorithms are the broker's.
    assert_eq!(d["response_types_supported"], serde_json::json!(["token"]));
    assert_eq!(d["subject_types_supported"], serde_json::json!(["public"]));
    assert_eq!(
        d["id_token_signing_alg_values_supported"],
        d["access_token_signing_alg_values_supported"]
    );
    assert!(
        !d["id_token_signing_alg_values_supported"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    broker.stop().await;
}

/// Refusals made before a use case runs carry a stable reason too (`google.rpc.ErrorInfo`):
/// a call without a client certificate, and a field the protobuf edge refuses (with the field).
#[tokio::test]
async fn refusals_at_the_edge_carry_a_reason() {
    use taskcred::api::pb::credential_service_client::CredentialServiceClient;
    let broker = Broker::start().await;
    let err = IdentityServiceClient::new(broker.channel(None).await)
        .who_am_i(WhoAmIRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(
        taskcred::api::reason_of(&err).as_deref(),
        Some("CLIENT_CERTIFICATE_REQUIRED")
    );
    let err = CredentialServiceClient::new(broker.channel_as("agent").await)
        .revoke_lease(taskcred::api::pb::RevokeLeaseRequest {
            lease_id: "not-a-lease".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        taskcred::api::reason_of(&err).as_deref(),
        Some("INVALID_FIELD")
    );
    let info = tonic_types::StatusExt::get_error_details(&err)
        .error_info()
        .cloned()
        .unwrap();
    assert_eq!(
        info.metadata.get("field").map(String::as_str),
        Some("lease_id")
    );
    broker.stop().await;
}
