//! Minting credentials: the broker's JWT signing keys (parsed once, `kid` = RFC 7638
//! thumbprint), the JWK Set verifiers fetch, and the `jsonwebtoken` crypto provider over ring.

mod jose_ring;
mod jwk;
mod keyring;
mod keys;
mod token;

pub use jose_ring::{RING_PROVIDER, install as install_jose_provider};
pub use jwk::{PublicKey, jwks};
pub use keyring::KeyRing;
pub use keys::JwtKey;
pub use token::{ACCESS_TOKEN_TYP, AccessClaims, Confirmation, random_id};

/// Why a key could not be loaded or a credential signed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MintError {
    /// A signing key is unusable.
    #[error("signing key: {0}")]
    Key(String),
    /// Signing failed.
    #[error("signing failed: {0}")]
    Sign(String),
}
