//! The revocation log, the [`RevocationLog`] of the embedded store: appended inside the
//! transaction that revokes ([`log_in`]), read by cursor, waited on through a watch channel bumped
//! after each commit that logged, and pruned by age.
//!
//! A waiter subscribes before it reads, so a commit after its read still wakes it.

use std::time::SystemTime;

use async_trait::async_trait;
use redb::{ReadableDatabase as _, ReadableTable as _, WriteTransaction};

use super::EmbeddedStore;
use super::tables::{REVOCATIONS, from_json, to_json};
use crate::lease::{Cursor, Revocation};
use crate::store::{LogRead, MAX_REVOCATION_WAIT, RevocationLog, StoreError, unix_ms};

impl EmbeddedStore {
    /// Wakes the waiters of [`RevocationLog::revocations`] after a commit that may have logged
    /// one.
    pub(super) fn logged(&self) {
        self.logged.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Reads up to `limit` log entries after `after`.
    async fn read_revocations(
        &self,
        after: Option<Cursor>,
        limit: usize,
    ) -> Result<Vec<Revocation>, StoreError> {
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let log = txn.open_table(REVOCATIONS)?;
            let from = after.unwrap_or(Cursor::START);
            let range = log.range((from.ms, from.seq)..)?;
            let mut out = Vec::new();
            for entry in range {
                let (k, v) = entry?;
                let (ms, seq) = k.value();
                let cursor = Cursor { ms, seq };
                if after.is_some_and(|a| cursor <= a) {
                    continue;
                }
                if out.len() >= limit {
                    break;
                }
                let mut r: Revocation = from_json(v.value(), format_args!("revocation {cursor}"))?;
                r.cursor = cursor;
                out.push(r);
            }
            Ok(out)
        })
        .await
    }
}

#[async_trait]
impl RevocationLog for EmbeddedStore {
    /// The entries after `after`, waiting up to `wait` for one when there are none yet.
    async fn revocations(&self, read: LogRead) -> Result<Vec<Revocation>, StoreError> {
        let (after, limit, wait) = (read.after, read.limit, read.wait);
        let deadline = tokio::time::Instant::now() + wait.min(MAX_REVOCATION_WAIT);
        // Subscribed before reading, so a commit after the read still wakes this waiter.
        let mut logged = self.logged.subscribe();
        loop {
            let found = self.read_revocations(after, limit).await?;
            if !found.is_empty() || wait.is_zero() {
                return Ok(found);
            }
            match tokio::time::timeout_at(deadline, logged.changed()).await {
                Ok(Ok(())) => {}
                _ => return Ok(Vec::new()),
            }
        }
    }

    /// The key of the last entry.
    async fn revocation_head(&self) -> Result<Cursor, StoreError> {
        self.blocking(|db| {
            let txn = db.begin_read()?;
            let log = txn.open_table(REVOCATIONS)?;
            Ok(log.last()?.map_or(Cursor::START, |(k, _)| {
                let (ms, seq) = k.value();
                Cursor { ms, seq }
            }))
        })
        .await
    }

    /// One transaction.
    async fn prune_revocations(&self, before: SystemTime) -> Result<(), StoreError> {
        let before = unix_ms(before);
        self.blocking(move |db| {
            let txn = db.begin_write()?;
            txn.open_table(REVOCATIONS)?
                .retain_in(..(before, 0), |_, _| false)?;
            txn.commit()?;
            Ok(())
        })
        .await
    }
}

/// Appends revocations to the log inside write transaction `txn`, numbered after the last
/// entry (`ms` never goes back, so the log stays in order if the clock does).
pub(super) fn log_in(txn: &WriteTransaction, revoked: &[Revocation]) -> Result<(), StoreError> {
    if revoked.is_empty() {
        return Ok(());
    }
    let mut log = txn.open_table(REVOCATIONS)?;
    let mut last = log.last()?.map(|(k, _)| {
        let (ms, seq) = k.value();
        Cursor { ms, seq }
    });
    for r in revoked {
        let ms = unix_ms(r.revoked_at);
        let next = match last {
            Some(l) if l.ms >= ms => Cursor {
                ms: l.ms,
                seq: l.seq + 1,
            },
            _ => Cursor { ms, seq: 0 },
        };
        let json = to_json(r, "encoding revocation")?;
        log.insert((next.ms, next.seq), json.as_slice())?;
        last = Some(next);
    }
    Ok(())
}
