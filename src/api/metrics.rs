//! RPC metrics: a tower layer that counts every gRPC request and times it, by method and status
//! code, and marks its connection busy for the request's whole life (the idle timeout of
//! [`crate::tls`] runs only between RPCs). The code is read where gRPC puts it: the response headers for an immediate error
//! (trailers-only), else the trailers at the end of the body. Unknown paths share one label so a
//! hostile client cannot grow the label set.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use tower_layer::Layer;
use tower_service::Service;

use crate::telemetry::{GRPC_DURATION, GRPC_REQUESTS};

/// Adds [`RpcMetrics`] to a service stack.
#[derive(Debug, Clone)]
pub struct RpcMetricsLayer {
    known: Arc<HashSet<String>>,
}

impl RpcMetricsLayer {
    /// Labels requests to `known` paths (`/package.Service/Method`) by path, others as `unknown`.
    pub fn new(known: HashSet<String>) -> Self {
        Self {
            known: Arc::new(known),
        }
    }
}

/// Registers each of `known` methods' series at zero, for the codes the alerts watch (and the
/// latency of `OK` answers), so that they are served from the first scrape.
pub fn register_at_zero(known: &HashSet<String>) {
    for method in known {
        for code in ["OK", "INTERNAL", "UNAVAILABLE"] {
            metrics::counter!(GRPC_REQUESTS, "method" => method.clone(), "code" => code)
                .absolute(0);
        }
        let _ = metrics::histogram!(GRPC_DURATION, "method" => method.clone(), "code" => "OK");
    }
}

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics {
            inner,
            known: self.known.clone(),
        }
    }
}

/// Counts and times requests; see the module docs.
#[derive(Debug, Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    known: Arc<HashSet<String>>,
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for RpcMetrics<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
{
    type Response = Response<MetricsBody<ResB>>;
    type Error = S::Error;
    type Future = MetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let path = req.uri().path();
        let method = if self.known.contains(path) {
            path.to_owned()
        } else {
            "unknown".to_owned()
        };
        // The connection counts as busy for as long as this request lives (its body too).
        let busy = req
            .extensions()
            .get::<crate::tls::ConnInfo>()
            .map(|c| c.activity.busy());
        MetricsFuture {
            inner: self.inner.call(req),
            record: Some(Record {
                method,
                start: Instant::now(),
                _busy: busy,
            }),
        }
    }
}

/// One request being measured; recorded exactly once. It also marks its connection busy
/// while it lives, so that the connection's idle timer does not run under an RPC.
#[derive(Debug)]
struct Record {
    method: String,
    start: Instant,
    _busy: Option<crate::tls::Busy>,
}

impl Record {
    fn finish(self, code: &'static str) {
        let elapsed = self.start.elapsed().as_secs_f64();
        metrics::counter!(GRPC_REQUESTS, "method" => self.method.clone(), "code" => code)
            .increment(1);
        metrics::histogram!(GRPC_DURATION, "method" => self.method, "code" => code).record(elapsed);
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`RpcMetrics`].
    pub struct MetricsFuture<F> {
        #[pin]
        inner: F,
        record: Option<Record>,
    }
}

impl<F, B, E> Future for MetricsFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<MetricsBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let record = this.record.take();
        Poll::Ready(match result {
            Ok(response) => {
                let record = match (record, status_code(response.headers())) {
                    (Some(r), Some(code)) => {
                        r.finish(code);
                        None
                    }
                    (r, _) => r,
                };
                Ok(response.map(|inner| MetricsBody { inner, record }))
            }
            Err(e) => {
                if let Some(r) = record {
                    r.finish("UNAVAILABLE");
                }
                Err(e)
            }
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that records the request when its trailers (with `grpc-status`) pass, or
    /// as `CANCELLED` when dropped before the end.
    pub struct MetricsBody<B> {
        #[pin]
        inner: B,
        record: Option<Record>,
    }

    impl<B> PinnedDrop for MetricsBody<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(r) = this.project().record.take() {
                r.finish("CANCELLED");
            }
        }
    }
}

impl<B: Body> Body for MetricsBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        let code = match &frame {
            Some(Ok(f)) => f
                .trailers_ref()
                .map(|t| status_code(t).unwrap_or("UNKNOWN")),
            Some(Err(_)) => Some("INTERNAL"),
            None => Some("UNKNOWN"),
        };
        if let Some(code) = code
            && let Some(r) = this.record.take()
        {
            r.finish(code);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The canonical name of the `grpc-status` in `headers`, if any.
fn status_code(headers: &HeaderMap) -> Option<&'static str> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    Some(super::code_name(tonic::Code::from_i32(value.parse().ok()?)))
}
