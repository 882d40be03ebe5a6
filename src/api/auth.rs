//! Authentication of every RPC, deny by default: a method answers only a caller whose connection
//! presented a verified, unexpired client certificate, unless it is on the short list of public
//! methods (health, and the CI methods, whose proof is the ID token they carry). Each identity
//! has a budget of RPCs (`limits.rpc_per_second`): every call is a policy decision and an audit
//! line, and no identity may write them without end. The caller's identity is handed to
//! handlers as a [`Caller`] request extension.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tonic::Status;
use tower_layer::Layer;
use tower_service::Service;

use super::ready_or;
use crate::broker::limits::{RATE_LIMITED, Rate, RateLimiter};
use crate::clock::Clock;
use crate::identity::{PeerIdentity, WorkloadId};
use crate::tls::ConnInfo;

/// Methods any caller may use without a client certificate: unary calls only, so that no
/// anonymous caller holds a stream (`Health/Watch` needs a certificate).
pub const PUBLIC_METHODS: &[&str] = &[
    "/grpc.health.v1.Health/Check",
    "/taskcred.v1.CiService/ExchangeCiToken",
    "/taskcred.v1.CiService/CompleteCiTask",
];

/// The authenticated caller of an RPC.
#[derive(Debug, Clone)]
pub struct Caller(pub Arc<PeerIdentity>);

/// The caller of `request`, or `UNAUTHENTICATED`.
///
/// # Errors
/// `UNAUTHENTICATED` when the request carries no verified identity.
pub fn caller<T>(request: &tonic::Request<T>) -> Result<&PeerIdentity, Status> {
    request
        .extensions()
        .get::<Caller>()
        .map(|c| c.0.as_ref())
        .ok_or_else(|| {
            refused(
                Status::unauthenticated("a client certificate is required"),
                NO_CERT,
            )
        })
}

/// The SPIFFE ID of `request`'s caller, or `UNAUTHENTICATED`.
///
/// # Errors
/// As [`caller`].
pub fn caller_id<T>(request: &tonic::Request<T>) -> Result<WorkloadId, Status> {
    caller(request).map(|p| p.id.clone())
}

/// The SPIFFE ID of `request`'s caller, and its message.
///
/// # Errors
/// As [`caller`].
pub fn caller_and_message<T>(request: tonic::Request<T>) -> Result<(WorkloadId, T), Status> {
    Ok((caller_id(&request)?, request.into_inner()))
}

/// Adds [`Auth`] to a service stack.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    clock: Arc<dyn Clock>,
    rpcs: Arc<RateLimiter>,
}

impl AuthLayer {
    /// Checks certificate expiry against `clock`; each identity gets `rpc_rate` calls (`None`:
    /// unlimited).
    pub fn new(clock: Arc<dyn Clock>, rpc_rate: Option<Rate>) -> Self {
        Self {
            clock,
            rpcs: Arc::new(RateLimiter::new(rpc_rate)),
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            layer: self.clone(),
        }
    }
}

/// Refuses unauthenticated calls to non-public methods; see the module docs.
#[derive(Debug, Clone)]
pub struct Auth<S> {
    inner: S,
    /// The clock and the RPC budgets, shared by every connection's stack.
    layer: AuthLayer,
}

/// Decides whether a request may proceed, and as whom.
/// The reason of a call without a client certificate where one is needed.
const NO_CERT: &str = "CLIENT_CERTIFICATE_REQUIRED";

/// `status` with its stable `reason`.
fn refused(status: Status, reason: &str) -> Status {
    super::error::with_reason(&status, reason, std::collections::HashMap::new())
}

fn authenticate(
    path: &str,
    conn: Option<&ConnInfo>,
    clock: &dyn Clock,
    rpcs: &RateLimiter,
) -> Result<Option<Caller>, Status> {
    let peer = conn.and_then(|c| c.peer.clone());
    let public = PUBLIC_METHODS.contains(&path);
    match peer {
        // A certificate that expired while its connection stayed open proves nothing anymore.
        Some(p) if p.expired_at(clock.now()) => Err(refused(
            Status::unauthenticated("the client certificate has expired"),
            "CERTIFICATE_EXPIRED",
        )),
        Some(p) => match rpcs.take(p.id.as_str(), std::time::Instant::now()) {
            Ok(()) => Ok(Some(Caller(p))),
            Err(wait) => {
                metrics::counter!(RATE_LIMITED, "kind" => "rpc").increment(1);
                let mut s = Status::resource_exhausted(format!(
                    "this identity's RPC rate limit is reached; retry in {} ms",
                    wait.as_millis().max(1)
                ));
                if let Ok(v) = wait.as_millis().max(1).to_string().parse() {
                    s.metadata_mut().insert("retry-after-ms", v);
                }
                Err(refused(s, "RATE_LIMITED"))
            }
        },
        None if public => Ok(None),
        None => Err(refused(
            Status::unauthenticated("this method requires a client certificate (mutual TLS)"),
            NO_CERT,
        )),
    }
}

impl<S, B> Service<Request<B>> for Auth<S>
where
    S: Service<Request<B>, Response = Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ready_or::ReadyOr<S::Future, S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let decision = authenticate(
            req.uri().path(),
            req.extensions().get::<ConnInfo>(),
            self.layer.clock.as_ref(),
            &self.layer.rpcs,
        );
        match decision {
            Ok(caller) => {
                // Never trust a Caller that did not come from this layer.
                req.extensions_mut().remove::<Caller>();
                if let Some(c) = caller {
                    req.extensions_mut().insert(c);
                }
                ready_or::ReadyOr::inner(self.inner.call(req))
            }
            Err(status) => ready_or::ReadyOr::ready(Ok(status.into_http())),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::clock::ManualClock;

    fn open() -> RateLimiter {
        RateLimiter::new(None)
    }

    fn conn(not_after: SystemTime) -> ConnInfo {
        ConnInfo {
            remote: ([127, 0, 0, 1], 1).into(),
            peer: Some(Arc::new(PeerIdentity {
                id: WorkloadId::parse("spiffe://taskcred.dev/agent/demo").unwrap(),
                not_after,
                cert_sha256: "x".into(),
            })),
            activity: Arc::default(),
        }
    }

    #[test]
    fn no_certificate_reaches_only_public_methods() {
        let clock = ManualClock::new(SystemTime::now());
        let anon = ConnInfo {
            remote: ([127, 0, 0, 1], 1).into(),
            peer: None,
            activity: Arc::default(),
        };
        let err = authenticate(
            "/taskcred.v1.IdentityService/WhoAmI",
            Some(&anon),
            &clock,
            &open(),
        )
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(authenticate("/grpc.health.v1.Health/Check", Some(&anon), &clock, &open()).is_ok());
        // No connection info at all (never expected) is refused, not waved through.
        assert!(
            authenticate("/taskcred.v1.IdentityService/WhoAmI", None, &clock, &open()).is_err()
        );
        assert!(authenticate("/unknown/Method", Some(&anon), &clock, &open()).is_err());
    }

    #[test]
    fn each_identity_has_a_budget_of_rpcs() {
        let clock = ManualClock::new(SystemTime::now());
        let c = conn(SystemTime::now() + Duration::from_secs(60));
        let rpcs = RateLimiter::new(Some(Rate {
            per_second: 1.0,
            burst: 2.0,
        }));
        let call = || {
            authenticate(
                "/taskcred.v1.IdentityService/WhoAmI",
                Some(&c),
                &clock,
                &rpcs,
            )
        };
        assert!(call().is_ok());
        assert!(call().is_ok());
        let err = call().unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(err.metadata().get("retry-after-ms").is_some());
        // Public methods without a certificate are not counted here (they have their own).
        let anon = ConnInfo {
            remote: ([127, 0, 0, 1], 1).into(),
            peer: None,
            activity: Arc::default(),
        };
        assert!(authenticate("/grpc.health.v1.Health/Check", Some(&anon), &clock, &rpcs).is_ok());
    }

    #[test]
    fn certificate_expiring_on_an_open_connection_stops_authenticating() {
        let start = SystemTime::now();
        let clock = ManualClock::new(start);
        let c = conn(start + Duration::from_secs(60));
        assert!(
            authenticate(
                "/taskcred.v1.IdentityService/WhoAmI",
                Some(&c),
                &clock,
                &open()
            )
            .unwrap()
            .is_some()
        );
        clock.advance(Duration::from_secs(61));
        let err = authenticate(
            "/taskcred.v1.IdentityService/WhoAmI",
            Some(&c),
            &clock,
            &open(),
        )
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
    }
}
