//! The configuration as written: serde structs mirroring `config/taskcred.toml` key for key, with
//! their defaults, and the checks that turn them into the typed [`Config`](super::Config).
//! Unknown keys are refused (`deny_unknown_fields`) so that a typo never silently leaves a
//! default in force.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::{
    AuditConfig, CiConfig, CiIssuerConfig, Config, IdentityConfig, IssuerConfig, LimitsConfig,
    LogConfig, PolicyConfig, ServerConfig, StoreConfig, TlsConfig, TrustDomainConfig, TtlConfig,
};
use crate::ci::{ClaimNames, KeySource, MAX_LEEWAY, Preset};
use crate::identity::{TrustDomains, WorkloadId};

pub(super) const DEFAULT_GRPC_ADDR: &str = "127.0.0.1:7443";
pub(super) const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:7480";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Raw {
    #[serde(default)]
    server: RawServer,
    tls: RawTls,
    identity: RawIdentity,
    issuer: RawIssuer,
    store: RawStore,
    #[serde(default)]
    ttl: RawTtl,
    policy: RawPolicy,
    audit: RawAudit,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    ci: RawCi,
    #[serde(default)]
    limits: RawLimits,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLimits {
    issuance_per_second: f64,
    issuance_burst: u32,
    ci_per_second: f64,
    ci_burst: u32,
    public_per_second: f64,
    public_burst: u32,
    rpc_per_second: f64,
    rpc_burst: u32,
}

impl Default for RawLimits {
    fn default() -> Self {
        Self {
            issuance_per_second: 100.0,
            issuance_burst: 200,
            ci_per_second: 5.0,
            ci_burst: 20,
            public_per_second: 20.0,
            public_burst: 100,
            rpc_per_second: 200.0,
            rpc_burst: 400,
        }
    }
}

/// A rate, or none when `per_second` is 0.
fn rate(
    key: &'static str,
    per_second: f64,
    burst: u32,
) -> Result<Option<crate::broker::limits::Rate>, CheckError> {
    if per_second == 0.0 {
        return Ok(None);
    }
    if !(per_second.is_finite() && (0.001..=1_000_000.0).contains(&per_second)) {
        return Err((
            key,
            format!("{per_second} is outside 0.001..=1000000 (0 for no limit)"),
        ));
    }
    let burst = range(key, burst, 1, 1_000_000)?;
    Ok(Some(crate::broker::limits::Rate {
        per_second,
        burst: f64::from(burst),
    }))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawCi {
    trust_domain: Option<String>,
    issuers: Vec<RawCiIssuer>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCiIssuer {
    name: String,
    #[serde(default)]
    preset: Preset,
    issuer: String,
    audience: String,
    algorithms: Option<Vec<String>>,
    jwks_url: Option<String>,
    jwks_file: Option<PathBuf>,
    jwks_ca: Option<PathBuf>,
    #[serde(default = "default_jwks_refresh", deserialize_with = "duration")]
    jwks_refresh: Duration,
    #[serde(default = "default_jwks_refetch_min", deserialize_with = "duration")]
    jwks_refetch_min: Duration,
    #[serde(default = "default_ci_leeway", deserialize_with = "duration")]
    leeway: Duration,
    #[serde(default = "default_max_token_age", deserialize_with = "duration")]
    max_token_age: Duration,
    #[serde(default = "default_max_token_lifetime", deserialize_with = "duration")]
    max_token_lifetime: Duration,
    task_deadline_max: Option<String>,
    #[serde(default)]
    claims: toml::Table,
}

fn default_jwks_refresh() -> Duration {
    Duration::from_secs(10 * 60)
}

fn default_jwks_refetch_min() -> Duration {
    Duration::from_secs(30)
}

fn default_ci_leeway() -> Duration {
    Duration::from_secs(60)
}

/// GitHub's ID tokens live 6 hours; GitLab's as long as the job's timeout.
fn default_max_token_lifetime() -> Duration {
    Duration::from_secs(24 * 60 * 60)
}

fn default_max_token_age() -> Duration {
    Duration::from_secs(60 * 60)
}

/// The algorithms a CI issuer may be configured with: asymmetric only, verified through ring.
const CI_ALGORITHMS: &[&str] = &[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "EdDSA",
];

impl RawCi {
    /// `first` is the first of `identity.trust_domains` as configured.
    fn check(self, domains: &TrustDomains, first: &str) -> Result<CiConfig, CheckError> {
        let trust_domain = match self.trust_domain {
            Some(td) => td,
            // With several domains, which one CI identities belong to is the operator's
            // choice: a default could put them in a partner's namespace, and reordering the
            // list would rename them (and lift their locks).
            None if domains.names().count() > 1 && !self.issuers.is_empty() => {
                return Err((
                    "ci.trust_domain",
                    "must be set when identity.trust_domains lists more than one domain and \
                     [[ci.issuers]] are configured (e.g. \"ci.<your own domain>\")"
                        .into(),
                ));
            }
            None => format!("ci.{first}"),
        };
        let id = WorkloadId::parse(&format!("spiffe://{trust_domain}/ci"))
            .map_err(|e| ("ci.trust_domain", e.to_string()))?;
        // A CI job is proven by its ID token alone: a client certificate that names a CI
        // identity must never be accepted, so the CI domain is never one of mTLS.
        if domains.allows(&id) {
            return Err((
                "ci.trust_domain",
                format!(
                    "{trust_domain} is also in identity.trust_domains: CI identities need a trust \
                     domain of their own that is never accepted for mutual TLS"
                ),
            ));
        }
        let mut issuers: Vec<CiIssuerConfig> = Vec::with_capacity(self.issuers.len());
        for raw in self.issuers {
            let issuer = raw.check()?;
            if issuers.iter().any(|i| i.name == issuer.name) {
                return Err(("ci.issuers.name", format!("{} appears twice", issuer.name)));
            }
            if issuers.iter().any(|i| i.issuer == issuer.issuer) {
                return Err((
                    "ci.issuers.issuer",
                    format!("{} appears twice", issuer.issuer),
                ));
            }
            issuers.push(issuer);
        }
        Ok(CiConfig {
            trust_domain,
            issuers,
        })
    }
}

impl RawCiIssuer {
    fn check(self) -> Result<CiIssuerConfig, CheckError> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 32
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !name_ok {
            return Err(("ci.issuers.name", "1 to 32 bytes of a-z 0-9 -".into()));
        }
        check_issuer_url(&self.issuer).map_err(|m| ("ci.issuers.issuer", m))?;
        let aud = &self.audience;
        if aud.is_empty() || aud.len() > 256 || aud.chars().any(char::is_control) {
            return Err((
                "ci.issuers.audience",
                "1 to 256 bytes, no control characters".into(),
            ));
        }
        // GitHub's default audience is the owner's URL: any broker (or anything else) that
        // accepts it would accept tokens minted for someone else. Ask for the broker's own.
        if self.preset == Preset::Github && aud.starts_with("https://github.com/") {
            return Err((
                "ci.issuers.audience",
                "GitHub's default audience (the owner's URL) is refused: set a broker-specific \
                 audience and request it in the workflow (core.getIDToken(audience))"
                    .into(),
            ));
        }
        let names = match (&self.algorithms, self.preset) {
            (Some(list), _) => list.clone(),
            (None, Preset::Github | Preset::Gitlab) => vec!["RS256".to_owned()],
            (None, Preset::Generic) => {
                return Err((
                    "ci.issuers.algorithms",
                    "required for a generic issuer".into(),
                ));
            }
        };
        if names.is_empty() {
            return Err(("ci.issuers.algorithms", "lists no algorithm".into()));
        }
        let mut algorithms = Vec::with_capacity(names.len());
        for a in &names {
            if !CI_ALGORITHMS.contains(&a.as_str()) {
                return Err((
                    "ci.issuers.algorithms",
                    format!("{a:?} is not one of {CI_ALGORITHMS:?} (never none or HMAC)"),
                ));
            }
            algorithms.push(
                a.parse::<jsonwebtoken::Algorithm>()
                    .map_err(|e| ("ci.issuers.algorithms", e.to_string()))?,
            );
        }
        let jwks = match (self.jwks_url, self.jwks_file) {
            (Some(url), None) => {
                check_issuer_url(&url).map_err(|m| ("ci.issuers.jwks_url", m))?;
                KeySource::Url(url)
            }
            (None, Some(file)) => KeySource::File(file),
            _ => {
                return Err((
                    "ci.issuers.jwks_url",
                    "exactly one of jwks_url and jwks_file is required".into(),
                ));
            }
        };
        if self.jwks_ca.is_some() && matches!(jwks, KeySource::File(_)) {
            return Err(("ci.issuers.jwks_ca", "only with jwks_url".into()));
        }
        let claims = ClaimNames::with_overrides(self.preset, &self.claims)
            .map_err(|m| ("ci.issuers.claims", m))?;
        let task_deadline_max = match self.task_deadline_max {
            None => None,
            Some(text) => Some(
                humantime::parse_duration(&text)
                    .map_err(|e| ("ci.issuers.task_deadline_max", e.to_string()))
                    .and_then(|d| {
                        range(
                            "ci.issuers.task_deadline_max",
                            d,
                            Duration::from_secs(1),
                            Duration::from_secs(30 * 24 * 3600),
                        )
                    })?,
            ),
        };
        Ok(CiIssuerConfig {
            name: self.name,
            preset: self.preset,
            issuer: self.issuer,
            audience: self.audience,
            algorithms,
            jwks,
            jwks_ca: self.jwks_ca,
            jwks_refresh: range(
                "ci.issuers.jwks_refresh",
                self.jwks_refresh,
                Duration::from_secs(1),
                Duration::from_secs(24 * 3600),
            )?,
            jwks_refetch_min: range(
                "ci.issuers.jwks_refetch_min",
                self.jwks_refetch_min,
                Duration::from_millis(100),
                Duration::from_secs(3600),
            )?,
            leeway: range("ci.issuers.leeway", self.leeway, Duration::ZERO, MAX_LEEWAY)?,
            max_token_age: range(
                "ci.issuers.max_token_age",
                self.max_token_age,
                Duration::from_secs(1),
                Duration::from_secs(24 * 3600),
            )?,
            max_token_lifetime: range(
                "ci.issuers.max_token_lifetime",
                self.max_token_lifetime,
                Duration::from_secs(60),
                Duration::from_secs(7 * 24 * 3600),
            )?,
            task_deadline_max,
            claims,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    dir: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    path: PathBuf,
    #[serde(default = "yes")]
    required: bool,
    #[serde(default)]
    redis_stream: bool,
    #[serde(default = "stream_max_len")]
    redis_stream_max_len: u64,
    #[serde(default)]
    fsync: RawFsync,
    #[serde(default = "default_fsync_interval", deserialize_with = "duration")]
    fsync_interval: Duration,
}

/// `audit.fsync`.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawFsync {
    Always,
    #[default]
    Interval,
    Never,
}

fn default_fsync_interval() -> Duration {
    Duration::from_secs(1)
}

fn stream_max_len() -> u64 {
    10_000_000
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawServer {
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    http_tls: bool,
    max_http_connections: usize,
    max_http_connections_per_source: usize,
    #[serde(deserialize_with = "duration")]
    http_idle_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    http_max_age: Duration,
    max_message_bytes: usize,
    max_concurrent_rpcs_per_connection: u32,
    max_connections: usize,
    max_anonymous_connections: usize,
    #[serde(deserialize_with = "duration")]
    handshake_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    idle_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    anonymous_idle_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    anonymous_max_age: Duration,
    max_connections_per_identity: usize,
    max_anonymous_connections_per_source: usize,
    max_handshakes_per_source: usize,
    #[serde(deserialize_with = "duration")]
    request_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    shutdown_grace: Duration,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            grpc_addr: parse_default(DEFAULT_GRPC_ADDR),
            http_addr: parse_default(DEFAULT_HTTP_ADDR),
            http_tls: false,
            max_http_connections: 1024,
            max_http_connections_per_source: 32,
            http_idle_timeout: Duration::from_secs(10),
            http_max_age: Duration::from_secs(60),
            max_message_bytes: 256 * 1024,
            max_concurrent_rpcs_per_connection: 128,
            max_connections: 10_000,
            max_anonymous_connections: 1_000,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(5 * 60),
            anonymous_idle_timeout: Duration::from_secs(30),
            anonymous_max_age: Duration::from_secs(5 * 60),
            max_connections_per_identity: 256,
            max_anonymous_connections_per_source: 32,
            max_handshakes_per_source: 64,
            request_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

fn parse_default(addr: &str) -> SocketAddr {
    // The constants above are valid socket addresses; the fallback is never taken.
    addr.parse()
        .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    /// Replaced by `[[identity.trust_domains]]`; named only to say so.
    client_ca: Option<toml::Value>,
    #[serde(default)]
    min_version: TlsVersion,
}

/// Lowest TLS version the gRPC port offers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3.
    #[default]
    #[serde(rename = "tls1.2")]
    Tls12,
    /// TLS 1.3 only.
    #[serde(rename = "tls1.3")]
    Tls13,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    #[serde(default)]
    trust_domains: Vec<RawTrustDomain>,
    /// Replaced by `[[identity.trust_domains]]`; named only to say so.
    allowed_trust_domains: Option<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrustDomain {
    name: String,
    bundle: PathBuf,
}

/// What a configuration of the earlier form is told.
const REPLACED_BY_TRUST_DOMAINS: &str = "replaced by [[identity.trust_domains]] with `name` and \
     `bundle`: each trust domain's SVIDs must chain to that domain's own bundle";

impl RawIdentity {
    fn check(self, tls_client_ca: bool) -> Result<IdentityConfig, CheckError> {
        if self.allowed_trust_domains.is_some() {
            return Err((
                "identity.allowed_trust_domains",
                REPLACED_BY_TRUST_DOMAINS.into(),
            ));
        }
        if tls_client_ca {
            return Err(("tls.client_ca", REPLACED_BY_TRUST_DOMAINS.into()));
        }
        if self.trust_domains.is_empty() {
            return Err((
                "identity.trust_domains",
                "lists no trust domain: add [[identity.trust_domains]] with name and bundle".into(),
            ));
        }
        let allowed_trust_domains = TrustDomains::parse(self.trust_domains.iter().map(|d| &d.name))
            .map_err(|e| ("identity.trust_domains.name", e.to_string()))?;
        let mut trust_domains: Vec<TrustDomainConfig> = Vec::new();
        for d in self.trust_domains {
            if trust_domains.iter().any(|t| t.name == d.name) {
                return Err((
                    "identity.trust_domains.name",
                    format!("{} appears twice", d.name),
                ));
            }
            if trust_domains.iter().any(|t| t.bundle == d.bundle) {
                return Err((
                    "identity.trust_domains.bundle",
                    format!(
                        "{} is the bundle of two trust domains: each domain needs its own, or \
                         one domain's CA could issue the other's identities",
                        d.bundle.display()
                    ),
                ));
            }
            trust_domains.push(TrustDomainConfig {
                name: d.name,
                bundle: d.bundle,
            });
        }
        Ok(IdentityConfig {
            trust_domains,
            allowed_trust_domains,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIssuer {
    url: String,
    jwt_key: PathBuf,
    #[serde(default)]
    jwt_algorithm: JwtAlgorithm,
    ca_cert: Option<PathBuf>,
    ca_key: Option<PathBuf>,
}

/// The signing algorithm of the JWT key (one algorithm per key).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum JwtAlgorithm {
    /// ECDSA P-256 with SHA-256, the default: widely supported and fast with ring.
    #[default]
    ES256,
    /// Ed25519.
    EdDSA,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    #[serde(default)]
    backend: StoreBackend,
    #[serde(default = "default_store_path")]
    path: PathBuf,
    redis_url: Option<String>,
}

fn default_store_path() -> PathBuf {
    PathBuf::from("/var/lib/taskcred/taskcred.db")
}

/// Which lease store backs the broker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// A file on local disk: one broker process.
    #[default]
    Embedded,
    /// A Redis server shared by any number of broker replicas.
    Redis,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTtl {
    #[serde(deserialize_with = "duration")]
    credential_default: Duration,
    #[serde(deserialize_with = "duration")]
    credential_max: Duration,
    #[serde(deserialize_with = "duration")]
    lease_renewal_max: Duration,
    #[serde(deserialize_with = "duration")]
    task_deadline_max: Duration,
    #[serde(deserialize_with = "duration")]
    task_retention: Duration,
    #[serde(deserialize_with = "duration")]
    lock_on_failure: Duration,
}

impl Default for RawTtl {
    fn default() -> Self {
        Self {
            credential_default: Duration::from_secs(5 * 60),
            credential_max: Duration::from_secs(60 * 60),
            lease_renewal_max: Duration::from_secs(8 * 60 * 60),
            task_deadline_max: Duration::from_secs(24 * 60 * 60),
            task_retention: Duration::from_secs(30 * 24 * 60 * 60),
            lock_on_failure: Duration::from_secs(60 * 60),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    format: LogFormat,
    level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            format: LogFormat::Human,
            level: "info".into(),
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

/// A failed check: the key and what is wrong with its value.
type CheckError = (&'static str, String);

fn range<T: PartialOrd + std::fmt::Debug>(
    key: &'static str,
    value: T,
    min: T,
    max: T,
) -> Result<T, CheckError> {
    if value < min || value > max {
        return Err((key, format!("{value:?} is outside {min:?}..={max:?}")));
    }
    Ok(value)
}

impl Raw {
    /// Checks every value and builds the typed configuration. File checks come after.
    pub(super) fn check(self) -> Result<Config, CheckError> {
        let s = self.server;
        let server = ServerConfig {
            grpc_addr: s.grpc_addr,
            http_addr: s.http_addr,
            http_tls: s.http_tls,
            max_http_connections: range(
                "server.max_http_connections",
                s.max_http_connections,
                1,
                1_000_000,
            )?,
            max_http_connections_per_source: range(
                "server.max_http_connections_per_source",
                s.max_http_connections_per_source,
                1,
                1_000_000,
            )?,
            http_idle_timeout: range(
                "server.http_idle_timeout",
                s.http_idle_timeout,
                Duration::from_millis(100),
                Duration::from_secs(3600),
            )?,
            http_max_age: range(
                "server.http_max_age",
                s.http_max_age,
                Duration::from_secs(1),
                Duration::from_secs(24 * 3600),
            )?,
            max_message_bytes: range(
                "server.max_message_bytes",
                s.max_message_bytes,
                4096,
                16 << 20,
            )?,
            max_concurrent_rpcs_per_connection: range(
                "server.max_concurrent_rpcs_per_connection",
                s.max_concurrent_rpcs_per_connection,
                1,
                10_000,
            )?,
            max_connections: range("server.max_connections", s.max_connections, 1, 1_000_000)?,
            // Part of max_connections: never more than it.
            max_anonymous_connections: range(
                "server.max_anonymous_connections",
                s.max_anonymous_connections,
                0,
                1_000_000,
            )?
            .min(s.max_connections),
            idle_timeout: range(
                "server.idle_timeout",
                s.idle_timeout,
                Duration::from_secs(1),
                Duration::from_secs(24 * 3600),
            )?,
            anonymous_idle_timeout: range(
                "server.anonymous_idle_timeout",
                s.anonymous_idle_timeout,
                Duration::from_secs(1),
                Duration::from_secs(3600),
            )?,
            anonymous_max_age: range(
                "server.anonymous_max_age",
                s.anonymous_max_age,
                Duration::from_secs(1),
                Duration::from_secs(24 * 3600),
            )?,
            max_connections_per_identity: range(
                "server.max_connections_per_identity",
                s.max_connections_per_identity,
                1,
                1_000_000,
            )?,
            max_anonymous_connections_per_source: range(
                "server.max_anonymous_connections_per_source",
                s.max_anonymous_connections_per_source,
                1,
                1_000_000,
            )?,
            max_handshakes_per_source: range(
                "server.max_handshakes_per_source",
                s.max_handshakes_per_source,
                1,
                1_000_000,
            )?,
            handshake_timeout: range(
                "server.handshake_timeout",
                s.handshake_timeout,
                Duration::from_millis(100),
                Duration::from_secs(120),
            )?,
            request_timeout: range(
                "server.request_timeout",
                s.request_timeout,
                Duration::from_millis(100),
                Duration::from_secs(600),
            )?,
            shutdown_grace: range(
                "server.shutdown_grace",
                s.shutdown_grace,
                Duration::ZERO,
                Duration::from_secs(600),
            )?,
        };
        if server.grpc_addr == server.http_addr && server.grpc_addr.port() != 0 {
            return Err((
                "server.http_addr",
                "is the same address as server.grpc_addr".into(),
            ));
        }

        let identity = self.identity.check(self.tls.client_ca.is_some())?;
        let tls = TlsConfig {
            cert: self.tls.cert,
            key: self.tls.key,
            min_version: self.tls.min_version,
        };

        check_issuer_url(&self.issuer.url).map_err(|m| ("issuer.url", m))?;
        let ca = match (self.issuer.ca_cert, self.issuer.ca_key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(("issuer.ca_key", "required with issuer.ca_cert".into()));
            }
            (None, Some(_)) => {
                return Err(("issuer.ca_cert", "required with issuer.ca_key".into()));
            }
        };
        let issuer = IssuerConfig {
            url: self.issuer.url,
            jwt_key: self.issuer.jwt_key,
            jwt_algorithm: self.issuer.jwt_algorithm,
            ca,
        };

        let redis_url = match (self.store.backend, self.store.redis_url) {
            (StoreBackend::Redis, None) => {
                return Err((
                    "store.redis_url",
                    "required when store.backend = \"redis\"".into(),
                ));
            }
            (_, Some(url)) if url.starts_with("rediss://") => {
                return Err((
                    "store.redis_url",
                    "rediss:// (TLS) is not built into this broker: use redis:// on a private \
                     network, or through a TLS tunnel (stunnel, a sidecar) on localhost"
                        .into(),
                ));
            }
            (_, Some(url)) if !url.starts_with("redis://") => {
                // Never echo the URL: it may carry a password.
                return Err(("store.redis_url", "must start with redis://".into()));
            }
            (_, url) => url,
        };
        if self.audit.redis_stream && redis_url.is_none() {
            return Err((
                "audit.redis_stream",
                "needs store.redis_url (the stream lives in the store's Redis)".into(),
            ));
        }
        let store = StoreConfig {
            backend: self.store.backend,
            path: self.store.path,
            redis_url,
        };

        let t = self.ttl;
        let second = Duration::from_secs(1);
        let day = Duration::from_secs(24 * 3600);
        let ttl = TtlConfig {
            credential_max: range("ttl.credential_max", t.credential_max, second, day)?,
            credential_default: range(
                "ttl.credential_default",
                t.credential_default,
                second,
                t.credential_max,
            )?,
            lease_renewal_max: range(
                "ttl.lease_renewal_max",
                t.lease_renewal_max,
                t.credential_max,
                30 * day,
            )?,
            task_deadline_max: range(
                "ttl.task_deadline_max",
                t.task_deadline_max,
                second,
                30 * day,
            )?,
            task_retention: range(
                "ttl.task_retention",
                t.task_retention,
                Duration::from_secs(60),
                3650 * day,
            )?,
            lock_on_failure: range(
                "ttl.lock_on_failure",
                t.lock_on_failure,
                Duration::from_secs(60),
                366 * day,
            )?,
        };

        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| ("log.level", e.to_string()))?;
        let log = LogConfig {
            format: self.log.format,
            level: self.log.level,
        };

        let first = identity
            .trust_domains
            .first()
            .map(|d| d.name.clone())
            .unwrap_or_default();
        let ci = self.ci.check(&identity.allowed_trust_domains, &first)?;
        let l = self.limits;
        let limits = LimitsConfig {
            issuance: rate(
                "limits.issuance_per_second",
                l.issuance_per_second,
                l.issuance_burst,
            )?,
            ci: rate("limits.ci_per_second", l.ci_per_second, l.ci_burst)?,
            public: rate(
                "limits.public_per_second",
                l.public_per_second,
                l.public_burst,
            )?,
            rpc: rate("limits.rpc_per_second", l.rpc_per_second, l.rpc_burst)?,
        };

        Ok(Config {
            ci,
            limits,
            server,
            tls,
            identity,
            issuer,
            store,
            ttl,
            policy: PolicyConfig {
                dir: self.policy.dir,
            },
            audit: AuditConfig {
                path: self.audit.path,
                required: self.audit.required,
                redis_stream: self.audit.redis_stream,
                redis_stream_max_len: self.audit.redis_stream_max_len,
                fsync: match self.audit.fsync {
                    RawFsync::Always => crate::audit::Fsync::Always,
                    RawFsync::Interval => crate::audit::Fsync::Interval,
                    RawFsync::Never => crate::audit::Fsync::Never,
                },
                fsync_interval: range(
                    "audit.fsync_interval",
                    self.audit.fsync_interval,
                    Duration::from_millis(10),
                    Duration::from_secs(60),
                )?,
            },
            log,
        })
    }
}

/// The issuer is the exact `iss` verifiers compare: an absolute `https` URL (plain `http` only on
/// a loopback host, for development), no trailing slash, query or fragment.
fn check_issuer_url(url: &str) -> Result<(), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    let host = uri.host().ok_or("not an absolute URL")?;
    match uri.scheme_str() {
        Some("https") => {}
        Some("http") if crate::fetch::is_loopback_host(host) => {}
        _ => return Err("must be an https URL (http only on localhost)".into()),
    }
    if uri.query().is_some() || url.contains('#') {
        return Err("must not have a query or fragment".into());
    }
    if url.ends_with('/') {
        return Err("must not end with '/': verifiers compare iss exactly".into());
    }
    Ok(())
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!(
            "{text:?} is not a duration like \"30s\" or \"5m\": {e}"
        ))
    })
}
