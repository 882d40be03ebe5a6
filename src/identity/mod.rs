//! Workload identity: who a caller is, proven by the client certificate of its mTLS connection.
//!
//! A caller is known by a [`WorkloadId`] (a parsed SPIFFE ID, never a bare string). The TLS layer
//! applies the X509-SVID rules with [`PeerIdentity::from_leaf`] (exactly one URI SAN holding a
//! valid SPIFFE ID in an accepted trust domain, leaf key usage) and verifies the chain against
//! the [`bundle`] of that trust domain alone, before anything is authorized.
//! [`SpiffeClientVerifier`] runs both during the handshake, so a certificate that fails either
//! never completes a connection.
//!
//! A CI job has no certificate: it is known by the [`CiJob`] its verified ID token proved (read
//! by `ci`, seen by policy, carried in the `ci` claim of what is minted for it).

pub mod bundle;
mod ci_job;
mod peer;
mod spiffe_id;
mod verifier;

pub use ci_job::CiJob;
pub use peer::{PeerIdentity, cert_thumbprint_sha256};
pub use spiffe_id::{TrustDomains, WorkloadId};
pub use verifier::{SpiffeClientVerifier, VerifierSetupError};

/// Why a SPIFFE ID or a client certificate is not accepted as a workload identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The text is not a SPIFFE ID under the rules of SPIFFE-ID.md section 2.
    #[error("invalid SPIFFE ID: {0}")]
    InvalidSpiffeId(String),
    /// The SPIFFE ID is longer than the 2048 bytes the spec asks verifiers to accept.
    #[error("SPIFFE ID longer than {max} bytes")]
    SpiffeIdTooLong {
        /// The limit.
        max: usize,
    },
    /// The trust domain is longer than 255 bytes.
    #[error("trust domain longer than {max} bytes")]
    TrustDomainTooLong {
        /// The limit.
        max: usize,
    },
    /// The SPIFFE ID has no path: it names a trust domain, not a workload.
    #[error("SPIFFE ID has no path: it names a trust domain, not a workload")]
    NoPath,
    /// The trust domain is not one this broker accepts.
    #[error("trust domain {0:?} is not allowed")]
    TrustDomainNotAllowed(String),
    /// The certificate could not be parsed as X.509.
    #[error("client certificate is not valid X.509: {0}")]
    BadCertificate(String),
    /// The certificate carries no URI SAN, so no SPIFFE ID.
    #[error("client certificate has no URI SAN")]
    NoUriSan,
    /// The certificate carries more than one URI SAN; an X509-SVID has exactly one.
    #[error("client certificate has {0} URI SANs, an X509-SVID has exactly one")]
    MultipleUriSans(usize),
    /// The certificate is a CA certificate, not a leaf.
    #[error("client certificate is a CA certificate, not a leaf")]
    CaCertificate,
    /// The leaf's key usage is missing `digitalSignature` or has `keyCertSign`/`cRLSign`.
    #[error("client certificate key usage is not that of an X509-SVID leaf: {0}")]
    BadKeyUsage(&'static str),
}
