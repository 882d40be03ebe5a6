//! Configuration: the TOML file (or the built-in dev defaults), overlaid with `TASKCRED_*`
//! environment variables and command-line flags, parsed into typed per-module configs and fully
//! checked (values, key files and their permissions) before any port is bound.
//!
//! Precedence, lowest first: the file (or `--dev` defaults), environment variables, flags.
//! An environment variable names a key as `TASKCRED_<SECTION>__<KEY>` (two underscores between
//! section and key), e.g. `TASKCRED_SERVER__GRPC_ADDR=0.0.0.0:7443`. Variables without `__`
//! (`TASKCRED_BROKER`, `TASKCRED_CA`, ...) belong to the client and are not read here.
//!
//! Every error names the key and where its value came from, never the value of a secret.

mod raw;

use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::identity::TrustDomains;

pub use raw::{LogFormat, StoreBackend, TlsVersion};
// Mint's; also named here, where `issuer.jwt_algorithm` is read into it (and where older
// callers, `store::conformance` and tests/, still find it).
pub use crate::mint::JwtAlgorithm;

/// Prefix of the environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "TASKCRED_";

/// The whole, checked configuration of a broker.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listeners and per-connection limits.
    pub server: ServerConfig,
    /// The gRPC port's TLS material.
    pub tls: TlsConfig,
    /// Which workload identities are accepted.
    pub identity: IdentityConfig,
    /// The token issuer: `iss` and the signing key.
    pub issuer: IssuerConfig,
    /// Where tasks and leases live.
    pub store: StoreConfig,
    /// Credential and task lifetimes.
    pub ttl: TtlConfig,
    /// Where the Cedar policies are.
    pub policy: PolicyConfig,
    /// Where decisions are recorded.
    pub audit: AuditConfig,
    /// Logging.
    pub log: LogConfig,
    /// CI OIDC issuers trusted for `ExchangeCiToken`.
    pub ci: CiConfig,
    /// Per-identity issuance rate limits.
    pub limits: LimitsConfig,
    /// How far tasks may be delegated.
    pub delegation: crate::task::DelegationLimits,
}

/// Issuance rate limits, per identity and per replica.
#[derive(Debug, Clone, Copy)]
pub struct LimitsConfig {
    /// Tokens, certificates and renewals per agent identity; `None`: unlimited.
    pub issuance: Option<crate::broker::limits::Rate>,
    /// CI exchanges per repository identity; `None`: unlimited.
    pub ci: Option<crate::broker::limits::Rate>,
    /// Calls of the public RPCs (no client certificate) per source address, counted before
    /// anything is verified; `None`: unlimited.
    pub public: Option<crate::broker::limits::Rate>,
    /// RPCs of any method per authenticated identity (each is a decision and an audit line);
    /// `None`: unlimited.
    pub rpc: Option<crate::broker::limits::Rate>,
}

/// The CI issuers whose ID tokens the broker exchanges.
#[derive(Debug, Clone, Default)]
pub struct CiConfig {
    /// Trust domain of the identities CI jobs get (`spiffe://<it>/ci/<issuer>/<repository id>`):
    /// never one accepted for mTLS; by default `ci.` and the first accepted trust domain.
    pub trust_domain: String,
    /// The trusted issuers; none: the exchange is refused.
    pub issuers: Vec<CiIssuerConfig>,
}

/// One trusted CI issuer.
#[derive(Debug, Clone)]
pub struct CiIssuerConfig {
    /// Short name, `[a-z0-9-]{1,32}`.
    pub name: String,
    /// Whose claim names.
    pub preset: crate::ci::Preset,
    /// The exact `iss`.
    pub issuer: String,
    /// The exact `aud` required (broker-specific).
    pub audience: String,
    /// The accepted algorithms.
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    /// Where the keys come from.
    pub jwks: crate::ci::KeySource,
    /// Roots for an `https` JWK Set URL (PEM); by default the system's trust store.
    pub jwks_ca: Option<PathBuf>,
    /// Reread the keys when older than this.
    pub jwks_refresh: Duration,
    /// Refetch for an unknown `kid` at most this often.
    pub jwks_refetch_min: Duration,
    /// Tolerance on `exp`/`nbf`/`iat` (at most 300 s).
    pub leeway: Duration,
    /// Oldest token accepted, by `iat`.
    pub max_token_age: Duration,
    /// Longest `exp - iat` accepted.
    pub max_token_lifetime: Duration,
    /// Bound of a derived task's deadline, shorter than the token's expiry.
    pub task_deadline_max: Option<Duration>,
    /// The claim names (the preset's, with overrides).
    pub claims: crate::ci::ClaimNames,
}

/// The Cedar policies.
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    /// Directory of `*.cedar` files, validated against the built-in schema; reloaded on SIGHUP
    /// and by the `ReloadPolicy` RPC.
    pub dir: PathBuf,
}

/// The audit log.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// File receiving one JSON line per decision (created 0600, appended to), hash-chained.
    pub path: PathBuf,
    /// Whether issuance fails closed (`UNAVAILABLE`) when its audit line cannot be written.
    pub required: bool,
    /// Whether every event also goes to the store's Redis, one stream for all replicas.
    pub redis_stream: bool,
    /// The stream's approximate length limit (oldest entries trimmed); 0: none.
    pub redis_stream_max_len: u64,
    /// When lines reach the disk.
    pub fsync: crate::audit::Fsync,
    /// With [`crate::audit::Fsync::Interval`], how often.
    pub fsync_interval: Duration,
}

/// Listeners and limits of the gRPC and HTTP ports.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// gRPC (mTLS) listen address.
    pub grpc_addr: SocketAddr,
    /// HTTP (health, metrics, JWKS) listen address.
    pub http_addr: SocketAddr,
    /// Whether the HTTP port serves TLS (with `tls.cert` and `tls.key`): HTTPS for the JWK Set,
    /// discovery and the CRL.
    pub http_tls: bool,
    /// Open connections of the HTTP port at once.
    pub max_http_connections: usize,
    /// Of those, from one source address (an IPv6 /64).
    pub max_http_connections_per_source: usize,
    /// An HTTP connection that moves no byte for this long is closed.
    pub http_idle_timeout: Duration,
    /// An HTTP connection is closed this long after it began (clients reconnect).
    pub http_max_age: Duration,
    /// Largest gRPC message accepted or sent, in bytes.
    pub max_message_bytes: usize,
    /// RPCs in flight on one connection (HTTP/2 streams and the tower concurrency limit).
    pub max_concurrent_rpcs_per_connection: u32,
    /// The gRPC port's connection limits, which its accept loop ([`crate::tls`]) enforces.
    pub accept: AcceptLimits,
    /// Time one RPC may take before it answers `DEADLINE_EXCEEDED`-like cancellation.
    pub request_timeout: Duration,
    /// On SIGINT/SIGTERM, how long in-flight RPCs may take to finish before the broker exits.
    pub shutdown_grace: Duration,
}

/// Connection limits of the gRPC port.
#[derive(Debug, Clone, Copy)]
pub struct AcceptLimits {
    /// Open connections at once; further connections wait in the accept queue.
    pub max_connections: usize,
    /// Of those, connections without a client certificate (only the public RPCs answer them);
    /// more are closed at once.
    pub max_anonymous_connections: usize,
    /// Time a client has to finish the TLS handshake, and then to send the HTTP/2 preface.
    pub handshake_timeout: Duration,
    /// A connection with a client certificate and no RPC in flight for this long is closed.
    pub idle_timeout: Duration,
    /// The same for a connection without one.
    pub anonymous_idle_timeout: Duration,
    /// A connection without a client certificate is closed this long after it began, whatever
    /// it does (a public stream cannot hold a slot for ever).
    pub anonymous_max_age: Duration,
    /// Open connections of one identity at once.
    pub max_connections_per_identity: usize,
    /// Open connections without a client certificate from one source address (an IPv6 /64).
    pub max_anonymous_connections_per_source: usize,
    /// Connections from one source address still in their TLS handshake.
    pub max_handshakes_per_source: usize,
}

/// TLS material of the gRPC port.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// The broker's certificate chain (PEM, leaf first).
    pub cert: PathBuf,
    /// The broker's private key (PEM, PKCS#8/SEC1/PKCS#1), not readable by group or others.
    pub key: PathBuf,
    /// Lowest TLS version offered.
    pub min_version: TlsVersion,
}

/// Accepted identities.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// Each trust domain whose IDs are accepted, with its own bundle.
    pub trust_domains: Vec<TrustDomainConfig>,
    /// Their names.
    pub allowed_trust_domains: TrustDomains,
}

/// One accepted trust domain: a client certificate whose SPIFFE ID names it must chain to a CA
/// of its bundle, and of no other domain's.
#[derive(Debug, Clone)]
pub struct TrustDomainConfig {
    /// The trust domain, e.g. `example.org`.
    pub name: String,
    /// Its CA certificates: a PEM file or a SPIFFE bundle (JSON).
    pub bundle: PathBuf,
}

/// The issuer of the broker's tokens.
#[derive(Debug, Clone)]
pub struct IssuerConfig {
    /// The `iss` of every token, exact (no trailing slash).
    pub url: String,
    /// The JWT signing key (PKCS#8 PEM), not readable by group or others.
    pub jwt_key: PathBuf,
    /// The one algorithm of that key.
    pub jwt_algorithm: JwtAlgorithm,
    /// The issuing CA of X509-SVIDs: certificate (PEM) and key (PKCS#8 PEM, not readable by
    /// others). Without it, IssueCertificate answers `FAILED_PRECONDITION`.
    pub ca: Option<(PathBuf, PathBuf)>,
}

/// The lease store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Which backend.
    pub backend: StoreBackend,
    /// The embedded store's file.
    pub path: PathBuf,
    /// The Redis URL (`redis://`), when the backend is one Redis server (and the audit
    /// stream's Redis).
    pub redis_url: Option<String>,
    /// Where the Redis store's Redis is, for every Redis backend.
    pub topology: Option<crate::store::redis::Topology>,
    /// What a Redis write must reach before its caller is told.
    pub durability: crate::store::redis::Durability,
}

impl StoreConfig {
    /// The Redis the shared audit stream lives in: the store's (any Redis backend), or the
    /// server `store.redis_url` names beside the embedded store.
    pub fn stream_redis(&self) -> Option<crate::store::redis::Topology> {
        self.topology.clone().or_else(|| {
            self.redis_url
                .clone()
                .map(crate::store::redis::Topology::Single)
        })
    }
}

/// Lifetimes.
#[derive(Debug, Clone)]
pub struct TtlConfig {
    /// Credential lifetime when the caller asks for none.
    pub credential_default: Duration,
    /// Longest credential lifetime, whatever is asked.
    pub credential_max: Duration,
    /// Longest a lease may be renewed for, from its first issue.
    pub lease_renewal_max: Duration,
    /// Latest deadline a task may ask for, from its request.
    pub task_deadline_max: Duration,
    /// How long an ended task and its approval history stay readable.
    pub task_retention: Duration,
    /// How long a lock that policy asks for after a task's agent reported it failed lasts.
    pub lock_on_failure: Duration,
}

/// Logging.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Human-readable lines or JSON lines.
    pub format: LogFormat,
    /// A `tracing` filter, e.g. `info` or `taskcred=debug,info`.
    pub level: String,
}

/// Why a configuration was refused. Each names the key or file at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML.
    #[error("config file {path}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A key is unknown, missing or has a bad value.
    #[error("{origin}: key `{key}`: {message}")]
    Key {
        /// Where the value came from: the file, an environment variable or a flag.
        origin: String,
        /// The key, e.g. `server.grpc_addr`.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A file named by a key is missing, unreadable or too widely readable.
    #[error("key `{key}`: file {path}: {problem}")]
    File {
        /// The key naming the file.
        key: String,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// An environment variable cannot be applied.
    #[error("environment variable {var}: {message}")]
    Env {
        /// The variable.
        var: String,
        /// What is wrong.
        message: String,
    },
}

/// Where the base layer of the configuration comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A TOML file.
    File(PathBuf),
    /// The built-in development configuration over the files of `taskcred dev init` in this dir.
    Dev(PathBuf),
}

/// Command-line flags that override keys (highest precedence).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--grpc-addr`.
    pub grpc_addr: Option<String>,
    /// `--http-addr`.
    pub http_addr: Option<String>,
    /// `--log-format`.
    pub log_format: Option<String>,
    /// `--redis URL`: the Redis store at URL.
    pub redis_url: Option<String>,
    /// `--redis-cluster URL,URL`: the Redis store on the Cluster these seed nodes belong to.
    pub redis_cluster: Option<String>,
}

/// Loads and checks the configuration.
///
/// # Errors
/// [`ConfigError`] naming the file, key or variable at fault.
pub fn load(
    source: &Source,
    env: impl IntoIterator<Item = (String, String)>,
    flags: &Overrides,
) -> Result<Config, ConfigError> {
    let (mut table, base_origin) = match source {
        Source::File(path) => {
            check_not_writable_by_others("--config", path)?;
            let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            let table = text
                .parse::<toml::Table>()
                .map_err(|e| ConfigError::Syntax {
                    path: path.clone(),
                    message: syntax_message(&text, &e),
                })?;
            (table, format!("config file {}", path.display()))
        }
        Source::Dev(dir) => (
            dev_defaults(dir),
            format!("dev configuration ({})", dir.display()),
        ),
    };

    let mut origins = BTreeMap::new();
    apply_env(&mut table, env, &mut origins)?;
    apply_flags(&mut table, flags, &mut origins)?;
    let dev = matches!(source, Source::Dev(_));
    if dev && !origins.contains_key("issuer.url") {
        dev_issuer_follows_http_addr(&mut table);
    }

    let origin_of = |key: &str| -> String {
        origins
            .iter()
            .find(|(k, _)| key == k.as_str() || key.starts_with(&format!("{k}.")))
            .map_or_else(|| base_origin.clone(), |(_, o)| o.clone())
    };
    let raw: raw::Raw =
        serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let key = e.path().to_string();
            // The toml deserializer appends "\nin `key`"; the key is named already.
            let message = e.inner().to_string();
            let message = message.lines().next().unwrap_or_default();
            let message = if key.starts_with("store.") {
                // A store key may hold a URL with its password: its value is never shown.
                hide_quoted(message)
            } else {
                message.to_owned()
            };
            ConfigError::Key {
                origin: origin_of(&key),
                key,
                message,
            }
        })?;
    let config = raw.check().map_err(|(key, message)| ConfigError::Key {
        origin: origin_of(key),
        key: key.to_owned(),
        message,
    })?;
    if dev {
        // The dev PKI's keys sit in a directory anyone with the checkout has, and its policies
        // let its identities do everything: never on a network.
        for (key, addr) in [
            ("server.grpc_addr", config.server.grpc_addr),
            ("server.http_addr", config.server.http_addr),
        ] {
            if !addr.ip().is_loopback() {
                return Err(ConfigError::Key {
                    origin: origin_of(key),
                    key: key.into(),
                    message: format!(
                        "{addr}: serve --dev listens on loopback only (127.0.0.1, ::1); its keys \
                         and policies are for a trial, not a network"
                    ),
                });
            }
        }
    }
    check_files(config)
}

/// In dev mode the issuer is the HTTP port itself (where the JWK Set is), wherever it listens.
fn dev_issuer_follows_http_addr(table: &mut toml::Table) {
    let addr = table
        .get("server")
        .and_then(|s| s.get("http_addr"))
        .and_then(toml::Value::as_str)
        .and_then(|a| a.parse::<SocketAddr>().ok());
    if let Some(addr) = addr.filter(|a| a.port() != 0)
        && let Some(issuer) = table.get_mut("issuer").and_then(toml::Value::as_table_mut)
    {
        issuer.insert("url".into(), format!("http://{addr}").into());
    }
}

/// The `serve --dev` configuration, over the files `taskcred dev init` writes into `dir`.
fn dev_defaults(dir: &Path) -> toml::Table {
    let p = |name: &str| toml::Value::String(dir.join(name).to_string_lossy().into_owned());
    let mut t = toml::Table::new();
    let mut tls = toml::Table::new();
    tls.insert("cert".into(), p("server.pem"));
    tls.insert("key".into(), p("server-key.pem"));
    t.insert("tls".into(), tls.into());
    let mut domain = toml::Table::new();
    domain.insert("name".into(), crate::devpki::TRUST_DOMAIN.into());
    domain.insert("bundle".into(), p("ca.pem"));
    let mut identity = toml::Table::new();
    identity.insert(
        "trust_domains".into(),
        toml::Value::Array(vec![domain.into()]),
    );
    t.insert("identity".into(), identity.into());
    let mut issuer = toml::Table::new();
    issuer.insert(
        "url".into(),
        format!("http://{}", raw::DEFAULT_HTTP_ADDR).into(),
    );
    issuer.insert("jwt_key".into(), p("jwt-key.pem"));
    issuer.insert("ca_cert".into(), p(crate::devpki::ISSUING_CA_CERT));
    issuer.insert("ca_key".into(), p(crate::devpki::ISSUING_CA_KEY));
    t.insert("issuer".into(), issuer.into());
    let mut store = toml::Table::new();
    store.insert("backend".into(), "embedded".into());
    store.insert("path".into(), p("taskcred.db"));
    t.insert("store".into(), store.into());
    let mut policy = toml::Table::new();
    policy.insert("dir".into(), p("policies"));
    t.insert("policy".into(), policy.into());
    let mut audit = toml::Table::new();
    audit.insert("path".into(), p("audit.jsonl"));
    t.insert("audit".into(), audit.into());
    t
}

/// Applies `TASKCRED_<SECTION>__<KEY>` variables.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
    origins: &mut BTreeMap<String, String>,
) -> Result<(), ConfigError> {
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k.contains("__"))
        .collect();
    vars.sort();
    for (var, value) in vars {
        let path: Vec<String> = var[ENV_PREFIX.len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        if path.iter().any(String::is_empty) {
            return Err(ConfigError::Env {
                var,
                message: "expected TASKCRED_<SECTION>__<KEY>".into(),
            });
        }
        set_path(table, &path, env_value(&value)).map_err(|message| ConfigError::Env {
            var: var.clone(),
            message,
        })?;
        origins.insert(path.join("."), format!("environment variable {var}"));
    }
    Ok(())
}

/// `message` with what it quotes (between its first and last `"`, or backticks) left out.
fn hide_quoted(message: &str) -> String {
    let mut out = message.to_owned();
    for q in ['"', '`'] {
        if let (Some(a), Some(b)) = (out.find(q), out.rfind(q))
            && a < b
        {
            out.replace_range(a..=b, "(value not shown)");
        }
    }
    out
}

/// The parser's complaint with its line and column, without the source line the parser quotes:
/// that line may hold a secret (a Redis URL with its password).
fn syntax_message(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim_end().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("TOML parse error at line {line}, column {column}: {message}")
        }
        None => format!("TOML parse error: {message}"),
    }
}

/// Reads an environment value as a TOML value where it is one (`8080`, `true`, `["a", "b"]`),
/// else as a string (`127.0.0.1:7443`, `30s`, `json`).
fn env_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .filter(|v| !matches!(v, toml::Value::Datetime(_) | toml::Value::Table(_)))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

fn apply_flags(
    table: &mut toml::Table,
    flags: &Overrides,
    origins: &mut BTreeMap<String, String>,
) -> Result<(), ConfigError> {
    let redis_backend = flags.redis_url.as_ref().map(|_| "redis".to_owned());
    let cluster_backend = flags
        .redis_cluster
        .as_ref()
        .map(|_| "redis_cluster".to_owned());
    let text = |v: &Option<String>| v.clone().map(toml::Value::String);
    let pairs = [
        ("server.grpc_addr", "--grpc-addr", text(&flags.grpc_addr)),
        ("server.http_addr", "--http-addr", text(&flags.http_addr)),
        ("log.format", "--log-format", text(&flags.log_format)),
        ("store.backend", "--redis", text(&redis_backend)),
        ("store.redis_url", "--redis", text(&flags.redis_url)),
        ("store.backend", "--redis-cluster", text(&cluster_backend)),
        (
            "store.redis_urls",
            "--redis-cluster",
            flags.redis_cluster.as_ref().map(|urls| {
                toml::Value::Array(
                    urls.split(',')
                        .map(|u| toml::Value::String(u.trim().to_owned()))
                        .collect(),
                )
            }),
        ),
    ];
    for (key, flag, value) in pairs {
        if let Some(v) = value {
            let path: Vec<String> = key.split('.').map(str::to_owned).collect();
            set_path(table, &path, v).map_err(|message| ConfigError::Key {
                origin: format!("flag {flag}"),
                key: key.into(),
                message,
            })?;
            origins.insert(key.into(), format!("flag {flag}"));
        }
    }
    Ok(())
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let Some((last, parents)) = path.split_last() else {
        return Err("empty key".into());
    };
    let mut t = table;
    for (i, part) in parents.iter().enumerate() {
        let entry = t
            .entry(part.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{}` is not a section", path[..=i].join(".")))?;
    }
    t.insert(last.clone(), value);
    Ok(())
}

/// Checks the files the configuration names: readable, and key files not readable by others.
fn check_files(config: Config) -> Result<Config, ConfigError> {
    check_readable("tls.cert", &config.tls.cert)?;
    check_key_file("tls.key", &config.tls.key)?;
    for domain in &config.identity.trust_domains {
        check_readable("identity.trust_domains.bundle", &domain.bundle)?;
        check_not_writable_by_others("identity.trust_domains.bundle", &domain.bundle)?;
    }
    check_key_file("issuer.jwt_key", &config.issuer.jwt_key)?;
    if let Some((cert, key)) = &config.issuer.ca {
        check_readable("issuer.ca_cert", cert)?;
        check_key_file("issuer.ca_key", key)?;
    }
    check_not_writable_by_others("policy.dir", &config.policy.dir)?;
    for issuer in &config.ci.issuers {
        if let crate::ci::KeySource::File(f) = &issuer.jwks {
            check_readable("ci.issuers.jwks_file", f)?;
            check_not_writable_by_others("ci.issuers.jwks_file", f)?;
        }
        if let Some(ca) = &issuer.jwks_ca {
            check_readable("ci.issuers.jwks_ca", ca)?;
        }
    }
    Ok(config)
}

fn file_error(key: &str, path: &Path, problem: impl Into<String>) -> ConfigError {
    ConfigError::File {
        key: key.into(),
        path: path.to_owned(),
        problem: problem.into(),
    }
}

fn check_readable(key: &str, path: &Path) -> Result<fs::Metadata, ConfigError> {
    let meta = fs::metadata(path).map_err(|e| file_error(key, path, e.to_string()))?;
    if !meta.is_file() {
        return Err(file_error(key, path, "not a regular file"));
    }
    fs::File::open(path).map_err(|e| file_error(key, path, format!("cannot open: {e}")))?;
    Ok(meta)
}

/// A file (or directory) that decides whom the broker trusts (the config, a trust bundle, the
/// policy directory, a CI issuer's keys) must be one only the broker's user or root can change
/// ([`crate::files::check_trusted`]).
///
/// # Errors
/// [`ConfigError::File`] naming the key and file.
pub fn check_not_writable_by_others(key: &str, path: &Path) -> Result<(), ConfigError> {
    crate::files::check_trusted(path).map_err(|e| file_error(key, path, e.to_string()))
}

/// A private key file must be readable by us and by nobody in its group or beyond (0600 or
/// 0400): a key readable by others is already a leaked key.
///
/// # Errors
/// [`ConfigError::File`] naming the key and file.
pub fn check_key_file(key: &str, path: &Path) -> Result<(), ConfigError> {
    let meta = check_readable(key, path)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(file_error(
            key,
            path,
            format!(
                "private key is accessible by group or others (mode {mode:o}); run chmod 600 on it"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
