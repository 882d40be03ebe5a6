//! The CRL at `/crl`: the serials of certificates revoked before their expiry and not yet
//! expired, read from the store's revocation log (so every replica lists what any replica
//! revoked) and signed by the issuing CA. The cache is brought up to date at most once per
//! [`CRL_MIN_REBUILD`], whatever the rate of requests: within that time the last CRL is served
//! without asking the store. Bringing it up to date reads only the log entries after the last
//! one read (a full read only at start, or when the log went back: a store reset), and re-signs
//! when something changed or the last CRL is [`CRL_REFRESH`] old.

use crate::store::LogRead;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{Broker, BrokerError};
use crate::lease::{CredentialKind, Cursor};
use crate::store::unix_ms;

/// Longest a CRL is served before it is signed again (expired entries drop out).
pub const CRL_REFRESH: Duration = Duration::from_secs(60);
/// Shortest time between two reads of the log for the CRL: a revocation is listed within it.
pub const CRL_MIN_REBUILD: Duration = Duration::from_secs(1);
/// How long a CRL says it holds (`nextUpdate`); a fresher one is out long before.
const CRL_VALIDITY: Duration = Duration::from_secs(600);
/// Log entries read per store call.
const PAGE: usize = 512;

/// The last CRL built, and what it was built from.
#[derive(Debug, Default)]
pub(super) struct CrlCache {
    built: tokio::sync::Mutex<Option<Built>>,
}

#[derive(Debug)]
struct Built {
    der: Arc<Vec<u8>>,
    /// Where the log was read up to.
    head: Cursor,
    /// When it was signed.
    signed_at: SystemTime,
    /// When the log was last read.
    checked_at: SystemTime,
    number: u64,
    /// Revoked serials: when revoked, and when the certificate expires.
    revoked: BTreeMap<[u8; 16], (SystemTime, SystemTime)>,
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
        let now = self.clock.now();
        let mut built = self.crl.built.lock().await;
        if let Some(b) = built.as_ref()
            && now >= b.checked_at
            && now < b.checked_at + CRL_MIN_REBUILD
        {
            return Ok(Some(b.der.clone()));
        }
        let head = self.store.revocation_head().await?;
        // Start over when there is nothing yet, or the log went back (a store reset).
        let previous = built.take().filter(|b| b.head <= head);
        let number = previous.as_ref().map_or(0, |b| b.number);
        let mut after = previous.as_ref().map(|b| b.head);
        let (mut revoked, signed) = match previous {
            Some(b) => (b.revoked, Some((b.der, b.signed_at))),
            None => (BTreeMap::new(), None),
        };
        let mut changed = signed.is_none();
        loop {
            let read = LogRead {
                after,
                limit: PAGE,
                wait: Duration::ZERO,
            };
            let page = self.store.revocations(read).await?;
            for r in &page {
                if r.kind != CredentialKind::X509 || r.expires_at <= now {
                    continue;
                }
                match serial_from_hex(&r.credential) {
                    Some(s) => {
                        revoked.insert(s, (r.revoked_at, r.expires_at));
                        changed = true;
                    }
                    None => tracing::warn!(cursor = %r.cursor, "revocation log: not a serial"),
                }
            }
            if let Some(last) = page.last() {
                after = Some(last.cursor);
            }
            if page.len() < PAGE {
                break;
            }
        }
        let before = revoked.len();
        revoked.retain(|_, (_, expires)| *expires > now);
        changed |= revoked.len() != before;
        if let Some((der, signed_at)) = signed
            && !changed
            && now >= signed_at
            && now < signed_at + CRL_REFRESH
        {
            *built = Some(Built {
                der: der.clone(),
                head: after.unwrap_or(head),
                signed_at,
                checked_at: now,
                number,
                revoked,
            });
            return Ok(Some(der));
        }
        let list: Vec<([u8; 16], SystemTime)> =
            revoked.iter().map(|(s, (at, _))| (*s, *at)).collect();
        // Numbers grow across rebuilds and, being time-based, across replicas.
        let number = unix_ms(now).max(number + 1);
        let der = ca
            .sign_crl(&list, number, now, now + CRL_VALIDITY)
            .map_err(|e| BrokerError::Internal(format!("signing the CRL: {e}")))?;
        let der = Arc::new(der);
        tracing::debug!(serials = list.len(), number, "CRL rebuilt");
        *built = Some(Built {
            der: der.clone(),
            head: after.unwrap_or(head),
            signed_at: now,
            checked_at: now,
            number,
            revoked,
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
