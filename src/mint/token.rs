//! RFC 9068 access tokens: the claims of a task-bound JWT, and a fresh `jti`.

use serde::{Deserialize, Serialize};

use super::MintError;

/// The `typ` header of every access token (RFC 9068 section 2.1).
pub const ACCESS_TOKEN_TYP: &str = "at+jwt";

/// The confirmation claim binding a token to a client certificate (RFC 8705).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    /// Unpadded base64url SHA-256 of the certificate's DER.
    #[serde(rename = "x5t#S256")]
    pub x5t_s256: String,
}

/// An actor of a delegated credential (RFC 8693 section 4.1): who acts now, with the actors
/// before it nested in `act`. Only the outermost actor (the current one) is for access
/// decisions; the nested ones are the record of the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// The actor's SPIFFE ID.
    pub sub: String,
    /// The actor before it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Box<Actor>>,
}

impl Actor {
    /// The `act` claim of `actors`, the current one first; `None` when there is none.
    pub fn chain<S: AsRef<str>>(actors: &[S]) -> Option<Self> {
        actors.iter().rev().fold(None, |inner, sub| {
            Some(Self {
                sub: sub.as_ref().to_owned(),
                act: inner.map(Box::new),
            })
        })
    }

    /// The actors, the current one first.
    pub fn subjects(&self) -> Vec<&str> {
        let mut out = vec![self.sub.as_str()];
        let mut next = self.act.as_deref();
        while let Some(a) = next {
            out.push(a.sub.as_str());
            next = a.act.as_deref();
        }
        out
    }
}

/// The claims of a task-bound access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    /// The broker's issuer URL, exact.
    pub iss: String,
    /// The executor's SPIFFE ID.
    pub sub: String,
    /// Exactly one audience.
    pub aud: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Not before.
    pub nbf: u64,
    /// Issued at.
    pub iat: u64,
    /// 128 random bits, hex: the credential id of the lease.
    pub jti: String,
    /// The OAuth client: the executor's SPIFFE ID.
    pub client_id: String,
    /// The granted actions, space separated.
    pub scope: String,
    /// The task the token serves.
    pub task_id: String,
    /// The approvals the task carries.
    pub approval_ids: Vec<String>,
    /// The certificate the token is bound to; absent only for a CI job that presented none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cnf: Option<Confirmation>,
    /// For a CI job: what its ID token proved (the attributes policy decided on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ci: Option<crate::identity::CiJob>,
    /// For a delegated task: the actors (RFC 8693), the current executor outermost; `sub` is
    /// then the executor of the root task, whose approved authority the token carries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Actor>,
    /// For a delegated task: the root of its tree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_task_id: Option<String>,
    /// For a delegated task: the task it was delegated from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_task_id: Option<String>,
}

/// 128 bits from the system's CSPRNG, as 32 lowercase hex digits.
///
/// # Errors
/// [`MintError::Sign`] if the random source fails.
pub fn random_id() -> Result<String, MintError> {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| MintError::Sign("the system random source failed".into()))?;
    Ok(hex(&bytes))
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// Lowercase hex of the SHA-256 of `bytes` (what audit lines name instead of a secret).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn hex_and_sha256_are_lowercase_and_known() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        // SHA-256("abc"), FIPS 180-2 B.1.
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let id = random_id().unwrap();
        assert_eq!(id.len(), 32);
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
    }
}
