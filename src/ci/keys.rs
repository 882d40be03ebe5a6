//! The signing keys of one trusted CI issuer: its JWK Set, read from a file or fetched over
//! HTTPS, cached, reread once its refresh period has passed, and refetched when a token names an
//! unknown `kid` (at most once per `refetch_min`, so that a flood of made-up `kid`s cannot make
//! the broker hammer the issuer).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{PoisonError, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;

use super::CiError;

/// Largest JWK Set accepted, in bytes.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;

/// Most keys kept from one JWK Set.
const MAX_KEYS: usize = 64;

/// Where an issuer's JWK Set comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// Fetched from this URL (`https`, or `http` on a loopback host).
    Url(String),
    /// Read from this file (air-gapped installs, tests).
    File(PathBuf),
}

/// The kind of key, which decides the algorithms it may verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Rsa,
    P256,
    Ed25519,
}

impl Family {
    fn verifies(self, alg: Algorithm) -> bool {
        match self {
            Self::Rsa => matches!(
                alg,
                Algorithm::RS256
                    | Algorithm::RS384
                    | Algorithm::RS512
                    | Algorithm::PS256
                    | Algorithm::PS384
                    | Algorithm::PS512
            ),
            Self::P256 => alg == Algorithm::ES256,
            Self::Ed25519 => alg == Algorithm::EdDSA,
        }
    }
}

#[derive(Clone)]
struct Key {
    key: DecodingKey,
    family: Family,
    /// The JWK's own `alg`, when it names one: then only that.
    alg: Option<Algorithm>,
}

fn b64(jwk: &Value, name: &str) -> Result<Vec<u8>, String> {
    let s = jwk
        .get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("member {name} missing"))?;
    URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| format!("member {name} is not base64url"))
}

/// One JWK of the set: its `kid` and key, or why it is unusable.
fn parse_jwk(jwk: &Value) -> Result<(String, Key), String> {
    let member = |name: &str| jwk.get(name).and_then(Value::as_str);
    let kid = member("kid")
        .filter(|k| !k.is_empty() && k.len() <= 256)
        .ok_or("no usable kid")?;
    if member("use").is_some_and(|u| u != "sig") {
        return Err("not a signing key".into());
    }
    let alg = match member("alg") {
        None => None,
        Some(a) => Some(a.parse::<Algorithm>().map_err(|_| format!("alg {a}"))?),
    };
    let (key, family) = match (member("kty"), member("crv")) {
        (Some("RSA"), _) => {
            let mut n = b64(jwk, "n")?;
            let e = b64(jwk, "e")?;
            while n.first() == Some(&0) {
                n.remove(0);
            }
            // ring verifies 2048 to 8192 bits; refuse anything else here, by name.
            if !(256..=1024).contains(&n.len()) {
                return Err(format!("RSA modulus of {} bits", n.len() * 8));
            }
            (DecodingKey::from_rsa_raw_components(&n, &e), Family::Rsa)
        }
        (Some("EC"), Some("P-256")) => {
            let (x, y) = (b64(jwk, "x")?, b64(jwk, "y")?);
            if x.len() != 32 || y.len() != 32 {
                return Err("P-256 coordinates are not 32 bytes".into());
            }
            let key = DecodingKey::from_ec_components(
                &URL_SAFE_NO_PAD.encode(&x),
                &URL_SAFE_NO_PAD.encode(&y),
            )
            .map_err(|e| e.to_string())?;
            (key, Family::P256)
        }
        (Some("OKP"), Some("Ed25519")) => {
            let x = b64(jwk, "x")?;
            if x.len() != 32 {
                return Err("Ed25519 key is not 32 bytes".into());
            }
            let key = DecodingKey::from_ed_components(&URL_SAFE_NO_PAD.encode(&x))
                .map_err(|e| e.to_string())?;
            (key, Family::Ed25519)
        }
        (kty, crv) => return Err(format!("unsupported key {kty:?}/{crv:?}")),
    };
    if let Some(a) = alg
        && !family.verifies(a)
    {
        return Err(format!("alg {a:?} does not fit the key"));
    }
    Ok((kid.to_owned(), Key { key, family, alg }))
}

/// Parses a JWK Set document into its usable keys by `kid`; unusable keys are skipped (logged).
fn parse_set(body: &[u8]) -> Result<HashMap<String, Key>, String> {
    let set: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let listed = set
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("no keys array")?;
    let mut keys = HashMap::new();
    for jwk in listed.iter().take(MAX_KEYS) {
        match parse_jwk(jwk) {
            Ok((kid, key)) => {
                keys.insert(kid, key);
            }
            Err(why) => tracing::warn!(%why, "CI issuer JWK Set: a key is unusable; skipped"),
        }
    }
    Ok(keys)
}

/// The bytes of a JWK Set file, read with its bound (a file that grows while read included),
/// if it is still one nobody else can change (checked at every read: the keys it holds are
/// whom the broker trusts for CI jobs).
fn read_jwks_file(path: &std::path::Path) -> Result<Vec<u8>, CiError> {
    use std::io::Read as _;
    let bad = |e: String| CiError::KeysUnavailable(format!("{}: {e}", path.display()));
    crate::files::check_trusted(path).map_err(|e| bad(e.to_string()))?;
    let mut body = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_JWKS_BYTES as u64 + 1).read_to_end(&mut body))
        .map_err(|e| bad(e.to_string()))?;
    if body.len() > MAX_JWKS_BYTES {
        return Err(bad("too large".into()));
    }
    Ok(body)
}

/// Reads a JWK Set file now and tells how many of its keys are usable (a start-up check).
///
/// # Errors
/// [`CiError::KeysUnavailable`] when the file cannot be read or is not a JWK Set.
pub fn check_jwks_file(path: &std::path::Path) -> Result<usize, CiError> {
    let body = read_jwks_file(path)?;
    parse_set(&body)
        .map(|k| k.len())
        .map_err(|e| CiError::KeysUnavailable(format!("{}: {e}", path.display())))
}

#[derive(Default)]
struct Cache {
    keys: HashMap<String, Key>,
    fetched: Option<Instant>,
}

/// The cached keys of one issuer.
pub struct IssuerKeys {
    source: KeySource,
    http: Option<reqwest::Client>,
    refresh: Duration,
    refetch_min: Duration,
    cache: RwLock<Cache>,
    /// Held while fetching, so that concurrent misses make one fetch.
    fetching: tokio::sync::Mutex<Attempts>,
}

/// When the keys were last read or fetched (successfully or not), and how many attempts in a
/// row failed: failing attempts back off (from `refetch_min`, doubling, up to `refresh`), so
/// that an issuer that is down is not asked again for every token.
#[derive(Debug, Default)]
struct Attempts {
    last: Option<Instant>,
    failures: u32,
}

impl Attempts {
    /// The wait after the last attempt before another: `refetch_min`, or longer after failures.
    fn wait(&self, refetch_min: Duration, refresh: Duration) -> Duration {
        if self.failures == 0 {
            return refetch_min;
        }
        let factor = 2u32.saturating_pow(self.failures.min(16));
        refetch_min
            .saturating_mul(factor)
            .min(refresh.max(refetch_min))
    }

    fn may_try(&self, refetch_min: Duration, refresh: Duration) -> bool {
        self.last
            .is_none_or(|t| t.elapsed() >= self.wait(refetch_min, refresh))
    }
}

impl std::fmt::Debug for IssuerKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuerKeys")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl IssuerKeys {
    /// Keys from `source`; `http` is the client for URL sources.
    pub fn new(
        source: KeySource,
        http: Option<reqwest::Client>,
        refresh: Duration,
        refetch_min: Duration,
    ) -> Self {
        Self {
            source,
            http,
            refresh,
            refetch_min,
            cache: RwLock::default(),
            fetching: tokio::sync::Mutex::default(),
        }
    }

    /// Reads or fetches the JWK Set now (the caller holds `fetching`), replacing the cached
    /// keys. Returns how many are usable; on failure the cached keys stay, and the failure is
    /// counted for the backoff.
    async fn load_locked(&self, attempts: &mut Attempts) -> Result<usize, CiError> {
        attempts.last = Some(Instant::now());
        let result = self.load_now().await;
        attempts.failures = match result {
            Ok(_) => 0,
            Err(_) => attempts.failures.saturating_add(1),
        };
        result
    }

    async fn load_now(&self) -> Result<usize, CiError> {
        let body = match &self.source {
            KeySource::File(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || read_jwks_file(&path))
                    .await
                    .map_err(|e| CiError::KeysUnavailable(e.to_string()))??
            }
            KeySource::Url(url) => {
                let http = self
                    .http
                    .as_ref()
                    .ok_or_else(|| CiError::KeysUnavailable("no HTTP client".into()))?;
                crate::fetch::get_bounded(http, url, MAX_JWKS_BYTES)
                    .await
                    .map_err(|e| CiError::KeysUnavailable(format!("{url}: {e}")))?
            }
        };
        let keys = parse_set(&body).map_err(CiError::KeysUnavailable)?;
        let n = keys.len();
        let mut cache = self.cache.write().unwrap_or_else(PoisonError::into_inner);
        cache.keys = keys;
        cache.fetched = Some(Instant::now());
        Ok(n)
    }

    fn cached(&self, kid: &str, alg: Algorithm) -> Result<Option<DecodingKey>, CiError> {
        let cache = self.cache.read().unwrap_or_else(PoisonError::into_inner);
        let Some(k) = cache.keys.get(kid) else {
            return Ok(None);
        };
        if !k.family.verifies(alg) || k.alg.is_some_and(|a| a != alg) {
            return Err(CiError::Algorithm(format!(
                "key {kid} does not verify {alg:?}"
            )));
        }
        Ok(Some(k.key.clone()))
    }

    fn stale(&self) -> bool {
        self.cache
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .fetched
            .is_none_or(|t| t.elapsed() >= self.refresh)
    }

    /// The key `kid` for `alg`: from the cache, after a reread when the cache is past its
    /// refresh period, or after one refetch (rate limited) when the `kid` is unknown.
    ///
    /// # Errors
    /// [`CiError::UnknownKey`], [`CiError::Algorithm`] (the key is of another kind),
    /// [`CiError::KeysUnavailable`] when no key was ever loaded.
    pub async fn key(&self, kid: &str, alg: Algorithm) -> Result<DecodingKey, CiError> {
        if !self.stale()
            && let Some(k) = self.cached(kid, alg)?
        {
            return Ok(k);
        }
        {
            let mut attempts = self.fetching.lock().await;
            // Another caller may have fetched while this one waited; after failures, wait
            // longer before the next attempt.
            let due = (self.stale() || self.cached(kid, alg)?.is_none())
                && attempts.may_try(self.refetch_min, self.refresh);
            if due && let Err(e) = self.load_locked(&mut attempts).await {
                tracing::warn!(error = %e, "CI issuer keys could not be refreshed; keeping the cached ones");
            }
        }
        let never_loaded = self
            .cache
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .fetched
            .is_none();
        if never_loaded {
            // Not "unknown kid": no key is known at all (the caller may retry later).
            return Err(CiError::KeysUnavailable(
                "none could be read yet; the next attempt waits (backoff)".into(),
            ));
        }
        self.cached(kid, alg)?.ok_or(CiError::UnknownKey)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use serde_json::json;

    use super::*;

    #[test]
    fn failed_fetches_back_off() {
        let (min, refresh) = (Duration::from_secs(30), Duration::from_secs(600));
        let mut a = Attempts::default();
        assert!(a.may_try(min, refresh));
        assert_eq!(a.wait(min, refresh), min);
        a.failures = 1;
        assert_eq!(a.wait(min, refresh), Duration::from_secs(60));
        a.failures = 3;
        assert_eq!(a.wait(min, refresh), Duration::from_secs(240));
        a.failures = 30;
        assert_eq!(a.wait(min, refresh), refresh);
        a.last = Some(Instant::now());
        assert!(!a.may_try(min, refresh), "an attempt just failed: wait");
    }

    #[test]
    fn unusable_jwks_are_skipped_by_reason() {
        let small_rsa =
            json!({"kty": "RSA", "kid": "a", "n": URL_SAFE_NO_PAD.encode([1u8; 128]), "e": "AQAB"});
        assert!(parse_jwk(&small_rsa).err().unwrap().contains("1024 bits"));
        let rsa = json!({"kty": "RSA", "kid": "a", "n": URL_SAFE_NO_PAD.encode([0xc1u8; 256]), "e": "AQAB", "alg": "ES256"});
        assert!(parse_jwk(&rsa).err().unwrap().contains("does not fit"));
        let oct = json!({"kty": "oct", "kid": "h", "k": "c2VjcmV0"});
        assert!(parse_jwk(&oct).is_err());
        let enc = json!({"kty": "RSA", "kid": "a", "use": "enc", "n": "", "e": ""});
        assert!(parse_jwk(&enc).is_err());
        let ok = json!({"kty": "RSA", "kid": "a", "n": URL_SAFE_NO_PAD.encode([0xc1u8; 256]), "e": "AQAB"});
        let (kid, key) = parse_jwk(&ok).unwrap();
        assert_eq!(kid, "a");
        assert!(key.family.verifies(Algorithm::RS256));
        assert!(!key.family.verifies(Algorithm::HS256));
        let set = serde_json::to_vec(&json!({"keys": [ok, oct]})).unwrap();
        assert_eq!(parse_set(&set).unwrap().len(), 1);
    }
}
