//! `[tls]`: the certificate and key of the gRPC port, and the lowest TLS version it offers.

use std::path::PathBuf;

use serde::Deserialize;

use crate::config::TlsConfig;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
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

impl RawTls {
    /// Whether the replaced `tls.client_ca` is still set (`[identity]` refuses it).
    pub(super) fn names_client_ca(&self) -> bool {
        self.client_ca.is_some()
    }

    pub(super) fn into_config(self) -> TlsConfig {
        TlsConfig {
            cert: self.cert,
            key: self.key,
            min_version: self.min_version,
        }
    }
}
