//! The CRL at `/crl`: the serials of certificates revoked before their expiry and not yet
//! expired, read from the store's revocation log (so every replica lists what any replica
//! revoked) and signed by the issuing CA. Rebuilt when the log has moved on since the last one,
//! or when that one is [`CRL_REFRESH`] old (expired entries drop out); otherwise served cached.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{Broker, BrokerError};
use crate::lease::{CredentialKind, Cursor};
use crate::store::unix_ms;

/// Longest a CRL is served before it is rebuilt.
pub const CRL_REFRESH: Duration = Duration::from_secs(60);
/// How long a CRL says it holds (`nextUpdate`); a fresher one is out long before.
const CRL_VALIDITY: Duration = Duration::from_secs(600);
/// Log entries read per store call.
const PAGE: usize = 512;

/// The last CRL built.
#[derive(Debug, Default)]
pub(super) struct CrlCache {
    built: tokio::sync::Mutex<Option<Built>>,
}

#[derive(Debug)]
struct Built {
    der: Arc<Vec<u8>>,
    head: Cursor,
    at: SystemTime,
    number: u64,
}

/// A serial as the log records it (32 lowercase hex digits).
fn serial_from_hex(hex: &str) -> Option<[u8; 16]> {
    // Digits only: `from_str_radix` would take a sign.
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Broker {
    /// The current CRL (DER); `None` when no issuing CA is configured.
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] when the store fails; [`BrokerError::Internal`] when
    /// signing fails.
    pub async fn crl(&self) -> Result<Option<Arc<Vec<u8>>>, BrokerError> {
        let Some(ca) = &self.ca else {
            return Ok(None);
        };
        let head = self.store.revocation_head().await?;
        let now = self.clock.now();
        let mut built = self.crl.built.lock().await;
        if let Some(b) = built.as_ref()
            && b.head == head
            && now >= b.at
            && now < b.at + CRL_REFRESH
        {
            return Ok(Some(b.der.clone()));
        }
        let mut revoked: BTreeMap<[u8; 16], SystemTime> = BTreeMap::new();
        let mut after = None;
        loop {
            let page = self.store.revocations(after, PAGE, Duration::ZERO).await?;
            for r in &page {
                if r.kind != CredentialKind::X509 || r.expires_at <= now {
                    continue;
                }
                match serial_from_hex(&r.credential) {
                    Some(s) => {
                        revoked.insert(s, r.revoked_at);
                    }
                    None => tracing::warn!(cursor = %r.cursor, "revocation log: not a serial"),
                }
            }
            match page.last() {
                Some(last) if page.len() == PAGE => after = Some(last.cursor),
                _ => break,
            }
        }
        let list: Vec<([u8; 16], SystemTime)> = revoked.into_iter().collect();
        // Numbers grow across rebuilds and, being time-based, across replicas.
        let number = unix_ms(now).max(built.as_ref().map_or(0, |b| b.number + 1));
        let der = ca
            .sign_crl(&list, number, now, now + CRL_VALIDITY)
            .map_err(|e| BrokerError::Internal(format!("signing the CRL: {e}")))?;
        let der = Arc::new(der);
        tracing::debug!(serials = list.len(), number, "CRL rebuilt");
        *built = Some(Built {
            der: der.clone(),
            head,
            at: now,
            number,
        });
        Ok(Some(der))
    }
}

#[cfg(test)]
mod tests {
    use super::serial_from_hex;

    #[test]
    fn serials_parse_only_as_the_log_writes_them() {
        let s = serial_from_hex("0102030405060708090a0b0c0d0e0f10").unwrap();
        assert_eq!(s[0], 1);
        assert_eq!(s[15], 0x10);
        for bad in [
            "",
            "01",
            "zz02030405060708090a0b0c0d0e0f10",
            "+102030405060708090a0b0c0d0e0f10",
        ] {
            assert_eq!(serial_from_hex(bad), None, "{bad}");
        }
    }
}
