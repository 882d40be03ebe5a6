//! X509-SVIDs from PKCS#10 CSRs, signed by the broker's issuing CA (STANDARDS.md B and I).
//!
//! From the CSR only the public key is taken, after its signature is verified: every subject,
//! SAN, CA flag and extension it asks for is ignored, and the broker decides the profile: empty
//! subject; one critical SAN with the executor's SPIFFE ID; `CA:FALSE` critical; key usage
//! `digitalSignature` critical; EKU serverAuth + clientAuth; AKI and SKI; a positive 128-bit
//! random serial; notBefore backdated at most 60 s; notAfter = the lease's expiry; and a
//! non-critical extension carrying the task id ([`TASK_ID_OID`]).

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, CustomExtension, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use x509_parser::prelude::FromDer as _;
use x509_parser::public_key::PublicKey as ParsedKey;
use zeroize::Zeroizing;

use super::MintError;
use crate::identity::WorkloadId;
use crate::task::TaskId;

/// The OID of the extension binding a certificate to its task: `2.25.2308847322465903446.1`,
/// under the registration-free UUID arc of ITU-T X.667 (a 63-bit random arc, chosen once for
/// taskcred). Non-critical. Its value is a DER UTF8String holding the task id; for a task
/// delegated from another, a SEQUENCE of three UTF8Strings: the task id, the root task's id
/// and the parent task's id.
pub const TASK_ID_OID: &[u64] = &[2, 25, 2_308_847_322_465_903_446, 1];

/// Largest CSR accepted, in bytes (DER or PEM).
pub const MAX_CSR_BYTES: usize = 8192;
/// Smallest RSA key accepted in a CSR.
pub const MIN_RSA_BITS: usize = 2048;
/// How far notBefore is backdated, for verifiers whose clocks run behind.
pub const BACKDATE: Duration = Duration::from_secs(60);

/// Why a CSR is refused. Each answers `INVALID_ARGUMENT`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CsrError {
    /// Larger than [`MAX_CSR_BYTES`].
    #[error("CSR larger than {MAX_CSR_BYTES} bytes")]
    TooLarge,
    /// Not a PKCS#10 request in DER or PEM (the parser's detail is not told: it helps no one).
    #[error("not a PKCS#10 certificate request: {0}")]
    Malformed(&'static str),
    /// Its signature does not verify with its own key.
    #[error("the CSR's signature does not verify")]
    BadSignature,
    /// Signed with SHA-1 or another algorithm not accepted.
    #[error("the CSR is signed with an algorithm not accepted ({0})")]
    WeakSignature(String),
    /// A key type other than P-256, P-384, Ed25519 or RSA of at least 2048 bits.
    #[error("unsupported key: {0}")]
    UnsupportedKey(String),
}

/// A CSR whose signature verified; what the broker keeps of it: the public key.
#[derive(Debug, Clone)]
pub struct VerifiedCsr {
    spki_der: Vec<u8>,
}

/// Parses a CSR (DER, or PEM `CERTIFICATE REQUEST`), verifies its signature and its key type.
///
/// # Errors
/// [`CsrError`].
pub fn verify_csr(input: &[u8]) -> Result<VerifiedCsr, CsrError> {
    if input.len() > MAX_CSR_BYTES {
        return Err(CsrError::TooLarge);
    }
    let der = if input.starts_with(b"-----BEGIN") {
        rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(input)
            .map_err(|_| CsrError::Malformed("bad PEM (want one CERTIFICATE REQUEST)"))?
            .as_ref()
            .to_vec()
    } else {
        input.to_vec()
    };
    let (rest, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(&der)
        .map_err(|_| CsrError::Malformed("bad DER"))?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed("trailing bytes"));
    }
    // The key first: a key of a refused type is said so, not reported as a bad signature (the
    // signature of a key the parser cannot use never verifies).
    let spki = &csr.certification_request_info.subject_pki;
    match spki.parsed() {
        Ok(ParsedKey::RSA(rsa)) if rsa.key_size() >= MIN_RSA_BITS => {}
        Ok(ParsedKey::RSA(rsa)) => {
            return Err(CsrError::UnsupportedKey(format!(
                "RSA key of {} bits; at least {MIN_RSA_BITS} required",
                rsa.key_size()
            )));
        }
        Ok(ParsedKey::EC(_)) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string())
                .unwrap_or_default();
            // P-256 and P-384.
            if curve != "1.2.840.10045.3.1.7" && curve != "1.3.132.0.34" {
                return Err(CsrError::UnsupportedKey(format!(
                    "EC curve {curve}; P-256 or P-384 required"
                )));
            }
        }
        Ok(ParsedKey::Unknown(_)) if spki.algorithm.algorithm.to_id_string() == "1.3.101.112" => {}
        _ => {
            return Err(CsrError::UnsupportedKey(format!(
                "key algorithm {}; P-256, P-384, Ed25519 or RSA (2048 bits or more) required",
                spki.algorithm.algorithm.to_id_string()
            )));
        }
    }
    let alg = csr.signature_algorithm.algorithm.to_id_string();
    // sha1WithRSAEncryption, and the other SHA-1 forms.
    if ["1.2.840.113549.1.1.5", "1.3.14.3.2.29", "1.2.840.10045.4.1"].contains(&alg.as_str()) {
        return Err(CsrError::WeakSignature(alg));
    }
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
    Ok(VerifiedCsr {
        spki_der: spki.raw.to_vec(),
    })
}

/// The CA that signs X509-SVIDs.
pub struct IssuingCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
}

impl std::fmt::Debug for IssuingCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuingCa").finish_non_exhaustive()
    }
}

/// What a certificate is issued for.
#[derive(Debug, Clone)]
pub struct SvidRequest<'a> {
    /// The executor: the only SAN.
    pub id: &'a WorkloadId,
    /// The task: the private extension.
    pub task: &'a TaskId,
    /// For a delegated task: the root of its tree and its parent (the extension names both).
    pub delegated: Option<(TaskId, TaskId)>,
    /// From [`random_serial`].
    pub serial: [u8; 16],
    /// When it is issued (notBefore is this, backdated by [`BACKDATE`]).
    pub now: SystemTime,
    /// notAfter: the lease's expiry.
    pub not_after: SystemTime,
}

impl IssuingCa {
    /// Loads the CA certificate and key (PEM; the key PKCS#8).
    ///
    /// # Errors
    /// [`MintError::Key`] naming the file.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, MintError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|e| MintError::Key(format!("{}: {e}", p.display())))
        };
        let cert_pem = String::from_utf8(read(cert)?)
            .map_err(|_| MintError::Key(format!("{}: not PEM", cert.display())))?;
        let key_pem = Zeroizing::new(
            String::from_utf8(read(key)?)
                .map_err(|_| MintError::Key(format!("{}: not PEM", key.display())))?,
        );
        let pair = KeyPair::from_pem(&key_pem)
            .map_err(|e| MintError::Key(format!("{}: {e}", key.display())))?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| MintError::Key(format!("{}: {e}", cert.display())))?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, pair)
            .map_err(|e| MintError::Key(format!("{}: {e}", cert.display())))?;
        Ok(Self {
            issuer,
            cert_pem,
            cert_der,
        })
    }

    /// The CA certificate (PEM), to send with every issued certificate.
    pub fn chain_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate (DER).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Signs a CRL (DER) listing `revoked` (serial, revocation time), valid from `now` until
    /// `next_update`, numbered `number` (which must grow with each CRL).
    ///
    /// # Errors
    /// [`MintError::Sign`].
    pub fn sign_crl(
        &self,
        revoked: &[([u8; 16], SystemTime)],
        number: u64,
        now: SystemTime,
        next_update: SystemTime,
    ) -> Result<Vec<u8>, MintError> {
        let fail = |e: rcgen::Error| MintError::Sign(e.to_string());
        let params = rcgen::CertificateRevocationListParams {
            this_update: now.into(),
            next_update: next_update.into(),
            crl_number: rcgen::SerialNumber::from_slice(&number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|(serial, at)| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(serial),
                    revocation_time: (*at).into(),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer).map_err(fail)?.der().to_vec())
    }

    /// Issues an X509-SVID for the key of `csr`; returns it in PEM.
    ///
    /// # Errors
    /// [`MintError::Sign`].
    pub fn issue(&self, csr: &VerifiedCsr, req: &SvidRequest<'_>) -> Result<String, MintError> {
        let fail = |e: rcgen::Error| MintError::Sign(e.to_string());
        let key = SubjectPublicKeyInfo::from_der(&csr.spki_der).map_err(fail)?;
        let mut p = CertificateParams::default();
        // Empty subject: rcgen then marks the SAN extension critical, as X509-SVID requires.
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(req.id.as_str().try_into().map_err(fail)?)];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        p.serial_number = Some(SerialNumber::from_slice(&req.serial));
        p.not_before = (req.now - BACKDATE).into();
        p.not_after = req.not_after.into();
        let task = utf8_string(&req.task.to_string());
        let value = match req.delegated {
            None => task,
            Some((root, parent)) => {
                let mut items = task;
                items.extend(utf8_string(&root.to_string()));
                items.extend(utf8_string(&parent.to_string()));
                let mut seq = vec![0x30, u8::try_from(items.len()).unwrap_or(0x7f)];
                seq.extend(items);
                seq
            }
        };
        p.custom_extensions = vec![CustomExtension::from_oid_content(TASK_ID_OID, value)];
        Ok(p.signed_by(&key, &self.issuer).map_err(fail)?.pem())
    }
}

/// What the broker reads back from a certificate it issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCertInfo {
    /// The serial, lowercase hex.
    pub serial: String,
    /// The task id of the private extension.
    pub task: String,
    /// For a delegated task: its root's and its parent's ids, from the same extension.
    pub delegated: Option<(String, String)>,
    /// The SPIFFE ID of the SAN.
    pub spiffe_id: String,
    /// notAfter, seconds since the epoch.
    pub not_after: u64,
}

impl IssuingCa {
    /// Reads a certificate (DER or PEM) if this CA signed it: its serial, task and identity.
    /// `None` for anything else (another issuer, a bad signature, garbage, too large).
    pub fn read_issued(&self, input: &[u8]) -> Option<IssuedCertInfo> {
        use x509_parser::prelude::X509Certificate;
        if input.len() > MAX_CSR_BYTES {
            return None;
        }
        let der = if input.starts_with(b"-----BEGIN") {
            CertificateDer::from_pem_slice(input)
                .ok()?
                .as_ref()
                .to_vec()
        } else {
            input.to_vec()
        };
        let (_, ca) = X509Certificate::from_der(&self.cert_der).ok()?;
        let (rest, cert) = X509Certificate::from_der(&der).ok()?;
        if !rest.is_empty() {
            return None;
        }
        cert.verify_signature(Some(ca.public_key())).ok()?;
        let oid = TASK_ID_OID
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(".");
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == oid)?;
        let (task, delegated) = match ext.value {
            [0x0c, ..] => match read_utf8(ext.value)? {
                (task, []) => (task, None),
                _ => return None,
            },
            [0x30, len, items @ ..] if usize::from(*len) == items.len() => {
                let (task, rest) = read_utf8(items)?;
                let (root, rest) = read_utf8(rest)?;
                let (parent, rest) = read_utf8(rest)?;
                if !rest.is_empty() {
                    return None;
                }
                (task, Some((root, parent)))
            }
            _ => return None,
        };
        let spiffe_id = cert
            .subject_alternative_name()
            .ok()
            .flatten()?
            .value
            .general_names
            .iter()
            .find_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
                _ => None,
            })?;
        Some(IssuedCertInfo {
            serial: super::hex(cert.raw_serial()),
            task,
            delegated,
            spiffe_id,
            not_after: u64::try_from(cert.validity().not_after.timestamp()).ok()?,
        })
    }
}

/// The short DER UTF8String that `der` starts with, and what follows it.
fn read_utf8(der: &[u8]) -> Option<(String, &[u8])> {
    match der {
        [0x0c, len, rest @ ..] if usize::from(*len) <= rest.len() && *len < 0x80 => {
            let (value, rest) = rest.split_at(usize::from(*len));
            Some((String::from_utf8(value.to_vec()).ok()?, rest))
        }
        _ => None,
    }
}

/// DER UTF8String of a short ASCII value (under 128 bytes).
fn utf8_string(s: &str) -> Vec<u8> {
    let mut out = vec![0x0c, u8::try_from(s.len()).unwrap_or(0x7f)];
    out.extend_from_slice(s.as_bytes());
    out
}

/// A serial of 128 random bits: positive (top bit cleared) and 16 octets long in DER (first
/// octet non-zero), so its hex form is what every parser prints.
///
/// # Errors
/// [`MintError::Sign`] if the system random source fails.
pub fn random_serial() -> Result<[u8; 16], MintError> {
    let mut serial = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut serial)
        .map_err(|_| MintError::Sign("the system random source failed".into()))?;
    serial[0] &= 0x7f;
    if serial[0] == 0 {
        serial[0] = 1;
    }
    Ok(serial)
}

/// A serial in lowercase hex, as the lease and the CRL record it.
pub fn serial_hex(serial: &[u8; 16]) -> String {
    super::hex(serial)
}
