//! A `jsonwebtoken` [`CryptoProvider`] over ring: jsonwebtoken 11 ships backends only for aws-lc-rs
//! and RustCrypto, and this crate builds with ring alone (`../shared/DEPENDENCIES.md`).
//!
//! Verification: ES256, ES384, EdDSA, RS256/384/512 and PS256/384/512 (CI ID tokens are RS256).
//! HMAC is refused outright: a broker never shares a secret with a verifier, and "HMAC keyed
//! with a public key" is a classic forgery. Signing: ES256, ES384 and EdDSA from PKCS#8; the
//! broker's own hot path signs with [`super::JwtKey`] instead, which parses its key once.

use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::errors::{ErrorKind, Result as JwtResult, new_error};
use jsonwebtoken::jwk::ThumbprintHash;
use jsonwebtoken::signature;
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind, EncodingKey};
use ring::rand::SystemRandom;
use ring::signature::{self as sig, RsaPublicKeyComponents};

/// The provider; install it with [`install`].
pub static RING_PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: signer,
    verifier_factory: verifier,
    key_utils: KeyUtils {
        rsa_pub_components_from_private_key: |_| unsupported(),
        rsa_pub_components_from_public_key: |_| unsupported(),
        ec_pub_components_from_private_key: |_, _| unsupported(),
        ed_pub_components_from_private_key: |_, _| unsupported(),
        compute_digest,
    },
};

/// Installs [`RING_PROVIDER`] as jsonwebtoken's process-wide provider. Idempotent: a provider
/// already installed (this one, by an earlier call) is left in place.
pub fn install() {
    let _ = RING_PROVIDER.install_default();
}

fn unsupported<T>() -> JwtResult<T> {
    Err(new_error(ErrorKind::Provider(
        "not supported by the ring provider".into(),
    )))
}

fn compute_digest(data: &[u8], hash: ThumbprintHash) -> JwtResult<Vec<u8>> {
    let alg = match hash {
        ThumbprintHash::SHA256 => &ring::digest::SHA256,
        ThumbprintHash::SHA384 => &ring::digest::SHA384,
        ThumbprintHash::SHA512 => &ring::digest::SHA512,
        #[allow(unreachable_patterns, reason = "ThumbprintHash is non_exhaustive")]
        _ => return unsupported(),
    };
    Ok(ring::digest::digest(alg, data).as_ref().to_vec())
}

/// A signer from a PKCS#8 key, parsed when made.
struct RingSigner {
    alg: Algorithm,
    ecdsa: Option<sig::EcdsaKeyPair>,
    ed25519: Option<sig::Ed25519KeyPair>,
}

impl signature::Signer<Vec<u8>> for RingSigner {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, signature::Error> {
        if let Some(k) = &self.ecdsa {
            return k
                .sign(&SystemRandom::new(), msg)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| signature::Error::new());
        }
        self.ed25519
            .as_ref()
            .map(|k| k.sign(msg).as_ref().to_vec())
            .ok_or_else(signature::Error::new)
    }
}

impl JwtSigner for RingSigner {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

fn signer(alg: &Algorithm, key: &EncodingKey) -> JwtResult<Box<dyn JwtSigner>> {
    let der = key.as_bytes();
    let ecdsa = |a: &'static sig::EcdsaSigningAlgorithm| {
        sig::EcdsaKeyPair::from_pkcs8(a, der, &SystemRandom::new())
            .map_err(|_| new_error(ErrorKind::InvalidEcdsaKey))
    };
    let s = match alg {
        Algorithm::ES256 => RingSigner {
            alg: *alg,
            ecdsa: Some(ecdsa(&sig::ECDSA_P256_SHA256_FIXED_SIGNING)?),
            ed25519: None,
        },
        Algorithm::ES384 => RingSigner {
            alg: *alg,
            ecdsa: Some(ecdsa(&sig::ECDSA_P384_SHA384_FIXED_SIGNING)?),
            ed25519: None,
        },
        Algorithm::EdDSA => RingSigner {
            alg: *alg,
            ecdsa: None,
            ed25519: Some(
                sig::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
                    .map_err(|_| new_error(ErrorKind::InvalidEddsaKey))?,
            ),
        },
        _ => return Err(new_error(ErrorKind::InvalidAlgorithm)),
    };
    Ok(Box::new(s))
}

/// A verifier for one algorithm and one public key.
struct RingVerifier {
    alg: Algorithm,
    ring_alg: &'static dyn sig::VerificationAlgorithm,
    key: VerifyKey,
}

enum VerifyKey {
    /// SEC1 point, raw Ed25519 key, or PKCS#1 RSAPublicKey DER.
    Bytes(Vec<u8>),
    /// RSA modulus and exponent.
    Rsa { n: Vec<u8>, e: Vec<u8> },
}

impl signature::Verifier<Vec<u8>> for RingVerifier {
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> Result<(), signature::Error> {
        let ok = match &self.key {
            VerifyKey::Bytes(b) => {
                sig::UnparsedPublicKey::new(self.ring_alg, b).verify(msg, signature)
            }
            VerifyKey::Rsa { n, e } => {
                let params = rsa_params(self.alg).ok_or_else(signature::Error::new)?;
                RsaPublicKeyComponents { n, e }.verify(params, msg, signature)
            }
        };
        ok.map_err(|_| signature::Error::new())
    }
}

impl JwtVerifier for RingVerifier {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

fn rsa_params(alg: Algorithm) -> Option<&'static sig::RsaParameters> {
    Some(match alg {
        Algorithm::RS256 => &sig::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::RS384 => &sig::RSA_PKCS1_2048_8192_SHA384,
        Algorithm::RS512 => &sig::RSA_PKCS1_2048_8192_SHA512,
        Algorithm::PS256 => &sig::RSA_PSS_2048_8192_SHA256,
        Algorithm::PS384 => &sig::RSA_PSS_2048_8192_SHA384,
        Algorithm::PS512 => &sig::RSA_PSS_2048_8192_SHA512,
        _ => return None,
    })
}

fn verifier(alg: &Algorithm, key: &DecodingKey) -> JwtResult<Box<dyn JwtVerifier>> {
    let ring_alg: &'static dyn sig::VerificationAlgorithm = match alg {
        Algorithm::ES256 => &sig::ECDSA_P256_SHA256_FIXED,
        Algorithm::ES384 => &sig::ECDSA_P384_SHA384_FIXED,
        Algorithm::EdDSA => &sig::ED25519,
        a => match rsa_params(*a) {
            Some(p) => p,
            // HS256/384/512 and anything else: never.
            None => return Err(new_error(ErrorKind::InvalidAlgorithm)),
        },
    };
    let key = match key.kind() {
        DecodingKeyKind::SecretOrDer(b) => VerifyKey::Bytes(b.clone()),
        DecodingKeyKind::RsaModulusExponent { n, e } => {
            if rsa_params(*alg).is_none() {
                return Err(new_error(ErrorKind::InvalidAlgorithm));
            }
            VerifyKey::Rsa {
                n: n.clone(),
                e: e.clone(),
            }
        }
    };
    Ok(Box::new(RingVerifier {
        alg: *alg,
        ring_alg,
        key,
    }))
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{DecodingKey, Validation, decode};
    use serde_json::{Value, json};

    use super::*;
    use crate::mint::{JwtAlgorithm, JwtKey};

    fn claims() -> Value {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        json!({"sub": "spiffe://taskcred.dev/agent/demo", "aud": "db", "iss": "https://i", "exp": now + 60})
    }

    fn validation(alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.set_audience(&["db"]);
        v.set_issuer(&["https://i"]);
        v
    }

    #[test]
    fn jsonwebtoken_verifies_our_tokens_from_the_public_jwk() {
        install();
        for (alg, jwt_alg) in [
            (JwtAlgorithm::ES256, Algorithm::ES256),
            (JwtAlgorithm::EdDSA, Algorithm::EdDSA),
        ] {
            let key = JwtKey::generate(alg).unwrap();
            let token = key.sign_jws("at+jwt", &claims()).unwrap();
            let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(key.public_jwk()).unwrap();
            let dk = DecodingKey::from_jwk(&jwk).unwrap();
            let data = decode::<Value>(&token, &dk, &validation(jwt_alg)).unwrap();
            assert_eq!(data.claims["sub"], "spiffe://taskcred.dev/agent/demo");
            assert_eq!(data.header.kid.as_deref(), Some(key.kid()));

            // A flipped byte of the payload fails.
            let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
            parts[1] = parts[1].replacen('e', "f", 1);
            let tampered = parts.join(".");
            assert!(decode::<Value>(&tampered, &dk, &validation(jwt_alg)).is_err());
        }
    }

    #[test]
    fn hmac_and_none_are_never_accepted() {
        install();
        let key = JwtKey::generate(JwtAlgorithm::ES256).unwrap();
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(key.public_jwk()).unwrap();
        let dk = DecodingKey::from_jwk(&jwk).unwrap();
        // HS256 "signed" with the public key as the secret.
        let secret = serde_json::to_vec(&key.public_jwk()).unwrap();
        let forged = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &claims(),
            &jsonwebtoken::EncodingKey::from_secret(&secret),
        );
        // Our provider refuses to even produce it...
        assert!(forged.is_err());
        // ...and to verify HMAC, whatever the key.
        assert!(verifier(&Algorithm::HS256, &DecodingKey::from_secret(&secret)).is_err());
        assert!(verifier(&Algorithm::HS256, &dk).is_err());
        // alg=none does not parse as an algorithm at all.
        let header = base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            br#"{"alg":"none","typ":"at+jwt"}"#,
        );
        let body = base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            serde_json::to_vec(&claims()).unwrap(),
        );
        assert!(
            decode::<Value>(
                &format!("{header}.{body}."),
                &dk,
                &validation(Algorithm::ES256)
            )
            .is_err()
        );
    }
}
