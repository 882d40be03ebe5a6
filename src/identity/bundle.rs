//! Trust bundles: the CA certificates one trust domain's X509-SVIDs chain to, read from a PEM
//! file or a SPIFFE bundle (SPIFFE_Trust_Domain_and_Bundle.md section 4: a JWK Set whose
//! `x509-svid` keys carry one certificate each in `x5c`). A bundle belongs to exactly one trust
//! domain: a certificate may appear in the bundles of two domains only by mistake, and that
//! mistake would let one domain's CA speak for the other (X509-SVID.md section 5).

use std::io::Read as _;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;

/// Largest bundle file read, in bytes.
pub const MAX_BUNDLE_BYTES: u64 = 1 << 20;

/// Why a bundle file is unusable. The message names the problem, never a key or certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// The file cannot be read.
    #[error("cannot read: {0}")]
    Read(String),
    /// Over [`MAX_BUNDLE_BYTES`].
    #[error("larger than {MAX_BUNDLE_BYTES} bytes")]
    TooLarge,
    /// Not PEM certificates.
    #[error("bad PEM: {0}")]
    Pem(String),
    /// Not a SPIFFE bundle (a JSON JWK Set).
    #[error("not a SPIFFE bundle: {0}")]
    Json(String),
    /// No CA certificate in it.
    #[error("holds no CA certificate")]
    Empty,
}

/// The CA certificates of one trust domain's bundle, in the order the file lists them.
///
/// # Errors
/// [`BundleError`] when the file cannot be read, is too large, or holds no certificate.
pub fn load(path: &Path) -> Result<Vec<CertificateDer<'static>>, BundleError> {
    let file = std::fs::File::open(path).map_err(|e| BundleError::Read(e.to_string()))?;
    let mut bytes = Vec::new();
    file.take(MAX_BUNDLE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| BundleError::Read(e.to_string()))?;
    if bytes.len() as u64 > MAX_BUNDLE_BYTES {
        return Err(BundleError::TooLarge);
    }
    parse(&bytes)
}

/// Parses a bundle: a SPIFFE bundle when the text is a JSON object, else PEM certificates.
///
/// # Errors
/// As [`load`].
pub fn parse(bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, BundleError> {
    let certs = if bytes.trim_ascii_start().first() == Some(&b'{') {
        spiffe_bundle(bytes)?
    } else {
        CertificateDer::pem_slice_iter(bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BundleError::Pem(e.to_string()))?
    };
    if certs.is_empty() {
        return Err(BundleError::Empty);
    }
    Ok(certs)
}

/// The `x509-svid` authorities of a SPIFFE bundle. JWT authorities are not used here.
fn spiffe_bundle(bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, BundleError> {
    let bad = |why: &str| BundleError::Json(why.to_owned());
    let doc: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|_| bad("not valid JSON"))?;
    let keys = doc
        .get("keys")
        .and_then(serde_json::Value::as_array)
        .ok_or_else(|| bad("no \"keys\" array"))?;
    let mut certs = Vec::new();
    for key in keys {
        if key.get("use").and_then(serde_json::Value::as_str) != Some("x509-svid") {
            continue;
        }
        // Section 4.2.2: an X.509 authority carries exactly one certificate.
        let x5c = match key.get("x5c").and_then(serde_json::Value::as_array) {
            Some(list) if list.len() == 1 => &list[0],
            _ => {
                return Err(bad(
                    "an x509-svid key must have exactly one x5c certificate",
                ));
            }
        };
        let der = x5c
            .as_str()
            .and_then(|s| STANDARD.decode(s).ok())
            .ok_or_else(|| bad("x5c is not base64 DER"))?;
        certs.push(CertificateDer::from(der));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ca_der() -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn reads_pem_and_spiffe_bundles_alike() {
        let der = ca_der();
        let pem_text = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            STANDARD.encode(&der)
        );
        assert_eq!(parse(pem_text.as_bytes()).unwrap()[0].as_ref(), der);
        let json = serde_json::json!({
            "spiffe_sequence": 1,
            "keys": [
                {"use": "jwt-svid", "kty": "EC", "kid": "k", "crv": "P-256", "x": "a", "y": "b"},
                {"use": "x509-svid", "kty": "EC", "crv": "P-256", "x": "a", "y": "b",
                 "x5c": [STANDARD.encode(&der)]},
            ],
        });
        let certs = parse(json.to_string().as_bytes()).unwrap();
        assert_eq!(certs.len(), 1);
        assert_eq!(certs[0].as_ref(), der);
    }

    #[test]
    fn refuses_bundles_without_a_usable_authority() {
        assert_eq!(parse(b""), Err(BundleError::Empty));
        assert_eq!(parse(b"{\"keys\": []}"), Err(BundleError::Empty));
        assert!(matches!(parse(b"{\"keys\": 1}"), Err(BundleError::Json(_))));
        assert!(matches!(parse(b"{nope"), Err(BundleError::Json(_))));
        let two = serde_json::json!({"keys": [{"use": "x509-svid", "x5c": ["AA==", "AA=="]}]});
        assert!(matches!(
            parse(two.to_string().as_bytes()),
            Err(BundleError::Json(_))
        ));
        let not_b64 = serde_json::json!({"keys": [{"use": "x509-svid", "x5c": ["@@"]}]});
        assert!(matches!(
            parse(not_b64.to_string().as_bytes()),
            Err(BundleError::Json(_))
        ));
    }
}
