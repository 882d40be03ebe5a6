//! TLS of the gRPC port: the rustls server configuration built from the configured files (ring
//! provider, TLS 1.2+ or 1.3 only, client certificates verified as X509-SVIDs but optional), and
//! the accept loop that turns TCP connections into [`TlsConn`]s carrying the peer's identity,
//! read once per connection.
//!
//! The loop bounds open connections (a semaphore) and handshake time, and stops on shutdown.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::config::{TlsConfig, TlsVersion};
use crate::identity::{PeerIdentity, SpiffeClientVerifier, TrustDomains};

/// Why the TLS configuration could not be built. Each names the file or key at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsSetupError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("key `{key}`: file {path}: {problem}")]
    File {
        /// The config key naming the file.
        key: &'static str,
        /// The file.
        path: String,
        /// What is wrong.
        problem: String,
    },
    /// rustls refused the material (for example, the key does not match the certificate).
    #[error("TLS configuration: {0}")]
    Rustls(String),
}

/// The ring crypto provider, the only one this crate builds with.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the gRPC port's rustls server configuration.
///
/// # Errors
/// [`TlsSetupError`] naming the file that cannot be read or parsed, or what rustls refused.
pub fn server_config(
    tls: &TlsConfig,
    allowed: &TrustDomains,
    issuing_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsSetupError> {
    let chain = load_certs("tls.cert", &tls.cert)?;
    let key = PrivateKeyDer::from_pem_file(&tls.key).map_err(|e| TlsSetupError::File {
        key: "tls.key",
        path: tls.key.display().to_string(),
        problem: format!("no usable private key: {e}"),
    })?;
    let mut roots = RootCertStore::empty();
    for ca in &tls.client_ca {
        for cert in load_certs("tls.client_ca", ca)? {
            roots.add(cert).map_err(|e| TlsSetupError::File {
                key: "tls.client_ca",
                path: ca.display().to_string(),
                problem: format!("not a usable CA certificate: {e}"),
            })?;
        }
    }

    let provider = provider();
    let mut verifier =
        SpiffeClientVerifier::new(Arc::new(roots), allowed.clone(), provider.clone())
            .map_err(|e| TlsSetupError::Rustls(format!("client verifier: {e}")))?;
    // Task certificates the broker issues are not identities at the broker.
    if let Some(path) = issuing_ca {
        use x509_parser::prelude::{FromDer as _, X509Certificate};
        for cert in load_certs("issuer.ca_cert", path)?.iter().take(1) {
            let (_, ca) =
                X509Certificate::from_der(cert.as_ref()).map_err(|e| TlsSetupError::File {
                    key: "issuer.ca_cert",
                    path: path.display().to_string(),
                    problem: format!("not a certificate: {e}"),
                })?;
            verifier = verifier.refusing_issuer(ca.subject().as_raw().to_vec());
        }
    }
    let versions: &[&rustls::SupportedProtocolVersion] = match tls.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| TlsSetupError::Rustls(e.to_string()))?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(chain, key)
        .map_err(|e| TlsSetupError::Rustls(format!("tls.cert / tls.key: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

fn load_certs(
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let err = |problem: String| TlsSetupError::File {
        key,
        path: path.display().to_string(),
        problem,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(err("no CERTIFICATE in the file".into()));
    }
    Ok(certs)
}

/// What the RPC layer knows of a connection, inserted in every request's extensions.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client's address.
    pub remote: SocketAddr,
    /// The verified identity, when the client presented a certificate.
    pub peer: Option<Arc<PeerIdentity>>,
}

/// One accepted TLS connection. Holds a slot of the connection limit until dropped.
#[derive(Debug)]
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    info: ConnInfo,
    _slot: OwnedSemaphorePermit,
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Limits of the accept loop.
#[derive(Debug, Clone, Copy)]
pub struct AcceptLimits {
    /// Open connections at once.
    pub max_connections: usize,
    /// Time allowed for a handshake.
    pub handshake_timeout: Duration,
}

/// Accepts TLS connections on `listener` until `shutdown`, yielding them as a stream for
/// `tonic`'s `serve_with_incoming`. Failed handshakes are logged and counted, never yielded.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    allowed: TrustDomains,
    limits: AcceptLimits,
    shutdown: CancellationToken,
) -> ReceiverStream<io::Result<TlsConn>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let allowed = Arc::new(allowed);
    tokio::spawn(async move {
        loop {
            let slot = tokio::select! {
                () = shutdown.cancelled() => break,
                slot = slots.clone().acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => break, // the semaphore is never closed
                },
            };
            let (tcp, remote) = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let (acceptor, tx, allowed) = (acceptor.clone(), tx.clone(), allowed.clone());
            tokio::spawn(async move {
                if let Some(conn) = handshake(acceptor, tcp, remote, &allowed, limits, slot).await {
                    // The receiver is gone only when the server stopped; drop the connection.
                    let _ = tx.send(Ok(conn)).await;
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    remote: SocketAddr,
    allowed: &TrustDomains,
    limits: AcceptLimits,
    slot: OwnedSemaphorePermit,
) -> Option<TlsConn> {
    // gRPC is many small messages: Nagle only adds latency.
    let _ = tcp.set_nodelay(true);
    let stream = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let reason = if e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .is_some_and(|r| matches!(r, rustls::Error::InvalidCertificate(_)))
            {
                "client_certificate"
            } else {
                "protocol"
            };
            metrics::counter!(crate::telemetry::TLS_HANDSHAKE_FAILURES, "reason" => reason)
                .increment(1);
            tracing::info!(%remote, reason, error = %e, "TLS handshake refused");
            return None;
        }
        Err(_) => {
            metrics::counter!(crate::telemetry::TLS_HANDSHAKE_FAILURES, "reason" => "timeout")
                .increment(1);
            tracing::info!(%remote, "TLS handshake timed out");
            return None;
        }
    };
    let peer = match stream.get_ref().1.peer_certificates() {
        Some([leaf, ..]) => match PeerIdentity::from_leaf(leaf, allowed) {
            Ok(p) => Some(Arc::new(p)),
            Err(e) => {
                // The verifier ran the same check during the handshake; this cannot pass there
                // and fail here, but if it ever does the connection is refused, not downgraded.
                tracing::error!(%remote, error = %e, "verified client certificate is not an identity");
                return None;
            }
        },
        _ => None,
    };
    Some(TlsConn {
        stream,
        info: ConnInfo { remote, peer },
        _slot: slot,
    })
}
