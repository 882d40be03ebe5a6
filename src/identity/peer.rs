//! [`PeerIdentity`]: the workload identity read from a client certificate whose chain the TLS
//! layer has already verified, under the X509-SVID leaf rules (X509-SVID.md, STANDARDS.md B).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{IdentityError, TrustDomains, WorkloadId};

/// The identity of an authenticated peer: its SPIFFE ID and the certificate that proved it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The SPIFFE ID from the certificate's only URI SAN.
    pub id: WorkloadId,
    /// The certificate's notAfter: the identity is not honoured past it, even on a live connection.
    pub not_after: SystemTime,
    /// `x5t#S256` of the certificate: unpadded base64url SHA-256 of its DER (RFC 8705).
    pub cert_sha256: String,
}

impl PeerIdentity {
    /// Reads the identity from a client leaf certificate, in DER. The caller has verified the
    /// chain (signature, validity, issuer); this checks what makes it an X509-SVID naming an
    /// allowed workload.
    ///
    /// # Errors
    /// [`IdentityError`] when the DER is not one certificate, the certificate is a CA, its key
    /// usage is not a leaf's, it has no or several URI SANs, a duplicated SAN extension, a URI
    /// SAN that is not a workload SPIFFE ID, or a trust domain outside `allowed`.
    pub fn from_leaf(der: &[u8], allowed: &TrustDomains) -> Result<Self, IdentityError> {
        let (rest, cert) = X509Certificate::from_der(der)
            .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        if !rest.is_empty() {
            return Err(IdentityError::BadCertificate(
                "trailing bytes after the certificate".into(),
            ));
        }
        let bad = |e: x509_parser::error::X509Error| IdentityError::BadCertificate(e.to_string());

        if cert
            .basic_constraints()
            .map_err(bad)?
            .is_some_and(|bc| bc.value.ca)
        {
            return Err(IdentityError::CaCertificate);
        }
        match cert.key_usage().map_err(bad)? {
            None => return Err(IdentityError::BadKeyUsage("no key usage extension")),
            Some(ku) if ku.value.key_cert_sign() => {
                return Err(IdentityError::BadKeyUsage("keyCertSign set on a leaf"));
            }
            Some(ku) if ku.value.crl_sign() => {
                return Err(IdentityError::BadKeyUsage("cRLSign set on a leaf"));
            }
            Some(ku) if !ku.value.digital_signature() => {
                return Err(IdentityError::BadKeyUsage("digitalSignature missing"));
            }
            Some(_) => {}
        }

        // `subject_alternative_name` fails on a duplicated SAN extension, which we reject too.
        let san = cert.subject_alternative_name().map_err(bad)?;
        let uris: Vec<&str> = san
            .iter()
            .flat_map(|s| s.value.general_names.iter())
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect();
        let uri = match uris.as_slice() {
            [] => return Err(IdentityError::NoUriSan),
            [one] => *one,
            many => return Err(IdentityError::MultipleUriSans(many.len())),
        };
        let id = WorkloadId::parse(uri)?;
        if !allowed.allows(&id) {
            return Err(IdentityError::TrustDomainNotAllowed(
                id.trust_domain().to_owned(),
            ));
        }

        let not_after_secs = u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0);
        Ok(Self {
            id,
            not_after: UNIX_EPOCH + Duration::from_secs(not_after_secs),
            cert_sha256: cert_thumbprint_sha256(der),
        })
    }

    /// Whether the certificate has expired at `now`.
    pub fn expired_at(&self, now: SystemTime) -> bool {
        now > self.not_after
    }
}

/// The RFC 8705 `x5t#S256` thumbprint of a certificate: unpadded base64url of SHA-256 over its DER.
pub fn cert_thumbprint_sha256(der: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, der))
}

#[cfg(test)]
mod tests {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose, SanType,
    };

    use super::*;

    fn allowed() -> TrustDomains {
        TrustDomains::parse(["taskcred.dev"]).unwrap()
    }

    fn leaf_params(uris: &[&str]) -> CertificateParams {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, "test");
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        p
    }

    fn der(p: CertificateParams) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn accepts_an_svid_leaf() {
        let d = der(leaf_params(&["spiffe://taskcred.dev/agent/demo"]));
        let peer = PeerIdentity::from_leaf(&d, &allowed()).unwrap();
        assert_eq!(peer.id.as_str(), "spiffe://taskcred.dev/agent/demo");
        assert_eq!(peer.cert_sha256, cert_thumbprint_sha256(&d));
        assert_eq!(peer.cert_sha256.len(), 43, "unpadded base64url of 32 bytes");
    }

    #[test]
    fn no_uri_san() {
        let mut p = leaf_params(&[]);
        p.subject_alt_names = vec![SanType::DnsName("agent.example".try_into().unwrap())];
        assert_eq!(
            PeerIdentity::from_leaf(&der(p), &allowed()),
            Err(IdentityError::NoUriSan)
        );
    }

    #[test]
    fn two_uri_sans() {
        let p = leaf_params(&["spiffe://taskcred.dev/a", "spiffe://taskcred.dev/b"]);
        assert_eq!(
            PeerIdentity::from_leaf(&der(p), &allowed()),
            Err(IdentityError::MultipleUriSans(2))
        );
    }

    #[test]
    fn invalid_spiffe_id() {
        let p = leaf_params(&["spiffe://taskcred.dev/a//b"]);
        assert!(matches!(
            PeerIdentity::from_leaf(&der(p), &allowed()),
            Err(IdentityError::InvalidSpiffeId(_))
        ));
    }

    #[test]
    fn foreign_trust_domain() {
        let p = leaf_params(&["spiffe://evil.dev/agent/demo"]);
        assert_eq!(
            PeerIdentity::from_leaf(&der(p), &allowed()),
            Err(IdentityError::TrustDomainNotAllowed("evil.dev".into()))
        );
    }

    #[test]
    fn ca_certificate_as_leaf() {
        let mut p = leaf_params(&["spiffe://taskcred.dev/agent/demo"]);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        assert_eq!(
            PeerIdentity::from_leaf(&der(p), &allowed()),
            Err(IdentityError::CaCertificate)
        );
    }

    #[test]
    fn leaf_with_key_cert_sign() {
        let mut p = leaf_params(&["spiffe://taskcred.dev/agent/demo"]);
        p.key_usages.push(KeyUsagePurpose::KeyCertSign);
        assert!(matches!(
            PeerIdentity::from_leaf(&der(p), &allowed()),
            Err(IdentityError::BadKeyUsage(_))
        ));
    }

    #[test]
    fn leaf_without_key_usage() {
        let mut p = leaf_params(&["spiffe://taskcred.dev/agent/demo"]);
        p.key_usages.clear();
        assert!(matches!(
            PeerIdentity::from_leaf(&der(p), &allowed()),
            Err(IdentityError::BadKeyUsage(_))
        ));
    }

    #[test]
    fn garbage_and_trailing_bytes() {
        assert!(PeerIdentity::from_leaf(b"not a cert", &allowed()).is_err());
        let mut d = der(leaf_params(&["spiffe://taskcred.dev/agent/demo"]));
        d.push(0);
        assert!(PeerIdentity::from_leaf(&d, &allowed()).is_err());
    }
}
