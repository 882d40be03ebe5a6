//! `taskcred::verify`: what a Rust resource server embeds to accept taskcred access tokens
//! without asking the broker on every request. It keeps the broker's JWK Set fresh (refetched
//! every minute, and at once, at most once a second, for an unknown `kid`), verifies the signature,
//! `typ`, exact `iss` and `aud`, `exp`/`nbf` with a bounded leeway, the `cnf` binding against the
//! client certificate the request came with, and follows the broker's `WatchRevocations` stream
//! (for its audience) to refuse revoked `jti`s locally, and tokens issued before a store reset.
//! When that view is stale (no heartbeat for longer than the configured bound) it refuses
//! everything (strict, the default) or keeps the last view (best-effort, opt-in).
//!
//! A credential of a delegated task carries its chain: `sub` is the root task's executor (whose
//! approved authority it uses), `act` the actors (RFC 8693), the current one outermost
//! ([`AccessClaims::act`], [`crate::mint::Actor::subjects`]), and `root_task_id` and
//! `parent_task_id`. Decide on `sub` and the current actor; refuse chains longer than you accept
//! with [`VerifierConfig::max_delegation_depth`].
//!
//! ```no_run
//! # async fn demo(channel: tonic::transport::Channel, token: &str, cert_der: &[u8]) {
//! use taskcred::verify::{Verifier, VerifierConfig};
//! let config = VerifierConfig::new(
//!     "https://broker.example.com",           // the broker's issuer URL (`iss`)
//!     "db.staging",                            // this resource server's audience
//!     "https://broker.example.com:7480/.well-known/jwks.json",
//! );
//! let verifier = Verifier::new(config).unwrap();
//! // The revocation stream needs an mTLS channel to the broker (any workload identity).
//! tokio::spawn(verifier.clone().run(channel, tokio_util::sync::CancellationToken::new()));
//! match verifier.verify(token, Some(cert_der)).await {
//!     Ok(claims) => println!("task {} may {}", claims.task_id, claims.scope),
//!     Err(e) => println!("refused: {e}"),
//! }
//! # }
//! ```

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::api::pb;
use crate::api::pb::revocation_event::Event;
use crate::api::pb::revocation_service_client::RevocationServiceClient;
use crate::identity::cert_thumbprint_sha256;
use crate::mint::{ACCESS_TOKEN_TYP, AccessClaims, JwkVerifier, MAX_TOKEN_BYTES};

/// Shortest time between two JWK Set fetches for an unknown `kid`.
const REFETCH_MIN: Duration = Duration::from_secs(1);
/// Largest JWK Set accepted, in bytes.
const MAX_JWKS_BYTES: usize = 256 * 1024;
/// Longest leeway accepted.
pub const MAX_LEEWAY: Duration = Duration::from_secs(300);

/// What to do when the revocation view is stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StalePolicy {
    /// Refuse every token until the stream is back (the default).
    Strict,
    /// Keep accepting on the last view (opt-in: a revocation made meanwhile is missed).
    BestEffort,
}

/// How a [`Verifier`] checks tokens.
#[derive(Debug, Clone)]
pub struct VerifierConfig {
    /// The broker's issuer URL: `iss` must equal it.
    pub issuer: String,
    /// This resource server's audience: `aud` must equal it; only its revocations are followed.
    pub audience: String,
    /// The broker's JWK Set (`http(s)://<broker http>/.well-known/jwks.json`).
    pub jwks_url: String,
    /// How often the JWK Set is refetched (default 60 s).
    pub jwks_refresh: Duration,
    /// Clock skew allowed on `exp` and `nbf` (default 30 s, at most [`MAX_LEEWAY`]).
    pub leeway: Duration,
    /// The revocation view is stale after this long without word from the stream (default
    /// 15 s; the broker sends a heartbeat every 5 s).
    pub max_staleness: Duration,
    /// What a stale view does (default [`StalePolicy::Strict`]).
    pub stale: StalePolicy,
    /// Refuse a token that carries no `cnf` (default true: every taskcred token an agent gets is
    /// bound to its certificate; a CI job without a client certificate gets one without). A
    /// token with `cnf` is always checked against the client certificate, whatever this says.
    pub require_cnf: bool,
    /// Roots for an `https` JWK Set URL; `None`: only loopback `http` URLs work.
    pub tls: Option<rustls::ClientConfig>,
    /// Accept an `http://` JWK Set URL on a host other than loopback (default false: anyone on
    /// the path could hand the verifier keys of their own). Only behind a mesh that encrypts
    /// and authenticates the hop.
    pub danger_allow_plain_http_jwks: bool,
    /// The longest delegation chain accepted: the most actors in a token's `act` claim (RFC
    /// 8693; a credential of a task delegated `n` times below its root carries `n` actors).
    /// `None` (default): whatever the broker issued (it bounds chains by
    /// `delegation.max_depth`); `Some(0)`: no delegated token.
    pub max_delegation_depth: Option<usize>,
}

impl VerifierConfig {
    /// The defaults for `issuer`, `audience` and `jwks_url`.
    pub fn new(issuer: &str, audience: &str, jwks_url: &str) -> Self {
        Self {
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            jwks_url: jwks_url.to_owned(),
            jwks_refresh: Duration::from_secs(60),
            leeway: Duration::from_secs(30),
            max_staleness: Duration::from_secs(15),
            stale: StalePolicy::Strict,
            require_cnf: true,
            tls: None,
            danger_allow_plain_http_jwks: false,
            max_delegation_depth: None,
        }
    }
}

/// Why a token is refused (or the verifier cannot work).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// Not a well-formed access token of ours.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// Signed by a key the broker does not publish.
    #[error("unknown signing key")]
    UnknownKey,
    /// Signature, issuer, audience or validity period.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// The client certificate is not the one the token is bound to (or none was given).
    #[error("the token is bound to another client certificate")]
    Unbound,
    /// Revoked before its expiry.
    #[error("the token was revoked")]
    Revoked,
    /// Its delegation chain is longer than this resource server accepts.
    #[error("the token's delegation chain has {actors} actors; this verifier accepts {max}")]
    ChainTooDeep {
        /// Actors in the token's `act`.
        actors: usize,
        /// The most accepted ([`VerifierConfig::max_delegation_depth`]).
        max: usize,
    },
    /// Issued before the broker's store was reset: its revocations may be lost.
    #[error("the token was issued before the broker's store was reset")]
    BeforeStoreReset,
    /// The revocation view is stale and the policy is strict.
    #[error("the revocation view is stale; refusing (strict)")]
    Stale,
    /// The configuration or the JWK Set is unusable.
    #[error("verifier: {0}")]
    Setup(String),
}

/// What the revocation stream has told.
#[derive(Debug, Default)]
struct View {
    /// Revoked `jti`s and their expiry (Unix seconds).
    revoked: HashMap<String, u64>,
    /// When the stream last spoke (synced or heartbeat).
    heard: Option<Instant>,
    /// When the broker's store epoch began (Unix seconds).
    epoch_started: Option<u64>,
    /// Where to resume.
    cursor: String,
}

struct Inner {
    config: VerifierConfig,
    http: reqwest::Client,
    keys: RwLock<HashMap<String, JwkVerifier>>,
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    view: RwLock<View>,
}

/// A token verifier; clones share their keys and revocation view.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("issuer", &self.inner.config.issuer)
            .field("audience", &self.inner.config.audience)
            .finish_non_exhaustive()
    }
}

/// An `https` URL, or `http` on a loopback host (or anywhere, when explicitly allowed).
fn check_jwks_url(url: &str, allow_plain_http: bool) -> Result<(), VerifyError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| VerifyError::Setup("jwks_url is not a URL".into()))?;
    let host = uri
        .host()
        .ok_or_else(|| VerifyError::Setup("jwks_url has no host".into()))?;
    match uri.scheme_str() {
        Some("https") => Ok(()),
        Some("http") if crate::fetch::is_loopback_host(host) || allow_plain_http => Ok(()),
        Some("http") => Err(VerifyError::Setup(
            "jwks_url is plain http on a host that is not loopback: anyone on the path could \
             hand out keys; use https (the broker's HTTP port serves TLS with server.http_tls)"
                .into(),
        )),
        _ => Err(VerifyError::Setup("jwks_url must be https".into())),
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Verifier {
    /// A verifier for `config`; no key is known until [`Verifier::refresh_keys`] (or
    /// [`Verifier::run`]) fetches the JWK Set.
    ///
    /// # Errors
    /// [`VerifyError::Setup`] for a leeway over [`MAX_LEEWAY`] or an unusable HTTP client.
    pub fn new(config: VerifierConfig) -> Result<Self, VerifyError> {
        crate::mint::install_jose_provider();
        if config.leeway > MAX_LEEWAY {
            return Err(VerifyError::Setup(format!(
                "leeway over {}s",
                MAX_LEEWAY.as_secs()
            )));
        }
        check_jwks_url(&config.jwks_url, config.danger_allow_plain_http_jwks)?;
        // Never the process-wide provider or the platform's roots: ring, and only the roots
        // given (none: `https` JWK Set URLs fail).
        let tls = match config.tls.clone() {
            Some(tls) => tls,
            None => crate::fetch::tls_config(rustls::RootCertStore::empty())
                .map_err(VerifyError::Setup)?,
        };
        let http = crate::fetch::client(tls).map_err(VerifyError::Setup)?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                http,
                keys: RwLock::default(),
                last_fetch: tokio::sync::Mutex::default(),
                view: RwLock::default(),
            }),
        })
    }

    fn view(&self) -> std::sync::RwLockReadGuard<'_, View> {
        self.inner
            .view
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn view_mut(&self) -> std::sync::RwLockWriteGuard<'_, View> {
        self.inner
            .view
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Fetches the JWK Set and replaces the known keys with its usable ones. Returns how many.
    ///
    /// # Errors
    /// [`VerifyError::Setup`] when it cannot be fetched or is not a JWK Set; the known keys
    /// stay.
    pub async fn refresh_keys(&self) -> Result<usize, VerifyError> {
        *self.inner.last_fetch.lock().await = Some(Instant::now());
        let bad = |e: String| VerifyError::Setup(format!("JWK Set: {e}"));
        let body = crate::fetch::get_bounded(
            &self.inner.http,
            &self.inner.config.jwks_url,
            MAX_JWKS_BYTES,
        )
        .await
        .map_err(bad)?;
        let set: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))?;
        let listed = set
            .get("keys")
            .and_then(serde_json::Value::as_array)
            .ok_or_else(|| bad("no keys array".into()))?;
        let mut keys = HashMap::new();
        for jwk in listed {
            // A key that does not check out (kty/crv/alg, kid = thumbprint) is left out.
            let (Some(kid), Ok(v)) = (
                jwk.get("kid").and_then(serde_json::Value::as_str),
                JwkVerifier::from_jwk(jwk),
            ) else {
                tracing::warn!("JWK Set: a key is unusable; skipped");
                continue;
            };
            keys.insert(kid.to_owned(), v);
        }
        let n = keys.len();
        *self
            .inner
            .keys
            .write()
            .unwrap_or_else(PoisonError::into_inner) = keys;
        Ok(n)
    }

    fn key(&self, kid: &str) -> Option<JwkVerifier> {
        self.inner
            .keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(kid)
            .cloned()
    }

    /// The key for `kid`, refetching the JWK Set once (at most once a second) if it is unknown.
    async fn key_for(&self, kid: &str) -> Result<JwkVerifier, VerifyError> {
        if let Some(k) = self.key(kid) {
            return Ok(k);
        }
        let due = self
            .inner
            .last_fetch
            .lock()
            .await
            .is_none_or(|t| t.elapsed() >= REFETCH_MIN);
        if due && let Err(e) = self.refresh_keys().await {
            tracing::warn!(error = %e, "refetching the JWK Set for an unknown kid failed");
        }
        self.key(kid).ok_or(VerifyError::UnknownKey)
    }

    /// Whether the revocation view is current (the stream spoke within `max_staleness`).
    pub fn revocations_current(&self) -> bool {
        self.view()
            .heard
            .is_some_and(|t| t.elapsed() <= self.inner.config.max_staleness)
    }

    /// Verifies `token` as presented with the client certificate `client_cert_der` (the DER
    /// of the leaf the request's TLS connection was authenticated with), and returns its claims.
    ///
    /// # Errors
    /// [`VerifyError`]: why the token is refused.
    pub async fn verify(
        &self,
        token: &str,
        client_cert_der: Option<&[u8]>,
    ) -> Result<AccessClaims, VerifyError> {
        let config = &self.inner.config;
        if token.len() > MAX_TOKEN_BYTES {
            return Err(VerifyError::Malformed("too long".into()));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| VerifyError::Malformed(e.to_string()))?;
        if header.typ.as_deref() != Some(ACCESS_TOKEN_TYP) {
            return Err(VerifyError::Malformed("typ is not at+jwt".into()));
        }
        let kid = header
            .kid
            .ok_or_else(|| VerifyError::Malformed("no kid".into()))?;
        let key = self.key_for(&kid).await?;
        let mut v = jsonwebtoken::Validation::new(key.alg);
        v.set_issuer(&[&config.issuer]);
        v.set_audience(&[&config.audience]);
        v.leeway = config.leeway.as_secs();
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp", "nbf", "iss", "sub", "aud"]);
        let claims = jsonwebtoken::decode::<AccessClaims>(token, &key.key, &v)
            .map_err(|e| VerifyError::Invalid(e.to_string()))?
            .claims;
        // A bound token is always checked against the certificate it came with (RFC 8705
        // section 3): without that certificate it is refused, whatever `require_cnf` says;
        // `require_cnf` only decides whether tokens without `cnf` pass. Both sides are public
        // (the token's claim, the peer's certificate): no secret to time.
        let bound = match (&claims.cnf, client_cert_der) {
            (Some(cnf), Some(der)) => cert_thumbprint_sha256(der) == cnf.x5t_s256,
            (Some(_), None) => false,
            (None, _) => !config.require_cnf,
        };
        if !bound {
            return Err(VerifyError::Unbound);
        }
        let actors = claims.act.as_ref().map_or(0, |a| a.subjects().len());
        if let Some(max) = config.max_delegation_depth
            && actors > max
        {
            return Err(VerifyError::ChainTooDeep { actors, max });
        }
        if !self.revocations_current() && config.stale == StalePolicy::Strict {
            return Err(VerifyError::Stale);
        }
        let view = self.view();
        if view.epoch_started.is_some_and(|e| claims.iat < e) {
            return Err(VerifyError::BeforeStoreReset);
        }
        if view.revoked.contains_key(&claims.jti) {
            return Err(VerifyError::Revoked);
        }
        drop(view);
        Ok(claims)
    }

    /// Takes one message of the revocation stream into the view.
    fn take(&self, event: pb::RevocationEvent) {
        let mut view = self.view_mut();
        view.cursor = event.cursor;
        let epoch = match event.event {
            Some(Event::Revoked(r)) => {
                if r.kind == "jwt" {
                    let exp = r
                        .expires_at
                        .and_then(|t| u64::try_from(t.seconds).ok())
                        .unwrap_or(u64::MAX);
                    view.revoked.insert(r.credential_id, exp);
                }
                return;
            }
            Some(Event::Synced(s)) => s.store_epoch_started_at,
            Some(Event::Heartbeat(h)) => h.store_epoch_started_at,
            None => return,
        };
        view.heard = Some(Instant::now());
        if let Some(started) = epoch.and_then(|t| u64::try_from(t.seconds).ok()) {
            view.epoch_started = Some(started);
        }
        // Entries whose token has expired (with the leeway) can go.
        let now = unix_secs(SystemTime::now());
        let leeway = self.inner.config.leeway.as_secs();
        view.revoked
            .retain(|_, exp| exp.saturating_add(leeway) >= now);
    }

    /// One connection of the revocation stream: reads until it ends or fails.
    async fn follow_once(&self, channel: Channel) -> Result<(), tonic::Status> {
        let after = self.view().cursor.clone();
        let mut stream = RevocationServiceClient::new(channel)
            .watch_revocations(pb::WatchRevocationsRequest {
                after,
                audience: self.inner.config.audience.clone(),
            })
            .await?
            .into_inner();
        while let Some(event) = stream.message().await? {
            self.take(event);
        }
        Ok(())
    }

    /// Keeps the JWK Set fresh and follows the revocation stream over `channel` (an mTLS
    /// channel to the broker), reconnecting and resuming after its last cursor, until
    /// `shutdown`.
    pub async fn run(self, channel: Channel, shutdown: CancellationToken) {
        let keys = {
            let me = self.clone();
            let shutdown = shutdown.clone();
            async move {
                let mut every = tokio::time::interval(me.inner.config.jwks_refresh);
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        _ = every.tick() => {
                            if let Err(e) = me.refresh_keys().await {
                                tracing::warn!(error = %e, "refreshing the JWK Set failed; will retry");
                            }
                        }
                    }
                }
            }
        };
        let revocations = async {
            let mut backoff = Duration::from_millis(100);
            loop {
                let result = tokio::select! {
                    () = shutdown.cancelled() => return,
                    r = self.follow_once(channel.clone()) => r,
                };
                match result {
                    Ok(()) => backoff = Duration::from_millis(100),
                    Err(e) => {
                        tracing::warn!(code = ?e.code(), message = e.message(), "revocation stream failed; resuming");
                    }
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        };
        tokio::join!(keys, revocations);
    }
}
