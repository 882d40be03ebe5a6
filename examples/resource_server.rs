//! A resource server that accepts taskcred access tokens with `taskcred::verify`: tokens are
//! checked locally (JWKS, iss, aud, exp, cnf) and revocations arrive over the broker's watch
//! stream, so a revoked or locked agent is refused within about a second without a call per
//! request.
//!
//! It sits behind an mTLS-terminating sidecar (Envoy, Istio, Linkerd...), which authenticates
//! the agent's client certificate and forwards it in `x-forwarded-client-cert` (`Cert="<URL-
//! encoded PEM>"`); the token's `cnf` is checked against that certificate. It therefore listens
//! on loopback only: only the sidecar may reach it.
//!
//! ```text
//! cargo run --release -- serve --dev                      # the broker, in another terminal
//! cargo run --example resource_server -- --audience db.staging
//! TOKEN=$(cargo run -q -- --as agent token issue --task $ID --audience db.staging)
//! CERT=$(python3 -c 'import urllib.parse;print(urllib.parse.quote(open(".taskcred-dev/agent.pem").read()))')
//! curl -s localhost:8088/rows -H "authorization: Bearer $TOKEN" -H "x-forwarded-client-cert: Cert=\"$CERT\""
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use clap::Parser;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use taskcred::cli::{ClientArgs, connect};
use taskcred::verify::{Verifier, VerifierConfig};
use tokio_util::sync::CancellationToken;

/// Flags.
#[derive(Debug, Parser)]
struct Args {
    /// This server's audience: tokens must be for it.
    #[arg(long, default_value = "db.staging")]
    audience: String,
    /// The broker's issuer URL (its `iss`).
    #[arg(long, default_value = "http://127.0.0.1:7480")]
    issuer: String,
    /// The broker's JWK Set.
    #[arg(long, default_value = "http://127.0.0.1:7480/.well-known/jwks.json")]
    jwks: String,
    /// The broker's gRPC URL, for the revocation stream.
    #[arg(long, default_value = "https://127.0.0.1:7443")]
    broker: String,
    /// The dev PKI (this example borrows its `approver` identity to watch revocations; any
    /// workload identity of the trust domain may).
    #[arg(long, default_value = ".taskcred-dev")]
    dev_dir: PathBuf,
    /// Where to listen (loopback: only the sidecar may connect).
    #[arg(long, default_value = "127.0.0.1:8088")]
    listen: SocketAddr,
}

/// The client certificate the sidecar forwarded: the `Cert` element of the first
/// `x-forwarded-client-cert` entry, a URL-encoded PEM.
fn forwarded_cert(headers: &HeaderMap) -> Option<Vec<u8>> {
    let xfcc = headers.get("x-forwarded-client-cert")?.to_str().ok()?;
    let first = xfcc.split(',').next()?;
    let cert = first
        .split(';')
        .find_map(|kv| kv.trim().strip_prefix("Cert="))?
        .trim_matches('"');
    let pem = percent_encoding::percent_decode_str(cert)
        .decode_utf8()
        .ok()?;
    Some(
        CertificateDer::from_pem_slice(pem.as_bytes())
            .ok()?
            .to_vec(),
    )
}

async fn rows(State(verifier): State<Verifier>, headers: HeaderMap) -> (StatusCode, String) {
    let Some(token) = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return (
            StatusCode::UNAUTHORIZED,
            "a bearer token is required\n".into(),
        );
    };
    let cert = forwarded_cert(&headers);
    match verifier.verify(token.trim(), cert.as_deref()).await {
        Ok(claims) => (
            StatusCode::OK,
            format!(
                "rows for {} (task {}, may: {})\n",
                claims.sub, claims.task_id, claims.scope
            ),
        ),
        Err(e) => (StatusCode::UNAUTHORIZED, format!("refused: {e}\n")),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let verifier = Verifier::new(VerifierConfig::new(
        &args.issuer,
        &args.audience,
        &args.jwks,
    ))?;
    verifier.refresh_keys().await?;
    let channel = connect(&ClientArgs {
        broker: args.broker.clone(),
        ca: None,
        cert: None,
        key: None,
        as_name: Some("approver".into()),
        dev_dir: args.dev_dir.clone(),
        json: false,
    })
    .await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(verifier.clone().run(channel, shutdown.clone()));
    let app = Router::new().route("/rows", get(rows)).with_state(verifier);
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!(
        "resource server for {} on http://{}",
        args.audience, args.listen
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = tokio::signal::ctrl_c().await;
            shutdown.cancel();
        })
        .await?;
    Ok(())
}
