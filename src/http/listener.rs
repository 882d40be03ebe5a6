//! The HTTP port's listener: plain TCP, or TLS with the broker's own certificate
//! (`server.http_tls`, so that verifiers fetch the JWK Set and the CRL over HTTPS), with budgets:
//! open connections in all and per source address, the TLS handshake's time, and a connection's
//! life (closed when it moves no byte for the idle timeout, and at its maximum age whatever it
//! does, so that slow or silent clients cannot keep verifiers from the keys). Handshakes run in
//! tasks of their own: a slow client never holds up the others.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::net::{KeyedSlot, KeyedSlots, Lifetime};
use crate::tls::accept_or_back_off;

/// Connections of the HTTP port, plain or TLS, each holding a slot of the limit.
#[derive(Debug)]
pub struct HttpListener {
    incoming: mpsc::Receiver<(HttpConn, SocketAddr)>,
    addr: SocketAddr,
}

/// The stream of one accepted connection.
#[derive(Debug)]
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// One accepted connection; its slots are freed when it is dropped.
#[derive(Debug)]
pub struct HttpConn {
    stream: Stream,
    life: Lifetime,
    /// When a byte last moved.
    last: tokio::time::Instant,
    _slot: OwnedSemaphorePermit,
    _per_source: KeyedSlot,
}

/// The budgets of the HTTP port.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Open connections at once (the others wait in the kernel's queue).
    pub max_connections: usize,
    /// Of those, from one source address (an IPv6 /64); more are closed at once.
    pub max_connections_per_source: usize,
    /// Time for a TLS handshake.
    pub handshake_timeout: Duration,
    /// A connection that moves no byte for this long is closed.
    pub idle_timeout: Duration,
    /// A connection is closed this long after it began.
    pub max_age: Duration,
}

fn closed(reason: &'static str) {
    metrics::counter!(crate::telemetry::CONNECTIONS_CLOSED, "port" => "http", "reason" => reason)
        .increment(1);
}

impl HttpListener {
    /// Accepts on `listener` (TLS with `tls` when given) within `limits`.
    ///
    /// # Errors
    /// When the listener's address cannot be read.
    pub fn new(
        listener: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
        limits: HttpLimits,
    ) -> io::Result<Self> {
        let addr = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        let sources = KeyedSlots::new(limits.max_connections_per_source);
        let acceptor = tls.map(TlsAcceptor::from);
        tokio::spawn(async move {
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return; // the semaphore is never closed
                };
                let (tcp, remote) = tokio::select! {
                    () = tx.closed() => return,
                    accepted = accept_or_back_off(&listener, "HTTP accept failed") => match accepted {
                        Some(a) => a,
                        None => continue,
                    },
                };
                let source = crate::broker::limits::source_key(remote.ip());
                let Some(per_source) = sources.try_take(&source) else {
                    closed("source_limit");
                    continue;
                };
                let conn = move |stream| HttpConn {
                    stream,
                    life: Lifetime::new(limits.idle_timeout, Some(limits.max_age)),
                    last: tokio::time::Instant::now(),
                    _slot: slot,
                    _per_source: per_source,
                };
                let Some(acceptor) = acceptor.clone() else {
                    if tx.send((conn(Stream::Plain(tcp)), remote)).await.is_err() {
                        return;
                    }
                    continue;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await
                    {
                        Ok(Ok(tls)) => {
                            let conn = conn(Stream::Tls(Box::new(tls)));
                            // The server stopped: drop the connection.
                            let _ = tx.send((conn, remote)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%remote, error = %e, "HTTPS handshake refused")
                        }
                        Err(_) => tracing::debug!(%remote, "HTTPS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { incoming: rx, addr })
    }
}

impl axum::serve::Listener for HttpListener {
    type Io = HttpConn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.incoming.recv().await {
            Some(conn) => conn,
            // The accept loop ended (it never does while the listener lives): wait for shutdown.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

impl AsyncRead for HttpConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let read = match &mut this.stream {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        };
        match read {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    this.last = tokio::time::Instant::now();
                }
                Poll::Ready(r)
            }
            // Nothing to read: the end of the connection once idle or at its maximum age.
            Poll::Pending if this.life.poll_ended(cx, Some(this.last)) => {
                closed("idle_or_age");
                Poll::Ready(Ok(()))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for HttpConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let written = match &mut this.stream {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        };
        if let Poll::Ready(Ok(n)) = &written
            && *n > 0
        {
            this.last = tokio::time::Instant::now();
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.stream {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.stream {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
