//! The composition root: builds everything fallible (TLS) before any port is bound, then runs
//! the gRPC server, the HTTP server and their housekeeping until shutdown, and drains.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{self, GrpcOptions};
use crate::audit::AuditLog;
use crate::broker::{Broker, BrokerParts, BrokerSettings, EPOCH_CHECK, KEY_REFRESH};
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, ServerConfig, StoreBackend};
use crate::http::{self, HttpState};
use crate::mint::{IssuingCa, JwtKey, KeyRing, MintError};
use crate::policy::{PolicyEngine, PolicyError};
use crate::store::embedded::EmbeddedStore;
use crate::store::metered::Metered;
use crate::store::redis::RedisStore;
use crate::store::{Store, StoreError};
use crate::task::TaskLimits;
use crate::telemetry;
use crate::tls::{self, TlsSetupError};

/// Why the broker could not start or stopped on its own.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppError {
    /// The TLS material is unusable.
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    /// A listen address could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which port.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The policy directory does not load.
    #[error("policy: {0}")]
    Policy(#[from] PolicyError),
    /// The store cannot be opened.
    #[error("store: {0}")]
    Store(StoreError),
    /// The JWT signing key or the issuing CA is unusable.
    #[error("issuer: {0}")]
    Key(#[from] MintError),
    /// A CI issuer is unusable (its JWK Set file, its roots).
    #[error("CI issuer {name}: {problem}")]
    CiIssuer {
        /// The issuer's configured name.
        name: String,
        /// What is wrong.
        problem: String,
    },
    /// The audit log cannot be opened.
    #[error("key `audit.path`: file {path}: {source}")]
    Audit {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A server stopped with an error before shutdown was asked.
    #[error("{what} server failed: {message}")]
    Server {
        /// Which server.
        what: &'static str,
        /// Why.
        message: String,
    },
}

/// The bound listeners: bind them first (tests bind port 0), then [`App::run`].
#[derive(Debug)]
pub struct Listeners {
    /// The gRPC (mTLS) listener.
    pub grpc: TcpListener,
    /// The HTTP listener.
    pub http: TcpListener,
}

impl Listeners {
    /// Binds the configured addresses.
    ///
    /// # Errors
    /// [`AppError::Bind`] naming the address that could not be bound.
    pub async fn bind(server: &ServerConfig) -> Result<Self, AppError> {
        let bind = |what, addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| AppError::Bind { what, addr, source })
        };
        Ok(Self {
            grpc: bind("gRPC", server.grpc_addr).await?,
            http: bind("HTTP", server.http_addr).await?,
        })
    }

    /// The gRPC listener's address.
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc.local_addr().ok()
    }

    /// The HTTP listener's address.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.local_addr().ok()
    }
}

/// A broker ready to run: configuration checked, TLS built, policies loaded, store opened.
#[derive(Debug)]
pub struct App {
    config: Config,
    tls: Arc<rustls::ServerConfig>,
    /// The HTTP port's TLS, with `server.http_tls`.
    http_tls: Option<Arc<rustls::ServerConfig>>,
    clock: Arc<dyn Clock>,
    broker: Broker,
    keys: KeyRing,
    /// Writes the audit events to the shared Redis stream (`audit.redis_stream`).
    audit_stream: Option<crate::audit::stream::StreamWriter>,
}

/// How often ended tasks past their retention are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// The trusted CI issuers of `config`: a JWK Set file must hold a usable key now; a URL is
/// fetched on first use (the issuer may be unreachable at start without stopping the broker).
fn ci_issuers(config: &crate::config::CiConfig) -> Result<crate::ci::CiIssuers, AppError> {
    use crate::ci::{IssuerKeys, KeySource, TrustedIssuer};
    let mut issuers = Vec::with_capacity(config.issuers.len());
    for i in &config.issuers {
        let bad = |problem: String| AppError::CiIssuer {
            name: i.name.clone(),
            problem,
        };
        let http = match &i.jwks {
            KeySource::File(path) => {
                let n = crate::ci::check_jwks_file(path).map_err(|e| bad(e.to_string()))?;
                if n == 0 {
                    return Err(bad(format!("{}: no usable key", path.display())));
                }
                None
            }
            KeySource::Url(_) => {
                let roots = match &i.jwks_ca {
                    Some(ca) => crate::fetch::roots_from_pem(ca),
                    None => crate::fetch::native_roots(),
                }
                .map_err(bad)?;
                let tls = crate::fetch::tls_config(roots).map_err(bad)?;
                Some(crate::fetch::client(tls).map_err(bad)?)
            }
        };
        issuers.push(TrustedIssuer {
            name: i.name.clone(),
            issuer: i.issuer.clone(),
            audience: i.audience.clone(),
            algorithms: i.algorithms.clone(),
            claims: i.claims.clone(),
            leeway: i.leeway,
            max_token_age: i.max_token_age,
            max_token_lifetime: i.max_token_lifetime,
            task_deadline_max: i.task_deadline_max,
            keys: IssuerKeys::new(i.jwks.clone(), http, i.jwks_refresh, i.jwks_refetch_min),
        });
    }
    Ok(crate::ci::CiIssuers::new(
        issuers,
        config.trust_domain.clone(),
    ))
}

/// Everything the broker trusts and signs with, loaded from the configuration: what `serve` and
/// `config check` both load (the latter without binding a port or opening the store).
struct Trust {
    tls: Arc<rustls::ServerConfig>,
    http_tls: Option<Arc<rustls::ServerConfig>>,
    keys: KeyRing,
    ca: Option<Arc<IssuingCa>>,
    policy: Arc<PolicyEngine>,
    ci: crate::ci::CiIssuers,
}

impl Trust {
    /// Loads and checks the TLS material, the signing key, the issuing CA, the policies and the
    /// CI issuers of `config`.
    fn load(config: &Config) -> Result<Self, AppError> {
        let tls = tls::server_config(
            &config.tls,
            &config.identity,
            config.issuer.ca.as_ref().map(|(cert, _)| cert.as_path()),
        )?;
        let http_tls = if config.server.http_tls {
            Some(tls::http_server_config(&config.tls)?)
        } else {
            None
        };
        let keys = KeyRing::new(
            config.issuer.url.clone(),
            JwtKey::load(&config.issuer.jwt_key, config.issuer.jwt_algorithm)?,
        )?;
        let ca = match &config.issuer.ca {
            Some((cert, key)) => Some(Arc::new(IssuingCa::load(cert, key)?)),
            None => None,
        };
        Ok(Self {
            tls,
            http_tls,
            keys,
            ca,
            policy: Arc::new(PolicyEngine::load(&config.policy.dir)?),
            ci: ci_issuers(&config.ci)?,
        })
    }
}

/// What a configuration that loads may still get wrong, said at start (and by `config check`):
/// an issuing CA that is also a CA of a trust bundle (task certificates are never identities, so
/// every client certificate it signed is refused at the gRPC port), and the dev PKI in use
/// outside `--dev` (its keys were made on one machine for trials). Files that cannot be read
/// were refused by the checks before, so they are skipped here.
pub fn startup_warnings(config: &Config, dev: bool) -> Vec<String> {
    use x509_parser::prelude::{FromDer as _, X509Certificate};
    let subjects = |path: &std::path::Path| -> Vec<(Vec<u8>, bool)> {
        crate::identity::bundle::load(path)
            .unwrap_or_default()
            .iter()
            .filter_map(|der| {
                let (_, cert) = X509Certificate::from_der(der.as_ref()).ok()?;
                let dev_made = cert
                    .subject()
                    .iter_organization()
                    .any(|o| o.as_str().ok() == Some(crate::devpki::ORGANIZATION));
                Some((cert.subject().as_raw().to_vec(), dev_made))
            })
            .collect()
    };
    let mut warnings = Vec::new();
    let issuing = config
        .issuer
        .ca
        .as_ref()
        .map(|(cert, _)| subjects(cert))
        .unwrap_or_default();
    let mut dev_made = false;
    for domain in &config.identity.trust_domains {
        let bundle = subjects(&domain.bundle);
        dev_made |= bundle.iter().any(|(_, d)| *d);
        if issuing
            .iter()
            .take(1)
            .any(|(s, _)| bundle.iter().any(|(b, _)| b == s))
        {
            warnings.push(format!(
                "issuer.ca_cert is also a CA of the bundle of trust domain {}: the certificates \
                 the broker issues are never identities, so every client certificate this CA \
                 signed is refused at the gRPC port; give the broker an issuing CA of its own",
                domain.name
            ));
        }
    }
    if dev_made && !dev {
        warnings.push(format!(
            "the trust bundle is the dev PKI's (organization \"{}\"): its keys were made on one \
             machine for trials; make your own CA for anything but a trial",
            crate::devpki::ORGANIZATION
        ));
    }
    warnings
}

/// What `taskcred config check` found: everything `serve` loads, loaded and checked.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Checked {
    /// The trust domains whose workloads may connect.
    pub trust_domains: Vec<String>,
    /// How many policies load, and from which files.
    pub policies: usize,
    /// The policy files.
    pub policy_files: Vec<std::path::PathBuf>,
    /// The signing key's `kid` and algorithm.
    pub signing_key: String,
    /// Whether certificates can be issued (an issuing CA is configured).
    pub issuing_ca: bool,
    /// The CI issuers trusted, by configured name.
    pub ci_issuers: Vec<String>,
    /// The store: `embedded <path>` or `redis`.
    pub store: String,
    /// The audit log's file.
    pub audit: std::path::PathBuf,
    /// The gRPC and HTTP addresses `serve` would bind.
    pub listen: (String, String),
    /// What `serve` would warn of at start ([`startup_warnings`]).
    pub warnings: Vec<String>,
}

impl App {
    /// Loads and checks everything `serve` would from `config` (TLS material, the signing key,
    /// the issuing CA, the policies, the CI issuers' key files; the store's URL; that the audit
    /// log's directory exists), without binding a port, opening the store or writing a file.
    ///
    /// # Errors
    /// As [`App::build`].
    pub fn check(config: &Config, dev: bool) -> Result<Checked, AppError> {
        let trust = Trust::load(config)?;
        let store = match config.store.backend {
            StoreBackend::Embedded => format!("embedded {}", config.store.path.display()),
            StoreBackend::Redis | StoreBackend::RedisCluster | StoreBackend::RedisSentinel => {
                redis_store(config)?;
                "redis".to_owned()
            }
        };
        let audit_dir = config
            .audit
            .path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or_else(|| std::path::Path::new("."));
        if !audit_dir.is_dir() {
            return Err(AppError::Audit {
                path: config.audit.path.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("directory {} does not exist", audit_dir.display()),
                ),
            });
        }
        let current = trust.policy.current();
        let key = trust.keys.current();
        let mut ci_issuers: Vec<String> = trust.ci.names().map(str::to_owned).collect();
        ci_issuers.sort();
        Ok(Checked {
            trust_domains: config
                .identity
                .allowed_trust_domains
                .names()
                .map(str::to_owned)
                .collect(),
            policies: current.len(),
            policy_files: current.files().to_vec(),
            signing_key: format!("{} ({})", key.kid(), key.alg()),
            issuing_ca: trust.ca.is_some(),
            ci_issuers,
            store,
            audit: config.audit.path.clone(),
            listen: (
                config.server.grpc_addr.to_string(),
                config.server.http_addr.to_string(),
            ),
            warnings: startup_warnings(config, dev),
        })
    }

    /// Builds the broker from a checked configuration, on the system clock.
    ///
    /// # Errors
    /// [`AppError`] naming what is unusable: TLS material, a policy file, the store, the audit log.
    pub fn build(config: Config) -> Result<Self, AppError> {
        Self::build_with_clock(config, Arc::new(SystemClock))
    }

    /// Builds the broker on `clock` (tests use a manual clock).
    ///
    /// # Errors
    /// As [`App::build`].
    pub fn build_with_clock(config: Config, clock: Arc<dyn Clock>) -> Result<Self, AppError> {
        let Trust {
            tls,
            http_tls,
            keys,
            ca,
            policy,
            ci,
        } = Trust::load(&config)?;
        let store: Arc<dyn Store> = match config.store.backend {
            StoreBackend::Embedded => Arc::new(Metered(
                EmbeddedStore::open(&config.store.path).map_err(AppError::Store)?,
            )),
            StoreBackend::Redis | StoreBackend::RedisCluster | StoreBackend::RedisSentinel => {
                Arc::new(Metered(redis_store(&config)?))
            }
        };
        let mut audit = AuditLog::open(&config.audit.path)
            .map_err(|source| AppError::Audit {
                path: config.audit.path.clone(),
                source,
            })?
            .required(config.audit.required)
            .fsync(config.audit.fsync);
        let mut audit_stream = None;
        if let (true, Some(redis)) = (config.audit.redis_stream, config.store.stream_redis()) {
            let (writer, queue) =
                crate::audit::stream::StreamWriter::new(&redis, config.audit.redis_stream_max_len)
                    .map_err(|e| AppError::Store(crate::store::StoreError::Unavailable(e)))?;
            audit = audit.with_stream(queue);
            audit_stream = Some(writer);
        }
        let audit = Arc::new(audit);
        let ttl = &config.ttl;
        let settings = BrokerSettings {
            limits: TaskLimits {
                deadline_max: ttl.task_deadline_max,
                deadline_default: ttl.task_deadline_max.min(Duration::from_secs(3600)),
                credential_ttl_default: ttl.credential_default,
                credential_ttl_max: ttl.credential_max,
            },
            task_retention: ttl.task_retention,
            lease_renewal_max: ttl.lease_renewal_max,
            agent_rate: config.limits.issuance,
            ci_rate: config.limits.ci,
            public_rate: config.limits.public,
            lock_on_failure: ttl.lock_on_failure,
            delegation: config.delegation,
        };
        let broker = Broker::new(
            BrokerParts {
                store,
                policy,
                audit,
                clock: clock.clone(),
                keys: keys.clone(),
                ca,
                key_file: config.issuer.jwt_key.clone(),
                ci,
                trust_domains: config.identity.allowed_trust_domains.clone(),
            },
            settings,
        );
        Ok(Self {
            config,
            tls,
            http_tls,
            clock,
            broker,
            keys,
            audit_stream,
        })
    }

    /// The use cases (for SIGHUP policy reloads).
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    async fn check_store_epoch(&self) {
        if let Err(e) = self.broker.check_store_epoch().await {
            tracing::warn!(error = %e, "reading the store's epoch failed; will retry");
        }
    }

    async fn refresh_signing_keys(&self) {
        match self.broker.refresh_signing_keys().await {
            Ok(n) => tracing::debug!(keys = n, "signing keys published and refreshed"),
            Err(e) => tracing::warn!(error = %e, "publishing the signing key failed; will retry"),
        }
    }

    /// Serves until `shutdown` is cancelled, then drains in-flight RPCs for at most
    /// `server.shutdown_grace`.
    ///
    /// # Errors
    /// [`AppError::Server`] when a server stops on its own.
    pub async fn run(
        mut self,
        listeners: Listeners,
        shutdown: CancellationToken,
    ) -> Result<(), AppError> {
        let server = &self.config.server;
        // Publish this replica's key and learn the others' before serving: the JWK Set and
        // introspection know every live key from the first request on.
        // The recorder first: what the checks below record is in the first scrape.
        let metrics = telemetry::metrics_handle();
        api::metrics::register_at_zero(&api::known_methods());
        self.refresh_signing_keys().await;
        self.check_store_epoch().await;
        let ready = Arc::new(AtomicBool::new(false));
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<api::pb::identity_service_server::IdentityServiceServer<api::IdentityApi>>()
            .await;

        let incoming = tls::incoming(
            listeners.grpc,
            self.tls.clone(),
            self.config.identity.allowed_trust_domains.clone(),
            server.accept,
            shutdown.clone(),
        );
        let options = GrpcOptions {
            max_message_bytes: server.max_message_bytes,
            max_concurrent_rpcs_per_connection: server.max_concurrent_rpcs_per_connection,
            request_timeout: server.request_timeout,
            rpc_rate: self.config.limits.rpc,
        };
        let health_service = health_service
            .max_decoding_message_size(server.max_message_bytes)
            .max_encoding_message_size(server.max_message_bytes);
        let mut grpc = tokio::spawn(api::serve(
            options,
            self.clock.clone(),
            self.broker.clone(),
            health_service,
            incoming,
            shutdown.clone().cancelled_owned(),
        ));
        let http_router = http::router(HttpState {
            metrics: metrics.clone(),
            ready: ready.clone(),
            store: self.broker.store().clone(),
            keys: self.keys.clone(),
            broker: self.broker.clone(),
        });
        let http_listener = crate::http::listener::HttpListener::new(
            listeners.http,
            self.http_tls.clone(),
            crate::http::listener::HttpLimits {
                max_connections: server.max_http_connections,
                max_connections_per_source: server.max_http_connections_per_source,
                handshake_timeout: server.accept.handshake_timeout,
                idle_timeout: server.http_idle_timeout,
                max_age: server.http_max_age,
            },
        )
        .map_err(|e| AppError::Server {
            what: "HTTP",
            message: e.to_string(),
        })?;
        let mut http = tokio::spawn(
            axum::serve(http_listener, http_router)
                .with_graceful_shutdown(shutdown.clone().cancelled_owned())
                .into_future(),
        );
        // The background tasks, under one owner: each ends when `shutdown` is signalled; they are
        // awaited after the servers have drained, and aborted when the grace period is over.
        let mut background = tokio::task::JoinSet::new();
        background.spawn(self.broker.reaper().run(shutdown.clone()));
        background.spawn(self.broker.clone().run_revocation_feed(shutdown.clone()));
        // The auditor finishes its step at shutdown: lines written are committed.
        background.spawn(self.broker.clone().run_revocation_auditor(shutdown.clone()));
        // Its own task: a store that hangs must not hold up the loop below (or shutdown).
        background.spawn(self.broker.clone().run_store_gauges(shutdown.clone()));
        // The stream writer stops after the RPCs have drained, so that their events reach it.
        let stream_stop = CancellationToken::new();
        let stream = self
            .audit_stream
            .take()
            .map(|w| tokio::spawn(w.run(stream_stop.clone())));
        ready.store(true, Ordering::Release);
        tracing::info!("broker ready");

        // Histograms are aggregated lazily; upkeep keeps the recorder's memory bounded.
        let mut upkeep = tokio::time::interval(Duration::from_secs(5));
        let mut prune = tokio::time::interval(PRUNE_EVERY);
        let mut epoch_check = tokio::time::interval(EPOCH_CHECK);
        epoch_check.reset();
        // Sampled-out refusals of unverified callers are counted in a line once their window
        // has passed, even when nothing follows them.
        // With audit.fsync = "interval", lines reach the disk at most that long after they were
        // written.
        let mut audit_sync = tokio::time::interval(self.config.audit.fsync_interval);
        audit_sync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut refusal_summary = tokio::time::interval(crate::audit::SAMPLE_WINDOW);
        refusal_summary.reset();
        let mut key_refresh = tokio::time::interval(KEY_REFRESH);
        key_refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        key_refresh.reset();
        let early = loop {
            tokio::select! {
                // Shutdown first: a server that ends because shutdown was asked is no failure.
                biased;
                () = shutdown.cancelled() => break None,
                _ = upkeep.tick() => metrics.run_upkeep(),
                _ = refusal_summary.tick() => self.broker.flush_unverified_refusals(),
                _ = audit_sync.tick() => self.broker.sync_audit().await,
                _ = key_refresh.tick() => self.refresh_signing_keys().await,
                _ = epoch_check.tick() => self.check_store_epoch().await,
                _ = prune.tick() => match self.broker.prune().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(tasks = n, "pruned ended tasks past their retention"),
                    Err(e) => tracing::warn!(error = %e, "pruning ended tasks failed; will retry"),
                },
                r = &mut grpc => break Some(("gRPC", r.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())))),
                r = &mut http => break Some(("HTTP", r.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())))),
            }
        };
        ready.store(false, Ordering::Release);
        health_reporter
            .set_not_serving::<api::pb::identity_service_server::IdentityServiceServer<api::IdentityApi>>()
            .await;
        if let Some((what, result)) = early.filter(|_| !shutdown.is_cancelled()) {
            shutdown.cancel();
            grpc.abort();
            http.abort();
            background.abort_all();
            stream_stop.cancel();
            let message = result.err().unwrap_or_else(|| "stopped".into());
            return Err(AppError::Server { what, message });
        }

        tracing::info!(grace = ?server.shutdown_grace, "shutting down: draining in-flight RPCs");
        let drained = tokio::time::timeout(server.shutdown_grace, async {
            let _ = (&mut grpc).await;
            let _ = (&mut http).await;
            while background.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("shutdown grace period over; closing remaining connections");
            grpc.abort();
            http.abort();
            background.abort_all();
        }
        stream_stop.cancel();
        if let Some(stream) = stream {
            let _ = stream.await;
        }
        tracing::info!("broker stopped");
        Ok(())
    }
}

/// The Redis store the configuration names (any Redis backend).
fn redis_store(config: &Config) -> Result<RedisStore, AppError> {
    let topology = config.store.topology.as_ref().ok_or_else(|| {
        AppError::Store(crate::store::StoreError::Unavailable(
            "no Redis is configured".into(),
        ))
    })?;
    RedisStore::with(topology, config.store.durability).map_err(AppError::Store)
}
