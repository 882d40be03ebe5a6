//! [`JwtKey`]: the broker's JWT signing key, parsed once (ring key pairs), with its public JWK
//! and `kid`. One algorithm per key. The private key never leaves the ring key pair: `Debug` is
//! redacted, and the PEM read from disk is zeroized once parsed.

use std::fmt;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _,
};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject as _;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::MintError;
use super::jwk::PublicKey;

/// The signing algorithm of the JWT key (one algorithm per key): `issuer.jwt_algorithm`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum JwtAlgorithm {
    /// ECDSA P-256 with SHA-256, the default: widely supported and fast with ring.
    #[default]
    ES256,
    /// Ed25519.
    EdDSA,
}

enum Pair {
    Es256(EcdsaKeyPair),
    EdDsa(Ed25519KeyPair),
}

/// A JWT signing key: ES256 (P-256, raw R||S signatures) or EdDSA (Ed25519).
pub struct JwtKey {
    pair: Pair,
    rng: SystemRandom,
    public: PublicKey,
    kid: String,
    /// Kept to write the key out after a rotation; zeroized on drop.
    pkcs8: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtKey")
            .field("alg", &self.alg())
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl JwtKey {
    /// Loads a PKCS#8 PEM key file for `alg`.
    ///
    /// # Errors
    /// [`MintError::Key`] when the file is unreadable, not PKCS#8, or not a key of `alg`.
    pub fn load(path: &Path, alg: JwtAlgorithm) -> Result<Self, MintError> {
        let bad = |why: String| MintError::Key(format!("{}: {why}", path.display()));
        let pem = Zeroizing::new(std::fs::read(path).map_err(|e| bad(e.to_string()))?);
        let der =
            PrivateKeyDer::from_pem_slice(&pem).map_err(|e| bad(format!("no private key: {e}")))?;
        let PrivateKeyDer::Pkcs8(pkcs8) = der else {
            return Err(bad("not a PKCS#8 key (BEGIN PRIVATE KEY)".into()));
        };
        Self::from_pkcs8(pkcs8.secret_pkcs8_der(), alg).map_err(|e| bad(e.to_string()))
    }

    /// A key from PKCS#8 DER.
    ///
    /// # Errors
    /// [`MintError::Key`] when the DER is not a key of `alg`.
    pub fn from_pkcs8(der: &[u8], alg: JwtAlgorithm) -> Result<Self, MintError> {
        let rng = SystemRandom::new();
        let (pair, public) = match alg {
            JwtAlgorithm::ES256 => {
                let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng)
                    .map_err(|e| MintError::Key(format!("not a P-256 (ES256) key: {e}")))?;
                let public = PublicKey::P256(pair.public_key().as_ref().to_vec());
                (Pair::Es256(pair), public)
            }
            JwtAlgorithm::EdDSA => {
                // ring's checked parser refuses PKCS#8 v1, which `openssl genpkey` writes.
                let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
                    .map_err(|e| MintError::Key(format!("not an Ed25519 (EdDSA) key: {e}")))?;
                let public = PublicKey::Ed25519(pair.public_key().as_ref().to_vec());
                (Pair::EdDsa(pair), public)
            }
        };
        let kid = public.thumbprint();
        Ok(Self {
            pair,
            rng,
            public,
            kid,
            pkcs8: Zeroizing::new(der.to_vec()),
        })
    }

    /// A fresh key of `alg` (tests).
    ///
    /// # Errors
    /// [`MintError::Key`] if the system random source fails.
    pub fn generate(alg: JwtAlgorithm) -> Result<Self, MintError> {
        let der = Self::generate_pkcs8(alg)?;
        Self::from_pkcs8(&der, alg)
    }

    /// Writes the key to `path` (PKCS#8 PEM, mode 0600), replacing the file atomically: a
    /// temporary file in the same directory, synced, renamed over `path`, and the directory
    /// synced. A crash leaves the old key or the new one, never a torn file.
    ///
    /// # Errors
    /// [`MintError::Key`] if the file cannot be written.
    pub fn save(&self, path: &Path) -> Result<(), MintError> {
        write_pem_atomically(path, &self.pkcs8)
            .map_err(|e| MintError::Key(format!("writing {}: {e}", path.display())))
    }

    fn generate_pkcs8(alg: JwtAlgorithm) -> Result<Zeroizing<Vec<u8>>, MintError> {
        let rng = SystemRandom::new();
        let fail = |e: ring::error::Unspecified| MintError::Key(format!("generating a key: {e}"));
        let der = Zeroizing::new(match alg {
            JwtAlgorithm::ES256 => {
                EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                    .map_err(fail)?
                    .as_ref()
                    .to_vec()
            }
            JwtAlgorithm::EdDSA => Ed25519KeyPair::generate_pkcs8(&rng)
                .map_err(fail)?
                .as_ref()
                .to_vec(),
        });
        Ok(der)
    }

    /// The algorithm this key signs with.
    pub fn algorithm(&self) -> JwtAlgorithm {
        match self.pair {
            Pair::Es256(_) => JwtAlgorithm::ES256,
            Pair::EdDsa(_) => JwtAlgorithm::EdDSA,
        }
    }

    /// The JOSE `alg`.
    pub fn alg(&self) -> &'static str {
        match self.pair {
            Pair::Es256(_) => "ES256",
            Pair::EdDsa(_) => "EdDSA",
        }
    }

    /// The RFC 7638 thumbprint of the public key, used as `kid`.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key.
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// The public JWK (with `kid`, `alg`, `use`).
    pub fn public_jwk(&self) -> serde_json::Value {
        self.public.to_jwk(self.alg())
    }

    /// Signs `claims` as a compact JWS with header `{alg, typ, kid}`.
    ///
    /// # Errors
    /// [`MintError::Sign`] if the claims do not serialize or signing fails.
    pub fn sign_jws(&self, typ: &str, claims: &impl Serialize) -> Result<String, MintError> {
        #[derive(Serialize)]
        struct Header<'a> {
            alg: &'a str,
            typ: &'a str,
            kid: &'a str,
        }
        let header = serde_json::to_vec(&Header {
            alg: self.alg(),
            typ,
            kid: &self.kid,
        })
        .map_err(|e| MintError::Sign(e.to_string()))?;
        let claims = serde_json::to_vec(claims).map_err(|e| MintError::Sign(e.to_string()))?;
        let mut token = String::with_capacity(512);
        URL_SAFE_NO_PAD.encode_string(header, &mut token);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(claims, &mut token);
        let signature = self.sign(token.as_bytes())?;
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(signature, &mut token);
        Ok(token)
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, MintError> {
        match &self.pair {
            Pair::Es256(p) => p
                .sign(&self.rng, message)
                .map(|s| s.as_ref().to_vec())
                .map_err(|e| MintError::Sign(e.to_string())),
            Pair::EdDsa(p) => Ok(p.sign(message).as_ref().to_vec()),
        }
    }
}

/// Writes PKCS#8 `der` as PEM to `path`, replacing it atomically, readable by the owner only.
fn write_pem_atomically(path: &Path, der: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;

    let mut pem = Zeroizing::new(String::from("-----BEGIN PRIVATE KEY-----\n"));
    let body = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(der));
    for line in body.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");

    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().map_or_else(
        || std::ffi::OsString::from("key"),
        std::ffi::OsStr::to_os_string,
    );
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(&name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = dir.join(tmp_name);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(pem.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn es256_signatures_are_raw_r_s_and_verify() {
        let key = JwtKey::generate(JwtAlgorithm::ES256).unwrap();
        let token = key
            .sign_jws("at+jwt", &serde_json::json!({"sub": "x"}))
            .unwrap();
        let (signed, sig) = token.rsplit_once('.').unwrap();
        let sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
        assert_eq!(sig.len(), 64, "raw R||S, not DER");
        let PublicKey::P256(point) = key.public_key() else {
            panic!("not P-256")
        };
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, point)
            .verify(signed.as_bytes(), &sig)
            .unwrap();
        let header: serde_json::Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(token.split('.').next().unwrap())
                .unwrap(),
        )
        .unwrap();
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["typ"], "at+jwt");
        assert_eq!(header["kid"], key.kid());
    }

    #[test]
    fn eddsa_keys_sign_and_algorithms_do_not_mix() {
        let key = JwtKey::generate(JwtAlgorithm::EdDSA).unwrap();
        assert_eq!(key.alg(), "EdDSA");
        let token = key.sign_jws("at+jwt", &serde_json::json!({})).unwrap();
        let (signed, sig) = token.rsplit_once('.').unwrap();
        let PublicKey::Ed25519(x) = key.public_key() else {
            panic!("not Ed25519")
        };
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, x)
            .verify(signed.as_bytes(), &URL_SAFE_NO_PAD.decode(sig).unwrap())
            .unwrap();

        // One algorithm per key: a P-256 key is not accepted as EdDSA, nor the reverse.
        let rng = SystemRandom::new();
        let p256 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        assert!(JwtKey::from_pkcs8(p256.as_ref(), JwtAlgorithm::EdDSA).is_err());
        let ed = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        assert!(JwtKey::from_pkcs8(ed.as_ref(), JwtAlgorithm::ES256).is_err());
    }

    #[test]
    fn debug_does_not_print_the_key() {
        let key = JwtKey::generate(JwtAlgorithm::ES256).unwrap();
        let dbg = format!("{key:?}");
        assert!(dbg.contains("ES256") && dbg.contains(key.kid()));
        assert!(!dbg.contains("pair"));
    }

    #[test]
    fn a_generated_key_replaces_the_file_and_loads_back() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwt-key.pem");
        for alg in [
            JwtAlgorithm::ES256,
            JwtAlgorithm::EdDSA,
            JwtAlgorithm::ES256,
        ] {
            let key = JwtKey::generate(alg).unwrap();
            key.save(&path).unwrap();
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            assert_eq!(JwtKey::load(&path, alg).unwrap().kid(), key.kid());
            assert_eq!(key.algorithm(), alg);
        }
        // Nothing but the key is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // A directory that cannot be written fails cleanly.
        let key = JwtKey::generate(JwtAlgorithm::ES256).unwrap();
        assert!(key.save(&dir.path().join("no/such/dir/k.pem")).is_err());
    }
}
