//! The HTTP port (axum): `/healthz` (the process answers), `/readyz` (the broker serves RPCs and
//! its store answers), `/.well-known/jwks.json` and `/.well-known/openid-configuration` (the
//! keys verifiers check tokens with), `/crl` (revoked certificates, DER, signed by the issuing
//! CA), `/metrics` (Prometheus text). Served plain or over TLS ([`listener`]).

pub mod listener;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::broker::Broker;
use crate::mint::KeyRing;
use crate::store::Store;

/// What the HTTP handlers read.
#[derive(Clone)]
pub struct HttpState {
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// Whether the broker is ready to serve RPCs (false while starting and draining).
    pub ready: Arc<AtomicBool>,
    /// The store: not ready while it does not answer.
    pub store: Arc<dyn Store>,
    /// The signing keys, published as JWKS and discovery.
    pub keys: KeyRing,
    /// The use cases (for a store reset it detected).
    pub broker: Broker,
}

/// The routes of the HTTP port.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/crl", get(crl))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/.well-known/openid-configuration", get(discovery))
        .with_state(state)
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// How long `/readyz` waits for the store: under the usual probe timeout (Kubernetes: 1 s), so
/// that a hanging store answers 503 rather than a probe timeout.
pub const READY_TIMEOUT: Duration = Duration::from_millis(800);

/// Ready or not (the store answers and takes a write within [`READY_TIMEOUT`]), and a detected
/// store reset on a line of its own. A reset does not make the broker unready: every replica
/// would drop out at once; it is an alert (the log and `taskcred_store_resets_total`), not an
/// outage.
async fn readyz(State(state): State<HttpState>) -> (StatusCode, String) {
    if !state.ready.load(Ordering::Acquire) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: starting or draining\n".into(),
        );
    }
    let (code, mut body) = match tokio::time::timeout(READY_TIMEOUT, state.store.ping()).await {
        Ok(Ok(())) => (StatusCode::OK, String::from("ready\n")),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: the store refuses a write");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                String::from("not ready: the store refuses writes\n"),
            )
        }
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            String::from("not ready: the store does not answer\n"),
        ),
    };
    if let Some(r) = state.broker.store_reset() {
        body.push_str(&format!(
            "store reset detected at {}: epoch {} -> {}; credentials issued before are \
             inactive; re-apply agent locks\n",
            humantime::format_rfc3339_seconds(r.detected_at),
            r.previous.id,
            r.current.id
        ));
    }
    (code, body)
}

/// The CRL (`application/pkix-crl`); 404 without an issuing CA, 503 while the store fails.
async fn crl(State(state): State<HttpState>) -> axum::response::Response {
    match state.broker.crl().await {
        Ok(Some(der)) => (
            [
                (header::CONTENT_TYPE, "application/pkix-crl"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            der.as_ref().clone(),
        )
            .into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, "no issuing CA is configured\n").into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "building the CRL failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "the CRL cannot be built now; retry\n",
            )
                .into_response()
        }
    }
}

/// Verifiers may cache the key set briefly; a rotated-in key is published before it signs.
const KEY_CACHE: &str = "public, max-age=60";

async fn jwks(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "application/jwk-set+json"),
            (header::CACHE_CONTROL, KEY_CACHE),
        ],
        state.keys.jwks().to_string(),
    )
}

async fn discovery(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, KEY_CACHE),
        ],
        state.keys.discovery().to_string(),
    )
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        {
            crate::telemetry::collect_process_metrics();
            state.metrics.render()
        },
    )
}
