//! [`KeyRing`]: the key that signs now, the keys that verify (this replica's, rotated-out ones and
//! other replicas', as published through the store), and what verifiers are told: the JWK Set and
//! the issuer's discovery document.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::SystemTime;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};

use super::{ACCESS_TOKEN_TYP, AccessClaims, JwtKey, MintError, jwks, parse_signing_jwk};

/// Longest token accepted for verification, in bytes; ours are well under 2 KiB.
pub const MAX_TOKEN_BYTES: usize = 8192;

/// A public signing key published through the store, so that every replica's JWK Set and
/// introspection know it, until `until` (after which no token it signed can still be valid).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PublishedKey {
    /// The RFC 7638 thumbprint.
    pub kid: String,
    /// The public JWK (`kid`, `alg`, `use` included).
    pub jwk: Value,
    /// When it stops being published.
    pub until: SystemTime,
}

impl PublishedKey {
    /// Publication of `key` until `until`.
    pub fn of(key: &JwtKey, until: SystemTime) -> Self {
        Self {
            kid: key.kid().to_owned(),
            jwk: key.public_jwk(),
            until,
        }
    }
}

/// A key that verifies tokens, built once from its public JWK (checked: see
/// [`parse_signing_jwk`]).
#[derive(Clone)]
pub(crate) struct JwkVerifier {
    pub(crate) key: DecodingKey,
    pub(crate) alg: Algorithm,
    jwk: Value,
}

impl JwkVerifier {
    pub(crate) fn from_jwk(jwk: &Value) -> Result<Self, MintError> {
        let bad = |e: String| MintError::Key(format!("public JWK: {e}"));
        let (_, alg) = parse_signing_jwk(jwk).map_err(bad)?;
        let parsed: jsonwebtoken::jwk::Jwk =
            serde_json::from_value(jwk.clone()).map_err(|e| bad(e.to_string()))?;
        let key = DecodingKey::from_jwk(&parsed).map_err(|e| bad(e.to_string()))?;
        let alg = if alg == "EdDSA" {
            Algorithm::EdDSA
        } else {
            Algorithm::ES256
        };
        Ok(Self {
            key,
            alg,
            jwk: jwk.clone(),
        })
    }
}

/// The key that signs now and every key that verifies, by `kid`.
struct Ring {
    current: Arc<JwtKey>,
    verifiers: BTreeMap<String, JwkVerifier>,
}

/// The broker's signing keys: the one that signs now, and every key still able to verify a live
/// token (its own, rotated-out ones, other replicas'), which is what the JWK Set publishes.
/// Clones share one ring.
#[derive(Clone)]
pub struct KeyRing {
    issuer: Arc<str>,
    ring: Arc<RwLock<Ring>>,
    /// Tokens whose signature and claims were verified, by the SHA-256 of their exact text:
    /// the `kid` that verified each and its claims. An entry counts only while that key still
    /// verifies (its `kid` is its RFC 7638 thumbprint: another key cannot take its place), and
    /// its times are checked on every use. Bounded by [`VERIFIED_CAPACITY`].
    verified: Arc<Mutex<Verified>>,
}

/// Verified tokens: SHA-256 of the token -> the `kid` that verified it and its claims.
type Verified = HashMap<[u8; 32], (String, AccessClaims)>;

/// Most verified tokens remembered (emptied when full).
const VERIFIED_CAPACITY: usize = 8192;

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ring = self.read();
        f.debug_struct("KeyRing")
            .field("issuer", &self.issuer)
            .field("current", &ring.current.kid())
            .field("verifiers", &ring.verifiers.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl KeyRing {
    /// A ring for `issuer` (the exact `iss`) signing with `current`.
    ///
    /// # Errors
    /// [`MintError::Key`] if the public JWK cannot be read back (a bug).
    pub fn new(issuer: String, current: JwtKey) -> Result<Self, MintError> {
        // jsonwebtoken panics on decode without a provider; whoever verifies through this ring
        // gets ours, whether or not the binary's main installed it.
        super::install_jose_provider();
        let verifier = JwkVerifier::from_jwk(&current.public_jwk())?;
        let verifiers = BTreeMap::from([(current.kid().to_owned(), verifier)]);
        Ok(Self {
            issuer: issuer.into(),
            ring: Arc::new(RwLock::new(Ring {
                current: Arc::new(current),
                verifiers,
            })),
            verified: Arc::default(),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Ring> {
        self.ring.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Ring> {
        self.ring.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes `next` the signing key; the previous one keeps verifying (until a refresh from
    /// the store no longer lists it). Returns the previous key.
    ///
    /// # Errors
    /// [`MintError::Key`] if the public JWK cannot be read back (a bug).
    pub fn rotate(&self, next: JwtKey) -> Result<Arc<JwtKey>, MintError> {
        let verifier = JwkVerifier::from_jwk(&next.public_jwk())?;
        let mut ring = self.write();
        ring.verifiers.insert(next.kid().to_owned(), verifier);
        Ok(std::mem::replace(&mut ring.current, Arc::new(next)))
    }

    /// Replaces the verifying keys by the current one and `published` (as read from the
    /// store). A published key that does not read back as one of ours is skipped with a
    /// warning. Returns how many keys now verify.
    pub fn set_published(&self, published: &[PublishedKey]) -> usize {
        let mut verifiers = BTreeMap::new();
        for p in published {
            match JwkVerifier::from_jwk(&p.jwk) {
                Ok(v) if p.jwk.get("kid").and_then(Value::as_str) == Some(p.kid.as_str()) => {
                    verifiers.insert(p.kid.clone(), v);
                }
                Ok(_) => tracing::warn!(kid = %p.kid, "published key skipped: kid mismatch"),
                Err(e) => tracing::warn!(kid = %p.kid, error = %e, "published key skipped"),
            }
        }
        let mut ring = self.write();
        let current = ring.current.kid().to_owned();
        if let Some(own) = ring.verifiers.remove(&current) {
            verifiers.insert(current, own);
        }
        ring.verifiers = verifiers;
        ring.verifiers.len()
    }

    /// Stops verifying with `kid` at once (a revoked key). The current key is never dropped.
    /// Returns whether it was known.
    pub fn forget(&self, kid: &str) -> bool {
        let mut ring = self.write();
        if ring.current.kid() == kid {
            return false;
        }
        ring.verifiers.remove(kid).is_some()
    }

    /// Signs access-token `claims` with the current key.
    ///
    /// # Errors
    /// [`MintError::Sign`].
    pub fn sign_access_token(&self, claims: &AccessClaims) -> Result<String, MintError> {
        let current = Arc::clone(&self.read().current);
        current.sign_jws(ACCESS_TOKEN_TYP, claims)
    }

    /// Verifies one of our access tokens: size, `typ`, `kid`, signature, `alg`, exact `iss`,
    /// every claim present, and `nbf <= now < exp` on the broker's clock (no leeway).
    /// Audience is not checked here: introspection answers for any audience.
    ///
    /// # Errors
    /// [`MintError::Sign`] with the reason; callers answer "inactive" without it.
    pub fn verify_access_token(
        &self,
        token: &str,
        now: std::time::SystemTime,
    ) -> Result<AccessClaims, MintError> {
        let bad = |why: String| MintError::Sign(why);
        if token.len() > MAX_TOKEN_BYTES {
            return Err(bad("token too long".into()));
        }
        let now = now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let in_time = |claims: AccessClaims| {
            if now < claims.nbf || now >= claims.exp {
                return Err(bad("outside its validity period".into()));
            }
            Ok(claims)
        };
        let digest: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
            .as_ref()
            .try_into()
            .map_err(|_| bad("digest".into()))?;
        let known = self
            .verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&digest)
            .cloned();
        if let Some((kid, claims)) = known
            && self.read().verifiers.contains_key(&kid)
        {
            return in_time(claims);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| bad(e.to_string()))?;
        if header.typ.as_deref() != Some(ACCESS_TOKEN_TYP) {
            return Err(bad("typ is not at+jwt".into()));
        }
        let Some(verifier) = header
            .kid
            .as_deref()
            .and_then(|kid| self.read().verifiers.get(kid).cloned())
        else {
            return Err(bad("unknown kid".into()));
        };
        let mut v = Validation::new(verifier.alg);
        v.set_issuer(&[&self.issuer]);
        v.validate_aud = false;
        // Time is checked below against the injected clock, not jsonwebtoken's.
        v.validate_exp = false;
        v.validate_nbf = false;
        v.set_required_spec_claims(&["exp", "nbf", "iss", "sub", "aud"]);
        let claims = jsonwebtoken::decode::<AccessClaims>(token, &verifier.key, &v)
            .map(|d| d.claims)
            .map_err(|e| bad(e.to_string()))?;
        if let Some(kid) = header.kid {
            let mut verified = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
            if verified.len() >= VERIFIED_CAPACITY {
                verified.clear();
            }
            verified.insert(digest, (kid, claims.clone()));
        }
        in_time(claims)
    }

    /// The issuer URL.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The key that signs now.
    pub fn current(&self) -> Arc<JwtKey> {
        Arc::clone(&self.read().current)
    }

    /// The `kid`s of every key that verifies.
    pub fn kids(&self) -> Vec<String> {
        self.read().verifiers.keys().cloned().collect()
    }

    /// `/.well-known/jwks.json`: the signing key first, then every other key that verifies.
    pub fn jwks(&self) -> Value {
        let ring = self.read();
        let current = ring.current.kid();
        let others = ring
            .verifiers
            .iter()
            .filter(|(kid, _)| kid.as_str() != current)
            .map(|(_, v)| v.jwk.clone());
        jwks(std::iter::once(ring.current.public_jwk()).chain(others))
    }

    /// `/.well-known/openid-configuration`: enough for ordinary JWT libraries to find the keys.
    pub fn discovery(&self) -> Value {
        let mut algs: Vec<&str> = self
            .read()
            .verifiers
            .values()
            .map(|v| {
                if v.alg == Algorithm::EdDSA {
                    "EdDSA"
                } else {
                    "ES256"
                }
            })
            .collect();
        algs.sort_unstable();
        algs.dedup();
        // The fields OpenID Connect Discovery 1.0 marks REQUIRED are all given, so that libraries
        // do not fall back to their defaults (RS256): the broker issues access tokens only (no
        // ID tokens, no authorization endpoint), signed with `algs`, to public subjects (the
        // SPIFFE ID is the same for every audience).
        json!({
            "issuer": &*self.issuer,
            "jwks_uri": format!("{}/.well-known/jwks.json", self.issuer),
            "response_types_supported": ["token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": algs,
            "token_endpoint_auth_methods_supported": ["tls_client_auth"],
            "tls_client_certificate_bound_access_tokens": true,
            "access_token_signing_alg_values_supported": algs,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::mint::{Confirmation, JwtAlgorithm};

    fn claims(now: u64) -> AccessClaims {
        AccessClaims {
            iss: "https://broker.test".into(),
            sub: "spiffe://t.test/agent".into(),
            aud: "db".into(),
            exp: now + 60,
            nbf: now,
            iat: now,
            jti: "j".into(),
            client_id: "spiffe://t.test/agent".into(),
            scope: "read".into(),
            task_id: "t".into(),
            approval_ids: vec![],
            cnf: Some(Confirmation {
                x5t_s256: "x".into(),
            }),
            ci: None,
            act: None,
            root_task_id: None,
            parent_task_id: None,
        }
    }

    fn kids(jwks: &Value) -> Vec<String> {
        jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_owned())
            .collect()
    }

    /// A token verified once is known by its exact text: its times are checked on every use,
    /// a token differing by one byte is verified (and refused) afresh, and one signed by a key
    /// forgotten since is refused.
    #[test]
    fn a_verified_token_is_remembered_only_as_what_it_is() {
        let secs = 1_800_000_000;
        let now = UNIX_EPOCH + Duration::from_secs(secs);
        let ring = KeyRing::new(
            "https://broker.test".into(),
            JwtKey::generate(JwtAlgorithm::EdDSA).unwrap(),
        )
        .unwrap();
        let token = ring.sign_access_token(&claims(secs)).unwrap();
        assert_eq!(ring.verify_access_token(&token, now).unwrap(), claims(secs));
        assert_eq!(ring.verify_access_token(&token, now).unwrap(), claims(secs));
        let late = now + Duration::from_secs(60);
        assert!(ring.verify_access_token(&token, late).is_err());
        let early = now - Duration::from_secs(1);
        assert!(ring.verify_access_token(&token, early).is_err());
        let mut tampered = token.clone().into_bytes();
        let last = tampered.len() - 2;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).unwrap();
        assert!(ring.verify_access_token(&tampered, now).is_err());
        let kid = ring.current().kid().to_owned();
        ring.rotate(JwtKey::generate(JwtAlgorithm::EdDSA).unwrap())
            .unwrap();
        assert!(ring.forget(&kid));
        assert!(ring.verify_access_token(&token, now).is_err());
    }

    #[test]
    fn a_rotated_out_key_keeps_verifying_until_the_store_drops_it() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let secs = 1_800_000_000;
        let first = JwtKey::generate(JwtAlgorithm::ES256).unwrap();
        let ring = KeyRing::new("https://broker.test".into(), first).unwrap();
        let old = ring.sign_access_token(&claims(secs)).unwrap();
        let old_key = ring
            .rotate(JwtKey::generate(JwtAlgorithm::EdDSA).unwrap())
            .unwrap();
        let new = ring.sign_access_token(&claims(secs)).unwrap();
        assert_ne!(
            jsonwebtoken::decode_header(&old).unwrap().kid,
            jsonwebtoken::decode_header(&new).unwrap().kid
        );
        // Both verify; the JWK Set lists the new key first, then the old.
        assert!(ring.verify_access_token(&old, now).is_ok());
        assert!(ring.verify_access_token(&new, now).is_ok());
        let current = ring.current();
        assert_eq!(kids(&ring.jwks()), [current.kid(), old_key.kid()]);
        let algs = &ring.discovery()["access_token_signing_alg_values_supported"];
        assert_eq!(algs, &json!(["ES256", "EdDSA"]));

        // The store still publishes the old key: it stays. Once it does not, it is gone.
        let published = [PublishedKey::of(&old_key, now)];
        assert_eq!(ring.set_published(&published), 2);
        assert!(ring.verify_access_token(&old, now).is_ok());
        assert_eq!(ring.set_published(&[]), 1);
        assert!(ring.verify_access_token(&old, now).is_err());
        assert!(ring.verify_access_token(&new, now).is_ok());
        assert_eq!(kids(&ring.jwks()), [current.kid()]);
    }

    #[test]
    fn a_tampered_published_key_is_skipped() {
        let ring =
            KeyRing::new("i".into(), JwtKey::generate(JwtAlgorithm::ES256).unwrap()).unwrap();
        let other = JwtKey::generate(JwtAlgorithm::ES256).unwrap();
        let mut wrong_kid = PublishedKey::of(&other, UNIX_EPOCH);
        wrong_kid.kid = "someone-else".into();
        let mut bad_jwk = PublishedKey::of(&other, UNIX_EPOCH);
        bad_jwk.jwk["x"] = "AAAA".into();
        assert_eq!(ring.set_published(&[wrong_kid, bad_jwk]), 1);
    }
}
