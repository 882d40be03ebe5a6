//! Minting credentials: the broker's JWT signing keys (parsed once, `kid` = RFC 7638
//! thumbprint), the JWK Set verifiers fetch, the `jsonwebtoken` crypto provider over ring, and
//! X509-SVIDs from CSRs signed by the issuing CA.

mod jose_ring;
mod jwk;
mod keyring;
mod keys;
mod token;
mod x509;

pub use jose_ring::{RING_PROVIDER, install as install_jose_provider};
pub use jwk::{PublicKey, jwks, parse_signing_jwk};
pub(crate) use keyring::JwkVerifier;
pub use keyring::{KeyRing, MAX_TOKEN_BYTES, PublishedKey};
pub use keys::{JwtAlgorithm, JwtKey};
pub use token::{ACCESS_TOKEN_TYP, AccessClaims, Actor, Confirmation, hex, random_id, sha256_hex};
pub use x509::{
    BACKDATE, CsrError, IssuedCertInfo, IssuingCa, MAX_CSR_BYTES, SvidRequest, TASK_ID_OID,
    VerifiedCsr, random_serial, serial_hex, verify_csr,
};

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
