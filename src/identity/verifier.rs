//! [`SpiffeClientVerifier`]: the rustls client-certificate verifier of the gRPC port.
//!
//! Each accepted trust domain has a bundle of its own, and a client certificate is verified
//! against the bundle of the trust domain its SPIFFE ID names, never against another's
//! (X509-SVID.md section 5): a partner domain's CA cannot speak for ours. The steps:
//! 1. the X509-SVID leaf rules and its SPIFFE ID ([`PeerIdentity::from_leaf`]; nothing is
//!    trusted yet), which choose the bundle: a trust domain without one is refused;
//! 2. webpki verifies the chain against that bundle alone (signature, validity period, issuer,
//!    CA-as-leaf, clientAuth EKU);
//! 3. a leaf issued by the broker's own issuing CA is refused (below).
//!
//! A client without a certificate completes the handshake (CI jobs call public RPCs that way);
//! it is unauthenticated and the RPC layer refuses every method that is not explicitly public.
//!
//! A certificate issued by the broker's own issuing CA (an X509-SVID of a task) is a credential
//! for the task's audiences, never an identity at the broker: it is refused even where that CA
//! chains to a trust bundle, so that a revoked or expired task credential cannot be used to ask
//! for more.

use std::collections::BTreeMap;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, RootCertStore,
    SignatureScheme,
};

use super::{IdentityError, PeerIdentity, TrustDomains};

/// Verifies client certificates as X509-SVIDs, each against the bundle of its own trust domain.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    /// One chain verifier per trust domain, over that domain's bundle only.
    domains: BTreeMap<String, Arc<dyn ClientCertVerifier>>,
    allowed: TrustDomains,
    /// The subjects of every bundle's CAs, offered to clients as hints.
    hints: Vec<DistinguishedName>,
    /// Subjects (DER) of the broker's issuing CA: a leaf they issued is refused.
    refused_issuers: Vec<Vec<u8>>,
    /// Any domain's verifier, for the handshake signatures (which do not depend on the roots).
    signatures: Arc<dyn ClientCertVerifier>,
}

/// A task credential presented as a client certificate.
#[derive(Debug, thiserror::Error)]
#[error("a certificate issued by the broker's issuing CA is a task credential, not an identity")]
struct TaskCredentialAsIdentity;

/// Why a verifier could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifierSetupError {
    /// No trust domain was given.
    #[error("no trust domain is configured")]
    NoTrustDomain,
    /// webpki refused a domain's bundle (for example, it holds no usable CA).
    #[error("trust domain {domain}: {source}")]
    Bundle {
        /// The trust domain.
        domain: String,
        /// What webpki said.
        source: rustls::server::VerifierBuilderError,
    },
}

fn refused(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

impl SpiffeClientVerifier {
    /// Builds a verifier over `bundles`: each trust domain's name with the CA certificates its
    /// SVIDs must chain to. Only these domains are accepted.
    ///
    /// # Errors
    /// [`VerifierSetupError`] when no domain is given or webpki refuses a bundle.
    pub fn new(
        bundles: Vec<(String, RootCertStore)>,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, VerifierSetupError> {
        let mut domains = BTreeMap::new();
        let mut hints = Vec::new();
        for (domain, roots) in bundles {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .allow_unauthenticated()
                    .build()
                    .map_err(|source| VerifierSetupError::Bundle {
                        domain: domain.clone(),
                        source,
                    })?;
            hints.extend(verifier.root_hint_subjects().iter().cloned());
            domains.insert(domain, verifier);
        }
        let signatures = domains
            .values()
            .next()
            .cloned()
            .ok_or(VerifierSetupError::NoTrustDomain)?;
        let allowed = TrustDomains::parse(domains.keys()).map_err(|_| {
            // The names come from the checked configuration; an empty list is caught above.
            VerifierSetupError::NoTrustDomain
        })?;
        Ok(Self {
            domains,
            allowed,
            hints,
            refused_issuers: Vec::new(),
            signatures,
        })
    }

    /// Refuses leaves issued by the CA whose subject (DER) is `subject`: the broker's issuing CA.
    #[must_use]
    pub fn refusing_issuer(mut self, subject: Vec<u8>) -> Self {
        self.refused_issuers.push(subject);
        self
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        // 1. The leaf rules, and which bundle: its own trust domain's (nothing trusted yet).
        let claimed = PeerIdentity::from_leaf(end_entity, &self.allowed).map_err(|e| match e {
            // An identity of no trust domain served here: the `access_denied` alert, so that
            // the client can tell it from a certificate that is no X509-SVID.
            IdentityError::TrustDomainNotAllowed(domain) => {
                tracing::info!(%domain, "client certificate refused: its trust domain is not one this broker serves");
                Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
            }
            other => refused(other),
        })?;
        let Some(chain) = self.domains.get(claimed.id.trust_domain()) else {
            return Err(Error::InvalidCertificate(CertificateError::UnknownIssuer));
        };
        // 2. The chain, to that bundle and no other.
        let verified = chain.verify_client_cert(end_entity, intermediates, now)?;
        // 3. Task credentials are not identities.
        if !self.refused_issuers.is_empty() {
            use x509_parser::prelude::{FromDer as _, X509Certificate};
            // The chain verified, so the leaf parses; refuse if in doubt anyway.
            let refused_issuer =
                X509Certificate::from_der(end_entity.as_ref()).map_or(true, |(_, c)| {
                    self.refused_issuers
                        .iter()
                        .any(|s| s.as_slice() == c.issuer().as_raw())
                });
            if refused_issuer {
                return Err(refused(TaskCredentialAsIdentity));
            }
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.signatures.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.signatures.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.supported_verify_schemes()
    }
}
