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
}
