//! CI OIDC ID tokens: the trusted issuers (issuer URL pinned, broker-specific audience, allowed
//! algorithms, where their keys come from), the verification of an ID token, and the [`CiJob`]
//! it proves. Knows nothing of tasks, policy or gRPC: the broker's CI exchange builds on it.

mod claims;
mod keys;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use serde_json::{Map, Value};

pub use claims::{ClaimNames, MAX_CLAIM_BYTES, Preset};
// Defined in `identity`, below ci, policy and mint; also named here, with what proves it.
pub use crate::identity::CiJob;
pub use keys::{IssuerKeys, KeySource, MAX_JWKS_BYTES, check_jwks_file};

use crate::identity::WorkloadId;
use crate::mint::sha256_hex;

/// Longest ID token accepted, in bytes (GitHub's and GitLab's are 1 to 2 KiB).
pub const MAX_ID_TOKEN_BYTES: usize = 8192;

/// Largest leeway on `exp`, `nbf` and `iat` an issuer may be configured with.
pub const MAX_LEEWAY: Duration = Duration::from_secs(300);

/// Why an ID token is refused. The message names the check, never the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CiError {
    /// Over [`MAX_ID_TOKEN_BYTES`].
    #[error("the ID token is longer than {MAX_ID_TOKEN_BYTES} bytes")]
    TooLarge,
    /// Not a compact JWS with a JSON header and payload.
    #[error("the ID token is malformed: {0}")]
    Malformed(String),
    /// `iss` is not one of the configured issuers.
    #[error("the ID token's issuer is not trusted")]
    UntrustedIssuer,
    /// `alg` is not in the issuer's allow-list, or does not fit the key.
    #[error("algorithm refused: {0}")]
    Algorithm(String),
    /// No key of the issuer has the token's `kid`, even after a refetch.
    #[error("the ID token's kid is not a key of its issuer")]
    UnknownKey,
    /// The issuer's keys could not be read or fetched, and none is cached.
    #[error("the issuer's keys are unavailable: {0}")]
    KeysUnavailable(String),
    /// The signature does not verify.
    #[error("the ID token's signature does not verify")]
    Signature,
    /// `aud` is not exactly the audience configured for the issuer.
    #[error("the ID token's audience is not this broker's")]
    Audience,
    /// `exp` has passed (beyond the leeway).
    #[error("the ID token has expired")]
    Expired,
    /// `nbf` or `iat` is in the future (beyond the leeway).
    #[error("the ID token is not valid yet")]
    NotYetValid,
    /// `iat` is older than the issuer's maximum token age.
    #[error("the ID token is older than this issuer's maximum token age")]
    TooOld,
    /// `exp - iat` is negative or longer than the issuer's maximum token lifetime.
    #[error("the ID token's lifetime (exp - iat) is outside this issuer's bound")]
    Lifetime,
    /// A claim the broker needs is missing or unusable.
    #[error("{0}")]
    Claims(String),
}

/// One trusted CI issuer, as configured.
#[derive(Debug)]
pub struct TrustedIssuer {
    /// Short name (e.g. `github`), in identities and audit lines.
    pub name: String,
    /// The exact `iss`.
    pub issuer: String,
    /// The exact `aud` required.
    pub audience: String,
    /// The algorithms accepted (never `none` or HMAC).
    pub algorithms: Vec<Algorithm>,
    /// Which claims carry the job's attributes.
    pub claims: ClaimNames,
    /// Tolerance on `exp`, `nbf`, `iat`.
    pub leeway: Duration,
    /// Oldest `iat` accepted, from now.
    pub max_token_age: Duration,
    /// Longest lifetime (`exp - iat`) a token may claim.
    pub max_token_lifetime: Duration,
    /// A task derived from a token of this issuer ends at the latest this long after the
    /// exchange (and never after the token's `exp`).
    pub task_deadline_max: Option<Duration>,
    /// The issuer's keys.
    pub keys: IssuerKeys,
}

/// An ID token that passed every check.
#[derive(Debug, Clone)]
pub struct VerifiedIdToken {
    /// Who issued it.
    pub issuer: Arc<TrustedIssuer>,
    /// The job it proves.
    pub job: CiJob,
    /// Its `jti`, or the SHA-256 (hex) of its signing input (header and payload, never the
    /// signature, which ECDSA lets anyone rewrite) when it has none: what replay is checked on.
    pub token_id: String,
    /// SHA-256 (hex) of the token, for audit lines.
    pub token_sha256: String,
    /// Its `exp`.
    pub expires_at: SystemTime,
}

/// Every trusted issuer, by `iss`, and the trust domain of the identities CI jobs get.
#[derive(Debug, Clone, Default)]
pub struct CiIssuers {
    by_iss: HashMap<String, Arc<TrustedIssuer>>,
    trust_domain: String,
}

fn secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn numeric(claims: &Map<String, Value>, name: &str) -> Result<Option<i64>, CiError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_i64()
            .map(Some)
            .ok_or_else(|| CiError::Claims(format!("claim {name}: not a number of seconds"))),
    }
}

/// The unverified payload, read only to pick the issuer whose key then verifies it.
fn peek_payload(token: &str) -> Result<Map<String, Value>, CiError> {
    let mut parts = token.split('.');
    let (Some(_), Some(payload), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(CiError::Malformed("not three dot-separated parts".into()));
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| CiError::Malformed("payload is not base64url".into()))?;
    serde_json::from_slice(&bytes)
        .map_err(|_| CiError::Malformed("payload is not a JSON object".into()))
}

impl CiIssuers {
    /// The issuers; CI jobs get identities in `trust_domain`.
    pub fn new(issuers: Vec<TrustedIssuer>, trust_domain: String) -> Self {
        Self {
            by_iss: issuers
                .into_iter()
                .map(|i| (i.issuer.clone(), Arc::new(i)))
                .collect(),
            trust_domain,
        }
    }

    /// The trust domain of CI identities: never one accepted for mTLS.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The configured names of the trusted issuers.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_iss.values().map(|i| i.name.as_str())
    }

    /// Whether any issuer is trusted (without one, the exchange is refused).
    pub fn is_empty(&self) -> bool {
        self.by_iss.is_empty()
    }

    /// The workload identity of `job`'s repository:
    /// `spiffe://<trust domain>/ci/<issuer name>/<repository id>`. Leases are recorded under it,
    /// and `agent lock` on it stops every credential of the repository's CI jobs.
    ///
    /// # Errors
    /// [`CiError::Claims`] if no valid SPIFFE ID can be made (never for numeric ids).
    pub fn workload_id(&self, job: &CiJob) -> Result<WorkloadId, CiError> {
        let plain = job
            .repository_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'));
        // An id that is not a plain path segment is named by its hash, marked so (a plain id has
        // no '.'), so that no plain id can be another's hash.
        let id = if plain && job.repository_id.len() <= 128 {
            job.repository_id.clone()
        } else {
            format!("sha256.{}", sha256_hex(job.repository_id.as_bytes()))
        };
        WorkloadId::parse(&format!(
            "spiffe://{}/ci/{}/{id}",
            self.trust_domain, job.issuer_name
        ))
        .map_err(|e| CiError::Claims(format!("no identity for the job: {e}")))
    }

    /// Verifies `token` at `now`: size, shape, issuer (pinned), `alg` in the issuer's
    /// allow-list, signature with the issuer's key `kid`, `aud` exactly the issuer's
    /// audience, `exp`/`nbf`/`iat` with the issuer's leeway, `iat` not older than the maximum
    /// token age, `exp - iat` within the maximum lifetime; then reads the job from the signed
    /// claims.
    ///
    /// # Errors
    /// [`CiError`] naming the first check that failed.
    pub async fn verify(&self, token: &str, now: SystemTime) -> Result<VerifiedIdToken, CiError> {
        if token.len() > MAX_ID_TOKEN_BYTES {
            return Err(CiError::TooLarge);
        }
        let peeked = peek_payload(token)?;
        let iss = peeked
            .get("iss")
            .and_then(Value::as_str)
            .ok_or(CiError::UntrustedIssuer)?;
        let issuer = self
            .by_iss
            .get(iss)
            .ok_or(CiError::UntrustedIssuer)?
            .clone();

        let header = jsonwebtoken::decode_header(token)
            // `none` and unknown names fail here: they are not algorithms jsonwebtoken knows.
            // The decoder's own message is not passed on: it describes its internals.
            .map_err(|_| {
                CiError::Algorithm("the header does not decode, or names no algorithm known".into())
            })?;
        if !issuer.algorithms.contains(&header.alg) {
            return Err(CiError::Algorithm(format!(
                "{:?} is not allowed for this issuer",
                header.alg
            )));
        }
        let kid = header.kid.ok_or(CiError::UnknownKey)?;
        let key = issuer.keys.key(&kid, header.alg).await?;
        let mut v = jsonwebtoken::Validation::new(header.alg);
        // Time, issuer and audience are checked below against the broker's clock, exactly.
        v.validate_exp = false;
        v.validate_nbf = false;
        v.validate_aud = false;
        v.required_spec_claims.clear();
        let claims = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &v)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature => CiError::Signature,
                jsonwebtoken::errors::ErrorKind::InvalidAlgorithm => {
                    CiError::Algorithm("does not fit the key".into())
                }
                _ => CiError::Malformed("the claims do not decode as a JSON object".into()),
            })?
            .claims;

        if claims.get("iss").and_then(Value::as_str) != Some(issuer.issuer.as_str()) {
            return Err(CiError::UntrustedIssuer);
        }
        let aud_ok = match claims.get("aud") {
            Some(Value::String(a)) => *a == issuer.audience,
            Some(Value::Array(a)) => {
                a.len() == 1 && a[0].as_str() == Some(issuer.audience.as_str())
            }
            _ => false,
        };
        if !aud_ok {
            return Err(CiError::Audience);
        }
        let now_s = secs(now);
        let leeway = i64::try_from(issuer.leeway.as_secs()).unwrap_or(0);
        let exp =
            numeric(&claims, "exp")?.ok_or_else(|| CiError::Claims("claim exp: missing".into()))?;
        let iat =
            numeric(&claims, "iat")?.ok_or_else(|| CiError::Claims("claim iat: missing".into()))?;
        if exp.saturating_add(leeway) <= now_s {
            return Err(CiError::Expired);
        }
        if numeric(&claims, "nbf")?.is_some_and(|nbf| nbf > now_s.saturating_add(leeway))
            || iat > now_s.saturating_add(leeway)
        {
            return Err(CiError::NotYetValid);
        }
        let max_age = i64::try_from(issuer.max_token_age.as_secs()).unwrap_or(i64::MAX);
        if now_s.saturating_sub(iat) > max_age.saturating_add(leeway) {
            return Err(CiError::TooOld);
        }
        // With iat near now, this bounds exp too: every time made from it below is in range.
        let max_lifetime = i64::try_from(issuer.max_token_lifetime.as_secs()).unwrap_or(i64::MAX);
        if exp
            .checked_sub(iat)
            .is_none_or(|l| l < 0 || l > max_lifetime)
        {
            return Err(CiError::Lifetime);
        }
        let expires_at = u64::try_from(exp)
            .ok()
            .and_then(|e| UNIX_EPOCH.checked_add(Duration::from_secs(e)))
            .ok_or(CiError::Lifetime)?;
        let job = CiJob::from_claims(&issuer.name, &issuer.claims, &claims)?;
        let token_sha256 = sha256_hex(token.as_bytes());
        let token_id = match claims.get("jti").and_then(Value::as_str) {
            Some(j) if !j.is_empty() && j.len() <= 256 => {
                format!("jti:{}", sha256_hex(j.as_bytes()))
            }
            // The signed part only: an ECDSA signature can be rewritten into another valid
            // one ((r, s) to (r, n - s)), which would make a new token of the same claims.
            _ => {
                let signed = token.rsplit_once('.').map_or(token, |(input, _)| input);
                format!("signed:{}", sha256_hex(signed.as_bytes()))
            }
        };
        Ok(VerifiedIdToken {
            issuer,
            job,
            token_id,
            token_sha256,
            expires_at,
        })
    }
}
