//! Public JWKs and their RFC 7638 thumbprints (the `kid` of every key the broker signs with).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

/// A public key as a JWK needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKey {
    /// P-256: the uncompressed SEC1 point (0x04 || X || Y).
    P256(Vec<u8>),
    /// Ed25519: the 32-byte key.
    Ed25519(Vec<u8>),
    /// RSA: big-endian modulus and exponent (only ever verified, never signed with).
    Rsa {
        /// Modulus.
        n: Vec<u8>,
        /// Exponent.
        e: Vec<u8>,
    },
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

impl PublicKey {
    /// The required members of the JWK, as RFC 7638 lists them, in lexicographic order.
    fn required_members(&self) -> Vec<(&'static str, String)> {
        match self {
            Self::P256(point) => {
                // An uncompressed point is 0x04 || X (32) || Y (32).
                let (x, y) = point
                    .get(1..)
                    .map_or((&[][..], &[][..]), |xy| xy.split_at(xy.len() / 2));
                vec![
                    ("crv", "P-256".into()),
                    ("kty", "EC".into()),
                    ("x", b64(x)),
                    ("y", b64(y)),
                ]
            }
            Self::Ed25519(x) => vec![
                ("crv", "Ed25519".into()),
                ("kty", "OKP".into()),
                ("x", b64(x)),
            ],
            Self::Rsa { n, e } => vec![("e", b64(e)), ("kty", "RSA".into()), ("n", b64(n))],
        }
    }

    /// The RFC 7638 thumbprint: SHA-256 over the required members, sorted, without whitespace,
    /// as unpadded base64url.
    pub fn thumbprint(&self) -> String {
        // Every member value is base64url or a fixed name: no character needs JSON escaping.
        let body: Vec<String> = self
            .required_members()
            .into_iter()
            .map(|(k, v)| format!("\"{k}\":\"{v}\""))
            .collect();
        let canonical = format!("{{{}}}", body.join(","));
        b64(ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes()).as_ref())
    }

    /// The public JWK with `kid`, `alg` and `use`.
    pub fn to_jwk(&self, alg: &str) -> Value {
        let mut jwk = serde_json::Map::new();
        for (k, v) in self.required_members() {
            jwk.insert(k.into(), Value::String(v));
        }
        jwk.insert("kid".into(), Value::String(self.thumbprint()));
        jwk.insert("alg".into(), Value::String(alg.into()));
        jwk.insert("use".into(), Value::String("sig".into()));
        Value::Object(jwk)
    }
}

/// A public signing JWK as the broker publishes it, read back and checked: a P-256 key with
/// `alg: ES256` or an Ed25519 key with `alg: EdDSA`, whose `kid` is its RFC 7638 thumbprint.
/// Returns the key and its `alg`, or why it is refused.
///
/// # Errors
/// A one-line reason.
pub fn parse_signing_jwk(jwk: &Value) -> Result<(PublicKey, &'static str), String> {
    let member = |name: &str| {
        jwk.get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("JWK member {name} is missing"))
    };
    let coordinate = |name: &str| -> Result<Vec<u8>, String> {
        let bytes = URL_SAFE_NO_PAD
            .decode(member(name)?)
            .map_err(|_| format!("JWK member {name} is not base64url"))?;
        if bytes.len() == 32 {
            Ok(bytes)
        } else {
            Err(format!("JWK member {name} is not 32 bytes"))
        }
    };
    let (key, alg) = match (member("kty")?, member("crv")?, member("alg")?) {
        ("EC", "P-256", "ES256") => {
            let mut point = vec![4u8];
            point.extend(coordinate("x")?);
            point.extend(coordinate("y")?);
            (PublicKey::P256(point), "ES256")
        }
        ("OKP", "Ed25519", "EdDSA") => (PublicKey::Ed25519(coordinate("x")?), "EdDSA"),
        (kty, crv, alg) => return Err(format!("unsupported JWK {kty}/{crv}/{alg}")),
    };
    if member("kid")? != key.thumbprint() {
        return Err("JWK kid is not its thumbprint".into());
    }
    Ok((key, alg))
}

/// A JWK Set document of `keys`.
pub fn jwks(keys: impl IntoIterator<Item = Value>) -> Value {
    json!({ "keys": keys.into_iter().collect::<Vec<_>>() })
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    use super::*;

    fn d(s: &str) -> Vec<u8> {
        URL_SAFE_NO_PAD.decode(s).unwrap()
    }

    /// RFC 7638 section 3.1.
    #[test]
    fn rfc7638_rsa_vector() {
        let key = PublicKey::Rsa {
            n: d(
                "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
            ),
            e: d("AQAB"),
        };
        assert_eq!(
            key.thumbprint(),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
    }

    /// RFC 8037 appendix A.3.
    #[test]
    fn rfc8037_ed25519_vector() {
        let key = PublicKey::Ed25519(d("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"));
        assert_eq!(
            key.thumbprint(),
            "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
        );
    }

    #[test]
    fn p256_jwk_has_x_and_y_and_its_thumbprint_as_kid() {
        let mut point = vec![4u8];
        point.extend([1u8; 32]);
        point.extend([2u8; 32]);
        let key = PublicKey::P256(point);
        let jwk = key.to_jwk("ES256");
        assert_eq!(jwk["kty"], "EC");
        assert_eq!(jwk["crv"], "P-256");
        assert_eq!(d(jwk["x"].as_str().unwrap()), vec![1u8; 32]);
        assert_eq!(d(jwk["y"].as_str().unwrap()), vec![2u8; 32]);
        assert_eq!(jwk["kid"], key.thumbprint().as_str());
        assert_eq!(jwk["use"], "sig");
    }

    #[test]
    fn a_published_jwk_reads_back_only_when_consistent() {
        for alg in [
            crate::mint::JwtAlgorithm::ES256,
            crate::mint::JwtAlgorithm::EdDSA,
        ] {
            let key = crate::mint::JwtKey::generate(alg).unwrap();
            let jwk = key.public_jwk();
            let (public, parsed_alg) = parse_signing_jwk(&jwk).unwrap();
            assert_eq!(&public, key.public_key());
            assert_eq!(parsed_alg, key.alg());
            // Any other kid, a wrong alg, a truncated coordinate: refused.
            let mut other = jwk.clone();
            other["kid"] = "x".into();
            assert!(parse_signing_jwk(&other).is_err());
            let mut other = jwk.clone();
            other["alg"] = "RS256".into();
            assert!(parse_signing_jwk(&other).is_err());
            let mut other = jwk.clone();
            other["x"] = "AAAA".into();
            assert!(parse_signing_jwk(&other).is_err());
        }
        assert!(parse_signing_jwk(&json!({"kty": "RSA", "n": "AQAB", "e": "AQAB"})).is_err());
        assert!(parse_signing_jwk(&json!("not an object")).is_err());
    }
}
