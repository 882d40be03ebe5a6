//! `[[identity.trust_domains]]`: the trust domains whose workload identities are accepted, each
//! with its own bundle.

use std::path::PathBuf;

use serde::Deserialize;

use super::CheckError;
use crate::config::{IdentityConfig, TrustDomainConfig};
use crate::identity::TrustDomains;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIdentity {
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
    pub(super) fn check(self, tls_client_ca: bool) -> Result<IdentityConfig, CheckError> {
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
