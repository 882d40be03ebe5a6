//! Page tokens of `ListTasks`: opaque. A page ends where the scan stopped, which may be a task
//! the caller may not read; its id must not reach the caller, so the token is sealed
//! (AES-256-GCM) and bound to the caller (the SPIFFE ID is the associated data: another caller's
//! token does not open). The key is shared by every replica through a store claim, made by the
//! first replica that needs it; after a store reset tokens from before are refused, and the
//! caller starts its listing again.

use crate::store::Claim;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom as _, SystemRandom};

use super::{Broker, BrokerError};
use crate::identity::WorkloadId;
use crate::task::TaskId;

/// The claim holding the key (hex).
const KEY_CLAIM: &str = "list-page-key";
/// Longest page token accepted, in bytes.
const MAX_TOKEN_BYTES: usize = 256;

fn bad_token() -> BrokerError {
    BrokerError::Invalid {
        field: "page_token",
        reason: "not a page token of this caller (start the listing again without one)".into(),
    }
}

fn internal(what: &str) -> BrokerError {
    BrokerError::Internal(format!("page token: {what}"))
}

fn key_from_hex(hex: &str) -> Option<LessSafeKey> {
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let bytes: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2).unwrap_or("zz"), 16))
        .collect::<Result<_, _>>()
        .ok()?;
    UnboundKey::new(&AES_256_GCM, &bytes)
        .ok()
        .map(LessSafeKey::new)
}

impl Broker {
    /// The key of page tokens: this process's copy, or the store's (made if there is none).
    async fn page_key(&self) -> Result<&LessSafeKey, BrokerError> {
        self.page_key
            .get_or_try_init(|| async {
                let fresh = format!(
                    "{}{}",
                    crate::mint::random_id().map_err(|_| internal("random"))?,
                    crate::mint::random_id().map_err(|_| internal("random"))?
                );
                let until = self.clock.now() + std::time::Duration::from_secs(3650 * 86_400);
                let claim = Claim {
                    key: KEY_CLAIM,
                    value: &fresh,
                    until,
                };
                let held = self.store.claim(&claim).await?;
                key_from_hex(held.as_deref().unwrap_or(&fresh))
                    .ok_or_else(|| internal("the stored key is damaged"))
            })
            .await
    }

    /// The token of a page that continues after `next`, for `caller`.
    pub(super) async fn seal_page(
        &self,
        caller: &WorkloadId,
        next: TaskId,
    ) -> Result<String, BrokerError> {
        let key = self.page_key().await?;
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| internal("random"))?;
        let mut sealed = next.to_string().into_bytes();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(caller.as_str().as_bytes()),
            &mut sealed,
        )
        .map_err(|_| internal("sealing"))?;
        let mut token = nonce.to_vec();
        token.extend_from_slice(&sealed);
        Ok(URL_SAFE_NO_PAD.encode(token))
    }

    /// The token of a page of `caller`'s listing that continues after `task` (for an answer cut
    /// short to fit a message).
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] when the key cannot be read from the store.
    pub async fn page_token_after(
        &self,
        caller: &WorkloadId,
        task: TaskId,
    ) -> Result<String, BrokerError> {
        self.seal_page(caller, task).await
    }

    /// Where the page of `token` continues, if it is a token of `caller`.
    pub(super) async fn open_page(
        &self,
        caller: &WorkloadId,
        token: &str,
    ) -> Result<TaskId, BrokerError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(bad_token());
        }
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad_token())?;
        if bytes.len() <= NONCE_LEN {
            return Err(bad_token());
        }
        let (nonce, sealed) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| bad_token())?;
        let key = self.page_key().await?;
        let mut sealed = sealed.to_vec();
        let plain = key
            .open_in_place(nonce, Aad::from(caller.as_str().as_bytes()), &mut sealed)
            .map_err(|_| bad_token())?;
        std::str::from_utf8(plain)
            .ok()
            .and_then(|s| TaskId::parse(s).ok())
            .ok_or_else(bad_token)
    }
}
