//! [`KeyRing`]: the key that signs now, and what verifiers are told: the JWK Set and the issuer's
//! discovery document.

use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};

use super::{ACCESS_TOKEN_TYP, AccessClaims, JwtKey, MintError, jwks};

/// Longest token accepted for verification, in bytes; ours are well under 2 KiB.
pub const MAX_TOKEN_BYTES: usize = 8192;

/// The broker's signing keys. Every key still able to verify a live token is published.
#[derive(Debug, Clone)]
pub struct KeyRing {
    issuer: String,
    current: Arc<JwtKey>,
    /// The current key's verifying half, built once.
    decoding: Arc<(DecodingKey, Algorithm)>,
}

impl KeyRing {
    /// A ring for `issuer` (the exact `iss`) signing with `current`.
    ///
    /// # Errors
    /// [`MintError::Key`] if the public JWK cannot be read back (a bug).
    pub fn new(issuer: String, current: JwtKey) -> Result<Self, MintError> {
        // jsonwebtoken panics on decode without a provider; whoever verifies through this ring
        // gets ours, whether or not the binary's main installed it.
        super::install_jose_provider();
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(current.public_jwk())
            .map_err(|e| MintError::Key(format!("public JWK: {e}")))?;
        let decoding =
            DecodingKey::from_jwk(&jwk).map_err(|e| MintError::Key(format!("public JWK: {e}")))?;
        let alg = match current.alg() {
            "EdDSA" => Algorithm::EdDSA,
            _ => Algorithm::ES256,
        };
        Ok(Self {
            issuer,
            current: Arc::new(current),
            decoding: Arc::new((decoding, alg)),
        })
    }

    /// Signs access-token `claims` with the current key.
    ///
    /// # Errors
    /// [`MintError::Sign`].
    pub fn sign_access_token(&self, claims: &AccessClaims) -> Result<String, MintError> {
        self.current.sign_jws(ACCESS_TOKEN_TYP, claims)
    }

    /// Verifies one of our access tokens: size, `typ`, `kid`, signature, `alg`, exact `iss`,
    /// every claim present, and `nbf <= now < exp` on the broker's clock (no leeway).
    /// Audience is not checked here: introspection answers for any audience.
    ///
    /// # Errors
    /// [`MintError::Sign`] with the reason; callers answer "inactive" without it.
    pub fn verify_access_token(
        &self,
        token: &str,
        now: std::time::SystemTime,
    ) -> Result<AccessClaims, MintError> {
        let bad = |why: String| MintError::Sign(why);
        if token.len() > MAX_TOKEN_BYTES {
            return Err(bad("token too long".into()));
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| bad(e.to_string()))?;
        if header.typ.as_deref() != Some(ACCESS_TOKEN_TYP) {
            return Err(bad("typ is not at+jwt".into()));
        }
        if header.kid.as_deref() != Some(self.current.kid()) {
            return Err(bad("unknown kid".into()));
        }
        let (key, alg) = self.decoding.as_ref();
        let mut v = Validation::new(*alg);
        v.set_issuer(&[&self.issuer]);
        v.validate_aud = false;
        // Time is checked below against the injected clock, not jsonwebtoken's.
        v.validate_exp = false;
        v.validate_nbf = false;
        v.set_required_spec_claims(&["exp", "nbf", "iss", "sub", "aud"]);
        let claims = jsonwebtoken::decode::<AccessClaims>(token, key, &v)
            .map(|d| d.claims)
            .map_err(|e| bad(e.to_string()))?;
        let now = now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if now < claims.nbf || now >= claims.exp {
            return Err(bad("outside its validity period".into()));
        }
        Ok(claims)
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
