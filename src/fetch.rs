//! Bounded HTTP GETs of public documents (JWK Sets): a reqwest client over rustls with ring and
//! only the roots given (never the process-wide provider or the platform verifier), no
//! redirects, short timeouts, and a body read by chunks so that a server that sends no length
//! cannot make it grow past a bound.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;

/// A rustls client configuration (ring, safe protocol versions) trusting `roots`.
///
/// # Errors
/// A one-line reason if rustls refuses the versions (never expected).
pub fn tls_config(roots: RootCertStore) -> Result<rustls::ClientConfig, String> {
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth())
}

/// The CA certificates of a PEM file.
///
/// # Errors
/// A one-line reason naming the file.
pub fn roots_from_pem(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: bad PEM: {e}", path.display()))?;
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!("{}: no usable CA certificate", path.display()));
    }
    Ok(roots)
}

/// The operating system's trust store.
///
/// # Errors
/// A one-line reason when it holds no usable certificate.
pub fn native_roots() -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err("the system trust store holds no usable CA certificate".into());
    }
    Ok(roots)
}

/// A client for small public documents over `tls`.
///
/// # Errors
/// A one-line reason if reqwest refuses the configuration.
pub fn client(tls: rustls::ClientConfig) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .connect_timeout(Duration::from_secs(3))
        .redirect(reqwest::redirect::Policy::none())
        .tls_backend_preconfigured(tls)
        .build()
        .map_err(|e| format!("HTTP client: {e}"))
}

/// GETs `url` and returns its body, refusing a status other than 2xx and a body over `max`
/// bytes.
///
/// # Errors
/// A one-line reason.
pub async fn get_bounded(http: &reqwest::Client, url: &str, max: usize) -> Result<Vec<u8>, String> {
    let mut response = http
        .get(url)
        .send()
        .await
        .map_err(|e| e.to_string())?
        .error_for_status()
        .map_err(|e| e.to_string())?;
    if response.content_length().is_some_and(|n| n > max as u64) {
        return Err("too large".into());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > max {
            return Err("too large".into());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Whether `host` (as an URL has it: `localhost`, an IPv4 address, or `[v6]`) is this machine:
/// the only place plain `http` may fetch or name keys.
pub fn is_loopback_host(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}
