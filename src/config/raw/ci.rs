//! `[ci]` and `[[ci.issuers]]`: the CI OIDC issuers whose ID tokens are exchanged, and the trust
//! domain of the identities their jobs get.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{
    CheckError, DAY, HOUR, MINUTE, SECOND, TENTH_OF_A_SECOND, check_issuer_url, duration, range,
};
use crate::ci::{ClaimNames, KeySource, MAX_LEEWAY, Preset};
use crate::config::{CiConfig, CiIssuerConfig};
use crate::identity::{TrustDomains, WorkloadId};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawCi {
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
    pub(super) fn check(self, domains: &TrustDomains, first: &str) -> Result<CiConfig, CheckError> {
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
                    .and_then(|d| range("ci.issuers.task_deadline_max", d, SECOND, 30 * DAY))?,
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
            jwks_refresh: range("ci.issuers.jwks_refresh", self.jwks_refresh, SECOND, DAY)?,
            jwks_refetch_min: range(
                "ci.issuers.jwks_refetch_min",
                self.jwks_refetch_min,
                TENTH_OF_A_SECOND,
                HOUR,
            )?,
            leeway: range("ci.issuers.leeway", self.leeway, Duration::ZERO, MAX_LEEWAY)?,
            max_token_age: range("ci.issuers.max_token_age", self.max_token_age, SECOND, DAY)?,
            max_token_lifetime: range(
                "ci.issuers.max_token_lifetime",
                self.max_token_lifetime,
                MINUTE,
                7 * DAY,
            )?,
            task_deadline_max,
            claims,
        })
    }
}
