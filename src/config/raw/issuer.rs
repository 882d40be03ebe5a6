//! `[issuer]`: the `iss` of every token, the JWT signing key, and the CA that signs X509-SVIDs.

use std::path::PathBuf;

use serde::Deserialize;

use super::{CheckError, check_issuer_url};
use crate::config::IssuerConfig;
use crate::mint::JwtAlgorithm;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIssuer {
    url: String,
    jwt_key: PathBuf,
    #[serde(default)]
    jwt_algorithm: JwtAlgorithm,
    ca_cert: Option<PathBuf>,
    ca_key: Option<PathBuf>,
}

impl RawIssuer {
    pub(super) fn check(self) -> Result<IssuerConfig, CheckError> {
        check_issuer_url(&self.url).map_err(|m| ("issuer.url", m))?;
        let ca = match (self.ca_cert, self.ca_key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(("issuer.ca_key", "required with issuer.ca_cert".into()));
            }
            (None, Some(_)) => {
                return Err(("issuer.ca_cert", "required with issuer.ca_key".into()));
            }
        };
        Ok(IssuerConfig {
            url: self.url,
            jwt_key: self.jwt_key,
            jwt_algorithm: self.jwt_algorithm,
            ca,
        })
    }
}
