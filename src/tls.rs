//! TLS of the gRPC port: the rustls server configuration built from the configured files (ring
//! provider, TLS 1.2+ or 1.3 only, client certificates verified as X509-SVIDs but optional), and
//! the accept loop that turns TCP connections into [`TlsConn`]s carrying the peer's identity,
//! read once per connection.
//!
//! The loop bounds open connections (a semaphore, and a smaller one for connections without a
//! client certificate), handshake time and the time to the HTTP/2 preface; a connection with no
//! RPC in flight for its idle timeout ends. It stops on shutdown.

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
use rustls::server::danger::ClientCertVerifier;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::config::{AcceptLimits, IdentityConfig, TlsConfig, TlsVersion};
use crate::identity::{PeerIdentity, SpiffeClientVerifier, TrustDomains, bundle};
use crate::net::{KeyedSlot, KeyedSlots, Lifetime};

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

/// Builds the gRPC port's rustls server configuration: each trust domain's client
/// certificates verified against that domain's bundle only.
///
/// # Errors
/// [`TlsSetupError`] naming the file that cannot be read or parsed, a CA certificate found in
/// the bundles of two trust domains, or what rustls refused.
pub fn server_config(
    tls: &TlsConfig,
    identity: &IdentityConfig,
    issuing_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsSetupError> {
    // Read first: a broken tls.cert or tls.key is reported before any bundle.
    let own = own_identity(tls)?;
    let mut bundles = Vec::with_capacity(identity.trust_domains.len());
    // Each CA certificate, and the domain whose bundle holds it.
    let mut owner: std::collections::HashMap<Vec<u8>, &str> = std::collections::HashMap::new();
    for domain in &identity.trust_domains {
        let path = &domain.bundle;
        let file_error = |problem: String| TlsSetupError::File {
            key: "identity.trust_domains.bundle",
            path: path.display().to_string(),
            problem,
        };
        let certs = bundle::load(path).map_err(|e| file_error(e.to_string()))?;
        let mut roots = RootCertStore::empty();
        for cert in certs {
            if let Some(other) = owner.get(cert.as_ref())
                && *other != domain.name
            {
                return Err(file_error(format!(
                    "a CA certificate of trust domain {} is also in the bundle of {other}: each \
                     domain needs a bundle of its own, or one domain's CA could issue the \
                     other's identities",
                    domain.name
                )));
            }
            owner.insert(cert.as_ref().to_vec(), &domain.name);
            roots
                .add(cert)
                .map_err(|e| file_error(format!("not a usable CA certificate: {e}")))?;
        }
        bundles.push((domain.name.clone(), roots));
    }

    let provider = provider();
    let mut verifier = SpiffeClientVerifier::new(bundles, provider.clone())
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
    build(tls, provider, Some(Arc::new(verifier)), own, b"h2")
}

/// The HTTP port's rustls configuration (`server.http_tls`): the broker's certificate, no client
/// authentication (verifiers read public data), HTTP/1.1.
///
/// # Errors
/// [`TlsSetupError`] naming the file that cannot be read, or what rustls refused.
pub fn http_server_config(tls: &TlsConfig) -> Result<Arc<ServerConfig>, TlsSetupError> {
    build(tls, provider(), None, own_identity(tls)?, b"http/1.1")
}

/// What both ports' configurations share: `provider`, the versions from `tls.min_version`, the
/// broker's own chain and key, and one ALPN protocol. `client_auth` verifies client
/// certificates; `None`: no client authentication.
fn build(
    tls: &TlsConfig,
    provider: Arc<rustls::crypto::CryptoProvider>,
    client_auth: Option<Arc<dyn ClientCertVerifier>>,
    (chain, key): (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
    alpn: &[u8],
) -> Result<Arc<ServerConfig>, TlsSetupError> {
    let builder = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions(tls.min_version))
        .map_err(|e| TlsSetupError::Rustls(e.to_string()))?;
    let builder = match client_auth {
        Some(verifier) => builder.with_client_cert_verifier(verifier),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsSetupError::Rustls(format!("tls.cert / tls.key: {e}")))?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(config))
}

/// TLS 1.3 and 1.2, or 1.3 alone.
static TLS12_AND_13: [&rustls::SupportedProtocolVersion; 2] =
    [&rustls::version::TLS13, &rustls::version::TLS12];
static TLS13_ONLY: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];

fn versions(min: TlsVersion) -> &'static [&'static rustls::SupportedProtocolVersion] {
    match min {
        TlsVersion::Tls12 => &TLS12_AND_13,
        TlsVersion::Tls13 => &TLS13_ONLY,
    }
}

/// The broker's certificate chain and key (`tls.cert`, `tls.key`).
fn own_identity(
    tls: &TlsConfig,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsSetupError> {
    let chain = load_certs("tls.cert", &tls.cert)?;
    let key = PrivateKeyDer::from_pem_file(&tls.key).map_err(|e| TlsSetupError::File {
        key: "tls.key",
        path: tls.key.display().to_string(),
        problem: format!("no usable private key: {e}"),
    })?;
    Ok((chain, key))
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
    /// The RPCs in flight on the connection and when the last one ended: an idle connection is
    /// closed.
    pub activity: Arc<Activity>,
}

/// The RPCs in flight on one connection, and when the connection was last busy.
#[derive(Debug)]
pub struct Activity {
    base: tokio::time::Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `base` at which the last RPC started or ended.
    last_ms: AtomicU64,
}

impl Activity {
    /// A connection with nothing in flight, busy last now.
    pub fn new() -> Self {
        Self {
            base: tokio::time::Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Marks one RPC in flight until the guard is dropped (at the end of its response body).
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        Busy(self.clone())
    }

    /// When the last RPC started or ended, or `None` while one is in flight.
    fn last_busy(&self) -> Option<tokio::time::Instant> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        Some(self.base + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

/// One RPC in flight on a connection; see [`Activity::busy`].
#[derive(Debug)]
pub struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The HTTP/2 client connection preface (RFC 9113 section 3.4): what every gRPC client sends
/// first. A connection that does not send it in time is closed.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One accepted TLS connection. Holds a slot of the connection limit, one of its identity's
/// (or, without a client certificate, of the anonymous limit and of its source address's) until
/// dropped, and ends itself (end of stream) once no RPC has been in flight for its idle timeout
/// or, without a certificate, at its maximum age whatever it does.
#[derive(Debug)]
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    info: ConnInfo,
    /// How much of the preface (read to check it) was handed to the server.
    preface_sent: usize,
    life: Lifetime,
    _slot: OwnedSemaphorePermit,
    _anonymous: Option<OwnedSemaphorePermit>,
    _per_key: KeyedSlot,
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
        let this = &mut *self;
        if this.preface_sent < PREFACE.len() {
            let rest = &PREFACE[this.preface_sent..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.preface_sent += n;
            return Poll::Ready(Ok(()));
        }
        if let Poll::Ready(r) = Pin::new(&mut this.stream).poll_read(cx, buf) {
            return Poll::Ready(r);
        }
        // Nothing to read: end the connection once it has been idle (no RPC) for too long, or
        // has lived its maximum age. Keep-alive pings do not count: only RPCs do.
        if this.life.poll_ended(cx, this.info.activity.last_busy()) {
            closed("idle_or_age");
            tracing::debug!(remote = %this.info.remote, "closing a connection: idle or at its maximum age");
            return Poll::Ready(Ok(()));
        }
        Poll::Pending
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
    let anonymous = Arc::new(Semaphore::new(limits.max_anonymous_connections));
    let per_key = Budgets {
        identities: KeyedSlots::new(limits.max_connections_per_identity),
        sources: KeyedSlots::new(limits.max_anonymous_connections_per_source),
    };
    let allowed = Arc::new(allowed);
    // Before the handshake nothing is known but the address: one address cannot hold every
    // slot with connections that never finish theirs.
    let handshakes = KeyedSlots::new(limits.max_handshakes_per_source);
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
                accepted = accept_or_back_off(&listener, "accept failed") => match accepted {
                    Some(a) => a,
                    None => continue,
                },
            };
            let Some(pending) =
                handshakes.try_take(&crate::broker::limits::source_key(remote.ip()))
            else {
                closed("handshakes_per_source");
                tracing::debug!(%remote, "connection refused: server.max_handshakes_per_source reached");
                continue;
            };
            let (acceptor, tx, allowed) = (acceptor.clone(), tx.clone(), allowed.clone());
            let (anonymous, per_key) = (anonymous.clone(), per_key.clone());
            tokio::spawn(async move {
                let slots = Slots {
                    slot,
                    anonymous: &anonymous,
                    per_key: &per_key,
                };
                let conn = handshake(acceptor, tcp, remote, &allowed, limits, slots).await;
                drop(pending);
                if let Some(conn) = conn {
                    // The receiver is gone only when the server stopped; drop the connection.
                    let _ = tx.send(Ok(conn)).await;
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Accepts one TCP connection, for the accept loops of both ports. A failed accept (EMFILE and
/// friends) is logged with `failed` and answered `None` after a short pause: the caller loops,
/// without spinning.
pub(crate) async fn accept_or_back_off(
    listener: &TcpListener,
    failed: &'static str,
) -> Option<(TcpStream, SocketAddr)> {
    match listener.accept().await {
        Ok(accepted) => Some(accepted),
        Err(e) => {
            tracing::warn!(error = %e, "{failed}");
            tokio::time::sleep(Duration::from_millis(50)).await;
            None
        }
    }
}

/// The slot a connection holds, the pool of anonymous ones, and the budgets per key.
struct Slots<'a> {
    slot: OwnedSemaphorePermit,
    anonymous: &'a Arc<Semaphore>,
    per_key: &'a Budgets,
}

/// Open connections per identity, and anonymous ones per source address.
#[derive(Debug, Clone)]
struct Budgets {
    identities: KeyedSlots,
    sources: KeyedSlots,
}

fn closed(reason: &'static str) {
    metrics::counter!(crate::telemetry::CONNECTIONS_CLOSED, "port" => "grpc", "reason" => reason)
        .increment(1);
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    remote: SocketAddr,
    allowed: &TrustDomains,
    limits: AcceptLimits,
    slots: Slots<'_>,
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
    let mut stream = stream;
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
    // Connections without a certificate have a budget of their own, so that anonymous
    // clients cannot take the slots agents need, and a share per source address; each
    // identity has its share too.
    let (anonymous, per_key) = match &peer {
        Some(p) => match slots.per_key.identities.try_take(p.id.as_str()) {
            Some(slot) => (None, slot),
            None => {
                closed("identity_limit");
                tracing::info!(%remote, identity = %p.id, "connection refused: server.max_connections_per_identity reached");
                return None;
            }
        },
        None => {
            let source = crate::broker::limits::source_key(remote.ip());
            let Some(slot) = slots.per_key.sources.try_take(&source) else {
                closed("source_limit");
                tracing::info!(%remote, "anonymous connection refused: server.max_anonymous_connections_per_source reached");
                return None;
            };
            match slots.anonymous.clone().try_acquire_owned() {
                Ok(permit) => (Some(permit), slot),
                Err(_) => {
                    closed("anonymous_limit");
                    tracing::info!(%remote, "anonymous connection refused: server.max_anonymous_connections reached");
                    return None;
                }
            }
        }
    };
    // The client speaks first: the HTTP/2 preface, in time, or the connection is closed.
    let mut preface = [0u8; PREFACE.len()];
    match tokio::time::timeout(limits.handshake_timeout, stream.read_exact(&mut preface)).await {
        Ok(Ok(_)) if &preface == PREFACE => {}
        Ok(_) => {
            closed("preface");
            tracing::info!(%remote, "connection closed: no HTTP/2 preface");
            return None;
        }
        Err(_) => {
            closed("preface_timeout");
            tracing::info!(%remote, "connection closed: no HTTP/2 preface in time");
            return None;
        }
    }
    let life = if peer.is_some() {
        Lifetime::new(limits.idle_timeout, None)
    } else {
        Lifetime::new(
            limits.anonymous_idle_timeout,
            Some(limits.anonymous_max_age),
        )
    };
    let activity = Arc::new(Activity::new());
    Some(TlsConn {
        stream,
        info: ConnInfo {
            remote,
            peer,
            activity,
        },
        preface_sent: 0,
        life,
        _slot: slots.slot,
        _anonymous: anonymous,
        _per_key: per_key,
    })
}
