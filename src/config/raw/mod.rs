//! The configuration as written: serde structs mirroring `config/taskcred.toml` key for key, with
//! their defaults, and the checks that turn them into the typed [`Config`](super::Config).
//! Unknown keys are refused (`deny_unknown_fields`) so that a typo never silently leaves a
//! default in force.
//!
//! One file per section of the file; this one holds the whole ([`Raw`]), the helpers every
//! section uses, and the order the sections are checked in.

mod audit;
mod ci;
mod delegation;
mod identity;
mod issuer;
mod limits;
mod log;
mod server;
mod store;
mod tls;
mod ttl;

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::{Config, PolicyConfig};

pub use log::LogFormat;
pub use store::StoreBackend;
pub use tls::TlsVersion;

pub(super) const DEFAULT_GRPC_ADDR: &str = "127.0.0.1:7443";
pub(super) const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:7480";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Raw {
    #[serde(default)]
    server: server::RawServer,
    tls: tls::RawTls,
    identity: identity::RawIdentity,
    issuer: issuer::RawIssuer,
    store: store::RawStore,
    #[serde(default)]
    ttl: ttl::RawTtl,
    policy: RawPolicy,
    audit: audit::RawAudit,
    #[serde(default)]
    log: log::RawLog,
    #[serde(default)]
    ci: ci::RawCi,
    #[serde(default)]
    limits: limits::RawLimits,
    #[serde(default)]
    delegation: delegation::RawDelegation,
}

/// `[policy]`: too small for a file of its own.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    dir: PathBuf,
}

/// A failed check: the key and what is wrong with its value.
type CheckError = (&'static str, String);

/// Bounds the sections' checks share.
const TENTH_OF_A_SECOND: Duration = Duration::from_millis(100);
const SECOND: Duration = Duration::from_secs(1);
const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);

/// `value` if it lies within `min..=max`, else an error naming `key`.
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

/// A budget of connections or handshakes: at least 1 (0 would refuse every client), at most a
/// million.
fn budget(key: &'static str, value: usize) -> Result<usize, CheckError> {
    range(key, value, 1, 1_000_000)
}

impl Raw {
    /// Checks every value and builds the typed configuration. File checks come after.
    ///
    /// The sections are checked in this order, so that a file with several mistakes is always
    /// told about the same one first.
    pub(super) fn check(self) -> Result<Config, CheckError> {
        let server = self.server.check()?;
        let identity = self.identity.check(self.tls.names_client_ca())?;
        let tls = self.tls.into_config();
        let issuer = self.issuer.check()?;
        let store = self.store.check()?;
        self.audit.check_stream(&store)?;
        let ttl = self.ttl.check()?;
        let log = self.log.check()?;

        let first = identity
            .trust_domains
            .first()
            .map(|d| d.name.clone())
            .unwrap_or_default();
        let ci = self.ci.check(&identity.allowed_trust_domains, &first)?;
        let limits = self.limits.check()?;
        let delegation = self.delegation.check()?;
        let audit = self.audit.check()?;

        Ok(Config {
            ci,
            limits,
            delegation,
            server,
            tls,
            identity,
            issuer,
            store,
            ttl,
            policy: PolicyConfig {
                dir: self.policy.dir,
            },
            audit,
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
