//! The HTTP port's listener: plain TCP, or TLS with the broker's own certificate
//! (`server.http_tls`, so that verifiers fetch the JWK Set and the CRL over HTTPS), with a bound
//! on open connections and on the TLS handshake's time. Handshakes run in tasks of their own: a
//! slow client never holds up the others.

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

/// One accepted connection; its slot is freed when it is dropped.
#[derive(Debug)]
pub struct HttpConn {
    stream: Stream,
    _slot: OwnedSemaphorePermit,
}

impl HttpListener {
    /// Accepts on `listener`: TLS with `tls` when given, at most `max_connections` open at
    /// once (the others wait in the kernel's queue), `handshake_timeout` for a TLS handshake.
    pub fn new(
        listener: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
        max_connections: usize,
        handshake_timeout: Duration,
    ) -> io::Result<Self> {
        let addr = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        let slots = Arc::new(Semaphore::new(max_connections));
        let acceptor = tls.map(TlsAcceptor::from);
        tokio::spawn(async move {
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return; // the semaphore is never closed
                };
                let (tcp, remote) = tokio::select! {
                    () = tx.closed() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            tracing::warn!(error = %e, "HTTP accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let Some(acceptor) = acceptor.clone() else {
                    let conn = HttpConn {
                        stream: Stream::Plain(tcp),
                        _slot: slot,
                    };
                    if tx.send((conn, remote)).await.is_err() {
                        return;
                    }
                    continue;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let conn = HttpConn {
                                stream: Stream::Tls(Box::new(tls)),
                                _slot: slot,
                            };
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
        match &mut self.stream {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for HttpConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.stream {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
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
