//! [`KeyRing`]: the key that signs now, and what verifiers are told: the JWK Set and the issuer's
//! discovery document.

use std::sync::Arc;

use serde_json::{Value, json};

use super::{JwtKey, jwks};

/// The broker's signing keys. Every key still able to verify a live token is published.
#[derive(Debug, Clone)]
pub struct KeyRing {
    issuer: String,
    current: Arc<JwtKey>,
}

impl KeyRing {
    /// A ring for `issuer` (the exact `iss`) signing with `current`.
    pub fn new(issuer: String, current: JwtKey) -> Self {
        Self {
            issuer,
            current: Arc::new(current),
        }
    }

    /// The issuer URL.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The key that signs now.
    pub fn current(&self) -> &Arc<JwtKey> {
        &self.current
    }

    /// `/.well-known/jwks.json`.
    pub fn jwks(&self) -> Value {
        jwks([self.current.public_jwk()])
    }

    /// `/.well-known/openid-configuration`: enough for ordinary JWT libraries to find the keys.
    pub fn discovery(&self) -> Value {
        json!({
            "issuer": self.issuer,
            "jwks_uri": format!("{}/.well-known/jwks.json", self.issuer),
            "token_endpoint_auth_methods_supported": ["tls_client_auth"],
            "tls_client_certificate_bound_access_tokens": true,
            "access_token_signing_alg_values_supported": [self.current.alg()],
        })
    }
}
