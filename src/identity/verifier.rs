//! [`SpiffeClientVerifier`]: the rustls client-certificate verifier of the gRPC port.
//!
//! Cryptography first: webpki verifies the chain against the trust bundle (signature, validity
//! period, issuer, CA-as-leaf, clientAuth EKU). Only a chain that passes is read as an identity
//! ([`PeerIdentity::from_leaf`]). A client without a certificate completes the handshake
//! (CI jobs call public RPCs that way); it is unauthenticated and the RPC layer refuses every
//! method that is not explicitly public.
//!
//! A certificate issued by the broker's own issuing CA (an X509-SVID of a task) is a credential
//! for the task's audiences, never an identity at the broker: it is refused even where that CA
//! chains to the client trust bundle, so that a revoked or expired task credential cannot be
//! used to ask for more.

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

use super::{PeerIdentity, TrustDomains};

/// Verifies client certificates as X509-SVIDs from the configured trust bundle and trust domains.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    allowed: TrustDomains,
    /// Subjects (DER) of the broker's issuing CA: a leaf they issued is refused.
    refused_issuers: Vec<Vec<u8>>,
}

/// A task credential presented as a client certificate.
#[derive(Debug, thiserror::Error)]
#[error("a certificate issued by the broker's issuing CA is a task credential, not an identity")]
struct TaskCredentialAsIdentity;

impl SpiffeClientVerifier {
    /// Builds a verifier trusting `roots` for chains and `allowed` for SPIFFE trust domains.
    ///
    /// # Errors
    /// When webpki refuses the root store (for example, it is empty).
    pub fn new(
        roots: Arc<RootCertStore>,
        allowed: TrustDomains,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, rustls::server::VerifierBuilderError> {
        let chain = WebPkiClientVerifier::builder_with_provider(roots, provider)
            .allow_unauthenticated()
            .build()?;
        Ok(Self {
            chain,
            allowed,
            refused_issuers: Vec::new(),
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
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verified = self
            .chain
            .verify_client_cert(end_entity, intermediates, now)?;
        PeerIdentity::from_leaf(end_entity, &self.allowed).map_err(|e| {
            Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
        })?;
        if !self.refused_issuers.is_empty() {
            use x509_parser::prelude::{FromDer as _, X509Certificate};
            // The chain verified, so the leaf parses; refuse if in doubt anyway.
            let refused = X509Certificate::from_der(end_entity.as_ref()).map_or(true, |(_, c)| {
                self.refused_issuers
                    .iter()
                    .any(|s| s.as_slice() == c.issuer().as_raw())
            });
            if refused {
                return Err(Error::InvalidCertificate(CertificateError::Other(
                    OtherError(Arc::new(TaskCredentialAsIdentity)),
                )));
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
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}
